#!/usr/bin/env bash
# Installs what Plugboard needs to build on a fresh Debian machine with rustup:
# the wasm32-wasip2 target and the components for formatting and linting.
set -euo pipefail
rustup target add wasm32-wasip2
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The JavaScript and Python plugin SDKs need Node.js (npm) and Python's venv.
need=()
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    echo "installing ${need[*]} (apt-get)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
