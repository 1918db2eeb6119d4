#!/bin/bash
# run.sh - build the libFuzzer harnesses of tests/fuzz and run each a while.
#
#   tests/fuzz/run.sh [open|read|snaptable|vmstate]...   (default: all four)
#
# Each harness is compiled with clang, -fsanitize=fuzzer,address,undefined,
# together with every libqsnap/*.c source (the build tree's config.h comes
# from $top_builddir).  Seed corpora are made in a temporary directory:
# the fixtures of tests/images, damaged copies from tests/images/mkcorrupt,
# small images made with qsnap-img, and snapshot tables and VM state
# containers that the harnesses and qsnap-img write.  Then each harness
# runs for FUZZ_SECONDS, one after the other, and one summary line is
# printed per harness.
#
# The exit status is 1 if any harness crashed, leaked, timed out or ran out
# of memory; the input that did it is kept (with a minimized copy and the
# log) in $FUZZ_ARTIFACTS, and the failure message names the file.
#
# Environment:
#   top_builddir    configured build tree (default: the current directory)
#   srcdir          source tree (default: two levels above this script)
#   FUZZ_SECONDS    seconds per harness (default 300; 0 builds and seeds only)
#   FUZZ_CC         compiler (default clang)
#   FUZZ_ARTIFACTS  where failing inputs go ($top_builddir/tests/fuzz/artifacts)
#   FUZZ_CORPUS     keep the grown corpora in FUZZ_CORPUS/NAME (default: a
#                   temporary directory, removed afterwards)
#   FUZZ_BIN        keep the built harnesses there (default: temporary)
#   FUZZ_MINIMIZE_SECONDS  time to minimize a failing input (default 60)
#   FUZZ_ARGS       extra libFuzzer arguments for every run
#   QSNAP_IMG, MKCORRUPT, QEMU_IMG   tools for the seeds (from the build
#                   tree and $PATH by default; QEMU_IMG is optional)
set -eu

me=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
: "${srcdir:=$(cd "$here/../.." && pwd)}"
: "${top_builddir:=$(pwd)}"
: "${FUZZ_SECONDS:=300}"
: "${FUZZ_CC:=clang}"
: "${FUZZ_ARTIFACTS:=$top_builddir/tests/fuzz/artifacts}"
: "${FUZZ_MINIMIZE_SECONDS:=60}"
: "${FUZZ_ARGS:=}"
: "${QSNAP_IMG:=$top_builddir/qsnap-img/qsnap-img}"
: "${MKCORRUPT:=$top_builddir/tests/images/mkcorrupt}"
: "${QEMU_IMG:=qemu-img}"

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

note()
{
    echo "$me: $*"
}

all_harnesses="open read snaptable vmstate"
harnesses=${*:-$all_harnesses}
for h in $harnesses; do
    case " $all_harnesses " in
    *" $h "*) ;;
    *) die "unknown harness '$h' (one of: $all_harnesses)" ;;
    esac
done
case $FUZZ_SECONDS in
'' | *[!0-9]*) die "FUZZ_SECONDS must be a number of seconds" ;;
esac

# The largest input each harness takes.
max_len()
{
    case $1 in
    open | read) echo 1048576 ;;
    snaptable) echo 16384 ;;
    vmstate) echo 65536 ;;
    esac
}

[ -f "$top_builddir/config.h" ] ||
    die "no $top_builddir/config.h: set top_builddir to a configured build"
[ -x "$QSNAP_IMG" ] || die "$QSNAP_IMG not built (run make first)"
command -v "$FUZZ_CC" >/dev/null 2>&1 || die "$FUZZ_CC not found"
command -v pkg-config >/dev/null 2>&1 || die "pkg-config not found"

T=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-fuzz.XXXXXX")
# Scratch files of the harnesses go to memory when /dev/shm is there.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    S=$(mktemp -d /dev/shm/qsnap-fuzz.XXXXXX)
else
    S=$T/scratch
    mkdir "$S"
fi
trap 'rm -rf "$T" "$S"' EXIT
export QSNAP_FUZZ_DIR=$S

# ---------------------------------------------------------------- build

san="-fsanitize=address,undefined -fno-sanitize-recover=all"
cflags="-g -O1 -fno-omit-frame-pointer -std=gnu11 -pthread"
read -r -a deps_cflags <<<"$(pkg-config --cflags zlib libzstd libxxhash)" ||
    true
read -r -a deps_libs <<<"$(pkg-config --libs zlib libzstd libxxhash)" ||
    die "pkg-config finds no zlib, libzstd or libxxhash"
read -r -a cflags_a <<<"$cflags"
read -r -a san_a <<<"$san"

printf '%s\n' 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n)' \
    '{' '    (void)d; (void)n; return 0;' '}' >"$T/probe.c"
if ! "$FUZZ_CC" -fsanitize=fuzzer,address,undefined "$T/probe.c" \
    -o "$T/probe" >"$T/probe.log" 2>&1; then
    cat "$T/probe.log" >&2
    die "$FUZZ_CC cannot build libFuzzer programs" \
        "(clang and libclang-rt-14-dev are needed)"
fi

bin=${FUZZ_BIN:-$T/bin}
mkdir -p "$bin" "$T/obj"
note "building the library with $FUZZ_CC and sanitizers"
objs=()
for src in "$srcdir"/libqsnap/*.c; do
    obj=$T/obj/lib_$(basename "$src" .c).o
    "$FUZZ_CC" "${cflags_a[@]}" "${san_a[@]}" -fsanitize=fuzzer-no-link \
        -DQSNAP_BUILDING -I"$top_builddir" -I"$srcdir/include" \
        -I"$srcdir/libqsnap" "${deps_cflags[@]}" -c "$src" -o "$obj" ||
        die "compiling $src"
    objs+=("$obj")
done
"$FUZZ_CC" "${cflags_a[@]}" "${san_a[@]}" -fsanitize=fuzzer-no-link \
    -DHAVE_CONFIG_H -I"$top_builddir" -I"$srcdir/include" \
    -c "$here/fuzz_util.c" -o "$T/obj/fuzz_util.o" ||
    die "compiling fuzz_util.c"
for h in $harnesses; do
    "$FUZZ_CC" "${cflags_a[@]}" "${san_a[@]}" -fsanitize=fuzzer \
        -DHAVE_CONFIG_H -I"$top_builddir" -I"$srcdir/include" \
        -I"$srcdir/libqsnap" "$here/fuzz_$h.c" "$T/obj/fuzz_util.o" "${objs[@]}" \
        "${deps_libs[@]}" -o "$bin/fuzz_$h" || die "building fuzz_$h"
done
note "built: $(for h in $harnesses; do printf '%s ' "$bin/fuzz_$h"; done)"

# ---------------------------------------------------------------- seeds

# Images: the fixtures and generated ones feed fuzz_open and fuzz_read.
imgs=$T/seeds/images
mkdir -p "$imgs" "$T/gen" "$T/empty"
for f in "$srcdir"/tests/images/*.qcow2 "$srcdir"/tests/images/*.qcow2.zst; do
    [ -f "$f" ] || continue
    name=${f##*/}
    case $name in
    *.zst)
        command -v zstd >/dev/null 2>&1 || continue
        zstd -q -d -c "$f" >"$imgs/${name%.zst}"
        ;;
    *) cp "$f" "$imgs/$name" ;;
    esac
done

# A 1 MiB raw disk with a little data, made into qcow2 images of several
# kinds by qsnap-img (and qemu-img, when there is one).
g=$T/gen
yes 'qsnap fuzz seed' | head -c 8192 >"$g/pattern"
dd if=/dev/zero of="$g/disk.raw" bs=1024 count=1024 status=none
for kib in 0 68 300 1016; do
    dd if="$g/pattern" of="$g/disk.raw" bs=1024 seek="$kib" conv=notrunc \
        status=none
done
gen()
{
    "$@" >"$T/gen.log" 2>&1 || {
        cat "$T/gen.log" >&2
        die "making a seed: $*"
    }
}
n=0
for o in cluster_size=4096 compat=0.10,cluster_size=512 \
    refcount_bits=1,cluster_size=4096 refcount_bits=64,cluster_size=1024 \
    cluster_size=4096,compression_type=zstd \
    lazy_refcounts=on,cluster_size=4096; do
    n=$((n + 1))
    gen "$QSNAP_IMG" convert -O qcow2 -o "$o" "$g/disk.raw" "$imgs/gen-$n.qcow2"
done
gen "$QSNAP_IMG" convert -c -O qcow2 -o cluster_size=4096 "$g/disk.raw" \
    "$imgs/gen-snap.qcow2"
gen "$QSNAP_IMG" snapshot -c first "$imgs/gen-snap.qcow2"
gen "$QSNAP_IMG" snapshot -c second "$imgs/gen-snap.qcow2"
mkdir "$g/state"
printf '{"cpus":[{"rip":"0xfff0"}]}' >"$g/state/vm.json"
cp "$g/pattern" "$g/state/memory"
: >"$g/state/empty"
cp "$imgs/gen-snap.qcow2" "$imgs/gen-vmstate.qcow2"
gen "$QSNAP_IMG" vmstate store "$imgs/gen-vmstate.qcow2" ckpt "$g/state"
gen "$QSNAP_IMG" create -q -f qcow2 -u -b base.qcow2 -F qcow2 \
    -o cluster_size=4096 "$imgs/gen-overlay.qcow2" 4M
if command -v "$QEMU_IMG" >/dev/null 2>&1; then
    gen "$QEMU_IMG" convert -O qcow2 -o extended_l2=on,cluster_size=16k \
        "$g/disk.raw" "$imgs/gen-qemu-extl2.qcow2"
    gen "$QEMU_IMG" convert -c -O qcow2 \
        -o compression_type=zstd,cluster_size=4k \
        "$g/disk.raw" "$imgs/gen-qemu-zstd.qcow2"
fi

# Damaged copies of two small images: every case mkcorrupt knows.
if [ -x "$MKCORRUPT" ]; then
    for p in "$imgs/snapshots.qcow2" "$imgs/gen-2.qcow2"; do
        [ -f "$p" ] || continue
        base=$(basename "$p" .qcow2)
        "$MKCORRUPT" --list | while read -r c _; do
            rc=0
            "$MKCORRUPT" "$c" "$p" "$imgs/bad-$base-$c.qcow2" 2>/dev/null ||
                rc=$?
            [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] ||
                die "mkcorrupt $c $p failed ($rc)"
        done
    done
else
    note "$MKCORRUPT not built: no damaged seeds (make tests/images/mkcorrupt)"
fi
# Inputs larger than a harness takes would only be cut.
find "$imgs" -type f -size +1024k -delete

# Snapshot tables: those the harness writes from its own image (their L1
# tables exist there), and tables cut out of images with snapshots.
tables=$T/seeds/snaptable
mkdir -p "$tables"
if [ -x "$bin/fuzz_snaptable" ]; then
    QSNAP_FUZZ_SEED_OUT=$tables "$bin/fuzz_snaptable" -runs=0 \
        "$T/empty" >"$T/seed.log" 2>&1 || {
        cat "$T/seed.log" >&2
        die "fuzz_snaptable could not write its seeds"
    }
fi
# be_uint FILE OFFSET SIZE: a big-endian unsigned integer from FILE.
be_uint()
{
    od -An -tu1 -j "$2" -N "$3" "$1" | awk '
        { for (i = 1; i <= NF; i++) v = v * 256 + $i }
        END { printf "%.0f\n", v }'
}
for img in "$imgs"/snapshots.qcow2 "$imgs"/gen-snap.qcow2 \
    "$imgs"/gen-vmstate.qcow2; do
    [ -f "$img" ] || continue
    nb=$(be_uint "$img" 60 4)
    off=$(be_uint "$img" 64 8)
    if [ "$nb" -eq 0 ] || [ "$nb" -ge 256 ]; then
        continue
    fi
    out=$tables/extracted-$(basename "$img" .qcow2)
    # The count as a big-endian u16, then up to 4 KiB of the table.
    printf '\000%b' "\\0$(printf '%03o' "$nb")" >"$out"
    dd if="$img" bs=4096 skip=$((off / 4096)) count=1 status=none >>"$out"
done

# VM state containers: the harness's own, and one qsnap-img stored.
states=$T/seeds/vmstate
mkdir -p "$states"
if [ -x "$bin/fuzz_vmstate" ]; then
    QSNAP_FUZZ_SEED_OUT=$states "$bin/fuzz_vmstate" -runs=0 \
        "$T/empty" >"$T/seed.log" 2>&1 || {
        cat "$T/seed.log" >&2
        die "fuzz_vmstate could not write its seeds"
    }
fi
gen "$QSNAP_IMG" vmstate dump "$imgs/gen-vmstate.qcow2" ckpt \
    "$states/qsnap-img-store"
printf 'QEVM\000\000\000\003' >"$states/raw-qemu-stream"

for h in $harnesses; do
    case $h in
    open | read) seeds=$imgs ;;
    snaptable) seeds=$tables ;;
    vmstate) seeds=$states ;;
    esac
    note "fuzz_$h: $(find "$seeds" -type f | wc -l) seeds"
done

if [ "$FUZZ_SECONDS" -eq 0 ]; then
    note "FUZZ_SECONDS=0: built and seeded, not run"
    exit 0
fi

# ---------------------------------------------------------------- run

mkdir -p "$FUZZ_ARTIFACTS"
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
read -r -a extra <<<"$FUZZ_ARGS" || true
failed=0
for h in $harnesses; do
    case $h in
    open | read) seeds=$imgs ;;
    snaptable) seeds=$tables ;;
    vmstate) seeds=$states ;;
    esac
    if [ -n "${FUZZ_CORPUS:-}" ]; then
        corpus=$FUZZ_CORPUS/$h
    else
        corpus=$T/corpus/$h
    fi
    mkdir -p "$corpus"
    log=$T/fuzz_$h.log
    stamp=$T/stamp-$h
    : >"$stamp"
    rc=0
    "$bin/fuzz_$h" -rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$h")" \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
        -artifact_prefix="$FUZZ_ARTIFACTS/$h-" "${extra[@]}" \
        "$corpus" "$seeds" >"$log" 2>&1 || rc=$?

    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    files=$(find "$corpus" -type f | wc -l)
    kib=$(du -sk "$corpus" | cut -f1)
    summary="fuzz_$h: ${execs:-?} execs (${rate:-?}/s), cov ${cov:-?},"
    summary="$summary ft ${ft:-?}, corpus $files files ($kib KiB),"
    summary="$summary peak rss ${rss:-?} MB"
    if [ "$rc" -eq 0 ]; then
        echo "$summary: ok"
        continue
    fi

    failed=$((failed + 1))
    cp "$log" "$FUZZ_ARTIFACTS/$h.log"
    sanitizers='AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer'
    kind=$(grep -o -m1 -E "ERROR: ($sanitizers|libFuzzer): [a-z-]+" "$log" ||
        true)
    grep -q 'runtime error:' "$log" && kind=${kind:-undefined behaviour}
    grep -q 'API promise broken' "$log" &&
        kind=${kind:-$(grep -m1 'API promise broken' "$log")}
    echo "$summary: FAILED (exit $rc${kind:+, $kind})"
    sed -n '/==ERROR\|runtime error\|API promise\|SUMMARY/,+12p' "$log" |
        head -40 | sed 's/^/    /'
    found=
    find "$FUZZ_ARTIFACTS" -maxdepth 1 -type f -name "$h-*" -newer "$stamp" \
        ! -name '*.min*' ! -name '*.log' | sort >"$T/artifacts"
    while read -r a; do
        found=1
        echo "    failing input kept in $a"
        if [ "$FUZZ_MINIMIZE_SECONDS" -gt 0 ]; then
            "$bin/fuzz_$h" -minimize_crash=1 \
                -max_total_time="$FUZZ_MINIMIZE_SECONDS" -timeout=10 \
                -rss_limit_mb=2048 -exact_artifact_path="$a.min" \
                "$a" >"$a.min.log" 2>&1 || true
            [ -f "$a.min" ] &&
                echo "    minimized: $a.min ($(wc -c <"$a.min") bytes)"
        fi
    done <"$T/artifacts"
    [ -n "$found" ] || echo "    no input was saved; see $FUZZ_ARTIFACTS/$h.log"
    echo "    log: $FUZZ_ARTIFACTS/$h.log"
done

[ "$failed" -eq 0 ] ||
    die "$failed of $(echo "$harnesses" | wc -w) harnesses failed"
note "all harnesses ran ${FUZZ_SECONDS}s without a failure"
