#!/usr/bin/env bash
# Installs what Plugboard needs to build on a fresh Debian machine with rustup:
# the wasm32-wasip2 target and the components for formatting and linting.
set -euo pipefail
rustup target add wasm32-wasip2
rustup component add rustfmt clippy >/dev/null 2>&1 || true
