//! The tokio driver of one carrier's SMPP link: connects (to an address
//! the network policy permits), runs an [`Esme`] session over the
//! socket, hands `deliver_sm`s to a [`DeliverSink`] and answers them with
//! what it says, and reconnects with backoff. Messages a lost session
//! held unanswered go again on the next one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_host::fetch::NetPolicy;
use rusmpp::pdus::{DeliverSm, SubmitSm};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::esme::{Esme, EsmeConfig, EsmeEvent, Token, status};

/// How a link times its reconnects.
#[derive(Debug, Clone)]
pub struct Timing {
    /// The first pause before reconnecting.
    pub first_reconnect: Duration,
    /// The longest pause.
    pub max_reconnect: Duration,
    /// How long a request waits for its answer.
    pub response_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            first_reconnect: Duration::from_millis(500),
            max_reconnect: Duration::from_secs(60),
            response_timeout: Duration::from_secs(10),
        }
    }
}

/// What became of a submitted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Accepted: the SMSC's message id.
    Accepted(String),
    /// Refused with this SMPP status.
    Refused(u32),
    /// The link is down (nothing was sent).
    Down(String),
}

/// Takes the SMSC's `deliver_sm`s (messages and receipts); the status
/// returned answers it (0: taken).
#[async_trait::async_trait]
pub trait DeliverSink: Send + Sync {
    /// Deals with one `deliver_sm`.
    async fn deliver(&self, sm: DeliverSm) -> u32;
    /// The link's state changed (`connecting`, `bound`, `down`).
    fn state(&self, state: serde_json::Value);
}

enum Command {
    Submit(Box<SubmitSm>, oneshot::Sender<SubmitOutcome>),
    Stop(oneshot::Sender<()>),
}

/// A running link; dropping it stops the link without unbinding.
pub struct Link {
    tx: mpsc::Sender<Command>,
}

/// Where and as whom a link connects.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The session's settings.
    pub esme: EsmeConfig,
}

/// `deliver_sm`s worked on at once; more are answered "queue full" and
/// the SMSC sends them again later.
const DELIVER_SLOTS: usize = 256;

impl Link {
    /// Starts a link.
    pub fn start(
        endpoint: Endpoint,
        net: NetPolicy,
        timing: Timing,
        sink: Arc<dyn DeliverSink>,
    ) -> Link {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(endpoint, net, timing, sink, rx));
        Link { tx }
    }

    /// Sends a message: waits for the SMSC's answer (or for the link to
    /// fail it).
    pub async fn submit(&self, sm: SubmitSm) -> SubmitOutcome {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Submit(Box::new(sm), tx))
            .await
            .is_err()
        {
            return SubmitOutcome::Down("the link stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| SubmitOutcome::Down("the link stopped".into()))
    }

    /// Unbinds (waiting at most a few seconds for the SMSC) and stops.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Stop(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }
}

/// The first address of `host:port` the policy permits.
async fn resolve(host: &str, port: u16, net: &NetPolicy) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| net.permits(a.ip()))
        .copied()
        .ok_or_else(|| format!("{host}: its addresses are not allowed (network policy)"))
}

/// What a link holds for the messages it was given.
struct Waiting {
    next: Token,
    replies: HashMap<Token, oneshot::Sender<SubmitOutcome>>,
    /// Messages to send on the next session (those a lost one held).
    carry: Vec<(Token, SubmitSm)>,
}

impl Waiting {
    fn answer(&mut self, token: Token, outcome: SubmitOutcome) {
        if let Some(r) = self.replies.remove(&token) {
            let _ = r.send(outcome);
        }
    }
}

async fn run(
    endpoint: Endpoint,
    net: NetPolicy,
    timing: Timing,
    sink: Arc<dyn DeliverSink>,
    mut rx: mpsc::Receiver<Command>,
) {
    let mut waiting = Waiting {
        next: 1,
        replies: HashMap::new(),
        carry: Vec::new(),
    };
    let mut pause = timing.first_reconnect;
    let slots = Arc::new(tokio::sync::Semaphore::new(DELIVER_SLOTS));
    loop {
        sink.state(json!({"state": "connecting"}));
        let connected = async {
            let addr = resolve(&endpoint.host, endpoint.port, &net).await?;
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .map_err(|_| format!("{addr}: connect timed out"))?
                .map_err(|e| format!("{addr}: {e}"))
        }
        .await;
        let error = match connected {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let mut cfg = endpoint.esme.clone();
                cfg.response_timeout = timing.response_timeout;
                match session(stream, cfg, &sink, &slots, &mut waiting, &mut rx).await {
                    Ended::Stopped => return,
                    Ended::Lost { reason, was_bound } => {
                        if was_bound {
                            pause = timing.first_reconnect;
                        }
                        reason
                    }
                }
            }
            Err(e) => e,
        };
        tracing::warn!("SMPP {}:{}: {error}", endpoint.host, endpoint.port);
        sink.state(json!({"state": "down", "error": error}));
        // Wait before reconnecting; meanwhile new messages are refused
        // (the outbox tries them again later).
        let until = tokio::time::Instant::now() + pause;
        pause = (pause * 2).min(timing.max_reconnect);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                cmd = rx.recv() => match cmd {
                    Some(Command::Submit(_, reply)) => {
                        let _ = reply.send(SubmitOutcome::Down(error.clone()));
                    }
                    Some(Command::Stop(done)) => {
                        for (t, _) in std::mem::take(&mut waiting.carry) {
                            waiting.answer(t, SubmitOutcome::Down("stopping".into()));
                        }
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            }
        }
    }
}

enum Ended {
    Stopped,
    Lost { reason: String, was_bound: bool },
}

async fn session(
    stream: TcpStream,
    cfg: EsmeConfig,
    sink: &Arc<dyn DeliverSink>,
    slots: &Arc<tokio::sync::Semaphore>,
    waiting: &mut Waiting,
    rx: &mut mpsc::Receiver<Command>,
) -> Ended {
    let (mut rd, mut wr) = stream.into_split();
    let mut esme = Esme::new(cfg, Instant::now());
    let mut was_bound = false;
    let mut stopping: Option<oneshot::Sender<()>> = None;
    // Messages a lost session held go first (unless their sender gave
    // up on them).
    for (t, sm) in std::mem::take(&mut waiting.carry) {
        if waiting.replies.get(&t).is_some_and(|r| !r.is_closed()) {
            esme.submit(t, sm, Instant::now());
        } else {
            waiting.replies.remove(&t);
        }
    }
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u32, u32)>();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(out) = esme.transmit()
            && let Err(e) = wr.write_all(&out).await
        {
            esme.connection_lost(&e.to_string());
        }
        while let Some(ev) = esme.poll_event() {
            match ev {
                EsmeEvent::Bound => {
                    was_bound = true;
                    sink.state(json!({"state": "bound"}));
                }
                EsmeEvent::Accepted { token, message_id } => {
                    waiting.answer(token, SubmitOutcome::Accepted(message_id))
                }
                EsmeEvent::Refused { token, status } => {
                    waiting.answer(token, SubmitOutcome::Refused(status))
                }
                EsmeEvent::Deliver { sequence, sm } => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let (sink, ack) = (sink.clone(), ack_tx.clone());
                        tokio::spawn(async move {
                            let st = sink.deliver(*sm).await;
                            let _ = ack.send((sequence, st));
                            drop(slot);
                        });
                    }
                    Err(_) => esme.ack_deliver(sequence, status::QUEUE_FULL),
                },
                EsmeEvent::Closed {
                    reason, unanswered, ..
                } => {
                    waiting.carry = unanswered;
                    if let Some(done) = stopping.take() {
                        for (t, _) in std::mem::take(&mut waiting.carry) {
                            waiting.answer(t, SubmitOutcome::Down("stopping".into()));
                        }
                        let _ = done.send(());
                        return Ended::Stopped;
                    }
                    return Ended::Lost { reason, was_bound };
                }
            }
        }
        if esme.transmit_pending() {
            continue;
        }
        let deadline = esme
            .deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) => esme.connection_lost("the SMSC closed the connection"),
                Ok(n) => esme.receive(&buf[..n], Instant::now()),
                Err(e) => esme.connection_lost(&e.to_string()),
            },
            cmd = rx.recv(), if stopping.is_none() => match cmd {
                Some(Command::Submit(sm, reply)) => {
                    let t = waiting.next;
                    waiting.next += 1;
                    waiting.replies.insert(t, reply);
                    esme.submit(t, *sm, Instant::now());
                }
                Some(Command::Stop(done)) => {
                    stopping = Some(done);
                    esme.unbind(Instant::now());
                }
                None => return Ended::Stopped,
            },
            Some((seq, st)) = ack_rx.recv() => esme.ack_deliver(seq, st),
            _ = tokio::time::sleep_until(deadline) => esme.handle_timeout(Instant::now()),
        }
    }
}
