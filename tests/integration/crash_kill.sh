#!/bin/sh
# crash_kill.sh - a writer killed with SIGKILL at random points.
#
# tests/crash-writer runs random guest writes, zero writes, discards and
# flushes, with internal snapshots, snapshot deletes and checkpoints with
# VM state (even seeds) or external checkpoints pushed and merged away
# (odd seeds), on images whose options come from the seed.  Each run is
# killed a random delay after its first operation; then
#   - qemu-img check finds no corruption in any file left (leaks are
#     allowed after a crash; qsnap-img check -r leaks then leaves the image
#     clean by qemu-img's judgement);
#   - crash-writer verify finds every flushed byte, every completed
#     snapshot (with its VM state) and every frozen external checkpoint as
#     it was written.
# QSNAP_CRASH_RUNS runs (50 by default; `make soak` runs 500), seeds from
# $QSNAP_SEED (printed).
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CRASH_WRITER:=$top_builddir/tests/crash-writer}"
need "$QEMU_IMG"
need_built "$QSNAP_CRASH_WRITER"
need_built "$QSNAP_IMG"
W=$QSNAP_CRASH_WRITER

RUNS=${QSNAP_CRASH_RUNS:-50}
note "seeds from QSNAP_SEED=$QSNAP_SEED (rerun with the same value)"

lcg=$(( QSNAP_SEED % 2147483648 ))
killed=0
n_dirty=0
early=0
finished=0
run=0
while [ "$run" -lt "$RUNS" ]; do
    seed=$(( QSNAP_SEED % 100000 * 1000 + run ))
    d=$T/run
    rm -rf "$d"
    mkdir "$d"
    lcg_next
    delay_ms=$(( 5 + lcg % 400 ))
    run_ok "seed $seed: init" "$W" init "$d" "$seed"
    "$W" run "$d" "$seed" 100000 >"$T/writer.out" 2>&1 &
    pid=$!
    # The delay counts from the first operation, however long the writer
    # takes to get there on a loaded machine.
    n=0
    while [ "$n" -lt 500 ] && kill -0 "$pid" 2>/dev/null &&
        ! grep -q '^B' "$d/journal" 2>/dev/null; do
        sleep 0.01
        n=$((n + 1))
    done
    sleep "$(printf '0.%03d' "$delay_ms")"
    kill -KILL "$pid" 2>/dev/null || true
    rc=0
    wait "$pid" || rc=$?
    case $rc in
    137) killed=$((killed + 1)) ;;
    0) finished=$((finished + 1)) ;;
    *)
        cat "$T/writer.out" >&2
        die "seed $seed: the writer failed on its own (exit $rc)"
        ;;
    esac
    ctx="seed $seed, killed ${delay_ms} ms into its workload"
    grep -q '^B' "$d/journal" || early=$((early + 1))
    if ! "$W" verify "$d" "$seed" >"$T/verify.out" 2>&1; then
        cat "$T/writer.out" "$T/verify.out" >&2
        die "$ctx: verify failed"
    fi
    check_after_crash "$d" "$ctx"
    run=$((run + 1))
done
note "$RUNS runs: $killed killed, $finished finished before the kill," \
    "$n_dirty dirty files recovered, $early killed before their first" \
    "operation"
[ "$killed" -ge $((RUNS * 9 / 10)) ] ||
    die "only $killed of $RUNS runs were killed: the kills came too late"
[ "$early" -le $((RUNS / 10)) ] ||
    die "$early of $RUNS runs were killed before the workload: too early"
