#!/bin/sh
# cli_chain.sh - qsnap-img's backing chain commands against qemu-img.
#
# A chain built by qemu-img and qemu-io: base.raw <- l1.qcow2 (compat 0.10,
# 4 KiB clusters) <- l2.qcow2 <- top.qcow2 (128 KiB clusters), with data,
# zero writes and discards in every qcow2 layer.  Each command runs on a
# copy of the chain; the expectation comes from qemu-img on another copy:
#
# commit: plain, -d, -b (middle and raw bottom): every file of the chain
#         shows what it shows after qemu-img commit with the same options,
#         and the raw bottom is byte for byte the same;
# rebase: safe onto a layer further down and onto an unrelated image, -u,
#         -b "": the same guest views and header names as qemu-img rebase;
# stream: full and -b: the same as a safe qemu-img rebase onto nothing or
#         onto the base, which keep the guest view the same way;
# delete: a layer in the middle and at the bottom, auto, --stream and
#         --commit: every remaining layer shows what it showed before,
#         the deleted file is gone, the others stay at their paths;
#         refusals (the top, --commit onto a raw file, an ambiguous name)
#         change nothing; an internal snapshot is still deleted as such;
# list:   the layers, formats, backing names and snapshot counts.
# After each step every qcow2 file passes qemu-img check.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

if [ -d "$QSNAP_IMG" ]; then
    QSNAP_IMG=$QSNAP_IMG/qsnap-img
fi
need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_IMG"

cd "$T"
QI=$QSNAP_IMG
CHAIN="base.raw l1.qcow2 l2.qcow2 top.qcow2"

# fmt_of FILE: the format of a file of the chain, by its name.
fmt_of()
{
    case $1 in
    *.raw) echo raw ;;
    *) echo qcow2 ;;
    esac
}

# qio IMAGE COMMAND...: qemu-io commands on a qcow2 image.
qio()
{
    qio_img=$1
    shift
    qio_n=$#
    for qio_c in "$@"; do
        set -- "$@" -c "$qio_c"
    done
    shift "$qio_n"
    run_ok "qemu-io on $qio_img" "$QEMU_IO" -f qcow2 "$@" "$qio_img"
}

# ------------------------------------------------------------ the chain
mkdir pristine
(
    cd pristine
    "$QEMU_IMG" create -q -f raw base.raw 8M
    put_bytes base.raw 0 8388608 "$QSNAP_SEED"
    "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4096 \
        -b base.raw -F raw l1.qcow2
    "$QEMU_IMG" create -q -f qcow2 -b l1.qcow2 -F qcow2 l2.qcow2
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size=131072 \
        -b l2.qcow2 -F qcow2 top.qcow2
) || die "could not build the chain"
qio pristine/l1.qcow2 "write -P 0x11 0 3M" "write -z 1M 200k" \
    "write -P 0x12 5000 70000" "discard 2M 512k" "write -P 0x13 7M 1M"
qio pristine/l2.qcow2 "write -P 0x21 512k 2M" "write -z 3M 1M" \
    "discard 6M 1M" "write -P 0x22 123457 4321"
qio pristine/top.qcow2 "write -P 0x31 1M 1M" "write -z 4M 300k" \
    "discard 7M 512k" "write -P 0x32 8000000 388608"

# The guest view of every file of the pristine chain.
mkdir views
for f in $CHAIN; do
    run_ok "view of $f" "$QEMU_IMG" convert -f "$(fmt_of "$f")" -O raw \
        "pristine/$f" "views/$f"
done

# fresh DIR: DIR holds a copy of the pristine chain.
fresh()
{
    rm -rf "$1"
    mkdir "$1"
    cp --sparse=always pristine/* "$1/"
}

# checked DIR: every qcow2 file in DIR passes qemu-img check.
checked()
{
    for c_f in "$1"/*.qcow2; do
        [ -e "$c_f" ] || continue
        qemu_check "$c_f"
    done
}

# same_view FILE1 FILE2 CONTEXT: the two images show the same guest disk
# (each with its backing chain).
same_view()
{
    if ! "$QEMU_IMG" compare -U -f "$(fmt_of "$1")" -F "$(fmt_of "$2")" \
        "$1" "$2" >"$T/cmp.out" 2>&1; then
        cat "$T/cmp.out" >&2
        die "$3: $1 and $2 differ"
    fi
}

# same_dirs DIR1 DIR2 CONTEXT [views]: the chain files in both directories
# show the same guest disks and record the same backing files, raw files
# are equal, and unless "views" is given, qcow2 files hold the same ranges.
same_dirs()
{
    for sd_f in $CHAIN; do
        [ -e "$1/$sd_f" ] || [ -e "$2/$sd_f" ] || continue
        if [ ! -e "$1/$sd_f" ] || [ ! -e "$2/$sd_f" ]; then
            die "$3: $sd_f is only in one of $1 and $2"
        fi
        same_view "$1/$sd_f" "$2/$sd_f" "$3"
        if [ "$(fmt_of "$sd_f")" = raw ]; then
            cmp -s "$1/$sd_f" "$2/$sd_f" || die "$3: $sd_f differs"
        elif [ "${4:-}" != views ]; then
            layout_of "$1/$sd_f" >"$T/layout.1"
            layout_of "$2/$sd_f" >"$T/layout.2"
            if ! cmp -s "$T/layout.1" "$T/layout.2"; then
                diff "$T/layout.1" "$T/layout.2" >&2 || true
                die "$3: $sd_f holds other ranges than qemu-img's"
            fi
        fi
        if [ "$(fmt_of "$sd_f")" = qcow2 ]; then
            [ "$(backing_of "$1/$sd_f")" = "$(backing_of "$2/$sd_f")" ] ||
                die "$3: $sd_f: backing file '$(backing_of "$2/$sd_f")'," \
                    "qsnap-img wrote '$(backing_of "$1/$sd_f")'"
        fi
    done
    checked "$1"
}

# layout_of IMAGE: which layer decides each range and whether it holds
# data or zeros: qemu-img map without host offsets, neighbours merged.
# (A data cluster over a hole of the host file shows as "zero" only when
# QEMU takes the file for preallocated, which depends on its size: that
# is not compared.)
layout_of()
{
    lo_num='\([0-9]*\)'
    "$QEMU_IMG" map -U --output=json "$1" |
        sed -n "s/.*\"start\": $lo_num, \"length\": $lo_num, /\\1 \\2 /p" |
        sed -e 's/, "offset": [0-9]*//; s/}.*//' \
            -e 's/"zero": true, "data": true/"zero": false, "data": true/' |
        awk '{ rest = $0; sub(/^[0-9]* [0-9]* /, "", rest) }
             $1 == end && rest == what { end += $2; next }
             { if (what != "") print start, end, what
               start = $1; end = $1 + $2; what = rest }
             END { print start, end, what }'
}

# backing_of IMAGE: the backing file name and format IMAGE records.
backing_of()
{
    "$QEMU_IMG" info -U --output=json "$1" |
        sed -n 's/^    "\(backing-filename[a-z-]*\)": "\(.*\)",*$/\1=\2/p' |
        LC_ALL=C sort | tr '\n' ' '
}

# unchanged CONTEXT DIR [FILE...]: each FILE in DIR (default: every file
# of the chain) still shows its pristine guest view.
unchanged()
{
    u_ctx=$1
    u_dir=$2
    shift 2
    if [ $# -eq 0 ]; then
        for u_f in $CHAIN; do
            set -- "$@" "$u_f"
        done
    fi
    for u_f in "$@"; do
        [ -e "$u_dir/$u_f" ] || die "$u_ctx: $u_dir/$u_f is gone"
        if [ "$(fmt_of "$u_f")" = raw ]; then
            cmp -s "$u_dir/$u_f" "$T/views/$u_f" ||
                die "$u_ctx: $u_f changed"
        else
            qemu_compare "$u_dir/$u_f" "$T/views/$u_f" "$u_ctx: $u_f"
        fi
    done
}

# fails_with TEXT CONTEXT COMMAND...: exit status 1, TEXT in the message.
fails_with()
{
    fw_text=$1
    fw_ctx=$2
    shift 2
    fw_rc=0
    "$@" >"$T/fw.out" 2>"$T/fw.err" || fw_rc=$?
    if [ "$fw_rc" -ne 1 ]; then
        cat "$T/fw.out" "$T/fw.err" >&2
        die "$fw_ctx: exit status $fw_rc, not 1"
    fi
    grep -qF -- "$fw_text" "$T/fw.err" ||
        die "$fw_ctx: the message does not say \"$fw_text\": $(cat "$T/fw.err")"
}

# ------------------------------------------------------------ list
note "list"
"$QI" list pristine/top.qcow2 >list.txt || die "list failed"
d=0
for f in top.qcow2 l2.qcow2 l1.qcow2 base.raw; do
    grep -q "^$d  *$(fmt_of "$f") .* pristine/$f\$" list.txt ||
        die "list: no row for $f at depth $d: $(cat list.txt)"
    d=$((d + 1))
done
grep -q "backing file: l2.qcow2 (format qcow2)" list.txt ||
    die "list: top's backing name missing"
grep -q "backing file: base.raw (format raw)" list.txt ||
    die "list: l1's backing name missing"
"$QI" list --output=json pristine/top.qcow2 >list.json ||
    die "list --output=json failed"
[ "$(grep -c '"depth":' list.json)" -eq 4 ] || die "list: not four layers"
for f in $CHAIN; do
    grep -q "\"filename\": \"pristine/$f\"" list.json ||
        die "list --output=json: no layer $f"
done
grep -q '"backing-filename": "l1.qcow2"' list.json ||
    die "list --output=json: l2's backing name missing"
# The bytes top holds itself, as qemu-img map reports them.
held=$("$QEMU_IMG" map --output=json pristine/top.qcow2 |
    awk -F', ' '/"depth": 0, "present": true/ {
        sub(/.*"length": /, "", $2); n += $2 } END { print n + 0 }')
[ "$held" -gt 0 ] || die "qemu-img map shows nothing in top"
grep -q "\"allocated-size\": $held," list.json ||
    die "list --output=json: top does not hold $held bytes"

# ------------------------------------------------------------ commit
for opts in "" "-d" "-b l1.qcow2" "-b base.raw" "-b l2.qcow2"; do
    note "commit $opts"
    fresh q
    fresh s
    # shellcheck disable=SC2086 # the options are words
    (cd q && "$QEMU_IMG" commit -q $opts top.qcow2) ||
        die "qemu-img commit $opts failed"
    # shellcheck disable=SC2086
    (cd s && "$QI" commit $opts top.qcow2) >commit.out ||
        die "qsnap-img commit $opts failed"
    [ "$(cat commit.out)" = "Image committed." ] ||
        die "commit $opts printed: $(cat commit.out)"
    same_dirs s q "commit $opts"
done
note "commit -p, and from another directory"
fresh s
"$QI" commit -p -b l1.qcow2 s/top.qcow2 >/dev/null 2>commit.err ||
    die "commit -p failed"
grep -q "100.00/100%" commit.err || die "commit -p drew no progress"
fresh q
(cd q && "$QEMU_IMG" commit -q -b l1.qcow2 top.qcow2)
same_dirs s q "commit -p -b l1.qcow2 from another directory"
fresh s
fails_with "Did not find 's/l1.qcow2' in the backing chain" "commit -b" \
    "$QI" commit -b s/l1.qcow2 s/top.qcow2
fails_with "Image does not have a backing file" "commit of the base" \
    "$QI" commit -f raw s/base.raw
unchanged "failed commits" s

# ------------------------------------------------------------ rebase
# rebase_both ARGS...: qemu-img and qsnap-img rebase top.qcow2 with ARGS.
rebase_both()
{
    fresh q
    fresh s
    cp other.qcow2 q/
    cp other.qcow2 s/
    (cd q && "$QEMU_IMG" rebase -q "$@" top.qcow2) ||
        die "qemu-img rebase $* failed"
    (cd s && "$QI" rebase "$@" top.qcow2) >rebase.out 2>rebase.err || {
        cat rebase.err >&2
        die "qsnap-img rebase $* failed"
    }
    [ ! -s rebase.out ] || die "rebase $* printed: $(cat rebase.out)"
    same_dirs s q "rebase $*"
}

# An unrelated image, copied next to the chain by rebase_both.
"$QEMU_IMG" create -q -f qcow2 other.qcow2 8M
qio other.qcow2 "write -P 0x77 0 8M" "write -z 2M 1M"
note "rebase onto a layer further down"
rebase_both -b l1.qcow2 -F qcow2
unchanged "safe rebase onto l1" s top.qcow2
note "rebase onto the raw base"
rebase_both -p -b base.raw -F raw
unchanged "safe rebase onto base.raw" s top.qcow2
note "rebase onto an unrelated image"
rebase_both -b other.qcow2 -F qcow2
unchanged "safe rebase onto other.qcow2" s top.qcow2
note "rebase -u"
rebase_both -u -b l1.qcow2 -F qcow2
fresh s
"$QI" rebase -u -b nowhere.qcow2 -F qcow2 s/top.qcow2 ||
    die "rebase -u onto a missing file failed"
[ "$(backing_of s/top.qcow2)" = \
    "backing-filename-format=qcow2 backing-filename=nowhere.qcow2 " ] ||
    die "rebase -u recorded $(backing_of s/top.qcow2)"
note "rebase -b ''"
rebase_both -b ""
unchanged "rebase -b ''" s top.qcow2
[ -z "$(backing_of s/top.qcow2)" ] || die "rebase -b '': still a backing file"
rebase_both -u -b ""
note "rebase with a relative name through another directory"
fresh s
mkdir -p s/sub
mv s/top.qcow2 s/sub/top.qcow2
"$QI" rebase -u -b ../l2.qcow2 -F qcow2 s/sub/top.qcow2 ||
    die "rebase -u into a subdirectory failed"
"$QI" rebase -b ../l1.qcow2 -F qcow2 s/sub/top.qcow2 ||
    die "rebase -b ../l1.qcow2 failed"
[ "$(backing_of s/sub/top.qcow2)" = \
    "backing-filename-format=qcow2 backing-filename=../l1.qcow2 " ] ||
    die "rebase recorded $(backing_of s/sub/top.qcow2), not ../l1.qcow2"
qemu_compare s/sub/top.qcow2 views/top.qcow2 "rebase through ../"
note "rebase errors"
fresh s
fails_with "backing format must be specified" "rebase without -F" \
    "$QI" rebase -b l1.qcow2 s/top.qcow2
fails_with "Could not open new backing file 'nowhere.qcow2'" \
    "rebase onto nothing" \
    "$QI" rebase -b nowhere.qcow2 -F qcow2 s/top.qcow2
fails_with "Must specify backing file (-b) or use unsafe mode (-u)" \
    "rebase without -b" "$QI" rebase s/top.qcow2
unchanged "failed rebases" s

# ------------------------------------------------------------ stream
# What stream does, qemu-img does by a safe rebase: the same guest view,
# standing alone (or on the base).
note "stream"
fresh q
fresh s
(cd q && "$QEMU_IMG" rebase -q -b "" top.qcow2)
(cd s && "$QI" stream top.qcow2) >stream.out || die "stream failed"
[ "$(cat stream.out)" = "Image streamed." ] ||
    die "stream printed: $(cat stream.out)"
same_dirs s q "stream" views
unchanged "stream" s
for base in l1.qcow2 base.raw l2.qcow2; do
    note "stream -b $base"
    fresh q
    fresh s
    (cd q && "$QEMU_IMG" rebase -q -b "$base" -F "$(fmt_of "$base")" \
        top.qcow2)
    "$QI" stream -q -p -b "$base" s/top.qcow2 >stream.out 2>&1 ||
        die "stream -b $base failed: $(cat stream.out)"
    [ ! -s stream.out ] || die "stream -q printed: $(cat stream.out)"
    same_dirs s q "stream -b $base" views
    unchanged "stream -b $base" s
done
fails_with "Did not find 'top.qcow2' in the backing chain" "stream -b top" \
    "$QI" stream -b top.qcow2 s/top.qcow2

# ------------------------------------------------------------ delete
# delete_layer DIR LAYER CONTEXT ARGS...: qsnap-img delete ARGS, which names
# LAYER; afterwards LAYER is gone and every other file still shows what
# it showed.
delete_layer()
{
    dl_dir=$1
    dl_layer=$2
    dl_ctx=$3
    shift 3
    dl_keep=""
    dl_n=0
    for dl_f in $CHAIN; do
        if [ "$dl_f" != "$dl_layer" ] && [ -e "$dl_dir/$dl_f" ]; then
            dl_keep="$dl_keep $dl_f"
            dl_n=$((dl_n + 1))
        fi
    done
    "$QI" delete "$@" >"$T/delete.out" 2>"$T/delete.err" || {
        cat "$T/delete.err" >&2
        die "$dl_ctx: delete $* failed"
    }
    grep -q "^Deleted checkpoint layer .*$dl_layer (" "$T/delete.out" ||
        die "$dl_ctx: delete printed: $(cat "$T/delete.out")"
    [ ! -e "$dl_dir/$dl_layer" ] || die "$dl_ctx: $dl_layer is still there"
    # shellcheck disable=SC2086 # the list is words
    unchanged "$dl_ctx" "$dl_dir" $dl_keep
    checked "$dl_dir"
    for dl_f in "$dl_dir"/*; do
        dl_n=$((dl_n - 1))
    done
    [ "$dl_n" -eq 0 ] || die "$dl_ctx: other files than$dl_keep are left"
}

for how in "" --stream --commit; do
    note "delete ${how:-(auto)} of a middle layer"
    fresh s
    delete_layer s l2.qcow2 "delete $how l2" $how s/top.qcow2 s/l2.qcow2
    case $how in
    --stream) grep -q "(streamed .* into s/top.qcow2)" "$T/delete.out" ;;
    --commit) grep -q "(committed .* of s/top.qcow2 into it" "$T/delete.out" ;;
    *) true ;;
    esac || die "delete $how: the report is wrong: $(cat "$T/delete.out")"
    fresh s
    delete_layer s l1.qcow2 "delete $how l1" $how s/top.qcow2 s/l1.qcow2
done

for how in "" --stream; do
    note "delete ${how:-(auto)} of the raw bottom"
    fresh s
    delete_layer s base.raw "delete $how base.raw" $how -p s/top.qcow2 \
        s/base.raw
    grep -q "100.00/100%" "$T/delete.err" || die "delete -p drew no progress"
    [ -z "$(backing_of s/l1.qcow2)" ] || die "l1 still has a backing file"
done

note "delete --commit of a qcow2 bottom, by the recorded name"
fresh s
delete_layer s base.raw "delete base.raw" s/top.qcow2 s/base.raw
(cd / && delete_layer "$T/s" l1.qcow2 "delete --commit l1 from /" \
    --commit "$T/s/top.qcow2" l1.qcow2)
delete_layer s l2.qcow2 "delete the last layer below the top" \
    s/top.qcow2 l2.qcow2
[ -z "$(backing_of s/top.qcow2)" ] || die "top still has a backing file"

note "delete: refusals"
fresh s
fails_with "revert" "delete of the top" "$QI" delete s/top.qcow2 s/top.qcow2
fails_with "cannot commit" "delete --commit of a raw file" \
    "$QI" delete --commit s/top.qcow2 s/base.raw
"$QEMU_IMG" snapshot -c l2.qcow2 s/top.qcow2
fails_with "both a snapshot" "delete of an ambiguous name" \
    "$QI" delete s/top.qcow2 l2.qcow2
fails_with "not a file of the backing chain" "delete --stream of a snapshot" \
    "$QI" delete --stream s/top.qcow2 1
fails_with "nowhere" "delete of nothing" "$QI" delete s/top.qcow2 nowhere
unchanged "refused deletes" s
checked s
"$QI" delete s/top.qcow2 1 >"$T/delete.out" ||
    die "delete of a snapshot failed"
grep -q "Deleted snapshot 'l2.qcow2' (ID 1)" "$T/delete.out" ||
    die "delete of a snapshot printed: $(cat "$T/delete.out")"
[ -z "$("$QEMU_IMG" snapshot -l s/top.qcow2)" ] || die "the snapshot is left"
unchanged "delete of a snapshot" s
checked s

note "all passed"
