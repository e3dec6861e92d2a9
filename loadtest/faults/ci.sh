#!/usr/bin/env bash
# The short form of the fault harness that .ci/run runs: 3 nodes, R1 (with
# FAULTS_REPLICAS=3, R3: replicated messages and consumer state; see
# docs/reliability.md), 75 s of faults that R1 survives (kill -9, pauses, partitions, leader
# isolation, a link down, restart of all nodes). Corruption is left out
# here: with one copy it loses acked messages by design (docs/reliability.md).
# Without root outside CI it is skipped with the reason; with CI=true a
# missing capability fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
why=""
if [ "$(id -u)" != 0 ]; then
  why="not root (ip netns and nftables need it)"
elif ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  why="ip or nft missing (Debian packages iproute2, nftables)"
elif ! ip netns add "sbf-probe-$$" 2>/dev/null; then
  why="cannot create a network namespace here"
else
  ip netns del "sbf-probe-$$"
fi
if [ -n "$why" ]; then
  if [ "${CI:-}" = true ]; then
    echo "faults ci: FAILED: $why" >&2
    exit 1
  fi
  echo "faults ci: skipped: $why"
  exit 0
fi
seed=${FAULTS_SEED:-20261203}
work=$(mktemp -d /tmp/sockbus-faults-ci.XXXXXX)
status=0
loadtest/faults/run.sh --nodes 3 --replicas "${FAULTS_REPLICAS:-1}" --duration 75s --interval 7s \
  --seed "$seed" --faults kill,pause,partition,isolate,link,restart-all --work "$work" "$@" || status=$?
if [ "$status" = 0 ]; then
  rm -rf "$work"
else
  echo "faults ci: FAILED (exit $status); data dirs and broker logs kept in $work" >&2
fi
exit "$status"
