#!/bin/sh
# tree.sh - the shape and content of the tree qsnap-fuse shows.
#
# An overlay over a base image, with three snapshots: one named "a/b",
# one holding a VM state section container (qsnap-img snapshot
# --vmstate) and one with QEMU's raw VM state (savevm in QEMU).  Mounted
# as a daemon, read-only:
#   - the root lists backing, disk, info.json and snapshots;
#   - info.json is byte for byte what qsnap-img and qemu-img print;
#   - disk and backing/base.qcow2 read as QEMU reads the two images, and
#     SEEK_DATA/SEEK_HOLE (qemu-img map on the mount) show where data is;
#   - a/b is listed as a%2Fb; each snapshot's times are its date;
#   - the sections appear as files equal to the stored files, QEMU's
#     state as one file "raw" starting with QEMU's magic.
# Then: a raw image mounted read-write; a read-write qcow2 mount grown by
# truncate and stopped with SIGTERM after unflushed writes (clean exit,
# data kept, image clean); -o direct_io; --help and --version.
set -eu

# shellcheck source-path=SCRIPTDIR source=fuse_lib.sh
. "$(dirname "$0")/fuse_lib.sh"

need "$QEMU_IO"
[ -x "$QSNAP_IMG" ] || die "$QSNAP_IMG not built"

base="$T/base.qcow2"
top="$T/top.qcow2"
mnt="$T/mnt"
"$QEMU_IMG" create -q -f qcow2 "$base" 16M
"$QEMU_IO" -f qcow2 -c "write -P 0x41 0 2M" "$base" >/dev/null
"$QEMU_IMG" create -q -f qcow2 -b base.qcow2 -F qcow2 "$top"
"$QEMU_IO" -f qcow2 -c "write -P 0x42 1M 1M" "$top" >/dev/null
"$QEMU_IMG" snapshot -c "a/b" "$top"
mkdir "$T/state"
head -c 300000 /dev/urandom >"$T/state/ram"
printf 'device state\n' >"$T/state/cpu0"
: >"$T/state/empty"
"$QSNAP_IMG" snapshot -q -c secs --vmstate "$T/state" "$top" ||
    die "qsnap-img snapshot --vmstate failed"
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    printf 'savevm ck1\nquit\n' |
        qemu-system-x86_64 -nodefaults -display none -machine none \
            -drive "if=none,file=$top,format=qcow2,id=d0" -monitor stdio \
            >"$T/qemu.out" 2>&1 || die "QEMU savevm failed"
    have_ck1=1
else
    note "qemu-system-x86_64 missing: no raw VM state snapshot"
    have_ck1=0
fi
"$QEMU_IMG" convert -O raw "$base" "$T/base.raw"
"$QEMU_IMG" convert -O raw "$top" "$T/top.raw"

# Daemon mode: returns once mounted.
mkdir "$mnt"
"$QSNAP_FUSE" "$top" "$mnt" 2>"$T/daemon.err" || {
    cat "$T/daemon.err" >&2
    die "qsnap-fuse (daemon) failed"
}
FUSE_MOUNTS="$mnt $FUSE_MOUNTS"
mountpoint -q "$mnt" || die "the daemon did not mount"

[ "$(cd "$mnt" && echo *)" = "backing disk info.json snapshots" ] ||
    die "root lists '$(cd "$mnt" && echo *)'"
"$QSNAP_IMG" info --output=json -U "$top" >"$T/qsnap-info.json"
same "$mnt/info.json" "$T/qsnap-info.json" "info.json vs qsnap-img info"
"$QEMU_IMG" info --output=json -U "$top" >"$T/qemu-info.json"
same "$mnt/info.json" "$T/qemu-info.json" "info.json vs qemu-img info"
[ "$(wc -c <"$mnt/info.json")" -eq "$(stat -c %s "$mnt/info.json")" ] ||
    die "info.json's size is not its length"

same "$mnt/disk" "$T/top.raw" "disk"
[ "$(cd "$mnt/backing" && echo *)" = "base.qcow2" ] ||
    die "backing/ lists '$(cd "$mnt/backing" && echo *)'"
same "$mnt/backing/base.qcow2" "$T/base.raw" "backing/base.qcow2"
"$QEMU_IMG" map -f raw --output=json "$mnt/disk" >"$T/map.json"
grep -q '"start": 0, "length": 2097152,.*"data": true' "$T/map.json" ||
    { cat "$T/map.json" >&2; die "map of disk: no data at 0..2M"; }
grep -q '"start": 2097152, "length": 14680064,.*"data": false' \
    "$T/map.json" || { cat "$T/map.json" >&2; die "map: no hole after 2M"; }

expected="a%2Fb secs"
[ "$have_ck1" -eq 0 ] || expected="a%2Fb ck1 secs"
[ "$(cd "$mnt/snapshots" && echo *)" = "$expected" ] ||
    die "snapshots/ lists '$(cd "$mnt/snapshots" && echo *)'"
grep -q '"name": "a/b"' "$mnt/snapshots/a%2Fb/info.json" ||
    die "a%2Fb/info.json does not name a/b"
date_sec=$(sed -n 's/^ *"date-sec": \([0-9]*\),$/\1/p' \
    "$mnt/snapshots/secs/info.json")
for f in secs secs/disk secs/info.json secs/vmstate; do
    [ "$(stat -c %Y "$mnt/snapshots/$f")" = "$date_sec" ] ||
        die "snapshots/$f: mtime is not the snapshot's date"
done
[ ! -e "$mnt/snapshots/a%2Fb/vmstate" ] ||
    die "a snapshot without VM state shows vmstate/"
same "$mnt/snapshots/a%2Fb/disk" "$mnt/snapshots/secs/disk" \
    "two snapshots of the same disk"

[ "$(cd "$mnt/snapshots/secs/vmstate" && echo *)" = "cpu0 empty ram" ] ||
    die "secs/vmstate lists '$(cd "$mnt/snapshots/secs/vmstate" && echo *)'"
for s in cpu0 empty ram; do
    same "$mnt/snapshots/secs/vmstate/$s" "$T/state/$s" "section $s"
done
if [ "$have_ck1" -eq 1 ]; then
    raw="$mnt/snapshots/ck1/vmstate/raw"
    [ "$(cd "$mnt/snapshots/ck1/vmstate" && echo *)" = raw ] ||
        die "ck1/vmstate does not hold one file raw"
    [ "$(head -c 4 "$raw")" = QEVM ] || die "ck1's raw state lacks QEVM"
    size=$(sed -n 's/^ *"vm-state-size": \([0-9]*\),$/\1/p' \
        "$mnt/snapshots/ck1/info.json")
    [ "$(stat -c %s "$raw")" = "$size" ] || die "raw is not vm-state-size"
    "$QSNAP_IMG" vmstate dump -U "$top" ck1 "$T/ck1.state" ||
        die "qsnap-img vmstate dump failed"
    same "$raw" "$T/ck1.state" "ck1's raw VM state"
fi
note "tree, info.json, backing, snapshots and VM state as expected"
fusermount3 -u "$mnt" || die "unmounting the daemon failed"
FUSE_MOUNTS=$(drop "$mnt" "$FUSE_MOUNTS")

# A raw image, read-write.
head -c 3000000 /dev/urandom >"$T/plain.raw"
fuse_mount "$T/plain.raw" "$mnt" -o rw,format=raw
grep -q '"format": "raw"' "$mnt/info.json" || die "raw: info.json"
printf 'qsnap' | dd of="$mnt/disk" bs=1 seek=5000 conv=notrunc status=none
[ "$(stat -c %s "$mnt/disk")" -eq 3000000 ] || die "raw: disk size"
expect_fail "Operation not supported" "snapshot of a raw image" \
    mkdir "$mnt/snapshots/x"
fuse_umount "$mnt" "$FUSE_PID"
[ "$(dd if="$T/plain.raw" bs=1 skip=5000 count=5 status=none)" = qsnap ] ||
    die "raw: the write did not reach the file"

# Read-write: grow, write without fsync, stop with SIGTERM.
"$QEMU_IMG" create -q -f qcow2 "$T/rw.qcow2" 8M
fuse_mount "$T/rw.qcow2" "$mnt" -o rw
pid=$FUSE_PID
truncate -s 24M "$mnt/disk" || die "growing the disk failed"
[ "$(stat -c %s "$mnt/disk")" -eq $((24 * 1024 * 1024)) ] ||
    die "the disk did not grow"
head -c 1048576 /dev/urandom >"$T/chunk"
dd if="$T/chunk" of="$mnt/disk" bs=1M seek=20 conv=notrunc status=none
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
FUSE_PIDS=$(drop "$pid" "$FUSE_PIDS")
FUSE_MOUNTS=$(drop "$mnt" "$FUSE_MOUNTS")
[ "$status" -eq 0 ] || die "SIGTERM: exit status $status"
! mountpoint -q "$mnt" || die "SIGTERM did not unmount"
qemu_check "$T/rw.qcow2"
"$QEMU_IO" -f qcow2 -c "read -v 20M 16" "$T/rw.qcow2" >/dev/null
"$QEMU_IMG" convert -O raw "$T/rw.qcow2" "$T/rw.raw"
[ "$(stat -c %s "$T/rw.raw")" -eq $((24 * 1024 * 1024)) ] ||
    die "the grown size was not kept"
dd if="$T/rw.raw" bs=1M skip=20 count=1 status=none | cmp -s - "$T/chunk" ||
    die "SIGTERM lost written data"
note "raw images, growing, SIGTERM with unflushed data: fine"

fuse_mount "$top" "$mnt" -o direct_io
same "$mnt/disk" "$T/top.raw" "disk with -o direct_io"
fuse_umount "$mnt" "$FUSE_PID"

"$QSNAP_FUSE" --help >"$T/help.out" 2>&1 || die "--help failed"
grep -q "IMAGE MOUNTPOINT" "$T/help.out" || die "--help: no usage line"
"$QSNAP_FUSE" --version >"$T/version.out" 2>&1 || die "--version failed"
if "$QSNAP_FUSE" "$top" >"$T/usage.out" 2>&1; then
    die "a missing mount point was accepted"
fi
note "options and usage fine"
