#!/usr/bin/env bash
# Pinned accel_bench A/B of the plain path (--only off), with the broker's
# own counters: the broker on CPU 0 (taskset wrapper), the bench (both
# clients) on CPU 1, `perf stat` attached to the broker for its CPU time,
# system calls and context switches. Three sides, alternated every pass
# (order reversed on even passes):
#   A  = A's broker, A's bench (A's SDK)
#   B  = B's broker, B's bench
#   BA = B's broker, A's bench: tells a broker difference from an SDK one
# Each TARGET_DIR holds release builds of sockbus-broker and the accel_bench
# example (docs/benchmarks.md, "Issue 13 item 10: the plain path, pinned").
# Needs root (accel_bench), perf and 2 CPUs.
#
#   loadtest/scripts/accel_pinned.sh A_TARGET_DIR B_TARGET_DIR [PASSES] [OUT_DIR]
#
# ACCEL_ARGS overrides the bench arguments (default: one round of 20,000
# round trips and 2,000,000 pub/sub messages).
set -euo pipefail
a=$1 b=$2 passes=${3:-6} out=${4:-$(mktemp -d)}
args=(${ACCEL_ARGS:---rounds 1 --requests 20000 --messages 2000000})
mkdir -p "$out"
# accel_bench starts the sockbus-broker found next to its own directory.
side() { # name broker_target bench_target
  local d=$out/sides/$1/release
  mkdir -p "$d/examples"
  cp "$2/release/sockbus-broker" "$d/sockbus-broker-real"
  cp "$3/release/examples/accel_bench" "$d/examples/accel_bench"
  printf '#!/bin/sh\nexec taskset -c 0 "$(dirname "$0")/sockbus-broker-real" "$@"\n' > "$d/sockbus-broker"
  chmod +x "$d/sockbus-broker"
}
side A "$a" "$a"; side B "$b" "$b"; side BA "$b" "$a"
# Attaches perf stat to the side's broker once its runtime thread exists
# (perf -p does not follow threads created later); perf ends with it.
watch() { # name file
  local pat="$out/sides/$1/release/sockbus-broker-real" pid=""
  for _ in $(seq 1 400); do
    pid=$(pgrep -f "^$pat" | head -1 || true)
    [ -n "$pid" ] && [ "$(ls "/proc/$pid/task" 2>/dev/null | wc -l)" -ge 2 ] && break
    sleep 0.05
  done
  [ -n "$pid" ] || return 0
  perf stat -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex \
    -p "$pid" -o "$2" 2>/dev/null || true
}
for n in $(seq 1 "$passes"); do
  order=(A B BA); [ $((n % 2)) = 0 ] && order=(BA B A)
  for s in "${order[@]}"; do
    echo "accel_pinned: $s #$n ($(date +%T))" >&2
    watch "$s" "$out/$s-$n.stat" &
    w=$!
    nice -n -5 taskset -c 1 "$out/sides/$s/release/examples/accel_bench" --only off "${args[@]}" \
      > "$out/$s-$n.txt" 2>&1
    wait $w
  done
done
python3 - "$out" "$passes" <<'PY'
import os, re, statistics as st, sys
out, passes = sys.argv[1], int(sys.argv[2])
def row(side, n):
    f = f"{out}/{side}-{n}.txt"
    l = [x for x in open(f) if re.match(r"\s+\d+\s+off", x)]
    if not l:
        return None
    v = l[-1].split()
    r = {"msgs/s": float(v[6]), "rr p50 us": float(v[3]), "cpu ns/msg": float(v[7])}
    s = f"{out}/{side}-{n}.stat"
    if os.path.exists(s):
        for x in open(s):
            m = re.match(r"\s*([\d.,]+)\s+(?:msec\s+)?(\S+)", x)
            if m and not x.lstrip().startswith("#"):
                k = {"task-clock": "broker ms", "context-switches": "broker ctx sw",
                     "raw_syscalls:sys_enter": "broker syscalls",
                     "syscalls:sys_enter_futex": "broker futex"}.get(m.group(2))
                if k:
                    r[k] = float(m.group(1).replace(",", ""))
    return r
rows = {s: [row(s, n) for n in range(1, passes + 1)] for s in ("A", "B", "BA")}
keys = ["msgs/s", "rr p50 us", "cpu ns/msg", "broker ms", "broker ctx sw", "broker syscalls", "broker futex"]
print(f"{'metric':<18}{'A':>11}{'B':>11}{'BA':>11}{'B/A':>7}{'BA/A':>7}  (medians; ratios: median of per-pass ratios)")
for k in keys:
    med = {s: st.median([r[k] for r in v if r and k in r]) for s, v in rows.items() if any(r and k in r for r in v)}
    if len(med) < 3:
        continue
    def ratio(s):
        x = [r[k] / a[k] for r, a in zip(rows[s], rows["A"]) if r and a and k in r and a.get(k)]
        return st.median(x) if x else float("nan")
    print(f"{k:<18}{med['A']:>11.4g}{med['B']:>11.4g}{med['BA']:>11.4g}{ratio('B'):>7.3f}{ratio('BA'):>7.3f}")
print("(msgs/s: higher is better; the rest: lower is better)")
print(f"raw output: {out}")
PY
