//! The IVR executor of one call, sans-IO: it runs the flow's actions on
//! the call's audio — say and play, gather (barge-in, terminator,
//! first-digit and inter-digit timeouts, type-ahead), record, wait, wait
//! in an ACD queue with music on hold while agents' phones are rung (and
//! bridge to the one who answers), dial with ringback and a bridge, hang
//! up.
//!
//! It does no I/O and reads no clock. Its driver (the call task,
//! [`crate::call`]) feeds it the time and what happened — the answer
//! ([`Ivr::answer`]), each 20 ms frame the caller sent ([`Ivr::tick`],
//! which returns the frame to play), digits ([`Ivr::digit`]), the flow's
//! prepared actions ([`Ivr::step`]), the dial leg's progress
//! ([`Ivr::leg`]), what the ACD decided for the queued call
//! ([`Ivr::queue`]), a stored recording ([`Ivr::recorded`]) — and carries
//! out what it asks ([`Ivr::poll_effect`]): hand an event to the flow,
//! write a timeline entry, enqueue, ring an agent, tell the ACD what the
//! agent did, call out, cancel a leg, store a recording, end the call.
//! Tests drive it in virtual time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plugboard_core::flow::{Action, Event};
use plugboard_core::{Channel, EntryKind, InteractionState, MonitorMode};
use plugboard_media::audio::{self, FRAME};
use plugboard_media::dtmf::{DtmfMerger, DtmfSource};
use plugboard_media::mix;
use serde_json::{Value, json};

/// An action with its audio ready: speech for `say` and gather prompts,
/// the clip for `play` (or the short tone that replaces one that failed).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The flow's action.
    pub action: Action,
    /// Its audio (8 kHz samples), where it has any.
    pub audio: Option<Arc<Vec<i16>>>,
}

/// What the IVR asks of its driver, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand this event to the flow and answer with [`Ivr::step`] and the
    /// flow's actions, prepared.
    Flow(Event),
    /// Write this entry on the call's timeline.
    Note(EntryKind, Value),
    /// Call out on a new leg (the caller hears ringback meanwhile) and
    /// report its progress with [`Ivr::leg`].
    Dial {
        /// Whom to call.
        target: String,
        /// Caller id to present (`None`: the caller's).
        caller_id: Option<String>,
        /// A transfer (the call ends with the leg) rather than a dial
        /// (the flow goes on after it).
        transfer: bool,
    },
    /// The leg rang too long: give up on it (CANCEL); its failure comes
    /// back through [`Ivr::leg`].
    CancelLeg,
    /// End the leg now (BYE, or CANCEL if it has not answered); nothing
    /// more of it is reported.
    DropLeg,
    /// Put the call in this ACD queue (the caller hears music) and report
    /// what the ACD decides with [`Ivr::queue`].
    Enqueue {
        /// Queue id.
        queue: String,
        /// Priority (higher first).
        priority: u32,
        /// Skills an agent needs.
        skills: Vec<String>,
        /// Only this agent (a transfer to an agent).
        agent: Option<String>,
    },
    /// Ring the agent offered the call on a new leg (the caller keeps
    /// hearing music) and report its progress with [`Ivr::leg`].
    Ring {
        /// Agent id.
        agent: String,
        /// Their phone (the tenant's SIP user's address of record).
        target: String,
    },
    /// Tell the ACD the agent could not be reached (busy, no answer, no
    /// phone): it offers the call to the next.
    Missed {
        /// Agent id.
        agent: String,
    },
    /// Tell the ACD the agent answered; if it no longer lets them take
    /// the call, report [`Queue::AcceptFailed`].
    Accept {
        /// Agent id.
        agent: String,
    },
    /// Tell the ACD the agent's conversation is over (they wrap up).
    TaskDone,
    /// Call a third party into the agent's conversation on a leg of its
    /// own (a supervisor, or the party a warm transfer consults) and
    /// report its progress with [`Ivr::side_leg`].
    RingSide {
        /// Which third party.
        side: Side,
        /// Whom to call.
        target: String,
    },
    /// End that third party's leg.
    DropSide(Side),
    /// A warm transfer completes: the consulted party's leg becomes the
    /// call's leg (its news comes through [`Ivr::leg`] from now on) and
    /// the agent's leg ends.
    PromoteConsult,
    /// Tell the ACD the task now belongs to the agent a warm transfer
    /// consulted.
    HandOver {
        /// Agent id.
        agent: String,
    },
    /// The waiting caller pressed the queue's callback digit: make the
    /// task a callback, tell the caller, and hang up (answer with
    /// [`Ivr::step`] and what to say).
    CallMeBack,
    /// The interaction moves to this state (offered, connected, back in
    /// the queue or the flow).
    State(InteractionState),
    /// Store this recording (8 kHz samples) and answer with
    /// [`Ivr::recorded`].
    SaveRecording(Vec<i16>),
    /// Store this recording of the conversation with an agent (8 kHz
    /// samples) and note it on the timeline; the flow is not told.
    SaveConversation {
        /// The samples.
        samples: Vec<i16>,
        /// How much of it was paused (silence), ms.
        paused_ms: u64,
    },
    /// The flow ends the call, for this reason.
    Hangup(String),
    /// The flow's `send`: a message on another channel (or a fax).
    Send {
        /// Channel.
        channel: Channel,
        /// Recipient.
        to: String,
        /// Text.
        text: String,
        /// Subject (email).
        subject: Option<String>,
    },
    /// Take the call as a fax now, filed under this fax address (default:
    /// the tenant's first); the IVR is done.
    ReceiveFax(Option<String>),
    /// Listen for a fax machine's calling tone until then while the flow
    /// goes on; take the call as a fax (filed under this address) if it
    /// is heard.
    DetectFax(Instant, Option<String>),
}

/// The dial leg's progress, as the IVR needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leg {
    /// The leg could not be started (no media ports, …).
    Unavailable(String),
    /// 180/183.
    Ringing,
    /// Answered with this codec: the caller is bridged to the leg.
    Answered(&'static str),
    /// Refused, cancelled or timed out: the final status and reason.
    Failed(u16, String),
    /// The far end asks for a blind transfer (REFER) to this target.
    Refer(String),
    /// The far end hung up.
    Hangup,
}

/// What the ACD decided for a queued call, as [`Ivr::queue`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    /// The ACD could not take the call (no such queue, …): the caller
    /// waits with music until they leave, never in silence.
    Refused(String),
    /// Ring this agent's phone (`None`: the agent has none).
    Offer {
        /// Agent id.
        agent: String,
        /// Their phone's address of record.
        target: Option<String>,
    },
    /// The offer to this agent rang out: stop ringing.
    Rescind(String),
    /// The call leaves the queue for the flow (`max_wait`, `full`): the
    /// flow hears `timeout`.
    BackToFlow(String),
    /// The ACD did not let the agent who answered take the call (the
    /// offer had already rung out): the call waits again.
    AcceptFailed(String),
    /// The agent's part is over and the caller goes on, blind: to
    /// `queue:Q`, `agent:A` (the same queue, that agent only), or a
    /// number or SIP URI.
    Transfer(String),
    /// The caller may press this digit to be called back.
    CallbackDigit(char),
    /// The queue whispers to the agent who answers: its audio is being
    /// prepared (an agent who answers before it is ready waits for it,
    /// for up to [`WHISPER_WAIT`]).
    WhisperComing,
    /// What to whisper to the agent who answers, before the caller is
    /// connected (spoken audio).
    Whisper(Arc<Vec<i16>>),
    /// Play this to the waiting caller now (their position), then music
    /// again.
    Announce(Arc<Vec<i16>>),
    /// A warm transfer starts: the caller holds while the agent consults
    /// this target.
    Consult {
        /// Whom to call.
        target: String,
        /// The agent consulted, if the target is one.
        agent: Option<String>,
    },
    /// The warm transfer completes (true) or is cancelled (false).
    ConsultEnd(bool),
    /// A supervisor joins with this mode, changes it, or leaves (`None`).
    Monitor {
        /// The supervisor (an agent id).
        supervisor: String,
        /// Their phone's address of record.
        target: String,
        /// How.
        mode: Option<MonitorMode>,
    },
    /// The agent holds the caller (who hears music; the agent hears
    /// nothing), or takes them back.
    Hold(bool),
}

/// A third party in an agent's conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A supervisor listening, whispering or barging in.
    Supervisor,
    /// The party a warm transfer consults.
    Consult,
}

/// What each party sent this frame ([`Ivr::tick_all`]).
#[derive(Debug, Clone, Copy)]
pub struct Sound<'a> {
    /// The caller.
    pub heard: &'a [i16],
    /// The call's leg (a dialled party, or the agent).
    pub leg: Option<&'a [i16]>,
    /// A supervisor's leg.
    pub supervisor: Option<&'a [i16]>,
    /// A consulted party's leg.
    pub consult: Option<&'a [i16]>,
}

/// What to send each party this frame ([`Ivr::tick_all`]); `None`: nothing
/// (the leg is not up, or not part of the conversation now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frames {
    /// To the caller.
    pub caller: [i16; FRAME],
    /// To the call's leg.
    pub leg: Option<[i16; FRAME]>,
    /// To a supervisor.
    pub supervisor: Option<[i16; FRAME]>,
    /// To a consulted party.
    pub consult: Option<[i16; FRAME]>,
}

/// Where a queued call is with the ACD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Not in the ACD.
    None,
    /// Waiting, or being offered.
    Waiting,
    /// Talking to an agent.
    Connected,
}

/// The call's task in the ACD.
#[derive(Debug)]
struct AcdTask {
    queue: String,
    priority: u32,
    /// The digit that asks for a callback, if the queue offers one.
    callback_digit: Option<char>,
    /// The agent whose phone rings.
    ringing: Option<String>,
    /// The agent the caller talks to.
    agent: Option<String>,
}

/// A stored recording, as [`Ivr::recorded`] is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// The recording's id.
    pub id: String,
    /// Where the API serves it.
    pub url: String,
}

/// A clip being played.
#[derive(Debug)]
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

/// What the call is doing now.
#[derive(Debug)]
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
    /// A finished recording is being stored.
    Saving {
        duration_ms: u32,
    },
    Wait(Instant),
    /// Waiting with music on hold (in a queue, or where there is none).
    Parked,
    /// Calling out: the caller hears ringback.
    Dialing,
    /// The agent answered and hears the queue's whisper; the caller
    /// still hears music.
    Whispering(Clip),
    /// The agent answered before the whisper's audio was ready: it is
    /// awaited until then (music for the caller, silence for the agent).
    AwaitWhisper(Instant),
    /// Bridged with the other leg.
    Bridged,
}

/// A third party's leg in an agent's conversation.
#[derive(Debug)]
struct SideLeg {
    target: String,
    answered: bool,
}

/// A supervisor on the call.
#[derive(Debug)]
struct Monitoring {
    leg: SideLeg,
    supervisor: String,
    mode: MonitorMode,
}

/// A warm transfer's consultation.
#[derive(Debug)]
struct Consulting {
    leg: SideLeg,
    agent: Option<String>,
}

/// Copies up to a frame of `audio` into a frame (the rest silent).
fn framed(audio: Option<&[i16]>) -> [i16; FRAME] {
    let mut f = [0i16; FRAME];
    if let Some(a) = audio {
        let n = a.len().min(FRAME);
        f[..n].copy_from_slice(&a[..n]);
    }
    f
}

/// The next frame of looping music.
fn music(clip: &[i16], pos: &mut usize, out: &mut [i16; FRAME]) {
    for s in out.iter_mut() {
        *s = clip[*pos % clip.len()];
        *pos += 1;
    }
}

/// The next frame of ringback: 425 Hz, 1 s on, 4 s off (ITU-T E.180).
fn ringback(phase: &mut usize, out: &mut [i16; FRAME]) {
    for s in out.iter_mut() {
        let t = *phase % 40_000;
        *s = if t < 8000 {
            ((t as f32 * 2.0 * std::f32::consts::PI * 425.0 / 8000.0).sin() * 6000.0) as i16
        } else {
            0
        };
        *phase += 1;
    }
}

/// The leg being dialled or bridged.
#[derive(Debug)]
struct Dialled {
    target: String,
    transfer: bool,
    deadline: Instant,
}

/// The IVR executor of one call (see the module documentation).
#[derive(Debug)]
pub struct Ivr {
    epoch: Instant,
    queue: VecDeque<Prepared>,
    doing: Doing,
    /// An event is with the flow: its actions have not come back yet.
    flow_busy: bool,
    answered: bool,
    ended: bool,
    typeahead: String,
    digits: String,
    merger: DtmfMerger,
    hold_music: Arc<Vec<i16>>,
    moh: usize,
    ring_phase: usize,
    dialled: Option<Dialled>,
    acd: Option<AcdTask>,
    /// What the queue whispers to the agent who answers (`Some` with no
    /// audio: being prepared).
    whisper: Option<Option<Arc<Vec<i16>>>>,
    /// An announcement interrupting the music.
    announcement: Option<Clip>,
    monitor: Option<Monitoring>,
    consult: Option<Consulting>,
    /// The agent holds the caller.
    held: bool,
    /// The queue records the conversation with the agent.
    record_conversation: bool,
    /// The conversation being recorded.
    conversation: Option<Conversation>,
    /// Its recording is paused.
    recording_paused: bool,
    effects: VecDeque<Effect>,
}

/// A recording of the conversation with an agent in progress.
#[derive(Debug)]
struct Conversation {
    samples: Vec<i16>,
    paused_frames: usize,
}

/// The longest conversation recording: 30 minutes (at 8 kHz, 16-bit:
/// about 29 MB in memory); a longer conversation's recording stops there.
pub const CONVERSATION_MAX: Duration = Duration::from_secs(30 * 60);

/// How long an agent who answered waits for the whisper's audio before
/// the caller is connected without it.
pub const WHISPER_WAIT: Duration = Duration::from_secs(2);

/// Digits typed ahead of a gather that are kept.
const TYPEAHEAD: usize = 32;
/// A digit heard by two means (RFC 4733 and in-band) within this window
/// counts once.
const DTMF_MERGE_MS: u64 = 300;

impl Ivr {
    /// An IVR for a call that starts at `now`, with this music on hold.
    pub fn new(now: Instant, hold_music: Arc<Vec<i16>>) -> Ivr {
        Ivr {
            epoch: now,
            queue: VecDeque::new(),
            doing: Doing::Nothing,
            flow_busy: false,
            answered: false,
            ended: false,
            typeahead: String::new(),
            digits: String::new(),
            merger: DtmfMerger::new(DTMF_MERGE_MS),
            hold_music,
            moh: 0,
            ring_phase: 0,
            dialled: None,
            acd: None,
            whisper: None,
            announcement: None,
            monitor: None,
            held: false,
            consult: None,
            record_conversation: false,
            conversation: None,
            recording_paused: false,
            effects: VecDeque::new(),
        }
    }

    /// Records the conversation with the agent once bridged (the queue's
    /// `record`).
    pub fn record_conversation(&mut self) {
        self.record_conversation = true;
    }

    /// Pauses (or resumes) the conversation's recording: while paused
    /// it records silence. Noted on the timeline.
    pub fn pause_recording(&mut self, paused: bool) {
        if self.ended || paused == self.recording_paused {
            return;
        }
        self.recording_paused = paused;
        let at_ms = self
            .conversation
            .as_ref()
            .map(|c| (c.samples.len() / 8) as u64);
        let kind = if paused {
            EntryKind::RecordingPaused
        } else {
            EntryKind::RecordingResumed
        };
        self.note(
            kind,
            json!({"recording": self.conversation.is_some(), "at_ms": at_ms}),
        );
    }

    /// One frame of the conversation, while bridged to an agent: what the
    /// caller says and hears. Its end (the bridge's) stores it.
    fn record_frame(&mut self, heard: &[i16], hears: &[i16; FRAME]) {
        // Recorded while bridged for the queue's task (not after a
        // transfer out of the ACD).
        if !self.bridged() || self.ended || self.acd.is_none() {
            self.finish_conversation();
            return;
        }
        let c = self.conversation.get_or_insert_with(|| Conversation {
            samples: Vec::with_capacity(FRAME * 50 * 60),
            paused_frames: 0,
        });
        if self.recording_paused {
            c.samples.extend_from_slice(&[0; FRAME]);
            c.paused_frames += 1;
        } else {
            let m = plugboard_media::mix::mix(&[Some(heard), Some(hears)]);
            c.samples.extend_from_slice(&m);
        }
        if c.samples.len() >= CONVERSATION_MAX.as_millis() as usize * 8 {
            self.note(
                EntryKind::Log,
                json!({"message": "the conversation's recording stopped at its limit", "limit_s": CONVERSATION_MAX.as_secs()}),
            );
            self.record_conversation = false;
            self.finish_conversation();
        }
    }

    /// Hands a conversation's recording over to be stored.
    fn finish_conversation(&mut self) {
        if let Some(c) = self.conversation.take() {
            self.effects.push_back(Effect::SaveConversation {
                paused_ms: c.paused_frames as u64 * 20,
                samples: c.samples,
            });
            // A pause is the recording's: the next one starts unpaused.
            if self.recording_paused {
                self.recording_paused = false;
                self.note(
                    EntryKind::RecordingResumed,
                    json!({"why": "the recording ended"}),
                );
            }
        }
    }

    /// The next thing to do, in order; `None` when there is nothing.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Every digit the caller pressed, in order.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// True while the caller is bridged to the dial leg (its audio goes
    /// to the leg).
    pub fn bridged(&self) -> bool {
        matches!(self.doing, Doing::Bridged)
    }

    /// Where the call is with the ACD.
    pub fn task(&self) -> TaskPhase {
        match &self.acd {
            None => TaskPhase::None,
            Some(AcdTask { agent: Some(_), .. }) => TaskPhase::Connected,
            Some(_) => TaskPhase::Waiting,
        }
    }

    /// The call is answered: the flow hears `started`.
    pub fn answer(&mut self) {
        if !self.answered {
            self.answered = true;
            self.flow(Event::Started);
        }
    }

    /// The flow's actions for the last event, prepared: they run in order.
    pub fn step(&mut self, now: Instant, prepared: Vec<Prepared>) {
        self.flow_busy = false;
        self.queue = prepared.into();
        self.advance(now);
    }

    /// A digit, by any means; the same digit heard by a second means at
    /// once counts once.
    pub fn digit(&mut self, now: Instant, d: char, source: DtmfSource) {
        let at = now.saturating_duration_since(self.epoch).as_millis() as u64;
        if !self.merger.accept(d, source, at) {
            return;
        }
        self.digits.push(d);
        let src = match source {
            DtmfSource::Rfc4733 => "rfc4733",
            DtmfSource::SipInfo => "sip_info",
            DtmfSource::InBand => "inband",
        };
        self.note(
            EntryKind::Dtmf,
            json!({"digit": d.to_string(), "source": src}),
        );
        if let Some(t) = self.acd.as_ref()
            && t.agent.is_none()
            && t.callback_digit == Some(d)
        {
            // The caller would rather be called back than wait.
            let ringing = t.ringing.is_some();
            let queue = t.queue.clone();
            self.acd = None;
            if ringing {
                self.effects.push_back(Effect::DropLeg);
            }
            self.note(
                EntryKind::QueueLeft,
                json!({"queue": queue, "why": "callback"}),
            );
            self.doing = Doing::Nothing;
            self.queue.clear();
            self.flow_busy = true;
            self.effects.push_back(Effect::CallMeBack);
            return;
        }
        match &mut self.doing {
            Doing::Gather { .. } => self.gather_digit(now, d),
            Doing::Record {
                terminator, until, ..
            } => {
                if Some(d) == *terminator {
                    // Done; the next frame stores it.
                    *until = Some(now);
                }
            }
            _ => {
                if self.typeahead.len() < TYPEAHEAD {
                    self.typeahead.push(d);
                }
            }
        }
    }

    /// One 20 ms frame: `heard` is what the caller sent, `leg_audio` what
    /// the bridged leg sent; returns what the caller hears.
    pub fn tick(&mut self, now: Instant, heard: &[i16], leg_audio: Option<&[i16]>) -> [i16; FRAME] {
        let sound = Sound {
            heard,
            leg: leg_audio,
            supervisor: None,
            consult: None,
        };
        self.tick_all(now, sound).caller
    }

    /// One 20 ms frame with every party's audio: returns what each one
    /// hears. The caller and the agent hear each other; a supervisor is
    /// mixed in by their mode ([`mix::supervise`]); during a warm
    /// transfer's consultation the caller hears music while the agent
    /// talks to the consulted party (ringback until they answer).
    pub fn tick_all(&mut self, now: Instant, sound: Sound<'_>) -> Frames {
        let mut frame = [0i16; FRAME];
        let mut out = Frames {
            caller: frame,
            leg: None,
            supervisor: None,
            consult: None,
        };
        if !self.answered {
            return out;
        }
        // A hold is the bridge's: once the caller is anywhere else (a
        // transfer, the agent gone, back in the flow) it has lapsed.
        if self.held && !self.bridged() {
            self.held = false;
        }
        let heard = sound.heard;
        let mut finished: Option<Event> = None;
        match &mut self.doing {
            Doing::Nothing | Doing::Saving { .. } => {}
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
                beep,
                until,
                max,
                samples,
                ..
            } => {
                if let Some(b) = beep {
                    // Recording starts with the frame after the beep.
                    if !b.fill(&mut frame) {
                        *beep = None;
                    }
                } else {
                    let until = *until.get_or_insert(now + *max);
                    // The limit counts media, not wall time (a late frame
                    // must not lengthen the recording); the terminator
                    // sets `until`.
                    let limit = (max.as_millis() as usize) * 8;
                    let room = limit.saturating_sub(samples.len());
                    samples.extend_from_slice(&heard[..heard.len().min(room)]);
                    if now >= until || samples.len() >= limit {
                        self.finish_record();
                    }
                }
            }
            Doing::Wait(until) => {
                if now >= *until {
                    self.doing = Doing::Nothing;
                }
            }
            Doing::Parked => match self.announcement.as_mut() {
                Some(a) => {
                    if !a.fill(&mut frame) {
                        self.announcement = None;
                    }
                }
                None => music(&self.hold_music, &mut self.moh, &mut frame),
            },
            Doing::AwaitWhisper(until) => {
                music(&self.hold_music, &mut self.moh, &mut frame);
                out.leg = Some([0; FRAME]);
                if now >= *until {
                    self.note(
                        EntryKind::Whisper,
                        json!({"skipped": "its speech was not ready"}),
                    );
                    self.doing = Doing::Bridged;
                }
            }
            Doing::Whispering(clip) => {
                music(&self.hold_music, &mut self.moh, &mut frame);
                let mut w = [0i16; FRAME];
                let more = clip.fill(&mut w);
                out.leg = Some(w);
                if !more {
                    self.doing = Doing::Bridged;
                }
            }
            Doing::Dialing => {
                ringback(&mut self.ring_phase, &mut frame);
                if let Some(d) = self.dialled.as_mut()
                    && now > d.deadline
                {
                    // Give up: CANCEL; the 487 comes back as no-answer.
                    d.deadline = now + Duration::from_secs(3600);
                    self.effects.push_back(Effect::CancelLeg);
                }
            }
            Doing::Bridged => {
                let supervised = self
                    .monitor
                    .as_ref()
                    .filter(|m| m.leg.answered && self.consult.is_none())
                    .map(|m| m.mode);
                if let Some(c) = &self.consult {
                    // The agent consults; the caller holds.
                    music(&self.hold_music, &mut self.moh, &mut frame);
                    if c.leg.answered {
                        out.leg = Some(framed(sound.consult));
                        out.consult = Some(framed(sound.leg));
                    } else {
                        let mut ring = [0i16; FRAME];
                        ringback(&mut self.ring_phase, &mut ring);
                        out.leg = Some(ring);
                    }
                } else if self.held {
                    music(&self.hold_music, &mut self.moh, &mut frame);
                    out.leg = Some([0; FRAME]);
                } else if let Some(mode) = supervised {
                    let h = mix::supervise(mode, Some(heard), sound.leg, sound.supervisor);
                    frame = h.customer;
                    out.leg = Some(h.agent);
                    out.supervisor = Some(h.supervisor);
                } else {
                    frame = framed(sound.leg);
                    out.leg = Some(framed(Some(heard)));
                }
            }
        }
        if self.record_conversation && (self.bridged() || self.conversation.is_some()) {
            self.record_frame(heard, &frame);
        }
        if let Some(ev) = finished {
            self.flow(ev);
        }
        if matches!(self.doing, Doing::Nothing) && !self.flow_busy {
            self.advance(now);
        }
        out.caller = frame;
        out
    }

    /// The dial leg's (or the rung agent's leg's) progress.
    pub fn leg(&mut self, now: Instant, news: Leg) {
        if self.acd.is_some() {
            self.agent_leg(now, news);
            return;
        }
        let Some(d) = self.dialled.as_ref() else {
            return;
        };
        let target = d.target.clone();
        match news {
            Leg::Ringing => self.note(EntryKind::DialRinging, json!({"target": target})),
            Leg::Answered(codec) => {
                self.note(
                    EntryKind::DialAnswered,
                    json!({"target": target, "codec": codec}),
                );
                self.doing = Doing::Bridged;
            }
            Leg::Unavailable(reason) => {
                self.dialled = None;
                self.note(
                    EntryKind::DialFailed,
                    json!({"target": target, "reason": reason}),
                );
                self.flow(Event::DialResult {
                    outcome: "failed".into(),
                });
            }
            Leg::Failed(status, reason) => {
                self.dialled = None;
                let outcome = match status {
                    486 | 600 | 603 => "busy",
                    408 | 480 | 487 => "no-answer",
                    _ => "failed",
                };
                self.note(
                    EntryKind::DialFailed,
                    json!({"target": target, "status": status, "reason": reason, "outcome": outcome}),
                );
                self.flow(Event::DialResult {
                    outcome: outcome.into(),
                });
            }
            Leg::Refer(to) => {
                // The agent passes the caller on: the agent's leg is left
                // to end and the caller is connected to the new target.
                self.dialled = None;
                self.note(EntryKind::Refer, json!({"from": target, "target": to}));
                self.dial(now, to, None, 30, true);
            }
            Leg::Hangup => {
                let transfer = self.dialled.take().is_some_and(|d| d.transfer);
                self.note(
                    EntryKind::DialEnded,
                    json!({"target": target, "by": "far end"}),
                );
                if transfer {
                    self.hang_up("transferred call ended");
                } else {
                    self.flow(Event::DialResult {
                        outcome: "completed".into(),
                    });
                }
            }
        }
    }

    /// What the ACD decided for the queued call.
    pub fn queue(&mut self, now: Instant, news: Queue) {
        if self.ended {
            return;
        }
        let Some(t) = self.acd.as_mut() else {
            return;
        };
        let queue = t.queue.clone();
        match news {
            Queue::Refused(why) => {
                self.acd = None;
                self.note(
                    EntryKind::Parked,
                    json!({"queue": queue, "note": format!("waiting with music on hold: {why}")}),
                );
            }
            Queue::Offer { agent, target } => {
                if t.agent.is_some() {
                    return;
                }
                match target {
                    Some(target) => {
                        t.ringing = Some(agent.clone());
                        self.note(
                            EntryKind::Offered,
                            json!({"queue": queue, "agent": agent, "target": target}),
                        );
                        self.effects
                            .push_back(Effect::State(InteractionState::Offered));
                        self.effects.push_back(Effect::Ring { agent, target });
                    }
                    None => {
                        self.note(
                            EntryKind::AgentMissed,
                            json!({"queue": queue, "agent": agent, "reason": "the agent has no SIP phone"}),
                        );
                        self.effects.push_back(Effect::Missed { agent });
                    }
                }
            }
            Queue::Rescind(agent) => {
                if t.ringing.as_deref() == Some(agent.as_str()) {
                    t.ringing = None;
                    self.note(
                        EntryKind::AgentMissed,
                        json!({"queue": queue, "agent": agent, "reason": "rang out"}),
                    );
                    self.effects.push_back(Effect::DropLeg);
                    self.effects
                        .push_back(Effect::State(InteractionState::Queued));
                }
            }
            Queue::BackToFlow(why) => {
                let ringing = t.ringing.is_some();
                self.acd = None;
                if ringing {
                    self.effects.push_back(Effect::DropLeg);
                }
                self.note(EntryKind::QueueLeft, json!({"queue": queue, "why": why}));
                self.effects
                    .push_back(Effect::State(InteractionState::InFlow));
                self.flow(Event::Timeout);
            }
            Queue::CallbackDigit(d) => t.callback_digit = Some(d),
            Queue::WhisperComing => self.whisper = Some(None),
            Queue::Whisper(audio) => {
                self.whisper = Some(Some(audio.clone()));
                if matches!(self.doing, Doing::AwaitWhisper(_)) {
                    self.start_whisper(audio);
                }
            }
            Queue::Announce(audio) => {
                if t.agent.is_none() {
                    self.note(
                        EntryKind::Position,
                        json!({"queue": queue, "ms": audio.len() / 8}),
                    );
                    self.announcement = Some(Clip::new(audio));
                }
            }
            Queue::Consult { target, agent } => {
                if t.agent.is_none() || self.consult.is_some() || !self.bridged() {
                    self.note(
                        EntryKind::Consult,
                        json!({"event": "refused", "target": target, "why": "no conversation, or a consultation already"}),
                    );
                    return;
                }
                self.note(
                    EntryKind::Consult,
                    json!({"event": "started", "target": target, "agent": agent}),
                );
                self.consult = Some(Consulting {
                    leg: SideLeg {
                        target: target.clone(),
                        answered: false,
                    },
                    agent,
                });
                self.effects.push_back(Effect::RingSide {
                    side: Side::Consult,
                    target,
                });
            }
            Queue::Hold(on) => {
                if t.agent.is_none() || !self.bridged() || self.held == on {
                    return;
                }
                self.held = on;
                self.note(
                    if on {
                        EntryKind::Hold
                    } else {
                        EntryKind::Resume
                    },
                    json!({"by": "agent"}),
                );
            }
            Queue::ConsultEnd(true) => self.complete_consult(now),
            Queue::ConsultEnd(false) => {
                if let Some(c) = self.consult.take() {
                    self.note(
                        EntryKind::Consult,
                        json!({"event": "cancelled", "target": c.leg.target}),
                    );
                    self.effects.push_back(Effect::DropSide(Side::Consult));
                }
            }
            Queue::Monitor {
                supervisor,
                target,
                mode,
            } => self.monitor(supervisor, target, mode),
            Queue::Transfer(target) => {
                let Some(agent) = t.agent.take() else {
                    return;
                };
                // The priority stays; the skills asked for were for the
                // first queue: the new queue (or agent) decides.
                let priority = t.priority;
                self.acd = None;
                self.end_sides("the call was transferred");
                self.effects.push_back(Effect::DropLeg);
                self.note(
                    EntryKind::Transfer,
                    json!({"from": agent, "target": target}),
                );
                self.doing = Doing::Nothing;
                if let Some(q) = target.strip_prefix("queue:") {
                    self.effects
                        .push_back(Effect::State(InteractionState::Queued));
                    self.enqueue(q.to_string(), priority, Vec::new(), None);
                } else if let Some(a) = target.strip_prefix("agent:") {
                    self.effects
                        .push_back(Effect::State(InteractionState::Queued));
                    self.enqueue(queue, priority, Vec::new(), Some(a.to_string()));
                } else {
                    self.dial(now, target, None, 30, true);
                }
            }
            Queue::AcceptFailed(why) => {
                if let Some(agent) = t.agent.take() {
                    t.ringing = None;
                    self.doing = Doing::Parked;
                    self.note(
                        EntryKind::AgentMissed,
                        json!({"queue": queue, "agent": agent, "reason": why}),
                    );
                    self.effects.push_back(Effect::DropLeg);
                    self.effects
                        .push_back(Effect::State(InteractionState::Queued));
                }
            }
        }
    }

    /// The rung agent's leg, or the agent's in conversation.
    fn agent_leg(&mut self, now: Instant, news: Leg) {
        let Some(t) = self.acd.as_mut() else {
            return;
        };
        let queue = t.queue.clone();
        match (news, t.ringing.clone(), t.agent.clone()) {
            (Leg::Ringing, Some(agent), None) => {
                self.note(EntryKind::DialRinging, json!({"agent": agent}));
            }
            (Leg::Answered(codec), Some(agent), None) => {
                t.ringing = None;
                t.agent = Some(agent.clone());
                self.note(
                    EntryKind::AgentConnected,
                    json!({"queue": queue, "agent": agent, "codec": codec}),
                );
                // The queue's whisper first (the caller hears music until
                // it ends), then the bridge.
                match self.whisper.clone() {
                    Some(Some(w)) => self.start_whisper(w),
                    Some(None) => self.doing = Doing::AwaitWhisper(now + WHISPER_WAIT),
                    None => self.doing = Doing::Bridged,
                }
                self.effects
                    .push_back(Effect::State(InteractionState::Connected));
                self.effects.push_back(Effect::Accept {
                    agent: agent.clone(),
                });
                // The flow learns who took the call; what it answers runs
                // when the agent hangs up (a survey, say).
                self.notify_flow(Event::AgentConnected { agent });
            }
            (Leg::Unavailable(reason), Some(agent), None) => {
                t.ringing = None;
                self.note(
                    EntryKind::AgentMissed,
                    json!({"queue": queue, "agent": agent, "reason": reason}),
                );
                self.effects
                    .push_back(Effect::State(InteractionState::Queued));
                self.effects.push_back(Effect::Missed { agent });
            }
            (Leg::Failed(status, reason), Some(agent), None) => {
                t.ringing = None;
                self.note(
                    EntryKind::AgentMissed,
                    json!({"queue": queue, "agent": agent, "status": status, "reason": reason}),
                );
                self.effects
                    .push_back(Effect::State(InteractionState::Queued));
                self.effects.push_back(Effect::Missed { agent });
            }
            (Leg::Hangup, _, Some(_)) if self.consult.as_ref().is_some_and(|c| c.leg.answered) => {
                // The agent hung up on a consultation that was answered:
                // the transfer completes (as with an attended transfer
                // on a desk phone).
                self.complete_consult(now);
            }
            (Leg::Hangup, _, Some(agent)) => {
                self.acd = None;
                self.end_sides("the agent hung up");
                self.note(EntryKind::DialEnded, json!({"agent": agent, "by": "agent"}));
                self.effects.push_back(Effect::TaskDone);
                self.doing = Doing::Nothing;
                if self.queue.is_empty() && !self.flow_busy {
                    self.hang_up("the agent hung up");
                } else {
                    self.advance(now);
                }
            }
            (Leg::Refer(to), _, Some(agent)) => {
                // The agent passes the caller on (blind): their part is
                // done, and the caller is connected to the new target.
                self.acd = None;
                self.end_sides("the agent transferred the call");
                self.note(EntryKind::Refer, json!({"from": agent, "target": to}));
                self.effects.push_back(Effect::TaskDone);
                self.dial(now, to, None, 30, true);
            }
            // News of a leg given up (rescinded) or of another phase.
            _ => {}
        }
    }

    /// The agent hears the whisper, then the caller.
    fn start_whisper(&mut self, audio: Arc<Vec<i16>>) {
        let agent = self.acd.as_ref().and_then(|t| t.agent.clone());
        self.note(
            EntryKind::Whisper,
            json!({"agent": agent, "ms": audio.len() / 8}),
        );
        self.doing = Doing::Whispering(Clip::new(audio));
    }

    /// A supervisor joins, changes mode or leaves.
    fn monitor(&mut self, supervisor: String, target: String, mode: Option<MonitorMode>) {
        let talking = self.acd.as_ref().is_some_and(|t| t.agent.is_some());
        match (mode, self.monitor.as_mut()) {
            (None, Some(_)) => self.end_monitor("the supervisor left"),
            (None, None) => {}
            (Some(_), _) if !talking => {
                self.note(
                    EntryKind::Monitor,
                    json!({"event": "refused", "supervisor": supervisor, "why": "no conversation"}),
                );
            }
            (Some(mode), Some(m)) if m.supervisor == supervisor => {
                m.mode = mode;
                self.note(
                    EntryKind::Monitor,
                    json!({"event": "mode", "supervisor": supervisor, "mode": mode}),
                );
            }
            (Some(mode), _) => {
                // Another supervisor takes over.
                self.end_monitor("another supervisor joined");
                self.note(
                    EntryKind::Monitor,
                    json!({"event": "calling", "supervisor": supervisor, "mode": mode, "target": target}),
                );
                self.monitor = Some(Monitoring {
                    leg: SideLeg {
                        target: target.clone(),
                        answered: false,
                    },
                    supervisor,
                    mode,
                });
                self.effects.push_back(Effect::RingSide {
                    side: Side::Supervisor,
                    target,
                });
            }
        }
    }

    fn end_monitor(&mut self, why: &str) {
        if let Some(m) = self.monitor.take() {
            self.note(
                EntryKind::Monitor,
                json!({"event": "ended", "supervisor": m.supervisor, "why": why}),
            );
            self.effects.push_back(Effect::DropSide(Side::Supervisor));
        }
    }

    /// The agent's conversation ends: third parties leave with it.
    fn end_sides(&mut self, why: &str) {
        self.end_monitor(why);
        if let Some(c) = self.consult.take() {
            self.note(
                EntryKind::Consult,
                json!({"event": "cancelled", "target": c.leg.target, "why": why}),
            );
            self.effects.push_back(Effect::DropSide(Side::Consult));
        }
    }

    /// The warm transfer completes: the consulted party has the caller.
    fn complete_consult(&mut self, now: Instant) {
        let Some(c) = self.consult.take() else {
            return;
        };
        // The consulted party takes the caller off hold.
        self.held = false;
        if !c.leg.answered {
            self.note(
                EntryKind::Consult,
                json!({"event": "not_completed", "target": c.leg.target, "why": "not answered yet"}),
            );
            self.consult = Some(c);
            return;
        }
        self.end_monitor("the call was transferred");
        let from = self.acd.as_ref().and_then(|t| t.agent.clone());
        self.note(
            EntryKind::Consult,
            json!({"event": "completed", "target": c.leg.target, "from": from, "agent": c.agent}),
        );
        self.note(
            EntryKind::Transfer,
            json!({"from": from, "target": c.leg.target, "warm": true}),
        );
        self.effects.push_back(Effect::PromoteConsult);
        self.doing = Doing::Bridged;
        match (c.agent, self.acd.as_mut()) {
            (Some(agent), Some(t)) => {
                // The consulted agent has the task (and its data) now.
                t.agent = Some(agent.clone());
                self.effects.push_back(Effect::HandOver { agent });
            }
            _ => {
                // Out of the ACD: the call ends with the new party.
                self.acd = None;
                self.effects.push_back(Effect::TaskDone);
                self.dialled = Some(Dialled {
                    target: c.leg.target,
                    transfer: true,
                    deadline: now + Duration::from_secs(3600),
                });
            }
        }
    }

    /// A third party's leg: a supervisor's, or a consulted party's.
    pub fn side_leg(&mut self, side: Side, news: Leg) {
        match side {
            Side::Supervisor => {
                let Some(m) = self.monitor.as_mut() else {
                    return;
                };
                let supervisor = m.supervisor.clone();
                match news {
                    Leg::Answered(_) => {
                        m.leg.answered = true;
                        let mode = m.mode;
                        self.note(
                            EntryKind::Monitor,
                            json!({"event": "joined", "supervisor": supervisor, "mode": mode}),
                        );
                    }
                    Leg::Unavailable(why) | Leg::Failed(_, why) => {
                        self.monitor = None;
                        self.note(
                            EntryKind::Monitor,
                            json!({"event": "failed", "supervisor": supervisor, "why": why}),
                        );
                    }
                    Leg::Hangup => {
                        self.monitor = None;
                        self.note(
                            EntryKind::Monitor,
                            json!({"event": "ended", "supervisor": supervisor, "why": "the supervisor hung up"}),
                        );
                    }
                    Leg::Ringing | Leg::Refer(_) => {}
                }
            }
            Side::Consult => {
                let Some(c) = self.consult.as_mut() else {
                    return;
                };
                let target = c.leg.target.clone();
                match news {
                    Leg::Answered(_) => {
                        c.leg.answered = true;
                        self.note(
                            EntryKind::Consult,
                            json!({"event": "answered", "target": target}),
                        );
                    }
                    // The agent has the caller back.
                    Leg::Unavailable(why) | Leg::Failed(_, why) => {
                        self.consult = None;
                        self.note(
                            EntryKind::Consult,
                            json!({"event": "failed", "target": target, "why": why}),
                        );
                    }
                    Leg::Hangup => {
                        self.consult = None;
                        self.note(
                            EntryKind::Consult,
                            json!({"event": "ended", "target": target, "by": "consulted party"}),
                        );
                    }
                    Leg::Ringing | Leg::Refer(_) => {}
                }
            }
        }
    }

    /// Tells the flow an event without stopping what the call does (its
    /// answer is queued).
    fn notify_flow(&mut self, event: Event) {
        if self.ended || self.flow_busy {
            return;
        }
        self.flow_busy = true;
        self.effects.push_back(Effect::Flow(event));
    }

    /// The recording asked for by [`Effect::SaveRecording`] was stored
    /// (or could not be): the flow hears `recorded` (or `timeout`).
    pub fn recorded(&mut self, saved: Result<Saved, String>) {
        let duration_ms = match self.doing {
            Doing::Saving { duration_ms } => {
                self.doing = Doing::Nothing;
                duration_ms
            }
            _ => 0,
        };
        match saved {
            Ok(Saved { id, url }) => {
                self.note(
                    EntryKind::Recording,
                    json!({"id": id, "duration_ms": duration_ms, "url": url}),
                );
                self.flow(Event::Recorded { id, duration_ms });
            }
            Err(e) => {
                self.note(EntryKind::RecordingFailed, json!({"error": e}));
                self.flow(Event::Timeout);
            }
        }
    }

    /// The call is over (for any reason): nothing more runs. A recording
    /// in progress is handed over to be stored ([`Effect::SaveRecording`]).
    pub fn end(&mut self) {
        self.ended = true;
        self.queue.clear();
        if matches!(self.doing, Doing::Record { .. }) {
            self.finish_record();
        }
        self.finish_conversation();
    }

    fn note(&mut self, kind: EntryKind, data: Value) {
        self.effects.push_back(Effect::Note(kind, data));
    }

    /// Hands an event to the flow; what was queued or going on stops.
    fn flow(&mut self, event: Event) {
        if self.ended || self.flow_busy {
            return;
        }
        self.queue.clear();
        self.doing = Doing::Nothing;
        self.flow_busy = true;
        self.effects.push_back(Effect::Flow(event));
    }

    fn hang_up(&mut self, why: &str) {
        if !self.ended {
            self.ended = true;
            self.effects.push_back(Effect::Hangup(why.to_string()));
        }
    }

    /// Starts the next queued action when nothing is in progress.
    fn advance(&mut self, now: Instant) {
        while matches!(self.doing, Doing::Nothing) && !self.ended {
            let Some(next) = self.queue.pop_front() else {
                if !self.flow_busy && self.answered {
                    // The flow asks for nothing more: end the call rather
                    // than leave the caller in silence.
                    self.hang_up("flow finished");
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
                    self.doing = Doing::Gather {
                        max: max_digits.clamp(1, 64) as usize,
                        terminator: terminator.and_then(|t| t.chars().next()),
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
                        self.gather_digit(now, d);
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
                    self.doing =
                        Doing::Wait(now + Duration::from_millis(u64::from(ms.min(600_000))));
                }
                Action::Enqueue {
                    queue,
                    priority,
                    skills,
                } => self.enqueue(queue, priority, skills, None),
                Action::Hangup => self.hang_up("flow hung up"),
                Action::Transfer { target } if target.starts_with("queue:") => {
                    let queue = target.trim_start_matches("queue:").to_string();
                    self.enqueue(queue, 0, Vec::new(), None);
                }
                Action::Transfer { target } => self.dial(now, target, None, 30, true),
                Action::Dial {
                    target,
                    caller_id,
                    timeout_secs,
                } => self.dial(now, target, caller_id, timeout_secs, false),
                Action::SetAttribute { .. } => {}
                Action::Send {
                    channel,
                    to,
                    text,
                    subject,
                } => self.effects.push_back(Effect::Send {
                    channel,
                    to,
                    text,
                    subject,
                }),
                Action::ReceiveFax {
                    detect_ms: None,
                    address,
                } => {
                    // The call is a fax terminal's from here on.
                    self.ended = true;
                    self.queue.clear();
                    self.effects.push_back(Effect::ReceiveFax(address));
                }
                Action::ReceiveFax {
                    detect_ms: Some(ms),
                    address,
                } => {
                    let until = now + Duration::from_millis(u64::from(ms.min(60_000)));
                    self.effects.push_back(Effect::DetectFax(until, address));
                }
                other => {
                    let kind = serde_json::to_value(&other).unwrap_or_default();
                    self.note(
                        EntryKind::IgnoredAction,
                        json!({"action": kind, "reason": "not a voice action"}),
                    );
                }
            }
        }
    }

    /// Calls out; the caller hears ringback until the leg answers or the
    /// ring time passes.
    fn dial(
        &mut self,
        now: Instant,
        target: String,
        caller_id: Option<String>,
        timeout_secs: u32,
        transfer: bool,
    ) {
        self.dialled = Some(Dialled {
            target: target.clone(),
            transfer,
            deadline: now + Duration::from_secs(u64::from(timeout_secs.clamp(5, 120))),
        });
        self.doing = Doing::Dialing;
        self.effects.push_back(Effect::Dial {
            target,
            caller_id,
            transfer,
        });
    }

    /// Waits in an ACD queue with music; the ACD's decisions come back
    /// through [`Ivr::queue`].
    fn enqueue(
        &mut self,
        queue: String,
        priority: u32,
        skills: Vec<String>,
        agent: Option<String>,
    ) {
        self.note(
            EntryKind::Queued,
            json!({"queue": queue, "priority": priority, "skills": skills, "agent": agent}),
        );
        self.acd = Some(AcdTask {
            queue: queue.clone(),
            priority,
            callback_digit: None,
            ringing: None,
            agent: None,
        });
        // The new queue tells whether it whispers and records.
        self.whisper = None;
        self.record_conversation = false;
        self.announcement = None;
        self.doing = Doing::Parked;
        self.effects.push_back(Effect::Enqueue {
            queue,
            priority,
            skills,
            agent,
        });
    }

    fn gather_digit(&mut self, now: Instant, d: char) {
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
            self.flow(ev);
            return;
        }
        digits.push(d);
        if digits.len() >= *max {
            let ev = Event::Digits {
                digits: digits.clone(),
                terminated: false,
            };
            self.flow(ev);
            return;
        }
        *deadline = Some(now + *inter_timeout);
    }

    /// Hands the recording over to be stored; the flow waits for it.
    fn finish_record(&mut self) {
        if let Doing::Record { samples, .. } = &mut self.doing {
            let samples = std::mem::take(samples);
            self.doing = Doing::Saving {
                duration_ms: (samples.len() / 8) as u32,
            };
            self.effects.push_back(Effect::SaveRecording(samples));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The IVR in virtual time: every frame is 20 ms later than the last,
    //! whatever the machine does.

    use super::*;

    const PTIME: Duration = Duration::from_millis(20);

    /// An answered call's IVR and its virtual clock.
    struct Sim {
        ivr: Ivr,
        now: Instant,
        t0: Instant,
    }

    impl Sim {
        /// Answered; the flow has been asked for `started`.
        fn new() -> Sim {
            let t0 = Instant::now();
            let mut ivr = Ivr::new(t0, Arc::new(vec![1000; 16_000]));
            ivr.answer();
            let mut sim = Sim { ivr, now: t0, t0 };
            assert_eq!(sim.effects(), vec![Effect::Flow(Event::Started)]);
            sim
        }

        fn effects(&mut self) -> Vec<Effect> {
            std::iter::from_fn(|| self.ivr.poll_effect()).collect()
        }

        /// Effects other than timeline entries.
        fn acts(&mut self) -> Vec<Effect> {
            let mut e = self.effects();
            e.retain(|e| !matches!(e, Effect::Note(..)));
            e
        }

        fn step(&mut self, actions: Vec<Prepared>) {
            self.ivr.step(self.now, actions);
        }

        /// One frame of the caller sending `heard`; returns what it hears.
        fn frame_with(&mut self, heard: i16, leg: Option<&[i16]>) -> [i16; FRAME] {
            let out = self.ivr.tick(self.now, &[heard; FRAME], leg);
            self.now += PTIME;
            out
        }

        fn frame(&mut self) -> [i16; FRAME] {
            self.frame_with(0, None)
        }

        /// Frames until an effect other than a note; how many it took.
        fn frames_until_act(&mut self, limit: usize) -> (usize, Vec<Effect>) {
            for n in 1..=limit {
                self.frame();
                let acts = self.acts();
                if !acts.is_empty() {
                    return (n, acts);
                }
            }
            panic!("nothing happened in {limit} frames");
        }

        fn digit(&mut self, d: char) {
            self.ivr.digit(self.now, d, DtmfSource::Rfc4733);
        }

        fn ms(&self) -> u128 {
            (self.now - self.t0).as_millis()
        }
    }

    fn clip(frames: usize, level: i16) -> Option<Arc<Vec<i16>>> {
        Some(Arc::new(vec![level; frames * FRAME]))
    }

    fn say(frames: usize) -> Prepared {
        Prepared {
            action: Action::Say {
                text: "hello".into(),
                voice: None,
                language: None,
            },
            audio: clip(frames, 500),
        }
    }

    fn gather(max: u32, prompt_frames: usize, timeout_ms: u32, inter_ms: u32) -> Prepared {
        Prepared {
            action: Action::Gather {
                prompt: None,
                max_digits: max,
                terminator: Some("#".into()),
                timeout_ms,
                inter_digit_timeout_ms: inter_ms,
                speech: false,
            },
            audio: (prompt_frames > 0)
                .then(|| clip(prompt_frames, 700))
                .flatten(),
        }
    }

    fn action(action: Action) -> Prepared {
        Prepared {
            action,
            audio: None,
        }
    }

    fn digits(d: &str, terminated: bool) -> Vec<Effect> {
        vec![Effect::Flow(Event::Digits {
            digits: d.into(),
            terminated,
        })]
    }

    #[test]
    fn plays_the_prompt_then_times_out_on_the_first_digit() {
        let mut sim = Sim::new();
        sim.step(vec![say(3), gather(4, 2, 1000, 500)]);
        // Three frames of speech, two of the prompt, then silence.
        for _ in 0..3 {
            assert_eq!(sim.frame(), [500; FRAME]);
        }
        for _ in 0..2 {
            assert_eq!(sim.frame(), [700; FRAME]);
        }
        let prompt_end = sim.ms();
        let (_, acts) = sim.frames_until_act(200);
        assert_eq!(acts, vec![Effect::Flow(Event::Timeout)]);
        // The first-digit timeout runs from the end of the prompt.
        let waited = sim.ms() - prompt_end;
        assert!(
            (1000..=1040).contains(&waited),
            "timed out after {waited} ms"
        );
        // Nothing more is played while the flow decides.
        assert_eq!(sim.frame(), [0; FRAME]);
        assert!(sim.acts().is_empty());
    }

    #[test]
    fn a_digit_barges_in_and_the_inter_digit_timeout_ends_the_gather() {
        let mut sim = Sim::new();
        sim.step(vec![gather(4, 100, 5000, 600)]);
        for _ in 0..5 {
            assert_eq!(sim.frame(), [700; FRAME]);
        }
        sim.digit('1');
        let typed = sim.ms();
        // The prompt stops at once.
        assert_eq!(sim.frame(), [0; FRAME]);
        let (_, acts) = sim.frames_until_act(100);
        assert_eq!(acts, digits("1", false));
        let waited = sim.ms() - typed;
        assert!((600..=640).contains(&waited), "ended after {waited} ms");
    }

    #[test]
    fn the_terminator_and_the_maximum_end_a_gather() {
        let mut sim = Sim::new();
        sim.step(vec![gather(4, 0, 5000, 3000)]);
        for d in ['4', '2', '#'] {
            sim.frame();
            sim.digit(d);
        }
        assert_eq!(sim.acts(), digits("42", true));
        sim.step(vec![gather(3, 0, 5000, 3000)]);
        for d in ['7', '8', '9'] {
            sim.frame();
            sim.digit(d);
        }
        assert_eq!(sim.acts(), digits("789", false));
        assert_eq!(sim.ivr.digits(), "42#789");
    }

    #[test]
    fn digits_typed_during_a_prompt_count_for_the_next_gather() {
        let mut sim = Sim::new();
        sim.step(vec![say(50), gather(2, 50, 5000, 3000)]);
        sim.frame();
        sim.digit('3');
        sim.frame();
        sim.digit('1');
        // Still speaking: type-ahead is kept, not acted on.
        assert!(sim.acts().is_empty());
        assert_eq!(sim.frame(), [500; FRAME]);
        // The gather starts with both digits: it is complete at once.
        let (n, acts) = sim.frames_until_act(100);
        assert_eq!(acts, digits("31", false));
        // Frames 4 to 50 are speech; the gather starts as it ends.
        assert_eq!(n, 47, "the gather started when the speech ended");
    }

    #[test]
    fn a_digit_heard_twice_counts_once() {
        let mut sim = Sim::new();
        sim.step(vec![gather(5, 0, 5000, 3000)]);
        sim.ivr.digit(sim.now, '5', DtmfSource::Rfc4733);
        sim.frame();
        sim.ivr.digit(sim.now, '5', DtmfSource::InBand);
        assert_eq!(sim.ivr.digits(), "5");
        // The same key again, later, is a new press.
        for _ in 0..20 {
            sim.frame();
        }
        sim.ivr.digit(sim.now, '5', DtmfSource::InBand);
        assert_eq!(sim.ivr.digits(), "55");
    }

    #[test]
    fn a_recording_keeps_what_was_heard_until_the_terminator() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Record {
            max_secs: 60,
            beep: true,
            terminator: None,
        })]);
        // The beep first: what the caller says over it is not recorded.
        let mut beep_frames = 0;
        while sim.frame_with(9, None) != [0; FRAME] {
            beep_frames += 1;
        }
        assert!(beep_frames > 0);
        for _ in 0..49 {
            sim.frame_with(42, None);
        }
        sim.digit('#');
        assert!(sim.acts().is_empty());
        sim.frame_with(42, None);
        let acts = sim.acts();
        let [Effect::SaveRecording(samples)] = acts.as_slice() else {
            panic!("expected a recording, got {acts:?}");
        };
        // From the frame after the beep: one frame of 9 (the loop's
        // last), 49 of 42, and the frame the terminator ended.
        assert_eq!(samples.len(), 51 * FRAME);
        assert!(samples[..FRAME].iter().all(|s| *s == 9));
        assert!(samples[FRAME..].iter().all(|s| *s == 42));
        // The flow waits for the store, then hears `recorded`.
        assert!(sim.frames_until_act_or_none(10).is_empty());
        sim.ivr.recorded(Ok(Saved {
            id: "r1".into(),
            url: "/r1".into(),
        }));
        let effects = sim.effects();
        assert!(
            matches!(&effects[0], Effect::Note(EntryKind::Recording, d) if d["duration_ms"] == 1020)
        );
        assert_eq!(
            effects[1],
            Effect::Flow(Event::Recorded {
                id: "r1".into(),
                duration_ms: 1020
            })
        );
    }

    #[test]
    fn a_recording_stops_at_its_maximum_length_of_media() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Record {
            max_secs: 1,
            beep: false,
            terminator: None,
        })]);
        let (n, acts) = sim.frames_until_act(100);
        assert_eq!(n, 50);
        let [Effect::SaveRecording(samples)] = acts.as_slice() else {
            panic!("expected a recording, got {acts:?}");
        };
        assert_eq!(samples.len(), 8000);
        // A store failure tells the flow `timeout`.
        sim.ivr.recorded(Err("disk full".into()));
        assert_eq!(sim.acts(), vec![Effect::Flow(Event::Timeout)]);
    }

    #[test]
    fn a_call_ending_while_recording_stores_it_and_asks_nothing_more() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Record {
            max_secs: 60,
            beep: false,
            terminator: None,
        })]);
        for _ in 0..10 {
            sim.frame_with(5, None);
        }
        sim.ivr.end();
        let acts = sim.acts();
        assert!(matches!(acts.as_slice(), [Effect::SaveRecording(s)] if s.len() == 10 * FRAME));
        sim.ivr.recorded(Ok(Saved {
            id: "r".into(),
            url: "/r".into(),
        }));
        assert!(sim.acts().is_empty(), "no event after the end");
    }

    #[test]
    fn a_wait_then_the_end_of_the_actions_hangs_up() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Wait { ms: 200 })]);
        let (n, acts) = sim.frames_until_act(100);
        assert_eq!(acts, vec![Effect::Hangup("flow finished".into())]);
        assert_eq!(n, 11, "the wait lasted 200 ms");
        // Ended: nothing else runs.
        sim.step(vec![say(5)]);
        assert_eq!(sim.frame(), [0; FRAME]);
    }

    #[test]
    fn a_hangup_action_ends_the_call_and_later_actions_do_not_run() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Hangup), say(5)]);
        assert_eq!(sim.acts(), vec![Effect::Hangup("flow hung up".into())]);
        assert_eq!(sim.frame(), [0; FRAME]);
    }

    /// An answered call the flow put in queue `sales`.
    fn queued() -> Sim {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Enqueue {
            queue: "sales".into(),
            priority: 1,
            skills: vec!["lt".into()],
        })]);
        assert_eq!(
            sim.acts(),
            vec![Effect::Enqueue {
                queue: "sales".into(),
                priority: 1,
                skills: vec!["lt".into()],
                agent: None
            }]
        );
        assert_eq!(sim.ivr.task(), TaskPhase::Waiting);
        sim
    }

    fn offer(agent: &str) -> Queue {
        Queue::Offer {
            agent: agent.into(),
            target: Some(format!("sip:{agent}@acme")),
        }
    }

    fn ring(agent: &str) -> Vec<Effect> {
        vec![
            Effect::State(InteractionState::Offered),
            Effect::Ring {
                agent: agent.into(),
                target: format!("sip:{agent}@acme"),
            },
        ]
    }

    #[test]
    fn a_queued_caller_hears_music_until_the_flow_moves_it() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Enqueue {
            queue: "sales".into(),
            priority: 1,
            skills: vec![],
        })]);
        let effects = sim.effects();
        assert!(
            matches!(&effects[..], [Effect::Note(EntryKind::Queued, d), Effect::Enqueue { .. }] if d["queue"] == "sales"),
            "{effects:?}"
        );
        for _ in 0..500 {
            assert_eq!(sim.frame(), [1000; FRAME]);
        }
        assert!(sim.acts().is_empty());
    }

    #[test]
    fn a_queue_that_refuses_the_call_leaves_it_with_music_not_silence() {
        let mut sim = queued();
        sim.ivr
            .queue(sim.now, Queue::Refused("queue sales not found".into()));
        let effects = sim.effects();
        assert!(
            matches!(&effects[..], [Effect::Note(EntryKind::Parked, d)] if d["note"].as_str().unwrap().contains("not found")),
            "{effects:?}"
        );
        assert_eq!(sim.ivr.task(), TaskPhase::None);
        for _ in 0..100 {
            assert_eq!(sim.frame(), [1000; FRAME]);
        }
        assert!(sim.acts().is_empty());
    }

    #[test]
    fn agents_phones_ring_while_the_caller_hears_music_and_the_one_who_answers_is_bridged() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        assert_eq!(sim.acts(), ring("ann"));
        assert_eq!(
            sim.frame(),
            [1000; FRAME],
            "music while the agent's phone rings"
        );
        // Ann is busy: the ACD hears she missed it, the caller keeps music.
        sim.ivr.leg(sim.now, Leg::Failed(486, "Busy Here".into()));
        assert_eq!(
            sim.acts(),
            vec![
                Effect::State(InteractionState::Queued),
                Effect::Missed {
                    agent: "ann".into()
                }
            ]
        );
        assert_eq!(sim.frame(), [1000; FRAME]);
        sim.ivr.queue(sim.now, offer("bob"));
        assert_eq!(sim.acts(), ring("bob"));
        sim.ivr.leg(sim.now, Leg::Ringing);
        assert!(sim.acts().is_empty());
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        assert_eq!(
            sim.acts(),
            vec![
                Effect::State(InteractionState::Connected),
                Effect::Accept {
                    agent: "bob".into()
                },
                Effect::Flow(Event::AgentConnected {
                    agent: "bob".into()
                })
            ]
        );
        assert_eq!(sim.ivr.task(), TaskPhase::Connected);
        // Bridged: the caller hears the agent.
        assert_eq!(sim.frame_with(0, Some(&[77; FRAME])), [77; FRAME]);
        // The flow's answer to agent-connected waits for the agent to hang
        // up: then the survey plays, and the call ends after it.
        sim.step(vec![say(3)]);
        assert_eq!(sim.frame_with(0, Some(&[77; FRAME])), [77; FRAME]);
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(sim.acts(), vec![Effect::TaskDone]);
        assert_eq!(sim.ivr.task(), TaskPhase::None);
        for _ in 0..3 {
            assert_eq!(sim.frame(), [500; FRAME]);
        }
        let (_, acts) = sim.frames_until_act(5);
        assert_eq!(acts, vec![Effect::Hangup("flow finished".into())]);
    }

    /// A queued call connected with `agent` (news drained).
    fn connected(agent: &str) -> Sim {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer(agent));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.acts();
        sim.step(vec![]);
        sim
    }

    /// One frame with every party's audio (constant values).
    fn all(sim: &mut Sim, caller: i16, leg: i16, sup: i16, consult: i16) -> Frames {
        let (c, l, s, k) = (
            [caller; FRAME],
            [leg; FRAME],
            [sup; FRAME],
            [consult; FRAME],
        );
        let out = sim.ivr.tick_all(
            sim.now,
            Sound {
                heard: &c,
                leg: Some(&l),
                supervisor: Some(&s),
                consult: Some(&k),
            },
        );
        sim.now += PTIME;
        out
    }

    #[test]
    fn a_recorded_conversation_is_silence_while_paused_and_stored_when_the_agent_hangs_up() {
        let mut sim = queued();
        sim.ivr.record_conversation();
        // Not recorded while the caller waits with music.
        for _ in 0..10 {
            all(&mut sim, 5, 0, 0, 0);
        }
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.acts();
        sim.step(vec![]);
        // 1 s of talk: the caller says 5 and hears 7; the recording has both.
        for _ in 0..50 {
            all(&mut sim, 5, 7, 0, 0);
        }
        sim.ivr.pause_recording(true);
        let e = sim.effects();
        assert!(
            matches!(&e[..], [Effect::Note(EntryKind::RecordingPaused, d)] if d["at_ms"] == 1000),
            "{e:?}"
        );
        sim.ivr.pause_recording(true);
        assert!(sim.effects().is_empty(), "paused twice is noted once");
        for _ in 0..25 {
            let f = all(&mut sim, 5, 7, 0, 0);
            assert_eq!(f.caller, [7; FRAME], "the call itself goes on");
        }
        sim.ivr.pause_recording(false);
        let e = sim.effects();
        assert!(
            matches!(&e[..], [Effect::Note(EntryKind::RecordingResumed, _)]),
            "{e:?}"
        );
        for _ in 0..25 {
            all(&mut sim, 5, 7, 0, 0);
        }
        sim.ivr.leg(sim.now, Leg::Hangup);
        all(&mut sim, 5, 0, 0, 0);
        let saved: Vec<(Vec<i16>, u64)> = sim
            .effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::SaveConversation { samples, paused_ms } => Some((samples, paused_ms)),
                _ => None,
            })
            .collect();
        let [(samples, paused_ms)] = &saved[..] else {
            panic!("one recording: {saved:?}");
        };
        assert_eq!(*paused_ms, 500);
        assert_eq!(
            samples.len(),
            100 * FRAME,
            "2 s, from the bridge to its end"
        );
        assert!(samples[..50 * FRAME].iter().all(|s| *s == 12));
        assert!(samples[50 * FRAME..75 * FRAME].iter().all(|s| *s == 0));
        assert!(samples[75 * FRAME..].iter().all(|s| *s == 12));
        // Nothing more is recorded after the bridge.
        for _ in 0..10 {
            all(&mut sim, 5, 0, 0, 0);
        }
        assert!(
            !sim.effects()
                .iter()
                .any(|e| matches!(e, Effect::SaveConversation { .. }))
        );
    }

    #[test]
    fn an_unrecorded_queue_records_nothing_and_the_end_stores_a_conversation_in_progress() {
        let mut sim = connected("ann");
        for _ in 0..10 {
            all(&mut sim, 5, 7, 0, 0);
        }
        sim.ivr.end();
        assert!(
            !sim.effects()
                .iter()
                .any(|e| matches!(e, Effect::SaveConversation { .. }))
        );
        let mut sim = queued();
        sim.ivr.record_conversation();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.step(vec![]);
        for _ in 0..10 {
            all(&mut sim, 5, 7, 0, 0);
        }
        sim.ivr.end();
        let e = sim.effects();
        assert!(
            e.iter().any(|e| matches!(e, Effect::SaveConversation { samples, paused_ms: 0 } if samples.len() == 10 * FRAME)),
            "{e:?}"
        );
    }

    #[test]
    fn the_agent_hears_the_whisper_before_the_caller_is_connected() {
        let mut sim = queued();
        sim.ivr
            .queue(sim.now, Queue::Whisper(Arc::new(vec![321; FRAME * 2])));
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        let effects = sim.effects();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Note(EntryKind::Whisper, d) if d["agent"] == "ann"))
        );
        for _ in 0..2 {
            let f = all(&mut sim, 5, 7, 0, 0);
            assert_eq!(f.caller, [1000; FRAME], "the caller still hears music");
            assert_eq!(f.leg, Some([321; FRAME]), "the agent hears the whisper");
        }
        let f = all(&mut sim, 5, 7, 0, 0);
        assert_eq!((f.caller, f.leg), ([7; FRAME], Some([5; FRAME])));
    }

    #[test]
    fn an_agent_who_answers_before_the_whisper_is_ready_waits_for_it_briefly() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, Queue::WhisperComing);
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.acts();
        let f = all(&mut sim, 5, 7, 0, 0);
        assert_eq!((f.caller, f.leg), ([1000; FRAME], Some([0; FRAME])));
        sim.ivr
            .queue(sim.now, Queue::Whisper(Arc::new(vec![321; FRAME])));
        assert_eq!(all(&mut sim, 5, 7, 0, 0).leg, Some([321; FRAME]));
        assert_eq!(all(&mut sim, 5, 7, 0, 0).caller, [7; FRAME]);
        // Speech that never comes delays the caller by WHISPER_WAIT only.
        let mut sim = queued();
        sim.ivr.queue(sim.now, Queue::WhisperComing);
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        let frames = (WHISPER_WAIT.as_millis() / PTIME.as_millis()) as usize;
        for _ in 0..frames {
            assert_eq!(all(&mut sim, 5, 7, 0, 0).caller, [1000; FRAME]);
        }
        all(&mut sim, 5, 7, 0, 0);
        assert_eq!(all(&mut sim, 5, 7, 0, 0).caller, [7; FRAME]);
    }

    #[test]
    fn a_position_announcement_interrupts_the_music_then_it_resumes() {
        let mut sim = queued();
        sim.ivr
            .queue(sim.now, Queue::Announce(Arc::new(vec![42; FRAME])));
        assert_eq!(sim.frame(), [42; FRAME]);
        assert_eq!(sim.frame(), [1000; FRAME]);
        // Not while talking to an agent.
        let mut sim = connected("ann");
        sim.ivr
            .queue(sim.now, Queue::Announce(Arc::new(vec![42; FRAME])));
        assert_eq!(sim.frame_with(0, Some(&[9; FRAME])), [9; FRAME]);
    }

    #[test]
    fn a_supervisor_listens_whispers_and_barges() {
        let mut sim = connected("ann");
        let monitor = |mode| Queue::Monitor {
            supervisor: "sam".into(),
            target: "sip:sam@acme".into(),
            mode,
        };
        sim.ivr.queue(sim.now, monitor(Some(MonitorMode::Listen)));
        assert_eq!(
            sim.acts(),
            vec![Effect::RingSide {
                side: Side::Supervisor,
                target: "sip:sam@acme".into()
            }]
        );
        // Until Sam answers, nothing changes.
        let f = all(&mut sim, 1, 10, 100, 0);
        assert_eq!(
            (f.caller, f.leg, f.supervisor),
            ([10; FRAME], Some([1; FRAME]), None)
        );
        sim.ivr.side_leg(Side::Supervisor, Leg::Answered("PCMU"));
        let f = all(&mut sim, 1, 10, 100, 0);
        assert_eq!(f.caller, [10; FRAME]);
        assert_eq!(f.leg, Some([1; FRAME]));
        assert_eq!(f.supervisor, Some([11; FRAME]), "Sam hears both");
        sim.ivr.queue(sim.now, monitor(Some(MonitorMode::Whisper)));
        let f = all(&mut sim, 1, 10, 100, 0);
        assert_eq!(f.caller, [10; FRAME], "the caller does not hear a whisper");
        assert_eq!(f.leg, Some([101; FRAME]));
        sim.ivr.queue(sim.now, monitor(Some(MonitorMode::Barge)));
        let f = all(&mut sim, 1, 10, 100, 0);
        assert_eq!(f.caller, [110; FRAME]);
        sim.ivr.queue(sim.now, monitor(None));
        assert_eq!(sim.acts(), vec![Effect::DropSide(Side::Supervisor)]);
        let f = all(&mut sim, 1, 10, 100, 0);
        assert_eq!((f.caller, f.supervisor), ([10; FRAME], None));
        // The agent hanging up ends a supervisor's part too.
        sim.ivr.queue(sim.now, monitor(Some(MonitorMode::Listen)));
        sim.acts();
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(
            sim.acts(),
            vec![
                Effect::DropSide(Side::Supervisor),
                Effect::TaskDone,
                Effect::Hangup("the agent hung up".into())
            ]
        );
    }

    #[test]
    fn an_agent_holds_the_caller_with_music_and_takes_them_back() {
        let mut sim = connected("ann");
        let f = all(&mut sim, 1, 10, 0, 0);
        assert_eq!((f.caller, f.leg), ([10; FRAME], Some([1; FRAME])));
        sim.ivr.queue(sim.now, Queue::Hold(true));
        // Holding twice is one hold.
        sim.ivr.queue(sim.now, Queue::Hold(true));
        let f = all(&mut sim, 1, 10, 0, 0);
        assert_eq!(f.caller, [1000; FRAME], "the caller hears music");
        assert_eq!(f.leg, Some([0; FRAME]), "the agent hears nothing");
        sim.ivr.queue(sim.now, Queue::Hold(false));
        let f = all(&mut sim, 1, 10, 0, 0);
        assert_eq!((f.caller, f.leg), ([10; FRAME], Some([1; FRAME])));
        let notes: Vec<_> = sim
            .effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Note(k @ (EntryKind::Hold | EntryKind::Resume), d) => Some((k, d)),
                _ => None,
            })
            .collect();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(notes[0].1["by"], "agent");
        // A hold does not outlive its bridge.
        sim.ivr.queue(sim.now, Queue::Hold(true));
        sim.ivr.leg(sim.now, Leg::Hangup);
        all(&mut sim, 1, 10, 0, 0);
        assert!(!sim.ivr.held);
    }

    #[test]
    fn a_warm_transfer_to_an_agent_consults_then_hands_the_task_over() {
        let mut sim = connected("ann");
        sim.ivr.queue(
            sim.now,
            Queue::Consult {
                target: "sip:bob@acme".into(),
                agent: Some("bob".into()),
            },
        );
        assert_eq!(
            sim.acts(),
            vec![Effect::RingSide {
                side: Side::Consult,
                target: "sip:bob@acme".into()
            }]
        );
        // Ringing: the caller holds with music, Ann hears ringback.
        let f = all(&mut sim, 1, 10, 0, 1000);
        assert_eq!(f.caller, [1000; FRAME]);
        assert_ne!(f.leg, Some([1; FRAME]));
        // Completing before Bob answers does nothing yet.
        sim.ivr.queue(sim.now, Queue::ConsultEnd(true));
        assert!(sim.acts().is_empty());
        sim.ivr.side_leg(Side::Consult, Leg::Answered("PCMU"));
        let f = all(&mut sim, 1, 10, 0, 1000);
        assert_eq!(f.caller, [1000; FRAME], "the caller still holds");
        assert_eq!((f.leg, f.consult), (Some([1000; FRAME]), Some([10; FRAME])));
        sim.ivr.queue(sim.now, Queue::ConsultEnd(true));
        assert_eq!(
            sim.acts(),
            vec![
                Effect::PromoteConsult,
                Effect::HandOver {
                    agent: "bob".into()
                }
            ]
        );
        // Bob's leg is the call's leg now; the caller talks to Bob, and
        // his hanging up ends the task.
        assert_eq!(sim.frame_with(0, Some(&[55; FRAME])), [55; FRAME]);
        assert_eq!(sim.ivr.task(), TaskPhase::Connected);
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(
            sim.acts(),
            vec![Effect::TaskDone, Effect::Hangup("the agent hung up".into())]
        );
    }

    #[test]
    fn a_cancelled_or_failed_consultation_gives_the_agent_the_caller_back() {
        let mut sim = connected("ann");
        let consult = Queue::Consult {
            target: "+15550999".into(),
            agent: None,
        };
        sim.ivr.queue(sim.now, consult.clone());
        sim.acts();
        sim.ivr
            .side_leg(Side::Consult, Leg::Failed(486, "Busy Here".into()));
        let f = all(&mut sim, 1, 10, 0, 0);
        assert_eq!((f.caller, f.leg), ([10; FRAME], Some([1; FRAME])));
        sim.ivr.queue(sim.now, consult.clone());
        sim.acts();
        sim.ivr.side_leg(Side::Consult, Leg::Answered("PCMA"));
        sim.ivr.queue(sim.now, Queue::ConsultEnd(false));
        assert_eq!(sim.acts(), vec![Effect::DropSide(Side::Consult)]);
        let f = all(&mut sim, 1, 10, 0, 0);
        assert_eq!((f.caller, f.leg), ([10; FRAME], Some([1; FRAME])));
        // To a number, completing ends Ann's task; the call goes on with
        // the number and ends with it.
        sim.ivr.queue(sim.now, consult);
        sim.acts();
        sim.ivr.side_leg(Side::Consult, Leg::Answered("PCMA"));
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(sim.acts(), vec![Effect::PromoteConsult, Effect::TaskDone]);
        assert_eq!(sim.ivr.task(), TaskPhase::None);
        assert_eq!(sim.frame_with(0, Some(&[66; FRAME])), [66; FRAME]);
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(
            sim.acts(),
            vec![Effect::Hangup("transferred call ended".into())]
        );
    }

    #[test]
    fn an_agent_hanging_up_ends_the_call_when_the_flow_has_nothing_more() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMA"));
        sim.acts();
        sim.step(vec![]);
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(
            sim.acts(),
            vec![Effect::TaskDone, Effect::Hangup("the agent hung up".into())]
        );
    }

    #[test]
    fn a_rescinded_offer_stops_the_ringing_and_its_late_failure_is_ignored() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.acts();
        sim.ivr.queue(sim.now, Queue::Rescind("ann".into()));
        assert_eq!(
            sim.acts(),
            vec![Effect::DropLeg, Effect::State(InteractionState::Queued)]
        );
        // A rescind for someone else changes nothing.
        sim.ivr.queue(sim.now, Queue::Rescind("bob".into()));
        assert!(sim.acts().is_empty());
        sim.ivr
            .leg(sim.now, Leg::Failed(487, "Request Terminated".into()));
        assert!(sim.acts().is_empty(), "the ACD already moved on");
        assert_eq!(sim.frame(), [1000; FRAME]);
    }

    #[test]
    fn an_agent_without_a_phone_is_reported_missed() {
        let mut sim = queued();
        sim.ivr.queue(
            sim.now,
            Queue::Offer {
                agent: "ann".into(),
                target: None,
            },
        );
        assert_eq!(
            sim.acts(),
            vec![Effect::Missed {
                agent: "ann".into()
            }]
        );
    }

    #[test]
    fn an_accept_the_acd_refuses_drops_the_agent_and_the_caller_waits_again() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.acts();
        sim.ivr
            .queue(sim.now, Queue::AcceptFailed("task is not offered".into()));
        assert_eq!(
            sim.acts(),
            vec![Effect::DropLeg, Effect::State(InteractionState::Queued)]
        );
        assert_eq!(sim.ivr.task(), TaskPhase::Waiting);
        assert_eq!(sim.frame_with(0, Some(&[77; FRAME])), [1000; FRAME]);
    }

    #[test]
    fn a_queue_timeout_goes_back_to_the_flow_as_timeout() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.acts();
        sim.ivr.queue(sim.now, Queue::BackToFlow("max_wait".into()));
        assert_eq!(
            sim.acts(),
            vec![
                Effect::DropLeg,
                Effect::State(InteractionState::InFlow),
                Effect::Flow(Event::Timeout)
            ]
        );
        assert_eq!(sim.ivr.task(), TaskPhase::None);
    }

    #[test]
    fn the_callback_digit_leaves_the_queue_and_the_call_ends_after_the_confirmation() {
        let mut sim = queued();
        sim.ivr.digit(sim.now, '1', DtmfSource::Rfc4733);
        sim.acts();
        assert_eq!(sim.ivr.task(), TaskPhase::Waiting, "no callback digit yet");
        sim.ivr.queue(sim.now, Queue::CallbackDigit('1'));
        sim.ivr.queue(sim.now, offer("ann"));
        sim.acts();
        sim.ivr.digit(sim.now, '1', DtmfSource::Rfc4733);
        assert_eq!(sim.acts(), vec![Effect::DropLeg, Effect::CallMeBack]);
        assert_eq!(sim.ivr.task(), TaskPhase::None);
        // The confirmation plays, then the call ends.
        sim.step(vec![say(2), action(Action::Hangup)]);
        assert_eq!(sim.frame(), [500; FRAME]);
        assert_eq!(sim.frame(), [500; FRAME]);
        let (_, acts) = sim.frames_until_act(3);
        assert_eq!(acts, vec![Effect::Hangup("flow hung up".into())]);
    }

    #[test]
    fn an_agent_refer_passes_the_caller_on_and_ends_the_agents_task() {
        let mut sim = queued();
        sim.ivr.queue(sim.now, offer("ann"));
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.acts();
        sim.step(vec![]);
        sim.ivr.leg(sim.now, Leg::Refer("sip:bob@acme".into()));
        assert_eq!(
            sim.acts(),
            vec![
                Effect::TaskDone,
                Effect::Dial {
                    target: "sip:bob@acme".into(),
                    caller_id: None,
                    transfer: true
                }
            ]
        );
    }

    #[test]
    fn a_dial_rings_back_gives_up_at_its_timeout_and_reports_no_answer() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Dial {
            target: "1001".into(),
            caller_id: None,
            timeout_secs: 5,
        })]);
        assert_eq!(
            sim.acts(),
            vec![Effect::Dial {
                target: "1001".into(),
                caller_id: None,
                transfer: false
            }]
        );
        sim.ivr.leg(sim.now, Leg::Ringing);
        // Ringback: a second of tone, then silence.
        assert_ne!(sim.frame(), [0; FRAME]);
        for _ in 0..49 {
            sim.frame();
        }
        assert_eq!(sim.frame(), [0; FRAME]);
        let (n, acts) = sim.frames_until_act(1000);
        assert_eq!(acts, vec![Effect::CancelLeg]);
        // The first frame after 5 s (frame k is at (k - 1) × 20 ms).
        assert_eq!(51 + n, 252, "cancelled once 5 s had passed");
        // Cancelled once only.
        for _ in 0..100 {
            sim.frame();
        }
        assert!(sim.acts().is_empty());
        sim.ivr
            .leg(sim.now, Leg::Failed(487, "Request Terminated".into()));
        assert_eq!(
            sim.acts(),
            vec![Effect::Flow(Event::DialResult {
                outcome: "no-answer".into()
            })]
        );
    }

    #[test]
    fn an_answered_dial_bridges_and_its_end_resumes_the_flow() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Dial {
            target: "1001".into(),
            caller_id: Some("+1555".into()),
            timeout_secs: 30,
        })]);
        sim.acts();
        sim.ivr.leg(sim.now, Leg::Answered("PCMA"));
        assert!(sim.ivr.bridged());
        assert_eq!(sim.frame_with(0, Some(&[77; FRAME])), [77; FRAME]);
        // A frame lost on the leg is silence, not ringback.
        assert_eq!(sim.frame_with(0, None), [0; FRAME]);
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert!(!sim.ivr.bridged());
        assert_eq!(
            sim.acts(),
            vec![Effect::Flow(Event::DialResult {
                outcome: "completed".into()
            })]
        );
    }

    #[test]
    fn a_transfer_follows_a_refer_and_ends_with_the_leg() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Transfer {
            target: "agent".into(),
        })]);
        assert_eq!(
            sim.acts(),
            vec![Effect::Dial {
                target: "agent".into(),
                caller_id: None,
                transfer: true
            }]
        );
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        assert!(sim.ivr.bridged());
        sim.effects();
        sim.ivr.leg(sim.now, Leg::Refer("supervisor".into()));
        let effects = sim.effects();
        assert!(matches!(&effects[0], Effect::Note(EntryKind::Refer, d) if d["from"] == "agent"));
        assert_eq!(
            effects[1],
            Effect::Dial {
                target: "supervisor".into(),
                caller_id: None,
                transfer: true
            }
        );
        sim.ivr.leg(sim.now, Leg::Answered("PCMU"));
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert_eq!(
            sim.acts(),
            vec![Effect::Hangup("transferred call ended".into())]
        );
    }

    #[test]
    fn a_dial_without_media_ports_fails_to_the_flow() {
        let mut sim = Sim::new();
        sim.step(vec![action(Action::Dial {
            target: "1001".into(),
            caller_id: None,
            timeout_secs: 30,
        })]);
        sim.acts();
        sim.ivr
            .leg(sim.now, Leg::Unavailable("no free RTP ports".into()));
        assert_eq!(
            sim.acts(),
            vec![Effect::Flow(Event::DialResult {
                outcome: "failed".into()
            })]
        );
    }

    #[test]
    fn a_busy_leg_is_busy_and_stale_leg_news_is_ignored() {
        let mut sim = Sim::new();
        // No leg: news about one changes nothing.
        sim.ivr.leg(sim.now, Leg::Hangup);
        assert!(sim.effects().is_empty());
        sim.step(vec![action(Action::Dial {
            target: "1001".into(),
            caller_id: None,
            timeout_secs: 30,
        })]);
        sim.acts();
        sim.ivr.leg(sim.now, Leg::Failed(486, "Busy Here".into()));
        assert_eq!(
            sim.acts(),
            vec![Effect::Flow(Event::DialResult {
                outcome: "busy".into()
            })]
        );
    }

    #[test]
    fn actions_that_are_not_for_voice_are_noted_and_skipped() {
        let mut sim = Sim::new();
        sim.step(vec![
            action(Action::Reply { text: "hi".into() }),
            action(Action::SetAttribute {
                name: "a".into(),
                value: "b".into(),
            }),
            say(1),
        ]);
        let effects = sim.effects();
        assert!(
            matches!(&effects[..], [Effect::Note(EntryKind::IgnoredAction, d)] if d["action"]["type"] == "reply")
        );
        assert_eq!(sim.frame(), [500; FRAME]);
    }

    #[test]
    fn nothing_plays_before_the_answer() {
        let t0 = Instant::now();
        let mut ivr = Ivr::new(t0, Arc::new(vec![1; 8000]));
        assert_eq!(ivr.tick(t0, &[0; FRAME], None), [0; FRAME]);
        assert!(ivr.poll_effect().is_none());
    }

    impl Sim {
        /// Up to `limit` frames; the first non-note effects, or none.
        fn frames_until_act_or_none(&mut self, limit: usize) -> Vec<Effect> {
            for _ in 0..limit {
                self.frame();
                let acts = self.acts();
                if !acts.is_empty() {
                    return acts;
                }
            }
            Vec::new()
        }
    }
}
