#!/bin/sh
# chain_crash.sh - merge-on-delete killed with SIGKILL at random points.
#
# A chain base <- mid1 <- mid2 <- top, made by qemu-img and qemu-io with
# tens of MiB of data in overlapping ranges (64 KiB and 4 KiB clusters,
# zero writes and discards), is copied afresh for each run; then
# qsnap_checkpoint_delete (tests/chain-driver, or qsnap-img delete)
# removes mid1 (child mid2) or base (child mid1), forced to stream or to
# commit, and is killed with SIGKILL after a random delay between 0 and
# the measured length of an uninterrupted merge (half of the runs with a
# pause in the progress callback, so that the kill lands between copies
# as well as inside them; at least a tenth of the kills must land after
# the copy began and before the switch).  Afterwards:
#   - every layer but the deleted one is still at its path and qemu-img
#     reads it as it read it before (the top's view never changes);
#   - the chain is the old one (the child still backed by the deleted
#     layer, whose file is there) or the new one (the child backed by the
#     layer below, or by none); a stream never changes the deleted layer,
#     so where its file is left it still reads as before;
#   - qemu-img check finds no corruption in any file left (leaks are
#     allowed after a crash);
#   - where the old chain is left, running the delete again completes it,
#     with the same results.
# The kill delays come from fixed seeds and $QSNAP_SEED (printed).
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CHAIN_DRIVER:=$top_builddir/tests/chain-driver}"
need "$QEMU_IMG"
need "$QEMU_IO"
need timeout
need_built "$QSNAP_CHAIN_DRIVER"
need_built "$QSNAP_IMG"
DRV=$QSNAP_CHAIN_DRIVER

RUNS=${QSNAP_CRASH_RUNS:-56}
note "seed from the environment: QSNAP_SEED=$QSNAP_SEED" \
    "(rerun with QSNAP_SEED=$QSNAP_SEED)"

now_ms()
{
    echo $(($(date +%s%N) / 1000000))
}

rnd()
{
    lcg_next
    r=$(( (lcg / 65536) % $1 ))
}

P="$T/pristine"
W="$T/w"
mkdir -p "$P" "$W"
LAYERS="base mid1 mid2 top"

# ------------------------------------------------------------ the chain

note "building the chain"
"$QEMU_IMG" create -q -f qcow2 "$P/base.qcow2" 64M
"$QEMU_IO" -c "write -P 0x11 0 28M" -c "write -P 0x12 40M 8M" \
    "$P/base.qcow2" >/dev/null
"$QEMU_IMG" create -q -f qcow2 -b base.qcow2 -F qcow2 "$P/mid1.qcow2"
# 112 scattered 256 KiB writes over the 64 MiB (28 MiB in all), a zero
# write and a discard.
set --
i=0
while [ "$i" -lt 112 ]; do
    set -- "$@" -c \
        "write -P $((i % 200 + 1)) $(( (i * 211) % 256 * 256 ))k 256k"
    i=$((i + 1))
done
"$QEMU_IO" "$@" -c "write -z 20M 1M" -c "discard 42M 2M" \
    "$P/mid1.qcow2" >/dev/null
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 -b mid1.qcow2 -F qcow2 \
    "$P/mid2.qcow2"
"$QEMU_IO" -c "write -P 0x22 8M 10M" -c "write -z 30M 2M" \
    -c "write -P 0x23 50M 3M" -c "discard 60M 1M" "$P/mid2.qcow2" >/dev/null
"$QEMU_IMG" create -q -f qcow2 -b mid2.qcow2 -F qcow2 "$P/top.qcow2"
"$QEMU_IO" -c "write -P 0x33 0 2M" -c "write -P 0x34 45M 1M" \
    "$P/top.qcow2" >/dev/null
for l in $LAYERS; do
    "$QEMU_IMG" convert -O raw "$P/$l.qcow2" "$P/$l.raw"
done

# ------------------------------------------------------------ helpers

fresh_copy()
{
    rm -f "$W"/*.qcow2
    for l in $LAYERS; do
        cp "$P/$l.qcow2" "$W/$l.qcow2"
    done
}

# backing_of FILE: the backing file name in FILE's header ("" if none).
backing_of()
{
    "$QEMU_IMG" info -U --output=json "$1" |
        sed -n 's/^    "backing-filename": "\(.*\)",*$/\1/p'
}

# check_file FILE CONTEXT: no corruption (leaks allowed).
check_file()
{
    c_rc=0
    "$QEMU_IMG" check "$1" >"$W/check.out" 2>&1 || c_rc=$?
    if [ "$c_rc" != 0 ] && [ "$c_rc" != 3 ]; then
        sed 's/^/    /' "$W/check.out" >&2
        die "qemu-img check ${1##*/} exit $c_rc ($2)"
    fi
}

# compare_view NAME CONTEXT: the file NAME.qcow2 reads as NAME did.
compare_view()
{
    if ! "$QEMU_IMG" compare -U -f qcow2 -F raw "$W/$1.qcow2" "$P/$1.raw" \
        >"$W/cmp.out" 2>&1; then
        sed 's/^/    /' "$W/cmp.out" >&2
        die "$1.qcow2 no longer reads as before ($2)"
    fi
}

# verify LAYER CHILD BELOW MODE CONTEXT: the state after a (possibly
# interrupted) delete; sets $state to old or new.
verify()
{
    v_layer=$1
    v_child=$2
    v_below=$3
    v_mode=$4
    v_ctx=$5
    for l in $LAYERS; do
        [ "$l" = "$v_layer" ] && continue
        [ -f "$W/$l.qcow2" ] || die "$l.qcow2 is gone ($v_ctx)"
    done
    v_back=$(backing_of "$W/$v_child.qcow2")
    v_want_new=
    [ -n "$v_below" ] && v_want_new="$v_below.qcow2"
    if [ "$v_back" = "$v_layer.qcow2" ]; then
        state=old
        [ -f "$W/$v_layer.qcow2" ] ||
            die "$v_child.qcow2 is backed by $v_layer.qcow2, which is" \
                "gone ($v_ctx)"
    elif [ "$v_back" = "$v_want_new" ]; then
        state=new
        if [ "$v_mode" = commit ] && [ -f "$W/$v_layer.qcow2" ]; then
            die "$v_layer.qcow2 is still there after it took the place" \
                "of $v_child.qcow2 ($v_ctx)"
        fi
    else
        die "$v_child.qcow2 is backed by '$v_back': neither the old" \
            "chain nor the new one ($v_ctx)"
    fi
    for l in $LAYERS; do
        [ "$l" = "$v_layer" ] && continue
        compare_view "$l" "$v_ctx, $state chain"
        check_file "$W/$l.qcow2" "$v_ctx, $state chain"
    done
    if [ -f "$W/$v_layer.qcow2" ]; then
        check_file "$W/$v_layer.qcow2" "$v_ctx, $state chain"
        # A stream only reads the deleted layer.
        if [ "$v_mode" = stream ]; then
            compare_view "$v_layer" "$v_ctx, $state chain"
        fi
    fi
}

# scenario NUMBER: sets layer, child, below and mode.
scenario()
{
    case $1 in
    0) layer=mid1 child=mid2 below=base mode=stream ;;
    1) layer=mid1 child=mid2 below=base mode=commit ;;
    2) layer=base child=mid1 below='' mode=stream ;;
    *) layer=base child=mid1 below='' mode=commit ;;
    esac
}

# ------------------------------------------------------------ timing

# The uninterrupted merge, for each scenario and pause: it must succeed
# and leave the new chain; its length bounds the kill delays.
for sc in 0 1 2 3; do
    scenario "$sc"
    for pause in 0 2000; do
        fresh_copy
        t0=$(now_ms)
        if ! timeout 60 "$DRV" delete "--$mode" --throttle-us "$pause" \
            "$W/top.qcow2" "$W/$layer.qcow2" >"$W/out" 2>&1; then
            cat "$W/out" >&2
            die "delete $layer ($mode) failed without a kill"
        fi
        t1=$(now_ms)
        grep -q "merged by $mode" "$W/out" ||
            die "delete $layer was not merged by $mode: $(cat "$W/out")"
        verify "$layer" "$child" "$below" "$mode" "uninterrupted $mode"
        [ "$state" = new ] ||
            die "the uninterrupted delete of $layer left the old chain"
        eval "dur_${sc}_$pause=$((t1 - t0 + 20))"
        note "delete $layer by $mode, pause ${pause}us: $((t1 - t0)) ms"
    done
done

# ------------------------------------------------------------ kills

lcg=$QSNAP_SEED
run=0
n_old=0
n_mid=0
n_new=0
n_done=0
while [ "$run" -lt "$RUNS" ]; do
    # Fixed delays for the first half, $QSNAP_SEED's for the rest.
    [ "$run" = 0 ] && lcg=4242
    [ "$run" = $((RUNS / 2)) ] && lcg=$QSNAP_SEED
    sc=$((run % 4))
    scenario "$sc"
    pause=0
    [ $((run / 4 % 2)) = 1 ] && pause=2000
    dur=0
    eval "dur=\$dur_${sc}_$pause"
    rnd $((dur + 1))
    delay_ms=$r
    ctx="run $run: delete $layer by $mode, pause ${pause}us, kill after"
    ctx="$ctx ${delay_ms} ms"
    fresh_copy
    # Without a pause, every other time through qsnap-img.
    if [ "$pause" = 0 ] && [ $((run / 8 % 2)) = 1 ]; then
        ctx="$ctx, qsnap-img"
        "$QSNAP_IMG" delete -q "--$mode" "$W/top.qcow2" \
            "$W/$layer.qcow2" >"$W/out" 2>&1 &
    else
        "$DRV" delete "--$mode" --throttle-us "$pause" "$W/top.qcow2" \
            "$W/$layer.qcow2" >"$W/out" 2>&1 &
    fi
    pid=$!
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill -KILL "$pid" 2>/dev/null || true
    rc=0
    # (the shell's own "Killed" report is not wanted here)
    { wait "$pid" || rc=$?; } 2>/dev/null
    if [ "$rc" = 0 ]; then
        n_done=$((n_done + 1))
    elif [ "$rc" != 137 ]; then
        cat "$W/out" >&2
        die "$ctx: the delete failed by itself (exit $rc)"
    fi
    verify "$layer" "$child" "$below" "$mode" "$ctx"
    if [ "$state" = old ]; then
        n_old=$((n_old + 1))
        # Had the copy begun?  It writes the child (stream) or the
        # layer (commit).
        dst=$child
        [ "$mode" = commit ] && dst=$layer
        cmp -s "$W/$dst.qcow2" "$P/$dst.qcow2" || n_mid=$((n_mid + 1))
        # Recovery: the delete, run again, completes.
        if ! timeout 60 "$DRV" delete "--$mode" "$W/top.qcow2" \
            "$W/$layer.qcow2" >"$W/out" 2>&1; then
            cat "$W/out" >&2
            die "$ctx: the delete run again failed"
        fi
        verify "$layer" "$child" "$below" "$mode" "$ctx, run again"
        [ "$state" = new ] || die "$ctx: run again, it left the old chain"
    else
        n_new=$((n_new + 1))
    fi
    [ ! -f "$W/$layer.qcow2" ] || rm -f "$W/$layer.qcow2"
    run=$((run + 1))
done

note "$RUNS runs: $n_old killed with the old chain left ($n_mid of them" \
    "in the middle of the copy), $n_new with the new one ($n_done of" \
    "them had finished)"
[ "$n_mid" -ge $((RUNS / 10)) ] ||
    die "only $n_mid kills landed in the middle of a copy: too few"
note "all crash runs passed"
