//! An SMPP 3.4 ESME session, sans-IO: bytes and `now` in; bytes, a
//! deadline and events out. It binds as a transceiver, keeps at most
//! `window` `submit_sm`s in flight, backs off when the SMSC throttles
//! (`ESME_RTHROTTLED`, `ESME_RMSGQFUL`) and sends the throttled message
//! again, sends `enquire_link` when the link is idle and answers the
//! SMSC's, and gives `deliver_sm`s to its driver, which answers each
//! with [`Esme::ack_deliver`] once it has dealt with it.
//!
//! PDUs are encoded and decoded by rusmpp; the framing is ours, so a PDU
//! rusmpp cannot decode is answered (generic_nack, or its response with
//! `ESME_RSYSERR`) and the session goes on.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rusmpp::pdus::{BindTransceiver, DeliverSm, DeliverSmResp, SubmitSm};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::COctetString;
use rusmpp::values::{InterfaceVersion, Npi, Ton};
use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio_util::codec::{Decoder, Encoder};

/// The largest PDU accepted (a `deliver_sm` with a `message_payload`).
const MAX_PDU: usize = 64 * 1024;

/// Status codes the session acts on.
pub mod status {
    /// No error.
    pub const OK: u32 = 0x00;
    /// Invalid command id.
    pub const INVALID_COMMAND: u32 = 0x03;
    /// System error.
    pub const SYSTEM_ERROR: u32 = 0x08;
    /// Invalid destination address.
    pub const INVALID_DESTINATION: u32 = 0x0B;
    /// Message queue full.
    pub const QUEUE_FULL: u32 = 0x14;
    /// Throttling error: too many messages.
    pub const THROTTLED: u32 = 0x58;
    /// Temporary application error (deliver_sm_resp: try again later).
    pub const TEMPORARY: u32 = 0x64;
    /// Permanent application error (deliver_sm_resp: do not send again).
    pub const PERMANENT: u32 = 0x65;
}

/// The session's settings.
#[derive(Debug, Clone)]
pub struct EsmeConfig {
    /// Account.
    pub system_id: String,
    /// Password (at most 8 characters).
    pub password: String,
    /// `system_type`.
    pub system_type: String,
    /// `submit_sm`s in flight at once.
    pub window: usize,
    /// Idle time before an `enquire_link`.
    pub enquire_link: Duration,
    /// How long a request may wait for its response before the link is
    /// taken for dead.
    pub response_timeout: Duration,
    /// The first pause after a throttling response (doubled on each
    /// further one, up to [`EsmeConfig::max_backoff`]).
    pub first_backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
}

impl Default for EsmeConfig {
    fn default() -> Self {
        EsmeConfig {
            system_id: String::new(),
            password: String::new(),
            system_type: String::new(),
            window: 10,
            enquire_link: Duration::from_secs(30),
            response_timeout: Duration::from_secs(10),
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The driver's id for a submitted message.
pub type Token = u64;

/// What the session reports.
#[derive(Debug)]
pub enum EsmeEvent {
    /// The bind was accepted.
    Bound,
    /// The SMSC accepted a message: its id for it.
    Accepted {
        /// The submit's token.
        token: Token,
        /// The SMSC's message id (receipts name it).
        message_id: String,
    },
    /// The SMSC refused a message.
    Refused {
        /// The submit's token.
        token: Token,
        /// The SMPP status.
        status: u32,
    },
    /// A `deliver_sm` (a message or a receipt): answer it with
    /// [`Esme::ack_deliver`].
    Deliver {
        /// Its sequence number.
        sequence: u32,
        /// The PDU.
        sm: Box<DeliverSm>,
    },
    /// The session ended; what it held unanswered (queued or in flight:
    /// the SMSC may have taken those in flight) is handed back.
    Closed {
        /// Why.
        reason: String,
        /// The bind was refused with this status.
        bind_refused: Option<u32>,
        /// Messages not accepted nor refused, in submit order.
        unanswered: Vec<(Token, SubmitSm)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Binding,
    Bound,
    Unbinding,
    Closed,
}

#[derive(Debug)]
enum Request {
    Bind,
    Submit(Token, Box<SubmitSm>),
    EnquireLink,
    Unbind,
}

/// One SMPP session over one connection.
#[derive(Debug)]
pub struct Esme {
    cfg: EsmeConfig,
    state: State,
    codec: CommandCodec,
    input: BytesMut,
    output: BytesMut,
    next_seq: u32,
    queue: VecDeque<(Token, SubmitSm)>,
    in_flight: HashMap<u32, (Request, Instant)>,
    submits_in_flight: usize,
    paused_until: Option<Instant>,
    backoff: Duration,
    last_seen: Instant,
    events: VecDeque<EsmeEvent>,
}

impl Esme {
    /// A session on a connection just opened: the bind is the first
    /// thing it sends.
    pub fn new(cfg: EsmeConfig, now: Instant) -> Esme {
        let mut e = Esme {
            backoff: cfg.first_backoff,
            cfg,
            state: State::Binding,
            codec: CommandCodec::new().with_max_length(MAX_PDU),
            input: BytesMut::new(),
            output: BytesMut::new(),
            next_seq: 1,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            submits_in_flight: 0,
            paused_until: None,
            last_seen: now,
            events: VecDeque::new(),
        };
        // Settings are checked before (SmsCarrier::validate): a field
        // that does not fit goes empty and the SMSC refuses the bind.
        let bind = BindTransceiver::builder()
            .system_id(e.cfg.system_id.parse().unwrap_or_default())
            .password(e.cfg.password.parse().unwrap_or_default())
            .system_type(e.cfg.system_type.parse().unwrap_or_default())
            .interface_version(InterfaceVersion::Smpp3_4)
            .addr_ton(Ton::Unknown)
            .addr_npi(Npi::Unknown)
            .address_range(COctetString::empty())
            .build();
        e.request(Request::Bind, Pdu::BindTransceiver(bind), now);
        e
    }

    /// Whether the bind was accepted and the session not ended.
    pub fn is_bound(&self) -> bool {
        self.state == State::Bound
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Messages waiting or in flight.
    pub fn backlog(&self) -> usize {
        self.queue.len() + self.submits_in_flight
    }

    /// Queues a message; it goes as soon as the window and throttling
    /// allow.
    pub fn submit(&mut self, token: Token, sm: SubmitSm, now: Instant) {
        self.queue.push_back((token, sm));
        self.pump(now);
    }

    /// Answers a `deliver_sm` (status 0: taken; otherwise the SMSC tries
    /// again later).
    pub fn ack_deliver(&mut self, sequence: u32, status: u32) {
        if self.state == State::Closed {
            return;
        }
        let cmd = Command::new(
            CommandStatus::from(status),
            sequence,
            Pdu::DeliverSmResp(DeliverSmResp::default()),
        );
        self.write(&cmd);
    }

    /// Asks the SMSC to end the session (`unbind`); queued messages are
    /// handed back when it ends.
    pub fn unbind(&mut self, now: Instant) {
        if self.state == State::Bound || self.state == State::Binding {
            self.state = State::Unbinding;
            self.request(Request::Unbind, Pdu::Unbind, now);
        }
    }

    /// Bytes to write to the connection.
    pub fn transmit(&mut self) -> Option<BytesMut> {
        (!self.output.is_empty()).then(|| self.output.split())
    }

    /// Whether bytes wait to be written.
    pub fn transmit_pending(&self) -> bool {
        !self.output.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<EsmeEvent> {
        self.events.pop_front()
    }

    /// When [`Esme::handle_timeout`] should next run.
    pub fn deadline(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let responses = self
            .in_flight
            .values()
            .map(|(_, sent)| *sent + self.cfg.response_timeout)
            .min();
        let idle = (self.state == State::Bound).then(|| self.last_seen + self.cfg.enquire_link);
        let resume = self.paused_until.filter(|_| !self.queue.is_empty());
        [responses, idle, resume].into_iter().flatten().min()
    }

    /// Acts on time: a response overdue ends the session; an idle link
    /// gets an `enquire_link`; a pause ends.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some((_, (r, _))) = self
            .in_flight
            .iter()
            .find(|(_, (_, sent))| now >= *sent + self.cfg.response_timeout)
        {
            let what = match r {
                Request::Bind => "bind_transceiver",
                Request::Submit(..) => "submit_sm",
                Request::EnquireLink => "enquire_link",
                Request::Unbind => "unbind",
            };
            self.close(format!("no answer to {what} in time"), None);
            return;
        }
        if self.state == State::Bound
            && now >= self.last_seen + self.cfg.enquire_link
            && !self
                .in_flight
                .values()
                .any(|(r, _)| matches!(r, Request::EnquireLink))
        {
            self.request(Request::EnquireLink, Pdu::EnquireLink, now);
            // The next one is due an interval after this one.
            self.last_seen = now;
        }
        if self.paused_until.is_some_and(|t| now >= t) {
            self.paused_until = None;
        }
        self.pump(now);
    }

    /// The connection was lost.
    pub fn connection_lost(&mut self, why: &str) {
        self.close(why.to_string(), None);
    }

    /// Bytes read from the connection.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.input.extend_from_slice(bytes);
        self.last_seen = now;
        while self.input.len() >= 16 {
            let len =
                u32::from_be_bytes([self.input[0], self.input[1], self.input[2], self.input[3]])
                    as usize;
            if !(16..=MAX_PDU).contains(&len) {
                // Framing is lost: nothing after this can be read.
                self.close(format!("a PDU of {len} bytes"), None);
                return;
            }
            if self.input.len() < len {
                break;
            }
            let mut pdu = self.input.split_to(len);
            let id = u32::from_be_bytes([pdu[4], pdu[5], pdu[6], pdu[7]]);
            let seq = u32::from_be_bytes([pdu[12], pdu[13], pdu[14], pdu[15]]);
            match self.codec.decode(&mut pdu) {
                Ok(Some(cmd)) => self.on_command(cmd, now),
                Ok(None) | Err(_) => {
                    self.codec = CommandCodec::new().with_max_length(MAX_PDU);
                    self.undecodable(id, seq, now);
                }
            }
            if self.state == State::Closed {
                return;
            }
        }
        self.pump(now);
    }

    /// A PDU rusmpp could not read: a request is answered with an error
    /// (generic_nack for an unknown command); a response fails its
    /// request.
    fn undecodable(&mut self, id: u32, seq: u32, now: Instant) {
        tracing::debug!("SMPP: undecodable PDU {id:#010x} seq {seq}");
        if id & 0x8000_0000 == 0 {
            let known = CommandId::from(id);
            let cmd = if matches!(known, CommandId::Other(_)) {
                Command::new(
                    CommandStatus::from(status::INVALID_COMMAND),
                    seq,
                    Pdu::GenericNack,
                )
            } else {
                Command::new(
                    CommandStatus::from(status::SYSTEM_ERROR),
                    seq,
                    Pdu::Other {
                        command_id: CommandId::from(id | 0x8000_0000),
                        body: Default::default(),
                    },
                )
            };
            self.write(&cmd);
        } else if let Some((r, _)) = self.in_flight.remove(&seq) {
            self.answered(r, status::SYSTEM_ERROR, None, now);
        }
    }

    fn on_command(&mut self, cmd: Command, now: Instant) {
        let seq = cmd.sequence_number();
        let st = u32::from(cmd.status());
        match cmd.id() {
            CommandId::DeliverSm => match cmd.pdu() {
                Some(Pdu::DeliverSm(sm)) if self.state == State::Bound => {
                    self.events.push_back(EsmeEvent::Deliver {
                        sequence: seq,
                        sm: Box::new(sm.clone()),
                    })
                }
                _ => self.ack_deliver(seq, status::SYSTEM_ERROR),
            },
            CommandId::EnquireLink => {
                self.write(&Command::new(
                    CommandStatus::EsmeRok,
                    seq,
                    Pdu::EnquireLinkResp,
                ));
            }
            CommandId::Unbind => {
                self.write(&Command::new(CommandStatus::EsmeRok, seq, Pdu::UnbindResp));
                self.close("the SMSC unbound".into(), None);
            }
            CommandId::AlertNotification => {}
            id if u32::from(id) & 0x8000_0000 != 0 => {
                // A response (generic_nack answers any request).
                if let Some((r, _)) = self.in_flight.remove(&seq) {
                    let message_id = match cmd.pdu() {
                        Some(Pdu::SubmitSmResp(resp)) => Some(resp.message_id().to_string()),
                        _ => None,
                    };
                    self.answered(r, st, message_id, now);
                }
            }
            _ => {
                // A request we do not serve (data_sm, outbind…).
                self.write(&Command::new(
                    CommandStatus::from(status::INVALID_COMMAND),
                    seq,
                    Pdu::GenericNack,
                ));
            }
        }
    }

    fn answered(&mut self, r: Request, st: u32, message_id: Option<String>, now: Instant) {
        match r {
            Request::Bind if st == status::OK => {
                if self.state == State::Binding {
                    self.state = State::Bound;
                    self.events.push_back(EsmeEvent::Bound);
                }
            }
            Request::Bind => self.close(format!("bind refused: status {st:#x}"), Some(st)),
            Request::Submit(token, sm) => {
                self.submits_in_flight -= 1;
                match st {
                    status::OK => {
                        self.backoff = self.cfg.first_backoff;
                        self.events.push_back(EsmeEvent::Accepted {
                            token,
                            message_id: message_id.unwrap_or_default(),
                        });
                    }
                    status::THROTTLED | status::QUEUE_FULL => {
                        // Not taken: it goes again, first, after a pause.
                        // The answers to one window's submits come together:
                        // only the first of them lengthens the pause.
                        self.queue.push_front((token, *sm));
                        if self.paused_until.is_none_or(|t| now >= t) {
                            self.paused_until = Some(now + self.backoff);
                            self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
                        }
                    }
                    st => self
                        .events
                        .push_back(EsmeEvent::Refused { token, status: st }),
                }
            }
            Request::EnquireLink => {}
            Request::Unbind => self.close("unbound".into(), None),
        }
    }

    /// Sends what the window and throttling allow.
    fn pump(&mut self, now: Instant) {
        if self.state != State::Bound || self.paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.paused_until = None;
        while self.submits_in_flight < self.cfg.window.max(1) {
            let Some((token, sm)) = self.queue.pop_front() else {
                break;
            };
            self.submits_in_flight += 1;
            let pdu = Pdu::SubmitSm(sm.clone());
            self.request(Request::Submit(token, Box::new(sm)), pdu, now);
        }
    }

    fn request(&mut self, r: Request, pdu: Pdu, now: Instant) {
        let seq = self.next_seq;
        self.next_seq = if seq >= 0x7FFF_FFFF { 1 } else { seq + 1 };
        self.write(&Command::new(CommandStatus::EsmeRok, seq, pdu));
        self.in_flight.insert(seq, (r, now));
    }

    fn write(&mut self, cmd: &Command) {
        if let Err(e) = self.codec.encode(cmd, &mut self.output) {
            tracing::warn!("SMPP: cannot encode {:?}: {e}", cmd.id());
        }
    }

    fn close(&mut self, reason: String, bind_refused: Option<u32>) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        let mut in_flight: Vec<(u32, Request)> =
            self.in_flight.drain().map(|(s, (r, _))| (s, r)).collect();
        in_flight.sort_by_key(|(s, _)| *s);
        let mut unanswered: Vec<(Token, SubmitSm)> = in_flight
            .into_iter()
            .filter_map(|(_, r)| match r {
                Request::Submit(t, sm) => Some((t, *sm)),
                _ => None,
            })
            .collect();
        unanswered.extend(self.queue.drain(..));
        self.submits_in_flight = 0;
        self.events.push_back(EsmeEvent::Closed {
            reason,
            bind_refused,
            unanswered,
        });
    }
}

/// Reads the `command_length`, `command_id` and `sequence_number` of a
/// PDU's header.
pub fn header(pdu: &[u8]) -> Option<(u32, u32, u32)> {
    let mut b = pdu.get(..16)?;
    let len = b.get_u32();
    let id = b.get_u32();
    b.advance(4);
    Some((len, id, b.get_u32()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rusmpp::pdus::{BindTransceiverResp, SubmitSmResp};

    /// The SMSC's side of the tests: rusmpp's codec over the bytes.
    struct Smsc {
        codec: CommandCodec,
        buf: BytesMut,
    }

    impl Smsc {
        fn new() -> Smsc {
            Smsc {
                codec: CommandCodec::new(),
                buf: BytesMut::new(),
            }
        }

        fn read(&mut self, esme: &mut Esme) -> Vec<Command> {
            if let Some(b) = esme.transmit() {
                self.buf.extend_from_slice(&b);
            }
            let mut out = Vec::new();
            while let Some(c) = self.codec.decode(&mut self.buf).unwrap() {
                out.push(c);
            }
            out
        }

        fn send(&mut self, esme: &mut Esme, cmd: Command, now: Instant) {
            let mut b = BytesMut::new();
            self.codec.encode(&cmd, &mut b).unwrap();
            esme.receive(&b, now);
        }
    }

    fn sm(n: u8) -> SubmitSm {
        SubmitSm::builder()
            .destination_addr(format!("3706000000{n}").parse().unwrap())
            .build()
    }

    fn bound(window: usize) -> (Esme, Smsc, Instant) {
        let now = Instant::now();
        let cfg = EsmeConfig {
            system_id: "acme".into(),
            password: "pw".into(),
            window,
            ..EsmeConfig::default()
        };
        let mut e = Esme::new(cfg, now);
        let mut s = Smsc::new();
        let bind = s.read(&mut e);
        assert_eq!(bind.len(), 1);
        assert_eq!(bind[0].id(), CommandId::BindTransceiver);
        let Some(Pdu::BindTransceiver(b)) = bind[0].pdu() else {
            panic!("not a bind")
        };
        assert_eq!(b.system_id.to_string(), "acme");
        assert_eq!(b.interface_version, InterfaceVersion::Smpp3_4);
        let seq = bind[0].sequence_number();
        s.send(
            &mut e,
            Command::new(
                CommandStatus::EsmeRok,
                seq,
                BindTransceiverResp::builder().build(),
            ),
            now,
        );
        assert!(e.is_bound());
        assert!(matches!(e.poll_event(), Some(EsmeEvent::Bound)));
        (e, s, now)
    }

    fn resp(seq: u32, status: u32, id: &str) -> Command {
        if status == 0 {
            Command::new(
                CommandStatus::EsmeRok,
                seq,
                SubmitSmResp::builder()
                    .message_id(id.parse().unwrap())
                    .build(),
            )
        } else {
            Command::new(
                CommandStatus::from(status),
                seq,
                Pdu::Other {
                    command_id: CommandId::SubmitSmResp,
                    body: Default::default(),
                },
            )
        }
    }

    #[test]
    fn the_window_limits_what_is_in_flight() {
        let (mut e, mut s, now) = bound(2);
        for t in 0..5 {
            e.submit(t, sm(t as u8), now);
        }
        let sent = s.read(&mut e);
        assert_eq!(sent.len(), 2);
        assert_eq!(e.backlog(), 5);
        s.send(&mut e, resp(sent[0].sequence_number(), 0, "m0"), now);
        let more = s.read(&mut e);
        assert_eq!(more.len(), 1, "one answer opens one slot");
        match e.poll_event() {
            Some(EsmeEvent::Accepted { token, message_id }) => {
                assert_eq!((token, message_id.as_str()), (0, "m0"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn throttling_pauses_and_sends_the_same_message_again() {
        let (mut e, mut s, now) = bound(10);
        e.submit(1, sm(1), now);
        e.submit(2, sm(2), now);
        let sent = s.read(&mut e);
        assert_eq!(sent.len(), 2);
        s.send(
            &mut e,
            resp(sent[0].sequence_number(), status::THROTTLED, ""),
            now,
        );
        s.send(&mut e, resp(sent[1].sequence_number(), 0, "b"), now);
        assert!(s.read(&mut e).is_empty(), "paused");
        assert!(matches!(
            e.poll_event(),
            Some(EsmeEvent::Accepted { token: 2, .. })
        ));
        let later = e.deadline().unwrap();
        assert!(later > now);
        e.handle_timeout(later);
        let again = s.read(&mut e);
        assert_eq!(again.len(), 1);
        let (Some(Pdu::SubmitSm(a)), Some(Pdu::SubmitSm(b))) = (again[0].pdu(), sent[0].pdu())
        else {
            panic!("not submits")
        };
        assert_eq!(a, b);
        assert_ne!(again[0].sequence_number(), sent[0].sequence_number());
    }

    #[test]
    fn refusals_and_deliveries_are_reported_and_enquire_link_answered() {
        let (mut e, mut s, now) = bound(10);
        e.submit(9, sm(9), now);
        let sent = s.read(&mut e);
        s.send(&mut e, resp(sent[0].sequence_number(), 0x0B, ""), now);
        assert!(matches!(
            e.poll_event(),
            Some(EsmeEvent::Refused {
                token: 9,
                status: 0x0B
            })
        ));
        s.send(
            &mut e,
            Command::new(CommandStatus::EsmeRok, 77, Pdu::EnquireLink),
            now,
        );
        let r = s.read(&mut e);
        assert_eq!(r[0].id(), CommandId::EnquireLinkResp);
        assert_eq!(r[0].sequence_number(), 77);
        s.send(
            &mut e,
            Command::new(CommandStatus::EsmeRok, 78, DeliverSm::builder().build()),
            now,
        );
        let Some(EsmeEvent::Deliver { sequence, .. }) = e.poll_event() else {
            panic!("no deliver")
        };
        e.ack_deliver(sequence, 0);
        let r = s.read(&mut e);
        assert_eq!(r[0].id(), CommandId::DeliverSmResp);
        assert_eq!(r[0].sequence_number(), 78);
    }

    #[test]
    fn garbage_bodies_get_an_error_and_the_session_goes_on() {
        let (mut e, mut s, now) = bound(10);
        // A deliver_sm whose body is cut short.
        let mut bad = Vec::new();
        bad.extend_from_slice(&20u32.to_be_bytes());
        bad.extend_from_slice(&0x0000_0005u32.to_be_bytes());
        bad.extend_from_slice(&0u32.to_be_bytes());
        bad.extend_from_slice(&5u32.to_be_bytes());
        bad.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        // An unknown command.
        bad.extend_from_slice(&16u32.to_be_bytes());
        bad.extend_from_slice(&0x0000_0777u32.to_be_bytes());
        bad.extend_from_slice(&0u32.to_be_bytes());
        bad.extend_from_slice(&6u32.to_be_bytes());
        e.receive(&bad, now);
        let r = s.read(&mut e);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].sequence_number(), 5);
        assert_eq!(u32::from(r[0].status()), status::SYSTEM_ERROR);
        assert_eq!(r[1].id(), CommandId::GenericNack);
        assert!(e.is_bound());
        e.submit(1, sm(1), now);
        assert_eq!(s.read(&mut e).len(), 1);
    }

    #[test]
    fn a_lost_link_hands_back_what_was_not_answered() {
        let (mut e, mut s, now) = bound(1);
        e.submit(1, sm(1), now);
        e.submit(2, sm(2), now);
        s.read(&mut e);
        let deadline = e.deadline().unwrap();
        e.handle_timeout(deadline);
        match e.poll_event() {
            Some(EsmeEvent::Closed { unanswered, .. }) => {
                let tokens: Vec<Token> = unanswered.iter().map(|(t, _)| *t).collect();
                assert_eq!(tokens, vec![1, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.is_closed());
    }

    #[test]
    fn an_idle_link_is_probed_and_a_refused_bind_ends_the_session() {
        let (mut e, mut s, now) = bound(1);
        let t = now + Duration::from_secs(31);
        e.handle_timeout(t);
        let r = s.read(&mut e);
        assert_eq!(r[0].id(), CommandId::EnquireLink);
        let mut e2 = Esme::new(EsmeConfig::default(), now);
        let mut s2 = Smsc::new();
        let bind = s2.read(&mut e2);
        s2.send(
            &mut e2,
            Command::new(
                CommandStatus::from(0x0Du32),
                bind[0].sequence_number(),
                Pdu::Other {
                    command_id: CommandId::BindTransceiverResp,
                    body: Default::default(),
                },
            ),
            now,
        );
        assert!(matches!(
            e2.poll_event(),
            Some(EsmeEvent::Closed {
                bind_refused: Some(0x0D),
                ..
            })
        ));
    }
}
