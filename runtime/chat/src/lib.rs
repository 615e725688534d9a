//! Plugboard's web chat channel: a thin tokio driver between the
//! embeddable widget (`web/widget`, served at `/chat/widget.js`) and the
//! engine's conversations.
//!
//! - `GET /chat/{address}/ws`: the widget's WebSocket ([`protocol`]). A
//!   message is acknowledged only once the engine has stored it durably;
//!   its client id makes a retry (after a reconnect) the same message.
//! - `GET /chat/widget.js`: the widget, built from TypeScript by
//!   `scripts/build-web.sh`.
//! - `GET /chat/{address}`: a page with nothing but the widget, to try an
//!   address in a browser.
//!
//! Replies (the flow's, an agent's) reach the widget through the chat
//! courier ([`ChatCourier`]) from the engine's durable outbox; a visitor
//! who is away sees them in the history when it comes back. Typing,
//! receipts and the end of a conversation come from the event bus.
//!
//! Limits: the widget's allowed origins; connections per IP address;
//! messages per visitor and per IP address (token buckets); text and file
//! sizes. What is refused gets an `error` frame saying why.

pub mod limits;
pub mod protocol;

use axum::Router;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use plugboard_core::conns::ConnectionLimits;
use plugboard_core::{Author, Channel, Message, MessageStatus};
use plugboard_engine::chat::ChatAddress;
use plugboard_engine::messaging::{Courier, Delivered, DeliveryError, Inbound};
use plugboard_engine::{Engine, EngineError};
use protocol::{ClientFrame, error, visitor_view};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The chat channel's settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// The built widget (`widget.js`); `None`: `/chat/widget.js` is 404.
    pub widget_js: Option<PathBuf>,
    /// Open widget connections per IP address at most.
    pub max_per_ip: usize,
    /// Open widget connections in all at most.
    pub max_connections: usize,
    /// Messages a second per visitor, after a burst of `visitor_burst`.
    pub visitor_rate: f64,
    /// Messages a visitor may send at once.
    pub visitor_burst: u32,
    /// Messages a second per IP address, after a burst of `ip_burst`.
    pub ip_rate: f64,
    /// Messages one IP address may send at once.
    pub ip_burst: u32,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            widget_js: None,
            max_per_ip: 50,
            max_connections: 10_000,
            visitor_rate: 1.0,
            visitor_burst: 10,
            ip_rate: 20.0,
            ip_burst: 100,
        }
    }
}

/// How long a new connection may take to say `hello`.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// How often the server pings an idle widget.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Files per message at most.
const MAX_FILES: usize = 5;
/// Frames queued for one connection before new ones are dropped (the
/// widget catches up from the history when it reconnects).
const QUEUE: usize = 64;
/// Typing frames a visitor may send a second (more are ignored).
const TYPING_RATE: f64 = 2.0;

/// A live widget connection's outgoing queue.
struct Conn {
    id: u64,
    tx: mpsc::Sender<String>,
}

/// The channel's shared state: live connections by visitor, the
/// conversation each visitor is in, and the limits.
pub struct Hub {
    engine: Arc<Engine>,
    config: ChatConfig,
    next_id: AtomicU64,
    /// (tenant, visitor) → its connections (tabs).
    conns: Mutex<HashMap<(String, String), Vec<Conn>>>,
    /// (tenant, conversation) → visitor, for events by conversation.
    visitors: Mutex<HashMap<(String, String), String>>,
    /// Open widget connections, in all and per address.
    open: ConnectionLimits,
    by_visitor: Mutex<limits::Limiter>,
    by_ip: Mutex<limits::Limiter>,
    typing: Mutex<limits::Limiter>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// The hub for an engine: registers the chat courier and follows the
    /// event bus (typing, receipts, closed conversations).
    pub fn start(engine: Arc<Engine>, config: ChatConfig) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            by_visitor: Mutex::new(limits::Limiter::new(
                config.visitor_rate,
                config.visitor_burst,
            )),
            by_ip: Mutex::new(limits::Limiter::new(config.ip_rate, config.ip_burst)),
            typing: Mutex::new(limits::Limiter::new(TYPING_RATE, 4)),
            engine: engine.clone(),
            open: ConnectionLimits::new(config.max_connections, config.max_per_ip),
            config,
            next_id: AtomicU64::new(1),
            conns: Mutex::default(),
            visitors: Mutex::default(),
        });
        engine.set_courier(
            Channel::Chat,
            Arc::new(ChatCourier {
                hub: Arc::downgrade(&hub),
            }),
        );
        tokio::spawn(follow_events(Arc::downgrade(&hub), engine.subscribe()));
        Hub::register_tables(&hub);
        hub
    }

    /// Ends every widget connection (the server is stopping; widgets
    /// reconnect to whichever node serves them next).
    pub fn close_all(&self) {
        lock(&self.conns).clear();
    }

    /// Open widget connections.
    pub fn connections(&self) -> usize {
        lock(&self.conns).values().map(Vec::len).sum()
    }

    /// Notes the visitor of a conversation while the visitor is
    /// connected (a visitor who left meanwhile is not noted: `leave`
    /// has already forgotten them).
    fn remember(&self, tenant: &str, ix: &str, visitor: &str) {
        let conns = lock(&self.conns);
        if conns.contains_key(&(tenant.to_string(), visitor.to_string())) {
            lock(&self.visitors).insert((tenant.to_string(), ix.to_string()), visitor.to_string());
        }
    }

    /// Registers the hub's tables with the engine's `/metrics`.
    fn register_tables(hub: &Arc<Hub>) {
        let tables = hub.engine.tables();
        let weak = Arc::downgrade(hub);
        let size = move |f: fn(&Hub) -> usize| {
            let weak = weak.clone();
            move || weak.upgrade().map(|h| f(&h)).unwrap_or(0)
        };
        tables.register(
            "chat_connections",
            Some(hub.config.max_connections),
            size(|h| h.open.open()),
        );
        tables.register(
            "chat_conversation_visitors",
            None,
            size(|h| lock(&h.visitors).len()),
        );
        tables.register(
            "chat_rate_buckets",
            Some(3 * limits::PRUNE_AT),
            size(|h| lock(&h.by_visitor).len() + lock(&h.by_ip).len() + lock(&h.typing).len()),
        );
    }

    /// Sends a frame to every connection of a visitor; false if none.
    fn to_visitor(&self, tenant: &str, visitor: &str, frame: &Value) -> bool {
        let text = frame.to_string();
        let conns = lock(&self.conns);
        let Some(list) = conns.get(&(tenant.to_string(), visitor.to_string())) else {
            return false;
        };
        for c in list {
            if c.tx.try_send(text.clone()).is_err() {
                tracing::debug!("chat connection {} is behind: a frame dropped", c.id);
            }
        }
        !list.is_empty()
    }

    fn to_conversation(&self, tenant: &str, ix: &str, frame: &Value) {
        let visitor = lock(&self.visitors)
            .get(&(tenant.to_string(), ix.to_string()))
            .cloned();
        if let Some(v) = visitor {
            self.to_visitor(tenant, &v, frame);
        }
    }

    fn join(&self, tenant: &str, visitor: &str) -> (u64, mpsc::Receiver<String>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        lock(&self.conns)
            .entry((tenant.to_string(), visitor.to_string()))
            .or_default()
            .push(Conn { id, tx });
        (id, rx)
    }

    fn leave(&self, tenant: &str, visitor: &str, id: u64) {
        let key = (tenant.to_string(), visitor.to_string());
        let mut conns = lock(&self.conns);
        if let Some(list) = conns.get_mut(&key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(&key);
                // Under the connections' lock (the order `remember`
                // takes too): a tab joining meanwhile is remembered after.
                lock(&self.visitors).retain(|(t, _), v| !(t == tenant && v == visitor));
            }
        }
    }
}

/// Delivers outbound chat messages to the visitor's open widgets. A
/// visitor who is away gets them in the history on return, so the
/// message counts as sent either way; the widget's receipt makes it
/// delivered.
pub struct ChatCourier {
    hub: std::sync::Weak<Hub>,
}

#[async_trait::async_trait]
impl Courier for ChatCourier {
    async fn deliver(
        &self,
        tenant: &str,
        message: &Message,
        _history: &[Message],
    ) -> Result<Delivered, DeliveryError> {
        let hub = self
            .hub
            .upgrade()
            .ok_or_else(|| DeliveryError::Retry("the chat channel is stopping".into()))?;
        let mut view = visitor_view(message);
        view["status"] = json!(MessageStatus::Sent);
        let live = hub.to_visitor(
            tenant,
            &message.to,
            &json!({"type": "message", "message": view}),
        );
        // Only a visitor with open widgets is followed (an absent one's
        // conversation is found again by its history on return).
        if live {
            hub.remember(tenant, &message.interaction, &message.to);
        }
        let mut d = Delivered::default();
        d.meta.insert("live".into(), live.to_string());
        Ok(d)
    }
}

/// Forwards what the widgets show from the event bus: agents typing,
/// status changes, conversations ending.
async fn follow_events(
    hub: std::sync::Weak<Hub>,
    mut rx: tokio::sync::broadcast::Receiver<plugboard_engine::StreamEvent>,
) {
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(hub) = hub.upgrade() else { return };
        let p = &ev.payload;
        let (Some(ix), Some(kind)) = (p["interaction"].as_str(), p["kind"].as_str()) else {
            continue;
        };
        let frame = match kind {
            "typing" if p["data"]["author"]["type"] != "customer" => {
                json!({"type": "typing", "on": p["data"]["on"]})
            }
            "message_status" => {
                json!({"type": "status", "id": p["data"]["id"], "status": p["data"]["status"]})
            }
            "state"
                if matches!(
                    p["data"]["state"].as_str(),
                    Some("closed" | "abandoned" | "failed")
                ) =>
            {
                json!({"type": "closed", "conversation": ix})
            }
            _ => continue,
        };
        hub.to_conversation(&ev.tenant, ix, &frame);
    }
}

/// The chat channel's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/chat/widget.js", get(widget_js))
        .route("/chat/{address}", get(page))
        .route("/chat/{address}/ws", get(connect))
        .with_state(hub)
}

async fn widget_js(State(hub): State<Arc<Hub>>) -> Response {
    let Some(path) = &hub.config.widget_js else {
        return (StatusCode::NOT_FOUND, "the widget is not built").into_response();
    };
    match tokio::fs::read(path).await {
        Ok(js) => (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            js,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("reading {}: {e}", path.display());
            (StatusCode::NOT_FOUND, "the widget is not built").into_response()
        }
    }
}

/// A page with the widget alone (to try an address).
async fn page(State(hub): State<Arc<Hub>>, Path(address): Path<String>) -> Response {
    let chat = match hub.engine.chat_address(&address).await {
        Ok(c) => c,
        Err(e) => return (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    };
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let title = esc(chat.widget.title.as_deref().unwrap_or("Chat with us"));
    Html(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><h1>{title}</h1><p>The chat button is in the corner.</p>\n\
         <script src=\"/chat/widget.js\" data-address=\"{}\" async></script></body></html>\n",
        esc(&chat.address.address)
    ))
    .into_response()
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn connect(
    State(hub): State<Arc<Hub>>,
    Path(address): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let chat = match hub.engine.chat_address(&address).await {
        Ok(c) => c,
        Err(EngineError::Core(plugboard_core::Error::NotFound(m))) => {
            return refuse(StatusCode::NOT_FOUND, "not_found", m);
        }
        Err(e) => {
            tracing::warn!("chat {address}: {e}");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again".into(),
            );
        }
    };
    if let Some(origin) = headers.get(header::ORIGIN)
        && !chat.widget.allows(origin.to_str().unwrap_or(""))
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "origin",
            "this site may not open the widget".into(),
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "websocket_required", e.to_string()),
    };
    let slot = match hub.open.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!("chat connections: {e}"),
            );
        }
    };
    let ip = peer.ip();
    // A frame holds at most the files' base64 and the text.
    let max_frame = (chat.widget.max_file_bytes as usize).saturating_mul(MAX_FILES) / 3 * 4
        + 2 * plugboard_core::message::MAX_TEXT_BYTES;
    ws.max_message_size(max_frame)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            session(socket, hub, chat, ip).await;
        })
}

async fn send(socket: &mut WebSocket, frame: &Value) -> bool {
    socket
        .send(WsMessage::Text(frame.to_string().into()))
        .await
        .is_ok()
}

/// An error frame for a tenant at one of its limits: which limit, and
/// when to try again.
fn refusal(code: &str, r: &plugboard_engine::capacity::Refusal, cid: Option<&str>) -> Value {
    let mut e = error(code, &r.to_string(), cid);
    e["limit"] = json!(r.code());
    e["retry_after_ms"] = json!(r.retry_after_s() * 1000);
    e
}

/// One widget connection: `hello`, then messages both ways.
async fn session(mut socket: WebSocket, hub: Arc<Hub>, chat: ChatAddress, ip: IpAddr) {
    let tenant = chat.tenant.clone();
    // One place among the tenant's chats at once for as long as the
    // connection lasts; the tenant's record brings its current limits.
    let lease = match hub.engine.tenant(&tenant).await {
        Ok(_) => hub.engine.capacity().lease_chat(&tenant),
        Err(e) => {
            tracing::warn!("chat of {tenant}: {e}");
            send(&mut socket, &error("unavailable", "try again", None)).await;
            return;
        }
    };
    let _lease = match lease {
        Ok(l) => l,
        Err(r) => {
            let detail = json!({"ip": ip.to_string(), "address": chat.address.address});
            hub.engine.capacity_refused(&tenant, "chat", &r, detail);
            send(&mut socket, &refusal("capacity", &r, None)).await;
            let _ = socket.send(WsMessage::Close(None)).await;
            return;
        }
    };
    let Some((visitor, name)) = hello(&mut socket, &hub, &chat).await else {
        let _ = socket.send(WsMessage::Close(None)).await;
        return;
    };
    let (conn, mut rx) = hub.join(&tenant, &visitor);
    if !history(&mut socket, &hub, &chat, &visitor).await {
        hub.leave(&tenant, &visitor, conn);
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            frame = socket.recv() => {
                let text = match frame {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let reply = match serde_json::from_str::<ClientFrame>(text.as_str()) {
                    Ok(f) => handle(&hub, &chat, &visitor, name.as_deref(), ip, f).await,
                    Err(e) => Some(error("bad_frame", &e.to_string(), None)),
                };
                if let Some(r) = reply
                    && !send(&mut socket, &r).await
                {
                    break;
                }
            }
            out = rx.recv() => match out {
                Some(text) => {
                    if socket.send(WsMessage::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = ping.tick() => {
                if socket.send(WsMessage::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    hub.leave(&tenant, &visitor, conn);
}

/// Waits for `hello` and answers `welcome`: the visitor id (and a display
/// name), or `None` when the connection should close.
async fn hello(
    socket: &mut WebSocket,
    hub: &Hub,
    chat: &ChatAddress,
) -> Option<(String, Option<String>)> {
    let first = tokio::time::timeout(HELLO_WITHIN, socket.recv())
        .await
        .ok()??;
    let Ok(WsMessage::Text(text)) = first else {
        return None;
    };
    let Ok(ClientFrame::Hello { token, user, name }) = serde_json::from_str(text.as_str()) else {
        send(
            socket,
            &error("hello_first", "the first frame is hello", None),
        )
        .await;
        return None;
    };
    let address = &chat.address.address;
    let name = name
        .map(|n| n.trim().chars().take(100).collect::<String>())
        .filter(|n| !n.is_empty() && !n.chars().any(char::is_control));
    let (visitor, token, verified) = match user {
        Some(u) => match hub.engine.verified_visitor(chat, &u.id, &u.hash).await {
            Ok(Some(v)) => (v, None, true),
            Ok(None) => {
                send(
                    socket,
                    &error("bad_identity", "the user's signature does not verify", None),
                )
                .await;
                return None;
            }
            Err(e) => {
                tracing::warn!("verifying a chat user of {}: {e}", chat.tenant);
                send(socket, &error("unavailable", "try again", None)).await;
                return None;
            }
        },
        None => {
            match token.and_then(|t| hub.engine.visitor_of_token(address, &t).map(|v| (v, t))) {
                Some((v, t)) => (v, Some(t), false),
                None => match hub.engine.new_visitor(address) {
                    Ok((v, t)) => (v, Some(t), false),
                    Err(e) => {
                        tracing::warn!("a chat visitor id: {e}");
                        send(socket, &error("unavailable", "try again", None)).await;
                        return None;
                    }
                },
            }
        }
    };
    let welcome = json!({
        "type": "welcome",
        "visitor": visitor,
        "token": token,
        "verified": verified,
        "title": chat.widget.title,
        "max_file_bytes": chat.widget.max_file_bytes,
        "max_text_bytes": plugboard_core::message::MAX_TEXT_BYTES,
    });
    send(socket, &welcome).await.then_some((visitor, name))
}

/// Sends the visitor's newest conversation.
async fn history(socket: &mut WebSocket, hub: &Hub, chat: &ChatAddress, visitor: &str) -> bool {
    let tenant = &chat.tenant;
    let messages = match hub
        .engine
        .thread_conversation(tenant, Channel::Chat, &thread_key(chat, visitor))
        .await
    {
        Ok(Some(ix)) => {
            hub.remember(tenant, &ix, visitor);
            match hub.engine.messages(tenant, &ix).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("chat history of {visitor}: {e}");
                    Vec::new()
                }
            }
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::warn!("chat history of {visitor}: {e}");
            Vec::new()
        }
    };
    let list: Vec<Value> = messages.iter().map(visitor_view).collect();
    send(socket, &json!({"type": "history", "messages": list})).await
}

/// The thread key of a visitor's conversations at an address.
fn thread_key(chat: &ChatAddress, visitor: &str) -> String {
    format!("{}\n{visitor}", chat.address.address)
}

/// Handles one frame after `hello`; the frame to answer with, if any.
async fn handle(
    hub: &Hub,
    chat: &ChatAddress,
    visitor: &str,
    name: Option<&str>,
    ip: IpAddr,
    frame: ClientFrame,
) -> Option<Value> {
    let tenant = &chat.tenant;
    match frame {
        ClientFrame::Hello { .. } => Some(error("hello_again", "hello comes once", None)),
        ClientFrame::Ping => Some(json!({"type": "pong"})),
        ClientFrame::Typing { on } => {
            let now = Instant::now();
            if lock(&hub.typing).take(visitor, now).is_ok()
                && let Ok(Some(ix)) = hub
                    .engine
                    .thread_conversation(tenant, Channel::Chat, &thread_key(chat, visitor))
                    .await
            {
                hub.engine.typing(tenant, &ix, &Author::Customer, on);
            }
            None
        }
        ClientFrame::Seen { ids, status } => {
            if !matches!(status, MessageStatus::Delivered | MessageStatus::Read) {
                return Some(error("bad_frame", "seen is delivered or read", None));
            }
            for id in ids.iter().take(100) {
                if let Err(e) = hub.engine.visitor_saw(tenant, visitor, id, status).await {
                    tracing::debug!("a receipt from {visitor}: {e}");
                }
            }
            None
        }
        ClientFrame::Message {
            client_id,
            text,
            files,
        } => Some(message(hub, chat, visitor, name, ip, client_id, text, files).await),
    }
}

/// A visitor's message: checked, rate-limited, stored, acknowledged.
#[allow(clippy::too_many_arguments)]
async fn message(
    hub: &Hub,
    chat: &ChatAddress,
    visitor: &str,
    name: Option<&str>,
    ip: IpAddr,
    client_id: String,
    text: String,
    files: Vec<protocol::InlineFile>,
) -> Value {
    let cid = Some(client_id.as_str());
    if client_id.is_empty() || client_id.len() > 100 {
        return error("bad_frame", "client_id is 1..=100 characters", cid);
    }
    if text.len() > plugboard_core::message::MAX_TEXT_BYTES {
        return error(
            "too_large",
            &format!(
                "a message is at most {} bytes of text; this one has {}",
                plugboard_core::message::MAX_TEXT_BYTES,
                text.len()
            ),
            cid,
        );
    }
    if files.len() > MAX_FILES {
        return error(
            "too_large",
            &format!("at most {MAX_FILES} files a message"),
            cid,
        );
    }
    let now = Instant::now();
    let limited = lock(&hub.by_visitor)
        .take(visitor, now)
        .and_then(|()| lock(&hub.by_ip).take(&ip.to_string(), now));
    if let Err(wait) = limited {
        let mut e = error(
            "rate_limited",
            "too many messages: wait and send it again",
            cid,
        );
        e["retry_after_ms"] = json!(wait.as_millis().max(1) as u64);
        return e;
    }
    if let Err(r) = hub.engine.capacity().admit_message(&chat.tenant, "chat") {
        let detail = json!({"visitor": visitor, "address": chat.address.address});
        hub.engine
            .capacity_refused(&chat.tenant, "chat", &r, detail);
        return refusal("rate_limited", &r, cid);
    }
    let mut stored = Vec::new();
    for f in files {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(f.data.as_bytes()) else {
            return error(
                "bad_frame",
                &format!("file {:?} is not base64", f.name),
                cid,
            );
        };
        if bytes.len() as u64 > chat.widget.max_file_bytes {
            return error(
                "too_large",
                &format!(
                    "file {:?} has {} bytes; at most {} here",
                    f.name,
                    bytes.len(),
                    chat.widget.max_file_bytes
                ),
                cid,
            );
        }
        let ct = if f.content_type.is_empty() {
            "application/octet-stream".to_string()
        } else {
            f.content_type
        };
        stored.push((f.name, ct, bytes));
    }
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("ip".to_string(), ip.to_string());
    let inbound = Inbound {
        channel: Channel::Chat,
        from: visitor.to_string(),
        name: name.map(str::to_string),
        to: chat.address.address.clone(),
        text,
        files: stored,
        client_id: Some(client_id.clone()),
        thread: vec![thread_key(chat, visitor)],
        meta,
        ..Default::default()
    };
    match hub.engine.receive(inbound).await {
        Ok(r) => {
            hub.remember(&chat.tenant, &r.message.interaction, visitor);
            // The visitor's other tabs show it too.
            if !r.duplicate {
                hub.to_visitor(
                    &chat.tenant,
                    visitor,
                    &json!({"type": "message", "message": visitor_view(&r.message)}),
                );
            }
            json!({
                "type": "ack",
                "client_id": client_id,
                "id": r.message.id,
                "conversation": r.message.interaction,
                "duplicate": r.duplicate,
                "at_ms": r.message.created_ms,
            })
        }
        Err(EngineError::Core(plugboard_core::Error::Invalid(m))) => error("invalid", &m, cid),
        Err(EngineError::OverLimit(r)) => refusal("over_limit", &r, cid),
        Err(e) => {
            tracing::warn!("a chat message of {visitor}: {e}");
            error("unavailable", "not stored: send it again", cid)
        }
    }
}
