//! The cluster link: notices between nodes that share a store, over NATS.
//!
//! Nodes on one PostgreSQL store share their state, but each has its own
//! event bus and its own loaded plugins. Joined to a NATS server
//! ([`Engine::join_cluster`]), a node
//!
//! - publishes every event of its bus: a tenant's on
//!   `plugboard.events.<tenant>`, the operator's own (security events) on
//!   `plugboard.operator`, each tagged with the node's id in the
//!   `Plugboard-Node` header;
//! - puts the events of the other nodes on its own bus, tagged with the
//!   node they come from ([`StreamEvent::node`]), so that an event stream
//!   opened on any node carries the events of every node, and its own
//!   only once: the connection asks the server not to echo what it
//!   publishes, and a message tagged with the node's own id is dropped;
//! - announces every plugin deploy and rollback on
//!   `plugboard.notice.plugin`, and loads (compiles, or reads from the
//!   compile cache) the active version of a plugin another node announced,
//!   in the background and one at a time, so that the first call here does
//!   not wait for a compile.
//!
//! Notices are best-effort and never on a hot path: the engine's bus is
//! delivered locally first, a forwarding task takes events from the bus
//! like any other subscriber, and a plugin notice is queued without
//! waiting. When NATS is unreachable the node goes on serving: what does
//! not fit the queues is dropped (counted in `plugboard_cluster_notices`,
//! logged), and the client reconnects by itself. The store is the truth; a
//! missed plugin notice only means the version is loaded at its first use.
//!
//! Tenant ids (`a-z`, `0-9`, `-`, `_`) are valid subject tokens as they
//! are; an id that is not (there is none in a store written by this
//! version) is neither published nor accepted.

use crate::{Engine, OPERATOR, StreamEvent};
use async_nats::{Client, ConnectOptions, HeaderMap, Message, ServerAddr};
use futures_util::StreamExt;
use plugboard_core::validate_id;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Subjects of tenants' events: `plugboard.events.<tenant>`.
pub const EVENTS_SUBJECT: &str = "plugboard.events";
/// Subject of the operator's own events (security events).
pub const OPERATOR_SUBJECT: &str = "plugboard.operator";
/// Subject of plugin deploy and rollback notices.
pub const PLUGIN_NOTICE_SUBJECT: &str = "plugboard.notice.plugin";
/// The header naming the node that published a message.
pub const NODE_HEADER: &str = "Plugboard-Node";

/// Plugin notices waiting to be published, and announced versions waiting
/// to be loaded; past this many, more are dropped (loaded at first use).
const NOTICE_QUEUE: usize = 1024;

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs, comma-separated: `nats://host:4222`, `tls://…`,
    /// with `user:password@` or `token@` where the server asks for them.
    pub url: String,
    /// This node's id: 1-64 characters of `A-Z`, `a-z`, `0-9`, `-`, `_`
    /// ([`random_node_id`] makes one).
    pub node: String,
    /// How long joining waits for the first connection before it goes on
    /// without one (the client keeps trying in the background).
    pub connect_wait: Duration,
}

/// Why a node could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The node id has characters other than `A-Z`, `a-z`, `0-9`, `-`,
    /// `_`, or is empty or too long.
    #[error("node id {0:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'")]
    InvalidNode(String),
    /// A server address that cannot be parsed. The address is not
    /// repeated: it may hold a password.
    #[error("NATS server address {position} of {count}: {reason}")]
    InvalidUrl {
        /// Its position in the list, from 1.
        position: usize,
        /// How many addresses were given.
        count: usize,
        /// Why it was refused.
        reason: String,
    },
    /// The engine has joined a cluster already.
    #[error("this engine has already joined a cluster")]
    AlreadyJoined,
    /// The client could not be set up or could not subscribe.
    #[error("NATS: {0}")]
    Nats(String),
    /// The operating system's random number generator failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A node id made at random: `node-` and 12 hex digits.
pub fn random_node_id() -> Result<String, ClusterError> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| ClusterError::Random(e.to_string()))?;
    Ok(format!("node-{}", hex::encode(b)))
}

/// The subject a tenant's events go on (`None`: an id that is not a safe
/// subject token).
pub fn subject_for(tenant: &str) -> Option<String> {
    if tenant == OPERATOR {
        Some(OPERATOR_SUBJECT.to_string())
    } else {
        validate_id("tenant", tenant).ok()?;
        Some(format!("{EVENTS_SUBJECT}.{tenant}"))
    }
}

/// The tenant whose events a subject carries (the operator's: `""`).
pub fn tenant_of(subject: &str) -> Option<&str> {
    if subject == OPERATOR_SUBJECT {
        return Some(OPERATOR);
    }
    let tenant = subject.strip_prefix(EVENTS_SUBJECT)?.strip_prefix('.')?;
    validate_id("tenant", tenant).ok()?;
    Some(tenant)
}

/// A plugin's active version changed (deploy or rollback).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PluginNotice {
    tenant: String,
    name: String,
    version: u64,
}

/// What an engine keeps of its cluster link.
pub(crate) struct Link {
    node: Arc<str>,
    notices: mpsc::Sender<PluginNotice>,
}

impl Engine {
    /// Joins the cluster: connects to NATS, subscribes to the other nodes'
    /// events and notices, and starts forwarding this node's (see the
    /// [module](self) documentation). Waits at most
    /// [`ClusterConfig::connect_wait`] for the first connection; answers
    /// whether it was made (if not, the client keeps trying, and the node
    /// serves meanwhile). Errors are for a bad configuration only.
    pub async fn join_cluster(
        self: &Arc<Self>,
        config: ClusterConfig,
    ) -> Result<bool, ClusterError> {
        let node_ok = !config.node.is_empty()
            && config.node.len() <= 64
            && config
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !node_ok {
            return Err(ClusterError::InvalidNode(config.node));
        }
        let urls: Vec<&str> = config.url.split(',').map(str::trim).collect();
        let mut servers = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let addr = url
                .parse::<ServerAddr>()
                .map_err(|e| ClusterError::InvalidUrl {
                    position: i + 1,
                    count: urls.len(),
                    reason: e.to_string(),
                })?;
            servers.push(addr);
        }
        if self.cluster.get().is_some() {
            return Err(ClusterError::AlreadyJoined);
        }
        // Reported once per outage: the client retries every few seconds.
        let down = Arc::new(AtomicBool::new(false));
        let client = ConnectOptions::new()
            .name(format!("plugboard {}", config.node))
            .no_echo()
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let down = down.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            down.store(false, Ordering::Relaxed);
                            tracing::info!("NATS: connected");
                        }
                        async_nats::Event::Disconnected => {
                            down.store(true, Ordering::Relaxed);
                            tracing::warn!(
                                "NATS: disconnected; other nodes' events and plugin notices are missed until it is back"
                            );
                        }
                        async_nats::Event::ClientError(e) if down.swap(true, Ordering::Relaxed) => {
                            tracing::debug!("NATS: {e}");
                        }
                        other => tracing::warn!("NATS: {other}; retrying in the background"),
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let mut subscriptions = Vec::new();
        for subject in [
            format!("{EVENTS_SUBJECT}.*"),
            OPERATOR_SUBJECT.to_string(),
            PLUGIN_NOTICE_SUBJECT.to_string(),
        ] {
            subscriptions.push(
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| ClusterError::Nats(e.to_string()))?,
            );
        }
        // A flush answers once the server has seen the subscriptions.
        let connected = tokio::time::timeout(config.connect_wait, client.flush())
            .await
            .is_ok_and(|r| r.is_ok());
        let node: Arc<str> = config.node.into();
        let (notices, notices_rx) = mpsc::channel(NOTICE_QUEUE);
        let link = Link {
            node: node.clone(),
            notices,
        };
        if self.cluster.set(link).is_err() {
            return Err(ClusterError::AlreadyJoined);
        }
        let (warm_tx, warm_rx) = mpsc::channel(NOTICE_QUEUE);
        let me = Arc::downgrade(self);
        tokio::spawn(forward(
            client,
            node.clone(),
            self.events.subscribe(),
            notices_rx,
            me.clone(),
        ));
        tokio::spawn(receive(
            futures_util::stream::select_all(subscriptions),
            node,
            warm_tx,
            me.clone(),
        ));
        tokio::spawn(warm(warm_rx, me));
        Ok(connected)
    }

    /// This node's id in the cluster, once it has joined one.
    pub fn node_id(&self) -> Option<&str> {
        self.cluster.get().map(|l| &*l.node)
    }

    /// Tells the other nodes that a plugin's active version changed, so
    /// that they load it. Never waits: a full queue drops the notice.
    pub(crate) fn announce_plugin(&self, tenant: &str, name: &str, version: u64) {
        let Some(link) = self.cluster.get() else {
            return;
        };
        let notice = PluginNotice {
            tenant: tenant.to_string(),
            name: name.to_string(),
            version,
        };
        if link.notices.try_send(notice).is_err() {
            self.metrics.cluster_notices("dropped", 1);
            tracing::warn!(
                "plugin notice for {tenant}/{name} v{version} dropped: NATS is behind; other nodes load it at first use"
            );
        }
    }

    /// Loads a plugin's active version (another node announced a change).
    async fn warm_plugin(&self, tenant: &str, name: &str) -> crate::EngineResult<u64> {
        let info = self.plugin(tenant, name, "plugin").await?;
        // The active one, which may be newer than the notice's (notices
        // are not waited for in order).
        self.loaded_version(tenant, &info, info.active_version)
            .await?;
        Ok(info.active_version)
    }
}

/// Publishes this node's events (taken from its bus) and plugin notices,
/// in the order they came.
async fn forward(
    client: Client,
    node: Arc<str>,
    mut events: broadcast::Receiver<StreamEvent>,
    mut notices: mpsc::Receiver<PluginNotice>,
    engine: Weak<Engine>,
) {
    let mut headers = HeaderMap::new();
    headers.insert(NODE_HEADER, &*node);
    loop {
        let (subject, body) = tokio::select! {
            ev = events.recv() => match ev {
                // Events from other nodes went out from there.
                Ok(ev) if ev.node.is_some() => continue,
                Ok(ev) => match subject_for(&ev.tenant) {
                    Some(s) => (s, ev.payload.to_string()),
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    if let Some(e) = engine.upgrade() {
                        e.metrics.cluster_notices("dropped", n);
                    }
                    tracing::warn!("{n} events not published to NATS: it is behind or unreachable");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            n = notices.recv() => match n {
                Some(n) => match serde_json::to_string(&n) {
                    Ok(body) => (PLUGIN_NOTICE_SUBJECT.to_string(), body),
                    Err(_) => continue,
                },
                None => return,
            },
        };
        // Waits only while the client's own buffer is full (NATS down);
        // the bus goes on meanwhile and this receiver lags.
        let outcome = client
            .publish_with_headers(subject, headers.clone(), body.into())
            .await;
        let Some(e) = engine.upgrade() else {
            return;
        };
        match outcome {
            Ok(()) => e.metrics.cluster_notices("sent", 1),
            Err(err) => {
                e.metrics.cluster_notices("failed", 1);
                tracing::warn!("publishing to NATS: {err}");
            }
        }
    }
}

/// Puts other nodes' events on this node's bus and queues the plugin
/// versions they announce for loading.
async fn receive(
    mut messages: impl futures_util::Stream<Item = Message> + Unpin,
    node: Arc<str>,
    warm: mpsc::Sender<PluginNotice>,
    engine: Weak<Engine>,
) {
    while let Some(msg) = messages.next().await {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let Some(from) = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE_HEADER))
            .map(|v| v.as_str())
        else {
            // Not a Plugboard node's.
            continue;
        };
        if from == &*node {
            continue;
        }
        if msg.subject.as_str() == PLUGIN_NOTICE_SUBJECT {
            let Ok(n) = serde_json::from_slice::<PluginNotice>(&msg.payload) else {
                tracing::warn!("unreadable plugin notice from node {from}");
                continue;
            };
            if validate_id("tenant", &n.tenant).is_err() || validate_id("plugin", &n.name).is_err()
            {
                continue;
            }
            engine.metrics.cluster_notices("received", 1);
            if warm.try_send(n).is_err() {
                engine.metrics.cluster_notices("dropped", 1);
            }
            continue;
        }
        let Some(tenant) = tenant_of(msg.subject.as_str()) else {
            continue;
        };
        let Ok(payload) = serde_json::from_slice::<Value>(&msg.payload) else {
            tracing::warn!("unreadable event from node {from}");
            continue;
        };
        engine.metrics.cluster_notices("received", 1);
        let _ = engine.events.send(StreamEvent {
            tenant: tenant.to_string(),
            payload,
            node: Some(from.into()),
        });
    }
}

/// Loads announced plugin versions, one at a time (compiling is heavy:
/// calls come first).
async fn warm(mut notices: mpsc::Receiver<PluginNotice>, engine: Weak<Engine>) {
    while let Some(n) = notices.recv().await {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match engine.warm_plugin(&n.tenant, &n.name).await {
            Ok(v) => tracing::info!(
                "loaded {}/{} v{v}, announced by another node",
                n.tenant,
                n.name
            ),
            Err(e) => tracing::warn!(
                "could not load {}/{} v{}, announced by another node: {e}",
                n.tenant,
                n.name,
                n.version
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_subject_tokens_and_nothing_else_is() {
        assert_eq!(
            subject_for("acme-2_b").as_deref(),
            Some("plugboard.events.acme-2_b")
        );
        assert_eq!(subject_for(OPERATOR).as_deref(), Some(OPERATOR_SUBJECT));
        for bad in ["a.b", "a*", ">", "a b", "A", "-a"] {
            assert_eq!(subject_for(bad), None, "{bad}");
        }
        assert_eq!(tenant_of("plugboard.events.acme"), Some("acme"));
        assert_eq!(tenant_of(OPERATOR_SUBJECT), Some(OPERATOR));
        for bad in [
            "plugboard.events.",
            "plugboard.events",
            "plugboard.eventsx.a",
            "plugboard.events.a.b",
            "plugboard.notice.plugin",
            "other.events.a",
        ] {
            assert_eq!(tenant_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn node_ids_are_random_and_plain() {
        let (a, b) = (random_node_id().unwrap(), random_node_id().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("node-") && a.len() == 17, "{a}");
    }
}
