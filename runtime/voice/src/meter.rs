//! A call leg's place in its tenant's capacity and, once answered, its
//! usage: the lease goes back and the usage is written when the leg (its
//! dialog) goes, whichever way it ends.

use std::sync::Arc;

use plugboard_core::now_ms;
use plugboard_engine::Engine;
use plugboard_engine::capacity::{CallLease, Refusal};
use plugboard_engine::usage::{CallDirection, CallUsage};

/// See the module doc.
pub(crate) struct LegMeter {
    lease: CallLease,
    app: Arc<Engine>,
    direction: CallDirection,
    /// The dialog's name in the ledger (set when the dialog is known).
    pub key: String,
    /// The tenant's trunk the leg uses, if any.
    pub trunk: Option<String>,
    answered_ms: Option<u64>,
}

impl LegMeter {
    /// A place for one more call leg of `tenant` (a `new_call` also
    /// within its calls per second), or why not; a refusal is on the
    /// tenant's event stream and in the metrics.
    pub fn admit(
        app: &Arc<Engine>,
        tenant: &str,
        new_call: bool,
        direction: CallDirection,
        detail: serde_json::Value,
    ) -> Result<LegMeter, Refusal> {
        let cap = app.capacity();
        // A place first: a call refused for lack of one spends none of
        // the tenant's calls per second.
        let lease = cap.lease_call(tenant).and_then(|lease| {
            if new_call {
                cap.admit_new_call(tenant)?;
            }
            Ok(lease)
        });
        match lease {
            Ok(lease) => Ok(LegMeter {
                lease,
                app: app.clone(),
                direction,
                key: String::new(),
                trunk: None,
                answered_ms: None,
            }),
            Err(r) => {
                app.capacity_refused(tenant, "voice", &r, detail);
                Err(r)
            }
        }
    }

    /// The leg was answered: billing starts (once).
    pub fn answered(&mut self) {
        self.answered_ms.get_or_insert_with(now_ms);
    }
}

impl Drop for LegMeter {
    fn drop(&mut self) {
        let Some(answered_ms) = self.answered_ms else {
            return;
        };
        self.app.spawn_call_usage(CallUsage {
            tenant: self.lease.tenant().to_string(),
            key: std::mem::take(&mut self.key),
            direction: self.direction,
            trunk: self.trunk.take(),
            answered_ms,
            ended_ms: now_ms(),
        });
    }
}
