#!/bin/sh
# concurrency.sh - readers, a writer and snapshot operations at once.
#
# On a read-write mount, for $QSNAP_FUSE_STRESS_SECS seconds (default 20):
#   - three readers read snapshots r1..r3 over and over, through the page
#     cache and with O_DIRECT, and compare them with QEMU's reading of
#     the same snapshots;
#   - a fourth reader reads the part of the live disk nobody writes;
#   - a writer copies random pieces of a random file onto the live disk
#     (and onto a raw model), unaligned and aligned;
#   - a loop takes snapshots (mkdir), reads them, renames some and deletes
#     them (rmdir).
# Afterwards the disk matches the model, r1..r3 are unchanged, a final
# snapshot equals the model, only r1..r3 and it remain, and qemu-img finds
# the image clean and equal to the model.
set -eu

# shellcheck source-path=SCRIPTDIR source=fuse_lib.sh
. "$(dirname "$0")/fuse_lib.sh"

need "$QEMU_IO"

secs=${QSNAP_FUSE_STRESS_SECS:-20}
mib=$((1024 * 1024))
size=$((64 * mib))
wsize=$((48 * mib)) # the writer stays below this; readers check above
img="$T/stress.qcow2"
mnt="$T/mnt"

"$QEMU_IMG" create -q -f qcow2 "$img" "$size"
"$QEMU_IO" -f qcow2 -c "write -P 0x01 0 $size" "$img" >/dev/null
for k in 1 2 3; do
    "$QEMU_IO" -f qcow2 \
        -c "write -P $((k * 16)) $((k * 8 * mib)) $((9 * mib))" \
        -c "write -z $((k * 3 * mib)) 300000" "$img" >/dev/null
    "$QEMU_IMG" snapshot -c "r$k" "$img"
    "$QEMU_IMG" convert -l "snapshot.name=r$k" -O raw "$img" "$T/r$k.raw"
done
"$QEMU_IO" -f qcow2 -c "write -P 0x77 $((50 * mib)) $((5 * mib))" "$img" \
    >/dev/null
"$QEMU_IMG" convert -O raw "$img" "$T/model.raw"
dd if="$T/model.raw" of="$T/static.raw" bs=1M skip=48 status=none
head -c $((8 * mib)) /dev/urandom >"$T/src"

# The writer's plan: offset, length and source offset per line.
awk -v seed="$QSNAP_SEED" -v wsize="$wsize" -v src=$((8 * mib)) 'BEGIN {
    srand(seed)
    for (i = 0; i < 20000; i++) {
        len = int(rand() * rand() * 1048576) + 1
        off = int(rand() * (wsize - len))
        if (rand() < 0.5) {
            off = int(off / 65536) * 65536
            len = int((len + 4095) / 4096) * 4096
        }
        printf "%d %d %d\n", off, len, int(rand() * (src - len))
    }
}' >"$T/plan"

fuse_mount "$img" "$mnt" -o rw
pid=$FUSE_PID
note "seed $QSNAP_SEED, $secs s"
end=$(($(date +%s) + secs))

fail()
{
    echo "$*" >>"$T/failures"
}

running()
{
    [ "$(date +%s)" -lt "$end" ]
}

reader()
{
    trap - EXIT
    n=0
    while running; do
        if [ $((n % 2)) -eq 0 ]; then
            cmp -s "$mnt/snapshots/r$1/disk" "$T/r$1.raw" ||
                fail "reader $1: snapshot r$1 differs (cached read $n)"
        else
            dd if="$mnt/snapshots/r$1/disk" bs=1M iflag=direct status=none |
                cmp -s - "$T/r$1.raw" ||
                fail "reader $1: snapshot r$1 differs (direct read $n)"
        fi
        n=$((n + 1))
    done
    echo "$n" >"$T/reads.$1"
}

static_reader()
{
    trap - EXIT
    n=0
    while running; do
        dd if="$mnt/disk" bs=1M skip=48 iflag=direct status=none |
            cmp -s - "$T/static.raw" ||
            fail "static reader: the unwritten part changed (read $n)"
        n=$((n + 1))
    done
    echo "$n" >"$T/reads.static"
}

writer()
{
    trap - EXIT
    n=0
    while read -r off len soff && running; do
        for f in "$mnt/disk" "$T/model.raw"; do
            dd if="$T/src" of="$f" bs=256k iflag=skip_bytes,count_bytes \
                oflag=seek_bytes conv=notrunc skip="$soff" seek="$off" \
                count="$len" status=none ||
                fail "writer: dd to $f failed at $off+$len"
        done
        n=$((n + 1))
    done <"$T/plan"
    echo "$n" >"$T/writes"
}

churner()
{
    trap - EXIT
    n=0
    while running; do
        s="t$n"
        if ! mkdir "$mnt/snapshots/$s"; then
            fail "churn: mkdir $s failed"
            break
        fi
        head -c 3000000 "$mnt/snapshots/$s/disk" >/dev/null ||
            fail "churn: reading $s failed"
        if [ $((n % 3)) -eq 0 ]; then
            mv "$mnt/snapshots/$s" "$mnt/snapshots/u$n" ||
                fail "churn: rename $s failed"
            s="u$n"
        fi
        rmdir "$mnt/snapshots/$s" || fail "churn: rmdir $s failed"
        n=$((n + 1))
    done
    echo "$n" >"$T/churns"
}

reader 1 &
r1=$!
reader 2 &
r2=$!
reader 3 &
r3=$!
static_reader &
r4=$!
writer &
w=$!
churner &
c=$!
wait "$r1" "$r2" "$r3" "$r4" "$w" "$c"

if [ -s "$T/failures" ]; then
    head -n 20 "$T/failures" >&2
    die "$(wc -l <"$T/failures") failures under load"
fi
note "reads $(cat "$T/reads.1") $(cat "$T/reads.2") $(cat "$T/reads.3")" \
    "static $(cat "$T/reads.static"), writes $(cat "$T/writes")," \
    "snapshot cycles $(cat "$T/churns")"
[ "$(cat "$T/writes")" -gt 0 ] || die "the writer did nothing"
[ "$(cat "$T/churns")" -gt 0 ] || die "no snapshot was taken"

same "$mnt/disk" "$T/model.raw" "the live disk after the run"
for k in 1 2 3; do
    same "$mnt/snapshots/r$k/disk" "$T/r$k.raw" "snapshot r$k after the run"
done
mkdir "$mnt/snapshots/final"
same "$mnt/snapshots/final/disk" "$T/model.raw" "the final snapshot"
listing=$(cd "$mnt/snapshots" && echo *)
[ "$listing" = "final r1 r2 r3" ] ||
    die "snapshots/ lists '$listing', expected 'final r1 r2 r3'"
fuse_umount "$mnt" "$pid"

qemu_check "$img"
"$QEMU_IMG" compare -q -f raw -F qcow2 "$T/model.raw" "$img" ||
    die "qemu-img compare: the image differs from the model"
n=$("$QEMU_IMG" snapshot -l "$img" | grep -c -E ' (r[123]|final) ')
[ "$n" -eq 4 ] || die "qemu-img snapshot -l: expected r1 r2 r3 final"
"$QEMU_IMG" convert -l snapshot.name=final -O raw "$img" "$T/final.raw"
same "$T/final.raw" "$T/model.raw" "the final snapshot as QEMU reads it"
note "content matches the model; image clean"
