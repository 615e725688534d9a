//! The interpreter: one event in, actions and the next state out.

use crate::doc::{Cond, DAYS, Flow, Node, parse_hhmm};
use crate::time::{LocalTime, parse_date};
use plugboard_core::Channel;
use plugboard_core::flow::{Action, Event, Say};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Most nodes visited while handling one event.
pub const MAX_STEPS: usize = 200;

/// The interaction as the flow sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Channel.
    pub channel: Channel,
    /// Customer address.
    pub from: &'a str,
    /// Tenant address.
    pub to: &'a str,
    /// Attributes, readable as `{{attr.NAME}}`.
    pub attributes: &'a [(String, String)],
}

/// An outbound HTTP request from an `http` node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Upper-case method.
    pub method: String,
    /// URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Timeout, ms.
    pub timeout_ms: Option<u32>,
}

/// Its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

/// Why an HTTP request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpFailure {
    /// The service did not answer in time.
    Timeout,
    /// Anything else (not granted, refused, too large…), described.
    Other(String),
}

/// What the interpreter needs from its host.
pub trait FlowHost {
    /// Performs an HTTP request (through the plugin's grant).
    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, HttpFailure>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&mut self) -> u64;
    /// The tenant's UTC offset now, minutes.
    fn utc_offset_minutes(&mut self) -> i32;
    /// The plugin's config value at `key`: strings as they are, anything
    /// else as JSON text (the `config.get` import).
    fn config(&self, key: &str) -> Option<String>;
}

/// A step's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Actions, in order.
    pub actions: Vec<Action>,
    /// State to hand back with the next event.
    pub state: String,
}

/// Why an event could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The state string is not ours.
    #[error("corrupt flow state: {0}")]
    State(String),
    /// Too many nodes in one step.
    #[error("more than {MAX_STEPS} nodes without waiting for input (at node {0:?})")]
    TooManySteps(String),
    /// An edge names a missing node (only possible with an unvalidated flow).
    #[error("node {0:?} does not exist")]
    MissingNode(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The waiting node, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    #[serde(default)]
    vars: Map<String, Value>,
    /// Retries used at the waiting node.
    #[serde(default, skip_serializing_if = "is_zero")]
    tries: u32,
    /// The flow has ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    done: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

struct Run<'a> {
    flow: &'a Flow,
    input: Input<'a>,
    host: &'a mut dyn FlowHost,
    st: State,
    actions: Vec<Action>,
}

/// Handles one event: resumes the flow where it waits, runs until it waits
/// again or ends, and returns the actions and the new state.
pub fn handle(
    flow: &Flow,
    input: Input<'_>,
    state: &str,
    event: &Event,
    host: &mut dyn FlowHost,
) -> Result<Step, RunError> {
    let fresh = state.trim().is_empty();
    let st: State = if fresh {
        State::default()
    } else {
        serde_json::from_str(state).map_err(|e| RunError::State(e.to_string()))?
    };
    let mut run = Run {
        flow,
        input,
        host,
        st,
        actions: Vec::new(),
    };
    if fresh {
        run.st.vars = flow.vars.clone().into_iter().collect();
        run.st.vars.insert("caller".into(), input.from.into());
        run.st.vars.insert("called".into(), input.to.into());
        run.st
            .vars
            .insert("channel".into(), input.channel.to_string().into());
        if let Some(l) = &flow.language {
            run.st.vars.insert("language".into(), l.clone().into());
        }
        run.go(Some(flow.start.clone()))?;
    } else if !run.st.done && *event != Event::Hangup {
        run.resume(event)?;
    }
    if *event == Event::Hangup {
        run.st.done = true;
        run.st.at = None;
    }
    Ok(Step {
        actions: run.actions,
        state: serde_json::to_string(&run.st).unwrap_or_default(),
    })
}

/// What the customer did at a waiting node.
enum Input2 {
    Text(String),
    Digits(String),
    Recorded(String),
    NoInput,
    Other,
}

impl Run<'_> {
    fn voice(&self) -> bool {
        self.input.channel == Channel::Voice
    }

    fn node(&self, id: &str) -> Result<&Node, RunError> {
        self.flow
            .nodes
            .get(id)
            .ok_or_else(|| RunError::MissingNode(id.to_string()))
    }

    fn resume(&mut self, event: &Event) -> Result<(), RunError> {
        let Some(at) = self.st.at.clone() else {
            return Ok(());
        };
        let got = match event {
            Event::Digits { digits, .. } if digits.is_empty() => Input2::NoInput,
            Event::Digits { digits, .. } => Input2::Digits(digits.clone()),
            Event::Speech { text } | Event::Message { text, .. } => Input2::Text(text.clone()),
            Event::Timeout => Input2::NoInput,
            Event::Recorded { id, .. } => Input2::Recorded(id.clone()),
            _ => Input2::Other,
        };
        if matches!(got, Input2::Other) {
            return Ok(());
        }
        let node = self.node(&at)?.clone();
        let next = match node {
            Node::Menu {
                options,
                retries,
                retry_prompt,
                no_input,
                no_match,
                ..
            } => match choose(&options, &got) {
                Some(Some(to)) => Some(to),
                miss => {
                    if self.st.tries < retries {
                        self.st.tries += 1;
                        if let Some(p) = retry_prompt {
                            let text = self.render(&p);
                            self.say(text, None, None);
                        }
                        self.prompt_node(&at)?;
                        return Ok(());
                    }
                    if miss.is_some() {
                        no_match.or(no_input)
                    } else {
                        no_input.or(no_match)
                    }
                }
            },
            Node::Gather {
                var,
                next,
                no_input,
                ..
            } => match got {
                Input2::Digits(v) | Input2::Text(v) => {
                    self.set_var(&var, Value::String(v));
                    Some(next)
                }
                _ => no_input,
            },
            Node::Language { options, next, .. } => {
                if let Some(Some(lang)) = choose(&options, &got) {
                    self.st.vars.insert("language".into(), Value::String(lang));
                }
                Some(next)
            }
            Node::Record {
                var,
                next,
                no_input,
                ..
            } => match got {
                Input2::Recorded(id) | Input2::Text(id) => {
                    self.set_var(&var, Value::String(id));
                    next
                }
                _ => no_input.or(next),
            },
            // Not a waiting node: nothing to resume.
            _ => return Ok(()),
        };
        self.st.tries = 0;
        self.st.at = None;
        self.go(next)
    }

    /// Runs from `next` until a node waits or the flow ends.
    fn go(&mut self, mut next: Option<String>) -> Result<(), RunError> {
        for _ in 0..MAX_STEPS {
            let Some(id) = next.take() else {
                // The end of the flow: a call is hung up, a chat just ends.
                if self.voice() {
                    self.actions.push(Action::Hangup);
                }
                self.st.done = true;
                return Ok(());
            };
            let node = self.node(&id)?.clone();
            if node.waits() {
                self.st.at = Some(id.clone());
                self.st.tries = 0;
                self.prompt_node(&id)?;
                return Ok(());
            }
            next = match node {
                Node::Say {
                    text,
                    voice,
                    language,
                    next,
                } => {
                    let text = self.render(&text);
                    self.say(text, voice, language);
                    next
                }
                Node::Play { url, next } => {
                    if self.voice() {
                        let url = self.render(&url);
                        self.actions.push(Action::Play { url });
                    }
                    next
                }
                Node::Http {
                    method,
                    url,
                    headers,
                    body,
                    into,
                    timeout_ms,
                    next,
                    error,
                    timeout,
                } => {
                    let req = HttpRequest {
                        method: method.to_ascii_uppercase(),
                        url: self.render_with(&url, true),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.clone(), self.render(v)))
                            .collect(),
                        body: body
                            .map(|b| self.render(&b).into_bytes())
                            .unwrap_or_default(),
                        timeout_ms,
                    };
                    match self.host.http(req) {
                        Ok(resp) => {
                            self.st
                                .vars
                                .insert("http_status".into(), Value::from(resp.status));
                            let v = serde_json::from_slice(&resp.body).unwrap_or_else(|_| {
                                Value::String(String::from_utf8_lossy(&resp.body).into_owned())
                            });
                            self.set_var(&into, v);
                            if (200..300).contains(&resp.status) {
                                Some(next)
                            } else {
                                self.st.vars.insert(
                                    "error".into(),
                                    Value::String(format!("HTTP status {}", resp.status)),
                                );
                                Some(error)
                            }
                        }
                        Err(HttpFailure::Timeout) => {
                            self.st
                                .vars
                                .insert("error".into(), Value::String("timeout".into()));
                            Some(timeout.unwrap_or(error))
                        }
                        Err(HttpFailure::Other(e)) => {
                            self.st.vars.insert("error".into(), Value::String(e));
                            Some(error)
                        }
                    }
                }
                Node::Set { vars, next } => {
                    for (k, v) in vars {
                        let v = match v {
                            Value::String(s) => Value::String(self.render(&s)),
                            other => other,
                        };
                        self.set_var(&k, v);
                    }
                    next
                }
                Node::Condition {
                    test,
                    then,
                    otherwise,
                } => Some(if self.eval(&test) { then } else { otherwise }),
                Node::Enqueue {
                    queue,
                    priority,
                    skills,
                    attributes,
                } => {
                    // The variables the flow names go with the customer
                    // to the agent (the screen pop) as attributes.
                    for (name, value) in self.handed_over(&attributes) {
                        self.actions.push(Action::SetAttribute { name, value });
                    }
                    self.actions.push(Action::Enqueue {
                        queue,
                        priority,
                        skills,
                    });
                    self.st.done = true;
                    return Ok(());
                }
                Node::Transfer { target } => {
                    let target = self.render(&target);
                    self.actions.push(Action::Transfer { target });
                    self.st.done = true;
                    return Ok(());
                }
                Node::Hangup {} => {
                    self.actions.push(Action::Hangup);
                    self.st.done = true;
                    return Ok(());
                }
                Node::Send {
                    channel,
                    to,
                    text,
                    subject,
                    next,
                } => {
                    let action = Action::Send {
                        channel,
                        to: self.render(&to),
                        text: self.render(&text),
                        subject: subject.map(|s| self.render(&s)),
                    };
                    self.actions.push(action);
                    next
                }
                Node::SendFax { to, text, next } => {
                    let action = Action::Send {
                        channel: plugboard_core::Channel::Fax,
                        to: self.render(&to),
                        text: self.render(&text),
                        subject: None,
                    };
                    self.actions.push(action);
                    next
                }
                Node::ReceiveFax {
                    detect_secs,
                    address,
                    next,
                } => {
                    let detect_ms = detect_secs.map(|s| s.clamp(1, 60) * 1000);
                    self.actions.push(Action::ReceiveFax { detect_ms, address });
                    if detect_ms.is_none() {
                        // The call is a fax from here on.
                        self.st.done = true;
                        return Ok(());
                    }
                    next
                }
                // Waiting nodes returned above.
                Node::Menu { .. }
                | Node::Gather { .. }
                | Node::Language { .. }
                | Node::Record { .. } => None,
            };
        }
        Err(RunError::TooManySteps(next.unwrap_or_default()))
    }

    /// Emits the prompt of a waiting node.
    fn prompt_node(&mut self, id: &str) -> Result<(), RunError> {
        let node = self.node(id)?.clone();
        let voice = self.voice();
        match node {
            Node::Menu {
                prompt,
                max_digits,
                timeout_ms,
                inter_digit_timeout_ms,
                speech,
                ..
            } => self.ask(
                prompt,
                max_digits,
                None,
                timeout_ms,
                inter_digit_timeout_ms,
                speech,
            ),
            Node::Gather {
                prompt,
                max_digits,
                terminator,
                timeout_ms,
                inter_digit_timeout_ms,
                speech,
                ..
            } => self.ask(
                prompt,
                max_digits,
                terminator,
                timeout_ms,
                inter_digit_timeout_ms,
                speech,
            ),
            Node::Language {
                prompt, timeout_ms, ..
            } => self.ask(prompt, 1, None, timeout_ms, 3000, false),
            Node::Record {
                prompt,
                max_secs,
                beep,
                terminator,
                ..
            } => {
                if let Some(p) = prompt {
                    let text = self.render(&p);
                    self.say(text, None, None);
                }
                if voice {
                    self.actions.push(Action::Record {
                        max_secs,
                        beep,
                        terminator,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn ask(
        &mut self,
        prompt: String,
        max_digits: u32,
        terminator: Option<String>,
        timeout_ms: u32,
        inter_digit_timeout_ms: u32,
        speech: bool,
    ) {
        let text = self.render(&prompt);
        if self.voice() {
            let (voice, language) = self.voice_and_language(None, None);
            self.actions.push(Action::Gather {
                prompt: Some(Say {
                    text,
                    voice,
                    language,
                }),
                max_digits,
                terminator,
                timeout_ms,
                inter_digit_timeout_ms,
                speech,
            });
        } else {
            self.actions.push(Action::Reply { text });
        }
    }

    fn voice_and_language(
        &self,
        voice: Option<String>,
        language: Option<String>,
    ) -> (Option<String>, Option<String>) {
        (
            voice.or_else(|| self.flow.voice.clone()),
            language.or_else(|| {
                self.st
                    .vars
                    .get("language")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }),
        )
    }

    fn say(&mut self, text: String, voice: Option<String>, language: Option<String>) {
        if self.voice() {
            let (voice, language) = self.voice_and_language(voice, language);
            self.actions.push(Action::Say {
                text,
                voice,
                language,
            });
        } else {
            self.actions.push(Action::Reply { text });
        }
    }

    /// The variables `names` (or dotted paths) as attributes, those set.
    fn handed_over(&self, names: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in names {
            if let Some(v) = self.lookup(name) {
                flatten(name, &v, name.split('.').count(), &mut out);
            }
        }
        out
    }

    fn set_var(&mut self, path: &str, v: Value) {
        self.st.vars.insert(path.to_string(), v);
    }

    fn lookup(&self, path: &str) -> Option<Value> {
        let mut parts = path.split('.');
        let first = parts.next()?;
        let mut cur: Value = match first {
            "config" => {
                let key = parts.next()?;
                let text = self.host.config(key)?;
                let mut rest = parts.peekable();
                if rest.peek().is_none() {
                    return Some(Value::String(text));
                }
                let mut cur: Value = serde_json::from_str(&text).ok()?;
                for p in rest {
                    cur = descend(cur, p)?;
                }
                return Some(cur);
            }
            "attr" => Value::Object(
                self.input
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
            // A variable may itself contain dots (set by `set`).
            _ if self.st.vars.contains_key(path) => return self.st.vars.get(path).cloned(),
            _ => self.st.vars.get(first)?.clone(),
        };
        for p in parts {
            cur = match cur {
                Value::Object(mut m) => m.remove(p)?,
                Value::Array(mut a) => {
                    let i: usize = p.parse().ok()?;
                    if i < a.len() {
                        a.swap_remove(i)
                    } else {
                        return None;
                    }
                }
                _ => return None,
            };
        }
        Some(cur)
    }

    fn render(&self, t: &str) -> String {
        self.render_with(t, false)
    }

    /// Replaces `{{path}}` with the variable's text (empty when unset);
    /// `encode` percent-encodes values for URLs.
    fn render_with(&self, t: &str, encode: bool) -> String {
        let mut out = String::with_capacity(t.len());
        let mut rest = t;
        while let Some(i) = rest.find("{{") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(j) = after.find("}}") else {
                out.push_str(&rest[i..]);
                return out;
            };
            let v = self
                .lookup(after[..j].trim())
                .map(|v| text_of(&v))
                .unwrap_or_default();
            if encode && !t[..t.len() - rest.len() + i].is_empty() {
                out.push_str(&url_encode(&v));
            } else {
                out.push_str(&v);
            }
            rest = &after[j + 2..];
        }
        out.push_str(rest);
        out
    }

    fn eval(&mut self, c: &Cond) -> bool {
        let now = |s: &mut Self| LocalTime::new(s.host.now_ms(), s.host.utc_offset_minutes());
        let day_in = |days: &[String], wd: u32| {
            days.iter().any(|d| {
                DAYS.get(wd as usize)
                    .is_some_and(|n| d.eq_ignore_ascii_case(n))
            })
        };
        match c {
            Cond::All(v) => v.iter().all(|c| self.eval(c)),
            Cond::Any(v) => v.iter().any(|c| self.eval(c)),
            Cond::Not(c) => !self.eval(c),
            Cond::Set(path) => self
                .lookup(path)
                .is_some_and(|v| !v.is_null() && !text_of(&v).is_empty()),
            Cond::Equals([a, b]) => self.render(a) == self.render(b),
            Cond::StartsWith([a, b]) => self.render(a).starts_with(&self.render(b)),
            Cond::Contains([a, b]) => self
                .render(a)
                .to_lowercase()
                .contains(&self.render(b).to_lowercase()),
            Cond::LessThan([a, b]) => {
                match (
                    self.render(a).trim().parse::<f64>(),
                    self.render(b).trim().parse::<f64>(),
                ) {
                    (Ok(x), Ok(y)) => x < y,
                    _ => false,
                }
            }
            Cond::OneOf { value, list } => {
                let v = self.render(value);
                list.contains(&v)
            }
            Cond::BusinessHours { days, open, close } => {
                let t = now(self);
                let (o, c) = (
                    parse_hhmm(open).unwrap_or(0),
                    parse_hhmm(close).unwrap_or(0),
                );
                day_in(days, t.weekday) && o <= t.minute_of_day && t.minute_of_day < c
            }
            Cond::Holiday(list) => {
                let t = now(self);
                list.iter().any(|d| match parse_date(d) {
                    Some((y, m, dd)) => {
                        y.is_none_or(|y| y == t.year) && m == t.month && dd == t.day
                    }
                    None => false,
                })
            }
            Cond::TimeBetween([a, b]) => {
                let t = now(self).minute_of_day;
                let (a, b) = (parse_hhmm(a).unwrap_or(0), parse_hhmm(b).unwrap_or(0));
                if a <= b {
                    a <= t && t < b
                } else {
                    t >= a || t < b
                }
            }
            Cond::Weekday(days) => {
                let t = now(self);
                day_in(days, t.weekday)
            }
        }
    }
}

/// The option a choice picks: `None` when there was no choice (no input),
/// `Some(None)` when it matches no option. Digits and keywords (trimmed,
/// any case) are both keys.
fn choose(options: &BTreeMap<String, String>, got: &Input2) -> Option<Option<String>> {
    let key = match got {
        Input2::Digits(d) => d.as_str(),
        Input2::Text(t) => t.trim(),
        _ => return None,
    };
    Some(
        options
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone()),
    )
}

/// One step down a dotted path: an object key or an array index.
/// Attributes handed over at an enqueue, at most.
const HANDED_VARS: usize = 64;
/// How deep objects are followed (`cargo.truck.plate`).
const HANDED_DEPTH: usize = 4;

/// `value` as attributes named from `prefix`: scalars as text, objects
/// flattened with dotted names, arrays as JSON, nulls left out. Values
/// are whole: the engine masks secrets in them, then cuts them to size.
fn flatten(prefix: &str, v: &Value, depth: usize, out: &mut Vec<(String, String)>) {
    if out.len() >= HANDED_VARS {
        return;
    }
    let text = match v {
        Value::Null => return,
        Value::Object(m) if depth < HANDED_DEPTH => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, depth + 1, out);
            }
            return;
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    out.push((prefix.to_string(), text));
}

fn descend(v: Value, p: &str) -> Option<Value> {
    match v {
        Value::Object(mut m) => m.remove(p),
        Value::Array(mut a) => {
            let i: usize = p.parse().ok()?;
            (i < a.len()).then(|| a.swap_remove(i))
        }
        _ => None,
    }
}

/// A variable's text: strings as they are, `null` as empty, anything else as JSON.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
