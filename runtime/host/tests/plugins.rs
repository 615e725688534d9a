//! The host against the real first-party plugins (built by
//! `scripts/build-plugins.sh` into `target/wasm32-wasip2/release/`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::{Event, Grants, PluginKind, flow::Action};
use plugboard_host::{
    FlowInput, HostConfig, InvokeError, Limits, PluginEnv, PluginHost, RouteAgent, RouteTask,
};
use std::path::PathBuf;
use std::time::Instant;

fn wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the plugins first: scripts/build-plugins.sh)",
            path.display()
        )
    })
}

fn host() -> PluginHost {
    PluginHost::new(HostConfig::default()).expect("host")
}

fn env(config: serde_json::Value) -> PluginEnv {
    PluginEnv {
        tenant: "t1".into(),
        plugin: "p".into(),
        config,
        ..Default::default()
    }
}

fn ix() -> FlowInput {
    FlowInput {
        id: "ix-1".into(),
        tenant: "t1".into(),
        from: "37060000001".into(),
        to: "100".into(),
        ..Default::default()
    }
}

#[test]
fn hello_ivr_menu() {
    let h = host();
    let p = h.load(&wasm("hello_ivr")).expect("load");
    assert_eq!(p.kind, PluginKind::Flow);
    let r = h.invoke_flow(&p, env(serde_json::Value::Null), &ix(), "", &Event::Started);
    let out = r.outcome.expect("started");
    assert_eq!(out.state.as_deref(), Some("0"));
    assert!(
        matches!(&out.actions[0], Action::Gather { max_digits: 1, .. }),
        "{out:?}"
    );
    let r = h.invoke_flow(
        &p,
        env(serde_json::Value::Null),
        &ix(),
        "0",
        &Event::Digits {
            digits: "2".into(),
            terminated: false,
        },
    );
    let out = r.outcome.expect("digits");
    assert!(out.actions.contains(&Action::Enqueue {
        queue: "support".into(),
        priority: 0,
        skills: vec!["support".into()]
    }));
}

#[test]
fn router_ranks_by_skill() {
    let h = host();
    let p = h.load(&wasm("skills_router")).expect("load");
    assert_eq!(p.kind, PluginKind::Router);
    let task = RouteTask {
        id: "ix".into(),
        channel: "voice".into(),
        queue: "support".into(),
        skills: vec!["support".into(), "lang:lt".into()],
        ..Default::default()
    };
    let agents = vec![
        RouteAgent {
            id: "a".into(),
            skills: vec![("support".into(), 5)],
            ..Default::default()
        },
        RouteAgent {
            id: "b".into(),
            skills: vec![("support".into(), 3), ("lang:lt".into(), 9)],
            ..Default::default()
        },
        RouteAgent {
            id: "c".into(),
            skills: vec![("support".into(), 9), ("lang:lt".into(), 9)],
            ..Default::default()
        },
    ];
    let d = h
        .invoke_router(&p, env(serde_json::Value::Null), &task, &agents)
        .outcome
        .expect("route");
    assert_eq!(d.ranked, vec!["c".to_string(), "b".to_string()]);
    // A router is not a flow.
    let r = h.invoke_flow(&p, env(serde_json::Value::Null), &ix(), "", &Event::Started);
    assert!(matches!(r.outcome, Err(InvokeError::WrongKind { .. })));
}

fn hostile(
    h: &PluginHost,
    mode: &str,
    limits: Limits,
) -> (Result<plugboard_host::FlowOutput, InvokeError>, u128) {
    let p = h.load(&wasm("hostile")).expect("load");
    let mut e = env(serde_json::json!({ "mode": mode }));
    e.limits = limits;
    let t0 = Instant::now();
    let r = h.invoke_flow(&p, e, &ix(), "", &Event::Started);
    (r.outcome, t0.elapsed().as_millis())
}

#[test]
fn hostile_plugins_are_contained() {
    let h = host();
    let limits = Limits {
        deadline_ms: 100,
        memory_bytes: 32 << 20,
        ..Default::default()
    };
    let (r, ms) = hostile(&h, "loop", limits.clone());
    assert_eq!(r, Err(InvokeError::Timeout { budget_ms: 100 }));
    assert!(ms < 100 + 100, "loop stopped after {ms} ms");
    let (r, _) = hostile(&h, "memory", limits.clone());
    assert_eq!(
        r,
        Err(InvokeError::MemoryLimit {
            limit_bytes: 32 << 20
        })
    );
    let (r, _) = hostile(
        &h,
        "output",
        Limits {
            memory_bytes: 64 << 20,
            ..limits.clone()
        },
    );
    assert!(
        matches!(r, Err(InvokeError::OutputTooLarge { .. })),
        "{r:?}"
    );
    let (r, _) = hostile(&h, "actions", limits.clone());
    assert!(
        matches!(r, Err(InvokeError::TooManyActions { count: 10_000, .. })),
        "{r:?}"
    );
    let (r, _) = hostile(&h, "trap", limits.clone());
    assert!(matches!(r, Err(InvokeError::Trap(_))), "{r:?}");
    let (r, _) = hostile(&h, "stack", limits.clone());
    assert!(
        matches!(
            r,
            Err(InvokeError::Trap(_)) | Err(InvokeError::MemoryLimit { .. })
        ),
        "{r:?}"
    );
    let (r, _) = hostile(&h, "error", limits.clone());
    assert_eq!(r, Err(InvokeError::Plugin("hostile plugin refuses".into())));
    // And the host still serves.
    let (r, _) = hostile(&h, "", limits);
    assert!(r.is_ok());
}

#[test]
fn grants_deny_by_default() {
    let h = host();
    let p = h.load(&wasm("probe")).expect("load");
    let say = |e: PluginEnv, digits: &str| -> String {
        let r = h.invoke_flow(
            &p,
            e,
            &ix(),
            "",
            &Event::Digits {
                digits: digits.into(),
                terminated: false,
            },
        );
        match r.outcome.expect("probe").actions.first() {
            Some(Action::Say { text, .. }) => text.clone(),
            other => panic!("{other:?}"),
        }
    };
    let cfg = serde_json::json!({ "url": "http://127.0.0.1:9/x", "addr": "127.0.0.1:9" });
    let s = say(env(cfg.clone()), "1");
    assert!(s.contains("not granted"), "http without grant: {s}");
    assert!(
        say(env(cfg.clone()), "2").contains("not granted"),
        "kv without grant"
    );
    assert!(
        say(env(cfg.clone()), "3").starts_with("socket refused"),
        "raw sockets"
    );
    let mut e = env(cfg);
    e.grants = Grants {
        http: Some(plugboard_core::HttpGrant {
            allow: vec!["127.0.0.1:10".into()],
            ..Default::default()
        }),
        kv: false,
    };
    assert!(say(e, "1").contains("not granted: http to 127.0.0.1:9"));
}

#[test]
fn not_a_plugin() {
    let h = host();
    assert!(h.load(b"\0asm\x01\0\0\0").is_err());
    assert!(h.load(b"hello").is_err());
}
