#!/bin/sh
# bench/chain_bench.sh - commit and safe rebase against qemu-img.
#
# Images (qcow2, 64 KiB clusters, in $BENCH_TMPDIR, default /tmp):
#   a.qcow2   4 GiB base, 512 MiB of data in eight 64 MiB regions
#   b.qcow2   a copy of a.qcow2 with part of its content different: two
#             regions rewritten, halves of two more, 128 MiB of new data
#             where a.qcow2 has none
#   o.qcow2   overlay on a.qcow2: 1 GiB of 64 KiB writes at random
#             cluster-aligned offsets (same seed every run)
# Measured, on fresh copies of the same images in one run:
#   commit    qsnap-img commit o.qcow2  vs  qemu-img commit o.qcow2
#   rebase    qsnap-img rebase -b b.qcow2 -F qcow2 o.qcow2  vs
#             qemu-img rebase -b b.qcow2 -F qcow2 o.qcow2 (safe mode)
# Each figure is the median of BENCH_REPS (3) timed runs; the two tools
# alternate and the one going first changes every round, with a sync
# before each run, so neither profits more from the page cache.  After
# the first round the results of the two tools are compared with
# qemu-img compare (the work must be the same).  Target: ratio
# (qemu-img time / qsnap time) at least 1.0.
#
# If qsnap-img has no commit or rebase command yet, the library call is
# timed through tests/chain-driver instead (said in the output).
#
# Run by hand from a build directory:
#   QSNAP_BUILDDIR=/path/to/build sh /path/to/src/bench/chain_bench.sh
# Environment: QSNAP_BUILDDIR, QSNAP_IMG, QSNAP_CHAIN_DRIVER, QEMU_IMG,
# QEMU_IO, BENCH_REPS, BENCH_TMPDIR, CHAIN_BENCH_SIZE (base size, default
# 4G), CHAIN_BENCH_WRITES (number of 64 KiB writes, default 16384).
set -eu

QSNAP_BUILDDIR=${QSNAP_BUILDDIR:-${top_builddir:-$(pwd)}}
QSNAP_IMG=${QSNAP_IMG:-$QSNAP_BUILDDIR/qsnap-img/qsnap-img}
QSNAP_CHAIN_DRIVER=${QSNAP_CHAIN_DRIVER:-$QSNAP_BUILDDIR/tests/chain-driver}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
BENCH_REPS=${BENCH_REPS:-3}
SIZE=${CHAIN_BENCH_SIZE:-4G}
WRITES=${CHAIN_BENCH_WRITES:-16384}

say()
{
    printf '%s\n' "$*" >&2
}

die()
{
    say "chain_bench.sh: $*"
    exit 1
}

[ -x "$QSNAP_IMG" ] || die "$QSNAP_IMG is missing (run make first)"
command -v "$QEMU_IMG" >/dev/null 2>&1 || die "$QEMU_IMG not found"
command -v "$QEMU_IO" >/dev/null 2>&1 || die "$QEMU_IO not found"

# qsnap-img's chain commands, or the library through the chain driver.
has_cmd()
{
    "$QSNAP_IMG" --help 2>/dev/null | grep -q "^  $1 "
}
need_driver()
{
    if [ ! -x "$QSNAP_CHAIN_DRIVER" ]; then
        make -C "$QSNAP_BUILDDIR" tests/chain-driver >/dev/null ||
            die "cannot build tests/chain-driver in $QSNAP_BUILDDIR"
    fi
}
if has_cmd commit; then
    commit_tool="qsnap-img commit"
else
    need_driver
    commit_tool="qsnap_commit (chain-driver; qsnap-img has no commit yet)"
fi
if has_cmd rebase; then
    rebase_tool="qsnap-img rebase"
else
    need_driver
    rebase_tool="qsnap_rebase (chain-driver; qsnap-img has no rebase yet)"
fi

tmp=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/qsnap-chainbench.XXXXXX")
# shellcheck disable=SC2317 # called by the trap
cleanup()
{
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now()
{
    date +%s.%N
}

elapsed()
{
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'
}

median()
{
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR % 2) { printf "%.3f", v[(NR + 1) / 2] }
            else { printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }
        }'
}

# timed CMD...: runs CMD after a sync; its wall time in $secs.
timed()
{
    sync
    t0=$(now)
    if ! "$@" >"$tmp/out" 2>&1; then
        sed 's/^/    /' "$tmp/out" >&2
        die "failed: $*"
    fi
    t1=$(now)
    secs=$(elapsed "$t0" "$t1")
}

qio_script()
{
    "$QEMU_IO" "$1" >"$tmp/qio.out" 2>&1 || {
        tail -n 5 "$tmp/qio.out" >&2
        die "qemu-io $1 failed"
    }
}

# ------------------------------------------------------------ images

say "chain_bench.sh: building the images in $tmp (base $SIZE," \
    "$WRITES writes of 64 KiB)"
t0=$(now)
cd "$tmp"
"$QEMU_IMG" create -q -f qcow2 a.qcow2 "$SIZE"
size=$("$QEMU_IMG" info --output=json a.qcow2 |
    sed -n 's/^    "virtual-size": \([0-9]*\).*/\1/p')
region=$((size / 8))
# Eight 64 MiB regions of data, one at the start of each eighth.
i=0
while [ "$i" -lt 8 ]; do
    echo "write -P $((i + 1)) $((i * region)) 64M"
    i=$((i + 1))
done | qio_script a.qcow2
cp a.qcow2 b.qcow2
{
    echo "write -P 101 0 64M"
    echo "write -P 102 $((3 * region)) 64M"
    echo "write -P 103 $((5 * region + 33554432)) 32M"
    echo "write -P 104 $((6 * region + 33554432)) 32M"
    echo "write -P 105 $((7 * region - 134217728)) 128M"
} | qio_script b.qcow2
"$QEMU_IMG" create -q -f qcow2 -b a.qcow2 -F qcow2 o.qcow2
awk -v n="$WRITES" -v clusters=$((size / 65536)) 'BEGIN {
        srand(20240601)
        for (i = 0; i < n; i++) {
            printf "write -P %d %.0f 64k\n", 1 + int(rand() * 250),
                int(rand() * clusters) * 65536
        }
    }' | qio_script o.qcow2
say "  built in $(elapsed "$t0" "$(now)") s:" \
    "$(du -h a.qcow2 b.qcow2 o.qcow2 | awk '{ printf "%s %s  ", $2, $1 }')"

# fresh DIR: copies of o.qcow2 (and, for a commit, a.qcow2) in DIR; the
# bases a rebase only reads are links.
fresh()
{
    rm -rf "$1"
    mkdir -p "$1"
    cp o.qcow2 "$1/o.qcow2"
    if [ "$2" = commit ]; then
        cp a.qcow2 "$1/a.qcow2"
    else
        ln -s "$tmp/a.qcow2" "$1/a.qcow2"
    fi
    ln -s "$tmp/b.qcow2" "$1/b.qcow2"
}

qsnap_commit()
{
    if has_cmd commit; then
        "$QSNAP_IMG" commit -q "$1/o.qcow2"
    else
        "$QSNAP_CHAIN_DRIVER" commit "$1/o.qcow2"
    fi
}

qsnap_rebase()
{
    if has_cmd rebase; then
        "$QSNAP_IMG" rebase -q -b b.qcow2 -F qcow2 "$1/o.qcow2"
    else
        "$QSNAP_CHAIN_DRIVER" rebase -F qcow2 "$1/o.qcow2" b.qcow2
    fi
}

qemu_commit()
{
    "$QEMU_IMG" commit -q "$1/o.qcow2"
}

qemu_rebase()
{
    "$QEMU_IMG" rebase -q -b b.qcow2 -F qcow2 "$1/o.qcow2"
}

# bench OP: BENCH_REPS rounds of both tools, alternating.
bench()
{
    b_q=
    b_r=
    rep=1
    while [ "$rep" -le "$BENCH_REPS" ]; do
        if [ $((rep % 2)) = 1 ]; then
            order="qsnap qemu"
        else
            order="qemu qsnap"
        fi
        for tool in $order; do
            fresh "$tmp/$tool" "$1"
            timed "${tool}_$1" "$tmp/$tool"
            if [ "$tool" = qsnap ]; then
                b_q="$b_q $secs"
            else
                b_r="$b_r $secs"
            fi
            say "  $1 round $rep: $tool $secs s"
        done
        if [ "$rep" = 1 ]; then
            # The same result from both tools.
            if [ "$1" = commit ]; then
                cmp_a="$tmp/qsnap/a.qcow2"
                cmp_b="$tmp/qemu/a.qcow2"
            else
                cmp_a="$tmp/qsnap/o.qcow2"
                cmp_b="$tmp/qemu/o.qcow2"
            fi
            "$QEMU_IMG" compare -q "$cmp_a" "$cmp_b" ||
                die "$1: qsnap's and qemu-img's results differ"
            "$QEMU_IMG" check -q "$cmp_a" ||
                die "$1: qemu-img check of qsnap's result failed"
        fi
        rep=$((rep + 1))
    done
    # shellcheck disable=SC2086 # lists of numbers
    med_q=$(median $b_q)
    # shellcheck disable=SC2086 # lists of numbers
    med_r=$(median $b_r)
    ratio=$(awk -v q="$med_q" -v r="$med_r" 'BEGIN {
        if (q > 0) { printf "%.2f", r / q } else { print "-" } }')
    verdict=$(awk -v x="$ratio" 'BEGIN { print (x >= 1.0) ? "met" : "MISSED" }')
    printf '%-10s %10s s %10s s %7sx  %s\n' "$1" "$med_q" "$med_r" "$ratio" \
        "$verdict" >>"$tmp/table"
}

say "commit: $commit_tool"
bench commit
say "rebase: $rebase_tool"
bench rebase

printf '\nchain operations, median of %s (base %s, %s x 64 KiB writes)\n' \
    "$BENCH_REPS" "$SIZE" "$WRITES"
printf '%-10s %12s %12s %8s  %s\n' "" "qsnap" "qemu-img" "ratio" \
    "target >= 1.0"
cat "$tmp/table"
printf 'commit: %s; rebase: %s\n' "$commit_tool" "$rebase_tool"
