//! Usage metering for billing: every billable unit, per tenant, durably
//! and once.
//!
//! The ledger is a record kind of the tenant's store, [`USAGE`], whose ids
//! start with the unit's time (13 digits of ms) so that a period is one
//! range read. What is recorded, and how each is kept to once:
//!
//! - **Call legs** (`call`): each answered SIP leg, inbound or outbound,
//!   with its trunk, when it ends, under an id made of its end time and
//!   its dialog, fixed before the first try: a retried write overwrites
//!   itself. A leg cut by a crash of the node is not billed.
//! - **Messages** (`message`): each message received or sent on chat,
//!   email or SMS, in the same atomic write as the message itself.
//! - **Recordings** (`recording`): bytes and length of each stored call
//!   recording, with the recording.
//! - **Seats** (`seat`): the time each agent is signed in (any presence
//!   but offline), cut at every hour and written as it runs, every
//!   [`FLUSH_EVERY`], under an id named after the agent and the hour's
//!   start of the stretch (an overwrite); a crash loses at most the last
//!   interval.
//! - **Plugins** (`plugins`): invocations, their time and HTTP calls,
//!   summed in memory per tenant and hour and written every
//!   [`FLUSH_EVERY`] as this process's running total for that hour (an
//!   overwrite, so a repeated write cannot double it); a crash loses at
//!   most the last interval's counts, never counts twice.
//!
//! Periods are summed at read time ([`Engine::usage`]); calls are billed
//! per started minute of each leg, as carriers bill.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugboard_core::message::{Direction, Message};
use plugboard_core::{Error as CoreError, now_ms};
use plugboard_host::Report;
use plugboard_store::RecordWrite;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Engine, EngineResult};

/// The ledger's record kind.
pub const USAGE: &str = "usage";
/// Tries of a call leg's or recording's usage write.
const WRITE_TRIES: u32 = 5;
/// How often plugin usage is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The ledger id of a unit at `at_ms` named `key`.
fn ledger_id(at_ms: u64, key: &str) -> String {
    format!("{at_ms:013}-{key}")
}

/// Which way a call leg went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallDirection {
    /// A call to one of the tenant's addresses.
    Inbound,
    /// A leg the platform dialled for the tenant.
    Outbound,
}

/// One answered call leg, as it ends.
#[derive(Debug, Clone)]
pub struct CallUsage {
    /// Tenant.
    pub tenant: String,
    /// The leg's unique name (its dialog).
    pub key: String,
    /// Which way.
    pub direction: CallDirection,
    /// The tenant's trunk it used, if any.
    pub trunk: Option<String>,
    /// Answered, ms since the epoch.
    pub answered_ms: u64,
    /// Ended, ms since the epoch.
    pub ended_ms: u64,
}

/// The ledger write for a message (put in the message's own write), with
/// the bytes it stored (attachments, raw mail).
pub(crate) fn message_write(m: &Message, bytes: u64) -> RecordWrite {
    let direction = match m.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    RecordWrite::put(
        USAGE,
        ledger_id(m.created_ms, &format!("m-{}", m.id)),
        json!({"unit": "message", "at_ms": m.created_ms, "channel": m.channel, "direction": direction, "bytes": bytes}),
    )
}

/// The ledger write for a stored recording.
pub(crate) fn recording_unit(id: &str, at: u64, bytes: usize, length_ms: u64) -> (String, Value) {
    (
        ledger_id(at, &format!("r-{id}")),
        json!({"unit": "recording", "at_ms": at, "bytes": bytes, "ms": length_ms}),
    )
}

/// The ledger write for a blob deleted (erasure, retention): its bytes
/// no longer count as stored.
pub(crate) fn freed_unit(id: &str, at: u64, bytes: u64) -> (String, Value) {
    (
        ledger_id(at, &format!("f-{id}")),
        json!({"unit": "freed", "at_ms": at, "freed": bytes}),
    )
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct PluginHour {
    invocations: u64,
    micros: u64,
    http_calls: u64,
}

/// Plugin usage summed in memory until the next flush, and the call
/// usage writes under way.
#[derive(Debug)]
pub(crate) struct UsageMeter {
    /// This process's name in the ledger's ids.
    run: String,
    /// (tenant, hour) → totals, and whether they changed since written.
    hours: Mutex<HashMap<(String, u64), (PluginHour, bool)>>,
    /// Call usage writes started and not finished.
    writing: Arc<AtomicUsize>,
    /// Agents signed in: (tenant, agent) → start of the stretch being
    /// counted.
    seats: Mutex<HashMap<(String, String), u64>>,
    /// Stretches that ended, to write with the next flush.
    closed_seats: Mutex<Vec<(String, String, u64, u64)>>,
    /// One flush at a time: a running stretch's snapshot never lands
    /// after its final write.
    flushing: tokio::sync::Mutex<()>,
    /// One sum of a ledger's stored bytes at a time.
    summing: tokio::sync::Mutex<()>,
}

impl UsageMeter {
    /// Sizes for `/metrics`: hours of usage not yet written (dropped
    /// once written, every 10 s), agents signed in, and call usage
    /// writes under way.
    pub(crate) fn table_sizes(&self) -> Vec<(&'static str, usize, Option<usize>)> {
        vec![
            (
                "usage_hours",
                self.hours.lock().map(|h| h.len()).unwrap_or(0),
                None,
            ),
            (
                "usage_seats",
                self.seats.lock().map(|s| s.len()).unwrap_or(0),
                None,
            ),
            (
                "usage_call_writes",
                self.writing.load(Ordering::Relaxed),
                None,
            ),
        ]
    }

    pub(crate) fn new(run: String) -> Self {
        UsageMeter {
            run,
            hours: Mutex::new(HashMap::new()),
            writing: Arc::default(),
            seats: Mutex::new(HashMap::new()),
            closed_seats: Mutex::new(Vec::new()),
            flushing: tokio::sync::Mutex::new(()),
            summing: tokio::sync::Mutex::new(()),
        }
    }

    /// An agent's presence changed: signed in (anything but offline) or
    /// out; a stretch that ends is written with the next flush.
    pub(crate) fn seat(&self, tenant: &str, agent: &str, online: bool) {
        let key = (tenant.to_string(), agent.to_string());
        let Ok(mut s) = self.seats.lock() else {
            return;
        };
        if online {
            s.entry(key).or_insert_with(now_ms);
        } else if let Some(start) = s.remove(&key)
            && let Ok(mut closed) = self.closed_seats.lock()
        {
            closed.push((key.0, key.1, start, now_ms()));
        }
    }

    /// The stretches to write now: those that ended, then each signed-in
    /// agent's, cut at hour boundaries (the closed hours, then the running
    /// one, whose start moves to its hour).
    fn seat_stretches(&self) -> Vec<(String, String, u64, u64)> {
        let now = now_ms();
        let mut out = self
            .closed_seats
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        let Ok(mut s) = self.seats.lock() else {
            return out;
        };
        for ((tenant, agent), start) in s.iter_mut() {
            while *start / HOUR_MS < now / HOUR_MS {
                let end = (*start / HOUR_MS + 1) * HOUR_MS;
                out.push((tenant.clone(), agent.clone(), *start, end));
                *start = end;
            }
            out.push((tenant.clone(), agent.clone(), *start, now));
        }
        out
    }

    pub(crate) fn add<T>(&self, tenant: &str, report: &Report<T>) {
        let hour = now_ms() / HOUR_MS * HOUR_MS;
        let http = report.calls.iter().filter(|c| c.call == "http").count() as u64;
        if let Ok(mut h) = self.hours.lock() {
            let (t, dirty) = h.entry((tenant.to_string(), hour)).or_default();
            t.invocations += 1;
            t.micros += report.elapsed_us;
            t.http_calls += http;
            *dirty = true;
        }
    }

    /// The totals changed since the last flush (marked clean: a failed
    /// write marks them again).
    fn take_dirty(&self) -> Vec<(String, u64, PluginHour)> {
        let Ok(mut h) = self.hours.lock() else {
            return Vec::new();
        };
        h.iter_mut()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|((t, hour), (p, dirty))| {
                *dirty = false;
                (t.clone(), *hour, *p)
            })
            .collect()
    }

    /// A write of the hour's totals failed: written again next time.
    fn mark_dirty(&self, tenant: &str, hour: u64) {
        if let Ok(mut h) = self.hours.lock()
            && let Some((_, dirty)) = h.get_mut(&(tenant.to_string(), hour))
        {
            *dirty = true;
        }
    }

    /// Forgets the hours before the current one whose totals are written.
    fn forget_written(&self) {
        let now_hour = now_ms() / HOUR_MS * HOUR_MS;
        if let Ok(mut h) = self.hours.lock() {
            h.retain(|(_, hour), (_, dirty)| *hour >= now_hour || *dirty);
        }
    }
}

/// The ledger record of an agent's signed-in stretch.
fn seat_record(agent: &str, start: u64, end: u64) -> (String, Value) {
    (
        ledger_id(start, &format!("s-{agent}")),
        json!({"unit": "seat", "at_ms": start, "agent": agent, "ms": end.saturating_sub(start)}),
    )
}

/// How a period is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// By UTC hour.
    Hour,
    /// By UTC day.
    Day,
    /// The whole period as one row.
    Total,
}

impl std::str::FromStr for Granularity {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "total" => Ok(Granularity::Total),
            _ => Err(CoreError::Invalid(
                "granularity is hour, day or total".into(),
            )),
        }
    }
}

/// One period's usage of one tenant.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UsageRow {
    /// Tenant.
    pub tenant: String,
    /// Period start, ms since the epoch (UTC).
    pub from_ms: u64,
    /// Answered call legs, by `inbound`/`outbound` and trunk (`-` for
    /// none): `[legs, seconds, billed minutes]`.
    pub calls: BTreeMap<String, CallTotals>,
    /// Messages by `channel/direction`.
    pub messages: BTreeMap<String, u64>,
    /// Recordings stored.
    pub recordings: u64,
    /// Their bytes.
    pub recording_bytes: u64,
    /// Their length, seconds.
    pub recording_seconds: f64,
    /// Plugin invocations.
    pub plugin_invocations: u64,
    /// Their time, ms (instantiation and call, wall clock).
    pub plugin_ms: f64,
    /// HTTP requests plugins made.
    pub plugin_http_calls: u64,
    /// Agents' signed-in time, hours.
    pub seat_hours: f64,
    /// Bytes stored: recordings, attachments, raw mail.
    pub stored_bytes: u64,
    /// Bytes deleted (erasure, retention).
    pub freed_bytes: u64,
}

/// Call legs of one direction and trunk.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct CallTotals {
    /// Answered legs.
    pub legs: u64,
    /// Their length, seconds.
    pub seconds: f64,
    /// Billed minutes: each leg's started minutes.
    pub minutes: u64,
}

impl UsageRow {
    fn add(&mut self, r: &Value) {
        let u64_of = |k: &str| r[k].as_u64().unwrap_or(0);
        match r["unit"].as_str() {
            Some("call") => {
                let key = format!(
                    "{}/{}",
                    r["direction"].as_str().unwrap_or("-"),
                    r["trunk"].as_str().unwrap_or("-")
                );
                let ms = u64_of("ms");
                let c = self.calls.entry(key).or_default();
                c.legs += 1;
                c.seconds += ms as f64 / 1000.0;
                c.minutes += ms.div_ceil(60_000);
            }
            Some("message") => {
                let key = format!(
                    "{}/{}",
                    r["channel"].as_str().unwrap_or("-"),
                    r["direction"].as_str().unwrap_or("-")
                );
                *self.messages.entry(key).or_default() += 1;
                self.stored_bytes += u64_of("bytes");
            }
            Some("recording") => {
                self.recordings += 1;
                self.recording_bytes += u64_of("bytes");
                self.stored_bytes += u64_of("bytes");
                self.recording_seconds += u64_of("ms") as f64 / 1000.0;
            }
            Some("seat") => self.seat_hours += u64_of("ms") as f64 / HOUR_MS as f64,
            Some("freed") => self.freed_bytes += u64_of("freed"),
            Some("plugins") => {
                self.plugin_invocations += u64_of("invocations");
                self.plugin_ms += u64_of("micros") as f64 / 1000.0;
                self.plugin_http_calls += u64_of("http_calls");
            }
            _ => {}
        }
    }

    /// The row as CSV lines (`tenant,from,kind,detail,quantity,unit`).
    pub fn csv(&self, out: &mut String) {
        use std::fmt::Write;
        let from = jiff::Timestamp::from_millisecond(self.from_ms as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut line = |kind: &str, detail: &str, q: String, unit: &str| {
            let _ = writeln!(out, "{},{from},{kind},{detail},{q},{unit}", self.tenant);
        };
        for (k, c) in &self.calls {
            line("call", k, c.legs.to_string(), "legs");
            line("call", k, format!("{:.3}", c.seconds), "seconds");
            line("call", k, c.minutes.to_string(), "minutes");
        }
        for (k, n) in &self.messages {
            line("message", k, n.to_string(), "messages");
        }
        if self.recordings > 0 {
            line("recording", "-", self.recordings.to_string(), "recordings");
            line("recording", "-", self.recording_bytes.to_string(), "bytes");
            line(
                "recording",
                "-",
                format!("{:.3}", self.recording_seconds),
                "seconds",
            );
        }
        if self.stored_bytes > 0 {
            line("storage", "-", self.stored_bytes.to_string(), "bytes");
        }
        if self.freed_bytes > 0 {
            line("storage", "freed", self.freed_bytes.to_string(), "bytes");
        }
        if self.seat_hours > 0.0 {
            line("seat", "-", format!("{:.4}", self.seat_hours), "hours");
        }
        if self.plugin_invocations > 0 {
            line(
                "plugin",
                "-",
                self.plugin_invocations.to_string(),
                "invocations",
            );
            line("plugin", "-", format!("{:.3}", self.plugin_ms), "ms");
            line(
                "plugin",
                "-",
                self.plugin_http_calls.to_string(),
                "http_calls",
            );
        }
    }
}

/// The CSV header of [`UsageRow::csv`].
pub const CSV_HEADER: &str = "tenant,from,kind,detail,quantity,unit\n";

/// The longest period one usage request reads.
const MAX_PERIOD_MS: u64 = 366 * DAY_MS;

impl Engine {
    /// Writes one unit of the ledger, trying again (200 ms, then
    /// doubling, between) up to [`WRITE_TRIES`] times: its id is fixed,
    /// so a retry writes the same record again. A last failure is logged.
    pub(crate) async fn write_unit(&self, tenant: &str, (id, record): (String, Value)) {
        for attempt in 0..WRITE_TRIES {
            match self.store.set_record(tenant, USAGE, &id, &record).await {
                Ok(()) => return,
                Err(e) if attempt + 1 == WRITE_TRIES => {
                    tracing::error!("usage {id} of {tenant} not recorded: {e}");
                }
                Err(e) => {
                    tracing::warn!("usage {id} of {tenant} (trying again): {e}");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }

    /// Records an answered call leg that ended, in a task of its own
    /// ([`Engine::flush_usage`] waits for it); its id is its end time and
    /// dialog, so the leg is recorded once.
    pub fn spawn_call_usage(self: &Arc<Self>, u: CallUsage) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "usage of call leg {} of {} not recorded: no runtime",
                u.key,
                u.tenant
            );
            return;
        };
        let record = json!({
            "unit": "call",
            "at_ms": u.ended_ms,
            "direction": u.direction,
            "trunk": u.trunk,
            "ms": u.ended_ms.saturating_sub(u.answered_ms),
        });
        let unit = (ledger_id(u.ended_ms, &format!("c-{}", u.key)), record);
        let writing = self.usage_meter.writing.clone();
        writing.fetch_add(1, Ordering::SeqCst);
        let app = self.clone();
        rt.spawn(async move {
            app.write_unit(&u.tenant, unit).await;
            writing.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Counts a plugin invocation in the tenant's usage (written with the
    /// next flush).
    pub(crate) fn meter_plugin<T>(&self, tenant: &str, report: &Report<T>) {
        self.usage_meter.add(tenant, report);
    }

    /// Records an agent's presence change for their seat time.
    pub(crate) fn meter_seat(&self, tenant: &str, agent: &str, online: bool) {
        self.usage_meter.seat(tenant, agent, online);
    }

    /// Writes the plugin usage counted since the last flush, after the
    /// call usage writes under way (waited for 5 s at most).
    pub async fn flush_usage(&self) {
        for _ in 0..500 {
            if self.usage_meter.writing.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _one = self.usage_meter.flushing.lock().await;
        for (tenant, agent, start, end) in self.usage_meter.seat_stretches() {
            let (id, record) = seat_record(&agent, start, end);
            if let Err(e) = self.store.set_record(&tenant, USAGE, &id, &record).await {
                tracing::warn!("seat time of {agent} of {tenant} not written: {e}");
            }
        }
        for (tenant, hour, p) in self.usage_meter.take_dirty() {
            let id = ledger_id(hour, &format!("p-{}", self.usage_meter.run));
            let record = json!({
                "unit": "plugins",
                "at_ms": hour,
                "invocations": p.invocations,
                "micros": p.micros,
                "http_calls": p.http_calls,
            });
            if let Err(e) = self.store.set_record(&tenant, USAGE, &id, &record).await {
                tracing::warn!("plugin usage of {tenant} not written (retried): {e}");
                self.usage_meter.mark_dirty(&tenant, hour);
            }
        }
        self.usage_meter.forget_written();
    }

    /// Writes plugin usage every [`FLUSH_EVERY`] until the engine goes.
    pub fn start_usage_flusher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(app) = weak.upgrade() else { return };
                app.flush_usage().await;
                // Webhook deliveries that wait in the store only.
                app.unpark_hooks();
            }
        });
    }

    /// A tenant's usage from `from_ms` (inclusive) to `to_ms` (exclusive),
    /// cut by `granularity` (UTC hours or days), oldest first; periods
    /// without usage are left out.
    pub async fn usage(
        &self,
        tenant: &str,
        from_ms: u64,
        to_ms: u64,
        granularity: Granularity,
    ) -> EngineResult<Vec<UsageRow>> {
        if to_ms <= from_ms || to_ms - from_ms > MAX_PERIOD_MS {
            return Err(CoreError::Invalid(
                "from must be before to, at most 366 days apart".into(),
            )
            .into());
        }
        let bucket = |at: u64| match granularity {
            Granularity::Hour => at / HOUR_MS * HOUR_MS,
            Granularity::Day => at / DAY_MS * DAY_MS,
            Granularity::Total => from_ms,
        };
        let mut rows: BTreeMap<u64, UsageRow> = BTreeMap::new();
        // Ids sort by time: from just before the period's first ms.
        let after = format!("{:013}", from_ms.saturating_sub(1)) + "~";
        let end = format!("{to_ms:013}");
        self.read_ledger(tenant, after, Some(&end), |r| {
            let at = r["at_ms"].as_u64().unwrap_or(0);
            if at >= from_ms {
                let from = bucket(at);
                rows.entry(from)
                    .or_insert_with(|| UsageRow {
                        tenant: tenant.to_string(),
                        from_ms: from,
                        ..Default::default()
                    })
                    .add(r);
            }
        })
        .await?;
        Ok(rows.into_values().collect())
    }

    /// Reads a tenant's ledger page by page from after `after` (ids in
    /// time order) up to `end` (exclusive; the end when `None`).
    async fn read_ledger(
        &self,
        tenant: &str,
        mut after: String,
        end: Option<&str>,
        mut each: impl FnMut(&Value),
    ) -> EngineResult<()> {
        loop {
            let page = self
                .store
                .records_after(tenant, USAGE, &after, 1000)
                .await?;
            let last = page.len() < 1000;
            for (id, r) in page {
                if end.is_some_and(|e| id.as_str() >= e) {
                    return Ok(());
                }
                each(&r);
                after = id;
            }
            if last {
                return Ok(());
            }
        }
    }

    /// The bytes a tenant stores (recordings, attachments, raw mail), from
    /// its ledger, summed at most every 10 minutes and counted up in
    /// between by what this node stores.
    pub async fn stored_bytes(&self, tenant: &str) -> EngineResult<u64> {
        if let Some(b) = self.capacity().stored(tenant) {
            return Ok(b);
        }
        // One sum at a time; whoever waited finds it done.
        let _one = self.usage_meter.summing.lock().await;
        if let Some(b) = self.capacity().stored(tenant) {
            return Ok(b);
        }
        let (mut total, mut freed) = (0u64, 0u64);
        self.read_ledger(tenant, String::new(), None, |r| {
            total += r["bytes"].as_u64().unwrap_or(0);
            freed += r["freed"].as_u64().unwrap_or(0);
        })
        .await?;
        let total = total.saturating_sub(freed);
        self.capacity().set_stored(tenant, total);
        Ok(total)
    }

    /// Whether the tenant may store `adding` more bytes within its
    /// storage limit; a refusal is counted and on its event stream.
    pub(crate) async fn check_storage(&self, tenant: &str, adding: u64) -> EngineResult<()> {
        let Some(mib) = self.capacity().limits(tenant).storage_mib else {
            return Ok(());
        };
        if self.stored_bytes(tenant).await? + adding <= mib << 20 {
            return Ok(());
        }
        let r = crate::capacity::Refusal::Storage(mib);
        self.capacity().count_refusal(tenant, &r);
        self.capacity_refused(tenant, "storage", &r, json!({"bytes": adding}));
        Err(r.into())
    }

    /// Every tenant's usage over a period (the operator's view).
    pub async fn usage_all(
        &self,
        from_ms: u64,
        to_ms: u64,
        granularity: Granularity,
    ) -> EngineResult<Vec<UsageRow>> {
        let mut out = Vec::new();
        for t in self.tenants().await? {
            out.extend(self.usage(&t.id, from_ms, to_ms, granularity).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_row_sums_units_and_bills_started_minutes() {
        let mut row = UsageRow::default();
        for ms in [1, 60_000, 60_001] {
            row.add(&json!({"unit": "call", "direction": "inbound", "trunk": null, "ms": ms}));
        }
        row.add(&json!({"unit": "message", "channel": "chat", "direction": "inbound"}));
        row.add(&json!({"unit": "plugins", "invocations": 3, "micros": 1500, "http_calls": 1}));
        let c = row.calls["inbound/-"];
        assert_eq!((c.legs, c.minutes), (3, 4));
        assert!((c.seconds - 120.002).abs() < 1e-9);
        assert_eq!(row.messages["chat/inbound"], 1);
        assert_eq!(row.plugin_invocations, 3);
        let mut csv = String::new();
        row.csv(&mut csv);
        assert!(csv.contains(",call,inbound/-,4,minutes\n"), "{csv}");
    }

    #[test]
    fn plugin_hours_are_taken_once_until_they_change() {
        let m = UsageMeter::new("run".into());
        let report: Report<()> = Report {
            outcome: Ok(()),
            logs: Vec::new(),
            calls: Vec::new(),
            elapsed_us: 10,
            memory_bytes: 0,
        };
        m.add("a", &report);
        m.add("a", &report);
        let taken = m.take_dirty();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].2.invocations, 2);
        assert!(m.take_dirty().is_empty());
        m.add("a", &report);
        // The running total of the hour, not the difference.
        assert_eq!(m.take_dirty()[0].2.invocations, 3);
    }
}
