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

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
}

impl Server {
    /// Starts the server on `data_dir` with extra `serve` flags.
    pub fn start(data_dir: &Path, flags: &[&str]) -> Result<Server> {
        let port = free_port();
        let sip_port = free_sip_port();
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "serve".into(),
            "--http".into(),
            format!("127.0.0.1:{port}"),
            "--sip".into(),
            format!("127.0.0.1:{sip_port}"),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        Server::spawn(data_dir, &args, port, sip_port)
    }

    /// Starts the server with nothing but a config file: `config` is its
    /// text, with `{data}`, `{http}` and `{sip}` replaced by the data
    /// directory and two free ports.
    pub fn start_configured(data_dir: &Path, config: &str) -> Result<Server> {
        let port = free_port();
        let sip_port = free_sip_port();
        let text = config
            .replace("{data}", &data_dir.display().to_string())
            .replace("{http}", &port.to_string())
            .replace("{sip}", &sip_port.to_string());
        let file = data_dir.with_extension("toml");
        std::fs::write(&file, text)?;
        let args = [
            "serve".to_string(),
            "--config".into(),
            file.display().to_string(),
        ];
        Server::spawn(data_dir, &args, port, sip_port)
    }

    fn spawn(data_dir: &Path, args: &[String], port: u16, sip_port: u16) -> Result<Server> {
        let admin = "test-admin-token".to_string();
        let log = std::fs::File::create(data_dir.with_extension("log")).context("log file")?;
        let child = Command::new(binary())
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
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut s = Server {
            child,
            port,
            sip_port,
            data_dir: data_dir.to_path_buf(),
            admin,
            agent,
        };
        let t0 = Instant::now();
        loop {
            if let Ok(a) = s.call("GET", "/healthz", None, None)
                && a.status == 200
            {
                return Ok(s);
            }
            if let Some(status) = s.child.try_wait()? {
                bail!("server exited early: {status}");
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
        let text = resp.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer { status, body })
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
