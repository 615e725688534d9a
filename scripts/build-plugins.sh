#!/usr/bin/env bash
# Builds every first-party plugin in plugins/ for wasm32-wasip2 (release).
# Output: target/wasm32-wasip2/release/<name>.wasm
set -euo pipefail
cd "$(dirname "$0")/../plugins"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
for p in hello-ivr flow-graph order-hotline cargo-lookup skills-router hostile probe speak-digits-tts kv-crm; do
    echo "building plugin $p" >&2
    cargo build --quiet --release -p "$p"
done
# The SDK template must keep building as shipped.
echo "building sdk/rust/template" >&2
(cd ../sdk/rust/template && CARGO_TARGET_DIR=../../../target cargo build --quiet --release)
