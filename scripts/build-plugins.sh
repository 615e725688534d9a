#!/usr/bin/env bash
# Builds every first-party plugin in plugins/ for wasm32-wasip2 (release),
# and some again lean for wasm32-unknown-unknown (below).
# Output: target/wasm32-wasip2/release/<name>.wasm
set -euo pipefail
cd "$(dirname "$0")/../plugins"
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null 2>&1 ||
    rustup target add wasm32-wasip2 wasm32-unknown-unknown
for p in hello-ivr flow-graph order-hotline cargo-lookup skills-router hostile probe speak-digits-tts kv-crm; do
    echo "building plugin $p" >&2
    cargo build --quiet --release -p "$p"
done
# hello-ivr, order-hotline and skills-router again as lean core modules (no WASI; the SDK's
# event arena), as `plugboard plugin new --lang rust` builds: the server wraps
# them into components on deploy. The benches compare both builds.
# Output: target/wasm32-unknown-unknown/release/<name>.wasm
for p in hello-ivr order-hotline skills-router; do
    echo "building plugin $p (wasm32-unknown-unknown)" >&2
    cargo build --quiet --release -p "$p" --target wasm32-unknown-unknown
done
# The SDK template must keep building as shipped (wasm32-unknown-unknown).
echo "building sdk/rust/template" >&2
(cd ../sdk/rust/template && CARGO_TARGET_DIR=../../../target cargo build --quiet --release)
