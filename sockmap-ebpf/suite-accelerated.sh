#!/usr/bin/env bash
# Runs the workspace's test suites (broker, client, protocol, loadtest) with
# every TCP connection they make on the eBPF fast path, then shows that the
# fast path carried them.
#
#   sockmap-ebpf/suite-accelerated.sh [cargo test args...]   (as root)
#
# How: a cgroup of its own below the cgroup v2 root, the node agent attached
# there with port 0 (= every port, only sensible in a dedicated cgroup), and
# `cargo test` started inside it. Nothing outside that cgroup is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
target=${CARGO_TARGET_DIR:-target}

# --workspace, as the README's `cargo test --workspace`: the same package set
# resolves the same features, so the builds of that run are reused instead of
# a second copy of every test binary (a clean CI run filled its disk that way).
cargo build -q --workspace --bins
cargo test -q --workspace --no-run

root=$(awk '{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i+1) == "cgroup2" && $4 == "/") { print $5; exit } break }}' /proc/self/mountinfo)
if [ -z "$root" ]; then
    root=/run/sockbus/cgroup2
    mkdir -p "$root"
    mount -t cgroup2 none "$root"
    echo "suite-accelerated: cgroup v2 was not mounted; mounted it at $root"
fi
cg="$root/sockbus-suite-$$"
mkdir "$cg"
port=$((20000 + $$ % 20000))
"$target/debug/sockbus-broker" accel agent --ports 0 --cgroup "$cg" --metrics "127.0.0.1:$port" &
agent=$!
cleanup() {
    kill -TERM "$agent" 2>/dev/null || true
    wait "$agent" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

status=0
# Tests whose premise the fast path changes read this (see bad_input.rs).
export SOCKBUS_SUITE_ACCELERATED=1
(echo "$BASHPID" >"$cg/cgroup.procs" && exec cargo test --no-fail-fast --workspace "$@") || status=$?

metrics=$(curl -sf "http://127.0.0.1:$port/metrics" || true)
echo "$metrics" | grep -E '^sockbus_accel_(sockets_added|add_failures|redirect_verdicts|bytes_redirected|misses)_total' || true
redirected=$(echo "$metrics" | awk '$1 == "sockbus_accel_bytes_redirected_total" {print $2}')
if [ "$status" -ne 0 ]; then
    echo "suite-accelerated: the test suite failed on the fast path" >&2
    exit "$status"
fi
if [ "${redirected:-0}" -eq 0 ]; then
    echo "suite-accelerated: the fast path carried nothing: the suite did not run accelerated" >&2
    exit 1
fi
echo "suite-accelerated: the suite passed with every connection on the fast path ($redirected bytes redirected)"
