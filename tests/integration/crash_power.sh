#!/bin/sh
# crash_power.sh - power cut during writes, snapshot operations and merges.
#
# tests/crash-writer runs its workload (see crash_kill.sh) with
# QSNAP_FAULT=powercut:N:SEED: every file the library opens behaves like
# a disk with a volatile write cache, and before the Nth modifying call
# the power fails: each write, punch or truncation since that file's last
# completed flush survives or not at random, and every later call fails.
# Afterwards the same checks as after a kill: no corruption (dirty files
# recovered by a read-write open first), every flushed byte, completed
# snapshot, checkpoint with VM state and frozen external checkpoint as
# written.  QSNAP_POWER_RUNS runs (200 by default), seeds from
# $QSNAP_SEED (printed); at least four in five must really cut the power.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CRASH_WRITER:=$top_builddir/tests/crash-writer}"
need "$QEMU_IMG"
need_built "$QSNAP_CRASH_WRITER"
need_built "$QSNAP_IMG"
W=$QSNAP_CRASH_WRITER

RUNS=${QSNAP_POWER_RUNS:-200}
note "seeds from QSNAP_SEED=$QSNAP_SEED (rerun with the same value)"

lcg=$(( (QSNAP_SEED + 17) % 2147483648 ))
cut=0
n_dirty=0
lost=0
run=0
while [ "$run" -lt "$RUNS" ]; do
    seed=$(( QSNAP_SEED % 100000 * 1000 + run ))
    d=$T/run
    rm -rf "$d"
    mkdir "$d"
    lcg_next
    at=$(( 1 + lcg % 450 ))
    lcg_next
    ctx="seed $seed, power cut before modifying call $at"
    run_ok "$ctx: init" "$W" init "$d" "$seed"
    rc=0
    QSNAP_FAULT="powercut:$at:$lcg" QSNAP_FAULT_LOG="$T/fault.log" \
        "$W" run "$d" "$seed" 120 >"$T/writer.out" 2>&1 || rc=$?
    case $rc in
    0) ;;
    3) ;;
    *)
        cat "$T/writer.out" >&2
        die "$ctx: the writer failed (exit $rc)"
        ;;
    esac
    if [ -s "$T/fault.log" ]; then
        cut=$((cut + 1))
        [ "$rc" = 3 ] || die "$ctx: the power failed but the writer went on"
        n=$(sed -n 's/.*: \([0-9]*\) of .*/\1/p' "$T/fault.log")
        lost=$((lost + ${n:-0}))
    fi
    rm -f "$T/fault.log"
    if ! "$W" verify "$d" "$seed" >"$T/verify.out" 2>&1; then
        cat "$T/writer.out" "$T/verify.out" >&2
        die "$ctx: verify failed"
    fi
    check_after_crash "$d" "$ctx"
    run=$((run + 1))
done
note "$RUNS runs: $cut cut the power ($lost cached operations lost in all)," \
    "$n_dirty dirty files recovered"
[ "$cut" -ge $((RUNS * 4 / 5)) ] ||
    die "only $cut of $RUNS runs cut the power: the cuts came too late"
