//! The RFC 3261 §17 transaction layer, sans-IO, with the RFC 6026
//! "Accepted" states for INVITE.
//!
//! Feed it what arrived ([`Transactions::handle`]) and the time
//! ([`Transactions::handle_timeout`] at [`Transactions::poll_timeout`]);
//! take what to send from [`Transactions::poll_transmit`] and what the
//! transaction user must know from [`Transactions::poll_event`]. It
//! absorbs and answers retransmissions, retransmits over UDP (timers A, E,
//! G), times out (B, F, H) and keeps finished transactions around long
//! enough to absorb late copies (D, I, J, K, L, M).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::headers::{CSeq, MAGIC_COOKIE, NameAddr, Via};
use crate::message::{Message, Method, Request, Response};
use crate::uas::{Inbound, RequestInfo, reply};

/// How bytes travel to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: unreliable, so requests and final responses are retransmitted.
    Udp,
    /// TCP: reliable.
    Tcp,
}

impl Transport {
    /// True for reliable transports.
    pub fn reliable(self) -> bool {
        matches!(self, Transport::Tcp)
    }

    /// The Via transport token.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

/// A remote address and the transport to reach it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: Peer,
    /// The message.
    pub bytes: Vec<u8>,
}

/// RFC 3261 timer values.
#[derive(Debug, Clone, Copy)]
pub struct TimerConfig {
    /// Round-trip estimate (T1), 500 ms by default.
    pub t1: Duration,
    /// Longest retransmit interval for non-INVITE requests and INVITE
    /// responses (T2), 4 s.
    pub t2: Duration,
    /// Longest time a message stays in the network (T4), 5 s.
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> TimerConfig {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// How long an INVITE server transaction may wait for the TU's final
/// response before [`TxEvent::Unanswered`] (a safety net: a TU that
/// lost track of a call must not hold its transaction for ever).
pub const UNANSWERED_INVITE: Duration = Duration::from_secs(300);

/// Server transactions held at most unless set otherwise
/// ([`Transactions::set_max_servers`]); a new request beyond it is
/// answered 503 without a transaction.
pub const DEFAULT_MAX_SERVER_TRANSACTIONS: usize = 65_536;

/// Identifies a server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerTxId(u64);

/// Identifies a client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientTxId(u64);

/// What the transaction user must act on.
#[derive(Debug)]
pub enum TxEvent {
    /// A new request (not a retransmission); answer with
    /// [`Transactions::respond`].
    Request {
        /// The transaction to answer on.
        id: ServerTxId,
        /// The request.
        request: Box<Request>,
        /// Its parsed essentials.
        info: Box<RequestInfo>,
        /// Where it came from.
        from: Peer,
    },
    /// An ACK outside any transaction: the ACK for a 2xx, for the dialog.
    Ack {
        /// The ACK.
        request: Box<Request>,
        /// Its parsed essentials.
        info: Box<RequestInfo>,
        /// Where it came from.
        from: Peer,
    },
    /// A CANCEL matched a pending INVITE; the CANCEL was answered 200.
    /// The TU should end the INVITE with 487.
    Cancelled {
        /// The INVITE's server transaction.
        invite: ServerTxId,
    },
    /// An INVITE got no final response within
    /// [`UNANSWERED_INVITE`]: the TU should answer it now (a 5xx) and
    /// forget what it holds for it. The transaction is forgotten 64·T1
    /// later whatever the TU does.
    Unanswered {
        /// The INVITE's server transaction.
        id: ServerTxId,
    },
    /// An INVITE answered with a non-2xx final got no ACK (timer H).
    NoAck {
        /// The INVITE's server transaction.
        id: ServerTxId,
    },
    /// A response to one of our requests.
    Response {
        /// The client transaction.
        id: ClientTxId,
        /// The response.
        response: Box<Response>,
    },
    /// Our request got no final response in time (timer B or F).
    Timeout {
        /// The client transaction.
        id: ClientTxId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    branch: String,
    sent_by: String,
    method: Method,
}

/// The server transaction key (RFC 3261 §17.2.3), with an RFC 2543
/// fallback built from the dialog identifiers when the branch lacks the
/// magic cookie.
fn server_key(req: &Request, info: &RequestInfo) -> Key {
    let top = &info.vias[0];
    let sent_by = format!(
        "{}:{}",
        top.host.to_ascii_lowercase(),
        top.port.unwrap_or(0)
    );
    let method = match req.method {
        Method::Ack => Method::Invite,
        ref m => m.clone(),
    };
    let branch = match top.branch() {
        Some(b) if b.starts_with(MAGIC_COOKIE) => b.to_string(),
        _ => format!(
            "2543|{}|{}|{}|{}",
            info.call_id,
            info.cseq.seq,
            info.from.tag().unwrap_or(""),
            req.uri
        ),
    };
    Key {
        branch,
        sent_by,
        method,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

#[derive(Debug)]
struct ServerTx {
    key: Key,
    invite: bool,
    peer: Peer,
    state: ServerState,
    last: Option<Vec<u8>>,
    retransmit: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Calling,
    Proceeding,
    Completed,
    Accepted,
}

#[derive(Debug)]
struct ClientTx {
    invite: bool,
    peer: Peer,
    request: Request,
    bytes: Vec<u8>,
    state: ClientState,
    retransmit: Duration,
    ack: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// A/E (client) or G (server): retransmit.
    Retransmit,
    /// B/F (client) or H (server): give up.
    Timeout,
    /// D/I/J/K/L/M: forget the transaction.
    Forget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxRef {
    Server(u64),
    Client(u64),
}

/// All transactions of one endpoint.
#[derive(Debug)]
pub struct Transactions {
    timers_cfg: TimerConfig,
    next_id: u64,
    server_keys: HashMap<Key, u64>,
    servers: HashMap<u64, ServerTx>,
    client_keys: HashMap<(String, Method), u64>,
    clients: HashMap<u64, ClientTx>,
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    timers: HashMap<u64, (TxRef, Timer)>,
    tx_timers: HashMap<(u64, u8), u64>,
    out: VecDeque<Transmit>,
    events: VecDeque<TxEvent>,
    max_servers: usize,
}

impl Transactions {
    /// An empty transaction layer.
    pub fn new(timers: TimerConfig) -> Transactions {
        Transactions {
            timers_cfg: timers,
            next_id: 1,
            server_keys: HashMap::new(),
            servers: HashMap::new(),
            client_keys: HashMap::new(),
            clients: HashMap::new(),
            heap: BinaryHeap::new(),
            timers: HashMap::new(),
            tx_timers: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            max_servers: DEFAULT_MAX_SERVER_TRANSACTIONS,
        }
    }

    /// Sets the bound on server transactions (at least 1).
    pub fn set_max_servers(&mut self, max: usize) {
        self.max_servers = max.max(1);
    }

    /// The bound on server transactions.
    pub fn max_servers(&self) -> usize {
        self.max_servers
    }

    /// Timers pending (cancelled ones wait in the heap until their time
    /// and are not counted).
    pub fn timers_len(&self) -> usize {
        self.timers.len()
    }

    /// True (and a stateless 503 queued) when a new server transaction
    /// would go past the bound. BYE and CANCEL, which end calls and so
    /// shed load, have a quarter more.
    fn full(&mut self, from: Peer, req: &Request) -> bool {
        let bound = match req.method {
            Method::Bye | Method::Cancel => self.max_servers + self.max_servers / 4,
            _ => self.max_servers,
        };
        if self.servers.len() < bound {
            return false;
        }
        let mut resp = reply(req, 503, "Service Unavailable", None);
        resp.headers.push("Retry-After", "5");
        self.out.push_back(Transmit {
            to: from,
            bytes: resp.to_bytes(),
        });
        true
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn timer_slot(kind: Timer) -> u8 {
        match kind {
            Timer::Retransmit => 0,
            Timer::Timeout => 1,
            Timer::Forget => 2,
        }
    }

    fn tx_num(tx: TxRef) -> u64 {
        match tx {
            TxRef::Server(n) | TxRef::Client(n) => n,
        }
    }

    /// Sets (or replaces) one timer of a transaction.
    fn set_timer(&mut self, tx: TxRef, kind: Timer, at: Instant) {
        self.cancel_timer(tx, kind);
        let id = self.id();
        self.heap.push(Reverse((at, id)));
        self.timers.insert(id, (tx, kind));
        self.tx_timers
            .insert((Self::tx_num(tx), Self::timer_slot(kind)), id);
    }

    fn cancel_timer(&mut self, tx: TxRef, kind: Timer) {
        if let Some(old) = self
            .tx_timers
            .remove(&(Self::tx_num(tx), Self::timer_slot(kind)))
        {
            self.timers.remove(&old);
        }
    }

    fn forget_after(&mut self, tx: TxRef, now: Instant, after: Duration) {
        self.cancel_timer(tx, Timer::Retransmit);
        self.cancel_timer(tx, Timer::Timeout);
        if after.is_zero() {
            self.remove(tx);
        } else {
            self.set_timer(tx, Timer::Forget, now + after);
        }
    }

    fn remove(&mut self, tx: TxRef) {
        for kind in [Timer::Retransmit, Timer::Timeout, Timer::Forget] {
            self.cancel_timer(tx, kind);
        }
        match tx {
            TxRef::Server(n) => {
                if let Some(s) = self.servers.remove(&n) {
                    self.server_keys.remove(&s.key);
                }
            }
            TxRef::Client(n) => {
                if let Some(c) = self.clients.remove(&n) {
                    let branch = top_branch(&c.request).unwrap_or_default();
                    self.client_keys.remove(&(branch, c.request.method.clone()));
                }
            }
        }
    }

    /// Number of live transactions (server, client).
    pub fn len(&self) -> (usize, usize) {
        (self.servers.len(), self.clients.len())
    }

    /// True when no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.clients.is_empty()
    }

    /// Next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Next event for the transaction user.
    pub fn poll_event(&mut self) -> Option<TxEvent> {
        self.events.pop_front()
    }

    /// When [`Transactions::handle_timeout`] should next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if self.timers.contains_key(&id) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Handles what arrived from `from`, already screened by
    /// [`crate::screen`].
    pub fn handle(&mut self, now: Instant, from: Peer, inbound: Inbound) {
        match inbound {
            Inbound::Drop(_) => {}
            Inbound::Reply(resp) => self.out.push_back(Transmit {
                to: from,
                bytes: resp.to_bytes(),
            }),
            Inbound::Request(req, info) => self.on_request(now, from, req, info),
            Inbound::Response(resp) => self.on_response(now, resp),
        }
    }

    fn on_request(&mut self, now: Instant, from: Peer, req: Box<Request>, info: Box<RequestInfo>) {
        let key = server_key(&req, &info);
        if let Some(&n) = self.server_keys.get(&key) {
            let Some(tx) = self.servers.get_mut(&n) else {
                return;
            };
            if req.method == Method::Ack {
                if tx.state == ServerState::Completed {
                    tx.state = ServerState::Confirmed;
                    let wait = if tx.peer.transport.reliable() {
                        Duration::ZERO
                    } else {
                        self.timers_cfg.t4
                    };
                    self.forget_after(TxRef::Server(n), now, wait);
                } else if tx.state == ServerState::Accepted {
                    // An ACK for a 2xx that reused the INVITE's branch
                    // (RFC 2543 peers): the dialog's business.
                    self.events.push_back(TxEvent::Ack {
                        request: req,
                        info,
                        from,
                    });
                }
                return;
            }
            // A retransmission: answer with the last response, if any.
            if matches!(tx.state, ServerState::Proceeding | ServerState::Completed)
                && let Some(last) = &tx.last
            {
                self.out.push_back(Transmit {
                    to: from,
                    bytes: last.clone(),
                });
            }
            return;
        }
        match req.method {
            Method::Ack => self.events.push_back(TxEvent::Ack {
                request: req,
                info,
                from,
            }),
            _ if self.full(from, &req) => {}
            Method::Cancel => self.on_cancel(now, from, req, info, key),
            _ => {
                let n = self.id();
                let invite = req.method == Method::Invite;
                self.server_keys.insert(key.clone(), n);
                self.servers.insert(
                    n,
                    ServerTx {
                        key,
                        invite,
                        peer: from,
                        state: ServerState::Trying,
                        last: None,
                        retransmit: self.timers_cfg.t1,
                    },
                );
                if invite {
                    // Sent at once rather than after 200 ms: it stops the
                    // caller's INVITE retransmissions early (RFC 3261 §17.2.1).
                    let trying = reply(&req, 100, "Trying", None);
                    self.respond(now, ServerTxId(n), trying);
                    self.set_timer(TxRef::Server(n), Timer::Timeout, now + UNANSWERED_INVITE);
                }
                self.events.push_back(TxEvent::Request {
                    id: ServerTxId(n),
                    request: req,
                    info,
                    from,
                });
            }
        }
    }

    fn on_cancel(
        &mut self,
        now: Instant,
        from: Peer,
        req: Box<Request>,
        info: Box<RequestInfo>,
        key: Key,
    ) {
        let invite_key = Key {
            method: Method::Invite,
            ..key.clone()
        };
        let pending = self.server_keys.get(&invite_key).copied().filter(|n| {
            self.servers
                .get(n)
                .is_some_and(|t| matches!(t.state, ServerState::Trying | ServerState::Proceeding))
        });
        // The CANCEL is a non-INVITE transaction of its own.
        let n = self.id();
        self.server_keys.insert(key.clone(), n);
        self.servers.insert(
            n,
            ServerTx {
                key,
                invite: false,
                peer: from,
                state: ServerState::Trying,
                last: None,
                retransmit: self.timers_cfg.t1,
            },
        );
        let _ = info;
        match pending {
            Some(invite) => {
                self.respond(now, ServerTxId(n), reply(&req, 200, "OK", None));
                self.events.push_back(TxEvent::Cancelled {
                    invite: ServerTxId(invite),
                });
            }
            None => {
                let resp = reply(&req, 481, crate::reason_phrase(481), None);
                self.respond(now, ServerTxId(n), resp);
            }
        }
    }

    /// Sends a response on a server transaction. Responses to a
    /// transaction that has already finished are ignored.
    pub fn respond(&mut self, now: Instant, id: ServerTxId, resp: Response) {
        let n = id.0;
        let t1 = self.timers_cfg.t1;
        let t4 = self.timers_cfg.t4;
        let pending = self
            .servers
            .get(&n)
            .is_some_and(|tx| matches!(tx.state, ServerState::Trying | ServerState::Proceeding));
        if !pending {
            return;
        }
        if resp.status >= 200 {
            // A final answer after Unanswered: the RFC timers from here.
            self.cancel_timer(TxRef::Server(n), Timer::Forget);
        }
        let Some(tx) = self.servers.get_mut(&n) else {
            return;
        };
        let bytes = resp.to_bytes();
        self.out.push_back(Transmit {
            to: tx.peer,
            bytes: bytes.clone(),
        });
        tx.last = Some(bytes);
        let reliable = tx.peer.transport.reliable();
        let txr = TxRef::Server(n);
        if resp.status < 200 {
            tx.state = ServerState::Proceeding;
        } else if tx.invite && resp.status < 300 {
            // RFC 6026: absorb INVITE retransmissions for 64*T1; the 2xx
            // itself is retransmitted by the dialog until the ACK.
            tx.state = ServerState::Accepted;
            self.forget_after(txr, now, 64 * t1);
        } else if tx.invite {
            tx.state = ServerState::Completed;
            if !reliable {
                let at = now + tx.retransmit;
                self.set_timer(txr, Timer::Retransmit, at);
            }
            self.set_timer(txr, Timer::Timeout, now + 64 * t1);
        } else {
            tx.state = ServerState::Completed;
            let _ = t4;
            let wait = if reliable { Duration::ZERO } else { 64 * t1 };
            self.forget_after(txr, now, wait);
        }
    }

    /// Ends a pending server transaction with a final `status` built from
    /// the provisional response it sent (its Via, From, To with `to_tag`,
    /// Call-ID and CSeq): for a TU that no longer holds the request (see
    /// [`TxEvent::Unanswered`]). False if there is nothing to answer.
    pub fn reject(&mut self, now: Instant, id: ServerTxId, status: u16, to_tag: &str) -> bool {
        let Some(Ok(Message::Response(last))) = self
            .servers
            .get(&id.0)
            .filter(|tx| matches!(tx.state, ServerState::Trying | ServerState::Proceeding))
            .and_then(|tx| tx.last.as_deref())
            .map(crate::parse_datagram)
        else {
            return false;
        };
        let mut resp = Response::new(status, crate::reason_phrase(status));
        for via in last.headers.all("Via") {
            resp.headers.push("Via", via);
        }
        for name in ["From", "To", "Call-ID", "CSeq"] {
            if let Some(v) = last.headers.get(name) {
                let tagged =
                    name == "To" && NameAddr::parse("To", v).is_ok_and(|n| n.tag().is_none());
                if tagged {
                    resp.headers.push(name, format!("{v};tag={to_tag}"));
                } else {
                    resp.headers.push(name, v);
                }
            }
        }
        self.respond(now, id, resp);
        true
    }

    /// Sends a request in a new client transaction. The request must carry
    /// its top Via with a fresh `z9hG4bK` branch (see
    /// [`crate::new_branch`]). A CANCEL must reuse its INVITE's branch.
    pub fn send_request(&mut self, now: Instant, to: Peer, request: Request) -> ClientTxId {
        let n = self.id();
        let bytes = request.to_bytes();
        let invite = request.method == Method::Invite;
        let branch = top_branch(&request).unwrap_or_default();
        self.client_keys.insert((branch, request.method.clone()), n);
        self.out.push_back(Transmit {
            to,
            bytes: bytes.clone(),
        });
        let t1 = self.timers_cfg.t1;
        self.clients.insert(
            n,
            ClientTx {
                invite,
                peer: to,
                request,
                bytes,
                state: ClientState::Calling,
                retransmit: t1,
                ack: None,
            },
        );
        let txr = TxRef::Client(n);
        if !to.transport.reliable() {
            self.set_timer(txr, Timer::Retransmit, now + t1);
        }
        self.set_timer(txr, Timer::Timeout, now + 64 * t1);
        ClientTxId(n)
    }

    fn on_response(&mut self, now: Instant, resp: Box<Response>) {
        let branch = resp
            .headers
            .get("Via")
            .and_then(|v| {
                crate::split_list(v)
                    .first()
                    .and_then(|v| Via::parse(v).ok())
            })
            .and_then(|v| v.branch().map(str::to_string));
        let method = resp
            .headers
            .get("CSeq")
            .and_then(|c| CSeq::parse(c).ok())
            .map(|c| c.method);
        let (Some(branch), Some(method)) = (branch, method) else {
            return;
        };
        let Some(&n) = self.client_keys.get(&(branch, method)) else {
            return; // stray response: dropped (RFC 3261 §18.1.2)
        };
        let t1 = self.timers_cfg.t1;
        let t2 = self.timers_cfg.t2;
        let t4 = self.timers_cfg.t4;
        let Some(tx) = self.clients.get_mut(&n) else {
            return;
        };
        let txr = TxRef::Client(n);
        let reliable = tx.peer.transport.reliable();
        let status = resp.status;
        match tx.state {
            ClientState::Calling | ClientState::Proceeding => {
                if status < 200 {
                    tx.state = ClientState::Proceeding;
                    if tx.invite {
                        self.cancel_timer(txr, Timer::Retransmit);
                    } else if !reliable {
                        tx.retransmit = t2;
                    }
                } else if tx.invite && status < 300 {
                    tx.state = ClientState::Accepted;
                    self.forget_after(txr, now, 64 * t1);
                } else if tx.invite {
                    let ack = ack_for(&tx.request, &resp).to_bytes();
                    self.out.push_back(Transmit {
                        to: tx.peer,
                        bytes: ack.clone(),
                    });
                    tx.ack = Some(ack);
                    tx.state = ClientState::Completed;
                    let wait = if reliable {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(32)
                    };
                    self.forget_after(txr, now, wait);
                } else {
                    tx.state = ClientState::Completed;
                    let wait = if reliable { Duration::ZERO } else { t4 };
                    self.forget_after(txr, now, wait);
                }
                self.events.push_back(TxEvent::Response {
                    id: ClientTxId(n),
                    response: resp,
                });
            }
            ClientState::Completed => {
                // A retransmitted final response: repeat the ACK.
                if let Some(ack) = &tx.ack {
                    self.out.push_back(Transmit {
                        to: tx.peer,
                        bytes: ack.clone(),
                    });
                }
            }
            ClientState::Accepted => {
                // RFC 6026: 2xx retransmissions go to the TU, which ACKs again.
                if (200..300).contains(&status) {
                    self.events.push_back(TxEvent::Response {
                        id: ClientTxId(n),
                        response: resp,
                    });
                }
            }
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some((tx, kind)) = self.timers.remove(&id) else {
                continue;
            };
            self.tx_timers
                .remove(&(Self::tx_num(tx), Self::timer_slot(kind)));
            self.fire(now, tx, kind);
        }
    }

    fn fire(&mut self, now: Instant, tx: TxRef, kind: Timer) {
        let t2 = self.timers_cfg.t2;
        match (tx, kind) {
            (_, Timer::Forget) => self.remove(tx),
            (TxRef::Server(n), Timer::Retransmit) => {
                let Some(s) = self.servers.get_mut(&n) else {
                    return;
                };
                if s.state != ServerState::Completed {
                    return;
                }
                if let Some(last) = &s.last {
                    self.out.push_back(Transmit {
                        to: s.peer,
                        bytes: last.clone(),
                    });
                }
                s.retransmit = (s.retransmit * 2).min(t2);
                let at = now + s.retransmit;
                self.set_timer(tx, Timer::Retransmit, at);
            }
            (TxRef::Server(n), Timer::Timeout) => {
                let unanswered = self.servers.get(&n).is_some_and(|s| {
                    matches!(s.state, ServerState::Trying | ServerState::Proceeding)
                });
                if unanswered {
                    // The TU answers (or not); the transaction goes
                    // 64·T1 later either way.
                    let forget = now + 64 * self.timers_cfg.t1;
                    self.set_timer(tx, Timer::Forget, forget);
                    self.events
                        .push_back(TxEvent::Unanswered { id: ServerTxId(n) });
                } else {
                    self.remove(tx);
                    self.events.push_back(TxEvent::NoAck { id: ServerTxId(n) });
                }
            }
            (TxRef::Client(n), Timer::Retransmit) => {
                let Some(c) = self.clients.get_mut(&n) else {
                    return;
                };
                if !matches!(c.state, ClientState::Calling | ClientState::Proceeding) {
                    return;
                }
                self.out.push_back(Transmit {
                    to: c.peer,
                    bytes: c.bytes.clone(),
                });
                c.retransmit = if c.invite {
                    c.retransmit * 2
                } else if c.state == ClientState::Proceeding {
                    t2
                } else {
                    (c.retransmit * 2).min(t2)
                };
                let at = now + c.retransmit;
                self.set_timer(tx, Timer::Retransmit, at);
            }
            (TxRef::Client(n), Timer::Timeout) => {
                let pending = self.clients.get(&n).is_some_and(|c| {
                    matches!(c.state, ClientState::Calling | ClientState::Proceeding)
                });
                self.remove(tx);
                if pending {
                    self.events
                        .push_back(TxEvent::Timeout { id: ClientTxId(n) });
                }
            }
        }
    }
}

fn top_branch(req: &Request) -> Option<String> {
    let via = req.headers.get("Via")?;
    let first = crate::split_list(via).first().copied()?;
    Via::parse(first).ok()?.branch().map(str::to_string)
}

/// A request that shares an INVITE's transaction identity (RFC 3261
/// §9.1, §17.1.1.3): same Request-URI, top Via (same branch), From,
/// Call-ID, CSeq number and Route set, with `method` and the given To.
fn same_transaction(invite: &Request, method: Method, to: Option<&str>) -> Request {
    let mut req = Request::new(method.clone(), invite.uri.clone());
    if let Some(via) = invite.headers.get("Via") {
        let first = crate::split_list(via).first().copied().unwrap_or(via);
        req.headers.push("Via", first);
    }
    for (name, value) in [
        ("From", invite.headers.get("From")),
        ("To", to),
        ("Call-ID", invite.headers.get("Call-ID")),
    ] {
        if let Some(v) = value {
            req.headers.push(name, v);
        }
    }
    if let Some(cseq) = invite.headers.get("CSeq").and_then(|c| CSeq::parse(c).ok()) {
        req.headers.push("CSeq", format!("{} {method}", cseq.seq));
    }
    for route in invite.headers.all("Route") {
        req.headers.push("Route", route);
    }
    req.headers.push("Max-Forwards", "70");
    req
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): To from the
/// response (with its tag), the rest from the INVITE.
pub fn ack_for(invite: &Request, resp: &Response) -> Request {
    same_transaction(invite, Method::Ack, resp.headers.get("To"))
}

/// The CANCEL for a pending INVITE (RFC 3261 §9.1).
pub fn cancel_for(invite: &Request) -> Request {
    same_transaction(invite, Method::Cancel, invite.headers.get("To"))
}

/// The To tag of a response, if any.
pub fn to_tag(resp: &Response) -> Option<String> {
    let to = resp.headers.get("To")?;
    NameAddr::parse("To", to).ok()?.tag().map(str::to_string)
}
