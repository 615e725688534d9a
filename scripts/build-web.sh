#!/usr/bin/env bash
# Builds the web front ends (TypeScript: checked by tsc, bundled by
# esbuild, both from npm, pinned in web/widget/package-lock.json; the
# console uses the same tools):
# - the chat widget into target/web/widget.js, served at /chat/widget.js;
# - the console (agent desktop, supervisor wall) into target/web/console/,
#   served at /console/.
# node_modules stay under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
T=target/sdk-tools/web-widget
mkdir -p "$T" target/web/console
if ! cmp -s web/widget/package-lock.json "$T/package-lock.json" || [ ! -x "$T/node_modules/.bin/esbuild" ]; then
    cp web/widget/package.json web/widget/package-lock.json "$T/"
    (cd "$T" && npm ci --no-audit --no-fund --silent)
fi
# Type-checked by tsc (strict), then bundled and minified by esbuild.
"$T/node_modules/.bin/tsc" --noEmit -p web/widget
"$T/node_modules/.bin/esbuild" web/widget/src/widget.ts --bundle --minify --sourcemap \
    --target=es2019 --format=iife --log-level=warning --outfile=target/web/widget.js
echo "built target/web/widget.js"
"$T/node_modules/.bin/tsc" --noEmit -p web/console
"$T/node_modules/.bin/esbuild" web/console/src/console.ts --bundle --minify --sourcemap \
    --target=es2019 --format=iife --log-level=warning --outfile=target/web/console/console.js
cp web/console/index.html web/console/console.css target/web/console/
echo "built target/web/console/"
