#!/usr/bin/env bash
# Voice benchmark (prints numbers): builds the release binary, installs
# SIPp and Kamailio if missing, runs scripts/bench-voice.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v kamailio >/dev/null 2>&1 || {
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kamailio
}
scripts/build-plugins.sh
cargo build --release --bin plugboard
cargo build --release -p plugboard-tests --example retention_seed
exec python3 scripts/bench-voice.py
