#!/usr/bin/env bash
# The HTTP test users quote ("10,000 concurrent requests at 50 ms average"):
# `hey` POSTs 128-byte bodies at -c 100 and -c 10000 to the broker's HTTP
# publish route and, side by side, to a trivial hyper handler that answers
# 204 (`sockbus-loadtest hyper-ceiling`), the ceiling of this machine.
#
# Usage: loadtest/hey/run.sh [BROKER_PUBLISH_URL]
#   BROKER_PUBLISH_URL  default $SOCKBUS_HTTP_URL, else
#                       http://127.0.0.1:7480/v1/publish/loadtest.hey
# Environment:
#   HEY_DURATION     length of each hey run (default 10s)
#   HEY_CONCURRENCY  concurrency levels (default "100 10000")
#   CEILING_ADDR     where the hyper handler listens (default: a free loopback port)
#   LOADTEST_BIN     sockbus-loadtest binary (default: target/release, then target/debug, then PATH)
# Needs: hey (apt-get install hey). A broker that is not listening is
# reported as "unreachable" and the ceiling is still measured.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
broker_url="${1:-${SOCKBUS_HTTP_URL:-http://127.0.0.1:7480/v1/publish/loadtest.hey}}"
duration="${HEY_DURATION:-10s}"
levels="${HEY_CONCURRENCY:-100 10000}"

die() { echo "hey/run.sh: $*" >&2; exit 1; }

command -v hey >/dev/null || die "hey not found: install it with apt-get install hey"
bin="${LOADTEST_BIN:-}"
if [[ -z "$bin" ]]; then
    for b in "$root/target/release/sockbus-loadtest" "$root/target/debug/sockbus-loadtest" \
             "$(command -v sockbus-loadtest || true)"; do
        if [[ -n "$b" && -x "$b" ]]; then bin="$b"; break; fi
    done
fi
[[ -n "$bin" && -x "$bin" ]] ||
    die "sockbus-loadtest not found: cargo build --release -p sockbus-loadtest (or set LOADTEST_BIN)"

# 10,000 connections need as many descriptors in hey and in each server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < 10500 )); then
    echo "warning: only $(ulimit -n) file descriptors allowed; -c 10000 may fail" >&2
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo 7481
}
ceiling_addr="${CEILING_ADDR:-127.0.0.1:$(free_port)}"
ceiling_url="http://$ceiling_addr/v1/publish/loadtest.hey"

tmp="$(mktemp -d)"
ceiling_pid=""
cleanup() {
    if [[ -n "$ceiling_pid" ]]; then
        kill "$ceiling_pid" 2>/dev/null || true
        wait "$ceiling_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

head -c 128 /dev/zero | tr '\0' 'x' >"$tmp/body"

# host:port of an http:// URL
hostport() { local u="${1#http://}"; echo "${u%%/*}"; }
reachable() {
    local hp; hp="$(hostport "$1")"
    (exec 3<>"/dev/tcp/${hp%:*}/${hp##*:}") 2>/dev/null
}

"$bin" hyper-ceiling --listen "$ceiling_addr" 2>"$tmp/ceiling.log" &
ceiling_pid=$!
for _ in $(seq 100); do reachable "$ceiling_url" && break; sleep 0.05; done
reachable "$ceiling_url" || die "hyper-ceiling did not start: $(cat "$tmp/ceiling.log")"

# Prints: req/s  avg_ms  p99_ms  non2xx  errors   (from hey's text report)
parse() {
    awk '
        /Requests\/sec:/ { rps = $2 }
        /^ *Average:/    { avg = $2 * 1000 }
        / 99% in /       { p99 = $3 * 1000 }
        /Status code distribution:/ { sec = "status"; next }
        /Error distribution:/       { sec = "error"; next }
        sec == "status" && /\[[0-9]+\]/ {
            code = $1; gsub(/[\[\]]/, "", code)
            if (code < 200 || code > 299) non2xx += $2
        }
        sec == "error" && /\[[0-9]+\]/ { n = $1; gsub(/[\[\]]/, "", n); errors += n }
        END { printf "%.0f %.2f %.2f %d %d\n", rps, avg, p99, non2xx, errors }
    ' "$1"
}

rows=()
run_one() { # name url concurrency
    local name="$1" url="$2" c="$3" out="$tmp/$1-$3.txt"
    if ! reachable "$url"; then
        rows+=("$(printf '%-16s %7s %12s %10s %10s %8s %8s' "$name" "$c" unreachable - - - -)")
        return
    fi
    echo "hey -z $duration -c $c POST 128 B -> $url" >&2
    hey -z "$duration" -c "$c" -m POST -T application/octet-stream -D "$tmp/body" "$url" >"$out" 2>&1 || true
    if ! grep -q 'Requests/sec:' "$out"; then
        rows+=("$(printf '%-16s %7s %12s %10s %10s %8s %8s' "$name" "$c" "hey failed" - - - -)")
        sed 's/^/  hey: /' "$out" | tail -5 >&2
        return
    fi
    read -r rps avg p99 non2xx errors < <(parse "$out")
    rows+=("$(printf '%-16s %7s %12s %10s %10s %8s %8s' "$name" "$c" "$rps" "$avg" "$p99" "$non2xx" "$errors")")
}

for c in $levels; do
    run_one "sockbus HTTP" "$broker_url" "$c"
    run_one "hyper ceiling" "$ceiling_url" "$c"
done

echo
echo "hey, $duration per run, 128-byte POST bodies ($(nproc) cores; hey runs on the same machine)"
printf '%-16s %7s %12s %10s %10s %8s %8s\n' target "-c" "req/s" "avg ms" "p99 ms" non-2xx errors
printf '%s\n' "${rows[@]}"
echo "sockbus HTTP: $broker_url"
echo "hyper ceiling: $ceiling_url (sockbus-loadtest hyper-ceiling, 204 to every POST)"
