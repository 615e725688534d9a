//! The SIP endpoint: UDP and TCP drivers around the sans-IO transaction
//! layer, and the user agent core that answers OPTIONS, sets up calls
//! (INVITE → 100 → [180] → 200 → ACK), handles re-INVITE (hold/resume),
//! INFO (DTMF), BYE and CANCEL, and sends BYE when a flow hangs up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_api::Binding;
use plugboard_api::{AppState, SessionStart};
use plugboard_core::Channel;
use plugboard_media::dtmf::{DtmfSource, parse_info_body};
use plugboard_media::sdp::{self, LocalMedia, Negotiated, SdpError};
use plugboard_media::tts::Espeak;
use plugboard_sip::digest::{Algorithm, AuthError, Authenticator, parse_credentials};
use plugboard_sip::{
    ClientTxId, Framed, Inbound, Message, Method, Peer, Request, RequestInfo, Response, ServerTxId,
    StreamFramer, TimerConfig, Transactions, Transmit, Transport, TxEvent, UasPolicy, new_branch,
    parse_datagram, random_token, reason_phrase, reply, screen,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::call::{self, CallCmd, CallSpec};
use crate::clock::MediaClock;
use crate::ports::{PortPair, PortPool};
use crate::{VoiceConfig, VoiceError};

/// A dialog: Call-ID and our tag.
pub(crate) type DialogKey = (String, String);

/// What the endpoint task reacts to.
pub(crate) enum Input {
    /// A UDP datagram.
    Datagram(Peer, Vec<u8>),
    /// A message framed on a TCP connection (or a framing error).
    Framed(Peer, Result<Message, plugboard_sip::ParseError>),
    /// A TCP connection opened; bytes for it go to the sender.
    TcpOpen(SocketAddr, mpsc::Sender<Vec<u8>>),
    /// A TCP connection closed.
    TcpClosed(SocketAddr),
    /// An outbound TCP connection could not be made.
    TcpFailed(SocketAddr, String),
    /// From a call task or a timer of ours.
    Call(CallOut),
}

/// What call tasks and dialog timers ask of the endpoint.
pub(crate) enum CallOut {
    /// The flow hung up (or media died): send BYE.
    Hangup(DialogKey),
    /// The call task ended.
    Ended(DialogKey),
    /// The ring time passed: answer.
    Answer(DialogKey),
    /// No ACK came for our 2xx (RFC 3261 §13.3.1.4): hang up.
    NoAck(DialogKey),
    /// Call out (dial, transfer): a new leg with this key and SDP offer.
    Dial {
        /// The new leg's Call-ID and our tag.
        leg: DialogKey,
        /// The tenant (for its trunks).
        tenant: String,
        /// A number (through the tenant's trunk) or a SIP URI.
        target: String,
        /// Caller id to present.
        caller_id: Option<String>,
        /// Our SDP offer.
        offer: String,
        /// Where leg events go.
        call: mpsc::Sender<CallCmd>,
    },
    /// Give up a leg that has not answered (CANCEL).
    CancelLeg(DialogKey),
    /// End a leg (BYE, or CANCEL if it has not answered).
    HangupLeg(DialogKey),
}

/// Digest user name and password for a trunk.
type Credentials = (String, String);

/// What happens on an outbound leg.
pub(crate) enum LegEvent {
    /// 180/183.
    Ringing,
    /// 2xx with an SDP answer.
    Answered(Negotiated),
    /// Refused, cancelled or timed out: the final status and reason.
    Failed(u16, String),
    /// The far end hung up.
    Hangup,
    /// The far end asked for a blind transfer (REFER) to this target.
    Refer(String),
}

/// An outbound leg: we are the UAC.
struct Leg {
    invite: Request,
    tx: ClientTxId,
    peer: Peer,
    call: mpsc::Sender<CallCmd>,
    cseq: u32,
    creds: Option<Credentials>,
    auth_tries: u8,
    ringing: bool,
    /// To (with the far end's tag) and Contact, once answered.
    answered: Option<(String, String)>,
}

enum DialogState {
    /// Ringing (180 sent); the 200 goes out at `Answer`.
    Early(Box<Response>),
    /// 200 sent, waiting for the ACK.
    WaitAck,
    /// ACK received.
    Confirmed,
}

struct Dialog {
    state: DialogState,
    invite: Request,
    invite_tx: ServerTxId,
    peer: Peer,
    local_cseq: u32,
    local: LocalMedia,
    call: mpsc::Sender<CallCmd>,
    retransmit: Option<JoinHandle<()>>,
    /// The `To` value we answer with (our URI and tag).
    local_party: String,
    /// We offered in a 200 (to the INVITE or a re-INVITE); the ACK must
    /// carry the answer.
    late_offer: bool,
}

/// The running voice channel.
pub struct VoiceHandle {
    /// Where SIP listens (UDP and TCP).
    pub sip_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for VoiceHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The methods the server answers and the bodies it reads.
fn policy() -> UasPolicy {
    UasPolicy {
        allow: vec![
            Method::Invite,
            Method::Ack,
            Method::Bye,
            Method::Cancel,
            Method::Options,
            Method::Info,
            Method::Register,
            Method::Refer,
            Method::Notify,
        ],
        supported: Vec::new(),
        // SDP for calls, DTMF bodies for INFO.
        accept: vec![
            "application/sdp".into(),
            "message/sipfrag".into(),
            "multipart/mixed".into(),
            "application/dtmf-relay".into(),
            "application/dtmf".into(),
        ],
    }
}

pub(crate) async fn start(
    config: VoiceConfig,
    app: Arc<AppState>,
) -> Result<VoiceHandle, VoiceError> {
    let (lo, hi) = config.rtp_ports;
    if lo > hi || (lo == hi && lo % 2 == 1) {
        return Err(VoiceError::Ports(lo, hi));
    }
    let bind_err = |addr: SocketAddr| {
        move |e: std::io::Error| VoiceError::Bind {
            addr,
            message: e.to_string(),
        }
    };
    let udp = Arc::new(
        UdpSocket::bind(config.sip)
            .await
            .map_err(bind_err(config.sip))?,
    );
    let sip_addr = udp.local_addr().map_err(bind_err(config.sip))?;
    let tcp = TcpListener::bind(sip_addr)
        .await
        .map_err(bind_err(sip_addr))?;
    let (tx, rx) = mpsc::channel::<Input>(4096);
    let mut tasks = Vec::new();
    // UDP reader.
    {
        let udp = udp.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match udp.recv_from(&mut buf).await {
                    Ok((n, addr)) => {
                        let peer = Peer {
                            addr,
                            transport: Transport::Udp,
                        };
                        if tx
                            .send(Input::Datagram(peer, buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    // ICMP errors surface here on Linux; keep serving.
                    Err(e) => tracing::debug!("sip udp recv: {e}"),
                }
            }
        }));
    }
    // TCP acceptor.
    {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match tcp.accept().await {
                    Ok((stream, addr)) => {
                        tokio::spawn(tcp_connection(stream, addr, tx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("sip tcp accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    let ip = config.advertised_ip();
    let pool = PortPool::new(config.sip.ip(), lo, hi);

    let endpoint = Endpoint {
        tx: Transactions::new(TimerConfig::default()),
        policy: policy(),
        udp,
        tcp: HashMap::new(),
        connecting: HashMap::new(),
        dialogs: HashMap::new(),
        pending: HashMap::new(),
        legs: HashMap::new(),
        leg_tx: HashMap::new(),
        sip_addr: SocketAddr::new(ip, sip_addr.port()),
        auth: {
            let mut a = Authenticator::new();
            if config.digest_md5_first {
                a.order = vec![Algorithm::Md5, Algorithm::Sha256];
            }
            a
        },
        tts: Arc::new(Espeak::new(config.espeak.clone(), 16 << 20)),
        config: Arc::new(config),
        app,
        pool,
        clock: MediaClock::start().map_err(|e| VoiceError::Clock(e.to_string()))?,
        inbox: tx,
    };
    tasks.push(tokio::spawn(endpoint.run(rx)));
    tracing::info!("SIP listening on {sip_addr} (UDP and TCP)");
    Ok(VoiceHandle { sip_addr, tasks })
}

async fn tcp_connection(stream: tokio::net::TcpStream, addr: SocketAddr, tx: mpsc::Sender<Input>) {
    let (mut rd, mut wr) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    if tx.send(Input::TcpOpen(addr, out_tx.clone())).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let peer = Peer {
        addr,
        transport: Transport::Tcp,
    };
    let mut framer = StreamFramer::new();
    let mut buf = vec![0u8; 16384];
    'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        framer.push(&buf[..n]);
        loop {
            match framer.next_message() {
                Ok(Some(Framed::Message(m))) => {
                    if tx.send(Input::Framed(peer, Ok(m))).await.is_err() {
                        break 'read;
                    }
                }
                Ok(Some(Framed::KeepAlive)) => {
                    let _ = out_tx.send(b"\r\n".to_vec()).await;
                }
                Ok(None) => break,
                Err(e) => {
                    // The stream cannot be resynchronised: answer if we
                    // can, then close (RFC 4475 ncl/mcl01 over TCP).
                    let _ = tx.send(Input::Framed(peer, Err(e))).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break 'read;
                }
            }
        }
    }
    let _ = tx.send(Input::TcpClosed(addr)).await;
    drop(out_tx);
    let _ = writer.await;
}

struct Endpoint {
    tx: Transactions,
    policy: UasPolicy,
    udp: Arc<UdpSocket>,
    tcp: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Messages for outbound TCP connections still being made.
    connecting: HashMap<SocketAddr, Vec<Vec<u8>>>,
    dialogs: HashMap<DialogKey, Dialog>,
    /// Pending INVITE server transactions → their dialog.
    pending: HashMap<ServerTxId, DialogKey>,
    /// Outbound legs, and their INVITE transactions.
    legs: HashMap<DialogKey, Leg>,
    leg_tx: HashMap<ClientTxId, DialogKey>,
    sip_addr: SocketAddr,
    auth: Authenticator,
    tts: Arc<Espeak>,
    config: Arc<VoiceConfig>,
    app: Arc<AppState>,
    pool: PortPool,
    clock: MediaClock,
    inbox: mpsc::Sender<Input>,
}

impl Endpoint {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        loop {
            let deadline = self.tx.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.input(input),
                    None => break,
                },
                _ = sleep => self.tx.handle_timeout(Instant::now()),
            }
            self.drain();
        }
    }

    fn drain(&mut self) {
        loop {
            let mut busy = false;
            while let Some(t) = self.tx.poll_transmit() {
                busy = true;
                self.send(t);
            }
            while let Some(ev) = self.tx.poll_event() {
                busy = true;
                self.event(ev);
            }
            if !busy {
                break;
            }
        }
    }

    fn send(&mut self, t: Transmit) {
        match t.to.transport {
            Transport::Udp => {
                if let Err(e) = self.udp.try_send_to(&t.bytes, t.to.addr) {
                    tracing::debug!("sip udp send to {}: {e}", t.to.addr);
                }
            }
            Transport::Tcp => match self.tcp.get(&t.to.addr) {
                Some(conn) => {
                    let _ = conn.try_send(t.bytes);
                }
                None => self.connect_tcp(t.to.addr, t.bytes),
            },
        }
    }

    /// Queues a message for a peer we have no TCP connection to, and
    /// connects (once) in the background; the connection is then served
    /// like an accepted one.
    fn connect_tcp(&mut self, addr: SocketAddr, bytes: Vec<u8>) {
        let queued = self.connecting.entry(addr).or_default();
        queued.push(bytes);
        if queued.len() > 1 {
            return;
        }
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(stream)) => tcp_connection(stream, addr, inbox).await,
                Ok(Err(e)) => {
                    let _ = inbox.send(Input::TcpFailed(addr, e.to_string())).await;
                }
                Err(_) => {
                    let _ = inbox
                        .send(Input::TcpFailed(addr, "connect timed out".into()))
                        .await;
                }
            }
        });
    }

    fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Datagram(peer, bytes) => {
                let inbound = screen(parse_datagram(&bytes), &self.policy);
                self.log_refusal(&inbound, peer);
                self.tx.handle(now, peer, inbound);
            }
            Input::Framed(peer, parsed) => {
                let inbound = screen(parsed, &self.policy);
                self.log_refusal(&inbound, peer);
                self.tx.handle(now, peer, inbound);
            }
            Input::TcpOpen(addr, conn) => {
                for bytes in self.connecting.remove(&addr).unwrap_or_default() {
                    let _ = conn.try_send(bytes);
                }
                self.tcp.insert(addr, conn);
            }
            Input::TcpFailed(addr, why) => {
                self.connecting.remove(&addr);
                tracing::info!("SIP over TCP to {addr}: {why}");
                // Legs waiting on that connection fail now, as a 503
                // (RFC 3261 §8.1.3.1), instead of at timer B.
                let failed: Vec<DialogKey> = self
                    .legs
                    .iter()
                    .filter(|(_, l)| {
                        l.peer.addr == addr
                            && l.peer.transport == Transport::Tcp
                            && l.answered.is_none()
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in failed {
                    self.fail_leg(key, 503, format!("cannot reach {addr} over TCP: {why}"));
                }
            }
            Input::TcpClosed(addr) => {
                self.tcp.remove(&addr);
            }
            Input::Call(out) => self.call_out(out),
        }
    }

    fn log_refusal(&self, inbound: &Inbound, peer: Peer) {
        match inbound {
            Inbound::Reply(r) => tracing::debug!("{} {} to {}", r.status, r.reason, peer.addr),
            Inbound::Drop(why) => tracing::debug!("dropped from {}: {why}", peer.addr),
            _ => {}
        }
    }

    fn respond(&mut self, id: ServerTxId, resp: Response) {
        self.tx.respond(Instant::now(), id, resp);
    }

    fn event(&mut self, ev: TxEvent) {
        match ev {
            TxEvent::Request {
                id,
                request,
                info,
                from,
            } => self.request(id, *request, *info, from),
            TxEvent::Ack { info, request, .. } => {
                let key = (
                    info.call_id.clone(),
                    info.to.tag().unwrap_or("").to_string(),
                );
                if let Some(d) = self.dialogs.get_mut(&key) {
                    if let Some(r) = d.retransmit.take() {
                        r.abort();
                    }
                    if d.late_offer {
                        d.late_offer = false;
                        let answer = match sdp_body(&request) {
                            Some(text) => sdp::parse(&text)
                                .and_then(|a| sdp::accept_answer(&a))
                                .map_err(|e| e.to_string()),
                            None => Err("the ACK carries no SDP answer to our offer".into()),
                        };
                        let _ = d.call.try_send(CallCmd::Answer(answer));
                    }
                    if matches!(d.state, DialogState::WaitAck) {
                        d.state = DialogState::Confirmed;
                        let _ = d.call.try_send(CallCmd::Confirmed);
                    }
                }
            }
            TxEvent::Cancelled { invite } => {
                if let Some(key) = self.pending.remove(&invite)
                    && let Some(d) = self.dialogs.remove(&key)
                {
                    let resp = reply(&d.invite, 487, reason_phrase(487), Some(&key.1));
                    self.respond(invite, resp);
                    let _ = d
                        .call
                        .try_send(CallCmd::RemoteHangup("cancelled by the caller".into()));
                }
            }
            TxEvent::Response { id, response } => self.leg_response(id, *response),
            TxEvent::NoAck { .. } => {}
            TxEvent::Timeout { id } => {
                if let Some(key) = self.leg_tx.remove(&id) {
                    self.fail_leg(key, 408, "no answer from the far end".into());
                }
            }
        }
    }

    fn request(&mut self, id: ServerTxId, req: Request, info: RequestInfo, from: Peer) {
        match req.method {
            Method::Options => {
                let mut resp = reply(&req, 200, "OK", Some(&random_token()));
                resp.headers.push("Allow", self.policy.allow_header());
                resp.headers.push("Accept", "application/sdp");
                resp.headers.push("Accept-Encoding", "identity");
                resp.headers.push("Accept-Language", "en");
                resp.headers.push("Supported", "");
                self.respond(id, resp);
            }
            Method::Register => self.register(id, req, info, from),
            Method::Invite if info.to.tag().is_none() => self.new_call(id, req, info, from),
            Method::Invite => self.reinvite(id, req, info),
            Method::Bye => {
                let key = (
                    info.call_id.clone(),
                    info.to.tag().unwrap_or("").to_string(),
                );
                if let Some(leg) = self.legs.remove(&key) {
                    self.leg_tx.remove(&leg.tx);
                    self.respond(id, reply(&req, 200, "OK", None));
                    let _ = leg.call.try_send(CallCmd::Leg(key, LegEvent::Hangup));
                    return;
                }
                match self.dialogs.remove(&key) {
                    Some(d) => {
                        if let Some(r) = d.retransmit {
                            r.abort();
                        }
                        self.pending.remove(&d.invite_tx);
                        self.respond(id, reply(&req, 200, "OK", None));
                        let _ = d
                            .call
                            .try_send(CallCmd::RemoteHangup("caller hung up (BYE)".into()));
                    }
                    None => self.respond(id, reply(&req, 481, reason_phrase(481), None)),
                }
            }
            Method::Refer => self.refer(id, req, info),
            Method::Notify => {
                // NOTIFYs of our own REFERs: nothing to act on.
                self.respond(id, reply(&req, 200, "OK", None));
            }
            Method::Info => {
                let key = (
                    info.call_id.clone(),
                    info.to.tag().unwrap_or("").to_string(),
                );
                let Some(d) = self.dialogs.get(&key) else {
                    self.respond(id, reply(&req, 481, reason_phrase(481), None));
                    return;
                };
                let ct = req.headers.get("Content-Type").unwrap_or("");
                let body = String::from_utf8_lossy(&req.body);
                match parse_info_body(ct, &body) {
                    Some(digit) => {
                        let _ = d.call.try_send(CallCmd::Dtmf(digit, DtmfSource::SipInfo));
                        self.respond(id, reply(&req, 200, "OK", None));
                    }
                    None => {
                        let mut r = reply(&req, 415, reason_phrase(415), None);
                        r.headers
                            .push("Accept", "application/dtmf-relay, application/dtmf");
                        self.respond(id, r);
                    }
                }
            }
            _ => {
                let mut r = reply(&req, 405, reason_phrase(405), Some(&random_token()));
                r.headers.push("Allow", self.policy.allow_header());
                self.respond(id, r);
            }
        }
    }

    /// The registrar (RFC 3261 §10.3) for agents' phones: the To URI's
    /// host names the tenant (the realm), its user the SIP user; digest
    /// with SHA-256 or MD5; bindings live in memory until they expire.
    fn register(&mut self, id: ServerTxId, req: Request, info: RequestInfo, from: Peer) {
        let now_s = plugboard_core::now_ms() / 1000;
        let aor = plugboard_sip::Uri::parse(&info.to.uri).ok();
        let (Some(tenant), Some(user)) = (
            aor.as_ref().map(|u| u.host.to_ascii_lowercase()),
            aor.as_ref().and_then(|u| u.user_unescaped()),
        ) else {
            // RFC 4475 unksm2: the AOR must be a SIP URI with a user.
            return self.refuse(
                id,
                &req,
                400,
                Some("the To header must be sip:user@tenant".into()),
            );
        };
        if !self.app.tenant_exists(&tenant) {
            return self.refuse(id, &req, 404, Some(format!("no tenant {tenant}")));
        }
        let Some(creds) = credentials_for(&req, &tenant) else {
            return self.challenge(id, &req, &tenant, false);
        };
        let stored = self.app.sip_user(&tenant, &user).ok().flatten();
        let verdict = if creds.username != user {
            Err(AuthError::Bad)
        } else {
            self.auth.verify(&creds, "REGISTER", &tenant, now_s, |alg| {
                stored.as_ref().map(|u| match alg {
                    Algorithm::Md5 => u.ha1_md5.clone(),
                    Algorithm::Sha256 => u.ha1_sha256.clone(),
                })
            })
        };
        match verdict {
            Err(AuthError::Stale) => return self.challenge(id, &req, &tenant, true),
            Err(AuthError::Bad) => {
                return self.refuse(id, &req, 403, Some("wrong user name or password".into()));
            }
            Ok(()) => {}
        }
        let default_expires: u64 = req
            .headers
            .get("Expires")
            .and_then(|e| e.trim().parse().ok())
            .unwrap_or(3600);
        let now_ms = plugboard_core::now_ms();
        let mut bindings = self.app.bindings(&tenant, &user);
        if info.contacts.iter().any(|c| c.uri == "*") {
            if default_expires != 0 || info.contacts.len() != 1 {
                return self.refuse(id, &req, 400, Some("Contact: * needs Expires: 0".into()));
            }
            bindings.clear();
        }
        for c in info.contacts.iter().filter(|c| c.uri != "*") {
            let expires = plugboard_sip::headers::param(&c.params, "expires")
                .flatten()
                .and_then(|e| e.parse::<u64>().ok())
                .unwrap_or(default_expires)
                .min(3600);
            if expires > 0 && expires < 60 {
                let mut r = reply(&req, 423, reason_phrase(423), Some(&random_token()));
                r.headers.push("Min-Expires", "60");
                return self.respond(id, r);
            }
            bindings.retain(|b| b.contact != c.uri);
            if expires > 0 {
                bindings.push(Binding {
                    contact: c.uri.clone(),
                    expires_ms: now_ms + expires * 1000,
                    source: format!("{} {}", from.transport.as_str(), from.addr),
                });
            }
        }
        let live = self.app.set_bindings(&tenant, &user, bindings);
        let mut ok = reply(&req, 200, "OK", Some(&random_token()));
        for b in &live {
            let left = b.expires_ms.saturating_sub(now_ms) / 1000;
            ok.headers
                .push("Contact", format!("<{}>;expires={left}", b.contact));
        }
        self.respond(id, ok);
    }

    fn contact(&self, user: &str, transport: Transport) -> String {
        let user: String = user
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "+-_.".contains(*c))
            .collect();
        let at = if user.is_empty() {
            String::new()
        } else {
            format!("{user}@")
        };
        format!("<sip:{at}{}{}>", self.sip_addr, transport_param(transport))
    }

    /// Answers 401 with our digest challenges for `realm` (a tenant id).
    fn challenge(&mut self, id: ServerTxId, req: &Request, realm: &str, stale: bool) {
        let now_s = plugboard_core::now_ms() / 1000;
        let mut r = reply(req, 401, reason_phrase(401), Some(&random_token()));
        for c in self.auth.challenges(realm, now_s, stale) {
            r.headers.push("WWW-Authenticate", c);
        }
        self.respond(id, r);
    }

    fn refuse(&mut self, id: ServerTxId, req: &Request, status: u16, warning: Option<String>) {
        let mut r = reply(req, status, reason_phrase(status), Some(&random_token()));
        if let Some(w) = warning {
            r.headers.push("Warning", format!("399 plugboard \"{w}\""));
        }
        if status == 503 {
            r.headers.push("Retry-After", "5");
        }
        self.respond(id, r);
    }

    /// Whether a call to the tenant's numbers from `from` may go on: always
    /// when no trunk of the tenant restricts inbound calls; else when it
    /// comes from a trunk's `inbound_ips`, or authenticates with digest as
    /// a trunk that has `inbound_digest`. Otherwise the INVITE has been
    /// answered (401 challenge, or 403) and this returns false.
    fn inbound_allowed(&mut self, id: ServerTxId, req: &Request, tenant: &str, from: Peer) -> bool {
        let trunks = self.app.trunks(tenant);
        let ips: Vec<std::net::IpAddr> = trunks
            .iter()
            .flat_map(|t| t.inbound_ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect();
        let digest: Vec<&plugboard_core::Trunk> =
            trunks.iter().filter(|t| t.inbound_digest).collect();
        if (ips.is_empty() && digest.is_empty()) || ips.contains(&from.addr.ip()) {
            return true;
        }
        if digest.is_empty() {
            self.refuse(
                id,
                req,
                403,
                Some(format!(
                    "{} is not one of the tenant's trunks",
                    from.addr.ip()
                )),
            );
            return false;
        }
        let now_s = plugboard_core::now_ms() / 1000;
        let creds = credentials_for(req, tenant);
        let verdict = match &creds {
            None => Err(AuthError::Stale),
            Some(c) => {
                let trunk = digest
                    .iter()
                    .find(|t| t.username.as_deref() == Some(c.username.as_str()));
                self.auth.verify(c, "INVITE", tenant, now_s, |alg| {
                    let t = trunk?;
                    Some(plugboard_sip::digest::ha1(
                        alg,
                        t.username.as_deref()?,
                        tenant,
                        t.password.as_deref()?,
                    ))
                })
            }
        };
        match verdict {
            Ok(()) => true,
            Err(AuthError::Stale) => {
                self.challenge(id, req, tenant, creds.is_some());
                false
            }
            Err(AuthError::Bad) => {
                self.refuse(id, req, 403, Some("wrong trunk credentials".into()));
                false
            }
        }
    }

    fn new_call(&mut self, id: ServerTxId, req: Request, info: RequestInfo, from: Peer) {
        let dialled = info.uri.user_unescaped().unwrap_or_default();
        let route = match self.app.route_address(&dialled) {
            Ok(Some((tenant, address))) if address.channel == Channel::Voice => {
                Some((tenant, address))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!("address lookup: {e}");
                return self.refuse(id, &req, 500, Some("address lookup failed".into()));
            }
        };
        let Some((tenant, address)) = route else {
            return self.refuse(id, &req, 404, Some(format!("no voice address {dialled}")));
        };
        if !self.inbound_allowed(id, &req, &tenant, from) {
            return;
        }
        // No SDP in the INVITE is a late offer (RFC 3261 §13.2.1): we offer
        // in the 200 and the answer comes in the ACK.
        let offer = match sdp_body(&req).map(|text| sdp::parse(&text)) {
            None => None,
            Some(Ok(o)) => Some(o),
            Some(Err(SdpError::Syntax(m))) => return self.refuse(id, &req, 400, Some(m)),
            Some(Err(SdpError::NotAcceptable(m))) => {
                return self.refuse(id, &req, 488, Some(m));
            }
        };
        let Some(media) = self.pool.take() else {
            return self.refuse(id, &req, 503, Some("no free RTP ports".into()));
        };
        let local = LocalMedia {
            ip: self.sip_addr.ip(),
            port: media.port,
            session_id: u64::from(media.port) * 1_000_003 + (plugboard_core::now_ms() % 1_000_000),
            version: 1,
        };
        let (body, negotiated) = match &offer {
            Some(offer) => match sdp::answer(offer, &local) {
                Ok(a) => a,
                Err(e) => return self.refuse(id, &req, 488, Some(e.to_string())),
            },
            None => (
                sdp::offer(&local, LATE_OFFER_DTMF_PT, sdp::Direction::SendRecv),
                // Nowhere to send until the ACK brings the answer.
                Negotiated {
                    law: plugboard_media::g711::Law::Mu,
                    payload_type: 0,
                    dtmf_pt: Some(LATE_OFFER_DTMF_PT),
                    remote: SocketAddr::from(([0, 0, 0, 0], 0)),
                    remote_direction: sdp::Direction::SendRecv,
                    local_direction: sdp::Direction::SendRecv,
                },
            ),
        };
        let caller = info
            .from
            .uri
            .split_once(':')
            .map(|(_, rest)| rest.split(['@', ';']).next().unwrap_or(rest).to_string())
            .unwrap_or_default();
        let start = SessionStart {
            tenant: tenant.clone(),
            flow: address.flow.clone(),
            version: None,
            channel: Channel::Voice,
            from: plugboard_sip::unescape(&caller),
            to: address.address.clone(),
            attributes: Default::default(),
            simulated: false,
            now_ms: None,
        };
        let app = self.app.clone();
        let session = tokio::task::block_in_place(|| app.open_session(start));
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot start flow {} of {tenant}: {e:?}", address.flow);
                return self.refuse(id, &req, 480, Some("the flow is not available".into()));
            }
        };
        let tag = random_token();
        let key: DialogKey = (info.call_id.clone(), tag.clone());
        session.note(
            "call",
            json!({
                "sip_call_id": info.call_id,
                "from": info.from.uri,
                "to": req.uri,
                "signalling": format!("{} {}", from.transport.as_str(), from.addr),
                "codec": negotiated.law.name(),
                "telephone_event": negotiated.dtmf_pt,
                "remote_rtp": negotiated.remote.to_string(),
                "local_rtp": media.port,
                "sdp": if offer.is_some() { "offer in INVITE" } else { "late offer: ours in the 200, answer in the ACK" },
            }),
        );
        if let Err(e) = session.checkpoint() {
            tracing::error!("cannot record the call: {e}");
            return self.refuse(id, &req, 500, Some("cannot store the call record".into()));
        }
        let mut ok = reply(&req, 200, "OK", Some(&tag));
        let local_party = ok.headers.get("To").unwrap_or("").to_string();
        for rr in req.headers.all("Record-Route") {
            ok.headers.push("Record-Route", rr);
        }
        let dialled_user = info.uri.user.clone().unwrap_or_default();
        ok.headers
            .push("Contact", self.contact(&dialled_user, from.transport));
        ok.headers.push("Allow", self.policy.allow_header());
        ok.headers.push("Content-Type", "application/sdp");
        ok.body = body.into_bytes();
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        self.spawn_call(
            key.clone(),
            session,
            media,
            negotiated,
            (cmd_tx.clone(), cmd_rx),
            local.clone(),
        );
        let ring = self.config.answer_delay;
        let state = if ring.is_zero() {
            DialogState::WaitAck
        } else {
            DialogState::Early(Box::new(ok.clone()))
        };
        self.dialogs.insert(
            key.clone(),
            Dialog {
                state,
                invite: req.clone(),
                invite_tx: id,
                peer: from,
                local_cseq: 1,
                local,
                call: cmd_tx,
                retransmit: None,
                local_party,
                late_offer: offer.is_none(),
            },
        );
        self.pending.insert(id, key.clone());
        if ring.is_zero() {
            self.send_ok(&key, ok);
        } else {
            let mut ringing = reply(&req, 180, "Ringing", Some(&tag));
            ringing
                .headers
                .push("Contact", self.contact(&dialled_user, from.transport));
            self.respond(id, ringing);
            let inbox = self.inbox.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ring).await;
                let _ = inbox.send(Input::Call(CallOut::Answer(key))).await;
            });
        }
    }

    fn spawn_call(
        &self,
        key: DialogKey,
        session: plugboard_api::FlowSession,
        media: PortPair,
        negotiated: Negotiated,
        (self_tx, cmds): (mpsc::Sender<CallCmd>, mpsc::Receiver<CallCmd>),
        local: LocalMedia,
    ) {
        let spec = CallSpec {
            key,
            session,
            media,
            negotiated,
            cmds,
            endpoint: self.inbox.clone(),
            app: self.app.clone(),
            tts: self.tts.clone(),
            config: self.config.clone(),
            cname: format!("plugboard@{}", local.ip),
            pool: self.pool.clone(),
            self_tx,
            clock: self.clock.clone(),
        };
        tokio::spawn(call::run(spec));
    }

    /// Sends a 2xx on the INVITE transaction and, over UDP, retransmits it
    /// (T1 doubling to T2) until the ACK or 64·T1 (RFC 3261 §13.3.1.4).
    fn send_ok(&mut self, key: &DialogKey, ok: Response) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let id = d.invite_tx;
        d.state = DialogState::WaitAck;
        let peer = d.peer;
        let bytes = ok.to_bytes();
        let retx = (peer.transport == Transport::Udp).then(|| {
            let udp = self.udp.clone();
            let inbox = self.inbox.clone();
            let key = key.clone();
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let t1 = Duration::from_millis(500);
                let mut wait = t1;
                let mut total = Duration::ZERO;
                while total < 64 * t1 {
                    tokio::time::sleep(wait).await;
                    total += wait;
                    let _ = udp.send_to(&bytes, peer.addr).await;
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
                let _ = inbox.send(Input::Call(CallOut::NoAck(key))).await;
            })
        });
        if let Some(d) = self.dialogs.get_mut(key) {
            d.retransmit = retx;
        }
        self.pending.remove(&id);
        self.respond(id, ok);
    }

    fn reinvite(&mut self, id: ServerTxId, req: Request, info: RequestInfo) {
        let key = (
            info.call_id.clone(),
            info.to.tag().unwrap_or("").to_string(),
        );
        let Some(d) = self.dialogs.get_mut(&key) else {
            self.respond(id, reply(&req, 481, reason_phrase(481), None));
            return;
        };
        if !matches!(d.state, DialogState::Confirmed) {
            // RFC 3261 §14.2: an INVITE while ours is pending.
            self.respond(id, reply(&req, 491, reason_phrase(491), None));
            return;
        }
        let parsed = sdp_body(&req).map(|t| sdp::parse(&t));
        d.local.version += 1;
        let (answer, negotiated) = match parsed {
            Some(Ok(offer)) => match sdp::answer(&offer, &d.local) {
                Ok((a, n)) => (a, Some(n)),
                Err(e) => {
                    d.local.version -= 1;
                    let mut r = reply(&req, 488, reason_phrase(488), None);
                    r.headers.push("Warning", format!("399 plugboard \"{e}\""));
                    self.respond(id, r);
                    return;
                }
            },
            Some(Err(e)) => {
                d.local.version -= 1;
                let mut r = reply(&req, 400, reason_phrase(400), None);
                r.headers.push("Warning", format!("399 plugboard \"{e}\""));
                self.respond(id, r);
                return;
            }
            None => {
                // No offer (a session refresh, or a peer asking for ours):
                // we offer what we have and the answer comes in the ACK
                // (RFC 3261 §14.2); the media stays as it is until then.
                d.late_offer = true;
                (
                    sdp::offer(&d.local, LATE_OFFER_DTMF_PT, sdp::Direction::SendRecv),
                    None,
                )
            }
        };
        if let Some(n) = negotiated {
            let _ = d.call.try_send(CallCmd::Media(n));
        }
        d.invite_tx = id;
        let mut ok = reply(&req, 200, "OK", None);
        let user = Some(d.invite.uri.clone())
            .and_then(|u| plugboard_sip::Uri::parse(&u).ok())
            .and_then(|u| u.user)
            .unwrap_or_default();
        let peer = d.peer;
        ok.headers
            .push("Contact", self.contact(&user, peer.transport));
        ok.headers.push("Content-Type", "application/sdp");
        ok.body = answer.into_bytes();
        self.send_ok(&key, ok);
    }

    fn call_out(&mut self, out: CallOut) {
        match out {
            CallOut::Answer(key) => {
                let ok = match self.dialogs.get(&key).map(|d| &d.state) {
                    Some(DialogState::Early(ok)) => (**ok).clone(),
                    _ => return,
                };
                self.send_ok(&key, ok);
            }
            CallOut::Hangup(key) => self.bye(&key),
            CallOut::NoAck(key) => {
                if let Some(d) = self.dialogs.get(&key)
                    && matches!(d.state, DialogState::WaitAck)
                {
                    let _ = d
                        .call
                        .try_send(CallCmd::RemoteHangup("no ACK for our 200 OK".into()));
                    self.bye(&key);
                }
            }
            CallOut::Dial {
                leg,
                tenant,
                target,
                caller_id,
                offer,
                call,
            } => self.dial(leg, &tenant, &target, caller_id, offer, call),
            CallOut::CancelLeg(key) => self.cancel_leg(&key),
            CallOut::HangupLeg(key) => {
                let answered = self.legs.get(&key).map(|l| l.answered.is_some());
                match answered {
                    Some(true) => self.bye_leg(&key),
                    Some(false) => self.cancel_leg(&key),
                    None => {}
                }
            }
            CallOut::Ended(key) => {
                if let Some(d) = self.dialogs.remove(&key) {
                    if let Some(r) = d.retransmit {
                        r.abort();
                    }
                    self.pending.remove(&d.invite_tx);
                }
            }
        }
    }

    /// Ends a dialog from our side: BYE once confirmed (or waiting for the
    /// ACK), or a final 480 while still ringing.
    fn bye(&mut self, key: &DialogKey) {
        let Some(mut d) = self.dialogs.remove(key) else {
            return;
        };
        if let Some(r) = d.retransmit.take() {
            r.abort();
        }
        if let DialogState::Early(_) = d.state {
            self.pending.remove(&d.invite_tx);
            let resp = reply(&d.invite, 480, reason_phrase(480), Some(&key.1));
            self.respond(d.invite_tx, resp);
            return;
        }
        let inv = &d.invite;
        let target = inv
            .headers
            .get("Contact")
            .and_then(|c| plugboard_sip::NameAddr::parse("Contact", c).ok())
            .map(|c| c.uri)
            .unwrap_or_else(|| {
                inv.headers
                    .get("From")
                    .and_then(|f| plugboard_sip::NameAddr::parse("From", f).ok())
                    .map(|f| f.uri)
                    .unwrap_or_default()
            });
        d.local_cseq += 1;
        let mut bye = Request::new(Method::Bye, target);
        bye.headers
            .push("Via", via(d.peer.transport, self.sip_addr));
        bye.headers.push("Max-Forwards", "70");
        bye.headers.push("From", d.local_party.clone());
        if let Some(from) = inv.headers.get("From") {
            bye.headers.push("To", from);
        }
        bye.headers.push("Call-ID", key.0.clone());
        bye.headers.push("CSeq", format!("{} BYE", d.local_cseq));
        for rr in inv.headers.all("Record-Route") {
            bye.headers.push("Route", rr);
        }
        // Sent back the way the INVITE came (symmetric signalling: the
        // same TCP connection, or the source address over UDP).
        self.tx.send_request(Instant::now(), d.peer, bye);
    }
}

impl Endpoint {
    /// Where a dial target goes: a SIP URI directly, a number through the
    /// tenant's `default` trunk (or its only one), with the trunk's
    /// credentials.
    fn resolve(
        &self,
        tenant: &str,
        target: &str,
    ) -> Result<(String, Peer, Option<Credentials>), (u16, String)> {
        let (uri, hostport, creds, transport) = if target.starts_with("sip:") {
            let u = plugboard_sip::Uri::parse(target).map_err(|e| (400, e.to_string()))?;
            let transport = match u.param("transport").flatten() {
                Some(t) if t.eq_ignore_ascii_case("tcp") => "tcp",
                _ => "udp",
            };
            let hp = format!("{}:{}", u.host, u.port.unwrap_or(5060));
            (target.to_string(), hp, None, transport.to_string())
        } else {
            let number: String = target
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '+' || *c == '*' || *c == '#')
                .collect();
            if number.is_empty() {
                return Err((400, format!("{target:?} is neither a number nor a SIP URI")));
            }
            let trunks = self.app.trunks(tenant);
            let trunk = trunks
                .iter()
                .find(|t| t.name == "default")
                .or(trunks.first())
                .ok_or((
                    503,
                    "the tenant has no trunk for outbound calls".to_string(),
                ))?;
            let creds = match (&trunk.username, &trunk.password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            };
            (
                format!("sip:{number}@{}", trunk.host),
                trunk.host.clone(),
                creds,
                trunk.transport.clone(),
            )
        };
        let transport = if transport.eq_ignore_ascii_case("tcp") {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
            .ok()
            .and_then(|mut a| a.next())
            .ok_or((404, format!("cannot resolve {hostport}")))?;
        Ok((uri, Peer { addr, transport }, creds))
    }

    fn dial(
        &mut self,
        key: DialogKey,
        tenant: &str,
        target: &str,
        caller_id: Option<String>,
        offer: String,
        call: mpsc::Sender<CallCmd>,
    ) {
        let (uri, peer, creds) = match self.resolve(tenant, target) {
            Ok(r) => r,
            Err((status, why)) => {
                let _ = call.try_send(CallCmd::Leg(key, LegEvent::Failed(status, why)));
                return;
            }
        };
        let user: String = caller_id
            .as_deref()
            .unwrap_or("plugboard")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '+')
            .collect();
        let mut invite = Request::new(Method::Invite, uri.clone());
        invite
            .headers
            .push("Via", via(peer.transport, self.sip_addr));
        invite.headers.push("Max-Forwards", "70");
        invite.headers.push(
            "From",
            format!("<sip:{user}@{}>;tag={}", self.sip_addr.ip(), key.1),
        );
        invite.headers.push("To", format!("<{uri}>"));
        invite.headers.push("Call-ID", key.0.clone());
        invite.headers.push("CSeq", "1 INVITE");
        invite.headers.push(
            "Contact",
            format!(
                "<sip:plugboard@{}{}>",
                self.sip_addr,
                transport_param(peer.transport)
            ),
        );
        invite.headers.push("Allow", self.policy.allow_header());
        invite.headers.push("Content-Type", "application/sdp");
        invite.body = offer.into_bytes();
        let tx = self.tx.send_request(Instant::now(), peer, invite.clone());
        self.leg_tx.insert(tx, key.clone());
        self.legs.insert(
            key,
            Leg {
                invite,
                tx,
                peer,
                call,
                cseq: 1,
                creds,
                auth_tries: 0,
                ringing: false,
                answered: None,
            },
        );
    }

    fn leg_response(&mut self, id: ClientTxId, resp: Response) {
        let Some(key) = self.leg_tx.get(&id).cloned() else {
            return;
        };
        let Some(leg) = self.legs.get_mut(&key) else {
            return;
        };
        let status = resp.status;
        if status < 200 {
            if matches!(status, 180 | 183) && !leg.ringing {
                leg.ringing = true;
                let _ = leg
                    .call
                    .try_send(CallCmd::Leg(key.clone(), LegEvent::Ringing));
            }
            return;
        }
        if status < 300 {
            let to = resp.headers.get("To").unwrap_or("").to_string();
            let target = resp
                .headers
                .get("Contact")
                .and_then(|c| plugboard_sip::NameAddr::parse("Contact", c).ok())
                .map(|c| c.uri)
                .unwrap_or_else(|| leg.invite.uri.clone());
            let first = leg.answered.is_none();
            leg.answered = Some((to.clone(), target.clone()));
            // The ACK for a 2xx is its own request (RFC 3261 §13.2.2.4),
            // repeated for every retransmitted 2xx.
            let ack = leg_request(self.sip_addr, &key.0, leg, Method::Ack, leg.cseq);
            let peer = leg.peer;
            let call = leg.call.clone();
            if let Some(ack) = ack {
                self.send(Transmit {
                    to: peer,
                    bytes: ack.to_bytes(),
                });
            }
            if first {
                let answer = String::from_utf8_lossy(&resp.body).into_owned();
                match sdp::parse(&answer).and_then(|a| sdp::accept_answer(&a)) {
                    Ok(n) => {
                        let _ = call.try_send(CallCmd::Leg(key.clone(), LegEvent::Answered(n)));
                    }
                    Err(e) => {
                        let _ = call.try_send(CallCmd::Leg(
                            key.clone(),
                            LegEvent::Failed(488, e.to_string()),
                        ));
                        self.bye_leg(&key);
                    }
                }
            }
            return;
        }
        if matches!(status, 401 | 407) && leg.auth_tries == 0 {
            let header = if status == 401 {
                "WWW-Authenticate"
            } else {
                "Proxy-Authenticate"
            };
            let answer = leg.creds.as_ref().and_then(|(u, p)| {
                resp.headers.all(header).find_map(|ch| {
                    plugboard_sip::digest::answer_challenge(
                        ch,
                        "INVITE",
                        &leg.invite.uri,
                        u,
                        p,
                        &random_token(),
                    )
                })
            });
            if let Some(value) = answer {
                leg.auth_tries += 1;
                leg.cseq += 1;
                let mut invite = leg.invite.clone();
                invite
                    .headers
                    .set("Via", via(leg.peer.transport, self.sip_addr));
                invite.headers.set("CSeq", format!("{} INVITE", leg.cseq));
                invite.headers.set(
                    if status == 401 {
                        "Authorization"
                    } else {
                        "Proxy-Authorization"
                    },
                    value,
                );
                let peer = leg.peer;
                leg.invite = invite.clone();
                self.leg_tx.remove(&id);
                let tx = self.tx.send_request(Instant::now(), peer, invite);
                if let Some(leg) = self.legs.get_mut(&key) {
                    leg.tx = tx;
                }
                self.leg_tx.insert(tx, key);
                return;
            }
        }
        self.leg_tx.remove(&id);
        self.fail_leg(key, status, resp.reason.clone());
    }

    /// Ends an outbound leg that was not answered and tells its call why.
    fn fail_leg(&mut self, key: DialogKey, status: u16, why: String) {
        if let Some(leg) = self.legs.remove(&key) {
            self.leg_tx.remove(&leg.tx);
            let _ = leg
                .call
                .try_send(CallCmd::Leg(key, LegEvent::Failed(status, why)));
        }
    }

    /// A blind transfer asked by the far end of one of our legs (an agent
    /// passing the caller on): accepted with 202 and a final NOTIFY, and
    /// the call task calls the target and bridges the caller to it. A
    /// REFER from the caller's side is refused (403).
    fn refer(&mut self, id: ServerTxId, req: Request, info: RequestInfo) {
        let key = (
            info.call_id.clone(),
            info.to.tag().unwrap_or("").to_string(),
        );
        let target = req
            .headers
            .get("Refer-To")
            .and_then(|r| plugboard_sip::NameAddr::parse("Refer-To", r).ok())
            .map(|n| n.uri.split('?').next().unwrap_or("").to_string());
        let Some(leg) = self.legs.get_mut(&key) else {
            let status = if self.dialogs.contains_key(&key) {
                403
            } else {
                481
            };
            return self.respond(id, reply(&req, status, reason_phrase(status), None));
        };
        let Some(target) = target.filter(|t| t.starts_with("sip:")) else {
            return self.respond(id, reply(&req, 400, "Refer-To must be a SIP URI", None));
        };
        let call = leg.call.clone();
        self.respond(id, reply(&req, 202, "Accepted", None));
        // RFC 3515 §2.4.4/2.4.5: report the outcome. The transfer is blind,
        // so the referrer learns only that it was accepted.
        if let Some(notify) = self.in_leg_request(&key, Method::Notify) {
            let mut notify = notify;
            notify.headers.push("Event", "refer");
            notify
                .headers
                .push("Subscription-State", "terminated;reason=noresource");
            notify
                .headers
                .push("Content-Type", "message/sipfrag;version=2.0");
            notify.body = b"SIP/2.0 200 OK\r\n".to_vec();
            let peer = self.legs.get(&key).map(|l| l.peer);
            if let Some(peer) = peer {
                self.tx.send_request(Instant::now(), peer, notify);
            }
        }
        let _ = call.try_send(CallCmd::Leg(key, LegEvent::Refer(target)));
    }

    /// A new request inside an answered leg (BYE, NOTIFY): next CSeq,
    /// the leg's tags and remote target.
    fn in_leg_request(&mut self, key: &DialogKey, method: Method) -> Option<Request> {
        let sip_addr = self.sip_addr;
        let leg = self.legs.get_mut(key)?;
        leg.answered.as_ref()?;
        leg.cseq += 1;
        leg_request(sip_addr, &key.0, leg, method, leg.cseq)
    }

    fn cancel_leg(&mut self, key: &DialogKey) {
        if let Some(leg) = self.legs.get(key)
            && leg.answered.is_none()
        {
            let cancel = plugboard_sip::transaction::cancel_for(&leg.invite);
            let peer = leg.peer;
            self.tx.send_request(Instant::now(), peer, cancel);
        }
    }

    fn bye_leg(&mut self, key: &DialogKey) {
        let bye = self.in_leg_request(key, Method::Bye);
        let Some(leg) = self.legs.remove(key) else {
            return;
        };
        self.leg_tx.remove(&leg.tx);
        if let Some(bye) = bye {
            self.tx.send_request(Instant::now(), leg.peer, bye);
        }
    }
}

/// The request's digest credentials for `realm`, if any.
fn credentials_for(req: &Request, realm: &str) -> Option<plugboard_sip::digest::Credentials> {
    req.headers
        .all("Authorization")
        .filter_map(parse_credentials)
        .find(|c| c.realm == realm)
}

/// The telephone-event payload type we offer.
const LATE_OFFER_DTMF_PT: u8 = 101;

/// A Via header for a request we send over `transport`.
fn via(transport: Transport, sip_addr: SocketAddr) -> String {
    format!(
        "SIP/2.0/{} {sip_addr};branch={};rport",
        transport.as_str(),
        new_branch()
    )
}

/// The `;transport=` URI parameter for a Contact (none for UDP).
fn transport_param(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "",
        Transport::Tcp => ";transport=tcp",
    }
}

/// A request inside an answered leg (ACK, BYE, NOTIFY): the leg's From,
/// the far end's To and Contact, and the given CSeq number.
fn leg_request(
    sip_addr: SocketAddr,
    call_id: &str,
    leg: &Leg,
    method: Method,
    cseq: u32,
) -> Option<Request> {
    let (to, target) = leg.answered.clone()?;
    let mut r = Request::new(method.clone(), target);
    r.headers.push("Via", via(leg.peer.transport, sip_addr));
    r.headers.push("Max-Forwards", "70");
    if let Some(from) = leg.invite.headers.get("From") {
        r.headers.push("From", from);
    }
    r.headers.push("To", to);
    r.headers.push("Call-ID", call_id.to_string());
    r.headers.push("CSeq", format!("{cseq} {method}"));
    Some(r)
}

/// The SDP of a request: the body if it is application/sdp, or the
/// application/sdp part of a multipart/mixed body.
fn sdp_body(req: &Request) -> Option<String> {
    if req.body.is_empty() {
        return None;
    }
    let ct = req.headers.get("Content-Type").unwrap_or("application/sdp");
    let lower = ct.to_ascii_lowercase();
    if lower.starts_with("application/sdp") {
        return Some(String::from_utf8_lossy(&req.body).into_owned());
    }
    if lower.starts_with("multipart/") {
        let boundary = ct.split(';').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| v.trim().trim_matches('"').to_string())
        })?;
        let body = String::from_utf8_lossy(&req.body);
        for part in body.split(&format!("--{boundary}")) {
            let Some((head, content)) = part
                .split_once("\r\n\r\n")
                .or_else(|| part.split_once("\n\n"))
            else {
                continue;
            };
            if head.to_ascii_lowercase().contains("application/sdp") {
                return Some(content.trim_end_matches(['\r', '\n', '-']).to_string() + "\r\n");
            }
        }
    }
    None
}
