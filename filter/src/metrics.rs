//! The filter's counters (Envoy prefixes them with `wasmcustom.`): one enum, named in one
//! exhaustive `match`, so a new metric cannot be forgotten in its definition; and the labelled
//! metrics core reads off each finished request's record ([`tollgate_core::metrics`]), whose
//! labels are encoded in the name for Envoy's tag extraction ([`envoy_name`], docs/metrics.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tollgate_core::metrics::{Kind, Sample};

use crate::abi;

/// A counter the filter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests admitted (counted).
    Allowed,
    /// Requests a limit refused (429).
    Denied,
    /// Requests refused before admission: bad body, unknown model, guards, identity token.
    Invalid,
    /// The counter store failed (admission or a health read/report).
    StoreFailures,
    /// A host call failed.
    HostErrors,
    /// Answers that carried a soft-limit warning.
    Warnings,
    /// Requests served by a downgrade's model.
    Downgrades,
    /// Members evicted from full shared-data slots.
    Evictions,
    /// Keys a settlement could not update.
    SettleFailures,
    /// Webhook events delivered (the webhook answered 2xx).
    NotifySent,
    /// Webhook events not delivered: not dispatched, answered with another status, or no answer
    /// (refused, reset, timed out). Events are never retried.
    NotifyFailed,
    /// Provider answers reporting more usage than the request can have used: charged only up
    /// to the bound.
    UsageImplausible,
    /// Chat completions sent to a mapped provider (translated, or passed through normalised).
    Translated,
    /// Requests answered after admission because their provider cannot take them as asked.
    Refused,
    /// Provider answers that were errors, or streams that ended in one.
    UpstreamErrors,
    /// Prompt tokens providers reported.
    TokensInput,
    /// Output tokens providers reported.
    TokensOutput,
    /// Attempts started on an alias's deployments.
    Attempts,
    /// Attempts that failed in a way the policy falls back on.
    AttemptFailures,
    /// Attempts after the first.
    Fallbacks,
    /// Alias requests no deployment served (`all_deployments_failed`).
    AttemptsExhausted,
    /// Alias requests refused because every deployment was cooling down (503).
    DeploymentsUnavailable,
    /// Chat requests whose body never reached the filter while their headers were held
    /// (Envoy without `allow_on_headers_stop_iteration`): answered with a 500 naming it.
    BodyNeverCame,
    /// Operator API calls refused for a missing or wrong admin key (401).
    AdminUnauthorized,
}

impl Metric {
    /// Every metric, in definition order.
    pub const ALL: [Metric; 24] = [
        Metric::Allowed,
        Metric::Denied,
        Metric::Invalid,
        Metric::StoreFailures,
        Metric::HostErrors,
        Metric::Warnings,
        Metric::Downgrades,
        Metric::Evictions,
        Metric::SettleFailures,
        Metric::NotifySent,
        Metric::NotifyFailed,
        Metric::UsageImplausible,
        Metric::Translated,
        Metric::Refused,
        Metric::UpstreamErrors,
        Metric::TokensInput,
        Metric::TokensOutput,
        Metric::Attempts,
        Metric::AttemptFailures,
        Metric::Fallbacks,
        Metric::AttemptsExhausted,
        Metric::DeploymentsUnavailable,
        Metric::BodyNeverCame,
        Metric::AdminUnauthorized,
    ];

    /// The counter's name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Allowed => "tollgate_requests_allowed",
            Metric::Denied => "tollgate_requests_denied",
            Metric::Invalid => "tollgate_requests_invalid",
            Metric::StoreFailures => "tollgate_store_failures",
            Metric::HostErrors => "tollgate_host_errors",
            Metric::Warnings => "tollgate_warnings",
            Metric::Downgrades => "tollgate_downgrades",
            Metric::Evictions => "tollgate_evictions",
            Metric::SettleFailures => "tollgate_settle_failures",
            Metric::NotifySent => "tollgate_notify_sent",
            Metric::NotifyFailed => "tollgate_notify_failed",
            Metric::UsageImplausible => "tollgate_usage_implausible",
            Metric::Translated => "tollgate_requests_translated",
            Metric::Refused => "tollgate_translation_refused",
            Metric::UpstreamErrors => "tollgate_upstream_errors",
            Metric::TokensInput => "tollgate_tokens_input",
            Metric::TokensOutput => "tollgate_tokens_output",
            Metric::Attempts => "tollgate_attempts",
            Metric::AttemptFailures => "tollgate_attempt_failures",
            Metric::Fallbacks => "tollgate_fallbacks",
            Metric::AttemptsExhausted => "tollgate_attempts_exhausted",
            Metric::DeploymentsUnavailable => "tollgate_deployments_unavailable",
            Metric::BodyNeverCame => "tollgate_body_never_came",
            Metric::AdminUnauthorized => "tollgate_admin_unauthorized",
        }
    }
}

/// The host's ids of every counter (0 where the host refused to define one: increments then
/// go nowhere rather than fail a request), and of each labelled metric defined so far.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: [u32; Metric::ALL.len()],
    /// A labelled metric's id by the 64-bit hash of its name and labels ([`sample_key`]),
    /// defined at its first sample: a name is defined once per VM (each definition would add a
    /// stat), and formatted only then. Bounded: label values come from the policy or fixed sets
    /// (core's `metrics`).
    labelled: RefCell<HashMap<u64, u32, BuildHasherDefault<Prehashed>>>,
}

/// FNV-1a over a sample's name and labels, each part ended by a byte no name or value holds:
/// the id cache's key, computed without formatting the name.
fn sample_key(sample: &Sample) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8], end: u8| {
        for b in bytes.iter().chain(std::iter::once(&end)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(sample.name.as_bytes(), 0xff);
    for (label, value) in &sample.labels {
        eat(label.as_bytes(), 0xfe);
        eat(value.as_bytes(), 0xfd);
    }
    h
}

/// The hasher of a map whose keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A labelled metric's name as Envoy's tag extraction reads it: `label=.=value;.;` for each
/// label, then the name (Istio's encoding: values may hold dots, which Envoy's stat names
/// split on otherwise). The bootstrap's `stats_config.stats_tags` has one rule per label name,
/// `(label=\.=(.*?);\.;)`, and Prometheus sees `name{label="value",…}`.
pub fn envoy_name(sample: &Sample) -> String {
    let mut name = String::with_capacity(160);
    for (label, value) in &sample.labels {
        name.push_str(label);
        name.push_str("=.=");
        name.push_str(value);
        name.push_str(";.;");
    }
    name.push_str(sample.name);
    name
}

impl Metrics {
    /// Defines every counter with the host.
    pub fn define() -> Metrics {
        let mut ids = [0u32; Metric::ALL.len()];
        for (id, m) in ids.iter_mut().zip(Metric::ALL) {
            *id = abi::define_counter(m.name()).unwrap_or(0);
        }
        Metrics { ids, labelled: RefCell::default() }
    }

    /// Adds or records each sample in its labelled metric (defined at first use; a metric the
    /// host refuses to define is skipped, and not asked for again).
    pub fn emit(&self, samples: &[Sample]) {
        for sample in samples {
            let key = sample_key(sample);
            let known = self.labelled.borrow().get(&key).copied();
            let id = match known {
                Some(id) => id,
                None => {
                    let kind = match sample.kind {
                        Kind::Counter => abi::METRIC_COUNTER,
                        Kind::Histogram => abi::METRIC_HISTOGRAM,
                    };
                    let id = abi::define_metric(kind, &envoy_name(sample)).unwrap_or(0);
                    self.labelled.borrow_mut().insert(key, id);
                    id
                }
            };
            match (id, sample.kind) {
                (0, _) => {}
                (id, Kind::Counter) => abi::increment_by(id, sample.value),
                (id, Kind::Histogram) => abi::record_metric(id, sample.value),
            }
        }
    }

    /// Adds one.
    pub fn add(&self, m: Metric) {
        self.add_n(m, 1);
    }

    /// Adds `n` (nothing for 0).
    pub fn add_n(&self, m: Metric, n: u64) {
        if let Some(&id) = self.ids.get(m as usize) {
            abi::increment_by(id, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_samples_key_tells_its_name_and_every_label_apart() {
        let sample = |name: &'static str, labels: &[(&'static str, &str)]| Sample { name, kind: Kind::Counter, labels: labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(), value: 1 };
        let keys = [
            sample_key(&sample("a", &[("tier", "free")])),
            sample_key(&sample("b", &[("tier", "free")])),
            sample_key(&sample("a", &[("tier", "pro")])),
            sample_key(&sample("a", &[("tier", "fre"), ("e", "")])),
            sample_key(&sample("a", &[("tier", "free"), ("decision", "allowed")])),
        ];
        for (i, k) in keys.iter().enumerate() {
            assert!(!keys[i + 1..].contains(k), "{i}");
        }
        assert_eq!(sample_key(&sample("a", &[("tier", "free")])), keys[0]);
        assert_eq!(envoy_name(&sample("x", &[("tier", "free"), ("gen_ai_request_model", "gpt-4.1")])), "tier=.=free;.;gen_ai_request_model=.=gpt-4.1;.;x");
    }

    #[test]
    fn every_metric_is_listed_once_with_its_own_name() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i, "ALL is in definition order");
            assert!(m.name().starts_with("tollgate_"));
            assert!(!Metric::ALL[i + 1..].contains(m), "{m:?} listed twice");
            assert!(Metric::ALL[i + 1..].iter().all(|o| o.name() != m.name()), "{} named twice", m.name());
        }
    }
}
