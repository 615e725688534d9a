#!/usr/bin/env bash
# Sets up and runs the server with the embedded store and a seeded demo
# tenant ("demo"): the first-party plugins built from source and deployed,
# the demo MIS answering waybill lookups, addresses mapped.
#
# Environment: PLUGBOARD_HTTP (default 127.0.0.1:8080), PLUGBOARD_SIP
# (default 127.0.0.1:5060), PLUGBOARD_SMTP (default 127.0.0.1:2525),
# PLUGBOARD_DATA_DIR (default ./data), MIS_PORT (default 8090), MAIL_PORT
# (default 2526: a local mail sink standing in for the smart host; the
# replies it takes land in DATA/sent-mail as .eml files), SMSC_PORT
# (default 2775: a local SMSC standing in for the carrier, node-smpp's
# server; scripts/sms.sh texts through it, its log is DATA/smsc.log).
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
SMTP=${PLUGBOARD_SMTP:-127.0.0.1:2525}
MAIL_PORT=${MAIL_PORT:-2526}
SMSC_PORT=${SMSC_PORT:-2775}
export PLUGBOARD_URL="http://$HTTP" PLUGBOARD_DATA_DIR="$DATA"
mkdir -p "$DATA"

python3 examples/demo-mis/mis.py "$MIS_PORT" &
MIS_PID=$!
# Email replies go to a smart host: here a local sink (aiosmtpd) that
# keeps what it is given in $DATA/sent-mail.
target/sdk-tools/peers-venv/bin/python tests/peers/smtp_sink.py "$MAIL_PORT" "$DATA/sent-mail" >/dev/null &
MAIL_PID=$!
# SMS goes through a carrier's SMSC: here a local one (node-smpp's server)
# fed commands from $DATA/smsc.in (scripts/sms.sh writes there).
touch "$DATA/smsc.in"
tail -n0 -F "$DATA/smsc.in" 2>/dev/null \
    | node target/sdk-tools/peers-smsc/smsc.js demo demo-pw "$SMSC_PORT" > "$DATA/smsc.log" &
SMSC_PID=$!
# The demo MIS runs on this machine: let tenants' HTTP reach loopback
# (refused by default).
# MD5 is offered before SHA-256 for softphones that read only the first
# digest challenge.
"$BIN" serve --http "$HTTP" --sip "$SIP" --allow-network 127.0.0.1/32 --digest-md5-first \
    --smtp "$SMTP" --smtp-relay "smtp://127.0.0.1:$MAIL_PORT" &
SERVER_PID=$!
trap 'kill $SERVER_PID $MIS_PID $MAIL_PID $SMSC_PID 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
    curl -fsS "http://$HTTP/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

W=target/wasm32-wasip2/release
api() {
    KEY=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_key"])' "$DATA/demo-tenant.json")
    curl -fsS -o /dev/null -X "$1" -H "Authorization: Bearer $KEY" -d "$3" "http://$HTTP/v1/tenants/demo/$2"
}
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
    # The same hotline answers email: write "track", then the waybill.
    "$BIN" address set demo help@demo.test --channel email --flow logistics-hotline >/dev/null
    # … and web chat: the widget page is served at /chat/web-demo.
    "$BIN" address set demo web-demo --channel chat --flow logistics-hotline >/dev/null
    api PUT chat-widgets/web-demo '{"title":"Demo Logistics"}'
    # … and SMS: +15550160 through the demo carrier's SMSC (SMPP 3.4).
    "$BIN" address set demo +15550160 --channel sms --flow logistics-hotline >/dev/null
    api PUT secrets/smpp '{"value":"demo-pw"}'
    api PUT sms-carriers/demo-smsc "{\"smpp\":{\"host\":\"127.0.0.1\",\"port\":$SMSC_PORT,\"system_id\":\"demo\",\"password_secret\":\"smpp\"}}"
    # The contact centre: two queues routed by the skills router, three
    # agents with SIP phones, and a front desk that asks sales or support.
    api PUT queues/sales '{"skills":["sales"],"router":"skills-router","offer_timeout":20,"wrap_up":5,"callback_after":60,"announce_every":30,"whisper":true}'
    api PUT queues/support '{"skills":["support"],"router":"skills-router","offer_timeout":20,"wrap_up":5,"announce_every":30,"whisper":true}'
    for a in ann:'{"sales":8,"support":5}' bob:'{"support":9}' carol:'{"sales":6}'; do
        id=${a%%:*}
        api PUT "sip-users/$id" "{\"password\":\"demo-$id-pass\"}"
        api PUT "agents/$id" "{\"skills\":${a#*:},\"sip_user\":\"$id\",\"capacity\":{\"voice\":1,\"chat\":3,\"email\":5,\"sms\":3,\"fax\":5}}"
    done
    # Sue supervises (the console's wall); she takes no tasks herself.
    api PUT agents/sue '{"capacity":{}}'
    # The hotline's "agent" on chat, email and SMS: the agents queue, with
    # the screen pop from the kv-crm directory and wrap-up codes.
    "$BIN" plugin deploy demo kv-crm "$W/kv_crm.wasm" >/dev/null
    "$BIN" plugin grants demo kv-crm '{"kv":true}' >/dev/null
    api PUT queues/agents '{"crm":"kv-crm","offer_timeout":30,"wrap_up":5,"dispositions":["resolved","follow-up","escalated"]}'
    api PUT kv/crm/customer/15550001 '{"id":"c-1001","name":"Rita Jansen","tier":"gold","account":"BF-2291"}'
    api PUT kv/crm/customer/you@example.com '{"id":"c-1002","name":"Example Customer","tier":"standard"}'
    "$BIN" flow deploy demo examples/front-desk/flow.json --name front-desk >/dev/null
    "$BIN" address set demo +15550150 --channel voice --flow front-desk >/dev/null
    # Fax: +15550180 answers as a fax machine; received faxes go to the
    # agents queue. The demo's trunk is this server (standing in for a
    # carrier), so a fax sent to +15550180 comes back in.
    "$BIN" flow deploy demo examples/fax-desk/flow.json --name fax-desk >/dev/null
    "$BIN" address set demo +15550180 --channel fax --flow fax-desk >/dev/null
    api PUT trunks/default "{\"host\":\"$SIP\",\"username\":\"demo\",\"password\":\"demo-trunk\"}"
    echo "seeded tenant demo; its API key is in $DATA/demo-tenant.json"
else
    echo "tenant demo already exists (data in $DATA)"
fi
# A document to fax (Ghostscript sets two pages).
if [ ! -s "$DATA/waybill.pdf" ]; then
    printf '%%!PS\n/Helvetica findfont 28 scalefont setfont\n1 1 2 { /n exch def 72 720 moveto (Demo Logistics waybill 123, page ) show n 2 string cvs show 72 660 moveto (Vilnius - Rotterdam, 12 pallets) show showpage } for\n' > "$DATA/waybill.ps"
    gs -q -dNOPAUSE -dBATCH -dSAFER -sDEVICE=pdfwrite -sPAPERSIZE=a4 -o "$DATA/waybill.pdf" "$DATA/waybill.ps" || true
fi
# Agents are offline after a restart until they say otherwise: the demo's
# are available at once.
for id in ann bob carol; do
    api PUT "agents/$id/presence" '{"state":"available"}' || true
done
# Console sign-in tokens (new at every start; the old ones stop working).
token() {
    KEY=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_key"])' "$DATA/demo-tenant.json")
    curl -fsS -X POST -H "Authorization: Bearer $KEY" -d "{\"role\":\"$2\"}" \
        "http://$HTTP/v1/tenants/demo/agents/$1/token" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
ANN_TOKEN=$(token ann agent)
SUE_TOKEN=$(token sue supervisor)
printf 'ann (agent): %s\nsue (supervisor): %s\n' "$ANN_TOKEN" "$SUE_TOKEN" > "$DATA/console-tokens"
chmod 600 "$DATA/console-tokens"
cat <<MSG

Plugboard is running on http://$HTTP (admin token: $DATA/admin_token),
the agents' console on http://$HTTP/console/ (tenant demo; tokens for ann,
an agent, and sue, a supervisor, in $DATA/console-tokens),
SIP on $SIP (UDP and TCP). Call from a softphone or SIPp:
  sip:15550142@$SIP   logistics hotline (1, waybill 123#)
  sip:15550100@$SIP   hello IVR
  sip:15550150@$SIP   front desk: 1 sales, 2 support (queued for an agent)
Register a second softphone as an agent (user ann, bob or carol, domain
demo, password demo-ann-pass …, outbound proxy $SIP) and call the front
desk: the agent's phone rings, hears the queue's name, and is connected.
  sipp -sf tests/sipp/logistics.xml -s 15550142 $SIP -m 1 -i 127.0.0.1
Email the same hotline (SMTP on $SMTP; replies land in $DATA/sent-mail):
  swaks --server $SMTP --from you@example.com --to help@demo.test --body track
  then answer the reply with the waybill: 123
  $BIN customer find demo you@example.com      # the customer, then:
  $BIN customer history demo CUSTOMER_ID       # every conversation, with messages
Chat with the same hotline in a browser (write "track", then 123, or "agent"):
  http://$HTTP/chat/web-demo
  $BIN customer find demo VISITOR --channel chat    # VISITOR: the chat's "from"
  $BIN customer merge demo EMAIL_CUSTOMER CHAT_CUSTOMER   # one person:
  $BIN customer history demo EMAIL_CUSTOMER               # both conversations
Text the same hotline (the demo SMSC delivers it to +15550160; replies print):
  scripts/sms.sh track          # then: scripts/sms.sh 123
  $BIN customer find demo 15550001 --channel sms
Fax a PDF (it goes out through the demo trunk and comes back to the fax
number +15550180, lands in the agents queue, its PDF on the message):
  $BIN fax send demo --from +15550180 --to +15550180 $DATA/waybill.pdf
  $BIN fax list demo                                 # the sent fax and the received one
  $BIN fax get demo INTERACTION --pdf received.pdf   # INTERACTION: the received fax's id
Try:
  $BIN flow simulate demo hello-ivr --events '[{"type":"digits","digits":"1"}]'
  $BIN flow simulate demo cargo-lookup --events '[{"type":"digits","digits":"123","terminated":true}]'
  $BIN flow simulate demo order-hotline --now-ms 1795428000000 --events '[{"type":"digits","digits":"2"},{"type":"digits","digits":"1234"}]'
Ctrl-C stops it.
MSG
wait $SERVER_PID
