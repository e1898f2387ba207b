//! What the downstream filter and the upstream filter of one alias request tell each other.
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

use tollgate_core::attempt::Attempts;
use tollgate_core::message::Warning;
use tollgate_core::usage::Usage;

/// Requests in flight on one worker thread beyond which the oldest entry is dropped.
const MAX_ENTRIES: usize = 65_536;

/// One alias request in flight.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Core's attempts over the plan's deployments (which deployment attempt `n` goes to, the
    /// failures so far, the all-failed answer).
    pub attempts: Attempts,
    /// The soft-limit warning the answer carries in its body.
    pub warning: Option<Warning>,
    /// Attempts the upstream filter has started (attempt `n` is the `n`-th).
    pub started: u32,
    /// The deployment whose answer went to the client.
    pub served: Option<String>,
    /// What that deployment reported, once its answer ended.
    pub usage: Option<Usage>,
}

impl Entry {
    /// A new entry for a request about to be forwarded.
    pub fn new(attempts: Attempts, warning: Option<Warning>) -> Entry {
        Entry { attempts, warning, started: 0, served: None, usage: None }
    }
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

/// Adds (or replaces) the entry for `key`.
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

/// Removes and returns the entry for `key`.
pub fn take(key: &str) -> Option<Entry> {
    ENTRIES.with(|e| e.borrow_mut().1.remove(key).map(|(_, entry)| entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::fallback::Plan;

    fn entry() -> Entry {
        let plan = Plan { alias: "x".into(), order: vec!["a".into()], available: vec![true], max_attempts: 1 };
        Entry::new(Attempts::new(&plan, 0, false), None)
    }

    #[test]
    fn entries_are_found_changed_and_taken_by_key() {
        insert("a".into(), entry());
        insert("b".into(), entry());
        assert!(contains("a") && contains("b") && !contains("c"));
        assert_eq!(
            with("a", |e| {
                e.started += 1;
                e.started
            }),
            Some(1)
        );
        assert_eq!(with("c", |e| e.started), None);
        let a = take("a").unwrap();
        assert_eq!(a.started, 1);
        assert!(!contains("a") && take("a").is_none());
        assert!(take("b").is_some());
    }

    #[test]
    fn the_table_is_bounded() {
        for i in 0..MAX_ENTRIES + 10 {
            // (the scan for the oldest runs only when full: 10 times here)
            insert(format!("k{i}"), entry());
        }
        ENTRIES.with(|e| assert_eq!(e.borrow().1.len(), MAX_ENTRIES));
        assert!(!contains("k0") && contains(&format!("k{}", MAX_ENTRIES + 9)));
        ENTRIES.with(|e| e.borrow_mut().1.clear());
    }
}
