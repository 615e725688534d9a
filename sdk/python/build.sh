#!/usr/bin/env bash
# Builds a Python Plugboard plugin into a WebAssembly component with
# componentize-py (pinned below), installed on first use into a venv under the
# repository's target/ directory.
#
#   sdk/python/build.sh --world flow|router|tts|crm SRC_DIR OUT.wasm
#   sdk/python/build.sh --world flow --bindings OUT_DIR   # typed bindings for your editor
#
# SRC_DIR holds the app module (default `app`, change with --module NAME) and any
# pure-Python modules it imports. Runnable from any directory.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=${PLUGBOARD_SDK_TOOLS:-$ROOT/target/sdk-tools}
VENV=$TOOLS/python-venv
PYTHON=${PYTHON:-python3}

world=""
module=app
bindings=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --world) world=${2:-}; shift 2 ;;
        --world=*) world=${1#--world=}; shift ;;
        --module) module=${2:-}; shift 2 ;;
        --bindings) bindings=${2:-}; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$world" in
    flow|router|tts|crm) ;;
    *) echo "--world must be flow, router, tts or crm" >&2; usage ;;
esac
if [ -z "$bindings" ] && [ ${#args[@]} -ne 2 ]; then usage; fi

# The pinned componentize-py, installed once (idempotent).
cpy=$VENV/bin/componentize-py
if ! "$cpy" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $VENV" >&2
    mkdir -p "$TOOLS"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# The world's WIT package plus the host package it includes, as a dependency.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wit/deps/host"
cp "$ROOT/wit/$world@0.1.0/$world.wit" "$tmp/wit/"
cp "$ROOT/wit/host@0.1.0/host.wit" "$tmp/wit/deps/host/"
wit_world="plugboard:$world/$world@0.1.0"

if [ -n "$bindings" ]; then
    "$cpy" -q -d "$tmp/wit" -w "$wit_world" bindings "$bindings"
    echo "bindings for $wit_world in $bindings" >&2
    exit 0
fi

src=${args[0]}
out=${args[1]}
[ -f "$src/$module.py" ] || { echo "no $module.py in $src" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# Build from a clean copy: componentize-py writes __pycache__ next to the
# sources it compiles.
mkdir -p "$tmp/src"
cp -R "$src"/. "$tmp/src/"
find "$tmp/src" -name __pycache__ -type d -prune -exec rm -rf {} +
"$cpy" -q -d "$tmp/wit" -w "$wit_world" componentize \
    -p "$tmp/src" "$module" -o "$tmp/out.wasm"
mv "$tmp/out.wasm" "$out_abs"
echo "built $out ($(wc -c <"$out_abs") bytes, world $world)" >&2
