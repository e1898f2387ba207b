//! Request quotas over calendar windows: the stored counter record and the pure decision.
//!
//! One record per subject holds a `(window start, count)` pair per tracked window, so all of a
//! subject's windows are checked and counted by a single compare-and-set: either every window
//! counts the request or none does. A denied request is not counted.

use serde::{Deserialize, Serialize};

use crate::store::{update, CasStore, Step, StoreError};
use crate::window::{Timestamp, Window};

/// One limit: at most `requests` requests per calendar `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub window: Window,
    pub requests: u64,
}

/// Where one quota stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStatus {
    pub window: Window,
    pub limit: u64,
    /// Requests counted in the current window, including this one when it was allowed.
    pub used: u64,
    pub remaining: u64,
    /// Milliseconds until the window resets.
    pub reset_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Decision {
    /// Counted. `binding` is the most restrictive quota (least remaining; on a tie the one that
    /// resets last), `None` when the tier has no request limits.
    Allowed { binding: Option<QuotaStatus> },
    /// Not counted. `binding` is the exhausted quota that frees up last; `retry_after_ms` is
    /// when every exhausted quota has room again.
    Denied { binding: QuotaStatus, retry_after_ms: u64 },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    window: Window,
    start: Timestamp,
    count: u64,
}

const RECORD_VERSION: u8 = 1;
const ENTRY_LEN: usize = 1 + 8 + 8;

/// The stored counter record: `[version][n]` then `n` × `[window id][start u64 LE][count u64 LE]`.
/// It holds counts only — never anything from a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    entries: Vec<Entry>,
}

impl Record {
    /// Decodes a stored record. A record in a format this version does not know (or a damaged
    /// one) reads as empty: counting restarts rather than the filter failing every request.
    pub fn decode(bytes: &[u8]) -> Record {
        Self::try_decode(bytes).unwrap_or_default()
    }

    fn try_decode(bytes: &[u8]) -> Option<Record> {
        let (&version, rest) = bytes.split_first()?;
        let (&n, rest) = rest.split_first()?;
        if version != RECORD_VERSION || rest.len() != n as usize * ENTRY_LEN {
            return None;
        }
        let mut entries = Vec::with_capacity(n as usize);
        for chunk in rest.chunks_exact(ENTRY_LEN) {
            entries.push(Entry {
                window: Window::from_id(chunk[0])?,
                start: u64::from_le_bytes(chunk[1..9].try_into().ok()?),
                count: u64::from_le_bytes(chunk[9..17].try_into().ok()?),
            });
        }
        Some(Record { entries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.entries.len() * ENTRY_LEN);
        out.push(RECORD_VERSION);
        out.push(self.entries.len() as u8);
        for e in &self.entries {
            out.push(e.window.id());
            out.extend_from_slice(&e.start.to_le_bytes());
            out.extend_from_slice(&e.count.to_le_bytes());
        }
        out
    }

    /// Requests counted in `window` at `now` (0 when the stored window has ended).
    pub fn used(&self, window: Window, now: Timestamp) -> u64 {
        let (start, _) = window.bounds(now);
        self.entries
            .iter()
            .find(|e| e.window == window && e.start == start)
            .map_or(0, |e| e.count)
    }

    fn count_one(&mut self, window: Window, now: Timestamp) {
        let (start, _) = window.bounds(now);
        match self.entries.iter_mut().find(|e| e.window == window) {
            Some(e) if e.start == start => e.count = e.count.saturating_add(1),
            Some(e) => *e = Entry { window, start, count: 1 },
            None => self.entries.push(Entry { window, start, count: 1 }),
        }
    }
}

/// The pure decision: given the stored record, the quotas and the windows the policy tracks,
/// decide and return the record to write (`None` when nothing changes).
pub fn decide(record: &Record, quotas: &[Quota], tracked: &[Window], now: Timestamp) -> (Decision, Option<Record>) {
    let status = |q: &Quota, used: u64| {
        let (_, end) = q.window.bounds(now);
        QuotaStatus {
            window: q.window,
            limit: q.requests,
            used,
            remaining: q.requests.saturating_sub(used),
            reset_ms: end - now,
        }
    };

    let exhausted: Vec<QuotaStatus> = quotas
        .iter()
        .map(|q| status(q, record.used(q.window, now)))
        .filter(|s| s.used >= s.limit)
        .collect();
    if let Some(binding) = exhausted.iter().copied().max_by_key(|s| s.reset_ms) {
        return (Decision::Denied { binding, retry_after_ms: binding.reset_ms }, None);
    }

    let mut next = record.clone();
    let mut windows: Vec<Window> = tracked.to_vec();
    windows.extend(quotas.iter().map(|q| q.window));
    windows.sort();
    windows.dedup();
    for w in windows {
        next.count_one(w, now);
    }
    let binding = quotas
        .iter()
        .map(|q| status(q, next.used(q.window, now)))
        .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset_ms.cmp(&a.reset_ms)));
    (Decision::Allowed { binding }, Some(next))
}

/// Checks `quotas` for the subject stored under `key` and counts the request when it fits.
/// `tracked` lists every window the policy limits anywhere, so a subject whose tier changes
/// mid-window keeps an exact count. Errors only when the store fails or stays contended after
/// `max_retries` retries; the caller then applies the configured failure mode.
pub fn check_and_count<S: CasStore + ?Sized>(
    store: &mut S,
    key: &str,
    quotas: &[Quota],
    tracked: &[Window],
    now: Timestamp,
    max_retries: u32,
) -> Result<Decision, StoreError> {
    update(store, key, max_retries, |current| {
        let record = current.map(Record::decode).unwrap_or_default();
        let (result, next) = decide(&record, quotas, tracked, now);
        Step { result, write: next.map(|r| r.encode()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use proptest::prelude::*;

    const T0: Timestamp = 1_709_214_330_250; // 2024-02-29T13:45:30.250Z

    fn q(window: Window, requests: u64) -> Quota {
        Quota { window, requests }
    }

    #[test]
    fn counts_up_to_the_limit_then_denies_without_counting() {
        let mut s = MemoryStore::new();
        let quotas = [q(Window::Hour, 3)];
        for i in 1..=3 {
            let d = check_and_count(&mut s, "k", &quotas, &[Window::Hour], T0, 4).unwrap();
            let Decision::Allowed { binding: Some(b) } = d else { panic!("{d:?}") };
            assert_eq!((b.used, b.remaining), (i, 3 - i));
        }
        let before = s.get("k").unwrap().to_vec();
        let d = check_and_count(&mut s, "k", &quotas, &[Window::Hour], T0, 4).unwrap();
        let Decision::Denied { binding, retry_after_ms } = d else { panic!("{d:?}") };
        assert_eq!(binding.remaining, 0);
        // 13:45:30.250 → 14:00:00
        assert_eq!(retry_after_ms, 14 * 60_000 + 29_750);
        assert_eq!(s.get("k").unwrap(), &before[..], "a denial must not be counted");
    }

    #[test]
    fn a_new_window_starts_from_zero() {
        let mut s = MemoryStore::new();
        let quotas = [q(Window::Minute, 1)];
        assert!(check_and_count(&mut s, "k", &quotas, &[Window::Minute], T0, 4).unwrap().is_allowed());
        assert!(!check_and_count(&mut s, "k", &quotas, &[Window::Minute], T0 + 1000, 4).unwrap().is_allowed());
        let next_minute = Window::Minute.bounds(T0).1;
        assert!(check_and_count(&mut s, "k", &quotas, &[Window::Minute], next_minute, 4).unwrap().is_allowed());
    }

    #[test]
    fn the_most_restrictive_window_binds() {
        let rec = Record::default();
        // 10/hour and 50/day: after one request the hour has 9 left, the day 49.
        let (d, _) = decide(&rec, &[q(Window::Day, 50), q(Window::Hour, 10)], &[], T0);
        let Decision::Allowed { binding: Some(b) } = d else { panic!() };
        assert_eq!((b.window, b.remaining), (Window::Hour, 9));
        // on a tie in remaining, the window that resets last binds
        let (d, _) = decide(&rec, &[q(Window::Minute, 5), q(Window::Day, 5)], &[], T0);
        let Decision::Allowed { binding: Some(b) } = d else { panic!() };
        assert_eq!(b.window, Window::Day);
    }

    #[test]
    fn denial_waits_for_every_exhausted_window() {
        let mut rec = Record::default();
        rec.count_one(Window::Minute, T0);
        rec.count_one(Window::Day, T0);
        let (d, next) = decide(&rec, &[q(Window::Minute, 1), q(Window::Day, 1)], &[], T0);
        assert!(next.is_none());
        let Decision::Denied { binding, retry_after_ms } = d else { panic!() };
        assert_eq!(binding.window, Window::Day);
        assert_eq!(retry_after_ms, Window::Day.bounds(T0).1 - T0);
    }

    #[test]
    fn tracked_windows_are_counted_even_when_this_tier_does_not_limit_them() {
        let rec = Record::default();
        let (_, next) = decide(&rec, &[q(Window::Day, 100)], &[Window::Hour, Window::Day], T0);
        let next = next.unwrap();
        assert_eq!(next.used(Window::Hour, T0), 1);
        assert_eq!(next.used(Window::Day, T0), 1);
        assert_eq!(next.used(Window::Minute, T0), 0);
    }

    #[test]
    fn a_tier_without_limits_is_allowed_without_a_binding_quota() {
        let (d, _) = decide(&Record::default(), &[], &[Window::Hour], T0);
        assert_eq!(d, Decision::Allowed { binding: None });
    }

    #[test]
    fn damaged_or_foreign_records_read_as_empty() {
        assert_eq!(Record::decode(b""), Record::default());
        assert_eq!(Record::decode(&[9, 0]), Record::default());
        assert_eq!(Record::decode(&[1, 2, 3]), Record::default());
        let mut bad_window = Record::default();
        bad_window.count_one(Window::Hour, T0);
        let mut bytes = bad_window.encode();
        bytes[2] = 77;
        assert_eq!(Record::decode(&bytes), Record::default());
    }

    proptest! {
        #[test]
        fn record_round_trips(counts in proptest::collection::vec((0usize..4, 0u64..u64::MAX, 0u64..u64::MAX), 0..4)) {
            let mut rec = Record::default();
            for (w, start, count) in counts {
                let window = Window::ALL[w];
                if rec.entries.iter().all(|e| e.window != window) {
                    rec.entries.push(Entry { window, start, count });
                }
            }
            prop_assert_eq!(Record::decode(&rec.encode()), rec);
        }

        #[test]
        fn never_more_allowed_than_the_tightest_limit(
            limits in proptest::collection::vec((0usize..4, 1u64..20), 1..4),
            steps in proptest::collection::vec(0u64..90_000, 1..200),
        ) {
            let mut quotas: Vec<Quota> = vec![];
            for (w, n) in limits {
                if quotas.iter().all(|x| x.window != Window::ALL[w]) { quotas.push(q(Window::ALL[w], n)); }
            }
            let tracked: Vec<Window> = quotas.iter().map(|x| x.window).collect();
            let mut s = MemoryStore::new();
            let mut now = T0;
            let mut allowed_at = vec![];
            for step in steps {
                now += step;
                if check_and_count(&mut s, "k", &quotas, &tracked, now, 0).unwrap().is_allowed() {
                    allowed_at.push(now);
                }
            }
            // in every window of every quota, the allowed requests never exceed its limit
            for quota in &quotas {
                for &t in &allowed_at {
                    let (start, end) = quota.window.bounds(t);
                    let n = allowed_at.iter().filter(|&&x| x >= start && x < end).count() as u64;
                    prop_assert!(n <= quota.requests, "{:?}: {} > {}", quota.window, n, quota.requests);
                }
            }
        }
    }
}
