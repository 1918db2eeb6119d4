# shellcheck shell=sh
# lib.sh - shared helpers for the integration scripts (sourced, POSIX sh).
#
# Sets defaults for the variables `make check` exports, so that a script
# also runs by hand from a build directory:
#   srcdir        source tree root        (default: two levels above here)
#   top_builddir  build tree root         (default: the current directory)
#   QSNAP_TOOL    tests/qsnap-tool        QSNAP_IMG   qsnap-img/qsnap-img
#   QEMU_IMG      qemu-img                QEMU_IO     qemu-io
#   QSNAP_SEED    seed for the randomized part (default: from the date)
# and makes a temporary directory $T that is removed on exit.

# shellcheck disable=SC2034  # variables are used by the sourcing scripts

me=${0##*/}
lib_dir=$(cd "$(dirname "$0")" && pwd)

: "${srcdir:=$(cd "$lib_dir/../.." && pwd)}"
: "${top_builddir:=$(pwd)}"
: "${QSNAP_TOOL:=$top_builddir/tests/qsnap-tool}"
: "${QSNAP_IMG:=$top_builddir/qsnap-img/qsnap-img}"
: "${MKCORRUPT:=$top_builddir/tests/images/mkcorrupt}"
: "${QEMU_IMG:=qemu-img}"
: "${QEMU_IO:=qemu-io}"
: "${QSNAP_SEED:=$(date +%Y%m%d)}"
export QSNAP_SEED

# die MESSAGE...: report a failure and exit 1.
die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

# skip MESSAGE...: the test cannot run here (automake's SKIP status).
skip()
{
    echo "$me: SKIP: $*" >&2
    exit 77
}

note()
{
    echo "$me: $*"
}

# need PROGRAM: skip unless PROGRAM (a path or a name in $PATH) runs.
need()
{
    case $1 in
    */*) [ -x "$1" ] || skip "$1 not found" ;;
    *) command -v "$1" >/dev/null 2>&1 || skip "$1 not found" ;;
    esac
}

# need_built PROGRAM: a program of this build; missing means a broken build.
need_built()
{
    [ -x "$1" ] || die "$1 not built (run make check, or set the variable)"
}

# The temporary directory, removed on exit (also on failure).
T=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-test.XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM

# run_ok DESCRIPTION COMMAND...: run, and die with its output if it fails.
run_ok()
{
    run_desc=$1
    shift
    if ! "$@" >"$T/run.out" 2>&1; then
        cat "$T/run.out" >&2
        die "$run_desc: '$*' failed"
    fi
}

# qemu_check IMAGE: qemu-img check must report no corruption and no leak.
qemu_check()
{
    if ! "$QEMU_IMG" check -q "$1" >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$1" >&2 2>&1 || true
        die "qemu-img check $1 is not clean${2:+ ($2)}"
    fi
}

# qemu_compare IMAGE RAW [CONTEXT]: guest content equals the raw file.
qemu_compare()
{
    if ! "$QEMU_IMG" compare -f qcow2 -F raw "$1" "$2" >"$T/cmp.out" 2>&1
    then
        cat "$T/cmp.out" >&2
        die "qemu-img compare $1 $2 differs${3:+ ($3)}"
    fi
}

# digest_of_raw FILE: XXH64 of a plain file.
digest_of_raw()
{
    "$QSNAP_TOOL" hash "$1"
}

# qemu_digest IMAGE: XXH64 of the guest content as qemu-img reads it.
qemu_digest()
{
    rm -f "$T/qemu-digest.raw"
    "$QEMU_IMG" convert -U -O raw "$1" "$T/qemu-digest.raw" ||
        die "qemu-img convert $1 failed"
    digest_of_raw "$T/qemu-digest.raw"
    rm -f "$T/qemu-digest.raw"
}

# qsnap_img_usable: true if the qsnap-img CLI exists and can create images.
qsnap_img_usable()
{
    [ -x "$QSNAP_IMG" ] || return 1
    "$QSNAP_IMG" create -f qcow2 "$T/probe.qcow2" 1M >/dev/null 2>&1 ||
        return 1
    "$QEMU_IMG" check -q "$T/probe.qcow2" >/dev/null 2>&1 || return 1
    rm -f "$T/probe.qcow2"
}

# lcg_next: a tiny deterministic PRNG for shell loops; state in $lcg.
lcg_next()
{
    lcg=$(( (lcg * 1103515245 + 12345) % 2147483648 ))
}

# random_bytes SEED COUNT: COUNT pseudo-random bytes on stdout, the same
# for the same SEED where openssl is present (/dev/urandom otherwise).
random_bytes()
{
    if command -v openssl >/dev/null 2>&1; then
        rb_key=$(printf '%032x' "$1")
        head -c "$2" /dev/zero |
            openssl enc -aes-128-ctr -K "$rb_key" \
                -iv 00000000000000000000000000000000
    else
        head -c "$2" /dev/urandom
    fi
}

# put_bytes FILE OFFSET COUNT SEED: overwrite part of FILE with random data.
put_bytes()
{
    random_bytes "$4" "$3" |
        dd of="$1" bs=65536 seek="$2" oflag=seek_bytes iflag=fullblock \
            conv=notrunc status=none
}

# image_field IMAGE KEY: a numeric field of `qemu-img info --output=json`
# (virtual-size, cluster-size, actual-size).
image_field()
{
    "$QEMU_IMG" info -U --output=json "$1" |
        sed -n "s/^    \"$2\": \\([0-9]*\\).*/\\1/p" | head -n 1
}

# check_after_crash DIR CONTEXT: no corruption in any file listed in
# DIR/files (crash-writer verify writes it).  A file with the
# dirty bit set (a snapshot operation or lazy refcounts were cut short)
# may show refcount and COPIED mismatches until its next read-write open
# rebuilds them, as QEMU's would: recover it, then check.  Leaks are
# allowed after a crash and repaired by qsnap-img check -r leaks.
# Counts recovered files in $n_dirty.
check_after_crash()
{
    while read -r f; do
        if "$QEMU_IMG" info -U --output=json "$f" </dev/null |
            grep -q '"dirty-flag": true'; then
            n_dirty=$((n_dirty + 1))
            "$QSNAP_CRASH_WRITER" recover "$f" </dev/null \
                >"$T/recover.out" 2>&1 || {
                cat "$T/recover.out" >&2
                die "$2: opening dirty $f read-write failed"
            }
        fi
        rc=0
        "$QEMU_IMG" check "$f" </dev/null >"$T/check.out" 2>&1 || rc=$?
        case $rc in
        0) ;;
        3)
            run_ok "$2: repair leaks in $f" "$QSNAP_IMG" check -q -r leaks \
                "$f" </dev/null
            qemu_check "$f" "$2: after qsnap-img check -r leaks" </dev/null
            ;;
        *)
            cat "$T/check.out" >&2
            die "$2: qemu-img check $f exited $rc"
            ;;
        esac
    done <"$1/files"
}
