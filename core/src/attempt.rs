//! Attempts on a model alias's deployments: which deployment each attempt goes to, what an
//! attempt's outcome means (answer it, or fall back), what provider health records, and the
//! answer when no attempt served. Every host asks here; none decides it itself.
//!
//! - [`plan`]: the deployments' order for one request from their health (`choose`); every
//!   deployment cooling down is a 503 with `retry-after`, and the request was not sent
//!   ([`crate::ending::Ending::NotSent`]).
//! - [`Attempts`]: attempt `n` goes to the `n`-th deployment of the plan — a host that can skip
//!   (the worker) skips deployments that were not available when the plan was made; no attempt
//!   beyond the alias's `max_attempts`, and none starts once `fallback.total_timeout_ms` has
//!   passed since the first.
//! - [`judge`]: an attempt's outcome → [`Verdict`]. A success is the client's answer and tells
//!   health the provider's remaining quota. A failure the policy falls back on (`fallback.on`)
//!   moves to the next deployment and counts against the deployment's health. Any other failure
//!   (a 400: the client's own request) is the client's answer, translated, and says nothing about
//!   the provider: health records it not.

use crate::ending::Ending;
use crate::fallback::{choose, Alias, Choice, Failure, FallbackSettings, Health, Outcome, Plan, Quota};
use crate::render::{self, LocalResponse};

/// What a host saw of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The provider answered.
    Answer {
        /// The answer's HTTP status.
        status: u16,
        /// What the provider's headers say is left of its quota.
        quota: Quota,
        /// The provider's `retry-after`, in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// No answer: refused connection, timeout, reset before the response headers.
    NoAnswer(Failure),
    /// A streamed answer broke after its first bytes reached the client.
    Cut,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The answer is the client's: a success, or a failure the policy does not fall back on (a
    /// provider error is translated; no answer at all is a 502/504).
    Answer,
    /// Try the next deployment, if an attempt is left.
    FallBack,
}

/// The meaning of one attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Answer, or fall back.
    pub next: Next,
    /// What to report to the deployment's health (`None`: nothing).
    pub health: Option<Outcome>,
    /// The failure, when it was one (metrics and the all-failed answer).
    pub failure: Option<Failure>,
}

/// The one function that says what an attempt's outcome means (module docs).
pub fn judge(fallback: &FallbackSettings, seen: Seen) -> Verdict {
    let failure = match seen {
        Seen::Answer { status, quota, .. } if (200..300).contains(&status) => {
            return Verdict { next: Next::Answer, health: Some(Outcome::Served { quota }), failure: None };
        }
        Seen::Answer { status, .. } => Failure::Status(status),
        Seen::NoAnswer(f) => f,
        Seen::Cut => Failure::Reset,
    };
    let retry_after_ms = match seen {
        Seen::Answer { retry_after_ms, .. } => retry_after_ms,
        _ => None,
    };
    if !fallback.falls_back(failure) {
        return Verdict { next: Next::Answer, health: None, failure: Some(failure) };
    }
    let health = Some(Outcome::Failed { failure, retry_after_ms });
    // After its first byte a stream is the client's: it cannot move to another deployment.
    let next = if seen == Seen::Cut { Next::Answer } else { Next::FallBack };
    Verdict { next, health, failure: Some(failure) }
}

/// A failure without an answer, from what a host can tell: a reset after the response headers
/// (`answered`), a timeout when the attempt ran (nearly) as long as its timeout, else a refused
/// connection. (Envoy says no more than this to an upstream filter.)
pub fn unanswered(answered: bool, elapsed_ms: u64, attempt_timeout_ms: u64) -> Failure {
    if answered {
        Failure::Reset
    } else if elapsed_ms.saturating_add(50) >= attempt_timeout_ms {
        Failure::Timeout
    } else {
        Failure::Connect
    }
}

/// The attempt order for one alias request, from its deployments' health (same order as
/// `alias.deployments`). Every deployment cooling down: the 503 to answer with (the request
/// was not sent).
pub fn plan(alias: &Alias, health: &[Health], now_ms: u64, seed: u64) -> Result<Plan, LocalResponse> {
    let lookup = |name: &str| alias.deployments.iter().position(|d| d.model == name).and_then(|i| health.get(i).copied()).unwrap_or_default();
    match choose(alias, &lookup, now_ms, seed) {
        Choice::Plan(p) => Ok(p),
        Choice::Unavailable { retry_after_ms } => Err(render::unavailable_model(&alias.name, retry_after_ms)),
    }
}

/// Why a deployment did not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The attempt failed.
    Failed(Failure),
    /// The request cannot be translated for its provider (an unsupported parameter).
    Unsupported,
    /// The deployment is not configured for this host (no `base_url`, an unreadable key).
    NotConfigured,
    /// The provider's key secret is not set.
    KeyMissing,
}

impl Reason {
    /// The label in the all-failed message and in logs.
    pub fn label(&self) -> String {
        match self {
            Reason::Failed(f) => f.label(),
            Reason::Unsupported => "unsupported".to_owned(),
            Reason::NotConfigured => "not_configured".to_owned(),
            Reason::KeyMissing => "provider_key_missing".to_owned(),
        }
    }
}

/// One alias request's attempts (module docs).
#[derive(Debug, Clone)]
pub struct Attempts {
    alias: String,
    order: Vec<String>,
    started_ms: u64,
    made: usize,
    tried: Vec<(String, Reason)>,
    /// The client's error from the first deployment that could not take the request as asked.
    refusal: Option<LocalResponse>,
}

impl Attempts {
    /// The attempts of `plan` starting at `now_ms`. `skips`: the host chooses each attempt's
    /// deployment itself and skips the ones not available when the plan was made (the worker);
    /// Envoy's aggregate cluster walks the plan's order as it is.
    pub fn new(plan: &Plan, now_ms: u64, skips: bool) -> Attempts {
        let order: Vec<String> = if skips {
            plan.attempts().into_iter().map(str::to_owned).collect()
        } else {
            plan.order.iter().take(plan.max_attempts.max(1) as usize).cloned().collect()
        };
        Attempts { alias: plan.alias.clone(), order, started_ms: now_ms, made: 0, tried: Vec::new(), refusal: None }
    }

    /// The deployment of the next attempt, or `None` when none may start: attempts used up, or
    /// the total time budget spent (a first attempt always starts).
    pub fn next(&mut self, fallback: &FallbackSettings, now_ms: u64) -> Option<&str> {
        let spent = now_ms.saturating_sub(self.started_ms) >= fallback.total_timeout_ms;
        if self.made >= self.order.len() || (self.made > 0 && spent) {
            return None;
        }
        self.made += 1;
        Some(self.order[self.made - 1].as_str())
    }

    /// The deployment of attempt `n` (1 for the first), for a host that counts attempts itself
    /// (Envoy's upstream filter): `None` past the plan, `max_attempts` or the time budget.
    pub fn nth(&mut self, n: u32, fallback: &FallbackSettings, now_ms: u64) -> Option<&str> {
        let n = n.max(1) as usize;
        if n > self.order.len() || (n > 1 && now_ms.saturating_sub(self.started_ms) > fallback.total_timeout_ms) {
            return None;
        }
        self.made = self.made.max(n);
        Some(self.order[n - 1].as_str())
    }

    /// How long attempt may take: the attempt timeout, within what is left of the total budget.
    pub fn timeout_ms(&self, fallback: &FallbackSettings, now_ms: u64) -> u64 {
        let left = fallback.total_timeout_ms.saturating_sub(now_ms.saturating_sub(self.started_ms));
        fallback.attempt_timeout_ms.min(left).max(1)
    }

    /// Records a deployment that did not serve; `refusal`: the client's error when the request
    /// itself cannot be served by it.
    pub fn failed(&mut self, deployment: &str, reason: Reason, refusal: Option<LocalResponse>) {
        self.tried.push((deployment.to_owned(), reason));
        if self.refusal.is_none() {
            self.refusal = refusal;
        }
    }

    /// Attempts started so far.
    pub fn made(&self) -> usize {
        self.made
    }

    /// When the first attempt started (epoch ms).
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// The answer when no deployment served: the client's own error when no deployment could
    /// take the request as asked (no provider was called), else a 502 naming each deployment
    /// tried and how it failed (never a provider's body).
    pub fn exhausted(&self) -> LocalResponse {
        if let Some(r) = self.refusal.as_ref().filter(|_| self.tried.iter().all(|(_, r)| *r == Reason::Unsupported)) {
            return r.clone();
        }
        let tried: Vec<(String, String)> = self.tried.iter().map(|(d, r)| (d.clone(), r.label())).collect();
        render::attempts_exhausted(&self.alias, &tried)
    }

    /// Whether any attempt reached a provider.
    pub fn reached_a_provider(&self) -> bool {
        self.tried.iter().any(|(_, r)| matches!(r, Reason::Failed(_)))
    }

    /// How the request ended when no attempt served it: [`Ending::NotServed`] when one reached
    /// a provider (the request counts), else [`Ending::NotSent`] (nothing counts).
    pub fn unserved(&self) -> Ending {
        if self.reached_a_provider() {
            Ending::NotServed
        } else {
            Ending::NotSent
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::{Deployment, Strategy};

    fn settings(on: &str) -> FallbackSettings {
        let p = crate::config::Policy::from_json(
            format!(r#"{{"tier":{{"default":"d"}},"tiers":{{"d":{{"limits":[]}}}},"fallback":{{"on":{on},"total_timeout_ms":1000}}}}"#).as_bytes(),
        )
        .unwrap();
        p.fallback
    }

    #[test]
    fn a_failure_the_policy_does_not_fall_back_on_is_the_clients_and_records_no_health() {
        let f = settings(r#"["connect","429","5xx"]"#);
        let answer = |status| Seen::Answer { status, quota: Quota::default(), retry_after_ms: Some(3000) };
        let v = judge(&f, answer(400));
        assert_eq!(v, Verdict { next: Next::Answer, health: None, failure: Some(Failure::Status(400)) });
        let v = judge(&f, answer(429));
        assert_eq!(v.next, Next::FallBack);
        assert_eq!(v.health, Some(Outcome::Failed { failure: Failure::Status(429), retry_after_ms: Some(3000) }));
        assert_eq!(judge(&f, answer(503)).next, Next::FallBack);
        let ok = judge(&f, answer(200));
        assert_eq!((ok.next, ok.health), (Next::Answer, Some(Outcome::Served { quota: Quota::default() })));
        assert_eq!(judge(&f, Seen::NoAnswer(Failure::Connect)).next, Next::FallBack);
        assert_eq!(judge(&f, Seen::NoAnswer(Failure::Timeout)), Verdict { next: Next::Answer, health: None, failure: Some(Failure::Timeout) }, "timeout is not in `on`");
        assert_eq!(judge(&f, Seen::Cut).health, None, "reset is not in `on`");
        let all = settings(r#"["connect","timeout","reset","429","5xx"]"#);
        assert_eq!(judge(&all, Seen::Cut), Verdict { next: Next::Answer, health: Some(Outcome::Failed { failure: Failure::Reset, retry_after_ms: None }), failure: Some(Failure::Reset) });
    }

    fn alias() -> Alias {
        Alias {
            name: "auto".into(),
            deployments: ["a", "b", "c"].iter().map(|m| Deployment { model: (*m).into(), weight: 1 }).collect(),
            strategy: Strategy::Priority,
            max_attempts: 2,
        }
    }

    #[test]
    fn attempts_follow_the_plan_up_to_max_attempts_and_the_time_budget() {
        let f = settings(r#"["5xx"]"#);
        let cooling = Health { cooldown_until_ms: 10_000, ..Health::default() };
        let p = plan(&alias(), &[Health::default(), cooling, Health::default()], 0, 1).unwrap();
        assert_eq!(p.order, ["a", "b", "c"]);
        // The worker skips b (cooling); Envoy walks a, b.
        let mut skipping = Attempts::new(&p, 0, true);
        assert_eq!(skipping.next(&f, 0), Some("a"));
        assert_eq!(skipping.next(&f, 10), Some("c"));
        assert_eq!(skipping.next(&f, 20), None, "max_attempts 2");
        let mut walking = Attempts::new(&p, 0, false);
        assert_eq!(walking.nth(1, &f, 0), Some("a"));
        assert_eq!(walking.nth(2, &f, 0), Some("b"));
        assert_eq!(walking.nth(3, &f, 0), None);
        // No attempt starts after the budget; the first always does.
        let mut late = Attempts::new(&p, 0, true);
        assert_eq!(late.next(&f, 5_000), Some("a"));
        assert_eq!(late.next(&f, 5_000), None);
        assert_eq!(late.timeout_ms(&f, 400), 600.min(f.attempt_timeout_ms));
    }

    #[test]
    fn all_cooling_is_a_503_and_all_failed_a_502_naming_each() {
        let cooling = Health { cooldown_until_ms: 20_000, ..Health::default() };
        let r = plan(&alias(), &[cooling; 3], 0, 1).unwrap_err();
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "20".to_owned())));
        let p = plan(&alias(), &[Health::default(); 3], 0, 1).unwrap();
        let mut a = Attempts::new(&p, 0, true);
        a.failed("a", Reason::Failed(Failure::Status(500)), None);
        a.failed("b", Reason::Failed(Failure::Timeout), None);
        let r = a.exhausted();
        assert_eq!(r.status, 502);
        assert!(String::from_utf8_lossy(&r.body).contains("a (500), b (timeout)"));
        assert!(a.reached_a_provider());
        assert_eq!(a.unserved(), Ending::NotServed, "a provider was called: the request counts");
        // No deployment could take the request as asked: the client's own 400, nothing sent.
        let mut u = Attempts::new(&p, 0, true);
        let refusal = render::openai_error(400, "n > 1 is not supported", "invalid_request_error", "unsupported_parameter");
        u.failed("a", Reason::Unsupported, Some(refusal.clone()));
        u.failed("b", Reason::Unsupported, None);
        assert_eq!(u.exhausted(), refusal);
        assert!(!u.reached_a_provider());
        assert_eq!(u.unserved(), Ending::NotSent, "nothing was sent: nothing counts");
    }

    #[test]
    fn an_unanswered_attempt_is_classified_by_what_the_host_saw() {
        assert_eq!(unanswered(true, 5, 1000), Failure::Reset);
        assert_eq!(unanswered(false, 990, 1000), Failure::Timeout);
        assert_eq!(unanswered(false, 10, 1000), Failure::Connect);
    }
}
