#!/bin/sh
# mt_stress.sh - a short run of many threads on one qsnap_image handle.
#
# Runs tests/stress/mt_stress for a few seconds with 64 KiB clusters
# (zlib) and with 4 KiB clusters (zstd; there the smallest L2 and refcount
# caches churn), then lets QEMU judge the result: `qemu-img check` on the
# image, and the live disk and every snapshot as qemu-img reads them
# compared with the models the program wrote out.
#
# Environment (set by `make check`; defaults for a run by hand from the
# build directory):
#   top_builddir     build tree (default: the current directory)
#   QEMU_IMG         qemu-img (default: from $PATH)
#   QSNAP_SEED       seed (default: from the date)
#   STRESS_SECONDS   seconds per cluster size (default 3)
#   STRESS_THREADS   worker threads (default 4)
set -eu

me=${0##*/}
: "${top_builddir:=$(pwd)}"
: "${QEMU_IMG:=qemu-img}"
: "${QSNAP_SEED:=$(date +%Y%m%d)}"
: "${STRESS_SECONDS:=3}"
: "${STRESS_THREADS:=4}"
prog=$top_builddir/tests/stress/mt_stress

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

[ -x "$prog" ] || die "$prog not built (run make check)"
command -v "$QEMU_IMG" >/dev/null 2>&1 ||
    die "$QEMU_IMG not found (set QEMU_IMG)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mt_stress.XXXXXX")
# shellcheck disable=SC2317 # called by the trap
cleanup()
{
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

n=0
for conf in 65536:zlib 4096:zstd; do
    n=$((n + 1))
    cs=${conf%%:*}
    dir=$tmp/c$cs
    mkdir "$dir"
    img=$dir/stress.qcow2
    QEMU_IMG=$QEMU_IMG "$prog" -t "$STRESS_THREADS" -s "$STRESS_SECONDS" \
        --cluster-size "$cs" --compression "${conf#*:}" \
        --seed "$((QSNAP_SEED + n))" --dump "$dir" "$img" ||
        die "mt_stress failed with cluster size $cs"

    "$QEMU_IMG" check -f qcow2 "$img" >"$dir/check.out" 2>&1 || {
        cat "$dir/check.out" >&2
        die "qemu-img check failed with cluster size $cs"
    }
    "$QEMU_IMG" compare -q -f qcow2 -F raw "$img" "$dir/live.raw" ||
        die "qemu-img reads the live disk differently (cluster size $cs)"
    found=0
    for model in "$dir"/snap-*.raw; do
        [ -e "$model" ] || continue
        name=${model##*/snap-}
        name=${name%.raw}
        "$QEMU_IMG" convert -f qcow2 -O raw -l "snapshot.name=$name" \
            "$img" "$dir/out.raw" ||
            die "qemu-img cannot read snapshot $name (cluster size $cs)"
        cmp -s "$dir/out.raw" "$model" ||
            die "qemu-img reads snapshot $name differently (cluster size $cs)"
        rm -f "$dir/out.raw"
        found=$((found + 1))
    done
    [ "$found" -ge 2 ] || die "only $found snapshots dumped (cluster size $cs)"
    echo "$me: cluster size $cs: qemu-img agrees on the disk and" \
        "$found snapshots"
    rm -rf "$dir"
done
