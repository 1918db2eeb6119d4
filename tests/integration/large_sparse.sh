#!/bin/sh
# large_sparse.sh - 1 TiB and 64 TiB sparse images.
#
# Images created by qemu-img, qsnap_create() and qsnap-img (when built)
# get a few clusters written by qsnap near the start, across the middle
# and at the very end (aligned and unaligned).  `qemu-img check` must be
# clean, qemu-io must read the data back with the right patterns and zeros
# around it, and the file must stay small.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_TOOL"

creators="qemu-img qsnap_create"
if qsnap_img_usable; then
    creators="$creators qsnap-img"
fi

TiB=1099511627776

# create CREATOR IMAGE SIZE-BYTES CLUSTER
create()
{
    rm -f "$2"
    case $1 in
    qemu-img)
        run_ok "qemu-img create" "$QEMU_IMG" create -q -f qcow2 \
            -o "cluster_size=$4" "$2" "$3"
        ;;
    qsnap-img)
        run_ok "qsnap-img create" "$QSNAP_IMG" create -f qcow2 \
            -o "cluster_size=$4" "$2" "$3"
        ;;
    *)
        run_ok "qsnap-tool create" "$QSNAP_TOOL" create --cluster-size "$4" \
            "$2" "$3"
        ;;
    esac
}

# write OFFSET LENGTH PATTERN, recorded for the read-back.
write()
{
    run_ok "write at $1" "$QSNAP_TOOL" write "$img" "$1" "$2" "$3"
    echo "read -P $3 $1 $2" >>"$T/reads"
}

for size_t in 1 64; do
    size=$((size_t * TiB))
    for cs in 65536 2097152; do
        for creator in $creators; do
            desc="$size_t TiB, cluster $cs, created by $creator"
            img="$T/big.qcow2"
            create "$creator" "$img" "$size" "$cs"
            : >"$T/reads"
            mid=$((size / 2))
            write 0 "$cs" 0x11
            write $((3 * cs + 512)) 1000 0x12
            write $((mid - cs / 2)) "$cs" 0x21
            write $((mid + 5 * cs - 7)) 77 0x22
            write $((size - cs)) $((cs - 512)) 0x31
            write $((size - 512)) 512 0x32
            write $((size - 3 * cs - 100)) 200 0x33
            qemu_check "$img" "$desc"
            # Zeros around the writes, then the data.
            set -- -c "read -P 0 $cs $cs" -c "read -P 0 $((mid + cs)) $cs" \
                -c "read -P 0 $((size - 2 * cs)) $cs"
            while read -r line; do
                set -- "$@" -c "$line"
            done <"$T/reads"
            run_ok "read back ($desc)" "$QEMU_IO" -r "$@" "$img"
            if grep -q "Pattern verification failed" "$T/run.out"; then
                cat "$T/run.out" >&2
                die "$desc: data does not read back"
            fi
            # qsnap reads its own writes back too.
            while read -r _ _ pat off len; do
                run_ok "verify ($desc)" "$QSNAP_TOOL" verify "$img" "$off" \
                    "$len" "$pat"
            done <"$T/reads"
            fsize=$(stat -c %s "$img")
            [ "$fsize" -lt $((64 * 1048576)) ] ||
                die "$desc: the file is $fsize bytes for 7 small writes"
            echo "  ok $desc: file $fsize bytes"
        done
    done
done

echo "$me: large sparse images work"
