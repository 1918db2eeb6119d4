# shellcheck shell=sh
# bench/lib.sh - helpers for bench/run.sh (sourced, POSIX sh).
# run.sh sets $tmp (scratch directory) and $results (the results file).
# shellcheck disable=SC2154
#
# Results are collected as lines of $results:
#   section|reference name|label|qsnap|reference|kind|target
# kind "time": values are seconds, ratio = reference / qsnap (> 1: qsnap
# faster); kind "size": values are bytes, ratio = qsnap / reference.
# target: "" (none), ">=X" (ratio at least X) or "~X" (size ratio within
# X of 1).  A value of "FAIL" marks a run that did not complete.

# shellcheck disable=SC2034 # read by run.sh
bench_failed=0

say()
{
    printf '%s\n' "$*" >&2
}

# Seconds with nanoseconds since the epoch, as a decimal string.
now()
{
    date +%s.%N
}

# elapsed T0 T1: prints T1 - T0 in seconds.
elapsed()
{
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'
}

# median V...: the median of the numbers (FAIL if any is FAIL or none).
median()
{
    if [ $# -eq 0 ]; then
        echo FAIL
        return
    fi
    for m_v in "$@"; do
        if [ "$m_v" = FAIL ]; then
            echo FAIL
            return
        fi
    done
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR % 2) { printf "%.4f", v[(NR + 1) / 2] }
            else { printf "%.4f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }
        }'
}

# run_cmd CMD...: runs CMD with its output in $tmp/out; on failure shows
# the output, marks the run failed and returns 1.
run_cmd()
{
    if "$@" >"$tmp/out" 2>&1; then
        return 0
    fi
    say "FAILED: $*"
    sed 's/^/    /' "$tmp/out" >&2
    bench_failed=1
    return 1
}

# time_cmd CMD...: runs CMD (a program, not a function) after a sync;
# sets $T to its wall time and $CPU to its user + system time in seconds
# (both FAIL if it failed).  Needs $timeit, the bench/timeit.c helper.
time_cmd()
{
    sync
    if run_cmd "$timeit" "$tmp/time" "$@"; then
        T=$(awk '{ printf "%.4f", $1 }' "$tmp/time")
        CPU=$(awk '{ printf "%.4f", $2 + $3 }' "$tmp/time")
    else
        T=FAIL
        CPU=FAIL
    fi
}

# bench_cmd CMD...: runs a "bench"-style CMD after a sync and sets $T to
# the time it reports ("Run completed in S seconds.") and $CPU to the
# whole process's user + system time.
bench_cmd()
{
    time_cmd "$@"
    if [ "$T" != FAIL ]; then
        T=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' \
            "$tmp/out")
        if [ -z "$T" ]; then
            say "FAILED: no time reported by: $*"
            bench_failed=1
            T=FAIL
        fi
    fi
}

# add_row SECTION REFNAME LABEL QSNAP REFERENCE KIND TARGET
add_row()
{
    printf '%s|%s|%s|%s|%s|%s|%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" \
        >>"$results"
    printf '%s|%s|%s|%s|%s|%s|%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" |
        print_rows >&2
}

# Formats result lines (see the top of this file) as table rows.
print_rows()
{
    awk -F'|' '
        function fmt(v, kind) {
            if (v == "FAIL") { return "FAIL" }
            if (kind == "size") { return sprintf("%.1f MiB", v / 1048576) }
            return sprintf("%.3f s", v)
        }
        {
            q = $4; r = $5; kind = $6; target = $7
            ratio = "-"; verdict = ""
            if (q != "FAIL" && r != "FAIL" && q > 0 && r > 0) {
                x = (kind == "size") ? q / r : r / q
                ratio = sprintf("%.2fx", x)
                if (target ~ /^>=/) {
                    want = substr(target, 3) + 0
                    verdict = (x >= want) ? "met" : "MISSED"
                } else if (target ~ /^~/) {
                    tol = substr(target, 2) + 0
                    d = x - 1; if (d < 0) { d = -d }
                    verdict = (d <= tol) ? "met" : "MISSED"
                }
            } else if (target != "") {
                verdict = "FAIL"
            }
            shown = target
            if (target ~ /^~/) {
                shown = sprintf("1+-%g", substr(target, 2) + 0)
            }
            printf "%-46s %12s %12s %8s  %-7s %s\n", $3, fmt(q, kind),
                fmt(r, kind), ratio, shown, verdict
        }'
}

# print_table FILE: the results grouped by section, with headers.
print_table()
{
    ph_last=
    while IFS='|' read -r ph_sec ph_ref ph_rest; do
        if [ "$ph_sec" != "$ph_last" ]; then
            printf '\n%s\n' "$ph_sec"
            printf '%-46s %12s %12s %8s  %-7s %s\n' "" "qsnap" "$ph_ref" \
                "ratio" "target" "result"
            ph_last=$ph_sec
        fi
        printf '%s|%s|%s\n' "$ph_sec" "$ph_ref" "$ph_rest" | print_rows
    done <"$1"
}

# gcd-free step for scattered requests: an odd page count near 0.618 of
# the image, coprime with both N and N - 1 pages (qemu-img wraps at the
# image size minus one request, qsnap-img at the image size), so both
# tools visit distinct pages.  Prints the step in bytes.
scatter_step()
{
    awk -v size="$1" -v req="$2" '
        function gcd(a, b,   t) { while (b) { t = a % b; a = b; b = t }
                                 return a }
        BEGIN {
            n = int(size / req)
            s = int(n * 0.618)
            if (s * req > 2147483647) { s = int(2147483647 / req) }
            if (s % 2 == 0) { s++ }
            while (gcd(s, n) != 1 || gcd(s, n - 1) != 1) { s += 2 }
            printf "%.0f", s * req
        }'
}

# scaled BYTES: BYTES * BENCH_SCALE rounded down to whole MiB (at least
# MIN bytes if given).
scaled()
{
    awk -v b="$1" -v s="$BENCH_SCALE" -v min="${2:-1048576}" 'BEGIN {
        v = int(b * s / 1048576) * 1048576
        if (v < min) { v = min }
        printf "%.0f", v
    }'
}

# scaled_count N: N * BENCH_SCALE, at least 16.
scaled_count()
{
    awk -v n="$1" -v s="$BENCH_SCALE" 'BEGIN {
        v = int(n * s); if (v < 16) { v = 16 }; printf "%.0f", v
    }'
}
