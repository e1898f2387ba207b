//! OpenAI's duration format for `x-ratelimit-reset-*` headers.
//!
//! OpenAI sends Go-style durations: `6m0s`, `1s`, `12ms`, `17.28s`, `1h2m3s`. We produce the
//! same at millisecond precision: below one second, whole milliseconds (`0s` for zero);
//! otherwise hours and minutes when non-zero, then seconds with trailing zeros of the fraction
//! removed.

pub fn openai_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let secs = ms / 1000 % 60;
    let frac = ms % 1000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{secs}s"));
    } else {
        let f = format!("{frac:03}");
        out.push_str(&format!("{secs}.{}s", f.trim_end_matches('0')));
    }
    out
}

/// `retry-after` is whole seconds; round up so a client that obeys it is never early.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_openai() {
        assert_eq!(openai_duration(0), "0s");
        assert_eq!(openai_duration(12), "12ms");
        assert_eq!(openai_duration(999), "999ms");
        assert_eq!(openai_duration(1000), "1s");
        assert_eq!(openai_duration(17_280), "17.28s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_500), "1h2m3.5s");
        assert_eq!(openai_duration(3_600_000), "1h0m0s");
        assert_eq!(openai_duration(31 * 86_400_000), "744h0m0s");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
    }
}
