#!/bin/sh
# bench/run.sh - qsnap against QEMU's tools, measured in the same run.
#
# Run with "make bench", or by hand from a build directory:
#   QSNAP_BUILDDIR=/path/to/build sh /path/to/src/bench/run.sh
#
# Environment:
#   QSNAP_IMG       qsnap-img (default $QSNAP_BUILDDIR/qsnap-img/qsnap-img)
#   QSNAP_BUILDDIR  the build directory (libqsnap in its .libs/)
#   QEMU_IMG        qemu-img (default: from $PATH)
#   CC              compiler for the helpers in bench/*.c (default cc)
#   BENCH_SCALE     multiplies image sizes and request counts (default 1;
#                   0.25 for a quick run, 2 for a longer one)
#   BENCH_REPS      timed repetitions per measurement (default 3; the
#                   snapshot workload uses BENCH_REPS + 2)
#   BENCH_ONLY      workloads to run, any of "A B C D" (default all)
#   BENCH_TMPDIR    where the scratch directory goes (default /tmp)
#
# Every figure is the median of BENCH_REPS runs after one untimed warm-up,
# the two programs alternating (which one goes first flips every round),
# with a sync before each timed run.  Exits 0 unless a program failed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

srcdir=${srcdir:-$here/..}
if [ -z "${QSNAP_BUILDDIR:-}" ]; then
    if [ -n "${QSNAP_IMG:-}" ]; then
        QSNAP_BUILDDIR=$(cd "$(dirname "$QSNAP_IMG")/.." && pwd)
    else
        QSNAP_BUILDDIR=${top_builddir:-$(pwd)}
    fi
fi
QSNAP_IMG=${QSNAP_IMG:-$QSNAP_BUILDDIR/qsnap-img/qsnap-img}
QEMU_IMG=${QEMU_IMG:-qemu-img}
CC=${CC:-cc}
BENCH_SCALE=${BENCH_SCALE:-1}
BENCH_REPS=${BENCH_REPS:-3}
BENCH_ONLY=${BENCH_ONLY:-A B C D}
libdir=$QSNAP_BUILDDIR/.libs

if [ ! -e "$libdir/libqsnap.so" ]; then
    say "run.sh: no libqsnap.so in $libdir (set QSNAP_BUILDDIR)"
    exit 1
fi
if [ ! -x "$QSNAP_IMG" ]; then
    say "run.sh: $QSNAP_IMG is missing (run make first)"
    exit 1
fi
if ! command -v "$QEMU_IMG" >/dev/null 2>&1; then
    say "run.sh: $QEMU_IMG not found (set QEMU_IMG)"
    exit 1
fi

# Time the program itself, not libtool's wrapper script around it.
qsnap_img=$QSNAP_IMG
qi_dir=$(dirname "$QSNAP_IMG")
qi_base=$(basename "$QSNAP_IMG")
if [ "$(head -c 2 "$QSNAP_IMG")" = "#!" ]; then
    for qi_cand in "$qi_dir/.libs/$qi_base" "$qi_dir/.libs/lt-$qi_base"; do
        if [ -x "$qi_cand" ]; then
            qsnap_img=$qi_cand
            break
        fi
    done
fi
LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH

tmp=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/qsnap-bench.XXXXXX")
# shellcheck disable=SC2317 # called by the trap
cleanup()
{
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
results=$tmp/results
: >"$results"
notes=$tmp/notes
: >"$notes"

note()
{
    printf '%s\n' "$*" >>"$notes"
}

build_helper()
{
    "$CC" -O2 -std=gnu11 -I"$srcdir/include" -o "$tmp/$1" \
        "$here/$1.c" -L"$libdir" -lqsnap -Wl,-rpath,"$libdir"
}
for h in timeit mkdata rawread snapbench vmsavebench; do
    if ! build_helper "$h"; then
        say "run.sh: cannot build bench/$h.c"
        exit 1
    fi
done

# order ROUND X Y: "X Y" in odd rounds, "Y X" in even ones.
order()
{
    if [ $(($1 % 2)) -eq 1 ]; then
        echo "$2 $3"
    else
        echo "$3 $2"
    fi
}

timeit=$tmp/timeit

wanted()
{
    case " $BENCH_ONLY " in
    *" $1 "*) return 0 ;;
    *) return 1 ;;
    esac
}

# ------------------------------------------------------------------ A
# prep_cache MODE FILE: "hot" reads FILE into the page cache, "cold"
# writes it back and drops it from the cache, "-" leaves it alone.
prep_cache()
{
    case $1 in
    hot)
        cat "$2" >/dev/null
        ;;
    cold)
        sync
        dd if="$2" iflag=nocache count=0 status=none
        ;;
    esac
}

# pair_bench LABEL COUNT FRESH CACHE OPTION...: "bench -c COUNT OPTION..."
# with qemu-img on $tmp/a-q.qcow2 and qsnap-img on $tmp/a-s.qcow2.
# FRESH=1 gives every run new copies of the empty image instead; CACHE
# (see prep_cache) is applied to the image before every run.
pair_bench()
{
    pb_label=$1
    pb_count=$2
    pb_fresh=$3
    pb_cache=$4
    shift 4
    pb_q=$tmp/a-q.qcow2
    pb_s=$tmp/a-s.qcow2
    if [ "$pb_fresh" = 1 ]; then
        pb_q=$tmp/a-qe.qcow2
        pb_s=$tmp/a-se.qcow2
    fi
    pb_warm=$((pb_count / 5 + 1))
    pb_tq=
    pb_ts=
    pb_i=0
    while [ "$pb_i" -le "$BENCH_REPS" ]; do
        if [ "$pb_fresh" = 1 ]; then
            cp "$tmp/a-empty.qcow2" "$pb_q"
            cp "$tmp/a-empty.qcow2" "$pb_s"
        fi
        pb_c=$pb_count
        if [ "$pb_i" -eq 0 ]; then
            pb_c=$pb_warm
        fi
        for pb_who in $(order "$pb_i" q s); do
            if [ "$pb_who" = q ]; then
                prep_cache "$pb_cache" "$pb_q"
                bench_cmd "$QEMU_IMG" bench -f qcow2 -c "$pb_c" "$@" "$pb_q"
                if [ "$pb_i" -gt 0 ]; then
                    pb_tq="$pb_tq $T"
                fi
            else
                prep_cache "$pb_cache" "$pb_s"
                bench_cmd "$qsnap_img" bench -f qcow2 -c "$pb_c" "$@" "$pb_s"
                if [ "$pb_i" -gt 0 ]; then
                    pb_ts="$pb_ts $T"
                fi
            fi
        done
        pb_i=$((pb_i + 1))
    done
    # shellcheck disable=SC2086 # word splitting of the lists is intended
    add_row "A. qemu-img bench vs qsnap-img bench (run time, same options)" \
        qemu-img "$pb_label" "$(median $pb_ts)" "$(median $pb_tq)" time ""
}

workload_a()
{
    a_size=$(scaled 1073741824 67108864)
    a_n1m=$((a_size / 1048576))
    a_step=$(scatter_step "$a_size" 4096)
    say "== A: bench, ${a_n1m} MiB images, 4 KiB step $a_step bytes"
    note "A: images of $a_n1m MiB made by qemu-img (64 KiB clusters); the" \
        "full one written sequentially by qemu-img bench -w -s 1M; 4k" \
        "'rand' = -s 4k -S $a_step (scattered pages); alloc = fresh" \
        "copies of an empty image for every run; -t writeback runs start" \
        "with the image in the page cache for reads and out of it for" \
        "writes (4 KiB writes into large cached folios make the kernel's" \
        "dirty-page throttling dominate both tools)"
    run_cmd "$QEMU_IMG" create -q -f qcow2 "$tmp/a-full.qcow2" "$a_size"
    run_cmd "$QEMU_IMG" bench -f qcow2 -w -t none -d 16 -s 1M \
        -c "$a_n1m" --pattern=90 "$tmp/a-full.qcow2"
    run_cmd "$QEMU_IMG" create -q -f qcow2 "$tmp/a-empty.qcow2" "$a_size"
    cp "$tmp/a-full.qcow2" "$tmp/a-q.qcow2"
    mv "$tmp/a-full.qcow2" "$tmp/a-s.qcow2"
    cat "$tmp/a-q.qcow2" "$tmp/a-s.qcow2" >/dev/null

    a_clusters=$((a_size / 65536))
    a_alloc=$(scaled_count 4096)
    if [ "$a_alloc" -gt $((a_clusters / 4)) ]; then
        a_alloc=$((a_clusters / 4))
    fi
    for a_t in none writeback; do
        if [ "$a_t" = none ]; then
            a_rand=$(scaled_count 5000)
            a_seqr=$((a_n1m * 2))
            a_rd=-
            a_wr=-
        else
            a_rand=$(scaled_count 50000)
            a_seqr=$((a_n1m * 4))
            a_rd=hot
            a_wr=cold
        fi
        for a_d in 1 16; do
            a_opt="-t $a_t -d $a_d"
            # shellcheck disable=SC2086 # a_opt holds several options
            pair_bench "4k rand read  $a_opt (x$a_rand)" "$a_rand" 0 \
                "$a_rd" $a_opt -s 4k -S "$a_step"
            # shellcheck disable=SC2086
            pair_bench "4k rand write $a_opt (x$a_rand)" "$a_rand" 0 \
                "$a_wr" $a_opt -w -s 4k -S "$a_step" --pattern=165
            # shellcheck disable=SC2086
            pair_bench "4k rand alloc write $a_opt (x$a_alloc)" \
                "$a_alloc" 1 - $a_opt -w -s 4k -S "$a_step" --pattern=165
            # shellcheck disable=SC2086
            pair_bench "1M seq read  $a_opt (x$a_seqr)" "$a_seqr" 0 \
                "$a_rd" $a_opt -s 1M
            # shellcheck disable=SC2086
            pair_bench "1M seq write $a_opt (x$a_n1m)" "$a_n1m" 0 \
                "$a_wr" $a_opt -w -s 1M --pattern=165
        done
    done
    rm -f "$tmp/a-qe.qcow2" "$tmp/a-se.qcow2" "$tmp/a-empty.qcow2"

    rm -f "$tmp/a-q.qcow2" "$tmp/a-s.qcow2"

    # Sequential read of a qcow2 image against pread() of a raw file.  Both
    # are new, written the same way (O_DIRECT 1 MiB writes of the same
    # bytes) and then read into the page cache the same way, so they start
    # from the same page cache state (the images above have been rewritten
    # through the cache in 4 KiB pieces, which makes later reads slower).
    say "== A: sequential read, qcow2 through qsnap-img vs raw pread"
    for a_fmt in qcow2 raw; do
        run_cmd "$QEMU_IMG" create -q -f "$a_fmt" "$tmp/a2.$a_fmt" "$a_size"
        run_cmd "$QEMU_IMG" bench -f "$a_fmt" -w -t none -d 16 -s 1M \
            -c "$a_n1m" --pattern=90 "$tmp/a2.$a_fmt"
    done
    cat "$tmp/a2.raw" "$tmp/a2.qcow2" >/dev/null
    a_count=$((a_n1m * 4))
    a_tq=
    a_tr=
    a_cq=
    a_cr=
    a_reps=$((BENCH_REPS + 2))
    a_i=0
    while [ "$a_i" -le "$a_reps" ]; do
        for a_who in $(order "$a_i" r s); do
            if [ "$a_who" = r ]; then
                bench_cmd "$tmp/rawread" "$tmp/a2.raw" 1048576 "$a_count"
                if [ "$a_i" -gt 0 ]; then
                    a_tr="$a_tr $T"
                    a_cr="$a_cr $CPU"
                fi
            else
                bench_cmd "$qsnap_img" bench -f qcow2 -t writeback -d 1 \
                    -s 1M -c "$a_count" "$tmp/a2.qcow2"
                if [ "$a_i" -gt 0 ]; then
                    a_tq="$a_tq $T"
                    a_cq="$a_cq $CPU"
                fi
            fi
        done
        a_i=$((a_i + 1))
    done
    # shellcheck disable=SC2086
    a_sec="A2. sequential read, hot page cache: qcow2 via qsnap-img bench"
    a_sec="$a_sec vs raw file via pread (median of $a_reps)"
    # shellcheck disable=SC2086
    add_row "$a_sec" "raw pread" \
        "1M seq read -t writeback -d 1 (x$a_count)" \
        "$(median $a_tq)" "$(median $a_tr)" time ">=0.9"
    # shellcheck disable=SC2086
    add_row "$a_sec" "raw pread" "  CPU time (user+sys, whole process)" \
        "$(median $a_cq)" "$(median $a_cr)" time ""
    rm -f "$tmp/a2.raw" "$tmp/a2.qcow2"
}

# ------------------------------------------------------------------ B
workload_b()
{
    b_size=$(scaled 2147483648 67108864)
    say "== B: convert -c of a $((b_size / 1048576)) MiB raw image"
    run_cmd "$tmp/mkdata" "$b_size" "$tmp/b.raw"
    note "B: source: $((b_size / 1048576)) MiB raw made by bench/mkdata.c" \
        "(64 KiB pieces: ~30% zeros, ~45% log text, ~25% random);" \
        "warm-up = reading it into the page cache"
    cat "$tmp/b.raw" >/dev/null
    for b_type in zlib zstd; do
        b_tq=
        b_ts=
        b_cq=
        b_cs=
        b_sq=
        b_ss=
        b_i=1
        while [ "$b_i" -le "$BENCH_REPS" ]; do
            for b_who in $(order "$b_i" q s); do
                b_out=$tmp/b-$b_who.qcow2
                if [ "$b_who" = q ]; then
                    time_cmd "$QEMU_IMG" convert -c -f raw -O qcow2 \
                        -o compression_type="$b_type" "$tmp/b.raw" "$b_out"
                    b_tq="$b_tq $T"
                    b_cq="$b_cq $CPU"
                else
                    time_cmd "$qsnap_img" convert -c -f raw -O qcow2 \
                        -o compression_type="$b_type" "$tmp/b.raw" "$b_out"
                    b_ts="$b_ts $T"
                    b_cs="$b_cs $CPU"
                fi
                b_sz=FAIL
                if [ "$T" != FAIL ]; then
                    b_sz=$(stat -c %s "$b_out")
                fi
                if [ "$b_who" = q ]; then
                    b_sq="$b_sq $b_sz"
                else
                    b_ss="$b_ss $b_sz"
                fi
                rm -f "$b_out"
            done
            b_i=$((b_i + 1))
        done
        # shellcheck disable=SC2086
        b_mq=$(median $b_sq)
        # shellcheck disable=SC2086
        add_row "B. convert -c -O qcow2 of a semi-compressible raw image" \
            qemu-img "convert -c $b_type: time" "$(median $b_ts)" \
            "$(median $b_tq)" time ">=1.5"
        # shellcheck disable=SC2086
        add_row "B. convert -c -O qcow2 of a semi-compressible raw image" \
            qemu-img "convert -c $b_type: CPU time (user+sys)" \
            "$(median $b_cs)" "$(median $b_cq)" time ""
        # shellcheck disable=SC2086
        add_row "B. convert -c -O qcow2 of a semi-compressible raw image" \
            qemu-img "convert -c $b_type: output file size" \
            "$(median $b_ss)" "$b_mq" size "~0.01"
        if [ "$b_mq" != FAIL ]; then
            note "B: $b_type: qemu-img's output is" \
                "$(awk -v a="$b_size" -v b="$b_mq" \
                    'BEGIN { printf "%.2f", a / b }')x smaller than the source"
        fi
    done
    rm -f "$tmp/b.raw"
}

# ------------------------------------------------------------------ C
workload_c()
{
    c_vsize=$(scaled 17179869184 268435456)
    c_wsize=$((c_vsize / 4))
    c_reps=$((BENCH_REPS + 2))
    say "== C: snapshots of a $((c_vsize / 1048576)) MiB image with" \
        "$((c_wsize / 1048576)) MiB written"
    run_cmd "$QEMU_IMG" create -q -f qcow2 -o cluster_size=64k \
        "$tmp/c-q.qcow2" "$c_vsize"
    run_cmd "$QEMU_IMG" bench -f qcow2 -w -t none -d 16 -s 64k -S 256k \
        -c $((c_wsize / 65536)) --pattern=165 "$tmp/c-q.qcow2"
    cp "$tmp/c-q.qcow2" "$tmp/c-s.qcow2"
    c_prog=$tmp/snapbench
    if "$qsnap_img" snapshot -l "$tmp/c-s.qcow2" >/dev/null 2>&1; then
        c_prog=$qsnap_img
        note "C: qsnap side: qsnap-img snapshot -c/-d"
    else
        note "C: qsnap side: bench/snapbench.c (qsnap_snapshot_create/" \
            "delete; qsnap-img has no snapshot command yet)"
    fi
    note "C: one image written by qemu-img bench -w -s 64k -S 256k, copied" \
        "once per tool; the existing snapshots are added to both copies" \
        "with qemu-img (same operations, so the copies stay identical);" \
        "times are whole process runs; medians of $c_reps"
    c_have=0
    for c_n in 1 10 100; do
        while [ "$c_have" -lt "$c_n" ]; do
            run_cmd "$QEMU_IMG" snapshot -c "old$c_have" "$tmp/c-q.qcow2"
            run_cmd "$QEMU_IMG" snapshot -c "old$c_have" "$tmp/c-s.qcow2"
            c_have=$((c_have + 1))
        done
        say "   $c_n existing snapshot(s)"
        c_cq=
        c_cs=
        c_dq=
        c_ds=
        c_i=0
        while [ "$c_i" -le "$c_reps" ]; do
            for c_who in $(order "$c_i" q s); do
                if [ "$c_who" = q ]; then
                    time_cmd "$QEMU_IMG" snapshot -c bench "$tmp/c-q.qcow2"
                    c_tc=$T
                    time_cmd "$QEMU_IMG" snapshot -d bench "$tmp/c-q.qcow2"
                    c_td=$T
                    if [ "$c_i" -gt 0 ]; then
                        c_cq="$c_cq $c_tc"
                        c_dq="$c_dq $c_td"
                    fi
                else
                    time_cmd "$c_prog" snapshot -c bench "$tmp/c-s.qcow2"
                    c_tc=$T
                    time_cmd "$c_prog" snapshot -d bench "$tmp/c-s.qcow2"
                    c_td=$T
                    if [ "$c_i" -gt 0 ]; then
                        c_cs="$c_cs $c_tc"
                        c_ds="$c_ds $c_td"
                    fi
                fi
            done
            c_i=$((c_i + 1))
        done
        # shellcheck disable=SC2086
        add_row "C. internal snapshots (whole command run time)" qemu-img \
            "snapshot -c, $c_n existing" "$(median $c_cs)" \
            "$(median $c_cq)" time ">=1.0"
        # shellcheck disable=SC2086
        add_row "C. internal snapshots (whole command run time)" qemu-img \
            "snapshot -d, $c_n existing" "$(median $c_ds)" \
            "$(median $c_dq)" time ">=1.0"
    done
    if ! run_cmd "$QEMU_IMG" check -q "$tmp/c-s.qcow2"; then
        say "C: qemu-img check found problems in the qsnap copy"
    fi
    rm -f "$tmp/c-q.qcow2" "$tmp/c-s.qcow2"
}

# ------------------------------------------------------------------ D
# vmsave MODE SIZE: one vmsavebench run; sets T, CPU, D_STATE, D_DISK.
vmsave()
{
    rm -f "$tmp/d.qcow2"
    if run_cmd "$tmp/vmsavebench" "$1" "$tmp/d.qcow2" "$2"; then
        T=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' "$tmp/out")
        CPU=$(sed -n 's/.*cpu=\([0-9.]*\).*/\1/p' "$tmp/out")
        D_STATE=$(sed -n 's/.*vm_state_size=\([0-9]*\).*/\1/p' "$tmp/out")
        D_DISK=$(sed -n 's/.*disk_usage=\([0-9]*\).*/\1/p' "$tmp/out")
    else
        T=FAIL
        CPU=FAIL
        D_STATE=FAIL
        D_DISK=FAIL
    fi
    rm -f "$tmp/d.qcow2"
}

workload_d()
{
    d_size=$(scaled 2147483648 67108864)
    say "== D: saving $((d_size / 1048576)) MiB of VM memory"
    note "D: bench/vmsavebench.c: ~50% zero pages in runs of 1..512" \
        "pages, data pages from text/struct/random templates; time from" \
        "checkpoint_begin to qsnap_flush after commit, 1 MiB writes;" \
        "raw direct: the raw stream through a QSNAP_OPEN_NOCACHE handle;" \
        "warm-up: one 256 MiB run of each"
    vmsave sections 268435456
    vmsave raw 268435456
    vmsave raw-direct 268435456
    d_ts=
    d_tr=
    d_td=
    d_cs=
    d_cr=
    d_cd=
    d_i=1
    while [ "$d_i" -le "$BENCH_REPS" ]; do
        for d_mode in $(order "$d_i" "sections raw" raw-direct); do
            vmsave "$d_mode" "$d_size"
            case $d_mode in
            sections)
                d_ts="$d_ts $T"
                d_cs="$d_cs $CPU"
                d_ss=$D_STATE
                d_ds=$D_DISK
                ;;
            raw)
                d_tr="$d_tr $T"
                d_cr="$d_cr $CPU"
                d_sr=$D_STATE
                d_dr=$D_DISK
                ;;
            raw-direct)
                d_td="$d_td $T"
                d_cd="$d_cd $CPU"
                ;;
            esac
        done
        d_i=$((d_i + 1))
    done
    d_sec="D. VM state save: section container vs raw stream (same library)"
    # shellcheck disable=SC2086
    add_row "$d_sec" "raw stream" "save $((d_size / 1048576)) MiB: time" \
        "$(median $d_ts)" "$(median $d_tr)" time ">=2.0"
    # shellcheck disable=SC2086
    add_row "$d_sec" "raw stream" "  CPU time of the save (user+sys)" \
        "$(median $d_cs)" "$(median $d_cr)" time ""
    add_row "$d_sec" "raw stream" "VM state size (vm_state_size)" \
        "$d_ss" "$d_sr" size ""
    add_row "$d_sec" "raw stream" "image file disk usage" "$d_ds" "$d_dr" \
        size ""
    # The container's writes bypass the page cache; a raw stream can too,
    # from aligned buffers through a QSNAP_OPEN_NOCACHE handle.
    d_sec="D2. the same against a raw stream through O_DIRECT (NOCACHE)"
    # shellcheck disable=SC2086
    add_row "$d_sec" "raw direct" "save $((d_size / 1048576)) MiB: time" \
        "$(median $d_ts)" "$(median $d_td)" time ""
    # shellcheck disable=SC2086
    add_row "$d_sec" "raw direct" "  CPU time of the save (user+sys)" \
        "$(median $d_cs)" "$(median $d_cd)" time ""
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
start=$(now)
say "qsnap benchmarks: scale $BENCH_SCALE, $BENCH_REPS timed runs each," \
    "scratch in $tmp"
for w in A B C D; do
    if wanted "$w"; then
        case $w in
        A) workload_a ;;
        B) workload_b ;;
        C) workload_c ;;
        D) workload_d ;;
        esac
    fi
done
end=$(now)
load_end=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)

echo
echo "qsnap benchmark results ($(uname -m), $(nproc) CPUs," \
    "$("$QEMU_IMG" --version | head -n 1))"
cat <<EOF
BENCH_SCALE=$BENCH_SCALE.  Each time is the median of $BENCH_REPS runs (A2 and
snapshots: $((BENCH_REPS + 2))) after an untimed warm-up, the two sides
alternating, with a sync before each run.  Whole-command times come from
bench/timeit.c; bench rows use the time the tool itself reports.
ratio: for times, reference / qsnap: above 1.00x means qsnap is FASTER;
       for sizes, qsnap / reference: below 1.00x means qsnap is SMALLER.
Load average at the start: $load_start; at the end: $load_end.
EOF
print_table "$results"
echo
sed 's/^/note: /' "$notes"
echo "total time: $(elapsed "$start" "$end" | cut -d. -f1) s"
if [ "$bench_failed" -ne 0 ]; then
    echo "some runs FAILED (see the messages above)"
    exit 1
fi
exit 0
