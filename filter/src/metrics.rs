//! The filter's counters (Envoy prefixes them with `wasmcustom.`): one enum, named in one
//! exhaustive `match`, so a new metric cannot be forgotten in its definition; and the labelled
//! metrics core reads off each finished request's record ([`tollgate_core::metrics`]), whose
//! labels are encoded in the name for Envoy's tag extraction ([`envoy_name`], docs/metrics.md).

use std::cell::RefCell;
use std::collections::HashMap;

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
    /// A labelled metric's id by its encoded name, defined at its first sample: a name is
    /// defined once per VM (each definition would add a stat). Bounded: label values come from
    /// the policy or fixed sets (core's `metrics`).
    labelled: RefCell<HashMap<String, u32>>,
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
            let name = envoy_name(sample);
            let known = self.labelled.borrow().get(&name).copied();
            let id = match known {
                Some(id) => id,
                None => {
                    let kind = match sample.kind {
                        Kind::Counter => abi::METRIC_COUNTER,
                        Kind::Histogram => abi::METRIC_HISTOGRAM,
                    };
                    let id = abi::define_metric(kind, &name).unwrap_or(0);
                    self.labelled.borrow_mut().insert(name, id);
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
    fn every_metric_is_listed_once_with_its_own_name() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i, "ALL is in definition order");
            assert!(m.name().starts_with("tollgate_"));
            assert!(!Metric::ALL[i + 1..].contains(m), "{m:?} listed twice");
            assert!(Metric::ALL[i + 1..].iter().all(|o| o.name() != m.name()), "{} named twice", m.name());
        }
    }
}
