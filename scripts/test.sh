#!/usr/bin/env bash
# The whole test suite, from a fresh clone: setup, build (plugins from
# source, the server), format and lint checks, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
scripts/build-polyglot.sh
cargo build --workspace --bins
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The Rust SDK lives outside the workspace (plugins build it for Wasm); its
# own unit tests (the event arena) run natively.
(cd sdk/rust && export CARGO_TARGET_DIR=../../target &&
    cargo fmt -- --check &&
    cargo clippy --quiet --features flow --all-targets -- -D warnings &&
    cargo test --quiet --features flow)
