#!/bin/sh
# ext4_snapshots.sh - a real filesystem on the FUSE disk, snapshotted.
#
# mkfs.ext4 on `disk` of a read-write mount, loop-mounted; files are
# written, the filesystem frozen and `mkdir snapshots/s1` taken; files are
# changed and deleted, s2 taken the same way, more changes.  Each
# snapshot's disk, loop-mounted read-only, holds exactly the files of its
# moment; `e2fsck -fn` is clean on the live disk and on every snapshot;
# after unmounting, `qemu-img check` is clean, `qemu-img snapshot -l`
# lists s1 and s2, and QEMU reads each snapshot with the digests the mount
# showed.
set -eu

# shellcheck source-path=SCRIPTDIR source=fuse_lib.sh
. "$(dirname "$0")/fuse_lib.sh"

loop_ok
need mkfs.ext4
need e2fsck
need fsfreeze
need sha256sum

img="$T/ext4.qcow2"
mnt="$T/mnt"
ext="$T/ext"
snap="$T/snap"
"$QEMU_IMG" create -q -f qcow2 "$img" 96M

fuse_mount "$img" "$mnt" -o rw
pid=$FUSE_PID

# mkfs discards the whole disk first: fallocate(PUNCH_HOLE) on the mount.
mkfs.ext4 -q -F -b 4096 "$mnt/disk" >"$T/mkfs.out" 2>&1 ||
    { cat "$T/mkfs.out" >&2; die "mkfs.ext4 on the FUSE disk failed"; }
loop_mount "$mnt/disk" "$ext" rw

# files FILE...: the sha256 list of the files under $ext, sorted.
sums()
{
    (cd "$ext" && find . -type f -print | LC_ALL=C sort | xargs sha256sum)
}

# A little of everything: a big file, small ones, a directory tree.
dd if=/dev/urandom of="$ext/big" bs=1M count=6 status=none
dd if=/dev/urandom of="$ext/gone" bs=4096 count=37 status=none
mkdir -p "$ext/dir/sub"
i=0
while [ "$i" -lt 40 ]; do
    head -c $((i * 997 + 13)) /dev/urandom >"$ext/dir/sub/f$i"
    i=$((i + 1))
done
echo "first version" >"$ext/dir/text"
sums >"$T/s1.sums"

# snapshot NAME: a consistent snapshot of the mounted filesystem.
snapshot()
{
    sync
    fsfreeze -f "$ext"
    sn_status=0
    mkdir "$mnt/snapshots/$1" || sn_status=$?
    fsfreeze -u "$ext"
    [ "$sn_status" -eq 0 ] || die "mkdir snapshots/$1 failed"
}
snapshot s1

# Change, delete, add.
dd if=/dev/urandom of="$ext/big" bs=1M count=2 seek=2 conv=notrunc \
    status=none
rm "$ext/gone"
rm -r "$ext/dir/sub"
echo "second version" >>"$ext/dir/text"
dd if=/dev/urandom of="$ext/new" bs=64k count=50 status=none
sums >"$T/s2.sums"
snapshot s2

dd if=/dev/urandom of="$ext/big" bs=1M count=1 conv=notrunc status=none
echo "third version" >"$ext/dir/text"
sums >"$T/live.sums"

# check_snapshot NAME SUMS: the snapshot holds exactly the files in SUMS.
check_snapshot()
{
    loop_mount "$mnt/snapshots/$1/disk" "$snap" ro,noload
    (cd "$snap" && find . -type f -print | LC_ALL=C sort |
        xargs sha256sum) >"$T/got.sums"
    loop_umount "$snap"
    if ! cmp -s "$2" "$T/got.sums"; then
        diff "$2" "$T/got.sums" >&2 || :
        die "snapshot $1 does not hold the files of its moment"
    fi
}
check_snapshot s1 "$T/s1.sums"
check_snapshot s2 "$T/s2.sums"
[ "$(wc -l <"$T/s1.sums")" -eq 43 ] || die "s1: expected 43 files"
note "s1 and s2 hold their files byte for byte"

loop_umount "$ext"
for d in "$mnt/disk" "$mnt/snapshots/s1/disk" "$mnt/snapshots/s2/disk"; do
    if ! e2fsck -fn "$d" >"$T/fsck.out" 2>&1; then
        cat "$T/fsck.out" >&2
        die "e2fsck -fn $d is not clean"
    fi
done
note "e2fsck clean on the live disk and both snapshots"

# The live filesystem again, read-only: the latest files.
loop_mount "$mnt/disk" "$ext" ro
sums >"$T/got.sums"
loop_umount "$ext"
cmp -s "$T/live.sums" "$T/got.sums" || die "the live disk lost files"

for s in s1 s2; do
    sha256sum <"$mnt/snapshots/$s/disk" >"$T/$s.fuse.sum"
done
fuse_umount "$mnt" "$pid"

qemu_check "$img"
"$QEMU_IMG" snapshot -l "$img" >"$T/list.out"
grep -q ' s1 ' "$T/list.out" || die "qemu-img snapshot -l does not list s1"
grep -q ' s2 ' "$T/list.out" || die "qemu-img snapshot -l does not list s2"
for s in s1 s2; do
    "$QEMU_IMG" convert -l "snapshot.name=$s" -O raw "$img" "$T/$s.raw"
    sha256sum <"$T/$s.raw" >"$T/$s.qemu.sum"
    rm -f "$T/$s.raw"
    cmp -s "$T/$s.fuse.sum" "$T/$s.qemu.sum" ||
        die "QEMU reads snapshot $s differently from the mount"
done
note "qemu-img check clean; QEMU agrees on s1 and s2"
