#!/bin/sh
# snapshot_space.sh - snapshots give their space back.
#
# 1. 100 cycles of guest write / qsnap-img snapshot -c / snapshot -d (and
#    30 of snapshot -c / write, copying on write / snapshot -d): the file
#    stays within one cycle's worth (the bytes written plus a snapshot's
#    metadata) of its size after the first cycle, and qemu-img check finds
#    no leak after any cycle.
# 2. Compaction: over an image with several snapshots (plain clusters;
#    then small clusters with compressed ones), some snapshots are deleted
#    and `qsnap-img compact` run.  The file's apparent size must then be at
#    most 5% above the bytes of the clusters still referenced (counted by
#    `qsnap-img check --output=json` when it reports them, and always by
#    snap-driver from the raw refcount blocks), every remaining snapshot
#    and the live disk read their models (qemu-img convert -l / compare),
#    and qemu-img check is clean.
# 3. Exclusive sizes: after a snapshot and N overwritten clusters,
#    `qsnap-img list --output=json` reports an exclusive size of at least N
#    clusters for it; deleting it and compacting frees about that much.
# 4. `qsnap-img snapshot -d` and `compact` killed with SIGKILL at several
#    points leave nothing worse than leaked clusters (qemu-img check exit
#    0 or 3): the deleted snapshot is whole or gone, the others and the
#    live disk read their models, and after `check -r leaks` and compact
#    the file is clean and tight again.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"
: "${SNAP_DRIVER:=$top_builddir/tests/snap-driver}"
need_built "$SNAP_DRIVER"

CYCLES=${QSNAP_SPACE_CYCLES:-100}

# json_snap_field FILE FIELD: "NAME VALUE" for each snapshot object of a
# JSON document (a numeric FIELD), in document order.
json_snap_field()
{
    tr -d ' \n' <"$1" | sed 's/[{}]/\n/g' | awk -v f="$2" '
        match($0, /"name":"[^"]*"/) {
            n = substr($0, RSTART + 8, RLENGTH - 9)
            if (match($0, "\"" f "\":-?[0-9]+")) {
                print n, substr($0, RSTART + length(f) + 3,
                    RLENGTH - length(f) - 3)
            }
        }'
}

fsize()
{
    stat -c %s "$1"
}

# snap_model IMAGE NAME: the live disk as qemu-img reads it, kept as the
# model of snapshot NAME (taken right after).
snap_model()
{
    rm -f "$T/model.$2.raw"
    run_ok "model of $2" "$QEMU_IMG" convert -U -O raw "$1" \
        "$T/model.$2.raw"
}

# check_snapshots IMAGE NAME...: each snapshot reads its model.
check_snapshots()
{
    cs_img=$1
    shift
    for cs_name in "$@"; do
        rm -f "$T/read.raw"
        run_ok "read $cs_name" "$QEMU_IMG" convert -U \
            -l "snapshot.name=$cs_name" -O raw "$cs_img" "$T/read.raw"
        if ! "$QEMU_IMG" compare -q -f raw -F raw "$T/read.raw" \
            "$T/model.$cs_name.raw"; then
            die "snapshot $cs_name of $cs_img differs from its model"
        fi
    done
    rm -f "$T/read.raw"
}

# referenced IMAGE: bytes of host clusters with a refcount above zero.
referenced()
{
    "$SNAP_DRIVER" refcounted "$1" >"$T/ref.out" ||
        die "snap-driver refcounted $1 failed"
    r_bytes=$(sed -n 's/^referenced_bytes=//p' "$T/ref.out")
    r_cs=$(sed -n 's/^cluster_size=//p' "$T/ref.out")
    # qsnap's own count, where its check reports one, must agree.
    "$QSNAP_IMG" check -U --output=json "$1" >"$T/check.json" 2>&1 || true
    q_clusters=$(tr -d ' \n' <"$T/check.json" |
        sed -n 's/.*"referenced-clusters":\([0-9]*\).*/\1/p')
    if [ -n "$q_clusters" ] &&
        [ "$((q_clusters * r_cs))" != "$r_bytes" ]; then
        die "qsnap-img check reports $q_clusters referenced clusters," \
            "the refcount blocks $((r_bytes / r_cs))"
    fi
    echo "$r_bytes"
}

# ------------------------------------------------------------ part 1
note "1. $CYCLES cycles of write / snapshot create / snapshot delete"

# cycles IMAGE CLUSTER WRITE-LEN COUNT MODE
# MODE plain: write, create, delete; cow: create, write, delete.
cycles()
{
    c_img=$1
    c_len=$3
    # A cycle's worth: the bytes written, and a few clusters of metadata
    # (the snapshot's L1 table and table, copied L2 tables).
    c_worth=$((c_len + 8 * $2))
    first=
    c=1
    while [ "$c" -le "$4" ]; do
        pat=$(( (c * 41) % 250 + 1 ))
        # Overlapping regions: each cycle starts a little further in.
        off=$(( (c % 7) * $2 ))
        if [ "$5" = cow ]; then
            run_ok "create $c" "$QSNAP_IMG" snapshot -c "cycle$c" "$c_img"
        fi
        run_ok "write $c" "$QSNAP_TOOL" write "$c_img" "$off" "$c_len" "$pat"
        if [ "$5" = plain ]; then
            run_ok "create $c" "$QSNAP_IMG" snapshot -c "cycle$c" "$c_img"
        fi
        run_ok "delete $c" "$QSNAP_IMG" snapshot -d "cycle$c" "$c_img"
        qemu_check "$c_img" "$5 cycle $c"
        size=$(fsize "$c_img")
        [ -n "$first" ] || first=$size
        if [ "$size" -gt $((first + c_worth)) ]; then
            die "$5 cycle $c: file is $size bytes, $first after the first" \
                "cycle (more than $c_worth bytes of growth)"
        fi
        c=$((c + 1))
    done
    run_ok "verify" "$QSNAP_TOOL" verify "$c_img" "$off" "$c_len" "$pat"
    echo "  ok $4 $5 cycles: file $size bytes, $first after the first"
}

img="$T/cyc.qcow2"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 "$img" 32M
cycles "$img" 65536 2097152 "$CYCLES" plain
rm -f "$img"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 -o cluster_size=4096 \
    "$img" 8M
cycles "$img" 4096 524288 $(( (CYCLES + 2) / 3 )) cow

# ------------------------------------------------------------ part 2
note "2. delete snapshots, compact: the file shrinks to what is referenced"

# compact_case CLUSTER COMPRESS
compact_case()
{
    img="$T/c.qcow2"
    ctx="cluster=$1${2:+ compressed}"
    rm -f "$img" "$T"/model.*.raw
    run_ok "create" "$QSNAP_IMG" create -q -f qcow2 \
        -o "cluster_size=$1,refcount_bits=16" "$img" 48M
    truncate -s 48M "$T/live.raw"
    run_ok "fill" "$QSNAP_TOOL" write "$img" 0 40M 0x11
    n=0
    for name in a b c d e; do
        n=$((n + 1))
        snap_model "$img" "$name"
        run_ok "snapshot $name" "$QSNAP_IMG" snapshot -c "$name" "$img"
        # Overwrite a different 8 MiB stretch after each snapshot.
        run_ok "overwrite" "$QSNAP_TOOL" write "$img" $(( (n - 1) * 8 ))M \
            8M $((0x20 + n))
        if [ -n "$2" ]; then
            "$QEMU_IMG" convert -U -O raw "$img" "$T/live.raw"
            run_ok "compressed writes" "$QSNAP_TOOL" random --seed "$n" \
                --ops 60 --max-len 200000 --compress "$T/live.raw" "$img"
        fi
    done
    snap_model "$img" live
    for name in a c d; do
        run_ok "delete $name" "$QSNAP_IMG" snapshot -d "$name" "$img"
    done
    qemu_check "$img" "$ctx, before compact"
    before=$(fsize "$img")
    run_ok "compact" "$QSNAP_IMG" compact "$img"
    after=$(fsize "$img")
    qemu_check "$img" "$ctx, after compact"
    ref=$(referenced "$img")
    limit=$((ref + ref / 20))
    if [ "$after" -gt "$limit" ]; then
        die "$ctx: after compact the file is $after bytes, but only $ref" \
            "are referenced (limit $limit; $before before compact)"
    fi
    [ "$after" -lt "$before" ] ||
        die "$ctx: compact did not shrink the file ($before -> $after)"
    check_snapshots "$img" b e
    qemu_compare "$img" "$T/model.live.raw" "$ctx, live disk after compact"
    # A second compact has nothing left to do.
    run_ok "compact again" "$QSNAP_IMG" compact "$img"
    [ "$(fsize "$img")" -le "$after" ] ||
        die "$ctx: a second compact grew the file"
    qemu_check "$img" "$ctx, after the second compact"
    echo "  ok $ctx: $before -> $after bytes, $ref referenced"
}

compact_case 65536 ""
compact_case 4096 compressed

# ------------------------------------------------------------ part 3
note "3. exclusive sizes"

# exclusive_of IMAGE NAME: the exclusive size qsnap-img list reports.
exclusive_of()
{
    "$QSNAP_IMG" list -U --output=json "$1" >"$T/list.json" ||
        die "qsnap-img list $1 failed"
    json_snap_field "$T/list.json" exclusive-size |
        sed -n "s/^$2 //p" | head -n 1
}

# exclusive_case CLUSTER N
exclusive_case()
{
    cs=$1
    nclu=$2
    img="$T/x.qcow2"
    ctx="cluster=$cs, $nclu clusters overwritten"
    rm -f "$img"
    run_ok "create" "$QSNAP_IMG" create -q -f qcow2 -o "cluster_size=$cs" \
        "$img" 32M
    run_ok "fill" "$QSNAP_TOOL" write "$img" 0 16M 0x31
    run_ok "snapshot keep" "$QSNAP_IMG" snapshot -c keep "$img"
    run_ok "snapshot ex" "$QSNAP_IMG" snapshot -c ex "$img"
    # Nothing is exclusive yet, but a snapshot's own L1 table.
    span=$((cs * cs / 8))
    n_l1=$(( (33554432 + span - 1) / span ))
    l1_bytes=$((n_l1 * 8))
    l1_bytes=$(( (l1_bytes + cs - 1) / cs * cs ))
    x0=$(exclusive_of "$img" ex)
    [ -n "$x0" ] || die "$ctx: no exclusive-size for snapshot ex"
    [ "$x0" -le "$l1_bytes" ] ||
        die "$ctx: a fresh snapshot has exclusive size $x0"
    run_ok "overwrite" "$QSNAP_TOOL" write "$img" "$cs" $((nclu * cs)) 0x32
    # ex is the only snapshot holding the old content of those clusters
    # only if keep is gone: the old data is shared by keep and ex.
    x_shared=$(exclusive_of "$img" ex)
    [ "$x_shared" -le $((l1_bytes + 2 * cs)) ] ||
        die "$ctx: ex shares its old data with keep, but its exclusive" \
            "size is $x_shared"
    run_ok "delete keep" "$QSNAP_IMG" snapshot -d keep "$img"
    x=$(exclusive_of "$img" ex)
    [ "$x" -ge $((nclu * cs)) ] ||
        die "$ctx: exclusive size $x, below $nclu clusters ($((nclu * cs)))"
    run_ok "compact" "$QSNAP_IMG" compact "$img"
    before=$(fsize "$img")
    run_ok "delete ex" "$QSNAP_IMG" snapshot -d ex "$img"
    run_ok "compact" "$QSNAP_IMG" compact "$img"
    after=$(fsize "$img")
    qemu_check "$img" "$ctx"
    freed=$((before - after))
    # The freed space is the exclusive size, plus at most the snapshot
    # table's cluster(s).
    if [ "$freed" -lt "$x" ] || [ "$freed" -gt $((x + 2 * cs)) ]; then
        die "$ctx: exclusive size $x, but deleting and compacting freed" \
            "$freed bytes ($before -> $after)"
    fi
    run_ok "verify" "$QSNAP_TOOL" verify "$img" "$cs" $((nclu * cs)) 0x32
    echo "  ok $ctx: exclusive $x bytes, $freed freed"
}

exclusive_case 65536 40
exclusive_case 512 300
exclusive_case 2097152 3

# ------------------------------------------------------------ part 4
note "4. snapshot delete and compact killed (SIGKILL) part way"

# wait_unlocked IMAGE: a killed process's image lock can outlive it by a
# moment; wait until qemu-img may open the image.
wait_unlocked()
{
    w=0
    while "$QEMU_IMG" info "$1" 2>&1 | grep -q "lock"; do
        w=$((w + 1))
        [ "$w" -lt 100 ] || die "$1 stays locked after its writer was killed"
        sleep 0.1
    done
}

# A slow image: 512-byte clusters, tens of thousands of them.
src="$T/kill-src.qcow2"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 -o cluster_size=512 "$src" \
    24M
run_ok "fill" "$QSNAP_TOOL" write "$src" 0 20M 0x61
run_ok "snapshot a" "$QSNAP_IMG" snapshot -c a "$src"
run_ok "overwrite" "$QSNAP_TOOL" write "$src" 0 12M 0x62
run_ok "snapshot b" "$QSNAP_IMG" snapshot -c b "$src"
run_ok "overwrite" "$QSNAP_TOOL" write "$src" 6M 10M 0x63
run_ok "snapshot c" "$QSNAP_IMG" snapshot -c c "$src"
run_ok "delete c" "$QSNAP_IMG" snapshot -d c "$src"
for name in a b; do
    rm -f "$T/model.$name.raw"
    run_ok "model $name" "$QEMU_IMG" convert -U -l "snapshot.name=$name" \
        -O raw "$src" "$T/model.$name.raw"
done
snap_model "$src" live
img="$T/kill.qcow2"
n_killed=0
for op in delete compact; do
    case $op in
    delete) set -- snapshot -d a "$img" ;;
    compact) set -- compact -q "$img" ;;
    esac
    # Kill at fifths of the time the command takes here.
    cp "$src" "$img"
    t0=$(date +%s%N)
    run_ok "$op" "$QSNAP_IMG" "$@"
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    for k in 1 2 3 4; do
        at=$((ms * k / 5))
        [ "$at" -gt 0 ] || at=1
        delay=$(printf '%d.%03d' $((at / 1000)) $((at % 1000)))
        ctx="$op killed after ${delay}s of ${ms}ms"
        cp "$src" "$img"
        set +e
        timeout -s KILL "$delay" "$QSNAP_IMG" "$@" >/dev/null 2>&1
        rc=$?
        set -e
        [ "$rc" = 0 ] || n_killed=$((n_killed + 1))
        wait_unlocked "$img"
        set +e
        "$QEMU_IMG" check "$img" >"$T/check.out" 2>&1
        crc=$?
        set -e
        if [ "$crc" != 0 ] && [ "$crc" != 3 ]; then
            cat "$T/check.out" >&2
            die "$ctx: qemu-img check exits $crc"
        fi
        # a is either still whole or gone; b and the live disk are intact.
        if "$QEMU_IMG" snapshot -U -l "$img" | awk '{ print $2 }' |
            grep -qx a; then
            check_snapshots "$img" a b
        else
            [ "$op" = delete ] || die "$ctx: snapshot a disappeared"
            check_snapshots "$img" b
        fi
        qemu_compare "$img" "$T/model.live.raw" "$ctx"
        # Repairing leaks and compacting leave a clean, tight file.
        run_ok "$ctx: repair" "$QSNAP_IMG" check -q -r leaks "$img"
        run_ok "$ctx: compact" "$QSNAP_IMG" compact -q "$img"
        qemu_check "$img" "$ctx, after repair and compact"
        ref=$(referenced "$img")
        [ "$(fsize "$img")" -le $((ref + ref / 20)) ] ||
            die "$ctx: after repair and compact the file is $(fsize "$img")" \
                "bytes, $ref referenced"
        echo "  ok $ctx (exit $rc, qemu-img check $crc)"
    done
done
[ "$n_killed" -gt 0 ] || note "warning: every command finished before its kill"
rm -f "$img" "$src"

echo "$me: deleted snapshots gave their space back"
