#!/bin/sh
# tsan.sh - the multi-threaded stress test under ThreadSanitizer.
#
# Run with "make tsan", or by hand:
#   sh tests/stress/tsan.sh /path/to/build
#
# Compiles libqsnap/*.c and tests/stress/mt_stress.c together with
# -fsanitize=thread into a temporary directory (the build's config.h is
# taken from the build directory), then runs mt_stress for TSAN_SECONDS per
# configuration with TSAN_OPTIONS=halt_on_error=1.  Exits non-zero on any
# ThreadSanitizer report and on any failure of the test itself.
#
# Environment:
#   top_builddir    build tree holding config.h (the first argument wins)
#   srcdir          source tree (default: two levels above this script)
#   TSAN_SECONDS    seconds per configuration (default 60)
#   TSAN_THREADS    worker threads (default 4)
#   TSAN_CONFIGS    CLUSTER_SIZE:COMPRESSION pairs to run
#                   (default "65536:zlib 4096:zstd")
#   TSAN_CC         compiler (default: the first of gcc, clang that builds
#                   a program ThreadSanitizer catches a race in)
#   QSNAP_SEED      seed (default: from the date)
#   QEMU_IMG        qemu-img, to check each image afterwards (optional)
#   TSAN_OPTIONS    appended to halt_on_error=1 (later options win)
set -eu

me=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
: "${srcdir:=$(cd "$here/../.." && pwd)}"
builddir=${1:-${top_builddir:-$(pwd)}}
: "${TSAN_SECONDS:=60}"
: "${TSAN_THREADS:=4}"
: "${TSAN_CONFIGS:=65536:zlib 4096:zstd}"
: "${QSNAP_SEED:=$(date +%Y%m%d)}"
: "${QEMU_IMG:=}"

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

[ -f "$builddir/config.h" ] ||
    die "no config.h in $builddir (pass the build directory, or set" \
        "top_builddir)"
[ -f "$srcdir/tests/stress/mt_stress.c" ] ||
    die "no tests/stress/mt_stress.c under $srcdir (set srcdir)"
command -v pkg-config >/dev/null 2>&1 || die "pkg-config not found"
deps_cflags=$(pkg-config --cflags zlib libzstd libxxhash) ||
    die "pkg-config does not know zlib, libzstd or libxxhash"
deps_libs=$(pkg-config --libs zlib libzstd libxxhash)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-tsan.XXXXXX")
# shellcheck disable=SC2317 # called by the trap
cleanup()
{
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A compiler qualifies when the race in this program is reported.
cat >"$tmp/probe.c" <<'EOF'
#include <pthread.h>
static int shared;
static void *bump(void *arg)
{
    (void)arg;
    shared++;
    return 0;
}
int main(void)
{
    pthread_t t;
    if (pthread_create(&t, 0, bump, 0)) {
        return 2;
    }
    shared++;
    pthread_join(t, 0);
    return 0;
}
EOF
cc=
for cand in ${TSAN_CC:-gcc clang}; do
    command -v "$cand" >/dev/null 2>&1 || continue
    "$cand" -fsanitize=thread -g -O1 -pthread -o "$tmp/probe" \
        "$tmp/probe.c" >"$tmp/probe.log" 2>&1 || continue
    if TSAN_OPTIONS=halt_on_error=1 "$tmp/probe" >>"$tmp/probe.log" 2>&1; then
        continue
    fi
    if grep -q 'WARNING: ThreadSanitizer: data race' "$tmp/probe.log"; then
        cc=$cand
        break
    fi
done
if [ -z "$cc" ]; then
    cat "$tmp/probe.log" >&2 2>/dev/null || true
    die "no compiler among '${TSAN_CC:-gcc clang}' builds a working" \
        "ThreadSanitizer program"
fi

prog=$tmp/mt_stress
echo "$me: compiling libqsnap and mt_stress with $cc -fsanitize=thread"
# shellcheck disable=SC2086 # pkg-config output is a list of flags
"$cc" -std=gnu11 -fsanitize=thread -g -O1 -fno-omit-frame-pointer -pthread \
    -DHAVE_CONFIG_H -DQSNAP_BUILDING \
    -I"$builddir" -I"$srcdir/include" -I"$srcdir/libqsnap" $deps_cflags \
    -o "$prog" "$srcdir"/libqsnap/*.c "$srcdir/tests/stress/mt_stress.c" \
    $deps_libs || die "compiling with $cc failed"

opts="halt_on_error=1 second_deadlock_stack=1 history_size=4"
TSAN_OPTIONS="$opts${TSAN_OPTIONS:+ $TSAN_OPTIONS}"
export TSAN_OPTIONS
export QEMU_IMG

n=0
for conf in $TSAN_CONFIGS; do
    n=$((n + 1))
    cs=${conf%%:*}
    comp=${conf#*:}
    [ "$comp" != "$conf" ] || comp=zlib
    seed=$((QSNAP_SEED + n))
    log=$tmp/run-$n.log
    img=$tmp/img-$n.qcow2
    echo "$me: cluster size $cs, $comp: $TSAN_THREADS threads for" \
        "${TSAN_SECONDS} s, seed $seed"
    status=0
    "$prog" -t "$TSAN_THREADS" -s "$TSAN_SECONDS" --cluster-size "$cs" \
        --compression "$comp" --seed "$seed" "$img" 2>"$log" || status=$?
    if grep -q 'ThreadSanitizer' "$log"; then
        cat "$log" >&2
        die "ThreadSanitizer report with cluster size $cs, $comp (exit" \
            "status $status, seed $seed)"
    fi
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        die "mt_stress failed with cluster size $cs, $comp (exit status" \
            "$status, seed $seed)"
    fi
    cat "$log" >&2
    rm -f "$img"
done
echo "$me: no ThreadSanitizer reports"
