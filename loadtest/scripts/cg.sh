#!/usr/bin/env bash
# Instructions per message of one sockbus build, under callgrind: deterministic,
# so it tells a real change in work per message from the noise of a shared
# machine (docs/benchmarks.md, "Refactor: one delivery path").
#
#   loadtest/scripts/cg.sh SIDE TARGET_DIR SCENARIO COUNT broker|client
#
# TARGET_DIR holds release builds of sockbus-broker and sockbus-loadtest.
# Needs valgrind (apt-get install valgrind). Prints Ir (instructions) per message.
set -u
side=$1 t=$2 sc=$3 n=$4 who=$5
command -v valgrind >/dev/null || { echo "cg.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
port=$((17000 + RANDOM % 1000))
d=$(mktemp -d)
if [ $who = broker ]; then
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-$who-$sc-$side.out $t/release/sockbus-broker --listen 127.0.0.1:$port --http off --accel off --data-dir $d > /tmp/cg-$side.log 2>&1 &
  bp=$!; sleep 6
  $t/release/sockbus-loadtest run --target sockbus://127.0.0.1:$port --scenario $sc --count $n > /tmp/cg-run-$side.txt 2>&1
  kill -TERM $bp; wait $bp
else
  $t/release/sockbus-broker --listen 127.0.0.1:$port --http off --accel off --data-dir $d > /tmp/cg-$side.log 2>&1 &
  bp=$!; sleep 1
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-$who-$sc-$side.out $t/release/sockbus-loadtest run --target sockbus://127.0.0.1:$port --scenario $sc --count $n > /tmp/cg-run-$side.txt 2>&1
  kill -TERM $bp; wait $bp
fi
tot=$(grep -m1 "^summary:\|^totals:" /tmp/cg-$who-$sc-$side.out | awk '{print $2}')
echo "$side $who $sc count=$n Ir=$tot per_msg=$((tot / n))"
rm -rf $d
