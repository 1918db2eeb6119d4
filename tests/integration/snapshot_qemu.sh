#!/bin/sh
# snapshot_qemu.sh - internal snapshots shared with QEMU, both directions.
#
# 1. Snapshots made by `qemu-img snapshot -c` (over data written by
#    qemu-io: plain, compressed, zero and discarded clusters, a grown
#    disk), on several cluster sizes, v2 and v3, zstd compression and
#    extended L2 entries: qsnap-img convert -l (by name, by snapshot.id=,
#    by snapshot.name=) and a qsnap view read each one exactly as
#    qemu-img convert -l does, and qsnap-img snapshot -l shows the same
#    IDs, names and VM state sizes as qemu-img.
# 2. Snapshots made by qsnap (qsnap-img snapshot -c, and a checkpoint with
#    VM state sections) over writes mirrored on raw models: qemu-img
#    snapshot -a of each gives its model's content, qemu-img check stays
#    clean, qemu-img snapshot -d of one leaves the others readable.
# 3. A real VMM: qemu-system-x86_64, paused, runs `savevm snap1` on an
#    image that already holds a qsnap snapshot.  qsnap lists snap1 with the
#    VM state size qemu-img shows, `qsnap-img vmstate dump` gives QEMU's
#    stream (magic QEVM); qsnap then creates, applies and deletes other
#    snapshots and writes the live disk; afterwards `-loadvm snap1` with
#    `info status` and `quit` succeeds without any error text, the disk is
#    snap1's again, and qemu-img check is clean.
# Parts 1 and 2 always run; without qemu-system-x86_64 (Debian package
# qemu-system-x86) part 3 cannot, and the script exits 77 after them.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need timeout
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"
: "${SNAP_DRIVER:=$top_builddir/tests/snap-driver}"
need_built "$SNAP_DRIVER"
: "${QEMU_SYSTEM:=qemu-system-x86_64}"

failures=0

fail()
{
    echo "  FAIL $*" >&2
    failures=$((failures + 1))
}

# json_snap_field FILE FIELD: "NAME VALUE" for each snapshot object of a
# JSON document (a numeric FIELD), in document order.
json_snap_field()
{
    tr -d ' \n' <"$1" | sed 's/[{}]/\n/g' | awk -v f="$2" '
        match($0, /"name":"[^"]*"/) {
            n = substr($0, RSTART + 8, RLENGTH - 9)
            if (match($0, "\"" f "\":-?[0-9]+")) {
                print n, substr($0, RSTART + length(f) + 3,
                    RLENGTH - length(f) - 3)
            }
        }'
}

# qio IMAGE COMMAND...: qemu-io commands that must all succeed.
qio()
{
    q_img=$1
    shift
    set --
    for q_c in $qio_cmds; do
        set -- "$@" -c "$(echo "$q_c" | tr '_' ' ')"
    done
    if ! "$QEMU_IO" -f qcow2 "$@" "$q_img" >"$T/qio.out" 2>&1 ||
        grep -qi "error\|failed" "$T/qio.out"; then
        cat "$T/qio.out" >&2
        die "qemu-io on $q_img failed"
    fi
}

# table IMAGE TOOL: "ID NAME VMSIZE" lines of `snapshot -l` by TOOL.
table()
{
    "$2" snapshot -U -l "$1" | awk 'NR > 2 { print $1, $2, $3, $4 }'
}

# same_snapshot IMAGE SPEC-FOR-QEMU SPEC-FOR-QSNAP VIEW-NAME CONTEXT:
# qemu-img convert -l, qsnap-img convert -l and a view agree.
same_snapshot()
{
    rm -f "$T/q.raw" "$T/s.raw" "$T/v.raw"
    if ! "$QEMU_IMG" convert -U -l "$2" -O raw "$1" "$T/q.raw" \
        >"$T/out" 2>&1; then
        cat "$T/out" >&2
        fail "$5: qemu-img convert -l $2"
        return 0
    fi
    if ! "$QSNAP_IMG" convert -U -l "$3" -O raw "$1" "$T/s.raw" \
        >"$T/out" 2>&1; then
        cat "$T/out" >&2
        fail "$5: qsnap-img convert -l $3"
        return 0
    fi
    if ! "$QEMU_IMG" compare -q -f raw -F raw "$T/q.raw" "$T/s.raw"; then
        fail "$5: qsnap-img convert -l $3 differs from qemu-img's"
    fi
    if ! "$SNAP_DRIVER" view-dump "$1" "$4" "$T/v.raw" >"$T/out" 2>&1; then
        cat "$T/out" >&2
        fail "$5: view of $4"
        return 0
    fi
    if ! "$QEMU_IMG" compare -q -f raw -F raw "$T/q.raw" "$T/v.raw"; then
        fail "$5: the view of $4 differs from qemu-img's reading"
    fi
}

# ------------------------------------------------------------ part 1
note "1. snapshots made by qemu-img, read by qsnap"

# from_qemu CLUSTER COMPAT REFBITS [OPTIONS]
from_qemu()
{
    cs=$1
    img="$T/q.qcow2"
    ctx="qemu-made, cluster=$cs compat=$2 refcount_bits=$3${4:+ $4}"
    rm -f "$img"
    run_ok "create" "$QEMU_IMG" create -q -f qcow2 \
        -o "cluster_size=$cs,compat=$2,refcount_bits=$3${4:+,$4}" "$img" 24M
    c4=$((cs * 4))
    qio_cmds="write_-P_0x11_0_4M write_-P_0x12_5M_$c4 write_-c_-P_0x13_16M_$cs"
    qio_cmds="$qio_cmds write_-P_0x14_$((10 * 1048576 + 1536))_7000"
    qio "$img"
    run_ok "snapshot s1" "$QEMU_IMG" snapshot -c s1 "$img"
    qio_cmds="write_-P_0x21_1M_1M write_-z_5M_$cs discard_0_$c4"
    if [ "$2" = 1.1 ]; then
        qio_cmds="$qio_cmds write_-z_-u_2M_$((cs * 2))"
    fi
    qio_cmds="$qio_cmds write_-c_-P_0x22_20M_$cs"
    qio "$img"
    run_ok "snapshot s2" "$QEMU_IMG" snapshot -c s2 "$img"
    qio_cmds="write_-P_0x31_3M_3M discard_16M_$cs"
    qio "$img"
    # QEMU grows v3 images with snapshots, never v2 ones.
    s3_size=25165824
    if [ "$2" = 1.1 ]; then
        run_ok "resize" "$QEMU_IMG" resize -q "$img" 28M
        qio_cmds="write_-P_0x32_26M_1M"
        qio "$img"
        s3_size=29360128
    fi
    run_ok "snapshot s3" "$QEMU_IMG" snapshot -c s3 "$img"
    qio_cmds="write_-P_0x41_0_8M"
    qio "$img"

    same_snapshot "$img" snapshot.name=s1 s1 s1 "$ctx, s1 by name"
    same_snapshot "$img" snapshot.id=2 snapshot.id=2 s2 "$ctx, s2 by id"
    same_snapshot "$img" snapshot.name=s3 snapshot.name=s3 3 "$ctx, s3"
    # The live disk too.
    qs=$("$QSNAP_TOOL" digest "$img")
    qd=$(qemu_digest "$img")
    [ "$qs" = "$qd" ] || fail "$ctx: live disk digest $qs, qemu-img's $qd"
    table "$img" "$QEMU_IMG" >"$T/t.qemu"
    table "$img" "$QSNAP_IMG" >"$T/t.qsnap"
    if ! cmp -s "$T/t.qemu" "$T/t.qsnap"; then
        diff "$T/t.qemu" "$T/t.qsnap" >&2 || true
        fail "$ctx: qsnap-img snapshot -l differs from qemu-img's"
    fi
    # The sizes qsnap records: the disk size at each snapshot.
    "$QSNAP_IMG" list -U --output=json "$img" >"$T/l.json" 2>&1 ||
        fail "$ctx: qsnap-img list"
    json_snap_field "$T/l.json" disk-size | head -n 3 >"$T/sizes"
    printf 's1 25165824\ns2 25165824\ns3 %s\n' "$s3_size" >"$T/sizes.want"
    cmp -s "$T/sizes" "$T/sizes.want" ||
        fail "$ctx: disk sizes $(tr '\n' ' ' <"$T/sizes")"
    echo "  ok $ctx"
}

from_qemu 65536 1.1 16
from_qemu 512 0.10 16
from_qemu 2097152 1.1 4
from_qemu 4096 1.1 64
from_qemu 65536 1.1 16 compression_type=zstd
from_qemu 65536 1.1 16 extended_l2=on

# ------------------------------------------------------------ part 2
note "2. snapshots made by qsnap, applied by qemu-img"

# to_qemu CLUSTER COMPAT REFBITS SEED
to_qemu()
{
    img="$T/s.qcow2"
    ctx="qsnap-made, cluster=$1 compat=$2 refcount_bits=$3"
    rm -f "$img" "$T"/m.*.raw
    run_ok "create" "$QSNAP_IMG" create -q -f qcow2 \
        -o "cluster_size=$1,compat=$2,refcount_bits=$3" "$img" 16M
    truncate -s 16M "$T/m.live.raw"
    maxlen=$(($1 * 3))
    for snap in a b; do
        run_ok "writes" "$QSNAP_TOOL" random --seed "$4" --ops 40 \
            --max-len "$maxlen" "$T/m.live.raw" "$img"
        run_ok "snapshot $snap" "$QSNAP_IMG" snapshot -c "$snap" "$img"
        cp --sparse=always "$T/m.live.raw" "$T/m.$snap.raw"
        set -- "$1" "$2" "$3" $(($4 + 1))
    done
    # A checkpoint with VM state sections, as another VMM would leave it.
    mkdir -p "$T/state"
    random_bytes 7 300000 >"$T/state/memory"
    echo '{"cpus": 1}' >"$T/state/config.json"
    run_ok "writes" "$QSNAP_TOOL" random --seed "$4" --ops 40 \
        --max-len "$maxlen" "$T/m.live.raw" "$img"
    run_ok "checkpoint c" "$QSNAP_IMG" snapshot -c c --vmstate "$T/state" \
        "$img"
    cp --sparse=always "$T/m.live.raw" "$T/m.c.raw"
    run_ok "writes" "$QSNAP_TOOL" random --seed $(($4 + 9)) --ops 40 \
        --max-len "$maxlen" "$T/m.live.raw" "$img"
    qemu_check "$img" "$ctx"

    # qemu-img sees the VM state size qsnap recorded.
    "$QSNAP_IMG" snapshot -U -l --output=json "$img" >"$T/l.json"
    "$QEMU_IMG" snapshot -U -l "$img" >"$T/l.qemu"
    vs=$(json_snap_field "$T/l.json" vm-state-size | sed -n 's/^c //p')
    if [ -z "$vs" ] || [ "$vs" -le 300000 ]; then
        fail "$ctx: checkpoint c has VM state size '$vs'"
    fi
    table "$img" "$QEMU_IMG" >"$T/t.qemu"
    table "$img" "$QSNAP_IMG" >"$T/t.qsnap"
    cmp -s "$T/t.qemu" "$T/t.qsnap" ||
        fail "$ctx: qemu-img and qsnap-img list the table differently"

    for snap in b a c; do
        run_ok "qemu-img apply $snap" "$QEMU_IMG" snapshot -a "$snap" "$img"
        qemu_check "$img" "$ctx, after qemu-img snapshot -a $snap"
        if ! "$QEMU_IMG" compare -q -f qcow2 -F raw "$img" \
            "$T/m.$snap.raw"; then
            fail "$ctx: qemu-img snapshot -a $snap does not give its content"
        fi
    done
    run_ok "qemu-img delete b" "$QEMU_IMG" snapshot -d b "$img"
    qemu_check "$img" "$ctx, after qemu-img snapshot -d b"
    for snap in a c; do
        rm -f "$T/out.raw"
        run_ok "read $snap" "$QSNAP_IMG" convert -U -l "$snap" -O raw "$img" \
            "$T/out.raw"
        "$QEMU_IMG" compare -q -f raw -F raw "$T/out.raw" "$T/m.$snap.raw" ||
            fail "$ctx: snapshot $snap changed after qemu-img deleted b"
    done
    run_ok "extract" "$QSNAP_IMG" vmstate extract -U "$img" c "$T/state.out"
    cmp -s "$T/state/memory" "$T/state.out/memory" ||
        fail "$ctx: VM state of c changed"
    rm -rf "$T/state.out"
    echo "  ok $ctx"
}

to_qemu 65536 1.1 16 11
to_qemu 512 0.10 16 12
to_qemu 2097152 1.1 64 13

# ------------------------------------------------------------ part 3
if ! command -v "$QEMU_SYSTEM" >/dev/null 2>&1; then
    [ "$failures" = 0 ] || die "$failures checks failed"
    skip "$QEMU_SYSTEM not found (Debian package qemu-system-x86):" \
        "parts 1 and 2 passed, the savevm/loadvm part did not run"
fi
note "3. QEMU savevm / loadvm around qsnap's edits ($QEMU_SYSTEM)"

img="$T/vm.qcow2"
rm -f "$img"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 "$img" 64M
truncate -s 64M "$T/vm.live.raw"
run_ok "writes" "$QSNAP_TOOL" random --seed 21 --ops 60 --max-len 300000 \
    "$T/vm.live.raw" "$img"
run_ok "snapshot pre" "$QSNAP_IMG" snapshot -c pre "$img"
cp --sparse=always "$T/vm.live.raw" "$T/vm.pre.raw"
run_ok "writes" "$QSNAP_TOOL" random --seed 22 --ops 60 --max-len 300000 \
    "$T/vm.live.raw" "$img"
cp --sparse=always "$T/vm.live.raw" "$T/vm.snap1.raw"

# vmm OUT MONITOR-COMMANDS [ARGS...]: QEMU paused, commands on stdin.
vmm()
{
    vmm_out=$1
    vmm_cmds=$2
    shift 2
    set +e
    printf '%s\n' "$vmm_cmds" | timeout 120 "$QEMU_SYSTEM" -S -nodefaults \
        -display none -machine pc -m 64 \
        -drive "file=$img,if=virtio,format=qcow2" -monitor stdio "$@" \
        >"$vmm_out" 2>&1
    vmm_rc=$?
    set -e
    # The monitor echoes input with terminal escapes; keep the text.
    tr -d '\033' <"$vmm_out" | sed 's/\[[0-9]*[A-Z]//g' >"$vmm_out.txt"
}

vmm "$T/savevm.out" "$(printf 'savevm snap1\nquit')"
if [ "$vmm_rc" != 0 ] || grep -qi "error\|fail" "$T/savevm.out.txt"; then
    cat "$T/savevm.out.txt" >&2
    die "QEMU savevm on a qsnap image failed (exit $vmm_rc)"
fi
qemu_check "$img" "after savevm"
"$QEMU_IMG" snapshot -U -l "$img" >"$T/l.qemu"
qemu_size=$(awk '$2 == "snap1" { print $3, $4 }' "$T/l.qemu")
[ -n "$qemu_size" ] || {
    cat "$T/l.qemu" >&2
    die "qemu-img does not list snap1"
}
"$QSNAP_IMG" snapshot -U -l --output=json "$img" >"$T/l.json"
qsnap_vs=$(json_snap_field "$T/l.json" vm-state-size | sed -n 's/^snap1 //p')
# qemu-img's JSON gives the exact byte count.
"$QEMU_IMG" info -U --output=json "$img" >"$T/info.json"
qemu_vs=$(json_snap_field "$T/info.json" vm-state-size | sed -n 's/^snap1 //p')
if [ -z "$qsnap_vs" ] || [ "$qsnap_vs" != "$qemu_vs" ] ||
    [ "$qsnap_vs" = 0 ]; then
    fail "snap1: qsnap reports VM state size '$qsnap_vs', QEMU '$qemu_vs'"
fi
table "$img" "$QEMU_IMG" >"$T/t.qemu"
table "$img" "$QSNAP_IMG" >"$T/t.qsnap"
cmp -s "$T/t.qemu" "$T/t.qsnap" ||
    fail "after savevm, qsnap-img and qemu-img list different tables"
rm -f "$T/vmstate.bin"
run_ok "vmstate dump" "$QSNAP_IMG" vmstate dump -U "$img" snap1 \
    "$T/vmstate.bin"
magic=$(head -c 4 "$T/vmstate.bin")
[ "$magic" = QEVM ] || fail "snap1's VM state begins with '$magic', not QEVM"
dump_size=$(stat -c %s "$T/vmstate.bin")
[ "$dump_size" = "$qemu_vs" ] ||
    fail "vmstate dump wrote $dump_size bytes, the VM state is $qemu_vs"
note "  savevm: snap1 holds $qemu_vs bytes of VM state ($qemu_size)"
same_snapshot "$img" snapshot.name=snap1 snap1 snap1 "savevm's snap1"
"$QEMU_IMG" compare -q -f raw -F raw "$T/q.raw" "$T/vm.snap1.raw" ||
    fail "snap1's disk is not the disk at savevm"

# qsnap edits the image: create, apply, delete, write.
run_ok "snapshot other1" "$QSNAP_IMG" snapshot -c other1 "$img"
run_ok "writes" "$QSNAP_TOOL" random --seed 23 --ops 40 --max-len 300000 \
    "$T/vm.live.raw" "$img"
run_ok "apply pre" "$QSNAP_IMG" snapshot -a pre "$img"
cp --sparse=always "$T/vm.pre.raw" "$T/vm.live.raw"
run_ok "writes" "$QSNAP_TOOL" random --seed 24 --ops 40 --max-len 300000 \
    "$T/vm.live.raw" "$img"
run_ok "delete other1" "$QSNAP_IMG" snapshot -d other1 "$img"
run_ok "checkpoint other2" "$QSNAP_IMG" snapshot -c other2 \
    --vmstate "$T/state" "$img"
run_ok "writes" "$QSNAP_TOOL" random --seed 25 --ops 40 --max-len 300000 \
    "$T/vm.live.raw" "$img"
qemu_check "$img" "after qsnap's edits"
qemu_compare "$img" "$T/vm.live.raw" "after qsnap's edits"

vmm "$T/loadvm.out" "$(printf 'info status\nquit')" -loadvm snap1
if [ "$vmm_rc" != 0 ] || grep -qi "error\|fail\|invalid" "$T/loadvm.out.txt"
then
    cat "$T/loadvm.out.txt" >&2
    fail "QEMU -loadvm snap1 after qsnap's edits failed (exit $vmm_rc)"
fi
grep -q "VM status: " "$T/loadvm.out.txt" || {
    cat "$T/loadvm.out.txt" >&2
    fail "QEMU did not answer 'info status' after -loadvm snap1"
}
qemu_check "$img" "after loadvm"
# loadvm reverted the disk to snap1's; the other snapshots are intact.
qemu_compare "$img" "$T/vm.snap1.raw" "after loadvm snap1"
same_snapshot "$img" snapshot.name=pre pre pre "pre after loadvm"
"$QEMU_IMG" compare -q -f raw -F raw "$T/q.raw" "$T/vm.pre.raw" ||
    fail "snapshot pre changed"
echo "  ok savevm, qsnap edits, loadvm"

[ "$failures" = 0 ] || die "$failures checks failed"
echo "$me: qsnap and QEMU read each other's snapshots"
