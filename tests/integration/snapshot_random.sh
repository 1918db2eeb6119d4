#!/bin/sh
# snapshot_random.sh - random snapshot sequences, QEMU as the oracle.
#
# On images of cluster size 512, 64 KiB and 2 MiB, refcount widths 4, 16
# and 64, v2 and v3 (made alternately by qemu-img and qsnap-img), a seeded
# sequence mixes guest writes (qsnap-tool random, mirrored on a raw model
# of the live disk) with qsnap-img snapshot create, and apply, delete
# and rename (by name or by ID), creates refused for a name in use, and
# growing resizes (refused, as by QEMU, on v2 images that hold snapshots).
# The model keeps a raw copy of every snapshot's content, its ID and name.
# After each sequence:
#   - qemu-img check finds no corruption and no leak;
#   - qemu-img compare: the live disk equals the model (and has its size);
#   - every snapshot, read with qemu-img convert -l snapshot.name=NAME (or,
#     when it is larger than the live disk, applied to a copy by qemu-img),
#     equals its copy, and qsnap-img reports the disk size it was taken at;
#   - qemu-img snapshot -l lists exactly the expected IDs and names, in
#     table order.
# Every configuration runs with a fixed seed and with $QSNAP_SEED.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need_built "$QSNAP_TOOL"
need_built "$QSNAP_IMG"

STEPS=${QSNAP_SNAP_STEPS:-16}
note "seed from the environment: QSNAP_SEED=$QSNAP_SEED" \
    "(rerun with QSNAP_SEED=$QSNAP_SEED)"

failures=0
W="$T/w"

# fail MESSAGE...: record a failed sequence, show its log, go on.
fail()
{
    echo "  FAIL $*" >&2
    if [ -f "$W/log" ]; then
        echo "  operations of this sequence:" >&2
        sed 's/^/      /' "$W/log" >&2
    fi
    failures=$((failures + 1))
}

# log LINE: one line of the sequence's operation log.
log()
{
    echo "$*" >>"$W/log"
}

# rnd N: a pseudo-random number 0 .. N-1 in $r (from the sequence seed).
rnd()
{
    lcg_next
    r=$(( (lcg / 65536) % $1 ))
}

# The snapshot model: $snaps holds "KEY:ID:NAME" words in table order;
# the content of snapshot KEY is $W/snap.KEY.raw.

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

# pick: a random existing snapshot into $p_key, $p_id, $p_name.
pick()
{
    # shellcheck disable=SC2086  # split the list into words
    set -- $snaps
    rnd $#
    shift "$r"
    p_key=${1%%:*}
    p_rest=${1#*:}
    p_id=${p_rest%%:*}
    p_name=${p_rest#*:}
}

# next_id: QEMU's rule, the largest numeric ID plus one, into $n_id.
next_id()
{
    n_id=0
    for s in $snaps; do
        s_rest=${s#*:}
        s_id=${s_rest%%:*}
        [ "$s_id" -gt "$n_id" ] && n_id=$s_id
    done
    n_id=$((n_id + 1))
}

# qimg DESCRIPTION ARGS...: run qsnap-img; on failure record it and
# return 1.
qimg()
{
    q_desc=$1
    shift
    log "qsnap-img $*"
    if ! "$QSNAP_IMG" "$@" >"$W/out" 2>&1; then
        sed 's/^/      /' "$W/out" >&2
        fail "$q_desc: qsnap-img $* failed ($seq_desc)"
        return 1
    fi
}

# create_image VERSION CLUSTER REFBITS SIZE: $W/img, by qemu-img or
# qsnap-img in turn.
n_created=0
create_image()
{
    c_compat=1.1
    [ "$1" = 2 ] && c_compat=0.10
    c_opts="compat=$c_compat,cluster_size=$2,refcount_bits=$3"
    n_created=$((n_created + 1))
    if [ $((n_created % 2)) = 0 ]; then
        creator=qemu-img
        "$QEMU_IMG" create -q -f qcow2 -o "$c_opts" "$W/img" "$4" ||
            return 1
    else
        creator=qsnap-img
        "$QSNAP_IMG" create -q -f qcow2 -o "$c_opts" "$W/img" "$4" ||
            return 1
    fi
}

# verify: the end-of-sequence checks.
verify()
{
    if ! "$QEMU_IMG" check -q "$W/img" >"$W/check" 2>&1; then
        "$QEMU_IMG" check "$W/img" 2>&1 | head -n 20 | sed 's/^/      /' >&2
        fail "qemu-img check is not clean ($seq_desc)"
        return 0
    fi
    v_size=$(image_field "$W/img" virtual-size)
    m_size=$(stat -c %s "$W/live.raw")
    if [ "$v_size" != "$m_size" ]; then
        fail "live disk is $v_size bytes, the model $m_size ($seq_desc)"
        return 0
    fi
    if ! "$QEMU_IMG" compare -q -f qcow2 -F raw "$W/img" "$W/live.raw" \
        >"$W/cmp" 2>&1; then
        "$QEMU_IMG" compare -f qcow2 -F raw "$W/img" "$W/live.raw" 2>&1 |
            sed 's/^/      /' >&2
        fail "live disk differs from the model ($seq_desc)"
        return 0
    fi
    # The table as QEMU reads it: "ID NAME" lines in table order.
    "$QEMU_IMG" snapshot -U -l "$W/img" | awk 'NR > 2 { print $1, $2 }' \
        >"$W/list.qemu"
    : >"$W/list.model"
    for s in $snaps; do
        s_rest=${s#*:}
        echo "${s_rest%%:*} ${s_rest#*:}" >>"$W/list.model"
    done
    if ! cmp -s "$W/list.qemu" "$W/list.model"; then
        echo "      qemu-img snapshot -l:" >&2
        sed 's/^/        /' "$W/list.qemu" >&2
        echo "      expected:" >&2
        sed 's/^/        /' "$W/list.model" >&2
        fail "snapshot table differs from the model ($seq_desc)"
        return 0
    fi
    "$QSNAP_IMG" list -U --output=json "$W/img" >"$W/list.json" 2>&1 || {
        fail "qsnap-img list failed ($seq_desc)"
        return 0
    }
    for s in $snaps; do
        s_key=${s%%:*}
        s_rest=${s#*:}
        s_name=${s_rest#*:}
        rm -f "$W/snap.out.raw"
        s_size=$(stat -c %s "$W/snap.$s_key.raw")
        if [ "$s_size" -gt "$v_size" ]; then
            # qemu-img convert -l reads a snapshot at the current disk
            # size; applying it to a copy gives its whole disk.
            cp --sparse=always "$W/img" "$W/copy.qcow2"
            if ! "$QEMU_IMG" snapshot -a "$s_name" "$W/copy.qcow2" \
                >"$W/conv" 2>&1 ||
                ! "$QEMU_IMG" convert -O raw "$W/copy.qcow2" \
                    "$W/snap.out.raw" >>"$W/conv" 2>&1; then
                sed 's/^/      /' "$W/conv" >&2
                fail "qemu-img cannot apply snapshot '$s_name' to a" \
                    "copy ($seq_desc)"
                return 0
            fi
            rm -f "$W/copy.qcow2"
        elif ! "$QEMU_IMG" convert -U -l "snapshot.name=$s_name" -O raw \
            "$W/img" "$W/snap.out.raw" >"$W/conv" 2>&1; then
            sed 's/^/      /' "$W/conv" >&2
            fail "qemu-img cannot read snapshot '$s_name' ($seq_desc)"
            return 0
        fi
        if ! "$QEMU_IMG" compare -q -f raw -F raw "$W/snap.out.raw" \
            "$W/snap.$s_key.raw" >"$W/cmp" 2>&1; then
            fail "snapshot '$s_name' differs from its model ($seq_desc)"
            return 0
        fi
        # qsnap-img's record of the disk size the snapshot was taken at.
        if ! json_snap_field "$W/list.json" disk-size |
            grep -qx "$s_name $s_size"; then
            fail "qsnap-img list does not give snapshot '$s_name' disk" \
                "size $s_size ($seq_desc)"
            return 0
        fi
    done
    rm -f "$W/snap.out.raw"
    return 0
}

# sequence VERSION CLUSTER REFBITS SIZE MAXLEN SEED
sequence()
{
    rm -rf "$W"
    mkdir "$W"
    lcg=$(($6 % 2147483648))
    seq_desc="v$1 cluster=$2 refcount_bits=$3 size=$4 seed=$6"
    if ! create_image "$1" "$2" "$3" "$4" >"$W/out" 2>&1; then
        sed 's/^/      /' "$W/out" >&2
        fail "creating the image ($seq_desc)"
        return 0
    fi
    seq_desc="$seq_desc, made by $creator"
    truncate -s "$4" "$W/live.raw"
    snaps=
    n_key=0
    n_name=0
    step=1
    while [ "$step" -le "$STEPS" ]; do
        rnd 100
        op=$r
        [ -z "$snaps" ] && [ "$op" -ge 40 ] && [ "$op" -lt 89 ] && op=30
        if [ "$op" -lt 30 ]; then
            rnd 1000000
            w_seed=$r
            w_flags=
            [ $((w_seed % 3)) = 0 ] && w_flags=--compress
            log "qsnap-tool random --seed $w_seed --ops 12" \
                "--max-len $5 $w_flags MODEL IMAGE"
            # shellcheck disable=SC2086  # $w_flags is empty or one flag
            if ! "$QSNAP_TOOL" random --seed "$w_seed" --ops 12 \
                --max-len "$5" $w_flags "$W/live.raw" "$W/img" \
                >"$W/out" 2>&1; then
                sed 's/^/      /' "$W/out" >&2
                fail "guest writes ($seq_desc)"
                return 0
            fi
        elif [ "$op" -lt 50 ]; then
            n_name=$((n_name + 1))
            n_key=$((n_key + 1))
            next_id
            qimg "create" snapshot -c "s$n_name" "$W/img" || return 0
            cp --sparse=always "$W/live.raw" "$W/snap.$n_key.raw"
            snaps="$snaps $n_key:$n_id:s$n_name"
        elif [ "$op" -lt 62 ]; then
            pick
            a_arg=$p_name
            rnd 2
            [ "$r" = 1 ] && a_arg=$p_id
            qimg "apply" snapshot -a "$a_arg" "$W/img" || return 0
            cp --sparse=always "$W/snap.$p_key.raw" "$W/live.raw"
        elif [ "$op" -lt 74 ]; then
            pick
            rnd 3
            # As qemu-img, snapshot -d takes a name; delete takes either.
            case $r in
            0) qimg "delete" snapshot -d "$p_name" "$W/img" || return 0 ;;
            1) qimg "delete" delete -q "$W/img" "$p_id" || return 0 ;;
            *) qimg "delete" delete -q "$W/img" "$p_name" || return 0 ;;
            esac
            rm -f "$W/snap.$p_key.raw"
            new=
            for s in $snaps; do
                [ "$s" = "$p_key:$p_id:$p_name" ] || new="$new $s"
            done
            snaps=$new
        elif [ "$op" -lt 84 ]; then
            pick
            n_name=$((n_name + 1))
            r_arg=$p_name
            rnd 2
            [ "$r" = 1 ] && r_arg=$p_id
            qimg "rename" snapshot --rename "$r_arg" "r$n_name" \
                "$W/img" || return 0
            new=
            for s in $snaps; do
                if [ "$s" = "$p_key:$p_id:$p_name" ]; then
                    s="$p_key:$p_id:r$n_name"
                fi
                new="$new $s"
            done
            snaps=$new
        elif [ "$op" -lt 89 ]; then
            # A name in use is refused and changes nothing.
            pick
            log "qsnap-img snapshot -c $p_name (must fail: name in use)"
            if "$QSNAP_IMG" snapshot -c "$p_name" "$W/img" >"$W/out" 2>&1
            then
                fail "creating a second snapshot '$p_name' succeeded" \
                    "($seq_desc)"
                return 0
            fi
            if ! [ -s "$W/out" ]; then
                fail "refusing a second '$p_name' printed no message" \
                    "($seq_desc)"
                return 0
            fi
        elif [ "$1" = 2 ] && [ -n "$snaps" ]; then
            # As QEMU: a v2 snapshot table has no room for the disk size,
            # so a v2 image with snapshots cannot be resized (qemu-img
            # could not apply the older snapshots any more).
            log "qsnap-img resize IMG +$2 (must fail: v2 with snapshots)"
            if "$QSNAP_IMG" resize "$W/img" "+$2" >"$W/out" 2>&1; then
                fail "qsnap-img resize grew a v2 image with snapshots" \
                    "($seq_desc)"
                return 0
            fi
        else
            # Grow the disk by 1..3 clusters (snapshots keep their size).
            rnd 3
            g_by=$(( (r + 1) * $2 ))
            qimg "resize" resize "$W/img" "+$g_by" || return 0
            truncate -s "+$g_by" "$W/live.raw"
        fi
        step=$((step + 1))
    done
    verify
    # shellcheck disable=SC2086  # split the list into words
    set -- $snaps
    echo "  ok $seq_desc: $STEPS steps, $# snapshots left"
}

# Configurations: VERSION CLUSTER REFBITS SIZE MAXLEN.
configs="3:512:16:3147264:8192
3:512:4:2098688:4096
3:512:64:3147264:8192
2:512:16:2098688:8192
3:65536:16:25169920:262144
3:65536:4:16781312:262144
3:65536:64:25169920:262144
2:65536:16:16781312:262144
3:2097152:16:27787264:3145728
3:2097152:4:27787264:3145728
3:2097152:64:23592960:3145728
2:2097152:16:23592960:3145728"

n=0
for seed in 1 "$QSNAP_SEED"; do
    for c in $configs; do
        n=$((n + 1))
        IFS=: read -r v cs rb size maxlen <<EOF
$c
EOF
        sequence "$v" "$cs" "$rb" "$size" "$maxlen" $((seed * 7919 + n))
    done
done
rm -rf "$W"

if [ "$failures" -gt 0 ]; then
    die "$failures of $n sequences failed (QSNAP_SEED=$QSNAP_SEED)"
fi
echo "$me: $n sequences matched the model"
