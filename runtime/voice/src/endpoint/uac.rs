//! Outbound legs (dial, transfer, REFER): we are the UAC.

use super::*;

/// The ACK for a 2xx of an INVITE on a leg: its CSeq number is the
/// INVITE's, as the 2xx repeats it (RFC 3261 §13.2.2.4).
fn ack_for(sip_addr: SocketAddr, call_id: &str, leg: &Leg, ok: &Response) -> Option<Request> {
    let cseq = ok
        .headers
        .get("CSeq")
        .and_then(|c| c.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    leg_request(sip_addr, call_id, leg, Method::Ack, cseq)
}

/// A request inside an answered leg (ACK, BYE, NOTIFY): the leg's From,
/// the far end's To and Contact, and the given CSeq number.
pub(super) fn leg_request(
    sip_addr: SocketAddr,
    call_id: &str,
    leg: &Leg,
    method: Method,
    cseq: u32,
) -> Option<Request> {
    let (to, target) = leg.answered.clone()?;
    let mut r = Request::new(method.clone(), target);
    r.headers.push("Via", via(leg.peer.transport, sip_addr));
    r.headers.push("Max-Forwards", "70");
    if let Some(from) = leg.invite.headers.get("From") {
        r.headers.push("From", from);
    }
    r.headers.push("To", to);
    r.headers.push("Call-ID", call_id.to_string());
    r.headers.push("CSeq", format!("{cseq} {method}"));
    Some(r)
}

impl Endpoint {
    pub(super) fn dial(
        &mut self,
        key: DialogKey,
        route: Result<Resolved, (u16, String)>,
        caller_id: Option<String>,
        offer: String,
        call: mpsc::UnboundedSender<CallCmd>,
        mut meter: LegMeter,
    ) {
        // Given up while its route was resolved, or its call is over:
        // nothing is sent (and the leg's place goes back); the call hears
        // the leg ended as a cancelled one would (487).
        if let Some(i) = self.given_up.iter().position(|k| *k == key) {
            self.given_up.remove(i);
            let why = "cancelled before it was sent".to_string();
            let _ = call.send(CallCmd::Leg(key, LegEvent::Failed(487, why)));
            return;
        }
        if call.is_closed() {
            return;
        }
        let (uri, peer, creds, trunk) = match route {
            Ok(r) => r,
            Err((status, why)) => {
                let _ = call.send(CallCmd::Leg(key, LegEvent::Failed(status, why)));
                return;
            }
        };
        let user: String = caller_id
            .as_deref()
            .unwrap_or("plugboard")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '+')
            .collect();
        let mut invite = Request::new(Method::Invite, uri.clone());
        invite
            .headers
            .push("Via", via(peer.transport, self.sip_addr));
        invite.headers.push("Max-Forwards", "70");
        invite.headers.push(
            "From",
            format!("<sip:{user}@{}>;tag={}", self.sip_addr.ip(), key.1),
        );
        invite.headers.push("To", format!("<{uri}>"));
        invite.headers.push("Call-ID", key.0.clone());
        invite.headers.push("CSeq", "1 INVITE");
        invite.headers.push(
            "Contact",
            format!(
                "<sip:plugboard@{}{}>",
                self.sip_addr,
                transport_param(peer.transport)
            ),
        );
        invite.headers.push("Allow", self.policy.allow_header());
        invite.headers.push("Content-Type", "application/sdp");
        invite.body = offer.into_bytes();
        let tx = self.tx.send_request(Instant::now(), peer, invite.clone());
        self.leg_tx.insert(tx, key.clone());
        meter.key = format!("{}/{}", key.0, key.1);
        meter.trunk = trunk.map(|t| t.name);
        self.legs.insert(
            key,
            Leg {
                invite,
                tx,
                peer,
                call,
                cseq: 1,
                creds,
                auth_tries: 0,
                ringing: false,
                answered: None,
                abandoned: false,
                meter,
                fax: None,
                retransmit: None,
            },
        );
    }

    pub(super) fn leg_response(&mut self, id: ClientTxId, resp: Response) {
        let Some(key) = self.leg_tx.get(&id).cloned() else {
            return;
        };
        let Some(leg) = self.legs.get_mut(&key) else {
            return;
        };
        let status = resp.status;
        if status < 200 {
            if matches!(status, 180 | 183) && !leg.ringing {
                leg.ringing = true;
                let _ = leg.call.send(CallCmd::Leg(key.clone(), LegEvent::Ringing));
            }
            return;
        }
        if status < 300 {
            let to = resp.headers.get("To").unwrap_or("").to_string();
            let target = resp
                .headers
                .get("Contact")
                .and_then(|c| plugboard_sip::NameAddr::parse("Contact", c).ok())
                .map(|c| c.uri)
                .unwrap_or_else(|| leg.invite.uri.clone());
            let first = leg.answered.is_none();
            leg.answered = Some((to.clone(), target.clone()));
            // A 200 that crossed our CANCEL: acknowledged, then hung up,
            // not billed; the call hears it was cancelled.
            let abandoned = leg.abandoned;
            if !abandoned {
                leg.meter.answered();
            }
            // The ACK for a 2xx is its own request (RFC 3261 §13.2.2.4),
            // repeated for every retransmitted 2xx.
            let ack = ack_for(self.sip_addr, &key.0, leg, &resp);
            let peer = leg.peer;
            let call = leg.call.clone();
            if let Some(ack) = ack {
                self.send(Transmit {
                    to: peer,
                    bytes: ack.to_bytes(),
                });
            }
            if first && abandoned {
                let _ = call.send(CallCmd::Leg(
                    key.clone(),
                    LegEvent::Failed(487, "cancelled (its answer crossed the CANCEL)".into()),
                ));
                self.bye_leg(&key);
                return;
            }
            if first {
                let answer = String::from_utf8_lossy(&resp.body).into_owned();
                match sdp::parse(&answer).and_then(|a| sdp::accept_answer(&a)) {
                    Ok(n) => {
                        // Its call is gone: the answered leg is hung up.
                        if call
                            .send(CallCmd::Leg(key.clone(), LegEvent::Answered(n)))
                            .is_err()
                        {
                            self.bye_leg(&key);
                        } else if self
                            .legs
                            .get(&key)
                            .is_some_and(|l| l.fax.as_ref().is_some_and(|f| f.1))
                        {
                            self.offer_t38(&key);
                        }
                    }
                    Err(e) => {
                        let _ = call.send(CallCmd::Leg(
                            key.clone(),
                            LegEvent::Failed(488, e.to_string()),
                        ));
                        self.bye_leg(&key);
                    }
                }
            }
            return;
        }
        if matches!(status, 401 | 407) && leg.auth_tries == 0 {
            let header = if status == 401 {
                "WWW-Authenticate"
            } else {
                "Proxy-Authenticate"
            };
            let answer = leg.creds.as_ref().and_then(|(u, p)| {
                resp.headers.all(header).find_map(|ch| {
                    plugboard_sip::digest::answer_challenge(
                        ch,
                        "INVITE",
                        &leg.invite.uri,
                        u,
                        p,
                        &random_token(),
                    )
                })
            });
            if let Some(value) = answer {
                leg.auth_tries += 1;
                leg.cseq += 1;
                let mut invite = leg.invite.clone();
                invite
                    .headers
                    .set("Via", via(leg.peer.transport, self.sip_addr));
                invite.headers.set("CSeq", format!("{} INVITE", leg.cseq));
                invite.headers.set(
                    if status == 401 {
                        "Authorization"
                    } else {
                        "Proxy-Authorization"
                    },
                    value,
                );
                let peer = leg.peer;
                leg.invite = invite.clone();
                self.leg_tx.remove(&id);
                let tx = self.tx.send_request(Instant::now(), peer, invite);
                if let Some(leg) = self.legs.get_mut(&key) {
                    leg.tx = tx;
                }
                self.leg_tx.insert(tx, key);
                return;
            }
        }
        self.leg_tx.remove(&id);
        self.fail_leg(key, status, resp.reason.clone());
    }

    /// Ends an outbound leg that was not answered and tells its call why.
    pub(super) fn fail_leg(&mut self, key: DialogKey, status: u16, why: String) {
        if let Some(leg) = self.legs.remove(&key) {
            self.leg_tx.remove(&leg.tx);
            let _ = leg
                .call
                .send(CallCmd::Leg(key, LegEvent::Failed(status, why)));
        }
    }

    /// A blind transfer asked by the far end of one of our legs (an agent
    /// passing the caller on): accepted with 202 and a final NOTIFY, and
    /// the call task calls the target and bridges the caller to it. A
    /// REFER from the caller's side is refused (403).
    pub(super) fn refer(&mut self, id: ServerTxId, req: Request, info: RequestInfo) {
        let key = (
            info.call_id.clone(),
            info.to.tag().unwrap_or("").to_string(),
        );
        let target = req
            .headers
            .get("Refer-To")
            .and_then(|r| plugboard_sip::NameAddr::parse("Refer-To", r).ok())
            .map(|n| n.uri.split('?').next().unwrap_or("").to_string());
        let Some(leg) = self.legs.get_mut(&key) else {
            let status = if self.dialogs.contains_key(&key) {
                403
            } else {
                481
            };
            return self.respond(id, reply(&req, status, reason_phrase(status), None));
        };
        let Some(target) = target.filter(|t| t.starts_with("sip:")) else {
            return self.respond(id, reply(&req, 400, "Refer-To must be a SIP URI", None));
        };
        let call = leg.call.clone();
        self.respond(id, reply(&req, 202, "Accepted", None));
        // RFC 3515 §2.4.4/2.4.5: report the outcome. The transfer is blind,
        // so the referrer learns only that it was accepted.
        if let Some(notify) = self.in_leg_request(&key, Method::Notify) {
            let mut notify = notify;
            notify.headers.push("Event", "refer");
            notify
                .headers
                .push("Subscription-State", "terminated;reason=noresource");
            notify
                .headers
                .push("Content-Type", "message/sipfrag;version=2.0");
            notify.body = b"SIP/2.0 200 OK\r\n".to_vec();
            let peer = self.legs.get(&key).map(|l| l.peer);
            if let Some(peer) = peer {
                self.tx.send_request(Instant::now(), peer, notify);
            }
        }
        let _ = call.send(CallCmd::Leg(key, LegEvent::Refer(target)));
    }

    /// A new request inside an answered leg (BYE, NOTIFY): next CSeq,
    /// the leg's tags and remote target.
    pub(super) fn in_leg_request(&mut self, key: &DialogKey, method: Method) -> Option<Request> {
        let sip_addr = self.sip_addr;
        let leg = self.legs.get_mut(key)?;
        leg.answered.as_ref()?;
        leg.cseq += 1;
        leg_request(sip_addr, &key.0, leg, method, leg.cseq)
    }

    /// Remembers a leg given up before its `Dial` arrived.
    pub(super) fn give_up(&mut self, key: DialogKey) {
        if self.given_up.len() >= GIVEN_UP {
            self.given_up.pop_front();
        }
        self.given_up.push_back(key);
    }

    pub(super) fn cancel_leg(&mut self, key: &DialogKey) {
        if let Some(leg) = self.legs.get_mut(key)
            && leg.answered.is_none()
        {
            leg.abandoned = true;
            let cancel = plugboard_sip::transaction::cancel_for(&leg.invite);
            let peer = leg.peer;
            self.tx.send_request(Instant::now(), peer, cancel);
        }
    }

    pub(super) fn bye_leg(&mut self, key: &DialogKey) {
        let bye = self.in_leg_request(key, Method::Bye);
        let Some(leg) = self.legs.remove(key) else {
            return;
        };
        self.t38_tx.retain(|_, (k, _)| k != key);
        self.leg_tx.remove(&leg.tx);
        if let Some(bye) = bye {
            self.tx.send_request(Instant::now(), leg.peer, bye);
        }
    }

    /// Asks the far end of an answered fax leg to go over to T.38
    /// (re-INVITE with `image/t38`).
    pub(super) fn offer_t38(&mut self, key: &DialogKey) {
        let Some(local) = self
            .legs
            .get_mut(key)
            .and_then(|l| l.fax.as_mut())
            .map(|(local, _)| {
                local.version += 1;
                local.clone()
            })
        else {
            return;
        };
        let Some(mut invite) = self.in_leg_request(key, Method::Invite) else {
            return;
        };
        let Some(leg) = self.legs.get(key) else {
            return;
        };
        invite.headers.push(
            "Contact",
            format!(
                "<sip:plugboard@{}{}>",
                self.sip_addr,
                transport_param(leg.peer.transport)
            ),
        );
        invite.headers.push("Allow", self.policy.allow_header());
        invite.headers.push("Content-Type", "application/sdp");
        invite.body = sdp::offer_t38(&local).into_bytes();
        let peer = leg.peer;
        let tx = self.tx.send_request(Instant::now(), peer, invite);
        self.t38_tx.insert(tx, (key.clone(), false));
    }

    /// The far end's answer to our re-INVITE to T.38. Every 2xx is
    /// acknowledged (a repeat means our ACK was lost); the first tells the
    /// call.
    pub(super) fn t38_response(&mut self, id: ClientTxId, resp: Response) {
        if resp.status < 200 {
            return;
        }
        let Some((key, answered)) = self.t38_tx.get(&id).cloned() else {
            return;
        };
        let Some(leg) = self.legs.get(&key) else {
            self.t38_tx.remove(&id);
            return;
        };
        if resp.status >= 300 {
            self.t38_tx.remove(&id);
            let why = format!("{} {}", resp.status, resp.reason);
            let _ = leg.call.send(CallCmd::Leg(key, LegEvent::T38Refused(why)));
            return;
        }
        if let Some(ack) = ack_for(self.sip_addr, &key.0, leg, &resp) {
            let to = leg.peer;
            self.send(Transmit {
                to,
                bytes: ack.to_bytes(),
            });
        }
        if answered {
            return;
        }
        self.t38_tx.insert(id, (key.clone(), true));
        let answer = String::from_utf8_lossy(&resp.body).into_owned();
        let event = match sdp::parse(&answer).and_then(|a| sdp::accept_t38_answer(&a)) {
            Ok(stream) => LegEvent::T38(stream),
            Err(e) => LegEvent::T38Refused(e.to_string()),
        };
        if let Some(leg) = self.legs.get(&key) {
            let _ = leg.call.send(CallCmd::Leg(key, event));
        }
    }

    /// A re-INVITE from the far end of one of our legs: a fax leg goes
    /// over to T.38 when offered; anything else is refused (488), and the
    /// leg's media stays as it is.
    pub(super) fn leg_reinvite(&mut self, id: ServerTxId, req: Request, key: DialogKey) {
        // Ours is pending: the far end tries again later (RFC 3261 §14.2).
        if self
            .t38_tx
            .values()
            .any(|(k, answered)| *k == key && !answered)
        {
            self.respond(id, reply(&req, 491, reason_phrase(491), None));
            return;
        }
        let offer = sdp_body(&req).and_then(|t| sdp::parse(&t).ok());
        let Some(leg) = self.legs.get_mut(&key) else {
            return;
        };
        let answer = match (&offer, leg.fax.as_mut()) {
            (Some(offer), Some((local, _))) if sdp::offers_t38(offer) => {
                local.version += 1;
                sdp::answer_t38(offer, local).ok()
            }
            _ => None,
        };
        let Some((answer, stream)) = answer else {
            let mut r = reply(&req, 488, reason_phrase(488), None);
            r.headers.push(
                "Warning",
                "399 plugboard \"only a fax leg goes over to T.38\"",
            );
            self.respond(id, r);
            return;
        };
        let _ = leg
            .call
            .send(CallCmd::Leg(key.clone(), LegEvent::T38(stream)));
        let peer = leg.peer;
        let mut ok = reply(&req, 200, "OK", None);
        ok.headers
            .push("Contact", self.contact("plugboard", peer.transport));
        ok.headers.push("Content-Type", "application/sdp");
        ok.body = answer.into_bytes();
        // Sent again until the ACK comes, as for a call's own 200.
        if peer.transport == Transport::Udp {
            let (udp, bytes) = (self.udp.clone(), ok.to_bytes());
            let task = tokio::spawn(async move {
                super::admission::resend_2xx(&udp, &bytes, peer.addr).await;
            });
            if let Some(leg) = self.legs.get_mut(&key)
                && let Some(old) = leg.retransmit.replace(task)
            {
                old.abort();
            }
        }
        self.respond(id, ok);
    }
}
