#!/bin/sh
# cli_basic.sh - every qsnap-img command against qemu-img as the oracle.
#
# create: the "Formatting" line, `qemu-img check` clean and `qemu-img info`
#         agreeing with the image qemu-img makes from the same options;
# info:   human and JSON output byte for byte equal to qemu-img's;
# check:  output and exit codes for clean, leaking (a refcount bumped with
#         dd) and corrupt (a refcount zeroed) images, and -r repairs;
# map:    human and JSON output equal to qemu-img's on images qemu-io wrote;
# compare, convert (both directions, -c with zlib and zstd), resize and
# bench: results checked with qemu-img compare/check/info.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# The program is built as qsnap-img/qsnap-img in the build tree.
if [ -d "$QSNAP_IMG" ]; then
    QSNAP_IMG=$QSNAP_IMG/qsnap-img
fi
need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_IMG"

cd "$T"
mkdir qs qe
n_checks=0

ok()
{
    n_checks=$((n_checks + 1))
}

# run_both DIR_QS DIR_QE ARGS...: run qsnap-img in DIR_QS and qemu-img in
# DIR_QE with the same arguments; outputs in $T/qs.out, $T/qe.out (stdout)
# and $T/qs.err, $T/qe.err, exit codes in $qs_rc and $qe_rc.
run_both()
{
    rb_qs=$1
    rb_qe=$2
    shift 2
    qs_rc=0
    qe_rc=0
    (cd "$rb_qs" && "$QSNAP_IMG" "$@") >"$T/qs.out" 2>"$T/qs.err" ||
        qs_rc=$?
    (cd "$rb_qe" && "$QEMU_IMG" "$@") >"$T/qe.out" 2>"$T/qe.err" ||
        qe_rc=$?
}

# same DESCRIPTION ARGS...: both programs, run on the same files in $T,
# print the same standard output and exit with the same status.
same()
{
    same_desc=$1
    shift
    run_both "$T" "$T" "$@"
    if ! cmp -s "$T/qs.out" "$T/qe.out"; then
        diff "$T/qs.out" "$T/qe.out" >&2 || true
        cat "$T/qs.err" >&2
        die "$same_desc: 'qsnap-img $*' prints other output than qemu-img"
    fi
    if [ "$qs_rc" -ne "$qe_rc" ]; then
        cat "$T/qs.err" "$T/qe.err" >&2
        die "$same_desc: 'qsnap-img $*' exits $qs_rc, qemu-img $qe_rc"
    fi
    ok
}

# expect_rc CODE DESCRIPTION COMMAND...: COMMAND must exit with CODE.
expect_rc()
{
    er_want=$1
    er_desc=$2
    shift 2
    er_rc=0
    "$@" >"$T/rc.out" 2>&1 || er_rc=$?
    if [ "$er_rc" -ne "$er_want" ]; then
        cat "$T/rc.out" >&2
        die "$er_desc: '$*' exits $er_rc, expected $er_want"
    fi
    ok
}

# info_without_size IMAGE: qemu-img's JSON info minus the host-dependent
# allocation figure.
info_without_size()
{
    "$QEMU_IMG" info -U --output=json "$1" | grep -v '"actual-size"'
}

qio()
{
    "$QEMU_IO" "$@" >/dev/null
}

# poke FILE OFFSET OCTAL-ESCAPES: overwrite bytes of FILE in place.
poke()
{
    # shellcheck disable=SC2059  # the format carries the bytes
    printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# ---------------------------------------------------------------- create
note "create"
for spec in \
    "qcow2||1G" \
    "qcow2|compat=0.10|100M" \
    "qcow2|compat=v2,cluster_size=4k|10M" \
    "qcow2|compat=1.1,cluster_size=4096,refcount_bits=8|64M" \
    "qcow2|lazy_refcounts=on|5M" \
    "qcow2|compression_type=zstd|5M" \
    "qcow2|cluster_size=512,refcount_bits=1|3M" \
    "qcow2|cluster_size=2M,refcount_bits=64|20M" \
    "qcow2|refcount_bits=32,lazy_refcounts=off|1536k" \
    "qcow2|preallocation=off|5M" \
    "qcow2|preallocation=metadata|5M" \
    "qcow2|preallocation=falloc|5M" \
    "qcow2|preallocation=full|5M" \
    "qcow2||0" \
    "raw||1M" \
    "raw|preallocation=full|1M" \
    "raw|preallocation=falloc|100k"; do
    fmt=${spec%%|*}
    rest=${spec#*|}
    opts=${rest%%|*}
    size=${rest#*|}
    rm -f qs/img qe/img
    if [ -n "$opts" ]; then
        run_both qs qe create -f "$fmt" -o "$opts" img "$size"
    else
        run_both qs qe create -f "$fmt" img "$size"
    fi
    [ "$qs_rc" -eq 0 ] || { cat "$T/qs.err" >&2; die "create $spec failed"; }
    cmp -s "$T/qs.out" "$T/qe.out" || {
        diff "$T/qs.out" "$T/qe.out" >&2 || true
        die "create $spec: Formatting line differs from qemu-img's"
    }
    if [ "$fmt" = qcow2 ]; then
        qemu_check qs/img "create $spec"
    fi
    info_without_size qs/img | sed 's|qs/img|IMG|' >"$T/i.qs"
    info_without_size qe/img | sed 's|qe/img|IMG|' >"$T/i.qe"
    cmp -s "$T/i.qs" "$T/i.qe" || {
        diff "$T/i.qs" "$T/i.qe" >&2 || true
        die "create $spec: qemu-img info differs from qemu-img's own image"
    }
    same "info of create $spec" info qs/img
    same "json info of create $spec" info --output=json qs/img
    ok
done

# Backing files: the size comes from the backing file; -u skips opening it.
rm -f qs/* qe/*
"$QEMU_IMG" create -q -f qcow2 qs/base.qcow2 64M
cp qs/base.qcow2 qe/base.qcow2
run_both qs qe create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
if [ "$qs_rc" -ne 0 ] || ! cmp -s "$T/qs.out" "$T/qe.out"; then
    die "create with a backing file differs from qemu-img"
fi
qemu_check qs/top.qcow2 "overlay"
same "overlay info" info --output=json qs/top.qcow2
same "overlay chain info" info --backing-chain qs/top.qcow2
same "overlay chain json" info --backing-chain --output=json qs/top.qcow2
run_both qs qe create -f qcow2 -u -b missing.qcow2 -F qcow2 dangling.qcow2 8M
if [ "$qs_rc" -ne 0 ] || ! cmp -s "$T/qs.out" "$T/qe.out"; then
    die "create -u with a missing backing file"
fi
same "info of an overlay without its backing file" info qs/dangling.qcow2

# Errors exit 1 as in qemu-img (messages are our own).
for args in "-f qcow2 err.qcow2" "-f qcow2 err.qcow2 1X" \
    "-f qcow2 err.qcow2 -- -5" "-f qcow2 -o foo=bar err.qcow2 1M" \
    "-f qcow2 -o cluster_size=3000 err.qcow2 1M" \
    "-f qcow2 -o compat=0.10,lazy_refcounts=on err.qcow2 1M" \
    "-f raw -b base.qcow2 -F qcow2 err.raw 1M" \
    "-f qcow2 -b base.qcow2 err.qcow2 1M" \
    "-f qcow2 -b missing.qcow2 -F qcow2 err.qcow2 1M" \
    "-f qcow2 err.qcow2 1M extra" "-f vmdk2 err.img 1M"; do
    # shellcheck disable=SC2086  # word splitting wanted
    run_both qs qe create $args
    if [ "$qs_rc" -ne 1 ] || [ "$qe_rc" -ne 1 ]; then
        die "create $args: exit $qs_rc, qemu-img $qe_rc"
    fi
    ok
done

# ---------------------------------------------------------------- info
note "info"
"$QEMU_IMG" create -q -f qcow2 -o lazy_refcounts=on,compression_type=zstd \
    dirty.qcow2 4M
# Set the dirty bit (incompatible feature bit 0; zstd is bit 3).
poke dirty.qcow2 79 '\011'
same "dirty image" info dirty.qcow2
same "dirty image json" info --output=json dirty.qcow2
"$QEMU_IMG" create -q -f qcow2 -o compat=0.10 v2.qcow2 7M
same "v2 image" info v2.qcow2
same "v2 image json" info --output=json v2.qcow2
"$QEMU_IMG" create -q -f qcow2 snap.qcow2 10M
"$QEMU_IMG" snapshot -c first snap.qcow2
qio -c 'write -P 1 0 64k' snap.qcow2
"$QEMU_IMG" snapshot -c "second snapshot, with a long name" snap.qcow2
same "snapshot list" info snap.qcow2
same "snapshot list json" info --output=json snap.qcow2
same "raw probed" info v2.qcow2 -f raw
same "raw json" info --output=json -f raw v2.qcow2

# ---------------------------------------------------------------- check
note "check"
"$QEMU_IMG" create -q -f qcow2 clean.qcow2 1G
qio -c 'write -P 1 0 300k' -c 'write -c -P 2 1M 64k' clean.qcow2
same "clean check" check clean.qcow2
same "clean check json" check --output=json clean.qcow2
expect_rc 0 "clean check" "$QSNAP_IMG" check clean.qcow2
same "raw check" check -f raw clean.qcow2

# A leak: a refcount of 1 for cluster 4 (past the last used cluster) of a
# fresh image whose refcount block sits at 0x20000 (16-bit entries).
"$QEMU_IMG" create -q -f qcow2 leak.qcow2 1G
truncate -s 327680 leak.qcow2
poke leak.qcow2 $((0x20000 + 8)) '\000\001'
expect_rc 3 "leaked cluster" "$QSNAP_IMG" check leak.qcow2
same "leak check" check leak.qcow2
same "leak check json" check --output=json leak.qcow2
# Repair: the same report as qemu-img's repair of an identical copy.
cp leak.qcow2 leak-qs.qcow2
cp leak.qcow2 leak-qe.qcow2
qs_rc=0
qe_rc=0
"$QSNAP_IMG" check -r leaks leak-qs.qcow2 >"$T/qs.out" 2>/dev/null ||
    qs_rc=$?
"$QEMU_IMG" check -r leaks leak-qe.qcow2 >"$T/qe.out" 2>/dev/null || qe_rc=$?
if [ "$qs_rc" -ne 0 ] || [ "$qe_rc" -ne 0 ]; then
    die "check -r leaks: exit $qs_rc, qemu-img $qe_rc"
fi
cmp -s "$T/qs.out" "$T/qe.out" || {
    diff "$T/qs.out" "$T/qe.out" >&2 || true
    die "check -r leaks prints other output than qemu-img"
}
qemu_check leak-qs.qcow2 "after check -r leaks"
expect_rc 0 "check after repair" "$QSNAP_IMG" check leak-qs.qcow2
cp leak.qcow2 leak-qs.qcow2
expect_rc 0 "check -r leaks --output=json" "$QSNAP_IMG" check -r leaks \
    --output=json leak-qs.qcow2
grep -q '"leaks-fixed": 1' "$T/rc.out" || die "json repair report"

# A corruption: the L1 table's cluster (3) with refcount 0.
"$QEMU_IMG" create -q -f qcow2 bad.qcow2 1G
poke bad.qcow2 $((0x20000 + 6)) '\000\000'
expect_rc 2 "corruption" "$QSNAP_IMG" check bad.qcow2
same "corrupt check" check bad.qcow2
same "corrupt check json" check --output=json bad.qcow2
expect_rc 0 "check -r all" "$QSNAP_IMG" check -r all bad.qcow2
qemu_check bad.qcow2 "after check -r all"

# ---------------------------------------------------------------- map
note "map"
"$QEMU_IMG" create -q -f qcow2 m.qcow2 10M
qio -c 'write -P 1 0 128k' -c 'write -z 1M 64k' -c 'write -P 3 2M 4k' \
    -c 'write -P 5 4M 192k' -c 'write -P 6 9M 512' m.qcow2
"$QEMU_IMG" create -q -f qcow2 -b m.qcow2 -F qcow2 mo.qcow2 12M
qio -c 'write -P 7 64k 64k' -c 'write -z 4M 64k' -c 'write -P 8 11M 4k' \
    mo.qcow2
"$QEMU_IMG" create -q -f qcow2 mc.qcow2 4M
qio -c 'write -c -P 4 0 64k' -c 'write -P 9 1M 64k' mc.qcow2
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4k,compat=0.10 m4.qcow2 3M
qio -c 'write -P 1 4k 20k' -c 'write -P 2 1M 1M' -c 'discard 1100k 8k' \
    m4.qcow2
"$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata mp.qcow2 2M
qio -c 'write -P 1 64k 4k' mp.qcow2
"$QEMU_IMG" create -q -f raw mr.raw 3M
qio -f raw -c 'write -P 1 0 128k' -c 'write -P 2 2M 4k' mr.raw
"$QEMU_IMG" create -q -f qcow2 -b mr.raw -F raw mro.qcow2
qio -c 'write -P 3 1M 64k' mro.qcow2
"$QEMU_IMG" create -q -f qcow2 empty.qcow2 0
# Zero clusters that keep host clusters in reverse order: two ranges.
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=512 mz.qcow2 1M
qio -c 'write -P 1 512 512' -c 'write -P 2 0 512' -c 'write -z 0 1k' mz.qcow2
for img in m.qcow2 mo.qcow2 mc.qcow2 m4.qcow2 mp.qcow2 mr.raw mro.qcow2 \
    empty.qcow2 clean.qcow2 mz.qcow2; do
    same "map $img" map "$img"
    same "map json $img" map --output=json "$img"
done
same "map window" map --output=json --start-offset=64k --max-length=1M \
    mo.qcow2
same "map window past the end" map --output=json --start-offset=1G m.qcow2
same "map raw view" map --output=json -f raw m.qcow2
same "map subdirectory" map --output=json "$T/mo.qcow2"

# ---------------------------------------------------------------- compare
note "compare"
"$QEMU_IMG" convert -O raw m.qcow2 m.raw
"$QEMU_IMG" create -q -f qcow2 e10.qcow2 10M
"$QEMU_IMG" create -q -f qcow2 e20.qcow2 20M
cp e20.qcow2 e20d.qcow2
qio -c 'write -P 1 15M 4k' e20d.qcow2
same "compare same" compare m.qcow2 m.qcow2
same "compare qcow2 raw" compare m.qcow2 m.raw
same "compare formats" compare -f qcow2 -F raw m.qcow2 m.raw
same "compare overlay" compare mo.qcow2 m.qcow2
same "compare strict" compare -s m.qcow2 m.raw
same "compare sizes" compare e10.qcow2 e20.qcow2
same "compare sizes reversed" compare e20.qcow2 e10.qcow2
same "compare sizes data" compare e10.qcow2 e20d.qcow2
same "compare strict sizes" compare -s e10.qcow2 e20.qcow2
same "compare quiet" compare -q m.qcow2 mo.qcow2
same "compare partial sector" compare mo.qcow2 mr.raw
expect_rc 0 "compare identical" "$QSNAP_IMG" compare m.qcow2 m.raw
expect_rc 1 "compare different" "$QSNAP_IMG" compare m.qcow2 mo.qcow2
expect_rc 2 "compare missing" "$QSNAP_IMG" compare m.qcow2 missing.qcow2

# ---------------------------------------------------------------- convert
note "convert"
# A source with data, zeros, compressed clusters and a backing file that
# is smaller than the image.
random_bytes 7 3145728 >"$T/rand"
"$QEMU_IMG" convert -f raw -O qcow2 "$T/rand" crand.qcow2
"$QEMU_IMG" create -q -f qcow2 -b crand.qcow2 -F qcow2 csrc.qcow2 9M
qio -c 'write -P 4 4M 100k' -c 'write -c -P 5 6M 64k' -c 'write -z 64k 64k' \
    -c 'write -P 6 8M 1k' csrc.qcow2

for variant in "qcow2|" "qcow2|-c" "qcow2|-c -o compression_type=zstd" \
    "qcow2|-o cluster_size=4k,compat=0.10" "qcow2|-W -m 4" "qcow2|-S 0" \
    "qcow2|-c -o cluster_size=2M" "qcow2|-p" "raw|" "raw|-S 0"; do
    ofmt=${variant%%|*}
    flags=${variant#*|}
    rm -f out.img
    # shellcheck disable=SC2086  # word splitting wanted
    run_ok "convert -O $ofmt $flags" "$QSNAP_IMG" convert -O "$ofmt" \
        $flags csrc.qcow2 out.img
    if ! "$QEMU_IMG" compare -F "$ofmt" csrc.qcow2 out.img >"$T/cmp.out" \
        2>&1; then
        cat "$T/cmp.out" >&2
        die "convert -O $ofmt $flags: result differs from the source"
    fi
    if [ "$ofmt" = qcow2 ]; then
        qemu_check out.img "convert $flags"
    fi
    case $flags in
    *zstd*)
        "$QEMU_IMG" info out.img | grep -q 'compression type: zstd' ||
            die "convert -c zstd: output is not zstd"
        ;;
    esac
    case $flags in
    -c*)
        if "$QEMU_IMG" check out.img | grep -q ' 0.00% compressed'; then
            die "convert $flags: nothing was compressed"
        fi
        ;;
    esac
    ok
done
# Sparse output: a mostly empty source stays small.
rm -f out.img
"$QEMU_IMG" create -q -f qcow2 sparse.qcow2 1G
qio -c 'write -P 1 512M 64k' sparse.qcow2
run_ok "convert sparse" "$QSNAP_IMG" convert -O qcow2 sparse.qcow2 out.img
[ "$(image_field out.img actual-size)" -lt 4194304 ] ||
    die "convert of a sparse image allocated too much"
"$QEMU_IMG" compare sparse.qcow2 out.img >/dev/null ||
    die "sparse convert differs"
# raw to qcow2 and back.
rm -f out.img back.raw
run_ok "convert raw to qcow2" "$QSNAP_IMG" convert -f raw -O qcow2 \
    "$T/rand" out.img
qemu_check out.img "convert raw to qcow2"
run_ok "convert qcow2 to raw" "$QSNAP_IMG" convert -O raw out.img back.raw
cmp -s "$T/rand" back.raw || die "raw -> qcow2 -> raw changed the data"
ok
expect_rc 1 "convert -c to raw" "$QSNAP_IMG" convert -c -O raw m.qcow2 x.raw
expect_rc 1 "convert bad -S" "$QSNAP_IMG" convert -S 1000 m.qcow2 x.raw
expect_rc 1 "convert missing" "$QSNAP_IMG" convert missing.qcow2 x.raw

# ---------------------------------------------------------------- resize
note "resize"
# resize_both DESCRIPTION ARGS...: resize qs/IMG with qsnap-img and qe/IMG
# with qemu-img; the output, exit status and new size must agree.
resize_both()
{
    rz_desc=$1
    shift
    run_both qs qe resize "$@"
    if ! cmp -s "$T/qs.out" "$T/qe.out" || [ "$qs_rc" -ne "$qe_rc" ]; then
        diff "$T/qs.out" "$T/qe.out" >&2 || true
        cat "$T/qs.err" "$T/qe.err" >&2
        die "$rz_desc: resize $* differs (exit $qs_rc, qemu-img $qe_rc)"
    fi
    ok
}

rm -f qs/* qe/*
"$QEMU_IMG" create -q -f qcow2 qs/rs.qcow2 10M
cp qs/rs.qcow2 qe/rs.qcow2
resize_both "grow" rs.qcow2 20M
resize_both "relative grow" rs.qcow2 +1M
resize_both "shrink without --shrink" rs.qcow2 -- -1M
[ "$(image_field qs/rs.qcow2 virtual-size)" -eq 22020096 ] ||
    die "resize shrank without --shrink"
resize_both "shrink" --shrink rs.qcow2 -- -2M
resize_both "unaligned size" --shrink rs.qcow2 1000
resize_both "shrink to nothing" --shrink rs.qcow2 -- -100M
resize_both "bad size" rs.qcow2 12X
resize_both "quiet" -q rs.qcow2 30M
[ "$(image_field qs/rs.qcow2 virtual-size)" -eq 31457280 ] ||
    die "resize left the wrong size"
qemu_check qs/rs.qcow2 "after resize"
qio -c 'write -P 1 25M 64k' qs/rs.qcow2
expect_rc 1 "shrink over data" "$QSNAP_IMG" resize --shrink qs/rs.qcow2 10M
[ "$(image_field qs/rs.qcow2 virtual-size)" -eq 31457280 ] ||
    die "a refused shrink changed the size"
"$QEMU_IO" -c 'read -P 1 25M 64k' qs/rs.qcow2 | grep -q '^read' ||
    die "a refused shrink lost data"
qemu_check qs/rs.qcow2 "after a refused shrink"
expect_rc 0 "shrink an empty tail" "$QSNAP_IMG" resize --shrink \
    qs/rs.qcow2 26M
[ "$(image_field qs/rs.qcow2 virtual-size)" -eq 27262976 ] ||
    die "shrinking an empty tail"
qemu_check qs/rs.qcow2 "after shrinking"
"$QEMU_IMG" create -q -f raw qs/rs.raw 1M
cp qs/rs.raw qe/rs.raw
resize_both "raw grow" -f raw rs.raw 2M
resize_both "raw shrink" -f raw --shrink rs.raw 1536k
[ "$(wc -c <qs/rs.raw)" -eq 1572864 ] || die "raw resize"

# ---------------------------------------------------------------- bench
note "bench"
"$QEMU_IMG" create -q -f qcow2 b.qcow2 16M
for args in "-c 2000" "-c 2000 -w -d 4 -s 8k -S 64k -o 4096" \
    "-c 500 -w -d 4 --flush-interval=8 --pattern=7" \
    "-c 500 -w -d 2 -o 4M --flush-interval=2 --no-drain" "-c 300 -t none -n"; do
    # shellcheck disable=SC2086  # word splitting wanted
    run_both "$T" "$T" bench $args b.qcow2
    [ "$qs_rc" -eq 0 ] || { cat "$T/qs.err" >&2; die "bench $args failed"; }
    grep -v '^Run completed' "$T/qs.out" >"$T/qs.head" || true
    grep -v '^Run completed' "$T/qe.out" >"$T/qe.head" || true
    cmp -s "$T/qs.head" "$T/qe.head" || die "bench $args: header differs"
    grep -q '^Run completed in [0-9]*\.[0-9][0-9][0-9] seconds\.$' \
        "$T/qs.out" || die "bench $args: no completion line"
    qemu_check b.qcow2 "after bench $args"
    case $args in
    *pattern=7*)
        "$QEMU_IO" -c 'read -P 7 4096 4096' b.qcow2 | grep -q '^read' ||
            die "bench --pattern did not write the pattern"
        ;;
    esac
    ok
done
expect_rc 1 "bench flush interval" "$QSNAP_IMG" bench -w -c 10 \
    --flush-interval=10 b.qcow2

note "PASS ($n_checks checks)"
