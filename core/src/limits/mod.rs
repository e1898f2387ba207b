//! The limits a policy declares: what is counted (requests, tokens, cost, concurrent requests),
//! over what (a calendar window, a smoothed rate, or "at once"), for whom (each identity, each
//! client IP, a whole tier, everyone), and what happens as usage approaches the limit.
//!
//! ```json
//! { "per": "identity", "window": "day", "total_tokens": 100000,
//!   "soft": [ {"at": 80, "action": "warn"}, {"at": 80, "action": "notify"},
//!             {"at": 100, "action": "downgrade", "model": "small"}, {"at": 120, "action": "block"} ] }
//! { "rate": {"per": "minute", "burst": 5}, "requests": 30 }
//! { "per": "global", "concurrent": 500 }
//! ```
//! Exactly one of `requests`, `input_tokens`, `output_tokens`, `total_tokens`, `cost_usd`,
//! `concurrent` per limit. Calendar and rate limits need `window` or `rate`; `concurrent` takes
//! neither. `per` defaults to `identity`.
//!
//! Soft thresholds are percentages of the limit, on window limits only:
//! - `block` at P: a request is refused when its reservation would take usage above P % (grace
//!   when P > 100). Without any `block` threshold a limit blocks at 100 % — unless it has a
//!   `downgrade` threshold, which then is its enforcement (add a `block` to cap that too).
//! - `warn` at P: requests that take usage to P % or more go through with a warning.
//! - `downgrade` at P: once usage is at P % or more, requests are served by `model` (the
//!   highest crossed threshold's model wins).
//! - `notify` at P: a webhook event, once per window, when usage first reaches P %.
//!
//! Rate and concurrency limits block at 100 % and take no soft thresholds.

pub mod engine;
pub mod ledger;
pub mod record;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, ConfigError};
use crate::window::Window;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Requests, each counting one.
    Requests,
    /// Prompt tokens.
    InputTokens,
    /// Output tokens.
    OutputTokens,
    /// Prompt and output tokens together.
    TotalTokens,
    /// Integer micro-dollars from the policy's price table.
    #[serde(rename = "cost_usd")]
    CostMicros,
    /// Requests in flight.
    Concurrent,
}

impl Metric {
    pub(crate) const ALL: [Metric; 6] = [
        Metric::Requests,
        Metric::InputTokens,
        Metric::OutputTokens,
        Metric::TotalTokens,
        Metric::CostMicros,
        Metric::Concurrent,
    ];

    /// The config key and the name used in headers, messages and webhook events.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::InputTokens => "input_tokens",
            Metric::OutputTokens => "output_tokens",
            Metric::TotalTokens => "total_tokens",
            Metric::CostMicros => "cost_usd",
            Metric::Concurrent => "concurrent",
        }
    }

    pub(crate) fn id(self) -> u8 {
        match self {
            Metric::Requests => 1,
            Metric::InputTokens => 2,
            Metric::OutputTokens => 3,
            Metric::TotalTokens => 4,
            Metric::CostMicros => 5,
            Metric::Concurrent => 6,
        }
    }

    pub(crate) fn from_id(id: u8) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.id() == id)
    }

    /// Token metrics are described by OpenAI's `x-ratelimit-*-tokens` headers.
    pub(crate) fn is_tokens(self) -> bool {
        matches!(self, Metric::InputTokens | Metric::OutputTokens | Metric::TotalTokens)
    }
}

/// Whose usage a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each identity on its own (the default).
    Identity,
    /// Each client IP address, whoever is signed in.
    Ip,
    /// Everyone in the tier together.
    Tier,
    /// Every request through the gateway (top-level `global.limits` only).
    Global,
}

impl Scope {
    /// The scope's name in the config (`per`).
    pub fn name(self) -> &'static str {
        match self {
            Scope::Identity => "identity",
            Scope::Ip => "ip",
            Scope::Tier => "tier",
            Scope::Global => "global",
        }
    }
}

/// How usage is counted over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Span {
    /// Calendar window in the policy's time zone.
    Window(Window),
    /// GCRA: `max` per `period_ms` on average, at most `burst` at once.
    Rate {
        /// The period `max` units are spread over, in milliseconds.
        period_ms: u64,
        /// The most units at once.
        burst: u64,
    },
    /// In flight now (concurrency).
    Now,
}

/// What a soft threshold does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Let requests through with a warning.
    Warn,
    /// Serve requests with this model instead.
    Downgrade(String),
    /// Refuse requests that would go above the threshold.
    Block,
    /// Post a webhook event, once per window.
    Notify,
}

/// A soft threshold: what happens at a percentage of the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    /// The percentage of the limit it is at.
    pub percent: u32,
    /// What happens there.
    pub action: Action,
}

/// One validated limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// `metric/window` (e.g. `total_tokens/day`), `metric/rate`, `concurrent`, or the
    /// configured name.
    pub name: String,
    /// Whose usage it counts.
    pub scope: Scope,
    /// What it counts.
    pub metric: Metric,
    /// Over what time it counts.
    pub span: Span,
    /// The most usage allowed (a rate limit: per period).
    pub max: u64,
    /// Its soft thresholds, as configured.
    pub thresholds: Vec<Threshold>,
}

impl Limit {
    /// Usage above which requests are refused (`None`: this limit never refuses).
    pub fn block_at(&self) -> Option<u64> {
        let block = self.thresholds.iter().filter(|t| t.action == Action::Block).map(|t| t.percent).min();
        match block {
            Some(p) => Some(percent_of(self.max, p)),
            None if self.thresholds.iter().any(|t| matches!(t.action, Action::Downgrade(_))) => None,
            None => Some(self.max),
        }
    }

    /// The calendar window a window limit counts over (`None` for rate and concurrency limits).
    pub fn window(&self) -> Option<Window> {
        match self.span {
            Span::Window(w) => Some(w),
            _ => None,
        }
    }

    /// The same limit split evenly over `shards` counters (the worker's sharded aggregates):
    /// each shard gets `max / shards`, the first `max % shards` one more.
    pub fn shard(&self, shard: u32, shards: u32) -> Limit {
        let shards = shards.max(1) as u64;
        let base = self.max / shards;
        let extra = u64::from((shard as u64) < self.max % shards);
        let mut l = self.clone();
        l.max = (base + extra).max(1);
        if let Span::Rate { burst, .. } = &mut l.span {
            *burst = (*burst / shards).max(1);
        }
        l
    }
}

/// `max × percent / 100`, rounded down, saturating.
pub fn percent_of(max: u64, percent: u32) -> u64 {
    ((max as u128 * percent as u128) / 100).min(u64::MAX as u128) as u64
}

/// A rate period's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

impl Period {
    fn ms(self) -> u64 {
        match self {
            Period::Second => 1000,
            Period::Minute => 60_000,
            Period::Hour => 3_600_000,
            Period::Day => 86_400_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per: Period,
    burst: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawAction {
    Warn,
    Downgrade,
    Block,
    Notify,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawThreshold {
    at: u32,
    action: RawAction,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    name: Option<String>,
    per: Option<Scope>,
    window: Option<Window>,
    rate: Option<RawRate>,
    requests: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    cost_usd: Option<f64>,
    concurrent: Option<u64>,
    soft: Option<Vec<RawThreshold>>,
}

/// Largest percentage a threshold may name.
pub(crate) const MAX_PERCENT: u32 = 1000;

impl RawLimit {
    /// Validates one limit at `path` (e.g. `tiers.free.limits[2]`). `global` says whether it
    /// sits in the top-level `global.limits`; `model_known` checks downgrade targets.
    pub(crate) fn validate(self, path: &str, global: bool, model_known: &dyn Fn(&str) -> bool) -> Result<Limit, ConfigError> {
        let metrics: Vec<(Metric, u64)> = [
            (Metric::Requests, self.requests),
            (Metric::InputTokens, self.input_tokens),
            (Metric::OutputTokens, self.output_tokens),
            (Metric::TotalTokens, self.total_tokens),
            (Metric::Concurrent, self.concurrent),
        ]
        .into_iter()
        .filter_map(|(m, v)| v.map(|v| (m, v)))
        .chain(self.cost_usd.map(|usd| (Metric::CostMicros, usd_to_micros(usd))))
        .collect();
        let (metric, max) = match metrics.as_slice() {
            [one] => *one,
            [] => {
                return Err(invalid(
                    path,
                    "names nothing to limit: give one of requests, input_tokens, output_tokens, total_tokens, cost_usd, concurrent",
                ))
            }
            [a, b, ..] => {
                return Err(invalid(
                    path,
                    format!("limits one thing: both {} and {} are given (use two limits)", a.0.name(), b.0.name()),
                ))
            }
        };
        let field = format!("{path}.{}", metric.name());
        if let Some(usd) = self.cost_usd {
            if !(usd.is_finite() && usd > 0.0 && usd <= 1e12) {
                return Err(invalid(field, "must be a positive amount of US dollars"));
            }
        }
        if max == 0 {
            return Err(invalid(
                field,
                "must be at least 1 (to block a tier entirely, remove it from the tiers its users can reach)",
            ));
        }
        let scope = match (self.per, global) {
            (None, true) | (Some(Scope::Global), true) => Scope::Global,
            (Some(other), true) => {
                return Err(invalid(format!("{path}.per"), format!("global limits count every request; \"{}\" belongs in a tier's limits", other.name())))
            }
            (Some(Scope::Global), false) => {
                return Err(invalid(format!("{path}.per"), "\"global\" limits go in the top-level global.limits"))
            }
            (None, false) => Scope::Identity,
            (Some(s), false) => s,
        };
        let span = match (metric, self.window, self.rate) {
            (Metric::Concurrent, None, None) => Span::Now,
            (Metric::Concurrent, _, _) => {
                return Err(invalid(path, "concurrent limits count requests in flight: they take no window or rate"))
            }
            (_, Some(w), None) => Span::Window(w),
            (_, None, Some(rate)) => {
                if rate.burst == 0 {
                    return Err(invalid(format!("{path}.rate.burst"), "must be at least 1"));
                }
                Span::Rate { period_ms: rate.per.ms(), burst: rate.burst }
            }
            (_, Some(_), Some(_)) => return Err(invalid(path, "give either window or rate, not both")),
            (_, None, None) => {
                return Err(invalid(path, "needs a window (minute, hour, day, week, month) or a rate"))
            }
        };
        let mut thresholds = Vec::new();
        for (i, t) in self.soft.unwrap_or_default().into_iter().enumerate() {
            let tpath = format!("{path}.soft[{i}]");
            if !matches!(span, Span::Window(_)) {
                return Err(invalid(format!("{path}.soft"), "soft thresholds apply to window limits only"));
            }
            if t.at == 0 || t.at > MAX_PERCENT {
                return Err(invalid(format!("{tpath}.at"), format!("must be a percentage from 1 to {MAX_PERCENT}")));
            }
            let action = match (t.action, t.model) {
                (RawAction::Downgrade, Some(model)) => {
                    if !model_known(&model) {
                        return Err(invalid(format!("{tpath}.model"), format!("unknown model \"{model}\" (downgrade targets must be in models)")));
                    }
                    Action::Downgrade(model)
                }
                (RawAction::Downgrade, None) => {
                    return Err(invalid(tpath, "a downgrade names the model to serve instead (\"model\")"))
                }
                (_, Some(_)) => return Err(invalid(format!("{tpath}.model"), "only a downgrade names a model")),
                (RawAction::Warn, None) => Action::Warn,
                (RawAction::Block, None) => Action::Block,
                (RawAction::Notify, None) => Action::Notify,
            };
            if let Some(j) = thresholds.iter().position(|o: &Threshold| o.percent == t.at && std::mem::discriminant(&o.action) == std::mem::discriminant(&action)) {
                return Err(invalid(tpath, format!("duplicate threshold (same as soft[{j}])")));
            }
            thresholds.push(Threshold { percent: t.at, action });
        }
        if thresholds.iter().filter(|t| t.action == Action::Block).count() > 1 {
            return Err(invalid(format!("{path}.soft"), "at most one block threshold"));
        }
        let name = match self.name {
            Some(n) if n.is_empty() || n.len() > 64 || !n.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') => {
                return Err(invalid(format!("{path}.name"), "names are 1-64 printable ASCII characters without quotes or backslashes"))
            }
            Some(n) => n,
            None => default_name(scope, metric, span),
        };
        Ok(Limit { name, scope, metric, span, max, thresholds })
    }
}

fn default_name(scope: Scope, metric: Metric, span: Span) -> String {
    let base = match span {
        Span::Window(w) => format!("{}/{}", metric.name(), w.name()),
        Span::Rate { period_ms, .. } => {
            let per = match period_ms {
                1000 => "second",
                60_000 => "minute",
                3_600_000 => "hour",
                _ => "day",
            };
            format!("{}/rate-{per}", metric.name())
        }
        Span::Now => metric.name().to_owned(),
    };
    match scope {
        Scope::Identity => base,
        other => format!("{}:{base}", other.name()),
    }
}

/// US dollars → integer micro-dollars, rounded to nearest.
pub(crate) fn usd_to_micros(usd: f64) -> u64 {
    if !usd.is_finite() || usd <= 0.0 {
        return 0;
    }
    (usd * 1e6).round().min(u64::MAX as f64) as u64
}

/// Checks a list of limits for duplicates (same scope, metric and span).
pub(crate) fn check_duplicates(path: &str, limits: &[Limit]) -> Result<(), ConfigError> {
    for (i, l) in limits.iter().enumerate() {
        if let Some(j) = limits[..i].iter().position(|o| o.scope == l.scope && o.metric == l.metric && o.span == l.span) {
            let what = match l.span {
                Span::Window(w) => format!("duplicate limit: {} per {} over \"{}\"", l.metric.name(), l.scope.name(), w.name()),
                _ => format!("duplicate limit: {} per {}", l.metric.name(), l.scope.name()),
            };
            let field = match l.span {
                Span::Window(_) => format!("{path}[{i}].window"),
                _ => format!("{path}[{i}]"),
            };
            return Err(invalid(field, format!("{what} (already limited at limits[{j}])")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, global: bool) -> Result<Limit, String> {
        let raw: RawLimit = serde_json::from_str(json).map_err(|e| e.to_string())?;
        raw.validate("l", global, &|m| m == "small").map_err(|e| e.to_string())
    }

    #[test]
    fn names_default_to_metric_and_span() {
        assert_eq!(parse(r#"{"window":"day","total_tokens":5}"#, false).unwrap().name, "total_tokens/day");
        assert_eq!(parse(r#"{"per":"tier","window":"minute","requests":5}"#, false).unwrap().name, "tier:requests/minute");
        assert_eq!(parse(r#"{"rate":{"per":"minute","burst":2},"requests":5}"#, false).unwrap().name, "requests/rate-minute");
        assert_eq!(parse(r#"{"concurrent":500}"#, true).unwrap().name, "global:concurrent");
        assert_eq!(parse(r#"{"name":"daily","window":"day","cost_usd":1.5}"#, false).unwrap().max, 1_500_000);
    }

    #[test]
    fn every_mistake_names_its_path() {
        let cases = [
            (r#"{"window":"day"}"#, "l: names nothing to limit: give one of requests, input_tokens, output_tokens, total_tokens, cost_usd, concurrent"),
            (r#"{"window":"day","requests":1,"total_tokens":2}"#, "l: limits one thing: both requests and total_tokens are given (use two limits)"),
            (r#"{"window":"day","total_tokens":0}"#, "l.total_tokens: must be at least 1 (to block a tier entirely, remove it from the tiers its users can reach)"),
            (r#"{"window":"day","cost_usd":-1}"#, "l.cost_usd: must be a positive amount of US dollars"),
            (r#"{"requests":1}"#, "l: needs a window (minute, hour, day, week, month) or a rate"),
            (r#"{"window":"day","rate":{"per":"minute","burst":1},"requests":1}"#, "l: give either window or rate, not both"),
            (r#"{"rate":{"per":"minute","burst":0},"requests":1}"#, "l.rate.burst: must be at least 1"),
            (r#"{"window":"day","concurrent":3}"#, "l: concurrent limits count requests in flight: they take no window or rate"),
            (r#"{"per":"global","window":"day","requests":1}"#, "l.per: \"global\" limits go in the top-level global.limits"),
            (r#"{"rate":{"per":"minute","burst":1},"requests":1,"soft":[{"at":80,"action":"warn"}]}"#, "l.soft: soft thresholds apply to window limits only"),
            (r#"{"window":"day","requests":1,"soft":[{"at":0,"action":"warn"}]}"#, "l.soft[0].at: must be a percentage from 1 to 1000"),
            (r#"{"window":"day","requests":1,"soft":[{"at":100,"action":"downgrade"}]}"#, "l.soft[0]: a downgrade names the model to serve instead (\"model\")"),
            (r#"{"window":"day","requests":1,"soft":[{"at":100,"action":"downgrade","model":"huge"}]}"#, "l.soft[0].model: unknown model \"huge\" (downgrade targets must be in models)"),
            (r#"{"window":"day","requests":1,"soft":[{"at":100,"action":"warn","model":"small"}]}"#, "l.soft[0].model: only a downgrade names a model"),
            (r#"{"window":"day","requests":1,"soft":[{"at":80,"action":"warn"},{"at":80,"action":"warn"}]}"#, "l.soft[1]: duplicate threshold (same as soft[0])"),
            (r#"{"window":"day","requests":1,"soft":[{"at":100,"action":"block"},{"at":110,"action":"block"}]}"#, "l.soft: at most one block threshold"),
            (r#"{"name":"a\"b","window":"day","requests":1}"#, "l.name: names are 1-64 printable ASCII characters without quotes or backslashes"),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(json, false).unwrap_err(), expected, "{json}");
        }
        assert_eq!(
            parse(r#"{"per":"tier","concurrent":3}"#, true).unwrap_err(),
            "l.per: global limits count every request; \"tier\" belongs in a tier's limits"
        );
    }

    #[test]
    fn block_threshold_defaults_to_the_limit_unless_downgrade_enforces() {
        let l = parse(r#"{"window":"day","total_tokens":1000}"#, false).unwrap();
        assert_eq!(l.block_at(), Some(1000));
        let grace = parse(r#"{"window":"day","total_tokens":1000,"soft":[{"at":110,"action":"block"}]}"#, false).unwrap();
        assert_eq!(grace.block_at(), Some(1100));
        let down = parse(r#"{"window":"day","total_tokens":1000,"soft":[{"at":100,"action":"downgrade","model":"small"}]}"#, false).unwrap();
        assert_eq!(down.block_at(), None);
        let warn_only = parse(r#"{"window":"day","total_tokens":1000,"soft":[{"at":80,"action":"warn"}]}"#, false).unwrap();
        assert_eq!(warn_only.block_at(), Some(1000));
    }

    #[test]
    fn shards_split_the_limit_without_losing_any() {
        let l = parse(r#"{"per":"tier","window":"day","requests":10}"#, false).unwrap();
        let parts: Vec<u64> = (0..4).map(|i| l.shard(i, 4).max).collect();
        assert_eq!(parts, vec![3, 3, 2, 2]);
        assert_eq!(parts.iter().sum::<u64>(), 10);
    }
}
