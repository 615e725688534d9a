//! The first-party `flow-graph` plugin: runs the JSON flow document the
//! server deployed with it (config key `flow`), one event at a time. Other
//! config keys are readable in templates as `{{config.KEY}}`.

use plugboard_core::Channel as C;
use plugboard_core::flow::{Action as A, Event as E};
use plugboard_flowgraph::{FlowHost, HttpFailure, HttpRequest, HttpResponse, Input};
use plugboard_sdk::flow::{
    Action, Callback, Channel, Dial, Enqueue, Event, Gather, Guest, Interaction, Outbound,
    RecordOptions, Response, Say,
};
use plugboard_sdk::host::{self, clock, http};

struct FlowGraph;

struct Host;

impl FlowHost for Host {
    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, HttpFailure> {
        let method = match req.method.as_str() {
            "POST" => http::Method::Post,
            "PUT" => http::Method::Put,
            "PATCH" => http::Method::Patch,
            "DELETE" => http::Method::Delete,
            "HEAD" => http::Method::Head,
            _ => http::Method::Get,
        };
        http::fetch(&http::Request {
            method,
            url: req.url,
            headers: req.headers,
            body: req.body,
            timeout_ms: req.timeout_ms,
        })
        .map(|r| HttpResponse {
            status: r.status,
            body: r.body,
        })
        .map_err(|e| match e {
            host::Error::Timeout => HttpFailure::Timeout,
            other => HttpFailure::Other(host::describe(&other)),
        })
    }

    fn now_ms(&mut self) -> u64 {
        clock::now_ms()
    }

    fn utc_offset_minutes(&mut self) -> i32 {
        clock::utc_offset_minutes()
    }

    fn config(&self, key: &str) -> Option<String> {
        host::config::get(key)
    }
}

fn channel_in(c: Channel) -> C {
    match c {
        Channel::Voice => C::Voice,
        Channel::Chat => C::Chat,
        Channel::Email => C::Email,
        Channel::Sms => C::Sms,
        Channel::Fax => C::Fax,
    }
}

fn channel_out(c: C) -> Channel {
    match c {
        C::Voice => Channel::Voice,
        C::Chat => Channel::Chat,
        C::Email => Channel::Email,
        C::Sms => Channel::Sms,
        C::Fax => Channel::Fax,
    }
}

fn event_in(e: Event) -> E {
    match e {
        Event::Started => E::Started,
        Event::Digits(d) => E::Digits {
            digits: d.digits,
            terminated: d.terminated,
        },
        Event::Speech(text) => E::Speech { text },
        Event::Message(m) => E::Message {
            text: m.text,
            subject: m.subject,
            attachments: m.attachments,
        },
        Event::Timeout => E::Timeout,
        Event::QueueUpdate(q) => E::QueueUpdate {
            queue: q.queue,
            position: q.position,
            estimated_wait_secs: q.estimated_wait_secs,
            waited_secs: q.waited_secs,
        },
        Event::AgentConnected(agent) => E::AgentConnected { agent },
        Event::Recorded(r) => E::Recorded {
            id: r.id,
            duration_ms: r.duration_ms,
        },
        Event::DialResult(outcome) => E::DialResult { outcome },
        Event::Hangup => E::Hangup,
    }
}

fn say_out(s: plugboard_core::flow::Say) -> Say {
    Say {
        text: s.text,
        voice: s.voice,
        language: s.language,
    }
}

fn action_out(a: A) -> Action {
    match a {
        A::Say {
            text,
            voice,
            language,
        } => Action::Say(Say {
            text,
            voice,
            language,
        }),
        A::Play { url } => Action::Play(url),
        A::Gather {
            prompt,
            max_digits,
            terminator,
            timeout_ms,
            inter_digit_timeout_ms,
            speech,
        } => Action::Gather(Gather {
            prompt: prompt.map(say_out),
            max_digits,
            terminator,
            timeout_ms,
            inter_digit_timeout_ms,
            speech,
        }),
        A::Record {
            max_secs,
            beep,
            terminator,
        } => Action::Record(RecordOptions {
            max_secs,
            beep,
            terminator,
        }),
        A::Enqueue {
            queue,
            priority,
            skills,
        } => Action::Enqueue(Enqueue {
            queue,
            priority,
            skills,
        }),
        A::Transfer { target } => Action::Transfer(target),
        A::Dial {
            target,
            caller_id,
            timeout_secs,
        } => Action::Dial(Dial {
            target,
            caller_id,
            timeout_secs,
        }),
        A::Hangup => Action::Hangup,
        A::Reply { text } => Action::Reply(text),
        A::Send {
            channel,
            to,
            text,
            subject,
        } => Action::Send(Outbound {
            channel: channel_out(channel),
            to,
            text,
            subject,
        }),
        A::SetAttribute { name, value } => Action::SetAttribute((name, value)),
        A::Wait { ms } => Action::Wait(ms),
        A::OfferCallback { queue, number } => Action::OfferCallback(Callback { queue, number }),
        A::ReceiveFax { detect_ms, address } => {
            Action::Transfer(A::fax_target(detect_ms, address.as_deref()))
        }
    }
}

impl Guest for FlowGraph {
    fn handle(ix: Interaction, state: String, event: Event) -> Result<Response, String> {
        let doc = host::config::get("flow")
            .ok_or("no flow document deployed (config key \"flow\")")?;
        // Validated when it was deployed: read it without checking again.
        let flow = plugboard_flowgraph::Flow::load(doc.as_bytes()).map_err(|e| e.to_string())?;
        let input = Input {
            channel: channel_in(ix.channel),
            from: &ix.from,
            to: &ix.to,
            attributes: &ix.attributes,
        };
        let step = plugboard_flowgraph::handle(
            &flow,
            input,
            &state,
            &event_in(event),
            &mut Host,
        )
        .map_err(|e| e.to_string())?;
        Ok(Response {
            actions: step.actions.into_iter().map(action_out).collect(),
            state: Some(step.state),
        })
    }
}

plugboard_sdk::flow::export_flow!(FlowGraph);
