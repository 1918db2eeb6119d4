#!/bin/sh
# exports.sh - libqsnap.so exports only qsnap_* and has SONAME libqsnap.so.0.
#
# Every dynamic symbol the library defines must start with qsnap_, and
# every function declared QSNAP_API in include/qsnap.h must be exported.
set -eu

me=${0##*/}
: "${srcdir:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${top_builddir:=$(pwd)}"

die()
{
    echo "$me: FAIL: $*" >&2
    exit 1
}

for tool in nm readelf; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "$me: SKIP: $tool not found" >&2
        exit 77
    }
done

lib="$top_builddir/.libs/libqsnap.so"
[ -e "$lib" ] || die "$lib not built (a shared build is required)"

T=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-abi.XXXXXX")
trap 'rm -rf "$T"' EXIT

nm -D --defined-only "$lib" >"$T/nm" || die "nm -D $lib failed"
# Lines: "ADDRESS TYPE NAME" (NAME may carry @VERSION).
awk 'NF >= 3 { sub(/@.*/, "", $3); print $3 }' "$T/nm" | sort -u \
    >"$T/exports"
[ -s "$T/exports" ] || die "$lib exports no symbol"

if grep -v '^qsnap_' "$T/exports" >"$T/bad"; then
    echo "$me: symbols outside the qsnap_ namespace:" >&2
    sed 's/^/    /' "$T/bad" >&2
    die "$(wc -l <"$T/bad") stray exported symbols"
fi

soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
[ "$soname" = libqsnap.so.0 ] || die "SONAME is '$soname', not libqsnap.so.0"

# Functions the public header declares must all be there.
sed -n 's/^QSNAP_API[^(]*[ *]\(qsnap_[a-z0-9_]*\)(.*/\1/p' \
    "$srcdir/include/qsnap.h" | sort -u >"$T/declared"
[ -s "$T/declared" ] || die "no QSNAP_API declarations found in qsnap.h"
missing=$(comm -23 "$T/declared" "$T/exports")
[ -z "$missing" ] ||
    die "declared but not exported: $(echo "$missing" | tr "\n" " ")"

echo "$me: $(wc -l <"$T/exports") symbols, all qsnap_*, SONAME $soname," \
    "$(wc -l <"$T/declared") declared functions exported"
