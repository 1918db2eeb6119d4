#!/bin/sh
# chain_bad.sh - bad backing chains: clear errors, no hang.
#
# Each bad chain is opened through the library (qsnap-tool digest,
# chain-driver list) and through qsnap-img info --backing-chain, under
# `timeout 20`.  Each must fail (not time out) with a message that is not
# empty and names the file involved:
#   - loops a->b->a and a->a, and loops whose names differ: through a
#     symlink, a hard link, and "./x" against "../dir/x" (found by device
#     and inode, not by name);
#   - a chain one image deeper than the documented limit of 64 (and the
#     chain of exactly 64 images opens);
#   - a missing backing file (the message names the path looked for,
#     resolved against the overlay's directory);
#   - a backing name longer than the spec's 1023 bytes, or reaching
#     outside the header cluster, or outside the file (header patched);
#     a name of exactly 1023 bytes works;
#   - the backing format: "qcow2" recorded for a raw file is an error;
#     "raw" recorded for a qcow2 file reads the file's bytes, as QEMU
#     does; an unknown format is an error;
#   - a backing "file" that is a FIFO, /dev/null, /dev/zero or a directory
#     (refused without blocking);
#   - names that look like QEMU's json:{...}, nbd:// or file: syntax are
#     plain file names (such files are created; their content is read,
#     not that of the file QEMU's syntax would name).
# qsnap-img info without --backing-chain opens no backing file: it works
# with the backing file missing, a FIFO, or in a loop (and, where strace
# runs, is seen opening nothing else).
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
. "$(dirname "$0")/lib.sh"

: "${QSNAP_CHAIN_DRIVER:=$top_builddir/tests/chain-driver}"
need "$QEMU_IMG"
need timeout
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"
need_built "$QSNAP_CHAIN_DRIVER"
DRV=$QSNAP_CHAIN_DRIVER

failures=0
D="$T/d"
mkdir -p "$D"
cd "$D"

bad()
{
    echo "  FAIL $*" >&2
    failures=$((failures + 1))
}

# expect_error CASE NAMES COMMAND...: COMMAND must fail within 20 s and
# print a message naming one of the words of NAMES (file names).
expect_error()
{
    e_case=$1
    e_names=$2
    shift 2
    e_rc=0
    timeout 20 "$@" >"$T/out" 2>&1 </dev/null || e_rc=$?
    if [ "$e_rc" = 0 ]; then
        bad "$e_case: '$*' succeeded"
        return
    fi
    if [ "$e_rc" = 124 ] || [ "$e_rc" = 137 ]; then
        bad "$e_case: '$*' hung (killed after 20 s)"
        return
    fi
    if [ ! -s "$T/out" ]; then
        bad "$e_case: '$*' failed without a message"
        return
    fi
    for e_n in $e_names; do
        if grep -qF -- "$e_n" "$T/out"; then
            note "ok: $e_case: ${1##*/} ${2}: $(head -n 1 "$T/out")"
            return
        fi
    done
    sed 's/^/      /' "$T/out" >&2
    bad "$e_case: '$*': the message names none of: $e_names"
}

# expect_open_error CASE NAMES IMAGE: every way of opening IMAGE's chain
# fails with a message naming one of NAMES.
expect_open_error()
{
    expect_error "$1" "$2" "$QSNAP_TOOL" digest "$3"
    expect_error "$1" "$2" "$DRV" list "$3"
    expect_error "$1" "$2" "$QSNAP_IMG" info --backing-chain "$3"
}

# expect_ok CASE COMMAND...: COMMAND succeeds within 20 s.
expect_ok()
{
    o_case=$1
    shift
    o_rc=0
    timeout 20 "$@" >"$T/out" 2>&1 </dev/null || o_rc=$?
    if [ "$o_rc" != 0 ]; then
        sed 's/^/      /' "$T/out" >&2
        bad "$o_case: '$*' failed (exit $o_rc)"
        return 1
    fi
}

# overlay FILE BACKING-NAME [FMT]: a qcow2 overlay naming BACKING-NAME,
# which is not opened (-u).
overlay()
{
    if [ $# = 3 ]; then
        "$QEMU_IMG" create -q -f qcow2 -u -b "$2" -F "$3" "$1" 1M
    else
        # Without a recorded format (qemu-img insists on one).
        "$QSNAP_TOOL" create --backing "$2" "$1" 1M >/dev/null
    fi
}

# ------------------------------------------------------------ loops

note "loops"
"$QEMU_IMG" create -q -f qcow2 a.qcow2 1M
overlay b.qcow2 a.qcow2 qcow2
"$QEMU_IMG" rebase -q -u -b b.qcow2 -F qcow2 a.qcow2
expect_open_error "loop a->b->a" "a.qcow2 b.qcow2" a.qcow2
expect_open_error "loop b->a->b" "a.qcow2 b.qcow2" b.qcow2

"$QEMU_IMG" create -q -f qcow2 self.qcow2 1M
"$QEMU_IMG" rebase -q -u -b self.qcow2 -F qcow2 self.qcow2
expect_open_error "loop a->a" "self.qcow2" self.qcow2

# Names differ, files do not: a symlink, a hard link, two spellings.
"$QEMU_IMG" create -q -f qcow2 s1.qcow2 1M
overlay s2.qcow2 s1.qcow2 qcow2
ln -s s2.qcow2 s2-link.qcow2
"$QEMU_IMG" rebase -q -u -b s2-link.qcow2 -F qcow2 s1.qcow2
expect_open_error "loop through a symlink" "s1.qcow2 s2.qcow2 s2-link.qcow2" \
    s2.qcow2

"$QEMU_IMG" create -q -f qcow2 h1.qcow2 1M
ln h1.qcow2 h1-hard.qcow2
"$QEMU_IMG" rebase -q -u -b h1-hard.qcow2 -F qcow2 h1.qcow2
expect_open_error "loop through a hard link" "h1.qcow2 h1-hard.qcow2" \
    h1.qcow2

mkdir -p sub
"$QEMU_IMG" create -q -f qcow2 sub/x.qcow2 1M
overlay sub/y.qcow2 ./x.qcow2 qcow2
"$QEMU_IMG" rebase -q -u -b ../sub/y.qcow2 -F qcow2 sub/x.qcow2
expect_open_error "loop ./x against ../sub/y" "x.qcow2 y.qcow2" sub/y.qcow2
expect_open_error "loop (absolute path)" "x.qcow2 y.qcow2" "$D/sub/x.qcow2"

# ------------------------------------------------------------ depth

note "depth limit (64 images)"
"$QEMU_IMG" create -q -f qcow2 c0.qcow2 1M
i=1
while [ "$i" -le 64 ]; do
    "$QEMU_IMG" create -q -f qcow2 -u -b "c$((i - 1)).qcow2" -F qcow2 \
        "c$i.qcow2" 1M
    i=$((i + 1))
done
# c63 has 64 images in its chain, c64 has 65.
if expect_ok "chain of 64 images" "$DRV" list c63.qcow2; then
    n=$(wc -l <"$T/out")
    [ "$n" = 64 ] || bad "chain of 64 images: $n layers listed"
fi
expect_ok "chain of 64 images (read)" "$QSNAP_TOOL" digest c63.qcow2 || :
expect_error "chain of 65 images" "c0.qcow2 c64.qcow2" \
    "$QSNAP_TOOL" digest c64.qcow2
grep -q 64 "$T/out" ||
    bad "chain of 65 images: the message does not give the limit (64)"
expect_error "chain of 65 images" "c0.qcow2 c64.qcow2" "$DRV" list c64.qcow2
# info --backing-chain walks the chain itself: it may describe all 65
# images, or refuse as above, but not stop silently or hang.
rc=0
timeout 20 "$QSNAP_IMG" info --backing-chain c64.qcow2 >"$T/out" 2>&1 ||
    rc=$?
if [ "$rc" = 0 ]; then
    [ "$(grep -c '^image: ' "$T/out")" = 65 ] ||
        bad "info --backing-chain of 65 images does not describe all 65"
elif [ "$rc" = 124 ] || ! grep -q 'c[0-9]*\.qcow2' "$T/out"; then
    sed 's/^/      /' "$T/out" >&2
    bad "info --backing-chain of 65 images: exit $rc, no file named"
fi

# ------------------------------------------------------------ missing

note "missing backing file"
mkdir -p m
overlay m/top.qcow2 gone.qcow2 qcow2
# Opened from another directory: the path looked for is m/gone.qcow2.
expect_open_error "missing backing file" "m/gone.qcow2" m/top.qcow2
overlay m/top2.qcow2 "$D/m/nowhere/gone.qcow2" qcow2
expect_open_error "missing backing file (absolute)" \
    "$D/m/nowhere/gone.qcow2" m/top2.qcow2
# A missing file in the middle of a chain.
"$QEMU_IMG" create -q -f qcow2 m/low.qcow2 1M
overlay m/mid.qcow2 low.qcow2 qcow2
overlay m/hi.qcow2 mid.qcow2 qcow2
rm m/low.qcow2
expect_open_error "missing bottom of a chain" "m/low.qcow2" m/hi.qcow2

# ------------------------------------------------------------ names

note "backing names: length and position"
# qcow2 header: backing_file_offset u64 at 8, backing_file_size u32 at 16.
"$QEMU_IMG" create -q -f qcow2 nb.qcow2 1M
overlay long.qcow2 nb.qcow2 qcow2
off=$("$DRV" peek long.qcow2 8 8)
len=$("$DRV" peek long.qcow2 16 4)
"$DRV" poke long.qcow2 16 4 1024
expect_open_error "backing name of 1024 bytes" "long.qcow2" long.qcow2
"$DRV" poke long.qcow2 16 4 4000000000
expect_open_error "backing name of 4000000000 bytes" "long.qcow2" long.qcow2
overlay outside.qcow2 nb.qcow2 qcow2
"$DRV" poke outside.qcow2 8 8 65530
"$DRV" poke outside.qcow2 16 4 9
expect_open_error "backing name across the header cluster's end" \
    "outside.qcow2" outside.qcow2
"$DRV" poke outside.qcow2 8 8 $((1 << 40))
expect_open_error "backing name beyond the end of the file" \
    "outside.qcow2" outside.qcow2
"$DRV" poke outside.qcow2 8 8 "$off"
"$DRV" poke outside.qcow2 16 4 "$len"
expect_ok "the same header restored" "$QSNAP_TOOL" digest outside.qcow2 ||
    :

# A name of exactly 1023 bytes, all of it a real path.
longdir=
while [ ${#longdir} -lt 900 ]; do
    longdir="${longdir}dddddddddddddddddddddddddddddddddddddddddddddddddd/"
done
mkdir -p "$longdir"
pad=$((1023 - ${#longdir} - 4))
fname=$(printf "%${pad}s" "" | tr ' ' f)
lname="$longdir$fname.raw"
[ ${#lname} = 1023 ] || die "bad test: name of ${#lname} bytes"
put_bytes "$lname" 0 1048576 77
overlay n1023.qcow2 "$lname" raw
if expect_ok "backing name of 1023 bytes" "$QSNAP_TOOL" digest n1023.qcow2
then
    [ "$(cat "$T/out")" = "$(digest_of_raw "$lname")" ] ||
        bad "backing name of 1023 bytes: wrong content"
fi

# ------------------------------------------------------------ formats

note "backing formats"
put_bytes plain.raw 0 1048576 11
overlay says-qcow2.qcow2 plain.raw qcow2
expect_open_error "qcow2 recorded, raw file" "plain.raw" says-qcow2.qcow2
"$QEMU_IMG" create -q -f qcow2 real.qcow2 1M
"$QEMU_IO" -c "write -P 0x5a 0 64k" real.qcow2 >/dev/null
overlay says-raw.qcow2 real.qcow2 raw
# Read as raw: the overlay shows the qcow2 file's own bytes, as QEMU does.
if expect_ok "raw recorded, qcow2 file" "$QSNAP_TOOL" dump says-raw.qcow2 \
    "$T/says-raw.out"; then
    head -c 1048576 real.qcow2 >"$T/real.head"
    sz=$(wc -c <"$T/real.head")
    if [ "$sz" -lt 1048576 ]; then
        truncate -s 1048576 "$T/real.head"
    fi
    cmp -s "$T/says-raw.out" "$T/real.head" ||
        bad "raw recorded, qcow2 file: not read as the file's bytes"
    qemu_compare says-raw.qcow2 "$T/says-raw.out" "raw recorded, qcow2 file"
fi
overlay says-vmdk.qcow2 plain.raw vmdk
expect_open_error "unknown backing format" "says-vmdk.qcow2 vmdk" \
    says-vmdk.qcow2

# ------------------------------------------------------------ not files

note "backing files that are not regular files"
mkfifo fifo
overlay fifo-raw.qcow2 fifo raw
overlay fifo-qcow2.qcow2 fifo qcow2
overlay fifo-probe.qcow2 fifo
expect_open_error "FIFO, raw" "fifo" fifo-raw.qcow2
expect_open_error "FIFO, qcow2" "fifo" fifo-qcow2.qcow2
expect_open_error "FIFO, probed" "fifo" fifo-probe.qcow2
for dev in /dev/null /dev/zero; do
    overlay "dev${dev#/dev/}.qcow2" "$dev" raw
    expect_open_error "backing file $dev" "$dev" "dev${dev#/dev/}.qcow2"
done
mkdir -p adir
overlay dir.qcow2 adir raw
expect_open_error "backing file is a directory" "adir" dir.qcow2

# ------------------------------------------------------------ syntax

note "names that look like QEMU syntax are file names"
# check_literal CASE NAME SEED: NAME is created as a raw file with random
# content (SEED); an overlay naming it shows that content.
check_literal()
{
    put_bytes "$2" 0 1048576 "$3"
    overlay lit.qcow2 "$2" raw
    if expect_ok "$1" "$QSNAP_TOOL" digest lit.qcow2; then
        if [ "$(cat "$T/out")" = "$(digest_of_raw "$2")" ]; then
            note "ok: $1: read the file '$2'"
        else
            bad "$1: the overlay does not show the file '$2'"
        fi
    fi
    if expect_ok "$1 (chain)" "$DRV" list lit.qcow2; then
        grep -qF "$2" "$T/out" ||
            bad "$1: the chain does not list the file '$2'"
    fi
    rm -f lit.qcow2
    # qsnap-img create opens the backing file for its size: as a file.
    if expect_ok "$1 (qsnap-img create)" "$QSNAP_IMG" create -q -f qcow2 \
        -b "$2" -F raw lit.qcow2; then
        [ "$("$QSNAP_TOOL" digest lit.qcow2)" = "$(digest_of_raw "$2")" ] ||
            bad "$1: qsnap-img create: the overlay does not show '$2'"
    fi
    rm -f lit.qcow2
}
# Decoys: the files QEMU's syntax would name.
put_bytes decoy.raw 0 1048576 99
check_literal "json: name" \
    'json:{"driver":"raw","file":{"driver":"file","filename":"decoy.raw"}}' \
    21
mkdir -p 'nbd:/localhost:10809'
check_literal "nbd:// name" 'nbd://localhost:10809/export' 22
check_literal "nbd: name" 'nbd:localhost:10809' 23
check_literal "file: name" 'file:decoy.raw' 24
check_literal "name with spaces and quotes" "it's a \"disk\" .raw" 25

# ------------------------------------------------------------ info

note "qsnap-img info opens no backing file"
for img in m/top.qcow2 fifo-raw.qcow2 fifo-probe.qcow2 a.qcow2 self.qcow2 \
    c64.qcow2; do
    if expect_ok "info $img" "$QSNAP_IMG" info "$img"; then
        if grep -q "^backing file: " "$T/out"; then
            note "ok: info $img: $(grep '^backing file: ' "$T/out")"
        else
            bad "info $img does not show the backing file name"
        fi
    fi
    expect_ok "info --output=json $img" "$QSNAP_IMG" info --output=json \
        "$img" || :
done
if strace -f -o "$T/strace" -e trace=open,openat true >/dev/null 2>&1; then
    strace -f -o "$T/strace" -e trace=open,openat \
        "$QSNAP_IMG" info b.qcow2 >/dev/null 2>&1 || :
    if ! grep -q '"b\.qcow2"' "$T/strace"; then
        note "strace does not show the image being opened: not watched"
    elif grep '"[^"]*a\.qcow2"' "$T/strace" >/dev/null; then
        grep 'a\.qcow2' "$T/strace" | sed 's/^/      /' >&2
        bad "qsnap-img info b.qcow2 opened its backing file a.qcow2"
    else
        note "ok: qsnap-img info b.qcow2 opened b.qcow2 and not a.qcow2"
    fi
else
    note "strace cannot run here: the open calls are not watched"
fi

[ "$failures" = 0 ] || die "$failures case(s) failed"
note "all bad chains refused cleanly"
