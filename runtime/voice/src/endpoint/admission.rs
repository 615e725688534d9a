//! Inbound calls: address lookup, trunk admission (IP allow-list or
//! digest), SDP and media, the flow session opened off the SIP loop, then
//! the dialog and its call task. A call to a fax address is answered by
//! a fax terminal instead of a flow.

use crate::call::fax::FaxCall;

use super::*;
use plugboard_engine::capacity::Refusal;
use plugboard_engine::usage::CallDirection;

/// An INVITE whose address owner and the tenant's trunks are looked up.
pub(crate) struct Routed {
    id: ServerTxId,
    req: Request,
    info: RequestInfo,
    from: Peer,
    /// `None`: no tenant has this voice address.
    route: Result<Option<Route>, String>,
}

/// The tenant that owns a dialled address, the address, and its trunks.
pub(super) type Route = (String, plugboard_core::Address, Vec<plugboard_core::Trunk>);

/// What answers an admitted call.
pub(crate) enum Answering {
    /// The address's flow, its session open (and first record written).
    Flow(Box<plugboard_engine::FlowSession>),
    /// A fax terminal (a fax address).
    Fax(FaxCall),
}

/// An INVITE whose flow session was opened (and first record written).
pub(crate) struct Opened {
    id: ServerTxId,
    req: Request,
    info: RequestInfo,
    from: Peer,
    media: PortPair,
    local: LocalMedia,
    body: String,
    negotiated: Negotiated,
    late_offer: bool,
    tag: String,
    session: Result<Answering, String>,
    meter: LegMeter,
}

impl Endpoint {
    /// Whether a call to the tenant's numbers from `from` may go on, and
    /// through which of its trunks: always when no trunk of the tenant
    /// restricts inbound calls; else when it comes from a trunk's
    /// `inbound_ips`, or authenticates with digest as a trunk that has
    /// `inbound_digest`. Otherwise the INVITE has been answered (401
    /// challenge, or 403) and this returns `None`.
    pub(super) fn inbound_allowed(
        &mut self,
        id: ServerTxId,
        req: &Request,
        tenant: &str,
        trunks: &[plugboard_core::Trunk],
        from: Peer,
    ) -> Option<Option<String>> {
        let ips: Vec<std::net::IpAddr> = trunks
            .iter()
            .flat_map(|t| t.inbound_ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect();
        let digest: Vec<&plugboard_core::Trunk> =
            trunks.iter().filter(|t| t.inbound_digest).collect();
        if (ips.is_empty() && digest.is_empty()) || ips.contains(&from.addr.ip()) {
            let ip = from.addr.ip();
            return Some(
                trunks
                    .iter()
                    .find(|t| t.inbound_ips.iter().any(|i| i.parse().ok() == Some(ip)))
                    .map(|t| t.name.clone()),
            );
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
            return None;
        }
        let now_s = plugboard_core::now_ms() / 1000;
        let creds = credentials_for(req, tenant);
        let subject = format!(
            "trunk:{}@{tenant}",
            creds.as_ref().map(|c| c.username.as_str()).unwrap_or("")
        );
        if self.throttled(id, req, from, &subject) {
            return None;
        }
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
            Ok(()) => {
                self.throttle
                    .success(from.addr.ip(), &subject, Instant::now());
                let user = creds.map(|c| c.username);
                Some(
                    digest
                        .iter()
                        .find(|t| t.username == user)
                        .map(|t| t.name.clone()),
                )
            }
            Err(AuthError::Stale) => {
                self.challenge(id, req, tenant, creds.is_some());
                None
            }
            Err(AuthError::Bad) => {
                self.auth_failed(from, &subject, "invite");
                self.refuse(id, req, 403, Some("wrong trunk credentials".into()));
                None
            }
        }
    }

    /// Refuses an INVITE of a tenant at one of its limits, with a
    /// `Reason` (Q.850 cause, RFC 3326) and `Retry-After`: 486 at its
    /// calls at once or above its fair share of the node, 480 over its
    /// calls per second. Only a node with no room at all answers 503: a
    /// 503 tells the carrier to send nothing to this server for a while
    /// (RFC 3261 §21.5.4), which would hold up every tenant's calls.
    fn refuse_over_limit(&mut self, id: ServerTxId, req: &Request, r: &Refusal) {
        let (status, cause) = match r {
            Refusal::Calls(_) | Refusal::FairShare => (486, 17),
            Refusal::CallRate(_) => (480, 42),
            _ => (503, 34),
        };
        let mut resp = reply(req, status, reason_phrase(status), Some(&random_token()));
        resp.headers
            .push("Reason", format!("Q.850;cause={cause};text=\"{r}\""));
        resp.headers
            .push("Retry-After", r.retry_after_s().to_string());
        self.respond(id, resp);
    }

    /// An INVITE for a new call. The address owner and the tenant's trunks
    /// are read off the SIP loop; the call goes on in [`Self::routed`].
    pub(super) fn new_call(&mut self, id: ServerTxId, req: Request, info: RequestInfo, from: Peer) {
        if self.draining.is_some() {
            return self.refuse(id, &req, 503, Some("shutting down".into()));
        }
        self.starting.insert(id, req.clone());
        let dialled = info.uri.user_unescaped().unwrap_or_default();
        let app = self.app.clone();
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let route = async {
                match app.route_address(&dialled).await? {
                    Some((tenant, address))
                        if matches!(address.channel, Channel::Voice | Channel::Fax) =>
                    {
                        // A store error here denies the call: the trunks
                        // restrict who may call in. The tenant's record
                        // brings its current limits.
                        app.tenant(&tenant).await?;
                        let trunks = app.trunks(&tenant).await?;
                        Ok(Some((tenant, address, trunks)))
                    }
                    _ => Ok::<_, plugboard_engine::EngineError>(None),
                }
            }
            .await
            .map_err(|e| e.to_string());
            let routed = Routed {
                id,
                req,
                info,
                from,
                route,
            };
            let _ = inbox.send(Input::Routed(Box::new(routed))).await;
        });
    }

    /// Whether an INVITE being started is still wanted (not cancelled);
    /// `done` forgets it.
    pub(super) fn still_starting(&mut self, id: ServerTxId, done: bool) -> bool {
        if done {
            self.starting.remove(&id).is_some()
        } else {
            self.starting.contains_key(&id)
        }
    }

    /// Admission (trunks, digest), SDP and media for a routed INVITE; the
    /// flow session is opened off the loop and the call goes on in
    /// [`Self::opened`].
    pub(super) fn routed(&mut self, r: Routed) {
        let Routed {
            id,
            req,
            info,
            from,
            route,
        } = r;
        if !self.still_starting(id, false) {
            return;
        }
        let dialled = info.uri.user_unescaped().unwrap_or_default();
        let (tenant, address, trunks) = match route {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.starting.remove(&id);
                return self.refuse(id, &req, 404, Some(format!("no voice address {dialled}")));
            }
            Err(e) => {
                self.starting.remove(&id);
                tracing::error!("inbound call to {dialled}: lookup failed, refused: {e}");
                return self.refuse(id, &req, 500, Some("address lookup failed".into()));
            }
        };
        let Some(trunk) = self.inbound_allowed(id, &req, &tenant, &trunks, from) else {
            self.starting.remove(&id);
            return;
        };
        let detail = json!({"direction": "inbound", "from": info.from.uri, "to": dialled});
        let mut meter =
            match LegMeter::admit(&self.app, &tenant, true, CallDirection::Inbound, detail) {
                Ok(m) => m,
                Err(r) => {
                    self.starting.remove(&id);
                    return self.refuse_over_limit(id, &req, &r);
                }
            };
        meter.trunk = trunk;
        // No SDP in the INVITE is a late offer (RFC 3261 §13.2.1): we offer
        // in the 200 and the answer comes in the ACK.
        let offer = match sdp_body(&req).map(|text| sdp::parse(&text)) {
            None => None,
            Some(Ok(o)) => Some(o),
            Some(Err(SdpError::Syntax(m))) => {
                self.starting.remove(&id);
                return self.refuse(id, &req, 400, Some(m));
            }
            Some(Err(SdpError::NotAcceptable(m))) => {
                self.starting.remove(&id);
                return self.refuse(id, &req, 488, Some(m));
            }
        };
        let Some(media) = self.pool.take() else {
            self.starting.remove(&id);
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
                Err(e) => {
                    self.starting.remove(&id);
                    return self.refuse(id, &req, 488, Some(e.to_string()));
                }
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
        let call_note = json!({
            "sip_call_id": info.call_id,
            "from": info.from.uri,
            "to": req.uri,
            "signalling": format!("{} {}", from.transport.as_str(), from.addr),
            "codec": negotiated.law.name(),
            "telephone_event": negotiated.dtmf_pt,
            "remote_rtp": negotiated.remote.to_string(),
            "local_rtp": media.port,
            "sdp": if offer.is_some() { "offer in INVITE" } else { "late offer: ours in the 200, answer in the ACK" },
        });
        let fax = (address.channel == Channel::Fax).then(|| FaxCall {
            tenant: tenant.clone(),
            address: address.address.clone(),
            caller: plugboard_sip::unescape(&caller),
            call_id: info.call_id.clone(),
        });
        let mut opened = Opened {
            id,
            req,
            info,
            from,
            media,
            local,
            body,
            negotiated,
            late_offer: offer.is_none(),
            tag: random_token(),
            session: Err(String::new()),
            meter,
        };
        if let Some(fax) = fax {
            opened.session = Ok(Answering::Fax(fax));
            return self.opened(opened);
        }
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
        // Opening the session may load (compile) the flow, and the first
        // record is written durably: both off the loop.
        let app = self.app.clone();
        let inbox = self.inbox.clone();
        let flow = address.flow;
        tokio::spawn(async move {
            let session = async {
                let mut session = app.open_session(start).await.map_err(|e| {
                    tracing::warn!("cannot start flow {flow} of {tenant}: {e}");
                    "the flow is not available".to_string()
                })?;
                session.note(EntryKind::Call, call_note);
                // The call's first record: written at once, flushed with
                // the next durable write (its final record at the latest).
                session.checkpoint_soft().await.map_err(|e| {
                    tracing::error!("cannot record the call: {e}");
                    "cannot store the call record".to_string()
                })?;
                Ok(Answering::Flow(Box::new(session)))
            }
            .await;
            opened.session = session;
            let _ = inbox.send(Input::Opened(Box::new(opened))).await;
        });
    }

    /// Answers a call whose flow session is open: the dialog, the call
    /// task, and 180/200.
    pub(super) fn opened(&mut self, o: Opened) {
        let Opened {
            id,
            req,
            info,
            from,
            media,
            local,
            body,
            negotiated,
            late_offer,
            tag,
            session,
            mut meter,
        } = o;
        if !self.still_starting(id, true) || self.draining.is_some() {
            if self.draining.is_some() {
                self.refuse(id, &req, 503, Some("shutting down".into()));
            }
            // Cancelled (or shutting down) while the session was opening:
            // close its record.
            if let Ok(Answering::Flow(session)) = session {
                let mut session = *session;
                tokio::spawn(async move {
                    session.note(EntryKind::Hangup, json!({"cause": "cancelled by the caller", "by": "caller", "answered": false}));
                    let _ = session.close(plugboard_engine::Ending::Customer).await;
                });
            }
            return;
        }
        let session = match session {
            Ok(s) => s,
            Err(why) => {
                let status = if why.contains("store") { 500 } else { 480 };
                return self.refuse(id, &req, status, Some(why));
            }
        };
        let key: DialogKey = (info.call_id.clone(), tag.clone());
        meter.key = format!("{}/{tag}", info.call_id);
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
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let fax = matches!(session, Answering::Fax(_));
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
                late_offer,
                meter,
                fax,
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
            let calls = self.calls.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ring).await;
                let _ = calls.send(CallOut::Answer(key));
            });
        }
    }

    pub(super) fn spawn_call(
        &mut self,
        key: DialogKey,
        answering: Answering,
        media: PortPair,
        negotiated: Negotiated,
        (self_tx, cmds): (
            mpsc::UnboundedSender<CallCmd>,
            mpsc::UnboundedReceiver<CallCmd>,
        ),
        local: LocalMedia,
    ) {
        self.live_calls += 1;
        let session = match answering {
            Answering::Flow(s) => *s,
            Answering::Fax(fax) => {
                let spec = crate::call::fax::FaxSpec {
                    key: key.clone(),
                    fax,
                    media,
                    negotiated,
                    cmds,
                    endpoint: self.calls.clone(),
                    app: self.app.clone(),
                    config: self.config.clone(),
                };
                self.watch_call(key, crate::call::fax::receive(spec));
                return;
            }
        };
        let spec = CallSpec {
            key,
            session,
            media,
            negotiated,
            cmds,
            endpoint: self.calls.clone(),
            app: self.app.clone(),
            tts: self.tts.clone(),
            config: self.config.clone(),
            cname: format!("plugboard@{}", local.ip),
            pool: self.pool.clone(),
            self_tx,
            clock: self.clock.clone(),
            phones: self.phones.clone(),
        };
        // The call's log lines carry its tenant and interaction.
        let span = tracing::info_span!(
            "call",
            tenant = %spec.session.interaction.tenant,
            interaction = %spec.session.interaction.id,
            sip_call_id = %spec.key.0
        );
        let key = spec.key.clone();
        self.watch_call(key, tracing::Instrument::instrument(call::run(spec), span));
    }

    /// Runs a call's task; when it ends, however it ends (a panic
    /// included), the endpoint learns it ([`CallOut::Ended`]), so that
    /// its dialog and its count never outlive it.
    fn watch_call(
        &self,
        key: DialogKey,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let endpoint = self.calls.clone();
        let task = tokio::spawn(task);
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::error!("call {}: its task failed: {e}", key.0);
            }
            let _ = endpoint.send(CallOut::Ended(key));
        });
    }

    /// Sends a 2xx on the INVITE transaction and, over UDP, retransmits it
    /// (T1 doubling to T2) until the ACK or 64·T1 (RFC 3261 §13.3.1.4).
    pub(super) fn send_ok(&mut self, key: &DialogKey, ok: Response) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let id = d.invite_tx;
        d.state = DialogState::WaitAck;
        let peer = d.peer;
        let bytes = ok.to_bytes();
        let retx = (peer.transport == Transport::Udp).then(|| {
            let udp = self.udp.clone();
            let calls = self.calls.clone();
            let key = key.clone();
            let bytes = bytes.clone();
            tokio::spawn(async move {
                resend_2xx(&udp, &bytes, peer.addr).await;
                let _ = calls.send(CallOut::NoAck(key));
            })
        });
        if let Some(d) = self.dialogs.get_mut(key) {
            d.retransmit = retx;
        }
        self.pending.remove(&id);
        self.respond(id, ok);
    }
}

/// Sends a 2xx to an INVITE again over UDP (T1 doubling to T2) until the
/// task is aborted (its ACK came) or 64·T1 passed (RFC 3261 §13.3.1.4).
pub(super) async fn resend_2xx(udp: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    let t1 = Duration::from_millis(500);
    let mut wait = t1;
    let mut total = Duration::ZERO;
    while total < 64 * t1 {
        tokio::time::sleep(wait).await;
        total += wait;
        let _ = udp.send_to(bytes, to).await;
        wait = (wait * 2).min(Duration::from_secs(4));
    }
}
