#!/bin/sh
# cli_snapshot.sh - qsnap-img's snapshot commands against qemu-img.
#
# snapshot: -c/-l/-a/-d on one image shared with qemu-img (each tool sees
#           and applies the other's snapshots; the table equals qemu-img's
#           but for the DATE column, the JSON equals qemu-img info's
#           "snapshots"), --rename, and the error cases;
# vmstate:  store/list/extract round trips byte for byte (a 64 MiB mostly
#           zero file that must take little space, a JSON file, random
#           bytes), dump of a section container and, where QEMU can run,
#           of QEMU's own VM state;
# list:     exclusive sizes (a snapshot followed by a 1 MiB overwrite
#           holds at least 1 MiB alone) and the backing chain;
# delete:   one by name or ID, --all (qemu-img sees none left);
# compact:  the file shrinks after deletes, content and check unchanged;
# convert:  -l in every form and -s give what qemu-img convert -l gives.
set -eu

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

if [ -d "$QSNAP_IMG" ]; then
    QSNAP_IMG=$QSNAP_IMG/qsnap-img
fi
need "$QEMU_IMG"
need "$QEMU_IO"
need_built "$QSNAP_IMG"

cd "$T"
QI=$QSNAP_IMG
MiB=1048576

# qsnap COMMAND...: run qsnap-img, which must succeed.
qsnap()
{
    run_ok "qsnap-img $1" "$QI" "$@"
}

# qio IMAGE COMMAND: one qemu-io command on a qcow2 image.
qio()
{
    run_ok "qemu-io $2" "$QEMU_IO" -f qcow2 -c "$2" "$1"
}

# fails TEXT DESCRIPTION COMMAND...: COMMAND must exit with status 1 and
# its message must contain TEXT (usually the name it did not find).
fails()
{
    f_text=$1
    f_desc=$2
    shift 2
    f_rc=0
    "$@" >"$T/f.out" 2>"$T/f.err" || f_rc=$?
    if [ "$f_rc" -ne 1 ]; then
        cat "$T/f.out" "$T/f.err" >&2
        die "$f_desc: exit status $f_rc, not 1: $*"
    fi
    if ! grep -qF -- "$f_text" "$T/f.err"; then
        cat "$T/f.err" >&2
        die "$f_desc: the message does not mention \"$f_text\""
    fi
}

# same_error DESCRIPTION ARGS...: qsnap-img and qemu-img both exit 1 with
# the same message (but for the program name).
same_error()
{
    se_desc=$1
    shift
    se_qs=0
    se_qe=0
    "$QI" "$@" >/dev/null 2>"$T/se-qs.err" || se_qs=$?
    "$QEMU_IMG" "$@" >/dev/null 2>"$T/se-qe.err" || se_qe=$?
    sed 's/qemu-img/qsnap-img/g' "$T/se-qe.err" >"$T/se-qe2.err"
    if [ "$se_qs" -ne 1 ] || [ "$se_qe" -ne 1 ] ||
        ! cmp -s "$T/se-qs.err" "$T/se-qe2.err"; then
        diff "$T/se-qs.err" "$T/se-qe2.err" >&2 || true
        die "$se_desc: exit $se_qs (qemu-img: $se_qe) or other message"
    fi
}

# table PROGRAM IMAGE: `snapshot -l` with the DATE column normalised.
date_re='[0-9]\{4\}-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]'
table()
{
    "$1" snapshot -l "$2" >"$T/table.raw" || die "$1 snapshot -l $2 failed"
    sed "s/$date_re/YYYY-MM-DD hh:mm:ss/" "$T/table.raw"
}

# same_snapshots IMAGE: the table and the JSON equal qemu-img's.
same_snapshots()
{
    table "$QEMU_IMG" "$1" >"$T/qe.tab"
    table "$QI" "$1" >"$T/qs.tab"
    if ! cmp -s "$T/qs.tab" "$T/qe.tab"; then
        diff "$T/qs.tab" "$T/qe.tab" >&2 || true
        die "snapshot -l $1 differs from qemu-img's"
    fi
    # qemu-img has no JSON for snapshot -l: compare with qemu-img info's.
    "$QEMU_IMG" info --output=json "$1" |
        sed -n '/^    "snapshots": \[/,/^    \]/p' |
        sed -e 's/^    //' -e '1s/.*/[/' -e 's/^],$/]/' >"$T/qe.json"
    if [ ! -s "$T/qe.json" ]; then
        echo "[]" >"$T/qe.json"
    fi
    "$QI" snapshot -l --output=json "$1" >"$T/qs.json" ||
        die "snapshot -l --output=json $1 failed"
    if ! cmp -s "$T/qs.json" "$T/qe.json"; then
        diff "$T/qs.json" "$T/qe.json" >&2 || true
        die "snapshot -l --output=json $1 differs from qemu-img info's"
    fi
}

# tags PROGRAM IMAGE: the snapshot names that PROGRAM lists, one a line.
tags()
{
    "$1" snapshot -l "$2" | sed '1,2d; s/^[^ ]* *\([^ ]*\) .*/\1/'
}

# has_tag PROGRAM IMAGE NAME: true if PROGRAM lists snapshot NAME.
has_tag()
{
    tags "$1" "$2" | grep -qx -- "$3"
}

# json_pairs FILE KEY1 KEY2: for each object of a top-level array member
# (members indented by 12 spaces), the values of KEY1 and KEY2.
json_pairs()
{
    awk -v k1="\"$2\":" -v k2="\"$3\":" '
        /^        [{]/ { v1 = ""; v2 = "" }
        /^            "/ {
            val = $0
            sub(/^[^:]*: */, "", val)
            sub(/,$/, "", val)
            gsub(/"/, "", val)
            if ($1 == k1) { v1 = val }
            if ($1 == k2) { v2 = val }
        }
        /^        [}]/ {
            if (v1 != "") { print v1, v2 }
            v1 = ""
            v2 = ""
        }
    ' "$1"
}

# vm_state_size IMAGE NAME: the VM state size qemu-img reports.
vm_state_size()
{
    "$QEMU_IMG" info -U --output=json "$1" >"$T/vss.json"
    json_pairs "$T/vss.json" name vm-state-size |
        awk -v n="$2" '$1 == n { print $2 }'
}

file_size()
{
    wc -c <"$1" | tr -d ' '
}

# model FILE SIZE: a raw model of the guest disk (zeros).
model()
{
    rm -f "$1"
    truncate -s "$2" "$1"
}

# model_write FILE OFFSET LENGTH PATTERN: qemu-io's write -P on the model.
model_write()
{
    run_ok "qemu-io raw write" "$QEMU_IO" -f raw \
        -c "write -P $4 $2 $3" "$1"
}

# ------------------------------------------------------------ snapshot
note "snapshot -c/-l/-a/-d shared with qemu-img"
"$QEMU_IMG" create -q -f qcow2 s.qcow2 64M
model s-a.raw 64M
qio s.qcow2 "write -P 0x11 0 4M"
model_write s-a.raw 0 4M 0x11
cp s-a.raw s-b.raw
qsnap snapshot -c qs1 s.qcow2
qio s.qcow2 "write -P 0x22 1M 1M"
model_write s-b.raw 1M 1M 0x22
"$QEMU_IMG" snapshot -c qe1 s.qcow2
qio s.qcow2 "write -P 0x33 3M 2M"
has_tag "$QEMU_IMG" s.qcow2 qs1 || die "qemu-img does not list qs1"
has_tag "$QI" s.qcow2 qe1 || die "qsnap-img does not list qe1"
same_snapshots s.qcow2
qemu_check s.qcow2 "after snapshot -c"

# Each tool applies the other's snapshot.
"$QEMU_IMG" snapshot -a qs1 s.qcow2
qemu_compare s.qcow2 s-a.raw "qemu-img applied qs1"
qsnap snapshot -a qe1 s.qcow2
qemu_compare s.qcow2 s-b.raw "qsnap-img applied qe1"
qsnap snapshot -a 1 s.qcow2
qemu_compare s.qcow2 s-a.raw "qsnap-img applied ID 1"
qemu_check s.qcow2 "after snapshot -a"

# -q still lists (as qemu-img); no action does nothing.
"$QI" snapshot -q -l s.qcow2 >q.tab
"$QEMU_IMG" snapshot -q -l s.qcow2 >qe-q.tab
cmp -s q.tab qe-q.tab || die "snapshot -q -l differs from qemu-img's"
qsnap snapshot s.qcow2

# Errors, with qemu-img's messages and exit codes.
same_error "apply unknown" snapshot -a nope s.qcow2
same_error "delete unknown" snapshot -d nope s.qcow2
same_error "delete by ID (-d takes names)" snapshot -d 1 s.qcow2
same_error "mixed actions" snapshot -l -c x s.qcow2
same_error "no file" snapshot -l
fails "nope" "apply unknown" "$QI" snapshot -a nope s.qcow2
fails "qs1" "create an existing name" "$QI" snapshot -c qs1 s.qcow2
fails "qe1" "create qemu-img's existing name" "$QI" snapshot -c qe1 s.qcow2
fails "nope" "rename unknown" "$QI" snapshot --rename nope x s.qcow2
fails "read-only" "-U for writing" "$QI" snapshot -U -c x s.qcow2
[ "$(tags "$QEMU_IMG" s.qcow2 | wc -l)" -eq 2 ] ||
    die "a failed command changed the snapshot table"

note "snapshot --rename"
qsnap snapshot --rename qs1 renamed s.qcow2
has_tag "$QEMU_IMG" s.qcow2 renamed || die "qemu-img does not see the rename"
has_tag "$QEMU_IMG" s.qcow2 qs1 && die "qs1 still listed after the rename"
qsnap snapshot --rename 2 qe1-renamed s.qcow2
has_tag "$QEMU_IMG" s.qcow2 qe1-renamed || die "rename by ID failed"
fails "renamed" "rename onto an existing name" \
    "$QI" snapshot --rename qe1-renamed renamed s.qcow2
"$QEMU_IMG" snapshot -a renamed s.qcow2
qemu_compare s.qcow2 s-a.raw "renamed snapshot"
same_snapshots s.qcow2

note "snapshot -d"
qsnap snapshot -d renamed s.qcow2
has_tag "$QEMU_IMG" s.qcow2 renamed && die "-d left the snapshot"
"$QEMU_IMG" snapshot -d qe1-renamed s.qcow2
[ -z "$("$QI" snapshot -l s.qcow2)" ] || die "snapshot -l of no snapshots"
same_snapshots s.qcow2
qemu_check s.qcow2 "after snapshot -d"
qemu_compare s.qcow2 s-a.raw "after snapshot -d"

# ------------------------------------------------------------ vmstate
note "vmstate store/list/extract/dump"
mkdir vin
truncate -s 64M vin/memory
put_bytes vin/memory 0 4096 1
put_bytes vin/memory $((20 * MiB + 12345)) 3000 2
put_bytes vin/memory $((64 * MiB - 4096)) 4096 3
printf '{"cpus": [{"id": 0, "rip": "0xffffffff81000000"}], "devs": 3}\n' \
    >vin/vm.json
random_bytes 4 $((MiB + 4321)) >vin/random
mkdir vin/not-a-file
"$QEMU_IMG" create -q -f qcow2 v.qcow2 32M
qio v.qcow2 "write -P 0x44 0 1M"
model v.raw 32M
model_write v.raw 0 1M 0x44
qsnap vmstate store v.qcow2 ck1 vin
qio v.qcow2 "write -P 0x55 0 2M"
has_tag "$QEMU_IMG" v.qcow2 ck1 || die "qemu-img does not list ck1"
qemu_check v.qcow2 "after vmstate store"
same_snapshots v.qcow2

"$QI" vmstate list --output=json v.qcow2 ck1 >vl.json ||
    die "vmstate list --output=json failed"
json_pairs vl.json name size >vl.sizes
json_pairs vl.json name stored-size >vl.stored
printf 'memory %s\nrandom %s\nvm.json %s\n' $((64 * MiB)) \
    "$(file_size vin/random)" "$(file_size vin/vm.json)" >vl.expect
cmp -s vl.sizes vl.expect || {
    cat vl.json >&2
    die "vmstate list: sections or sizes are wrong"
}
mem_stored=$(awk '$1 == "memory" { print $2 }' vl.stored)
if [ "$mem_stored" -le 0 ] || [ "$mem_stored" -ge $((64 * MiB / 100)) ]; then
    die "the mostly-zero 64 MiB section takes $mem_stored bytes"
fi
grep -q '"type": "sections"' vl.json || die "vmstate list: type not sections"
"$QI" vmstate list v.qcow2 ck1 >vl.txt || die "vmstate list failed"
for f in memory random vm.json; do
    grep -q " $f\$" vl.txt || die "vmstate list does not show $f"
done

qsnap vmstate extract v.qcow2 ck1 vout
for f in memory random vm.json; do
    cmp -s "vin/$f" "vout/$f" || die "vmstate extract: $f differs"
done
[ "$(find vout -type f | wc -l)" -eq 3 ] || die "vmstate extract: extra files"
rm -rf vout
qsnap vmstate extract v.qcow2 1 vout
cmp -s vin/vm.json vout/vm.json || die "vmstate extract by ID differs"

qsnap snapshot -c ck2 --vmstate vin v.qcow2
qsnap vmstate extract v.qcow2 ck2 vout2
for f in memory random vm.json; do
    cmp -s "vin/$f" "vout2/$f" || die "snapshot -c --vmstate: $f differs"
done

qsnap vmstate dump v.qcow2 ck1 dump.bin
[ "$(file_size dump.bin)" -eq "$(vm_state_size v.qcow2 ck1)" ] ||
    die "vmstate dump: size is not the VM state size"
[ "$(head -c 8 dump.bin)" = QSNAPVMS ] || die "vmstate dump: no container"

"$QEMU_IMG" snapshot -a ck1 v.qcow2
qemu_compare v.qcow2 v.raw "qemu-img applied the checkpoint"
qemu_check v.qcow2 "after applying the checkpoint"

"$QEMU_IMG" snapshot -c plain v.qcow2
fails "plain" "vmstate list without VM state" "$QI" vmstate list v.qcow2 plain
fails "nope" "vmstate list unknown" "$QI" vmstate list v.qcow2 nope
fails "nope" "vmstate extract unknown" "$QI" vmstate extract v.qcow2 nope x
fails "nope" "vmstate dump unknown" "$QI" vmstate dump v.qcow2 nope x
fails "ck1" "vmstate store existing" "$QI" vmstate store v.qcow2 ck1 vin
mkdir empty
fails "empty" "vmstate store of no files" "$QI" vmstate store v.qcow2 e empty
[ ! -e x ] || die "a failed vmstate command wrote a file"
qemu_check v.qcow2 "after failed vmstate commands"

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    note "vmstate of QEMU's own savevm"
    "$QEMU_IMG" create -q -f qcow2 q.qcow2 16M
    printf 'savevm vm1\nquit\n' |
        timeout 120 qemu-system-x86_64 -machine none -nodefaults \
            -display none -m 16 -monitor stdio \
            -drive file=q.qcow2,if=none,format=qcow2,id=d0 >qemu.log 2>&1 ||
        true
fi
if [ -f q.qcow2 ] && has_tag "$QEMU_IMG" q.qcow2 vm1; then
    n=$(vm_state_size q.qcow2 vm1)
    "$QI" vmstate list q.qcow2 vm1 >ql.txt || die "vmstate list (QEMU) failed"
    grep -q "raw (QEMU) VM state stream of $n bytes" ql.txt ||
        die "vmstate list of QEMU's state: $(cat ql.txt)"
    qsnap vmstate dump q.qcow2 vm1 qdump.bin
    [ "$(file_size qdump.bin)" -eq "$n" ] || die "dump of QEMU's state: size"
    [ "$(head -c 4 qdump.bin)" = QEVM ] || die "dump of QEMU's state: magic"
    fails "vm1" "extract of QEMU's state" "$QI" vmstate extract q.qcow2 vm1 qx
else
    note "QEMU could not save a VM state here; raw stream part not run"
fi

# ------------------------------------------------------------ list
note "list: exclusive sizes and the chain"
"$QEMU_IMG" create -q -f qcow2 l.qcow2 64M
model l.raw 64M
qio l.qcow2 "write -P 0x11 0 8M"
model_write l.raw 0 8M 0x11
qsnap snapshot -c A l.qcow2
qio l.qcow2 "write -P 0x22 0 1M"
model_write l.raw 0 1M 0x22
qsnap snapshot -c B l.qcow2
qio l.qcow2 "write -P 0x33 0 2M"
model_write l.raw 0 2M 0x33
qsnap snapshot -c C l.qcow2
"$QI" list --output=json l.qcow2 >list.json || die "list --output=json failed"
json_pairs list.json name exclusive-size >excl
excl_of()
{
    awk -v n="$1" '$1 == n { print $2 }' excl
}
[ "$(excl_of A)" -ge "$MiB" ] || die "A holds $(excl_of A) bytes alone"
[ "$(excl_of B)" -ge "$MiB" ] || die "B holds $(excl_of B) bytes alone"
[ "$(excl_of C)" -lt "$MiB" ] || die "C holds $(excl_of C) bytes alone"
[ $(($(excl_of A) + $(excl_of B) + $(excl_of C))) -lt "$(file_size l.qcow2)" ] ||
    die "exclusive sizes add up to more than the file"
"$QI" list l.qcow2 >list.txt || die "list failed"
grep -q "EXCLUSIVE" list.txt || die "list: no EXCLUSIVE column"
for s in A B C; do
    grep -q "^[0-9]* *$s " list.txt || die "list: no row for $s"
done

"$QEMU_IMG" create -q -f qcow2 -b l.qcow2 -F qcow2 top.qcow2
qsnap snapshot -c T top.qcow2
"$QI" list --output=json top.qcow2 >chain.json || die "list of a chain failed"
grep -q '"filename": "l.qcow2"' chain.json || die "list: no backing layer"
grep -q '"filename": "top.qcow2"' chain.json || die "list: no top layer"
[ "$(grep -c '"depth":' chain.json)" -eq 2 ] || die "list: not two layers"
"$QI" list top.qcow2 >chain.txt || die "list of a chain failed"
grep -q "^1 .* l.qcow2\$" chain.txt || die "list: layer 1 is not l.qcow2"
grep -q "snapshot 3: C" chain.txt || die "list: layer 1 snapshots missing"

# ------------------------------------------------------------ delete
note "delete and delete --all"
"$QI" delete l.qcow2 A >del.out || die "delete A failed"
grep -q "'A'" del.out || die "delete does not report A"
has_tag "$QEMU_IMG" l.qcow2 A && die "qemu-img still lists A"
qsnap delete l.qcow2 2
has_tag "$QEMU_IMG" l.qcow2 B && die "delete by ID left B"
fails "nope" "delete unknown" "$QI" delete l.qcow2 nope
qemu_check l.qcow2 "after delete"
qemu_compare l.qcow2 l.raw "after delete"
"$QEMU_IMG" snapshot -c D l.qcow2
"$QI" delete --all l.qcow2 >delall.out || die "delete --all failed"
[ "$(wc -l <delall.out)" -eq 2 ] || die "delete --all reports $(cat delall.out)"
[ -z "$("$QEMU_IMG" snapshot -l l.qcow2)" ] || die "snapshots left by --all"
qemu_check l.qcow2 "after delete --all"
qemu_compare l.qcow2 l.raw "after delete --all"
qsnap delete --all l.qcow2

# ------------------------------------------------------------ compact
note "compact"
# Overwrite everything after a snapshot, then delete it: the old data is
# freed inside the file, and compaction gives it back.
"$QEMU_IMG" create -q -f qcow2 c.qcow2 64M
qio c.qcow2 "write -P 0x66 0 16M"
qsnap snapshot -c old c.qcow2
qio c.qcow2 "write -P 0x77 0 16M"
qio c.qcow2 "write -P 0x78 32M 4M"
model c.raw 64M
model_write c.raw 0 16M 0x77
model_write c.raw 32M 4M 0x78
qsnap delete c.qcow2 old
before=$(file_size c.qcow2)
"$QI" compact c.qcow2 >compact.out || die "compact failed"
after=$(file_size c.qcow2)
[ "$after" -lt $((before - 8 * MiB)) ] ||
    die "compact: $before -> $after bytes"
grep -q "($before bytes)" compact.out || die "compact: size before not shown"
grep -q "($after bytes)" compact.out || die "compact: size after not shown"
qemu_check c.qcow2 "after compact"
qemu_compare c.qcow2 c.raw "after compact"
[ -z "$("$QI" compact -q c.qcow2 2>&1)" ] || die "compact -q printed"
"$QI" compact -p c.qcow2 2>progress.err >/dev/null || die "compact -p failed"
grep -q "100.00/100%" progress.err || die "compact -p drew no progress"
qemu_check c.qcow2 "after a second compact"
qemu_compare c.qcow2 c.raw "after a second compact"

# ------------------------------------------------------------ convert -l
note "convert -l"
"$QEMU_IMG" create -q -f qcow2 base.qcow2 48M
qio base.qcow2 "write -P 0x12 0 48M"
"$QEMU_IMG" create -q -f qcow2 -b base.qcow2 -F qcow2 k.qcow2
qio k.qcow2 "write -P 0x13 4M 2M"
qio k.qcow2 "write -z 10M 1M"
qsnap snapshot -c s1 k.qcow2
qio k.qcow2 "write -P 0x14 5M 4M"
"$QEMU_IMG" resize -q k.qcow2 64M
qio k.qcow2 "write -P 0x15 60M 1M"
"$QEMU_IMG" snapshot -c s2 k.qcow2
qio k.qcow2 "write -P 0x16 0 64M"
for l in snapshot.id=1 snapshot.name=s1 snapshot.id=2,snapshot.name=s2 \
    snapshot.name=s2 1 s2 2; do
    rm -f cq.raw ce.raw cq.qcow2
    "$QEMU_IMG" convert -O raw -l "$l" k.qcow2 ce.raw ||
        die "qemu-img convert -l $l failed"
    qsnap convert -O raw -l "$l" k.qcow2 cq.raw
    cmp -s cq.raw ce.raw || die "convert -l $l differs from qemu-img's"
    qsnap convert -O qcow2 -l "$l" k.qcow2 cq.qcow2
    qemu_check cq.qcow2 "convert -l $l"
    qemu_compare cq.qcow2 ce.raw "convert -O qcow2 -l $l"
done
rm -f cq.raw ce.raw
"$QEMU_IMG" convert -O raw -l s1 k.qcow2 ce.raw
qsnap convert -O raw -s s1 k.qcow2 cq.raw
cmp -s cq.raw ce.raw || die "convert -s differs from convert -l"
fails "nope" "convert -l unknown" "$QI" convert -O raw -l nope k.qcow2 x.raw
fails "snapshot.id=1,snapshot.name=s2" "convert -l mismatched ID and name" \
    "$QI" convert -O raw -l snapshot.id=1,snapshot.name=s2 k.qcow2 x.raw
same_error "convert -l bad key" convert -O raw -l snapshot.foo=1 k.qcow2 x.raw
[ ! -e x.raw ] || die "a failed convert left an output file"

note "all checks passed"
