#!/bin/sh
# chain_random.sh - random backing chains under random chain operations,
# QEMU as the oracle.
#
# Each sequence builds a chain of 2 to 9 layers (1 to 8 backing links)
# bottom-up: a raw or qcow2 bottom, then qcow2 overlays of mixed cluster
# sizes (512 bytes to 2 MiB), v2 and v3, made in turn by qemu-img create,
# qsnap-img create, qsnap-tool create and qsnap_overlay_push, named by
# NAME, ./NAME or absolute paths, sometimes with sizes that differ from their
# backing file's.  Every layer gets random writes, zero writes, discards
# (and compressed writes) while it is the top, mirrored on a raw model of
# its guest view, which starts as a copy of its backing file's model.
#
# Then random operations at random positions of the chain:
#   commit    a layer into its backing file (emptying it, or -d), or into a
#             deeper base (the layers between are dropped afterwards with
#             an unsafe rebase, as they are invalid by qemu-img's rules)
#   rebase    safe, onto a layer further down, onto its own backing file,
#             or onto none
#   stream    the whole chain, or down to a base
#   delete    merge-on-delete of a middle or bottom layer: forced stream,
#             forced commit (which must be refused, changing nothing, for
#             a raw layer or one longer than its child), or automatic
#   write     more random I/O on the top; push a new overlay on the top
# Each operation goes through the library (tests/chain-driver) or, in
# turn, through qsnap-img's commit, rebase, stream and delete.
# After each step, for every layer of the chain: the chain qsnap lists is
# the expected one (files, formats, sizes); qemu-img compare matches the
# layer's model; qemu-img check is clean.  Layers a rebase or stream takes
# out of the chain are compared once more, then removed.
#
# Model rules: a commit gives the base the committed layer's view (growing
# it if it was smaller); emptying a layer leaves its view as it was; a
# deleted layer's children keep their views; rebase and stream change no
# view.
#
# Fixed seeds and one from $QSNAP_SEED (printed) run in turn; a failing
# sequence prints the exact commands it ran.
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

STEPS=${QSNAP_CHAIN_STEPS:-12}
SEEDS=${QSNAP_CHAIN_SEEDS:-"23 1 19 3 8 29 45 37 128"}
note "seed from the environment: QSNAP_SEED=$QSNAP_SEED" \
    "(rerun with QSNAP_SEED=$QSNAP_SEED)"

# Use the qsnap-img chain commands where the CLI has them already.
cli_has()
{
    "$QSNAP_IMG" --help 2>/dev/null | grep -q "^  $1 "
}
cli_commit=false
cli_rebase=false
cli_stream=false
cli_delete=false
cli_has commit && cli_commit=true
cli_has rebase && cli_rebase=true
cli_has stream && cli_stream=true
"$QSNAP_IMG" --help 2>/dev/null | grep -q "^  delete .*--commit" &&
    cli_delete=true
note "qsnap-img commit: $cli_commit, rebase: $cli_rebase," \
    "stream: $cli_stream, delete of layers: $cli_delete" \
    "(the library calls are used as well)"

failures=0
W="$T/w"

fail()
{
    echo "  FAIL $*" >&2
    if [ -f "$W/log" ]; then
        echo "  commands of this sequence (in $W):" >&2
        sed 's/^/      /' "$W/log" >&2
    fi
    failures=$((failures + 1))
}

log()
{
    echo "$*" >>"$W/log"
}

# log_cmd COMMAND...: log a command with empty or spaced words quoted.
log_cmd()
{
    lc_line=
    for lc_w in "$@"; do
        case $lc_w in
        '' | *[!A-Za-z0-9_./:=,+-]*) lc_w="'$lc_w'" ;;
        esac
        lc_line="$lc_line${lc_line:+ }$lc_w"
    done
    log "$lc_line"
}

rnd()
{
    lcg_next
    r=$(( (lcg / 65536) % $1 ))
}

# step DESCRIPTION COMMAND...: log and run (5 minutes at most); on failure
# show the output, record the failure and return 1.
step()
{
    s_desc=$1
    shift
    log_cmd "$@"
    if ! timeout 300 "$@" >"$W/out" 2>&1; then
        sed 's/^/      /' "$W/out" >&2
        fail "$s_desc ($seq_desc)"
        return 1
    fi
}

# Per layer ID: file name (in $W), format, virtual size; the model of its
# guest view is $W/mID.raw.
set_layer()
{
    eval "file_$1=\$2 fmt_$1=\$3 size_$1=\$4"
}
get_layer()
{
    l_file=
    l_fmt=
    l_size=
    eval "l_file=\$file_$1 l_fmt=\$fmt_$1 l_size=\$size_$1"
}

# nth INDEX: the ID at INDEX of the chain (0 = bottom) into $id.
nth()
{
    nth_i=$1
    # shellcheck disable=SC2086  # split the list into words
    set -- $chain
    shift "$nth_i"
    id=$1
}

chain_len()
{
    # shellcheck disable=SC2086  # split the list into words
    set -- $chain
    n=$#
}

# without FIRST LAST: $chain minus the indices FIRST..LAST, into $rest;
# the IDs removed go to $removed.
without()
{
    rest=
    removed=
    w_i=0
    for w_id in $chain; do
        if [ "$w_i" -ge "$1" ] && [ "$w_i" -le "$2" ]; then
            removed="$removed $w_id"
        else
            rest="$rest $w_id"
        fi
        w_i=$((w_i + 1))
    done
}

CLUSTERS="512 4096 65536 65536 1048576 2097152"
SIZES="4194304 6291456 6292992 8388608"

pick_word()
{
    # shellcheck disable=SC2086  # split the list into words
    set -- $1
    rnd $#
    shift "$r"
    word=$1
}

# random_io ID: random operations on layer ID mirrored on its model.
random_io()
{
    get_layer "$1"
    rnd 40
    r_ops=$((20 + r))
    r_opts=
    rnd 3
    [ "$r" = 0 ] && r_opts="--reopen"
    if [ "$l_fmt" = qcow2 ]; then
        rnd 3
        [ "$r" = 0 ] && r_opts="$r_opts --compress"
    fi
    lcg_next
    # shellcheck disable=SC2086  # options are words
    step "random I/O on $l_file" "$QSNAP_TOOL" random --seed "$lcg" \
        --ops "$r_ops" $r_opts "$W/m$1.raw" "$W/$l_file"
}

# new_layer [PARENT_ID]: a new layer (bottom without a parent) with random
# content, appended to $chain.
next_id=0
new_layer()
{
    nid=$next_id
    next_id=$((next_id + 1))
    pick_word "$CLUSTERS"
    cs=$word
    rnd 2
    ver=$((r + 2))
    compat=1.1
    [ "$ver" = 2 ] && compat=0.10
    if [ $# = 0 ]; then
        pick_word "$SIZES"
        sz=$word
        rnd 4
        if [ "$r" = 0 ]; then
            set_layer "$nid" "l$nid.raw" raw "$sz"
            log "truncate -s $sz l$nid.raw"
            truncate -s "$sz" "$W/l$nid.raw"
        else
            set_layer "$nid" "l$nid.qcow2" qcow2 "$sz"
            step "create the bottom" "$QEMU_IMG" create -q -f qcow2 \
                -o "cluster_size=$cs,compat=$compat" "$W/l$nid.qcow2" "$sz" ||
                return 1
        fi
        log "truncate -s $sz m$nid.raw"
        truncate -s "$sz" "$W/m$nid.raw"
        chain=$nid
        random_io "$nid"
        return
    fi
    get_layer "$1"
    p_file=$l_file
    p_fmt=$l_fmt
    sz=$l_size
    if [ "$vary" = 1 ]; then
        rnd 5
        sz=$((sz + (r - 2) * 1048576))
        [ "$sz" -lt 2097152 ] && sz=2097152
    fi
    # The backing name: plain, ./NAME or absolute.
    spell "$p_file"
    bname=$sp
    set_layer "$nid" "l$nid.qcow2" qcow2 "$sz"
    rnd 4
    case $r in
    0)
        step "qemu-img create overlay" "$QEMU_IMG" create -q -f qcow2 \
            -o "cluster_size=$cs,compat=$compat" -b "$bname" -F "$p_fmt" \
            "$W/l$nid.qcow2" "$sz" || return 1
        ;;
    1)
        step "qsnap-img create overlay" "$QSNAP_IMG" create -q -f qcow2 \
            -o "cluster_size=$cs,compat=$compat" -b "$bname" -F "$p_fmt" \
            "$W/l$nid.qcow2" "$sz" || return 1
        ;;
    2)
        # No backing format recorded for a qcow2 parent: probed.
        c_fmt="--backing-fmt $p_fmt"
        [ "$p_fmt" = qcow2 ] && rnd 2 && [ "$r" = 0 ] && c_fmt=
        # shellcheck disable=SC2086  # options are words
        step "qsnap-tool create overlay" "$QSNAP_TOOL" create \
            --cluster-size "$cs" --version "$ver" --backing "$bname" \
            $c_fmt "$W/l$nid.qcow2" "$sz" || return 1
        ;;
    3)
        # The external checkpoint call: the size is the parent's.
        set_layer "$nid" "l$nid.qcow2" qcow2 "$l_size"
        sz=$l_size
        step "overlay push" "$DRV" push -c "$cs" -v "$ver" \
            "$W/$p_file" "$W/l$nid.qcow2" || return 1
        ;;
    esac
    log "cp m$1.raw m$nid.raw; truncate -s $sz m$nid.raw"
    cp "$W/m$1.raw" "$W/m$nid.raw"
    truncate -s "$sz" "$W/m$nid.raw"
    chain="$chain $nid"
    random_io "$nid"
}

# compare_layer ID: the layer's view equals its model; check is clean.
compare_layer()
{
    get_layer "$1"
    if ! "$QEMU_IMG" compare -U -f "$l_fmt" -F raw "$W/$l_file" \
        "$W/m$1.raw" >"$W/cmp" 2>&1; then
        sed 's/^/      /' "$W/cmp" >&2
        fail "$l_file differs from its model after: $2 ($seq_desc)"
        return 1
    fi
    if [ "$l_fmt" = qcow2 ] &&
        ! "$QEMU_IMG" check -q "$W/$l_file" >"$W/cmp" 2>&1; then
        "$QEMU_IMG" check "$W/$l_file" 2>&1 | sed 's/^/      /' >&2
        fail "qemu-img check $l_file after: $2 ($seq_desc)"
        return 1
    fi
}

# verify CONTEXT: the chain's structure and every layer's content.
verify()
{
    chain_len
    nth $((n - 1))
    get_layer "$id"
    if ! "$DRV" list "$W/$l_file" >"$W/list" 2>"$W/list.err"; then
        sed 's/^/      /' "$W/list.err" >&2
        fail "opening the chain of $l_file after: $1 ($seq_desc)"
        return 1
    fi
    : >"$W/list.want"
    for v_id in $chain; do
        get_layer "$v_id"
        echo "$l_fmt $l_size $l_file"
    done | sed -n '1!G;h;$p' >"$W/list.want"
    awk -F '\t' '{ f = $5; sub(/.*\//, "", f); print $2, $3, f }' \
        "$W/list" >"$W/list.got"
    if ! cmp -s "$W/list.want" "$W/list.got"; then
        echo "      expected (top first):" >&2
        sed 's/^/        /' "$W/list.want" >&2
        echo "      qsnap_chain_list:" >&2
        sed 's/^/        /' "$W/list" >&2
        fail "wrong chain after: $1 ($seq_desc)"
        return 1
    fi
    for v_id in $chain; do
        compare_layer "$v_id" "$1" || return 1
    done
}

# drop_orphans CONTEXT: the layers in $removed (out of the chain, but
# still pointing into it) keep their views; then they are removed.
drop_orphans()
{
    for o_id in $removed; do
        compare_layer "$o_id" "$1 (layer taken out of the chain)" ||
            return 1
    done
    for o_id in $removed; do
        get_layer "$o_id"
        log "rm $l_file"
        rm -f "$W/$l_file" "$W/m$o_id.raw"
    done
}

# base_arg ID: a name for layer ID to give commit -b / stream -b, into
# $barg (see spell).
base_arg()
{
    get_layer "$1"
    spell "$l_file"
    barg=$sp
}

# spell FILE: a name for FILE (in $W, the current directory) to give a
# tool, into $sp: FILE, ./FILE or the absolute path.
spell()
{
    rnd 3
    case $r in
    0) sp=$1 ;;
    1) sp="./$1" ;;
    *) sp="$W/$1" ;;
    esac
}

# ------------------------------------------------------------ operations

op_commit()
{
    k=$((1 + r_pos % (n - 1)))
    nth "$k"
    kid=$id
    get_layer "$kid"
    k_file=$l_file
    spell "$k_file"
    k_arg=$sp
    k_size=$l_size
    rnd 3
    if [ "$k" -ge 2 ] && [ "$r" = 0 ]; then
        rnd $((k - 1))
        j=$r
    else
        j=$((k - 1))
    fi
    nth "$j"
    jid=$id
    get_layer "$jid"
    j_file=$l_file
    j_fmt=$l_fmt
    j_size=$l_size
    keep=
    rnd 3
    [ "$r" = 0 ] && keep=-d
    desc="commit $keep $k_file into $j_file"
    base_opt=
    if [ "$j" != $((k - 1)) ]; then
        base_arg "$jid"
        base_opt="-b $barg"
    elif rnd 3 && [ "$r" = 0 ]; then
        base_arg "$jid"
        base_opt="-b $barg"
    fi
    rnd 2
    # shellcheck disable=SC2086  # options are words
    if $cli_commit && [ "$r" = 0 ]; then
        step "$desc" "$QSNAP_IMG" commit -q $keep $base_opt "$k_arg" ||
            return 1
    else
        step "$desc" "$DRV" commit $keep $base_opt "$k_arg" || return 1
    fi
    # The base now shows the committed view (grown to its size).
    log "dd if=m$kid.raw of=m$jid.raw conv=notrunc"
    dd if="$W/m$kid.raw" of="$W/m$jid.raw" bs=1M conv=notrunc status=none
    [ "$k_size" -gt "$j_size" ] && set_layer "$jid" "$j_file" "$j_fmt" \
        "$k_size"
    if [ "$j" = $((k - 1)) ]; then
        verify "$desc"
        return
    fi
    # The layers between are invalid now: verify around them, then take
    # them out with an unsafe rebase, as a block-commit job would.
    without $((j + 1)) $((k - 1))
    for c_id in $rest; do
        compare_layer "$c_id" "$desc" || return 1
    done
    get_layer "$jid"
    step "drop the layers between" "$DRV" rebase -u -F "$l_fmt" \
        "$k_file" "$j_file" || return 1
    for c_id in $removed; do
        get_layer "$c_id"
        rm -f "$W/$l_file" "$W/m$c_id.raw"
    done
    chain=$rest
    verify "$desc; rebase -u $k_file $j_file"
}

op_rebase()
{
    k=$((1 + r_pos % (n - 1)))
    nth "$k"
    kid=$id
    get_layer "$kid"
    k_file=$l_file
    spell "$k_file"
    k_arg=$sp
    rnd $((k + 1))
    j=$((r - 1)) # -1: none; k-1: its own backing file
    if [ "$j" -lt 0 ]; then
        new=
        new_fmt=
        desc="rebase $k_file onto none"
    else
        nth "$j"
        get_layer "$id"
        new=$l_file
        rnd 3
        [ "$r" = 0 ] && new="$W/$l_file"
        new_fmt=$l_fmt
        desc="rebase $k_file onto $new"
    fi
    rnd 2
    if $cli_rebase && [ "$r" = 0 ]; then
        if [ -n "$new_fmt" ]; then
            step "$desc" "$QSNAP_IMG" rebase -q -b "$new" -F "$new_fmt" \
                "$k_arg" || return 1
        else
            step "$desc" "$QSNAP_IMG" rebase -q -b "" "$k_arg" || return 1
        fi
    else
        f_opt=
        [ -n "$new_fmt" ] && rnd 2 && [ "$r" = 0 ] && f_opt="-F $new_fmt"
        # shellcheck disable=SC2086  # options are words
        step "$desc" "$DRV" rebase $f_opt "$k_arg" "$new" || return 1
    fi
    without $((j + 1)) $((k - 1))
    chain=$rest
    verify "$desc" && drop_orphans "$desc"
}

op_stream()
{
    k=$((1 + r_pos % (n - 1)))
    nth "$k"
    get_layer "$id"
    k_file=$l_file
    spell "$k_file"
    k_arg=$sp
    rnd $((k + 1))
    j=$((r - 1)) # -1: the whole chain; k-1: nothing to copy
    s_tool=$DRV
    rnd 2
    $cli_stream && [ "$r" = 0 ] && s_tool="$QSNAP_IMG"
    if [ "$j" -lt 0 ]; then
        desc="stream $k_file (whole chain)"
        step "$desc" "$s_tool" stream "$k_arg" || return 1
    else
        nth "$j"
        base_arg "$id"
        desc="stream $k_file down to $barg"
        step "$desc" "$s_tool" stream -b "$barg" "$k_arg" || return 1
    fi
    without $((j + 1)) $((k - 1))
    chain=$rest
    verify "$desc" && drop_orphans "$desc"
}

op_delete()
{
    j=$((r_pos % (n - 1)))
    nth "$j"
    jid=$id
    get_layer "$jid"
    j_file=$l_file
    spell "$j_file"
    j_arg=$sp
    j_fmt=$l_fmt
    j_size=$l_size
    nth $((j + 1))
    get_layer "$id"
    c_file=$l_file
    c_size=$l_size
    rnd $((n - 1 - j))
    nth $((j + 1 + r))
    get_layer "$id"
    t_file=$l_file
    spell "$t_file"
    t_arg=$sp
    rnd 3
    case $r in
    0) mode=--stream ;;
    1) mode=--commit ;;
    *) mode= ;;
    esac
    desc="delete $mode $j_file (from the chain of $t_file)"
    d_tool=$DRV
    rnd 2
    $cli_delete && [ "$r" = 0 ] && d_tool="$QSNAP_IMG"
    if [ "$mode" = --commit ] &&
        { [ "$j_fmt" = raw ] || [ "$c_size" -lt "$j_size" ]; }; then
        # A raw layer cannot take its child's data, and a layer longer
        # than its child cannot take its place without changing its size:
        # refused, nothing changes.
        log "$d_tool delete $mode $t_arg $j_arg  (must fail)"
        if "$d_tool" delete "$mode" "$t_arg" "$j_arg" >"$W/out" 2>&1
        then
            fail "$desc succeeded on a raw or longer layer ($seq_desc)"
            return 1
        fi
        if ! grep -q "$j_file" "$W/out"; then
            sed 's/^/      /' "$W/out" >&2
            fail "$desc: the refusal does not name the layer ($seq_desc)"
            return 1
        fi
        verify "$desc (refused)"
        return
    fi
    # Which way it went: the layer's inode disappears (stream) or takes
    # the child's place (commit).
    j_ino=$(stat -c %i "$j_file")
    # shellcheck disable=SC2086  # the mode is a word or nothing
    step "$desc" "$d_tool" delete $mode "$t_arg" "$j_arg" || return 1
    how=stream
    [ "$(stat -c %i "$c_file")" = "$j_ino" ] && how=commit
    log "# merged by $how"
    if [ "$d_tool" = "$DRV" ] && ! grep -q "^merged by $how" "$W/out"
    then
        fail "$desc: the driver and the files disagree on the" \
            "direction ($how) ($seq_desc)"
        return 1
    fi
    if [ -n "$mode" ] && [ "--$how" != "$mode" ]; then
        fail "$desc merged by $how ($seq_desc)"
        return 1
    fi
    if [ -e "$W/$j_file" ]; then
        fail "$desc left $j_file behind ($seq_desc)"
        return 1
    fi
    without "$j" "$j"
    chain=$rest
    rm -f "$W/m$jid.raw"
    verify "$desc"
}

op_write()
{
    nth $((n - 1))
    random_io "$id" && verify "random I/O on the top"
}

op_push()
{
    nth $((n - 1))
    new_layer "$id" && verify "new overlay on the top"
}

# run_sequence SEED: one chain and STEPS operations on it.
run_sequence()
{
    lcg=$1
    seq_desc="seed $1"
    cd "$T"
    rm -rf "$W"
    mkdir -p "$W"
    # Relative names given to the tools are relative to this directory,
    # as in the logged commands.
    cd "$W"
    chain=
    rnd 3
    vary=0
    [ "$r" = 0 ] && vary=1
    rnd 8
    depth=$((r + 1))
    seq_desc="seed $1, depth $depth, sizes vary: $vary"
    log "# $seq_desc; cd $W"
    new_layer || return 0
    i=0
    while [ "$i" -lt "$depth" ]; do
        nth "$i"
        new_layer "$id" || return 0
        i=$((i + 1))
    done
    verify "building the chain" || return 0
    s=0
    while [ "$s" -lt "$STEPS" ]; do
        s=$((s + 1))
        chain_len
        rnd 100
        op=$r
        rnd 1000
        r_pos=$r
        if [ "$n" = 1 ]; then
            op_push || return 0
            continue
        fi
        if [ "$op" -lt 25 ]; then
            op_commit || return 0
        elif [ "$op" -lt 43 ]; then
            op_rebase || return 0
        elif [ "$op" -lt 58 ]; then
            op_stream || return 0
        elif [ "$op" -lt 85 ]; then
            op_delete || return 0
        elif [ "$op" -lt 93 ] || [ "$n" -ge 9 ]; then
            op_write || return 0
        else
            op_push || return 0
        fi
    done
    # qsnap reads what everyone wrote: the top's digest.
    chain_len
    nth $((n - 1))
    get_layer "$id"
    want=$(digest_of_raw "$W/m$id.raw")
    got=$("$QSNAP_TOOL" digest "$W/$l_file" 2>"$W/out") || got=error
    if [ "$want" != "$got" ]; then
        fail "qsnap reads $l_file as $got, the model is $want ($seq_desc)"
        return 0
    fi
    note "ok: $seq_desc, $s steps, final chain:$chain"
    if [ -n "${QSNAP_CHAIN_VERBOSE:-}" ]; then
        sed 's/^/    /' "$W/log"
    fi
}

for seed in $SEEDS $QSNAP_SEED; do
    run_sequence "$seed"
done
cd "$T"

[ "$failures" = 0 ] || die "$failures sequence(s) failed"
note "all sequences passed"
