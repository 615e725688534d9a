//! The SIP endpoint: UDP and TCP drivers around the sans-IO transaction
//! layer, and the user agent core that answers OPTIONS, sets up calls
//! (INVITE → 100 → [180] → 200 → ACK), handles re-INVITE (hold/resume),
//! INFO (DTMF), BYE and CANCEL, and sends BYE when a flow hangs up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plugboard_core::Binding;
use plugboard_core::{Channel, EntryKind};
use plugboard_engine::{Engine, SessionStart};
use plugboard_media::dtmf::{DtmfSource, parse_info_body};
use plugboard_media::sdp::{self, LocalMedia, Negotiated, SdpError};
use plugboard_media::tts::Espeak;
use plugboard_sip::digest::{Algorithm, AuthError, Authenticator, parse_credentials};
use plugboard_sip::throttle::{AuthThrottle, Lockout, Scope, ThrottleConfig, Verdict};
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

mod admission;
mod registrar;
mod transport;
mod uac;

use admission::{Opened, Routed};
use registrar::{RegisterLookup, RegisterStored, credentials_for};
use transport::tcp_connection;

use crate::call::{self, CallSpec};
use crate::clock::MediaClock;
use crate::meter::LegMeter;
use crate::ports::{PortPair, PortPool};
use crate::route::{Credentials, Resolved};
use crate::signal::{CallCmd, CallOut, DialogKey, LegEvent};
use crate::{VoiceConfig, VoiceError};

/// How many legs given up before their `Dial` are remembered.
const GIVEN_UP: usize = 1024;

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
    /// A REGISTER's store lookups are done.
    Registrar(Box<RegisterLookup>),
    /// A REGISTER's bindings are stored.
    Registered(Box<RegisterStored>),
    /// An INVITE's address and trunks are looked up.
    Routed(Box<Routed>),
    /// An INVITE's flow session is open, or could not be.
    Opened(Box<Opened>),
    /// Graceful shutdown: refuse new calls, end the live ones (their
    /// records closed), then answer on the sender.
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// An outbound leg: we are the UAC.
struct Leg {
    invite: Request,
    tx: ClientTxId,
    peer: Peer,
    call: mpsc::UnboundedSender<CallCmd>,
    cseq: u32,
    creds: Option<Credentials>,
    auth_tries: u8,
    ringing: bool,
    /// To (with the far end's tag) and Contact, once answered.
    answered: Option<(String, String)>,
    /// We cancelled it: an answer that crosses the CANCEL is hung up.
    abandoned: bool,
    /// Its place in the tenant's capacity, and its usage.
    meter: LegMeter,
    /// A fax leg: its media, and whether we ask for T.38 once answered.
    fax: Option<(LocalMedia, bool)>,
    /// Our 2xx to the far end's re-INVITE, sent again until its ACK.
    retransmit: Option<JoinHandle<()>>,
}

impl Drop for Leg {
    fn drop(&mut self) {
        if let Some(r) = self.retransmit.take() {
            r.abort();
        }
    }
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
    call: mpsc::UnboundedSender<CallCmd>,
    retransmit: Option<JoinHandle<()>>,
    /// The `To` value we answer with (our URI and tag).
    local_party: String,
    /// We offered in a 200 (to the INVITE or a re-INVITE); the ACK must
    /// carry the answer.
    late_offer: bool,
    /// Its place in the tenant's capacity, and its usage.
    meter: LegMeter,
    /// A fax call: a re-INVITE to T.38 is accepted.
    fax: bool,
}

/// The running voice channel.
pub struct VoiceHandle {
    /// Where SIP listens (UDP and TCP).
    pub sip_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    inbox: mpsc::Sender<Input>,
}

impl VoiceHandle {
    /// Graceful shutdown: new calls are refused (503), every live call is
    /// ended with a BYE once its flow has finished the event it is
    /// handling, and its record is closed and written. Returns when no
    /// call is left, or after `limit` (false then).
    pub async fn drain(&self, limit: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inbox.send(Input::Drain(tx)).await.is_err() {
            return true;
        }
        tokio::time::timeout(limit, rx).await.is_ok()
    }
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
    app: Arc<Engine>,
    phones: Option<Arc<plugboard_webrtc::Softphones>>,
) -> Result<VoiceHandle, VoiceError> {
    let (lo, hi) = config.rtp_ports;
    if lo > hi || (lo == hi && lo % 2 == 1) {
        return Err(VoiceError::Ports(lo, hi));
    }
    let pool = PortPool::new(config.sip.ip(), lo, hi);
    let pairs = pool.available();
    match config.max_calls {
        Some(calls) if calls > pairs => {
            return Err(VoiceError::Capacity {
                calls,
                needed: calls * 2,
                lo,
                hi,
                pairs,
            });
        }
        calls => app.capacity().set_node_calls(calls.unwrap_or(pairs)),
    }
    let bind_err = |addr: SocketAddr| {
        move |e: std::io::Error| VoiceError::Bind {
            addr,
            message: e.to_string(),
        }
    };
    // UDP and TCP share the port. With port 0 the system picks a UDP port
    // whose TCP twin may be taken (an outgoing connection's port, say):
    // then another one is tried.
    let tries = if config.sip.port() == 0 { 50 } else { 1 };
    let mut bound = None;
    for attempt in 1..=tries {
        let udp = UdpSocket::bind(config.sip)
            .await
            .map_err(bind_err(config.sip))?;
        let sip_addr = udp.local_addr().map_err(bind_err(config.sip))?;
        match TcpListener::bind(sip_addr).await {
            Ok(tcp) => {
                bound = Some((udp, sip_addr, tcp));
                break;
            }
            Err(e) if attempt == tries => return Err(bind_err(sip_addr)(e)),
            Err(_) => continue,
        }
    }
    let Some((udp, sip_addr, tcp)) = bound else {
        return Err(VoiceError::Bind {
            addr: config.sip,
            message: "no port free for both UDP and TCP".into(),
        });
    };
    let udp = Arc::new(udp);
    let (tx, rx) = mpsc::channel::<Input>(4096);
    let drain_inbox = tx.clone();
    let (calls_tx, calls_rx) = mpsc::unbounded_channel::<CallOut>();
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
    // TCP acceptor: at most MAX_TCP_CONNECTIONS accepted connections at
    // once, MAX_TCP_PER_IP from one address (one past either is closed at
    // once; the peer retries or uses UDP).
    let tcp_open =
        plugboard_core::conns::ConnectionLimits::new(MAX_TCP_CONNECTIONS, MAX_TCP_PER_IP);
    {
        let tx = tx.clone();
        let tcp_open = tcp_open.clone();
        let mut warned: Option<Instant> = None;
        tasks.push(tokio::spawn(async move {
            loop {
                match tcp.accept().await {
                    Ok((stream, addr)) => {
                        let slot = match tcp_open.admit(addr.ip()) {
                            Ok(slot) => slot,
                            Err(e) => {
                                if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                                    warned = Some(Instant::now());
                                    tracing::warn!("sip tcp: {addr} refused: {e}");
                                }
                                continue;
                            }
                        };
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tcp_connection(stream, addr, tx).await;
                            drop(slot);
                        });
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
    let sizes = Arc::new(Sizes::default());
    for (i, (name, limit)) in SIZE_TABLES.iter().enumerate() {
        let limit = match *limit {
            Bound::Ports => Some(pairs),
            Bound::Fixed(n) => Some(n),
            Bound::Other => None,
        };
        let sizes = sizes.clone();
        app.tables()
            .register(name, limit, move || sizes.0[i].load(Ordering::Relaxed));
    }
    {
        let tcp_open = tcp_open.clone();
        app.tables()
            .register("sip_tcp_accepted", Some(MAX_TCP_CONNECTIONS), move || {
                tcp_open.open()
            });
    }

    let tts = Arc::new(Espeak::new(config.espeak.clone(), 16 << 20));
    {
        let budget = tts.cached_samples().1;
        let tts = Arc::downgrade(&tts);
        app.tables()
            .register("tts_cache_samples", Some(budget), move || {
                tts.upgrade().map(|t| t.cached_samples().0).unwrap_or(0)
            });
    }
    let endpoint = Endpoint {
        sizes,
        tx: Transactions::new(TimerConfig::default()),
        policy: policy(),
        throttle: AuthThrottle::new(ThrottleConfig::default()),
        udp,
        tcp: HashMap::new(),
        connecting: HashMap::new(),
        dialogs: HashMap::new(),
        pending: HashMap::new(),
        starting: HashMap::new(),
        live_calls: 0,
        draining: None,
        legs: HashMap::new(),
        given_up: std::collections::VecDeque::new(),
        leg_tx: HashMap::new(),
        t38_tx: HashMap::new(),
        sip_addr: SocketAddr::new(ip, sip_addr.port()),
        auth: {
            let mut a = Authenticator::new();
            if config.digest_md5_only {
                a.order = vec![Algorithm::Md5];
            } else if config.digest_md5_first {
                a.order = vec![Algorithm::Md5, Algorithm::Sha256];
            }
            a
        },
        tts: tts.clone(),
        config: Arc::new(config),
        app,
        pool,
        clock: MediaClock::start().map_err(|e| VoiceError::Clock(e.to_string()))?,
        phones,
        inbox: tx,
        calls: calls_tx,
    };
    let ctx = crate::call::callback::Ctx {
        app: endpoint.app.clone(),
        endpoint: endpoint.calls.clone(),
        pool: endpoint.pool.clone(),
        config: endpoint.config.clone(),
    };
    crate::call::fax::register(ctx.clone());
    crate::call::callback::spawn_runner(ctx);
    tasks.push(tokio::spawn(endpoint.run(rx, calls_rx)));
    tracing::info!("SIP listening on {sip_addr} (UDP and TCP)");
    Ok(VoiceHandle {
        sip_addr,
        tasks,
        inbox: drain_inbox,
    })
}

/// Accepted SIP TCP connections open at once, at most.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// Accepted SIP TCP connections from one address, at most.
const MAX_TCP_PER_IP: usize = 256;

/// What bounds one of the endpoint's tables.
enum Bound {
    /// The RTP port pairs (each entry holds one).
    Ports,
    /// A fixed number.
    Fixed(usize),
    /// Something else: the transaction bound, the calls' own limits.
    Other,
}

/// The endpoint's tables `/metrics` shows, in [`Sizes`]' order.
const SIZE_TABLES: [(&str, Bound); 9] = [
    ("sip_dialogs", Bound::Ports),
    ("sip_invites_pending", Bound::Other),
    ("sip_invites_starting", Bound::Other),
    ("sip_outbound_legs", Bound::Ports),
    ("sip_tcp_senders", Bound::Other),
    (
        "sip_server_transactions",
        Bound::Fixed(plugboard_sip::transaction::DEFAULT_MAX_SERVER_TRANSACTIONS),
    ),
    ("sip_client_transactions", Bound::Other),
    ("sip_timers", Bound::Other),
    ("voice_call_tasks", Bound::Ports),
];

/// The sizes of the endpoint's tables as last published (the loop owns
/// the tables and stores their sizes after each turn).
#[derive(Default)]
struct Sizes([AtomicUsize; SIZE_TABLES.len()]);

struct Endpoint {
    /// Published sizes of the tables below.
    sizes: Arc<Sizes>,
    tx: Transactions,
    /// Failed digest authentication, throttled per address and per user.
    throttle: AuthThrottle,
    policy: UasPolicy,
    udp: Arc<UdpSocket>,
    tcp: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Messages for outbound TCP connections still being made.
    connecting: HashMap<SocketAddr, Vec<Vec<u8>>>,
    dialogs: HashMap<DialogKey, Dialog>,
    /// Pending INVITE server transactions → their dialog.
    pending: HashMap<ServerTxId, DialogKey>,
    /// INVITEs being looked up or opened (no dialog yet), for CANCEL.
    starting: HashMap<ServerTxId, Request>,
    /// Call tasks running (spawned, not yet ended).
    live_calls: usize,
    /// Shutting down: new calls are refused; answered when none is left.
    draining: Option<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Outbound legs, and their INVITE transactions.
    legs: HashMap<DialogKey, Leg>,
    /// Legs given up (hung up, cancelled) before their `Dial` arrived
    /// (the route is resolved off the loop): that `Dial` is dropped.
    /// The oldest are forgotten past [`GIVEN_UP`].
    given_up: std::collections::VecDeque<DialogKey>,
    leg_tx: HashMap<ClientTxId, DialogKey>,
    /// Our re-INVITEs to T.38 on fax legs, and whether each was answered
    /// (a 2xx repeated is acknowledged again).
    t38_tx: HashMap<ClientTxId, (DialogKey, bool)>,
    sip_addr: SocketAddr,
    auth: Authenticator,
    tts: Arc<Espeak>,
    config: Arc<VoiceConfig>,
    app: Arc<Engine>,
    pool: PortPool,
    clock: MediaClock,
    /// Agents' browser softphones on this node.
    phones: Option<Arc<plugboard_webrtc::Softphones>>,
    inbox: mpsc::Sender<Input>,
    /// Calls' lifecycle messages (hang up, dial, ended): unbounded, so
    /// that none is ever dropped for a full channel.
    calls: mpsc::UnboundedSender<CallOut>,
}

impl Endpoint {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut calls: mpsc::UnboundedReceiver<CallOut>,
    ) {
        loop {
            let deadline = self.tx.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = calls.recv() => match out {
                    Some(out) => self.call_out(out),
                    None => break,
                },
                input = rx.recv() => match input {
                    Some(input) => self.input(input),
                    None => break,
                },
                _ = sleep => self.tx.handle_timeout(Instant::now()),
            }
            self.drain();
            self.publish_sizes();
        }
    }

    /// Stores the tables' sizes for `/metrics` ([`SIZE_TABLES`]' order).
    fn publish_sizes(&self) {
        let (servers, clients) = self.tx.len();
        let now = [
            self.dialogs.len(),
            self.pending.len(),
            self.starting.len(),
            self.legs.len(),
            self.tcp.len() + self.connecting.len(),
            servers,
            clients,
            self.tx.timers_len(),
            self.live_calls,
        ];
        for (slot, n) in self.sizes.0.iter().zip(now) {
            slot.store(n, Ordering::Relaxed);
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
            Input::Registrar(r) => self.register_looked_up(*r),
            Input::Registered(r) => self.register_stored(*r),
            Input::Routed(r) => self.routed(*r),
            Input::Opened(o) => self.opened(*o),
            Input::Drain(done) => {
                tracing::info!("draining: {} calls to end", self.live_calls);
                self.draining = Some(Some(done));
                for d in self.dialogs.values() {
                    let _ = d.call.send(CallCmd::Shutdown);
                }
                self.check_drained();
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
                if let Some(leg) = self.legs.get_mut(&key)
                    && let Some(r) = leg.retransmit.take()
                {
                    r.abort();
                }
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
                        let _ = d.call.send(CallCmd::Answer(answer));
                    }
                    if matches!(d.state, DialogState::WaitAck) {
                        // Billed from the ACK: an answer never confirmed
                        // is not a call.
                        d.meter.answered();
                        d.state = DialogState::Confirmed;
                        let _ = d.call.send(CallCmd::Confirmed);
                    }
                }
            }
            TxEvent::Cancelled { invite } => self.end_unanswered(
                invite,
                487,
                CallCmd::RemoteHangup("cancelled by the caller".into()),
            ),
            TxEvent::Unanswered { id } => {
                tracing::warn!("an INVITE had no final answer in time: ended with 500");
                self.end_unanswered(
                    id,
                    500,
                    CallCmd::SystemHangup("no final answer in time".into()),
                );
            }
            TxEvent::Response { id, response } if self.t38_tx.contains_key(&id) => {
                self.t38_response(id, *response)
            }
            TxEvent::Response { id, response } => self.leg_response(id, *response),
            TxEvent::NoAck { .. } => {}
            TxEvent::Timeout { id } => {
                if let Some((key, false)) = self.t38_tx.remove(&id)
                    && let Some(leg) = self.legs.get(&key)
                {
                    let why = "no answer to the re-INVITE".to_string();
                    let _ = leg.call.send(CallCmd::Leg(key, LegEvent::T38Refused(why)));
                }
                if let Some(key) = self.leg_tx.remove(&id) {
                    self.fail_leg(key, 408, "no answer from the far end".into());
                }
            }
        }
    }

    /// Ends an INVITE not yet answered with `status` (487 when
    /// cancelled): still being looked up or opened (the lookup's answer
    /// then finds it gone), or ringing (its call is told).
    /// One this endpoint no longer holds is answered from what the
    /// transaction layer kept.
    fn end_unanswered(&mut self, invite: ServerTxId, status: u16, tell: CallCmd) {
        if let Some(req) = self.starting.remove(&invite) {
            let resp = reply(&req, status, reason_phrase(status), Some(&random_token()));
            self.respond(invite, resp);
        } else if let Some(key) = self.pending.remove(&invite)
            && let Some(d) = self.dialogs.remove(&key)
        {
            let resp = reply(&d.invite, status, reason_phrase(status), Some(&key.1));
            self.respond(invite, resp);
            let _ = d.call.send(tell);
        } else {
            self.tx
                .reject(Instant::now(), invite, status, &random_token());
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
                    self.t38_tx.retain(|_, (k, _)| *k != key);
                    self.respond(id, reply(&req, 200, "OK", None));
                    let _ = leg.call.send(CallCmd::Leg(key, LegEvent::Hangup));
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
                            .send(CallCmd::RemoteHangup("caller hung up (BYE)".into()));
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
                        let _ = d.call.send(CallCmd::Dtmf(digit, DtmfSource::SipInfo));
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

    /// While draining, answers the drain once no call is left.
    fn check_drained(&mut self) {
        if self.live_calls == 0
            && let Some(done) = self.draining.as_mut().and_then(Option::take)
        {
            let _ = done.send(());
        }
    }

    fn reinvite(&mut self, id: ServerTxId, req: Request, info: RequestInfo) {
        let key = (
            info.call_id.clone(),
            info.to.tag().unwrap_or("").to_string(),
        );
        if self.legs.contains_key(&key) {
            return self.leg_reinvite(id, req, key);
        }
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
        // The answer, and what the call learns from it.
        let answered = match parsed {
            // A fax call goes over to T.38 (a gateway heard the fax tones).
            // SDP we cannot take: 488.
            Some(Ok(offer)) if d.fax && sdp::offers_t38(&offer) => {
                sdp::answer_t38(&offer, &d.local)
                    .map(|(a, s)| (a, Some(CallCmd::T38(s))))
                    .map_err(|e| (488, e))
            }
            Some(Ok(offer)) => sdp::answer(&offer, &d.local)
                .map(|(a, n)| (a, Some(CallCmd::Media(n))))
                .map_err(|e| (488, e)),
            // Not SDP: 400.
            Some(Err(e)) => Err((400, e)),
            None => {
                // No offer (a session refresh, or a peer asking for ours):
                // we offer what we have and the answer comes in the ACK
                // (RFC 3261 §14.2); the media stays as it is until then.
                d.late_offer = true;
                let offer = sdp::offer(&d.local, LATE_OFFER_DTMF_PT, sdp::Direction::SendRecv);
                Ok((offer, None))
            }
        };
        let answer = match answered {
            Ok((answer, news)) => {
                if let Some(cmd) = news {
                    let _ = d.call.send(cmd);
                }
                answer
            }
            Err((status, e)) => {
                d.local.version -= 1;
                let mut r = reply(&req, status, reason_phrase(status), None);
                r.headers.push("Warning", format!("399 plugboard \"{e}\""));
                self.respond(id, r);
                return;
            }
        };
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
                        .send(CallCmd::RemoteHangup("no ACK for our 200 OK".into()));
                    self.bye(&key);
                }
            }
            CallOut::Dial {
                leg,
                route,
                caller_id,
                offer,
                call,
                meter,
            } => self.dial(leg, route, caller_id, offer, call, *meter),
            CallOut::CancelLeg(key) => {
                if self.legs.contains_key(&key) {
                    self.cancel_leg(&key);
                } else {
                    self.give_up(key);
                }
            }
            CallOut::FaxDialog(key) => {
                if let Some(d) = self.dialogs.get_mut(&key) {
                    d.fax = true;
                }
            }
            CallOut::FaxLeg { leg, local, offer } => {
                let answered = match self.legs.get_mut(&leg) {
                    Some(l) => {
                        l.fax = Some((local, offer));
                        l.answered.is_some()
                    }
                    None => return,
                };
                if answered && offer {
                    self.offer_t38(&leg);
                }
            }
            CallOut::HangupLeg(key) => self.hang_up_leg(key),
            CallOut::Ended(key) => {
                // A call that ended without hanging up (an internal
                // error, a task that failed): the caller is told now,
                // with a BYE or, still ringing, a 480.
                if let Some(invite_tx) = self.dialogs.get(&key).map(|d| d.invite_tx) {
                    self.bye(&key);
                    self.pending.remove(&invite_tx);
                }
                // Its outbound legs (an agent's, a consulted party's)
                // if it left any: nobody is left to bridge them.
                let orphans: Vec<DialogKey> = self
                    .legs
                    .iter()
                    .filter(|(_, l)| l.call.is_closed())
                    .map(|(k, _)| k.clone())
                    .collect();
                for leg in orphans {
                    self.hang_up_leg(leg);
                }
                self.live_calls = self.live_calls.saturating_sub(1);
                self.check_drained();
            }
        }
    }

    /// Ends an outbound leg: BYE once answered, CANCEL while ringing, or
    /// given up before its `Dial` came.
    fn hang_up_leg(&mut self, key: DialogKey) {
        let answered = self.legs.get(&key).map(|l| l.answered.is_some());
        match answered {
            Some(true) => self.bye_leg(&key),
            Some(false) => self.cancel_leg(&key),
            None => self.give_up(key),
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
