#!/bin/bash
# malformed.sh - damaged images are refused cleanly, never crash or hang.
#
# Pristine images are made with qemu-img/qemu-io (compressed clusters,
# plain clusters, zero clusters, an internal snapshot), then every case of
# tests/images/mkcorrupt is applied to each and read with `qsnap-tool walk`
# (open, read every byte, block status over everything, check) under a
# timeout and a memory limit.  Expected outcomes come from `mkcorrupt
# --list`: "fail" must exit 1 with a message on stderr naming the image;
# "ok" must succeed; "ok-rw" must succeed read-write (repairing), and then
# check clean with the pristine content; "fail-rw" must open read-only
# but refuse read-write.  Walks run under valgrind unless QSNAP_VALGRIND=0.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need timeout
need_built "$QSNAP_TOOL"
need_built "$MKCORRUPT"

# Every malformed image is walked under valgrind when it is installed (the
# test command installs it); QSNAP_VALGRIND=0 turns that off.
use_valgrind=
if [ "${QSNAP_VALGRIND:-auto}" = auto ]; then
    QSNAP_VALGRIND=0
    if command -v valgrind >/dev/null && [ -x "$top_builddir/libtool" ] &&
        ! grep -q __asan_init "$top_builddir/.libs/libqsnap.so" 2>/dev/null; then
        QSNAP_VALGRIND=1 # not under AddressSanitizer: the two don't mix
    fi
fi
if [ "${QSNAP_VALGRIND:-0}" = 1 ]; then
    need valgrind
    [ -x "$top_builddir/libtool" ] ||
        die "valgrind runs need $top_builddir/libtool"
    use_valgrind=1
fi

WALK_TIMEOUT=${WALK_TIMEOUT:-20}
WALK_MEM_KB=${WALK_MEM_KB:-1048576}
# AddressSanitizer reserves terabytes of address space: no ulimit -v then.
for bin in "$top_builddir/tests/.libs/qsnap-tool" "$QSNAP_TOOL"; do
    if [ -f "$bin" ] && grep -q __asan_init "$bin" 2>/dev/null; then
        WALK_MEM_KB=unlimited
    fi
done

# walk IMAGE [ARGS...]: run qsnap-tool walk, output in $T/walk.out/.err,
# status in $walk_rc.
walk()
{
    walk_img=$1
    shift
    set +e
    if [ -n "$use_valgrind" ]; then
        timeout $((WALK_TIMEOUT * 10)) "$top_builddir/libtool" \
            --mode=execute valgrind -q --error-exitcode=99 \
            --leak-check=full --errors-for-leak-kinds=definite \
            "$QSNAP_TOOL" walk -f qcow2 "$@" "$walk_img" \
            >"$T/walk.out" 2>"$T/walk.err"
    else
        (
            ulimit -v "$WALK_MEM_KB"
            exec timeout "$WALK_TIMEOUT" "$QSNAP_TOOL" walk -f qcow2 "$@" \
                "$walk_img"
        ) >"$T/walk.out" 2>"$T/walk.err"
    fi
    walk_rc=$?
    set -e
}

# describe_rc: a word for a walk status that is neither 0 nor 1.
describe_rc()
{
    case $1 in
    2) echo "usage error (exit 2)" ;;
    99) echo "valgrind found errors" ;;
    124) echo "timed out after ${WALK_TIMEOUT}s" ;;
    1[2-9][0-9]) echo "killed by signal $(($1 - 128))" ;;
    *) echo "exit $1" ;;
    esac
}

failures=0
bad()
{
    echo "  FAIL $*" >&2
    sed 's/^/      /' "$T/walk.err" >&2
    failures=$((failures + 1))
}

first_line()
{
    sed -n '1p' "$1" | cut -c1-160
}

# expect_fail NAME IMAGE [ARGS]: walk must exit 1 with a message naming
# the image.
expect_fail()
{
    ef_name=$1
    ef_img=$2
    shift 2
    walk "$ef_img" "$@"
    ef_base=${ef_img##*/}
    if [ "$walk_rc" -ne 1 ]; then
        if [ "$walk_rc" -eq 0 ]; then
            bad "$ef_name: accepted, expected a refusal"
        else
            bad "$ef_name: $(describe_rc "$walk_rc")"
        fi
    elif [ ! -s "$T/walk.err" ]; then
        bad "$ef_name: failed without a message"
    elif ! grep -q "$ef_base" "$T/walk.err"; then
        bad "$ef_name: the message does not name $ef_base"
    else
        echo "  ok   $ef_name: $(first_line "$T/walk.err")"
    fi
}

# expect_ok NAME IMAGE [ARGS]: walk must succeed.
expect_ok()
{
    walk "$2" ${3+"$3"}
    if [ "$walk_rc" -ne 0 ]; then
        bad "$1: $(describe_rc "$walk_rc"), expected success"
        return 1
    fi
    echo "  ok   $1: $(first_line "$T/walk.out")"
}

# ---------------------------------------------------------------- pristines

mkdir "$T/cases"
src="$T/src.raw"
"$QEMU_IMG" create -q -f raw "$src" 8M
run_ok "pattern the source" "$QEMU_IO" -f raw \
    -c "write -P 0x11 0 192k" -c "write -P 0x12 1M 70k" \
    -c "write -P 0x13 2100k 8k" -c "write -P 0x14 5M 64k" \
    -c "write -P 0x15 8000k 100k" "$src"

# make_pristine NAME CREATE-OPTIONS
make_pristine()
{
    p="$T/$1.qcow2"
    run_ok "convert $1" "$QEMU_IMG" convert -c -O qcow2 -o "$2" "$src" "$p"
    run_ok "write $1" "$QEMU_IO" -c "write -P 0x21 3M 100k" \
        -c "write -P 0x22 6M 4k" -c "write -z 7M 128k" "$p"
    run_ok "snapshot $1" "$QEMU_IMG" snapshot -c snap1 "$p"
    run_ok "write $1" "$QEMU_IO" -c "write -P 0x31 0 4k" \
        -c "write -P 0x32 3M 64k" -c "write -P 0x33 7800k 8k" "$p"
    qemu_check "$p"
}

pristines="v3-64k v3-4k v3-512 v2-64k"
make_pristine v3-64k "compat=1.1,cluster_size=64k"
make_pristine v3-4k "compat=1.1,cluster_size=4k,refcount_bits=8"
make_pristine v3-512 "compat=1.1,cluster_size=512,refcount_bits=64"
make_pristine v2-64k "compat=0.10,cluster_size=64k"

note "pristine images"
for p in $pristines; do
    expect_ok "$p (pristine)" "$T/$p.qcow2" || die "pristine $p unreadable"
    "$QSNAP_TOOL" digest "$T/$p.qcow2" >"$T/$p.digest"
    [ "$(cat "$T/$p.digest")" = "$(qemu_digest "$T/$p.qcow2")" ] ||
        die "pristine $p reads differently from qemu-img"
done

# ---------------------------------------------------------------- cases

"$MKCORRUPT" --list >"$T/cases.txt"
n_cases=$(wc -l <"$T/cases.txt")
[ "$n_cases" -ge 30 ] || die "mkcorrupt lists only $n_cases cases"
n_run=0

while read -r name expect desc; do
    note "$name ($expect): $desc"
    applied=0
    for p in $pristines; do
        img="$T/cases/$p.$name.qcow2"
        set +e
        "$MKCORRUPT" "$name" "$T/$p.qcow2" "$img"
        mk_rc=$?
        set -e
        if [ "$mk_rc" -eq 3 ]; then
            continue
        fi
        [ "$mk_rc" -eq 0 ] || die "mkcorrupt $name $p failed ($mk_rc)"
        applied=$((applied + 1))
        n_run=$((n_run + 1))
        case $expect in
        fail)
            expect_fail "$p.$name" "$img"
            ;;
        ok)
            expect_ok "$p.$name" "$img" || true
            ;;
        fail-rw)
            if expect_ok "$p.$name (read-only)" "$img"; then
                expect_fail "$p.$name (read-write)" "$img" --rw
            fi
            ;;
        ok-rw)
            if expect_ok "$p.$name (read-write)" "$img" --rw &&
                expect_ok "$p.$name (reopened)" "$img"; then
                if ! "$QEMU_IMG" check -q "$img" >"$T/walk.err" 2>&1; then
                    "$QEMU_IMG" check "$img" >>"$T/walk.err" 2>&1 || true
                    bad "$p.$name: qemu-img check after the repair"
                elif [ "$("$QSNAP_TOOL" digest "$img")" != \
                    "$(cat "$T/$p.digest")" ]; then
                    bad "$p.$name: content changed by the repair"
                fi
            fi
            ;;
        *)
            die "unknown expectation '$expect' for $name"
            ;;
        esac
        rm -f "$img"
    done
    [ "$applied" -gt 0 ] || die "case $name applies to no pristine image"
done <"$T/cases.txt"

echo "$me: $n_cases cases, $n_run images, $failures failures"
[ "$failures" -eq 0 ] || die "$failures malformed images mishandled"
