#!/usr/bin/env bash
# How long the fast path (attach + self-test) adds to a broker's start:
# starts the broker N times with --accel off and N times with --accel auto
# (in a cgroup of its own below the cgroup v2 root, so nothing else is
# touched) and prints, per mode, the median time from exec to the
# "listening for clients" line, and for auto the medians of the attach and
# self-test times the "fast path: on" line reports.
#
#   sockmap-ebpf/startup-time.sh [BROKER_BINARY] [N]   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-target}/debug/sockbus-broker}
n=${2:-11}
root=$(awk '{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i+1) == "cgroup2" && $4 == "/") { print $5; exit } break }}' /proc/self/mountinfo)
if [ -z "$root" ]; then
    echo "startup-time: no cgroup v2 mounted (the broker would mount one; mount it first)" >&2
    exit 1
fi
cg="$root/sockbus-startup-$$"
mkdir "$cg"
log=$(mktemp)
trap 'rmdir "$cg" 2>/dev/null || true; rm -f "$log"' EXIT
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
for mode in off auto; do
    starts=() attaches=() tests=()
    for _ in $(seq "$n"); do
        : >"$log"
        t0=$(date +%s%N)
        RUST_LOG=info "$bin" --listen 127.0.0.1:0 --http off --accel "$mode" --accel-cgroup "$cg" 2>>"$log" &
        pid=$!
        until grep -q "listening for clients" "$log"; do
            kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
            sleep 0.002
        done
        t1=$(date +%s%N)
        starts+=($(((t1 - t0) / 1000000)))
        if [ "$mode" = auto ]; then
            line=$(grep -o "fast path: on: .*" "$log" || true)
            [ -n "$line" ] || { echo "startup-time: the fast path is not on:" >&2; cat "$log" >&2; kill "$pid"; exit 1; }
            attaches+=($(echo "$line" | sed -E 's/.*\(([0-9]+) ms; self-test passed in ([0-9]+) ms\).*/\1/'))
            tests+=($(echo "$line" | sed -E 's/.*\(([0-9]+) ms; self-test passed in ([0-9]+) ms\).*/\2/'))
        fi
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
    echo -n "--accel $mode: start to listening, median of $n: $(printf '%s\n' "${starts[@]}" | median) ms"
    if [ "$mode" = auto ]; then
        echo -n "; attach $(printf '%s\n' "${attaches[@]}" | median) ms, self-test $(printf '%s\n' "${tests[@]}" | median) ms"
    fi
    echo
done
