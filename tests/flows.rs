//! Declarative flows and plugins in several languages, end to end: the real
//! server over HTTP, the real `flow-graph` component, a real HTTP order
//! system on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_tests::{
    Answer, LOOPBACK, Server, TinyHttp, binary, lean_plugin, plugin, polyglot, root,
};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

/// 2026-11-23 (a Monday) 10:00 UTC.
const MONDAY_10: u64 = 1_795_428_000_000;
/// 2026-11-28 (a Saturday) 10:00 UTC.
const SATURDAY_10: u64 = MONDAY_10 + 5 * 86_400_000;

fn mis(path: &str) -> (u16, String) {
    if path == "/orders/1234" {
        (200, r#"{"status":"out for delivery"}"#.into())
    } else {
        (404, r#"{"error":"no such order"}"#.into())
    }
}

fn order_hotline_doc() -> Vec<u8> {
    std::fs::read(root().join("examples/order-hotline/flow.json")).unwrap()
}

fn deploy_flow(s: &Server, t: &str, key: &str, name: &str, doc: Vec<u8>) -> Answer {
    s.call(
        "POST",
        &format!("/v1/tenants/{t}/flows/{name}"),
        Some(key),
        Some(doc),
    )
    .unwrap()
}

/// Grants `http` to the order system and points `mis_url` at it.
fn wire_mis(s: &Server, t: &str, key: &str, name: &str, mis_port: u16) {
    let g = s.json(
        "PUT",
        &format!("/v1/tenants/{t}/plugins/{name}/grants"),
        key,
        &json!({"http": {"allow": [format!("127.0.0.1:{mis_port}")]}}),
    );
    assert_eq!(g.status, 200, "{g:?}");
    let c = s.json(
        "PUT",
        &format!("/v1/tenants/{t}/plugins/{name}/config"),
        key,
        &json!({"mis_url": format!("http://127.0.0.1:{mis_port}")}),
    );
    assert_eq!(c.status, 200, "{c:?}");
}

fn simulate_at(s: &Server, t: &str, key: &str, flow: &str, now_ms: u64, events: Value) -> Answer {
    s.json(
        "POST",
        &format!("/v1/tenants/{t}/flows/{flow}/simulate"),
        key,
        &json!({"events": events, "from": "+37060000001", "to": "+37052000000", "now_ms": now_ms}),
    )
}

/// The actions of every step, without states or timings.
fn actions(a: &Answer) -> Vec<Value> {
    assert_eq!(a.status, 200, "{a:?}");
    a.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["actions"].clone())
        .collect()
}

fn digits(d: &str) -> Value {
    json!({"type": "digits", "digits": d})
}

/// The order-hotline scripts: (clock, events).
fn scripts() -> Vec<(u64, Value)> {
    vec![
        (MONDAY_10, json!([digits("1")])),
        (MONDAY_10, json!([digits("2"), digits("1234")])),
        (MONDAY_10, json!([digits("2"), digits("9999")])),
        (
            MONDAY_10,
            json!([digits("7"), {"type": "recorded", "id": "r1", "duration_ms": 3000}]),
        ),
        (MONDAY_10, json!([{"type": "timeout"}, {"type": "hangup"}])),
        (MONDAY_10, json!([digits("2"), {"type": "timeout"}])),
        (
            SATURDAY_10,
            json!([{"type": "recorded", "id": "r2", "duration_ms": 9000}]),
        ),
    ]
}

#[test]
fn flow_documents_deploy_simulate_roll_back_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mis = TinyHttp::start(mis);
    let s = Server::start(&data, LOOPBACK).unwrap();
    let key = s.tenant("shop");

    let a = deploy_flow(&s, "shop", &key, "hotline", order_hotline_doc());
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["kind"], "flow");
    assert_eq!(a.body["version"], 1);
    assert_eq!(a.body["warnings"], json!([]));
    wire_mis(&s, "shop", &key, "hotline", mis.port);

    let steps = actions(&simulate_at(
        &s,
        "shop",
        &key,
        "hotline",
        MONDAY_10,
        json!([digits("2"), digits("1234")]),
    ));
    assert_eq!(
        steps[2],
        json!([{"type": "say", "text": "Order 1234 is out for delivery."}, {"type": "hangup"}])
    );
    assert_eq!(mis.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let closed = actions(&simulate_at(
        &s,
        "shop",
        &key,
        "hotline",
        SATURDAY_10,
        json!([]),
    ));
    assert_eq!(
        closed[0][0]["text"],
        "We are closed. Please leave a message after the tone."
    );

    // Refused documents name the node and change nothing.
    for (doc, node, needle) in [
        (
            json!({"start": "a", "nodes": {"a": {"type": "say", "text": "hi", "next": "gone"}}}),
            "a",
            "\"gone\"",
        ),
        (
            json!({"start": "a", "nodes": {"a": {"type": "say", "text": "hi", "next": "b"}, "b": {"type": "fly"}}}),
            "b",
            "unknown node type",
        ),
        (
            json!({"start": "a", "nodes": {
                "a": {"type": "set", "vars": {"n": "1"}, "next": "b"},
                "b": {"type": "say", "text": "again", "next": "a"}}}),
            "",
            "never waits for input",
        ),
    ] {
        let r = deploy_flow(&s, "shop", &key, "hotline", doc.to_string().into_bytes());
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["error"]["code"], "invalid_flow");
        let n = r.body["node"].as_str().unwrap();
        if !node.is_empty() {
            assert_eq!(n, node, "{r:?}");
        }
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(n),
            "{r:?}"
        );
        assert!(r.body["reason"].as_str().unwrap().contains(needle), "{r:?}");
    }
    let bad_json = deploy_flow(&s, "shop", &key, "hotline", b"{not json".to_vec());
    assert_eq!(bad_json.status, 422, "{bad_json:?}");

    // Version 2 changes a prompt; rollback restores version 1's document.
    let v2 = String::from_utf8(order_hotline_doc())
        .unwrap()
        .replace("Connecting you to sales.", "Sales, one moment.");
    let a = deploy_flow(&s, "shop", &key, "hotline", v2.into_bytes());
    assert_eq!(a.body["version"], 2, "{a:?}");
    let say = |s: &Server| {
        actions(&simulate_at(
            s,
            "shop",
            &key,
            "hotline",
            MONDAY_10,
            json!([digits("1")]),
        ))[1][0]["text"]
            .clone()
    };
    assert_eq!(say(&s), "Sales, one moment.");
    let r = s.json(
        "POST",
        "/v1/tenants/shop/plugins/hotline/rollback",
        &key,
        &json!({}),
    );
    assert_eq!(r.body["active_version"], 1, "{r:?}");
    assert_eq!(say(&s), "Connecting you to sales.");
    let g = s.get("/v1/tenants/shop/flows/hotline?version=2", &key);
    assert_eq!(
        g.body["document"]["nodes"]["sales"]["text"],
        "Sales, one moment."
    );

    // Another tenant cannot read or deploy it.
    let other = s.tenant("other");
    assert_eq!(s.get("/v1/tenants/shop/flows/hotline", &other).status, 403);
    assert_eq!(
        deploy_flow(&s, "shop", &other, "x", order_hotline_doc()).status,
        403
    );

    // A restart keeps versions, documents and the active version.
    s.kill();
    let s = Server::start(&data, &[]).unwrap();
    assert_eq!(say(&s), "Connecting you to sales.");
    let g = s.get("/v1/tenants/shop/flows/hotline", &key);
    assert_eq!(g.body["version"], 1, "{g:?}");
}

#[test]
fn the_same_scenario_gives_the_same_steps_as_json_rust_js_and_python() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mis = TinyHttp::start(mis);
    // What is compared is behaviour, not speed: a CPU deadline that a
    // Python flow can overrun on a busy machine would make it flaky.
    let flags = [LOOPBACK, &["--deadline-ms", "2000"]].concat();
    let s = Server::start(&data, &flags).unwrap();
    let key = s.tenant("shop");
    assert_eq!(
        deploy_flow(&s, "shop", &key, "json", order_hotline_doc()).status,
        201
    );
    let mut flows = vec!["json"];
    let mut components = vec![
        ("rust", plugin("order_hotline")),
        // The same Rust source as a lean core module (the default Rust build).
        ("rust-lean", lean_plugin("order_hotline")),
    ];
    for (lang, file) in [("js", "order_hotline_js"), ("python", "order_hotline_py")] {
        components.push((
            lang,
            polyglot(file).unwrap_or_else(|| {
                panic!("target/polyglot/{file}.wasm missing: run scripts/build-polyglot.sh")
            }),
        ));
    }
    for (lang, bytes) in components {
        let a = s.deploy("shop", &key, lang, bytes);
        assert_eq!(a.status, 201, "{lang}: {a:?}");
        flows.push(lang);
    }
    for f in &flows {
        wire_mis(&s, "shop", &key, f, mis.port);
    }
    for (now, events) in scripts() {
        let reference = actions(&simulate_at(&s, "shop", &key, "json", now, events.clone()));
        assert!(reference.iter().any(|a| a != &json!([])));
        for f in &flows[1..] {
            let got = actions(&simulate_at(&s, "shop", &key, f, now, events.clone()));
            assert_eq!(got, reference, "{f} differs from the JSON flow on {events}");
        }
    }
}

#[test]
fn cli_deploys_a_flow_document_and_reports_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = Server::start(&data, &[]).unwrap();
    s.tenant("cli");
    let cli = |args: &[&str]| {
        Command::new(binary())
            .args(["--url", &s.url(), "--token", &s.admin])
            .args(args)
            .output()
            .unwrap()
    };
    let doc = root().join("examples/order-hotline/flow.json");
    let out = cli(&[
        "flow",
        "deploy",
        "cli",
        doc.to_str().unwrap(),
        "--name",
        "hotline",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let out = cli(&[
        "flow",
        "simulate",
        "cli",
        "hotline",
        "--events",
        r#"[{"type":"digits","digits":"1"}]"#,
        "--now-ms",
        &MONDAY_10.to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"][1]["actions"][1]["queue"], "sales", "{v}");

    let bad: PathBuf = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        json!({"start": "hello", "nodes": {"hello": {"type": "say", "text": "hi", "next": "menu"}}})
            .to_string(),
    )
    .unwrap();
    let out = cli(&["flow", "deploy", "cli", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid_flow") && err.contains("\"hello\""),
        "{err}"
    );
}

/// Scaffolds a project with `plugboard plugin new`, builds it with the
/// commands it prints, and returns the component.
fn scaffold_and_build(lang: &str, kind: &str, name: &str, dir: &std::path::Path) -> Vec<u8> {
    let project = dir.join(name);
    let out = Command::new(binary())
        .args([
            "plugin", "new", name, "--lang", lang, "--kind", kind, "--dir",
        ])
        .arg(&project)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let build_line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("cd "))
        .unwrap_or_else(|| panic!("no build command in {printed}"));
    let deploy_line = printed
        .lines()
        .find(|l| l.contains("plugin deploy"))
        .unwrap();
    let wasm = deploy_line.split_whitespace().last().unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(build_line.trim());
    if lang == "rust" {
        // Share the checkout's build cache instead of compiling the SDK again.
        cmd.env("CARGO_TARGET_DIR", root().join("target"));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{build_line}: {out:?}");
    let path = if lang == "rust" {
        root()
            .join("target")
            .join(wasm.trim_start_matches("target/"))
    } else {
        project.join(wasm)
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn plugin_new_scaffolds_projects_that_build_and_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = Server::start(&data, &[]).unwrap();
    let key = s.tenant("dev");
    let cases: Vec<(&str, &str)> = ["rust", "js", "python"]
        .into_iter()
        .flat_map(|lang| ["flow", "router", "tts", "crm"].map(|k| (lang, k)))
        .collect();
    for (lang, kind) in cases {
        let name = format!("scaffold-{lang}-{kind}");
        let bytes = scaffold_and_build(lang, kind, &name, dir.path());
        let a = s.deploy("dev", &key, &name, bytes);
        assert_eq!(a.status, 201, "{lang} {kind}: {a:?}");
        assert_eq!(a.body["kind"], kind, "{lang} {kind}: {a:?}");
        if kind == "flow" {
            let steps = actions(&simulate_at(&s, "dev", &key, &name, MONDAY_10, json!([])));
            assert!(
                steps[0].as_array().is_some_and(|a| !a.is_empty()),
                "{lang}: the template flow answers `started`: {steps:?}"
            );
        }
    }
    // A second `new` into the same directory is refused, not overwritten.
    let out = Command::new(binary())
        .args(["plugin", "new", "scaffold-rust-flow", "--dir"])
        .arg(dir.path().join("scaffold-rust-flow"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn js_and_python_plugins_are_contained_like_rust_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let s = Server::start(&data, &["--deadline-ms", "100", "--memory-mib", "48"]).unwrap();
    let ke = s.tenant("evil");
    let kg = s.tenant("good");
    // The memory hogs get a long deadline, so that on a loaded machine the
    // memory cap, not the clock, is what stops them.
    let kh = s.tenant("hog");
    let r = s.json(
        "PUT",
        "/v1/tenants/hog/limits",
        &s.admin,
        &json!({"deadline_ms": 5000}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let tenant_for = |mode: &str| {
        if mode == "memory" {
            ("hog", kh.clone())
        } else {
            ("evil", ke.clone())
        }
    };
    assert_eq!(
        deploy_flow(&s, "good", &kg, "hotline", order_hotline_doc()).status,
        201
    );
    for lang in ["js", "py"] {
        let bytes = polyglot(&format!("hostile_{lang}")).unwrap_or_else(|| {
            panic!("hostile_{lang}.wasm missing: run scripts/build-polyglot.sh")
        });
        for mode in ["loop", "memory", "ok"] {
            let name = format!("{mode}-{lang}");
            let (t, k) = tenant_for(mode);
            let a = s.deploy(t, &k, &name, bytes.clone());
            assert_eq!(a.status, 201, "{a:?}");
            let r = s.json(
                "PUT",
                &format!("/v1/tenants/{t}/plugins/{name}/config"),
                &k,
                &json!({"mode": mode}),
            );
            assert_eq!(r.status, 200);
        }
    }
    // The good tenant keeps answering while the hostile ones run.
    let url = s.url();
    let good = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        (0..30)
            .filter(|_| {
                let mut resp = agent
                    .post(format!("{url}/v1/tenants/good/flows/hotline/simulate"))
                    .header("authorization", format!("Bearer {kg}"))
                    .send_json(json!({"events": [digits("1")], "now_ms": MONDAY_10}))
                    .unwrap();
                let body: Value = resp.body_mut().read_json().unwrap();
                body["steps"][1]["actions"][1]["queue"] == "sales"
            })
            .count()
    });
    for _ in 0..2 {
        for lang in ["js", "py"] {
            for (mode, code) in [
                ("loop", "plugin_timeout"),
                ("memory", "plugin_memory_limit"),
            ] {
                let (t, k) = tenant_for(mode);
                let r = s.simulate(t, &k, &format!("{mode}-{lang}"), json!([]));
                assert_eq!(r.status, 422, "{mode}-{lang}: {r:?}");
                assert_eq!(r.body["error"]["code"], code, "{mode}-{lang}: {r:?}");
                let step = &r.body["steps"][0];
                assert_eq!(step["fallback"], true);
                if mode == "loop" {
                    let server_ms = step["elapsed_us"].as_u64().unwrap() / 1000;
                    // A generous bound: the deadline fired.
                    assert!(
                        server_ms < 5_000,
                        "{lang} loop stopped after {server_ms} ms for a 100 ms budget"
                    );
                }
            }
            // The same component behaves when asked to.
            let r = s.simulate("evil", &ke, &format!("ok-{lang}"), json!([]));
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body["steps"][0]["actions"][0]["text"], "ok");
        }
    }
    assert_eq!(
        good.join().unwrap(),
        30,
        "the good tenant answered every time"
    );
}
