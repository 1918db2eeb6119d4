#!/bin/sh
# The main job, on a small image made here:
#   create a disk, write to it, take a checkpoint (disk + VM state in one
#   file), mount the image as a filesystem of snapshots, take an external
#   checkpoint (an overlay) and commit it back.
# Runs from the build directory (make demo) or with QSNAP_IMG/QSNAP_FUSE set.
set -eu

img_tool=${QSNAP_IMG:-./qsnap-img/qsnap-img}
fuse_tool=${QSNAP_FUSE:-./qsnap-fuse/qsnap-fuse}
work=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-demo.XXXXXX")
mnt=$work/mnt
mounted=

cleanup() {
    if [ -n "$mounted" ]; then
        fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || :
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() {
    printf '\n$ %s\n' "$*"
    "$@"
}

can_mount() {
    [ -x "$fuse_tool" ] && [ -c /dev/fuse ] && command -v fusermount3 \
        >/dev/null 2>&1
}

mount_image() { # IMAGE [rw]
    mkdir -p "$mnt"
    if [ "${2:-}" = rw ]; then
        step "$fuse_tool" -o rw "$1" "$mnt"
    else
        step "$fuse_tool" "$1" "$mnt"
    fi
    mounted=$1
}

unmount_image() {
    step fusermount3 -u "$mnt"
    # The daemon closes the image just after the unmount returns: wait for
    # its lock to go before the next step opens the image.
    tries=0
    while ! "$img_tool" info "$mounted" >/dev/null 2>&1 && [ $tries -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    mounted=
}

disk=$work/vm.qcow2

# 1. Create a 64 MiB disk.
step "$img_tool" create -f qcow2 "$disk" 64M

# 2. Write guest data: through the FUSE mount when possible, else convert.
yes 'first boot: the guest writes its disk' | head -c 4194304 \
    >"$work/data1"
if can_mount; then
    mount_image "$disk" rw
    step dd if="$work/data1" of="$mnt/disk" bs=1M conv=notrunc status=none
    step sync "$mnt/disk"
    unmount_image
else
    truncate -s 64M "$work/data1"
    step "$img_tool" convert -f raw -O qcow2 "$work/data1" "$disk"
fi

# 3. A checkpoint: the disk plus the VM's state (memory, devices) in the
#    same file, as a VMM saves it.
mkdir "$work/state"
printf '{"cpus": 2, "devices": ["virtio-blk0"]}\n' >"$work/state/vm.json"
head -c 1048576 /dev/urandom >"$work/state/memory-region-0"
truncate -s 32M "$work/state/memory-region-0"
step "$img_tool" snapshot -c boot --vmstate "$work/state" "$disk"
step "$img_tool" snapshot -l "$disk"
step "$img_tool" vmstate list "$disk" boot

# 4. The guest keeps writing after the checkpoint.
yes 'after the checkpoint' | head -c 1048576 >"$work/data2"
if can_mount; then
    mount_image "$disk" rw
    step dd if="$work/data2" of="$mnt/disk" bs=1M conv=notrunc status=none
    unmount_image

    # 5. Mount read-only: the live disk, every snapshot and its VM state
    #    appear as files.
    mount_image "$disk"
    step ls -lR "$mnt"
    step cmp -n 4194304 "$work/data1" "$mnt/snapshots/boot/disk"
    step cmp "$work/state/vm.json" "$mnt/snapshots/boot/vmstate/vm.json"
    printf 'the snapshot still holds the first data; the live disk moved on\n'
    unmount_image
else
    printf '\n(FUSE is not available here: skipping the mount steps)\n'
fi

# 6. External checkpoint: freeze the disk under an overlay, write to the
#    overlay, then commit the overlay back into the disk.
step "$img_tool" create -f qcow2 -b vm.qcow2 -F qcow2 "$work/overlay.qcow2"
if can_mount; then
    yes 'written to the overlay' | head -c 2097152 >"$work/data3"
    mount_image "$work/overlay.qcow2" rw
    step dd if="$work/data3" of="$mnt/disk" bs=1M seek=8 conv=notrunc \
        status=none
    unmount_image
fi
step "$img_tool" list "$work/overlay.qcow2"
step "$img_tool" commit "$work/overlay.qcow2"
step "$img_tool" compare "$work/overlay.qcow2" "$disk"
step "$img_tool" check "$disk"
step "$img_tool" info "$disk"
printf '\ndemo finished\n'
