//! The flow document: types, parsing and validation.

use plugboard_core::Channel;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Schema identifier a document may carry in `"$schema"`.
pub const SCHEMA_ID: &str = "https://plugboard.dev/schemas/flow-v1.json";

/// Largest document accepted, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 256 << 10;

/// Most nodes in one document.
pub const MAX_NODES: usize = 500;

/// A document refused at deploy: which node, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{}", match .node { Some(n) => format!("node {n:?}: {}", .reason), None => .reason.clone() })]
pub struct FlowError {
    /// The node at fault, if one is.
    pub node: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl FlowError {
    fn doc(reason: impl Into<String>) -> Self {
        FlowError {
            node: None,
            reason: reason.into(),
        }
    }

    fn node(node: &str, reason: impl Into<String>) -> Self {
        FlowError {
            node: Some(node.to_string()),
            reason: reason.into(),
        }
    }
}

/// A validated flow document.
///
/// Deserialising a document straight into `Flow` (see [`Flow::load`]) reads
/// the same JSON without the deploy-time checks: the runtime path for
/// documents [`parse`] already accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    /// Node the flow begins at.
    pub start: String,
    /// Variables set when an interaction begins.
    #[serde(default)]
    pub vars: BTreeMap<String, Value>,
    /// Default language tag for spoken prompts.
    #[serde(default)]
    pub language: Option<String>,
    /// Default voice for spoken prompts.
    #[serde(default)]
    pub voice: Option<String>,
    /// The nodes by id.
    pub nodes: BTreeMap<String, Node>,
}

impl Flow {
    /// Reads a document that was validated at deploy, skipping the checks
    /// (unknown top-level keys such as `$schema` are ignored). A document
    /// that was never validated still cannot misbehave: a missing node or a
    /// loop without input ends the event with a [`crate::RunError`].
    pub fn load(text: &[u8]) -> Result<Flow, FlowError> {
        serde_json::from_slice(text)
            .map_err(|e| FlowError::doc(format!("not a flow document: {e}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    #[serde(rename = "$schema", default)]
    _schema: Option<String>,
    #[serde(default, rename = "name")]
    _name: Option<String>,
    #[serde(default, rename = "description")]
    _description: Option<String>,
    start: String,
    #[serde(default)]
    vars: BTreeMap<String, Value>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    voice: Option<String>,
    nodes: BTreeMap<String, Value>,
}

fn d_one() -> u32 {
    1
}
fn d_digits() -> u32 {
    20
}
fn d_timeout() -> u32 {
    5000
}
fn d_inter() -> u32 {
    3000
}
fn d_record_secs() -> u32 {
    120
}
fn d_true() -> bool {
    true
}
fn d_get() -> String {
    "GET".into()
}
fn d_recording() -> String {
    "recording".into()
}

/// One step of a flow. Edges name other nodes; templates `{{var}}` are
/// allowed in every text field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Node {
    /// Speak (voice) or reply (text channels).
    Say {
        /// Text, with templates.
        text: String,
        /// Voice.
        #[serde(default)]
        voice: Option<String>,
        /// Language tag.
        #[serde(default)]
        language: Option<String>,
        /// Next node; the flow ends without one.
        #[serde(default)]
        next: Option<String>,
    },
    /// Play an audio file (voice only; skipped on text channels).
    Play {
        /// URL or stored prompt name.
        url: String,
        /// Next node.
        #[serde(default)]
        next: Option<String>,
    },
    /// Offer choices: a digit (voice) or a keyword (text) leads to a node.
    Menu {
        /// The prompt.
        prompt: String,
        /// Digit or keyword → node.
        options: BTreeMap<String, String>,
        /// Digits to collect.
        #[serde(default = "d_one")]
        max_digits: u32,
        /// First-input timeout, ms.
        #[serde(default = "d_timeout")]
        timeout_ms: u32,
        /// Inter-digit timeout, ms.
        #[serde(default = "d_inter")]
        inter_digit_timeout_ms: u32,
        /// Accept speech (matched like keywords).
        #[serde(default)]
        speech: bool,
        /// Times to ask again on no input or no match before taking the edge.
        #[serde(default)]
        retries: u32,
        /// Said before the prompt when asking again.
        #[serde(default)]
        retry_prompt: Option<String>,
        /// Edge on no input (falls back to `no_match`).
        #[serde(default)]
        no_input: Option<String>,
        /// Edge on an unknown choice (falls back to `no_input`).
        #[serde(default)]
        no_match: Option<String>,
    },
    /// Collect digits or text into a variable.
    Gather {
        /// The prompt.
        prompt: String,
        /// Variable that receives the input.
        var: String,
        /// Most digits.
        #[serde(default = "d_digits")]
        max_digits: u32,
        /// Terminator key.
        #[serde(default)]
        terminator: Option<String>,
        /// First-input timeout, ms.
        #[serde(default = "d_timeout")]
        timeout_ms: u32,
        /// Inter-digit timeout, ms.
        #[serde(default = "d_inter")]
        inter_digit_timeout_ms: u32,
        /// Accept speech.
        #[serde(default)]
        speech: bool,
        /// Next node once input arrives.
        next: String,
        /// Edge on no input (the flow ends without one).
        #[serde(default)]
        no_input: Option<String>,
    },
    /// Call an HTTP service through the plugin's `http` grant.
    Http {
        /// Method.
        #[serde(default = "d_get")]
        method: String,
        /// URL, with templates (values are URL-encoded).
        url: String,
        /// Request headers.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Request body, with templates.
        #[serde(default)]
        body: Option<String>,
        /// Variable that receives the response body (parsed if JSON).
        into: String,
        /// Timeout, ms.
        #[serde(default)]
        timeout_ms: Option<u32>,
        /// Next node on a 2xx answer.
        next: String,
        /// Edge on a transport error or a non-2xx status.
        error: String,
        /// Edge when the service does not answer in time (default: `error`).
        #[serde(default)]
        timeout: Option<String>,
    },
    /// Set variables.
    Set {
        /// Variable → value (strings are templates).
        vars: BTreeMap<String, Value>,
        /// Next node.
        #[serde(default)]
        next: Option<String>,
    },
    /// Branch on a condition.
    Condition {
        /// The test.
        #[serde(rename = "if")]
        test: Cond,
        /// Edge when true.
        then: String,
        /// Edge when false.
        #[serde(rename = "else")]
        otherwise: String,
    },
    /// Let the customer choose a language; sets the `language` variable.
    Language {
        /// The prompt.
        prompt: String,
        /// Digit or keyword → language tag.
        options: BTreeMap<String, String>,
        /// First-input timeout, ms.
        #[serde(default = "d_timeout")]
        timeout_ms: u32,
        /// Next node (on no choice, the language stays as it was).
        next: String,
    },
    /// Queue for an agent. Ends the flow.
    Enqueue {
        /// Queue.
        queue: String,
        /// Priority.
        #[serde(default)]
        priority: u32,
        /// Required skills.
        #[serde(default)]
        skills: Vec<String>,
        /// Variables handed to the agent with the customer, as the
        /// interaction's attributes (the screen pop): names, or dotted
        /// paths into an object (`cargo.location`); an object is
        /// flattened. None by default: what the caller entered (a PIN, a
        /// card number) goes to the agent only when the flow says so.
        #[serde(default)]
        attributes: Vec<String>,
    },
    /// Blind transfer. Ends the flow.
    Transfer {
        /// Number, SIP URI or `queue:NAME`.
        target: String,
    },
    /// Record a message (voicemail); on text channels, take the next message.
    Record {
        /// Said first.
        #[serde(default)]
        prompt: Option<String>,
        /// Longest recording, s.
        #[serde(default = "d_record_secs")]
        max_secs: u32,
        /// Beep before recording.
        #[serde(default = "d_true")]
        beep: bool,
        /// Key that ends the recording.
        #[serde(default)]
        terminator: Option<String>,
        /// Variable receiving the recording id (or the message text).
        #[serde(default = "d_recording")]
        var: String,
        /// Next node.
        #[serde(default)]
        next: Option<String>,
        /// Edge when nothing was recorded.
        #[serde(default)]
        no_input: Option<String>,
    },
    /// Send a message on any channel.
    Send {
        /// Channel.
        channel: Channel,
        /// Recipient, with templates.
        to: String,
        /// Text, with templates.
        text: String,
        /// Subject (email).
        #[serde(default)]
        subject: Option<String>,
        /// Next node.
        #[serde(default)]
        next: Option<String>,
    },
    /// Send a fax (the text set on a page) to a number, from the
    /// tenant's fax address: `send` on the fax channel.
    SendFax {
        /// The number, with templates.
        to: String,
        /// Text, with templates.
        text: String,
        /// Next node.
        #[serde(default)]
        next: Option<String>,
    },
    /// Take the call as a fax (voice). Without `detect_secs` the call
    /// becomes a fax at once and the flow ends; with it, the flow goes on
    /// to `next` while a fax machine's calling tone (CNG) is listened for
    /// that long, and the call becomes a fax if it is heard. The fax is
    /// filed under the tenant's fax address `address` (default: its
    /// first).
    ReceiveFax {
        /// Listen for the fax tone this long (s) while the flow goes on.
        #[serde(default)]
        detect_secs: Option<u32>,
        /// The tenant's fax address the fax is filed under.
        #[serde(default)]
        address: Option<String>,
        /// Next node (with `detect_secs`).
        #[serde(default)]
        next: Option<String>,
    },
    /// End the interaction.
    Hangup {},
}

/// A condition. Operands are templates, e.g. `"{{caller}}"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Cond {
    /// Every one holds.
    All(Vec<Cond>),
    /// At least one holds.
    Any(Vec<Cond>),
    /// It does not hold.
    Not(Box<Cond>),
    /// The variable (dotted path) is set and not empty.
    Set(String),
    /// The two rendered strings are equal.
    Equals([String; 2]),
    /// The first starts with the second.
    StartsWith([String; 2]),
    /// The first contains the second (case-insensitive).
    Contains([String; 2]),
    /// Both parse as numbers and the first is smaller.
    LessThan([String; 2]),
    /// The rendered value is one of the list.
    OneOf {
        /// The value (template).
        value: String,
        /// Accepted values.
        list: Vec<String>,
    },
    /// Open hours in the tenant's time zone.
    BusinessHours {
        /// Days open: `mon` … `sun`.
        days: Vec<String>,
        /// Opening time `HH:MM` (inclusive).
        open: String,
        /// Closing time `HH:MM` (exclusive).
        close: String,
    },
    /// Today (tenant time) is one of these dates: `MM-DD` every year or `YYYY-MM-DD`.
    Holiday(Vec<String>),
    /// Local time of day in `[from, to)`; wraps past midnight when `from > to`.
    TimeBetween([String; 2]),
    /// Today is one of these days: `mon` … `sun`.
    Weekday(Vec<String>),
}

impl Node {
    /// The edges leaving this node, with their names.
    pub fn edges(&self) -> Vec<(&'static str, &str)> {
        fn opt<'a>(
            name: &'static str,
            v: &'a Option<String>,
            e: &mut Vec<(&'static str, &'a str)>,
        ) {
            if let Some(v) = v {
                e.push((name, v.as_str()));
            }
        }
        let mut e: Vec<(&'static str, &str)> = Vec::new();
        match self {
            Node::Say { next, .. }
            | Node::Play { next, .. }
            | Node::Set { next, .. }
            | Node::Send { next, .. }
            | Node::SendFax { next, .. }
            | Node::ReceiveFax { next, .. } => opt("next", next, &mut e),
            Node::Menu {
                options,
                no_input,
                no_match,
                ..
            } => {
                for v in options.values() {
                    e.push(("match", v.as_str()));
                }
                opt("no_input", no_input, &mut e);
                opt("no_match", no_match, &mut e);
            }
            Node::Gather { next, no_input, .. } => {
                e.push(("next", next.as_str()));
                opt("no_input", no_input, &mut e);
            }
            Node::Http {
                next,
                error,
                timeout,
                ..
            } => {
                e.push(("next", next.as_str()));
                e.push(("error", error.as_str()));
                opt("timeout", timeout, &mut e);
            }
            Node::Condition {
                then, otherwise, ..
            } => {
                e.push(("then", then.as_str()));
                e.push(("else", otherwise.as_str()));
            }
            Node::Language { next, .. } => e.push(("next", next.as_str())),
            Node::Record { next, no_input, .. } => {
                opt("next", next, &mut e);
                opt("no_input", no_input, &mut e);
            }
            Node::Enqueue { .. } | Node::Transfer { .. } | Node::Hangup {} => {}
        }
        e
    }

    /// Whether the node waits for the customer (ends a step).
    pub fn waits(&self) -> bool {
        matches!(
            self,
            Node::Menu { .. } | Node::Gather { .. } | Node::Language { .. } | Node::Record { .. }
        )
    }

    fn templates(&self) -> Vec<&str> {
        let mut t: Vec<&str> = Vec::new();
        match self {
            Node::Say { text, .. } => t.push(text),
            Node::Play { url, .. } => t.push(url),
            Node::Menu {
                prompt,
                retry_prompt,
                ..
            } => {
                t.push(prompt);
                t.extend(retry_prompt.as_deref());
            }
            Node::Gather { prompt, .. } | Node::Language { prompt, .. } => t.push(prompt),
            Node::Http {
                url, headers, body, ..
            } => {
                t.push(url);
                t.extend(headers.values().map(String::as_str));
                t.extend(body.as_deref());
            }
            Node::Set { vars, .. } => t.extend(vars.values().filter_map(Value::as_str)),
            Node::Record { prompt, .. } => t.extend(prompt.as_deref()),
            Node::Send {
                to, text, subject, ..
            } => {
                t.push(to);
                t.push(text);
                t.extend(subject.as_deref());
            }
            Node::SendFax { to, text, .. } => {
                t.push(to);
                t.push(text);
            }
            Node::ReceiveFax { .. } => {}
            Node::Condition { .. }
            | Node::Enqueue { .. }
            | Node::Transfer { .. }
            | Node::Hangup {} => {}
        }
        t
    }
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'?')
}

/// Checks a template's `{{…}}` pairs.
pub fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err(format!("unclosed '{{{{' in {t:?}"));
        };
        let name = after[..j].trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        {
            return Err(format!("bad variable name {name:?} in {t:?}"));
        }
        rest = &after[j + 2..];
    }
    Ok(())
}

/// Parses `HH:MM` into minutes of the day.
pub(crate) fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

/// Day names, Monday first.
pub(crate) const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn check_cond(c: &Cond) -> Result<(), String> {
    let days = |ds: &[String]| {
        ds.iter().try_for_each(|d| {
            if DAYS.contains(&d.to_ascii_lowercase().as_str()) {
                Ok(())
            } else {
                Err(format!("unknown day {d:?} (use mon … sun)"))
            }
        })
    };
    let time = |t: &str| {
        parse_hhmm(t)
            .map(|_| ())
            .ok_or(format!("bad time {t:?} (use HH:MM)"))
    };
    match c {
        Cond::All(v) | Cond::Any(v) => v.iter().try_for_each(check_cond),
        Cond::Not(c) => check_cond(c),
        Cond::Set(v) => check_template(&format!("{{{{{v}}}}}")),
        Cond::Equals(p) | Cond::StartsWith(p) | Cond::Contains(p) | Cond::LessThan(p) => {
            p.iter().try_for_each(|t| check_template(t))
        }
        Cond::OneOf { value, .. } => check_template(value),
        Cond::BusinessHours {
            days: d,
            open,
            close,
        } => {
            days(d)?;
            time(open)?;
            time(close)
        }
        Cond::Holiday(list) => list.iter().try_for_each(|h| {
            crate::time::parse_date(h)
                .map(|_| ())
                .ok_or(format!("bad date {h:?} (use MM-DD or YYYY-MM-DD)"))
        }),
        Cond::TimeBetween([a, b]) => {
            time(a)?;
            time(b)
        }
        Cond::Weekday(d) => days(d),
    }
}

fn check_node(id: &str, n: &Node) -> Result<(), FlowError> {
    for t in n.templates() {
        check_template(t).map_err(|r| FlowError::node(id, r))?;
    }
    let fail = |r: &str| Err(FlowError::node(id, r));
    match n {
        Node::Menu {
            options,
            max_digits,
            ..
        } => {
            if options.is_empty() {
                return fail("a menu needs at least one option");
            }
            if *max_digits == 0 || *max_digits > 32 {
                return fail("max_digits must be 1–32");
            }
        }
        Node::Language { options, .. } if options.is_empty() => {
            return fail("a language choice needs at least one option");
        }
        Node::Gather {
            max_digits, var, ..
        } => {
            if *max_digits == 0 || *max_digits > 64 {
                return fail("max_digits must be 1–64");
            }
            check_template(&format!("{{{{{var}}}}}")).map_err(|r| FlowError::node(id, r))?;
        }
        Node::Http { method, url, .. } => {
            if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
                .contains(&method.to_ascii_uppercase().as_str())
            {
                return fail(&format!("unknown HTTP method {method:?}"));
            }
            if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("{{"))
            {
                return fail("url must start with http:// or a template");
            }
        }
        Node::Condition { test, .. } => check_cond(test).map_err(|r| FlowError::node(id, r))?,
        Node::Enqueue { queue, .. } if queue.is_empty() => return fail("queue must not be empty"),
        Node::Transfer { target } if target.is_empty() => {
            return fail("target must not be empty");
        }
        Node::SendFax { to, .. } if to.is_empty() => return fail("to must not be empty"),
        Node::ReceiveFax {
            detect_secs: Some(s),
            ..
        } if !(1..=60).contains(s) => return fail("detect_secs must be 1–60"),
        Node::ReceiveFax {
            detect_secs: None,
            next: Some(_),
            ..
        } => {
            return fail(
                "a receive_fax without detect_secs ends the flow (the call is a fax): it has no next",
            );
        }
        _ => {}
    }
    Ok(())
}

/// The result of parsing: the flow and any warnings (unreachable nodes).
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The flow.
    pub flow: Flow,
    /// Things worth telling the author that do not stop the deploy.
    pub warnings: Vec<String>,
}

/// Parses and validates a document: every node known and well formed, every
/// edge pointing at a node, and no loop that never waits for the customer.
pub fn parse(text: &[u8]) -> Result<Parsed, FlowError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(FlowError::doc(format!(
            "document is {} bytes; the limit is {MAX_DOCUMENT_BYTES}",
            text.len()
        )));
    }
    let raw: RawDoc = serde_json::from_slice(text)
        .map_err(|e| FlowError::doc(format!("not a flow document: {e}")))?;
    if raw.nodes.is_empty() {
        return Err(FlowError::doc("the document has no nodes"));
    }
    if raw.nodes.len() > MAX_NODES {
        return Err(FlowError::doc(format!(
            "{} nodes; the limit is {MAX_NODES}",
            raw.nodes.len()
        )));
    }
    let mut nodes = BTreeMap::new();
    for (id, v) in raw.nodes {
        if !valid_node_id(&id) {
            return Err(FlowError::node(
                &id,
                "node ids are 1–64 characters of letters, digits, '_', '-' or '?'",
            ));
        }
        let ty = v.get("type").and_then(Value::as_str).map(str::to_string);
        let node: Node = serde_json::from_value(v).map_err(|e| {
            let msg = e.to_string();
            match ty {
                None => FlowError::node(&id, "missing \"type\""),
                Some(t) if msg.starts_with("unknown variant") => FlowError::node(
                    &id,
                    format!(
                        "unknown node type {t:?} (known: say, play, menu, gather, http, set, condition, language, enqueue, transfer, record, send, send_fax, receive_fax, hangup)"
                    ),
                ),
                Some(t) => FlowError::node(&id, format!("invalid {t} node: {msg}")),
            }
        })?;
        check_node(&id, &node)?;
        nodes.insert(id, node);
    }
    if !nodes.contains_key(&raw.start) {
        return Err(FlowError::doc(format!(
            "start node {:?} does not exist",
            raw.start
        )));
    }
    for (id, n) in &nodes {
        for (edge, to) in n.edges() {
            if !nodes.contains_key(to) {
                return Err(FlowError::node(
                    id,
                    format!("edge {edge:?} points to {to:?}, which does not exist"),
                ));
            }
        }
    }
    if let Some(id) = find_loop_without_input(&nodes) {
        return Err(FlowError::node(
            &id,
            "is on a loop that never waits for input (add a menu, gather or record on the loop)",
        ));
    }
    let reachable = reachable(&nodes, &raw.start);
    let warnings = nodes
        .keys()
        .filter(|k| !reachable.contains(k.as_str()))
        .map(|k| format!("node {k:?} is unreachable from {:?}", raw.start))
        .collect();
    Ok(Parsed {
        flow: Flow {
            start: raw.start,
            vars: raw.vars,
            language: raw.language,
            voice: raw.voice,
            nodes,
        },
        warnings,
    })
}

fn reachable<'a>(nodes: &'a BTreeMap<String, Node>, start: &'a str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(n) = todo.pop() {
        if seen.insert(n)
            && let Some(node) = nodes.get(n)
        {
            todo.extend(node.edges().into_iter().map(|(_, to)| to));
        }
    }
    seen
}

/// A node on a cycle made only of nodes that do not wait for input, if any.
fn find_loop_without_input(nodes: &BTreeMap<String, Node>) -> Option<String> {
    // Iterative three-colour DFS over the non-waiting nodes.
    #[derive(Clone, Copy, PartialEq)]
    enum C {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, C> = nodes.keys().map(|k| (k.as_str(), C::White)).collect();
    let next = |id: &str| -> Vec<&str> {
        match nodes.get(id) {
            Some(n) if !n.waits() => n
                .edges()
                .into_iter()
                .map(|(_, to)| to)
                .filter(|to| nodes.get(*to).is_some_and(|t| !t.waits()))
                .collect(),
            _ => Vec::new(),
        }
    };
    for root in nodes.keys() {
        if colour[root.as_str()] != C::White || nodes[root].waits() {
            continue;
        }
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(root.as_str(), next(root))];
        colour.insert(root.as_str(), C::Grey);
        while let Some((id, children)) = stack.last_mut() {
            if let Some(c) = children.pop() {
                match colour[c] {
                    C::Grey => return Some(c.to_string()),
                    C::White => {
                        colour.insert(c, C::Grey);
                        let n = next(c);
                        stack.push((c, n));
                    }
                    C::Black => {}
                }
            } else {
                colour.insert(id, C::Black);
                stack.pop();
            }
        }
    }
    None
}
