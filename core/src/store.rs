//! The one compare-and-set store every host implements.
//!
//! Counters live in host storage (proxy-wasm shared data, a Durable Object, the in-memory store
//! below). The protocol is the portable one: read `(value, version)`, decide in a pure function,
//! write back naming the version that was read, and on a conflict start over — a bounded number
//! of times (`update`).

use thiserror::Error;

/// The version a host attaches to a stored value (proxy-wasm's `cas`).
pub type Version = u32;

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The value was stored.
    Stored,
    /// Someone else wrote first; read again.
    Conflict,
}

/// A host's storage failed in a way retrying will not fix, or retries ran out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// Every compare-and-set attempt lost to a concurrent writer.
    #[error("counter store is contended: {attempts} compare-and-set attempts failed")]
    Contended {
        /// How many attempts were made.
        attempts: u32,
    },
    /// The host's storage failed; the text says how.
    #[error("counter store failed: {0}")]
    Host(&'static str),
}

impl StoreError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Contended { .. } => "contended",
            StoreError::Host(_) => "host",
        }
    }
}

/// The compare-and-set storage a host gives core: where counters and health records live
/// (proxy-wasm shared data, a Durable Object, [`MemoryStore`]).
pub trait CasStore {
    /// Current value and version, or `None` when the key does not exist.
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError>;

    /// Store `value` only if the key is still at `expected` (`None`: only if the key still does
    /// not exist). Implementations must never overwrite a value they did not read.
    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>)
        -> Result<Written, StoreError>;

    /// A recent value and version of `key` the store remembers, which an update may start from
    /// instead of loading (the compare-and-set corrects a stale guess; an update that would not
    /// write on a guess loads and decides again, so no answer rests on a guess). `None`: load.
    fn guess(&mut self, _key: &str) -> Option<(Vec<u8>, Version)> {
        None
    }
}

/// What a pure step decided: `Some(bytes)` to write, `None` to leave the value as it is.
pub(crate) struct Step<T> {
    pub result: T,
    pub write: Option<Vec<u8>>,
}

/// Load → decide → compare-and-set, retried up to `max_retries` times after the first attempt.
/// `decide` sees the current bytes (or `None`) and must be pure: it may run several times.
pub(crate) fn update<S, T, F>(store: &mut S, key: &str, max_retries: u32, mut decide: F) -> Result<T, StoreError>
where
    S: CasStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> Step<T>,
{
    let attempts = max_retries.saturating_add(1);
    let mut conflicts = 0;
    let mut guess = store.guess(key);
    loop {
        let (current, guessed) = match guess.take() {
            Some(g) => (Some(g), true),
            None => (store.load(key)?, false),
        };
        let step = decide(current.as_ref().map(|(v, _)| v.as_slice()));
        let Some(bytes) = step.write else {
            if guessed {
                continue;
            }
            return Ok(step.result);
        };
        match store.store(key, &bytes, current.map(|(_, v)| v))? {
            Written::Stored => return Ok(step.result),
            Written::Conflict => {
                conflicts += 1;
                if conflicts >= attempts {
                    return Err(StoreError::Contended { attempts });
                }
                guess = store.guess(key);
            }
        }
    }
}

/// An in-memory store with exact compare-and-set semantics, for tests and simulations.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    entries: std::collections::HashMap<String, (Vec<u8>, Version)>,
    next_version: Version,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(|(v, _)| v.as_slice())
    }
    /// How many keys are stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether no key is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Every stored key and its value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, (v, _))| (k.as_str(), v.as_slice()))
    }
}

impl CasStore for MemoryStore {
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
        let current = self.entries.get(key).map(|(_, v)| *v);
        if current != expected {
            return Ok(Written::Conflict);
        }
        self.next_version = self.next_version.wrapping_add(1).max(1);
        self.entries.insert(key.to_owned(), (value.to_vec(), self.next_version));
        Ok(Written::Stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that reports a conflict a fixed number of times, as if another VM kept winning.
    struct Busy {
        inner: MemoryStore,
        conflicts_left: u32,
    }
    impl CasStore for Busy {
        fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
            self.inner.load(key)
        }
        fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
            if self.conflicts_left > 0 {
                self.conflicts_left -= 1;
                return Ok(Written::Conflict);
            }
            self.inner.store(key, value, expected)
        }
    }

    fn incr(cur: Option<&[u8]>) -> Step<u8> {
        let n = cur.map_or(0, |b| b[0]) + 1;
        Step { result: n, write: Some(vec![n]) }
    }

    #[test]
    fn memory_store_rejects_stale_and_blind_writes() {
        let mut s = MemoryStore::new();
        assert_eq!(s.store("k", b"a", None).unwrap(), Written::Stored);
        let (_, v1) = s.load("k").unwrap().unwrap();
        // creating again is a conflict: the key exists
        assert_eq!(s.store("k", b"b", None).unwrap(), Written::Conflict);
        assert_eq!(s.store("k", b"b", Some(v1)).unwrap(), Written::Stored);
        // the old version is stale now
        assert_eq!(s.store("k", b"c", Some(v1)).unwrap(), Written::Conflict);
        assert_eq!(s.get("k"), Some(&b"b"[..]));
    }

    #[test]
    fn update_retries_through_conflicts() {
        let mut s = Busy { inner: MemoryStore::new(), conflicts_left: 3 };
        assert_eq!(update(&mut s, "k", 3, incr).unwrap(), 1);
        assert_eq!(s.inner.get("k"), Some(&[1u8][..]));
    }

    #[test]
    fn update_gives_up_after_the_retry_budget() {
        let mut s = Busy { inner: MemoryStore::new(), conflicts_left: 4 };
        assert_eq!(update(&mut s, "k", 3, incr), Err(StoreError::Contended { attempts: 4 }));
        assert_eq!(s.inner.get("k"), None);
    }

    #[test]
    fn a_decision_without_a_write_does_not_touch_the_store() {
        let mut s = Busy { inner: MemoryStore::new(), conflicts_left: 100 };
        let r = update(&mut s, "k", 0, |_| Step { result: 7, write: None }).unwrap();
        assert_eq!(r, 7);
        assert_eq!(s.conflicts_left, 100);
    }
    /// A store that guesses with whatever value it was given, however stale.
    struct Guessing {
        inner: MemoryStore,
        guess: Option<(Vec<u8>, Version)>,
        loads: u32,
    }
    impl CasStore for Guessing {
        fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
            self.loads += 1;
            self.inner.load(key)
        }
        fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
            self.inner.store(key, value, expected)
        }
        fn guess(&mut self, _key: &str) -> Option<(Vec<u8>, Version)> {
            self.guess.take()
        }
    }

    /// Below 5 the step adds one; at 5 it refuses without writing.
    fn incr_below_5(cur: Option<&[u8]>) -> Step<Option<u8>> {
        let n = cur.map_or(0, |b| b[0]);
        if n >= 5 {
            return Step { result: None, write: None };
        }
        Step { result: Some(n + 1), write: Some(vec![n + 1]) }
    }

    #[test]
    fn a_current_guess_saves_the_read_and_a_stale_one_only_costs_a_retry() {
        let mut inner = MemoryStore::new();
        inner.store("k", &[2], None).unwrap();
        let current = inner.load("k").unwrap();
        let mut s = Guessing { inner, guess: current, loads: 0 };
        assert_eq!(update(&mut s, "k", 0, incr_below_5).unwrap(), Some(3));
        assert_eq!(s.loads, 0);
        // a stale guess (the value before the last write) loses the compare-and-set
        s.guess = Some((vec![2], s.inner.load("k").unwrap().unwrap().1.wrapping_sub(1)));
        s.loads = 0;
        assert_eq!(update(&mut s, "k", 1, incr_below_5).unwrap(), Some(4));
        assert_eq!(s.inner.get("k"), Some(&[4u8][..]));
        assert_eq!(s.loads, 1);
    }

    #[test]
    fn a_refusal_never_rests_on_a_guess() {
        let mut inner = MemoryStore::new();
        inner.store("k", &[1], None).unwrap();
        let (_, v) = inner.load("k").unwrap().unwrap();
        // the store remembers the key full, but it has been settled down to 1 since
        let mut s = Guessing { inner, guess: Some((vec![5], v)), loads: 0 };
        assert_eq!(update(&mut s, "k", 0, incr_below_5).unwrap(), Some(2));
        assert_eq!(s.loads, 1);
        assert_eq!(s.inner.get("k"), Some(&[2u8][..]));
    }
}

