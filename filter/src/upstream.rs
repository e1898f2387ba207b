//! The upstream role: the filter as an upstream HTTP filter on a model alias's aggregate
//! cluster (plugin root id [`crate::UPSTREAM_ROOT_ID`]), where Envoy's router runs it once per
//! attempt (docs/adr/0001-envoy-fallback.md).
//!
//! Attempt `n` of a request goes to the `n`-th cluster of the aggregate (the route's retry
//! policy walks its priorities with `previous_priorities`), which is the `n`-th deployment of
//! core's [`tollgate_core::attempt::Attempts`] the downstream filter left in the [`handoff`] table. Per attempt:
//! 1. core's [`forward::attempt`] translates the OpenAI request for that deployment's provider;
//!    the router hands every attempt the original body, but request headers changed by an
//!    earlier attempt stay changed, so every provider header is set or removed afresh, and the
//!    provider key comes from the VM environment;
//! 2. on the answer, core's [`attempt::judge`] says what it means: the client's answer
//!    (translated and decorated by core's [`Answer`], naming the deployment), or a failure the
//!    policy falls back on — marked with [`RETRY_HEADER`], on which the route retries — and what
//!    the deployment's shared health records;
//! 3. an attempt that ends without an answer (connection refused, per-try timeout, reset) is
//!    judged the same way when its stream is done.
//!
//! Attempts beyond the plan, the alias's `max_attempts` or `fallback.total_timeout_ms` are
//! answered locally with core's all-failed answer (an upstream filter's local reply is final:
//! Envoy does not retry it).

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use tollgate_core::answer::{Answer, BodyPlan};
use tollgate_core::attempt::{self, Next, Reason, Seen};
use tollgate_core::fallback::{quota_from_headers, retry_after_ms, Failure, Outcome};
use tollgate_core::headers::{DEPLOYMENT_HEADER, RETRY_HEADER};
use tollgate_core::forward::{self, split_base_url};
use tollgate_core::openai::ChatRequest;
use tollgate_core::ops::{sync, Op};
use tollgate_core::render::LocalResponse;
use tollgate_core::fault::ApiError;

use crate::handoff;
use crate::http::{self, Destination};
use crate::metrics::Metric;
use crate::{abi, host_error, Shared, SharedData};

/// What the answer's body is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyMode {
    Stream,
    Buffer { status: u16, retry_after: Option<String> },
    Done,
}

/// Where an attempt is.
enum Phase {
    /// Not an attempt Tollgate planned, or done with.
    Idle,
    /// The request headers arrived; its body is being read.
    ReadingBody { key: String, number: u32 },
    /// Sent to `deployment`; no answer yet.
    Sent { key: String, deployment: String, answer: Box<Answer>, started_ms: u64 },
    /// The deployment answered `status`; the answer goes through core's pipeline.
    Answered { key: String, deployment: String, status: u16, answer: Box<Answer>, body: BodyMode },
    /// The attempt failed and the route retries (or the downstream filter answers).
    Failed,
}

/// One attempt in the upstream role.
pub struct Upstream {
    shared: Shared,
    context_id: u32,
    phase: Phase,
}

impl Upstream {
    /// A new attempt stream.
    pub fn new(shared: Shared, context_id: u32) -> Upstream {
        Upstream { shared, context_id, phase: Phase::Idle }
    }

    fn reply(&mut self, response: &LocalResponse) -> Action {
        let headers: Vec<(&str, &str)> = response.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(s) = abi::send_local_response(u32::from(response.status), &headers, &response.body) {
            host_error(&self.shared.metrics, "send_local_response", s);
        }
        self.phase = Phase::Idle;
        Action::Pause
    }

    /// Answers an attempt locally with the client's error, naming the deployment so that the
    /// downstream filter passes it on (an answer without one is "every attempt failed").
    fn refuse_for(&mut self, deployment: &str, response: LocalResponse) -> Action {
        let mut response = response;
        response.headers.push((DEPLOYMENT_HEADER, deployment.to_owned()));
        self.reply(&response)
    }

    fn report(&self, deployment: &str, outcome: Outcome) {
        let now = abi::now_ms().unwrap_or(0);
        if now == 0 {
            return;
        }
        if self.shared.policy.remote_store.is_some() {
            // The fleet's record: the root context posts it to the store service.
            crate::outbox::queue(&self.shared, crate::outbox::Outgoing::ReportHealth { deployment: deployment.to_owned(), outcome, now });
            return;
        }
        let op = Op::HealthReport { deployment: deployment.into(), outcome, now };
        if sync::run_op(&mut SharedData, (&*self.shared.policy).into(), &op).is_err() {
            self.shared.metrics.add(Metric::StoreFailures);
        }
    }

    fn attempt_body(&mut self, key: String, number: u32, body: &[u8], body_size: usize) -> Action {
        let shared = self.shared.clone();
        let policy = &*shared.policy;
        let now = abi::now_ms().unwrap_or(0);
        let planned = handoff::with(&key, |e| {
            let deployment = e.attempts.nth(number, &policy.fallback, now).map(str::to_owned);
            (deployment, e.warning.clone(), e.attempts.exhausted())
        });
        let Some((deployment, warning, exhausted)) = planned else {
            return self.reply(&http::gateway_error().to_response());
        };
        let Some(deployment) = deployment else {
            // (counted by the downstream filter, which answers the client)
            return self.reply(&exhausted);
        };
        let request: ChatRequest = match serde_json::from_slice(body) {
            Ok(r) => ChatRequest { wire_len: tollgate_core::openai::WireLen(body.len()), ..r },
            Err(e) => return self.refuse_for(&deployment, ApiError::unreadable_body(&e).to_response()),
        };
        let now_ns = abi::now_ns().unwrap_or(now.saturating_mul(1_000_000));
        let id = http::response_id(now_ns, http::connection_id(), self.context_id);
        let (provider, up, answer) = match forward::attempt(&policy.routes, &request, &deployment, Vec::new(), warning, id, now_ns / 1_000_000_000) {
            Ok(t) => t,
            Err(Some(e)) => {
                // This provider cannot serve the request as asked (an unsupported parameter):
                // the client's error, not the deployment's failure — answered, not retried.
                shared.metrics.add(Metric::Refused);
                handoff::with(&key, |e| e.attempts.failed(&deployment, Reason::Unsupported, None));
                return self.refuse_for(&deployment, e.to_response());
            }
            Err(None) => {
                abi::log(abi::LOG_ERROR, "tollgate: a planned deployment is not in the policy's models");
                return self.reply(&http::gateway_error().to_response());
            }
        };
        let (authority, prefix) = provider.base_url.as_deref().map(split_base_url).unwrap_or((None, ""));
        let path = format!("{prefix}{}", up.path);
        let key_header = provider
            .api_key_secret
            .as_deref()
            .and_then(|name| shared.secret(name))
            .and_then(|k| String::from_utf8(k).ok())
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .map(|k| provider.kind.key_header(&k));
        let to = Destination { path: &path, authority, key: key_header, cluster: None };
        if let Err(s) = http::rewrite_request(&up, body_size, &to, None) {
            host_error(&shared.metrics, "rewriting the attempt", s);
            return self.reply(&http::gateway_error().to_response());
        }
        shared.metrics.add(Metric::Attempts);
        if number > 1 {
            shared.metrics.add(Metric::Fallbacks);
        }
        self.phase = Phase::Sent { key, deployment, answer: Box::new(answer), started_ms: now };
        Action::Continue
    }

    fn attempt_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Phase::Sent { key, deployment, mut answer, started_ms: _ } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Action::Continue;
        };
        let metrics = std::rc::Rc::clone(&self.shared.metrics);
        let map = abi::HTTP_RESPONSE_HEADERS;
        let pairs = http::header_pairs(map).unwrap_or_else(|s| {
            host_error(&metrics, "reading the response headers", s);
            Vec::new()
        });
        let status = http::value(&pairs, ":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(502);
        let now = abi::now_ms().unwrap_or(0);
        let retry_after = http::value(&pairs, "retry-after").map(str::to_owned);
        let seen = Seen::Answer {
            status,
            quota: quota_from_headers(&pairs, now),
            retry_after_ms: retry_after.as_deref().and_then(|v| retry_after_ms(v, now)),
        };
        let verdict = attempt::judge(&self.shared.policy.fallback, seen);
        if let Some(outcome) = verdict.health {
            self.report(&deployment, outcome);
        }
        if verdict.next == Next::FallBack {
            metrics.add(Metric::AttemptFailures);
            if let Some(f) = verdict.failure {
                handoff::with(&key, |e| e.attempts.failed(&deployment, Reason::Failed(f), None));
            }
            // The route retries on this header (the next deployment) while attempts remain;
            // after the last one the downstream filter answers `all_deployments_failed`. The
            // provider's error body is never shown, so it is not translated.
            if abi::set_header(map, RETRY_HEADER, "1").is_err() {
                metrics.add(Metric::HostErrors);
            }
            self.phase = Phase::Failed;
            return Action::Continue;
        }
        // The client's answer: a provider's own x-tollgate-* headers go (they cannot steer the
        // retries or the accounting), the deployment is named.
        let head = answer.head(status, pairs.iter().map(|(k, _)| k.as_str()), retry_after.as_deref(), end_of_stream);
        if !http::apply_head(&head) {
            metrics.add(Metric::HostErrors);
        }
        if (200..300).contains(&status) && head.body == BodyPlan::Stream {
            // A stream is the client's from its first byte on (a cut one is charged); a buffered
            // answer only once it is complete ([`Self::attempt_usage`]): one cut before that is
            // retried by Envoy (it never saw the headers).
            handoff::with(&key, |e| e.served = Some(deployment.clone()));
        }
        let (body, action) = match head.body {
            BodyPlan::Stream => (BodyMode::Stream, Action::Continue),
            BodyPlan::Buffer => (BodyMode::Buffer { status, retry_after }, Action::Pause),
            BodyPlan::Pass => (BodyMode::Done, Action::Continue),
            BodyPlan::Replace(mut response) => {
                response.headers.push((DEPLOYMENT_HEADER, deployment.clone()));
                if !http::replace_answer(&response, 0, false) {
                    metrics.add(Metric::HostErrors);
                }
                (BodyMode::Done, Action::Continue)
            }
        };
        self.phase = Phase::Answered { key, deployment, status, answer, body };
        action
    }

    fn attempt_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let metrics = std::rc::Rc::clone(&self.shared.metrics);
        let Phase::Answered { answer, body, .. } = &mut self.phase else { return Action::Continue };
        match body {
            BodyMode::Stream => {
                let bytes = abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size).unwrap_or_else(|s| {
                    host_error(&metrics, "reading the response body", s);
                    Vec::new()
                });
                let mut out = Vec::with_capacity(bytes.len() + 64);
                answer.chunk(&bytes, &mut out);
                if end_of_stream {
                    answer.end(&mut out);
                    *body = BodyMode::Done;
                }
                if let Err(s) = abi::set_buffer(abi::HTTP_RESPONSE_BODY, 0, body_size, &out) {
                    host_error(&metrics, "writing the response body", s);
                }
                if end_of_stream {
                    self.attempt_usage();
                }
                Action::Continue
            }
            BodyMode::Buffer { status, retry_after } => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let whole = abi::buffer(abi::HTTP_RESPONSE_BODY, 0, body_size).unwrap_or_else(|s| {
                    host_error(&metrics, "reading the response body", s);
                    Vec::new()
                });
                let response = answer.whole(*status, retry_after.as_deref(), &whole);
                *body = BodyMode::Done;
                if !http::replace_answer(&response, body_size, true) {
                    metrics.add(Metric::HostErrors);
                }
                self.attempt_usage();
                Action::Continue
            }
            BodyMode::Done => Action::Continue,
        }
    }

    /// The answer ended: the deployment served (or answered the client's error), and what its
    /// provider reported goes to the downstream filter.
    fn attempt_usage(&mut self) {
        let Phase::Answered { key, deployment, status, answer, .. } = &self.phase else { return };
        let served = matches!(answer.ending(), tollgate_core::ending::Ending::Served { .. });
        let usage = answer.usage();
        let m = &self.shared.metrics;
        if !served || answer.stream_error().is_some() {
            m.add(Metric::UpstreamErrors);
        }
        // (The downstream filter holds the request's own bound; the metrics take the widest.)
        let (counted, _) = tollgate_core::limits::engine::UsageBound::default().apply(&usage);
        m.add_n(Metric::TokensInput, counted.input.unwrap_or(0));
        m.add_n(Metric::TokensOutput, counted.output.unwrap_or(0));
        handoff::with(key, |e| {
            e.usage = Some(usage);
            if served {
                e.served = Some(deployment.clone());
            } else {
                // The client's own error, answered (not one the policy falls back on).
                e.attempts.failed(deployment, Reason::Failed(Failure::Status(*status)), None);
            }
        });
        self.phase = Phase::Idle;
    }

    /// The attempt's stream is over (`on_done`/`on_log`): a failure without an answer
    /// (connection refused, per-try timeout, reset before or during the answer) is judged and
    /// recorded.
    fn attempt_done(&mut self) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let fallback = &self.shared.policy.fallback;
        let (key, deployment, seen) = match phase {
            Phase::Sent { key, deployment, started_ms, .. } => {
                let elapsed = abi::now_ms().unwrap_or(started_ms).saturating_sub(started_ms);
                (key, deployment, Seen::NoAnswer(attempt::unanswered(false, elapsed, fallback.attempt_timeout_ms)))
            }
            // An answer whose body was still flowing was cut: the provider reset. A stream had
            // already reached the client (served, charged what it reported); a buffered answer
            // had not (Envoy retries it).
            Phase::Answered { key, deployment, answer, body: BodyMode::Stream, .. } => {
                let usage = answer.usage();
                handoff::with(&key, |e| e.usage = Some(usage));
                (key, deployment, Seen::Cut)
            }
            Phase::Answered { key, deployment, body: BodyMode::Buffer { .. }, .. } => (key, deployment, Seen::NoAnswer(Failure::Reset)),
            other => {
                self.phase = other;
                return;
            }
        };
        let verdict = attempt::judge(fallback, seen);
        if let Some(outcome) = verdict.health {
            self.report(&deployment, outcome);
            self.shared.metrics.add(Metric::AttemptFailures);
        }
        if let (Some(f), false) = (verdict.failure, seen == Seen::Cut) {
            handoff::with(&key, |e| e.attempts.failed(&deployment, Reason::Failed(f), None));
        }
    }
}

impl Context for Upstream {
    fn on_done(&mut self) -> bool {
        self.attempt_done();
        true
    }
}

impl HttpContext for Upstream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let key = abi::header(abi::HTTP_REQUEST_HEADERS, "x-request-id")
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|k| handoff::contains(k));
        let Some(key) = key else {
            // Only requests the downstream filter planned may reach an alias's clusters: an
            // OpenAI body sent untranslated to another provider would be a half-forwarded request.
            abi::log(abi::LOG_ERROR, "tollgate: upstream filter got a request without a plan (is the downstream tollgate filter in the listener, with the same vm_config?)");
            self.shared.metrics.add(Metric::HostErrors);
            return self.reply(&http::gateway_error().to_response());
        };
        let number = handoff::with(&key, |e| {
            e.started += 1;
            e.started
        })
        .unwrap_or(1);
        if end_of_stream {
            return self.reply(&ApiError::invalid(None, "A chat completion request needs a body.").to_response());
        }
        self.phase = Phase::ReadingBody { key, number };
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Phase::ReadingBody { .. } = &self.phase else { return Action::Continue };
        if !end_of_stream {
            return Action::Pause;
        }
        let Phase::ReadingBody { key, number } = std::mem::replace(&mut self.phase, Phase::Idle) else { return Action::Continue };
        match abi::buffer(abi::HTTP_REQUEST_BODY, 0, body_size) {
            Ok(body) => self.attempt_body(key, number, &body, body_size),
            Err(s) => {
                host_error(&self.shared.metrics, "reading the request body", s);
                self.reply(&http::gateway_error().to_response())
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.attempt_response_headers(end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.attempt_response_body(body_size, end_of_stream)
    }

    fn on_log(&mut self) {
        self.attempt_done();
    }
}

