#!/bin/sh
# oracle_random.sh - random operation sequences, QEMU as the oracle.
#
# Forward: `qsnap-tool random` runs seeded sequences of writes (aligned,
# unaligned, sub-sector, multi-cluster, vectored), zero writes, discards,
# flushes, compressed writes and reopens (also with O_DIRECT, write-through
# and tiny caches, over preallocated images) on images of every cluster
# size and refcount width, v2 and v3, created by qemu-img and by qsnap.
# After each, `qemu-img check` must be clean, `qemu-img compare` must match
# the raw model and qsnap's own check must agree.  Every configuration
# runs with a fixed seed and with $QSNAP_SEED.
#
# Also: sequences on top of qemu-written data and an internal snapshot
# (which must keep its content), on overlays over a backing file (which
# must not change), and threads sharing one handle; sequences killed with
# SIGKILL must leave nothing worse than leaked clusters, found alike by
# qsnap's check and qemu-img check.
#
# Reverse: qemu-io writes, zeroes and discards at random and
# `qsnap-tool dump` must equal `qemu-img convert -O raw`.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_TOOL"

OPS=${QSNAP_RANDOM_OPS:-250}
note "seed from the environment: QSNAP_SEED=$QSNAP_SEED"

qsnap_creator=tool
n_qsnap_created=0
if qsnap_img_usable; then
    qsnap_creator=cli
    note "qsnap images are made with $QSNAP_IMG create and qsnap-tool create"
else
    note "qsnap-img create is not usable; qsnap images are made with" \
        "qsnap-tool create (the library's qsnap_create)"
fi

failures=0

# fail MESSAGE...: record a failed sequence and go on with the next.
fail()
{
    echo "  FAIL $*" >&2
    failures=$((failures + 1))
}

# create CREATOR IMAGE SIZE VERSION CLUSTER REFBITS EXTRA
# EXTRA: comma-separated qemu-img options (lazy_refcounts=on, ...).
create()
{
    c_who=$1
    c_img=$2
    c_size=$3
    c_compat=1.1
    [ "$4" = 2 ] && c_compat=0.10
    c_opts="compat=$c_compat,cluster_size=$5,refcount_bits=$6${7:+,$7}"
    rm -f "$c_img"
    case $1 in
    qemu)
        run_ok "qemu-img create" "$QEMU_IMG" create -q -f qcow2 \
            -o "$c_opts" "$c_img" "$c_size"
        ;;
    qsnap)
        # With the CLI present, alternate between it and the library call.
        n_qsnap_created=$((n_qsnap_created + 1))
        if [ "$qsnap_creator" = cli ] && [ $((n_qsnap_created % 2)) = 1 ]
        then
            set -- "$QSNAP_IMG" create -f qcow2 -o "$c_opts"
        else
            c_extra=${7:-}
            set -- --version "$4" --cluster-size "$5" --refcount-bits "$6"
            case $c_extra in
            *lazy_refcounts=on*) set -- "$@" --lazy-refcounts ;;
            esac
            case $c_extra in
            *compression_type=zstd*) set -- "$@" --compression zstd ;;
            esac
            case $c_extra in
            *preallocation=metadata*) set -- "$@" --prealloc metadata ;;
            *preallocation=falloc*) set -- "$@" --prealloc falloc ;;
            *preallocation=full*) set -- "$@" --prealloc full ;;
            esac
            set -- "$QSNAP_TOOL" create "$@"
        fi
        if ! "$@" "$c_img" "$c_size" >"$T/create.out" 2>&1; then
            sed 's/^/      /' "$T/create.out" >&2
            fail "creating an image with qsnap ($c_opts)"
            return 1
        fi
        ;;
    esac
    if ! "$QEMU_IMG" check -q "$c_img" >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$c_img" 2>&1 | head -n 10 | sed 's/^/      /' >&2
        fail "qemu-img check of an image just created by $c_who ($c_opts)"
        return 1
    fi
}

# random_run CREATOR SEED VERSION CLUSTER REFBITS SIZE MAXLEN EXTRA FLAGS
random_run()
{
    r_img="$T/r.qcow2"
    r_model="$T/r.raw"
    create "$1" "$r_img" "$6" "$3" "$4" "$5" "$8" || return 0
    rm -f "$r_model"
    truncate -s "$6" "$r_model"
    r_desc="$1 v$3 cluster=$4 refcount_bits=$5 size=$6 ${8:+$8 }seed=$2 $9"
    # shellcheck disable=SC2086  # $9 holds several flags
    if ! "$QSNAP_TOOL" random --seed "$2" --ops "$OPS" --max-len "$7" \
        $9 "$r_model" "$r_img" >"$T/random.out" 2>&1; then
        sed 's/^/      /' "$T/random.out" >&2
        fail "$r_desc (rerun: qsnap-tool random --seed $2 --ops $OPS" \
            "--max-len $7 $9 MODEL IMAGE)"
        return 0
    fi
    if ! "$QEMU_IMG" check -q "$r_img" >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$r_img" 2>&1 | head -n 20 | sed 's/^/      /' >&2
        fail "qemu-img check after $r_desc"
        return 0
    fi
    if ! "$QEMU_IMG" compare -f qcow2 -F raw "$r_img" "$r_model" \
        >"$T/cmp.out" 2>&1; then
        sed 's/^/      /' "$T/cmp.out" >&2
        fail "qemu-img compare after $r_desc"
        return 0
    fi
    # qsnap's own check agrees (clean), and block status is truthful.
    if ! "$QSNAP_TOOL" walk "$r_img" >"$T/walk.out" 2>"$T/walk.err" ||
        ! grep -q ', 0 leaks$' "$T/walk.out"; then
        sed 's/^/      /' "$T/walk.out" "$T/walk.err" | head -n 20 >&2
        fail "qsnap-tool walk (read, block status, check) after $r_desc"
        return 0
    fi
    echo "  ok $r_desc"
}

# configurations: VERSION CLUSTER REFBITS SIZE MAXLEN EXTRA FLAGS
# ("-" means empty)
cat >"$T/configs" <<'EOF'
3 512 16 4M 6k - -
3 512 1 4M 12k - --reopen
3 512 64 2M 3k - --compress
3 4096 2 16M 40k - --nocache
3 4096 4 16M 64k - --reopen
3 4096 16 16M 20k - --cache-size=8k
3 65536 8 64M 300k - -
3 65536 16 64M 300k - --reopen
3 65536 32 64M 200k - --compress
3 65536 64 64M 300k - --writethrough
3 65536 16 64M 300k lazy_refcounts=on --reopen
3 65536 16 64M 200k compression_type=zstd --compress
3 65536 16 5000192 200k - --compress
3 4096 4 3000320 20k - --reopen
3 2097152 16 96M 5M - -
3 2097152 1 64M 5M - --compress
3 65536 16 16M 300k preallocation=metadata --reopen
3 4096 16 16M 40k preallocation=falloc -
3 65536 16 16M 300k preallocation=full --compress
2 65536 16 16M 300k preallocation=metadata -
2 65536 16 64M 300k - --reopen
2 4096 16 16M 40k - --compress
2 512 16 4M 6k - -
EOF

# O_DIRECT (--nocache) needs a file system that has it (not tmpfs).
direct_io=1
if ! dd if=/dev/zero of="$T/direct" bs=4096 count=1 oflag=direct \
    status=none 2>/dev/null; then
    direct_io=
    note "no O_DIRECT in $T: --nocache sequences run with the page cache"
fi

note "forward: random sequences through qsnap, checked by qemu-img"
i=0
while read -r ver cs rb size maxlen extra flags; do
    i=$((i + 1))
    [ "$extra" = - ] && extra=
    [ "$flags" = - ] && flags=
    [ "$flags" = --nocache ] && [ -z "$direct_io" ] && flags=
    for creator in qemu qsnap; do
        random_run "$creator" $((1000 + i)) "$ver" "$cs" "$rb" "$size" \
            "$maxlen" "$extra" "$flags"
        random_run "$creator" $((QSNAP_SEED * 100 + i)) "$ver" "$cs" "$rb" \
            "$size" "$maxlen" "$extra" "$flags"
    done
done <"$T/configs"

# ------------------------------------------------------------------------
note "odd virtual sizes: qsnap and QEMU agree on the size and the tail"
# qemu-img create rounds sizes up to 512 bytes; qsnap-img must too, and
# qsnap_create() must either do the same or refuse.
for size in 1000001 5000000 65537; do
    for how in lib cli; do
        img="$T/odd.qcow2"
        rm -f "$img"
        if [ "$how" = cli ]; then
            [ "$qsnap_creator" = cli ] || continue
            set -- "$QSNAP_IMG" create -f qcow2 "$img" "$size"
        else
            set -- "$QSNAP_TOOL" create "$img" "$size"
        fi
        if ! "$@" >"$T/create.out" 2>&1; then
            if [ "$how" = lib ] && [ -s "$T/create.out" ]; then
                # The library may refuse sizes QEMU cannot represent.
                echo "  ok $size bytes refused by qsnap_create:" \
                    "$(head -n 1 "$T/create.out")"
            else
                sed 's/^/      /' "$T/create.out" >&2
                fail "create a $size-byte image ($how)"
            fi
            continue
        fi
        q_size=$(image_field "$img" virtual-size)
        s_size=$("$QSNAP_TOOL" info "$img" | sed -n 's/^virtual_size=//p')
        if [ "$q_size" != "$s_size" ]; then
            fail "asked for $size bytes ($how): qsnap sees $s_size," \
                "qemu-img $q_size"
            continue
        fi
        run_ok "tail write" "$QSNAP_TOOL" write "$img" $((s_size - 1000)) \
            1000 0x6b
        if ! "$QEMU_IO" -r -c "read -P 0x6b $((s_size - 1000)) 1000" \
            "$img" >"$T/io.out" 2>&1 || grep -q 'fail' "$T/io.out"; then
            sed 's/^/      /' "$T/io.out" >&2
            fail "qemu-io cannot read the tail of a $size-byte image ($how)"
            continue
        fi
        echo "  ok $size bytes asked ($how): $s_size for both, tail readable"
    done
done

# ------------------------------------------------------------------------
note "forward: sequences over qemu-written data and an internal snapshot"
for cs in 4096 65536; do
    img="$T/s.qcow2"
    rm -f "$img" "$T/s.raw" "$T/s-snap.raw" "$T/snap.raw"
    run_ok "create" "$QEMU_IMG" create -q -f raw "$T/s.raw" 16M
    run_ok "pattern" "$QEMU_IO" -f raw -c "write -P 0x5a 0 3M" \
        -c "write -P 0xa5 5M 1M" -c "write -P 0x3c 15M 1M" "$T/s.raw"
    run_ok "convert" "$QEMU_IMG" convert -c -O qcow2 \
        -o "cluster_size=$cs" "$T/s.raw" "$img"
    run_ok "write" "$QEMU_IO" -c "write -P 0x77 1M 2M" \
        -c "write -z 6M 512k" "$img"
    run_ok "snapshot" "$QEMU_IMG" snapshot -c before "$img"
    run_ok "raw copy" "$QEMU_IMG" convert -O raw "$img" "$T/s-snap.raw"
    cp "$T/s-snap.raw" "$T/s.raw"
    s_ok=1
    for seed in 7 $((QSNAP_SEED + 7)); do
        if ! "$QSNAP_TOOL" random --seed "$seed" --ops "$OPS" \
            --max-len 200k --reopen "$T/s.raw" "$img" \
            >"$T/random.out" 2>&1; then
            sed 's/^/      /' "$T/random.out" >&2
            fail "random over a snapshot (cluster $cs seed $seed)"
            s_ok=
            break
        fi
        if ! "$QEMU_IMG" check -q "$img" >"$T/check.out" 2>&1; then
            "$QEMU_IMG" check "$img" 2>&1 | head -n 20 >&2
            fail "qemu-img check after a sequence over a snapshot" \
                "(cluster $cs seed $seed)"
            s_ok=
            break
        fi
        if ! "$QEMU_IMG" compare -f qcow2 -F raw "$img" "$T/s.raw" \
            >"$T/cmp.out" 2>&1; then
            cat "$T/cmp.out" >&2
            fail "qemu-img compare after a sequence over a snapshot" \
                "(cluster $cs seed $seed)"
            s_ok=
            break
        fi
    done
    [ -n "$s_ok" ] || continue
    run_ok "snapshot read" "$QEMU_IMG" convert -O raw \
        -l snapshot.name=before "$img" "$T/snap.raw"
    if cmp -s "$T/snap.raw" "$T/s-snap.raw"; then
        echo "  ok cluster=$cs: active layer matches the model, snapshot kept"
    else
        fail "internal snapshot changed by writes to the active layer" \
            "(cluster $cs)"
    fi
done

# ------------------------------------------------------------------------
note "forward: sequences on overlays (copy-on-write from a backing file)"
rm -f "$T/b.raw"
truncate -s 16M "$T/b.raw"
put_bytes "$T/b.raw" 0 16777216 11
for ver in 3 2; do
    compat=1.1
    [ "$ver" = 2 ] && compat=0.10
    base="$T/b.qcow2"
    rm -f "$base"
    run_ok "base" "$QEMU_IMG" convert -O qcow2 -o "compat=$compat" \
        "$T/b.raw" "$base"
    for cs in 4096 65536; do
        img="$T/o.qcow2"
        for seed in $((300 + cs % 7 + ver)) $((QSNAP_SEED + 300 + ver)); do
            rm -f "$img" "$T/o.raw"
            run_ok "overlay" "$QEMU_IMG" create -q -f qcow2 -b "$base" \
                -F qcow2 -o "compat=$compat,cluster_size=$cs" "$img"
            run_ok "model" "$QEMU_IMG" convert -O raw "$img" "$T/o.raw"
            o_desc="v$ver overlay cluster=$cs seed=$seed"
            if ! "$QSNAP_TOOL" random --seed "$seed" --ops "$OPS" \
                --max-len 200k --reopen --compress "$T/o.raw" "$img" \
                >"$T/random.out" 2>&1; then
                sed 's/^/      /' "$T/random.out" >&2
                fail "$o_desc"
            elif ! "$QEMU_IMG" check -q "$img" >"$T/check.out" 2>&1; then
                "$QEMU_IMG" check "$img" 2>&1 | head -n 20 >&2
                fail "qemu-img check after $o_desc"
            elif ! "$QEMU_IMG" compare -f qcow2 -F raw "$img" "$T/o.raw" \
                >"$T/cmp.out" 2>&1; then
                cat "$T/cmp.out" >&2
                fail "qemu-img compare after $o_desc"
            elif ! "$QEMU_IMG" compare -q "$base" "$T/b.raw"; then
                fail "the backing file changed during $o_desc"
            else
                echo "  ok $o_desc"
            fi
        done
    done
done

# ------------------------------------------------------------------------
note "forward: threads sharing one handle"
for cs in 4096 65536; do
    img="$T/t.qcow2"
    create qemu "$img" 16M 3 "$cs" 16 "" || continue
    if ! "$QSNAP_TOOL" stress --threads 4 --ops 1500 \
        --seed $((QSNAP_SEED + cs)) "$img" >"$T/stress.out" 2>&1; then
        sed 's/^/      /' "$T/stress.out" >&2
        fail "stress (cluster $cs, seed $((QSNAP_SEED + cs)))"
    elif ! "$QEMU_IMG" check -q "$img" >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$img" 2>&1 | head -n 20 >&2
        fail "qemu-img check after the threaded run (cluster $cs)"
    else
        echo "  ok cluster=$cs: 4 threads"
    fi
done

# ------------------------------------------------------------------------
note "crash: kill -9 in the middle of a sequence leaves at most leaks"
i=0
for o in cluster_size=65536 cluster_size=4096,refcount_bits=4 \
    cluster_size=512 compat=0.10 cluster_size=4096 cluster_size=2M; do
    i=$((i + 1))
    img="$T/k.qcow2"
    rm -f "$img" "$T/k.raw"
    run_ok "create" "$QEMU_IMG" create -q -f qcow2 -o "$o" "$img" 64M
    truncate -s 64M "$T/k.raw"
    set -- --reopen
    [ $((i % 2)) = 0 ] && set -- "$@" --compress
    [ $((i % 3)) = 0 ] && set -- "$@" --cache-size 8k
    "$QSNAP_TOOL" random --seed $((QSNAP_SEED + 400 + i)) --ops 100000000 \
        --max-len 100k "$@" "$T/k.raw" "$img" >/dev/null 2>&1 &
    pid=$!
    sleep "0.$((i + 2))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    k_desc="$o, killed after 0.$((i + 2))s (seed $((QSNAP_SEED + 400 + i)) $*)"
    set +e
    "$QEMU_IMG" check "$img" >"$T/check.out" 2>&1
    k_rc=$?
    set -e
    if [ "$k_rc" != 0 ] && [ "$k_rc" != 3 ]; then
        head -n 20 "$T/check.out" >&2
        fail "corruption after a crash: $k_desc"
        continue
    fi
    q_leaks=$(sed -n 's/^\([0-9]*\) leaked clusters.*/\1/p' "$T/check.out")
    if ! "$QSNAP_TOOL" walk "$img" >"$T/walk.out" 2>"$T/walk.err"; then
        cat "$T/walk.err" >&2
        fail "qsnap cannot read the image after a crash: $k_desc"
        continue
    fi
    # The same leaked clusters.  qemu-img only looks at clusters inside
    # the file; qsnap also reports refcounts left on clusters past its end.
    k_cs=$(image_field "$img" cluster-size)
    k_n=$(( ($(stat -c %s "$img") + k_cs - 1) / k_cs ))
    grep -o 'Leaked cluster [0-9]*' "$T/check.out" | sort >"$T/q.leaks" ||
        true
    grep -o 'Leaked cluster [0-9]*' "$T/walk.err" |
        awk -v n="$k_n" '$3 < n' | sort >"$T/s.leaks" || true
    if ! cmp -s "$T/q.leaks" "$T/s.leaks"; then
        diff "$T/q.leaks" "$T/s.leaks" | head -n 10 >&2 || true
        fail "qsnap and qemu-img find different leaks: $k_desc"
        continue
    fi
    if [ "$(wc -l <"$T/q.leaks")" != "${q_leaks:-0}" ]; then
        fail "unexpected qemu-img check output: $k_desc"
        continue
    fi
    run_ok "repair" "$QEMU_IMG" check -q -r leaks "$img"
    if ! "$QEMU_IMG" check -q "$img" >"$T/check.out" 2>&1; then
        fail "qemu-img check -r leaks did not clean up: $k_desc"
        continue
    fi
    if [ "$("$QSNAP_TOOL" digest "$img")" != "$(qemu_digest "$img")" ]; then
        fail "qsnap and qemu-img read the crashed image differently: $k_desc"
        continue
    fi
    echo "  ok $k_desc: ${q_leaks:-0} leaked clusters, nothing worse"
done

note "crash with lazy refcounts: the dirty image is repaired on open"
for i in 1 2; do
    img="$T/z.qcow2"
    rm -f "$img" "$T/z.raw"
    run_ok "create" "$QEMU_IMG" create -q -f qcow2 \
        -o "lazy_refcounts=on,cluster_size=$((i * 4096))" "$img" 64M
    truncate -s 64M "$T/z.raw"
    "$QSNAP_TOOL" random --seed $((QSNAP_SEED + 500 + i)) --ops 100000000 \
        --max-len 64k --compress "$T/z.raw" "$img" >/dev/null 2>&1 &
    pid=$!
    sleep "0.$((i + 3))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    z_desc="lazy refcounts, cluster $((i * 4096))"
    z_desc="$z_desc, seed $((QSNAP_SEED + 500 + i))"
    want=$(qemu_digest "$img")
    if [ "$("$QSNAP_TOOL" digest "$img")" != "$want" ]; then
        fail "qsnap reads the crashed image differently: $z_desc"
    elif ! "$QSNAP_TOOL" walk --rw "$img" >"$T/walk.out" 2>"$T/walk.err"
    then
        sed 's/^/      /' "$T/walk.err" >&2
        fail "read-write open (repair) of the crashed image: $z_desc"
    elif ! "$QEMU_IMG" check -q "$img" >"$T/check.out" 2>&1; then
        "$QEMU_IMG" check "$img" 2>&1 | head -n 20 >&2
        fail "qemu-img check after qsnap's repair: $z_desc"
    elif [ "$("$QSNAP_TOOL" digest "$img")" != "$want" ]; then
        fail "the repair changed the content: $z_desc"
    else
        echo "  ok $z_desc: repaired, content kept"
    fi
done

# ------------------------------------------------------------------------
note "reverse: qemu-io writes at random, qsnap reads"

# qemu_io_script SEED SIZE CLUSTER COUNT: random qemu-io commands.
qemu_io_script()
{
    awk -v seed="$1" -v size="$2" -v cluster="$3" -v count="$4" '
    function rnd(n) {
        x = (x * 16807) % 2147483647
        return x % n
    }
    BEGIN {
        x = seed % 2147483646 + 1
        sectors = size / 512
        for (i = 0; i < count; i++) {
            k = rnd(100)
            off = rnd(sectors) * 512
            len = (1 + rnd(4 * cluster / 512)) * 512
            if (off + len > size) {
                len = size - off
            }
            if (k < 55) {
                printf "write -P %d %d %d\n", rnd(256), off, len
            } else if (k < 70) {
                printf "write -z %d %d\n", off, len
            } else if (k < 80) {
                printf "write -z -u %d %d\n", off, len
            } else if (k < 90) {
                printf "discard %d %d\n", off, len
            } else {
                # QEMU compresses only into clusters never touched yet.
                c = rnd(size / cluster)
                if (c in touched) {
                    continue
                }
                touched[c] = 1
                printf "write -c -P %d %d %d\n", rnd(256), c * cluster,
                    cluster
                continue
            }
            for (c = int(off / cluster); c * cluster < off + len; c++) {
                touched[c] = 1
            }
        }
    }'
}

cat >"$T/rconfigs" <<'EOF'
3 512 16 4M -
3 512 1 2M -
3 4096 4 16M -
3 65536 16 64M -
3 65536 64 64M compression_type=zstd
3 65536 16 64M extended_l2=on
3 2097152 8 64M -
2 65536 16 64M -
2 4096 16 16M -
EOF

i=0
while read -r ver cs rb size extra; do
    i=$((i + 1))
    [ "$extra" = - ] && extra=
    for seed in $((2000 + i)) $((QSNAP_SEED * 100 + 50 + i)); do
        img="$T/q.qcow2"
        create qemu "$img" "$size" "$ver" "$cs" "$rb" "$extra" || continue
        bytes=$(image_field "$img" virtual-size)
        qemu_io_script "$seed" "$bytes" "$cs" 120 >"$T/cmds"
        if ! "$QEMU_IO" "$img" <"$T/cmds" >"$T/qemu-io.out" 2>&1; then
            cat "$T/qemu-io.out" >&2
            die "qemu-io failed"
        fi
        if grep -qi "error\|failed" "$T/qemu-io.out"; then
            grep -i "error\|failed" "$T/qemu-io.out" | head >&2
            die "qemu-io reported errors (cluster $cs seed $seed)"
        fi
        rm -f "$T/q-qemu.raw" "$T/q-qsnap.raw"
        run_ok "convert" "$QEMU_IMG" convert -O raw "$img" "$T/q-qemu.raw"
        r_desc="v$ver cluster=$cs refcount_bits=$rb ${extra:+$extra }seed=$seed"
        if ! "$QSNAP_TOOL" dump "$img" "$T/q-qsnap.raw" 2>"$T/dump.err"; then
            sed 's/^/      /' "$T/dump.err" >&2
            fail "qsnap-tool dump ($r_desc)"
        elif ! cmp "$T/q-qemu.raw" "$T/q-qsnap.raw" >"$T/cmp.out" 2>&1; then
            sed 's/^/      /' "$T/cmp.out" >&2
            fail "qsnap reads a qemu-io-written image differently ($r_desc)"
        else
            echo "  ok $r_desc"
        fi
    done
done <"$T/rconfigs"

[ "$failures" -eq 0 ] || die "$failures sequences failed"
echo "$me: all sequences matched"
