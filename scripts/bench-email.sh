#!/usr/bin/env bash
# Inbound email: messages per second accepted with durability before the
# 250, Plugboard against Postfix on this machine, under the same load from
# Postfix's smtp-source, in one run (the ratio is what to read: this
# machine is shared and noisy).
#
# - Plugboard: the release server on the embedded store (sled, group
#   commit), a tenant whose mailbox runs a JSON flow (every message is also
#   run through the flow and answered into the outbox).
# - Postfix: a private instance under a temporary directory (its own
#   queue, smtpd on loopback; accepted mail is queued, fsynced, then
#   discarded by the `discard` transport), started and stopped here.
#
# - Plugboard with sender checks: a second server that also checks SPF,
#   DKIM and DMARC of every message against a local DNS server (dnsmasq,
#   with SPF and DMARC records for the senders' domain), to show what the
#   checks cost. The first server and Postfix check nothing.
#
#   scripts/bench-email.sh [MESSAGES] [SESSIONS] [SIZE]   (default 3000 20 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
S=${2:-20}
SIZE=${3:-2000}
scripts/setup.sh >/dev/null
cargo build --release --bin plugboard >/dev/null 2>&1 || cargo build --release --bin plugboard
scripts/build-plugins.sh >/dev/null
BIN=target/release/plugboard
W=$(mktemp -d)
chmod 755 "$W" # Postfix's own users walk into its queue under here
PB_HTTP=127.0.0.1:18480
PB_SMTP=127.0.0.1:18425
PF_PORT=18426
PA_HTTP=127.0.0.1:18481
PA_SMTP=127.0.0.1:18427
DNS_PORT=18453
cleanup() {
    [ -n "${PB:-}" ] && kill "$PB" 2>/dev/null || true
    [ -n "${PA:-}" ] && kill "$PA" 2>/dev/null || true
    [ -n "${DNS:-}" ] && kill "$DNS" 2>/dev/null || true
    postfix -c "$W/postfix" stop >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT INT TERM

# --- Plugboard ---
export PLUGBOARD_ADMIN_TOKEN=bench-admin PLUGBOARD_URL="http://$PB_HTTP"
"$BIN" --data-dir "$W/pb" serve --http "$PB_HTTP" --sip off --smtp "$PB_SMTP" --smtp-max-per-ip 100 --smtp-auth-dns off 2>"$W/pb.log" &
PB=$!
# The same with sender checks, against dnsmasq on loopback.
/usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --port=$DNS_PORT \
    --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts --local=/#/ \
    --user="$(id -un)" \
    --txt-record=example.com,"v=spf1 ip4:127.0.0.1 -all" \
    --txt-record=_dmarc.example.com,"v=DMARC1; p=none" 2>"$W/dns.log" &
DNS=$!
"$BIN" --data-dir "$W/pa" serve --http "$PA_HTTP" --sip off --smtp "$PA_SMTP" --smtp-max-per-ip 100 \
    --smtp-auth-dns "127.0.0.1:$DNS_PORT" 2>"$W/pa.log" &
PA=$!
for url in "$PB_HTTP" "$PA_HTTP"; do
    for _ in $(seq 1 200); do curl -fsS "http://$url/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
done
cat >"$W/flow.json" <<'FLOW'
{"name": "ack", "start": "thanks", "nodes": {
  "thanks": {"type": "say", "text": "Thank you, we have your message."}}}
FLOW
for url in "$PB_HTTP" "$PA_HTTP"; do
    export PLUGBOARD_URL="http://$url"
    "$BIN" --token bench-admin tenant create bench >"$W/tenant.json"
    "$BIN" --token bench-admin flow deploy bench "$W/flow.json" --name ack >/dev/null
    "$BIN" --token bench-admin address set bench help@bench.test --channel email --flow ack >/dev/null
done

# --- Postfix, private instance ---
mkdir -p "$W/postfix" "$W/pfspool" "$W/pfdata"
chown postfix "$W/pfdata"
sed -e "s/^smtp      inet  n       -       y/$PF_PORT inet  n       -       n/" \
    -e 's/^\([a-z0-9]* *unix *[-ny] *[-ny] *\)y/\1n/' /etc/postfix/master.cf >"$W/postfix/master.cf"
cat >"$W/postfix/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $W/pfspool
data_directory = $W/pfdata
myhostname = bench.local
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relay_domains = bench.test
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 100
CF
postfix -c "$W/postfix" check
postfix -c "$W/postfix" start >/dev/null 2>&1
for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PF_PORT) 2>/dev/null && break
    sleep 0.1
done

# One run of smtp-source against a server: messages per second.
run() {
    local target=$1
    local t0 t1
    t0=$(date +%s.%N)
    /usr/sbin/smtp-source -s "$S" -m "$N" -l "$SIZE" -f load@example.com -t help@bench.test "$target"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$N/($t1-$t0):.0f}')"
}
# Warm-up, then the measured runs, alternating.
/usr/sbin/smtp-source -s 4 -m 100 -f w@example.com -t help@bench.test "$PB_SMTP"
/usr/sbin/smtp-source -s 4 -m 100 -f w@example.com -t help@bench.test "127.0.0.1:$PF_PORT"
/usr/sbin/smtp-source -s 4 -m 100 -f w@example.com -t help@bench.test "$PA_SMTP"
pb1=$(run "$PB_SMTP")
pa1=$(run "$PA_SMTP")
pf1=$(run "127.0.0.1:$PF_PORT")
pb2=$(run "$PB_SMTP")
pa2=$(run "$PA_SMTP")
pf2=$(run "127.0.0.1:$PF_PORT")
# The checks did run: what the last message on the checking server keeps.
checked=$(python3 - "$PA_HTTP" "$W/tenant.json" <<'PY'
import json, sys, urllib.request
url, key = "http://" + sys.argv[1], json.load(open(sys.argv[2]))["api_key"]
def get(path):
    r = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + key})
    return json.load(urllib.request.urlopen(r))
ix = get("/v1/tenants/bench/interactions?limit=1")["interactions"][0]["id"]
m = get(f"/v1/tenants/bench/interactions/{ix}/messages")["messages"][0]["meta"]
print(f"spf={m.get('spf')} dkim={m.get('dkim')} dmarc={m.get('dmarc')}")
PY
)
echo
echo "smtp-source: $N messages of $SIZE bytes, $S sessions in parallel, twice each, alternating"
echo "  Plugboard: $pb1 and $pb2 messages/s (durable before 250, each run through a flow)"
echo "  Plugboard with SPF/DKIM/DMARC checks: $pa1 and $pa2 messages/s (local DNS server; $checked)"
echo "  Postfix:   $pf1 and $pf2 messages/s (queued with fsync before 250, then discarded)"
python3 -c "print(f'  ratio Plugboard/Postfix: {($pb1+$pb2)/($pf1+$pf2):.2f}')"
python3 -c "print(f'  ratio with checks/without: {($pa1+$pa2)/($pb1+$pb2):.2f}')"
