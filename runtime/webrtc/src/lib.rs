//! Plugboard's WebRTC channel: the agent's softphone in the browser.
//!
//! An agent's console opens one peer connection when the agent turns the
//! softphone on (`POST /v1/tenants/{t}/agents/{a}/softphone` with the
//! browser's SDP offer; the answer comes back in the response, as in
//! WHIP) and keeps it while signed in, as Amazon Connect's persistent
//! agent connection does: a call offered to the agent then rings the
//! softphone without a new handshake, and answering is one request. The
//! voice channel dials a softphone like a phone ([`Softphones::ring`]):
//! the leg it gets carries 20 ms G.711 frames both ways, and leg events
//! (answered, hung up, held) come back through the call's own channel.
//! The page learns of rings and hang-ups from the tenant's event stream
//! (`softphone` events, shown to the agent and supervisors).
//!
//! The WebRTC stack is str0m (sans-IO, ICE-lite, DTLS-SRTP, with the
//! aws-lc-rs crypto backend: its pure-Rust backend does not resolve at
//! 0.25); [`peer`] maps it to 20 ms 8 kHz frames (G.711, or Opus through
//! libopus), `session` is the thin tokio driver, one UDP socket per
//! softphone. It was chosen over webrtc-rs after measuring both
//! (`examples/softphone_bench.rs`, `bench/webrtc-rs`): the same order of
//! CPU and memory per leg, str0m a little lighter, and sans-IO like the
//! project's other protocol engines.

#[cfg(feature = "api")]
pub mod http;
pub mod peer;
mod session;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use plugboard_media::audio::FRAME;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Why a softphone request failed.
#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    /// The browser's SDP could not be used.
    #[error("unusable SDP: {0}")]
    Sdp(String),
    /// No UDP socket for the peer.
    #[error("cannot open a media socket: {0}")]
    Socket(String),
    /// The agent has no softphone connected on this node.
    #[error("no softphone is connected for this agent")]
    NotConnected,
    /// Nothing rings (answer) or no call is up (hold, DTMF).
    #[error("{0}")]
    NoCall(&'static str),
    /// A digit that is not 0-9, *, #, A-D.
    #[error("bad DTMF digit {0:?}")]
    Digit(char),
    /// More digits than one request may send.
    #[error("at most {0} digits at a time")]
    Digits(usize),
    /// A call rings the softphone or is up on it.
    #[error("the softphone has a call ringing or up")]
    Busy,
}

/// What a softphone tells the call that rang it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhoneEvent {
    /// The browser was told.
    Ringing,
    /// The agent answered in the page.
    Answered,
    /// Not answered: busy, declined, gone, or ringing cancelled.
    Failed(u16, String),
    /// The agent hung up (or the browser went away) after answering.
    Hangup,
    /// The agent put the call on hold (true) or took it off (false).
    Hold(bool),
}

/// Where a softphone's news for a call goes.
pub type Notify = Box<dyn Fn(PhoneEvent) + Send + Sync>;

/// Where a softphone's state goes for its agent's page: (tenant, event).
pub type Publish = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// What the agent does in the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Answer the ringing call.
    Answer,
    /// Hang up, or decline while ringing.
    Hangup,
    /// Hold (true) or resume.
    Hold(bool),
    /// Send digits to the far end (in-band, as the caller's equipment
    /// hears them).
    Dtmf(String),
}

/// Frames from the browser waiting for the call's media clock: a small
/// playout buffer that starts once two frames are in, so the browser's
/// packet jitter does not make every other tick silent.
#[derive(Debug, Default)]
pub(crate) struct Playout {
    buf: VecDeque<i16>,
    primed: bool,
}

/// At most this much audio waits (older samples are dropped).
const PLAYOUT_MAX: usize = FRAME * 10;

impl Playout {
    pub(crate) fn push(&mut self, pcm: &[i16]) {
        self.buf.extend(pcm.iter().copied());
        let over = self.buf.len().saturating_sub(PLAYOUT_MAX);
        self.buf.drain(..over);
    }

    fn pop(&mut self) -> Option<Vec<i16>> {
        if !self.primed {
            if self.buf.len() < 2 * FRAME {
                return None;
            }
            self.primed = true;
        }
        if self.buf.len() < FRAME {
            self.primed = false;
            return None;
        }
        Some(self.buf.drain(..FRAME).collect())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A command to a softphone's session task.
pub(crate) enum Cmd {
    Ring {
        leg: u64,
        notify: Notify,
        info: Value,
        playout: Arc<Mutex<Playout>>,
    },
    Control(Control, oneshot::Sender<Result<(), WebrtcError>>),
    /// The call stopped ringing this leg.
    Cancel(u64),
    /// The call let go of this leg.
    Gone(u64),
    Close,
}

/// A connected softphone, as the registry and the calls see it.
pub(crate) struct Phone {
    /// Which session (a reconnect replaces the phone).
    pub session: u64,
    /// Media flows (ICE and DTLS are done): calls may ring it.
    pub up: Arc<AtomicBool>,
    /// A call rings it or is up on it.
    pub busy: Arc<AtomicBool>,
    pub cmds: mpsc::UnboundedSender<Cmd>,
    pub frames: mpsc::Sender<(u64, Vec<i16>)>,
}

/// The call's end of a leg to a softphone. Dropping it ends the leg.
pub struct PhoneLeg {
    id: u64,
    phone: Arc<Phone>,
    playout: Arc<Mutex<Playout>>,
}

impl std::fmt::Debug for PhoneLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhoneLeg").field("id", &self.id).finish()
    }
}

impl PhoneLeg {
    /// The next 20 ms the agent said, if it is in.
    pub fn audio(&self) -> Option<Vec<i16>> {
        lock(&self.playout).pop()
    }

    /// A 20 ms frame for the agent to hear (dropped if the session is
    /// behind).
    pub fn send(&self, frame: &[i16]) {
        let _ = self.phone.frames.try_send((self.id, frame.to_vec()));
    }

    /// Stops ringing: the call gives up (its news comes back as a failure).
    pub fn cancel(&self) {
        let _ = self.phone.cmds.send(Cmd::Cancel(self.id));
    }
}

impl Drop for PhoneLeg {
    fn drop(&mut self) {
        let _ = self.phone.cmds.send(Cmd::Gone(self.id));
    }
}

/// The softphones connected to this node, by tenant and agent.
pub struct Softphones {
    publish: Publish,
    /// Where peers' sockets are bound.
    bind: IpAddr,
    /// The address browsers reach them at (the host candidate).
    ip: IpAddr,
    phones: Mutex<HashMap<(String, String), Arc<Phone>>>,
    next: AtomicU64,
    /// Offer Opus before G.711.
    opus: AtomicBool,
}

impl std::fmt::Debug for Softphones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Softphones").field("ip", &self.ip).finish()
    }
}

/// How long an answer waits for the call to ring the softphone (the offer
/// reaches the page a moment before the call rings).
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// Digits per request.
const DTMF_MAX: usize = 32;

impl Softphones {
    /// A registry whose peers' sockets are bound on `bind` and reached by
    /// browsers at `ip` (a public address in front of a NAT, or the same);
    /// what softphones do goes on the tenant's event stream.
    #[cfg(feature = "api")]
    pub fn new(engine: Arc<plugboard_engine::Engine>, bind: IpAddr, ip: IpAddr) -> Arc<Softphones> {
        Softphones::with_publisher(
            bind,
            ip,
            Arc::new(move |tenant: &str, data: Value| engine.softphone_event(tenant, data)),
        )
    }

    /// A registry that tells `publish` (tenant, event) what softphones do,
    /// instead of a tenant's event stream (benchmarks).
    pub fn with_publisher(bind: IpAddr, ip: IpAddr, publish: Publish) -> Arc<Softphones> {
        Arc::new(Softphones {
            publish,
            bind,
            ip,
            phones: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            opus: AtomicBool::new(false),
        })
    }

    /// Whether browsers are asked for Opus before G.711 (better on lossy
    /// networks, at the cost of coding every frame; G.711 goes to the
    /// voice core as it is). Off by default.
    pub fn prefer_opus(&self, on: bool) {
        self.opus.store(on, Ordering::Relaxed);
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn phone(&self, tenant: &str, agent: &str) -> Option<Arc<Phone>> {
        lock(&self.phones)
            .get(&(tenant.to_string(), agent.to_string()))
            .cloned()
    }

    /// Connects an agent's softphone with the browser's SDP offer; returns
    /// the answer and the session's id (its events carry it). A softphone
    /// the agent had connected before is closed — unless a call rings it or
    /// is up on it ([`WebrtcError::Busy`]: another tab must not cut the
    /// caller off).
    pub async fn connect(
        self: &Arc<Self>,
        tenant: &str,
        agent: &str,
        offer: &str,
    ) -> Result<(String, u64), WebrtcError> {
        if self
            .phone(tenant, agent)
            .is_some_and(|p| p.busy.load(Ordering::Relaxed))
        {
            return Err(WebrtcError::Busy);
        }
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(self.bind, 0))
            .await
            .map_err(|e| WebrtcError::Socket(e.to_string()))?;
        let port = socket
            .local_addr()
            .map_err(|e| WebrtcError::Socket(e.to_string()))?
            .port();
        // Datagrams are addressed to the candidate, whatever the socket's
        // own address.
        let local = SocketAddr::new(self.ip, port);
        let (peer, answer) = peer::Peer::answer(
            offer,
            local,
            Instant::now(),
            self.opus.load(Ordering::Relaxed),
        )?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (frames, frame_rx) = mpsc::channel(32);
        let phone = Arc::new(Phone {
            session: self.id(),
            up: Arc::new(AtomicBool::new(false)),
            busy: Arc::new(AtomicBool::new(false)),
            cmds,
            frames,
        });
        let old = lock(&self.phones).insert((tenant.to_string(), agent.to_string()), phone.clone());
        if let Some(old) = old {
            let _ = old.cmds.send(Cmd::Close);
        }
        tokio::spawn(session::run(session::Session {
            registry: Arc::downgrade(self),
            publish: self.publish.clone(),
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            session: phone.session,
            up: phone.up.clone(),
            busy: phone.busy.clone(),
            peer,
            socket,
            cmds: cmd_rx,
            frames: frame_rx,
        }));
        Ok((answer, phone.session))
    }

    /// Turns an agent's softphone off; false if none was connected.
    pub fn disconnect(&self, tenant: &str, agent: &str) -> bool {
        match lock(&self.phones).remove(&(tenant.to_string(), agent.to_string())) {
            Some(p) => {
                let _ = p.cmds.send(Cmd::Close);
                true
            }
            None => false,
        }
    }

    /// The session ended: forgets it, unless a newer one replaced it.
    pub(crate) fn ended(&self, tenant: &str, agent: &str, session: u64) {
        let mut phones = lock(&self.phones);
        let key = (tenant.to_string(), agent.to_string());
        if phones.get(&key).is_some_and(|p| p.session == session) {
            phones.remove(&key);
        }
    }

    /// Whether the agent has a softphone connected here (media flows).
    pub fn connected(&self, tenant: &str, agent: &str) -> bool {
        self.phone(tenant, agent)
            .is_some_and(|p| p.up.load(Ordering::Relaxed))
    }

    /// Rings the agent's softphone for a call; `info` (the caller, the
    /// interaction) is shown in the page. `None` when the agent has no
    /// softphone here. What happens next comes to `notify`.
    pub fn ring(&self, tenant: &str, agent: &str, info: Value, notify: Notify) -> Option<PhoneLeg> {
        let phone = self.phone(tenant, agent)?;
        let leg = PhoneLeg {
            id: self.id(),
            phone,
            playout: Arc::new(Mutex::new(Playout::default())),
        };
        leg.phone
            .cmds
            .send(Cmd::Ring {
                leg: leg.id,
                notify,
                info,
                playout: leg.playout.clone(),
            })
            .ok()?;
        Some(leg)
    }

    /// What the agent does in the page. An answer waits a moment for the
    /// call to ring.
    pub async fn control(&self, tenant: &str, agent: &str, c: Control) -> Result<(), WebrtcError> {
        if let Control::Dtmf(d) = &c {
            if let Some(bad) = d.chars().find(|c| !"0123456789*#ABCD".contains(*c)) {
                return Err(WebrtcError::Digit(bad));
            }
            if d.chars().count() > DTMF_MAX {
                return Err(WebrtcError::Digits(DTMF_MAX));
            }
        }
        let until = Instant::now() + ANSWER_WAIT;
        loop {
            let phone = self.phone(tenant, agent).ok_or(WebrtcError::NotConnected)?;
            let (tx, rx) = oneshot::channel();
            phone
                .cmds
                .send(Cmd::Control(c.clone(), tx))
                .map_err(|_| WebrtcError::NotConnected)?;
            match rx.await.map_err(|_| WebrtcError::NotConnected)? {
                Err(WebrtcError::NoCall(_)) if c == Control::Answer && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn playout_starts_with_two_frames_and_restarts_after_running_dry() {
        let mut p = Playout::default();
        p.push(&[1; FRAME]);
        assert_eq!(p.pop(), None, "one frame is not enough to start");
        p.push(&[2; FRAME]);
        assert_eq!(p.pop(), Some(vec![1; FRAME]));
        assert_eq!(p.pop(), Some(vec![2; FRAME]));
        assert_eq!(p.pop(), None);
        p.push(&[3; FRAME]);
        assert_eq!(p.pop(), None, "primed again after running dry");
        // A burst is capped: the oldest audio goes.
        for i in 0..20 {
            p.push(&[i; FRAME]);
        }
        assert_eq!(p.pop(), Some(vec![10; FRAME]));
    }
}
