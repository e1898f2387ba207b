//! Model aliases in the worker: the fetch loop over core's attempts ([`tollgate_core::attempt`]).
//! Every decision is core's — the deployments' order ([`attempt::plan`]), which deployment each
//! attempt goes to and when to stop ([`Attempts`]), what an outcome means and what health
//! records ([`attempt::judge`]), the request for each deployment ([`forward::attempt`]), the
//! answer ([`Answer`]) and the all-failed response; this module fetches, times out and reads.
//!
//! 1. The deployments' health comes from [`crate::health`] (at most one object call).
//! 2. Each attempt is fetched under `fallback.attempt_timeout_ms` (within what is left of
//!    `fallback.total_timeout_ms`) — until the response headers, and for a stream until its
//!    first client bytes are ready: the fetch is aborted when it runs out. A stream is only
//!    answered once its first client bytes are ready, so a stream falls back only before
//!    anything was written; after that a failure ends it with an OpenAI error event (the
//!    worker's one rule for broken streams, [`crate::forward`]).
//! 3. Health reports leave the isolate only when core's `next_health` changes the record, in
//!    `ctx.wait_until`.
//!
//! Charging is core's ending rule: only the deployment that served is settled, at its own
//! price; failed attempts are logged (deployment, attempt number, failure label), never usage.

use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::StreamExt;
use tollgate_core::answer::{Answer, BodyPlan, Head};
use tollgate_core::attempt::{self, Attempts, Next, Reason, Seen};
use tollgate_core::ending::Ending;
use tollgate_core::fallback::{quota_from_headers, retry_after_ms, Alias, Failure, Outcome};
use tollgate_core::forward as core_forward;
use tollgate_core::message::Warning;
use tollgate_core::openai::ChatRequest;
use tollgate_core::{LocalResponse, Policy};
use worker::js_sys::Math;
use worker::{console_log, console_warn, AbortController, Context, Date, Delay, Env, Fetch, Response};

use crate::counter::Objects;
use crate::forward::{self, Begun, Fetched, Finish};
use crate::health;
use crate::translation::{self, Unreachable};

/// The request's context the loop needs besides the alias.
pub struct Call<'a> {
    pub env: &'a Env,
    pub ctx: &'a Context,
    pub policy: &'a Rc<Policy>,
    pub objects: &'a Objects,
    /// The client headers passed to providers.
    pub passed: &'a [(String, String)],
    /// The client's headers from the admission (rate limits, a downgrade, the warning).
    pub headers: Vec<(&'static str, String)>,
    pub warning: Option<Warning>,
}

/// What one attempt came to.
enum Tried {
    /// The deployment was not tried: core's reason, and the client's error when the request
    /// itself cannot be served by it.
    Skipped(Reason, Option<tollgate_core::LocalResponse>),
    /// No answer within the attempt (refused, timed out, broke before its first client byte).
    Failed(Seen),
    /// An answer to pass on (its verdict was [`Next::Answer`]).
    Answer { resp: Response, answer: Answer, begun: Option<Begun>, seen: Seen },
    /// A whole answer, read and rendered by core.
    Whole { fetched: Fetched, head: Head, response: LocalResponse, answer: Answer, seen: Seen },
}

/// Serves `request` (admitted, model = the alias) from `alias`'s deployments (module docs).
pub async fn handle(call: Call<'_>, alias: &Alias, request: &ChatRequest, mut finish: Finish) -> worker::Result<Response> {
    let policy = call.policy;
    let started = Date::now().as_millis();
    let names: Vec<&str> = alias.deployment_names().collect();
    let (healths, unread) = health::read(call.objects, &names, started).await;
    if let Some(e) = unread {
        console_warn!("tollgate: provider health unreadable ({e}); using what this isolate knows");
    }
    let seed = started ^ (Math::random() * (1u64 << 53) as f64) as u64;
    let plan = match attempt::plan(alias, &healths, started, seed) {
        Ok(p) => p,
        Err(mut response) => {
            console_warn!("tollgate: every deployment of {} is cooling down", alias.name);
            response.headers.extend(call.headers.iter().cloned());
            return finish.reply(&response, Ending::NotSent);
        }
    };
    let fallback = &policy.fallback;
    let mut attempts = Attempts::new(&plan, started, true);
    loop {
        let now = Date::now().as_millis();
        let Some(deployment) = attempts.next(fallback, now).map(str::to_owned) else { break };
        let n = attempts.made();
        let timeout_ms = attempts.timeout_ms(fallback, now);
        let tried = attempt_once(&call, request, &deployment, timeout_ms).await;
        let now = Date::now().as_millis();
        match tried {
            Tried::Skipped(reason, refusal) => {
                console_warn!("tollgate: {}: deployment {deployment} skipped ({})", alias.name, reason.label());
                attempts.failed(&deployment, reason, refusal);
            }
            Tried::Failed(seen) => {
                let verdict = attempt::judge(fallback, seen);
                tell_health(&call, &deployment, verdict.health, now);
                let failure = verdict.failure.unwrap_or(Failure::Reset);
                console_warn!("tollgate: {}: attempt {n} on {deployment} failed ({})", alias.name, failure.label());
                if verdict.next == Next::FallBack {
                    attempts.failed(&deployment, Reason::Failed(failure), None);
                    continue;
                }
                // Not one the policy falls back on: answered as without an alias.
                let mut answer = Answer::other(call.headers.clone(), None);
                let response = answer.unreachable(failure);
                finish.alias_attempts(&policy.routes, n as u32, None);
                return finish.reply(&response, Ending::NotServed);
            }
            Tried::Answer { resp, answer, begun, seen } => {
                let verdict = attempt::judge(fallback, seen);
                tell_health(&call, &deployment, verdict.health, now);
                if verdict.next == Next::FallBack {
                    let failure = verdict.failure.unwrap_or(Failure::Reset);
                    console_warn!("tollgate: {}: attempt {n} on {deployment} failed ({})", alias.name, failure.label());
                    attempts.failed(&deployment, Reason::Failed(failure), None);
                    continue;
                }
                if n > 1 {
                    console_log!("tollgate: {} served by {deployment} after {} failed attempt(s)", alias.name, n - 1);
                }
                finish.alias_attempts(&policy.routes, n as u32, Some(&deployment));
                return forward::serve(resp, answer, finish, begun).await;
            }
            Tried::Whole { fetched, head, response, answer, seen } => {
                let verdict = attempt::judge(fallback, seen);
                tell_health(&call, &deployment, verdict.health, now);
                finish.alias_attempts(&policy.routes, n as u32, Some(&deployment));
                finish.answered(response.status);
                finish.done(answer.ending());
                return forward::rendered(&fetched, &head, &response);
            }
        }
    }
    let mut response = attempts.exhausted();
    response.headers.extend(call.headers.iter().cloned());
    finish.alias_attempts(&policy.routes, attempts.made() as u32, None);
    let ending = attempts.unserved();
    finish.reply(&response, ending)
}

/// Applies a health outcome to this isolate's copy and, when it changed, tells the health
/// object in `ctx.wait_until`.
fn tell_health(call: &Call, deployment: &str, outcome: Option<Outcome>, now: u64) {
    let Some(outcome) = outcome else { return };
    if !health::note(deployment, &outcome, &call.policy.health, now) {
        return;
    }
    let objects = Objects(call.objects.0.clone());
    let deployment = deployment.to_owned();
    call.ctx.wait_until(async move {
        if let Err(e) = health::report(&objects, &deployment, outcome, now).await {
            console_warn!("tollgate: health report for {deployment} failed: {e}");
        }
    });
}

/// Races `fut` against `ms` milliseconds: `None` when the time ran out.
async fn within<T>(ms: u64, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let fut = pin!(fut);
    let timer = pin!(Delay::from(Duration::from_millis(ms)));
    match select(fut, timer).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

/// One attempt on `deployment` (module docs, step 2).
async fn attempt_once(call: &Call<'_>, request: &ChatRequest, deployment: &str, timeout_ms: u64) -> Tried {
    let started = Date::now().as_millis();
    let id = translation::response_id(started);
    let (provider, up, mut answer) = match core_forward::attempt(&call.policy.routes, request, deployment, call.headers.clone(), call.warning.clone(), id, started / 1000) {
        Ok(t) => t,
        Err(Some(e)) => return Tried::Skipped(Reason::Unsupported, Some(e.to_response())),
        Err(None) => return Tried::Skipped(Reason::NotConfigured, None),
    };
    let outbound = match translation::provider_request(call.env, provider, &up, call.passed) {
        Ok(r) => r,
        Err(Unreachable::NotConfigured(_)) => return Tried::Skipped(Reason::NotConfigured, None),
        Err(Unreachable::KeyMissing(_)) => return Tried::Skipped(Reason::KeyMissing, None),
    };
    let controller = AbortController::default();
    let signal = controller.signal();
    let sent = within(timeout_ms, Fetch::Request(outbound).send_with_signal(&signal)).await;
    let mut resp = match sent {
        None => {
            controller.abort();
            return Tried::Failed(Seen::NoAnswer(Failure::Timeout));
        }
        Some(Err(_)) => return Tried::Failed(Seen::NoAnswer(Failure::Connect)),
        Some(Ok(r)) => r,
    };
    let now = Date::now().as_millis();
    let fetched = Fetched::of(&resp);
    let retry_after = fetched.header("retry-after").map(str::to_owned);
    let seen = Seen::Answer {
        status: fetched.status,
        quota: quota_from_headers(&fetched.headers, now),
        retry_after_ms: retry_after.as_deref().and_then(|v| retry_after_ms(v, now)),
    };
    if attempt::judge(&call.policy.fallback, seen).next == Next::FallBack {
        // The provider's body is not read (nor logged): the next deployment answers.
        controller.abort();
        return Tried::Failed(seen);
    }
    let null_body = matches!(resp.body(), worker::ResponseBody::Empty);
    let head = answer.head(fetched.status, fetched.headers.iter().map(|(k, _)| k.as_str()), retry_after.as_deref(), null_body);
    match head.body {
        BodyPlan::Stream => {}
        BodyPlan::Buffer => {
            // Read before committing: an answer cut before its end falls back like no answer.
            let Ok(bytes) = resp.bytes().await else { return Tried::Failed(Seen::NoAnswer(Failure::Reset)) };
            let response = answer.whole(fetched.status, retry_after.as_deref(), &bytes);
            return Tried::Whole { fetched, head, response, answer, seen };
        }
        BodyPlan::Replace(ref response) => {
            let response = response.clone();
            return Tried::Whole { fetched, head, response, answer, seen };
        }
        BodyPlan::Pass => return Tried::Answer { resp, answer, begun: None, seen },
    }
    // A stream: its first client bytes, within what is left of the attempt's time.
    let Ok(mut upstream) = resp.stream() else { return Tried::Failed(Seen::NoAnswer(Failure::Reset)) };
    let mut first = Vec::new();
    loop {
        let left = timeout_ms.saturating_sub(Date::now().as_millis().saturating_sub(started)).max(1);
        match within(left, upstream.next()).await {
            None => {
                controller.abort();
                return Tried::Failed(Seen::NoAnswer(Failure::Timeout));
            }
            Some(Some(Ok(bytes))) => {
                answer.chunk(&bytes, &mut first);
                if answer.stream_error().is_some() {
                    return Tried::Failed(Seen::NoAnswer(Failure::Reset));
                }
                if !first.is_empty() {
                    break;
                }
            }
            Some(Some(Err(_))) => return Tried::Failed(Seen::NoAnswer(Failure::Reset)),
            Some(None) => {
                answer.end(&mut first);
                if answer.stream_error().is_some() || first.is_empty() {
                    return Tried::Failed(Seen::NoAnswer(Failure::Reset));
                }
                break;
            }
        }
    }
    let on_cut = cut_reporter(call, deployment);
    Tried::Answer { resp, answer, begun: Some(Begun { head, first, upstream, on_cut: Some(on_cut) }), seen }
}

/// What a stream that breaks after its first bytes tells its deployment's health (core's
/// verdict for [`Seen::Cut`]).
fn cut_reporter(call: &Call, deployment: &str) -> Box<dyn FnOnce()> {
    let policy = Rc::clone(call.policy);
    let objects = Objects(call.objects.0.clone());
    let deployment = deployment.to_owned();
    Box::new(move || {
        let Some(outcome) = attempt::judge(&policy.fallback, Seen::Cut).health else { return };
        let now = Date::now().as_millis();
        console_warn!("tollgate: deployment {deployment} stream broke mid-answer");
        if health::note(&deployment, &outcome, &policy.health, now) {
            worker::wasm_bindgen_futures::spawn_local(async move {
                if let Err(e) = health::report(&objects, &deployment, outcome, now).await {
                    console_warn!("tollgate: health report for {deployment} failed: {e}");
                }
            });
        }
    })
}
