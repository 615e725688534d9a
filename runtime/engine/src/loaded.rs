//! The plugin versions compiled and ready in this process, bounded: past
//! the bound the one used longest ago is dropped (a call that still runs
//! it keeps its own reference) and loaded again from the compile cache
//! when next needed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use plugboard_host::LoadedPlugin;

/// Tenant, plugin name, version.
pub(crate) type Key = (String, String, u64);

/// Plugin versions kept loaded when the operator sets no bound.
pub const DEFAULT_MAX_LOADED: usize = 256;

struct Entry {
    plugin: Arc<LoadedPlugin>,
    /// When it was last used (a tick of the cache's clock).
    used: AtomicU64,
}

/// Loaded plugin versions, at most `limit`.
pub(crate) struct LoadedCache {
    map: RwLock<HashMap<Key, Entry>>,
    limit: AtomicUsize,
    tick: AtomicU64,
    evicted: AtomicU64,
}

impl Default for LoadedCache {
    fn default() -> Self {
        LoadedCache {
            map: RwLock::new(HashMap::new()),
            limit: AtomicUsize::new(DEFAULT_MAX_LOADED),
            tick: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }
}

impl LoadedCache {
    /// Sets the bound (at least 1).
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }

    /// A loaded version, marked as used now.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<LoadedPlugin>> {
        let map = self.map.read().ok()?;
        let e = map.get(key)?;
        e.used
            .store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(e.plugin.clone())
    }

    /// Keeps a loaded version, dropping the ones used longest ago past
    /// the bound.
    pub(crate) fn insert(&self, key: Key, plugin: Arc<LoadedPlugin>) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        let used = AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed));
        map.insert(key, Entry { plugin, used });
        let limit = self.limit.load(Ordering::Relaxed);
        while map.len() > limit {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many are loaded.
    pub(crate) fn len(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or(0)
    }

    /// The gauges for `/metrics`.
    pub(crate) fn encode(&self) -> String {
        format!(
            "# HELP plugboard_plugin_versions_loaded_limit Plugin versions kept compiled at most (the one used longest ago goes first)\n\
             # TYPE plugboard_plugin_versions_loaded_limit gauge\n\
             plugboard_plugin_versions_loaded_limit {}\n\
             # HELP plugboard_plugin_versions_evicted Plugin versions dropped to stay within the bound\n\
             # TYPE plugboard_plugin_versions_evicted counter\n\
             plugboard_plugin_versions_evicted_total {}\n",
            self.limit.load(Ordering::Relaxed),
            self.evicted.load(Ordering::Relaxed)
        )
    }
}
