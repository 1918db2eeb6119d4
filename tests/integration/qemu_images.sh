#!/bin/sh
# qemu_images.sh - images written by QEMU read back identically via qsnap.
#
# qemu-img convert and qemu-io write images of every cluster size
# (512..2M), every refcount width (1..64), v2 and v3, zlib and zstd
# compression, zero clusters, preallocation=metadata/falloc/full, lazy
# refcounts (also left dirty by a crash), extended L2 with subclusters,
# internal snapshots and backing chains.  For each: the XXH64 of the guest
# content read by qsnap (`qsnap-tool digest`) must equal that of
# `qemu-img convert -O raw`, and `qsnap-tool walk` (read, block status,
# check) must find no corruption and no leak.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_TOOL"

n_images=0

# expect_same IMAGE DESCRIPTION [DIGEST]: qsnap reads what qemu reads.
expect_same()
{
    es_want=${3:-$(qemu_digest "$1")}
    if ! es_got=$("$QSNAP_TOOL" digest "$1" 2>"$T/digest.err"); then
        cat "$T/digest.err" >&2
        die "$2: qsnap-tool digest failed"
    fi
    if [ "$es_got" != "$es_want" ]; then
        rm -f "$T/a.raw" "$T/b.raw"
        "$QEMU_IMG" convert -U -O raw "$1" "$T/a.raw"
        "$QSNAP_TOOL" dump "$1" "$T/b.raw" || true
        cmp "$T/a.raw" "$T/b.raw" | head -1 >&2 || true
        die "$2: qsnap reads $es_got, qemu reads $es_want"
    fi
    if ! "$QSNAP_TOOL" walk "$1" >"$T/walk.out" 2>"$T/walk.err"; then
        cat "$T/walk.err" >&2
        die "$2: qsnap-tool walk failed on a clean image"
    fi
    if ! grep -q ', 0 leaks$' "$T/walk.out"; then
        cat "$T/walk.out" "$T/walk.err" >&2
        die "$2: qsnap's check reports leaks that qemu-img check does not"
    fi
    n_images=$((n_images + 1))
    echo "  ok $2"
}

# ---------------------------------------------------------------- source
# 8 MiB: random data, holes, compressible runs, unaligned pieces.
src="$T/src.raw"
truncate -s 8M "$src"
put_bytes "$src" 0 1048576 1
"$QEMU_IO" -f raw -c "write -P 0x11 2M 512k" -c "write -P 0x22 4M 64k" \
    -c "write -P 0x33 7M 1020k" "$src" >/dev/null
put_bytes "$src" 3146240 1024 2
put_bytes "$src" 5242880 1048576 3
put_bytes "$src" 6291000 777 4
put_bytes "$src" 8384512 4096 5
src_digest=$(digest_of_raw "$src")

img="$T/i.qcow2"

# convert_case DESCRIPTION CONVERT-ARGS...
convert_case()
{
    cc_desc=$1
    shift
    rm -f "$img"
    run_ok "$cc_desc" "$QEMU_IMG" convert -O qcow2 "$@" "$src" "$img"
    qemu_check "$img" "$cc_desc"
    expect_same "$img" "$cc_desc" "$src_digest"
}

note "qemu-img convert: cluster sizes, v2 and v3"
for cs in 512 1024 2048 4096 8192 16384 32768 65536 131072 262144 \
    524288 1048576 2097152; do
    convert_case "v3 cluster_size=$cs" -o "cluster_size=$cs"
done
for cs in 512 4096 65536 2097152; do
    convert_case "v2 cluster_size=$cs" -o "compat=0.10,cluster_size=$cs"
done

note "qemu-img convert: refcount widths"
for rb in 1 2 4 8 16 32 64; do
    convert_case "refcount_bits=$rb cluster_size=4096" \
        -o "cluster_size=4096,refcount_bits=$rb"
    convert_case "refcount_bits=$rb cluster_size=65536" \
        -o "refcount_bits=$rb"
done

note "qemu-img convert -c: zlib and zstd compression"
for cs in 512 4096 65536 2097152; do
    convert_case "zlib v3 cluster_size=$cs" -c \
        -o "cluster_size=$cs,compression_type=zlib"
    convert_case "zstd cluster_size=$cs" -c \
        -o "cluster_size=$cs,compression_type=zstd"
done
convert_case "zlib v2" -c -o "compat=0.10"
convert_case "zstd refcount_bits=1" -c \
    -o "compression_type=zstd,refcount_bits=1,cluster_size=4096"

note "qemu-img convert: extended L2"
for cs in 16384 65536 2097152; do
    convert_case "extended_l2 cluster_size=$cs" \
        -o "extended_l2=on,cluster_size=$cs"
done
convert_case "extended_l2 compressed" -c -o "extended_l2=on"

# ---------------------------------------------------------------- qemu-io
# io_case DESCRIPTION CREATE-OPTIONS SIZE: create, then run the standard
# qemu-io script on it (data, zero writes with and without unmap,
# discards, compressed writes, overwrites of compressed clusters).  QEMU
# writes compressed clusters only where nothing is allocated yet.
io_case()
{
    rm -f "$img"
    run_ok "$1" "$QEMU_IMG" create -q -f qcow2 -o "$2" "$img" "$3"
    cs=$(image_field "$img" cluster-size)
    vsize=$(image_field "$img" virtual-size)
    # Preallocated images have no unallocated cluster to compress into.
    compress=-c
    case $2 in
    *preallocation*) compress= ;;
    esac
    # shellcheck disable=SC2086  # $compress is empty or -c
    run_ok "$1" "$QEMU_IO" \
        -c "write -P 0x41 0 1M" \
        -c "write -P 0x42 1536 1000" \
        -c "write $compress -P 0x43 6M $cs" \
        -c "write $compress -P 0x44 $((5242880 / cs * cs)) $cs" \
        -c "write -P 0x45 $((6291456 + 512)) 512" \
        -c "write -z 64k 128k" \
        -c "write -z -u 512k 256k" \
        -c "discard 300k 50k" \
        -c "write -P 0x46 2M 3M" \
        -c "write -z 2500k 1M" \
        -c "write -z -u 3500k 2000" \
        -c "discard 4M 512k" \
        -c "write -P 0x47 $((vsize - 4096)) 4096" \
        "$img"
    qemu_check "$img" "$1"
    expect_same "$img" "$1"
}

note "qemu-io: zero clusters, discards, compressed writes"
for cs in 512 4096 65536 2097152; do
    io_case "qemu-io v3 cluster_size=$cs" "cluster_size=$cs" 8M
    io_case "qemu-io v2 cluster_size=$cs" "compat=0.10,cluster_size=$cs" 8M
done
io_case "qemu-io zstd" "compression_type=zstd" 8M
io_case "qemu-io refcount_bits=1" "refcount_bits=1,cluster_size=4096" 8M
io_case "qemu-io refcount_bits=64" "refcount_bits=64" 8M
io_case "qemu-io extended_l2 cluster_size=65536" "extended_l2=on" 8M
io_case "qemu-io extended_l2 cluster_size=2M" \
    "extended_l2=on,cluster_size=2M" 8M
io_case "qemu-io lazy_refcounts" "lazy_refcounts=on" 8M
for p in metadata falloc full; do
    io_case "qemu-io preallocation=$p" "preallocation=$p" 8M
    io_case "qemu-io preallocation=$p cluster_size=4096" \
        "preallocation=$p,cluster_size=4096" 8M
done
io_case "qemu-io 1 GiB, 64k clusters" "cluster_size=65536" 1G

# Subclusters: small writes and zeroes inside 64 KiB extended-L2 clusters.
rm -f "$img"
run_ok "extl2" "$QEMU_IMG" create -q -f qcow2 -o extended_l2=on "$img" 4M
run_ok "extl2" "$QEMU_IO" -c "write -P 0x51 4k 4k" -c "write -P 0x52 62k 4k" \
    -c "write -P 0x53 128k 64k" -c "write -z 132k 8k" -c "write -z 1M 2k" \
    -c "discard 160k 2k" -c "write -P 0x54 1500k 100" "$img"
qemu_check "$img"
expect_same "$img" "extended_l2 subcluster writes"

# ---------------------------------------------------------------- dirty
note "lazy refcounts left dirty by a crash"
rm -f "$img"
run_ok "lazy" "$QEMU_IMG" create -q -f qcow2 \
    -o lazy_refcounts=on,cluster_size=4096 "$img" 16M
# No flush before the crash: the refcounts on disk lag behind the L2 tables.
set +e
"$QEMU_IO" -c "write -P 0x61 0 3M" -c "write -c -P 0x62 4M 4k" \
    -c "write -P 0x63 6M 2M" -c "write -z 6500k 100k" -c "abort" \
    "$img" >/dev/null 2>&1
set -e
if "$QEMU_IMG" check -q "$img" >/dev/null 2>&1; then
    note "(qemu-img check finds the crashed image consistent)"
fi
if "$QEMU_IMG" info -U --output=json "$img" |
    grep -q '"dirty-flag": true'; then
    want=$(qemu_digest "$img")
    got=$("$QSNAP_TOOL" digest "$img") || die "digest of a dirty image failed"
    [ "$got" = "$want" ] || die "dirty image: qsnap reads $got, qemu $want"
    if ! "$QSNAP_TOOL" walk --rw "$img" >"$T/walk.out" 2>"$T/walk.err"; then
        cat "$T/walk.err" >&2
        die "read-write open of a dirty image (refcount repair) failed"
    fi
    qemu_check "$img" "dirty image after qsnap's repair"
    got=$("$QSNAP_TOOL" digest "$img")
    [ "$got" = "$want" ] || die "dirty image: content changed by the repair"
    n_images=$((n_images + 1))
    echo "  ok dirty lazy-refcount image read, repaired, unchanged"
else
    die "qemu-io abort did not leave the dirty bit set"
fi

# ---------------------------------------------------------------- snapshots
note "internal snapshots"
rm -f "$img"
run_ok "snap" "$QEMU_IMG" convert -c -O qcow2 "$src" "$img"
run_ok "snap" "$QEMU_IMG" snapshot -c one "$img"
run_ok "snap" "$QEMU_IO" -c "write -P 0x71 0 2M" -c "write -z 5M 1M" \
    -c "discard 7M 512k" "$img"
run_ok "snap" "$QEMU_IMG" snapshot -c two "$img"
run_ok "snap" "$QEMU_IO" -c "write -P 0x72 1M 2M" "$img"
run_ok "snap" "$QEMU_IMG" snapshot -d one "$img"
qemu_check "$img"
expect_same "$img" "active layer of an image with snapshots"

# ---------------------------------------------------------------- backing
note "backing chains"
base="$T/base.qcow2"
mid="$T/mid.qcow2"
rm -f "$base" "$mid" "$img"
run_ok "base" "$QEMU_IMG" convert -O qcow2 -o cluster_size=4096 "$src" "$base"
run_ok "mid" "$QEMU_IMG" create -q -f qcow2 -b "$base" -F qcow2 \
    -o cluster_size=65536 "$mid"
run_ok "mid" "$QEMU_IO" -c "write -P 0x81 100k 300k" -c "write -z 1M 64k" \
    -c "write -z 5M 4k" "$mid"
run_ok "top" "$QEMU_IMG" create -q -f qcow2 -b mid.qcow2 -F qcow2 \
    -o cluster_size=512 "$img"
run_ok "top" "$QEMU_IO" -c "write -P 0x82 120k 10k" -c "discard 2M 64k" \
    -c "write -z 6M 2k" -c "write -c -P 0x83 7M 512" "$img"
expect_same "$mid" "qcow2 over a qcow2 backing file"
expect_same "$img" "three-level chain, mixed cluster sizes"
rm -f "$img"
run_ok "raw base" "$QEMU_IMG" create -q -f qcow2 -b "$src" -F raw "$img"
run_ok "raw base" "$QEMU_IO" -c "write -P 0x84 64k 64k" -c "write -z 1M 4k" \
    "$img"
expect_same "$img" "qcow2 over a raw backing file"
rm -f "$img"
truncate -s 4M "$T/short.raw"
put_bytes "$T/short.raw" 0 4194304 9
run_ok "short base" "$QEMU_IMG" create -q -f qcow2 -b "$T/short.raw" -F raw \
    "$img" 8M
run_ok "short base" "$QEMU_IO" -c "write -P 0x85 3M 2M" "$img"
expect_same "$img" "backing file shorter than the overlay"

echo "$me: $n_images images read identically"
