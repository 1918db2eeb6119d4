#!/bin/bash
# snapshot_bad.sh - damaged snapshot tables and VM state containers.
#
# Copies of pristine images (snapshots made by qemu-img over qemu-io data;
# a checkpoint with VM state sections made by qsnap-img) are damaged by
# patching bytes (snap-driver poke/vmpatch, dd), then qsnap-img lists,
# reads, creates, applies and deletes snapshots on them.  Every command
# runs under `timeout 20` and `ulimit -v 1048576` and must not crash or
# hang; where it fails, its message must be non-empty and name the file.
# Snapshots the damage does not touch must still read their models, by
# qsnap where it accepts the image, and by qemu-img after qsnap's attempts
# (nothing else is harmed).
#
# Snapshot table: table past EOF, huge and slightly-too-large
# nb_snapshots, an entry with a huge L1 size, with its L1 table past EOF
# or unaligned, extra_data_size past the table (and huge), a table cut
# short, huge ID/name lengths; duplicate IDs (listed both, the first
# deleted by ID) and duplicate names made by qemu-img snapshot -c twice
# (listed both, deleted by ID correctly).
# Section container: a flipped byte in a stored chunk (that section fails
# naming section and chunk, the others read), bad section sizes, chunk
# offsets and lengths (checksums recomputed), bad section counts and
# directory sizes, a corrupted directory.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need timeout
need_built "$QSNAP_IMG"
: "${SNAP_DRIVER:=$top_builddir/tests/snap-driver}"
need_built "$SNAP_DRIVER"

BAD_TIMEOUT=${BAD_TIMEOUT:-20}
BAD_MEM_KB=${BAD_MEM_KB:-1048576}
# AddressSanitizer reserves terabytes of address space: no ulimit -v then.
for bin in "$top_builddir/qsnap-img/.libs/qsnap-img" "$QSNAP_IMG"; do
    if [ -f "$bin" ] && grep -q __asan_init "$bin" 2>/dev/null; then
        BAD_MEM_KB=unlimited
    fi
done

failures=0
fail()
{
    echo "  FAIL $*" >&2
    failures=$((failures + 1))
}

# limited COMMAND...: run under the time and memory limits; output in
# $T/l.out and $T/l.err, status in $lrc.
limited()
{
    set +e
    (
        ulimit -v "$BAD_MEM_KB"
        exec timeout "$BAD_TIMEOUT" "$@"
    ) >"$T/l.out" 2>"$T/l.err"
    lrc=$?
    set -e
}

# sane CONTEXT IMAGE: the last command neither crashed nor hung, and if it
# failed, it said why, naming IMAGE.  Returns 1 if it failed (cleanly).
sane()
{
    case $lrc in
    0) return 0 ;;
    124)
        fail "$1: hangs (killed after $BAD_TIMEOUT s)"
        return 1
        ;;
    1 | 2 | 3) ;;
    *)
        sed 's/^/      /' "$T/l.err" >&2
        fail "$1: crashed (exit $lrc)"
        return 1
        ;;
    esac
    if ! [ -s "$T/l.err" ]; then
        fail "$1: failed without a message"
    elif ! grep -qF "$(basename "$2")" "$T/l.err"; then
        sed 's/^/      /' "$T/l.err" >&2
        fail "$1: the message does not name the file $(basename "$2")"
    fi
    return 1
}

# must_fail CONTEXT IMAGE COMMAND...: a clean, clear failure.
must_fail()
{
    mf_ctx=$1
    mf_img=$2
    shift 2
    limited "$@"
    if sane "$mf_ctx" "$mf_img"; then
        fail "$mf_ctx: '$*' succeeded"
        return 1
    fi
    echo "    refused: $(head -n 1 "$T/l.err")"
}

# reads_model CONTEXT IMAGE SNAPSHOT MODEL: qsnap-img reads SNAPSHOT as
# MODEL; or, with $accepted empty (qsnap refused the image), fails
# cleanly.
reads_model()
{
    rm -f "$T/read.raw"
    limited "$QSNAP_IMG" convert -U -l "$3" -O raw "$2" "$T/read.raw"
    if sane "$1: reading snapshot $3" "$2"; then
        "$QEMU_IMG" compare -q -f raw -F raw "$T/read.raw" "$4" ||
            fail "$1: snapshot $3 reads wrong"
    elif [ -n "$accepted" ]; then
        fail "$1: the image lists, but snapshot $3 does not read" \
            "($(head -n 1 "$T/l.err"))"
    fi
    rm -f "$T/read.raw"
}

# unharmed CONTEXT IMAGE NAME...: qemu-img still reads each snapshot as
# its model, if it could read it in the damaged image before qsnap's
# attempts ($T/qemu-ok.NAME).
unharmed()
{
    u_ctx=$1
    u_img=$2
    shift 2
    for u_name in "$@"; do
        [ -f "$T/qemu-ok.$u_name" ] || continue
        rm -f "$T/q.raw"
        if ! "$QEMU_IMG" convert -U -l "snapshot.name=$u_name" -O raw \
            "$u_img" "$T/q.raw" >"$T/q.err" 2>&1; then
            sed 's/^/      /' "$T/q.err" >&2
            fail "$u_ctx: after qsnap's attempts qemu-img cannot read" \
                "snapshot $u_name any more"
        elif ! "$QEMU_IMG" compare -q -f raw -F raw "$T/q.raw" \
            "$T/model.$u_name.raw"; then
            fail "$u_ctx: qsnap's attempts changed snapshot $u_name"
        fi
    done
    rm -f "$T/q.raw"
}

# ------------------------------------------------------------ pristine
P="$T/pristine.qcow2"
run_ok "create" "$QEMU_IMG" create -q -f qcow2 "$P" 16M
run_ok "write" "$QEMU_IO" -c "write -P 0x11 0 2M" -c "write -P 0x12 8M 1M" \
    "$P"
run_ok "snapshot one" "$QEMU_IMG" snapshot -c one "$P"
run_ok "write" "$QEMU_IO" -c "write -P 0x22 1M 2M" "$P"
run_ok "snapshot two" "$QEMU_IMG" snapshot -c two "$P"
run_ok "write" "$QEMU_IO" -c "write -P 0x33 2M 2M" -c "discard 8M 512k" "$P"
run_ok "snapshot three" "$QEMU_IMG" snapshot -c three "$P"
run_ok "write" "$QEMU_IO" -c "write -P 0x44 12M 1M" "$P"
for name in one two three; do
    run_ok "model $name" "$QEMU_IMG" convert -l "snapshot.name=$name" \
        -O raw "$P" "$T/model.$name.raw"
done
run_ok "model live" "$QEMU_IMG" convert -O raw "$P" "$T/model.live.raw"
"$SNAP_DRIVER" layout "$P" >"$T/layout" || die "snap-driver layout failed"

# field KEY: a value of the pristine layout.
field()
{
    sed -n "s/^$1=//p" "$T/layout"
}

file_size=$(field file_size)
cs=$(field cluster_size)
e2=$(field snap.1.offset)
e3=$(field snap.2.offset)
[ "$(field snap.1.name)" = two ] || die "unexpected pristine layout"
# A copy whose table is moved to the very end of the file (its old
# cluster leaks), so that entries can run past the end of the table.
sn_off=$(field snapshots_offset)
tbl_end=$((e3 + 40 + $(field snap.2.extra_size) + 1 + 5))
tbl_len=$(( (tbl_end + 7) / 8 * 8 - sn_off ))
end_off=$(( (file_size + cs - 1) / cs * cs ))
PE="$T/pristine-end.qcow2"
cp "$P" "$PE"
dd if="$P" of="$PE" bs=1 skip="$sn_off" count="$tbl_len" seek="$end_off" \
    conv=notrunc status=none
"$SNAP_DRIVER" poke "$PE" 64 8 "$end_off"
e3_moved=$((end_off + e3 - sn_off))
beyond=$(( (file_size + cs - 1) / cs * cs + 1048576 ))

# table_case NAME MODE PATCH...: copy the pristine image (or $SRC), run
# the PATCH command on it (IMG standing for the copy's path), then:
#   MODE refused   qsnap-img must refuse every snapshot operation;
#   MODE two       snapshot two is damaged: it must fail, one and three
#                  must read their models if qsnap accepts the image;
#   MODE clean     nothing is damaged: everything must read.
table_case()
{
    tc_name=$1
    tc_mode=$2
    shift 2
    img="$T/bad-$tc_name.qcow2"
    ctx="table: $tc_name"
    tc_failures=$failures
    cp "${SRC:-$P}" "$img"
    tc_cmd=
    for a in "$@"; do
        [ "$a" = IMG ] && a=$img
        tc_cmd="$tc_cmd '$a'"
    done
    eval "$tc_cmd" || die "$ctx: patching failed"
    rm -f "$T"/qemu-ok.*
    for name in one two three; do
        if "$QEMU_IMG" convert -U -l "snapshot.name=$name" -O raw "$img" \
            "$T/q.raw" >/dev/null 2>&1; then
            : >"$T/qemu-ok.$name"
        fi
    done
    rm -f "$T/q.raw"
    accepted=
    limited "$QSNAP_IMG" snapshot -U -l "$img"
    if sane "$ctx: snapshot -l" "$img"; then
        accepted=1
    else
        echo "    refused: $(head -n 1 "$T/l.err")"
    fi
    case $tc_mode in
    refused)
        [ -z "$accepted" ] || fail "$ctx: qsnap-img snapshot -l accepts it"
        must_fail "$ctx: list" "$img" "$QSNAP_IMG" list -U "$img" || true
        must_fail "$ctx: read one" "$img" "$QSNAP_IMG" convert -U -l one \
            -O raw "$img" "$T/read.raw" || true
        must_fail "$ctx: create" "$img" "$QSNAP_IMG" snapshot -c new \
            "$img" || true
        ;;
    two | clean)
        if [ "$tc_mode" = two ]; then
            must_fail "$ctx: read two" "$img" "$QSNAP_IMG" convert -U \
                -l two -O raw "$img" "$T/read.raw" || true
        else
            [ -n "$accepted" ] || fail "$ctx: an undamaged image is refused"
            reads_model "$ctx" "$img" two "$T/model.two.raw"
        fi
        reads_model "$ctx" "$img" one "$T/model.one.raw"
        reads_model "$ctx" "$img" three "$T/model.three.raw"
        if [ -n "$accepted" ]; then
            rm -f "$T/read.raw"
            "$QSNAP_IMG" convert -U -O raw "$img" "$T/read.raw" \
                >"$T/l.err" 2>&1 ||
                fail "$ctx: the live disk does not read"
            "$QEMU_IMG" compare -q -f raw -F raw "$T/read.raw" \
                "$T/model.live.raw" || fail "$ctx: the live disk reads wrong"
        fi
        # Writes: none may crash, hang or harm the other snapshots.
        for op in "snapshot -c new" "snapshot -a two" "snapshot -d two"; do
            # shellcheck disable=SC2086  # $op is several words
            limited "$QSNAP_IMG" $op "$img"
            sane "$ctx: $op" "$img" || true
        done
        ;;
    esac
    unharmed "$ctx" "$img" one three
    rm -f "$img" "$T/read.raw"
    [ "$failures" != "$tc_failures" ] || echo "  ok $ctx"
}

note "snapshot table damage"
table_case past-eof refused "$SNAP_DRIVER" poke IMG 64 8 "$beyond"
table_case nb-huge refused "$SNAP_DRIVER" poke IMG 60 4 2147483647
table_case nb-65537 refused "$SNAP_DRIVER" poke IMG 60 4 65537
table_case l1-size-huge two "$SNAP_DRIVER" poke IMG $((e2 + 8)) 4 268435456
table_case l1-past-eof two "$SNAP_DRIVER" poke IMG "$e2" 8 "$beyond"
table_case l1-unaligned two "$SNAP_DRIVER" poke IMG "$e2" 8 \
    $(($(field snap.1.l1_offset) + 512))
table_case extra-huge refused "$SNAP_DRIVER" poke IMG $((e2 + 36)) 4 \
    4294967280
table_case id-len-huge refused "$SNAP_DRIVER" poke IMG $((e2 + 12)) 2 65535
# With the table at the end of the file, entries can run past it.
SRC=$PE
table_case relocated-table clean true
table_case nb-one-more refused "$SNAP_DRIVER" poke IMG 60 4 4
table_case extra-past-table refused "$SNAP_DRIVER" poke IMG \
    $((e3_moved + 36)) 4 1000
table_case name-len-huge refused "$SNAP_DRIVER" poke IMG $((e3_moved + 14)) \
    2 65535
table_case cut-short refused truncate -s $((e3_moved + 20)) IMG
SRC=

# ------------------------------------------------------------ dup IDs
note "duplicate IDs and names"
dup_failures=$failures
img="$T/dup-id.qcow2"
cp "$P" "$img"
# Snapshot two's ID "2" becomes "1": two entries with ID 1.
"$SNAP_DRIVER" poke "$img" $((e2 + 40 + $(field snap.1.extra_size))) 1 49
limited "$QSNAP_IMG" snapshot -U -l "$img"
if sane "duplicate IDs: snapshot -l" "$img"; then
    awk 'NR > 2 { print $1, $2 }' "$T/l.out" >"$T/ids"
    printf '1 one\n1 two\n3 three\n' >"$T/ids.want"
    cmp -s "$T/ids" "$T/ids.want" ||
        fail "duplicate IDs: listed as $(tr '\n' ' ' <"$T/ids")"
    reads_model "duplicate IDs" "$img" snapshot.id=1 "$T/model.one.raw"
    limited "$QSNAP_IMG" delete "$img" 1
    if sane "duplicate IDs: delete 1" "$img"; then
        "$QEMU_IMG" snapshot -U -l "$img" | awk 'NR > 2 { print $1, $2 }' \
            >"$T/ids"
        printf '1 two\n3 three\n' >"$T/ids.want"
        cmp -s "$T/ids" "$T/ids.want" ||
            fail "duplicate IDs: after delete 1: $(tr '\n' ' ' <"$T/ids")"
        qemu_check "$img" "duplicate IDs, after deleting ID 1"
        accepted=1
        reads_model "duplicate IDs" "$img" two "$T/model.two.raw"
        reads_model "duplicate IDs" "$img" three "$T/model.three.raw"
        run_ok "create after duplicate IDs" "$QSNAP_IMG" snapshot -c four \
            "$img"
        "$QEMU_IMG" snapshot -U -l "$img" | awk '$2 == "four" { print $1 }' \
            >"$T/id4"
        [ "$(cat "$T/id4")" = 4 ] ||
            fail "duplicate IDs: a new snapshot got ID $(cat "$T/id4"), not 4"
        qemu_check "$img" "duplicate IDs, after a new snapshot"
    else
        fail "duplicate IDs: qsnap-img delete by ID failed"
    fi
else
    fail "duplicate IDs (which QEMU lists) are refused"
fi
[ "$failures" != "$dup_failures" ] || echo "  ok duplicate IDs"
dup_failures=$failures

img="$T/dup-name.qcow2"
cp "$P" "$img"
run_ok "dup 1" "$QEMU_IMG" snapshot -c dup "$img"
run_ok "model dup 1" "$QEMU_IMG" convert -O raw "$img" "$T/model.dup1.raw"
run_ok "write" "$QEMU_IO" -c "write -P 0x55 0 3M" "$img"
run_ok "dup 2" "$QEMU_IMG" snapshot -c dup "$img"
run_ok "model dup 2" "$QEMU_IMG" convert -O raw "$img" "$T/model.dup2.raw"
run_ok "write" "$QEMU_IO" -c "write -P 0x66 0 1M" "$img"
limited "$QSNAP_IMG" snapshot -U -l "$img"
accepted=
sane "duplicate names: snapshot -l" "$img" && accepted=1
awk 'NR > 2 { print $1, $2 }' "$T/l.out" >"$T/names"
printf '1 one\n2 two\n3 three\n4 dup\n5 dup\n' >"$T/names.want"
cmp -s "$T/names" "$T/names.want" ||
    fail "duplicate names: listed as $(tr '\n' ' ' <"$T/names")"
reads_model "duplicate names" "$img" dup "$T/model.dup1.raw"
reads_model "duplicate names" "$img" snapshot.id=5 "$T/model.dup2.raw"
run_ok "delete ID 4" "$QSNAP_IMG" delete "$img" 4
qemu_check "$img" "duplicate names, after deleting ID 4"
"$QEMU_IMG" snapshot -U -l "$img" | awk 'NR > 2 { print $1, $2 }' \
    >"$T/names"
printf '1 one\n2 two\n3 three\n5 dup\n' >"$T/names.want"
cmp -s "$T/names" "$T/names.want" ||
    fail "duplicate names: after delete 4: $(tr '\n' ' ' <"$T/names")"
reads_model "duplicate names" "$img" dup "$T/model.dup2.raw"
run_ok "delete dup" "$QSNAP_IMG" snapshot -d dup "$img"
qemu_check "$img" "duplicate names, after deleting the second"
for name in one two three; do
    reads_model "duplicate names" "$img" "$name" "$T/model.$name.raw"
done
[ "$("$QEMU_IMG" snapshot -U -l "$img" | grep -c dup)" = 0 ] ||
    fail "duplicate names: a dup is left"
[ "$failures" != "$dup_failures" ] || echo "  ok duplicate names"

# ------------------------------------------------------------ containers
note "VM state container damage"
V="$T/vmstate.qcow2"
cp "$P" "$V"
mkdir "$T/state"
random_bytes 201 1048576 >"$T/state/mem0"
head -c 1048576 /dev/zero >>"$T/state/mem0"
random_bytes 202 1048576 >>"$T/state/mem0"
random_bytes 203 600000 >"$T/state/mem1"
printf '{"vcpus": 2, "memory": "3M"}\n' >"$T/state/cfg"
run_ok "checkpoint" "$QSNAP_IMG" vmstate store "$V" ck "$T/state"
run_ok "model ck" "$QEMU_IMG" convert -l snapshot.name=ck -O raw "$V" \
    "$T/model.ck.raw"
qemu_check "$V" "the pristine checkpoint"

# vm_case NAME PATCH-ARGS...: damage checkpoint ck's container.
vm_case()
{
    vc_name=$1
    shift
    img="$T/bad-$vc_name.qcow2"
    ctx="container: $vc_name"
    vc_failures=$failures
    cp "$V" "$img"
    if ! "$SNAP_DRIVER" vmpatch "$img" ck "$@" >"$T/patch.out" 2>&1; then
        cat "$T/patch.out" >&2
        die "$ctx: snap-driver vmpatch failed"
    fi
    accepted=1
    limited "$QSNAP_IMG" vmstate list -U "$img" ck
    sane "$ctx: vmstate list" "$img" || true
    rm -rf "$T/out"
    if [ "$vc_name" = chunk ]; then
        # The damaged chunk fails naming section and chunk; the other
        # sections still read.
        k=$(cat "$T/patch.out")
        must_fail "$ctx: extract" "$img" "$QSNAP_IMG" vmstate extract -U \
            "$img" ck "$T/out" || true
        must_fail "$ctx: read mem0" "$img" "$SNAP_DRIVER" section-read \
            "$img" ck mem0 "$T/sec" || true
        if ! grep -q "mem0" "$T/l.err" ||
            ! grep -q "chunk $k\\b" "$T/l.err"; then
            fail "$ctx: the message does not name section mem0 and chunk $k"
        fi
        for sec in mem1 cfg; do
            limited "$SNAP_DRIVER" section-read "$img" ck "$sec" "$T/sec"
            if sane "$ctx: read $sec" "$img"; then
                cmp -s "$T/sec" "$T/state/$sec" ||
                    fail "$ctx: section $sec reads wrong"
            else
                fail "$ctx: undamaged section $sec does not read"
            fi
        done
        rm -f "$T/sec"
    else
        must_fail "$ctx: extract" "$img" "$QSNAP_IMG" vmstate extract -U \
            "$img" ck "$T/out" || true
    fi
    rm -rf "$T/out"
    # The disks of every snapshot, the checkpoint's too, are unharmed.
    for name in one two three ck; do
        reads_model "$ctx" "$img" "$name" "$T/model.$name.raw"
    done
    # A damaged checkpoint can be deleted.
    run_ok "$ctx: delete ck" "$QSNAP_IMG" snapshot -d ck "$img"
    qemu_check "$img" "$ctx, after deleting ck"
    rm -f "$img"
    [ "$failures" != "$vc_failures" ] || echo "  ok $ctx"
}

vm_case chunk chunk mem0 2
vm_case section-size-plus-one size mem1 600001
vm_case section-size-huge size mem1 1152921504606846976
vm_case section-size-zero size mem0 0
vm_case chunk-offset-past-end chunk-off mem1 1 1099511627776
vm_case chunk-length-huge chunk-len mem1 0 4294967280
vm_case chunk-length-zero chunk-len mem0 0 0
vm_case sections-huge n-sections 65537
vm_case sections-one-more n-sections 4
vm_case dir-size-huge dir-size 1099511627776
vm_case dir-flipped dir

[ "$failures" = 0 ] || die "$failures checks failed"
echo "$me: damaged snapshot tables and containers are refused cleanly"
