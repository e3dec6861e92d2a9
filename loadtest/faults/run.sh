#!/usr/bin/env bash
# Runs the fault harness (docs/reliability.md): builds sockbus-broker and
# sockbus-faults, installs nftables if it is missing, then runs
#   sockbus-faults "$@"
# as root. Example: loadtest/faults/run.sh --nodes 3 --duration 5m --seed 7
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "run.sh: needs root (network namespaces, nftables); try: sudo $0 $*" >&2
  exit 2
fi
if ! command -v nft >/dev/null; then
  echo "run.sh: installing nftables"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
fi
profile=${PROFILE:-debug}
flag=""
[ "$profile" = release ] && flag=--release
# --workspace: the features `cargo test --workspace` resolves, so CI reuses
# that run's builds instead of compiling the broker's dependencies again.
cargo build -q $flag --workspace --bins
target=${CARGO_TARGET_DIR:-target}
exec "$target/$profile/sockbus-faults" --broker "$target/$profile/sockbus-broker" "$@"
