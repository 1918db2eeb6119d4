#!/bin/sh
# free_cycles.sh - space freed by discard is reused, not leaked.
#
# 20 cycles of: fill the whole disk (qsnap-tool fill), check the content
# with qemu-io, discard everything (qsnap-tool discard-all), check it
# reads as zeros.  The file's apparent size and its allocated blocks after
# each fill must stay within one cycle's worth (the virtual size) of the
# first fill, and `qemu-img check` must find no leak after every cycle.
# Then the same with compressed clusters, which share host clusters.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_TOOL"

CYCLES=${QSNAP_FREE_CYCLES:-20}

# cycles IMAGE SIZE-BYTES COUNT DESCRIPTION [--compressed]
cycles()
{
    c_img=$1
    c_size=$2
    c_desc=$4
    c_mode=${5:-}
    first_size=
    first_blocks=
    c=1
    while [ "$c" -le "$3" ]; do
        pat=$(( (c * 37) % 255 + 1 ))
        # shellcheck disable=SC2086  # $c_mode is empty or one flag
        run_ok "$c_desc fill $c" "$QSNAP_TOOL" fill $c_mode "$c_img" "$pat"
        run_ok "$c_desc content $c" "$QEMU_IO" \
            -c "read -P $pat 0 $c_size" "$c_img"
        grep -q "Pattern verification failed" "$T/run.out" &&
            die "$c_desc: cycle $c: the filled disk reads wrong"
        size=$(stat -c %s "$c_img")
        blocks=$(( $(stat -c %b "$c_img") * $(stat -c %B "$c_img") ))
        if [ -z "$first_size" ]; then
            first_size=$size
            first_blocks=$blocks
        fi
        if [ "$size" -gt $((first_size + c_size)) ]; then
            die "$c_desc: cycle $c: file size $size, first cycle $first_size" \
                "(grew by more than $c_size)"
        fi
        if [ "$blocks" -gt $((first_blocks + c_size)) ]; then
            die "$c_desc: cycle $c: $blocks bytes allocated, first cycle" \
                "$first_blocks (grew by more than $c_size)"
        fi
        run_ok "$c_desc discard $c" "$QSNAP_TOOL" discard-all "$c_img"
        qemu_check "$c_img" "$c_desc after discard cycle $c"
        run_ok "$c_desc zeros $c" "$QEMU_IO" -c "read -P 0 0 $c_size" \
            "$c_img"
        grep -q "Pattern verification failed" "$T/run.out" &&
            die "$c_desc: cycle $c: the discarded disk does not read as zeros"
        d_blocks=$(( $(stat -c %b "$c_img") * $(stat -c %B "$c_img") ))
        echo "  cycle $c: file $size bytes, $blocks allocated after fill," \
            "$d_blocks after discard"
        c=$((c + 1))
    done
    echo "  ok $c_desc: $3 cycles, file within $c_size bytes of the first"
}

img="$T/f.qcow2"
note "fill / discard-all cycles, 64 KiB clusters"
"$QEMU_IMG" create -q -f qcow2 "$img" 32M
cycles "$img" 33554432 "$CYCLES" "64k clusters"

note "fill / discard-all cycles, 4 KiB clusters, refcount_bits=1"
rm -f "$img"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 "$img" 8M
cycles "$img" 8388608 "$CYCLES" "4k clusters"

note "compressed fill / discard-all cycles"
rm -f "$img"
"$QEMU_IMG" create -q -f qcow2 -o cluster_size=4096 "$img" 8M
cycles "$img" 8388608 $(( (CYCLES + 1) / 2 )) "compressed" --compressed

echo "$me: freed space was reused"
