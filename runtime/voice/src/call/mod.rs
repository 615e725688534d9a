//! One call's task: the thin tokio driver around the call's media legs
//! ([`media`]) and its IVR executor ([`crate::ivr`]). RTP is paced every
//! 20 ms by the media clock ([`crate::clock`]); the task keeps the clock's
//! queue filled with what the IVR plays, feeds it what the caller sent,
//! runs the tenant's flow in the background with its audio prepared
//! ([`prepare`]), and carries out what the IVR asks (timeline entries,
//! legs, recordings, the end of the call). A failing flow gets the spoken
//! apology and the fallback, never dead air; a flow that stops asking for
//! input ends the call.
//!
//! A call the flow enqueues becomes a task of the tenant's ACD, watched by
//! this task: each offer rings the agent's registered phone on a new leg
//! while the caller hears music, the agent who answers is bridged (and
//! the ACD told), a busy or silent phone is reported as missed so the next
//! agent is tried, and the task is completed when the agent hangs up or
//! abandoned when the caller leaves first.

pub(crate) mod callback;
pub(crate) mod fax;
mod media;
mod prepare;

use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_core::flow::Event;
use plugboard_core::{Channel, EntryKind, InteractionState};
use plugboard_engine::{Ending, Engine, FlowSession, Step, TaskNews, TaskSpec};
use plugboard_media::audio;
use plugboard_media::dtmf::DtmfSource;
use plugboard_media::sdp::Negotiated;
use plugboard_media::tts::Espeak;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::MissedTickBehavior;

use crate::VoiceConfig;
use crate::clock::{DEPTH, Frame, MediaClock, PTIME, Stream};
use crate::ivr::{Effect, Ivr, Leg, Prepared, Queue, Saved, Side, Sound, TaskPhase};
use crate::meter::LegMeter;
use crate::ports::{MediaSockets, PortPair, PortPool};
use crate::signal::{CallCmd, CallOut, DialogKey, LegEvent};
use media::{CallerMedia, OutLeg};
use plugboard_engine::usage::CallDirection;
use plugboard_webrtc::{Notify, PhoneEvent, Softphones};

/// Everything a call task starts with.
pub(crate) struct CallSpec {
    pub key: DialogKey,
    pub session: FlowSession,
    pub media: PortPair,
    pub negotiated: Negotiated,
    pub cmds: mpsc::UnboundedReceiver<CallCmd>,
    /// Lifecycle messages to the endpoint: unbounded, never dropped.
    pub endpoint: mpsc::UnboundedSender<CallOut>,
    pub app: Arc<Engine>,
    pub tts: Arc<Espeak>,
    pub config: Arc<VoiceConfig>,
    pub cname: String,
    pub pool: PortPool,
    pub self_tx: mpsc::UnboundedSender<CallCmd>,
    pub clock: MediaClock,
    /// Agents' browser softphones on this node.
    pub phones: Option<Arc<Softphones>>,
}

type FlowTask = JoinHandle<(FlowSession, Step, Vec<Prepared>)>;

/// How a call names an agent's browser softphone as a leg's target.
const SOFTPHONE: &str = "softphone:";

/// What a softphone leg carries, as the IVR sees it: G.711 µ-law frames
/// (the browser's codec is the softphone's business).
fn softphone_media() -> Negotiated {
    use plugboard_media::sdp::Direction;
    Negotiated {
        law: plugboard_media::g711::Law::Mu,
        payload_type: 0,
        dtmf_pt: None,
        remote: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        remote_direction: Direction::SendRecv,
        local_direction: Direction::SendRecv,
    }
}

/// What a call tells the ACD about its task.
#[derive(Debug)]
enum AcdNews {
    /// This agent answered.
    Accept(String),
    /// This agent's phone could not be reached.
    Missed(String),
    /// The conversation is over.
    Complete,
    /// The caller left while waiting (from this number: a callback, if
    /// the queue says so).
    Left(String),
    /// A warm transfer gave the task to this agent.
    HandOver(String),
}
type SaveTask = JoinHandle<Result<Saved, String>>;
/// A conversation's recording being stored: what became of it, its
/// length and its paused time (ms).
type ConversationSave = JoinHandle<(Result<Saved, String>, u64, u64)>;

struct Call {
    key: DialogKey,
    /// The flow session, unless it is out handling an event.
    session: Option<FlowSession>,
    /// Timeline entries made while the session was out.
    notes: Vec<(EntryKind, Value)>,
    /// State changes made while the session was out.
    states: Vec<InteractionState>,
    /// What the ACD decides for the call's task.
    acd: Option<mpsc::UnboundedReceiver<TaskNews>>,
    /// The record should be written (soft) at the next turn.
    checkpoint_due: bool,
    flow_task: Option<FlowTask>,
    save_task: Option<SaveTask>,
    /// Conversation recordings being stored: each, when done, is noted
    /// with its length and paused time (ms).
    conversation_saves: Vec<ConversationSave>,
    endpoint: mpsc::UnboundedSender<CallOut>,
    app: Arc<Engine>,
    tts: Arc<Espeak>,
    config: Arc<VoiceConfig>,
    media: CallerMedia,
    ivr: Ivr,
    confirmed: bool,
    /// The caller's INVITE transaction as a trace span, from the call's
    /// start to the ACK of our answer (dropped then: the span ends).
    invite_span: Option<tracing::Span>,
    started: Instant,
    answered: Option<Instant>,
    stream: Arc<Stream>,
    ended: Option<(String, &'static str)>,
    cname: String,
    pool: PortPool,
    leg: Option<OutLeg>,
    /// A supervisor's leg.
    sup: Option<OutLeg>,
    /// A warm transfer's consulted party.
    consult: Option<OutLeg>,
    self_tx: mpsc::UnboundedSender<CallCmd>,
    phones: Option<Arc<Softphones>>,
    /// The tenant (known while the session is out handling an event).
    tenant: String,
    /// Who calls, as a softphone shows it.
    caller: Value,
    /// Listening for a fax machine's calling tone (the flow's
    /// `receive_fax` with detection): until when, and the fax address.
    fax_watch: Option<(Instant, Option<String>, plugboard_fax::CngDetector)>,
    /// The call is to be taken as a fax, filed under this fax address
    /// (default: the tenant's first).
    take_fax: Option<Option<String>>,
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
        phones,
    } = spec;
    // The clock thread sends through a clone of the RTP socket.
    let registered = media
        .try_clone_rtp()
        .and_then(|rtp| Ok((clock.register(rtp), media.register()?)));
    let (stream, sockets) = match registered {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot register RTP sockets: {e}");
            let _ = endpoint.send(CallOut::Hangup(key));
            return;
        }
    };
    let now = Instant::now();
    let ix = &session.interaction;
    let (tenant, caller) = (
        ix.tenant.clone(),
        json!({"interaction": ix.id, "from": ix.from, "to": ix.to}),
    );
    let mut call = Call {
        key,
        session: Some(session),
        notes: Vec::new(),
        states: Vec::new(),
        acd: None,
        checkpoint_due: false,
        flow_task: None,
        save_task: None,
        conversation_saves: Vec::new(),
        endpoint,
        app,
        tts,
        config,
        media: CallerMedia::new(negotiated, now),
        ivr: Ivr::new(now, audio::music_on_hold()),
        confirmed: false,
        invite_span: Some(tracing::debug_span!("sip_invite", method = "INVITE")),
        started: now,
        answered: None,
        stream,
        ended: None,
        cname,
        pool,
        leg: None,
        sup: None,
        consult: None,
        self_tx,
        phones,
        tenant,
        caller,
        fax_watch: None,
        take_fax: None,
    };
    call.main(&sockets, &mut cmds).await;
    if let Some(address) = call.take_fax.take() {
        call.receive_fax(&sockets, &mut cmds, address).await;
    }
    call.finish().await;
    drop(sockets);
}

async fn recv_leg(
    sockets: Option<&MediaSockets>,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr)> {
    match sockets {
        Some(s) => s.rtp.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The ACD's next news of the call's task, or never when there is none.
async fn acd_news(rx: &mut Option<mpsc::UnboundedReceiver<TaskNews>>) -> Option<TaskNews> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Spawns a task of the call in its span (its log lines carry the
/// tenant and interaction).
fn spawn<F>(f: F) -> JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(f))
}

/// A background task's result, or never when there is none.
async fn finished<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

impl Call {
    async fn main(&mut self, media: &MediaSockets, cmds: &mut mpsc::UnboundedReceiver<CallCmd>) {
        // The call's own pace only has to keep the media clock's queue
        // filled; the clock sends on time.
        let mut tick = tokio::time::interval(PTIME);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut rtcp_tick = tokio::time::interval(Duration::from_secs(5));
        let mut buf = vec![0u8; 2048];
        let mut rbuf = vec![0u8; 2048];
        let ring_limit = Instant::now() + Duration::from_secs(64);
        let mut lbuf = vec![0u8; 2048];
        let mut sbuf = vec![0u8; 2048];
        let mut cbuf = vec![0u8; 2048];
        while self.ended.is_none() {
            // The record as it stands is written when an agent is offered
            // or takes the call: their screen shows it (and other nodes).
            if self.checkpoint_due
                && let Some(s) = self.session.as_mut()
            {
                self.checkpoint_due = false;
                if let Err(e) = s.checkpoint_soft().await {
                    tracing::warn!("checkpoint of call {}: {e}", self.key.0);
                }
            }
            let leg_sockets = self.leg.as_ref().and_then(|l| l.sockets.clone());
            let sup_sockets = self.sup.as_ref().and_then(|l| l.sockets.clone());
            let consult_sockets = self.consult.as_ref().and_then(|l| l.sockets.clone());
            tokio::select! {
                r = recv_leg(leg_sockets.as_deref(), &mut lbuf) => {
                    if let (Ok((n, src)), Some(leg)) = (r, self.leg.as_mut()) {
                        leg.rtp(&lbuf[..n], src, self.started);
                    }
                }
                r = recv_leg(sup_sockets.as_deref(), &mut sbuf) => {
                    if let (Ok((n, src)), Some(leg)) = (r, self.sup.as_mut()) {
                        leg.rtp(&sbuf[..n], src, self.started);
                    }
                }
                r = recv_leg(consult_sockets.as_deref(), &mut cbuf) => {
                    if let (Ok((n, src)), Some(leg)) = (r, self.consult.as_mut()) {
                        leg.rtp(&cbuf[..n], src, self.started);
                    }
                }
                _ = tick.tick() => {
                    self.refill();
                    if !self.confirmed && Instant::now() > ring_limit {
                        self.ended = Some(("never answered".into(), "timeout"));
                    }
                }
                r = media.rtp.recv_from(&mut buf) => {
                    if let Ok((n, src)) = r
                        && let Some(d) = self.media.rtp(&buf[..n], src)
                    {
                        self.ivr.digit(Instant::now(), d, DtmfSource::Rfc4733);
                        self.run_effects();
                    }
                }
                r = media.rtcp.recv_from(&mut rbuf) => {
                    if let Ok((n, src)) = r {
                        self.media.rtcp(&rbuf[..n], src);
                    }
                }
                _ = rtcp_tick.tick() => {
                    if self.confirmed {
                        let (report, to) = self.media.rtcp_report(&self.cname);
                        let _ = media.rtcp.try_send_to(&report, to);
                    }
                }
                cmd = cmds.recv() => self.on_cmd(cmd),
                news = acd_news(&mut self.acd) => match news {
                    Some(news) => self.on_task_news(news),
                    None => self.acd = None,
                },
                r = finished(&mut self.flow_task) => {
                    self.flow_task = None;
                    match r {
                        Ok((session, step, prepared)) => self.on_step(session, step, prepared),
                        Err(e) => {
                            tracing::error!("flow task failed: {e}");
                            self.ended = Some(("internal error".into(), "system"));
                        }
                    }
                }
                r = finished(&mut self.save_task) => {
                    self.save_task = None;
                    self.ivr.recorded(r.unwrap_or_else(|e| Err(e.to_string())));
                    self.run_effects();
                }
            }
        }
    }

    fn on_cmd(&mut self, cmd: Option<CallCmd>) {
        match cmd {
            Some(CallCmd::Confirmed) => {
                if !self.confirmed {
                    self.confirmed = true;
                    self.invite_span = None;
                    self.answered = Some(Instant::now());
                    self.media.last_rtp = Instant::now();
                    self.note(
                        EntryKind::Answered,
                        json!({"after_ms": self.started.elapsed().as_millis() as u64}),
                    );
                    self.ivr.answer();
                }
            }
            Some(CallCmd::Dtmf(d, src)) => self.ivr.digit(Instant::now(), d, src),
            // Only fax calls accept T.38 (the endpoint refuses it on
            // others).
            Some(CallCmd::T38(_)) => {}
            Some(CallCmd::Sent(note)) => self.note(EntryKind::Sent, note),
            Some(CallCmd::Media(n)) => {
                let hold = n.on_hold();
                self.note(
                    if hold {
                        EntryKind::Hold
                    } else {
                        EntryKind::Resume
                    },
                    json!({"remote_rtp": n.remote.to_string(), "direction": format!("{:?}", n.remote_direction)}),
                );
                self.media.changed(n);
            }
            Some(CallCmd::Answer(Ok(n))) => {
                self.note(
                    EntryKind::SdpAnswer,
                    json!({"codec": n.law.name(), "telephone_event": n.dtmf_pt, "remote_rtp": n.remote.to_string(), "direction": format!("{:?}", n.remote_direction)}),
                );
                self.media.answered(n);
            }
            Some(CallCmd::Answer(Err(why))) => {
                self.note(EntryKind::SdpAnswer, json!({"error": why}));
                self.hang_up(&why, "system");
            }
            Some(CallCmd::RemoteHangup(why)) => self.ended = Some((why, "caller")),
            Some(CallCmd::SystemHangup(why)) => self.ended = Some((why, "system")),
            Some(CallCmd::Leg(key, ev)) => self.on_leg(key, ev),
            Some(CallCmd::Queue(news)) => self.ivr.queue(Instant::now(), news),
            Some(CallCmd::Shutdown) => self.hang_up("server shutting down", "system"),
            None => self.ended = Some(("endpoint gone".into(), "system")),
        }
        self.run_effects();
    }

    /// A timeline entry; kept aside while the session is out handling an
    /// event, so that none is lost.
    fn note(&mut self, kind: EntryKind, data: Value) {
        match self.session.as_mut() {
            Some(s) => s.note(kind, data),
            None => self.notes.push((kind, data)),
        }
    }

    /// What the ACD decided for the call's task.
    fn on_task_news(&mut self, news: TaskNews) {
        let tenant = self.tenant();
        let news = match news {
            TaskNews::Record => {
                self.ivr.record_conversation();
                return;
            }
            TaskNews::RecordingPaused(paused) => {
                self.ivr.pause_recording(paused);
                self.run_effects();
                return;
            }
            TaskNews::Offer { agent, sip_user } => Queue::Offer {
                target: self
                    .softphone_target(&tenant, &agent)
                    .or_else(|| sip_user.map(|u| format!("sip:{u}@{tenant}"))),
                agent,
            },
            TaskNews::Rescind { agent } => Queue::Rescind(agent),
            TaskNews::BackToFlow { why } => Queue::BackToFlow(why.to_string()),
            TaskNews::Transfer { target } => Queue::Transfer(target),
            TaskNews::CallbackDigit { digit } => Queue::CallbackDigit(digit),
            TaskNews::Consult { target, agent } => Queue::Consult {
                target: agent
                    .as_deref()
                    .and_then(|a| self.softphone_target(&tenant, a))
                    .unwrap_or(target),
                agent,
            },
            TaskNews::ConsultEnd { complete } => Queue::ConsultEnd(complete),
            TaskNews::Monitor {
                supervisor,
                sip_user,
                mode,
            } => Queue::Monitor {
                target: self
                    .softphone_target(&tenant, &supervisor)
                    .unwrap_or(sip_user),
                supervisor,
                mode,
            },
            TaskNews::Whisper { queue } => {
                // The flow's own words for the agent, else the queue's name.
                let text = self
                    .session
                    .as_ref()
                    .and_then(|s| s.interaction.attributes.get("whisper").cloned())
                    .unwrap_or(queue);
                self.ivr.queue(Instant::now(), Queue::WhisperComing);
                self.speak_then(text, Queue::Whisper);
                return;
            }
            TaskNews::Position {
                position,
                expected_wait,
            } => {
                let mut text = format!("You are number {position} in the queue.");
                if let Some(w) = expected_wait {
                    let minutes = w.as_secs().div_ceil(60).max(1);
                    let unit = if minutes == 1 { "minute" } else { "minutes" };
                    text.push_str(&format!(" The expected wait is about {minutes} {unit}."));
                }
                text.push_str(" Thank you for waiting.");
                self.speak_then(text, Queue::Announce);
                return;
            }
        };
        self.ivr.queue(Instant::now(), news);
        self.run_effects();
    }

    /// Speaks `text` (the built-in voice) in the background and hands the
    /// audio to the IVR as `news`; nothing if speech fails.
    fn speak_then(&self, text: String, news: fn(Arc<Vec<i16>>) -> Queue) {
        let (tts, me) = (self.tts.clone(), self.self_tx.clone());
        let voice = plugboard_media::tts::voice_for(None, None);
        spawn(async move {
            match prepare::espeak(&tts, text, voice).await {
                Ok(audio) => {
                    let _ = me.send(CallCmd::Queue(news(audio)));
                }
                Err(e) => tracing::warn!("speech for the queue: {e}"),
            }
        });
    }

    fn tenant(&self) -> String {
        self.tenant.clone()
    }

    /// The call's task id in the ACD: its interaction's id (also while
    /// the session is out handling an event: a call that ends then must
    /// still complete or abandon its task, or the agent stays busy).
    fn task_id(&self) -> String {
        self.session
            .as_ref()
            .map(|s| s.interaction.id.clone())
            .or_else(|| self.caller["interaction"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Moves the interaction through its state machine (kept aside while
    /// the session is out).
    fn set_state(&mut self, state: InteractionState) {
        if matches!(
            state,
            InteractionState::Offered | InteractionState::Connected
        ) {
            self.checkpoint_due = true;
        }
        match self.session.as_mut() {
            Some(s) => s.set_state(state),
            None => self.states.push(state),
        }
    }

    /// Puts the call's task in the ACD; its news comes to this task.
    fn enqueue(
        &mut self,
        queue: String,
        priority: u32,
        skills: Vec<String>,
        agent: Option<String>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.acd = Some(rx);
        let spec = TaskSpec {
            id: self.task_id(),
            queue,
            channel: Channel::Voice,
            priority,
            skills,
            agent,
        };
        let (app, tenant, me) = (self.app.clone(), self.tenant(), self.self_tx.clone());
        spawn(async move {
            if let Err(e) = app.enqueue_watched(&tenant, spec, tx).await {
                let _ = me.send(CallCmd::Queue(Queue::Refused(e.to_string())));
            }
        });
    }

    /// Tells the ACD what happened to the call's task, in the background;
    /// a refused accept comes back to the IVR.
    fn tell_acd(&self, news: AcdNews) {
        let (app, tenant, task, me) = (
            self.app.clone(),
            self.tenant(),
            self.task_id(),
            self.self_tx.clone(),
        );
        spawn(async move {
            let r = match &news {
                AcdNews::Accept(a) => app.accept_task(&tenant, &task, a).await.map(drop),
                AcdNews::Missed(a) => app.missed_task(&tenant, &task, a).await.map(drop),
                AcdNews::Complete => app.complete_task(&tenant, &task).await.map(drop),
                AcdNews::HandOver(a) => app.hand_over_task(&tenant, &task, a).await.map(drop),
                AcdNews::Left(number) => app
                    .abandon_or_call_back(&tenant, &task, number)
                    .await
                    .map(|called_back| {
                        if called_back {
                            tracing::info!("task {task} of {tenant}: the caller left, call back");
                        }
                    }),
            };
            match r {
                Err(e) if matches!(news, AcdNews::Accept(_)) => {
                    let _ = me.send(CallCmd::Queue(Queue::AcceptFailed(e.to_string())));
                }
                // An offer the ACD already took back, a task already over.
                Err(e) if matches!(news, AcdNews::HandOver(_)) => {
                    // The consulted agent has the caller all the same.
                    tracing::warn!("ACD {news:?} for task {task}: {e}");
                }
                Err(e) => tracing::debug!("ACD {news:?} for task {task}: {e}"),
                Ok(_) => {}
            }
        });
    }

    /// The waiting caller asked to be called back: the task becomes a
    /// callback, the caller hears so, and the call ends.
    fn call_me_back(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        let (app, tts) = (self.app.clone(), self.tts.clone());
        self.flow_task = Some(spawn(async move {
            let (tenant, task, number) = (
                session.interaction.tenant.clone(),
                session.interaction.id.clone(),
                session.interaction.from.clone(),
            );
            let text = match app.call_back_now(&tenant, &task, &number).await {
                Ok(()) => "Thank you. We will call you back. Goodbye.",
                Err(e) => {
                    tracing::warn!("callback for {task} of {tenant}: {e}");
                    "Sorry, we cannot call you back. Please call again. Goodbye."
                }
            };
            let actions = vec![
                plugboard_core::flow::Action::Say {
                    text: text.into(),
                    voice: None,
                    language: None,
                },
                plugboard_core::flow::Action::Hangup,
            ];
            let prepared = prepare::prepare(&tts, &app, &actions, &mut session).await;
            let step = Step {
                actions,
                state: None,
                error: None,
                elapsed_us: 0,
                memory_bytes: 0,
            };
            (session, step, prepared)
        }));
    }

    /// Ends the leg now, if there is one.
    fn drop_leg(&mut self) {
        let leg = self.leg.take();
        self.hang_up_leg(leg);
    }

    /// Ends a leg we let go of: BYE (or CANCEL) for a SIP leg; a
    /// softphone's leg ends as it is dropped.
    fn hang_up_leg(&self, leg: Option<OutLeg>) {
        if let Some(leg) = leg
            && leg.phone.is_none()
        {
            let _ = self.endpoint.send(CallOut::HangupLeg(leg.key.clone()));
        }
    }

    /// A third party's leg.
    fn side(&mut self, side: Side) -> &mut Option<OutLeg> {
        match side {
            Side::Supervisor => &mut self.sup,
            Side::Consult => &mut self.consult,
        }
    }

    /// Ends a third party's leg now, if there is one.
    fn drop_side(&mut self, side: Side) {
        let leg = self.side(side).take();
        self.hang_up_leg(leg);
    }

    /// Where to ring an agent when their softphone is connected here.
    fn softphone_target(&self, tenant: &str, agent: &str) -> Option<String> {
        self.phones
            .as_ref()
            .filter(|p| p.connected(tenant, agent))
            .map(|_| format!("{SOFTPHONE}{agent}"))
    }

    /// Carries out what the IVR asks, in order.
    fn run_effects(&mut self) {
        while let Some(effect) = self.ivr.poll_effect() {
            match effect {
                Effect::Flow(event) => self.dispatch(event),
                Effect::Note(kind, data) => self.note(kind, data),
                Effect::Dial {
                    target,
                    caller_id,
                    transfer,
                } => {
                    self.fax_watch = None;
                    let kind = if transfer {
                        EntryKind::Transfer
                    } else {
                        EntryKind::Dial
                    };
                    self.start_dial(target, caller_id, Some(kind));
                }
                Effect::CancelLeg => match self.leg.as_ref() {
                    Some(OutLeg {
                        phone: Some(phone), ..
                    }) => phone.cancel(),
                    Some(leg) => {
                        let _ = self.endpoint.send(CallOut::CancelLeg(leg.key.clone()));
                    }
                    None => {}
                },
                Effect::DropLeg => self.drop_leg(),
                Effect::Enqueue {
                    queue,
                    priority,
                    skills,
                    agent,
                } => {
                    // A caller who waits for an agent is no fax machine.
                    self.fax_watch = None;
                    self.enqueue(queue, priority, skills, agent);
                }
                Effect::Ring { target, .. } => {
                    // A leg still being given up is ended first.
                    self.drop_leg();
                    self.start_dial(target, None, None);
                }
                Effect::RingSide { side, target } => {
                    self.drop_side(side);
                    match self.dial_leg(target, None, None) {
                        Ok(leg) => *self.side(side) = Some(leg),
                        Err(why) => self.ivr.side_leg(side, Leg::Unavailable(why)),
                    }
                }
                Effect::DropSide(side) => self.drop_side(side),
                Effect::PromoteConsult => {
                    if let Some(leg) = self.consult.take() {
                        self.drop_leg();
                        self.leg = Some(leg);
                    }
                }
                Effect::HandOver { agent } => self.tell_acd(AcdNews::HandOver(agent)),
                Effect::Missed { agent } => self.tell_acd(AcdNews::Missed(agent)),
                Effect::Accept { agent } => self.tell_acd(AcdNews::Accept(agent)),
                Effect::TaskDone => self.tell_acd(AcdNews::Complete),
                Effect::CallMeBack => self.call_me_back(),
                Effect::State(state) => self.set_state(state),
                Effect::SaveRecording(samples) => self.save(samples),
                Effect::SaveConversation { samples, paused_ms } => {
                    self.save_conversation(samples, paused_ms)
                }
                Effect::Hangup(why) => self.hang_up(&why, "flow"),
                Effect::Send {
                    channel,
                    to,
                    text,
                    subject,
                } => self.send(channel, to, text, subject),
                Effect::ReceiveFax(address) => self.take_as_fax(address, "the flow's receive_fax"),
                Effect::DetectFax(until, address) => match plugboard_fax::CngDetector::new() {
                    Ok(cng) => self.fax_watch = Some((until, address, cng)),
                    Err(e) => tracing::error!("no fax tone detector: {e}"),
                },
            }
        }
    }

    /// The flow's `send`, in the background; what it did comes back as
    /// [`CallCmd::Sent`] for the timeline.
    fn send(&mut self, channel: Channel, to: String, text: String, subject: Option<String>) {
        let (app, tenant, me) = (self.app.clone(), self.tenant(), self.self_tx.clone());
        let field = |k: &str| self.caller[k].as_str().unwrap_or_default().to_string();
        let (ix, own) = (field("interaction"), field("to"));
        spawn(async move {
            let origin = (ix.as_str(), Channel::Voice, own.as_str());
            let sent = app
                .flow_send(&tenant, origin, (channel, &to), text, subject)
                .await;
            let _ = me.send(CallCmd::Sent(plugboard_engine::sent_note(
                channel, &to, &sent,
            )));
        });
    }

    /// Ends the call's voice part: a fax terminal takes it over
    /// ([`Call::receive_fax`]) once the main loop is left.
    fn take_as_fax(&mut self, address: Option<String>, why: &str) {
        if self.ended.is_none() {
            self.fax_watch = None;
            self.take_fax = Some(address);
            self.ended = Some((format!("taken as a fax ({why})"), "flow"));
            // The gateway that hears the fax may re-INVITE to T.38 now.
            let _ = self.endpoint.send(CallOut::FaxDialog(self.key.clone()));
        }
    }

    /// Receives a fax on the call (its caller's media, its sockets), filed
    /// under the tenant's fax address; notes how it went.
    async fn receive_fax(
        &mut self,
        sockets: &MediaSockets,
        cmds: &mut mpsc::UnboundedReceiver<CallCmd>,
        address: Option<String>,
    ) {
        let tenant = self.tenant();
        let filed = self
            .app
            .channel_address(&tenant, Channel::Fax, address.as_deref())
            .await;
        let address = match filed {
            Ok(a) => a,
            Err(e) => {
                self.note(EntryKind::Fax, json!({"error": e.to_string()}));
                let _ = self.endpoint.send(CallOut::Hangup(self.key.clone()));
                return;
            }
        };
        self.drop_leg();
        let fax = fax::FaxCall {
            tenant,
            address: address.clone(),
            caller: self.caller["from"].as_str().unwrap_or_default().to_string(),
            call_id: self.key.0.clone(),
        };
        self.note(
            EntryKind::Fax,
            json!({"state": "receiving", "address": address}),
        );
        let mut taking = fax::Taking {
            key: &self.key,
            fax: &fax,
            sockets,
            caller: &mut self.media,
            cmds,
            endpoint: &self.endpoint,
            app: &self.app,
            config: &self.config,
            sent: Vec::new(),
        };
        let (outcome, caller_left) = taking.take(true).await;
        let sent = std::mem::take(&mut taking.sent);
        for note in sent {
            self.note(EntryKind::Sent, note);
        }
        let data = match outcome {
            Some(o) => {
                json!({"state": "ended", "address": address, "pages": o.stats.pages, "ok": o.ok, "result": o.text})
            }
            None => {
                json!({"state": "ended", "address": address, "error": "the fax could not be received"})
            }
        };
        self.note(EntryKind::Fax, data);
        if caller_left && let Some((why, by)) = self.ended.as_mut() {
            why.push_str("; the caller hung up after it");
            *by = "caller";
        }
    }

    /// Sends an event to the flow in the background; audio for the actions
    /// it returns is prepared before they run.
    fn dispatch(&mut self, event: Event) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        let tts = self.tts.clone();
        let app = self.app.clone();
        self.flow_task = Some(spawn(async move {
            let step = session.handle(event).await;
            let prepared = prepare::prepare(&tts, &app, &step.actions, &mut session).await;
            (session, step, prepared)
        }));
    }

    /// The session is back from the flow.
    fn restore(&mut self, mut session: FlowSession) {
        for (kind, data) in self.notes.drain(..) {
            session.note(kind, data);
        }
        for state in self.states.drain(..) {
            session.set_state(state);
        }
        self.session = Some(session);
    }

    fn on_step(&mut self, session: FlowSession, step: Step, prepared: Vec<Prepared>) {
        self.restore(session);
        if step.error.is_some() {
            tracing::info!("flow failed on call {}: fallback", self.key.0);
        }
        self.ivr.step(Instant::now(), prepared);
        self.run_effects();
    }

    /// Stores a conversation's recording in the background; the call's
    /// end notes it.
    fn save_conversation(&mut self, samples: Vec<i16>, paused_ms: u64) {
        // Also while the session is out with the flow (the call's own ids).
        let (tenant, ix, app) = (self.tenant(), self.task_id(), self.app.clone());
        if ix.is_empty() {
            tracing::warn!("a conversation recording without its interaction is dropped");
            return;
        }
        let duration_ms = samples.len() as u64 / 8;
        self.conversation_saves.push(spawn(async move {
            let wav = audio::encode_wav(&samples);
            drop(samples);
            let saved = app
                .save_recording(&tenant, &ix, &wav)
                .await
                .map_err(|e| e.to_string())
                .map(|id| Saved {
                    url: format!("/v1/tenants/{tenant}/recordings/{id}"),
                    id,
                });
            (saved, duration_ms, paused_ms)
        }));
    }

    /// Stores a recording in the background.
    fn save(&mut self, samples: Vec<i16>) {
        let Some(s) = self.session.as_ref().map(|s| &s.interaction) else {
            return;
        };
        let (tenant, ix, app) = (s.tenant.clone(), s.id.clone(), self.app.clone());
        self.save_task = Some(spawn(async move {
            let wav = audio::encode_wav(&samples);
            let id = app
                .save_recording(&tenant, &ix, &wav)
                .await
                .map_err(|e| e.to_string())?;
            let url = format!("/v1/tenants/{tenant}/recordings/{id}");
            Ok(Saved { id, url })
        }));
    }

    /// Calls out on a new leg (noted as `kind`, if any); the caller hears
    /// ringback meanwhile, or music when an agent's phone is rung.
    fn start_dial(&mut self, target: String, caller_id: Option<String>, kind: Option<EntryKind>) {
        match self.dial_leg(target, caller_id, kind) {
            Ok(leg) => self.leg = Some(leg),
            Err(why) => self.ivr.leg(Instant::now(), Leg::Unavailable(why)),
        }
    }

    /// A new outbound leg calling `target` (noted as `kind`, if any), or
    /// why there can be none (no free media ports, no softphone).
    fn dial_leg(
        &mut self,
        target: String,
        caller_id: Option<String>,
        kind: Option<EntryKind>,
    ) -> Result<OutLeg, String> {
        if let Some(agent) = target.strip_prefix(SOFTPHONE) {
            return self
                .ring_softphone(agent, &target, kind)
                .ok_or_else(|| format!("agent {agent} has no softphone connected"));
        }
        let detail = json!({"direction": "outbound", "to": target});
        let meter = LegMeter::admit(
            &self.app,
            &self.tenant,
            false,
            CallDirection::Outbound,
            detail,
        )
        .map_err(|r| r.to_string())?;
        let (out_leg, offer) =
            media::new_leg(&self.pool, &self.config).ok_or("no free RTP ports")?;
        let key = out_leg.key.clone();
        let tenant = self.tenant.clone();
        let caller_id = caller_id.or_else(|| self.caller["from"].as_str().map(str::to_string));
        if let Some(kind) = kind {
            self.note(kind, json!({"target": target, "leg_call_id": key.0}));
        }
        let call = self.self_tx.clone();
        // The trunk lookup and DNS happen here, off the SIP loop.
        let (app, endpoint, leg) = (self.app.clone(), self.endpoint.clone(), key.clone());
        spawn(async move {
            let route = crate::route::resolve(&app, &tenant, &target).await;
            let _ = endpoint.send(CallOut::Dial {
                leg,
                route,
                caller_id,
                offer,
                call,
                meter: Box::new(meter),
            });
        });
        Ok(out_leg)
    }

    /// A leg to an agent's browser softphone; `None` when it is not
    /// connected on this node. Its news comes back as a SIP leg's would.
    fn ring_softphone(
        &mut self,
        agent: &str,
        target: &str,
        kind: Option<EntryKind>,
    ) -> Option<OutLeg> {
        let phones = self.phones.clone()?;
        let key: DialogKey = (
            format!("{}@softphone", plugboard_sip::random_token()),
            plugboard_sip::random_token(),
        );
        let (tenant, info) = (self.tenant.clone(), self.caller.clone());
        let (tx, leg_key) = (self.self_tx.clone(), key.clone());
        let notify: Notify = Box::new(move |ev| {
            let ev = match ev {
                PhoneEvent::Ringing => LegEvent::Ringing,
                PhoneEvent::Answered => LegEvent::Answered(softphone_media()),
                PhoneEvent::Failed(status, reason) => LegEvent::Failed(status, reason),
                PhoneEvent::Hangup => LegEvent::Hangup,
                PhoneEvent::Hold(on) => LegEvent::Hold(on),
            };
            let _ = tx.send(CallCmd::Leg(leg_key.clone(), ev));
        });
        let phone = phones.ring(&tenant, agent, info, notify)?;
        if let Some(kind) = kind {
            self.note(kind, json!({"target": target, "leg_call_id": key.0}));
        }
        Some(OutLeg::softphone(key, phone))
    }

    fn on_leg(&mut self, key: DialogKey, ev: LegEvent) {
        for side in [Side::Supervisor, Side::Consult] {
            if self.side(side).as_ref().is_some_and(|l| l.key == key) {
                self.on_side_leg(side, ev);
                return;
            }
        }
        // Events of a leg we already left (after a REFER) are stale.
        let Some(leg) = self.leg.as_mut().filter(|l| l.key == key) else {
            return;
        };
        let news = match ev {
            // Only the agent who has the caller holds them.
            LegEvent::Hold(on) => {
                self.ivr.queue(Instant::now(), Queue::Hold(on));
                return;
            }
            // Only fax legs go over to T.38.
            LegEvent::T38(_) | LegEvent::T38Refused(_) => return,
            LegEvent::Ringing => Leg::Ringing,
            LegEvent::Answered(n) => {
                leg.answered(&n);
                Leg::Answered(n.law.name())
            }
            // The leg is over (or, after a REFER, left to end: its BYE
            // follows).
            LegEvent::Failed(status, reason) => {
                self.leg = None;
                Leg::Failed(status, reason)
            }
            LegEvent::Refer(target) => {
                self.leg = None;
                Leg::Refer(target)
            }
            LegEvent::Hangup => {
                self.leg = None;
                Leg::Hangup
            }
        };
        self.ivr.leg(Instant::now(), news);
    }

    /// News of a third party's leg.
    fn on_side_leg(&mut self, side: Side, ev: LegEvent) {
        let news = match ev {
            LegEvent::Ringing => Leg::Ringing,
            LegEvent::Answered(n) => {
                if let Some(leg) = self.side(side).as_mut() {
                    leg.answered(&n);
                }
                Leg::Answered(n.law.name())
            }
            LegEvent::Failed(status, reason) => {
                *self.side(side) = None;
                Leg::Failed(status, reason)
            }
            // A third party neither holds the caller nor transfers the
            // call: their REFER ends their part.
            LegEvent::Hold(_) | LegEvent::T38(_) | LegEvent::T38Refused(_) => return,
            LegEvent::Refer(_) | LegEvent::Hangup => {
                *self.side(side) = None;
                Leg::Hangup
            }
        };
        self.ivr.side_leg(side, news);
    }

    /// Ends the call from our side (BYE), unless it has already ended;
    /// `by` is who is recorded as ending it.
    fn hang_up(&mut self, why: &str, by: &'static str) {
        if self.ended.is_none() {
            self.ended = Some((why.to_string(), by));
            let _ = self.endpoint.send(CallOut::Hangup(self.key.clone()));
        }
    }

    /// Keeps [`DEPTH`] frames ready for the media clock. Frames the clock
    /// found missing are prepared and dropped, so the call's timeline (and
    /// its RTP timestamps) stays on the clock's.
    fn refill(&mut self) {
        let missed = self.stream.take_missed().min(50);
        for _ in 0..missed {
            let _ = self.on_tick();
        }
        for _ in 0..DEPTH {
            if self.stream.queued() >= DEPTH || self.ended.is_some() {
                break;
            }
            let frame = self.on_tick();
            if !self.stream.push(frame) {
                break;
            }
        }
    }

    /// Runs one frame period of the call and returns the packet to send.
    fn on_tick(&mut self) -> Frame {
        if !self.confirmed {
            return None;
        }
        let now = Instant::now();
        // What the caller sent: to the IVR (recording, in-band DTMF) or,
        // when bridged, to the other leg.
        let heard = self.media.heard();
        let leg = self.leg.as_mut().and_then(|l| l.audio());
        let sup = self.sup.as_mut().and_then(|l| l.audio());
        let consult = self.consult.as_mut().and_then(|l| l.audio());
        let frames = self.ivr.tick_all(
            now,
            Sound {
                heard: &heard,
                leg: leg.as_deref(),
                supervisor: sup.as_deref(),
                consult: consult.as_deref(),
            },
        );
        let out = self.media.frame(&frames.caller);
        for (to, frame) in [
            (self.leg.as_mut(), frames.leg),
            (self.sup.as_mut(), frames.supervisor),
            (self.consult.as_mut(), frames.consult),
        ] {
            if let (Some(to), Some(frame)) = (to, frame) {
                to.send(&frame);
            }
        }
        for d in self.media.inband(&heard) {
            self.ivr.digit(now, d, DtmfSource::InBand);
        }
        if let Some((until, address, cng)) = self.fax_watch.as_mut() {
            if now > *until {
                self.fax_watch = None;
            } else if cng.heard(&heard) {
                let address = address.take();
                self.take_as_fax(address, "a fax machine's calling tone was heard");
            }
        }
        self.run_effects();
        if !self.media.negotiated.on_hold()
            && self.media.last_rtp.elapsed() > self.config.rtp_timeout
        {
            self.note(
                EntryKind::MediaTimeout,
                json!({"after_s": self.config.rtp_timeout.as_secs()}),
            );
            self.hang_up("no media from the caller", "flow");
        }
        if self.started.elapsed() > self.config.max_call {
            self.hang_up("maximum call length", "flow");
        }
        out
    }

    /// Ends the call's record: a recording in progress is stored, the
    /// flow hears `hangup`, the timeline gets the cause and media
    /// statistics, the record is written durably.
    async fn finish(&mut self) {
        // Media ends with the call: what the clock finds after this is not
        // lateness.
        let late = self.stream.stats();
        self.drop_leg();
        self.drop_side(Side::Supervisor);
        self.drop_side(Side::Consult);
        // The ACD learns the call is over: a caller who leaves while
        // waiting has abandoned; a conversation ends the agent's task.
        match self.ivr.task() {
            TaskPhase::Waiting => {
                // Called back instead, if the queue says so and they
                // waited long enough.
                let number = self
                    .session
                    .as_ref()
                    .map(|s| s.interaction.from.clone())
                    .or_else(|| self.caller["from"].as_str().map(str::to_string))
                    .unwrap_or_default();
                self.tell_acd(AcdNews::Left(number));
            }
            TaskPhase::Connected => self.tell_acd(AcdNews::Complete),
            TaskPhase::None => {}
        }
        if let Some(t) = self.flow_task.take()
            && let Ok((session, _, _)) = t.await
        {
            self.restore(session);
        }
        self.ivr.end();
        self.run_effects();
        if let Some(t) = self.save_task.take() {
            self.ivr
                .recorded(t.await.unwrap_or_else(|e| Err(e.to_string())));
            self.run_effects();
        }
        for t in std::mem::take(&mut self.conversation_saves) {
            match t.await {
                Ok((Ok(Saved { id, url }), duration_ms, paused_ms)) => self.note(
                    EntryKind::Recording,
                    json!({"id": id, "url": url, "duration_ms": duration_ms,
                           "of": "conversation", "paused_ms": paused_ms}),
                ),
                Ok((Err(e), _, _)) => self.note(
                    EntryKind::RecordingFailed,
                    json!({"of": "conversation", "error": e}),
                ),
                Err(e) => self.note(
                    EntryKind::RecordingFailed,
                    json!({"of": "conversation", "error": e.to_string()}),
                ),
            }
        }
        let (cause, by) = self
            .ended
            .clone()
            .unwrap_or_else(|| ("ended".into(), "system"));
        let Some(mut session) = self.session.take() else {
            return;
        };
        if by == "caller" && self.confirmed && !session.failed() {
            // The flow learns that the caller left; what it answers is moot.
            let _ = session.handle(Event::Hangup).await;
        }
        let mut stats = self.media.stats();
        stats["send_lateness_us"] =
            json!({"p50": late.p50_us, "p99": late.p99_us, "max": late.max_us});
        stats["frames_not_ready"] = json!(late.underruns);
        session.note(EntryKind::Media, stats);
        session.note(
            EntryKind::Hangup,
            json!({
                "cause": cause,
                "by": by,
                "answered": self.answered.is_some(),
                "duration_ms": self.answered.map(|a| a.elapsed().as_millis() as u64).unwrap_or(0),
                "digits": self.ivr.digits(),
            }),
        );
        session
            .interaction
            .attributes
            .insert("hangup_cause".into(), cause.clone());
        // A caller who leaves while queued has abandoned; a call the
        // system ended before it was ever answered has failed.
        let ending = match by {
            "caller" => Ending::Customer,
            "flow" => Ending::Flow,
            _ => Ending::System {
                answered: self.answered.is_some(),
            },
        };
        if let Err(e) = session.close(ending).await {
            tracing::error!("cannot store the call record: {e}");
        }
    }
}
