#!/usr/bin/env bash
# Builds the sockbus BPF object from source on stable Rust, without rust-src:
# the no_std program crate is compiled for the host target as one LTO'd LLVM
# bitcode module, and bpf-linker (LLVM 22, rustc 1.95's LLVM) turns that
# bitcode into a BPF object. Installs what it needs (idempotent).
#
#   sockmap-ebpf/build.sh [OUT]   (default: broker/src/accel/sockbus.bpf.o)
#
# The output is reproducible: paths are remapped, no debug info, locked
# dependencies, so check.sh can compare it byte for byte with the committed one.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${1:-$root/broker/src/accel/sockbus.bpf.o}
BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22

log() { echo "build.sh: $*" >&2; }

ensure_llvm() {
    if [ -x "$LLVM_PREFIX/bin/llc" ] && [ -f "$LLVM_PREFIX/lib/libLLVM.so" ]; then
        return
    fi
    log "installing llvm-22 (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq llvm-22 llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev >/dev/null
}

ensure_bpf_linker() {
    local have
    have=$(bpf-linker --version 2>/dev/null | awk '{print $2}') || true
    if [ "$have" = "$BPF_LINKER_VERSION" ]; then
        return
    fi
    log "installing bpf-linker $BPF_LINKER_VERSION against LLVM 22 (cargo install, a few minutes)"
    LLVM_PREFIX=$LLVM_PREFIX cargo install --force bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22 >&2
}

export PATH="$HOME/.cargo/bin:$PATH"
ensure_llvm
ensure_bpf_linker

# A private target dir: the root workspace's builds never see this crate.
target=${SOCKMAP_EBPF_TARGET_DIR:-$here/target}
export CARGO_TARGET_DIR=$target
export RUSTFLAGS="-C debuginfo=0 --remap-path-prefix=$here=/sockmap-ebpf --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
export SOURCE_DATE_EPOCH=0

# Always recompile: the bitcode is a side output cargo does not track.
(cd "$here" && cargo clean --release -p sockbus-ebpf -q)
rm -f "$target"/release/deps/sockbus_ebpf-*.bc
(cd "$here" && cargo rustc --locked --release -p sockbus-ebpf --lib -q -- --emit=llvm-bc)
bc=$(ls "$target"/release/deps/sockbus_ebpf-*.bc)

mkdir -p "$(dirname "$out")"
tmp=$(mktemp "$out.XXXXXX")
# A failed link must not leave its half-written object next to the real one.
trap 'rm -f "$tmp"' EXIT
bpf-linker --target bpfel --cpu v2 \
    --export sockbus_sock_ops --export sockbus_sk_msg \
    --export SOCKBUS_SOCKS --export SOCKBUS_PORTS --export SOCKBUS_STATS \
    --export SOCKBUS_DIRECT_CONFIG --export SOCKBUS_DIRECT_PUBS --export SOCKBUS_DIRECT_ALLOW \
    --export SOCKBUS_DIRECT_DONE --export SOCKBUS_DIRECT_ROUTES --export SOCKBUS_DIRECT_GRANT \
    --export SOCKBUS_DIRECT_SUBS --export SOCKBUS_DIRECT_SUBJECTS \
    -o "$tmp" "$bc"
mv "$tmp" "$out"
log "wrote $out ($(wc -c <"$out") bytes, sha256 $(sha256sum "$out" | cut -c1-16))"
