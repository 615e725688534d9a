//! One call: RTP media paced every 20 ms from a monotonic clock, and the
//! tenant's flow executed on it — say, play, gather (barge-in, terminator,
//! first-digit and inter-digit timeouts, type-ahead), record, wait, park
//! with music on hold, hang up. A failing flow gets the spoken apology and
//! the fallback, never dead air; a flow that stops asking for input ends
//! the call.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_api::{AppState, FlowSession, Step};
use plugboard_core::flow::{Action, Event};
use plugboard_media::audio::{self, FRAME};
use plugboard_media::dtmf::{DtmfMerger, DtmfSource, EventDetector, ToneDetector};
use plugboard_media::rtp::{self, JitterBuffer, RtpSender};
use plugboard_media::sdp::Negotiated;
use plugboard_media::tts::{Espeak, voice_for};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::VoiceConfig;
use crate::clock::{DEPTH, Frame, MediaClock, PTIME, Packet, Stream};
use crate::endpoint::{CallOut, DialogKey, Input, LegEvent};
use crate::ports::{MediaSockets, PortPair, PortPool};

/// What the endpoint tells a call.
pub(crate) enum CallCmd {
    /// The ACK arrived: the call is up.
    Confirmed,
    /// A digit by SIP INFO.
    Dtmf(char, DtmfSource),
    /// A re-INVITE changed the media (hold/resume).
    Media(Negotiated),
    /// The ACK's answer to the offer we made in our 200 (late offer), or
    /// why there is none we can use.
    Answer(Result<Negotiated, String>),
    /// The caller left (BYE, CANCEL, no ACK).
    RemoteHangup(String),
    /// Something happened on an outbound leg.
    Leg(DialogKey, LegEvent),
}

/// The other leg of a bridged call (dial, transfer).
struct OutLeg {
    key: DialogKey,
    sockets: Arc<MediaSockets>,
    sender: Option<RtpSender>,
    jitter: JitterBuffer,
    remote: Option<SocketAddr>,
    payload_type: u8,
    law: plugboard_media::g711::Law,
    target: String,
    transfer: bool,
    deadline: Instant,
}

/// Everything a call task starts with.
pub(crate) struct CallSpec {
    pub key: DialogKey,
    pub session: FlowSession,
    pub media: PortPair,
    pub negotiated: Negotiated,
    pub cmds: mpsc::Receiver<CallCmd>,
    pub endpoint: mpsc::Sender<Input>,
    pub app: Arc<AppState>,
    pub tts: Arc<Espeak>,
    pub config: Arc<VoiceConfig>,
    pub cname: String,
    pub pool: PortPool,
    pub self_tx: mpsc::Sender<CallCmd>,
    pub clock: MediaClock,
}

/// An action with its audio ready.
struct Prepared {
    action: Action,
    audio: Option<Arc<Vec<i16>>>,
}

type FlowTask = JoinHandle<(FlowSession, Step, Vec<Prepared>)>;

struct Clip {
    audio: Arc<Vec<i16>>,
    pos: usize,
}

impl Clip {
    fn new(audio: Arc<Vec<i16>>) -> Clip {
        Clip { audio, pos: 0 }
    }

    /// Copies the next frame into `out`; false once the clip is done.
    fn fill(&mut self, out: &mut [i16; FRAME]) -> bool {
        let rest = &self.audio[self.pos.min(self.audio.len())..];
        let n = rest.len().min(FRAME);
        out[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        self.pos < self.audio.len()
    }
}

enum Doing {
    Nothing,
    Playing(Clip),
    Gather {
        max: usize,
        terminator: Option<char>,
        first_timeout: Duration,
        inter_timeout: Duration,
        prompt: Option<Clip>,
        digits: String,
        deadline: Option<Instant>,
    },
    Record {
        beep: Option<Clip>,
        until: Option<Instant>,
        max: Duration,
        terminator: Option<char>,
        samples: Vec<i16>,
    },
    Wait(Instant),
    Parked,
    /// Calling out: the caller hears ringback.
    Dialing,
    /// Bridged with the other leg.
    Bridged,
}

struct Call {
    key: DialogKey,
    session: Option<FlowSession>,
    flow_task: Option<FlowTask>,
    endpoint: mpsc::Sender<Input>,
    app: Arc<AppState>,
    tts: Arc<Espeak>,
    config: Arc<VoiceConfig>,
    negotiated: Negotiated,
    remote: SocketAddr,
    remote_rtcp: SocketAddr,
    sender: RtpSender,
    jitter: JitterBuffer,
    events: EventDetector,
    tones: ToneDetector,
    merger: DtmfMerger,
    queue: VecDeque<Prepared>,
    doing: Doing,
    typeahead: String,
    hold_music: Arc<Vec<i16>>,
    moh: usize,
    confirmed: bool,
    started: Instant,
    answered: Option<Instant>,
    last_rtp: Instant,
    received: u64,
    digits: String,
    stream: Arc<Stream>,
    ended: Option<(String, &'static str)>,
    cname: String,
    pool: PortPool,
    leg: Option<OutLeg>,
    ring_phase: usize,
    self_tx: mpsc::Sender<CallCmd>,
}

/// Where RTCP goes for an RTP address: the odd port above (RFC 3550).
fn rtcp_for(rtp: SocketAddr) -> SocketAddr {
    SocketAddr::new(rtp.ip(), rtp.port() | 1)
}

fn seed() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

pub(crate) async fn run(spec: CallSpec) {
    let CallSpec {
        key,
        session,
        media,
        negotiated,
        mut cmds,
        endpoint,
        app,
        tts,
        config,
        cname,
        pool,
        self_tx,
        clock,
    } = spec;
    // The clock thread sends through a clone of the RTP socket.
    let registered = media
        .try_clone_rtp()
        .and_then(|rtp| Ok((clock.register(rtp), media.register()?)));
    let (stream, media) = match registered {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot register RTP sockets: {e}");
            let _ = endpoint
                .send(Input::Call(CallOut::Hangup(key.clone())))
                .await;
            let _ = endpoint.send(Input::Call(CallOut::Ended(key))).await;
            return;
        }
    };
    let now = Instant::now();
    let mut call = Call {
        key,
        session: Some(session),
        flow_task: None,
        endpoint,
        app,
        tts,
        config,
        remote: negotiated.remote,
        remote_rtcp: rtcp_for(negotiated.remote),
        sender: RtpSender::new(seed(), negotiated.law, negotiated.payload_type, seed()),
        jitter: JitterBuffer::new(3),
        negotiated,
        events: EventDetector::new(),
        tones: ToneDetector::new(),
        merger: DtmfMerger::new(300),
        queue: VecDeque::new(),
        doing: Doing::Nothing,
        typeahead: String::new(),
        hold_music: audio::music_on_hold(),
        moh: 0,
        confirmed: false,
        started: now,
        answered: None,
        last_rtp: now,
        received: 0,
        digits: String::new(),
        stream,
        ended: None,
        cname,
        pool,
        leg: None,
        ring_phase: 0,
        self_tx,
    };
    call.main(&media, &mut cmds).await;
    call.finish().await;
    drop(media);
}

async fn recv_leg(
    sockets: Option<&MediaSockets>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sockets {
        Some(s) => s.rtp.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn recv_or_pending(
    task: &mut Option<FlowTask>,
) -> Result<(FlowSession, Step, Vec<Prepared>), tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

impl Call {
    async fn main(&mut self, media: &MediaSockets, cmds: &mut mpsc::Receiver<CallCmd>) {
        // The call's own pace only has to keep the media clock's queue
        // filled; the clock sends on time.
        let mut tick = tokio::time::interval(PTIME);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut rtcp_tick = tokio::time::interval(Duration::from_secs(5));
        let mut buf = vec![0u8; 2048];
        let mut rbuf = vec![0u8; 2048];
        let ring_limit = Instant::now() + Duration::from_secs(64);
        let mut lbuf = vec![0u8; 2048];
        while self.ended.is_none() {
            let leg_sockets = self.leg.as_ref().map(|l| l.sockets.clone());
            tokio::select! {
                r = recv_leg(leg_sockets.as_deref(), &mut lbuf) => {
                    if let Ok((n, src)) = r {
                        self.on_leg_rtp(n, &lbuf, src);
                    }
                }
                _ = tick.tick() => {
                    self.refill().await;
                    if !self.confirmed && Instant::now() > ring_limit {
                        self.ended = Some(("never answered".into(), "timeout"));
                    }
                }
                r = media.rtp.recv_from(&mut buf) => {
                    if let Ok((n, src)) = r {
                        self.on_rtp(&buf[..n], src);
                    }
                }
                r = media.rtcp.recv_from(&mut rbuf) => {
                    if let Ok((n, src)) = r
                        && let Some(info) = rtp::parse_rtcp(&rbuf[..n], self.sender.ssrc)
                    {
                        self.remote_rtcp = src;
                        if let Some(sr) = info.sender_report {
                            self.jitter.last_sr = Some((sr, plugboard_core::now_ms()));
                        }
                    }
                }
                _ = rtcp_tick.tick() => {
                    if self.confirmed {
                        let report = rtp::rtcp_report(&self.sender, &mut self.jitter, plugboard_core::now_ms(), &self.cname);
                        let _ = media.rtcp.try_send_to(&report, self.remote_rtcp);
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(CallCmd::Confirmed) => {
                        if !self.confirmed {
                            self.confirmed = true;
                            self.answered = Some(Instant::now());
                            self.last_rtp = Instant::now();
                            self.note("answered", json!({"after_ms": self.started.elapsed().as_millis() as u64}));
                            self.dispatch(Event::Started);
                        }
                    }
                    Some(CallCmd::Dtmf(d, src)) => self.on_digit(d, src),
                    Some(CallCmd::Media(n)) => {
                        let hold = n.on_hold();
                        self.note(if hold { "hold" } else { "resume" }, json!({"remote_rtp": n.remote.to_string(), "direction": format!("{:?}", n.remote_direction)}));
                        if n.remote.port() != self.remote.port() || n.remote.ip() != self.remote.ip() {
                            self.remote = n.remote;
                            self.remote_rtcp = rtcp_for(n.remote);
                        }
                        self.negotiated = n;
                        self.last_rtp = Instant::now();
                    }
                    Some(CallCmd::Answer(answer)) => self.on_answer(answer),
                    Some(CallCmd::RemoteHangup(why)) => {
                        self.ended = Some((why, "caller"));
                    }
                    Some(CallCmd::Leg(key, ev)) => self.on_leg(key, ev),
                    None => self.ended = Some(("endpoint gone".into(), "system")),
                },
                r = recv_or_pending(&mut self.flow_task) => {
                    self.flow_task = None;
                    match r {
                        Ok((session, step, prepared)) => self.on_step(session, step, prepared),
                        Err(e) => {
                            tracing::error!("flow task failed: {e}");
                            self.ended = Some(("internal error".into(), "system"));
                        }
                    }
                }
            }
        }
    }

    fn note(&mut self, kind: &str, data: serde_json::Value) {
        if let Some(s) = self.session.as_mut() {
            s.note(kind, data);
        }
    }

    /// Sends an event to the flow in the background; audio for the actions
    /// it returns is prepared before they run.
    fn dispatch(&mut self, event: Event) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        self.queue.clear();
        self.doing = Doing::Nothing;
        let tts = self.tts.clone();
        let app = self.app.clone();
        self.flow_task = Some(tokio::spawn(async move {
            let step = session.handle(event).await;
            let prepared = prepare(&tts, &app, &step.actions, &mut session).await;
            (session, step, prepared)
        }));
    }

    fn on_step(&mut self, session: FlowSession, step: Step, prepared: Vec<Prepared>) {
        self.session = Some(session);
        if step.error.is_some() {
            tracing::info!("flow failed on call {}: fallback", self.key.0);
        }
        self.queue = prepared.into();
        self.advance();
    }

    /// Starts the next queued action when nothing is in progress.
    fn advance(&mut self) {
        while matches!(self.doing, Doing::Nothing) && self.ended.is_none() {
            let Some(next) = self.queue.pop_front() else {
                if self.flow_task.is_none() && self.confirmed {
                    // The flow asks for nothing more: end the call rather
                    // than leave the caller in silence.
                    self.hangup_by_flow("flow finished");
                }
                return;
            };
            match next.action {
                Action::Say { .. } | Action::Play { .. } => {
                    if let Some(a) = next.audio {
                        self.doing = Doing::Playing(Clip::new(a));
                    }
                }
                Action::Gather {
                    max_digits,
                    terminator,
                    timeout_ms,
                    inter_digit_timeout_ms,
                    ..
                } => {
                    let terminator = terminator.and_then(|t| t.chars().next());
                    self.doing = Doing::Gather {
                        max: max_digits.clamp(1, 64) as usize,
                        terminator,
                        first_timeout: Duration::from_millis(u64::from(
                            timeout_ms.clamp(500, 120_000),
                        )),
                        inter_timeout: Duration::from_millis(u64::from(
                            inter_digit_timeout_ms.clamp(500, 60_000),
                        )),
                        prompt: next.audio.map(Clip::new),
                        digits: String::new(),
                        deadline: None,
                    };
                    // Digits typed ahead during earlier prompts count.
                    let ahead = std::mem::take(&mut self.typeahead);
                    for d in ahead.chars() {
                        self.gather_digit(d);
                    }
                }
                Action::Record {
                    max_secs,
                    beep,
                    terminator,
                } => {
                    self.doing = Doing::Record {
                        beep: beep.then(|| Clip::new(Arc::new(audio::beep()))),
                        until: None,
                        max: Duration::from_secs(u64::from(max_secs.clamp(1, 3600))),
                        terminator: terminator.and_then(|t| t.chars().next()).or(Some('#')),
                        samples: Vec::new(),
                    };
                }
                Action::Wait { ms } => {
                    self.doing = Doing::Wait(
                        Instant::now() + Duration::from_millis(u64::from(ms.min(600_000))),
                    );
                }
                Action::Enqueue {
                    queue,
                    priority,
                    skills,
                } => {
                    // Until the ACD exists the caller is parked with music.
                    self.note(
                        "parked",
                        json!({"queue": queue, "priority": priority, "skills": skills,
                               "note": "waiting in queue with music on hold (no ACD yet)"}),
                    );
                    self.doing = Doing::Parked;
                }
                Action::Hangup => self.hangup_by_flow("flow hung up"),
                Action::Transfer { target } if target.starts_with("queue:") => {
                    let queue = target.trim_start_matches("queue:").to_string();
                    self.note(
                        "parked",
                        json!({"queue": queue, "priority": 0, "skills": [],
                        "note": "transferred to a queue: waiting with music on hold (no ACD yet)"}),
                    );
                    self.doing = Doing::Parked;
                }
                Action::Transfer { target } => self.start_dial(target, None, 30, true),
                Action::Dial {
                    target,
                    caller_id,
                    timeout_secs,
                } => self.start_dial(target, caller_id, timeout_secs, false),
                Action::SetAttribute { .. } => {}
                other => {
                    let kind = serde_json::to_value(&other).unwrap_or_default();
                    self.note(
                        "ignored_action",
                        json!({"action": kind, "reason": "not a voice action"}),
                    );
                }
            }
        }
    }

    /// Calls out on a new leg; the caller hears ringback meanwhile.
    fn start_dial(
        &mut self,
        target: String,
        caller_id: Option<String>,
        timeout_secs: u32,
        transfer: bool,
    ) {
        let Some(sockets) = self.pool.take().and_then(|p| p.register().ok()) else {
            self.note(
                "dial_failed",
                json!({"target": target, "reason": "no free RTP ports"}),
            );
            self.dispatch(Event::DialResult {
                outcome: "failed".into(),
            });
            return;
        };
        let local = plugboard_media::sdp::LocalMedia {
            ip: self.config.advertised_ip(),
            port: sockets.port,
            session_id: u64::from(seed()),
            version: 1,
        };
        let offer =
            plugboard_media::sdp::offer(&local, 101, plugboard_media::sdp::Direction::SendRecv);
        let key: DialogKey = (
            format!("{}@plugboard", plugboard_sip::random_token()),
            plugboard_sip::random_token(),
        );
        let tenant = self
            .session
            .as_ref()
            .map(|s| s.interaction.tenant.clone())
            .unwrap_or_default();
        let caller_id =
            caller_id.or_else(|| self.session.as_ref().map(|s| s.interaction.from.clone()));
        self.note(
            if transfer { "transfer" } else { "dial" },
            json!({"target": target, "leg_call_id": key.0}),
        );
        let cmd_tx = self.self_tx.clone();
        let _ = self.endpoint.try_send(Input::Call(CallOut::Dial {
            leg: key.clone(),
            tenant,
            target: target.clone(),
            caller_id,
            offer,
            call: cmd_tx,
        }));
        self.leg = Some(OutLeg {
            key,
            sockets: Arc::new(sockets),
            sender: None,
            jitter: JitterBuffer::new(3),
            remote: None,
            payload_type: 0,
            law: plugboard_media::g711::Law::Mu,
            target,
            transfer,
            deadline: Instant::now() + Duration::from_secs(u64::from(timeout_secs.clamp(5, 120))),
        });
        self.doing = Doing::Dialing;
    }

    fn on_leg(&mut self, key: DialogKey, ev: LegEvent) {
        // Events of a leg we already left (after a REFER) are stale.
        let Some(leg) = self.leg.as_mut().filter(|l| l.key == key) else {
            return;
        };
        match ev {
            LegEvent::Ringing => {
                let target = leg.target.clone();
                self.note("dial_ringing", json!({"target": target}));
            }
            LegEvent::Answered(n) => {
                leg.sender = Some(RtpSender::new(seed(), n.law, n.payload_type, seed()));
                leg.remote = Some(n.remote);
                leg.payload_type = n.payload_type;
                leg.law = n.law;
                let target = leg.target.clone();
                self.note(
                    "dial_answered",
                    json!({"target": target, "codec": n.law.name()}),
                );
                self.doing = Doing::Bridged;
            }
            LegEvent::Failed(status, reason) => {
                let target = leg.target.clone();
                self.leg = None;
                let outcome = match status {
                    486 | 600 | 603 => "busy",
                    408 | 480 | 487 => "no-answer",
                    _ => "failed",
                };
                self.note(
                    "dial_failed",
                    json!({"target": target, "status": status, "reason": reason, "outcome": outcome}),
                );
                self.dispatch(Event::DialResult {
                    outcome: outcome.into(),
                });
            }
            LegEvent::Refer(target) => {
                // The agent passes the caller on: the agent's leg is left
                // to end (its BYE follows) and the caller is connected to
                // the new target.
                let from = leg.target.clone();
                self.leg = None;
                self.note("refer", json!({"from": from, "target": target}));
                self.start_dial(target, None, 30, true);
            }
            LegEvent::Hangup => {
                let (target, transfer) = (leg.target.clone(), leg.transfer);
                self.leg = None;
                self.note("dial_ended", json!({"target": target, "by": "far end"}));
                if transfer {
                    self.hangup_by_flow("transferred call ended");
                } else {
                    self.dispatch(Event::DialResult {
                        outcome: "completed".into(),
                    });
                }
            }
        }
    }

    fn on_leg_rtp(&mut self, n: usize, buf: &[u8], src: SocketAddr) {
        let Some(leg) = self.leg.as_mut() else {
            return;
        };
        let Some(p) = rtp::parse_rtp(&buf[..n]) else {
            return;
        };
        if p.payload_type != leg.payload_type || leg.sender.is_none() {
            return;
        }
        leg.remote = Some(src);
        let arrival = (self.started.elapsed().as_micros() / 125) as u32;
        leg.jitter.push(&p, arrival);
    }

    /// The caller's answer to an offer of ours (an INVITE or re-INVITE
    /// without SDP): media starts, or goes on with what was agreed.
    fn on_answer(&mut self, answer: Result<Negotiated, String>) {
        match answer {
            Ok(n) => {
                self.note(
                    "sdp_answer",
                    json!({"codec": n.law.name(), "telephone_event": n.dtmf_pt, "remote_rtp": n.remote.to_string(), "direction": format!("{:?}", n.remote_direction)}),
                );
                if n.law != self.negotiated.law || n.payload_type != self.negotiated.payload_type {
                    // Another codec: a new stream (a new SSRC).
                    self.sender = RtpSender::new(seed(), n.law, n.payload_type, seed());
                }
                self.remote = n.remote;
                self.remote_rtcp = rtcp_for(n.remote);
                self.negotiated = n;
            }
            Err(why) => {
                self.note("sdp_answer", json!({"error": why}));
                if self.ended.is_none() {
                    self.ended = Some((why, "system"));
                    let _ = self
                        .endpoint
                        .try_send(Input::Call(CallOut::Hangup(self.key.clone())));
                }
            }
        }
    }

    fn hangup_by_flow(&mut self, why: &str) {
        if self.ended.is_none() {
            self.ended = Some((why.to_string(), "flow"));
            let _ = self
                .endpoint
                .try_send(Input::Call(CallOut::Hangup(self.key.clone())));
        }
    }

    /// Keeps [`DEPTH`] frames ready for the media clock. Frames the clock
    /// found missing are prepared and dropped, so the call's timeline (and
    /// its RTP timestamps) stays on the clock's.
    async fn refill(&mut self) {
        let missed = self.stream.take_missed().min(50);
        for _ in 0..missed {
            let _ = self.on_tick().await;
        }
        for _ in 0..DEPTH {
            if self.stream.queued() >= DEPTH || self.ended.is_some() {
                break;
            }
            let frame = self.on_tick().await;
            if !self.stream.push(frame) {
                break;
            }
        }
    }

    /// Runs one frame period of the call and returns the packet to send.
    async fn on_tick(&mut self) -> Frame {
        if !self.confirmed {
            return None;
        }
        let now = Instant::now();
        let mut frame = [0i16; FRAME];
        let mut finished: Option<Event> = None;
        match &mut self.doing {
            Doing::Nothing => {}
            Doing::Playing(clip) => {
                if !clip.fill(&mut frame) {
                    self.doing = Doing::Nothing;
                }
            }
            Doing::Gather {
                prompt,
                deadline,
                first_timeout,
                inter_timeout,
                digits,
                ..
            } => {
                if let Some(p) = prompt
                    && !p.fill(&mut frame)
                {
                    *prompt = None;
                }
                if prompt.is_none() && deadline.is_none() {
                    *deadline = Some(
                        now + if digits.is_empty() {
                            *first_timeout
                        } else {
                            *inter_timeout
                        },
                    );
                }
                if deadline.is_some_and(|d| now >= d) {
                    finished = Some(if digits.is_empty() {
                        Event::Timeout
                    } else {
                        Event::Digits {
                            digits: digits.clone(),
                            terminated: false,
                        }
                    });
                }
            }
            Doing::Record {
                beep, until, max, ..
            } => {
                if let Some(b) = beep
                    && !b.fill(&mut frame)
                {
                    *beep = None;
                }
                if beep.is_none() && until.is_none() {
                    *until = Some(now + *max);
                }
            }
            Doing::Wait(until) => {
                if now >= *until {
                    self.doing = Doing::Nothing;
                }
            }
            Doing::Parked => {
                let music = &self.hold_music;
                for s in frame.iter_mut() {
                    *s = music[self.moh % music.len()];
                    self.moh += 1;
                }
            }
            Doing::Dialing => {
                // Ringback: 425 Hz, 1 s on, 4 s off (ITU-T E.180).
                for s in frame.iter_mut() {
                    let t = self.ring_phase % 40_000;
                    *s = if t < 8000 {
                        ((t as f32 * 2.0 * std::f32::consts::PI * 425.0 / 8000.0).sin() * 6000.0)
                            as i16
                    } else {
                        0
                    };
                    self.ring_phase += 1;
                }
                let expired = self.leg.as_ref().is_some_and(|l| now > l.deadline);
                if expired && let Some(leg) = self.leg.as_mut() {
                    // Give up: CANCEL; the 487 comes back as no-answer.
                    leg.deadline = now + Duration::from_secs(3600);
                    let _ = self
                        .endpoint
                        .try_send(Input::Call(CallOut::CancelLeg(leg.key.clone())));
                }
            }
            Doing::Bridged => {
                if let Some(leg) = self.leg.as_mut()
                    && let Some(payload) = leg.jitter.pop()
                {
                    let mut pcm = Vec::with_capacity(FRAME);
                    leg.law.decode(&payload, &mut pcm);
                    let n = pcm.len().min(FRAME);
                    frame[..n].copy_from_slice(&pcm[..n]);
                }
            }
        }
        let out = if self.negotiated.local_direction.sends()
            && !self.negotiated.remote.ip().is_unspecified()
        {
            Packet::new(&self.sender.frame(&frame), self.remote)
        } else {
            self.sender.skip(1);
            None
        };
        // Playout of what the caller sent: recording and in-band DTMF.
        let heard = match self.jitter.pop() {
            Some(payload) => {
                let mut pcm = Vec::with_capacity(FRAME);
                self.negotiated.law.decode(&payload, &mut pcm);
                pcm
            }
            None => vec![0; FRAME],
        };
        if matches!(self.doing, Doing::Bridged)
            && let Some(leg) = self.leg.as_mut()
            && let (Some(sender), Some(remote)) = (leg.sender.as_mut(), leg.remote)
        {
            let mut out = [0i16; FRAME];
            let n = heard.len().min(FRAME);
            out[..n].copy_from_slice(&heard[..n]);
            let packet = sender.frame(&out);
            let _ = leg.sockets.rtp.try_send_to(&packet, remote);
        }
        let record_done = match &mut self.doing {
            Doing::Record {
                beep: None,
                until: Some(until),
                samples,
                max,
                ..
            } => {
                // The limit counts media, not wall time (a late tick must
                // not lengthen the recording); the terminator sets `until`.
                let limit = (max.as_millis() as usize) * 8;
                let room = limit.saturating_sub(samples.len());
                samples.extend_from_slice(&heard[..heard.len().min(room)]);
                now >= *until || samples.len() >= limit
            }
            _ => false,
        };
        if self.negotiated.dtmf_pt.is_none() {
            for d in self.tones.push(&heard) {
                self.on_digit(d, DtmfSource::InBand);
            }
        }
        if let Some(ev) = finished {
            self.finish_gather(ev);
        }
        if record_done {
            self.finish_record().await;
        }
        if matches!(self.doing, Doing::Nothing) && self.flow_task.is_none() {
            self.advance();
        }
        if !self.negotiated.on_hold() && self.last_rtp.elapsed() > self.config.rtp_timeout {
            self.note(
                "media_timeout",
                json!({"after_s": self.config.rtp_timeout.as_secs()}),
            );
            self.hangup_by_flow("no media from the caller");
        }
        if self.started.elapsed() > self.config.max_call {
            self.hangup_by_flow("maximum call length");
        }
        out
    }

    fn on_rtp(&mut self, bytes: &[u8], src: SocketAddr) {
        if rtp::is_rtcp(bytes) {
            return;
        }
        let Some(p) = rtp::parse_rtp(bytes) else {
            return;
        };
        // Symmetric RTP: answer where the caller's media comes from.
        if src != self.remote {
            self.remote = src;
        }
        self.last_rtp = Instant::now();
        self.received += 1;
        if Some(p.payload_type) == self.negotiated.dtmf_pt {
            if let Some(d) = self.events.packet(p.timestamp, &p.payload) {
                // Handled on the next poll of the loop (no await here).
                self.pending_digit(d);
            }
            return;
        }
        if p.payload_type == self.negotiated.payload_type {
            let arrival = (self.started.elapsed().as_micros() / 125) as u32;
            self.jitter.push(&p, arrival);
        }
    }

    fn pending_digit(&mut self, d: char) {
        // RFC 4733 digits are cheap to handle synchronously except for the
        // end of a recording, which the next tick completes.
        if !self
            .merger
            .accept(d, DtmfSource::Rfc4733, plugboard_core::now_ms())
        {
            return;
        }
        self.take_digit(d, DtmfSource::Rfc4733);
    }

    fn on_digit(&mut self, d: char, source: DtmfSource) {
        if !self.merger.accept(d, source, plugboard_core::now_ms()) {
            return;
        }
        self.take_digit(d, source);
    }

    fn take_digit(&mut self, d: char, source: DtmfSource) {
        self.digits.push(d);
        let src = match source {
            DtmfSource::Rfc4733 => "rfc4733",
            DtmfSource::SipInfo => "sip_info",
            DtmfSource::InBand => "inband",
        };
        self.note("dtmf", json!({"digit": d.to_string(), "source": src}));
        match &mut self.doing {
            Doing::Gather { .. } => self.gather_digit(d),
            Doing::Record {
                terminator, until, ..
            } => {
                if Some(d) == *terminator {
                    // Mark as done; the tick (or on_digit) saves it.
                    *until = Some(Instant::now());
                }
            }
            _ => {
                if self.typeahead.len() < 32 {
                    self.typeahead.push(d);
                }
            }
        }
    }

    fn gather_digit(&mut self, d: char) {
        let Doing::Gather {
            max,
            terminator,
            inter_timeout,
            prompt,
            digits,
            deadline,
            ..
        } = &mut self.doing
        else {
            return;
        };
        // Barge-in: the first digit stops the prompt.
        *prompt = None;
        if Some(d) == *terminator {
            let ev = Event::Digits {
                digits: digits.clone(),
                terminated: true,
            };
            self.finish_gather(ev);
            return;
        }
        digits.push(d);
        if digits.len() >= *max {
            let ev = Event::Digits {
                digits: digits.clone(),
                terminated: false,
            };
            self.finish_gather(ev);
            return;
        }
        *deadline = Some(Instant::now() + *inter_timeout);
    }

    fn finish_gather(&mut self, ev: Event) {
        self.doing = Doing::Nothing;
        self.dispatch(ev);
    }

    async fn finish_record(&mut self) {
        let Doing::Record { samples, .. } = std::mem::replace(&mut self.doing, Doing::Nothing)
        else {
            return;
        };
        let duration_ms = (samples.len() / 8) as u32;
        let Some(tenant) = self.session.as_ref().map(|s| s.interaction.tenant.clone()) else {
            return;
        };
        let ix = self
            .session
            .as_ref()
            .map(|s| s.interaction.id.clone())
            .unwrap_or_default();
        let app = self.app.clone();
        let wav = audio::encode_wav(&samples);
        let saved = tokio::task::spawn_blocking(move || app.save_recording(&tenant, &ix, &wav))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match saved {
            Ok(id) => {
                let tenant = self
                    .session
                    .as_ref()
                    .map(|s| s.interaction.tenant.clone())
                    .unwrap_or_default();
                self.note(
                    "recording",
                    json!({"id": id, "duration_ms": duration_ms,
                           "url": format!("/v1/tenants/{tenant}/recordings/{id}")}),
                );
                if self.ended.is_none() {
                    self.dispatch(Event::Recorded { id, duration_ms });
                }
            }
            Err(e) => {
                self.note("recording_failed", json!({"error": e}));
                if self.ended.is_none() {
                    self.dispatch(Event::Timeout);
                }
            }
        }
    }

    /// Ends the call's record: the flow hears `hangup`, the timeline gets
    /// the cause and media statistics, the record is written durably.
    async fn finish(&mut self) {
        // Media ends with the call: what the clock finds after this is not
        // lateness.
        let late = self.stream.stats();
        if let Some(leg) = self.leg.take() {
            let _ = self
                .endpoint
                .send(Input::Call(CallOut::HangupLeg(leg.key.clone())))
                .await;
        }
        if matches!(self.doing, Doing::Record { .. }) {
            self.finish_record().await;
        }
        if let Some(t) = self.flow_task.take()
            && let Ok((session, _, _)) = t.await
        {
            self.session = Some(session);
        }
        let (cause, by) = self
            .ended
            .clone()
            .unwrap_or_else(|| ("ended".into(), "system"));
        let mut session = match self.session.take() {
            Some(s) => s,
            None => return,
        };
        if by == "caller" && self.confirmed && !session.failed() {
            // The flow learns that the caller left; what it answers is moot.
            let _ = session.handle(Event::Hangup).await;
        }
        session.note(
            "media",
            json!({
                "codec": self.negotiated.law.name(),
                "packets_sent": self.sender.packets,
                "packets_received": self.received,
                "lost": self.jitter.cumulative_lost(),
                "jitter_ts": self.jitter.jitter(),
                "send_lateness_us": {"p50": late.p50_us, "p99": late.p99_us, "max": late.max_us},
                "frames_not_ready": late.underruns,
            }),
        );
        session.note(
            "hangup",
            json!({
                "cause": cause,
                "by": by,
                "answered": self.answered.is_some(),
                "duration_ms": self.answered.map(|a| a.elapsed().as_millis() as u64).unwrap_or(0),
                "digits": self.digits,
            }),
        );
        session
            .interaction
            .attributes
            .insert("hangup_cause".into(), cause.clone());
        if let Err(e) = session.finish() {
            tracing::error!("cannot store the call record: {e}");
        }
        let _ = self
            .endpoint
            .send(Input::Call(CallOut::Ended(self.key.clone())))
            .await;
    }
}

/// Speech for a text: the tenant's `tts` plugin first (finished audio, or
/// text rewritten for the built-in engine), else espeak-ng.
async fn speak(
    tts: &Arc<Espeak>,
    app: &Arc<AppState>,
    session: &mut FlowSession,
    text: String,
    voice: Option<String>,
    language: Option<String>,
) -> Result<Arc<Vec<i16>>, String> {
    let tenant = session.interaction.tenant.clone();
    let (mut text, mut voice, mut language) = (text, voice, language);
    match app
        .tenant_tts(&tenant, &text, voice.as_deref(), language.as_deref())
        .await
    {
        Some(Ok(plugboard_host::TtsOutput::Audio {
            sample_rate,
            samples,
        })) => {
            let f: Vec<f32> = samples.iter().map(|s| f32::from(*s) / 32768.0).collect();
            let pcm = audio::resample(&f, sample_rate.clamp(4000, 192_000), audio::RATE)
                .map_err(|e| e.to_string())?;
            session.note("tts_plugin", json!({"audio_ms": pcm.len() / 8}));
            return Ok(Arc::new(
                pcm.iter()
                    .map(|s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16)
                    .collect(),
            ));
        }
        Some(Ok(plugboard_host::TtsOutput::Text {
            text: t,
            voice: v,
            language: l,
        })) => {
            session.note("tts_plugin", json!({"text": t}));
            text = t;
            voice = v.or(voice);
            language = l.or(language);
        }
        Some(Err(e)) => session.note("tts_plugin_failed", json!({"error": e})),
        None => {}
    }
    let voice = voice_for(language.as_deref(), voice.as_deref());
    let tts = tts.clone();
    tokio::task::spawn_blocking(move || tts.speak(&text, &voice))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// Turns a flow's actions into playable audio: speech for say and gather
/// prompts, clips for play. A failure is noted and replaced by a short
/// tone so the caller is never left in unexplained silence.
async fn prepare(
    tts: &Arc<Espeak>,
    app: &Arc<AppState>,
    actions: &[Action],
    session: &mut FlowSession,
) -> Vec<Prepared> {
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        let speech = match action {
            Action::Say {
                text,
                voice,
                language,
            } => Some((text.clone(), voice.clone(), language.clone())),
            Action::Gather {
                prompt: Some(p), ..
            } => Some((p.text.clone(), p.voice.clone(), p.language.clone())),
            _ => None,
        };
        let audio = if let Some((text, voice, language)) = speech {
            match speak(tts, app, session, text, voice, language).await {
                Ok(a) => Some(a),
                Err(e) => {
                    session.note("tts_failed", json!({"error": e}));
                    Some(Arc::new(audio::tone(440.0, 300, 0.2)))
                }
            }
        } else if let Action::Play { url } = action {
            let url = url.clone();
            let clip = tokio::task::spawn_blocking(move || load_clip(&url))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match clip {
                Ok(a) => Some(a),
                Err(e) => {
                    session.note("play_failed", json!({"error": e}));
                    Some(Arc::new(audio::tone(440.0, 300, 0.2)))
                }
            }
        } else {
            None
        };
        out.push(Prepared {
            action: action.clone(),
            audio,
        });
    }
    out
}

/// A clip for `play`: `beep`, `hold-music`, `silence:MS`, `tone:HZ:MS`, or
/// an http(s) URL of a WAV file (5 s timeout, 20 MiB at most).
fn load_clip(url: &str) -> Result<Arc<Vec<i16>>, String> {
    let num = |s: Option<&str>| -> Result<u32, String> {
        s.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad clip {url:?}"))
    };
    let mut parts = url.split(':');
    let clip = match parts.next().unwrap_or("") {
        "beep" => audio::beep(),
        "hold-music" | "moh" => return Ok(audio::music_on_hold()),
        "silence" => audio::silence(num(parts.next())?.min(600_000)),
        "tone" => {
            let hz = num(parts.next())?;
            let ms = num(parts.next())?;
            audio::tone(hz as f32, ms.min(600_000), 0.3)
        }
        "http" | "https" => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(20 << 20)
                .read_to_vec()
                .map_err(|e| e.to_string())?;
            audio::decode_wav(&bytes).map_err(|e| e.to_string())?
        }
        _ => return Err(format!("unknown clip {url:?}")),
    };
    Ok(Arc::new(clip))
}
