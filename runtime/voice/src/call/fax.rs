//! Fax calls: the voice side of the fax channel.
//!
//! - **Receiving.** A call to a tenant's address of channel `fax` is
//!   answered by a T.30 terminal ([`plugboard_fax::Terminal`]) instead of
//!   a flow. When the fax ends (or the call does), the whole pages
//!   received become a PDF (the TIFF is kept beside it) and the fax an
//!   inbound message of the fax channel ([`Engine::receive`]): it starts a
//!   conversation that runs the address's flow, can be queued to an agent
//!   and shows in the customer's history. A call that carried no fax
//!   (speech, silence) is stored as `no fax detected`, without running
//!   the flow.
//! - **Sending.** The fax channel's courier ([`FaxCourier`]) takes the
//!   outbox's fax messages (sent over the API, or a flow's or agent's
//!   reply on a fax conversation): the message's PDF or TIFF — or its
//!   text set on a page — is rendered to fax pages, the number is called
//!   through the tenant's trunk, and the terminal sends. Busy, no answer
//!   and failures on the line are tried again by the outbox; a document
//!   that cannot be read, or a line where no fax machine answers, fails
//!   the message.
//!
//! Both run the terminal on the 20 ms frame clock ([`Line`]): each tick
//! runs every frame due since the media started, so a late task catches
//! up instead of losing audio (the modems cannot bridge a gap).
//!
//! **T.38.** A fax call goes over to T.38 when the far end re-INVITEs to
//! `image/t38` (a gateway that heard the fax tones), and a fax sent
//! through a trunk configured with `t38` asks for it by re-INVITE once
//! answered. The terminal then starts T.30 again over IFP packets in
//! UDPTL datagrams, on the same media port.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_core::is_phone_number as is_number;
use plugboard_core::{Channel, Message};
use plugboard_engine::{Courier, Delivered, DeliveryError, Engine, Inbound};
use plugboard_fax::document::{self, Tools};
use plugboard_fax::{FaxError, Outcome, Role, Terminal, t38};
use plugboard_media::audio::FRAME;
use plugboard_media::sdp::{Negotiated, T38Stream, UdpEc};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::callback::{Ctx, dial};
use super::media::{CallerMedia, OutLeg};
use crate::VoiceConfig;
use crate::clock::PTIME;
use crate::ports::{MediaSockets, PortPair};
use crate::signal::{CallCmd, CallOut, DialogKey, LegEvent};

/// A media leg as a fax terminal hears and talks on it.
trait Audio {
    /// The far end's next frame (silence when none came).
    fn heard(&mut self) -> Vec<i16>;
    /// Sends a frame.
    fn send(&mut self, pcm: &[i16; FRAME]);
}

/// The caller's media of an inbound call, sent straight to its socket.
struct CallerAudio<'a> {
    media: &'a mut CallerMedia,
    socket: &'a tokio::net::UdpSocket,
}

impl Audio for CallerAudio<'_> {
    fn heard(&mut self) -> Vec<i16> {
        self.media.heard()
    }

    fn send(&mut self, pcm: &[i16; FRAME]) {
        if let Some(p) = self.media.frame(pcm) {
            let _ = self.socket.try_send_to(p.bytes(), p.to());
        }
    }
}

impl Audio for OutLeg {
    fn heard(&mut self) -> Vec<i16> {
        self.audio().unwrap_or_else(|| vec![0; FRAME])
    }

    fn send(&mut self, pcm: &[i16; FRAME]) {
        OutLeg::send(self, pcm);
    }
}

/// A terminal on the frame clock.
struct Line {
    terminal: Terminal,
    /// When media started (the answer), if it has.
    started: Option<Instant>,
    /// Frames run so far.
    frames: u64,
    /// Whole pages told so far.
    pages: u32,
    /// Where UDPTL goes, once the call went over to T.38.
    t38: Option<std::net::SocketAddr>,
}

impl Line {
    fn new(terminal: Terminal) -> Line {
        Line {
            terminal,
            started: None,
            frames: 0,
            pages: 0,
            t38: None,
        }
    }

    /// Goes over to T.38 as the re-INVITE agreed. Already over T.38 (a
    /// session refresh, or both sides asked at once), only where UDPTL
    /// goes may change: T.30 is not started again.
    fn use_t38(&mut self, stream: &T38Stream) -> Result<(), FaxError> {
        if self.t38.is_some() {
            self.t38 = Some(stream.remote);
            return Ok(());
        }
        let params = t38::Params {
            version: stream.version,
            max_bit_rate: stream.max_bit_rate,
            transferred_tcf: stream.transferred_tcf,
            max_datagram: stream.max_datagram,
            redundancy: if stream.ec == UdpEc::Redundancy {
                t38::REDUNDANCY
            } else {
                0
            },
        };
        self.terminal.use_t38(&params)?;
        self.t38 = Some(stream.remote);
        Ok(())
    }

    /// A datagram on the media port once over T.38 (true: it was taken
    /// — fed to the terminal if it came from the far end's address,
    /// dropped otherwise).
    fn udptl(&mut self, datagram: &[u8], src: std::net::SocketAddr) -> bool {
        let Some(remote) = self.t38 else {
            return false;
        };
        if src.ip() == remote.ip() {
            self.terminal.udptl_in(datagram);
        }
        true
    }

    /// The page count, when a page was completed since last asked.
    fn new_page(&mut self) -> Option<u32> {
        let pages = self.terminal.stats().pages;
        (pages > self.pages).then(|| {
            self.pages = pages;
            pages
        })
    }

    fn start(&mut self) {
        self.started.get_or_insert_with(Instant::now);
    }

    /// Runs the frames due by now (at most a second's at once; more is
    /// skipped and the clock kept) over `media`, or over UDPTL on `socket`
    /// once over T.38. How the fax ended, once it has.
    fn pump(&mut self, media: &mut impl Audio, socket: &tokio::net::UdpSocket) -> Option<Outcome> {
        let started = self.started?;
        let due = (started.elapsed().as_millis() / PTIME.as_millis()) as u64 + 1;
        let mut ran = 0;
        while self.frames < due && ran < 50 {
            match self.t38 {
                Some(to) => {
                    for datagram in self.terminal.tick() {
                        let _ = socket.try_send_to(&datagram, to);
                    }
                }
                None => {
                    let h = media.heard();
                    let out = self.terminal.frame(&h);
                    media.send(&out);
                }
            }
            self.frames += 1;
            ran += 1;
        }
        self.frames = self.frames.max(due);
        self.terminal.outcome()
    }
}

/// A scratch directory for a fax's files, removed when dropped (also
/// when its task is dropped at shutdown) unless kept.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("plugboard-fax-{}", plugboard_sip::random_token()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir, keep: false })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Frames buffered before a fax call's audio plays out (120 ms: a voice
/// call's 60 ms, doubled; T.30's timers are seconds, a gap in a modem's
/// signal is fatal).
const FAX_JITTER_FRAMES: usize = 6;

/// Longest fax call (a fax of the most pages at the slowest speed fits).
const MAX_FAX_CALL: Duration = Duration::from_secs(3600);

/// Resolution in dots per inch from pixels per metre.
fn dpi(ppm: u32) -> u32 {
    (f64::from(ppm) * 0.0254).round() as u32
}

/// What a fax's message keeps of how it went (the modem's speed, ECM
/// and resolution once a page went across).
fn outcome_meta(o: &Outcome, duration: Duration, t38: bool) -> BTreeMap<String, String> {
    let transport = if t38 { "t38" } else { "g711" };
    let mut meta = BTreeMap::from([
        ("fax_transport".into(), transport.to_string()),
        ("fax_pages".into(), o.stats.pages.to_string()),
        ("fax_result".into(), o.text.clone()),
        ("fax_ok".into(), o.ok.to_string()),
        ("fax_remote_station".into(), o.remote_ident.clone()),
        ("fax_duration_ms".into(), duration.as_millis().to_string()),
    ]);
    if o.stats.pages > 0 {
        let (x, y) = o.stats.resolution;
        meta.insert("fax_bit_rate".into(), o.stats.bit_rate.to_string());
        meta.insert("fax_ecm".into(), o.stats.ecm.to_string());
        meta.insert("fax_resolution".into(), format!("{}x{}", dpi(x), dpi(y)));
    }
    meta
}

/// An inbound fax call, as the endpoint admitted it.
pub(crate) struct FaxCall {
    pub tenant: String,
    /// The tenant's fax address called.
    pub address: String,
    /// Who called.
    pub caller: String,
    /// The INVITE's Call-ID.
    pub call_id: String,
}

/// Everything an inbound fax call's task starts with.
pub(crate) struct FaxSpec {
    pub key: DialogKey,
    pub fax: FaxCall,
    pub media: PortPair,
    pub negotiated: Negotiated,
    pub cmds: mpsc::UnboundedReceiver<CallCmd>,
    pub endpoint: mpsc::UnboundedSender<CallOut>,
    pub app: Arc<Engine>,
    pub config: Arc<VoiceConfig>,
}

/// Receives a fax on an answered call, then stores it; the endpoint
/// learns the call ended once the fax is stored (a shutdown waits for
/// it).
pub(crate) async fn receive(spec: FaxSpec) {
    let FaxSpec {
        key,
        fax,
        media,
        negotiated,
        mut cmds,
        endpoint,
        app,
        config,
    } = spec;
    match media.register() {
        Ok(sockets) => {
            let mut caller = CallerMedia::new(negotiated, Instant::now());
            let mut line = Taking {
                key: &key,
                fax: &fax,
                sockets: &sockets,
                caller: &mut caller,
                cmds: &mut cmds,
                endpoint: &endpoint,
                app: &app,
                config: &config,
                sent: Vec::new(),
            };
            line.take(false).await;
        }
        Err(e) => {
            tracing::error!(
                "fax call {} to {}: cannot register RTP sockets: {e}",
                key.0,
                fax.address
            );
            let _ = endpoint.send(CallOut::Hangup(key.clone()));
        }
    }
}

/// A call being taken as a fax: an inbound fax call from the start, or a
/// voice call whose flow said `receive_fax` (or whose caller's fax
/// machine was heard).
pub(super) struct Taking<'a> {
    pub key: &'a DialogKey,
    pub fax: &'a FaxCall,
    pub sockets: &'a MediaSockets,
    pub caller: &'a mut CallerMedia,
    pub cmds: &'a mut mpsc::UnboundedReceiver<CallCmd>,
    pub endpoint: &'a mpsc::UnboundedSender<CallOut>,
    pub app: &'a Arc<Engine>,
    pub config: &'a Arc<VoiceConfig>,
    /// What a flow's `send`, still running when the call was taken, did
    /// (for the call's timeline).
    pub sent: Vec<serde_json::Value>,
}

impl Taking<'_> {
    /// Runs the fax terminal on the call until the fax or the call ends
    /// (`answered`: the call is up already), hangs up if the caller has
    /// not, and stores what came. How the fax went, if the call was up,
    /// and whether the caller hung up.
    pub(super) async fn take(&mut self, answered: bool) -> (Option<Outcome>, bool) {
        let (key, fax, app, config) = (self.key, self.fax, self.app, self.config);
        let fail = |why: String| {
            tracing::error!("fax call {} to {}: {why}", key.0, fax.address);
            let _ = self.endpoint.send(CallOut::Hangup(key.clone()));
            (None, false)
        };
        let mut scratch = match Scratch::new() {
            Ok(d) => d,
            Err(e) => return fail(format!("no scratch directory: {e}")),
        };
        let tiff = scratch.dir.join("received.tif");
        let terminal = match Terminal::new(Role::Receive, false, &tiff, &fax.address) {
            Ok(t) => t,
            Err(e) => return fail(e.to_string()),
        };
        let mut line = Line::new(terminal);
        self.caller.buffer_frames(FAX_JITTER_FRAMES);
        let receiving = || {
            app.fax_event(
                &fax.tenant,
                serde_json::json!({
                    "direction": "inbound", "state": "receiving", "from": fax.caller,
                    "to": fax.address, "call_id": fax.call_id,
                }),
            );
        };
        if answered {
            self.caller.last_rtp = Instant::now();
            receiving();
            line.start();
        }
        let started = Instant::now();
        let ring_limit = started + Duration::from_secs(64);
        let mut tick = tokio::time::interval(PTIME);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let (mut buf, mut rbuf) = (vec![0u8; 2048], vec![0u8; 2048]);
        let sockets = self.sockets;
        // Who ended the call: the caller (BYE) or we.
        let caller_left = loop {
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(CallCmd::Confirmed) => {
                        self.caller.last_rtp = Instant::now();
                        if line.started.is_none() {
                            receiving();
                        }
                        line.start();
                    }
                    Some(CallCmd::Media(n)) => self.caller.changed(n),
                    Some(CallCmd::T38(stream)) => match line.use_t38(&stream) {
                        Ok(()) => {
                            self.caller.last_rtp = Instant::now();
                            app.fax_event(&fax.tenant, serde_json::json!({
                                "direction": "inbound", "state": "t38", "call_id": fax.call_id,
                            }));
                        }
                        Err(e) => {
                            tracing::error!("fax call {}: cannot go over to T.38: {e}", key.0);
                            break false;
                        }
                    },
                    Some(CallCmd::Answer(Ok(n))) => self.caller.answered(n),
                    Some(CallCmd::Answer(Err(_))) | Some(CallCmd::Shutdown) => break false,
                    Some(CallCmd::RemoteHangup(_)) | None => break true,
                    Some(CallCmd::Sent(note)) => self.sent.push(note),
                    Some(_) => {}
                },
                r = sockets.rtp.recv_from(&mut buf) => {
                    if let Ok((n, src)) = r {
                        if line.udptl(&buf[..n], src) {
                            self.caller.last_rtp = Instant::now();
                        } else {
                            // Digits mean nothing to a fax.
                            let _ = self.caller.rtp(&buf[..n], src);
                        }
                    }
                }
                r = sockets.rtcp.recv_from(&mut rbuf) => {
                    if let Ok((n, src)) = r {
                        self.caller.rtcp(&rbuf[..n], src);
                    }
                }
                _ = tick.tick() => {
                    let done = line.pump(
                        &mut CallerAudio { media: self.caller, socket: &sockets.rtp },
                        &sockets.rtp,
                    );
                    if let Some(pages) = line.new_page() {
                        app.fax_event(&fax.tenant, serde_json::json!({
                            "direction": "inbound", "state": "page", "pages": pages, "call_id": fax.call_id,
                        }));
                    }
                    if done.is_some() {
                        break false;
                    }
                    if line.started.is_none() && Instant::now() > ring_limit {
                        break false;
                    }
                    if line.started.is_some() && self.caller.last_rtp.elapsed() > config.rtp_timeout {
                        break false;
                    }
                    if started.elapsed() > config.max_call.min(MAX_FAX_CALL) {
                        break false;
                    }
                }
            }
        };
        if !caller_left {
            let _ = self.endpoint.send(CallOut::Hangup(key.clone()));
        }
        let answered = line.started;
        let t38 = line.t38.is_some();
        let Line { mut terminal, .. } = line;
        let outcome = terminal.hang_up();
        // Closes the received file.
        drop(terminal);
        app.fax_event(
            &fax.tenant,
            serde_json::json!({
                "direction": "inbound", "state": "ended", "pages": outcome.stats.pages,
                "ok": outcome.ok, "result": outcome.text, "call_id": fax.call_id,
            }),
        );
        let Some(answered) = answered else {
            return (None, caller_left);
        };
        let duration = answered.elapsed();
        // The sender was told page by page: a store that fails is tried
        // again, and a fax that still cannot be stored is kept on disk.
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=5 {
            match store(
                app,
                &config.fax_tools,
                fax,
                &tiff,
                &outcome,
                (duration, t38),
            )
            .await
            {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    tracing::warn!(
                        "fax from {} to {}: not stored yet: {e}",
                        fax.caller,
                        fax.address
                    );
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    scratch.keep = outcome.stats.pages > 0;
                    tracing::error!(
                        "fax from {} to {} ({} pages): not stored: {e}; its pages are kept in {}",
                        fax.caller,
                        fax.address,
                        outcome.stats.pages,
                        scratch.dir.display()
                    );
                }
            }
        }
        drop(scratch);
        (Some(outcome), caller_left)
    }
}

/// Stores a received fax as an inbound message: the pages as a PDF and
/// the TIFF they came in, with how the fax went.
async fn store(
    app: &Arc<Engine>,
    tools: &Tools,
    fax: &FaxCall,
    tiff: &std::path::Path,
    outcome: &Outcome,
    (duration, t38): (Duration, bool),
) -> Result<(), String> {
    let pages = outcome.stats.pages;
    let mut files = Vec::new();
    if pages > 0 {
        let (tools, tiff) = (tools.clone(), tiff.to_path_buf());
        let (pdf, tif) = tokio::task::spawn_blocking(move || {
            let pdf = tiff.with_extension("pdf");
            document::to_pdf(&tools, &tiff, &pdf)?;
            Ok::<_, FaxError>((std::fs::read(&pdf)?, std::fs::read(&tiff)?))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let stamp = plugboard_core::now_ms();
        files.push((format!("fax-{stamp}.pdf"), "application/pdf".into(), pdf));
        files.push((format!("fax-{stamp}.tif"), "image/tiff".into(), tif));
    }
    let from = if outcome.remote_ident.is_empty() {
        fax.caller.clone()
    } else {
        outcome.remote_ident.clone()
    };
    let text = match (pages, outcome.ok) {
        (0, _) => format!("No fax received: {}", outcome.text),
        (1, true) => format!("Fax of 1 page from {from}"),
        (n, true) => format!("Fax of {n} pages from {from}"),
        (n, false) => format!(
            "Fax from {from} cut short: {n} whole page(s) received ({})",
            outcome.text
        ),
    };
    let mut meta = outcome_meta(outcome, duration, t38);
    meta.insert("sip_call_id".into(), fax.call_id.clone());
    app.receive(Inbound {
        channel: Channel::Fax,
        tenant: Some(fax.tenant.clone()),
        from: fax.caller.clone(),
        to: fax.address.clone(),
        text,
        files,
        client_id: Some(fax.call_id.clone()),
        meta,
        // A call that brought no page is kept, but runs no flow (nothing
        // is faxed back to someone who dialled the number by mistake).
        automatic: pages == 0,
        ..Inbound::default()
    })
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// The fax channel's courier: sends fax messages as calls.
pub(crate) struct FaxCourier {
    pub ctx: Ctx,
}

/// Registers the fax courier with the engine.
pub(crate) fn register(ctx: Ctx) {
    let app = ctx.app.clone();
    app.set_courier(Channel::Fax, Arc::new(FaxCourier { ctx }));
}

/// Longest ring before a fax call is given up as not answered.
const RING: Duration = Duration::from_secs(60);

#[async_trait::async_trait]
impl Courier for FaxCourier {
    async fn deliver(
        &self,
        tenant: &str,
        message: &Message,
        _history: &[Message],
    ) -> Result<Delivered, DeliveryError> {
        if !is_number(&message.to) {
            return Err(DeliveryError::Permanent(format!(
                "{} is not a phone number: a fax goes only to a number",
                message.to
            )));
        }
        // The document: the first PDF or TIFF attached, else the text.
        let mut doc = None;
        for a in &message.attachments {
            let bytes = self
                .ctx
                .app
                .attachment(tenant, &a.blob)
                .await
                .map_err(|e| DeliveryError::Retry(format!("cannot read the document: {e}")))?;
            if document::kind(&bytes).is_some() {
                doc = Some(bytes);
                break;
            }
        }
        let scratch = Scratch::new().map_err(|e| DeliveryError::Retry(e.to_string()))?;
        let tiff = scratch.dir.join("send.tif");
        let (tools, path, text) = (
            self.ctx.config.fax_tools.clone(),
            tiff.clone(),
            message.text.clone(),
        );
        let rendered = tokio::task::spawn_blocking(move || match doc {
            Some(bytes) => document::to_fax(&tools, &bytes, &path),
            None => document::text_to_fax(&tools, &text, &path),
        })
        .await
        .map_err(|e| DeliveryError::Retry(e.to_string()));
        match rendered {
            Ok(Ok(_pages)) => self.send(tenant, message, &tiff).await,
            Ok(Err(FaxError::Document(why))) => Err(DeliveryError::Permanent(why)),
            Ok(Err(e)) => Err(DeliveryError::Retry(e.to_string())),
            Err(e) => Err(e),
        }
    }

    fn needs_history(&self) -> bool {
        false
    }

    fn first_backoff(&self) -> Duration {
        Duration::from_secs(60)
    }
}

impl FaxCourier {
    /// Calls the message's number and sends the pages at `tiff`.
    async fn send(
        &self,
        tenant: &str,
        message: &Message,
        tiff: &std::path::Path,
    ) -> Result<Delivered, DeliveryError> {
        let terminal = Terminal::new(Role::Send, true, tiff, &message.from)
            .map_err(|e| DeliveryError::Retry(e.to_string()))?;
        let (me, mut cmds) = mpsc::unbounded_channel();
        let detail =
            serde_json::json!({"direction": "outbound", "to": message.to, "fax": message.id});
        let Some(mut leg) = dial(
            &self.ctx,
            tenant,
            &message.to,
            Some(message.from.clone()),
            true,
            detail,
            &me,
        )
        .await
        else {
            return Err(DeliveryError::Deferred(
                "no line free (the tenant's call limits, or the node's media ports)".into(),
            ));
        };
        leg.buffer_frames(FAX_JITTER_FRAMES);
        let Some(sockets) = leg.sockets.clone() else {
            return Err(DeliveryError::Retry("no media ports".into()));
        };
        if let Some(local) = leg.local.clone() {
            let _ = self.ctx.endpoint.send(CallOut::FaxLeg {
                leg: leg.key.clone(),
                local,
                offer: leg.t38_trunk,
            });
        }
        let mut line = Line::new(terminal);
        let started = Instant::now();
        let event = |state: &str, pages: u32| {
            self.ctx.app.fax_event(
                tenant,
                serde_json::json!({
                    "direction": "outbound", "state": state, "pages": pages,
                    "interaction": message.interaction, "message": message.id,
                    "to": message.to,
                }),
            );
        };
        event("calling", 0);
        let mut tick = tokio::time::interval(PTIME);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut buf = vec![0u8; 2048];
        // Ok(true) when the far end hung up; Err when it never answered.
        let ended: Result<bool, DeliveryError> = loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(CallCmd::Leg(k, ev)) if k == leg.key => match ev {
                        LegEvent::Answered(n) => {
                            leg.answered(&n);
                            line.start();
                            event("sending", 0);
                        }
                        LegEvent::Failed(status, why) => break Err(refused(status, &why)),
                        LegEvent::Hangup => break Ok(true),
                        LegEvent::T38(stream) => match line.use_t38(&stream) {
                            Ok(()) => event("t38", 0),
                            Err(e) => {
                                tracing::error!("fax to {}: cannot go over to T.38: {e}", message.to);
                                break Ok(false);
                            }
                        },
                        LegEvent::T38Refused(why) => {
                            tracing::info!("fax to {}: T.38 refused ({why}); staying on G.711", message.to);
                        }
                        _ => {}
                    },
                    Some(_) => {}
                    None => break Ok(false),
                },
                r = sockets.rtp.recv_from(&mut buf) => {
                    if let Ok((n, src)) = r
                        && !line.udptl(&buf[..n], src)
                    {
                        leg.rtp(&buf[..n], src, started);
                    }
                }
                _ = tick.tick() => {
                    let done = line.pump(&mut leg, &sockets.rtp);
                    if let Some(pages) = line.new_page() {
                        event("page", pages);
                    }
                    if done.is_some() {
                        break Ok(false);
                    }
                    if line.started.is_none() && started.elapsed() > RING {
                        let _ = self.ctx.endpoint.send(CallOut::HangupLeg(leg.key.clone()));
                        break Err(DeliveryError::Retry("no answer".into()));
                    }
                    if started.elapsed() > self.ctx.config.max_call.min(MAX_FAX_CALL) {
                        break Ok(false);
                    }
                }
            }
        };
        let far_end_hung_up = ended?;
        if !far_end_hung_up {
            let _ = self.ctx.endpoint.send(CallOut::HangupLeg(leg.key.clone()));
        }
        let duration = line.started.map(|s| s.elapsed()).unwrap_or_default();
        let outcome = line.terminal.hang_up();
        event("ended", outcome.stats.pages);
        let meta = outcome_meta(&outcome, duration, line.t38.is_some());
        if outcome.ok {
            return Ok(Delivered {
                external_id: None,
                aliases: Vec::new(),
                meta,
            });
        }
        let why = format!(
            "{} ({} of {} pages sent)",
            outcome.text, outcome.stats.pages, outcome.stats.pages_in_file
        );
        // No fax machine, or pages the receiver already has (sending the
        // document again would repeat them): not tried again.
        if outcome.no_fax() || outcome.stats.pages > 0 {
            Err(DeliveryError::Permanent(why))
        } else {
            Err(DeliveryError::Retry(why))
        }
    }
}

/// What a refused fax call means for the message.
fn refused(status: u16, why: &str) -> DeliveryError {
    let text = format!("{status} {why}");
    match status {
        404 | 403 | 484 | 604 | 606 => DeliveryError::Permanent(text),
        486 | 600 | 603 => DeliveryError::Retry(format!("busy ({text})")),
        408 | 480 | 487 => DeliveryError::Retry(format!("no answer ({text})")),
        _ => DeliveryError::Retry(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fax_goes_only_to_a_number() {
        assert!(is_number("15550190") && is_number("+15550190"));
        // What a caller's From could make a conversation's address.
        for bad in [
            "sip:evil@169.254.1.1:80",
            "sip:x@acme",
            "1555;x",
            "+",
            "",
            "1",
        ] {
            assert!(!is_number(bad), "{bad}");
        }
    }
}
