#!/usr/bin/env bash
# Permissions on the hot path: pub/sub as a user holding 10 allow patterns
# (publish and subscribe; the subjects match the last one) against open mode,
# two brokers of the same build, alternating runs (docs/benchmarks.md,
# "Permissions").
#
#   loadtest/scripts/perm.sh TARGET_DIR [ROUNDS] [DURATION]
#
# TARGET_DIR holds release builds of sockbus-broker and sockbus-loadtest.
# Prints each run's msgs/s and the ratio of the medians (permissions / open).
set -u
t=$1 rounds=${2:-5} dur=${3:-5s}
d=$(mktemp -d)
pats='"a.>", "b.*.c", "c.>", "d.e.>", "orders.>", "billing.*", "f.>", "g.h.*", "i.>", "loadtest.>"'
cat > $d/users.toml <<TOML
[[users]]
name = "bench"
password = "pw"
publish = [$pats]
subscribe = [$pats]
TOML
p1=$((18000 + RANDOM % 500)) p2=$((18500 + RANDOM % 500))
$t/release/sockbus-broker --listen 127.0.0.1:$p1 --http off --accel off --data-dir $d/open > $d/open.log 2>&1 &
b1=$!
$t/release/sockbus-broker --listen 127.0.0.1:$p2 --http off --accel off --data-dir $d/perm --config $d/users.toml > $d/perm.log 2>&1 &
b2=$!
sleep 1
run() { # URL -> msgs/s
  $t/release/sockbus-loadtest run --target "$1" --scenario pubsub --duration $dur --no-progress --json $d/r.json > /dev/null 2>&1 \
    && python3 -c "import json,sys; print(int(json.load(open('$d/r.json'))['msgs_per_sec']))"
}
open=() perm=()
for i in $(seq $rounds); do
  o=$(run sockbus://127.0.0.1:$p1); p=$(run sockbus://bench:pw@127.0.0.1:$p2)
  echo "round $i: open $o msgs/s, 10 allow patterns $p msgs/s"
  open+=($o) perm+=($p)
done
kill -TERM $b1 $b2; wait $b1 $b2 2>/dev/null
python3 - "${open[*]}" "${perm[*]}" <<PY
import statistics, sys
o = [int(x) for x in sys.argv[1].split()]; p = [int(x) for x in sys.argv[2].split()]
mo, mp = statistics.median(o), statistics.median(p)
print(f"median open {mo:.0f} msgs/s, 10 allow patterns {mp:.0f} msgs/s, ratio {mp/mo:.3f}")
PY
rm -rf $d
