#!/bin/sh
# fixtures.sh - every fixture in tests/images reads with its MANIFEST digest.
#
# The fixtures (some zstd-compressed) are unpacked into a temporary
# directory together, so overlay.qcow2 finds base.qcow2.  For each, the
# XXH64 of the guest content read by qsnap must equal the MANIFEST entry,
# and `qsnap-tool walk` must read, map and check it clean.  The dirty
# fixture is also opened read-write (which repairs its refcounts) and must
# then pass `qemu-img check` with its content unchanged.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_built "$QSNAP_TOOL"
need zstd

dir="$srcdir/tests/images"
manifest="$dir/MANIFEST"
[ -r "$manifest" ] || die "$manifest not found"

# Every stored fixture must be listed.
for f in "$dir"/*.qcow2 "$dir"/*.qcow2.zst; do
    [ -e "$f" ] || continue
    grep -q "  ${f##*/}\$" "$manifest" || die "${f##*/} is not in MANIFEST"
done

mkdir "$T/img"
while read -r digest name; do
    [ -r "$dir/$name" ] || die "MANIFEST lists $name, which is missing"
    case $name in
    *.zst) zstd -q -d -c "$dir/$name" >"$T/img/${name%.zst}" ;;
    *) cp "$dir/$name" "$T/img/$name" ;;
    esac
done <"$manifest"

n=0
failures=0
while read -r digest name; do
    f="$T/img/${name%.zst}"
    if ! got=$("$QSNAP_TOOL" digest -f qcow2 "$f" 2>"$T/err"); then
        echo "  FAIL $name: $(cat "$T/err")" >&2
        failures=$((failures + 1))
        continue
    fi
    if [ "$got" != "$digest" ]; then
        echo "  FAIL $name: qsnap reads $got, MANIFEST says $digest" >&2
        failures=$((failures + 1))
        continue
    fi
    case $name in
    lazy-dirty.*)
        # Read-only the stale refcounts are left alone; read-write repairs.
        if ! "$QSNAP_TOOL" walk --rw -f qcow2 "$f" >"$T/out" 2>"$T/err"; then
            echo "  FAIL $name: read-write open: $(cat "$T/err")" >&2
            failures=$((failures + 1))
            continue
        fi
        if [ -n "${QEMU_IMG:-}" ] && command -v "$QEMU_IMG" >/dev/null 2>&1 &&
            ! "$QEMU_IMG" check -q "$f" >"$T/err" 2>&1; then
            echo "  FAIL $name: qemu-img check after the repair:" >&2
            cat "$T/err" >&2
            failures=$((failures + 1))
            continue
        fi
        got=$("$QSNAP_TOOL" digest "$f")
        if [ "$got" != "$digest" ]; then
            echo "  FAIL $name: the repair changed the content to $got" >&2
            failures=$((failures + 1))
            continue
        fi
        ;;
    *)
        if ! "$QSNAP_TOOL" walk -f qcow2 "$f" >"$T/out" 2>"$T/err"; then
            echo "  FAIL $name: walk: $(cat "$T/err")" >&2
            failures=$((failures + 1))
            continue
        fi
        ;;
    esac
    n=$((n + 1))
    echo "  ok $name $got"
done <"$manifest"

[ "$n" -gt 0 ] || die "no fixtures checked"
echo "$me: $n fixtures read with the MANIFEST digests, $failures failures"
[ "$failures" -eq 0 ] || die "$failures fixtures mismatched"
