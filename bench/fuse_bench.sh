#!/bin/sh
# bench/fuse_bench.sh - qsnap-fuse against qemu-storage-daemon's FUSE
# export, on the same image, in the same run; a raw file through the page
# cache as the limit.
#
# Run by hand from a build directory (as root, for /dev/fuse and for
# dropping caches):
#   sh /path/to/src/bench/fuse_bench.sh
#
# Environment:
#   QSNAP_FUSE      qsnap-fuse (default ./qsnap-fuse/qsnap-fuse)
#   QSD             qemu-storage-daemon (default: from $PATH)
#   QEMU_IMG        qemu-img (default: from $PATH)
#   CC              compiler for bench/fuseio.c (default cc)
#   FUSE_BENCH_MIB  image size in MiB (default 256)
#   BENCH_REPS      rounds; each figure is the median (default 5)
#
# Workloads, each on a fresh mount (the kernel's cache of the mounted
# file empty, the image file itself in the host's page cache):
#   seq read     1 MiB reads of the whole disk
#   re-read      the same again on the same mount, four times over (the
#                data is in the page cache: one pass takes a few tens of
#                milliseconds, too short to time alone)
#   rand read    4 KiB reads at random offsets (16 MiB worth)
#   rand write   4 KiB writes at random offsets (16 MiB), then fdatasync
#   seq write    1 MiB writes of the whole disk, then fdatasync
# The raw file is a copy of the disk's content, read and written with the
# same requests through the page cache; every round drops its cached pages
# and reads it in again first, as a fresh mount starts.  Figures are MiB/s.
#
# Page cache reads copy from folios: a file system that caches in large
# folios (ext4 does, when reading ahead) serves re-reads up to three times
# faster than one caching in 4 KiB pages, which is what FUSE does in
# kernels without its large-folio support.  /proc/kpageflags tells which
# (COMPOUND_HEAD and _TAIL flags of the pages of an mmap of the file).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
QSNAP_FUSE=${QSNAP_FUSE:-$(pwd)/qsnap-fuse/qsnap-fuse}
QSD=${QSD:-qemu-storage-daemon}
QEMU_IMG=${QEMU_IMG:-qemu-img}
CC=${CC:-cc}
mib=${FUSE_BENCH_MIB:-256}
reps=${BENCH_REPS:-5}

say()
{
    printf '%s\n' "$*" >&2
}

die()
{
    say "fuse_bench: $*"
    exit 1
}

[ -x "$QSNAP_FUSE" ] || die "no $QSNAP_FUSE (run from the build directory)"
command -v "$QSD" >/dev/null 2>&1 || die "no $QSD"
[ -c /dev/fuse ] || die "no /dev/fuse"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fuse-bench.XXXXXX")
qsd_pid=
fuse_pid=
cleanup()
{
    [ -z "$fuse_pid" ] || { fusermount3 -u "$tmp/mnt" 2>/dev/null || :; }
    [ -z "$qsd_pid" ] || { kill "$qsd_pid" 2>/dev/null || :; }
    wait 2>/dev/null || :
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$CC" -O2 -o "$tmp/fuseio" "$here/fuseio.c"
bytes=$((mib * 1048576))
small=$((16 * 1048576))

head -c "$bytes" /dev/urandom >"$tmp/data.raw"
"$QEMU_IMG" convert -f raw -O qcow2 "$tmp/data.raw" "$tmp/img.qcow2"
mkdir "$tmp/mnt"
: >"$tmp/qsd.file"
qsd_export=type=fuse,id=e,node-name=q,writable=on

drop_fuse_caches()
{
    sync
    # Warm the image file in the host cache so both daemons start equal.
    cat "$tmp/img.qcow2" >/dev/null
}

# start TARGET: mounts the image; sets $file.
start()
{
    drop_fuse_caches
    case $1 in
    qsnap)
        "$QSNAP_FUSE" -f -o rw "$tmp/img.qcow2" "$tmp/mnt" &
        fuse_pid=$!
        file=$tmp/mnt/disk
        n=0
        until mountpoint -q "$tmp/mnt"; do
            n=$((n + 1))
            [ "$n" -lt 100 ] || die "qsnap-fuse did not mount"
            sleep 0.1
        done
        ;;
    qsd)
        "$QSD" --blockdev "driver=file,node-name=f,filename=$tmp/img.qcow2" \
            --blockdev driver=qcow2,node-name=q,file=f \
            --export "$qsd_export,mountpoint=$tmp/qsd.file" &
        qsd_pid=$!
        file=$tmp/qsd.file
        n=0
        until grep -q " $tmp/qsd.file " /proc/mounts; do
            n=$((n + 1))
            [ "$n" -lt 100 ] || die "qemu-storage-daemon did not mount"
            sleep 0.1
        done
        ;;
    raw)
        # Fresh pages every round, as a new mount gets: pages kept from
        # the copy's creation (4 KiB folios, wherever they landed) read at
        # 5 or 10 GB/s from one run to the next.
        file=$tmp/data.raw
        sync
        dd if="$file" iflag=nocache count=0 status=none
        cat "$file" >/dev/null
        ;;
    esac
}

stop()
{
    case $1 in
    qsnap)
        fusermount3 -u "$tmp/mnt"
        wait "$fuse_pid"
        fuse_pid=
        ;;
    qsd)
        kill "$qsd_pid"
        wait "$qsd_pid" || :
        qsd_pid=
        ;;
    esac
}

# io MODE BLOCK BYTES: MiB/s of one fuseio run on $file.
io()
{
    "$tmp/fuseio" "$1" "$file" "$2" "$3" | awk '{ print $2 }'
}

# One round for TARGET: appends "workload target MiB/s" lines.
round()
{
    t=$1
    start "$t"
    echo "seq-read $t $(io seqread 1048576 "$bytes")"
    echo "re-read $t $(io seqread 1048576 $((bytes * 4)))"
    stop "$t"
    start "$t"
    echo "rand-read $t $(io randread 4096 "$small")"
    echo "rand-read-hot $t $(io randread 4096 "$small")"
    stop "$t"
    start "$t"
    echo "rand-write $t $(io randwrite 4096 "$small")"
    echo "seq-write $t $(io seqwrite 1048576 "$bytes")"
    stop "$t"
}

say "image: $mib MiB qcow2 (all clusters allocated), $reps rounds"
r=0
while [ "$r" -lt "$reps" ]; do
    if [ $((r % 2)) -eq 0 ]; then
        order="qsd qsnap raw"
    else
        order="qsnap qsd raw"
    fi
    for t in $order; do
        round "$t"
    done
    r=$((r + 1))
done >"$tmp/results"

# The median per workload and target, then the table.
printf '%-14s %10s %10s %10s %10s %10s\n' workload qsd qsnap raw \
    qsnap/qsd qsnap/raw
for w in seq-read re-read rand-read rand-read-hot rand-write seq-write; do
    line=$w
    for t in qsd qsnap raw; do
        v=$(awk -v w="$w" -v t="$t" '$1 == w && $2 == t { print $3 }' \
            "$tmp/results" | sort -g | awk '
            { v[NR] = $1 }
            END { if (NR) { print v[int((NR + 1) / 2)] } else { print 0 } }')
        line="$line $v"
    done
    echo "$line"
done | awk '{
    printf "%-14s %10.1f %10.1f %10.1f %9.2fx %9.2fx\n", $1, $2, $3, $4,
        ($2 > 0 ? $3 / $2 : 0), ($4 > 0 ? $3 / $4 : 0)
}'
