//! # tollgate-edge-worker
//!
//! Tollgate as a Cloudflare Worker (workers-rs). A thin adapter: every decision is
//! `tollgate-core`'s — the gate, what the request becomes upstream
//! ([`tollgate_core::forward::dispatch`]), the answer's pipeline ([`tollgate_core::answer`]), an
//! alias's attempts ([`tollgate_core::attempt`]), what the request costs however it ends
//! ([`tollgate_core::ending`]) and the store protocol ([`tollgate_core::ops`]). This crate turns
//! the request into core inputs, does the I/O core's plans ask for, and nothing else.
//!
//! For each request, `fetch`:
//! 1. loads the policy ([`config`]: KV `TOLLGATE_CONFIG`/`policy`, else the var
//!    `TOLLGATE_POLICY`), always with `store.slots = 0`. Missing or invalid → 503 in OpenAI's
//!    error shape with code `invalid_configuration` (the message names the JSON path), logged;
//! 2. gathers the request's facts for core: its headers, the client address from
//!    `cf-connecting-ip`, the worker's `Date.now()`, and the Worker secrets the identity
//!    sources name (signed identity tokens);
//! 3. by kind (`gate::classify`): `GET /v1/tollgate/usage` answers core's usage body (peeked
//!    from the counter objects); `POST /v1/chat/completions` checks a declared `content-length`
//!    against the tier's size guard, reads the body and runs `gate::prepare_chat`;
//!    `GET /v1/models` answers core's list; any other method or path gets core's 404 (405 for a
//!    surface's path with another method), unforwarded and uncounted;
//! 4. admits the request by driving core's admission machine over the counter objects
//!    ([`store`]: one Durable Object per identity and per IP, sharded tier and global
//!    aggregates, [`counter`]) and lets core conclude: core's 429, or `store.on_failure` when an
//!    object cannot be reached;
//! 5. sends what core's [`tollgate_core::forward::dispatch`] says: a chat completion to its
//!    provider ([`translation`]: `base_url`, the key from the Worker secret the policy names, the
//!    client headers the var `PROVIDER_PASS_HEADERS` lists), an alias through the fetch loop over
//!    core's attempts ([`fallback`], health in [`health`]), chat completions when the policy
//!    maps no models to the var `UPSTREAM_URL` (method, path+query, headers
//!    minus hop-by-hop and Tollgate's own; the body core says);
//! 6. serves the answer through core's pipeline ([`forward::serve`]): the provider's account
//!    headers removed, the client's own set, the body streamed through core chunk by chunk (usage
//!    tapped, the warning comment before `[DONE]`, a broken stream ended with an OpenAI error
//!    event) or read whole and replaced (usage read, the warning object added, errors in
//!    OpenAI's format);
//! 7. settles the request in `ctx.wait_until` once its answer is over — or when the client goes
//!    away: the runtime drops the response stream and the [`forward::Finish`] inside hands the
//!    answer's [`tollgate_core::ending::Ending`] to the waiting settlement, which runs core's
//!    settlement machine by the one ending rule. (Measured under `wrangler dev`: the runtime
//!    notices the client has gone when the worker next has a chunk to write, so a silent upstream
//!    holds the request's lease until it sends more, ends, or the lease's TTL passes.) Leases not
//!    released (a settlement that could not reach an object) expire after
//!    `store.lease_ttl_seconds`;
//! 8. posts webhook events (`policy.notify`) with `fetch` in `ctx.wait_until`: admission's
//!    threshold events at once, settlement's after it. Events carry hashes and counts only.
//!
//! 9. writes the request's usage record as one JSON log line `{"record": …}` — at a refusal at
//!    once, else when settled (docs/usage-records.md).
//!
//! The operator API (`/v1/tollgate/admin/…`, docs/operator-api.md) is core's
//! [`tollgate_core::admin`] over the same objects: lookups, resets and credits drive core's
//! machines; listings page an activity index object per day and month (a Durable Object whose
//! storage keys are the identities admitted in it, written in `ctx.wait_until`).
//!
//! Never logs request or response bodies, and returns no `Err` for a client request (which
//! workers-rs would turn into a bare 500).

pub mod config;
pub mod counter;
pub mod fallback;
pub mod forward;
pub mod health;
pub mod store;
pub mod translation;

use std::rc::Rc;

use tollgate_core::admin;
use tollgate_core::ending::Ending;
use tollgate_core::forward::Dispatch;
use tollgate_core::gate::{self, Facts, Gate, Kind, Prepared, Refused};
use tollgate_core::limits::engine::{Ticket, Who};
use tollgate_core::ops::machine::Peeking;
use tollgate_core::record::Record;
use tollgate_core::render::openai_error;
use tollgate_core::{LocalResponse, Policy};
use worker::js_sys::Math;
use worker::wasm_bindgen::JsValue;
use worker::{console_error, console_log, console_warn, event, web_sys, Context, Date, Env, Fetch, Headers, Request, Response};

use crate::config::PolicyError;
use crate::counter::{Objects, SHARDS_VAR};
use crate::forward::Finish;

pub use counter::QuotaCounter;

/// The Durable Object namespace binding of [`QuotaCounter`].
pub const COUNTER_BINDING: &str = "QUOTA_COUNTER";
/// The var holding the upstream base URL.
pub const UPSTREAM_VAR: &str = "UPSTREAM_URL";
/// The header Cloudflare sets to the client's address.
pub const CLIENT_ADDRESS_HEADER: &str = "cf-connecting-ip";

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, ctx: Context) -> worker::Result<Response> {
    let policy = match config::load(&env).await {
        Ok(p) => p,
        Err(e) => {
            console_error!("tollgate: {e}");
            return forward::local(&config_error(&e));
        }
    };
    let now = Date::now().as_millis();
    let shards = counter::parse_shards(env.var(SHARDS_VAR).ok().map(|v| v.to_string()).as_deref());
    let objects = Objects(env.durable_object(COUNTER_BINDING).map_err(|e| e.to_string()));
    let method = req.method();
    let path = req.path();
    if admin::is_admin(&path) {
        return operator(req, &env, &ctx, &policy, &objects, shards, now).await;
    }

    let headers = req.headers().clone();
    let header = move |name: &str| headers.get(name).ok().flatten();
    let secrets: Vec<(String, Vec<u8>)> = policy
        .identity
        .secret_names()
        .filter_map(|name| env.secret(name).ok().map(|s| (name.to_owned(), s.to_string().into_bytes())))
        .collect();
    let secret = |name: &str| secrets.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let peer = req.headers().get(CLIENT_ADDRESS_HEADER).ok().flatten();
    let facts = Facts { header: &header, peer_address: peer.as_deref(), now_ms: now, secrets: &secret, claim: &tollgate_core::identity::no_claims };

    let kind = gate::classify(Some(method.as_ref()), Some(&path));
    let (prepared, body) = match kind {
        Kind::Usage => {
            let with_query = req.url().ok().map(|u| match u.query() {
                Some(q) => format!("{}?{q}", u.path()),
                None => u.path().to_owned(),
            });
            return forward::local(&store::usage_report(&objects, shards, &policy, &facts, with_query.as_deref()).await);
        }
        Kind::Models => return forward::local(&gate::models_list(&policy, &facts)),
        Kind::Unknown => return forward::local(&gate::unknown_surface(Some(method.as_ref()), Some(&path))),
        Kind::Chat => {
            let declared = header("content-length").and_then(|v| v.trim().parse().ok());
            if let Some(r) = gate::check_declared_length(&policy, &facts, declared) {
                return forward::local(&r);
            }
            let body = match req.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    console_warn!("tollgate: request body unreadable: {e}");
                    let r = openai_error(400, "The request body could not be read.", "invalid_request_error", "invalid_body");
                    return forward::local(&r);
                }
            };
            (gate::prepare_chat(&policy, &facts, &body), body)
        }
    };
    let pending = match prepared {
        Prepared::Reply(r, record) => {
            if let Some(record) = record {
                log_record(&record);
            }
            return forward::local(&r);
        }
        Prepared::Admit(p) => p,
    };
    let lease_id = (Math::random() * (1u64 << 53) as f64) as u64;
    let result = store::admit(&objects, shards, &policy.limits, &pending.who, &pending.estimate, lease_id, now).await;
    let store_failed = result.as_ref().err().cloned();
    let mut admitted = match (*pending).conclude(&policy, &facts, result) {
        Gate::Reply { response, why, store_error, record, .. } => {
            if why == Refused::StoreFailed {
                let e = store_error.map(|e| e.to_string()).unwrap_or_default();
                console_error!("tollgate: counting failed, refusing: {e}");
            }
            if let Some(record) = record {
                log_record(&record);
            }
            return forward::local(&response);
        }
        Gate::Forward(a) => a,
    };
    if let Some(e) = store_failed {
        console_warn!("tollgate: counting failed, forwarding uncounted: {e}");
    }

    let notify_url = policy.notify.as_ref().map(|n| n.url.clone());
    let events = std::mem::take(&mut admitted.events);
    if let (Some(url), false) = (&notify_url, events.is_empty()) {
        let url = url.clone();
        ctx.wait_until(async move { post_events(&url, events).await });
    }
    let ticket = admitted.ticket.take().filter(|t| !t.is_empty());
    if let Some(t) = &ticket {
        index_activity(&ctx, &policy, &objects, &t.who, now);
    }

    let private = |name: &str| gate::is_private_request_header(&policy, name);
    let pass_var = env.var(translation::PASS_HEADERS_VAR).ok().map(|v| v.to_string());
    let passed: Vec<(String, String)> = translation::pass_headers(pass_var.as_deref(), &private)
        .into_iter()
        .filter_map(|name| req.headers().get(&name).ok().flatten().map(|value| (name, value)))
        .collect();
    let (dispatch, record) = tollgate_core::forward::recorded(*admitted, translation::response_id(now), now / 1000);
    let finish = settle_when_done(&ctx, Rc::clone(&policy), Objects(objects.0.clone()), shards, ticket, notify_url, record);
    match dispatch {
        Dispatch::Reply(response) => finish.reply(&response, Ending::NotSent),
        Dispatch::Alias { alias, request, headers, warning, .. } => {
            let mut headers = headers;
            if let Some(w) = &warning {
                headers.push((tollgate_core::headers::WARNING_HEADER, w.header.clone()));
            }
            let call = fallback::Call { env: &env, ctx: &ctx, policy: &policy, objects: &objects, passed: &passed, headers, warning };
            fallback::handle(call, alias, &request, finish).await
        }
        Dispatch::Provider { provider, request, mut answer } => {
            let outbound = match translation::provider_request(&env, provider, &request, &passed) {
                Ok(r) => r,
                Err(translation::Unreachable::NotConfigured(r) | translation::Unreachable::KeyMissing(r)) => {
                    return finish.reply(&with_client_headers(r, &answer), Ending::NotSent);
                }
            };
            match Fetch::Request(outbound).send().await {
                Ok(resp) => forward::serve(resp, answer, finish, None).await,
                Err(e) => {
                    console_error!("tollgate: provider {} unreachable: {e}", provider.name);
                    let r = answer.unreachable(tollgate_core::fallback::Failure::Connect);
                    let ending = answer.ending();
                    finish.reply(&r, ending)
                }
            }
        }
        Dispatch::Upstream { body: rewritten, answer } => {
            let body = rewritten.unwrap_or(body);
            forward_upstream(req, &env, &private, &body, answer, finish).await
        }
    }
}

/// `r` (an answer Tollgate gives before any provider did) with the client's headers.
fn with_client_headers(mut r: LocalResponse, answer: &tollgate_core::answer::Answer) -> LocalResponse {
    r.headers.extend(answer.client_headers());
    r
}

/// The settlement waiting in `ctx.wait_until` for the request's [`Ending`] (sent when its
/// answer is over, or when the runtime dropped it: the client went away), by core's one rule;
/// then the webhook events it reached, and the request's usage record (written even when
/// nothing is to be settled: a request forwarded uncounted because the store failed).
fn settle_when_done(
    ctx: &Context,
    policy: Rc<Policy>,
    objects: Objects,
    shards: u32,
    ticket: Option<Ticket>,
    notify_url: Option<String>,
    record: Record,
) -> Finish {
    let (finish, done) = Finish::new(record);
    ctx.wait_until(async move {
        let Ok((ending, mut record)) = done.await else { return };
        let now = Date::now().as_millis();
        record.ended(&ending, &policy.limits, now);
        log_record(&record);
        let Some(ticket) = ticket else { return };
        if ending.implausible(&ticket) {
            console_warn!("tollgate: the provider reported more usage than the request can have used; charged up to the bound");
        }
        let actual = ending.actual(&policy.limits, &ticket);
        let settled = store::settle(&objects, shards, &ticket, actual, now).await;
        let settlement = gate::settlement(&policy, &ticket, settled, now);
        if let Some(e) = settlement.error {
            console_error!("tollgate: settling ({}) failed on {} key(s) ({}); leases expire by TTL", ending.label(), settlement.failures, e.kind());
        }
        if let (Some(url), false) = (notify_url, settlement.events.is_empty()) {
            post_events(&url, settlement.events).await;
        }
    });
    finish
}

/// Forwards an admitted chat request with `body` to `UPSTREAM_URL` and serves the answer through
/// core's pipeline.
async fn forward_upstream(
    req: Request,
    env: &Env,
    private: &dyn Fn(&str) -> bool,
    body: &[u8],
    mut answer: tollgate_core::answer::Answer,
    finish: Finish,
) -> worker::Result<Response> {
    let parsed = match env.var(UPSTREAM_VAR).map(|v| v.to_string()) {
        Ok(text) => forward::parse_base(&text),
        Err(_) => Err(format!("the var {UPSTREAM_VAR} is not set")),
    };
    let upstream = match parsed {
        Ok(url) => url,
        Err(e) => {
            console_error!("tollgate: {e}");
            return finish.reply(&with_client_headers(invalid_configuration(&e), &answer), Ending::NotSent);
        }
    };
    let target = match req.url() {
        Ok(url) => forward::upstream_url(&upstream, &url),
        Err(e) => {
            console_error!("tollgate: request URL unreadable: {e}");
            return finish.reply(&openai_error(400, "Malformed request URL.", "invalid_request_error", "invalid_url"), Ending::NotSent);
        }
    };
    match forward::send_client(&req, &target, private, body).await {
        Ok(resp) => forward::serve(resp, answer, finish, None).await,
        Err(e) => {
            console_error!("tollgate: upstream request failed: {e}");
            let r = answer.unreachable(tollgate_core::fallback::Failure::Connect);
            let ending = answer.ending();
            finish.reply(&r, ending)
        }
    }
}

/// Writes a usage record as one JSON log line, `{"record": {…}}`: Workers Logs index its fields,
/// Logpush exports it, `tollgate usage` reads it (docs/usage-records.md).
fn log_record(record: &Record) {
    let mut line = Vec::with_capacity(512);
    line.extend_from_slice(b"{\"record\":");
    line.extend_from_slice(&record.to_json());
    line.push(b'}');
    console_log!("{}", String::from_utf8_lossy(&line));
}

/// POSTs each webhook event body to `url` (JSON). Failures are logged, never retried: events
/// are notices, and the counts they describe are in the objects.
async fn post_events(url: &str, events: Vec<Vec<u8>>) {
    for body in events {
        let sent = async {
            let headers = Headers::new();
            headers.set("content-type", "application/json")?;
            let init = web_sys::RequestInit::new();
            init.set_method("POST");
            init.set_headers(&headers.0);
            init.set_body(&JsValue::from(worker::js_sys::Uint8Array::from(body.as_slice())));
            let request = web_sys::Request::new_with_str_and_init(url, &init)?;
            Fetch::Request(Request::from(request)).send().await
        };
        match sent.await {
            Ok(r) if (200..300).contains(&r.status_code()) => {}
            Ok(r) => console_warn!("tollgate: webhook answered {}", r.status_code()),
            Err(e) => console_warn!("tollgate: webhook failed: {e}"),
        }
    }
}

/// The operator API (`tollgate_core::admin`): authorized by the admin key, routed by core, run
/// over the counter objects and the activity index objects. A refused key is logged as an
/// event line (what an operator counts and alerts on); an adjustment's event is logged and
/// posted to `policy.notify`.
async fn operator(mut req: Request, env: &Env, ctx: &Context, policy: &Policy, objects: &Objects, shards: u32, now: u64) -> worker::Result<Response> {
    let secret = |name: &str| env.secret(name).ok().map(|s| s.to_string().into_bytes());
    let auth = req.headers().get("authorization").ok().flatten();
    if let Err(r) = admin::authorize(policy, auth.as_deref(), &secret) {
        if r.status == 401 {
            if let Some(name) = policy.admin_key_secret.as_deref().filter(|n| secret(n).is_none_or(|k| k.is_empty())) {
                console_error!("tollgate: the admin key secret {name} is not set");
            }
            console_warn!("{}", String::from_utf8_lossy(&admin::unauthorized_event(now)));
        }
        return forward::local(&r);
    }
    let method = req.method().to_string();
    let path = req.url().map(|u| match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    });
    let path = path.unwrap_or_default();
    let declared = req.headers().get("content-length").ok().flatten().and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > admin::MAX_BODY) {
        return forward::local(&admin::too_large());
    }
    let body = if method == "POST" { req.bytes().await.unwrap_or_default() } else { Vec::new() };
    if body.len() > admin::MAX_BODY {
        return forward::local(&admin::too_large());
    }
    match admin::route(policy, &method, &path, &body, now) {
        Err(r) => forward::local(&r),
        Ok(admin::Request::Usage(who)) => forward::local(&store::identity_report(objects, shards, policy, &who, now).await),
        Ok(admin::Request::List(listing)) => {
            let call = counter::IndexCall::List { after: listing.after.clone(), limit: listing.limit + 1 };
            let members = objects.index(&listing.key, &call).await.map_err(|e| e.store_error());
            forward::local(&admin::listed(&listing, members))
        }
        Ok(admin::Request::Adjust(who, adjustment)) => {
            let machine = Peeking::adjusting(&policy.limits, &who, adjustment.clone(), now);
            let statuses = store::drive(objects, shards, &who.identity_key, machine).await;
            let (response, event) = admin::adjusted(&who, &adjustment, statuses, now);
            if let Some(event) = event {
                console_log!("{}", String::from_utf8_lossy(&event));
                if let Some(url) = policy.notify.as_ref().map(|n| n.url.clone()) {
                    ctx.wait_until(async move { post_events(&url, vec![event]).await });
                }
            }
            forward::local(&response)
        }
    }
}

thread_local! {
    /// Index entries this isolate has already written.
    static INDEXED: std::cell::RefCell<admin::Noted> = std::cell::RefCell::new(admin::Noted::new(10_000));
}

/// Adds an admitted request's identity to the activity index of its day and month (when the
/// policy has an operator API), in `ctx.wait_until`: off the request's path.
fn index_activity(ctx: &Context, policy: &Policy, objects: &Objects, who: &Who, now: u64) {
    if policy.admin_key_secret.is_none() {
        return;
    }
    let (due, member) = INDEXED.with(|noted| noted.borrow_mut().due(policy, who, now));
    if due.is_empty() {
        return;
    }
    let objects = Objects(objects.0.clone());
    ctx.wait_until(async move {
        for (key, _) in due {
            if let Err(e) = objects.index(&key, &counter::IndexCall::Add(member.clone())).await {
                console_warn!("tollgate: the activity index {key} was not updated ({})", e.kind());
                INDEXED.with(|noted| noted.borrow_mut().forget(&key, &member));
            }
        }
    });
}

pub(crate) fn invalid_configuration(message: &str) -> LocalResponse {
    openai_error(503, &format!("Tollgate configuration is invalid: {message}"), "server_error", "invalid_configuration")
}

fn config_error(e: &PolicyError) -> LocalResponse {
    match e {
        PolicyError::Unavailable(_) => {
            let mut r = openai_error(
                503,
                "Tollgate configuration is temporarily unavailable. Please retry shortly.",
                "server_error",
                "configuration_unavailable",
            );
            r.headers.push(("retry-after", "1".to_owned()));
            r
        }
        PolicyError::Missing | PolicyError::Invalid(_) => invalid_configuration(&e.to_string()),
    }
}
