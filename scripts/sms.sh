#!/usr/bin/env bash
# Texts the demo's SMS number (+15550160) through the demo SMSC that
# scripts/demo.sh runs, and prints the replies the SMSC is asked to send.
#
#   scripts/sms.sh TEXT [FROM]    (FROM: default 15550001)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${PLUGBOARD_DATA_DIR:-data}
[ -f "$DATA/smsc.in" ] || { echo "scripts/demo.sh is not running (no $DATA/smsc.in)" >&2; exit 1; }
FROM=${2:-15550001}
SEEN=$(wc -l < "$DATA/smsc.log")
python3 -c 'import json,sys; print(json.dumps({"cmd":"mo","tag":"demo","from":sys.argv[2],"to":"15550160","text":sys.argv[1]}))' \
    "$1" "$FROM" >> "$DATA/smsc.in"
sleep 2
tail -n +"$((SEEN + 1))" "$DATA/smsc.log" | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e.get("ev") == "submit_sm":
        print("<", e["source_addr"], ":", e["text"])
    elif e.get("ev") == "deliver_sm_resp" and e.get("status"):
        print("the server refused the text: status", hex(e["status"]))
'
