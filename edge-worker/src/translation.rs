//! The OpenAI front door translated to the policy's providers (Anthropic, Gemini,
//! OpenAI-compatible).
//!
//! Applies when the policy has a model map (`policy.routes.is_enabled()`) and the request is
//! `POST /v1/chat/completions`; [`crate::fetch`] has already read, parsed, routed and admitted
//! it through core's gate, which hands over the request to send (the model after a downgrade,
//! `max_tokens` capped) and its route. All the translating is core's [`Exchange`]; this module
//! only moves bytes between it and the host:
//! 1. `exchange.request` (a request the backend cannot serve → core's 400);
//! 2. fetches `provider.base_url + path` with the translated body and headers, the provider key
//!    from the Worker secret the policy names (`x-api-key` for Anthropic, `x-goog-api-key` for
//!    Gemini, `Authorization: Bearer` otherwise), and the client headers listed in the var
//!    [`PASS_HEADERS_VAR`]. The client's `authorization` never goes upstream; the key is never
//!    logged or returned. A secret that is named but not set → 503 `provider_key_missing`;
//! 3. a non-stream answer, or any non-2xx answer, is read whole and rendered by
//!    `exchange.response` (a soft-limit warning object is added to a 200 completion); a 2xx
//!    stream is translated as it arrives: each upstream chunk goes through `exchange.stream`
//!    and out to the client before the next one is read, and `exchange.finish` writes the end
//!    (`[DONE]` with the warning's SSE comment just before it, or an error event).
//!
//! The usage the exchange saw goes to the request's [`Finish`], which settles the request when
//! the answer has been read, the stream has ended, or the client went away (the runtime then
//! drops the stream, and with it the guard). A request that never reached the provider
//! settles as zero tokens.
//!
//! Every response carries the client's rate-limit headers from the admission.

use futures_util::stream::{self, StreamExt};
use tollgate_core::render::openai_error;
use tollgate_core::routing::Provider;
use tollgate_core::sse::write_event;
use tollgate_core::message;
use tollgate_core::translate::exchange::{Exchange, Routed};
use tollgate_core::translate::ApiError;
use tollgate_core::{LocalResponse, Policy};
use worker::js_sys::{Math, Uint8Array};
use worker::{console_error, console_warn, web_sys, ByteStream, Date, Env, Fetch, Headers, Method, Request, Response};

use crate::forward::{self, Finish};

/// The path Tollgate translates.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// Var: comma-separated names of client request headers passed on to translated providers
/// (e.g. `anthropic-beta`). Default: none. Credentials and hop-by-hop headers are never passed,
/// listed or not.
pub const PASS_HEADERS_VAR: &str = "PROVIDER_PASS_HEADERS";

/// Headers a client can never pass to a provider, whatever the var lists: credentials (the
/// worker adds the provider's own), and those the runtime or the translated body decides.
const NEVER_PASSED: [&str; 6] =
    ["authorization", "x-api-key", "x-goog-api-key", "content-length", "content-type", "cookie"];

/// Whether this request is translated rather than forwarded as it is.
pub fn applies(policy: &Policy, method: &Method, path: &str) -> bool {
    policy.routes.is_enabled() && *method == Method::Post && path == CHAT_PATH
}

/// The client header names the var lists, lower-cased, minus the ones never passed and the
/// policy's private ones (identity, tier).
pub fn pass_headers(var: Option<&str>, private: &[&str]) -> Vec<String> {
    forward::connection_tokens(var)
        .into_iter()
        .filter(|h| !NEVER_PASSED.contains(&h.as_str()) && forward::forwarded(h, &[]))
        .filter(|h| !private.iter().any(|p| p.eq_ignore_ascii_case(h)))
        .collect()
}

/// A response id in OpenAI's form, unique enough to tell responses apart in logs: the time
/// and 52 random bits.
pub(crate) fn response_id(now_ms: u64) -> String {
    let random = (Math::random() * (1u64 << 52) as f64) as u64;
    format!("chatcmpl-tg{now_ms:x}{random:013x}")
}

fn key_missing(provider: &str) -> LocalResponse {
    openai_error(
        503,
        &format!("Tollgate has no API key for the provider \"{provider}\": its Worker secret is not set."),
        "server_error",
        "provider_key_missing",
    )
}

fn upstream_unavailable() -> LocalResponse {
    openai_error(502, "The upstream API could not be reached.", "server_error", "upstream_unavailable")
}

/// Translates one admitted request. `extra` are the client's headers from the admission
/// (rate limits, warning); `warning` the warning object for the body, if the tier has one.
pub async fn handle(
    req: &Request,
    env: &Env,
    policy: &Policy,
    routed: Routed<'_>,
    extra: &[(&'static str, String)],
    mut finish: Finish,
    warning: Option<&serde_json::Value>,
) -> worker::Result<Response> {
    let respond = |r: &LocalResponse| forward::local_with(r, extra);
    // Until the provider is called, nothing was used.
    finish.unreached();

    let provider: &Provider = routed.provider();
    let Some(base_url) = provider.base_url.as_deref() else {
        let message = format!("providers.{}.base_url is not set; the worker needs it", provider.name);
        console_error!("tollgate: {message}");
        return respond(&crate::invalid_configuration(&message));
    };
    let key = match provider.api_key_secret.as_deref() {
        None => None,
        Some(secret) => match env.secret(secret).map(|s| s.to_string()) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => {
                console_error!("tollgate: provider {} has no key: the secret {secret} is not set", provider.name);
                return respond(&key_missing(&provider.name));
            }
        },
    };

    let now_ms = Date::now().as_millis();
    let (mut exchange, up) = match routed.start(response_id(now_ms), now_ms / 1000) {
        Ok(t) => t,
        Err(e) => return respond(&e.to_response()),
    };

    let pass_var = env.var(PASS_HEADERS_VAR).ok().map(|v| v.to_string());
    let private: Vec<&str> = policy.private_request_headers().collect();
    let passed = pass_headers(pass_var.as_deref(), &private)
        .into_iter()
        .filter_map(|name| req.headers().get(&name).ok().flatten().map(|value| (name, value)));
    let key = key.map(|k| provider.kind.key_header(&k));
    let headers = match upstream_headers(&up.headers, passed, key) {
        Ok(h) => h,
        Err(_) => {
            // Only a key or a passed value that is not a valid header value gets here; neither
            // is logged.
            console_error!("tollgate: provider {}: a request header value is invalid", provider.name);
            return respond(&crate::invalid_configuration(&format!(
                "a request header for the provider \"{}\" (its key or a passed header) is not a valid header value",
                provider.name
            )));
        }
    };

    let url = format!("{base_url}{}", up.path);
    let sent = send(&url, &headers, &up.body).await;
    // From here on the provider may have used tokens: only what it reports is known.
    finish = Finish::reported_by(finish);
    let mut upstream = match sent {
        Ok(r) => r,
        Err(e) => {
            console_error!("tollgate: provider {} unreachable: {e}", provider.name);
            return respond(&upstream_unavailable());
        }
    };
    let status = upstream.status_code();
    if status >= 400 {
        console_warn!("tollgate: provider {} answered {status}", provider.name);
    }

    if !(up.stream && (200..300).contains(&status)) {
        let retry_after = upstream.headers().get("retry-after").ok().flatten();
        let body = match upstream.bytes().await {
            Ok(b) => b,
            Err(e) => {
                console_error!("tollgate: provider {} answer unreadable: {e}", provider.name);
                return respond(&upstream_unavailable());
            }
        };
        let mut answer = exchange.response(status, retry_after.as_deref(), &body);
        finish.report(exchange.usage());
        if answer.status == 200 {
            answer.body = forward::with_warning_object(answer.body, warning);
        }
        return respond(&answer);
    }

    let chunks = match upstream.stream() {
        Ok(s) => s,
        Err(e) => {
            console_error!("tollgate: provider {} stream unreadable: {e}", provider.name);
            return respond(&upstream_unavailable());
        }
    };
    let headers = Headers::new();
    headers.set("content-type", "text/event-stream")?;
    headers.set("cache-control", "no-cache")?;
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    if let Some(w) = warning {
        exchange.set_closing_comment(message::sse_comment(w));
    }
    let pump = Pump { upstream: chunks, exchange, provider: provider.name.clone(), done: false, finish };
    Response::builder().with_status(200).with_headers(headers).from_stream(stream::unfold(pump, Pump::next))
}

/// The upstream request's headers: the translator's, then the passed client headers, then the
/// provider key (set last, so nothing the client sends can replace it).
pub(crate) fn upstream_headers(
    translated: &[(&'static str, String)],
    passed: impl Iterator<Item = (String, String)>,
    key: Option<(&'static str, String)>,
) -> worker::Result<Headers> {
    let headers = Headers::new();
    for (name, value) in translated {
        headers.set(name, value)?;
    }
    for (name, value) in passed {
        headers.set(&name, &value)?;
    }
    if let Some((name, value)) = key {
        headers.set(name, &value)?;
    }
    Ok(headers)
}

/// POSTs `body` to `url`, redirects not followed.
async fn send(url: &str, headers: &Headers, body: &[u8]) -> worker::Result<Response> {
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    init.set_body(&Uint8Array::from(body).into());
    let outbound = web_sys::Request::new_with_str_and_init(url, &init)?;
    Fetch::Request(Request::from(outbound)).send().await
}

/// One translated stream: the provider's body in, the client's SSE out, one upstream read per
/// pull from the client side (nothing is buffered beyond the chunk being translated).
struct Pump {
    upstream: ByteStream,
    exchange: Exchange,
    provider: String,
    done: bool,
    /// Dropped with the pump: at the end of the stream, or when the client goes away.
    finish: Finish,
}

impl Pump {
    /// The next non-empty piece of client output, or `None` once the stream has ended.
    async fn next(mut self) -> Option<(worker::Result<Vec<u8>>, Pump)> {
        let mut out = Vec::new();
        while !self.done && out.is_empty() {
            match self.upstream.next().await {
                Some(Ok(bytes)) => {
                    self.exchange.stream(&bytes, &mut out);
                    // An error event has ended the client's stream: stop reading.
                    self.done = self.exchange.stream_error().is_some();
                }
                Some(Err(e)) => {
                    console_warn!("tollgate: provider {} stream broke: {e}", self.provider);
                    let e = ApiError::bad_upstream("The connection to the provider broke mid-stream.");
                    let mut text = String::new();
                    write_event(&mut text, None, &String::from_utf8_lossy(&e.body()), None);
                    out.extend_from_slice(text.as_bytes());
                    self.done = true;
                }
                None => {
                    self.exchange.finish(&mut out);
                    self.done = true;
                }
            }
            self.finish.report(self.exchange.usage());
            if self.done {
                if let Some(e) = self.exchange.stream_error() {
                    // The status and whose fault, never the message: a provider's message may
                    // quote the request.
                    console_warn!(
                        "tollgate: provider {} stream ended in error ({}, {})",
                        self.provider,
                        e.label(),
                        e.status
                    );
                }
            }
        }
        (!out.is_empty()).then_some((Ok(out), self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_hop_by_hop_and_private_headers_are_never_passed() {
        let var = "Anthropic-Beta, authorization, X-API-Key,x-goog-api-key, connection, host, x-tollgate-user, ,x-mock-fixture";
        assert_eq!(pass_headers(Some(var), &["X-Tollgate-User"]), ["anthropic-beta", "x-mock-fixture"]);
        assert!(pass_headers(None, &[]).is_empty());
    }

    #[test]
    fn only_post_chat_completions_is_translated_and_only_with_a_model_map() {
        let with = Policy::from_json(
            br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}},
                 "providers":{"a":{"kind":"anthropic","base_url":"http://x"}},
                 "models":{"m":{"provider":"a","model":"claude"}}}"#,
        )
        .unwrap();
        let without = Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[]}}}"#).unwrap();
        assert!(applies(&with, &Method::Post, CHAT_PATH));
        assert!(!applies(&with, &Method::Get, CHAT_PATH));
        assert!(!applies(&with, &Method::Post, "/v1/embeddings"));
        assert!(!applies(&without, &Method::Post, CHAT_PATH));
    }
}
