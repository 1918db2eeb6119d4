# shellcheck shell=sh
# fuse_lib.sh - shared helpers for the qsnap-fuse tests (sourced, POSIX sh).
#
# Sets defaults for the variables `make check` exports, so that a script
# also runs by hand from a build directory:
#   top_builddir  build tree root         (default: the current directory)
#   QSNAP_FUSE    qsnap-fuse/qsnap-fuse   QSNAP_IMG   qsnap-img/qsnap-img
#   QEMU_IMG      qemu-img                QEMU_IO     qemu-io
#   QSNAP_SEED    seed for the randomized parts (default: from the date)
# Skips (exit 77) when /dev/fuse or fusermount3 is missing.  Makes a
# temporary directory $T; on exit every loop mount and FUSE mount made
# through these helpers is undone and $T removed (kept if KEEP_T is set).

# shellcheck disable=SC2034  # variables are used by the sourcing scripts

me=${0##*/}

: "${top_builddir:=$(pwd)}"
: "${QSNAP_FUSE:=$top_builddir/qsnap-fuse/qsnap-fuse}"
: "${QSNAP_IMG:=$top_builddir/qsnap-img/qsnap-img}"
: "${QEMU_IMG:=qemu-img}"
: "${QEMU_IO:=qemu-io}"
: "${QSNAP_SEED:=$(date +%Y%m%d)}"

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

skip()
{
    echo "$me: SKIP: $*" >&2
    exit 77
}

note()
{
    echo "$me: $*"
}

[ -c /dev/fuse ] || skip "/dev/fuse is missing"
command -v fusermount3 >/dev/null 2>&1 || skip "fusermount3 is missing"
[ -x "$QSNAP_FUSE" ] || die "$QSNAP_FUSE not built (run make check)"
command -v "$QEMU_IMG" >/dev/null 2>&1 || die "$QEMU_IMG not found"

# need PROGRAM: a tool a script cannot do without.
need()
{
    command -v "$1" >/dev/null 2>&1 || die "$1 not found"
}

T=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-fuse-test.XXXXXX") || exit 1

# What to undo on exit, newest first (space-separated; $T has no spaces).
FUSE_MOUNTS=
FUSE_PIDS=
LOOP_MOUNTS=

cleanup()
{
    for m in $LOOP_MOUNTS; do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || :
    done
    for m in $FUSE_MOUNTS; do
        fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null ||
            :
    done
    for p in $FUSE_PIDS; do
        kill "$p" 2>/dev/null || :
        wait "$p" 2>/dev/null || :
    done
    [ -n "${KEEP_T:-}" ] || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# drop WORD LIST: LIST without WORD.
drop()
{
    drop_out=
    for w in $2; do
        [ "$w" = "$1" ] || drop_out="$drop_out $w"
    done
    echo "$drop_out"
}

# fuse_mount IMAGE MOUNTPOINT [OPTION...]: runs qsnap-fuse in the
# foreground (in the background of this shell) and waits for the mount.
# Sets FUSE_PID; its stderr goes to $T/fuse-<pid>.log.
fuse_mount()
{
    fm_img=$1
    fm_mnt=$2
    shift 2
    mkdir -p "$fm_mnt"
    FUSE_N=$((${FUSE_N:-0} + 1))
    "$QSNAP_FUSE" -f "$@" "$fm_img" "$fm_mnt" 2>"$T/fuse.$FUSE_N.log" &
    FUSE_PID=$!
    ln -s "fuse.$FUSE_N.log" "$T/fuse-$FUSE_PID.log"
    FUSE_PIDS="$FUSE_PID $FUSE_PIDS"
    FUSE_MOUNTS="$fm_mnt $FUSE_MOUNTS"
    n=0
    while ! mountpoint -q "$fm_mnt"; do
        if ! kill -0 "$FUSE_PID" 2>/dev/null; then
            cat "$T/fuse-$FUSE_PID.log" >&2
            die "qsnap-fuse $* $fm_img did not mount"
        fi
        n=$((n + 1))
        [ "$n" -lt 200 ] || die "qsnap-fuse did not mount in 20 s"
        sleep 0.1
    done
}

# fuse_umount MOUNTPOINT PID: unmounts and requires a clean exit.
fuse_umount()
{
    fusermount3 -u "$1" || die "fusermount3 -u $1 failed"
    FUSE_MOUNTS=$(drop "$1" "$FUSE_MOUNTS")
    fu_status=0
    wait "$2" || fu_status=$?
    FUSE_PIDS=$(drop "$2" "$FUSE_PIDS")
    if [ "$fu_status" -ne 0 ]; then
        cat "$T/fuse-$2.log" >&2
        die "qsnap-fuse exited with status $fu_status"
    fi
}

# loop_mount FILE DIR OPTIONS: mount -o loop,OPTIONS.
loop_mount()
{
    mkdir -p "$2"
    mount -o "loop,$3" "$1" "$2" || die "mount -o loop,$3 $1 failed"
    LOOP_MOUNTS="$2 $LOOP_MOUNTS"
}

loop_umount()
{
    umount "$1" || die "umount $1 failed"
    LOOP_MOUNTS=$(drop "$1" "$LOOP_MOUNTS")
}

# loop_ok: skip unless this machine can set up a loop device.
loop_ok()
{
    command -v losetup >/dev/null 2>&1 || skip "losetup is missing"
    [ -e /dev/loop-control ] || [ -e /dev/loop0 ] ||
        skip "no loop devices here"
}

# qemu_check IMAGE: qemu-img check finds neither corruption nor leak.
qemu_check()
{
    if ! "$QEMU_IMG" check "$1" >"$T/check.out" 2>&1; then
        cat "$T/check.out" >&2
        die "qemu-img check $1 is not clean"
    fi
}

# expect_fail ERRNO-TEXT DESCRIPTION COMMAND...: COMMAND must fail and
# say ERRNO-TEXT (e.g. "Read-only file system") on stderr.
expect_fail()
{
    ef_text=$1
    ef_desc=$2
    shift 2
    if "$@" >"$T/ef.out" 2>&1; then
        die "$ef_desc: '$*' succeeded"
    fi
    if ! grep -q "$ef_text" "$T/ef.out"; then
        cat "$T/ef.out" >&2
        die "$ef_desc: expected '$ef_text'"
    fi
}

# same FILE1 FILE2 DESCRIPTION: byte-identical.
same()
{
    cmp "$1" "$2" >/dev/null 2>&1 || die "$3: $1 and $2 differ"
}
