//! The node's in-memory tables as `/metrics` shows them: how many entries
//! each holds and its bound, so that an operator sees a table that fills
//! (and the soak benchmark sees which one grew).
//!
//! Components register a reader when they start (the voice endpoint, the
//! ACD, the chat hub …); `/metrics` calls each at every scrape. Readers
//! must be cheap and must not block: an atomic the owner keeps up to date,
//! or a `len()` under a std lock held for microseconds.

use std::fmt::Write as _;
use std::sync::Mutex;

/// Reads a table's current number of entries.
type Reader = Box<dyn Fn() -> usize + Send + Sync>;

struct Table {
    name: String,
    limit: Option<usize>,
    len: Reader,
}

/// The registry of tables (one per engine).
#[derive(Default)]
pub struct Tables {
    tables: Mutex<Vec<Table>>,
}

impl Tables {
    /// Registers (or replaces) table `name`, bounded at `limit` entries
    /// (`None`: bounded by something else, said in the operations guide).
    pub fn register(
        &self,
        name: &str,
        limit: Option<usize>,
        len: impl Fn() -> usize + Send + Sync + 'static,
    ) {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.retain(|t| t.name != name);
        tables.push(Table {
            name: name.to_string(),
            limit,
            len: Box::new(len),
        });
    }

    /// The current size of table `name`, if registered.
    pub fn len_of(&self, name: &str) -> Option<usize> {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        tables.iter().find(|t| t.name == name).map(|t| (t.len)())
    }

    /// The text exposition: entries and bounds per table (the registered
    /// ones and `own`, the engine's: name, entries, bound), the process's
    /// resident memory and the async runtime's live tasks.
    pub fn encode(&self, own: &[(&str, usize, Option<usize>)]) -> String {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(&str, usize, Option<usize>)> = own.to_vec();
        rows.extend(tables.iter().map(|t| (t.name.as_str(), (t.len)(), t.limit)));
        let mut out = String::new();
        let metric = "plugboard_table_entries";
        let _ = writeln!(
            out,
            "# HELP {metric} Entries in the node's in-memory tables, by table.\n# TYPE {metric} gauge"
        );
        for (name, len, _) in &rows {
            let _ = writeln!(out, "{metric}{{table=\"{name}\"}} {len}");
        }
        let metric = "plugboard_table_limit";
        let _ = writeln!(
            out,
            "# HELP {metric} The bound of each in-memory table that has one of its own.\n# TYPE {metric} gauge"
        );
        for (name, _, limit) in &rows {
            if let Some(limit) = limit {
                let _ = writeln!(out, "{metric}{{table=\"{name}\"}} {limit}");
            }
        }
        if let Some(bytes) = resident_bytes() {
            let metric = "plugboard_process_resident_bytes";
            let _ = writeln!(
                out,
                "# HELP {metric} The process's resident memory.\n# TYPE {metric} gauge\n{metric} {bytes}"
            );
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let metric = "plugboard_runtime_tasks";
            let _ = writeln!(
                out,
                "# HELP {metric} Tasks alive in the async runtime.\n# TYPE {metric} gauge\n{metric} {}",
                rt.metrics().num_alive_tasks()
            );
        }
        out
    }
}

/// Resident memory from `/proc/self/status` (Linux; elsewhere none).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn shows_each_table_and_its_bound_and_replaces_a_reader() {
        let tables = Tables::default();
        let n = Arc::new(AtomicUsize::new(3));
        let m = n.clone();
        tables.register("dialogs", Some(10), move || m.load(Ordering::Relaxed));
        tables.register("lanes", None, || 7);
        let text = tables.encode(&[("own", 2, Some(4))]);
        assert!(text.contains("plugboard_table_entries{table=\"dialogs\"} 3\n"));
        assert!(text.contains("plugboard_table_limit{table=\"dialogs\"} 10\n"));
        assert!(text.contains("plugboard_table_entries{table=\"lanes\"} 7\n"));
        assert!(!text.contains("plugboard_table_limit{table=\"lanes\"}"));
        assert!(text.contains("plugboard_table_entries{table=\"own\"} 2\n"));
        assert!(text.contains("plugboard_table_limit{table=\"own\"} 4\n"));
        n.store(5, Ordering::Relaxed);
        assert_eq!(tables.len_of("dialogs"), Some(5));
        tables.register("lanes", Some(1), || 0);
        let text = tables.encode(&[("own", 2, Some(4))]);
        assert_eq!(text.matches("table=\"lanes\"").count(), 2);
        assert!(text.contains("plugboard_table_entries{table=\"lanes\"} 0\n"));
    }
}
