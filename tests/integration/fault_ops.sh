#!/bin/sh
# fault_ops.sh - every public operation failed at every I/O point in turn.
#
# With QSNAP_FAULT=KIND:N:ERR the library fails the Nth write, flush or
# fallocate of a whole program (qs_fault.h); with powercut:N:SEED the
# power fails before its Nth modifying call.  Each operation below runs on
# a fresh copy of its fixture with N = 1, 2, ... until a run gets past
# every point of that kind.  After each injected failure:
#   - the command fails, with a message;
#   - no file is corrupt: qemu-img check finds at worst leaks (a dirty
#     image is first opened read-write, which rebuilds its refcounts), and
#     after qsnap-img check -r leaks it finds nothing;
#   - everything the image held before the operation reads back, and what
#     the operation changed is either as before or as it would be after it.
# The last run, which no fault reached, must succeed with the new state.
#
# Operations: guest write (qsnap-tool write), snapshot create, apply and
# delete and rename, checkpoint save with VM state (snapshot -c
# --vmstate), compaction, a resize that grows the L1 table, commit,
# stream, safe rebase, merge-on-delete (delete of a middle layer), and
# create with preallocation=falloc (the fallocate points).  Failures to reserve space
# ahead of the image's end must change nothing but the speed.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CRASH_WRITER:=$top_builddir/tests/crash-writer}"
need "$QEMU_IMG"
need "$QEMU_IO"
need cmp
need_built "$QSNAP_IMG"
need_built "$QSNAP_TOOL"
need_built "$QSNAP_CRASH_WRITER"

F=$T/fixtures
mkdir "$F"

# ------------------------------------------------------------ fixtures

qio()
{
    run_ok "qemu-io $*" "$QEMU_IO" -f qcow2 "$@"
}

# Internal snapshots: s1 holds the first data, the live disk more.
run_ok "create img" "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 \
    "$F/img.qcow2" 1M
qio -c "write -P 0x11 0 300k" -c "write -P 0x12 500k 100k" "$F/img.qcow2"
run_ok "snapshot s1" "$QEMU_IMG" snapshot -c s1 "$F/img.qcow2"
qio -c "write -P 0x21 100k 50k" -c "write -P 0x22 700k 200k" \
    -c "write -z 0 20k" "$F/img.qcow2"
run_ok "model live" "$QEMU_IMG" convert -O raw "$F/img.qcow2" "$F/live.raw"
run_ok "model s1" "$QEMU_IMG" convert -O raw -l snapshot.name=s1 \
    "$F/img.qcow2" "$F/s1.raw"

# A chain base <- mid <- top, each layer with data of its own.
run_ok "create base" "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 \
    "$F/base.qcow2" 1M
qio -c "write -P 0x31 0 600k" "$F/base.qcow2"
run_ok "create mid" "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 \
    -b base.qcow2 -F qcow2 "$F/mid.qcow2"
qio -c "write -P 0x32 200k 300k" "$F/mid.qcow2"
run_ok "create top" "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 \
    -b mid.qcow2 -F qcow2 "$F/top.qcow2"
qio -c "write -P 0x33 400k 300k" "$F/top.qcow2"
for l in base mid top; do
    run_ok "model $l" "$QEMU_IMG" convert -O raw "$F/$l.qcow2" "$F/$l.raw"
done

# Compaction: s1 deleted below s2 and the live disk leaves holes that
# clusters from the end of the file (data, L2 and L1 tables, the
# snapshot table) move down into.
run_ok "create cmp" "$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 \
    "$F/cmp.qcow2" 1M
qio -c "write -P 0x41 0 400k" "$F/cmp.qcow2"
run_ok "snapshot s1" "$QEMU_IMG" snapshot -c s1 "$F/cmp.qcow2"
qio -c "write -P 0x42 0 300k" -c "write -P 0x43 600k 200k" "$F/cmp.qcow2"
run_ok "snapshot s2" "$QEMU_IMG" snapshot -c s2 "$F/cmp.qcow2"
qio -c "write -P 0x44 100k 300k" "$F/cmp.qcow2"
run_ok "delete s1" "$QEMU_IMG" snapshot -d s1 "$F/cmp.qcow2"
run_ok "model cmp" "$QEMU_IMG" convert -O raw "$F/cmp.qcow2" "$F/cmp.raw"
run_ok "model cmp s2" "$QEMU_IMG" convert -O raw -l snapshot.name=s2 \
    "$F/cmp.qcow2" "$F/cmp-s2.raw"

# VM state to save: two sections.  ram spans several L1 entries of the VM
# state area (4 KiB clusters) and three of the container's 4 MiB output
# buffers: failures also meet a growing L1 table and a stream in midway.
mkdir "$F/vm"
random_bytes 7 9000000 >"$F/vm/ram"
random_bytes 8 3000 >"$F/vm/dev"

# ------------------------------------------------------------ checks

W=$T/work

# same_raw IMAGE MODEL [SNAPSHOT]: the guest view equals MODEL.
same_raw()
{
    rm -f "$T/view.raw"
    if [ -n "${3:-}" ]; then
        "$QEMU_IMG" convert -U -O raw -l "snapshot.name=$3" "$1" \
            "$T/view.raw" || return 1
    else
        "$QEMU_IMG" convert -U -O raw "$1" "$T/view.raw" || return 1
    fi
    cmp -s "$T/view.raw" "$2"
}

has_snapshot()
{
    "$QEMU_IMG" snapshot -U -l "$1" | awk '{ print $2 }' | grep -qx "$2"
}

# intact FILE CONTEXT: no corruption; leaks repaired; dirty rebuilt.
intact()
{
    if "$QEMU_IMG" info -U --output=json "$1" |
        grep -q '"dirty-flag": true'; then
        "$QSNAP_CRASH_WRITER" recover "$1" >"$T/recover.out" 2>&1 || {
            cat "$T/recover.out" >&2
            die "$2: opening dirty $1 read-write failed"
        }
    fi
    rc=0
    "$QEMU_IMG" check "$1" >"$T/check.out" 2>&1 || rc=$?
    case $rc in
    0) ;;
    3)
        n_leaky=$((n_leaky + 1))
        run_ok "$2: repair leaks" "$QSNAP_IMG" check -q -r leaks "$1"
        qemu_check "$1" "$2: after qsnap-img check -r leaks"
        ;;
    *)
        cat "$T/check.out" >&2
        die "$2: qemu-img check $1 exits $rc"
        ;;
    esac
}

# Each op_* function: `op_NAME setup` copies its fixture into $W,
# `op_NAME run` runs the operation, `op_NAME after failed|done CONTEXT`
# judges what is left.

op_write()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_TOOL" write "$W/img.qcow2" 90k 200k 0x5a ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/s1.raw" s1 ||
            die "$2: snapshot s1 changed"
        "$QEMU_IMG" convert -U -O raw "$W/img.qcow2" "$T/view.raw"
        cmp -l "$T/view.raw" "$F/live.raw" >"$T/diff" || true
        # Every byte differing from before lies in the write and holds
        # its pattern (0x5a = octal 132); when done, the whole range does.
        awk -v lo=$((90 * 1024)) -v hi=$((290 * 1024)) \
            '{ o = $1 - 1; if (o < lo || o >= hi || $2 != 132) bad++ }
             END { exit bad > 0 }' "$T/diff" ||
            die "$2: bytes outside the write changed, or hold other data"
        if [ "$3" = "done" ]; then
            run_ok "$2: verify" "$QSNAP_TOOL" verify "$W/img.qcow2" 90k \
                200k 0x5a
        fi
        ;;
    esac
}

op_snapshot_create()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" snapshot -c s2 "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/live.raw" || die "$2: live disk changed"
        same_raw "$W/img.qcow2" "$F/s1.raw" s1 || die "$2: s1 changed"
        if has_snapshot "$W/img.qcow2" s2; then
            same_raw "$W/img.qcow2" "$F/live.raw" s2 ||
                die "$2: s2 is not the live disk"
        elif [ "$3" = "done" ]; then
            die "$2: s2 missing after success"
        fi
        ;;
    esac
}

op_snapshot_apply()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" snapshot -a s1 "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/s1.raw" s1 || die "$2: s1 changed"
        if same_raw "$W/img.qcow2" "$F/s1.raw"; then
            :
        elif [ "$3" = "done" ]; then
            die "$2: live disk is not s1 after success"
        else
            same_raw "$W/img.qcow2" "$F/live.raw" ||
                die "$2: live disk neither as before nor s1"
        fi
        ;;
    esac
}

op_snapshot_delete()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" snapshot -d s1 "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/live.raw" || die "$2: live disk changed"
        if has_snapshot "$W/img.qcow2" s1; then
            [ "$3" != "done" ] || die "$2: s1 still there after success"
            same_raw "$W/img.qcow2" "$F/s1.raw" s1 || die "$2: s1 changed"
        fi
        ;;
    esac
}

op_vmstate_save()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" snapshot -c ck --vmstate "$F/vm" "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/live.raw" || die "$2: live disk changed"
        same_raw "$W/img.qcow2" "$F/s1.raw" s1 || die "$2: s1 changed"
        if has_snapshot "$W/img.qcow2" ck; then
            same_raw "$W/img.qcow2" "$F/live.raw" ck ||
                die "$2: ck is not the live disk"
            rm -rf "$T/vm.out"
            mkdir "$T/vm.out"
            run_ok "$2: extract" "$QSNAP_IMG" vmstate extract \
                "$W/img.qcow2" ck "$T/vm.out"
            if ! cmp -s "$T/vm.out/ram" "$F/vm/ram" ||
                ! cmp -s "$T/vm.out/dev" "$F/vm/dev"; then
                die "$2: the VM state of ck differs"
            fi
        elif [ "$3" = "done" ]; then
            die "$2: ck missing after success"
        fi
        ;;
    esac
}

op_compact()
{
    case $1 in
    setup) cp "$F/cmp.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" compact -q "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/cmp.raw" || die "$2: live disk changed"
        same_raw "$W/img.qcow2" "$F/cmp-s2.raw" s2 || die "$2: s2 changed"
        if [ "$3" = "done" ] && [ "$(stat -c %s "$W/img.qcow2")" -ge \
            "$(stat -c %s "$F/cmp.qcow2")" ]; then
            die "$2: the file did not shrink"
        fi
        ;;
    esac
}

# same_grown VIEW MODEL SIZE: VIEW is MODEL, then zeros up to SIZE bytes.
same_grown()
{
    [ "$(stat -c %s "$1")" = "$3" ] &&
        cmp -s -n "$(stat -c %s "$2")" "$1" "$2" &&
        cmp -s -i "$(stat -c %s "$2"):0" \
            -n $(($3 - $(stat -c %s "$2"))) "$1" /dev/zero
}

# Growing a 1 MiB image of 4 KiB clusters to 64 MiB grows its L1 table:
# two header switches (the table, then the size).  (qemu-img reads a
# snapshot at the image's current size.)
op_resize()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" resize -q "$W/img.qcow2" 64M ;;
    after)
        intact "$W/img.qcow2" "$2"
        rm -f "$T/view.raw" "$T/s1.raw"
        "$QEMU_IMG" convert -U -O raw "$W/img.qcow2" "$T/view.raw"
        "$QEMU_IMG" convert -U -O raw -l snapshot.name=s1 "$W/img.qcow2" \
            "$T/s1.raw"
        size=$(stat -c %s "$T/view.raw")
        case $size in
        1048576) [ "$3" != "done" ] || die "$2: still 1 MiB after success" ;;
        67108864) ;;
        *) die "$2: the disk is $size bytes" ;;
        esac
        same_grown "$T/view.raw" "$F/live.raw" "$size" ||
            die "$2: the live disk is not its old content and zeros"
        same_grown "$T/s1.raw" "$F/s1.raw" "$size" ||
            die "$2: s1 is not its old content and zeros"
        ;;
    esac
}

chain_setup()
{
    cp "$F/base.qcow2" "$F/mid.qcow2" "$F/top.qcow2" "$W/"
}

op_commit()
{
    case $1 in
    setup) chain_setup ;;
    run) "$QSNAP_IMG" commit -q "$W/top.qcow2" ;;
    after)
        for l in top mid base; do
            intact "$W/$l.qcow2" "$2"
        done
        same_raw "$W/top.qcow2" "$F/top.raw" || die "$2: top's view changed"
        same_raw "$W/base.qcow2" "$F/base.raw" || die "$2: base changed"
        if [ "$3" = "done" ]; then
            same_raw "$W/mid.qcow2" "$F/top.raw" ||
                die "$2: mid does not hold top's data after the commit"
        fi
        ;;
    esac
}

# chain_views_kept CONTEXT: top, mid and base intact, and each still
# reads as before (the views of stream and rebase, done or not).
chain_views_kept()
{
    for l in top mid base; do
        intact "$W/$l.qcow2" "$1"
    done
    same_raw "$W/top.qcow2" "$F/top.raw" || die "$1: top's view changed"
    same_raw "$W/mid.qcow2" "$F/mid.raw" || die "$1: mid changed"
    same_raw "$W/base.qcow2" "$F/base.raw" || die "$1: base changed"
}

op_stream()
{
    case $1 in
    setup) chain_setup ;;
    run) "$QSNAP_IMG" stream -q "$W/top.qcow2" ;;
    after)
        chain_views_kept "$2"
        if [ "$3" = "done" ] && "$QEMU_IMG" info -U "$W/top.qcow2" |
            grep -q '^backing file:'; then
            die "$2: top still has a backing file after the stream"
        fi
        ;;
    esac
}

# Safe rebase of top from mid onto base: top copies what mid held for it.
op_rebase()
{
    case $1 in
    setup) chain_setup ;;
    run) "$QSNAP_IMG" rebase -q -b base.qcow2 -F qcow2 "$W/top.qcow2" ;;
    after)
        chain_views_kept "$2"
        if [ "$3" = "done" ] && ! "$QEMU_IMG" info -U "$W/top.qcow2" |
            grep -q '^backing file: base.qcow2'; then
            die "$2: top is not on base after the rebase"
        fi
        ;;
    esac
}

op_snapshot_rename()
{
    case $1 in
    setup) cp "$F/img.qcow2" "$W/img.qcow2" ;;
    run) "$QSNAP_IMG" snapshot --rename s1 renamed "$W/img.qcow2" ;;
    after)
        intact "$W/img.qcow2" "$2"
        same_raw "$W/img.qcow2" "$F/live.raw" || die "$2: live disk changed"
        if has_snapshot "$W/img.qcow2" renamed; then
            same_raw "$W/img.qcow2" "$F/s1.raw" renamed ||
                die "$2: the renamed snapshot changed"
            ! has_snapshot "$W/img.qcow2" s1 || die "$2: s1 is there twice"
        elif [ "$3" = "done" ]; then
            die "$2: no snapshot 'renamed' after success"
        else
            same_raw "$W/img.qcow2" "$F/s1.raw" s1 || die "$2: s1 changed"
        fi
        ;;
    esac
}

op_merge()
{
    case $1 in
    setup) chain_setup ;;
    run) "$QSNAP_IMG" delete -q "$W/top.qcow2" "$W/mid.qcow2" ;;
    after)
        for l in top mid base; do
            [ -e "$W/$l.qcow2" ] || continue
            intact "$W/$l.qcow2" "$2"
        done
        same_raw "$W/top.qcow2" "$F/top.raw" || die "$2: top's view changed"
        same_raw "$W/base.qcow2" "$F/base.raw" || die "$2: base changed"
        if [ "$3" = "done" ] && [ -e "$W/mid.qcow2" ]; then
            die "$2: mid still there after success"
        fi
        ;;
    esac
}

op_create_falloc()
{
    case $1 in
    setup) rm -f "$W/new.qcow2" ;;
    run)
        "$QSNAP_TOOL" create --prealloc falloc --cluster-size 65536 \
            "$W/new.qcow2" 4M
        ;;
    after)
        if [ "$3" = "done" ]; then
            intact "$W/new.qcow2" "$2"
            "$QEMU_IMG" convert -U -O raw "$W/new.qcow2" "$T/view.raw"
            if [ "$(wc -c <"$T/view.raw")" != 4194304 ] ||
                ! cmp -s -n 4194304 "$T/view.raw" /dev/zero; then
                die "$2: the new image does not read as 4 MiB of zeros"
            fi
        elif [ -e "$W/new.qcow2" ]; then
            die "$2: a failed create left $W/new.qcow2 behind"
        fi
        ;;
    esac
}

# ------------------------------------------------------------ the loop

n_runs=0
n_leaky=0
total_points=0

# exercise OP KIND ERR [harmless]: with "harmless", a failure of KIND is
# one the library works around (space reserved ahead of the image's end
# is a best effort): the command must succeed all the same, with the new
# state, and at least one such point must have been reached.
exercise()
{
    op=$1
    kind=$2
    err=$3
    harmless=${4:-}
    n=1
    while :; do
        rm -rf "$W"
        mkdir "$W"
        "op_$op" setup
        rm -f "$T/fault.log"
        if [ "$kind" = powercut ]; then
            ctx="$op, power cut before modifying call $n (seed $err)"
        else
            ctx="$op, $kind call $n fails with $err"
        fi
        rc=0
        QSNAP_FAULT="$kind:$n:$err" QSNAP_FAULT_LOG="$T/fault.log" \
            "op_$op" run >"$T/op.out" 2>&1 || rc=$?
        n_runs=$((n_runs + 1))
        if [ ! -s "$T/fault.log" ]; then
            [ "$rc" = 0 ] || {
                cat "$T/op.out" >&2
                die "$op ($kind past the last point) failed: exit $rc"
            }
            "op_$op" after "$op, no fault" "done"
            break
        fi
        if [ -n "$harmless" ]; then
            [ "$rc" = 0 ] || {
                cat "$T/fault.log" "$T/op.out" >&2
                die "$ctx: the command failed (exit $rc)"
            }
            "op_$op" after "$ctx" done
            n=$((n + 1))
            [ "$n" -le 400 ] || die "$op: more than 400 $kind points?"
            continue
        fi
        [ "$rc" != 0 ] || {
            cat "$T/fault.log" >&2
            die "$ctx: the command succeeded"
        }
        [ -s "$T/op.out" ] || die "$ctx: failed without a message"
        "op_$op" after "$ctx" failed
        n=$((n + 1))
        [ "$n" -le 400 ] || die "$op: more than 400 $kind points?"
    done
    if [ -n "$harmless" ]; then
        [ "$n" -gt 1 ] || die "$op: no $kind point reached"
        note "$op: $((n - 1)) $kind points failed with $err, each worked" \
            "around"
    elif [ "$kind" = powercut ]; then
        note "$op: $((n - 1)) power cuts (seed $err), each left intact"
    else
        note "$op: $((n - 1)) $kind points failed with $err, each left" \
            "intact"
    fi
    total_points=$((total_points + n - 1))
}

for op in write snapshot_create snapshot_apply snapshot_delete \
    snapshot_rename vmstate_save compact resize commit stream rebase merge; do
    exercise "$op" write EIO
    exercise "$op" write ENOSPC
    exercise "$op" flush EIO
done
# Power cuts (QSNAP_FAULT=powercut:N:SEED) before each modifying call of
# the operations that move or free metadata: the file keeps what was
# flushed and a random part of what was not.
for op in snapshot_delete vmstate_save compact resize rebase merge; do
    exercise "$op" powercut "$((QSNAP_SEED % 1000000))"
done
exercise create_falloc falloc ENOSPC
exercise create_falloc write EIO
exercise write reserve ENOSPC harmless
exercise create_falloc reserve EIO harmless

note "$total_points failure points in $n_runs runs; $n_leaky left leaks" \
    "that check -r leaks repaired"
[ "$total_points" -ge 100 ] || die "only $total_points failure points"
