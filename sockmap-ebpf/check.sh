#!/usr/bin/env bash
# Rebuilds the BPF object from source and fails when the committed object
# (broker/src/accel/sockbus.bpf.o) is not what the source builds to.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
committed="$here/../broker/src/accel/sockbus.bpf.o"
fresh=$(mktemp --suffix=.bpf.o)
trap 'rm -f "$fresh"' EXIT
"$here/build.sh" "$fresh"
if ! cmp -s "$committed" "$fresh"; then
    echo "check.sh: $committed is stale: run sockmap-ebpf/build.sh and commit the result" >&2
    echo "check.sh: committed $(sha256sum <"$committed" | cut -c1-16), built $(sha256sum <"$fresh" | cut -c1-16)" >&2
    exit 1
fi
echo "check.sh: committed BPF object matches the source" >&2
