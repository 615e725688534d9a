//! Plugboard's SMS channel: one SMPP 3.4 link per tenant carrier.
//!
//! - [`esme`] is the protocol engine, sans-IO: bind as a transceiver, a
//!   send window, `ESME_RTHROTTLED`/`ESME_RMSGQFUL` backoff (the same
//!   PDU goes again), `enquire_link`, answers to what it cannot read.
//!   PDUs are rusmpp's; rusmppc, rusmpp's client, was not used: it keeps
//!   no window, does not back off or reconnect, is not sans-IO and always
//!   pulls a DNS resolver.
//! - [`link`] drives a session over TCP and reconnects with backoff; the
//!   messages a lost session held go again on the next.
//! - [`text`] encodes GSM 03.38 or UCS-2 with concatenation (UDH) and
//!   decodes inbound texts; [`receipt`] reads delivery receipts.
//! - [`SmsHub`] keeps a link per carrier in step with the tenants'
//!   settings, is the engine's courier for outbound SMS (the engine's
//!   durable outbox calls it) and hands inbound messages to the engine
//!   before it answers `deliver_sm` (so what the SMSC was told we took
//!   is stored). The parts of a long inbound text are stored as they
//!   come and joined when the last arrives. Receipts mark what we sent
//!   `delivered` or `failed`.
//!
//! What SMPP cannot promise: when a link is lost while a `submit_sm` is
//! in flight, the SMSC may have taken it; it goes again on the next
//! session (at least once). A `deliver_sm` whose answer was lost comes
//! again and is stored again, except the parts of a long text (stored
//! under their own key).

pub mod esme;
pub mod http;
pub mod link;
pub mod receipt;
pub mod text;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use plugboard_core::{
    Channel, Error as CoreError, Message, MessageStatus, SmsCarrier, normalize_address,
};
use plugboard_engine::{Courier, Delivered, DeliveryError, Engine, EngineError, Inbound};
use plugboard_host::fetch::NetPolicy;
use rusmpp::pdus::{DeliverSm, SubmitSm};
use rusmpp::tlvs::TlvValue;
use rusmpp::types::OctetString;
use rusmpp::values::{DataCoding, EsmClass, Npi, RegisteredDelivery, Ton};

use crate::esme::{EsmeConfig, status};
use crate::link::{DeliverSink, Endpoint, Link, SubmitOutcome, Timing};
use crate::receipt::Receipt;

/// How long a receipt waits for the outbox to record the message it
/// names (the SMSC may report before our own write of its answer).
const RECEIPT_WAIT: Duration = Duration::from_secs(10);

/// How long the courier waits for a link to send a message.
const SUBMIT_WAIT: Duration = Duration::from_secs(120);

struct Running {
    carrier: SmsCarrier,
    fingerprint: String,
    /// The SMPP link (HTTP carriers have none).
    link: Option<Arc<Link>>,
}

/// The SMS links of every tenant's carriers on this server.
pub struct SmsHub {
    engine: Weak<Engine>,
    net: NetPolicy,
    timing: Timing,
    links: Mutex<HashMap<(String, String), Running>>,
    sync: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SmsHub {
    /// Starts the links of the carriers set now, follows later changes,
    /// and becomes the engine's courier of SMS.
    pub fn start(engine: &Arc<Engine>, net: NetPolicy, timing: Timing) -> Arc<SmsHub> {
        let hub = Arc::new(SmsHub {
            engine: Arc::downgrade(engine),
            net,
            timing,
            links: Mutex::new(HashMap::new()),
            sync: tokio::sync::Mutex::new(()),
        });
        engine.set_courier(
            Channel::Sms,
            Arc::new(SmsCourier {
                hub: Arc::downgrade(&hub),
            }),
        );
        let mut changes = engine.sms_carrier_changes();
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            loop {
                let Some(hub) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = hub.sync_links().await {
                    tracing::warn!("SMS carriers: {e}");
                }
                drop(hub);
                // Changes made on this server come at once; others (another
                // node's API) within a minute.
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        });
        hub
    }

    /// Starts, restarts and stops links to match the carriers' settings.
    pub async fn sync_links(self: &Arc<Self>) -> Result<(), EngineError> {
        let _one = self.sync.lock().await;
        let Some(engine) = self.engine.upgrade() else {
            return Ok(());
        };
        let mut wanted = HashMap::new();
        for (tenant, carrier) in engine.all_sms_carriers().await? {
            let password = match engine.sms_carrier_secret(&tenant, &carrier).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("SMS carrier {} of {tenant}: {e}", carrier.name);
                    continue;
                }
            };
            let fingerprint = format!(
                "{}\n{}",
                serde_json::to_string(&carrier).unwrap_or_default(),
                plugboard_store::hash_key(&password)
            );
            wanted.insert(
                (tenant.clone(), carrier.name.clone()),
                (carrier, password, fingerprint),
            );
        }
        let mut stopping = Vec::new();
        {
            let mut links = lock(&self.links);
            let gone: Vec<_> = links
                .iter()
                .filter(|(k, r)| wanted.get(*k).is_none_or(|w| w.2 != r.fingerprint))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some(r) = links.remove(&k) {
                    engine.set_sms_link_state(&k.0, &k.1, None);
                    stopping.extend(r.link);
                }
            }
            for (key, (carrier, password, fingerprint)) in wanted {
                if links.contains_key(&key) {
                    continue;
                }
                let link = carrier.smpp.as_ref().map(|smpp| {
                    let endpoint = Endpoint {
                        host: smpp.host.clone(),
                        port: smpp.port,
                        esme: EsmeConfig {
                            system_id: smpp.system_id.clone(),
                            password,
                            system_type: smpp.system_type.clone(),
                            window: smpp.window as usize,
                            enquire_link: Duration::from_secs(smpp.enquire_link_secs.into()),
                            ..EsmeConfig::default()
                        },
                    };
                    let sink = Arc::new(Sink {
                        engine: self.engine.clone(),
                        tenant: key.0.clone(),
                        carrier: carrier.clone(),
                        alphabet: smpp.default_alphabet,
                    });
                    Arc::new(Link::start(
                        endpoint,
                        self.net.clone(),
                        self.timing.clone(),
                        sink,
                    ))
                });
                links.insert(
                    key,
                    Running {
                        carrier,
                        fingerprint,
                        link,
                    },
                );
            }
        }
        for link in stopping {
            if let Some(link) = Arc::into_inner(link) {
                link.stop().await;
            }
        }
        Ok(())
    }

    /// Unbinds every link (at shutdown).
    pub async fn stop(&self) {
        let all: Vec<Running> = lock(&self.links).drain().map(|(_, r)| r).collect();
        let stops = all
            .into_iter()
            .filter_map(|r| r.link.and_then(Arc::into_inner));
        futures_util::future::join_all(stops.map(Link::stop)).await;
    }

    /// The tenant's carrier that carries `number`, and its SMPP link.
    fn link_for(&self, tenant: &str, number: &str) -> Option<(SmsCarrier, Option<Arc<Link>>)> {
        let links = lock(&self.links);
        let carriers: Vec<SmsCarrier> = links
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, r)| r.carrier.clone())
            .collect();
        links
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .find(|(_, r)| r.carrier.carries(number, &carriers))
            .map(|(_, r)| (r.carrier.clone(), r.link.clone()))
    }
}

/// The type of number and numbering plan of an address: digits are an
/// international number, anything else an alphanumeric sender.
fn ton_npi(address: &str) -> (Ton, Npi) {
    if !address.is_empty() && address.bytes().all(|b| b.is_ascii_digit()) {
        (Ton::International, Npi::Isdn)
    } else {
        (Ton::Alphanumeric, Npi::Unknown)
    }
}

/// Whether a refusal is worth trying again later.
fn transient(st: u32) -> bool {
    matches!(
        st,
        status::SYSTEM_ERROR | status::QUEUE_FULL | status::THROTTLED | status::TEMPORARY
    )
}

/// The engine's courier of SMS.
struct SmsCourier {
    hub: Weak<SmsHub>,
}

#[async_trait::async_trait]
impl Courier for SmsCourier {
    fn needs_history(&self) -> bool {
        false
    }

    async fn deliver(
        &self,
        tenant: &str,
        message: &Message,
        _history: &[Message],
    ) -> Result<Delivered, DeliveryError> {
        let Some(hub) = self.hub.upgrade() else {
            return Err(DeliveryError::Retry("the server is stopping".into()));
        };
        let from = normalize_address(&message.from);
        let Some((carrier, link)) = hub.link_for(tenant, &from) else {
            return Err(DeliveryError::Retry(format!(
                "no SMS carrier of the tenant carries {from}"
            )));
        };
        if message.text.trim().is_empty() {
            return Err(DeliveryError::Permanent("an SMS carries text only".into()));
        }
        let (Some(link), Some(smpp)) = (link, &carrier.smpp) else {
            let (Some(engine), Some(api)) = (hub.engine.upgrade(), &carrier.http) else {
                return Err(DeliveryError::Retry("the server is stopping".into()));
            };
            return http::send(&engine, tenant, &carrier, api, message).await;
        };
        // The concatenation reference: from the message id, so a resend
        // carries the same one.
        let reference = plugboard_store::hash_key(&message.id)
            .bytes()
            .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
        let parts = text::encode_for(&message.text, reference, smpp.default_alphabet)
            .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
        let (src_ton, src_npi) = ton_npi(&from);
        let to = normalize_address(&message.to);
        let (dst_ton, dst_npi) = ton_npi(&to);
        let bad = |what: &str| DeliveryError::Permanent(format!("{what} does not fit SMPP"));
        let mut pdus = Vec::with_capacity(parts.len());
        for p in &parts {
            // Store and forward, a plain message; 0x40 with a UDH.
            let esm = EsmClass::from(if p.udhi { 0x40u8 } else { 0x00 });
            pdus.push(
                SubmitSm::builder()
                    .source_addr_ton(src_ton)
                    .source_addr_npi(src_npi)
                    .source_addr(from.parse().map_err(|_| bad("the sender"))?)
                    .dest_addr_ton(dst_ton)
                    .dest_addr_npi(dst_npi)
                    .destination_addr(to.parse().map_err(|_| bad("the recipient"))?)
                    .esm_class(esm)
                    .registered_delivery(RegisteredDelivery::from(0x01u8))
                    .data_coding(DataCoding::from(p.data_coding))
                    .short_message(
                        OctetString::from_vec(p.bytes.clone()).map_err(|_| bad("a part"))?,
                    )
                    .build(),
            );
        }
        let sends = pdus.into_iter().map(|sm| {
            let link = link.clone();
            async move {
                tokio::time::timeout(SUBMIT_WAIT, link.submit(sm))
                    .await
                    .unwrap_or_else(|_| SubmitOutcome::Down("no answer from the link".into()))
            }
        });
        let outcomes = futures_util::future::join_all(sends).await;
        let mut ids = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            match o {
                SubmitOutcome::Accepted(id) => ids.push(id),
                SubmitOutcome::Refused(st) if transient(st) => {
                    return Err(DeliveryError::Retry(format!("the SMSC answered {st:#x}")));
                }
                SubmitOutcome::Refused(st) => {
                    return Err(DeliveryError::Permanent(format!(
                        "the SMSC refused it: status {st:#x}"
                    )));
                }
                SubmitOutcome::Down(why) => return Err(DeliveryError::Retry(why)),
            }
        }
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("parts".to_string(), parts.len().to_string());
        meta.insert("carrier".to_string(), carrier.name.clone());
        let mut ids = ids.into_iter();
        Ok(Delivered {
            external_id: ids.next(),
            aliases: ids.collect(),
            meta,
        })
    }
}

/// Takes one carrier link's `deliver_sm`s into the engine.
struct Sink {
    engine: Weak<Engine>,
    tenant: String,
    carrier: SmsCarrier,
    alphabet: plugboard_core::DefaultAlphabet,
}

#[async_trait::async_trait]
impl DeliverSink for Sink {
    async fn deliver(&self, sm: DeliverSm) -> u32 {
        let Some(engine) = self.engine.upgrade() else {
            return status::TEMPORARY;
        };
        let mut payload = None;
        let (mut receipted, mut state, mut sar) = (None, None, (None, None, None));
        for tlv in sm.tlvs() {
            match tlv.value() {
                Some(TlvValue::MessagePayload(p)) => payload = Some(p.value.as_ref().to_vec()),
                Some(TlvValue::ReceiptedMessageId(id)) => receipted = Some(id.to_string()),
                Some(TlvValue::MessageState(s)) => state = Some(u8::from(*s)),
                Some(TlvValue::SarMsgRefNum(r)) => sar.0 = Some(*r),
                Some(TlvValue::SarTotalSegments(t)) => sar.1 = Some(*t),
                Some(TlvValue::SarSegmentSeqnum(s)) => sar.2 = Some(*s),
                _ => {}
            }
        }
        let bytes: Vec<u8> = match payload {
            Some(p) if sm.short_message().as_ref().is_empty() => p,
            _ => sm.short_message().as_ref().to_vec(),
        };
        let esm = u8::from(sm.esm_class);
        let dc = u8::from(sm.data_coding);
        let alphabet = self.alphabet;
        if esm & 0x3C == 0x04 || esm & 0x3C == 0x20 {
            let text = text::decode(dc, &bytes, alphabet);
            return self
                .receipt(&engine, receipted.as_deref(), state, &text)
                .await;
        }
        let from = normalize_address(&sm.source_addr.to_string());
        let to = normalize_address(&sm.destination_addr.to_string());
        // Over the tenant's messages per second: the SMSC holds it and
        // delivers it again later (SMPP 3.4 §5.1.3, ESME_RTHROTTLED). The
        // tenant's record brings its current limits.
        if let Err(e) = engine.tenant(&self.tenant).await {
            tracing::warn!("SMS of {}: {e}", self.tenant);
            return status::TEMPORARY;
        }
        let (concat, body) = if esm & 0x40 != 0 {
            text::split_udh(&bytes)
        } else {
            (None, &bytes[..])
        };
        let concat = concat.or(match sar {
            (Some(reference), Some(total), Some(seq)) if (1..=total).contains(&seq) => {
                Some(text::Concat {
                    reference,
                    total,
                    seq,
                })
            }
            _ => None,
        });
        // A long text counts once, at its first part.
        if concat.as_ref().is_none_or(|c| c.seq <= 1)
            && let Err(r) = engine.capacity().admit_message(&self.tenant, "sms")
        {
            let detail = serde_json::json!({"from": from, "to": to, "carrier": self.carrier.name});
            engine.capacity_refused(&self.tenant, "sms", &r, detail);
            return status::THROTTLED;
        }
        let mut inbound = Inbound {
            channel: Channel::Sms,
            tenant: Some(self.tenant.clone()),
            from: from.clone(),
            to: to.clone(),
            thread: vec![format!("{from}\n{to}")],
            ..Inbound::default()
        };
        inbound
            .meta
            .insert("carrier".into(), self.carrier.name.clone());
        let mut long = None;
        match concat {
            Some(c) if c.total > 1 => {
                let key = format!("{from}\n{to}\n{}\n{}", c.reference, c.total);
                let got = engine
                    .sms_part(&self.tenant, &key, c.total, c.seq, dc, body)
                    .await;
                match got {
                    Ok(None) => return status::OK,
                    Ok(Some(text)) => {
                        let mut joined = Vec::new();
                        for (_, b) in &text.parts {
                            joined.extend_from_slice(b);
                        }
                        let first_dc = text.parts.first().map(|p| p.0).unwrap_or(dc);
                        inbound.text = text::decode(first_dc, &joined, alphabet);
                        inbound.client_id = Some(text.id);
                        inbound.meta.insert("parts".into(), c.total.to_string());
                        long = Some((key, c.total));
                    }
                    Err(e) => {
                        tracing::warn!("SMS part of {}: {e}", self.tenant);
                        return status::TEMPORARY;
                    }
                }
            }
            _ => inbound.text = text::decode(dc, body, alphabet),
        }
        match engine.receive(inbound).await {
            Ok(_) => {
                if let Some((key, total)) = long
                    && let Err(e) = engine.drop_sms_parts(&self.tenant, &key, total).await
                {
                    tracing::warn!("SMS parts of {}: {e}", self.tenant);
                }
                status::OK
            }
            Err(EngineError::Core(CoreError::NotFound(_))) => status::INVALID_DESTINATION,
            Err(EngineError::Core(CoreError::Invalid(why))) => {
                tracing::info!("SMS to {to} of {} refused: {why}", self.tenant);
                status::PERMANENT
            }
            Err(e) => {
                tracing::warn!("SMS to {to} of {}: {e}", self.tenant);
                status::TEMPORARY
            }
        }
    }

    fn state(&self, state: serde_json::Value) {
        if let Some(engine) = self.engine.upgrade() {
            engine.set_sms_link_state(&self.tenant, &self.carrier.name, Some(state));
        }
    }
}

impl Sink {
    /// A delivery receipt: the message it names becomes delivered or
    /// failed.
    async fn receipt(
        &self,
        engine: &Arc<Engine>,
        tlv_id: Option<&str>,
        state: Option<u8>,
        text: &str,
    ) -> u32 {
        let Some(r) = Receipt::parse(tlv_id, state, text) else {
            tracing::info!("SMS receipt without an id for {}: {text:?}", self.tenant);
            return status::OK;
        };
        let Some((st, why)) = r.status() else {
            return status::OK;
        };
        let deadline = tokio::time::Instant::now() + RECEIPT_WAIT;
        loop {
            match engine
                .message_by_external_id(&self.tenant, Channel::Sms, &r.id)
                .await
            {
                Ok(Some(m)) if m.status != MessageStatus::Queued => {
                    return match engine.message_status(&self.tenant, &m.id, st, why).await {
                        Ok(_) => status::OK,
                        Err(e) => {
                            tracing::warn!("SMS receipt for {}: {e}", m.id);
                            status::TEMPORARY
                        }
                    };
                }
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) => {
                    tracing::info!(
                        "SMS receipt for unknown message {} of {}",
                        r.id,
                        self.tenant
                    );
                    return status::OK;
                }
                Err(e) => {
                    tracing::warn!("SMS receipt of {}: {e}", self.tenant);
                    return status::TEMPORARY;
                }
            }
        }
    }
}
