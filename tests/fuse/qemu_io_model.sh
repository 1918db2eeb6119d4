#!/bin/sh
# qemu_io_model.sh - QEMU as a client of the FUSE disk.
#
# `qemu-io -f raw` runs a random sequence of writes, zero writes
# (fallocate ZERO_RANGE / PUNCH_HOLE) and discards, aligned and not, on
# `disk` of a read-write mount, and the same sequence on a raw model file.
# The first half goes through the page cache, the second with O_DIRECT
# (-t none); a snapshot is taken between them.  The disk and the snapshot
# must match the model at each point, qemu-io's pattern reads must pass
# through the mount, and after unmounting qemu-img must find the image
# clean and equal to the model.
set -eu

# shellcheck source-path=SCRIPTDIR source=fuse_lib.sh
. "$(dirname "$0")/fuse_lib.sh"

need "$QEMU_IO"

size=$((32 * 1024 * 1024))
img="$T/io.qcow2"
model="$T/model.raw"
mnt="$T/mnt"
"$QEMU_IMG" create -q -f qcow2 "$img" "$size"
"$QEMU_IMG" create -q -f raw "$model" "$size"

# ops SEED COUNT: random qemu-io commands, one per line.
ops()
{
    awk -v seed="$1" -v n="$2" -v size="$size" 'BEGIN {
        srand(seed)
        for (i = 0; i < n; i++) {
            r = rand()
            len = int(rand() * rand() * 300000) + 1
            off = int(rand() * (size - len))
            if (rand() < 0.5) {
                off = int(off / 4096) * 4096
                len = int((len + 4095) / 4096) * 4096
                if (off + len > size) {
                    len = size - off
                }
            }
            if (r < 0.7) {
                printf "write -P %d %d %d\n", int(rand() * 255) + 1, off, len
            } else if (r < 0.85) {
                printf "write -z %d %d\n", off, len
            } else {
                printf "discard %d %d\n", off, len
            }
        }
    }'
}

# run_ops FILE CACHE OPSFILE: runs the commands on FILE with qemu-io.
run_ops()
{
    ro_file=$1
    ro_cache=$2
    ro_ops=$3
    set --
    while IFS= read -r line; do
        set -- "$@" -c "$line"
    done <"$ro_ops"
    if ! "$QEMU_IO" -f raw -t "$ro_cache" "$@" "$ro_file" \
        >"$T/qemu-io.out" 2>&1; then
        tail -n 20 "$T/qemu-io.out" >&2
        die "qemu-io on $ro_file failed"
    fi
    cp "$T/qemu-io.out" "$T/qemu-io.last"
    if grep -qiE 'error|failed|fail' "$T/qemu-io.out"; then
        grep -iE 'error|failed|fail' "$T/qemu-io.out" | head -n 5 >&2
        die "qemu-io reported an error on $ro_file"
    fi
}

fuse_mount "$img" "$mnt" -o rw
pid=$FUSE_PID

note "seed $QSNAP_SEED"
ops "$QSNAP_SEED" 150 >"$T/ops1"
run_ops "$mnt/disk" writeback "$T/ops1"
run_ops "$model" writeback "$T/ops1"
same "$mnt/disk" "$model" "after the cached half"

mkdir "$mnt/snapshots/mid"
cp "$model" "$T/mid.raw"

ops "$((QSNAP_SEED + 1))" 150 >"$T/ops2"
run_ops "$mnt/disk" none "$T/ops2"
run_ops "$model" none "$T/ops2"
same "$mnt/disk" "$model" "after the O_DIRECT half"
same "$mnt/snapshots/mid/disk" "$T/mid.raw" "snapshot mid"

# qemu-io's own pattern check, reading through the mount.
printf 'write -P 0x5c 1000 70000\nwrite -P 0xa7 4194304 1048576\n' \
    >"$T/ops3"
run_ops "$mnt/disk" writeback "$T/ops3"
run_ops "$model" writeback "$T/ops3"
printf 'read -P 0x5c 1000 70000\nread -P 0xa7 4194304 1048576\n' >"$T/ops4"
run_ops "$mnt/disk" none "$T/ops4"
run_ops "$mnt/disk" writeback "$T/ops4"

# A flush through the mount (fsync).
"$QEMU_IO" -f raw -c flush "$mnt/disk" >/dev/null ||
    die "qemu-io flush failed"
same "$mnt/disk" "$model" "at the end"
fuse_umount "$mnt" "$pid"

qemu_check "$img"
"$QEMU_IMG" compare -q -f raw -F qcow2 "$model" "$img" ||
    die "qemu-img compare: the image differs from the model"
"$QEMU_IMG" convert -l snapshot.name=mid -O raw "$img" "$T/mid.qemu.raw"
same "$T/mid.qemu.raw" "$T/mid.raw" "snapshot mid as QEMU reads it"
note "qemu-io through the mount matches the model; image clean"
