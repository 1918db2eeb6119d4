#!/bin/sh
# make-fixtures.sh - regenerate the fixture images and their MANIFEST.
#
#   tests/images/make-fixtures.sh [OUTDIR]
#
# Every fixture is made by qemu-img/qemu-io (see README for the version
# used), is 1-4 MiB virtual, and is stored zstd-compressed (NAME.qcow2.zst)
# when the file is over 64 KiB.  MANIFEST lists the XXH64 of each
# fixture's guest content as qemu-img reads it ("digest  name").  The
# digests are computed with `qsnap-tool hash` (plain XXH64 of a file, set
# QSNAP_TOOL) or xxhsum -H64 when that is installed.
set -eu

out=${1:-$(cd "$(dirname "$0")" && pwd)}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}

die()
{
    echo "make-fixtures: $*" >&2
    exit 1
}

command -v zstd >/dev/null 2>&1 || die "zstd not found"
if command -v xxhsum >/dev/null 2>&1; then
    hash_file()
    {
        xxhsum -H64 "$1" | cut -d' ' -f1
    }
elif [ -n "${QSNAP_TOOL:-}" ] && [ -x "$QSNAP_TOOL" ]; then
    hash_file()
    {
        "$QSNAP_TOOL" hash "$1"
    }
else
    die "need xxhsum or QSNAP_TOOL=path/to/tests/qsnap-tool"
fi

w=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-fixtures.XXXXXX")
trap 'rm -rf "$w"' EXIT

img()
{
    "$QEMU_IMG" "$@" >/dev/null
}

io()
{
    "$QEMU_IO" "$@" >/dev/null
}

# pattern FILE SIZE [FORMAT]: a common guest layout: runs of different
# bytes, a partial sector, data in the last cluster.
pattern()
{
    io -f "${3:-qcow2}" -c "write -P 0x11 0 64k" -c "write -P 0x22 64k 3k" \
        -c "write -P 0x33 200k 100k" -c "write -P 0x44 300001 999" \
        -c "write -P 0x55 $(($2 - 4096)) 4096" "$1"
}

cd "$w"

img create -f qcow2 -o compat=0.10 v2.qcow2 1M
pattern v2.qcow2 1048576

img create -f qcow2 v3.qcow2 1M
pattern v3.qcow2 1048576

img create -f raw plain.raw 1M
pattern plain.raw 1048576 raw
io -f raw -c "write -P 0x66 512k 256k" plain.raw
img convert -c -O qcow2 -o compression_type=zlib plain.raw zlib.qcow2
img convert -c -O qcow2 -o compression_type=zstd plain.raw zstd.qcow2
rm plain.raw

img create -f qcow2 -o cluster_size=512 cluster-512.qcow2 1M
pattern cluster-512.qcow2 1048576

img create -f qcow2 -o cluster_size=2M cluster-2m.qcow2 4M
pattern cluster-2m.qcow2 4194304

img create -f qcow2 -o refcount_bits=1,cluster_size=4096 refcount-1.qcow2 1M
pattern refcount-1.qcow2 1048576

img create -f qcow2 -o refcount_bits=64,cluster_size=4096 refcount-64.qcow2 1M
pattern refcount-64.qcow2 1048576

# Zero clusters: preallocated ("zero, offset kept") and plain.
img create -f qcow2 -o cluster_size=4096 zero-clusters.qcow2 1M
pattern zero-clusters.qcow2 1048576
io -c "write -z 8k 16k" -c "write -z -u 200k 40k" -c "write -z 500k 64k" \
    -c "write -z 2k 1k" zero-clusters.qcow2

# Internal snapshots, with writes between them.
img create -f qcow2 -o cluster_size=4096 snapshots.qcow2 1M
pattern snapshots.qcow2 1048576
img snapshot -c first snapshots.qcow2
io -c "write -P 0x77 0 8k" -c "write -z 200k 8k" snapshots.qcow2
img snapshot -c second snapshots.qcow2
io -c "write -P 0x88 4k 8k" snapshots.qcow2

# Lazy refcounts, crashed without a flush: the dirty bit stays set.
img create -f qcow2 -o lazy_refcounts=on,cluster_size=4096 lazy-dirty.qcow2 1M
"$QEMU_IO" -c "write -P 0x99 0 100k" -c "write -P 0x9a 600k 100k" \
    -c abort lazy-dirty.qcow2 >/dev/null 2>&1 || true
"$QEMU_IMG" info --output=json lazy-dirty.qcow2 |
    grep -q '"dirty-flag": true' || die "lazy-dirty.qcow2 is not dirty"

# Extended L2 entries with subcluster writes and zeroes.
img create -f qcow2 -o extended_l2=on,cluster_size=64k extended-l2.qcow2 1M
io -c "write -P 0xa1 4k 4k" -c "write -P 0xa2 62k 4k" \
    -c "write -P 0xa3 128k 64k" -c "write -z 132k 8k" \
    -c "write -P 0xa4 1000000 100" extended-l2.qcow2

# A backing chain: overlay.qcow2 -> base.qcow2 (relative name).
img create -f qcow2 -o cluster_size=4096 base.qcow2 1M
pattern base.qcow2 1048576
img create -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=4096 overlay.qcow2
io -c "write -P 0xb1 60k 8k" -c "write -z 210k 4k" overlay.qcow2

# Digests of the guest content as qemu-img reads it (all of them first:
# overlay.qcow2 needs base.qcow2), then compress the large files.
: >MANIFEST.new
for f in *.qcow2; do
    rm -f guest.raw
    "$QEMU_IMG" convert -U -O raw "$f" guest.raw
    printf '%s %s\n' "$(hash_file guest.raw)" "$f" >>digests
done
rm -f guest.raw
while read -r d f; do
    name=$f
    if [ "$(stat -c %s "$f")" -gt 65536 ]; then
        zstd -q -19 --rm "$f"
        name=$f.zst
    fi
    printf '%s  %s\n' "$d" "$name" >>MANIFEST.new
done <digests

rm -f "$out"/*.qcow2 "$out"/*.qcow2.zst
mv ./*.qcow2* "$out"/
mv MANIFEST.new "$out/MANIFEST"
echo "make-fixtures: wrote $(wc -l <"$out/MANIFEST") fixtures to $out"
