//! What the downstream filter and the upstream filter of one request tell each other.
//!
//! For a model alias the filter runs twice per request (docs/adr/0001-envoy-fallback.md): as
//! the downstream HTTP filter (admission, plan) and as an upstream HTTP filter on the alias's
//! aggregate cluster, once per attempt (translation for that attempt's deployment, health). Both
//! plugins share one VM (same `vm_config`), and a stream and all its upstream attempts live on
//! one Envoy worker thread, i.e. in one VM instance: so they meet in this VM-global table, keyed
//! by the request's `x-request-id` (made unique by the downstream filter), never in a header the
//! provider would see.
//!
//! Entries are added when an alias request is forwarded and removed when the downstream stream
//! ends (`on_log`), so the table holds the requests in flight on this thread. A hard cap keeps
//! a host that never calls `on_log` from growing it without bound.

use std::cell::RefCell;
use std::collections::HashMap;

use tollgate_core::gate::Warning;
use tollgate_core::usage::Usage;

/// Requests in flight on one worker thread beyond which the oldest entry is dropped.
const MAX_ENTRIES: usize = 65_536;

/// One alias request in flight.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The alias the client asked for.
    pub alias: String,
    /// Deployments in the order Envoy's aggregate cluster tries them.
    pub order: Vec<String>,
    /// Attempts allowed (≤ `order.len()`).
    pub max_attempts: u32,
    /// When the downstream filter forwarded the request (ms since the epoch).
    pub start_ms: u64,
    /// The soft-limit warning the answer carries in its body.
    pub warning: Option<Warning>,
    /// Attempts started so far (the upstream filter counts them: attempt `n` is `order[n-1]`).
    pub attempts: u32,
    /// Failed attempts: deployment and failure label (`500`, `connect`, `timeout`, `reset`).
    pub failed: Vec<(String, String)>,
    /// The deployment whose answer went to the client.
    pub served: Option<String>,
    /// What that deployment reported, once its answer ended.
    pub usage: Option<Usage>,
}

/// Entries by key, each with its insertion number (the oldest goes first when full), and the
/// next insertion number.
type Table = (u64, HashMap<String, (u64, Entry)>);

thread_local! {
    static ENTRIES: RefCell<Table> = RefCell::new((0, HashMap::new()));
}

/// Whether `key` is in use (the downstream filter then picks another key).
pub fn contains(key: &str) -> bool {
    ENTRIES.with(|e| e.borrow().1.contains_key(key))
}

pub fn insert(key: String, entry: Entry) {
    ENTRIES.with(|e| {
        let (next, map) = &mut *e.borrow_mut();
        if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
            let oldest = map.iter().min_by_key(|(_, (n, _))| *n).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        *next += 1;
        map.insert(key, (*next, entry));
    });
}

/// Runs `f` on the entry for `key`, if there is one.
pub fn with<T>(key: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
    ENTRIES.with(|e| e.borrow_mut().1.get_mut(key).map(|(_, entry)| f(entry)))
}

pub fn take(key: &str) -> Option<Entry> {
    ENTRIES.with(|e| e.borrow_mut().1.remove(key).map(|(_, entry)| entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_changed_and_taken_by_key() {
        insert("a".into(), Entry { alias: "x".into(), ..Entry::default() });
        insert("b".into(), Entry::default());
        assert!(contains("a") && contains("b") && !contains("c"));
        assert_eq!(with("a", |e| {
            e.attempts += 1;
            e.attempts
        }), Some(1));
        assert_eq!(with("c", |e| e.attempts), None);
        let a = take("a").unwrap();
        assert_eq!((a.alias.as_str(), a.attempts), ("x", 1));
        assert!(!contains("a") && take("a").is_none());
        assert!(take("b").is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        for i in 0..MAX_ENTRIES + 10 {
            // (the scan for the oldest runs only when full: 10 times here)
            insert(format!("k{i}"), Entry::default());
        }
        ENTRIES.with(|e| assert_eq!(e.borrow().1.len(), MAX_ENTRIES));
        assert!(!contains("k0") && contains(&format!("k{}", MAX_ENTRIES + 9)));
        ENTRIES.with(|e| e.borrow_mut().1.clear());
    }
}
