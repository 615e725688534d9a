//! The callback runner: the voice side of callbacks
//! ([`plugboard_engine::callback`]). For each callback the ACD offers, a
//! task rings the agent's registered phone (the customer's number shown
//! as caller id); when the agent answers and the ACD lets them take it,
//! it calls the customer (through the tenant's trunk for a number) while
//! the agent hears ringback, then relays audio both ways every 20 ms
//! until either side hangs up. The outcome (`answered`, `busy`,
//! `no-answer`, `failed`) goes on the callback's record; an agent who
//! does not answer is reported missed, and a rescinded offer stops the
//! ringing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_engine::{CallbackJob, Engine, TaskNews};
use plugboard_media::audio::{self, FRAME};
use tokio::sync::mpsc;

use super::media::{OutLeg, new_leg};
use crate::VoiceConfig;
use crate::ivr::Queue;
use crate::ports::{MediaSockets, PortPool};
use crate::signal::{CallCmd, CallOut, LegEvent};

/// What a callback task needs from the endpoint.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub app: Arc<Engine>,
    pub endpoint: mpsc::UnboundedSender<CallOut>,
    pub pool: PortPool,
    pub config: Arc<VoiceConfig>,
}

/// Runs callbacks for the engine until the engine stops sending.
pub(crate) fn spawn_runner(ctx: Ctx) {
    let (tx, mut rx) = mpsc::unbounded_channel::<CallbackJob>();
    ctx.app.set_callback_runner(tx);
    tokio::spawn(async move {
        // Running callbacks: where to tell them their offer was taken back.
        let mut running: HashMap<(String, String), mpsc::UnboundedSender<CallCmd>> = HashMap::new();
        while let Some(job) = rx.recv().await {
            running.retain(|_, tx| !tx.is_closed());
            let key = (job.tenant.clone(), job.task.clone());
            match job.news {
                TaskNews::Offer { agent, sip_user } => {
                    let (tx, cmds) = mpsc::unbounded_channel();
                    running.insert(key, tx.clone());
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let mut cb = Callback {
                            ctx,
                            tenant: job.tenant,
                            task: job.task,
                            number: job.number,
                            agent,
                            me: tx,
                            agent_leg: None,
                            customer: None,
                        };
                        cb.run(sip_user, cmds).await;
                    });
                }
                TaskNews::Rescind { agent } => {
                    if let Some(tx) = running.get(&key) {
                        let _ = tx.send(CallCmd::Queue(Queue::Rescind(agent)));
                    }
                }
                // A callback's conversation is not transferred or
                // supervised over the API yet; it has nobody waiting.
                TaskNews::BackToFlow { .. }
                | TaskNews::Transfer { .. }
                | TaskNews::CallbackDigit { .. }
                | TaskNews::Consult { .. }
                | TaskNews::ConsultEnd { .. }
                | TaskNews::Monitor { .. }
                | TaskNews::Whisper { .. }
                | TaskNews::Position { .. }
                | TaskNews::Record
                | TaskNews::RecordingPaused(_) => {}
            }
        }
    });
}

/// Starts a leg of the tenant's to `target` whose events go to `me` (a
/// `new_call` counts within the tenant's calls per second); `None` if the
/// tenant is at its limits or no media ports are free.
pub(super) async fn dial(
    ctx: &Ctx,
    tenant: &str,
    target: &str,
    caller_id: Option<String>,
    new_call: bool,
    detail: serde_json::Value,
    me: &mpsc::UnboundedSender<CallCmd>,
) -> Option<OutLeg> {
    let meter = crate::meter::LegMeter::admit(
        &ctx.app,
        tenant,
        new_call,
        plugboard_engine::usage::CallDirection::Outbound,
        detail,
    )
    .ok()?;
    let (mut leg, offer) = new_leg(&ctx.pool, &ctx.config)?;
    let route = crate::route::resolve(&ctx.app, tenant, target).await;
    leg.t38_trunk = route
        .as_ref()
        .is_ok_and(|r| r.3.as_ref().is_some_and(|t| t.t38));
    let _ = ctx.endpoint.send(CallOut::Dial {
        leg: leg.key.clone(),
        route,
        caller_id,
        offer,
        call: me.clone(),
        meter: Box::new(meter),
    });
    Some(leg)
}

/// One callback in progress.
struct Callback {
    ctx: Ctx,
    tenant: String,
    task: String,
    number: String,
    agent: String,
    me: mpsc::UnboundedSender<CallCmd>,
    agent_leg: Option<OutLeg>,
    customer: Option<OutLeg>,
}

/// Where a callback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    RingingAgent,
    CallingCustomer,
    Bridged,
}

async fn recv(
    sockets: Option<Arc<MediaSockets>>,
    buf: &mut [u8],
) -> Option<(usize, std::net::SocketAddr)> {
    match sockets {
        Some(s) => s.rtp.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

impl Callback {
    async fn run(&mut self, sip_user: Option<String>, mut cmds: mpsc::UnboundedReceiver<CallCmd>) {
        let Some(user) = sip_user else {
            tracing::info!(
                "callback {}: agent {} has no SIP phone",
                self.task,
                self.agent
            );
            let _ = self
                .ctx
                .app
                .missed_task(&self.tenant, &self.task, &self.agent)
                .await;
            return;
        };
        let target = format!("sip:{user}@{}", self.tenant);
        let caller_id = Some(self.number.clone());
        match self.dial(&target, caller_id, false).await {
            Some(leg) => self.agent_leg = Some(leg),
            None => {
                let _ = self
                    .ctx
                    .app
                    .missed_task(&self.tenant, &self.task, &self.agent)
                    .await;
                return;
            }
        }
        let outcome = self.converse(&mut cmds).await;
        for leg in [self.agent_leg.take(), self.customer.take()]
            .into_iter()
            .flatten()
        {
            let _ = self.ctx.endpoint.send(CallOut::HangupLeg(leg.key));
        }
        let app = &self.ctx.app;
        let r = match outcome {
            Outcome::Missed => app
                .missed_task(&self.tenant, &self.task, &self.agent)
                .await
                .map(drop),
            Outcome::Rescinded => Ok(()),
            Outcome::Attempt(o) => app
                .callback_attempt(&self.tenant, &self.task, &self.agent, o)
                .await
                .map(drop),
        };
        if let Err(e) = r {
            tracing::warn!("callback {} of {}: {e}", self.task, self.tenant);
        }
    }

    /// Starts a leg to `target` (see [`dial`]).
    async fn dial(
        &self,
        target: &str,
        caller_id: Option<String>,
        new_call: bool,
    ) -> Option<OutLeg> {
        let detail =
            serde_json::json!({"direction": "outbound", "to": target, "callback": self.task});
        dial(
            &self.ctx,
            &self.tenant,
            target,
            caller_id,
            new_call,
            detail,
            &self.me,
        )
        .await
    }

    /// Rings the agent, calls the customer, bridges them; how it ended.
    async fn converse(&mut self, cmds: &mut mpsc::UnboundedReceiver<CallCmd>) -> Outcome {
        let mut phase = Phase::RingingAgent;
        let started = Instant::now();
        let mut tick = tokio::time::interval(crate::clock::PTIME);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ringback: Vec<i16> = audio::tone(425.0, 1000, 0.2)
            .into_iter()
            .chain(audio::silence(4000))
            .collect();
        let mut ring_pos = 0usize;
        let mut customer_deadline = None;
        let (mut abuf, mut cbuf) = (vec![0u8; 2048], vec![0u8; 2048]);
        loop {
            let a_sock = self.agent_leg.as_ref().and_then(|l| l.sockets.clone());
            let c_sock = self.customer.as_ref().and_then(|l| l.sockets.clone());
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { return Outcome::Attempt("failed") };
                    match cmd {
                        CallCmd::Queue(Queue::Rescind(a)) if a == self.agent && phase == Phase::RingingAgent => {
                            return Outcome::Rescinded;
                        }
                        CallCmd::Leg(key, ev) => {
                            let is_agent = self.agent_leg.as_ref().is_some_and(|l| l.key == key);
                            let is_customer = self.customer.as_ref().is_some_and(|l| l.key == key);
                            match (ev, is_agent, is_customer, phase) {
                                (LegEvent::Answered(n), true, _, Phase::RingingAgent) => {
                                    if let Some(l) = self.agent_leg.as_mut() {
                                        l.answered(&n);
                                    }
                                    if let Err(e) = self.ctx.app.accept_task(&self.tenant, &self.task, &self.agent).await {
                                        tracing::info!("callback {}: {e}", self.task);
                                        return Outcome::Rescinded;
                                    }
                                    let number = self.number.clone();
                                    match self.dial(&number, None, true).await {
                                        Some(leg) => self.customer = Some(leg),
                                        None => return Outcome::Attempt("failed"),
                                    }
                                    phase = Phase::CallingCustomer;
                                    customer_deadline = Some(Instant::now() + Duration::from_secs(45));
                                }
                                (LegEvent::Failed(..), true, _, Phase::RingingAgent) => return Outcome::Missed,
                                (LegEvent::Answered(n), _, true, Phase::CallingCustomer) => {
                                    if let Some(l) = self.customer.as_mut() {
                                        l.answered(&n);
                                    }
                                    phase = Phase::Bridged;
                                }
                                (LegEvent::Failed(status, _), _, true, _) => {
                                    self.customer = None;
                                    return Outcome::Attempt(match status {
                                        486 | 600 | 603 => "busy",
                                        408 | 480 | 487 => "no-answer",
                                        _ => "failed",
                                    });
                                }
                                (LegEvent::Hangup, true, _, _) => {
                                    self.agent_leg = None;
                                    return Outcome::Attempt(if phase == Phase::Bridged { "answered" } else { "failed" });
                                }
                                (LegEvent::Hangup, _, true, _) => {
                                    self.customer = None;
                                    return Outcome::Attempt("answered");
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
                r = recv(a_sock, &mut abuf) => {
                    if let (Some((n, src)), Some(l)) = (r, self.agent_leg.as_mut()) {
                        l.rtp(&abuf[..n], src, started);
                    }
                }
                r = recv(c_sock, &mut cbuf) => {
                    if let (Some((n, src)), Some(l)) = (r, self.customer.as_mut()) {
                        l.rtp(&cbuf[..n], src, started);
                    }
                }
                _ = tick.tick() => {
                    match phase {
                        Phase::RingingAgent => {}
                        Phase::CallingCustomer => {
                            let mut frame = [0i16; FRAME];
                            for s in frame.iter_mut() {
                                *s = ringback[ring_pos % ringback.len()];
                                ring_pos += 1;
                            }
                            if let Some(l) = self.agent_leg.as_mut() {
                                let _ = l.audio();
                                l.send(&frame);
                            }
                            if customer_deadline.is_some_and(|d| Instant::now() > d) {
                                return Outcome::Attempt("no-answer");
                            }
                        }
                        Phase::Bridged => {
                            let from_agent = self.agent_leg.as_mut().and_then(|l| l.audio());
                            let from_customer = self.customer.as_mut().and_then(|l| l.audio());
                            let silence = [0i16; FRAME];
                            if let Some(l) = self.customer.as_mut() {
                                l.send(from_agent.as_deref().unwrap_or(&silence));
                            }
                            if let Some(l) = self.agent_leg.as_mut() {
                                l.send(from_customer.as_deref().unwrap_or(&silence));
                            }
                        }
                    }
                    if started.elapsed() > self.ctx.config.max_call {
                        return Outcome::Attempt(if phase == Phase::Bridged { "answered" } else { "failed" });
                    }
                }
            }
        }
    }
}

/// How a callback task ended.
enum Outcome {
    /// The agent's phone did not answer: the ACD tries the next agent.
    Missed,
    /// The ACD took the offer back (or would not let the agent take it).
    Rescinded,
    /// The agent took it; the customer answered or not.
    Attempt(&'static str),
}
