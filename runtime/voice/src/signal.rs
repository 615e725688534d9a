//! The messages between the SIP endpoint and the call tasks: what a call
//! asks of the endpoint ([`CallOut`]) and what the endpoint tells a call
//! ([`CallCmd`], [`LegEvent`]). Both sides depend on this module, not on
//! each other.

use plugboard_media::dtmf::DtmfSource;
use plugboard_media::sdp::{LocalMedia, Negotiated, T38Stream};
use tokio::sync::mpsc;

use crate::meter::LegMeter;
use crate::route::Resolved;

/// A dialog: Call-ID and our tag.
pub(crate) type DialogKey = (String, String);

/// What call tasks and dialog timers ask of the endpoint.
pub(crate) enum CallOut {
    /// The flow hung up (or media died): send BYE.
    Hangup(DialogKey),
    /// The call task ended.
    Ended(DialogKey),
    /// The ring time passed: answer.
    Answer(DialogKey),
    /// No ACK came for our 2xx (RFC 3261 §13.3.1.4): hang up.
    NoAck(DialogKey),
    /// Call out (dial, transfer): a new leg with this key and SDP offer.
    Dial {
        /// The new leg's Call-ID and our tag.
        leg: DialogKey,
        /// Where it goes (resolved by the call task: the tenant's trunk
        /// for a number, DNS), or why it cannot.
        route: Result<Resolved, (u16, String)>,
        /// Caller id to present.
        caller_id: Option<String>,
        /// Our SDP offer.
        offer: String,
        /// Where leg events go.
        call: mpsc::UnboundedSender<CallCmd>,
        /// Its place in the tenant's capacity, and its usage.
        meter: Box<LegMeter>,
    },
    /// Give up a leg that has not answered (CANCEL).
    CancelLeg(DialogKey),
    /// End a leg (BYE, or CANCEL if it has not answered).
    HangupLeg(DialogKey),
    /// The call is now a fax call (a voice call taken as a fax): a
    /// re-INVITE to T.38 is accepted.
    FaxDialog(DialogKey),
    /// The leg is a fax call: a re-INVITE to T.38 from the far end is
    /// accepted on `local` (its media port); with `offer`, we ask for T.38
    /// ourselves once it answers.
    FaxLeg {
        /// The leg.
        leg: DialogKey,
        /// Our side of its media.
        local: LocalMedia,
        /// Send the re-INVITE to T.38 ourselves.
        offer: bool,
    },
}

/// What happens on an outbound leg.
pub(crate) enum LegEvent {
    /// 180/183.
    Ringing,
    /// 2xx with an SDP answer.
    Answered(Negotiated),
    /// Refused, cancelled or timed out: the final status and reason.
    Failed(u16, String),
    /// The far end hung up.
    Hangup,
    /// The far end asked for a blind transfer (REFER) to this target.
    Refer(String),
    /// The far end (an agent's softphone) holds the caller, or resumes.
    Hold(bool),
    /// The fax leg went over to T.38 (our re-INVITE or the far end's).
    T38(T38Stream),
    /// The far end refused our re-INVITE to T.38: the leg stays on audio.
    T38Refused(String),
}

/// What the endpoint tells a call.
pub(crate) enum CallCmd {
    /// The ACK arrived: the call is up.
    Confirmed,
    /// A digit by SIP INFO.
    Dtmf(char, DtmfSource),
    /// A re-INVITE changed the media (hold/resume).
    Media(Negotiated),
    /// A re-INVITE took the (fax) call over to T.38.
    T38(T38Stream),
    /// The ACK's answer to the offer we made in our 200 (late offer), or
    /// why there is none we can use.
    Answer(Result<Negotiated, String>),
    /// The caller left (BYE, CANCEL, no ACK).
    RemoteHangup(String),
    /// The endpoint ended the call itself (its INVITE had no final answer
    /// in time): a system ending, already told to the caller.
    SystemHangup(String),
    /// Something happened on an outbound leg.
    Leg(DialogKey, LegEvent),
    /// The ACD's answer about the call's task (refused, accept failed).
    Queue(crate::ivr::Queue),
    /// The server is shutting down: end the call (BYE) once the flow has
    /// finished its event, and close the record.
    Shutdown,
    /// What the flow's `send` did, for the call's timeline.
    Sent(serde_json::Value),
}
