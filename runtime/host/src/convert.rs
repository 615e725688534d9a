//! Conversions between the WIT types (as generated) and the JSON model in
//! `plugboard-core`.

use crate::bindings::flow::plugboard::flow::types as w;
use plugboard_core::Channel;
use plugboard_core::flow::{Action, Event, Say};

pub(crate) fn channel_to_wit(c: Channel) -> w::Channel {
    match c {
        Channel::Voice => w::Channel::Voice,
        Channel::Chat => w::Channel::Chat,
        Channel::Email => w::Channel::Email,
        Channel::Sms => w::Channel::Sms,
        Channel::Fax => w::Channel::Fax,
    }
}

fn channel_from_wit(c: w::Channel) -> Channel {
    match c {
        w::Channel::Voice => Channel::Voice,
        w::Channel::Chat => Channel::Chat,
        w::Channel::Email => Channel::Email,
        w::Channel::Sms => Channel::Sms,
        w::Channel::Fax => Channel::Fax,
    }
}

pub(crate) fn event_to_wit(e: &Event) -> w::Event {
    match e.clone() {
        Event::Started => w::Event::Started,
        Event::Digits { digits, terminated } => {
            w::Event::Digits(w::DigitsInput { digits, terminated })
        }
        Event::Speech { text } => w::Event::Speech(text),
        Event::Message {
            text,
            subject,
            attachments,
        } => w::Event::Message(w::Message {
            text,
            subject,
            attachments,
        }),
        Event::Timeout => w::Event::Timeout,
        Event::QueueUpdate {
            queue,
            position,
            estimated_wait_secs,
            waited_secs,
        } => w::Event::QueueUpdate(w::QueueStatus {
            queue,
            position,
            estimated_wait_secs,
            waited_secs,
        }),
        Event::AgentConnected { agent } => w::Event::AgentConnected(agent),
        Event::Recorded { id, duration_ms } => w::Event::Recorded(w::Recording { id, duration_ms }),
        Event::DialResult { outcome } => w::Event::DialResult(outcome),
        Event::Hangup => w::Event::Hangup,
    }
}

fn say_from_wit(s: w::Say) -> Say {
    Say {
        text: s.text,
        voice: s.voice,
        language: s.language,
    }
}

/// Bytes of text an action carries, for the output cap.
pub(crate) fn action_size(a: &w::Action) -> usize {
    fn opt(s: &Option<String>) -> usize {
        s.as_ref().map_or(0, String::len)
    }
    fn say(s: &w::Say) -> usize {
        s.text.len() + opt(&s.voice) + opt(&s.language)
    }
    16 + match a {
        w::Action::Say(s) => say(s),
        w::Action::Play(u) | w::Action::Transfer(u) | w::Action::Reply(u) => u.len(),
        w::Action::Gather(g) => g.prompt.as_ref().map_or(0, say) + opt(&g.terminator),
        w::Action::Record(r) => opt(&r.terminator),
        w::Action::Enqueue(q) => q.queue.len() + q.skills.iter().map(String::len).sum::<usize>(),
        w::Action::Dial(d) => d.target.len() + opt(&d.caller_id),
        w::Action::Hangup | w::Action::Wait(_) => 0,
        w::Action::Send(s) => s.to.len() + s.text.len() + opt(&s.subject),
        w::Action::SetAttribute((k, v)) => k.len() + v.len(),
        w::Action::OfferCallback(c) => c.queue.len() + opt(&c.number),
    }
}

pub(crate) fn action_from_wit(a: w::Action) -> Action {
    match a {
        w::Action::Say(s) => Action::Say {
            text: s.text,
            voice: s.voice,
            language: s.language,
        },
        w::Action::Play(url) => Action::Play { url },
        w::Action::Gather(g) => Action::Gather {
            prompt: g.prompt.map(say_from_wit),
            max_digits: g.max_digits,
            terminator: g.terminator,
            timeout_ms: g.timeout_ms,
            inter_digit_timeout_ms: g.inter_digit_timeout_ms,
            speech: g.speech,
        },
        w::Action::Record(r) => Action::Record {
            max_secs: r.max_secs,
            beep: r.beep,
            terminator: r.terminator,
        },
        w::Action::Enqueue(q) => Action::Enqueue {
            queue: q.queue,
            priority: q.priority,
            skills: q.skills,
        },
        w::Action::Transfer(target) => Action::transfer(target),
        w::Action::Dial(d) => Action::Dial {
            target: d.target,
            caller_id: d.caller_id,
            timeout_secs: d.timeout_secs,
        },
        w::Action::Hangup => Action::Hangup,
        w::Action::Reply(text) => Action::Reply { text },
        w::Action::Send(s) => Action::Send {
            channel: channel_from_wit(s.channel),
            to: s.to,
            text: s.text,
            subject: s.subject,
        },
        w::Action::SetAttribute((name, value)) => Action::SetAttribute { name, value },
        w::Action::Wait(ms) => Action::Wait { ms },
        w::Action::OfferCallback(c) => Action::OfferCallback {
            queue: c.queue,
            number: c.number,
        },
    }
}
