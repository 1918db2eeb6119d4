#!/bin/sh
# vmstate.sh - the VMM save path: checkpoints with VM state.
#
# 1. A checkpoint whose memory section is 4 GiB of mostly zero pages,
#    streamed by snap-driver from a generator (no such file exists), is
#    stored in under 5% of its size (sections' stored bytes and file
#    growth alike) and reads back identical at random offsets; qemu-img
#    lists it with its VM state size and checks the image clean.
# 2. A cloud-hypervisor-like set (vm.json, memory-region-0,
#    memory-region-1), a StratoVirt-like set (state, memory) and a set of
#    edge cases (empty file, one byte, exactly one chunk, one chunk and a
#    byte) round-trip byte for byte through `qsnap-img vmstate store` /
#    `snapshot -c NAME --vmstate DIR` and `vmstate extract`; `vmstate list`
#    gives every name and size, and the checkpoint's disk is the live disk
#    of that moment.
# 3. An aborted checkpoint (sections and raw stream) leaves nothing: no
#    snapshot, qemu-img check clean, the name free again, and after
#    `qsnap-img compact` the file within two clusters of its size before.
# 4. A checkpoint begun, written and flushed by a process killed with
#    SIGKILL before commit leaves no snapshot and nothing worse than leaked
#    clusters; the next checkpoint (same name) works, a leak repair makes
#    qemu-img check clean, and once that checkpoint is deleted and the
#    file compacted, nothing of the killed one is left.
# 5. Readers of a view of an older snapshot keep reading its content while
#    another thread writes, zeroes and discards the live disk (snap-driver
#    race, a few seconds; once more while snapshots are also being created
#    and deleted).
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need timeout
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"
: "${SNAP_DRIVER:=$top_builddir/tests/snap-driver}"
need_built "$SNAP_DRIVER"

RACE_SECONDS=${QSNAP_RACE_SECONDS:-4}
note "seed from the environment: QSNAP_SEED=$QSNAP_SEED"

# json_snap_field FILE FIELD: "NAME VALUE" for each object with a name,
# of a JSON document (a numeric FIELD), in document order.
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

fsize()
{
    stat -c %s "$1"
}

# snapshot_names IMAGE: the snapshot names qemu-img lists, one a line.
snapshot_names()
{
    "$QEMU_IMG" snapshot -U -l "$1" | awk 'NR > 2 { print $2 }'
}

# ------------------------------------------------------------ part 1
note "1. a 4 GiB memory section of mostly zero pages"
img="$T/big.qcow2"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 "$img" 64M
run_ok "writes" "$QSNAP_TOOL" write "$img" 0 4M 0x51
size0=$(fsize "$img")
gib4=4294967296
if ! "$SNAP_DRIVER" bigstate "$img" big 4G "$QSNAP_SEED" 300 \
    >"$T/big.out" 2>&1; then
    cat "$T/big.out" >&2
    die "the 4 GiB checkpoint failed (snap-driver bigstate IMG big 4G" \
        "$QSNAP_SEED 300)"
fi
sed 's/^/    /' "$T/big.out"
stored=$(sed -n 's/^stored_total=//p' "$T/big.out")
vmsize=$(sed -n 's/^vmstate_size=//p' "$T/big.out")
growth=$(($(fsize "$img") - size0))
[ "$stored" -lt $((gib4 / 20)) ] ||
    die "4 GiB of mostly zero memory stored in $stored bytes" \
        "(5%: $((gib4 / 20)))"
[ "$growth" -lt $((gib4 / 20)) ] ||
    die "the file grew by $growth bytes for 4 GiB of mostly zero memory"
[ "$vmsize" -ge "$stored" ] ||
    die "VM state size $vmsize is below the stored bytes $stored"
qemu_check "$img" "after the 4 GiB checkpoint"
"$QEMU_IMG" info -U --output=json "$img" >"$T/info.json"
q_vs=$(json_snap_field "$T/info.json" vm-state-size | sed -n 's/^big //p')
[ "$q_vs" = "$vmsize" ] ||
    die "qemu-img shows VM state size '$q_vs' for big, qsnap $vmsize"
run_ok "disk of big" "$QSNAP_TOOL" verify "$img" 0 4M 0x51
rm -f "$img"
echo "  ok 4 GiB stored in $stored bytes, the file grew by $growth"

# ------------------------------------------------------------ part 2
note "2. VM state sets round-trip through vmstate store / extract"
img="$T/vm.qcow2"
run_ok "create" "$QSNAP_IMG" create -q -f qcow2 "$img" 32M
truncate -s 32M "$T/live.raw"
run_ok "writes" "$QSNAP_TOOL" random --seed "$QSNAP_SEED" --ops 50 \
    --max-len 200000 "$T/live.raw" "$img"

# A cloud-hypervisor-like snapshot directory.
ch="$T/ch"
mkdir "$ch"
{
    printf '{"version":"v40.0","config":{"cpus":{"boot_vcpus":2},'
    printf '"memory":{"size":8388608,"shared":false},"disks":[{"path":'
    printf '"/var/lib/vm/disk.qcow2"}]},"state":{"vcpus":['
    i=0
    while [ "$i" -lt 200 ]; do
        printf '{"id":%d,"regs":[%d,%d,%d]},' "$i" $((i * 7)) $((i * 13)) \
            $((i * 17))
        i=$((i + 1))
    done
    printf '{}]}}\n'
} >"$ch/vm.json"
truncate -s 8M "$ch/memory-region-0"
put_bytes "$ch/memory-region-0" 0 65536 101
put_bytes "$ch/memory-region-0" 1052672 4096 102
put_bytes "$ch/memory-region-0" 3141000 300000 103
head -c 500000 /dev/zero | tr '\0' 'x' |
    dd of="$ch/memory-region-0" bs=4096 seek=1200 conv=notrunc status=none
put_bytes "$ch/memory-region-0" 8384512 4096 104
random_bytes 105 $((3 * 1048576 + 123)) >"$ch/memory-region-1"

# A StratoVirt-like one.
sv="$T/sv"
mkdir "$sv"
random_bytes 106 2345 >"$sv/state"
truncate -s 16M "$sv/memory"
put_bytes "$sv/memory" 4096 8192 107
put_bytes "$sv/memory" 12582912 1048576 108

# Edge cases of the chunking (qsnap writes 128 KiB chunks).
edge="$T/edge"
mkdir "$edge"
: >"$edge/empty"
printf 'x' >"$edge/one-byte"
random_bytes 109 131072 >"$edge/one-chunk"
random_bytes 110 131073 >"$edge/chunk-and-a-byte"
head -c 131072 /dev/zero >"$edge/zero-chunk"

# roundtrip NAME DIR HOW: store DIR as checkpoint NAME, extract, compare.
roundtrip()
{
    case $3 in
    store) run_ok "store $1" "$QSNAP_IMG" vmstate store "$img" "$1" "$2" ;;
    snapshot)
        run_ok "snapshot $1" "$QSNAP_IMG" snapshot -c "$1" --vmstate "$2" \
            "$img"
        ;;
    esac
    cp --sparse=always "$T/live.raw" "$T/model.$1.raw"
    qemu_check "$img" "after storing $1"
    rm -rf "$T/out"
    run_ok "extract $1" "$QSNAP_IMG" vmstate extract -U "$img" "$1" "$T/out"
    (cd "$2" && ls -A) >"$T/names.in"
    (cd "$T/out" && ls -A) >"$T/names.out"
    if ! cmp -s "$T/names.in" "$T/names.out"; then
        diff "$T/names.in" "$T/names.out" >&2 || true
        die "$1: vmstate extract gave other files than were stored"
    fi
    while read -r f; do
        cmp "$2/$f" "$T/out/$f" ||
            die "$1: section $f does not round-trip"
    done <"$T/names.in"
    # vmstate list: every section with its size.
    run_ok "list $1" "$QSNAP_IMG" vmstate list -U --output=json "$img" "$1"
    while read -r f; do
        want="$f $(fsize "$2/$f")"
        json_snap_field "$T/run.out" size | grep -qx "$want" ||
            die "$1: vmstate list does not show '$want'"
    done <"$T/names.in"
    # The checkpoint's disk is the live disk when it was taken.
    rm -f "$T/disk.raw"
    run_ok "disk of $1" "$QEMU_IMG" convert -U -l "snapshot.name=$1" \
        -O raw "$img" "$T/disk.raw"
    "$QEMU_IMG" compare -q -f raw -F raw "$T/disk.raw" "$T/model.$1.raw" ||
        die "$1: the checkpoint's disk is not the disk it was taken of"
    rm -rf "$T/out" "$T/disk.raw"
    echo "  ok $1: $(wc -l <"$T/names.in") sections round-trip"
}

roundtrip ch-ckpt "$ch" store
run_ok "writes" "$QSNAP_TOOL" random --seed $((QSNAP_SEED + 1)) --ops 50 \
    --max-len 200000 "$T/live.raw" "$img"
roundtrip sv-ckpt "$sv" snapshot
roundtrip edge-ckpt "$edge" store
# The first checkpoints are unchanged by the later ones.
rm -rf "$T/out"
run_ok "extract again" "$QSNAP_IMG" vmstate extract -U "$img" ch-ckpt \
    "$T/out"
cmp "$ch/memory-region-0" "$T/out/memory-region-0" ||
    die "ch-ckpt changed after later checkpoints"
qemu_compare "$img" "$T/live.raw" "live disk after the checkpoints"

# ------------------------------------------------------------ part 3
note "3. an aborted checkpoint leaves nothing"
run_ok "compact" "$QSNAP_IMG" compact "$img"
snapshot_names "$img" >"$T/names.before"
base=$(fsize "$img")
cs=65536
for mode in sections raw; do
    if ! "$SNAP_DRIVER" abort "$img" aborted 20M "$mode" >"$T/ab.out" 2>&1
    then
        cat "$T/ab.out" >&2
        die "checkpoint abort ($mode) failed"
    fi
    qemu_check "$img" "after an aborted checkpoint ($mode)"
    snapshot_names "$img" >"$T/names.after"
    cmp -s "$T/names.before" "$T/names.after" ||
        die "an aborted checkpoint ($mode) changed the snapshot list"
    run_ok "compact" "$QSNAP_IMG" compact "$img"
    now=$(fsize "$img")
    [ "$now" -le $((base + 2 * cs)) ] ||
        die "after an aborted $mode checkpoint and compact the file is" \
            "$now bytes, $base before"
    qemu_compare "$img" "$T/live.raw" "live disk after abort ($mode)"
    echo "  ok abort ($mode): file $now bytes after compact, $base before"
done
# The name is free again.
roundtrip aborted "$sv" store
run_ok "delete" "$QSNAP_IMG" snapshot -d aborted "$img"

# ------------------------------------------------------------ part 4
note "4. a checkpoint killed before commit"
"$SNAP_DRIVER" hold "$img" killed 24M >"$T/hold.out" 2>&1 &
hold_pid=$!
i=0
while ! grep -q written "$T/hold.out" 2>/dev/null; do
    if ! kill -0 "$hold_pid" 2>/dev/null; then
        cat "$T/hold.out" >&2
        die "snap-driver hold ended before writing its checkpoint"
    fi
    i=$((i + 1))
    [ "$i" -lt 200 ] || {
        kill -9 "$hold_pid" 2>/dev/null || true
        die "snap-driver hold did not write its checkpoint in 20 s"
    }
    sleep 0.1
done
kill -9 "$hold_pid"
wait "$hold_pid" 2>/dev/null || true
# The killed writer's image lock can outlive it by a moment.
i=0
while "$QEMU_IMG" info "$img" 2>&1 | grep -q "lock"; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || die "$img stays locked after its writer was killed"
    sleep 0.1
done
snapshot_names "$img" >"$T/names.after"
cmp -s "$T/names.before" "$T/names.after" ||
    die "a checkpoint killed before commit left a snapshot"
set +e
"$QEMU_IMG" check "$img" >"$T/check.out" 2>&1
rc=$?
set -e
case $rc in
0 | 3) ;;
*)
    cat "$T/check.out" >&2
    die "after a killed checkpoint qemu-img check exits $rc (corruption)"
    ;;
esac
qemu_compare "$img" "$T/live.raw" "live disk after the killed checkpoint"
roundtrip killed "$ch" store
run_ok "repair leaks" "$QSNAP_IMG" check -r leaks "$img"
qemu_check "$img" "after the leak repair"
# Nothing of the interrupted checkpoint outlives the next one.
run_ok "delete" "$QSNAP_IMG" snapshot -d killed "$img"
run_ok "compact" "$QSNAP_IMG" compact "$img"
now=$(fsize "$img")
[ "$now" -le $((base + 2 * cs)) ] ||
    die "after a killed checkpoint, the next one, its deletion and compact" \
        "the file is $now bytes, $base before"
qemu_check "$img" "after the killed checkpoint was cleaned up"
echo "  ok killed checkpoint: no snapshot, qemu-img check exit $rc" \
    "before repair"

# ------------------------------------------------------------ part 5
note "5. views read while the live disk is written (${RACE_SECONDS}s each)"
for mode in "" --snapshots; do
    img="$T/race.qcow2"
    rm -f "$img"
    run_ok "create" "$QSNAP_IMG" create -q -f qcow2 -o cluster_size=4096 \
        "$img" 24M
    # shellcheck disable=SC2086  # $mode is empty or one flag
    if ! timeout 120 "$SNAP_DRIVER" race "$img" "$RACE_SECONDS" \
        "$QSNAP_SEED" "$T/expect.raw" $mode >"$T/race.out" 2>&1; then
        cat "$T/race.out" >&2
        die "concurrent view reads and live writes failed (snap-driver" \
            "race IMG $RACE_SECONDS $QSNAP_SEED EXPECT $mode)"
    fi
    qemu_check "$img" "after the race $mode"
    rm -f "$T/disk.raw"
    run_ok "read race-base" "$QEMU_IMG" convert -U -l snapshot.name=race-base \
        -O raw "$img" "$T/disk.raw"
    cmp -s "$T/disk.raw" "$T/expect.raw" ||
        die "snapshot race-base changed during the race $mode"
    echo "  ok race ${mode:-(writes only)}: $(cat "$T/race.out")"
done

echo "$me: checkpoints and VM state behave"
