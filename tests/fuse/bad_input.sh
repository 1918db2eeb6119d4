#!/bin/sh
# bad_input.sh - wrong requests get clear errors and the daemon lives on.
#
# On a read-write mount: writes and truncation of snapshot files fail with
# EROFS, rmdir of a missing snapshot with ENOENT, mkdir of a duplicate
# with EEXIST and of an invalid name with EINVAL, files cannot be created
# or removed, writes past the end of the disk fail with ENOSPC, and rmdir
# of a snapshot that is open fails with EBUSY until it is closed.  A
# second read-write mount of the same image is refused (the image is
# locked) while a read-only one beside it works.  After all that the
# daemon still serves requests and exits cleanly, and the image is clean.
# Mounting a damaged, a missing or a garbage image fails with a message
# naming the file and a non-zero status, and leaves nothing mounted.
set -eu

# shellcheck source-path=SCRIPTDIR source=fuse_lib.sh
. "$(dirname "$0")/fuse_lib.sh"

need "$QEMU_IO"

img="$T/bad.qcow2"
mnt="$T/mnt"
"$QEMU_IMG" create -q -f qcow2 "$img" 16M
"$QEMU_IO" -f qcow2 -c "write -P 0x33 0 1M" "$img" >/dev/null
"$QEMU_IMG" snapshot -c s1 "$img"

fuse_mount "$img" "$mnt" -o rw
pid=$FUSE_PID
s1="$mnt/snapshots/s1"

expect_fail "Read-only file system" "write to a snapshot" \
    dd if=/dev/zero of="$s1/disk" bs=4k count=1 conv=notrunc
expect_fail "Read-only file system" "truncate a snapshot" \
    truncate -s 0 "$s1/disk"
expect_fail "Read-only file system" "write to a snapshot's info.json" \
    sh -c "echo x >>'$s1/info.json'"
expect_fail "Read-only file system" "write info.json" \
    sh -c "echo x >>'$mnt/info.json'"
expect_fail "No such file or directory" "rmdir of a missing snapshot" \
    rmdir "$mnt/snapshots/missing"
expect_fail "File exists" "mkdir of an existing snapshot" \
    mkdir "$s1"
expect_fail "File exists" "mkdir named like an existing ID" \
    mkdir "$mnt/snapshots/1"
expect_fail "Invalid argument" "mkdir with a bad escape" \
    mkdir "$mnt/snapshots/a%zz"
# rename(2) says EINVAL, which mv words its own way.
expect_fail "Invalid argument\\|subdirectory of itself" \
    "rename to a bad escape" mv -T "$s1" "$mnt/snapshots/b%4"
[ -d "$s1" ] || die "a failed rename lost s1"
expect_fail "Operation not permitted" "mkdir outside snapshots/" \
    mkdir "$mnt/dir"
expect_fail "Operation not permitted" "create a file" \
    touch "$mnt/snapshots/file"
expect_fail "Operation not permitted" "remove the disk" rm -f "$mnt/disk"
expect_fail "Operation not permitted" "shrink the disk" \
    truncate -s 1M "$mnt/disk"
expect_fail "Operation not permitted" "open the disk with O_TRUNC" \
    sh -c "echo x >'$mnt/disk'"
expect_fail "No space left on device" "write past the end" \
    dd if=/dev/zero of="$mnt/disk" bs=4k count=1 seek=4096 conv=notrunc
expect_fail "No space left on device" "write running over the end" \
    dd if=/dev/zero of="$mnt/disk" bs=4k count=2 seek=4095 conv=notrunc \
    oflag=direct

# An open snapshot cannot go; once closed it can.
mkdir "$mnt/snapshots/busy"
exec 3<"$mnt/snapshots/busy/disk"
expect_fail "Device or resource busy" "rmdir of an open snapshot" \
    rmdir "$mnt/snapshots/busy"
exec 3<&-
rmdir "$mnt/snapshots/busy" || die "rmdir after closing failed"

# A second writer is refused; a reader beside the writer is fine.
mkdir -p "$T/mnt2"
if "$QSNAP_FUSE" -o rw "$img" "$T/mnt2" 2>"$T/lock.err"; then
    fusermount3 -u "$T/mnt2" || :
    die "a second read-write mount of a mounted image succeeded"
fi
grep -q "bad.qcow2" "$T/lock.err" || {
    cat "$T/lock.err" >&2
    die "the lock error does not name the image"
}
! mountpoint -q "$T/mnt2" || die "the refused mount left a mount behind"
fuse_mount "$img" "$T/mnt2"
same "$T/mnt2/disk" "$mnt/disk" "a read-only mount beside the writer"
same "$T/mnt2/snapshots/s1/disk" "$s1/disk" "its view of s1"
fuse_umount "$T/mnt2" "$FUSE_PID"

# Still alive and well.
kill -0 "$pid" 2>/dev/null || die "the daemon died"
printf 'hello' | dd of="$mnt/disk" bs=1 seek=100 conv=notrunc status=none
[ "$(dd if="$mnt/disk" bs=1 skip=100 count=5 status=none)" = hello ] ||
    die "the disk does not read back what was written"
"$QEMU_IO" -r -f raw -c "read -P 0x33 4096 4096" "$s1/disk" >/dev/null ||
    die "snapshot s1 does not read back"
fuse_umount "$mnt" "$pid"
qemu_check "$img"
[ "$("$QEMU_IMG" snapshot -l "$img" | grep -c ' s1 ')" -eq 1 ] ||
    die "s1 is gone"
note "bad requests refused; the daemon kept serving; image clean"

# mount_fails TEXT IMAGE [OPTION...]: qsnap-fuse refuses IMAGE saying TEXT.
mount_fails()
{
    mf_text=$1
    mf_img=$2
    shift 2
    mkdir -p "$T/mnt3"
    if "$QSNAP_FUSE" "$@" "$mf_img" "$T/mnt3" 2>"$T/mount.err"; then
        fusermount3 -u "$T/mnt3" || :
        die "mounting $mf_img succeeded"
    fi
    if ! grep -q "$mf_text" "$T/mount.err"; then
        cat "$T/mount.err" >&2
        die "mounting $mf_img: expected '$mf_text' in the message"
    fi
    ! mountpoint -q "$T/mnt3" || die "a failed mount of $mf_img left a mount"
    note "refused: $(head -n 1 "$T/mount.err")"
}

# An L1 table offset that is not cluster-aligned.
cp "$img" "$T/corrupt.qcow2"
printf '\001' | dd of="$T/corrupt.qcow2" bs=1 seek=47 conv=notrunc \
    status=none
mount_fails "corrupt.qcow2" "$T/corrupt.qcow2"
# A cluster size of 2^40 bytes.
cp "$img" "$T/bits.qcow2"
printf '\000\000\000\050' | dd of="$T/bits.qcow2" bs=1 seek=20 \
    conv=notrunc status=none
mount_fails "bits.qcow2" "$T/bits.qcow2" -o rw
mount_fails "No such file" "$T/missing.qcow2"
head -c 100000 /dev/urandom >"$T/garbage"
mount_fails "garbage" "$T/garbage" -o format=qcow2
mount_fails "unknown format" "$img" -o format=vmdk
note "damaged, missing and garbage images refused"
