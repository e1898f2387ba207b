//! Model aliases: the fetch loop that serves an alias from its deployments, falling back from
//! one to the next on the failures the policy names (core's [`tollgate_core::fallback`]; the
//! same policy as the Envoy filter).
//!
//! For an admitted request whose model is an alias ([`crate::fetch`] gets it from the gate):
//! 1. reads the health of the alias's deployments ([`crate::health`]: at most one object call,
//!    none while this isolate's copy is fresh) and lets core choose ([`choose`]): every
//!    deployment cooling down → core's 503 (`retry-after`: the soonest one is back) and the
//!    reservation is released;
//! 2. tries [`Plan::attempts`] in order (the chosen one, then the other available ones in the
//!    alias's order, at most `max_attempts`), no new attempt once `fallback.total_timeout_ms`
//!    has passed. Each attempt is the request translated for the deployment's provider
//!    (core's `Exchange`, as [`crate::translation`]; its `model` is the deployment's upstream
//!    model, so the answer names it too), sent with the provider's key, under
//!    `fallback.attempt_timeout_ms` (until the response headers — and, for a stream, until its
//!    first client bytes are ready), the fetch aborted when it runs out;
//! 3. an attempt fails with a connect error, its timeout, a reset (the body broke, or a stream
//!    broke or ended before its first client byte) or an error status. When
//!    `fallback.falls_back(..)` accepts the failure, the next attempt starts; otherwise the
//!    provider's answer is the client's (translated, as without an alias);
//! 4. the first success is the answer, stream or not, with `x-tollgate-deployment: <name>`.
//!    A stream is only answered once its first client bytes are ready, so a stream falls back
//!    only before anything was written; a failure after that ends it with an OpenAI error
//!    event `data: {"error": {...}}` followed by `data: [DONE]`;
//! 5. every attempt failed: core's 502 `all_deployments_failed` (deployment names and failure
//!    labels, never a provider's body), and the reservation is released.
//!
//! Health: every failure that says something about the provider (connect, timeout, reset, 408,
//! 429, 5xx, and whatever else the policy falls back on) is reported as `Outcome::Failed`,
//! with the provider's `retry-after`; a success as `Outcome::Served` with the quota its
//! headers announce (`x-ratelimit-remaining-*`, `anthropic-ratelimit-*`), which steers traffic
//! away before a 429. Reports only leave the isolate when core's `next_health` changes the
//! record, in `ctx.wait_until`.
//!
//! Charging: only the deployment that served is settled, at its own price (the request's
//! [`Finish`] carries the deployment to the settlement, which sets `ticket.model`); failed
//! attempts are logged (deployment, attempt number, failure label) and never reach the user's
//! usage. Logs never hold prompt or response bytes, nor a provider's error body.

use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::stream::{self, StreamExt};
use tollgate_core::fallback::{
    choose, quota_from_headers, retry_after_ms, Alias, Choice, Failure, Plan, Quota, DEPLOYMENT_HEADER,
};
use tollgate_core::message;
use tollgate_core::openai::ChatRequest;
use tollgate_core::render;
use tollgate_core::sse::write_event;
use tollgate_core::translate::exchange::{Exchange, Routed};
use tollgate_core::translate::ApiError;
use tollgate_core::usage::Usage;
use tollgate_core::{LocalResponse, Policy};
use worker::js_sys::{Math, Uint8Array};
use worker::{
    console_log, console_warn, web_sys, AbortController, ByteStream, Context, Date, Delay, Env, Fetch, Headers, Request,
    Response,
};

use crate::counter::Objects;
use crate::forward::{self, Finish};
use crate::health::{self, OutcomeWire};
use crate::translation;


/// What one attempt came to.
enum Attempted {
    /// Failed before anything reached the client.
    Failed { failure: Failure, retry_after_ms: Option<u64> },
    /// The deployment could not even be tried (not configured, or the request cannot be
    /// translated for its provider): a label for the 502, and core's answer if it was the
    /// request's fault.
    Skipped { label: &'static str, answer: Option<LocalResponse> },
    /// A whole answer: a non-stream one, or an error status the policy does not fall back on
    /// (`failure`).
    Whole { answer: LocalResponse, usage: Usage, quota: Option<Quota>, failure: Option<Failure> },
    /// A stream whose first client bytes are ready.
    Stream { first: Vec<u8>, upstream: ByteStream, exchange: Exchange, ended: bool, quota: Quota },
}

/// Whether a failure says something about the provider's health (rather than the request's).
fn is_provider_failure(f: Failure) -> bool {
    match f {
        Failure::Connect | Failure::Timeout | Failure::Reset => true,
        Failure::Status(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// The request's context the loop needs besides the alias.
pub struct Call<'a> {
    pub req: &'a Request,
    pub env: &'a Env,
    pub ctx: &'a Context,
    pub policy: &'a Rc<Policy>,
    pub objects: &'a Objects,
    /// The client's headers from the admission (rate limits, warning).
    pub extra: &'a [(&'static str, String)],
    pub warning: Option<&'a serde_json::Value>,
}

/// Serves `request` (admitted, model = the alias) from `alias`'s deployments (module docs).
pub async fn handle(call: Call<'_>, alias: &Alias, request: &ChatRequest, mut finish: Finish) -> worker::Result<Response> {
    let Call { req, env, ctx, policy, objects, extra, warning } = call;
    // Until a provider is called, nothing was used.
    finish.unreached();
    let started = Date::now().as_millis();
    let names: Vec<String> = alias.deployments.iter().map(|d| d.model.clone()).collect();
    let (healths, unread) = health::read(objects, &names, started).await;
    if let Some(e) = unread {
        console_warn!("tollgate: provider health unreadable ({e}); using what this isolate knows");
    }
    let health_of = |name: &str| names.iter().position(|n| n == name).map(|i| healths[i]).unwrap_or_default();
    let seed = started ^ (Math::random() * (1u64 << 53) as f64) as u64;
    let plan: Plan = match choose(alias, &health_of, started, seed) {
        Choice::Plan(p) => p,
        Choice::Unavailable { retry_after_ms } => {
            console_warn!("tollgate: every deployment of {} is cooling down", alias.name);
            finish.release();
            return forward::local_with(&render::unavailable_model(&alias.name, retry_after_ms), extra);
        }
    };

    let fallback = &policy.fallback;
    let pass_var = env.var(translation::PASS_HEADERS_VAR).ok().map(|v| v.to_string());
    let private: Vec<&str> = policy.private_request_headers().collect();
    let pass_names = translation::pass_headers(pass_var.as_deref(), &private);
    let passed: Vec<(String, String)> =
        pass_names.into_iter().filter_map(|n| req.headers().get(&n).ok().flatten().map(|v| (n, v))).collect();

    let mut tried: Vec<(String, String)> = Vec::new();
    let mut refusal: Option<LocalResponse> = None;
    let attempts: Vec<String> = plan.attempts().into_iter().map(str::to_owned).collect();
    for (n, deployment) in attempts.iter().enumerate() {
        let elapsed = Date::now().as_millis().saturating_sub(started);
        if n > 0 && elapsed >= fallback.total_timeout_ms {
            console_warn!("tollgate: {}: total time spent after {n} attempts", alias.name);
            break;
        }
        let timeout_ms = fallback.attempt_timeout_ms.min(fallback.total_timeout_ms.saturating_sub(elapsed)).max(1);
        let closing = warning.map(message::sse_comment);
        let attempted = attempt(policy, env, request, deployment, &passed, timeout_ms, closing).await;
        let now = Date::now().as_millis();
        match attempted {
            Attempted::Skipped { label, answer } => {
                console_warn!("tollgate: {}: deployment {deployment} skipped ({label})", alias.name);
                tried.push((deployment.clone(), label.to_owned()));
                if refusal.is_none() {
                    refusal = answer;
                }
            }
            Attempted::Failed { failure, retry_after_ms } => {
                let label = failure.label();
                console_warn!("tollgate: {}: attempt {} on {deployment} failed ({label})", alias.name, n + 1);
                if is_provider_failure(failure) || fallback.falls_back(failure) {
                    tell_health(ctx, objects, policy, deployment, OutcomeWire::failed(failure, retry_after_ms), now);
                }
                tried.push((deployment.clone(), label));
                if !fallback.falls_back(failure) {
                    // Not one the policy falls back on: answered as without an alias (the
                    // request counts, with no tokens: none reached a model).
                    finish.served_by(deployment);
                    let answer = match failure {
                        Failure::Timeout => render_openai(504, "The provider did not answer in time.", "upstream_timeout"),
                        _ => render_openai(502, "The upstream API could not be reached.", "upstream_unavailable"),
                    };
                    return forward::local_with(&answer, &with_deployment(extra, deployment));
                }
            }
            Attempted::Whole { mut answer, usage, quota, failure } => {
                if let Some(quota) = quota {
                    tell_health(ctx, objects, policy, deployment, OutcomeWire::served(quota), now);
                }
                if let Some(f) = failure.filter(|f| is_provider_failure(*f)) {
                    let retry_after = answer.headers.iter().find(|(k, _)| *k == "retry-after").map(|(_, v)| v.clone());
                    let outcome = OutcomeWire::failed(f, retry_after.and_then(|v| retry_after_ms(&v, now)));
                    tell_health(ctx, objects, policy, deployment, outcome, now);
                }
                note_served(&alias.name, deployment, n);
                finish = finish.reported_by();
                finish.served_by(deployment);
                finish.report(usage);
                if answer.status == 200 {
                    answer.body = forward::with_warning_object(answer.body, warning);
                }
                return forward::local_with(&answer, &with_deployment(extra, deployment));
            }
            Attempted::Stream { first, upstream, exchange, ended, quota } => {
                tell_health(ctx, objects, policy, deployment, OutcomeWire::served(quota), now);
                note_served(&alias.name, deployment, n);
                finish = finish.reported_by();
                finish.served_by(deployment);
                finish.report(exchange.usage());
                let headers = Headers::new();
                headers.set("content-type", "text/event-stream")?;
                headers.set("cache-control", "no-cache")?;
                for (name, value) in with_deployment(extra, deployment) {
                    headers.set(name, &value)?;
                }
                let pump = Pump {
                    first: Some(first),
                    upstream,
                    exchange,
                    deployment: deployment.clone(),
                    done: ended,
                    finish,
                    objects: Objects(objects.0.clone()),
                    policy: Rc::clone(policy),
                };
                return Response::builder().with_status(200).with_headers(headers).from_stream(stream::unfold(pump, Pump::next));
            }
        }
    }
    finish.release();
    if let (Some(answer), true) = (refusal, tried.iter().all(|(_, l)| l == "unsupported")) {
        // No provider was called: the request itself cannot be served by any deployment.
        return forward::local_with(&answer, extra);
    }
    forward::local_with(&render::attempts_exhausted(&alias.name, &tried), extra)
}

fn render_openai(status: u16, message: &str, code: &str) -> LocalResponse {
    tollgate_core::render::openai_error(status, message, "server_error", code)
}

fn note_served(alias: &str, deployment: &str, failed_before: usize) {
    if failed_before > 0 {
        console_log!("tollgate: {alias} served by {deployment} after {failed_before} failed attempt(s)");
    }
}

fn with_deployment(extra: &[(&'static str, String)], deployment: &str) -> Vec<(&'static str, String)> {
    let mut headers = extra.to_vec();
    headers.push((DEPLOYMENT_HEADER, deployment.to_owned()));
    headers
}

/// Applies the outcome to this isolate's copy of the record and, when it changed, tells the
/// health object in `ctx.wait_until`.
fn tell_health(ctx: &Context, objects: &Objects, policy: &Policy, deployment: &str, outcome: OutcomeWire, now: u64) {
    if !health::note(deployment, &outcome, &policy.health, now) {
        return;
    }
    let objects = Objects(objects.0.clone());
    let deployment = deployment.to_owned();
    ctx.wait_until(async move {
        if let Err(e) = health::report(&objects, &deployment, outcome, now).await {
            console_warn!("tollgate: health report for {deployment} failed: {e}");
        }
    });
}

/// One attempt on `deployment` (module docs, step 2–3).
async fn attempt(
    policy: &Policy,
    env: &Env,
    request: &ChatRequest,
    deployment: &str,
    passed: &[(String, String)],
    timeout_ms: u64,
    closing: Option<Vec<u8>>,
) -> Attempted {
    let started = Date::now().as_millis();
    let Some(route) = policy.routes.route(deployment) else {
        return Attempted::Skipped { label: "not_configured", answer: None };
    };
    let provider = route.provider;
    let Some(base_url) = provider.base_url.clone() else {
        worker::console_error!("tollgate: providers.{}.base_url is not set; the worker needs it", provider.name);
        return Attempted::Skipped { label: "not_configured", answer: None };
    };
    let key = match provider.api_key_secret.as_deref() {
        None => None,
        Some(secret) => match env.secret(secret).map(|s| s.to_string()) {
            Ok(k) if !k.is_empty() => Some(provider.kind.key_header(&k)),
            _ => {
                worker::console_error!("tollgate: provider {} has no key: the secret {secret} is not set", provider.name);
                return Attempted::Skipped { label: "provider_key_missing", answer: None };
            }
        },
    };
    let mut request = request.clone();
    request.model = route.target.upstream_model.clone();
    let routed = Routed { request, route };
    let (mut exchange, up) = match routed.start(translation::response_id(started), started / 1000) {
        Ok(t) => t,
        Err(e) => return Attempted::Skipped { label: "unsupported", answer: Some(e.to_response()) },
    };
    if let Some(comment) = closing {
        // The warning's SSE comment, just before a successful stream's [DONE].
        exchange.set_closing_comment(comment);
    }
    let headers = match translation::upstream_headers(&up.headers, passed.iter().cloned(), key) {
        Ok(h) => h,
        Err(_) => {
            worker::console_error!("tollgate: provider {}: a request header value is invalid", provider.name);
            return Attempted::Skipped { label: "not_configured", answer: None };
        }
    };
    let url = format!("{base_url}{}", up.path);
    let outbound = match outbound(&url, &headers, &up.body) {
        Ok(r) => r,
        Err(_) => return Attempted::Skipped { label: "not_configured", answer: None },
    };

    let controller = AbortController::default();
    let signal = controller.signal();
    let sent = {
        let fetch = Fetch::Request(outbound);
        let send = pin!(fetch.send_with_signal(&signal));
        let timer = pin!(Delay::from(Duration::from_millis(timeout_ms)));
        match select(send, timer).await {
            Either::Left((r, _)) => Some(r),
            Either::Right(_) => None,
        }
    };
    let mut resp = match sent {
        None => {
            controller.abort();
            return Attempted::Failed { failure: Failure::Timeout, retry_after_ms: None };
        }
        Some(Err(_)) => return Attempted::Failed { failure: Failure::Connect, retry_after_ms: None },
        Some(Ok(r)) => r,
    };
    let now = Date::now().as_millis();
    let status = resp.status_code();
    let response_headers: Vec<(String, String)> =
        resp.headers().entries().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    let header = |name: &str| response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let retry_after = header("retry-after");
    if status >= 400 {
        let failure = Failure::Status(status);
        if policy.fallback.falls_back(failure) {
            // The provider's body is not read (nor logged): the next deployment answers.
            controller.abort();
            return Attempted::Failed { failure, retry_after_ms: retry_after.as_deref().and_then(|v| retry_after_ms(v, now)) };
        }
    }
    let ok = (200..300).contains(&status);
    if !(up.stream && ok) {
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(_) => return Attempted::Failed { failure: Failure::Reset, retry_after_ms: None },
        };
        let answer = exchange.response(status, retry_after.as_deref(), &body);
        let quota = ok.then(|| quota_from_headers(&response_headers, now));
        let failure = (status >= 400).then_some(Failure::Status(status));
        return Attempted::Whole { answer, usage: exchange.usage(), quota, failure };
    }
    let mut upstream = match resp.stream() {
        Ok(s) => s,
        Err(_) => return Attempted::Failed { failure: Failure::Reset, retry_after_ms: None },
    };
    let quota = quota_from_headers(&response_headers, now);
    // The first client bytes, within what is left of the attempt's time.
    let mut first = Vec::new();
    loop {
        let left = timeout_ms.saturating_sub(Date::now().as_millis().saturating_sub(started));
        let next = {
            let read = pin!(upstream.next());
            let timer = pin!(Delay::from(Duration::from_millis(left)));
            match select(read, timer).await {
                Either::Left((r, _)) => Some(r),
                Either::Right(_) => None,
            }
        };
        match next {
            None => {
                controller.abort();
                return Attempted::Failed { failure: Failure::Timeout, retry_after_ms: None };
            }
            Some(Some(Ok(bytes))) => {
                exchange.stream(&bytes, &mut first);
                if exchange.stream_error().is_some() {
                    return Attempted::Failed { failure: Failure::Reset, retry_after_ms: None };
                }
                if !first.is_empty() {
                    return Attempted::Stream { first, upstream, exchange, ended: false, quota };
                }
            }
            Some(Some(Err(_))) => return Attempted::Failed { failure: Failure::Reset, retry_after_ms: None },
            Some(None) => {
                exchange.finish(&mut first);
                if exchange.stream_error().is_some() || first.is_empty() {
                    return Attempted::Failed { failure: Failure::Reset, retry_after_ms: None };
                }
                return Attempted::Stream { first, upstream, exchange, ended: true, quota };
            }
        }
    }
}

/// A POST of `body` to `url`, redirects not followed.
fn outbound(url: &str, headers: &Headers, body: &[u8]) -> worker::Result<Request> {
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    init.set_body(&Uint8Array::from(body).into());
    Ok(Request::from(web_sys::Request::new_with_str_and_init(url, &init)?))
}

/// The serving deployment's stream on its way to the client: the first bytes (already read),
/// then one upstream read per pull. A failure ends it with an error event and `[DONE]`, and is
/// reported to health.
struct Pump {
    first: Option<Vec<u8>>,
    upstream: ByteStream,
    exchange: Exchange,
    deployment: String,
    done: bool,
    /// Dropped with the pump: at the end of the stream, or when the client goes away.
    finish: Finish,
    objects: Objects,
    policy: Rc<Policy>,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl Pump {
    async fn next(mut self) -> Option<(worker::Result<Vec<u8>>, Pump)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        let mut out = Vec::new();
        while !self.done && out.is_empty() {
            match self.upstream.next().await {
                Some(Ok(bytes)) => {
                    self.exchange.stream(&bytes, &mut out);
                    if self.exchange.stream_error().is_some() {
                        self.failed(&mut out);
                    }
                }
                Some(Err(_)) => {
                    let e = ApiError::bad_upstream("The connection to the provider broke mid-stream.");
                    let mut text = String::new();
                    write_event(&mut text, None, &String::from_utf8_lossy(&e.body()), None);
                    out.extend_from_slice(text.as_bytes());
                    self.failed(&mut out);
                }
                None => {
                    self.exchange.finish(&mut out);
                    if self.exchange.stream_error().is_some() {
                        self.failed(&mut out);
                    }
                    self.done = true;
                }
            }
            self.finish.report(self.exchange.usage());
        }
        (!out.is_empty()).then_some((Ok(out), self))
    }

    /// The stream broke after its first bytes: the error event is in `out`; `[DONE]` follows,
    /// and the deployment's health hears of it.
    fn failed(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(DONE);
        self.done = true;
        let label = self.exchange.stream_error().map(|e| e.label()).unwrap_or("provider");
        console_warn!("tollgate: deployment {} stream broke mid-answer ({label})", self.deployment);
        let now = Date::now().as_millis();
        let outcome = OutcomeWire::failed(Failure::Reset, None);
        if health::note(&self.deployment, &outcome, &self.policy.health, now) {
            let objects = Objects(self.objects.0.clone());
            let deployment = self.deployment.clone();
            worker::wasm_bindgen_futures::spawn_local(async move {
                if let Err(e) = health::report(&objects, &deployment, outcome, now).await {
                    console_warn!("tollgate: health report for {deployment} failed: {e}");
                }
            });
        }
    }
}
