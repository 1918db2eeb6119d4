#!/bin/sh
# The main job, on a small image made here: create an image, put data in
# it, inspect and check it, then copy it out compressed and compare.
# Runs from the build directory (make demo) or with QSNAP_IMG set.
set -eu

img_tool=${QSNAP_IMG:-./qsnap-img/qsnap-img}
work=$(mktemp -d "${TMPDIR:-/tmp}/qsnap-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

step() {
    printf '\n$ %s\n' "$*"
    "$@"
}

# Guest data: 4 MiB of text, a hole, 2 MiB of random bytes.
yes 'qsnap demo data' | head -c 4194304 >"$work/guest.raw"
truncate -s 8M "$work/guest.raw"
head -c 2097152 /dev/urandom >>"$work/guest.raw"
truncate -s 16M "$work/guest.raw"

step "$img_tool" create -f qcow2 "$work/disk.qcow2" 16M
step "$img_tool" convert -f raw -O qcow2 "$work/guest.raw" "$work/disk.qcow2"
step "$img_tool" info "$work/disk.qcow2"
step "$img_tool" map "$work/disk.qcow2"
step "$img_tool" check "$work/disk.qcow2"
step "$img_tool" convert -c -O qcow2 -o compression_type=zstd \
    "$work/disk.qcow2" "$work/small.qcow2"
step "$img_tool" compare "$work/disk.qcow2" "$work/small.qcow2"
step "$img_tool" resize "$work/small.qcow2" +16M
step "$img_tool" info --output=json "$work/small.qcow2"
printf '\ndemo finished\n'
