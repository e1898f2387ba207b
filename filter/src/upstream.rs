//! The upstream role: the filter as an upstream HTTP filter on a model alias's aggregate
//! cluster (plugin root id [`crate::UPSTREAM_ROOT_ID`]), where Envoy's router runs it once per
//! attempt (docs/adr/0001-envoy-fallback.md).
//!
//! Attempt `n` of a request goes to the `n`-th cluster of the aggregate (the route's retry
//! policy walks its priorities with `previous_priorities`), which is the `n`-th deployment of
//! the plan the downstream filter left in the [`handoff`] table. Per attempt this filter:
//! 1. translates the OpenAI request for that deployment's provider (path, headers, body, the
//!    provider key from the VM environment); the router hands every attempt the original body,
//!    but request headers changed by an earlier attempt stay changed, so every provider header
//!    is set or removed afresh;
//! 2. on the answer, records the deployment's health in shared data (failures, cooldown,
//!    `retry-after`, the provider's remaining quota) and either marks a failure the policy
//!    falls back on with [`RETRY_HEADER`] (the route retries on it: `retriable_headers`) or
//!    translates the answer back to OpenAI's format, naming the deployment in
//!    [`DEPLOYMENT_HEADER`];
//! 3. when the attempt ends without an answer (connection refused, per-try timeout, reset),
//!    records the failure (`on_done`).
//!
//! Attempts beyond the plan, the alias's `max_attempts` or `fallback.total_timeout_ms` are
//! answered locally with `all_deployments_failed` (an upstream filter's local reply is final:
//! Envoy does not retry it).

use tollgate_core::fallback::{self, Failure, Outcome};
use tollgate_core::message;
use tollgate_core::openai::ChatRequest;
use tollgate_core::render;
use tollgate_core::routing::Provider;
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::{ResponseMeta, ApiError, UpstreamRequest};
use tollgate_core::Policy;

use proxy_wasm::types::Action;

use crate::abi;
use crate::handoff;
use crate::translation::{self, Answer, Forwarded};
use crate::{Request, SharedData};

/// Response header naming the deployment that answered (kept for the client), and the one on
/// a failed attempt the route should retry on the next deployment (the downstream filter
/// removes that one).
pub use tollgate_core::fallback::{DEPLOYMENT_HEADER, RETRY_HEADER};

/// Request headers one provider kind sets that another must not receive: removed before each
/// attempt writes its own.
const PROVIDER_REQUEST_HEADERS: [&str; 5] = ["anthropic-version", "anthropic-beta", "x-api-key", "x-goog-api-key", "authorization"];

/// One attempt, as the upstream filter sees it.
pub struct Attempt {
    /// The [`handoff`] key.
    key: String,
    /// 1 for the first attempt.
    number: u32,
    /// The deployment this attempt went to (`None` until the request was rewritten for it).
    deployment: Option<String>,
    started_ms: u64,
    /// Response headers arrived and their outcome is recorded (health and handoff), so
    /// `on_done` adds nothing unless the answer was then cut.
    recorded: bool,
}

impl Request {
    pub(crate) fn attempt_headers(&mut self, end_of_stream: bool) -> Action {
        let key = abi::header(abi::HTTP_REQUEST_HEADERS, "x-request-id")
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|k| handoff::contains(k));
        let Some(key) = key else {
            // Only requests the downstream filter planned may reach an alias's clusters: an
            // OpenAI body sent untranslated to another provider would be a half-forwarded request.
            abi::log(abi::LOG_ERROR, "tollgate: upstream filter got a request without a plan (is the downstream tollgate filter in the listener, with the same vm_config?)");
            abi::increment(self.metrics.host_errors);
            return self.reply(translation::gateway_error().to_response());
        };
        let number = handoff::with(&key, |e| {
            e.attempts += 1;
            e.attempts
        })
        .unwrap_or(1);
        self.attempt = Some(Attempt { key, number, deployment: None, started_ms: abi::now_ms().unwrap_or(0), recorded: false });
        if end_of_stream {
            return self.reply(ApiError::invalid(None, "A chat completion request needs a body.").to_response());
        }
        self.reading_body = true;
        Action::Pause
    }

    pub(crate) fn attempt_body(&mut self, policy: &Policy, body: &[u8], body_size: usize) -> Action {
        let Some(attempt) = self.attempt.as_ref() else {
            return self.reply(translation::gateway_error().to_response());
        };
        let (number, key) = (attempt.number, attempt.key.clone());
        let Some(entry) = handoff::with(&key, |e| e.clone()) else {
            return self.reply(translation::gateway_error().to_response());
        };
        let now = abi::now_ms().unwrap_or(0);
        let over_budget = now.saturating_sub(entry.start_ms) > policy.fallback.total_timeout_ms;
        if number > entry.max_attempts || number as usize > entry.order.len() || over_budget {
            // (counted by the downstream filter, which answers the client)
            return self.reply(render::attempts_exhausted(&entry.alias, &entry.failed));
        }
        let deployment = entry.order[number as usize - 1].clone();
        let Some(route) = policy.routes.route(&deployment) else {
            abi::log(abi::LOG_ERROR, "tollgate: a planned deployment is not in the policy's models");
            return self.reply(translation::gateway_error().to_response());
        };
        let request: ChatRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return self.refuse_for(&deployment, &ApiError::unreadable_body(&e)),
        };
        let now_ns = abi::now_ns().unwrap_or(now.saturating_mul(1_000_000));
        let id = translation::response_id(now_ns, translation::connection_id(), self.context_id);
        // The answer names the model that served it, as the provider knows it.
        let meta = ResponseMeta { id, model: route.target.upstream_model.clone(), created: now_ns / 1_000_000_000 };
        let mut exchange = Exchange::for_kind(route.target.kind, meta);
        let up = match exchange.request(&request, &route.target) {
            Ok(up) => up,
            Err(e) => {
                // This provider cannot serve the request as asked (an unsupported parameter):
                // the client's error, not the deployment's failure — answered, not retried.
                abi::increment(self.metrics.refused);
                return self.refuse_for(&deployment, &e);
            }
        };
        if let Some(object) = entry.warning.as_ref().and_then(|w| w.object.as_ref()) {
            exchange.set_closing_comment(message::sse_comment(object));
        }
        self.warning = entry.warning;
        let key_value = route.provider.api_key_secret.as_deref().and_then(|name| self.secret(name));
        if apply_attempt(&up, body_size, route.provider, key_value.as_deref()).is_err() {
            abi::increment(self.metrics.host_errors);
            return self.reply(translation::gateway_error().to_response());
        }
        abi::increment(self.metrics.attempts);
        if number > 1 {
            abi::increment(self.metrics.fallbacks);
        }
        if let Some(a) = self.attempt.as_mut() {
            a.deployment = Some(deployment);
            a.started_ms = now;
        }
        self.translation = Some(Box::new(Forwarded { exchange, stream: up.stream, answer: Answer::Waiting }));
        Action::Continue
    }

    pub(crate) fn attempt_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else { return Action::Continue };
        let Some(attempt) = self.attempt.as_mut() else { return Action::Continue };
        let Some(deployment) = attempt.deployment.clone() else { return Action::Continue };
        attempt.recorded = true;
        let key = attempt.key.clone();
        let map = abi::HTTP_RESPONSE_HEADERS;
        let headers: Vec<(String, String)> = abi::headers(map)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let value = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let status = value(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(502);
        let now = abi::now_ms().unwrap_or(0);
        // A provider's own header of either name must not steer Envoy's retries or the
        // downstream filter's accounting: ours replace or remove it.
        if abi::remove_header(map, RETRY_HEADER).is_err() || abi::set_header(map, DEPLOYMENT_HEADER, &deployment).is_err() {
            abi::increment(self.metrics.host_errors);
        }
        if (200..300).contains(&status) {
            let quota = fallback::quota_from_headers(&headers, now);
            self.report(&policy, &deployment, &Outcome::Served { quota }, now);
            if self.translation.as_ref().is_some_and(|f| f.stream) {
                // A stream is the client's from its first byte on (a cut one is charged); a
                // buffered answer only once it is complete ([`Self::attempt_usage`]): one cut
                // before that is retried by Envoy (it never saw the headers).
                handoff::with(&key, |e| e.served = Some(deployment.clone()));
            }
            return self.translate_response_headers(end_of_stream);
        }
        let failure = Failure::Status(status);
        if !policy.fallback.falls_back(failure) {
            // An error the policy does not fall back on (a 400, say) is the client's, not the
            // deployment's: no health record, the answer translated for the client.
            return self.translate_response_headers(end_of_stream);
        }
        let retry_after_ms = value("retry-after").and_then(|v| fallback::retry_after_ms(v, now));
        self.report(&policy, &deployment, &Outcome::Failed { failure, retry_after_ms }, now);
        abi::increment(self.metrics.attempt_failures);
        handoff::with(&key, |e| e.failed.push((deployment.clone(), failure.label())));
        // The route retries on this header (the next deployment) while attempts remain;
        // after the last one the downstream filter answers `all_deployments_failed`. The
        // provider's error body is never shown, so it is not translated.
        self.translation = None;
        if abi::set_header(map, RETRY_HEADER, "1").is_err() {
            abi::increment(self.metrics.host_errors);
        }
        Action::Continue
    }

    /// The attempt's stream is over (`on_done`/`on_log`): a failure without an answer is
    /// recorded (connection refused, per-try timeout, reset before or during the answer).
    pub(crate) fn attempt_done(&mut self) {
        let Some(policy) = self.policy.clone() else { return };
        let Some(attempt) = self.attempt.as_mut() else { return };
        let Some(deployment) = attempt.deployment.clone() else { return };
        // An answer whose body was still flowing (a stream, or a buffered answer Envoy has not
        // seen yet) was cut: the provider reset.
        let cut = matches!(self.translation.as_ref().map(|f| &f.answer), Some(Answer::Streaming | Answer::Buffering { .. }));
        if attempt.recorded && !cut {
            return;
        }
        let now = abi::now_ms().unwrap_or(0);
        let failure = if attempt.recorded {
            Failure::Reset
        } else if now.saturating_sub(attempt.started_ms).saturating_add(50) >= policy.fallback.attempt_timeout_ms {
            Failure::Timeout
        } else {
            Failure::Connect
        };
        attempt.recorded = true;
        if let Some(f) = self.translation.as_mut() {
            // A cut stream is not streaming any more: a second `on_done` records nothing.
            f.answer = Answer::Done;
        }
        let key = attempt.key.clone();
        if !policy.fallback.falls_back(failure) {
            return;
        }
        self.report(&policy, &deployment, &Outcome::Failed { failure, retry_after_ms: None }, now);
        abi::increment(self.metrics.attempt_failures);
        handoff::with(&key, |e| e.failed.push((deployment, failure.label())));
    }

    /// The answer ended: the deployment served, and what its provider reported goes to the
    /// downstream filter.
    pub(crate) fn attempt_usage(&mut self) {
        let (Some(attempt), Some(f)) = (self.attempt.as_ref(), self.translation.as_ref()) else { return };
        let usage = f.exchange.usage();
        let deployment = attempt.deployment.clone();
        handoff::with(&attempt.key, |e| {
            e.usage = Some(usage);
            e.served = deployment;
        });
    }

    /// Answers an attempt locally with the client's error, naming the deployment so that the
    /// downstream filter passes it on (an answer without one is "every attempt failed").
    fn refuse_for(&mut self, deployment: &str, error: &ApiError) -> Action {
        let mut response = error.to_response();
        response.headers.push((DEPLOYMENT_HEADER, deployment.to_owned()));
        self.reply(response)
    }

    fn report(&self, policy: &Policy, deployment: &str, outcome: &Outcome, now: u64) {
        if fallback::report(&mut SharedData, deployment, outcome, &policy.health, now, policy.max_retries).is_err() {
            abi::increment(self.metrics.store_failures);
        }
    }
}

/// Rewrites the paused request for one attempt's provider. Every provider header is removed
/// first: an earlier attempt's (another provider's) may still be set.
fn apply_attempt(up: &UpstreamRequest, body_size: usize, provider: &Provider, key: Option<&[u8]>) -> Result<(), abi::Status> {
    let map = abi::HTTP_REQUEST_HEADERS;
    abi::set_buffer(abi::HTTP_REQUEST_BODY, 0, body_size, &up.body)?;
    for name in translation::CLIENT_ONLY_HEADERS.iter().chain(PROVIDER_REQUEST_HEADERS.iter()) {
        abi::remove_header(map, name)?;
    }
    let (authority, prefix) = provider.base_url.as_deref().map(split_base_url).unwrap_or((None, ""));
    abi::set_header(map, ":path", &format!("{prefix}{}", up.path))?;
    if let Some(authority) = authority {
        abi::set_header(map, ":authority", authority)?;
    }
    abi::set_header(map, "content-length", &up.body.len().to_string())?;
    for (name, value) in &up.headers {
        abi::set_header(map, name, value)?;
    }
    if let Some(key) = key.and_then(|k| std::str::from_utf8(k).ok()).map(str::trim).filter(|k| !k.is_empty()) {
        let (name, value) = provider.kind.key_header(key);
        abi::set_header(map, name, &value)?;
    }
    Ok(())
}

/// `https://host[:port]/prefix` → (`host[:port]`, `/prefix`).
fn split_base_url(url: &str) -> (Option<&str>, &str) {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    match rest.find('/') {
        Some(i) => (Some(&rest[..i]).filter(|h| !h.is_empty()), rest[i..].trim_end_matches('/')),
        None => (Some(rest).filter(|h| !h.is_empty()), ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_split_into_authority_and_path_prefix() {
        assert_eq!(split_base_url("https://openrouter.ai/api"), (Some("openrouter.ai"), "/api"));
        assert_eq!(split_base_url("http://127.0.0.1:8080"), (Some("127.0.0.1:8080"), ""));
        assert_eq!(split_base_url("https://h/v1/"), (Some("h"), "/v1"));
    }
}
