//! What an admitted request becomes upstream: the one decision both hosts apply.
//!
//! [`dispatch`] turns the gate's [`Admitted`] into a [`Dispatch`]:
//! - a chat completion for a mapped model: the request translated for its provider
//!   ([`Dispatch::Provider`]: path, headers, body — never a credential: the host adds the
//!   provider's key, [`crate::provider::ProviderKind::key_header`]);
//! - a chat completion with no model map: to the host's one upstream, through the
//!   OpenAI-compatible pass-through pair ([`Dispatch::Upstream`]): the client's bytes unless a
//!   downgrade or an output cap rewrote the request, or a stream must ask for its usage chunk
//!   (`stream_options.include_usage`, so that token and cost limits settle to what the provider
//!   reports; the pair removes that chunk again when the client did not ask for it);
//! - a model alias ([`Dispatch::Alias`]): the host runs the attempts ([`crate::attempt`]),
//!   each one made by [`attempt`].
//!
//! Each comes with the [`Answer`] pipeline its answer goes through. A request its provider
//! cannot take as asked (an unsupported parameter) is answered at once ([`Dispatch::Reply`]):
//! it was not sent ([`crate::ending::Ending::NotSent`]).

use crate::answer::Answer;
use crate::ending::Ending;
use crate::record::Record;
use crate::fallback::Alias;
use crate::fault::ApiError;
use crate::gate::Admitted;
use crate::message::Warning;
use crate::openai::ChatRequest;
use crate::provider::{ProviderKind, Target};
use crate::render::LocalResponse;
use crate::routing::{Provider, Routes};
use crate::translate::exchange::Exchange;
use crate::translate::{ResponseMeta, UpstreamRequest};

/// What the host sends upstream for an admitted request (module docs).
// One per request, moved once: boxing the big variants would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Dispatch<'p> {
    /// A chat completion for a mapped model, translated for `provider`.
    Provider {
        /// Where it goes (its cluster, base URL, key secret).
        provider: &'p Provider,
        /// What to send: path, headers (no credentials), body.
        request: UpstreamRequest,
        /// What its answer goes through.
        answer: Answer,
    },
    /// A chat completion to the host's one upstream (no model map).
    Upstream {
        /// The body to send instead of the client's (`None`: the client's bytes as they are).
        body: Option<Vec<u8>>,
        /// What its answer goes through.
        answer: Answer,
    },
    /// A model alias: attempts over its deployments ([`attempt`] makes each).
    Alias {
        /// The alias.
        alias: &'p Alias,
        /// The request as admitted (a downgrade's model, a capped `max_tokens`).
        request: ChatRequest,
        /// Whether the request differs from the client's body.
        rewritten: bool,
        /// The client's headers from the admission (rate limits, a downgrade).
        headers: Vec<(&'static str, String)>,
        /// The soft-limit warning the answer carries.
        warning: Option<Warning>,
    },
    /// Tollgate answers itself: the request was not sent.
    Reply(LocalResponse),
}

/// The upstream request and answer pipeline for an admitted request. `id` and `created`
/// (epoch seconds) name the completion when the provider's answer does not.
pub fn dispatch(admitted: Admitted<'_>, id: String, created: u64) -> Dispatch<'_> {
    recorded(admitted, id, created).0
}

/// [`dispatch`], and the request's usage record with where it went (the provider and model of
/// a mapped model; an alias's deployment is known when one serves it: [`Record::ended`]); a
/// request Tollgate answers itself here (a parameter its provider cannot take) is recorded as
/// refused, not sent.
pub fn recorded(mut admitted: Admitted<'_>, id: String, created: u64) -> (Dispatch<'_>, Record) {
    let mut record = std::mem::take(&mut admitted.record);
    match (&admitted.route, admitted.alias) {
        (Some(route), _) => record.sent(&route.provider.name, &admitted.request.model, &route.target.upstream_model),
        (None, Some(_)) => {}
        (None, None) => record.sent("upstream", &admitted.request.model, &admitted.request.model),
    }
    let dispatch = route(admitted, id, created);
    if let Dispatch::Reply(response) = &dispatch {
        record.attempts = 0;
        record = record.refused(response.status, crate::record::Reason::Invalid, None);
        record.ending = Some(Ending::NotSent.label().to_owned());
    }
    (dispatch, record)
}

fn route(mut admitted: Admitted<'_>, id: String, created: u64) -> Dispatch<'_> {
    let headers = std::mem::take(&mut admitted.headers);
    let warning = admitted.warning.take();
    let request = admitted.request;
    if let Some(alias) = admitted.alias {
        return Dispatch::Alias { alias, request, rewritten: admitted.rewritten, headers, warning };
    }
    match admitted.route.take() {
        Some(route) => {
            let meta = ResponseMeta { id, model: request.model.clone(), created };
            match start(route.target.kind, meta, &request, &route.target, headers, warning) {
                Ok((request, answer)) => Dispatch::Provider { provider: route.provider, request, answer },
                Err(e) => Dispatch::Reply(e.to_response()),
            }
        }
        None => {
            let target = Target { kind: ProviderKind::OpenAi, upstream_model: request.model.clone(), default_max_tokens: None };
            let meta = ResponseMeta { id, model: request.model.clone(), created };
            let asks_usage = request.is_stream() && !request.wants_stream_usage();
            match start(ProviderKind::OpenAi, meta, &request, &target, headers, warning) {
                Ok((up, answer)) => {
                    let body = (admitted.rewritten || asks_usage).then_some(up.body);
                    Dispatch::Upstream { body, answer }
                }
                Err(e) => Dispatch::Reply(e.to_response()),
            }
        }
    }
}

fn start(
    kind: ProviderKind,
    meta: ResponseMeta,
    request: &ChatRequest,
    target: &Target,
    headers: Vec<(&'static str, String)>,
    warning: Option<Warning>,
) -> Result<(UpstreamRequest, Answer), ApiError> {
    let mut exchange = Exchange::for_kind(kind, meta);
    let up = exchange.request(request, target)?;
    let stream = up.stream;
    Ok((up, Answer::chat(exchange, stream, headers, warning)))
}

/// One attempt of an alias request on `deployment`: the request translated for its provider,
/// and the answer pipeline (which names the deployment to the client and prices its usage).
/// The answer's `model` is the deployment's upstream model, as the provider knows it.
/// `Err`: the deployment is not in the policy's models (never for a validated alias), or it
/// cannot take the request as asked (the client's 400).
#[allow(clippy::too_many_arguments)]
pub fn attempt<'p>(
    routes: &'p Routes,
    request: &ChatRequest,
    deployment: &str,
    headers: Vec<(&'static str, String)>,
    warning: Option<Warning>,
    id: String,
    created: u64,
) -> Result<(&'p Provider, UpstreamRequest, Answer), Option<ApiError>> {
    let route = routes.route(deployment).ok_or(None)?;
    let meta = ResponseMeta { id, model: route.target.upstream_model.clone(), created };
    let (up, mut answer) = start(route.target.kind, meta, request, &route.target, headers, warning).map_err(Some)?;
    answer.served_by(deployment);
    Ok((route.provider, up, answer))
}

/// `https://host[:port]/prefix` → (`host[:port]`, `/prefix`): how a host that routes by cluster
/// (Envoy) reaches a provider's `base_url`.
pub fn split_base_url(url: &str) -> (Option<&str>, &str) {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    match rest.find('/') {
        Some(i) => (Some(&rest[..i]).filter(|h| !h.is_empty()), rest[i..].trim_end_matches('/')),
        None => (Some(rest).filter(|h| !h.is_empty()), ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::gate::{admit_chat, Facts, Gate};
    use crate::store::MemoryStore;

    fn admitted<'p>(p: &'p Policy, body: &str) -> Admitted<'p> {
        let header = |name: &str| (name == "x-user").then(|| "u".to_owned());
        let none = |_: &str| None;
        let facts = Facts { header: &header, peer_address: None, now_ms: 1_709_208_000_000, secrets: &none, claim: &crate::identity::no_claims };
        match admit_chat(p, &facts, body.as_bytes(), &mut MemoryStore::new(), 1) {
            Gate::Forward(a) => *a,
            Gate::Reply { response, .. } => panic!("{}", String::from_utf8_lossy(&response.body)),
        }
    }

    #[test]
    fn without_a_model_map_a_stream_asks_for_its_usage_and_other_bodies_stay_as_sent() {
        let p = Policy::from_json(br#"{"identity":{"header":"x-user"},"tier":{"default":"d"},"tiers":{"d":{"limits":[]}}}"#).unwrap();
        let plain = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let Dispatch::Upstream { body, .. } = dispatch(admitted(&p, plain), "id".into(), 1) else { panic!() };
        assert_eq!(body, None, "the client's bytes go as they are");
        let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let Dispatch::Upstream { body: Some(body), .. } = dispatch(admitted(&p, stream), "id".into(), 1) else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let asked = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let Dispatch::Upstream { body, .. } = dispatch(admitted(&p, asked), "id".into(), 1) else { panic!() };
        assert_eq!(body, None);
    }

    #[test]
    fn a_mapped_model_is_translated_and_an_unsupported_parameter_is_answered_unsent() {
        let p = Policy::from_json(
            br#"{"identity":{"header":"x-user"},"tier":{"default":"d"},"tiers":{"d":{"limits":[]}},
                 "providers":{"a":{"kind":"anthropic","default_max_tokens":64}},"models":{"c":{"provider":"a","model":"claude"}}}"#,
        )
        .unwrap();
        let Dispatch::Provider { provider, request, .. } = dispatch(admitted(&p, r#"{"model":"c","messages":[{"role":"user","content":"hi"}]}"#), "id".into(), 1) else { panic!() };
        assert_eq!((provider.name.as_str(), request.path.as_str()), ("a", "/v1/messages"));
        let Dispatch::Reply(r) = dispatch(admitted(&p, r#"{"model":"c","n":2,"messages":[{"role":"user","content":"hi"}]}"#), "id".into(), 1) else { panic!() };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn base_urls_split_into_authority_and_path_prefix() {
        assert_eq!(split_base_url("https://openrouter.ai/api"), (Some("openrouter.ai"), "/api"));
        assert_eq!(split_base_url("http://127.0.0.1:8080"), (Some("127.0.0.1:8080"), ""));
        assert_eq!(split_base_url("https://h/v1/"), (Some("h"), "/v1"));
    }
}
