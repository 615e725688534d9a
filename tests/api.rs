//! End-to-end: the real `plugboard` binary, real HTTP, real plugins.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{Server, TinyHttp, plugin, says};
use serde_json::json;
use std::time::Instant;

#[test]
fn deploy_simulate_and_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]).unwrap();
    let key = s.tenant("acme");
    let d = s.deploy("acme", &key, "ivr", plugin("hello_ivr"));
    assert_eq!(d.status, 201, "{d:?}");
    assert_eq!(d.body["kind"], "flow");
    assert_eq!(d.body["version"], 1);
    let a = s.json(
        "PUT",
        "/v1/tenants/acme/addresses/+37052000000",
        &key,
        &json!({"channel": "voice", "flow": "ivr"}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["address"], "37052000000");

    let r = s.simulate(
        "acme",
        &key,
        "ivr",
        json!([{"type": "digits", "digits": "2"}]),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let steps = r.body["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["event"]["type"], "started");
    assert_eq!(steps[0]["actions"][0]["type"], "gather");
    assert_eq!(
        steps[1]["actions"][2],
        json!({"type": "enqueue", "queue": "support", "priority": 0, "skills": ["support"]})
    );
    let ix = r.body["interaction"].as_str().unwrap().to_string();
    let rec = s.get(&format!("/v1/tenants/acme/interactions/{ix}"), &key);
    assert_eq!(rec.status, 200);
    assert_eq!(rec.body["attributes"]["menu"], "support");
    assert_eq!(rec.body["state"], "queued");

    // SIGKILL, then start again on the same data directory.
    s.kill();
    let s = Server::start(&data, &[]).unwrap();
    assert_eq!(
        s.get("/v1/tenants/acme", &key).status,
        200,
        "tenant and key survive"
    );
    let p = s.get("/v1/tenants/acme/plugins/ivr", &key);
    assert_eq!(p.body["active_version"], 1, "{p:?}");
    let a = s.get("/v1/tenants/acme/addresses/37052000000", &key);
    assert_eq!(a.body["flow"], "ivr", "{a:?}");
    let list = s.get("/v1/tenants/acme/interactions", &key);
    let ids: Vec<_> = list.body["interactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    assert!(ids.contains(&json!(ix)), "{ids:?}");
    let r = s.simulate(
        "acme",
        &key,
        "ivr",
        json!([{"type": "digits", "digits": "9"}]),
    );
    assert_eq!(says(&r.body["steps"][1]), vec!["Goodbye."]);

    // A second version, then rollback to the first.
    let d = s.deploy("acme", &key, "ivr", plugin("probe"));
    assert_eq!(d.body["version"], 2);
    let r = s.simulate("acme", &key, "ivr", json!([]));
    assert_eq!(says(&r.body["steps"][0]), vec!["probe ready"]);
    let rb = s.json(
        "POST",
        "/v1/tenants/acme/plugins/ivr/rollback",
        &key,
        &json!({}),
    );
    assert_eq!(rb.body["active_version"], 1, "{rb:?}");
    let r = s.simulate("acme", &key, "ivr", json!([]));
    assert_eq!(r.body["steps"][0]["actions"][0]["type"], "gather");
    // The same bytes deployed again are not compiled again.
    let d = s.deploy("acme", &key, "again", plugin("hello_ivr"));
    assert_ne!(d.body["compile"]["source"], "compiled", "{d:?}");
}

#[test]
fn tenants_are_isolated_and_errors_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let ka = s.tenant("a");
    let kb = s.tenant("b");
    assert_eq!(s.deploy("b", &kb, "probe", plugin("probe")).status, 201);
    assert_eq!(s.deploy("a", &ka, "probe", plugin("probe")).status, 201);
    let b_paths = [
        ("GET", "/v1/tenants/b"),
        ("GET", "/v1/tenants/b/plugins"),
        ("GET", "/v1/tenants/b/plugins/probe"),
        ("PUT", "/v1/tenants/b/plugins/probe"),
        ("POST", "/v1/tenants/b/plugins/probe/rollback"),
        ("PUT", "/v1/tenants/b/plugins/probe/grants"),
        ("GET", "/v1/tenants/b/plugins/probe/grants"),
        ("PUT", "/v1/tenants/b/plugins/probe/config"),
        ("GET", "/v1/tenants/b/plugins/probe/config"),
        ("GET", "/v1/tenants/b/addresses"),
        ("PUT", "/v1/tenants/b/addresses/100"),
        ("POST", "/v1/tenants/b/flows/probe/simulate"),
        ("GET", "/v1/tenants/b/interactions"),
        ("GET", "/v1/tenants/b/interactions/x"),
        ("GET", "/v1/tenants/b/events"),
    ];
    for (m, p) in b_paths {
        let r = s.call(m, p, Some(&ka), Some(b"{}".to_vec())).unwrap();
        assert!(r.status == 403 || r.status == 404, "{m} {p}: {r:?}");
        assert!(r.body["error"]["code"].is_string(), "{m} {p}: {r:?}");
        let r = s.call(m, p, None, Some(b"{}".to_vec())).unwrap();
        assert_eq!(r.status, 401, "{m} {p} without a token: {r:?}");
        let r = s
            .call(m, p, Some("pbk_forged"), Some(b"{}".to_vec()))
            .unwrap();
        assert_eq!(r.status, 401, "{m} {p} with a forged token: {r:?}");
    }
    // Tenant keys cannot create or list tenants.
    assert_eq!(
        s.json("POST", "/v1/tenants", &ka, &json!({"id": "c"}))
            .status,
        403
    );
    assert_eq!(s.get("/v1/tenants", &ka).status, 403);
    // Unknown paths, bad JSON, wrong methods: JSON errors.
    let r = s.get("/v2/nothing", &ka);
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let r = s
        .call(
            "POST",
            "/v1/tenants",
            Some(&s.admin),
            Some(b"{nope".to_vec()),
        )
        .unwrap();
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("bad_json"))
    );
    let r = s
        .call("DELETE", "/v1/tenants", Some(&s.admin), None)
        .unwrap();
    assert_eq!(r.status, 405);
    assert!(r.body["error"]["message"].is_string());
    let r = s.json("POST", "/v1/tenants", &s.admin, &json!({"id": "Bad/Id"}));
    assert_eq!(r.status, 400);
    let r = s.json(
        "PUT",
        "/v1/tenants/a/plugins/probe/grants",
        &ka,
        &json!({"net": true}),
    );
    assert_eq!(r.status, 400, "unknown grant fields are refused: {r:?}");
    let r = s.deploy("a", &ka, "junk", b"not wasm".to_vec());
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (422, Some("invalid_plugin"))
    );
    let r = s.simulate("a", &ka, "probe", json!([{"type": "nonsense"}]));
    assert_eq!(r.status, 400);

    // kv is scoped to the tenant: same key name, separate counters.
    for (t, k) in [("a", &ka), ("b", &kb)] {
        let r = s.json(
            "PUT",
            &format!("/v1/tenants/{t}/plugins/probe/grants"),
            k,
            &json!({"kv": true}),
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let two = json!([{"type": "digits", "digits": "2"}, {"type": "digits", "digits": "2"}]);
    let r = s.simulate("a", &ka, "probe", two);
    assert_eq!(says(&r.body["steps"][2]), vec!["kv count 2"], "{r:?}");
    let r = s.simulate(
        "b",
        &kb,
        "probe",
        json!([{"type": "digits", "digits": "2"}]),
    );
    assert_eq!(says(&r.body["steps"][1]), vec!["kv count 1"], "{r:?}");
    // And b's interactions are not a's.
    let ia = s.get("/v1/tenants/a/interactions", &ka).body["interactions"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(ia, 1);
}

#[test]
fn hostile_plugins_are_contained_while_others_answer() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &["--deadline-ms", "100", "--memory-mib", "32"],
    )
    .unwrap();
    let ke = s.tenant("evil");
    let kg = s.tenant("good");
    for mode in ["loop", "memory", "trap", "output"] {
        assert_eq!(s.deploy("evil", &ke, mode, plugin("hostile")).status, 201);
        let r = s.json(
            "PUT",
            &format!("/v1/tenants/evil/plugins/{mode}/config"),
            &ke,
            &json!({"mode": mode}),
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        s.deploy("good", &kg, "ivr", plugin("hello_ivr")).status,
        201
    );

    let url = s.url();
    let good = std::thread::spawn({
        let kg = kg.clone();
        move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut ok = 0;
            for _ in 0..40 {
                let mut resp = agent
                    .post(format!("{url}/v1/tenants/good/flows/ivr/simulate"))
                    .header("authorization", format!("Bearer {kg}"))
                    .send_json(json!({"events": [{"type": "digits", "digits": "1"}]}))
                    .unwrap();
                let body: serde_json::Value = resp.body_mut().read_json().unwrap();
                if body["steps"][1]["actions"][2]["queue"] == "sales" {
                    ok += 1;
                }
            }
            ok
        }
    });
    let expect = [
        ("loop", "plugin_timeout"),
        ("memory", "plugin_memory_limit"),
        ("trap", "plugin_trap"),
        ("output", "plugin_output_too_large"),
    ];
    for _ in 0..3 {
        for (mode, code) in expect {
            let t0 = Instant::now();
            let r = s.simulate("evil", &ke, mode, json!([]));
            let wall_ms = t0.elapsed().as_millis();
            assert_eq!(r.status, 422, "{mode}: {r:?}");
            assert_eq!(r.body["error"]["code"], code, "{mode}: {r:?}");
            let step = &r.body["steps"][0];
            assert_eq!(step["fallback"], true);
            assert_eq!(
                step["actions"][1]["type"], "enqueue",
                "fallback queues the caller"
            );
            if mode == "loop" {
                let server_ms = step["elapsed_us"].as_u64().unwrap() / 1000;
                assert!(
                    server_ms <= 100 + 100,
                    "loop stopped after {server_ms} ms for a 100 ms budget"
                );
                assert!(wall_ms < 100 + 2000, "simulate answered after {wall_ms} ms");
            }
        }
    }
    assert_eq!(
        good.join().unwrap(),
        40,
        "the good tenant answered every time"
    );
    // The failures are on the timeline and in the metrics.
    let list = s.get("/v1/tenants/evil/interactions?limit=1", &ke);
    let tl = list.body["interactions"][0]["timeline"]
        .as_array()
        .unwrap()
        .clone();
    assert!(tl.iter().any(|e| e["kind"] == "error"), "{tl:?}");
    assert!(tl.iter().any(|e| e["kind"] == "fallback"), "{tl:?}");
    let m = s.call("GET", "/metrics", None, None).unwrap();
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(r#"plugboard_plugin_failures_total{tenant="evil",code="plugin_timeout"} 3"#),
        "{text}"
    );
    assert!(s.call("GET", "/healthz", None, None).unwrap().status == 200);
}

fn mis(path: &str) -> (u16, String) {
    match path {
        "/waybills/123" => (
            200,
            r#"{"status":"in transit","location":"Vilnius"}"#.into(),
        ),
        "/hello" => (200, "hi".into()),
        _ => (404, "{}".into()),
    }
}

#[test]
fn http_only_to_granted_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let k = s.tenant("integrator");
    let web = TinyHttp::start(mis);
    let other = TinyHttp::start(mis);
    assert_eq!(
        s.deploy("integrator", &k, "probe", plugin("probe")).status,
        201
    );
    let cfg = json!({"url": format!("http://127.0.0.1:{}/hello", web.port), "addr": format!("127.0.0.1:{}", web.port)});
    assert_eq!(
        s.json(
            "PUT",
            "/v1/tenants/integrator/plugins/probe/config",
            &k,
            &cfg
        )
        .status,
        200
    );
    let probe = |digit: &str| {
        let r = s.simulate(
            "integrator",
            &k,
            "probe",
            json!([{"type": "digits", "digits": digit}]),
        );
        says(&r.body["steps"][1]).join(" ")
    };
    let grant = |g: &serde_json::Value| {
        let r = s.json("PUT", "/v1/tenants/integrator/plugins/probe/grants", &k, g);
        assert_eq!(r.status, 200, "{r:?}");
    };
    // No grant: no request leaves, raw sockets are refused too.
    assert!(probe("1").contains("not granted: http"), "{}", probe("1"));
    assert!(probe("3").starts_with("socket refused"));
    assert_eq!(web.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A grant for another host only.
    let g = json!({"http": {"allow": [format!("127.0.0.1:{}", other.port)]}});
    grant(&g);
    assert!(probe("1").contains(&format!("not granted: http to 127.0.0.1:{}", web.port)));
    assert_eq!(web.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The right grant.
    let g = json!({"http": {"allow": [format!("127.0.0.1:{}", web.port)]}});
    grant(&g);
    assert_eq!(probe("1"), "http 200 hi");
    assert_eq!(web.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(other.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The cargo-lookup flow asks the MIS and speaks the answer.
    assert_eq!(
        s.deploy("integrator", &k, "cargo", plugin("cargo_lookup"))
            .status,
        201
    );
    let cfg = json!({"mis_url": format!("http://127.0.0.1:{}", web.port)});
    assert_eq!(
        s.json(
            "PUT",
            "/v1/tenants/integrator/plugins/cargo/config",
            &k,
            &cfg
        )
        .status,
        200
    );
    assert_eq!(
        s.json("PUT", "/v1/tenants/integrator/plugins/cargo/grants", &k, &g)
            .status,
        200
    );
    let r = s.simulate(
        "integrator",
        &k,
        "cargo",
        json!([{"type": "digits", "digits": "123", "terminated": true}]),
    );
    assert_eq!(
        says(&r.body["steps"][1]),
        vec!["Waybill 1 2 3: your cargo is in transit, now in Vilnius."],
        "{r:?}"
    );
    let r = s.simulate(
        "integrator",
        &k,
        "cargo",
        json!([{"type": "digits", "digits": "999"}]),
    );
    assert_eq!(
        says(&r.body["steps"][1]),
        vec!["Sorry, waybill 9 9 9 was not found."]
    );
}

#[test]
fn cli_is_a_thin_client() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let wasm = dir.path().join("ivr.wasm");
    std::fs::write(&wasm, plugin("hello_ivr")).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(plugboard_tests::binary())
            .args(["--url", &s.url(), "--token", &s.admin])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, _) = cli(&["tenant", "create", "shop", "--name", "Shop"]);
    assert!(ok && out.contains("pbk_"), "{out}");
    let (ok, out, err) = cli(&["plugin", "deploy", "shop", "ivr", wasm.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    assert!(err.contains("deployed ivr v1 (flow)"), "{err}");
    let (ok, _, err) = cli(&["address", "set", "shop", "+15550100", "--flow", "ivr"]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&[
        "flow",
        "simulate",
        "shop",
        "ivr",
        "--events",
        r#"[{"type":"digits","digits":"9"}]"#,
    ]);
    assert!(ok && out.contains("Goodbye."), "{out}");
    let (ok, out, _) = cli(&["plugin", "list", "shop"]);
    assert!(ok && out.contains("\"active_version\": 1"), "{out}");
    // Failures exit non-zero with the server's message.
    let (ok, _, err) = cli(&["plugin", "rollback", "shop", "ivr"]);
    assert!(!ok && err.contains("no version before 1"), "{err}");
    let (ok, _, err) = cli(&["address", "set", "shop", "200", "--flow", "missing"]);
    assert!(!ok && err.contains("404"), "{err}");
}

#[test]
fn event_stream_carries_only_the_tenants_own_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let ka = s.tenant("a");
    let kb = s.tenant("b");
    for (t, k) in [("a", &ka), ("b", &kb)] {
        assert_eq!(s.deploy(t, k, "ivr", plugin("hello_ivr")).status, 201);
    }
    // Browsers cannot set headers on a WebSocket: the key goes in ?token=.
    let stream = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/v1/tenants/a/events?token={ka}", s.port);
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
    // Another tenant's key is refused before the upgrade.
    let other = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let url_b = format!("ws://127.0.0.1:{}/v1/tenants/a/events?token={kb}", s.port);
    assert!(tungstenite::client(url_b.as_str(), other).is_err());

    let rb = s.simulate("b", &kb, "ivr", json!([{"type": "digits", "digits": "9"}]));
    let ra = s.simulate("a", &ka, "ivr", json!([{"type": "digits", "digits": "9"}]));
    let (ia, ib) = (
        ra.body["interaction"].clone(),
        rb.body["interaction"].clone(),
    );
    // a's run: event, actions, event, actions — and nothing of b's.
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let msg = ws.read().unwrap();
        let v: serde_json::Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        assert_ne!(
            v["interaction"], ib,
            "tenant b's event reached tenant a's stream"
        );
        assert_eq!(v["interaction"], ia, "{v}");
        kinds.push(v["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["event", "actions", "event", "actions"]);
}

#[test]
fn clock_follows_the_tenants_time_zone() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]).unwrap();
    let bad = s.json(
        "POST",
        "/v1/tenants",
        &s.admin,
        &json!({"id": "x", "time_zone": "Mars/Olympus"}),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    let r = s.json(
        "POST",
        "/v1/tenants",
        &s.admin,
        &json!({"id": "lt", "time_zone": "Europe/Vilnius"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let k = r.body["api_key"].as_str().unwrap().to_string();
    assert_eq!(s.deploy("lt", &k, "probe", plugin("probe")).status, 201);
    // 2026-01-15T12:00:00Z (winter, UTC+2) and 2026-07-01T12:00:00Z (summer, UTC+3).
    for (now, offset) in [(1_768_478_400_000u64, 120), (1_782_907_200_000u64, 180)] {
        let r = s.json(
            "POST",
            "/v1/tenants/lt/flows/probe/simulate",
            &k,
            &json!({"events": [{"type": "digits", "digits": "5"}], "now_ms": now}),
        );
        assert_eq!(
            says(&r.body["steps"][1]),
            vec![format!("clock {now} Europe/Vilnius {offset}")],
            "{r:?}"
        );
    }
}

#[test]
fn operator_sets_per_tenant_limits() {
    let dir = tempfile::tempdir().unwrap();
    // Generous server defaults, so that the memory bomb meets the memory cap
    // before the deadline even on a busy machine.
    let s = Server::start(
        &dir.path().join("data"),
        &["--deadline-ms", "300", "--memory-mib", "32"],
    )
    .unwrap();
    let kx = s.tenant("x");
    let ky = s.tenant("y");
    for (t, k) in [("x", &kx), ("y", &ky)] {
        for mode in ["loop", "memory"] {
            assert_eq!(s.deploy(t, k, mode, plugin("hostile")).status, 201);
            let r = s.json(
                "PUT",
                &format!("/v1/tenants/{t}/plugins/{mode}/config"),
                k,
                &json!({"mode": mode}),
            );
            assert_eq!(r.status, 200);
        }
    }
    // Only the operator sets limits; the tenant may read them.
    let tight = json!({"deadline_ms": 30, "memory_mib": 8});
    assert_eq!(
        s.json("PUT", "/v1/tenants/x/limits", &kx, &tight).status,
        403
    );
    for bad in [
        json!({"deadline_ms": 0}),
        json!({"memory_mib": 100_000}),
        json!({"cpu": 1}),
    ] {
        assert_eq!(
            s.json("PUT", "/v1/tenants/x/limits", &s.admin, &bad).status,
            400,
            "{bad}"
        );
    }
    let r = s.json("PUT", "/v1/tenants/x/limits", &s.admin, &tight);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["deadline_ms"], 30);
    assert_eq!(r.body["memory_bytes"], 8 << 20);
    let r = s.get("/v1/tenants/x/limits", &kx);
    assert_eq!(r.body["deadline_ms"], 30, "{r:?}");
    // x runs under its own limits, y under the server's defaults.
    let msg = |t: &str, k: &str, mode: &str| {
        let r = s.simulate(t, k, mode, json!([]));
        assert_eq!(r.status, 422, "{r:?}");
        r.body["error"]["message"].as_str().unwrap().to_string()
    };
    for (t, k, mode, expect) in [
        ("x", &kx, "loop", "its 30 ms CPU deadline".to_string()),
        ("y", &ky, "loop", "its 300 ms CPU deadline".to_string()),
        ("x", &kx, "memory", format!("limit of {} bytes", 8 << 20)),
        ("y", &ky, "memory", format!("limit of {} bytes", 32 << 20)),
    ] {
        let m = msg(t, k, mode);
        assert!(m.contains(&expect), "{t} {mode}: {m}");
    }
}
