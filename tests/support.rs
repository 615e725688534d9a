//! Test support: starts the real `plugboard` binary on a free loopback port
//! with its own data directory, and talks to it over HTTP.
//!
//! The binary and the plugins must be built first (`scripts/test.sh` does):
//! `cargo build --bins` and `scripts/build-plugins.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `plugboard` binary next to the test executable (target/debug).
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("PLUGBOARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("plugboard");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// A first-party plugin component built by scripts/build-plugins.sh.
pub fn plugin(name: &str) -> Vec<u8> {
    built("wasm32-wasip2", name)
}

/// A JavaScript or Python component built by scripts/build-polyglot.sh
/// (`target/polyglot/NAME.wasm`), if its toolchain built it.
pub fn polyglot(name: &str) -> Option<Vec<u8>> {
    std::fs::read(root().join("target/polyglot").join(format!("{name}.wasm"))).ok()
}

/// A first-party plugin built lean by scripts/build-plugins.sh: a core
/// module for wasm32-unknown-unknown, which the server wraps on deploy.
pub fn lean_plugin(name: &str) -> Vec<u8> {
    built("wasm32-unknown-unknown", name)
}

fn built(target: &str, name: &str) -> Vec<u8> {
    let p = root()
        .join("target")
        .join(target)
        .join("release")
        .join(format!("{name}.wasm"));
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-plugins.sh)", p.display()))
}

/// Server flags for tests whose tenants call local web services: the
/// operator lets tenants' HTTP reach loopback (refused by default).
pub const LOOPBACK: &[&str] = &["--allow-network", "127.0.0.1/32"];

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The port of the first `IP:PORT` that follows `marker` in a log.
fn logged_port(log: &str, marker: &str) -> Option<u16> {
    let rest = &log[log.find(marker)? + marker.len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.rsplit_once(':')?.1.parse().ok()
}

/// A loopback port free for both UDP and TCP (for SIP).
pub fn free_sip_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for SIP");
}

/// A running server.
pub struct Server {
    child: Child,
    pub port: u16,
    /// SIP (UDP and TCP) on 127.0.0.1.
    pub sip_port: u16,
    pub data_dir: PathBuf,
    pub admin: String,
    agent: ureq::Agent,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    /// The `Retry-After` header, seconds.
    pub retry_after: Option<u64>,
}

impl Server {
    /// Starts the server on `data_dir` with extra `serve` flags.
    pub fn start(data_dir: &Path, flags: &[&str]) -> Result<Server> {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "serve".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--sip".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        Server::spawn(data_dir, &args, true)
    }

    /// Starts the server with nothing but a config file: `config` is its
    /// text, with `{data}` replaced by the data directory and `{http}`
    /// and `{sip}` by port 0 (the server picks free ports and logs them).
    pub fn start_configured(data_dir: &Path, config: &str) -> Result<Server> {
        let has_sip = config.contains("{sip}");
        let text = config
            .replace("{data}", &data_dir.display().to_string())
            .replace("{http}", "0")
            .replace("{sip}", "0");
        let file = data_dir.with_extension("toml");
        std::fs::write(&file, text)?;
        let args = [
            "serve".to_string(),
            "--config".into(),
            file.display().to_string(),
        ];
        Server::spawn(data_dir, &args, has_sip)
    }

    /// Spawns the server on port 0 and learns its ports from its log: a
    /// port picked here and bound later by the server could be taken in
    /// between by a server of a parallel test, which would then answer
    /// this test's requests (CI once saw a 401 that way).
    fn spawn(data_dir: &Path, args: &[String], has_sip: bool) -> Result<Server> {
        let admin = "test-admin-token".to_string();
        let log_path = data_dir.with_extension("log");
        let log = std::fs::File::create(&log_path).context("log file")?;
        let mut cmd = Command::new(binary());
        // PLUGBOARD_TEST_STORE=postgres runs the same tests on PostgreSQL:
        // each data directory gets a database of its own (the same one
        // again when a test restarts its server).
        if std::env::var("PLUGBOARD_TEST_STORE").as_deref() == Ok("postgres") {
            cmd.env("PLUGBOARD_STORE", postgres().database_for(data_dir));
        }
        let child = cmd
            .args(args)
            .env("PLUGBOARD_ADMIN_TOKEN", &admin)
            // Compiled components are shared by every test server (keyed by hash).
            .env(
                "PLUGBOARD_CACHE_DIR",
                root().join("target/test-compile-cache"),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning plugboard")?;
        // A fresh connection per request: a server may close a kept-alive
        // connection after answering a request whose body it did not read
        // (a 401 before the body), and a pooled connection reused in that
        // instant fails with "peer disconnected" (CI saw it once).
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .build()
            .into();
        let mut s = Server {
            child,
            port: 0,
            sip_port: 0,
            data_dir: data_dir.to_path_buf(),
            admin,
            agent,
        };
        let t0 = Instant::now();
        loop {
            if s.port == 0 || (has_sip && s.sip_port == 0) {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                s.port = logged_port(&text, "listening on http://").unwrap_or(0);
                s.sip_port = logged_port(&text, "SIP listening on ").unwrap_or(0);
            }
            if s.port != 0
                && (s.sip_port != 0 || !has_sip)
                && let Ok(a) = s.call("GET", "/healthz", None, None)
                && a.status == 200
            {
                // Runs meant for PostgreSQL really run on it.
                if std::env::var("PLUGBOARD_TEST_STORE").as_deref() == Ok("postgres") {
                    let settings = s.get("/v1/settings", &s.admin.clone());
                    let store = settings.body["store"].as_str().unwrap_or("");
                    assert!(store.starts_with("postgres://"), "{settings:?}");
                }
                return Ok(s);
            }
            if let Some(status) = s.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "server exited early: {status}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("server did not become healthy in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server without warning (SIGKILL): what was acknowledged must survive.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`KILL`, `TERM`, …) to the server without waiting.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// Waits (at most `limit`) for the server to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                bail!("the server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One request; `body` is JSON unless `raw` is given.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer> {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url()));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body.unwrap_or_default())?;
        let mut resp = self.agent.run(req)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let text = resp.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    /// A GET whose answer is bytes (a blob, a recording).
    pub fn get_bytes(&self, path: &str, token: &str) -> (u16, Vec<u8>) {
        let req = ureq::http::Request::builder()
            .method("GET")
            .uri(format!("{}{path}", self.url()))
            .header("authorization", format!("Bearer {token}"))
            .body(Vec::new())
            .unwrap();
        let mut resp = self.agent.run(req).unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.body_mut().read_to_vec().unwrap();
        (status, bytes)
    }

    /// A JSON request.
    pub fn json(&self, method: &str, path: &str, token: &str, body: &Value) -> Answer {
        self.call(
            method,
            path,
            Some(token),
            Some(serde_json::to_vec(body).unwrap()),
        )
        .unwrap()
    }

    /// A GET.
    pub fn get(&self, path: &str, token: &str) -> Answer {
        self.call("GET", path, Some(token), None).unwrap()
    }

    /// Creates a tenant; returns its API key.
    pub fn tenant(&self, id: &str) -> String {
        let a = self.json(
            "POST",
            "/v1/tenants",
            &self.admin.clone(),
            &serde_json::json!({"id": id}),
        );
        assert_eq!(a.status, 201, "{a:?}");
        a.body["api_key"].as_str().unwrap().to_string()
    }

    /// Deploys a plugin; returns the answer body.
    pub fn deploy(&self, tenant: &str, token: &str, name: &str, bytes: Vec<u8>) -> Answer {
        self.call(
            "PUT",
            &format!("/v1/tenants/{tenant}/plugins/{name}"),
            Some(token),
            Some(bytes),
        )
        .unwrap()
    }

    /// A port the server logged after `marker` (e.g. `SMTP listening on `),
    /// waiting up to 10 s for the line.
    pub fn logged(&self, marker: &str) -> u16 {
        let log = self.data_dir.with_extension("log");
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(p) = logged_port(&text, marker) {
                return p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no {marker:?} in the log"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tenant's event stream (`?token=`, as a browser opens it),
    /// reads timing out after 10 s.
    pub fn tenant_stream(
        &self,
        tenant: &str,
        key: &str,
    ) -> tungstenite::WebSocket<std::net::TcpStream> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let url = format!(
            "ws://127.0.0.1:{}/v1/tenants/{tenant}/events?token={key}",
            self.port
        );
        tungstenite::client(url.as_str(), stream).unwrap().0
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// A tenant's interactions, newest first (at most 1,000).
    pub fn interactions(&self, tenant: &str, key: &str) -> Vec<Value> {
        let a = self.get(
            &format!("/v1/tenants/{tenant}/interactions?limit=1000"),
            key,
        );
        assert_eq!(a.status, 200, "{a:?}");
        a.body["interactions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// One interaction record, with its timeline.
    pub fn interaction(&self, tenant: &str, key: &str, ix: &str) -> Value {
        let a = self.get(&format!("/v1/tenants/{tenant}/interactions/{ix}"), key);
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }

    /// A conversation's messages, oldest first.
    pub fn messages(&self, tenant: &str, key: &str, ix: &str) -> Vec<Value> {
        let a = self.get(
            &format!("/v1/tenants/{tenant}/interactions/{ix}/messages"),
            key,
        );
        assert_eq!(a.status, 200, "{a:?}");
        a.body["messages"].as_array().cloned().unwrap_or_default()
    }

    /// Runs the CLI against this server with the operator's token: whether
    /// it succeeded, its stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(binary())
            .args(["--url", &self.url(), "--token", &self.admin])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Simulates a flow.
    pub fn simulate(&self, tenant: &str, token: &str, flow: &str, events: Value) -> Answer {
        self.json(
            "POST",
            &format!("/v1/tenants/{tenant}/flows/{flow}/simulate"),
            token,
            &serde_json::json!({"events": events, "from": "37060000001", "to": "+100"}),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of every `say` in a simulate step.
pub fn says(step: &Value) -> Vec<String> {
    step["actions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["type"] == "say")
                .filter_map(|x| x["text"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A one-route HTTP/1.1 server on loopback that answers every request with
/// `status` and `body` and counts requests. Real sockets, real HTTP.
pub struct TinyHttp {
    pub port: u16,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TinyHttp {
    /// Serves `respond(path) -> (status, body)` on a background thread.
    pub fn start(respond: fn(&str) -> (u16, String)) -> TinyHttp {
        use std::io::{BufRead, BufReader, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                let Ok(mut stream) = stream else { continue };
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                }
                let (status, body) = respond(&path);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TinyHttp { port, hits }
    }
}

/// The rest of an HTTP/1.1 request after its request line: the headers
/// (read past) and the body (`Content-Length` bytes); `None` if the
/// connection ended.
fn read_headers_and_body(reader: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut length = 0usize;
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap_or(0) == 0 {
            return None;
        }
        if l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// An OTLP/HTTP trace receiver (what a collector does): keeps the JSON
/// body of every POST and answers 200.
pub struct OtlpReceiver {
    pub port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        use std::io::{BufRead, BufReader, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                let Ok(stream) = stream else { continue };
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut out = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    // Requests one after the other on a kept-alive connection.
                    for _ in 0..10_000 {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let Some(body) = read_headers_and_body(&mut reader) else {
                            return;
                        };
                        if let Ok(v) = serde_json::from_slice(&body) {
                            kept.lock().unwrap().push(v);
                        }
                        let _ = write!(out, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        OtlpReceiver { port, bodies }
    }

    /// The traces URL to give the server.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received so far (the OTLP JSON span objects).
    pub fn spans(&self) -> Vec<Value> {
        let bodies = self.bodies.lock().unwrap();
        let mut out = Vec::new();
        for b in bodies.iter() {
            for rs in b["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        out
    }
}

/// A test certificate authority and a server certificate it issued for
/// `127.0.0.1` and `localhost` (rcgen).
pub struct TestCa {
    /// The CA certificate, PEM (what a grant's `ca_pem` trusts).
    pub ca_pem: String,
    /// The server's certificate chain and key, for [`TlsHttp`].
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: Vec<u8>,
    /// The server certificate and its key, PEM (for servers that read
    /// files: SMTP's STARTTLS).
    pub server_pem: (String, String),
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA and a server certificate signed by it.
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Plugboard test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            chain: vec![leaf.der().clone(), ca_cert.der().clone()],
            key: key.serialize_der(),
            server_pem: (leaf.pem() + &ca_cert.pem(), key.serialize_pem()),
            issuer,
        }
    }

    /// A client certificate signed by this CA: (certificate PEM, key PEM).
    pub fn client(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// An HTTPS/1.1 server with keep-alive (rustls): it counts TLS handshakes
/// (connections) and requests.
pub struct TlsHttp {
    pub port: u16,
    /// TLS connections accepted, each with its own handshake.
    pub handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests answered.
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsHttp {
    /// Serves `respond(path) -> (status, body)` with `ca`'s server
    /// certificate, a thread per connection.
    pub fn start(ca: &TestCa, respond: fn(&str) -> (u16, String)) -> TlsHttp {
        TlsHttp::serve(ca, None, respond)
    }

    /// As [`TlsHttp::start`], and a client must present a certificate
    /// signed by `clients` (mutual TLS); a handshake without one fails.
    pub fn start_mutual(
        ca: &TestCa,
        clients: &TestCa,
        respond: fn(&str) -> (u16, String),
    ) -> TlsHttp {
        TlsHttp::serve(ca, Some(clients), respond)
    }

    fn serve(ca: &TestCa, clients: Option<&TestCa>, respond: fn(&str) -> (u16, String)) -> TlsHttp {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key.clone().into());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(c.chain.last().cloned().expect("the CA certificate"))
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = std::sync::Arc::new(builder.with_single_cert(ca.chain.clone(), key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (hs, h) = (handshakes.clone(), hits.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(1000) {
                let Ok(stream) = stream else { continue };
                let (config, hs, h) = (config.clone(), hs.clone(), h.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    // The handshake completes on the first read.
                    let mut reader = BufReader::new(&mut tls);
                    let mut counted = false;
                    // Requests on this connection, until the client closes it.
                    for _ in 0..10_000 {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if !counted {
                            hs.fetch_add(1, SeqCst);
                            counted = true;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                        if read_headers_and_body(&mut reader).is_none() {
                            return;
                        }
                        h.fetch_add(1, SeqCst);
                        let (status, body) = respond(&path);
                        let out = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let tls = reader.get_mut();
                        if tls
                            .write_all(out.as_bytes())
                            .and_then(|_| tls.flush())
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        TlsHttp {
            port,
            handshakes,
            hits,
        }
    }
}

/// A PostgreSQL server of this test binary's own: started once (Debian's
/// `postgresql` binaries, a temporary cluster on a free loopback port) and
/// stopped by a watchdog when the binary exits.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    databases: std::sync::Mutex<std::collections::HashMap<PathBuf, String>>,
    next: std::sync::atomic::AtomicU32,
}

static POSTGRES: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();

/// The test binary's PostgreSQL server (started on first use).
pub fn postgres() -> &'static Postgres {
    POSTGRES.get_or_init(|| Postgres::start().expect("starting PostgreSQL"))
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Postgres {
    fn start() -> Result<Postgres> {
        // The newest installed server (scripts/setup.sh installs it).
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (scripts/setup.sh installs it)")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        versions.sort();
        let bin = versions.pop().context("no PostgreSQL server binaries")?;
        let dir = std::env::temp_dir().join(format!("plugboard-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // initdb refuses to run as root: run the server as `postgres`.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let as_server = |program: &Path| {
            if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        if root {
            run(
                Command::new("chown").args(["-R", "postgres"]).arg(&dir),
                "chown",
            )?;
        }
        let data = dir.join("data");
        run(
            as_server(&bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
                .arg(&data),
            "initdb",
        )?;
        let port = free_port();
        run(
            as_server(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
                    dir.display()
                ))
                .arg("-l")
                .arg(dir.join("log"))
                .args(["start", "-w"]),
            "pg_ctl start",
        )?;
        // Stop it when this test binary is gone, however it ends.
        let watchdog = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {pg_ctl} -D {data} stop -m immediate; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display(),
        );
        as_server(Path::new("sh"))
            .args(["-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL watchdog")?;
        Ok(Postgres {
            port,
            bin,
            databases: Default::default(),
            next: Default::default(),
        })
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("t{n}");
        run(
            Command::new(self.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(self.port.to_string())
                .arg(&name),
            "createdb",
        )
        .expect("createdb");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Everything a database holds, as `pg_dump` writes it (SQL text).
    pub fn dump(&self, url: &str) -> String {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["--data-only", "--inserts", url])
            .output()
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `pg_dump -Fc` of a database into `file` (a consistent snapshot
    /// while it serves).
    pub fn dump_to(&self, url: &str, file: &Path) -> Result<()> {
        run(
            Command::new(self.bin.join("pg_dump"))
                .args(["-Fc", "-f"])
                .arg(file)
                .arg(url),
            "pg_dump",
        )
    }

    /// A new database restored from a `pg_dump -Fc` file with
    /// `pg_restore`; its URL.
    pub fn restore(&self, file: &Path) -> Result<String> {
        let url = self.database();
        run(
            Command::new(self.bin.join("pg_restore"))
                .args(["--no-owner", "--exit-on-error", "-d", &url])
                .arg(file),
            "pg_restore",
        )?;
        Ok(url)
    }

    /// The database of a server's data directory (new the first time).
    pub fn database_for(&self, data_dir: &Path) -> String {
        let mut dbs = self.databases.lock().unwrap();
        dbs.entry(data_dir.to_path_buf())
            .or_insert_with(|| self.database())
            .clone()
    }
}

/// A NATS server (Debian's `nats-server`) on loopback, its log in a
/// temporary directory: killed when dropped or [`Nats::stop`]ped, and by a
/// watchdog when the test binary exits, however it ends.
pub struct Nats {
    pub port: u16,
    child: std::sync::Mutex<Child>,
    dir: PathBuf,
}

static NATS: std::sync::OnceLock<Nats> = std::sync::OnceLock::new();

/// The test binary's NATS server, shared by its tests (started on first
/// use). A test that stops its server starts one of its own instead.
pub fn nats() -> &'static Nats {
    NATS.get_or_init(|| Nats::start().expect("starting nats-server"))
}

impl Nats {
    /// A NATS server of its own on a free port.
    pub fn start() -> Result<Nats> {
        Nats::start_on(free_port())
    }

    /// A NATS server on `port` (the port of one stopped earlier: its
    /// clients reconnect).
    pub fn start_on(port: u16) -> Result<Nats> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("plugboard-nats-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("log");
        // Debian puts it in /usr/sbin, which is not on every PATH.
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let mut child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-l"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("nats-server is not installed (scripts/setup.sh installs it)")?;
        // Kill it when this test binary is gone, unless it is gone first.
        watch(&child, &dir, "NATS")?;
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                bail!("nats-server did not listen on port {port} in 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nats {
            port,
            child: std::sync::Mutex::new(child),
            dir,
        })
    }

    /// The URL servers are given (`--nats`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its clients see the connection drop).
    pub fn stop(&self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP/1.1 service on loopback that answers every request `slow` after
/// `delay`, on tokio: thousands of requests can wait at once without a
/// thread each. Counts requests received and answered.
pub struct SlowHttp {
    pub port: u16,
    pub received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowHttp {
    /// Starts the service on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, delay: std::time::Duration) -> SlowHttp {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, a) = (received.clone(), answered.clone());
        rt.spawn(async move {
            // Bounded: a test makes at most this many connections.
            for _ in 0..20_000 {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Keep-alive: one request after another, at most 10,000.
                    for _ in 0..10_000 {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                        buf.drain(..end + 4);
                        r.fetch_add(1, SeqCst);
                        tokio::time::sleep(delay).await;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow";
                        if conn.write_all(reply).await.is_err() {
                            return;
                        }
                        a.fetch_add(1, SeqCst);
                    }
                });
            }
        });
        SlowHttp {
            port,
            received,
            answered,
        }
    }
}

/// An HTTPS service speaking HTTP/2 only (ALPN `h2`, hyper's server) on
/// tokio: counts TLS connections and the requests that came over HTTP/2,
/// and answers `hi`.
pub struct H2Https {
    pub port: u16,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub http2_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl H2Https {
    /// Starts the service on `rt` with `ca`'s server certificate.
    pub fn start(rt: &tokio::runtime::Runtime, ca: &TestCa) -> H2Https {
        use std::sync::atomic::Ordering::SeqCst;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(ca.chain.clone(), key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let http2_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, h) = (connections.clone(), http2_requests.clone());
        rt.spawn(async move {
            for _ in 0..1000 {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, c, h) = (acceptor.clone(), c.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    c.fetch_add(1, SeqCst);
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            if req.version() == hyper::Version::HTTP_2 {
                                h.fetch_add(1, SeqCst);
                            }
                            async {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::from_static(
                                        b"hi",
                                    )),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        H2Https {
            port,
            connections,
            http2_requests,
        }
    }
}

/// The Python of the test peers' venv (scripts/setup.sh makes it).
pub fn peers_python() -> PathBuf {
    root().join("target/sdk-tools/peers-venv/bin/python")
}

/// A receiving SMTP server (aiosmtpd, tests/peers/smtp_sink.py): what it
/// accepts lands in `dir` as NNNN.eml with NNNN.json (the envelope).
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl SmtpSink {
    /// Starts it; `defer` first messages are answered 451.
    pub fn start(dir: &Path, defer: u32) -> SmtpSink {
        let port = free_port();
        let mut child = Command::new(peers_python())
            .arg(root().join("tests/peers/smtp_sink.py"))
            .args([port.to_string(), dir.display().to_string()])
            .args(["--defer", &defer.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("aiosmtpd (run scripts/setup.sh)");
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        assert!(line.starts_with("listening"), "smtp sink: {line:?}");
        SmtpSink {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// The messages received so far, in order (raw text).
    pub fn messages(&self) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Waits (at most `limit`) until `n` messages have arrived.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n || t0.elapsed() > limit {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw email's text with quoted-printable soft line breaks undone.
pub fn unfolded(raw: &str) -> String {
    raw.replace("=\r\n", "").replace("=\n", "")
}

/// The value of a header in a raw email (first occurrence, unfolded).
pub fn header(raw: &str, name: &str) -> Option<String> {
    let mut lines = raw.split("\r\n").flat_map(|l| l.split('\n'));
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let mut value: Option<String> = None;
    for l in lines.by_ref() {
        if l.is_empty() {
            break;
        }
        match &mut value {
            Some(v) if l.starts_with([' ', '\t']) => {
                v.push(' ');
                v.push_str(l.trim());
            }
            Some(_) => break,
            None if l.to_ascii_lowercase().starts_with(&prefix) => {
                value = Some(l[prefix.len()..].trim().to_string());
            }
            None => {}
        }
    }
    value
}

/// Headless Chromium (Debian's) driven through playwright-core by
/// tests/peers/browser/browser.mjs (scripts/setup.sh installs both).
pub struct Browser {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Browser {
    /// Starts the browser (no page yet).
    pub fn start() -> Browser {
        Browser::start_with(&[])
    }

    /// Starts the browser with a microphone that plays `wav` (looped) and
    /// is granted to pages without asking, and audio that plays without a
    /// gesture: for the softphone.
    pub fn with_microphone(wav: &std::path::Path) -> Browser {
        Browser::start_with(&[
            "--use-fake-ui-for-media-stream".to_string(),
            "--use-fake-device-for-media-stream".to_string(),
            format!("--use-file-for-fake-audio-capture={}", wav.display()),
            "--autoplay-policy=no-user-gesture-required".to_string(),
        ])
    }

    /// Starts the browser with these extra Chromium flags.
    pub fn start_with(args: &[String]) -> Browser {
        let dir = root().join("target/sdk-tools/peers-node");
        let mut child = Command::new("node")
            .arg(dir.join("browser.mjs"))
            .env(
                "BROWSER_ARGS",
                serde_json::to_string(args).unwrap_or_default(),
            )
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node with playwright-core (run scripts/setup.sh)");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Browser {
            child,
            stdin,
            stdout,
        }
    }

    /// Runs one command; its value, or the driver's error.
    pub fn run(&mut self, cmd: Value) -> Result<Value, String> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{cmd}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
        if v["ok"] == true {
            Ok(v["value"].clone())
        } else {
            Err(format!("{} (page log: {})", v["error"], v["log"]))
        }
    }

    /// Runs a command that must succeed.
    pub fn must(&mut self, cmd: Value) -> Value {
        let what = cmd.to_string();
        self.run(cmd)
            .unwrap_or_else(|e| panic!("browser: {what}: {e}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signs the web console in `b` in to `tenant` with `token` and waits
/// for its `page` (`desk` or `wall`) and its live event stream.
pub fn console_sign_in(b: &mut Browser, s: &Server, tenant: &str, token: &str, page: &str) {
    b.must(
        serde_json::json!({"op": "open", "url": format!("http://127.0.0.1:{}/console/", s.port)}),
    );
    b.must(serde_json::json!({"op": "fill", "sel": "[data-pb=tenant]", "text": tenant}));
    b.must(serde_json::json!({"op": "fill", "sel": "[data-pb=token]", "text": token}));
    b.must(serde_json::json!({"op": "click", "sel": "[data-pb=signin]"}));
    b.must(serde_json::json!({"op": "wait", "js": format!("document.querySelector('[data-pb={page}]') && document.querySelector('[data-pb=link]').textContent === 'live'")}));
}

/// The text of the first element matching `sel` on the page ("" if none).
pub fn text_of(b: &mut Browser, sel: &str) -> String {
    b.must(serde_json::json!({"op": "eval", "js": format!("(document.querySelector({}) || {{}}).textContent || ''", serde_json::json!(sel))}))
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A static web site on loopback (Python's http.server over a temporary
/// directory): a customer's site that embeds a widget.
pub struct StaticSite {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl StaticSite {
    /// Serves `files` (name, content).
    pub fn start(files: &[(&str, String)]) -> StaticSite {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "http.server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        StaticSite {
            child,
            port,
            _dir: dir,
        }
    }

    /// Its origin.
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `f` comes true within `limit` (checked every 50 ms).
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The freight company's MIS/GPS service (for [`TinyHttp`]): waybill 123
/// is in transit near Vilnius, others are unknown.
pub fn waybills(path: &str) -> (u16, String) {
    if path == "/waybills/123" {
        (
            200,
            r#"{"status":"in transit","location":"near Vilnius"}"#.into(),
        )
    } else {
        (404, r#"{"error":"no such waybill"}"#.into())
    }
}

/// Deploys the logistics hotline (examples/logistics-hotline) to `tenant`
/// as flow `hotline`, allowed to reach the MIS on `mis_port`.
pub fn deploy_hotline(s: &Server, tenant: &str, key: &str, mis_port: u16) {
    let doc = std::fs::read(root().join("examples/logistics-hotline/flow.json")).unwrap();
    let d = s
        .call(
            "POST",
            &format!("/v1/tenants/{tenant}/flows/hotline"),
            Some(key),
            Some(doc),
        )
        .unwrap();
    assert!(d.status == 200 || d.status == 201, "{d:?}");
    for (path, body) in [
        (
            "grants",
            serde_json::json!({"http": {"allow": [format!("127.0.0.1:{mis_port}")]}}),
        ),
        (
            "config",
            serde_json::json!({"mis_url": format!("http://127.0.0.1:{mis_port}")}),
        ),
    ] {
        let r = s.json(
            "PUT",
            &format!("/v1/tenants/{tenant}/plugins/hotline/{path}"),
            key,
            &body,
        );
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
}

/// Queue `agents` and agent `agent` of `tenant` with `capacity` (per
/// channel), available; returns the agent's token.
pub fn available_agent(
    s: &Server,
    tenant: &str,
    key: &str,
    agent: &str,
    capacity: Value,
) -> String {
    let base = format!("/v1/tenants/{tenant}");
    let q = s.json(
        "PUT",
        &format!("{base}/queues/agents"),
        key,
        &serde_json::json!({}),
    );
    assert_eq!(q.status, 200, "{q:?}");
    let a = s.json(
        "PUT",
        &format!("{base}/agents/{agent}"),
        key,
        &serde_json::json!({"capacity": capacity}),
    );
    assert_eq!(a.status, 200, "{a:?}");
    let tok = s.json(
        "POST",
        &format!("{base}/agents/{agent}/token"),
        key,
        &serde_json::json!({}),
    );
    let token = tok.body["token"].as_str().unwrap().to_string();
    let p = s.json(
        "PUT",
        &format!("{base}/agents/{agent}/presence"),
        &token,
        &serde_json::json!({"state": "available"}),
    );
    assert_eq!(p.status, 204, "{p:?}");
    token
}

/// A number from the environment (a benchmark's setting), or `default`.
/// CPU time a process has used (user + system), in ms.
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks (100 a second).
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or_default();
    let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) * 10
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sets tenant secret `smpp` to `password` and SMS carrier `smsc` bound
/// to the SMSC on `port` as `test`, carrying `numbers` (empty: all).
pub fn smpp_carrier(
    s: &Server,
    tenant: &str,
    key: &str,
    port: u16,
    password: &str,
    numbers: &[&str],
) {
    let a = s.json(
        "PUT",
        &format!("/v1/tenants/{tenant}/secrets/smpp"),
        key,
        &serde_json::json!({"value": password}),
    );
    assert!(a.status == 200 || a.status == 204, "{a:?}");
    let a = s.json(
        "PUT",
        &format!("/v1/tenants/{tenant}/sms-carriers/smsc"),
        key,
        &serde_json::json!({"numbers": numbers, "smpp": {"host": "127.0.0.1", "port": port,
            "system_id": "test", "password_secret": "smpp", "window": 10, "enquire_link_secs": 5}}),
    );
    assert_eq!(a.status, 200, "{a:?}");
}

/// An SMSC: node-smpp's server scripted by tests/peers/smsc/smsc.js
/// (scripts/setup.sh installs both). Its events are kept in order.
pub struct Smsc {
    child: Child,
    stdin: std::sync::Arc<std::sync::Mutex<std::process::ChildStdin>>,
    events: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Smsc {
    /// Starts an SMSC accepting binds of `system_id` with `password`.
    pub fn start(system_id: &str, password: &str) -> Smsc {
        use std::io::BufRead;
        let dir = root().join("target/sdk-tools/peers-smsc");
        let mut child = Command::new("node")
            .arg(dir.join("smsc.js"))
            .args([system_id, password])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node with smpp (run scripts/setup.sh)");
        let stdin = std::sync::Arc::new(std::sync::Mutex::new(child.stdin.take().unwrap()));
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let mut smsc = Smsc {
            child,
            stdin,
            events,
            port: 0,
        };
        let listening = smsc.wait_for(Duration::from_secs(20), |e| e["ev"] == "listening");
        smsc.port = listening["port"].as_u64().unwrap() as u16;
        smsc
    }

    /// Sends a command (see smsc.js).
    pub fn send(&mut self, cmd: Value) {
        (self.commands())(cmd);
    }

    /// A sender of commands for another thread.
    pub fn commands(&self) -> impl Fn(Value) + Send + 'static {
        let stdin = self.stdin.clone();
        move |cmd| {
            use std::io::Write;
            writeln!(stdin.lock().unwrap(), "{cmd}").unwrap();
        }
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// The events named `ev` so far.
    pub fn named(&self, ev: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["ev"] == ev)
            .collect()
    }

    /// Waits for the first event that matches `f`; panics after `limit`.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(&f) {
                return e;
            }
            assert!(
                t0.elapsed() < limit,
                "the SMSC saw no such event; it saw {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` events named `ev` were seen; returns them.
    pub fn wait_count(&self, ev: &str, n: usize, limit: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let got = self.named(ev);
            if got.len() >= n {
                return got;
            }
            assert!(
                t0.elapsed() < limit,
                "the SMSC saw {} of {n} {ev} events: {:?}",
                got.len(),
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Smsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free even port for SIPp's RTP.
pub fn free_media_port() -> u16 {
    // SIPp binds four UDP ports from here (audio RTP and RTCP, video RTP
    // and RTCP): all four must be free, not only the first.
    loop {
        let p = free_sip_port();
        if !p.is_multiple_of(2) || p >= 65000 {
            continue;
        }
        let held: Vec<_> = (p..p + 4)
            .map(|q| std::net::UdpSocket::bind(("127.0.0.1", q)))
            .collect();
        if held.iter().all(|h| h.is_ok()) {
            return p;
        }
    }
}

/// Runs a SIPp scenario file against the server, as one call; on failure
/// the error carries SIPp's summary and error log.
pub fn run_sipp(
    server: &Server,
    dir: &Path,
    xml: &Path,
    service: &str,
    transport: &str,
    extra: &[&str],
) -> Result<()> {
    let scenario = xml
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A port picked free can be taken by a parallel test before SIPp
    // binds it: SIPp then stops before making any call, and runs again
    // on other ports.
    for attempt in 0.. {
        let (local, media) = (free_sip_port().to_string(), free_media_port().to_string());
        // Defaults for one call from 127.0.0.1, unless `extra` says otherwise.
        let mut defaults = vec!["-s", service, "-t", transport, "-mp", &media];
        if !extra.contains(&"-p") {
            defaults.extend(["-p", &local]);
        }
        if !extra.contains(&"-m") {
            defaults.extend(["-m", "1"]);
        }
        if !extra.contains(&"-i") {
            defaults.extend(["-i", "127.0.0.1"]);
        }
        let out = Command::new("sipp")
            .current_dir(dir)
            .arg("-sf")
            .arg(xml)
            .args(defaults)
            .args(["-timeout", "60s", "-trace_err", "-nostdin"])
            .args(extra)
            .arg(format!("127.0.0.1:{}", server.sip_port))
            .output()
            .context("running sipp (scripts/setup.sh installs sip-tester)")?;
        if out.status.success() {
            return Ok(());
        }
        let mut errors = String::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_name().to_string_lossy().contains("errors") {
                errors.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let port_taken = errors.contains("errno = 98") || stdout.contains("errno = 98");
        let idle = stdout.contains("Outgoing calls created |        0")
            && stdout.contains("Incoming calls created |        0");
        if port_taken && idle && attempt < 3 {
            for e in std::fs::read_dir(dir)?.flatten() {
                if e.file_name().to_string_lossy().contains("errors") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            continue;
        }
        bail!(
            "sipp {scenario} failed ({}):\n{}\n{errors}",
            out.status,
            stdout
                .lines()
                .filter(|l| l.contains("call") || l.contains("rror"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    unreachable!("the loop returns or fails")
}

/// A DNS server of this test binary's own for the mail checks (Debian's
/// dnsmasq, on a free loopback port, started once and stopped by a
/// watchdog when the binary exits). It answers for one zone and says
/// NXDOMAIN for every other name:
///
/// - `signed.test`: SPF `v=spf1 ip4:127.0.0.1 -all`, DMARC `p=reject`,
///   and the DKIM key of selector `pb` (an RSA key made at start; its
///   private half is [`Dns::dkim_key`], for the tests to sign with);
/// - `relaxed.test`: SPF `~all` and DMARC `p=none`.
pub struct Dns {
    /// `127.0.0.1:PORT`, as `--smtp-auth-dns` takes it.
    pub addr: String,
    /// The PEM file of `signed.test`'s DKIM key (PKCS#1).
    pub dkim_key: PathBuf,
}

/// Kills `child` and removes `dir` once this test binary is gone (a
/// watchdog shell), unless the child is gone first.
fn watch(child: &Child, dir: &Path, what: &str) -> Result<()> {
    let watchdog = format!(
        "while [ -d /proc/{pid} ]; do [ -d /proc/{c} ] || exit 0; sleep 1; done; kill {c}; rm -rf {dir}",
        pid = std::process::id(),
        c = child.id(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {what} watchdog"))?;
    Ok(())
}

static DNS: std::sync::OnceLock<Dns> = std::sync::OnceLock::new();

/// The test binary's DNS server (started on first use).
pub fn dns() -> &'static Dns {
    DNS.get_or_init(|| Dns::start().expect("starting dnsmasq"))
}

impl Dns {
    fn start() -> Result<Dns> {
        let dir = std::env::temp_dir().join(format!("plugboard-dns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("dkim.pem");
        run(
            Command::new("openssl")
                .args(["genrsa", "-traditional", "-out"])
                .arg(&key)
                .arg("2048"),
            "openssl genrsa",
        )?;
        let der = Command::new("openssl")
            .args(["rsa", "-pubout", "-outform", "DER", "-in"])
            .arg(&key)
            .stderr(Stdio::null())
            .output()
            .context("openssl rsa")?;
        let public = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&der.stdout)
        };
        // TXT strings are at most 255 bytes: the key goes in pieces.
        let record = format!("v=DKIM1; k=rsa; p={public}");
        let pieces: Vec<String> = record
            .as_bytes()
            .chunks(200)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        let conf = dir.join("zone.conf");
        std::fs::write(
            &conf,
            format!(
                "txt-record=signed.test,\"v=spf1 ip4:127.0.0.1 -all\"\n\
                 txt-record=_dmarc.signed.test,\"v=DMARC1; p=reject\"\n\
                 txt-record=pb._domainkey.signed.test,{}\n\
                 txt-record=relaxed.test,\"v=spf1 ~all\"\n\
                 txt-record=_dmarc.relaxed.test,\"v=DMARC1; p=none\"\n",
                pieces.join(",")
            ),
        )?;
        let port = free_port();
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        // Debian puts it in /usr/sbin, which is not on every PATH.
        let program = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("dnsmasq"));
        let mut child = Command::new(program)
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--port={port}"))
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--local=/#/",
            ])
            .arg(format!("--user={user}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("dnsmasq is not installed (scripts/setup.sh installs it)")?;
        watch(&child, &dir, "dnsmasq")?;
        // It listens once its TCP port takes connections.
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("dnsmasq exited at start ({status}): {err}");
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("dnsmasq did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Dns {
            addr: format!("127.0.0.1:{port}"),
            dkim_key: key,
        })
    }
}

/// Files below `dir` that contain `needle`.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(p);
            }
        }
    }
    found
}
