//! Per-event cost of a flow doing one HTTPS GET to a local service, next
//! to the same request made by `curl`, in one run.
//!
//! Run with: `scripts/build-plugins.sh && cargo run --release -p plugboard-host --example https_bench`
//!
//! A local HTTPS/1.1 service (rustls, a test CA made here with rcgen,
//! keep-alive) answers `hi`. Measured, p50/p99 per event:
//! - **handshake**: the probe flow's event (instantiate, `http.fetch`, drop)
//!   for a tenant whose pool is new, so the fetch opens a connection and
//!   does a TLS handshake;
//! - **pooled**: the same event for one tenant, reusing its connection;
//! - **fetch only**: the host's fetcher called directly, pooled (no plugin);
//! - **curl**: one `curl` process fetching the URL 200 times on one
//!   connection (`-w %{time_total}` per transfer): its first transfer
//!   (handshake) and the reused ones; and `curl` started once per request.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use plugboard_core::{Event, Grants, HttpGrant, flow::Action};
use plugboard_host::fetch::{FetchRequest, NetPolicy};
use plugboard_host::{FlowInput, HostConfig, PluginEnv, PluginHost};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// A test CA and a server certificate for 127.0.0.1: (CA PEM, chain, key).
fn test_ca() -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    Vec<u8>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: a leaf whose issuer name equals its subject
    // looks self-signed to OpenSSL (curl).
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Plugboard bench CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        vec![leaf.der().clone(), ca_cert.der().clone()],
        key.serialize_der(),
    )
}

/// Serves `hi` over HTTPS/1.1 with keep-alive, a thread per connection;
/// counts handshakes. Returns the port.
fn serve(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: Vec<u8>,
    handshakes: Arc<AtomicUsize>,
) -> u16 {
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100_000) {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let (config, hs) = (config.clone(), handshakes.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut reader = BufReader::new(&mut tls);
                let mut counted = false;
                for _ in 0..1_000_000 {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if !counted {
                        hs.fetch_add(1, Ordering::SeqCst);
                        counted = true;
                    }
                    loop {
                        let mut l = String::new();
                        if reader.read_line(&mut l).unwrap_or(0) == 0 {
                            return;
                        }
                        if l == "\r\n" {
                            break;
                        }
                    }
                    let tls = reader.get_mut();
                    let out = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                    if tls.write_all(out).and_then(|_| tls.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ca_pem, chain, key) = test_ca();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let port = serve(chain, key, handshakes.clone());
    let url = format!("https://127.0.0.1:{port}/customer");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();

    let host = PluginHost::new(HostConfig {
        net: NetPolicy::allowing(&["127.0.0.1/32".to_string()]).unwrap(),
        ..HostConfig::default()
    })
    .unwrap();
    let wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release/probe.wasm");
    let probe = host
        .load(&std::fs::read(&wasm).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the plugins first: scripts/build-plugins.sh",
                wasm.display()
            )
        }))
        .unwrap();
    let grant = HttpGrant {
        allow: vec![format!("https://127.0.0.1:{port}")],
        ca_pem: Some(ca_pem.clone()),
        ..HttpGrant::default()
    };
    let env = |tenant: String| PluginEnv {
        tenant,
        plugin: "probe".into(),
        grants: Grants {
            http: Some(grant.clone()),
            ..Grants::default()
        },
        config: serde_json::json!({ "url": url }),
        ..PluginEnv::default()
    };
    let ix = FlowInput {
        id: "ix".into(),
        tenant: "t".into(),
        ..FlowInput::default()
    };
    let event = Event::Digits {
        digits: "1".into(),
        terminated: false,
    };
    let run = |tenant: String| {
        let t0 = Instant::now();
        let r = rt.block_on(host.invoke_flow(&probe, env(tenant), &ix, "", &event));
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        match r.outcome.unwrap().actions.first() {
            Some(Action::Say { text, .. }) if text == "http 200 hi" => {}
            other => panic!("{other:?}"),
        }
        ms
    };
    // Warm up: code paths, the compiled component, one pool.
    for _ in 0..50 {
        run("warm".into());
    }

    let n_new = 300;
    let n_pooled = 3000;
    let before = handshakes.load(Ordering::SeqCst);
    let handshake: Vec<f64> = (0..n_new).map(|i| run(format!("new-{i}"))).collect();
    let new_handshakes = handshakes.load(Ordering::SeqCst) - before;
    let before = handshakes.load(Ordering::SeqCst);
    let pooled: Vec<f64> = (0..n_pooled).map(|_| run("pooled".into())).collect();
    let pooled_handshakes = handshakes.load(Ordering::SeqCst) - before;
    let fetcher = host.fetcher().clone();
    let fetch_only: Vec<f64> = (0..n_pooled)
        .map(|_| {
            let t0 = Instant::now();
            let r = rt
                .block_on(fetcher.send("direct", &grant, FetchRequest::get(&url)))
                .unwrap();
            assert_eq!(r.body, b"hi");
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();

    // curl: one process, 200 transfers on one connection.
    let mut args = vec![
        "-sS".to_string(),
        "--cacert".into(),
        ca_path.display().to_string(),
        "-w".into(),
        "%{time_total}\\n".into(),
    ];
    for _ in 0..200 {
        args.push("-o".into());
        args.push("/dev/null".into());
        args.push(url.clone());
    }
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .expect("curl (Debian package curl)");
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    assert!(
        out.status.success() && times.len() == 200,
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let curl_first = times[0];
    let curl_reused = times[1..].to_vec();
    // curl started once per request (process start, handshake, request).
    let curl_process: Vec<f64> = (0..50)
        .map(|_| {
            let t0 = Instant::now();
            let o = std::process::Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--cacert"])
                .arg(&ca_path)
                .arg(&url)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();

    let (h50, h99) = summary(handshake);
    let (p50, p99) = summary(pooled);
    let (f50, f99) = summary(fetch_only);
    let (c50, c99) = summary(curl_reused);
    let (s50, s99) = summary(curl_process);
    println!("one HTTPS GET to a local service, ms (p50 / p99):");
    println!(
        "  flow event, new connection (TLS handshake): {h50:.3} / {h99:.3}  ({new_handshakes} handshakes for {n_new} events)"
    );
    println!(
        "  flow event, pooled connection:              {p50:.3} / {p99:.3}  ({pooled_handshakes} handshakes for {n_pooled} events)"
    );
    println!("  fetcher alone, pooled (no plugin):          {f50:.3} / {f99:.3}");
    println!("  curl, first transfer (handshake):           {curl_first:.3}");
    println!("  curl, reused connection:                    {c50:.3} / {c99:.3}");
    println!("  curl, a process per request:                {s50:.3} / {s99:.3}");
    println!(
        "ratios at p50: pooled flow event / curl reused {:.2}; handshake flow event / curl first {:.2}; \
         pooled flow event / fetcher alone {:.2}; handshake / pooled {:.1}",
        p50 / c50,
        h50 / curl_first,
        p50 / f50,
        h50 / p50
    );
}
