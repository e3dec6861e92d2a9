#!/usr/bin/env bash
# Installs the NATS clients nobody here wrote, pinned, under target/nats-clients/
# (a Python venv with nats-py, an npm prefix with nats.js), for
# broker/tests/nats_clients.rs. Idempotent: does nothing when the pinned
# versions are already there; pip and npm reuse their caches.
set -euo pipefail
NATS_PY=2.16.0
NATS_JS=2.29.3
root="$(cd "$(dirname "$0")/../../.." && pwd)"
dest="${NATS_CLIENTS_DIR:-$root/target/nats-clients}"
mkdir -p "$dest"

venv="$dest/venv"
if ! "$venv/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(0 if version('nats-py') == '$NATS_PY' else 1)" 2>/dev/null; then
  echo "nats-clients: installing nats-py $NATS_PY into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-py==$NATS_PY"
fi

node="$dest/node"
if [ "$(node -p "try { require('$node/node_modules/nats/package.json').version } catch (e) { '' }" 2>/dev/null)" != "$NATS_JS" ]; then
  echo "nats-clients: installing nats.js $NATS_JS into $node"
  mkdir -p "$node"
  npm install --silent --no-audit --no-fund --prefix "$node" "nats@$NATS_JS" >/dev/null
fi
echo "nats-clients: nats-py $NATS_PY, nats.js $NATS_JS in $dest"
