//! The server's config file (`plugboard serve --config FILE`, TOML).
//!
//! Every setting may also be given as a flag or an environment variable;
//! a flag wins over the file, the file over the built-in default. Carrier
//! trunks may be declared here per tenant: they are kept in memory, not in
//! the store (their passwords stay in the file), listed by the API with
//! `"source": "config"`, and cannot be replaced over the API.
//! `plugboard.example.toml` at the top of the repository shows every key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The whole file. Unknown keys are errors, so a typo is not silently
/// ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerSection,
    /// `[sip]`.
    #[serde(default)]
    pub sip: SipSection,
    /// `[email]`.
    #[serde(default)]
    pub email: EmailSection,
    /// `[chat]`.
    #[serde(default)]
    pub chat: ChatSection,
    /// `[retention]`.
    #[serde(default)]
    pub retention: RetentionSection,
    /// `[[trunk]]` tables.
    #[serde(default, rename = "trunk")]
    pub trunks: Vec<TrunkEntry>,
}

/// HTTP, store and plugin limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Data directory (store, compile cache, recordings, admin token).
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address.
    pub http: Option<SocketAddr>,
    /// The store: `sled` or a PostgreSQL URL.
    pub store: Option<String>,
    /// The embedded store's page cache, MiB.
    pub store_cache_mib: Option<u64>,
    /// Log lines as `text` or `json`.
    pub log_format: Option<String>,
    /// Where traces go over OTLP/HTTP (`http://…/v1/traces`).
    pub otlp_endpoint: Option<String>,
    /// NATS server URL(s) shared by the nodes of one store.
    pub nats: Option<String>,
    /// This node's id on NATS.
    pub node_id: Option<String>,
    /// CPU deadline per plugin invocation, ms.
    pub deadline_ms: Option<u64>,
    /// Linear memory cap per plugin instance, MiB.
    pub memory_mib: Option<usize>,
    /// Plugin instances that may run at once.
    pub max_concurrent: Option<u32>,
    /// Plugin versions kept compiled in memory at most.
    pub max_loaded_plugins: Option<usize>,
    /// The flow-graph component.
    pub flow_graph: Option<PathBuf>,
    /// Compiled-component cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Networks besides the public internet that tenants' outbound HTTP
    /// (plugins, media URLs) may reach, e.g. `["127.0.0.1/32"]` for a
    /// local MIS. Loopback, private, link-local and metadata addresses
    /// are refused unless listed here.
    pub allow_networks: Option<Vec<String>>,
}

/// The voice channel.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    /// SIP listen address (UDP and TCP), or `off`.
    pub listen: Option<String>,
    /// RTP port range, `LO-HI`.
    pub rtp_ports: Option<String>,
    /// Address to advertise in SDP and Contact.
    pub public_ip: Option<IpAddr>,
    /// Ring this long before answering, ms.
    pub answer_delay_ms: Option<u64>,
    /// Challenge with MD5 before SHA-256.
    pub digest_md5_first: Option<bool>,
    /// Challenge with MD5 only.
    pub digest_md5_only: Option<bool>,
    /// The espeak-ng program.
    pub espeak: Option<PathBuf>,
    /// Hang up after this long without RTP from the caller, s.
    pub rtp_timeout_s: Option<u64>,
    /// Longest call, s.
    pub max_call_s: Option<u64>,
    /// Call legs this node takes at once (default: one per RTP port pair).
    pub max_calls: Option<usize>,
}

/// The email channel.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSection {
    /// Inbound SMTP listen address, or `off`.
    pub smtp: Option<String>,
    /// The name the SMTP server greets with.
    pub hostname: Option<String>,
    /// Certificate chain (PEM) for STARTTLS.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Largest message accepted, bytes.
    pub max_size: Option<usize>,
    /// Recipients per message.
    pub max_recipients: Option<usize>,
    /// Connections at once from one IP address.
    pub max_per_ip: Option<usize>,
    /// The smart host replies go out through: `smtp://host:port`,
    /// `smtp://host:port?tls=required`, `smtps://user:pass@host:port`.
    pub relay: Option<String>,
    /// DNS for the SPF, DKIM and DMARC checks: `system`, `IP:PORT` or
    /// `off` (default `system`).
    pub auth_dns: Option<String>,
    /// Seconds all of one message's checks may take (default 5); past it
    /// they are recorded as `temperror`.
    pub auth_timeout_s: Option<u64>,
    /// Refuse (`550 5.7.1`) mail that fails DMARC when its domain's policy
    /// is `reject` (default true).
    pub dmarc_reject: Option<bool>,
}

/// `[chat]`: the web chat channel.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSection {
    /// The built widget (`widget.js`).
    pub widget: Option<PathBuf>,
    /// Widget connections at once from one IP address.
    pub max_per_ip: Option<usize>,
    /// Widget connections at once in all.
    pub max_connections: Option<usize>,
    /// Messages a second per visitor (after a burst of 10).
    pub rate: Option<f64>,
    /// Messages a second per IP address (after a burst of 100).
    pub ip_rate: Option<f64>,
}

/// `[retention]`: how long tenants' data is kept when a tenant sets no
/// period of its own (days; unset: for good), and how often the job that
/// deletes expired data runs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Interactions with everything they hold.
    pub interactions_days: Option<u32>,
    /// Call recordings and voicemail.
    pub recordings_days: Option<u32>,
    /// Conversation messages.
    pub messages_days: Option<u32>,
    /// Attachments and raw email sources.
    pub attachments_days: Option<u32>,
    /// Faxes.
    pub faxes_days: Option<u32>,
    /// Minutes between two runs of the retention job (default 60).
    pub every_minutes: Option<u64>,
    /// Seconds after an erasure or a retention run before the embedded
    /// store is compacted, so deleted data leaves the disk (default 60).
    pub compact_delay_s: Option<u64>,
}

impl RetentionSection {
    /// The default periods.
    pub fn defaults(&self) -> plugboard_core::Retention {
        plugboard_core::Retention {
            interactions_days: self.interactions_days,
            recordings_days: self.recordings_days,
            messages_days: self.messages_days,
            attachments_days: self.attachments_days,
            faxes_days: self.faxes_days,
        }
    }
}

/// A `[[trunk]]`: a [`plugboard_core::Trunk`] and the tenant it belongs to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkEntry {
    /// The tenant.
    pub tenant: String,
    /// The trunk itself (`name`, `host`, `transport`, `username`,
    /// `password`, `inbound_ips`).
    #[serde(flatten)]
    pub trunk: plugboard_core::Trunk,
}

impl ConfigFile {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        ConfigFile::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses and checks the text of a config file.
    pub fn parse(text: &str) -> Result<ConfigFile> {
        let config: ConfigFile = toml::from_str(text)?;
        if let Some(r) = &config.sip.rtp_ports {
            plugboard_voice::parse_port_range(r)
                .map_err(|e| anyhow::anyhow!("[sip] rtp_ports: {e}"))?;
        }
        let mut seen = std::collections::HashSet::new();
        for entry in &config.trunks {
            let t = &entry.trunk;
            let what = format!("[[trunk]] {}/{}", entry.tenant, t.name);
            if t.name.is_empty() {
                bail!("[[trunk]] of tenant {:?}: name is missing", entry.tenant);
            }
            t.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            if !seen.insert((entry.tenant.clone(), t.name.clone())) {
                bail!("{what} is declared twice");
            }
        }
        Ok(config)
    }

    /// The trunks by tenant.
    pub fn trunks_by_tenant(&self) -> HashMap<String, Vec<plugboard_core::Trunk>> {
        let mut map: HashMap<String, Vec<plugboard_core::Trunk>> = HashMap::new();
        for e in &self.trunks {
            map.entry(e.tenant.clone())
                .or_default()
                .push(e.trunk.clone());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugboard.example.toml");
        let c = ConfigFile::load(&path)?;
        assert_eq!(c.sip.rtp_ports.as_deref(), Some("20000-23999"));
        let trunks = c.trunks_by_tenant();
        assert_eq!(trunks["demo"][0].name, "default");
        assert_eq!(trunks["demo"][0].transport, "udp");
        Ok(())
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| {
            format!(
                "{:#}",
                ConfigFile::parse(text)
                    .err()
                    .unwrap_or_else(|| panic!("{text} parsed"))
            )
        };
        assert!(err("[sip]\nlisten_on = \"x\"").contains("listen_on"));
        assert!(err("[sip]\nrtp_ports = \"9-3\"").contains("rtp_ports"));
        assert!(
            err("[[trunk]]\ntenant = \"a\"\nname = \"t\"\nhost = \"nope\"")
                .contains("a/t: host must be host:port")
        );
        assert!(
            err(
                "[[trunk]]\ntenant = \"a\"\nname = \"t\"\nhost = \"h:5060\"\ninbound_ips = [\"x\"]"
            )
            .contains("not an IP")
        );
        let twice = "[[trunk]]\ntenant = \"a\"\nname = \"t\"\nhost = \"h:1\"\n[[trunk]]\ntenant = \"a\"\nname = \"t\"\nhost = \"h:2\"";
        assert!(err(twice).contains("twice"));
        let typo = "[[trunk]]\ntenant = \"a\"\nname = \"t\"\nhost = \"h:1\"\npasswrd = \"x\"";
        assert!(err(typo).contains("passwrd"), "{}", err(typo));
        assert!(err("[server]\nhttp = \"not an address\"").contains("http"));
    }
}
