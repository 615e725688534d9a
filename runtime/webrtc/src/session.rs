//! A softphone's tokio driver: its UDP socket and timer around the
//! sans-IO [`Peer`], and the line (idle, ringing, up) a call rings.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use plugboard_media::audio::FRAME;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::peer::{Peer, PeerOut};
use crate::{Cmd, Control, Notify, PhoneEvent, Playout, Publish, Softphones, WebrtcError, lock};

/// A browser that never completes ICE and DTLS is given up after this.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);

/// A call rings a softphone for at most this long (a consultation or a
/// supervisor's leg has no deadline of its own).
const RING_LIMIT: Duration = Duration::from_secs(60);

/// DTMF tones waiting for the call, at most (samples: about 10 s).
const DTMF_QUEUE: usize = 8000 * 10;

pub(crate) struct Session {
    pub registry: Weak<Softphones>,
    pub publish: Publish,
    pub tenant: String,
    pub agent: String,
    pub session: u64,
    pub up: Arc<AtomicBool>,
    pub busy: Arc<AtomicBool>,
    pub peer: Peer,
    pub socket: UdpSocket,
    pub cmds: mpsc::UnboundedReceiver<Cmd>,
    pub frames: mpsc::Receiver<(u64, Vec<i16>)>,
}

/// The call a softphone has, if any.
enum Line {
    Idle,
    Ringing {
        leg: u64,
        notify: Notify,
        info: Value,
        playout: Arc<Mutex<Playout>>,
        until: Instant,
    },
    Up {
        leg: u64,
        notify: Notify,
        info: Value,
        playout: Arc<Mutex<Playout>>,
        held: bool,
    },
}

struct Driver {
    s: Session,
    line: Line,
    /// DTMF tones still to go to the call in place of the agent's voice.
    dtmf: VecDeque<i16>,
}

pub(crate) async fn run(s: Session) {
    let mut d = Driver {
        s,
        line: Line::Idle,
        dtmf: VecDeque::new(),
    };
    d.s.peer.listen(false);
    d.run().await;
    d.s.up.store(false, Ordering::Relaxed);
    d.hang_up(true);
    // Whatever was sent after the end is answered: a call that rang now
    // hears the softphone is gone, a request that it is not connected.
    d.s.cmds.close();
    while let Ok(cmd) = d.s.cmds.try_recv() {
        match cmd {
            Cmd::Ring { notify, .. } => {
                notify(PhoneEvent::Failed(480, "Temporarily Unavailable".into()));
            }
            Cmd::Control(_, reply) => {
                let _ = reply.send(Err(WebrtcError::NotConnected));
            }
            Cmd::Cancel(_) | Cmd::Gone(_) | Cmd::Close => {}
        }
    }
    if let Some(r) = d.s.registry.upgrade() {
        r.ended(&d.s.tenant, &d.s.agent, d.s.session);
    }
    d.publish("off", Value::Null);
}

impl Driver {
    async fn run(&mut self) {
        let mut buf = vec![0u8; 2048];
        let give_up = Instant::now() + CONNECT_LIMIT;
        loop {
            self.s
                .busy
                .store(!matches!(self.line, Line::Idle), Ordering::Relaxed);
            // What the peer has to say, then wait for the next input.
            let wait = loop {
                match self.s.peer.poll() {
                    PeerOut::Transmit(to, bytes) => {
                        let _ = self.s.socket.try_send_to(&bytes, to);
                    }
                    PeerOut::Wait(at) => break at,
                    PeerOut::Connected => {
                        self.s.up.store(true, Ordering::Relaxed);
                        self.publish("idle", Value::Null);
                    }
                    PeerOut::Audio(pcm) => self.heard(&pcm),
                    PeerOut::Closed => return,
                }
            };
            let wait = match &self.line {
                _ if !self.s.peer.connected() => wait.min(give_up),
                Line::Ringing { until, .. } => wait.min(*until),
                _ => wait,
            };
            tokio::select! {
                r = self.s.socket.recv_from(&mut buf) => {
                    if let Ok((n, src)) = r {
                        self.s.peer.receive(Instant::now(), src, &buf[..n]);
                    }
                }
                _ = tokio::time::sleep_until(wait.into()) => {
                    let now = Instant::now();
                    if !self.s.peer.connected() && now >= give_up {
                        tracing::info!("softphone of {}/{} never connected", self.s.tenant, self.s.agent);
                        return;
                    }
                    if matches!(&self.line, Line::Ringing { until, .. } if now >= *until) {
                        if let Line::Ringing { notify, .. } = std::mem::replace(&mut self.line, Line::Idle) {
                            notify(PhoneEvent::Failed(480, "Temporarily Unavailable (not answered)".into()));
                        }
                        self.publish("idle", Value::Null);
                    }
                    self.s.peer.timeout(now);
                }
                cmd = self.s.cmds.recv() => match cmd {
                    None | Some(Cmd::Close) => {
                        self.close();
                        return;
                    }
                    Some(cmd) => self.on_cmd(cmd),
                },
                Some((leg, frame)) = self.s.frames.recv() => {
                    if matches!(&self.line, Line::Up { leg: l, .. } if *l == leg) {
                        self.s.peer.send(Instant::now(), &frame);
                    }
                }
            }
        }
    }

    /// Audio from the browser: to the call that is up (DTMF tones in its
    /// place while digits go out).
    fn heard(&mut self, pcm: &[i16]) {
        let Line::Up { playout, .. } = &self.line else {
            return;
        };
        if self.dtmf.is_empty() {
            lock(playout).push(pcm);
        } else {
            let n = pcm.len().min(self.dtmf.len());
            let mut out: Vec<i16> = self.dtmf.drain(..n).collect();
            out.extend_from_slice(&pcm[n..]);
            lock(playout).push(&out);
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ring {
                leg,
                notify,
                info,
                playout,
            } => {
                if !matches!(self.line, Line::Idle) || !self.s.peer.connected() {
                    notify(PhoneEvent::Failed(486, "Busy Here".into()));
                    return;
                }
                notify(PhoneEvent::Ringing);
                self.publish("ringing", info.clone());
                self.line = Line::Ringing {
                    leg,
                    notify,
                    info,
                    playout,
                    until: Instant::now() + RING_LIMIT,
                };
            }
            Cmd::Cancel(id) | Cmd::Gone(id) => {
                let ours = match &self.line {
                    Line::Ringing { leg, .. } | Line::Up { leg, .. } => *leg == id,
                    Line::Idle => false,
                };
                if ours {
                    match std::mem::replace(&mut self.line, Line::Idle) {
                        Line::Ringing { notify, .. } => {
                            notify(PhoneEvent::Failed(487, "Request Terminated".into()));
                        }
                        // Given up as the agent answered: the call hears
                        // the line is down, as with a BYE.
                        Line::Up { notify, .. } if matches!(cmd, Cmd::Cancel(_)) => {
                            notify(PhoneEvent::Hangup);
                        }
                        _ => {}
                    }
                    self.s.peer.listen(false);
                    self.dtmf.clear();
                    self.publish("idle", Value::Null);
                }
            }
            Cmd::Control(c, reply) => {
                let _ = reply.send(self.control(c));
            }
            Cmd::Close => {}
        }
    }

    fn control(&mut self, c: Control) -> Result<(), WebrtcError> {
        match c {
            Control::Answer => {
                if matches!(self.line, Line::Up { .. }) {
                    return Err(WebrtcError::Busy);
                }
                let Line::Ringing {
                    leg,
                    notify,
                    info,
                    playout,
                    ..
                } = std::mem::replace(&mut self.line, Line::Idle)
                else {
                    return Err(WebrtcError::NoCall("nothing rings"));
                };
                notify(PhoneEvent::Answered);
                self.s.peer.listen(true);
                self.publish("connected", info.clone());
                self.line = Line::Up {
                    leg,
                    notify,
                    info,
                    playout,
                    held: false,
                };
                Ok(())
            }
            Control::Hangup => {
                if matches!(self.line, Line::Idle) {
                    return Err(WebrtcError::NoCall("no call to hang up"));
                }
                self.hang_up(false);
                self.publish("idle", Value::Null);
                Ok(())
            }
            Control::Hold(on) => {
                let Line::Up {
                    notify, held, info, ..
                } = &mut self.line
                else {
                    return Err(WebrtcError::NoCall("no call to hold"));
                };
                if *held != on {
                    *held = on;
                    notify(PhoneEvent::Hold(on));
                }
                let info = info.clone();
                self.publish(if on { "held" } else { "connected" }, info);
                Ok(())
            }
            Control::Dtmf(digits) => {
                if !matches!(self.line, Line::Up { .. }) {
                    return Err(WebrtcError::NoCall("no call to send digits to"));
                }
                for d in digits.chars() {
                    if self.dtmf.len() >= DTMF_QUEUE {
                        break;
                    }
                    self.dtmf
                        .extend(plugboard_media::dtmf::tone_samples(d, 100, 0.3));
                    self.dtmf.extend(std::iter::repeat_n(0, FRAME * 3 / 2));
                }
                Ok(())
            }
        }
    }

    /// Ends the line's call from this side: declined while ringing, hung
    /// up once up (`gone`: the browser went away).
    fn hang_up(&mut self, gone: bool) {
        match std::mem::replace(&mut self.line, Line::Idle) {
            Line::Ringing { notify, .. } => notify(if gone {
                PhoneEvent::Failed(480, "Temporarily Unavailable".into())
            } else {
                PhoneEvent::Failed(603, "Decline".into())
            }),
            Line::Up { notify, .. } => notify(PhoneEvent::Hangup),
            Line::Idle => {}
        }
        self.s.peer.listen(false);
        self.dtmf.clear();
    }

    /// Closes the connection: the browser hears it (DTLS close_notify),
    /// as far as a few polls send it.
    fn close(&mut self) {
        self.s.peer.close();
        for _ in 0..50 {
            match self.s.peer.poll() {
                PeerOut::Transmit(to, bytes) => {
                    let _ = self.s.socket.try_send_to(&bytes, to);
                }
                PeerOut::Closed | PeerOut::Wait(_) => break,
                PeerOut::Connected | PeerOut::Audio(_) => {}
            }
        }
    }

    /// Tells the agent's page (and supervisors) what the softphone does.
    fn publish(&self, state: &str, call: Value) {
        (self.s.publish)(
            &self.s.tenant,
            json!({"agent": self.s.agent, "session": self.s.session, "state": state, "call": call}),
        );
    }
}
