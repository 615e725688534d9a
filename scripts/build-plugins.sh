#!/usr/bin/env bash
# Builds every first-party plugin in plugins/ for wasm32-wasip2 (release).
# Output: target/wasm32-wasip2/release/<name>.wasm
set -euo pipefail
cd "$(dirname "$0")/../plugins"
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null 2>&1 ||
    rustup target add wasm32-wasip2 wasm32-unknown-unknown
for p in hello-ivr flow-graph order-hotline cargo-lookup skills-router hostile probe speak-digits-tts kv-crm; do
    echo "building plugin $p" >&2
    cargo build --quiet --release -p "$p"
done
# hello-ivr again as a lean core module (no WASI; the SDK's event arena),
# as `plugboard plugin new --lang rust` builds: the server wraps it into a
# component on deploy. Output: target/wasm32-unknown-unknown/release/hello_ivr.wasm
echo "building plugin hello-ivr (wasm32-unknown-unknown)" >&2
cargo build --quiet --release -p hello-ivr --target wasm32-unknown-unknown
# The SDK template must keep building as shipped (wasm32-unknown-unknown).
echo "building sdk/rust/template" >&2
(cd ../sdk/rust/template && CARGO_TARGET_DIR=../../../target cargo build --quiet --release)
