//! `plugboard`: the server (`plugboard serve`) and a thin command-line
//! client of its HTTP API (`tenant`, `plugin`, `address`, `flow`).

mod config;
mod scaffold;
mod telemetry;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use config::ConfigFile;
use plugboard_engine::Engine;
use plugboard_engine::secrets::SecretKey;
use plugboard_host::fetch::NetPolicy;
use plugboard_host::{HostConfig, Limits, PluginHost};
use plugboard_store::{PgStore, SledStore, Store};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "plugboard",
    version,
    about = "Programmable contact-centre platform"
)]
struct Cli {
    /// API base URL (client commands).
    #[arg(
        long,
        global = true,
        env = "PLUGBOARD_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Bearer token (client commands): the admin token or a tenant API key.
    /// Defaults to the admin token file in --data-dir.
    #[arg(long, global = true, env = "PLUGBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory (store, compile cache, admin token) [default: data,
    /// or `data_dir` in the config file].
    #[arg(long, global = true, env = "PLUGBOARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Flags of `plugboard serve`. Each overrides the same key of the config
/// file; unset in both, the default in brackets applies.
#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML; see plugboard.example.toml): settings and
    /// carrier trunks.
    #[arg(long, env = "PLUGBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "PLUGBOARD_HTTP")]
    http: Option<SocketAddr>,
    /// The store: `sled` (embedded, in DATA_DIR/store) or a PostgreSQL URL
    /// (`postgres://user@host:port/db`) shared by several nodes
    /// [default: sled].
    #[arg(long, env = "PLUGBOARD_STORE")]
    store: Option<String>,
    /// The embedded store's page cache, MiB: what of the data it keeps in
    /// memory [default: 16].
    #[arg(long, env = "PLUGBOARD_STORE_CACHE_MIB")]
    store_cache_mib: Option<u64>,
    /// Log lines as `text` or `json` (one object a line, with the span
    /// fields such as tenant and interaction) [default: text].
    #[arg(long, env = "PLUGBOARD_LOG_FORMAT")]
    log_format: Option<String>,
    /// Export traces (a call's flow events, plugin calls, host calls and
    /// store writes as spans) over OTLP/HTTP to this URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces` [default: none].
    #[arg(long, env = "PLUGBOARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// NATS server URL (`nats://host:4222`; several comma-separated) through
    /// which nodes on one PostgreSQL store share their events and plugin
    /// deploys [default: none: this node's events stay on it].
    #[arg(long, env = "PLUGBOARD_NATS")]
    nats: Option<String>,
    /// This node's id among the nodes on NATS [default: random at each start].
    #[arg(long, env = "PLUGBOARD_NODE_ID")]
    node_id: Option<String>,
    /// CPU deadline per plugin invocation, ms [default: 50].
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Linear memory cap per plugin instance, MiB [default: 64].
    #[arg(long)]
    memory_mib: Option<usize>,
    /// Plugin instances that may run at once [default: 64].
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Plugin versions kept compiled in memory at most; the one used
    /// longest ago is dropped past it [default: 256].
    #[arg(long, env = "PLUGBOARD_MAX_LOADED_PLUGINS")]
    max_loaded_plugins: Option<usize>,
    /// The flow-graph component that runs flow documents [default:
    /// `flow_graph.wasm` from the build's `wasm32-wasip2/release` directory].
    #[arg(long, env = "PLUGBOARD_FLOW_GRAPH")]
    flow_graph: Option<PathBuf>,
    /// Compiled-component cache, may be shared by several servers
    /// [default: DATA_DIR/cache].
    #[arg(long, env = "PLUGBOARD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// A network tenants' outbound HTTP may reach besides the public
    /// internet (repeat, or comma-separate in the variable), e.g.
    /// `127.0.0.1/32` [default: none: loopback, private, link-local and
    /// metadata addresses are refused].
    #[arg(
        long = "allow-network",
        env = "PLUGBOARD_ALLOW_NETWORKS",
        value_delimiter = ','
    )]
    allow_networks: Vec<String>,
    /// SIP listen address, UDP and TCP, or `off` for no voice channel
    /// [default: 127.0.0.1:5060].
    #[arg(long, env = "PLUGBOARD_SIP")]
    sip: Option<String>,
    /// RTP port range, LO-HI; even ports RTP, odd RTCP [default: 20000-23999].
    #[arg(long, env = "PLUGBOARD_RTP_PORTS")]
    rtp_ports: Option<String>,
    /// Call legs this node takes at once, across tenants (each holds an
    /// RTP port pair) [default: every pair of the RTP range].
    #[arg(long, env = "PLUGBOARD_MAX_CALLS")]
    max_calls: Option<usize>,
    /// Address to put in SDP and Contact [default: the SIP address].
    #[arg(long, env = "PLUGBOARD_SIP_PUBLIC_IP")]
    sip_public_ip: Option<std::net::IpAddr>,
    /// Ring (180 Ringing) this long before answering a call, ms [default: 0].
    #[arg(long)]
    answer_delay_ms: Option<u64>,
    /// Challenge with MD5 before SHA-256 (for phones that read only the
    /// first challenge).
    #[arg(long)]
    digest_md5_first: bool,
    /// Challenge with MD5 only (for phones that refuse a request when any
    /// challenge names an algorithm they lack, such as baresip 1.0).
    #[arg(long)]
    digest_md5_only: bool,
    /// Agents' browser softphones speak Opus before G.711 (better on lossy
    /// networks; each frame is coded, where G.711 goes to the voice core as
    /// it is).
    #[arg(long)]
    softphone_opus: bool,
    /// The espeak-ng program for built-in text-to-speech [default: espeak-ng].
    #[arg(long, env = "PLUGBOARD_ESPEAK")]
    espeak: Option<PathBuf>,
    /// Inbound SMTP listen address, or `off` for no inbound email
    /// [default: off].
    #[arg(long, env = "PLUGBOARD_SMTP")]
    smtp: Option<String>,
    /// The host name the SMTP server greets with [default: localhost].
    #[arg(long, env = "PLUGBOARD_SMTP_HOSTNAME")]
    smtp_hostname: Option<String>,
    /// Certificate chain (PEM) offered with STARTTLS [default: none, no
    /// STARTTLS].
    #[arg(long, env = "PLUGBOARD_SMTP_CERT")]
    smtp_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "PLUGBOARD_SMTP_KEY")]
    smtp_key: Option<PathBuf>,
    /// Largest inbound message, bytes [default: 26214400].
    #[arg(long)]
    smtp_max_size: Option<usize>,
    /// SMTP connections at once from one IP address [default: 20].
    #[arg(long)]
    smtp_max_per_ip: Option<usize>,
    /// Where the DNS answers for the SPF, DKIM and DMARC checks of inbound
    /// mail come from: `system` (/etc/resolv.conf), a DNS server's
    /// `IP:PORT`, or `off` for no checks [default: system].
    #[arg(long, env = "PLUGBOARD_SMTP_AUTH_DNS")]
    smtp_auth_dns: Option<String>,
    /// The smart host email replies go out through: `smtp://host:port`,
    /// `smtp://host:port?tls=required` (STARTTLS), `smtps://user:pass@host:port`
    /// [default: none: replies wait in the outbox].
    #[arg(long, env = "PLUGBOARD_SMTP_RELAY", hide_env_values = true)]
    smtp_relay: Option<String>,
    /// The built chat widget, `widget.js` [default: `web/widget.js` next to
    /// this build (`target/`) or under the current directory's `target/`].
    #[arg(long, env = "PLUGBOARD_CHAT_WIDGET")]
    chat_widget: Option<PathBuf>,
    /// The built web console (agent desktop, supervisor wall), a
    /// directory with `index.html` and `console.js`, served at `/console/`
    /// [default: `web/console` next to this build (`target/`) or under the
    /// current directory's `target/`].
    #[arg(long, env = "PLUGBOARD_CONSOLE")]
    console: Option<PathBuf>,
    /// Chat widget connections at once from one IP address [default: 50].
    #[arg(long)]
    chat_max_per_ip: Option<usize>,
    /// Chat messages a second per visitor, after a burst of 10 [default: 1].
    #[arg(long)]
    chat_rate: Option<f64>,
    /// Chat messages a second per IP address, after a burst of 100
    /// [default: 20].
    #[arg(long)]
    chat_ip_rate: Option<f64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Manage plugins.
    Plugin {
        #[command(subcommand)]
        cmd: PluginCmd,
    },
    /// Manage addresses.
    Address {
        #[command(subcommand)]
        cmd: AddressCmd,
    },
    /// Work with flows.
    Flow {
        #[command(subcommand)]
        cmd: FlowCmd,
    },
    /// Read and answer conversations (chat, email, SMS).
    Conversation {
        #[command(subcommand)]
        cmd: ConversationCmd,
    },
    /// Look up and merge customers.
    Customer {
        #[command(subcommand)]
        cmd: CustomerCmd,
    },
    /// Manage SMS carriers (SMPP or HTTP).
    Carrier {
        #[command(subcommand)]
        cmd: CarrierCmd,
    },
    /// Save a consistent copy of the running server's embedded store (admin
    /// token; calls and messages go on meanwhile).
    Backup {
        /// Where to write it (written as FILE.part, renamed when complete).
        file: PathBuf,
    },
    /// Bring a backup back into a new data directory (`--data-dir`), with
    /// no server running on it; then start `plugboard serve` there. Tenant
    /// secrets need the old node's `secret_key` (or PLUGBOARD_SECRET_KEY).
    Restore {
        /// The backup file.
        file: PathBuf,
    },
    /// Send a fax, or fetch one.
    Fax {
        #[command(subcommand)]
        cmd: FaxCmd,
    },
}

#[derive(Subcommand)]
enum FaxCmd {
    /// Send a PDF or TIFF as a fax, through the tenant's trunk. Prints the
    /// fax's message; its status (sent, failed) follows on the event
    /// stream and in `plugboard fax get`.
    Send {
        /// Tenant id.
        tenant: String,
        /// The tenant's fax address it is sent from.
        #[arg(long)]
        from: String,
        /// The number to fax.
        #[arg(long)]
        to: String,
        /// The document (PDF or TIFF).
        file: PathBuf,
    },
    /// The tenant's faxes, sent and received, newest first.
    List {
        /// Tenant id.
        tenant: String,
    },
    /// A fax conversation's messages (pages, station id, outcome);
    /// `--pdf FILE` saves its PDF.
    Get {
        /// Tenant id.
        tenant: String,
        /// Interaction id of the fax.
        id: String,
        /// Where to save the fax's PDF.
        #[arg(long)]
        pdf: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CarrierCmd {
    /// Create or replace a carrier from its JSON settings (or @FILE), e.g.
    /// '{"numbers":["15550160"],"smpp":{"host":"smsc.example","port":2775,
    /// "system_id":"acme","password_secret":"smpp"}}'.
    Set {
        /// Tenant id.
        tenant: String,
        /// Carrier name.
        name: String,
        /// Its settings.
        json: String,
    },
    /// The tenant's carriers, each with its link's state.
    List {
        /// Tenant id.
        tenant: String,
    },
    /// Delete a carrier (its SMPP link unbinds).
    Delete {
        /// Tenant id.
        tenant: String,
        /// Carrier name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ConversationCmd {
    /// A conversation's messages, oldest first.
    Messages {
        /// Tenant id.
        tenant: String,
        /// Interaction id.
        id: String,
    },
    /// Write into a conversation; it leaves on the conversation's channel.
    Reply {
        /// Tenant id.
        tenant: String,
        /// Interaction id.
        id: String,
        /// The text.
        text: String,
        /// Subject (email).
        #[arg(long)]
        subject: Option<String>,
    },
}

#[derive(Subcommand)]
enum CustomerCmd {
    /// The customer an address belongs to.
    Find {
        /// Tenant id.
        tenant: String,
        /// The address (phone number, email address, chat visitor id).
        address: String,
        /// Its channel: voice, chat, email, sms or fax.
        #[arg(long, default_value = "email")]
        channel: String,
    },
    /// A customer and their conversations on every channel, oldest first.
    History {
        /// Tenant id.
        tenant: String,
        /// Customer id.
        id: String,
    },
    /// Merge customer FROM into ID (they are the same person).
    Merge {
        /// Tenant id.
        tenant: String,
        /// The customer that stays.
        id: String,
        /// The customer merged into it.
        from: String,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant (admin); prints its API key.
    Create {
        /// Tenant id.
        id: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// IANA time zone.
        #[arg(long)]
        time_zone: Option<String>,
    },
    /// List tenants (admin).
    List,
    /// Show a tenant's limits and what it uses now; with JSON, set them
    /// (admin), e.g. '{"calls":50,"calls_per_second":5,"agents":20}'.
    Limits {
        /// Tenant id.
        id: String,
        /// Limits JSON: deadline_ms, memory_mib, output_kib,
        /// max_concurrent, calls, calls_per_second, chats,
        /// messages_per_second, agents, plugins.
        json: Option<String>,
    },
    /// A tenant's usage for billing (its key or the admin token).
    Usage {
        /// Tenant id.
        id: String,
        #[command(flatten)]
        period: UsagePeriod,
    },
    /// Every tenant's usage (admin).
    UsageAll {
        #[command(flatten)]
        period: UsagePeriod,
    },
}

/// The period of a usage report.
#[derive(clap::Args)]
struct UsagePeriod {
    /// Start: ms since the epoch or an RFC 3339 time [default: this UTC month].
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive) [default: now].
    #[arg(long)]
    to: Option<String>,
    /// hour, day or total [default: day].
    #[arg(long)]
    granularity: Option<String>,
    /// CSV instead of JSON.
    #[arg(long)]
    csv: bool,
}

impl UsagePeriod {
    fn query(&self) -> String {
        let mut q = vec![format!("format={}", if self.csv { "csv" } else { "json" })];
        for (k, v) in [
            ("from", &self.from),
            ("to", &self.to),
            ("granularity", &self.granularity),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", enc(v)));
            }
        }
        q.join("&")
    }
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Start a plugin project (local; nothing is sent to the server).
    New {
        /// Plugin name (a-z, 0-9, '-', '_').
        name: String,
        /// Language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: scaffold::Lang,
        /// Plugin world: flow, router, tts or crm.
        #[arg(long, value_parser = scaffold::parse_kind, default_value = "flow")]
        kind: plugboard_core::PluginKind,
        /// Directory to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The Plugboard checkout holding the SDKs (default: the one this binary was built in).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Deploy a component as the next version of a plugin.
    Deploy {
        /// Tenant id.
        tenant: String,
        /// Plugin name.
        name: String,
        /// The component (.wasm).
        file: PathBuf,
    },
    /// List a tenant's plugins.
    List {
        /// Tenant id.
        tenant: String,
    },
    /// Roll back to the previous (or a given) version.
    Rollback {
        /// Tenant id.
        tenant: String,
        /// Plugin name.
        name: String,
        /// Version to activate.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Set a plugin's grants, e.g. '{"http":{"allow":["127.0.0.1:8090"]},"kv":true}'.
    Grants {
        /// Tenant id.
        tenant: String,
        /// Plugin name.
        name: String,
        /// Grants JSON.
        json: String,
    },
    /// Set a plugin's configuration (a JSON object).
    Config {
        /// Tenant id.
        tenant: String,
        /// Plugin name.
        name: String,
        /// Config JSON.
        json: String,
    },
}

#[derive(Subcommand)]
enum AddressCmd {
    /// Map an address (number, email, chat id) to a flow.
    Set {
        /// Tenant id.
        tenant: String,
        /// The address.
        address: String,
        /// Channel: voice, chat, email, sms or fax.
        #[arg(long, default_value = "voice")]
        channel: String,
        /// Flow plugin name.
        #[arg(long)]
        flow: String,
    },
}

#[derive(Subcommand)]
enum FlowCmd {
    /// Run a flow against scripted events and print every step.
    Simulate {
        /// Tenant id.
        tenant: String,
        /// Flow plugin name.
        flow: String,
        /// Events: a JSON array, or @FILE. `started` is sent first if missing.
        #[arg(long, default_value = "[]")]
        events: String,
        /// Channel.
        #[arg(long, default_value = "voice")]
        channel: String,
        /// Customer address.
        #[arg(long, default_value = "simulator")]
        from: String,
        /// Tenant address.
        #[arg(long, default_value = "")]
        to: String,
        /// Pin the clock (ms since the Unix epoch) for time-of-day conditions.
        #[arg(long)]
        now_ms: Option<u64>,
    },
    /// Deploy a flow document (JSON) as the next version of a flow.
    Deploy {
        /// Tenant id.
        tenant: String,
        /// The flow document.
        file: PathBuf,
        /// Flow name (default: the file name without `.json`).
        #[arg(long)]
        name: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => serve(cli.data_dir, *args),
        Cmd::Plugin {
            cmd:
                PluginCmd::New {
                    name,
                    lang,
                    kind,
                    dir,
                    sdk,
                },
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = scaffold::sdk_root(sdk)?;
            let (files, commands) = scaffold::scaffold(lang, kind, &name, &dir, &sdk)?;
            for f in files {
                eprintln!("wrote {}", f.display());
            }
            println!("Build and deploy:");
            for c in commands {
                println!("  {c}");
            }
            Ok(())
        }
        Cmd::Restore { file } => {
            let data_dir = cli.data_dir.unwrap_or_else(|| PathBuf::from("data"));
            let mut input = std::io::BufReader::new(
                std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?,
            );
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let s = SledStore::restore(&data_dir.join("store"), &mut input)
                .with_context(|| format!("restoring {}", file.display()))?;
            println!(
                "{}",
                json!({"restored": data_dir.join("store").display().to_string(), "trees": s.trees, "keys": s.keys, "bytes": s.bytes})
            );
            Ok(())
        }
        cmd => {
            let data_dir = cli.data_dir.unwrap_or_else(|| PathBuf::from("data"));
            let client = Client::new(&cli.url, cli.token, &data_dir)?;
            run_client(&client, cmd)
        }
    }
}

/// NATS server URLs without their credentials (a user alone is a token).
fn redact_nats(urls: &str) -> String {
    urls.split(',')
        .map(|url| plugboard_core::redact_url(url, false))
        .collect::<Vec<_>>()
        .join(",")
}

/// The admin token: `PLUGBOARD_ADMIN_TOKEN`, else the one in the data dir,
/// else a new one written there (readable by the owner only).
fn admin_token(data_dir: &Path) -> Result<String> {
    kept_secret(
        "PLUGBOARD_ADMIN_TOKEN",
        &data_dir.join("admin_token"),
        || {
            let mut b = [0u8; 24];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random: {e}"))?;
            Ok(format!("pba_{}", hex::encode(b)))
        },
    )
}

/// The key tenants' secrets are sealed with: `PLUGBOARD_SECRET_KEY` (64
/// hex digits; every node on one store needs the same), else
/// `DATA_DIR/secret_key`, generated at first start.
fn secret_key(data_dir: &Path) -> Result<SecretKey> {
    let hex = kept_secret("PLUGBOARD_SECRET_KEY", &data_dir.join("secret_key"), || {
        Ok(SecretKey::generate()?.1)
    })?;
    SecretKey::from_hex(&hex).context("PLUGBOARD_SECRET_KEY or secret_key")
}

/// A value from the environment, else from a file in the data directory,
/// else generated and written there (mode 0600).
fn kept_secret(
    var: &str,
    path: &Path,
    generate: impl FnOnce() -> Result<String>,
) -> Result<String> {
    if let Ok(t) = std::env::var(var)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    if let Ok(t) = std::fs::read_to_string(path) {
        return Ok(t.trim().to_string());
    }
    let value = generate()?;
    std::fs::write(path, &value).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!("generated {}", path.display());
    Ok(value)
}

/// The flow-graph component: the given file, else `flow_graph.wasm` next
/// to this build (`target/wasm32-wasip2/release/`) or under the current
/// directory's `target/`.
fn flow_graph_component(given: Option<PathBuf>) -> Result<Option<(PathBuf, Vec<u8>)>> {
    if let Some(p) = given {
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        return Ok(Some((p, bytes)));
    }
    Ok(built("wasm32-wasip2/release/flow_graph.wasm")
        .into_iter()
        .find_map(|p| std::fs::read(&p).ok().map(|b| (p, b))))
}

/// Where a file built by the README's commands may be: `rel` in the
/// target directory of this build (`target/`, the executable's
/// grandparent), then under the current directory's `target/`.
fn built(rel: &str) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe.parent().and_then(Path::parent)
    {
        candidates.push(target.join(rel));
    }
    candidates.push(Path::new("target").join(rel));
    candidates
}

/// The chat channel's settings (flags over `[chat]`).
fn chat_settings(file: &config::ChatSection, args: &ServeArgs) -> plugboard_chat::ChatConfig {
    let widget_js = args
        .chat_widget
        .clone()
        .or_else(|| file.widget.clone())
        .or_else(|| built("web/widget.js").into_iter().find(|p| p.is_file()));
    let mut c = plugboard_chat::ChatConfig {
        widget_js,
        ..Default::default()
    };
    if let Some(n) = args.chat_max_per_ip.or(file.max_per_ip) {
        c.max_per_ip = n;
    }
    if let Some(n) = file.max_connections {
        c.max_connections = n;
    }
    if let Some(r) = args.chat_rate.or(file.rate) {
        c.visitor_rate = r;
    }
    if let Some(r) = args.chat_ip_rate.or(file.ip_rate) {
        c.ip_rate = r;
    }
    c
}

/// The email channel's settings (flags over `[email]`): where SMTP
/// listens, its session limits and TLS, and the smart host; `None` when
/// SMTP is off.
fn email_settings(
    file: &config::EmailSection,
    args: &ServeArgs,
) -> Result<Option<(SocketAddr, plugboard_email::SmtpConfig, Option<String>)>> {
    let listen = args
        .smtp
        .clone()
        .or_else(|| file.smtp.clone())
        .unwrap_or_else(|| "off".into());
    if listen == "off" {
        return Ok(None);
    }
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("SMTP address {listen:?}: expected ADDR:PORT or off"))?;
    let mut config = plugboard_email::SmtpConfig::default();
    if let Some(h) = args.smtp_hostname.clone().or_else(|| file.hostname.clone()) {
        config.limits.hostname = h;
    }
    if let Some(n) = args.smtp_max_size.or(file.max_size) {
        config.limits.max_size = n;
    }
    if let Some(n) = file.max_recipients {
        config.limits.max_recipients = n;
    }
    if let Some(n) = args.smtp_max_per_ip.or(file.max_per_ip) {
        config.max_per_ip = n;
    }
    let cert = args.smtp_cert.clone().or_else(|| file.cert.clone());
    let key = args.smtp_key.clone().or_else(|| file.key.clone());
    match (cert, key) {
        (Some(c), Some(k)) => {
            let cert = std::fs::read(&c).with_context(|| format!("reading {}", c.display()))?;
            let key = std::fs::read(&k).with_context(|| format!("reading {}", k.display()))?;
            config.tls = Some(plugboard_email::tls_config(&cert, &key)?);
        }
        (None, None) => {}
        _ => anyhow::bail!("--smtp-cert and --smtp-key go together"),
    }
    let dns: plugboard_email::AuthDns = args
        .smtp_auth_dns
        .clone()
        .or_else(|| file.auth_dns.clone())
        .unwrap_or_else(|| "system".into())
        .parse()?;
    config.auth = plugboard_email::MailAuth::new(
        &dns,
        &config.limits.hostname,
        Duration::from_secs(file.auth_timeout_s.unwrap_or(5).clamp(1, 60)),
        file.dmarc_reject.unwrap_or(true),
    )?
    .map(Arc::new);
    let relay = args.smtp_relay.clone().or_else(|| file.relay.clone());
    if let Some(url) = &relay {
        // Checked now, so a typo stops the start rather than every reply.
        plugboard_email::SmartHost::check(url)?;
    }
    Ok(Some((listen, config, relay)))
}

fn serve(data_dir: Option<PathBuf>, args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let (server, sip) = (&file.server, &file.sip);
    let email = email_settings(&file.email, &args)?;
    let chat = chat_settings(&file.chat, &args);
    let data_dir = data_dir
        .or_else(|| server.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("data"));
    let data_dir = data_dir.as_path();
    let http = args
        .http
        .or(server.http)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let deadline_ms = args.deadline_ms.or(server.deadline_ms).unwrap_or(50);
    let memory_mib = args.memory_mib.or(server.memory_mib).unwrap_or(64);
    let max_concurrent = args.max_concurrent.or(server.max_concurrent).unwrap_or(64);
    let max_loaded = args
        .max_loaded_plugins
        .or(server.max_loaded_plugins)
        .unwrap_or(plugboard_engine::loaded::DEFAULT_MAX_LOADED);
    anyhow::ensure!(
        (1..=100_000).contains(&max_loaded),
        "--max-loaded-plugins must be 1 to 100000, got {max_loaded}"
    );
    let allow_networks = if args.allow_networks.is_empty() {
        server.allow_networks.clone().unwrap_or_default()
    } else {
        args.allow_networks.clone()
    };
    let net = NetPolicy::allowing(&allow_networks).context("allow_networks")?;
    let flow_graph = args.flow_graph.or_else(|| server.flow_graph.clone());
    let cache_dir = args.cache_dir.or_else(|| server.cache_dir.clone());
    let store_url = args
        .store
        .or_else(|| server.store.clone())
        .unwrap_or_else(|| "sled".into());
    let nats_url = args
        .nats
        .or_else(|| server.nats.clone())
        .filter(|u| !u.trim().is_empty());
    let node_id = match args.node_id.or_else(|| server.node_id.clone()) {
        Some(id) => id,
        None => plugboard_engine::random_node_id()?,
    };
    let sip_listen = args
        .sip
        .or_else(|| sip.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:5060".into());
    let voice = match sip_listen.as_str() {
        "off" => None,
        addr => {
            let defaults = plugboard_voice::VoiceConfig::default();
            let rtp_ports = match args.rtp_ports.or_else(|| sip.rtp_ports.clone()) {
                Some(r) => plugboard_voice::parse_port_range(&r)
                    .map_err(|e| anyhow::anyhow!("RTP ports {r:?}: {e}"))?,
                None => defaults.rtp_ports,
            };
            Some(plugboard_voice::VoiceConfig {
                sip: addr
                    .parse()
                    .with_context(|| format!("SIP address {addr:?}: expected ADDR:PORT or off"))?,
                rtp_ports,
                public_ip: args.sip_public_ip.or(sip.public_ip),
                answer_delay: Duration::from_millis(
                    args.answer_delay_ms.or(sip.answer_delay_ms).unwrap_or(0),
                ),
                espeak: args
                    .espeak
                    .or_else(|| sip.espeak.clone())
                    .unwrap_or(defaults.espeak),
                digest_md5_first: args.digest_md5_first || sip.digest_md5_first.unwrap_or(false),
                digest_md5_only: args.digest_md5_only || sip.digest_md5_only.unwrap_or(false),
                rtp_timeout: sip
                    .rtp_timeout_s
                    .map(Duration::from_secs)
                    .unwrap_or(defaults.rtp_timeout),
                max_call: match sip.max_call_s {
                    // A call older than a day counts as one a dead node
                    // left open (erasure and retention rely on it).
                    Some(s) if !(1..=86_400).contains(&s) => {
                        anyhow::bail!("[sip] max_call_s must be 1 to 86400, got {s}")
                    }
                    Some(s) => Duration::from_secs(s),
                    None => defaults.max_call,
                },
                max_calls: args.max_calls.or(sip.max_calls),
                fax_tools: defaults.fax_tools,
            })
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let log_format = args
        .log_format
        .clone()
        .or_else(|| server.log_format.clone());
    let otlp = args
        .otlp_endpoint
        .clone()
        .or_else(|| server.otlp_endpoint.clone());
    let tracer = telemetry::init(log_format.as_deref(), otlp.as_deref(), rt.handle())?;
    if let Some(url) = &otlp {
        tracing::info!(
            "traces exported over OTLP to {}",
            plugboard_core::redact_url(url, true)
        );
    }
    let cache_mib = args
        .store_cache_mib
        .or(server.store_cache_mib)
        .unwrap_or(plugboard_store::DEFAULT_CACHE_BYTES >> 20);
    anyhow::ensure!(
        (1..=1 << 20).contains(&cache_mib),
        "--store-cache-mib must be 1 to 1048576, got {cache_mib}"
    );
    let every = file.retention.every_minutes.unwrap_or(60);
    anyhow::ensure!(
        (1..=7 * 24 * 60).contains(&every),
        "[retention] every_minutes must be 1 to 10080, got {every}"
    );
    let retention_every = Duration::from_secs(60 * every);
    let d = file.retention.defaults();
    for (name, days) in [
        ("interactions_days", d.interactions_days),
        ("recordings_days", d.recordings_days),
        ("messages_days", d.messages_days),
        ("attachments_days", d.attachments_days),
        ("faxes_days", d.faxes_days),
    ] {
        if let Some(days) = days {
            anyhow::ensure!(
                (1..=36_500).contains(&days),
                "[retention] {name} must be 1 to 36500 days, got {days}"
            );
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = admin_token(data_dir)?;
    let secret_key = secret_key(data_dir)?;
    let store: Arc<dyn Store> = if store_url == "sled" {
        Arc::new(
            SledStore::open_with_cache(&data_dir.join("store"), cache_mib << 20)
                .context("opening the store")?,
        )
    } else if store_url.starts_with("postgres://") || store_url.starts_with("postgresql://") {
        let pg = rt
            .block_on(PgStore::connect(&store_url, 16))
            .context("connecting to the PostgreSQL store")?;
        tracing::info!("store: PostgreSQL");
        Arc::new(pg)
    } else {
        anyhow::bail!("--store must be sled or a postgres:// URL, got {store_url:?}");
    };
    let cache_dir = cache_dir.unwrap_or_else(|| data_dir.join("cache"));
    let settings = json!({
        "config_file": args.config.as_ref().map(|p| p.display().to_string()),
        "data_dir": data_dir.display().to_string(),
        "store": if store_url == "sled" { "sled".to_string() } else { plugboard_core::redact_url(&store_url, true) },
        "store_cache_mib": (store_url == "sled").then_some(cache_mib),
        "log_format": log_format.clone().unwrap_or_else(|| "text".into()),
        "otlp_endpoint": otlp.as_deref().map(|u| plugboard_core::redact_url(u, true)),
        "nats": nats_url.as_deref().map(redact_nats),
        "node_id": nats_url.as_ref().map(|_| &node_id),
        "http": http.to_string(),
        "cache_dir": cache_dir.display().to_string(),
        "plugins": {"deadline_ms": deadline_ms, "memory_mib": memory_mib, "max_concurrent": max_concurrent, "max_loaded": max_loaded},
        "sip": voice.as_ref().map(|v| json!({
            "listen": v.sip.to_string(),
            "rtp_ports": format!("{}-{}", v.rtp_ports.0, v.rtp_ports.1),
            "public_ip": v.public_ip.map(|ip| ip.to_string()),
            "answer_delay_ms": v.answer_delay.as_millis() as u64,
            "digest_md5_first": v.digest_md5_first,
            "digest_md5_only": v.digest_md5_only,
            "espeak": v.espeak.display().to_string(),
            "rtp_timeout_s": v.rtp_timeout.as_secs(),
            "max_call_s": v.max_call.as_secs(),
        })),
        "email": email.as_ref().map(|(listen, c, relay)| json!({
            "smtp": listen.to_string(),
            "hostname": c.limits.hostname,
            "starttls": c.tls.is_some(),
            "max_size": c.limits.max_size,
            "max_recipients": c.limits.max_recipients,
            "max_per_ip": c.max_per_ip,
            "sender_checks": c.auth.as_ref().map(|a| a.settings()),
            "relay": relay.as_deref().map(|u| plugboard_core::redact_url(u, true)),
        })),
        "allow_networks": allow_networks,
        "retention": {"defaults": file.retention.defaults(), "every_minutes": retention_every.as_secs() / 60, "compact_delay_s": file.retention.compact_delay_s.unwrap_or(60)},
        "config_trunks": file.trunks.iter().map(|t| format!("{}/{}", t.tenant, t.trunk.name)).collect::<Vec<_>>(),
    });
    let host = Arc::new(
        PluginHost::new(HostConfig {
            cache_dir: Some(cache_dir),
            max_concurrent,
            max_memory_bytes: (memory_mib << 20).max(256 << 20),
            net: net.clone(),
            ..HostConfig::default()
        })
        .context("starting the plugin host")?,
    );
    let limits = Limits {
        deadline_ms,
        memory_bytes: memory_mib << 20,
        ..Limits::default()
    };
    let mut state = Engine::new(store, host, &token, limits)
        .with_secret_key(secret_key)
        .with_recordings_dir(data_dir.join("recordings"))
        .with_config_trunks(file.trunks_by_tenant())
        .with_max_loaded(max_loaded)
        .with_retention_defaults(file.retention.defaults())
        .with_compact_delay(Duration::from_secs(
            file.retention.compact_delay_s.unwrap_or(60),
        ))
        .with_settings(settings);
    if !file.trunks.is_empty() {
        tracing::info!("{} trunks from the config file", file.trunks.len());
    }
    match flow_graph_component(flow_graph)? {
        Some((path, bytes)) => {
            tracing::info!("flow documents run by {}", path.display());
            state = state.with_flow_graph(bytes);
        }
        None => tracing::warn!(
            "no flow-graph component found (build it with scripts/build-plugins.sh or pass --flow-graph): flow documents cannot be deployed"
        ),
    }
    let state = Arc::new(state);
    if let Some(url) = nats_url {
        let cluster = plugboard_engine::ClusterConfig {
            url: url.clone(),
            node: node_id.clone(),
            connect_wait: Duration::from_secs(3),
        };
        let shown = redact_nats(&url);
        if rt.block_on(state.join_cluster(cluster)).context("--nats")? {
            tracing::info!("node {node_id}: events and plugin deploys shared on NATS {shown}");
        } else {
            tracing::warn!(
                "node {node_id}: NATS {shown} is not reachable yet; serving without it meanwhile"
            );
        }
    }
    let t0 = Instant::now();
    let n = rt.block_on(state.preload())?;
    tracing::info!(
        "loaded {n} plugin versions in {} ms",
        t0.elapsed().as_millis()
    );
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("binding {http}"))?;
        tracing::info!("plugboard listening on http://{}", listener.local_addr()?);
        // Agents' browser softphones take media where SIP phones do.
        let (media_bind, media_ip) = voice
            .as_ref()
            .map(|v| (v.sip.ip(), v.advertised_ip()))
            .unwrap_or((
                std::net::IpAddr::from([127, 0, 0, 1]),
                std::net::IpAddr::from([127, 0, 0, 1]),
            ));
        let phones = plugboard_webrtc::Softphones::new(state.clone(), media_bind, media_ip);
        phones.prefer_opus(args.softphone_opus);
        let voice = match voice {
            Some(cfg) => Some(Arc::new(
                plugboard_voice::start(cfg, state.clone(), Some(phones.clone())).await?,
            )),
            None => None,
        };
        if let Some((listen, config, relay)) = email {
            if let Some(url) = &relay {
                let host = plugboard_email::SmartHost::new(url, &state)?;
                state.set_courier(plugboard_core::Channel::Email, Arc::new(host));
            }
            let smtp = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding SMTP {listen}"))?;
            tracing::info!("SMTP listening on {}", smtp.local_addr()?);
            tokio::spawn(plugboard_email::serve(smtp, state.clone(), config));
        }
        // The chat channel (its courier) before the outbox resumes.
        match &chat.widget_js {
            Some(p) => tracing::info!("chat widget from {}", p.display()),
            None => tracing::warn!("no chat widget built (scripts/build-web.sh)"),
        }
        let hub = plugboard_chat::Hub::start(state.clone(), chat);
        // SMS: a link per tenant carrier, through the same network policy
        // as tenants' HTTP.
        let sms = plugboard_sms::SmsHub::start(&state, net, plugboard_sms::link::Timing::default());
        // Conversations whose last messages were not yet run through their
        // flow, and the outbox, are taken up again.
        match state.resume_conversations().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("{n} conversations taken up again"),
            Err(e) => tracing::error!("resuming conversations: {e}"),
        }
        // Callbacks still to make are back in their queues (after the
        // voice channel, which carries them out).
        match state.preload_callbacks().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("{n} callbacks waiting in their queues"),
            Err(e) => tracing::error!("loading callbacks: {e}"),
        }
        // SIGTERM (or Ctrl-C): new calls are refused, live calls end with
        // a BYE after their flow's current event and their records are
        // closed; then HTTP stops. At most DRAIN_LIMIT for the calls.
        // Plugin usage is written every few seconds; call legs' as they end.
        state.start_usage_flusher();
        state.start_retention(retention_every);
        let draining = voice.clone();
        let closing = hub.clone();
        let metering = state.clone();
        let stop = async move {
            shutdown().await;
            let t0 = Instant::now();
            tracing::info!("shutting down");
            metering.set_draining();
            if let Some(v) = draining
                && !v.drain(DRAIN_LIMIT).await
            {
                tracing::warn!("calls still up after {DRAIN_LIMIT:?}: leaving them");
            }
            tracing::info!("calls drained in {} ms", t0.elapsed().as_millis());
            closing.close_all();
            sms.stop().await;
            metering.flush_usage().await;
        };
        let console = args
            .console
            .clone()
            .or_else(|| built("web/console").into_iter().find(|p| p.is_dir()));
        match &console {
            Some(p) => tracing::info!("web console from {}", p.display()),
            None => tracing::warn!("no web console built (scripts/build-web.sh)"),
        }
        let app = plugboard_api::router(state.clone())
            .merge(plugboard_api::console::router(console))
            .merge(plugboard_chat::router(hub))
            .merge(plugboard_webrtc::http::router(state.clone(), phones))
            .merge(plugboard_sms::http::router(state));
        // No Nagle delay on small frames (chat acks, events): without it a
        // widget's ack waited for the peer's delayed ACK, ~40 ms.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
        });
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop)
        .await?;
        drop(voice);
        if let Some(t) = tracer {
            // What is left goes out before the runtime stops.
            match tokio::task::spawn_blocking(move || t.shutdown()).await {
                Ok(Err(e)) => tracing::warn!("the last traces were not sent: {e}"),
                Err(e) => tracing::warn!("the last traces were not sent: {e}"),
                Ok(Ok(())) => {}
            }
        }
        tracing::info!("shut down");
        anyhow::Ok(())
    })
}

/// How long a graceful shutdown waits for live calls to end.
const DRAIN_LIMIT: Duration = Duration::from_secs(8);

/// Waits for SIGTERM or Ctrl-C.
async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// Without the overall time limit, for long downloads (a backup).
    patient: ureq::Agent,
}

impl Client {
    fn new(url: &str, token: Option<String>, data_dir: &Path) -> Result<Self> {
        let token = match token {
            Some(t) => t,
            None => std::fs::read_to_string(data_dir.join("admin_token"))
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no token: pass --token or PLUGBOARD_TOKEN, or run where {} exists",
                        data_dir.join("admin_token").display()
                    )
                })?,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        // A backup takes as long as the store is large: no limit on the
        // whole, an hour for the server to have its copy ready.
        let patient: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(3600)))
            .build()
            .into();
        Ok(Client {
            base: url.trim_end_matches('/').to_string(),
            token,
            agent,
            patient,
        })
    }

    /// One request with the client's token; the response, whatever its
    /// status.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{}", self.base, path);
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token));
        if let Some((ct, _)) = &body {
            req = req.header("content-type", *ct);
        }
        let req = req.body(body.map(|(_, b)| b).unwrap_or_default())?;
        self.agent
            .run(req)
            .with_context(|| format!("cannot reach {url} (is `plugboard serve` running?)"))
    }

    fn call(&self, method: &str, path: &str, body: Option<(&str, Vec<u8>)>) -> Result<Value> {
        let mut resp = self.request(method, path, body)?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string()?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            let code = v
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("error");
            if let Some(steps) = v.get("steps") {
                println!("{}", serde_json::to_string_pretty(steps)?);
            }
            bail!("{} {code}: {msg}", status.as_u16());
        }
        Ok(v)
    }

    /// A download, as bytes.
    fn download(&self, path: &str) -> Result<Vec<u8>> {
        let mut resp = self.request("GET", path, None)?;
        if !resp.status().is_success() {
            bail!("{} downloading {path}", resp.status().as_u16());
        }
        Ok(resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()?)
    }

    /// Streams a GET's body into `file` (through `file.part`, renamed when
    /// it is whole); returns its length.
    fn save(&self, path: &str, file: &Path) -> Result<u64> {
        let url = format!("{}{}", self.base, path);
        let req = ureq::http::Request::builder()
            .method("GET")
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .body(Vec::new())?;
        let mut resp = self
            .patient
            .run(req)
            .with_context(|| format!("cannot reach {url} (is `plugboard serve` running?)"))?;
        if !resp.status().is_success() {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            bail!("{} from {path}: {text}", resp.status().as_u16());
        }
        let mut part = file.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let saved = (|| -> Result<u64> {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&part)
                    .with_context(|| format!("creating {}", part.display()))?,
            );
            let n = std::io::copy(&mut resp.body_mut().as_reader(), &mut out)
                .with_context(|| format!("reading {path}"))?;
            let f = out.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
            f.sync_all()?;
            std::fs::rename(&part, file)?;
            Ok(n)
        })();
        if saved.is_err() {
            // A cut copy is not left behind.
            let _ = std::fs::remove_file(&part);
        }
        saved
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> Result<Value> {
        self.call(
            method,
            path,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A usage answer: CSV as it came, JSON pretty.
fn print_usage(v: &Value) -> Result<()> {
    match v {
        Value::String(csv) => {
            print!("{csv}");
            Ok(())
        }
        v => print(v),
    }
}

fn print(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn parse_arg_json(s: &str) -> Result<Value> {
    let text = match s.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => s.to_string(),
    };
    serde_json::from_str(&text).context("invalid JSON argument")
}

fn run_client(c: &Client, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve { .. } | Cmd::Restore { .. } | Cmd::Plugin { cmd: PluginCmd::New { .. } } => unreachable!("handled in run"),
        Cmd::Tenant { cmd: TenantCmd::Create { id, name, time_zone } } => {
            let mut body = json!({"id": id});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(tz) = time_zone {
                body["time_zone"] = json!(tz);
            }
            print(&c.json("POST", "/v1/tenants", &body)?)
        }
        Cmd::Tenant { cmd: TenantCmd::List } => print(&c.call("GET", "/v1/tenants", None)?),
        Cmd::Tenant { cmd: TenantCmd::Limits { id, json } } => {
            let path = format!("/v1/tenants/{}/limits", enc(&id));
            match json {
                Some(json) => print(&c.json("PUT", &path, &parse_arg_json(&json)?)?),
                None => print(&c.call("GET", &path, None)?),
            }
        }
        Cmd::Tenant { cmd: TenantCmd::Usage { id, period } } => print_usage(
            &c.call("GET", &format!("/v1/tenants/{}/usage?{}", enc(&id), period.query()), None)?,
        ),
        Cmd::Tenant { cmd: TenantCmd::UsageAll { period } } => {
            print_usage(&c.call("GET", &format!("/v1/usage?{}", period.query()), None)?)
        }
        Cmd::Plugin { cmd: PluginCmd::Deploy { tenant, name, file } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            eprintln!(
                "uploading {} ({} KiB); the server compiles it, which can take a while for large components…",
                file.display(),
                bytes.len() / 1024
            );
            let t0 = Instant::now();
            let v = c.call(
                "PUT",
                &format!("/v1/tenants/{}/plugins/{}", enc(&tenant), enc(&name)),
                Some(("application/wasm", bytes)),
            )?;
            eprintln!(
                "deployed {name} v{} ({}) in {:.1} s",
                v["version"],
                v["kind"].as_str().unwrap_or("?"),
                t0.elapsed().as_secs_f64()
            );
            print(&v)
        }
        Cmd::Plugin { cmd: PluginCmd::List { tenant } } => {
            print(&c.call("GET", &format!("/v1/tenants/{}/plugins", enc(&tenant)), None)?)
        }
        Cmd::Plugin { cmd: PluginCmd::Rollback { tenant, name, version } } => {
            let body = match version {
                Some(v) => json!({"version": v}),
                None => json!({}),
            };
            print(&c.json(
                "POST",
                &format!("/v1/tenants/{}/plugins/{}/rollback", enc(&tenant), enc(&name)),
                &body,
            )?)
        }
        Cmd::Plugin { cmd: PluginCmd::Grants { tenant, name, json } } => print(&c.json(
            "PUT",
            &format!("/v1/tenants/{}/plugins/{}/grants", enc(&tenant), enc(&name)),
            &parse_arg_json(&json)?,
        )?),
        Cmd::Plugin { cmd: PluginCmd::Config { tenant, name, json } } => print(&c.json(
            "PUT",
            &format!("/v1/tenants/{}/plugins/{}/config", enc(&tenant), enc(&name)),
            &parse_arg_json(&json)?,
        )?),
        Cmd::Address { cmd: AddressCmd::Set { tenant, address, channel, flow } } => print(&c.json(
            "PUT",
            &format!("/v1/tenants/{}/addresses/{}", enc(&tenant), enc(&address)),
            &json!({"channel": channel, "flow": flow}),
        )?),
        Cmd::Flow { cmd: FlowCmd::Simulate { tenant, flow, events, channel, from, to, now_ms } } => print(&c.json(
            "POST",
            &format!("/v1/tenants/{}/flows/{}/simulate", enc(&tenant), enc(&flow)),
            &json!({"events": parse_arg_json(&events)?, "channel": channel, "from": from, "to": to, "now_ms": now_ms}),
        )?),
        Cmd::Conversation { cmd: ConversationCmd::Messages { tenant, id } } => print(&c.call(
            "GET",
            &format!("/v1/tenants/{}/interactions/{}/messages", enc(&tenant), enc(&id)),
            None,
        )?),
        Cmd::Conversation { cmd: ConversationCmd::Reply { tenant, id, text, subject } } => print(&c.json(
            "POST",
            &format!("/v1/tenants/{}/interactions/{}/messages", enc(&tenant), enc(&id)),
            &json!({"text": text, "subject": subject}),
        )?),
        Cmd::Customer { cmd: CustomerCmd::Find { tenant, address, channel } } => print(&c.call(
            "GET",
            &format!(
                "/v1/tenants/{}/customers?channel={}&address={}",
                enc(&tenant),
                enc(&channel),
                enc(&address)
            ),
            None,
        )?),
        Cmd::Customer { cmd: CustomerCmd::History { tenant, id } } => print(&c.call(
            "GET",
            &format!("/v1/tenants/{}/customers/{}", enc(&tenant), enc(&id)),
            None,
        )?),
        Cmd::Carrier { cmd: CarrierCmd::Set { tenant, name, json } } => print(&c.json(
            "PUT",
            &format!("/v1/tenants/{}/sms-carriers/{}", enc(&tenant), enc(&name)),
            &parse_arg_json(&json)?,
        )?),
        Cmd::Backup { file } => {
            let n = c.save("/v1/backup", &file)?;
            println!("{}", json!({"backup": file.display().to_string(), "bytes": n}));
            Ok(())
        }
        Cmd::Fax { cmd: FaxCmd::Send { tenant, from, to, file } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let ct = if bytes.starts_with(b"%PDF-") { "application/pdf" } else { "image/tiff" };
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            print(&c.call(
                "POST",
                &format!(
                    "/v1/tenants/{}/faxes?from={}&to={}&name={}",
                    enc(&tenant),
                    enc(&from),
                    enc(&to),
                    enc(&name)
                ),
                Some((ct, bytes)),
            )?)
        }
        Cmd::Fax { cmd: FaxCmd::List { tenant } } => {
            let v = c.call(
                "GET",
                &format!("/v1/tenants/{}/interactions?limit=1000", enc(&tenant)),
                None,
            )?;
            let faxes: Vec<Value> = v["interactions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|ix| ix["channel"] == "fax")
                .map(|ix| {
                    json!({"id": ix["id"], "from": ix["from"], "to": ix["to"],
                           "created_ms": ix["created_ms"], "state": ix["state"]})
                })
                .collect();
            print(&json!({"faxes": faxes}))
        }
        Cmd::Fax { cmd: FaxCmd::Get { tenant, id, pdf } } => {
            let v = c.call(
                "GET",
                &format!("/v1/tenants/{}/interactions/{}/messages", enc(&tenant), enc(&id)),
                None,
            )?;
            if let Some(path) = pdf {
                // The message's file, as whoever may see the conversation
                // (an agent's or supervisor's token too) downloads it.
                let (message, n) = v["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|m| {
                        let files = m["attachments"].as_array()?;
                        let n = files.iter().position(|a| a["content_type"] == "application/pdf")?;
                        Some((m["id"].as_str()?.to_string(), n))
                    })
                    .context("this fax has no PDF (no page was received)")?;
                let bytes = c.download(&format!(
                    "/v1/tenants/{}/messages/{}/attachments/{n}",
                    enc(&tenant),
                    enc(&message)
                ))?;
                std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("saved {} ({} bytes)", path.display(), bytes.len());
            }
            print(&v)
        }
        Cmd::Carrier { cmd: CarrierCmd::List { tenant } } => print(&c.call(
            "GET",
            &format!("/v1/tenants/{}/sms-carriers", enc(&tenant)),
            None,
        )?),
        Cmd::Carrier { cmd: CarrierCmd::Delete { tenant, name } } => print(&c.call(
            "DELETE",
            &format!("/v1/tenants/{}/sms-carriers/{}", enc(&tenant), enc(&name)),
            None,
        )?),
        Cmd::Customer { cmd: CustomerCmd::Merge { tenant, id, from } } => print(&c.json(
            "POST",
            &format!("/v1/tenants/{}/customers/{}/merge", enc(&tenant), enc(&id)),
            &json!({"from": from}),
        )?),
        Cmd::Flow { cmd: FlowCmd::Deploy { tenant, file, name } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .context("give the flow a name with --name")?
                    .to_string(),
            };
            let v = c.call(
                "POST",
                &format!("/v1/tenants/{}/flows/{}", enc(&tenant), enc(&name)),
                Some(("application/json", bytes)),
            )?;
            for w in v["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", w.as_str().unwrap_or_default());
            }
            eprintln!("deployed flow {name} v{}", v["version"]);
            print(&v)
        }
    }
}
