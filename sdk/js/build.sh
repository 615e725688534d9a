#!/usr/bin/env bash
# Builds a JavaScript Plugboard plugin into a WebAssembly component with
# componentize-js (pinned in sdk/js/package.json + package-lock.json),
# installed on first use into the repository's target/sdk-tools/js.
#
#   sdk/js/build.sh --world flow|router|tts|crm SRC_FILE OUT.wasm
#
# SRC_FILE is an ES module; it may import other modules by relative path.
# Runnable from any directory.
set -euo pipefail

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=${PLUGBOARD_SDK_TOOLS:-$ROOT/target/sdk-tools}/js

world=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --world) world=${2:-}; shift 2 ;;
        --world=*) world=${1#--world=}; shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$world" in
    flow|router|tts|crm) ;;
    *) echo "--world must be flow, router, tts or crm" >&2; usage ;;
esac
[ ${#args[@]} -eq 2 ] || usage
src=${args[0]}
out=${args[1]}
[ -f "$src" ] || { echo "no such file: $src" >&2; exit 1; }
command -v node >/dev/null || { echo "node (>= 18) is required" >&2; exit 1; }

# The pinned tools, installed once; reinstalled only when package.json or the
# lock file change. `npm install` rather than `npm ci`: npm 11 rejects this lock
# file as out of sync (optional platform packages of the dependencies are
# reported missing from it); `npm install` still installs the locked versions.
stamp=$(cat "$HERE/package.json" "$HERE/package-lock.json" | cksum)
if [ "$(cat "$TOOLS/.plugboard-installed" 2>/dev/null)" != "$stamp" ]; then
    echo "installing componentize-js into $TOOLS" >&2
    mkdir -p "$TOOLS"
    cp "$HERE/package.json" "$HERE/package-lock.json" "$TOOLS/"
    (cd "$TOOLS" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
    echo "$stamp" >"$TOOLS/.plugboard-installed"
fi

# The world's WIT package plus the host package it includes, as a dependency.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wit/deps/host"
cp "$ROOT/wit/$world@0.1.0/$world.wit" "$tmp/wit/"
cp "$ROOT/wit/host@0.1.0/host.wit" "$tmp/wit/deps/host/"

mkdir -p "$(dirname "$out")"
node "$HERE/build.mjs" --tools "$TOOLS" --wit "$tmp/wit" \
    --world "plugboard:$world/$world@0.1.0" "$src" "$out"
echo "built $out ($(wc -c <"$out") bytes, world $world)" >&2
