#!/bin/sh
# locking.sh - qsnap and QEMU respect each other's image locks.
#
# For every kind of holder (read-write, read-only, read-only with
# force-share) and every kind of contender, QEMU against QEMU gives the
# reference outcome; qsnap holding against a QEMU contender, QEMU holding
# against a qsnap contender and qsnap against qsnap must give the same.
# In particular: while qsnap holds an image read-write, `qemu-io -c write`
# fails with a lock error and `qemu-img info -U` works; while qemu-io holds
# it read-write, qsnap's read-write open fails; force-share reads work.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need "$QEMU_IMG"
need "$QEMU_IO"
need mkfifo
need_built "$QSNAP_TOOL"

img="$T/lock.qcow2"
"$QEMU_IMG" create -q -f qcow2 "$img" 16M
mkfifo "$T/fifo"
holder_pid=

# wait_for FILE TEXT: until TEXT appears in FILE (10 s at most).
wait_for()
{
    n=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        n=$((n + 1))
        if [ "$n" -gt 100 ] || ! kill -0 "$holder_pid" 2>/dev/null; then
            cat "$1" >&2
            die "the holder did not start"
        fi
        sleep 0.1
    done
}

# start_holder IMPL MODE: IMPL qemu|qsnap, MODE rw|ro|roU.
start_holder()
{
    holder_impl=$1
    : >"$T/holder.out"
    if [ "$1" = qemu ]; then
        case $2 in
        rw) set -- ;;
        ro) set -- -r ;;
        roU) set -- -r -U ;;
        esac
        "$QEMU_IO" "$@" "$img" <"$T/fifo" >"$T/holder.out" 2>&1 &
        holder_pid=$!
        exec 3>"$T/fifo"
        wait_for "$T/holder.out" "qemu-io>"
    else
        case $2 in
        rw) set -- --rw ;;
        ro) set -- ;;
        roU) set -- -U ;;
        esac
        "$QSNAP_TOOL" hold "$@" "$img" 60 >"$T/holder.out" 2>&1 &
        holder_pid=$!
        wait_for "$T/holder.out" "^holding"
    fi
}

stop_holder()
{
    if [ "$holder_impl" = qemu ]; then
        echo quit >&3
        exec 3>&-
        wait "$holder_pid" || true
    else
        kill "$holder_pid" 2>/dev/null || true
        wait "$holder_pid" 2>/dev/null || true
    fi
    holder_pid=
}

# contend IMPL MODE: prints "ok" or "refused"; output in $T/contend.out.
contend()
{
    if [ "$1" = qemu ]; then
        case $2 in
        rw) set -- -c "write -P 0x5a 0 4k" ;;
        ro) set -- -r -c "read 0 4k" ;;
        roU) set -- -r -U -c "read 0 4k" ;;
        esac
        if "$QEMU_IO" "$@" "$img" >"$T/contend.out" 2>&1; then
            echo ok
        else
            echo refused
        fi
    else
        case $2 in
        rw) set -- --rw ;;
        ro) set -- ;;
        roU) set -- -U ;;
        esac
        if "$QSNAP_TOOL" hold "$@" "$img" 0 >"$T/contend.out" 2>&1; then
            echo ok
        else
            echo refused
        fi
    fi
}

cleanup_holder()
{
    if [ -n "$holder_pid" ]; then
        kill "$holder_pid" 2>/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup_holder EXIT

failures=0
modes="rw ro roU"

note "reference: QEMU against QEMU"
for h in $modes; do
    start_holder qemu "$h"
    for c in $modes; do
        r=$(contend qemu "$c")
        echo "$h $c $r" >>"$T/reference"
        echo "  holder $h, contender $c: $r"
    done
    stop_holder
done

for pair in "qsnap qemu" "qemu qsnap" "qsnap qsnap"; do
    # shellcheck disable=SC2086  # split "holder contender"
    set -- $pair
    hi=$1
    ci=$2
    note "$hi holding, $ci contending"
    for h in $modes; do
        start_holder "$hi" "$h"
        for c in $modes; do
            want=$(awk -v h="$h" -v c="$c" '$1 == h && $2 == c { print $3 }' \
                "$T/reference")
            got=$(contend "$ci" "$c")
            if [ "$got" != "$want" ]; then
                echo "  FAIL holder $h, contender $c: $got," \
                    "QEMU gives $want" >&2
                sed 's/^/      /' "$T/contend.out" >&2
                failures=$((failures + 1))
                continue
            fi
            detail=
            if [ "$got" = refused ]; then
                detail=$(grep -v '^$' "$T/contend.out" | head -n 1)
                if [ "$ci" = qsnap ] &&
                    ! grep -q "${img##*/}" "$T/contend.out"; then
                    echo "  FAIL holder $h, contender $c: the refusal does" \
                        "not name the image: $detail" >&2
                    failures=$((failures + 1))
                    continue
                fi
                if [ "$ci" = qemu ] && ! grep -qi lock "$T/contend.out"; then
                    echo "  FAIL holder $h, contender $c: not a lock error:" \
                        "$detail" >&2
                    failures=$((failures + 1))
                    continue
                fi
            fi
            echo "  ok holder $h, contender $c: $got${detail:+ ($detail)}"
        done
        if [ "$hi" = qsnap ] && [ "$h" = rw ]; then
            if "$QEMU_IMG" info -U "$img" >"$T/info.out" 2>&1; then
                echo "  ok qemu-img info -U works beside a qsnap writer"
            else
                cat "$T/info.out" >&2
                echo "  FAIL qemu-img info -U beside a qsnap writer" >&2
                failures=$((failures + 1))
            fi
            if "$QSNAP_TOOL" digest "$img" >"$T/info.out" 2>&1; then
                echo "  ok a force-share qsnap read works beside a writer"
            else
                cat "$T/info.out" >&2
                echo "  FAIL force-share qsnap read beside a writer" >&2
                failures=$((failures + 1))
            fi
        fi
        stop_holder
    done
done

note "the locks go away with the holder"
start_holder qsnap rw
stop_holder
[ "$(contend qemu rw)" = ok ] ||
    die "qemu-io cannot write after the qsnap writer exited"
start_holder qemu rw
stop_holder
[ "$(contend qsnap rw)" = ok ] ||
    die "qsnap cannot open read-write after qemu-io exited"
qemu_check "$img"

[ "$failures" -eq 0 ] || die "$failures lock combinations differ from QEMU"
echo "$me: qsnap's image locks behave as QEMU's"
