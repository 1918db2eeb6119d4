#!/bin/sh
# replay.sh - run every fuzz harness, built as a plain program
# (tests/fuzz/replay-NAME, from replay_main.c), over the fixture images of
# tests/images and the inputs that once broke something, kept in
# tests/images/fuzz.
#
# A harness aborts on a broken API promise, and under --enable-sanitizers
# on any memory error, leak or undefined behaviour; the test fails then,
# naming the input.  Each harness must also have run every input.
set -eu

me=${0##*/}
: "${srcdir:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${top_builddir:=$(pwd)}"

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

T=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-replay.XXXXXX")
trap 'rm -rf "$T"' EXIT
# The harnesses make their scratch directories in here.
QSNAP_FUZZ_DIR=$T
export QSNAP_FUZZ_DIR

mkdir "$T/images"
for f in "$srcdir"/tests/images/*; do
    [ -f "$f" ] || continue
    name=${f##*/}
    case $name in
    *.zst)
        if command -v zstd >/dev/null 2>&1; then
            zstd -q -d -c "$f" >"$T/images/${name%.zst}"
        else
            cp "$f" "$T/images/$name"
        fi
        ;;
    *) cp "$f" "$T/images/$name" ;;
    esac
done
n_inputs=$(find "$T/images" -type f | wc -l)
regressions=$srcdir/tests/images/fuzz
if [ -d "$regressions" ]; then
    n_inputs=$((n_inputs + $(find "$regressions" -maxdepth 1 -type f \
        ! -name '.*' | wc -l)))
    set -- "$T/images" "$regressions"
else
    set -- "$T/images"
fi

passed=0
failed=0
for h in open read snaptable vmstate; do
    prog=$top_builddir/tests/fuzz/replay-$h
    [ -x "$prog" ] || die "$prog not built (run make check)"
    if "$prog" -v "$@" >"$T/$h.log" 2>&1 &&
        grep -q "^replay: $n_inputs inputs\$" "$T/$h.log"; then
        echo "$me: replay-$h: $n_inputs inputs ok"
        passed=$((passed + 1))
    else
        echo "$me: replay-$h failed; the last input it named:" >&2
        grep '^replay: ' "$T/$h.log" | tail -1 >&2
        tail -40 "$T/$h.log" | grep -v '^replay: ' >&2 || true
        failed=$((failed + 1))
    fi
done
echo "$me: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
