#!/usr/bin/env python3
"""Keeps a data directory written by a build of Plugboard, for the upgrade
test (`tests/voice.rs`, `a_data_directory_of_the_previous_store_format_…`).

    scripts/make-store-fixture.py PLUGBOARD_BINARY OUT.tar.gz

Run it with the build of the commit before a change of the embedded store's
format (`git worktree add`, `cargo build --release --bin plugboard`), after
`scripts/build-plugins.sh` in this checkout (it deploys hello_ivr.wasm): the
server runs on a fresh directory, a tenant deploys the hello IVR on
+15550100, SIPp places three calls that press 9 (the flow hangs up) and
a late offer without an answer (hung up at once); one flow run is simulated. The
tenant's key, its interactions as the API gave them, and the store (the
`store/` directory, without the node's secret key or compile cache) go into
the archive.
"""

import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = "fixture-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, token, method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
    return json.loads(text) if text else None


def sipp(tmp, sip, scenario):
    subprocess.run(
        ["sipp", "-i", "127.0.0.1", "-nostdin", "-m", "1", "-s", "15550100",
         "-p", str(free_port()), "-mp", str(free_port()), "-timeout", "30s",
         "-sf", os.path.join(ROOT, "tests/sipp", f"{scenario}.xml"), f"127.0.0.1:{sip}"],
        cwd=tmp, check=True, stdout=subprocess.DEVNULL)


def main():
    binary, out = sys.argv[1], os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="pb-fixture-")
    data = os.path.join(tmp, "data")
    http, sip = free_port(), free_port()
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen(
        [binary, "--data-dir", data, "serve", "--http", f"127.0.0.1:{http}", "--sip", f"127.0.0.1:{sip}"],
        env={**os.environ, "PLUGBOARD_ADMIN_TOKEN": ADMIN}, stderr=log, stdout=log)
    try:
        key, interactions = run(tmp, base_of(http), sip)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # The store as the stopped server left it.
    with open(os.path.join(tmp, "fixture.json"), "w") as f:
        json.dump({"api_key": key, "interactions": interactions}, f, indent=1, sort_keys=True)
    with tarfile.open(out, "w:gz") as t:
        t.add(os.path.join(tmp, "fixture.json"), "fixture.json")
        t.add(os.path.join(data, "store"), "store", filter=lambda i: None if i.name.endswith("/LOCK") else i)
    print(f"{out}: {len(interactions)} interactions, {os.path.getsize(out)} bytes")


def base_of(port):
    return f"http://127.0.0.1:{port}"


def run(tmp, base, sip):
    """The tenant's key and its interactions, each whole."""
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("the server did not come up in 30 s: see its server.log in " + tmp)
    key = api(base, ADMIN, "POST", "/v1/tenants", {"id": "acme"})["api_key"]
    wasm = open(os.path.join(ROOT, "target/wasm32-wasip2/release/hello_ivr.wasm"), "rb").read()
    api(base, key, "PUT", "/v1/tenants/acme/plugins/hello-ivr", raw=wasm)
    api(base, key, "PUT", "/v1/tenants/acme/addresses/+15550100", {"channel": "voice", "flow": "hello-ivr"})
    for scenario in ["ivr_dtmf", "ivr_dtmf", "ivr_dtmf", "late_offer_no_answer"]:
        sipp(tmp, sip, scenario)
    api(base, key, "POST", "/v1/tenants/acme/flows/hello-ivr/simulate",
        {"events": [{"type": "digits", "digits": "1"}]})
    time.sleep(1)
    listed = api(base, key, "GET", "/v1/tenants/acme/interactions?limit=100")["interactions"]
    interactions = [api(base, key, "GET", f"/v1/tenants/acme/interactions/{ix['id']}") for ix in listed]
    return key, interactions


if __name__ == "__main__":
    main()
