//! Calendar windows, in UTC or in the local calendar of an IANA time zone.
//!
//! A window is aligned to the calendar (a minute starts at second 0, a day at midnight, a week
//! on Monday, a month on the 1st), not to the first request: several Envoy VMs and Durable
//! Objects share one counter, so the window must be computable from absolute time (and the
//! configured [`Zone`]) alone.
//!
//! [`Window::bounds`] is the UTC calendar, in integer arithmetic. `Window::bounds_in` follows
//! a [`Zone`]: an IANA zone from the time zone database that `jiff` bundles into the binary
//! (feature `tzdb`: the CLI, the worker; no file system, no system time zone: the same answers
//! natively and in `wasm32-unknown-unknown`), or a POSIX TZ string giving the rules directly
//! (`"CET-1CEST,M3.5.0,M10.5.0/3"`), which every build understands — the Envoy filter leaves the
//! ~330 KB database out, and `tollgate envoy` writes a named zone's rules into its config. In a
//! zone:
//! - **days, weeks (ISO: Monday to Sunday) and months** are dates of the local calendar. Each
//!   starts at the first instant the local clock reads 00:00 of its first date or later: local
//!   midnight (the first one when midnight happens twice), or the instant the clocks jump when
//!   they skip midnight. So the days of DST changes last 23 or 25 hours, an hour read twice
//!   belongs to the date that had begun, and a date the zone skipped is an empty window.
//! - **hours and minutes** are readings of the clock at its current UTC offset, cut where the
//!   offset changes. They never outlast their nominal length: hours start at :30 UTC in
//!   Asia/Kolkata (+05:30); the hour repeated when clocks go back is two windows of one hour;
//!   around a 30-minute shift (Australia/Lord_Howe) an hour window lasts 30 minutes.
//!
//! In both, windows tile time: each ends where the next starts. Timestamps are `u64`, so a
//! window that would start before 1970 starts at 0. A window `jiff` cannot compute (it ends
//! after year 9999 in local time, or `now` is past its range) is answered with the UTC window,
//! which need not meet its zoned neighbours.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as given by the host (`get_current_time`, `Date.now()`).
pub type Timestamp = u64;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// How many transitions (or skipped periods) one window is allowed to step over before
/// [`Window::bounds_in`] gives up on the zone and answers with the UTC window. Real zones need
/// at most a few.
const MAX_STEPS: usize = 8;

/// A calendar window a limit is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// A clock minute.
    Minute,
    /// A clock hour in the policy's time zone.
    Hour,
    /// A calendar day: midnight to midnight in the policy's time zone.
    Day,
    /// An ISO week: Monday 00:00 to the next Monday 00:00.
    Week,
    /// A calendar month: from midnight on its first day to midnight on the next month's.
    Month,
}

/// The time zone whose calendar the windows follow: UTC, an IANA zone, or a zone given by its
/// POSIX TZ rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    tz: TimeZone,
    /// Offset 0 forever (`UTC`, `Etc/UTC`, `GMT`, …): computed by the UTC fast path.
    utc: bool,
    /// The name to report when `tz` has no IANA name: the canonical IANA name of a zone known by
    /// its rules, or the POSIX TZ string the policy gave.
    label: Option<String>,
}

#[cfg(not(feature = "tzdb"))]
include!(concat!(env!("OUT_DIR"), "/zones.rs"));

impl Zone {
    pub(crate) fn utc() -> Zone {
        Zone { tz: TimeZone::UTC, utc: true, label: None }
    }

    /// A time zone by IANA name (`"America/New_York"`; matched without regard to case, as the
    /// database does) or by POSIX TZ rules (`"EST5EDT,M3.2.0,M11.1.0"`). Errors with
    /// `unknown time zone "Mars/Olympus"`.
    ///
    /// With the `tzdb` feature an IANA zone carries its whole history; without it (the Envoy
    /// filter) its current rules (build.rs), which give the same windows from 2026 on.
    pub fn named(name: &str) -> Result<Zone, String> {
        let (tz, label) = match iana(name) {
            Some(found) => found,
            None => match TimeZone::posix(name) {
                Ok(tz) => (tz, Some(name.to_owned())),
                Err(_) => return Err(unknown(name)),
            },
        };
        let utc = tz.to_offset(jiff::Timestamp::UNIX_EPOCH) == Offset::UTC
            && tz.following(jiff::Timestamp::MIN).next().is_none();
        if utc && (tz.iana_name() == Some("UTC") || label.as_deref() == Some("UTC")) {
            return Ok(Zone::utc());
        }
        Ok(Zone { tz, utc, label })
    }

    /// The canonical IANA name (`"UTC"` for `Zone::utc`), or the POSIX TZ string the zone was
    /// given as.
    pub fn name(&self) -> &str {
        match (&self.label, self.tz.iana_name()) {
            (Some(label), _) => label,
            (None, Some(name)) => name,
            (None, None) => "UTC",
        }
    }
}

/// An IANA zone from the bundled database.
#[cfg(feature = "tzdb")]
fn iana(name: &str) -> Option<(TimeZone, Option<String>)> {
    TimeZone::get(name).ok().map(|tz| (tz, None))
}

#[cfg(feature = "tzdb")]
fn unknown(name: &str) -> String {
    format!("unknown time zone {name:?}")
}

/// An IANA zone by its current rules, or its TZif data where the rules alone do not do
/// (build.rs's tables).
#[cfg(not(feature = "tzdb"))]
fn iana(name: &str) -> Option<(TimeZone, Option<String>)> {
    let lower = name.to_ascii_lowercase();
    if let Ok(i) = ZONES.binary_search_by(|(n, _, _)| (*n).cmp(lower.as_str())) {
        let (_, canonical, rules) = ZONES[i];
        if rules == "UTC0" {
            return Some((TimeZone::UTC, Some(canonical.to_owned())));
        }
        return TimeZone::posix(rules).ok().map(|tz| (tz, Some(canonical.to_owned())));
    }
    let i = ZONES_TZIF.binary_search_by(|(n, _, _)| (*n).cmp(lower.as_str())).ok()?;
    let (_, canonical, data) = ZONES_TZIF[i];
    TimeZone::tzif(canonical, data).ok().map(|tz| (tz, None))
}

#[cfg(not(feature = "tzdb"))]
fn unknown(name: &str) -> String {
    format!("unknown time zone {name:?}")
}

impl Window {
    pub(crate) const ALL: [Window; 5] = [Window::Minute, Window::Hour, Window::Day, Window::Week, Window::Month];

    /// The window's name in the config (`minute`, `hour`, `day`, `week`, `month`).
    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.name() == name)
    }

    /// A stable one-byte id used in the stored counter record. Never renumber: records written
    /// by an older version must keep their meaning.
    pub(crate) fn id(self) -> u8 {
        match self {
            Window::Minute => 1,
            Window::Hour => 2,
            Window::Day => 3,
            Window::Month => 4,
            Window::Week => 5,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.id() == id)
    }

    /// `[start, end)` of the UTC window containing `now`, in epoch milliseconds.
    pub fn bounds(self, now: Timestamp) -> (Timestamp, Timestamp) {
        let fixed = |len: u64| {
            let start = now - now % len;
            (start, start.saturating_add(len))
        };
        match self {
            Window::Minute => fixed(MINUTE_MS),
            Window::Hour => fixed(HOUR_MS),
            Window::Day => fixed(DAY_MS),
            Window::Week => {
                let days = now / DAY_MS;
                // 1970-01-01 was a Thursday, three days after a Monday.
                let next_monday = days + 7 - (days + 3) % 7;
                // The week of the epoch began on 1969-12-29: it starts at 0 here.
                (next_monday.saturating_sub(7) * DAY_MS, next_monday.saturating_mul(DAY_MS))
            }
            Window::Month => {
                let days = (now / DAY_MS) as i64;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1);
                (start as u64 * DAY_MS, (end as u64).saturating_mul(DAY_MS))
            }
        }
    }

    /// `[start, end)` of the window containing `now` in the calendar of `zone`, in epoch
    /// milliseconds (see the module docs for what a day or an hour is around DST changes).
    /// `start <= now < end` for every `now` up to the end of year 9999; a UTC zone takes
    /// [`Window::bounds`]' arithmetic.
    pub(crate) fn bounds_in(self, now: Timestamp, zone: &Zone) -> (Timestamp, Timestamp) {
        if zone.utc {
            return self.bounds(now);
        }
        self.zoned_bounds(now, &zone.tz).unwrap_or_else(|| self.bounds(now))
    }

    /// `None` where `jiff` cannot compute the window (near the ends of its range).
    fn zoned_bounds(self, now: Timestamp, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
        let now_ms = i64::try_from(now).ok()?;
        let t = jiff::Timestamp::from_millisecond(now_ms).ok()?;
        let (start, end) = match self {
            Window::Minute => clock_bounds(MINUTE_MS as i64, now_ms, t, tz)?,
            Window::Hour => clock_bounds(HOUR_MS as i64, now_ms, t, tz)?,
            Window::Day | Window::Week | Window::Month => self.calendar_bounds(t, tz)?,
        };
        // A window that began before the epoch starts at 0; `end > now >= 0`.
        Some((u64::try_from(start).unwrap_or(0), u64::try_from(end).ok()?))
    }

    /// Days, weeks and months: from the first instant of the local date that starts the window
    /// to the first instant of the one that starts the next.
    fn calendar_bounds(self, t: jiff::Timestamp, tz: &TimeZone) -> Option<(i64, i64)> {
        let mut first = self.first_date(tz.to_datetime(t).date())?;
        let mut start = first_instant(tz, first)?;
        // The first instant of a date is never later than an instant on that date.
        if start > t {
            return None;
        }
        for _ in 0..MAX_STEPS {
            let next = self.next_first_date(first)?;
            let end = first_instant(tz, next)?;
            if t < end {
                return Some((start.as_millisecond(), end.as_millisecond()));
            }
            // `t` is in a repeated hour after midnight of `next` was first reached
            // (clocks set back across midnight): it belongs to a later window.
            (first, start) = (next, end);
        }
        None
    }

    /// The first date of the window holding `date`.
    fn first_date(self, date: Date) -> Option<Date> {
        match self {
            Window::Week => {
                let back = i64::from(date.weekday().to_monday_zero_offset());
                date.checked_sub(jiff::Span::new().try_days(back).ok()?).ok()
            }
            Window::Month => Some(date.first_of_month()),
            _ => Some(date),
        }
    }

    /// The first date of the window after the one starting on `first`.
    fn next_first_date(self, first: Date) -> Option<Date> {
        match self {
            Window::Week => first.checked_add(jiff::Span::new().try_days(7).ok()?).ok(),
            Window::Month => first.last_of_month().tomorrow().ok(),
            _ => first.tomorrow().ok(),
        }
    }
}

/// The first instant at which the clocks of `tz` read `date` 00:00 or later: local midnight,
/// the earlier one when midnight happens twice, or the jump when the clocks skip it.
fn first_instant(tz: &TimeZone, date: Date) -> Option<jiff::Timestamp> {
    let midnight: DateTime = date.to_datetime(Time::midnight());
    match tz.to_ambiguous_timestamp(midnight).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(midnight).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(midnight).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the later offset, midnight lies before the jump; the jump is the next
            // transition.
            let before_jump = after.to_timestamp(midnight).ok()?;
            tz.following(before_jump).next().map(|tr| tr.timestamp())
        }
    }
}

/// Minutes and hours: a `len`-long stretch of the local clock at the offset in force at `now`,
/// cut at the offset changes that fall inside it, in epoch milliseconds.
fn clock_bounds(len: i64, now: i64, t: jiff::Timestamp, tz: &TimeZone) -> Option<(i64, i64)> {
    let offset = tz.to_offset(t);
    let offset_ms = i64::from(offset.seconds()) * 1000;
    let local = now.checked_add(offset_ms)?;
    let start = local - local.rem_euclid(len) - offset_ms;
    Some((clock_start(start, now, offset, tz)?, clock_end(start + len, t, offset, tz)?))
}

/// The latest change to `offset` at or before `now` starts the window if it comes after
/// `start`. Transitions that keep the offset (only the abbreviation changes) do not count.
fn clock_start(start: i64, now: i64, offset: Offset, tz: &TimeZone) -> Option<i64> {
    let mut probe = jiff::Timestamp::from_millisecond(now.checked_add(1)?).ok()?;
    for _ in 0..MAX_STEPS {
        let Some(tr) = tz.preceding(probe).next() else { return Some(start) };
        let at = tr.timestamp().as_millisecond();
        if at <= start {
            return Some(start);
        }
        if tz.to_offset(jiff::Timestamp::from_millisecond(at - 1).ok()?) != offset {
            return Some(at);
        }
        probe = tr.timestamp();
    }
    None
}

/// The first change away from `offset` after `t` ends the window if it comes before `end`.
fn clock_end(end: i64, t: jiff::Timestamp, offset: Offset, tz: &TimeZone) -> Option<i64> {
    let mut following = tz.following(t);
    for _ in 0..MAX_STEPS {
        let Some(tr) = following.next() else { return Some(end) };
        let at = tr.timestamp().as_millisecond();
        if at >= end {
            return Some(end);
        }
        if tr.offset() != offset {
            return Some(at);
        }
    }
    None
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
                "unknown window {name:?} (expected one of: minute, hour, day, week, month)"
            ))
        })
    }
}

// Days <-> proleptic Gregorian civil date, after Howard Hinnant's public-domain algorithms
// ("chrono-Compatible Low-Level Date Algorithms"), for the UTC fast path. Zones go through
// jiff and its time zone database.
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
        fn every_instant_lies_in_its_window(now in 0u64..8_000_000_000_000, w in 0usize..Window::ALL.len()) {
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

        #[test]
        fn utc_weeks_are_seven_days_from_a_monday(now in 345_600_000u64..8_000_000_000_000) {
            let (s, e) = Window::Week.bounds(now);
            prop_assert_eq!(e - s, 7 * DAY_MS);
            // 1970-01-05 was a Monday
            prop_assert_eq!((s / DAY_MS - 4) % 7, 0);
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

    // ---- weeks (UTC) ----

    /// An RFC 3339 instant (`2024-03-10T00:00-05:00`) in epoch milliseconds.
    fn at(rfc3339: &str) -> Timestamp {
        rfc3339.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
    }

    fn zone(name: &str) -> Zone {
        Zone::named(name).unwrap()
    }

    #[test]
    fn week_of_new_year_2026_starts_on_monday_2025_12_29() {
        let week = (at("2025-12-29T00:00Z"), at("2026-01-05T00:00Z"));
        assert_eq!(Window::Week.bounds(at("2026-01-01T12:00Z")), week);
        assert_eq!(Window::Week.bounds(at("2025-12-29T00:00Z")), week);
        // Sunday's last millisecond is still in it
        assert_eq!(Window::Week.bounds(at("2026-01-05T00:00Z") - 1), week);
        assert_eq!(Window::Week.bounds(at("2026-01-05T00:00Z")).0, at("2026-01-05T00:00Z"));
    }

    #[test]
    fn week_of_the_epoch_starts_at_zero() {
        // 1970-01-01 was a Thursday; its week began on 1969-12-29, before any u64 timestamp.
        assert_eq!(Window::Week.bounds(0), (0, at("1970-01-05T00:00Z")));
        assert_eq!(Window::Week.bounds_in(0, &zone("Asia/Tokyo")), (0, at("1970-01-05T00:00+09:00")));
        assert_eq!(Window::Day.bounds_in(0, &zone("Asia/Tokyo")), (0, at("1970-01-02T00:00+09:00")));
    }

    #[test]
    fn window_ids_are_stable() {
        let ids: Vec<(Window, u8)> = Window::ALL.iter().map(|&w| (w, w.id())).collect();
        assert_eq!(
            ids,
            [(Window::Minute, 1), (Window::Hour, 2), (Window::Day, 3), (Window::Week, 5), (Window::Month, 4)]
        );
        for w in Window::ALL {
            assert_eq!(Window::from_id(w.id()), Some(w));
            assert_eq!(Window::from_name(w.name()), Some(w));
        }
    }

    #[test]
    fn unknown_window_name_lists_the_known_ones() {
        let err = serde_json::from_str::<Window>(r#""fortnight""#).unwrap_err().to_string();
        assert!(
            err.starts_with(r#"unknown window "fortnight" (expected one of: minute, hour, day, week, month)"#),
            "{err}"
        );
        assert_eq!(serde_json::from_str::<Window>(r#""week""#).unwrap(), Window::Week);
        assert_eq!(serde_json::to_string(&Window::Week).unwrap(), r#""week""#);
    }

    // ---- zones ----

    #[test]
    fn zones_are_found_by_iana_name() {
        assert_eq!(Zone::utc().name(), "UTC");
        assert_eq!(zone("Asia/Riyadh").name(), "Asia/Riyadh");
        assert_eq!(zone("America/New_York").name(), "America/New_York");
        // the database matches names without regard to case and answers the canonical spelling
        assert_eq!(zone("asia/riyadh").name(), "Asia/Riyadh");
        assert_eq!(zone("asia/riyadh"), zone("Asia/Riyadh"));
        assert_eq!(zone("UTC"), Zone::utc());
        assert_eq!(zone("Etc/UTC").name(), "Etc/UTC");
    }

    #[test]
    fn posix_rules_are_zones_too() {
        let rules = zone("CET-1CEST,M3.5.0,M10.5.0/3");
        assert_eq!(rules.name(), "CET-1CEST,M3.5.0,M10.5.0/3");
        let berlin = zone("Europe/Berlin");
        // Every day, week and month from 2026 to 2031, an hour after each boundary.
        let mut now = 1_767_225_600_000u64;
        while now < 1_924_992_000_000 {
            for w in Window::ALL {
                assert_eq!(w.bounds_in(now, &rules), w.bounds_in(now, &berlin), "{w:?} at {now}");
            }
            now += 86_400_000 + 3_600_000;
        }
        assert!(Zone::named("CET-1CEST,M3.5.0").is_err(), "half a rule");
    }

    #[test]
    fn unknown_zone_is_an_error_naming_it() {
        assert_eq!(Zone::named("Mars/Olympus").unwrap_err(), r#"unknown time zone "Mars/Olympus""#);
        assert_eq!(Zone::named("").unwrap_err(), r#"unknown time zone """#);
        assert!(Zone::named("../../etc/passwd").is_err());
    }

    #[test]
    fn always_utc_zones_take_the_utc_arithmetic() {
        for name in ["UTC", "Etc/UTC", "GMT", "Etc/GMT", "Zulu"] {
            assert!(zone(name).utc, "{name}");
        }
        for name in ["Europe/London", "Africa/Abidjan", "Asia/Riyadh"] {
            assert!(!zone(name).utc, "{name}");
        }
    }

    /// `[start, end)` of `w` at the RFC 3339 instant `now` in `zone`.
    fn window(w: Window, now: &str, zone_name: &str) -> (Timestamp, Timestamp) {
        w.bounds_in(at(now), &zone(zone_name))
    }

    #[test]
    fn new_york_spring_forward_day_lasts_23_hours() {
        // 2024-03-10: 02:00 EST -> 03:00 EDT
        let (s, e) = window(Window::Day, "2024-03-10T12:00-04:00", "America/New_York");
        assert_eq!((s, e), (at("2024-03-10T00:00-05:00"), at("2024-03-11T00:00-04:00")));
        assert_eq!(e - s, 23 * HOUR_MS);
    }

    #[test]
    fn new_york_fall_back_day_lasts_25_hours() {
        // 2024-11-03: 02:00 EDT -> 01:00 EST
        let (s, e) = window(Window::Day, "2024-11-03T01:30-05:00", "America/New_York");
        assert_eq!((s, e), (at("2024-11-03T00:00-04:00"), at("2024-11-04T00:00-05:00")));
        assert_eq!(e - s, 25 * HOUR_MS);
    }

    #[test]
    fn berlin_dst_days_last_23_and_25_hours() {
        // 2024-03-31: 02:00 CET -> 03:00 CEST
        let (s, e) = window(Window::Day, "2024-03-31T02:30+02:00", "Europe/Berlin");
        assert_eq!((s, e), (at("2024-03-30T23:00Z"), at("2024-03-31T22:00Z")));
        assert_eq!(e - s, 23 * HOUR_MS);
        // 2024-10-27: 03:00 CEST -> 02:00 CET
        let (s, e) = window(Window::Day, "2024-10-27T02:30+01:00", "Europe/Berlin");
        assert_eq!((s, e), (at("2024-10-26T22:00Z"), at("2024-10-27T23:00Z")));
        assert_eq!(e - s, 25 * HOUR_MS);
    }

    #[test]
    fn day_whose_midnight_is_skipped_starts_when_the_clocks_jump() {
        // America/Santiago 2024-09-08: 24:00 -04 -> 01:00 -03, no midnight that day.
        let saturday = window(Window::Day, "2024-09-07T23:59:59.999-04:00", "America/Santiago");
        assert_eq!(saturday, (at("2024-09-07T00:00-04:00"), at("2024-09-08T04:00Z")));
        let sunday = window(Window::Day, "2024-09-08T01:00-03:00", "America/Santiago");
        assert_eq!(sunday, (at("2024-09-08T04:00Z"), at("2024-09-09T00:00-03:00")));
        assert_eq!(sunday.1 - sunday.0, 23 * HOUR_MS);
        // Asia/Beirut 2024-03-31, likewise (00:00 +02 -> 01:00 +03).
        let sunday = window(Window::Day, "2024-03-31T12:00+03:00", "Asia/Beirut");
        assert_eq!(sunday, (at("2024-03-30T22:00Z"), at("2024-04-01T00:00+03:00")));
        assert_eq!(sunday.1 - sunday.0, 23 * HOUR_MS);
    }

    #[test]
    fn hour_repeated_before_midnight_belongs_to_the_day_it_reads() {
        // America/Santiago 2024-04-07: 24:00 -03 -> 23:00 -04. The clocks never read Sunday
        // 00:00 -03; they read 23:00-24:00 twice, so Saturday lasts 25 hours.
        let saturday = (at("2024-04-06T00:00-03:00"), at("2024-04-07T00:00-04:00"));
        assert_eq!(window(Window::Day, "2024-04-06T23:30-03:00", "America/Santiago"), saturday);
        assert_eq!(window(Window::Day, "2024-04-06T23:30-04:00", "America/Santiago"), saturday);
        assert_eq!(saturday.1 - saturday.0, 25 * HOUR_MS);
    }

    #[test]
    fn day_whose_midnight_happens_twice_starts_at_the_first() {
        // America/Havana 2024-11-03: 01:00 -04 -> 00:00 -05, so Sunday 00:00 comes twice.
        let sunday = (at("2024-11-03T00:00-04:00"), at("2024-11-04T00:00-05:00"));
        assert_eq!(window(Window::Day, "2024-11-03T00:30-04:00", "America/Havana"), sunday);
        assert_eq!(window(Window::Day, "2024-11-03T00:30-05:00", "America/Havana"), sunday);
        assert_eq!(sunday.1 - sunday.0, 25 * HOUR_MS);
        assert_eq!(window(Window::Day, "2024-11-02T23:59:59.999-04:00", "America/Havana").1, sunday.0);
    }

    #[test]
    fn hour_repeated_across_midnight_counts_for_the_day_that_began() {
        // America/St_Johns 2010-11-07: 00:01 -02:30 -> 23:01 -03:30 on Saturday. Sunday began at
        // its first midnight, so Saturday 23:30 read the second time is already Sunday.
        let sunday = (at("2010-11-07T00:00-02:30"), at("2010-11-08T00:00-03:30"));
        assert_eq!(window(Window::Day, "2010-11-06T23:30-03:30", "America/St_Johns"), sunday);
        assert_eq!(window(Window::Day, "2010-11-07T00:00:30-02:30", "America/St_Johns"), sunday);
        let saturday = window(Window::Day, "2010-11-06T23:30-02:30", "America/St_Johns");
        assert_eq!(saturday, (at("2010-11-06T00:00-02:30"), sunday.0));
        // Both Saturdays 23:30 are in the week of Monday 2010-11-01.
        let week = (at("2010-11-01T00:00-02:30"), at("2010-11-08T00:00-03:30"));
        assert_eq!(window(Window::Week, "2010-11-06T23:30-02:30", "America/St_Johns"), week);
        assert_eq!(window(Window::Week, "2010-11-06T23:30-03:30", "America/St_Johns"), week);
    }

    #[test]
    fn a_date_the_zone_skipped_is_no_window() {
        // Pacific/Apia went from 2011-12-29 23:59:59 -10 to 2011-12-31 00:00 +14.
        let thursday = window(Window::Day, "2011-12-29T12:00-10:00", "Pacific/Apia");
        let saturday = window(Window::Day, "2011-12-31T12:00+14:00", "Pacific/Apia");
        assert_eq!(thursday, (at("2011-12-29T00:00-10:00"), at("2011-12-30T10:00Z")));
        assert_eq!(saturday, (at("2011-12-30T10:00Z"), at("2012-01-01T00:00+14:00")));
    }

    #[test]
    fn new_york_repeated_hour_is_two_one_hour_windows() {
        // 2024-11-03 01:00-02:00 happens in EDT, then again in EST.
        let first = window(Window::Hour, "2024-11-03T01:30-04:00", "America/New_York");
        let second = window(Window::Hour, "2024-11-03T01:30-05:00", "America/New_York");
        assert_eq!(first, (at("2024-11-03T01:00-04:00"), at("2024-11-03T02:00-04:00")));
        assert_eq!(second, (at("2024-11-03T01:00-05:00"), at("2024-11-03T02:00-05:00")));
        assert_eq!(first.1, second.0);
    }

    #[test]
    fn new_york_skipped_hour_leaves_its_neighbours_whole() {
        // 2024-03-10: 01:59:59.999 EST is followed by 03:00 EDT.
        let before = window(Window::Hour, "2024-03-10T01:59:59.999-05:00", "America/New_York");
        let after = window(Window::Hour, "2024-03-10T03:00-04:00", "America/New_York");
        assert_eq!(before, (at("2024-03-10T01:00-05:00"), at("2024-03-10T03:00-04:00")));
        assert_eq!(after, (at("2024-03-10T03:00-04:00"), at("2024-03-10T04:00-04:00")));
    }

    #[test]
    fn kolkata_hours_start_at_half_past_utc() {
        let (s, e) = Window::Hour.bounds_in(LEAP_DAY, &zone("Asia/Kolkata"));
        assert_eq!((s, e), (at("2024-02-29T13:30Z"), at("2024-02-29T14:30Z")));
        let (s, e) = Window::Day.bounds_in(LEAP_DAY, &zone("Asia/Kolkata"));
        assert_eq!((s, e), (at("2024-02-28T18:30Z"), at("2024-02-29T18:30Z")));
        // Asia/Kathmandu, +05:45
        let (s, _) = Window::Hour.bounds_in(LEAP_DAY, &zone("Asia/Kathmandu"));
        assert_eq!(s, at("2024-02-29T13:15Z"));
    }

    #[test]
    fn lord_howe_half_hour_shift_leaves_half_hour_windows() {
        let lh = "Australia/Lord_Howe";
        // 2024-04-07 02:00 +11 -> 01:30 +10:30: 01:30-02:00 happens twice.
        assert_eq!(
            window(Window::Hour, "2024-04-07T01:45+11:00", lh),
            (at("2024-04-07T01:00+11:00"), at("2024-04-07T02:00+11:00"))
        );
        assert_eq!(
            window(Window::Hour, "2024-04-07T01:45+10:30", lh),
            (at("2024-04-07T02:00+11:00"), at("2024-04-07T02:00+10:30"))
        );
        assert_eq!(
            window(Window::Hour, "2024-04-07T02:00+10:30", lh),
            (at("2024-04-07T02:00+10:30"), at("2024-04-07T03:00+10:30"))
        );
        // 2024-10-06 02:00 +10:30 -> 02:30 +11: the 02:00 hour is half an hour long.
        assert_eq!(
            window(Window::Hour, "2024-10-06T01:59+10:30", lh),
            (at("2024-10-06T01:00+10:30"), at("2024-10-06T02:30+11:00"))
        );
        assert_eq!(
            window(Window::Hour, "2024-10-06T02:45+11:00", lh),
            (at("2024-10-06T02:30+11:00"), at("2024-10-06T03:00+11:00"))
        );
        // and that day lasts 23 h 30 min
        let (s, e) = window(Window::Day, "2024-10-06T12:00+11:00", lh);
        assert_eq!((s, e), (at("2024-10-06T00:00+10:30"), at("2024-10-07T00:00+11:00")));
        assert_eq!(e - s, 23 * HOUR_MS + 30 * MINUTE_MS);
    }

    #[test]
    fn zoned_week_of_new_year_2026_starts_on_monday_2025_12_29() {
        for (name, offset) in [("Asia/Tokyo", "+09:00"), ("America/New_York", "-05:00"), ("Pacific/Kiritimati", "+14:00")] {
            let week = (at(&format!("2025-12-29T00:00{offset}")), at(&format!("2026-01-05T00:00{offset}")));
            assert_eq!(window(Window::Week, &format!("2026-01-01T12:00{offset}"), name), week, "{name}");
            assert_eq!(window(Window::Week, &format!("2026-01-04T23:59:59.999{offset}"), name), week, "{name}");
            assert_eq!(window(Window::Week, &format!("2025-12-29T00:00{offset}"), name), week, "{name}");
        }
    }

    #[test]
    fn week_with_a_dst_change_is_an_hour_short() {
        let (s, e) = window(Window::Week, "2024-03-10T12:00-04:00", "America/New_York");
        assert_eq!((s, e), (at("2024-03-04T00:00-05:00"), at("2024-03-11T00:00-04:00")));
        assert_eq!(e - s, 7 * DAY_MS - HOUR_MS);
    }

    #[test]
    fn zoned_months_follow_leap_rules() {
        let tokyo = zone("Asia/Tokyo");
        for (year, days) in [(2024, 29), (2100, 28), (2000, 29), (2023, 28)] {
            let first = at(&format!("{year}-02-01T00:00+09:00"));
            assert_eq!(Window::Month.bounds_in(first + 1, &tokyo), (first, first + days * DAY_MS), "February {year}");
            // one millisecond earlier is January
            assert_eq!(Window::Month.bounds_in(first - 1, &tokyo).1, first);
        }
        // March 2024 in New York loses the hour of the DST change.
        let (s, e) = window(Window::Month, "2024-03-15T12:00-04:00", "America/New_York");
        assert_eq!((s, e), (at("2024-03-01T00:00-05:00"), at("2024-04-01T00:00-04:00")));
        assert_eq!(e - s, 31 * DAY_MS - HOUR_MS);
        // December rolls into the next year.
        let (s, e) = window(Window::Month, "2025-12-31T23:59:59.999-05:00", "America/New_York");
        assert_eq!((s, e), (at("2025-12-01T00:00-05:00"), at("2026-01-01T00:00-05:00")));
    }

    #[test]
    fn instants_at_the_ends_of_the_range_never_panic() {
        const END_OF_9999: u64 = 253_402_300_799_999;
        for name in ZONES {
            let z = zone(name);
            for w in Window::ALL {
                for now in [0, 1, END_OF_9999 - DAY_MS, END_OF_9999 - 1, END_OF_9999] {
                    let (s, e) = w.bounds_in(now, &z);
                    assert!(s <= now && now < e, "{name} {w:?} {now}: {s}..{e}");
                }
                // Beyond year 9999 there is no promise but an answer.
                for now in [END_OF_9999 + 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
                    let _ = w.bounds_in(now, &z);
                    let _ = w.bounds(now);
                }
            }
        }
    }

    #[test]
    fn windows_tile_around_every_transition_of_every_zone_1970_to_2040() {
        let until = at("2040-01-01T00:00Z") as i64;
        let mut checked = 0;
        for name in jiff::tz::db().available() {
            let z = zone(name.as_str());
            let tz = z.tz.clone();
            for tr in tz.following(jiff::Timestamp::UNIX_EPOCH) {
                let t = tr.timestamp().as_millisecond();
                if t >= until {
                    break;
                }
                for delta in [-2 * HOUR_MS as i64, -1, 0, 1, 30 * MINUTE_MS as i64, 2 * HOUR_MS as i64] {
                    let Ok(now) = u64::try_from(t + delta) else { continue };
                    for w in Window::ALL {
                        let (s, e) = w.bounds_in(now, &z);
                        assert!(s <= now && now < e, "{name} {w:?} at {now}: {s}..{e}");
                        if s > 0 {
                            assert_eq!(w.bounds_in(s - 1, &z).1, s, "{name} {w:?} before {s}");
                        }
                        assert_eq!(w.bounds_in(e, &z).0, e, "{name} {w:?} after {e}");
                        if matches!(w, Window::Minute | Window::Hour) {
                            let len = if w == Window::Hour { HOUR_MS } else { MINUTE_MS };
                            assert!(e - s <= len, "{name} {w:?} at {now}: {s}..{e}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    /// Zones with something to test: DST in either hemisphere, midnight skipped or repeated,
    /// half-hour and 45-minute offsets, a 30-minute DST shift, a skipped date, always-UTC.
    const ZONES: [&str; 12] = [
        "America/New_York",
        "Europe/Berlin",
        "America/Santiago",
        "Asia/Beirut",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "Pacific/Apia",
        "America/St_Johns",
        "Asia/Tokyo",
        "Etc/UTC",
    ];

    /// Far enough from the end of year 9999 that the window after `now`'s still ends within
    /// it in every zone (later, `bounds_in` answers with UTC windows, which need not meet).
    const ZONED_TILING_LIMIT: u64 = 253_394_352_000_000; // 9999-10-01T00:00Z

    proptest! {
        #[test]
        fn zoned_windows_contain_now_and_tile(
            now in 0u64..ZONED_TILING_LIMIT,
            z in 0usize..ZONES.len(),
            w in 0usize..Window::ALL.len(),
        ) {
            let (w, z) = (Window::ALL[w], zone(ZONES[z]));
            let (s, e) = w.bounds_in(now, &z);
            prop_assert!(s <= now && now < e, "{:?} {}: {}..{}", w, z.name(), s, e);
            if s > 0 { prop_assert_eq!(w.bounds_in(s - 1, &z).1, s); }
            prop_assert_eq!(w.bounds_in(e, &z).0, e);
        }

        #[test]
        fn zoned_windows_contain_now_up_to_year_9999(
            now in 0u64..=253_402_300_799_999,
            z in 0usize..ZONES.len(),
            w in 0usize..Window::ALL.len(),
        ) {
            let (w, z) = (Window::ALL[w], zone(ZONES[z]));
            let (s, e) = w.bounds_in(now, &z);
            prop_assert!(s <= now && now < e);
        }

        #[test]
        fn recent_instants_tile_in_every_zone(
            now in 1_700_000_000_000u64..1_900_000_000_000,
            z in 0usize..ZONES.len(),
            w in 0usize..Window::ALL.len(),
        ) {
            let (w, z) = (Window::ALL[w], zone(ZONES[z]));
            let (s, e) = w.bounds_in(now, &z);
            prop_assert!(s <= now && now < e);
            prop_assert_eq!(w.bounds_in(s - 1, &z).1, s);
            prop_assert_eq!(w.bounds_in(e, &z).0, e);
        }

        #[test]
        fn utc_zone_answers_like_bounds(now in 0u64..=253_402_300_799_999, w in 0usize..Window::ALL.len()) {
            let w = Window::ALL[w];
            prop_assert_eq!(w.bounds_in(now, &Zone::utc()), w.bounds(now));
            prop_assert_eq!(w.bounds_in(now, &zone("Etc/UTC")), w.bounds(now));
        }

        #[test]
        fn clock_windows_never_outlast_their_length(
            now in 0u64..ZONED_TILING_LIMIT,
            z in 0usize..ZONES.len(),
        ) {
            let z = zone(ZONES[z]);
            let (s, e) = Window::Hour.bounds_in(now, &z);
            prop_assert!(e - s <= HOUR_MS);
            let (s, e) = Window::Minute.bounds_in(now, &z);
            prop_assert!(e - s <= MINUTE_MS);
        }

        #[test]
        fn days_start_at_local_midnight_where_it_exists(now in 0u64..4_102_444_800_000, z in 0usize..3) {
            // New York, Berlin and Tokyo change clocks away from midnight (since 1970).
            let tz = TimeZone::get(["America/New_York", "Europe/Berlin", "Asia/Tokyo"][z]).unwrap();
            let z = Zone { tz: tz.clone(), utc: false, label: None };
            for w in [Window::Day, Window::Week, Window::Month] {
                let (s, e) = w.bounds_in(now, &z);
                // (the window of the epoch starts at 0, whatever the local time then)
                for edge in [s, e].into_iter().filter(|&edge| edge > 0) {
                    let local = tz.to_datetime(jiff::Timestamp::from_millisecond(edge as i64).unwrap());
                    prop_assert_eq!(local.time(), Time::midnight());
                }
                let local_start = tz.to_datetime(jiff::Timestamp::from_millisecond(s as i64).unwrap()).date();
                if s == 0 { continue; }
                match w {
                    Window::Week => prop_assert_eq!(local_start.weekday(), jiff::civil::Weekday::Monday),
                    Window::Month => prop_assert_eq!(local_start.day(), 1),
                    _ => {}
                }
                // 23 to 25 hours a day; a week or month is whole days plus or minus an hour
                let hours = (e - s) / HOUR_MS;
                prop_assert!(w != Window::Day || (23..=25).contains(&hours), "{} h", hours);
            }
        }
    }
}
