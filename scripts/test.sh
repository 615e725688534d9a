#!/usr/bin/env bash
# The whole test suite, from a fresh clone: setup, build (plugins from
# source, the server), format and lint checks, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
scripts/build-polyglot.sh
cargo fmt --all -- --check
# One build of every target (bins, libs, tests, examples) with the features
# `cargo test` resolves (dev-dependencies included), so that the test run
# below compiles nothing again: a `--bins` build alone resolves other
# features and made `cargo test` compile wasmtime a second time.
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The API tests again, every server on PostgreSQL (a server the tests start).
PLUGBOARD_TEST_STORE=postgres cargo test --workspace --test api
# The Rust SDK lives outside the workspace (plugins build it for Wasm); its
# own unit tests (the event arena) run natively.
(cd sdk/rust && export CARGO_TARGET_DIR=../../target &&
    cargo fmt -- --check &&
    cargo clippy --quiet --features flow --all-targets -- -D warnings &&
    cargo test --quiet --features flow)
