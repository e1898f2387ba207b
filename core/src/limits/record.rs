//! The stored counter record (format 2): everything one store key holds, as counts only —
//! never a byte of a request or a response.
//!
//! A key holds one or more *members* — one per identity (or IP) hashed to that key, or a single
//! member for a tier or global aggregate. A member has:
//! - calendar counters `(metric, window, window start, count, notified thresholds)`,
//! - GCRA states `(metric, rate id, theoretical arrival time)`,
//! - concurrency leases `(lease id, expiry)`.
//!
//! Layout (little endian): `[2][members u16]` then per member
//! `[tag u64][counters u8][rates u8][leases u16]`, counters × `[metric u8][window u8]
//! [start minute u32][count u64][notified u8]` (15 bytes), rates × `[metric u8][rate id u32]
//! [tat ns u64]` (13 bytes), leases × `[id u64][expires ms u64]` (16 bytes).
//! A damaged record or one in another format reads as empty: counting restarts rather than
//! every request failing.

use crate::limits::Metric;
use crate::window::{Timestamp, Window, Zone};

pub(crate) const VERSION: u8 = 2;
/// Bytes of one encoded calendar counter.
pub const COUNTER_LEN: usize = 15;
/// Bytes of one encoded rate (GCRA) state.
pub const RATE_LEN: usize = 13;
/// Bytes of one encoded concurrency lease.
pub const LEASE_LEN: usize = 16;
/// Bytes of a member's header: its tag and list lengths.
pub const MEMBER_HEADER_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counter {
    pub metric: Metric,
    pub window: Window,
    /// Window start, in whole minutes since the epoch.
    pub start_min: u32,
    pub count: u64,
    /// Bit i: the limit's i-th notify threshold has fired in this window.
    pub notified: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub metric: Metric,
    pub id: u32,
    /// GCRA theoretical arrival time, epoch nanoseconds.
    pub tat_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub id: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Member {
    pub tag: u64,
    pub counters: Vec<Counter>,
    pub rates: Vec<Rate>,
    pub leases: Vec<Lease>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Record {
    pub members: Vec<Member>,
}

pub(crate) fn start_minute(start_ms: Timestamp) -> u32 {
    (start_ms / 60_000).min(u32::MAX as u64) as u32
}

impl Member {
    pub fn counter(&self, metric: Metric, window: Window) -> Option<&Counter> {
        self.counters.iter().find(|c| c.metric == metric && c.window == window)
    }

    pub(crate) fn counter_mut(&mut self, metric: Metric, window: Window) -> &mut Counter {
        let i = match self.counters.iter().position(|c| c.metric == metric && c.window == window) {
            Some(i) => i,
            None => {
                self.counters.push(Counter { metric, window, start_min: 0, count: 0, notified: 0 });
                self.counters.len() - 1
            }
        };
        &mut self.counters[i]
    }

    /// The count in the window containing `now` (0 when the stored window has ended).
    pub fn used(&self, metric: Metric, window: Window, now: Timestamp, zone: &Zone) -> u64 {
        let start = start_minute(window.bounds_in(now, zone).0);
        self.counter(metric, window).filter(|c| c.start_min == start).map_or(0, |c| c.count)
    }

    pub fn rate(&self, metric: Metric, id: u32) -> Option<&Rate> {
        self.rates.iter().find(|r| r.metric == metric && r.id == id)
    }

    pub fn live_leases(&self, now: Timestamp) -> usize {
        self.leases.iter().filter(|l| l.expires_ms > now).count()
    }

    /// Drops what has expired: ended windows, idle rates, expired leases.
    pub fn prune(&mut self, now: Timestamp, zone: &Zone) {
        self.counters.retain(|c| c.count > 0 && c.start_min == start_minute(c.window.bounds_in(now, zone).0));
        let now_ns = (now as u128 * 1_000_000).min(u64::MAX as u128) as u64;
        self.rates.retain(|r| r.tat_ns > now_ns);
        self.leases.retain(|l| l.expires_ms > now);
    }

    /// When everything this member holds has expired (for choosing whom to evict).
    pub(crate) fn expires(&self, zone: &Zone) -> Timestamp {
        let counters = self.counters.iter().map(|c| c.window.bounds_in(c.start_min as u64 * 60_000, zone).1);
        let rates = self.rates.iter().map(|r| r.tat_ns / 1_000_000);
        let leases = self.leases.iter().map(|l| l.expires_ms);
        counters.chain(rates).chain(leases).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.rates.is_empty() && self.leases.is_empty()
    }

    pub(crate) fn encoded_len(&self) -> usize {
        MEMBER_HEADER_LEN + self.counters.len() * COUNTER_LEN + self.rates.len() * RATE_LEN + self.leases.len() * LEASE_LEN
    }
}

impl Record {
    pub fn decode(bytes: &[u8]) -> Record {
        Self::try_decode(bytes).unwrap_or_default()
    }

    fn try_decode(bytes: &[u8]) -> Option<Record> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let n = r.u16()?;
        let mut members = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let tag = r.u64()?;
            let (nc, nr, nl) = (r.u8()?, r.u8()?, r.u16()?);
            let mut m = Member { tag, ..Member::default() };
            for _ in 0..nc {
                m.counters.push(Counter {
                    metric: Metric::from_id(r.u8()?)?,
                    window: Window::from_id(r.u8()?)?,
                    start_min: r.u32()?,
                    count: r.u64()?,
                    notified: r.u8()?,
                });
            }
            for _ in 0..nr {
                m.rates.push(Rate { metric: Metric::from_id(r.u8()?)?, id: r.u32()?, tat_ns: r.u64()? });
            }
            for _ in 0..nl {
                m.leases.push(Lease { id: r.u64()?, expires_ms: r.u64()? });
            }
            members.push(m);
        }
        r.0.is_empty().then_some(Record { members })
    }

    /// Encodes the record. Lists longer than the format can count are cut (never happens with
    /// validated policies: a member has at most a few dozen counters; leases are bounded by the
    /// concurrency limit, which the config caps at 65 535).
    pub fn encode(&self) -> Vec<u8> {
        let members = &self.members[..self.members.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(3 + members.iter().map(Member::encoded_len).sum::<usize>());
        out.push(VERSION);
        out.extend_from_slice(&(members.len() as u16).to_le_bytes());
        for m in members {
            let counters = &m.counters[..m.counters.len().min(u8::MAX as usize)];
            let rates = &m.rates[..m.rates.len().min(u8::MAX as usize)];
            let leases = &m.leases[..m.leases.len().min(u16::MAX as usize)];
            out.extend_from_slice(&m.tag.to_le_bytes());
            out.push(counters.len() as u8);
            out.push(rates.len() as u8);
            out.extend_from_slice(&(leases.len() as u16).to_le_bytes());
            for c in counters {
                out.push(c.metric.id());
                out.push(c.window.id());
                out.extend_from_slice(&c.start_min.to_le_bytes());
                out.extend_from_slice(&c.count.to_le_bytes());
                out.push(c.notified);
            }
            for r in rates {
                out.push(r.metric.id());
                out.extend_from_slice(&r.id.to_le_bytes());
                out.extend_from_slice(&r.tat_ns.to_le_bytes());
            }
            for l in leases {
                out.extend_from_slice(&l.id.to_le_bytes());
                out.extend_from_slice(&l.expires_ms.to_le_bytes());
            }
        }
        out
    }

    pub fn member(&self, tag: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.tag == tag)
    }

    /// Takes the member out (or a new empty one), so it can be changed and put back.
    pub fn take(&mut self, tag: u64) -> Member {
        match self.members.iter().position(|m| m.tag == tag) {
            Some(i) => self.members.swap_remove(i),
            None => Member { tag, ..Member::default() },
        }
    }

    /// Puts a member back, pruning every member's expired state; when more than `cap` members
    /// remain, evicts those whose state expires first (never `keep`). Returns how many members
    /// with live state were evicted.
    pub fn put(&mut self, member: Member, now: Timestamp, zone: &Zone, cap: usize) -> u32 {
        let keep = member.tag;
        self.members.push(member);
        for m in &mut self.members {
            m.prune(now, zone);
        }
        self.members.retain(|m| !m.is_empty() || m.tag == keep);
        let mut evicted = 0;
        while self.members.len() > cap.max(1) {
            let victim = self
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.tag != keep)
                .min_by_key(|(_, m)| m.expires(zone))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.members.swap_remove(i);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        Record {
            members: vec![
                Member {
                    tag: 7,
                    counters: vec![Counter { metric: Metric::TotalTokens, window: Window::Day, start_min: 29_000_000, count: 1234, notified: 0b101 }],
                    rates: vec![Rate { metric: Metric::Requests, id: 99, tat_ns: 1_700_000_000_000_000_000 }],
                    leases: vec![Lease { id: 42, expires_ms: 1_700_000_060_000 }],
                },
                Member { tag: 8, ..Member::default() },
            ],
        }
    }

    #[test]
    fn round_trips_and_states_its_size() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(bytes.len(), 3 + MEMBER_HEADER_LEN * 2 + COUNTER_LEN + RATE_LEN + LEASE_LEN);
        assert_eq!(Record::decode(&bytes), r);
    }

    #[test]
    fn damaged_or_foreign_records_read_as_empty() {
        let bytes = sample().encode();
        assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), Record::default());
        assert_eq!(Record::decode(&[1, 1, 1, 0, 0]), Record::default(), "a format-1 record");
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Record::decode(&extra), Record::default());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = Record::decode(&bytes);
            // whatever decodes re-encodes to the same bytes
            if r != Record::default() {
                prop_assert_eq!(r.encode(), bytes);
            }
        }
    }
}
