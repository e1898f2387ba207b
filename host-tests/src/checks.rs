//! Checks shared by the end-to-end tests: the wall clock, RFC 3339 instants, OpenAI durations
//! and RFC 8941 dictionaries (the `x-tollgate-warning` header), parsed strictly so that a
//! malformed header fails the test.

use std::time::{SystemTime, UNIX_EPOCH};

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Epoch ms of the next UTC midnight.
pub fn next_midnight_ms() -> u64 {
    (now_ms() / 86_400_000 + 1) * 86_400_000
}

/// RFC 3339 UTC to the second (`2026-11-23T00:00:00Z`), from epoch ms.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Milliseconds in an OpenAI duration (`15h53m59.783s`, `59.7s`, `12ms`).
pub fn duration_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().unwrap_or_else(|_| panic!("bad duration {s:?}"));
    }
    let mut rest = s.strip_suffix('s').unwrap_or_else(|| panic!("bad duration {s:?}"));
    let mut total = 0f64;
    for (unit, ms) in [('h', 3_600_000f64), ('m', 60_000f64)] {
        if let Some((n, r)) = rest.split_once(unit) {
            total += n.parse::<f64>().unwrap_or_else(|_| panic!("bad duration {s:?}")) * ms;
            rest = r;
        }
    }
    (total + rest.parse::<f64>().unwrap_or_else(|_| panic!("bad duration {s:?}")) * 1000.0).round() as u64
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Int(i64),
    Str(String),
}

/// Parses an RFC 8941 dictionary of bare integers and strings (§4.2.2), strictly: anything else
/// fails the test.
pub fn sf_dictionary(text: &str) -> Vec<(String, Item)> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut out = vec![];
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_lowercase() || b[i].is_ascii_digit() || b"_-.*".contains(&b[i])) {
            i += 1;
        }
        assert!(i > start && b[start].is_ascii_lowercase(), "bad key at {start} in {text:?}");
        let key = text[start..i].to_owned();
        assert_eq!(b.get(i), Some(&b'='), "every member has a value: {text:?}");
        i += 1;
        let item = if b.get(i) == Some(&b'"') {
            i += 1;
            let mut s = String::new();
            loop {
                match b.get(i) {
                    Some(b'\\') => {
                        let c = b[i + 1];
                        assert!(c == b'"' || c == b'\\', "bad escape in {text:?}");
                        s.push(c as char);
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) if (0x20..=0x7e).contains(&c) => {
                        s.push(c as char);
                        i += 1;
                    }
                    _ => panic!("bad string in {text:?}"),
                }
            }
            Item::Str(s)
        } else {
            let start = i;
            if b.get(i) == Some(&b'-') {
                i += 1;
            }
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            assert!(i - start <= 15 && i > start, "bad integer in {text:?}");
            Item::Int(text[start..i].parse().expect("integer"))
        };
        assert!(!out.iter().any(|(k, _)| *k == key), "duplicate key {key} in {text:?}");
        out.push((key, item));
        if i == b.len() {
            return out;
        }
        assert_eq!(&text[i..i + 1], ",", "members are separated by commas: {text:?}");
        i += 1;
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
    }
}
