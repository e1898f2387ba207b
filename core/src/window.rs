//! Calendar windows in UTC.
//!
//! A window is aligned to the calendar (a minute starts at second 0, a month on the 1st at
//! 00:00 UTC), not to the first request: several Envoy VMs and Durable Objects share one
//! counter, so the window must be computable from absolute time alone.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as given by the host (`get_current_time`, `Date.now()`).
pub type Timestamp = u64;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// A calendar window a limit is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl Window {
    pub const ALL: [Window; 4] = [Window::Minute, Window::Hour, Window::Day, Window::Month];

    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    pub fn from_name(name: &str) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.name() == name)
    }

    /// A stable one-byte id used in the stored counter record.
    pub(crate) fn id(self) -> u8 {
        match self {
            Window::Minute => 1,
            Window::Hour => 2,
            Window::Day => 3,
            Window::Month => 4,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.id() == id)
    }

    /// `[start, end)` of the window containing `now`, in epoch milliseconds.
    pub fn bounds(self, now: Timestamp) -> (Timestamp, Timestamp) {
        let fixed = |len: u64| {
            let start = now - now % len;
            (start, start + len)
        };
        match self {
            Window::Minute => fixed(MINUTE_MS),
            Window::Hour => fixed(HOUR_MS),
            Window::Day => fixed(DAY_MS),
            Window::Month => {
                let days = (now / DAY_MS) as i64;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1);
                (start as u64 * DAY_MS, end as u64 * DAY_MS)
            }
        }
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Window::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown window {name:?} (expected one of: minute, hour, day, month)"
            ))
        })
    }
}

// Days <-> proleptic Gregorian civil date, after Howard Hinnant's public-domain algorithms
// ("chrono-Compatible Low-Level Date Algorithms"). Only UTC is needed here; a calendar crate
// with a time-zone database is the right tool once windows follow a zone.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // 2024-02-29T13:45:30.250Z
    const LEAP_DAY: u64 = 1_709_214_330_250;

    #[test]
    fn fixed_windows_align_to_the_clock() {
        assert_eq!(Window::Minute.bounds(LEAP_DAY), (1_709_214_300_000, 1_709_214_360_000));
        assert_eq!(Window::Hour.bounds(LEAP_DAY), (1_709_211_600_000, 1_709_215_200_000));
        assert_eq!(Window::Day.bounds(LEAP_DAY), (1_709_164_800_000, 1_709_251_200_000));
    }

    #[test]
    fn month_of_a_leap_february_has_29_days() {
        // 2024-02-01T00:00Z .. 2024-03-01T00:00Z
        assert_eq!(Window::Month.bounds(LEAP_DAY), (1_706_745_600_000, 1_709_251_200_000));
    }

    #[test]
    fn december_rolls_into_the_next_year() {
        // 2023-12-31T23:59:59.999Z belongs to December 2023; one ms later is January 2024.
        let last = 1_704_067_199_999;
        assert_eq!(Window::Month.bounds(last), (1_701_388_800_000, 1_704_067_200_000));
        assert_eq!(Window::Month.bounds(last + 1).0, 1_704_067_200_000);
    }

    #[test]
    fn civil_round_trip_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    proptest! {
        #[test]
        fn every_instant_lies_in_its_window(now in 0u64..8_000_000_000_000, w in 0usize..4) {
            let w = Window::ALL[w];
            let (s, e) = w.bounds(now);
            prop_assert!(s <= now && now < e);
            // the window just before ends where this one starts
            if s > 0 { prop_assert_eq!(w.bounds(s - 1).1, s); }
            prop_assert_eq!(w.bounds(e).0, e);
        }

        #[test]
        fn months_are_28_to_31_days(now in 0u64..8_000_000_000_000) {
            let (s, e) = Window::Month.bounds(now);
            let days = (e - s) / DAY_MS;
            prop_assert!((28..=31).contains(&days));
            prop_assert_eq!((e - s) % DAY_MS, 0);
            prop_assert_eq!(civil_from_days((s / DAY_MS) as i64).2, 1);
        }

        #[test]
        fn civil_conversion_round_trips(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn february_lengths_follow_leap_rules() {
        for (year, expected) in [(2000, 29), (2200, 28), (2023, 28), (2024, 29), (2100, 28)] {
            let start = days_from_civil(year, 2, 1) as u64 * DAY_MS;
            let (s, e) = Window::Month.bounds(start + 1);
            assert_eq!(s, start);
            assert_eq!((e - s) / DAY_MS, expected, "February {year}");
        }
    }
}
