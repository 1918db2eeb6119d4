#!/bin/sh
# mt_kill.sh - SIGKILL while many threads share one qsnap_image handle.
#
# Runs tests/stress/mt_stress (writers, discards, zeroing, compressed
# writes, flushes and a snapshot thread, all on one handle) and kills it
# with SIGKILL at a random moment after its setup, MT_KILL_RUNS times,
# alternating 64 KiB clusters (zlib) and 4 KiB clusters (zstd).  Whatever
# the moment, with writes in flight on every thread, the image must show
# no corruption:
#   - an image left dirty (a snapshot operation was cut short) is opened
#     read-write once, which rebuilds its refcounts as QEMU would;
#   - `qemu-img check` then finds nothing, or only leaked clusters, which
#     `qsnap-img check -r leaks` repairs, after which it finds nothing.
# Content is not judged here: mt_stress keeps no journal across a kill
# (crash_kill.sh judges content, with one writer).
#
# Environment (set by `make check`):
#   top_builddir, QEMU_IMG, QSNAP_IMG, QSNAP_CRASH_WRITER
#   QSNAP_SEED      seed (default: from the date)
#   MT_KILL_RUNS    kills (default 8)
set -eu

me=${0##*/}
: "${top_builddir:=$(pwd)}"
: "${QEMU_IMG:=qemu-img}"
: "${QSNAP_IMG:=$top_builddir/qsnap-img/qsnap-img}"
: "${QSNAP_CRASH_WRITER:=$top_builddir/tests/crash-writer}"
: "${QSNAP_SEED:=$(date +%Y%m%d)}"
: "${MT_KILL_RUNS:=8}"
prog=$top_builddir/tests/stress/mt_stress

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

[ -x "$prog" ] || die "$prog not built (run make check)"
command -v "$QEMU_IMG" >/dev/null 2>&1 ||
    die "$QEMU_IMG not found (set QEMU_IMG)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mt_kill.XXXXXX")
pid=
# shellcheck disable=SC2317 # called by the trap
cleanup()
{
    [ -z "$pid" ] || kill -9 "$pid" 2>/dev/null || :
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Milliseconds to let the run go on after its setup: 50..1549, from the
# seed, so a failure can be repeated.
delay_ms()
{
    awk -v s="$1" 'BEGIN { srand(s); printf "%d", 50 + int(rand() * 1500) }'
}

n_dirty=0
n_leaky=0
run=1
while [ "$run" -le "$MT_KILL_RUNS" ]; do
    if [ $((run % 2)) -eq 1 ]; then
        cs=65536 comp=zlib
    else
        cs=4096 comp=zstd
    fi
    seed=$((QSNAP_SEED + run))
    img=$tmp/kill.qcow2
    ctx="run $run (seed $seed, cluster size $cs)"
    rm -f "$img"
    : >"$tmp/out" # before the background job opens it, for the grep below
    "$prog" -v -t 4 -s 60 --cluster-size "$cs" --compression "$comp" \
        --seed "$seed" "$img" >"$tmp/out" 2>&1 &
    pid=$!
    # The kill comes after the setup (the image and its first snapshots
    # exist), while every thread is at work.
    waited=0
    until grep -q 'setup done' "$tmp/out"; do
        kill -0 "$pid" 2>/dev/null || {
            cat "$tmp/out" >&2
            die "$ctx: mt_stress ended before its setup was done"
        }
        [ "$waited" -lt 600 ] || die "$ctx: no setup after 60 s"
        sleep 0.1
        waited=$((waited + 1))
    done
    ms=$(delay_ms "$seed")
    sleep "$(awk -v m="$ms" 'BEGIN { printf "%.3f", m / 1000 }')"
    kill -9 "$pid" 2>/dev/null ||
        die "$ctx: mt_stress was not running at the kill ($(cat "$tmp/out"))"
    wait "$pid" 2>/dev/null || :
    pid=

    if "$QEMU_IMG" info -U --output=json "$img" |
        grep -q '"dirty-flag": true'; then
        n_dirty=$((n_dirty + 1))
        "$QSNAP_CRASH_WRITER" recover "$img" >"$tmp/recover.out" 2>&1 || {
            cat "$tmp/recover.out" >&2
            die "$ctx: opening the dirty image read-write failed"
        }
    fi
    rc=0
    "$QEMU_IMG" check "$img" >"$tmp/check.out" 2>&1 || rc=$?
    case $rc in
    0) ;;
    3)
        n_leaky=$((n_leaky + 1))
        "$QSNAP_IMG" check -q -r leaks "$img" >"$tmp/repair.out" 2>&1 || {
            cat "$tmp/repair.out" >&2
            die "$ctx: qsnap-img check -r leaks failed"
        }
        "$QEMU_IMG" check "$img" >"$tmp/check.out" 2>&1 || {
            cat "$tmp/check.out" >&2
            die "$ctx: qemu-img check after repairing leaks"
        }
        ;;
    *)
        cat "$tmp/check.out" >&2
        die "$ctx: qemu-img check exited $rc after the kill at ${ms} ms"
        ;;
    esac
    run=$((run + 1))
done
echo "$me: $MT_KILL_RUNS kills during multi-threaded runs:" \
    "no corruption ($n_dirty dirty images rebuilt, $n_leaky with leaks" \
    "repaired)"
