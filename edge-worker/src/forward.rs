//! Forwarding an allowed request to the upstream, and turning core's local responses into
//! worker responses. Bodies are streamed through, never read or logged.

use tollgate_core::render::PROVIDER_RATE_LIMIT_HEADERS;
use tollgate_core::LocalResponse;
use worker::web_sys;
use worker::{Fetch, Headers, Request, Response, ResponseBody, Url};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still drop) and `host`,
/// which the runtime sets from the upstream URL.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Whether a request header goes upstream. `connection_tokens` are the header names the
/// client's `Connection` header lists (also hop-by-hop).
pub fn forwarded(name: &str, connection_tokens: &[String]) -> bool {
    let name = name.to_ascii_lowercase();
    !NOT_FORWARDED.contains(&name.as_str()) && !connection_tokens.contains(&name)
}

/// The names listed in a `Connection` header value, lower-cased.
pub fn connection_tokens(value: Option<&str>) -> Vec<String> {
    value.unwrap_or("").split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()).collect()
}

/// The upstream URL for a request: the base URL's origin and path, then the request's path and
/// query (`https://api.example.com/openai` + `/v1/models?x=1`).
pub fn upstream_url(base: &Url, request: &Url) -> String {
    let mut out = base.as_str().trim_end_matches('/').to_owned();
    // A base URL with a query or fragment is a configuration mistake checked by `parse_base`.
    out.push_str(request.path());
    if let Some(q) = request.query() {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Validates the `UPSTREAM_URL` var.
pub fn parse_base(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("UPSTREAM_URL {text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("UPSTREAM_URL {text:?} must be an http or https URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("UPSTREAM_URL {text:?} must not have a query or fragment"));
    }
    Ok(url)
}

/// Sends `req` (method, headers minus hop-by-hop, streamed body) to `target`, redirects not
/// followed: the client sees what the upstream said.
/// `private` names further headers that stay with Tollgate (the policy's identity and tier
/// headers).
pub async fn send(req: &Request, target: &str, private: &[&str]) -> worker::Result<Response> {
    let headers = Headers::new();
    let mut tokens = connection_tokens(req.headers().get("connection").ok().flatten().as_deref());
    tokens.extend(private.iter().map(|h| h.to_ascii_lowercase()));
    for (name, value) in req.headers().entries() {
        if forwarded(&name, &tokens) {
            headers.append(&name, &value)?;
        }
    }
    let inner = req.inner();
    let init = web_sys::RequestInit::new();
    init.set_method(&inner.method());
    init.set_headers(&headers.0);
    init.set_redirect(web_sys::RequestRedirect::Manual);
    if let Some(body) = inner.body() {
        init.set_body(&body);
    }
    let outbound = web_sys::Request::new_with_str_and_init(target, &init)?;
    Fetch::Request(Request::from(outbound)).send().await
}

/// The upstream's response minus the provider's own rate-limit headers, with `extra` headers
/// set, body streamed through.
pub fn with_headers(upstream: Response, extra: &[(&'static str, String)]) -> worker::Result<Response> {
    let status = upstream.status_code();
    let headers = Headers::new();
    for (name, value) in upstream.headers().entries() {
        if PROVIDER_RATE_LIMIT_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            continue;
        }
        headers.append(&name, &value)?;
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    // Null-body statuses must not carry a stream (the Response constructor throws).
    let body = match (status, upstream.body()) {
        (101 | 204 | 205 | 304, _) => ResponseBody::Empty,
        (_, body) => body.clone(),
    };
    Ok(Response::builder().with_status(status).with_headers(headers).body(body))
}

/// A response core rendered (429, 503).
pub fn local(r: &LocalResponse) -> worker::Result<Response> {
    local_with(r, &[])
}

/// A response core rendered, with `extra` headers set (the client's rate-limit headers).
pub fn local_with(r: &LocalResponse, extra: &[(&'static str, String)]) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in &r.headers {
        headers.append(name, value)?;
    }
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    Ok(Response::builder().with_status(r.status).with_headers(headers).fixed(r.body.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let tokens = connection_tokens(Some("keep-alive, X-Trace-Hop"));
        assert_eq!(tokens, ["keep-alive", "x-trace-hop"]);
        for h in ["Connection", "TE", "transfer-encoding", "Upgrade", "host", "x-trace-hop", "Proxy-Authorization"] {
            assert!(!forwarded(h, &tokens), "{h}");
        }
        for h in ["authorization", "content-type", "openai-organization", "x-tollgate-user"] {
            assert!(forwarded(h, &tokens), "{h}");
        }
    }

    #[test]
    fn upstream_url_keeps_base_path_and_request_query() {
        let base = parse_base("http://127.0.0.1:8080").unwrap();
        let req = Url::parse("https://gw.example/v1/chat/completions?a=1&b=%20").unwrap();
        assert_eq!(upstream_url(&base, &req), "http://127.0.0.1:8080/v1/chat/completions?a=1&b=%20");
        let base = parse_base("https://api.example.com/openai/").unwrap();
        let req = Url::parse("https://gw.example/v1/models").unwrap();
        assert_eq!(upstream_url(&base, &req), "https://api.example.com/openai/v1/models");
    }

    #[test]
    fn bad_upstream_urls_are_named() {
        assert!(parse_base("not a url").unwrap_err().contains("is not a URL"));
        assert!(parse_base("ftp://x").unwrap_err().contains("http or https"));
        assert!(parse_base("https://x/?q=1").unwrap_err().contains("query"));
    }
}
