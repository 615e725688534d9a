#!/usr/bin/env bash
# Sets up and runs the server with the embedded store and a seeded demo
# tenant ("demo"): the first-party plugins built from source and deployed,
# the demo MIS answering waybill lookups, addresses mapped.
#
# Environment: PLUGBOARD_HTTP (default 127.0.0.1:8080), PLUGBOARD_SIP
# (default 127.0.0.1:5060), PLUGBOARD_DATA_DIR
# (default ./data), MIS_PORT (default 8090).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
cargo build --release --bin plugboard
BIN=target/release/plugboard
HTTP=${PLUGBOARD_HTTP:-127.0.0.1:8080}
SIP=${PLUGBOARD_SIP:-127.0.0.1:5060}
DATA=${PLUGBOARD_DATA_DIR:-data}
MIS_PORT=${MIS_PORT:-8090}
export PLUGBOARD_URL="http://$HTTP" PLUGBOARD_DATA_DIR="$DATA"
mkdir -p "$DATA"

python3 examples/demo-mis/mis.py "$MIS_PORT" &
MIS_PID=$!
# The demo MIS runs on this machine: let tenants' HTTP reach loopback
# (refused by default).
"$BIN" serve --http "$HTTP" --sip "$SIP" --allow-network 127.0.0.1/32 &
SERVER_PID=$!
trap 'kill $SERVER_PID $MIS_PID 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
    curl -fsS "http://$HTTP/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

W=target/wasm32-wasip2/release
if "$BIN" tenant create demo --name "Demo Logistics" > "$DATA/demo-tenant.json" 2>/dev/null; then
    # The lean build (a core module; the server wraps it into a component).
    "$BIN" plugin deploy demo hello-ivr target/wasm32-unknown-unknown/release/hello_ivr.wasm >/dev/null
    "$BIN" plugin deploy demo cargo-lookup "$W/cargo_lookup.wasm" >/dev/null
    "$BIN" plugin deploy demo skills-router "$W/skills_router.wasm" >/dev/null
    "$BIN" plugin config demo cargo-lookup "{\"mis_url\":\"http://127.0.0.1:$MIS_PORT\"}" >/dev/null
    "$BIN" plugin grants demo cargo-lookup "{\"http\":{\"allow\":[\"127.0.0.1:$MIS_PORT\"]}}" >/dev/null
    "$BIN" address set demo +15550100 --channel voice --flow hello-ivr >/dev/null
    "$BIN" address set demo +15550199 --channel voice --flow cargo-lookup >/dev/null
    # A flow without code: the order hotline as a JSON document.
    "$BIN" flow deploy demo examples/order-hotline/flow.json --name order-hotline >/dev/null
    "$BIN" plugin config demo order-hotline "{\"mis_url\":\"http://127.0.0.1:$MIS_PORT\"}" >/dev/null
    "$BIN" plugin grants demo order-hotline "{\"http\":{\"allow\":[\"127.0.0.1:$MIS_PORT\"]}}" >/dev/null
    "$BIN" address set demo +15550123 --channel voice --flow order-hotline >/dev/null
    # The logistics hotline (voice): press 1, enter a waybill, hear where the cargo is.
    "$BIN" flow deploy demo examples/logistics-hotline/flow.json --name logistics-hotline >/dev/null
    "$BIN" plugin config demo logistics-hotline "{\"mis_url\":\"http://127.0.0.1:$MIS_PORT\"}" >/dev/null
    "$BIN" plugin grants demo logistics-hotline "{\"http\":{\"allow\":[\"127.0.0.1:$MIS_PORT\"]}}" >/dev/null
    "$BIN" address set demo +15550142 --channel voice --flow logistics-hotline >/dev/null
    echo "seeded tenant demo; its API key is in $DATA/demo-tenant.json"
else
    echo "tenant demo already exists (data in $DATA)"
fi
cat <<MSG

Plugboard is running on http://$HTTP (admin token: $DATA/admin_token),
SIP on $SIP (UDP and TCP). Call from a softphone or SIPp:
  sip:15550142@$SIP   logistics hotline (1, waybill 123#)
  sip:15550100@$SIP   hello IVR
  sipp -sf tests/sipp/logistics.xml -s 15550142 $SIP -m 1 -i 127.0.0.1
Try:
  $BIN flow simulate demo hello-ivr --events '[{"type":"digits","digits":"1"}]'
  $BIN flow simulate demo cargo-lookup --events '[{"type":"digits","digits":"123","terminated":true}]'
  $BIN flow simulate demo order-hotline --now-ms 1795428000000 --events '[{"type":"digits","digits":"2"},{"type":"digits","digits":"1234"}]'
Ctrl-C stops it.
MSG
wait $SERVER_PID
