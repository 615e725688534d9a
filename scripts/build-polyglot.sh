#!/usr/bin/env bash
# Builds the JavaScript and Python example plugins into
# target/polyglot/ with sdk/js/build.sh and sdk/python/build.sh. A component
# is rebuilt only when a source (or the SDK's build files, or the WIT) is
# newer than it: each build takes 10-40 s. FORCE=1 rebuilds everything.
#
#   scripts/build-polyglot.sh [NAME...]     # e.g. order_hotline_js router_py
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/target/polyglot
mkdir -p "$OUT"

# name  language  world  source (a .js file, or a directory holding app.py)
COMPONENTS=(
    "order_hotline_js js flow examples/order-hotline/js/flow.js"
    "order_hotline_py py flow examples/order-hotline/python"
    "router_js js router examples/routers/js/router.js"
    "router_py py router examples/routers/python"
    "hostile_js js flow examples/hostile/js/hostile.js"
    "hostile_py py flow examples/hostile/python"
)

# True if $1 is missing or any file under the other arguments is newer.
stale() {
    local out=$1
    shift
    [ -f "$out" ] || return 0
    [ -n "$(find "$@" -type f ! -name '*.pyc' -newer "$out" -print -quit)" ]
}

wanted() {
    [ $# -eq 1 ] && return 0
    local name=$1
    shift
    local w
    for w in "$@"; do [ "$w" = "$name" ] && return 0; done
    return 1
}

built=0
for spec in "${COMPONENTS[@]}"; do
    read -r name lang world src <<<"$spec"
    wanted "$name" "$@" || continue
    out=$OUT/$name.wasm
    case "$lang" in
        js) deps=("$ROOT/sdk/js/build.sh" "$ROOT/sdk/js/build.mjs" "$ROOT/sdk/js/package-lock.json") ;;
        py) deps=("$ROOT/sdk/python/build.sh") ;;
    esac
    if [ "${FORCE:-0}" != 1 ] && ! stale "$out" "$ROOT/$src" "${deps[@]}" \
        "$ROOT/wit/$world@0.1.0" "$ROOT/wit/host@0.1.0"; then
        echo "$name: up to date ($(wc -c <"$out") bytes)"
        continue
    fi
    start=$(date +%s.%N)
    case "$lang" in
        js) "$ROOT/sdk/js/build.sh" --world "$world" "$ROOT/$src" "$out" ;;
        py) "$ROOT/sdk/python/build.sh" --world "$world" "$ROOT/$src" "$out" ;;
    esac
    end=$(date +%s.%N)
    printf '%s: built in %s s (%s bytes)\n' "$name" \
        "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')" "$(wc -c <"$out")"
    built=$((built + 1))
done
echo "polyglot components in $OUT ($built rebuilt)"
