#!/bin/sh
# chain_qemu.sh - backing chains between qsnap and QEMU, both directions.
#
# 1. Chains built by qemu-img and qemu-io read through qsnap: a raw bottom
#    and qcow2 layers of every kind (v2 and v3; 512 bytes to 2 MiB
#    clusters; extended L2; zlib and zstd compressed clusters; zero
#    clusters and discards; layers longer and shorter than their backing
#    file; relative names across directories, opened from a third one).
#    For every layer: qsnap's guest content (qsnap-tool digest) equals
#    qemu-img convert's, and qsnap-img map equals qemu-img map.
# 2. Chains built by qsnap (qsnap_create with a backing file, qsnap-img
#    create -b, qsnap_overlay_push with writes through the same handle
#    before and after, random I/O through the library) against a raw
#    model of every layer; then qemu-img commit (into the backing file,
#    into a deeper base, with -d) and qemu-img rebase (safe, onto a deeper
#    layer and onto none) give the model's content, pass qemu-img check,
#    and read the same through qsnap.
# 3. The reverse: chains built by qemu-img and qemu-io (models taken with
#    qemu-img convert), then committed, rebased, streamed and merged by
#    qsnap; qemu-img reads the model's content and check is clean.  Also
#    layers of different sizes (a view ends where its layer ends, and
#    reads zeros past a shorter backing file), a layer named by its
#    absolute path, and a delete under a child with internal snapshots
#    (refused, or the snapshots keep what they show).
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CHAIN_DRIVER:=$top_builddir/tests/chain-driver}"
need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"
need_built "$QSNAP_CHAIN_DRIVER"
DRV=$QSNAP_CHAIN_DRIVER

failures=0
bad()
{
    echo "  FAIL $*" >&2
    failures=$((failures + 1))
}

# qio IMAGE COMMAND...: qemu-io commands on IMAGE (each COMMAND one -c).
qio()
{
    q_img=$1
    shift
    for q_c in "$@"; do
        set -- "$@" -c "$q_c"
        shift
    done
    "$QEMU_IO" "$@" "$q_img" >"$T/qio.out" 2>&1 || {
        cat "$T/qio.out" >&2
        die "qemu-io on $q_img failed"
    }
}

# same_as_qemu IMAGE CONTEXT: qsnap reads and maps IMAGE as qemu-img does.
same_as_qemu()
{
    s_want=$(qemu_digest "$1")
    s_got=$("$QSNAP_TOOL" digest "$1" 2>"$T/err") || {
        cat "$T/err" >&2
        bad "qsnap cannot read $1 ($2)"
        return
    }
    if [ "$s_want" != "$s_got" ]; then
        bad "qsnap reads $1 as $s_got, qemu-img as $s_want ($2)"
        return
    fi
    "$QEMU_IMG" map -U --output=json "$1" >"$T/map.qemu"
    if ! "$QSNAP_IMG" map -U --output=json "$1" >"$T/map.qsnap" 2>&1; then
        cat "$T/map.qsnap" >&2
        bad "qsnap-img map $1 failed ($2)"
        return
    fi
    if ! cmp -s "$T/map.qemu" "$T/map.qsnap"; then
        diff "$T/map.qemu" "$T/map.qsnap" | head -n 20 >&2 || :
        bad "qsnap-img map $1 differs from qemu-img map ($2)"
        return
    fi
    note "ok: $1 ($2)"
}

# model_of IMAGE MODEL: the guest content as qemu-img reads it.
model_of()
{
    rm -f "$2"
    "$QEMU_IMG" convert -U -O raw "$1" "$2"
}

# matches IMAGE MODEL CONTEXT [FMT]: qemu-img compare; check if qcow2.
matches()
{
    m_fmt=${4:-qcow2}
    if ! "$QEMU_IMG" compare -U -f "$m_fmt" -F raw "$1" "$2" \
        >"$T/cmp.out" 2>&1; then
        sed 's/^/      /' "$T/cmp.out" >&2
        bad "$1 does not match ${2##*/} ($3)"
        return 1
    fi
    if [ "$m_fmt" = qcow2 ] && ! "$QEMU_IMG" check -q "$1" \
        >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$1" 2>&1 | sed 's/^/      /' >&2
        bad "qemu-img check $1 is not clean ($3)"
        return 1
    fi
}

# qsnap_matches IMAGE MODEL CONTEXT: qsnap reads IMAGE as the model.
qsnap_matches()
{
    q_got=$("$QSNAP_TOOL" digest "$1" 2>"$T/err") ||
        q_got="error: $(cat "$T/err")"
    q_want=$(digest_of_raw "$2")
    [ "$q_got" = "$q_want" ] ||
        bad "qsnap reads $1 as $q_got, the model is $q_want ($3)"
}

# pattern MODEL OFFSET LENGTH BYTE: what a pattern write does to a model.
pattern()
{
    p_oct=$(printf '%03o' "$4")
    head -c "$3" /dev/zero | tr '\000' "\\$p_oct" |
        dd of="$1" bs=65536 seek="$2" oflag=seek_bytes iflag=fullblock \
            conv=notrunc status=none
}

# ===================================================== 1. qemu -> qsnap

note "1. chains built by qemu-img and qemu-io, read by qsnap"
A="$T/a"
mkdir -p "$A"
cd "$A"
put_bytes l0.raw 0 16777216 5
# Holes in the raw file too.
dd if=/dev/zero of=l0.raw bs=1M seek=12 count=2 conv=notrunc status=none
fallocate -p -o 12582912 -l 2097152 l0.raw 2>/dev/null || :
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=65536,compat=1.1 \
    -b l0.raw -F raw l1.qcow2 16M
qio l1.qcow2 "write -P 0x11 0 3M" "write -P 0x12 5000 70000" \
    "write -c -P 0x13 4M 64k" "write -c -P 0x14 4352k 128k" \
    "write -z 6M 1M" "write -z -u 8M 512k" "discard 1M 256k" \
    "write -P 0x15 16711680 65536"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=512,compat=0.10 \
    -b l1.qcow2 -F qcow2 l2.qcow2 16M
qio l2.qcow2 "write -P 0x21 100 1000" "write -z 2M 64k" \
    "write -P 0x22 9M 300k" "discard 4M 8k" "write -z 5000000 3333"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=2M,compat=1.1 \
    -b l2.qcow2 -F qcow2 l3.qcow2 16M
qio l3.qcow2 "write -P 0x31 1M 4k" "write -z 10M 2M" "write -z -u 14M 2M" \
    "write -P 0x32 7M 1M"
"$QEMU_IMG" create -q -f qcow2 \
    -o cluster_size=65536,extended_l2=on,compression_type=zstd \
    -b l3.qcow2 -F qcow2 l4.qcow2 16M
qio l4.qcow2 "write -P 0x41 4k 4k" "write -P 0x42 70k 10k" \
    "write -z 3M 8k" "write -c -P 0x43 11M 64k" "discard 7M 64k"
# Longer, then shorter than the backing file.
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 -b l4.qcow2 -F qcow2 \
    l5.qcow2 20M
qio l5.qcow2 "write -P 0x51 15M 2M" "write -P 0x52 19M 512k"
"$QEMU_IMG" create -q -f qcow2 -b l5.qcow2 -F qcow2 l6.qcow2 10M
qio l6.qcow2 "write -P 0x61 2M 4k"
"$QEMU_IMG" create -q -f qcow2 -b l6.qcow2 -F qcow2 l7.qcow2 18M
qio l7.qcow2 "write -P 0x71 17M 1k"
same_as_qemu l0.raw "qemu-built chain, raw bottom"
for i in 1 2 3 4 5 6 7; do
    same_as_qemu "l$i.qcow2" "qemu-built chain, layer $i"
done

# Relative names across directories, opened from a third directory.
mkdir -p x/base y/mid z
"$QEMU_IMG" create -q -f qcow2 x/base/b.qcow2 4M
qio x/base/b.qcow2 "write -P 0x81 0 4M"
"$QEMU_IMG" create -q -f qcow2 -b ../x/base/b.qcow2 -F qcow2 y/mid.qcow2
qio y/mid.qcow2 "write -P 0x82 1M 1M"
"$QEMU_IMG" create -q -f qcow2 -b "$A/y/mid.qcow2" -F qcow2 y/top.qcow2
qio y/top.qcow2 "write -P 0x83 3M 4k"
"$QEMU_IMG" create -q -f qcow2 -b ../y/top.qcow2 -F qcow2 z/t.qcow2
qio z/t.qcow2 "write -P 0x84 0 4k"
(cd z && same_as_qemu t.qcow2 "relative names across directories")
same_as_qemu z/t.qcow2 "relative names, opened from the parent"
same_as_qemu "$A/z/t.qcow2" "relative names, absolute path"

# ===================================================== 2. qsnap -> qemu

note "2. chains built by qsnap, committed and rebased by qemu-img"
B="$T/b"
mkdir -p "$B/p"
cd "$B/p"
"$QSNAP_IMG" create -q -f qcow2 -o cluster_size=4096 s0.qcow2 12M
truncate -s 12M s0.raw
"$QSNAP_TOOL" random --seed 11 --ops 60 s0.raw s0.qcow2 >/dev/null
"$QSNAP_TOOL" create --cluster-size 65536 --version 2 --backing s0.qcow2 \
    --backing-fmt qcow2 s1.qcow2 12M >/dev/null
cp s0.raw s1.raw
"$QSNAP_TOOL" random --seed 12 --ops 60 --compress s1.raw s1.qcow2 \
    >/dev/null
# The VMM pattern: writes, an external checkpoint, writes to the overlay
# through the same handle.
cp s1.raw s2.raw
"$DRV" push -c 512 -w 1M:100k:0xa1 -w 11M:1M:0xa2 -W 2M:5000:0xa3 \
    -W 11534336:4096:0xa4 s1.qcow2 s2.qcow2
pattern s1.raw 1048576 102400 161
pattern s1.raw 11534336 1048576 162
cp s1.raw s2.raw
pattern s2.raw 2097152 5000 163
pattern s2.raw 11534336 4096 164
cp s2.raw s3.raw
"$QSNAP_IMG" create -q -f qcow2 -o cluster_size=1M -b s2.qcow2 -F qcow2 \
    s3.qcow2 12M
"$QSNAP_TOOL" random --seed 13 --ops 60 s3.raw s3.qcow2 >/dev/null
for i in 0 1 2 3; do
    matches "s$i.qcow2" "s$i.raw" "qsnap-built chain, layer $i" || :
    qsnap_matches "s$i.qcow2" "s$i.raw" "qsnap-built chain, layer $i"
done

# fresh DIR: a copy of the chain in DIR.
fresh()
{
    rm -rf "$1"
    mkdir -p "$1"
    cp "$B"/p/s?.qcow2 "$B"/p/s?.raw "$1"/
    cd "$1"
}

fresh "$B/c1"
"$QEMU_IMG" commit -q s3.qcow2
matches s2.qcow2 s3.raw "qemu-img commit s3 into s2" &&
    matches s3.qcow2 s3.raw "qemu-img commit: s3 emptied" &&
    matches s1.qcow2 s1.raw "qemu-img commit: s1 untouched" &&
    qsnap_matches s3.qcow2 s3.raw "qemu-img commit s3 into s2" &&
    note "ok: qemu-img commit of a qsnap chain"

fresh "$B/c2"
"$QEMU_IMG" commit -q -b s0.qcow2 s3.qcow2
matches s0.qcow2 s3.raw "qemu-img commit -b s0 s3" &&
    matches s3.qcow2 s3.raw "qemu-img commit -b s0: s3 kept" &&
    qsnap_matches s0.qcow2 s3.raw "qemu-img commit -b s0 s3" &&
    note "ok: qemu-img commit -b of a qsnap chain"

fresh "$B/c3"
"$QEMU_IMG" commit -q -d s2.qcow2
matches s1.qcow2 s2.raw "qemu-img commit -d s2" &&
    matches s2.qcow2 s2.raw "qemu-img commit -d: s2 kept" &&
    matches s3.qcow2 s3.raw "qemu-img commit -d s2: s3 above" &&
    note "ok: qemu-img commit -d of a middle layer of a qsnap chain"

fresh "$B/r1"
"$QEMU_IMG" rebase -q -b s0.qcow2 -F qcow2 s3.qcow2
matches s3.qcow2 s3.raw "qemu-img rebase s3 onto s0" &&
    qsnap_matches s3.qcow2 s3.raw "qemu-img rebase s3 onto s0" &&
    note "ok: qemu-img rebase of a qsnap chain onto a deeper layer"

fresh "$B/r2"
"$QEMU_IMG" rebase -q -b "" s2.qcow2
matches s2.qcow2 s2.raw "qemu-img rebase s2 onto none" &&
    matches s3.qcow2 s3.raw "qemu-img rebase s2 onto none: s3 above" &&
    qsnap_matches s3.qcow2 s3.raw "qemu-img rebase s2 onto none" &&
    note "ok: qemu-img rebase of a qsnap chain onto none"

# ===================================================== 3. qemu -> qsnap ops

note "3. chains built by qemu-img, committed/rebased/streamed by qsnap"
C="$T/c"
mkdir -p "$C/p"
cd "$C/p"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=65536,compat=0.10 q0.qcow2 \
    12M
qio q0.qcow2 "write -P 0x01 0 8M" "write -z 2M 1M" "write -c -P 0x02 9M 64k"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 -b q0.qcow2 -F qcow2 \
    q1.qcow2
qio q1.qcow2 "write -P 0x11 1M 2M" "write -z 4M 512k" "discard 6M 64k" \
    "write -P 0x12 10M 100k"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=2M,compat=0.10 \
    -b q1.qcow2 -F qcow2 q2.qcow2
qio q2.qcow2 "write -P 0x21 3M 4k" "write -z 7M 4k" "write -P 0x22 11M 1M"
"$QEMU_IMG" create -q -f qcow2 -b q2.qcow2 -F qcow2 q3.qcow2
qio q3.qcow2 "write -P 0x31 0 64k" "write -z 1M 64k" "discard 3M 64k" \
    "write -c -P 0x32 5M 64k"
for i in 0 1 2 3; do
    model_of "q$i.qcow2" "q$i.raw"
done

qfresh()
{
    rm -rf "$1"
    mkdir -p "$1"
    cp "$C"/p/q?.qcow2 "$C"/p/q?.raw "$1"/
    cd "$1"
}

# op DESCRIPTION COMMAND...: run a qsnap operation; failure is recorded.
op()
{
    o_desc=$1
    shift
    if ! "$@" >"$T/op.out" 2>&1; then
        sed 's/^/      /' "$T/op.out" >&2
        bad "$o_desc failed"
        return 1
    fi
}

# The operations, through the library (chain-driver) or qsnap-img.
q_commit()
{
    if [ "$via" = cli ]; then
        "$QSNAP_IMG" commit -q "$@"
    else
        "$DRV" commit "$@"
    fi
}
# q_rebase [-u] FMT FILE BACKING ("" FMT: probe; "" BACKING: none)
q_rebase()
{
    qr_u=
    if [ "$1" = -u ]; then
        qr_u=-u
        shift
    fi
    if [ "$via" = cli ]; then
        # shellcheck disable=SC2086  # -u or nothing
        "$QSNAP_IMG" rebase -q $qr_u -b "$3" ${1:+-F "$1"} "$2"
    else
        # shellcheck disable=SC2086  # -u or nothing
        "$DRV" rebase $qr_u ${1:+-F "$1"} "$2" "$3"
    fi
}
q_stream()
{
    if [ "$via" = cli ]; then
        "$QSNAP_IMG" stream -q "$@"
    else
        "$DRV" stream "$@"
    fi
}
q_delete()
{
    if [ "$via" = cli ]; then
        "$QSNAP_IMG" delete -q "$@"
    else
        "$DRV" delete "$@"
    fi
}

for via in lib cli; do
    V="$C/$via"
    w="($via)"

    qfresh "$V/c1"
    op "qsnap commit q3 $w" q_commit q3.qcow2 &&
        matches q2.qcow2 q3.raw "qsnap commit q3 into q2 $w" &&
        matches q3.qcow2 q3.raw "qsnap commit q3: emptied $w" &&
        matches q1.qcow2 q1.raw "qsnap commit q3: q1 untouched $w" &&
        note "ok: qsnap commit of a qemu chain $w"

    qfresh "$V/c2"
    op "qsnap commit -b q0 q3 $w" q_commit -b q0.qcow2 q3.qcow2 &&
        matches q0.qcow2 q3.raw "qsnap commit -b q0 q3 $w" &&
        matches q3.qcow2 q3.raw "qsnap commit -b q0 q3: q3 kept $w" &&
        note "ok: qsnap commit -b of a qemu chain $w"

    qfresh "$V/c3"
    op "qsnap commit -d q1 $w" q_commit -d q1.qcow2 &&
        matches q0.qcow2 q1.raw "qsnap commit -d q1 $w" &&
        matches q1.qcow2 q1.raw "qsnap commit -d q1: kept $w" &&
        matches q3.qcow2 q3.raw "qsnap commit -d q1: q3 above $w" &&
        note "ok: qsnap commit -d of a middle layer of a qemu chain $w"

    qfresh "$V/r1"
    op "qsnap rebase q3 onto q0 $w" q_rebase qcow2 q3.qcow2 q0.qcow2 &&
        matches q3.qcow2 q3.raw "qsnap rebase q3 onto q0 $w" &&
        note "ok: qsnap rebase of a qemu chain onto a deeper layer $w"
    "$QEMU_IMG" info -U q3.qcow2 | grep -q "^backing file: q0.qcow2$" ||
        bad "qsnap rebase q3 onto q0: qemu-img info shows another" \
            "backing file $w"

    qfresh "$V/r2"
    op "qsnap rebase q2 onto none $w" q_rebase "" q2.qcow2 "" &&
        matches q2.qcow2 q2.raw "qsnap rebase q2 onto none $w" &&
        matches q3.qcow2 q3.raw "qsnap rebase q2 onto none: q3 above $w" &&
        note "ok: qsnap rebase of a qemu chain onto none $w"

    qfresh "$V/r3"
    # Unsafe: only the name changes (to a copy of the same content).
    cp q1.qcow2 q1-copy.qcow2
    op "qsnap rebase -u q2 onto a copy of q1 $w" q_rebase -u qcow2 \
        q2.qcow2 q1-copy.qcow2 &&
        matches q3.qcow2 q3.raw "qsnap rebase -u $w" &&
        note "ok: qsnap rebase -u of a qemu chain $w"

    qfresh "$V/s1"
    op "qsnap stream q3 $w" q_stream q3.qcow2 &&
        matches q3.qcow2 q3.raw "qsnap stream q3 $w" &&
        note "ok: qsnap stream of a qemu chain $w"
    if "$QEMU_IMG" info -U q3.qcow2 | grep -q "^backing file"; then
        bad "qsnap stream q3: q3 still has a backing file $w"
    fi

    qfresh "$V/s2"
    op "qsnap stream q3 down to q1 $w" q_stream -b q1.qcow2 q3.qcow2 &&
        matches q3.qcow2 q3.raw "qsnap stream -b q1 q3 $w" &&
        note "ok: qsnap stream of a qemu chain down to a base $w"

    for how in stream commit; do
        qfresh "$V/d-$how"
        op "qsnap delete --$how q1 $w" q_delete "--$how" q3.qcow2 \
            q1.qcow2 &&
            matches q3.qcow2 q3.raw "qsnap delete --$how q1: top $w" &&
            matches q2.qcow2 q2.raw "qsnap delete --$how q1: child $w" &&
            matches q0.qcow2 q0.raw "qsnap delete --$how q1: below $w" &&
            note "ok: qsnap delete by $how in a qemu chain $w"
        [ ! -e q1.qcow2 ] ||
            bad "qsnap delete --$how q1: q1.qcow2 is left $w"
        qfresh "$V/d0-$how"
        op "qsnap delete --$how q0 $w" q_delete "--$how" q3.qcow2 \
            q0.qcow2 &&
            matches q3.qcow2 q3.raw "qsnap delete --$how q0: top $w" &&
            matches q1.qcow2 q1.raw "qsnap delete --$how q0: child $w" &&
            note "ok: qsnap delete of the bottom by $how in a qemu chain $w"
        # The child names the layer by its absolute path; they are in
        # one directory all the same.
        qfresh "$V/da-$how"
        "$QEMU_IMG" rebase -q -u -b "$V/da-$how/q1.qcow2" -F qcow2 q2.qcow2
        op "qsnap delete --$how q1, named by its absolute path $w" \
            q_delete "--$how" q3.qcow2 q1.qcow2 &&
            matches q3.qcow2 q3.raw "qsnap delete --$how q1 (abs): top $w" &&
            matches q2.qcow2 q2.raw "qsnap delete --$how q1 (abs): child $w" &&
            note "ok: qsnap delete by $how of a layer named by its" \
                "absolute path $w"
    done

    # The top of the chain cannot be deleted: that would be a revert.
    qfresh "$V/d-top"
    if q_delete q3.qcow2 q3.qcow2 >"$T/op.out" 2>&1; then
        bad "qsnap delete of the top itself succeeded $w"
    elif ! grep -q "revert" "$T/op.out" ||
        ! grep -q q3.qcow2 "$T/op.out"; then
        cat "$T/op.out" >&2
        bad "qsnap delete of the top: the message does not explain $w"
    fi
    matches q3.qcow2 q3.raw "refused delete of the top $w" || :
done
# Layers of different sizes.  The view of a layer ends where it ends, and
# past the end of a shorter backing file it reads zeros: those zeros are
# part of the view that commit, stream and delete must keep.  Chain:
# b (8 MiB, all data) <- m (4 MiB, empty) <- t (8 MiB, one cluster).
note "3b. layers of different sizes"
S="$C/sizes"
mkdir -p "$S/p"
cd "$S/p"
"$QEMU_IMG" create -q -f qcow2 b.qcow2 8M
qio b.qcow2 "write -P 0xaa 0 8M"
"$QEMU_IMG" create -q -f qcow2 -b b.qcow2 -F qcow2 m.qcow2 4M
"$QEMU_IMG" create -q -f qcow2 -b m.qcow2 -F qcow2 t.qcow2 8M
qio t.qcow2 "write -P 0xbb 0 64k"
for l in b m t; do
    model_of "$l.qcow2" "$l.raw"
done
sfresh()
{
    rm -rf "$1"
    mkdir -p "$1"
    cp "$S"/p/* "$1"/
    cd "$1"
}
# The reference: qemu-img commit -b b t gives b t's view.
sfresh "$S/qemu-commit"
"$QEMU_IMG" commit -q -b b.qcow2 t.qcow2
matches b.qcow2 t.raw "reference: qemu-img commit -b past a short layer" ||
    :
sfresh "$S/commit-deep"
op "qsnap commit -b b t (m shorter)" "$DRV" commit -b b.qcow2 t.qcow2 &&
    matches b.qcow2 t.raw "qsnap commit -b b t, past the short m" &&
    note "ok: qsnap commit -b past a shorter layer"
sfresh "$S/commit-grow"
# m grows to 8 MiB: its new part must read as zeros, as in t's view,
# not as b's data.
op "qsnap commit t into the shorter m" "$DRV" commit t.qcow2 &&
    matches m.qcow2 t.raw "qsnap commit t into the shorter m" &&
    matches t.qcow2 t.raw "qsnap commit t into the shorter m: t" &&
    note "ok: qsnap commit into a shorter backing file"
sfresh "$S/stream"
op "qsnap stream t down to b (m shorter)" "$DRV" stream -b b.qcow2 \
    t.qcow2 &&
    matches t.qcow2 t.raw "qsnap stream -b b t, past the short m" &&
    note "ok: qsnap stream past a shorter layer"
sfresh "$S/delete"
op "qsnap delete --stream m (shorter)" "$DRV" delete --stream t.qcow2 \
    m.qcow2 &&
    matches t.qcow2 t.raw "qsnap delete --stream of the shorter m" &&
    note "ok: qsnap delete of a shorter layer"
# The same with a v2 base, which has no zero clusters for its new part.
mkdir -p "$S/v2"
cd "$S/v2"
"$QEMU_IMG" create -q -f qcow2 b.qcow2 2M
qio b.qcow2 "write -P 0xaa 0 2M"
"$QEMU_IMG" create -q -f qcow2 -o compat=0.10 -b b.qcow2 -F qcow2 m.qcow2 1M
qio m.qcow2 "write -P 0xbb 0 64k"
"$QEMU_IMG" create -q -f qcow2 -b m.qcow2 -F qcow2 t.qcow2 2M
qio t.qcow2 "write -P 0xcc 64k 64k"
model_of t.qcow2 t.raw
op "qsnap commit t into the shorter v2 m" "$DRV" commit t.qcow2 &&
    matches m.qcow2 t.raw "qsnap commit t into the shorter v2 m" &&
    matches t.qcow2 t.raw "qsnap commit t into the shorter v2 m: t" &&
    note "ok: qsnap commit into a shorter v2 backing file"

# A child shorter than the layer deleted under it: committing would move
# the longer layer into the child's place and change the child's size.
# Refused when forced (nothing changes); the automatic choice streams.
sfresh "$S/delete-commit"
"$QEMU_IMG" create -q -f qcow2 -b t.qcow2 -F qcow2 u.qcow2 6M
qio u.qcow2 "write -P 0xcc 5M 64k"
model_of u.qcow2 u.raw
if "$DRV" delete --commit u.qcow2 t.qcow2 >"$T/op.out" 2>&1; then
    [ "$(image_field u.qcow2 virtual-size)" = 6291456 ] ||
        bad "qsnap delete --commit t: u.qcow2 is now" \
            "$(image_field u.qcow2 virtual-size) bytes, not 6291456"
    matches u.qcow2 u.raw "qsnap delete --commit t under the shorter u" ||
        :
elif ! grep -q 't\.qcow2' "$T/op.out"; then
    cat "$T/op.out" >&2
    bad "qsnap delete --commit t under the shorter u: unclear refusal"
else
    matches u.qcow2 u.raw "refused delete --commit under a shorter child" &&
        matches t.qcow2 t.raw "refused delete --commit: t unchanged" &&
        note "ok: qsnap delete --commit under a shorter child refused"
    op "qsnap delete t under the shorter u" "$DRV" delete u.qcow2 \
        t.qcow2 &&
        matches u.qcow2 u.raw "qsnap delete t under the shorter u" &&
        [ "$(image_field u.qcow2 virtual-size)" = 6291456 ] &&
        note "ok: qsnap delete under a shorter child"
fi

# A child with internal snapshots: what they show depends on the layer
# under the child too, and a delete must not change what any remaining
# layer shows.  Either the delete is refused with a message, or the
# child's snapshot reads as before (and its live disk too).
note "3c. a child with internal snapshots"
N="$C/snap"
mkdir -p "$N"
cd "$N"
"$QEMU_IMG" create -q -f qcow2 b.qcow2 4M
qio b.qcow2 "write -P 0x01 0 4M"
"$QEMU_IMG" create -q -f qcow2 -b b.qcow2 -F qcow2 m.qcow2
qio m.qcow2 "write -P 0x02 1M 1M"
"$QEMU_IMG" create -q -f qcow2 -b m.qcow2 -F qcow2 t.qcow2
qio t.qcow2 "write -P 0x03 0 64k"
"$QEMU_IMG" snapshot -c s1 t.qcow2
qio t.qcow2 "write -P 0x04 2M 64k"
"$QEMU_IMG" convert -l snapshot.name=s1 -O raw t.qcow2 s1.raw
model_of t.qcow2 t.raw
if "$DRV" delete --commit t.qcow2 m.qcow2 >"$T/op.out" 2>&1; then
    bad "qsnap delete --commit under a child with snapshots succeeded"
fi
if ! "$DRV" delete t.qcow2 m.qcow2 >"$T/op.out" 2>&1; then
    if grep -q 't\.qcow2' "$T/op.out"; then
        note "ok: delete under a child with snapshots refused:" \
            "$(head -n 1 "$T/op.out")"
    else
        cat "$T/op.out" >&2
        bad "delete under a child with snapshots: unclear refusal"
    fi
    matches t.qcow2 t.raw "refused delete under a child with snapshots" ||
        :
else
    matches t.qcow2 t.raw "delete under a child with snapshots: live" ||
        :
    "$QEMU_IMG" convert -l snapshot.name=s1 -O raw t.qcow2 s1.after
    if cmp -s s1.raw s1.after; then
        note "ok: delete under a child with snapshots keeps them"
    else
        bad "delete of m.qcow2 changed what the snapshot s1 of its" \
            "child t.qcow2 shows ($(cmp s1.raw s1.after 2>&1 || :))"
    fi
fi

cd "$T"
[ "$failures" = 0 ] || die "$failures check(s) failed"
note "all chains agree with QEMU"
