//! `tollgate-mock-provider [--port P] [--require-key KEY] [--fixtures DIR] [failure mode flags]`
//!
//! An OpenAI-compatible provider for local runs and tests, listening on 127.0.0.1 only.
//! Prints `listening on http://127.0.0.1:PORT` as its first line of output (port 0, the
//! default, picks a free port). HTTP/1.1 with keep-alive, one thread per connection (request
//! heads parsed by `httparse`; bodies by Content-Length or chunked).
//!
//! - `POST /v1/chat/completions`: a fixed chat completion (SSE chunks, sent chunked, when
//!   `"stream": true`), echoing the requested model.
//! - `POST /v1/messages`: the same reply as a native Anthropic message (usage `input_tokens` /
//!   `output_tokens`); with `"stream": true` the SSE events `message_start`,
//!   `content_block_start`, one `content_block_delta` per word, `content_block_stop`,
//!   `message_delta` (stop reason and usage) and `message_stop`. Echoes the body's model.
//! - `POST /v1beta/models/{model}:generateContent`: the same reply as a native Gemini answer
//!   (`candidates`, `usageMetadata`, `modelVersion` = the model in the path);
//!   `:streamGenerateContent?alt=sse` sends it as `data:` chunks (CRLF framing, as Gemini does),
//!   one per word, `finishReason` and `usageMetadata` in the last; without `alt=sse`, the same
//!   chunks as one streamed JSON array.
//! - `GET /__mock/requests`: `{"count": N}`, how many `/v1…` requests it has received (failed,
//!   hung and reset ones included), so tests can prove a denied request never reached the
//!   upstream.
//! - `GET /__mock/last-headers`: `{"names": [...]}`, the header names (never values) of the
//!   last `/v1/` request, so tests can prove which headers reached the provider.
//! - `GET /__mock/last-path`: `{"path": "...", "model": ...}`, the path with its query and the
//!   body's `model` (or null) of the last `/v1/` request, so tests can prove where a translated
//!   request went.
//! - `POST /__mock/webhook…` (any path under it): records the request's path and body (a
//!   webhook receiver for threshold events) and answers 200 `{}`.
//! - `GET /__mock/webhooks`: `{"count": N, "hooks": [{"path": "...", "body": "..."}]}`, every
//!   recorded webhook in arrival order.
//! - `POST /__mock/mode`: replaces the failure mode (below) at runtime; JSON body with the
//!   knobs `fail_status`, `retry_after` (number or string), `hang` (bool), `reset_after`,
//!   `fail_first`, `quota_remaining` (unknown keys: 400). `{}` = healthy. Answers the new mode;
//!   the `fail_first` count starts again. `GET /__mock/mode` shows the current one.
//! - anything else: 404 in OpenAI's error format.
//!
//! **Failure modes** (whole server, every API request `/v1…`; flags at start, or
//! `POST /__mock/mode`):
//! - `--fail-status S` [`--retry-after V`]: answer S with an error body in the dialect of the
//!   path (OpenAI `{"error": {message, type, param, code}}` for `/v1/chat/completions` and other
//!   `/v1` paths, Anthropic `{"type": "error", "error": {type, message}}` for `/v1/messages`,
//!   Gemini `{"error": {code, message, status}}` for `/v1beta/…`), with `retry-after: V` when given.
//! - `--hang`: read the request, then never answer; the connection stays open until the client
//!   closes it (or 120 s pass, so no thread lives forever).
//! - `--reset-after K`: every streamed answer closes the connection after its first K events
//!   without ending the chunked body (like the `x-mock-reset-after` header, which wins).
//! - `--fail-first N`: only the first N API requests (since start or the last `POST
//!   /__mock/mode`) fail, with the mode's failure (`--fail-status`, `--hang` or `--reset-after`;
//!   status 500 when none is given); later ones are answered normally.
//! - `--quota-remaining N`: successful (200) answers carry `x-ratelimit-remaining-requests: N`,
//!   `x-ratelimit-remaining-tokens: 100000`, `x-ratelimit-reset-requests: 2s`, and on
//!   `/v1/messages` also `anthropic-ratelimit-requests-remaining: N` and
//!   `anthropic-ratelimit-requests-reset: <RFC 3339 time, now + 2 s>`.
//!
//! Every API answer carries the account headers the real APIs send (`openai-organization`,
//! `openai-project`, `anthropic-organization-id`, a `set-cookie` for the provider's domain), so
//! tests can prove a gateway never passes them on.
//!
//! The failure mode is checked after a request is counted and recorded and before the key check
//! and fixture replay: a failing provider fails whatever the request carries.
//!
//! Test knobs on `POST /v1/chat/completions`, `/v1/messages` and Gemini's paths (request
//! headers; without them nothing changes):
//! - `x-mock-usage: P,C`: report `P` prompt and `C` completion tokens (default 9 and 8).
//!   An OpenAI stream carries usage exactly as OpenAI's does: only when the request asks with
//!   `stream_options.include_usage` — then every chunk has `"usage": null` and a last chunk with
//!   no choices the usage, before `data: [DONE]`. Anthropic and Gemini streams always carry it.
//! - `x-mock-delay-ms: N`: a stream waits N ms before each event after the first.
//! - `x-mock-empty: S`: answer status `S` with an empty body and no content type.
//! - `x-mock-spoof-tollgate: 1`: the answer also carries `x-tollgate-retry: 1` and
//!   `x-tollgate-deployment: spoofed` (a provider trying to steer Tollgate's retries).
//! - `x-mock-reset-after: K`: a stream closes the connection after its first K events, without
//!   ending the chunked body (an upstream reset mid-stream).
//!
//! With `--require-key KEY`, API requests without the key (`Authorization: Bearer KEY`,
//! `x-api-key: KEY` or `x-goog-api-key: KEY`, whichever the provider uses) get a 401, as the
//! real provider would answer.
//!
//! **Replay.** A request to any API path (`/v1/…`, `/v1beta/…`) carrying
//! `x-mock-fixture: <path under the fixtures directory>` is answered with that recorded body,
//! byte for byte: `.sse` as `text/event-stream`, sent one event per write; `stream_array_*.json`
//! (Gemini's streamed array) sent in pieces; other `.json` in one piece. The status comes from
//! `x-mock-status` (default: `NNN` from an `error_NNN_` file name, else 200) and `x-mock-retry-after`
//! becomes `retry-after`. The fixtures directory is `--fixtures DIR`, else `$TOLLGATE_FIXTURES`,
//! else `../shared/fixtures` from the working directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const REPLY: &str = "Hello from the Tollgate mock provider.";
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
/// A hanging answer gives up after this long, so no connection thread lives forever.
const HANG_LIMIT: Duration = Duration::from_secs(120);

/// The whole-server failure mode (see the module docs). `Default` = healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mode {
    fail_status: Option<u16>,
    retry_after: Option<String>,
    hang: bool,
    reset_after: Option<usize>,
    fail_first: Option<u64>,
    quota_remaining: Option<u64>,
}

impl Mode {
    /// From `POST /__mock/mode`'s JSON body.
    fn from_json(body: &[u8]) -> Result<Mode, String> {
        let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?
        };
        let Some(object) = value.as_object() else { return Err("the mode must be a JSON object".into()) };
        let mut mode = Mode::default();
        for (key, v) in object {
            let number = || v.as_u64().ok_or_else(|| format!("{key} must be a non-negative integer"));
            match key.as_str() {
                "fail_status" => {
                    mode.fail_status = Some(status_code(number()?).ok_or("fail_status must be 100..=999")?)
                }
                "retry_after" => {
                    mode.retry_after = Some(match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return Err("retry_after must be a string or a number".into()),
                    })
                }
                "hang" => mode.hang = v.as_bool().ok_or("hang must be true or false")?,
                "reset_after" => mode.reset_after = Some(number()? as usize),
                "fail_first" => mode.fail_first = Some(number()?),
                "quota_remaining" => mode.quota_remaining = Some(number()?),
                _ => return Err(format!("unknown mode key {key:?}")),
            }
        }
        Ok(mode)
    }

    fn to_json(&self) -> Value {
        json!({
            "fail_status": self.fail_status, "retry_after": self.retry_after, "hang": self.hang,
            "reset_after": self.reset_after, "fail_first": self.fail_first,
            "quota_remaining": self.quota_remaining,
        })
    }

    /// The failure the `n`-th (0-based) API request since this mode was set gets, if any.
    fn failure(&self, n: u64) -> Option<Failure> {
        if self.fail_first.is_some_and(|first| n >= first) {
            return None;
        }
        if self.hang {
            return Some(Failure::Hang);
        }
        if let Some(status) = self.fail_status {
            return Some(Failure::Status(status, self.retry_after.clone()));
        }
        if let Some(k) = self.reset_after {
            return Some(Failure::ResetAfter(k));
        }
        self.fail_first.map(|_| Failure::Status(500, self.retry_after.clone()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Hang,
    Status(u16, Option<String>),
    /// Streamed answers close after K events; others are answered normally.
    ResetAfter(usize),
}

fn status_code(n: u64) -> Option<u16> {
    u16::try_from(n).ok().filter(|s| (100..=999).contains(s))
}

struct Shared {
    served: AtomicU64,
    fixtures: std::path::PathBuf,
    last_header_names: std::sync::Mutex<Vec<String>>,
    last_path: std::sync::Mutex<Value>,
    webhooks: std::sync::Mutex<Vec<Value>>,
    required_authorization: Option<String>,
    /// The failure mode and how many API requests it has seen.
    mode: Mutex<(Mode, u64)>,
}

fn main() {
    let mut port = 0u16;
    let mut required_authorization = None;
    let mut fixtures = std::env::var_os("TOLLGATE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("../shared/fixtures"));
    let mut mode = Mode::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--hang" => {
                mode.hang = true;
                Some(())
            }
            _ => {
                let value = args.next();
                let number = || value.as_deref().and_then(|v| v.parse::<u64>().ok());
                match arg.as_str() {
                    "--port" => value.as_deref().and_then(|v| v.parse().ok()).map(|v| port = v),
                    "--require-key" => value.clone().map(|v| required_authorization = Some(v)),
                    "--fixtures" => value.clone().map(|v| fixtures = std::path::PathBuf::from(v)),
                    "--fail-status" => number().and_then(status_code).map(|v| mode.fail_status = Some(v)),
                    "--retry-after" => value.clone().map(|v| mode.retry_after = Some(v)),
                    "--reset-after" => number().map(|v| mode.reset_after = Some(v as usize)),
                    "--fail-first" => number().map(|v| mode.fail_first = Some(v)),
                    "--quota-remaining" => number().map(|v| mode.quota_remaining = Some(v)),
                    _ => None,
                }
            }
        };
        if parsed.is_none() {
            eprintln!(
                "usage: tollgate-mock-provider [--port P] [--require-key KEY] [--fixtures DIR] [--fail-status S] \
                 [--retry-after V] [--hang] [--reset-after K] [--fail-first N] [--quota-remaining N]"
            );
            std::process::exit(2);
        }
    }
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock provider: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();

    let shared = Arc::new(Shared {
        served: AtomicU64::new(0),
        fixtures,
        last_header_names: Default::default(),
        last_path: std::sync::Mutex::new(json!({"path": null, "model": null})),
        webhooks: Default::default(),
        required_authorization,
        mode: Mutex::new((mode, 0)),
    });
    for stream in listener.incoming().flatten() {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let _ = serve_connection(stream, &shared);
        });
    }
}

struct Request {
    method: String,
    path: String,
    /// The request target as sent, query included.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Send as chunked transfer encoding, one chunk per element (SSE events).
    chunks: Option<Vec<String>>,
    extra_headers: Vec<(&'static str, String)>,
    /// Pause before each chunk after the first.
    delay_ms: u64,
    /// Close the connection after this many chunks, leaving the body unfinished.
    reset_after: Option<usize>,
    /// Answer nothing: keep the connection open until the client goes away (or `HANG_LIMIT`).
    hang: bool,
}

fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(request) = read_request(&mut reader)? else {
            return Ok(());
        };
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = handle(&request, shared);
        if response.hang {
            hang(&mut writer);
            return Ok(());
        }
        write_response(&mut writer, &response, close)?;
        if response.reset_after.is_some() {
            // The body was left unfinished on purpose: drop the connection.
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        if close {
            return Ok(());
        }
    }
}

/// Waits, answering nothing, until the client closes the connection or `HANG_LIMIT` passes.
fn hang(stream: &mut TcpStream) {
    let deadline = Instant::now() + HANG_LIMIT;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn bad_input(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// Reads one request; `None` when the peer closed the connection between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let n = reader.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(bad_input("truncated head")) };
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(bad_input("head too large"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad_input("malformed request head")),
    }
    let mut request = Request {
        method: parsed.method.unwrap_or("").to_owned(),
        path: parsed.path.unwrap_or("").split('?').next().unwrap_or("").to_owned(),
        target: parsed.path.unwrap_or("").to_owned(),
        headers: parsed
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        request.body = read_chunked(reader)?;
    } else if let Some(len) = request.header("content-length") {
        let len: usize = len.trim().parse().map_err(|_| bad_input("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad_input("body too large"));
        }
        request.body = vec![0; len];
        reader.read_exact(&mut request.body)?;
    }
    Ok(Some(request))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad_input("bad chunk size"))?;
        if size == 0 {
            // trailers, up to the empty line
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(bad_input("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}

fn write_response(w: &mut TcpStream, r: &Response, close: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        404 => "Not Found",
        _ => "Status",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nconnection: {connection}\r\n", r.status);
    if !r.content_type.is_empty() {
        head.push_str(&format!("content-type: {}\r\n", r.content_type));
    }
    for (k, v) in &r.extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match &r.chunks {
        None => {
            head.push_str(&format!("content-length: {}\r\n\r\n", r.body.len()));
            let mut out = head.into_bytes();
            out.extend_from_slice(&r.body);
            w.write_all(&out)?;
        }
        Some(chunks) => {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            w.write_all(head.as_bytes())?;
            for (i, chunk) in chunks.iter().enumerate() {
                if r.reset_after == Some(i) {
                    return w.flush();
                }
                if i > 0 && r.delay_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(r.delay_ms));
                }
                w.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())?;
                w.flush()?;
            }
            if r.reset_after.is_some_and(|k| k >= chunks.len()) {
                return w.flush();
            }
            w.write_all(b"0\r\n\r\n")?;
        }
    }
    w.flush()
}

fn json_response(status: u16, body: &Value) -> Response {
    Response { status, content_type: "application/json", body: body.to_string().into_bytes(), ..Default::default() }
}

/// A chunked `text/event-stream` answer, one chunk per event.
fn sse_response(chunks: Vec<String>) -> Response {
    Response { status: 200, content_type: "text/event-stream", chunks: Some(chunks), ..Default::default() }
}

/// The API dialect a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
    Gemini,
}

fn dialect(path: &str) -> Dialect {
    if path.starts_with("/v1beta/") {
        Dialect::Gemini
    } else if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

/// A failure-mode error answer in the path's dialect.
fn mode_error(path: &str, status: u16, retry_after: Option<&str>) -> Response {
    let message = format!("The mock provider is set to fail with {status}.");
    let body = match dialect(path) {
        Dialect::OpenAi => {
            let (kind, code) = match status {
                429 => ("rate_limit_error", "rate_limit_exceeded"),
                400..=499 => ("invalid_request_error", "mock_failure"),
                _ => ("server_error", "mock_failure"),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Dialect::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Dialect::Gemini => {
            let kind = match status {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status, "message": message, "status": kind}})
        }
    };
    let mut response = json_response(status, &body);
    if let Some(r) = retry_after {
        response.extra_headers.push(("retry-after", r.to_owned()));
    }
    response
}

/// `--quota-remaining`'s headers (see the module docs).
fn quota_headers(path: &str, remaining: u64, now: SystemTime) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("x-ratelimit-remaining-requests", remaining.to_string()),
        ("x-ratelimit-remaining-tokens", "100000".to_owned()),
        ("x-ratelimit-reset-requests", "2s".to_owned()),
    ];
    if dialect(path) == Dialect::Anthropic {
        let reset = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 2;
        headers.push(("anthropic-ratelimit-requests-remaining", remaining.to_string()));
        headers.push(("anthropic-ratelimit-requests-reset", rfc3339(reset)));
    }
    headers
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
fn rfc3339(epoch_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(epoch_seconds)).to_string()
}

fn error(status: u16, message: &str, code: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}),
    )
}

fn handle(request: &Request, shared: &Shared) -> Response {
    let path = request.path.as_str();
    if path.starts_with("/v1") {
        shared.served.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut names) = shared.last_header_names.lock() {
            *names = request.headers.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
        }
        if let Ok(mut last) = shared.last_path.lock() {
            let model = serde_json::from_slice::<Value>(&request.body).ok().and_then(|b| b.get("model").cloned());
            *last = json!({"path": request.target, "model": model});
        }
        let (mode, failure) = match shared.mode.lock() {
            Ok(mut guard) => {
                let n = guard.1;
                guard.1 += 1;
                (guard.0.clone(), guard.0.failure(n))
            }
            Err(_) => (Mode::default(), None),
        };
        let mut response = match &failure {
            Some(Failure::Hang) => return Response { hang: true, ..Default::default() },
            Some(Failure::Status(status, retry_after)) => mode_error(path, *status, retry_after.as_deref()),
            Some(Failure::ResetAfter(_)) | None => api(request, shared),
        };
        response.extra_headers.extend(account_headers(path));
        if let Some(Failure::ResetAfter(k)) = failure {
            if response.chunks.is_some() && response.reset_after.is_none() {
                response.reset_after = Some(k);
            }
        }
        if let (Some(remaining), 200) = (mode.quota_remaining, response.status) {
            response.extra_headers.extend(quota_headers(path, remaining, SystemTime::now()));
        }
        return response;
    }
    match (request.method.as_str(), path) {
        ("GET", "/__mock/mode") => {
            json_response(200, &shared.mode.lock().map(|m| m.0.to_json()).unwrap_or(Value::Null))
        }
        ("POST", "/__mock/mode") => match Mode::from_json(&request.body) {
            Ok(mode) => {
                let shown = mode.to_json();
                if let Ok(mut guard) = shared.mode.lock() {
                    *guard = (mode, 0);
                }
                json_response(200, &shown)
            }
            Err(e) => error(400, &e, "bad_mode"),
        },
        ("GET", "/__mock/last-headers") => {
            let names = shared.last_header_names.lock().map(|n| n.clone()).unwrap_or_default();
            json_response(200, &json!({"names": names}))
        }
        ("GET", "/__mock/last-path") => json_response(200, &shared.last_path.lock().map(|p| p.clone()).unwrap_or(Value::Null)),
        ("GET", "/__mock/requests") => json_response(200, &json!({"count": shared.served.load(Ordering::SeqCst)})),
        ("GET", "/__mock/webhooks") => {
            let hooks = shared.webhooks.lock().map(|h| h.clone()).unwrap_or_default();
            json_response(200, &json!({"count": hooks.len(), "hooks": hooks}))
        }
        ("POST", p) if p.starts_with("/__mock/webhook") => {
            let hook = json!({"path": request.target, "body": String::from_utf8_lossy(&request.body)});
            if let Ok(mut hooks) = shared.webhooks.lock() {
                hooks.push(hook);
            }
            json_response(200, &json!({}))
        }
        (_, p) => error(404, &format!("the mock provider has no route {p}"), "unknown_url"),
    }
}

/// What the real APIs say about the account a key belongs to, on every answer: OpenAI's
/// organisation and project, Cloudflare's cookie for its own domain, Anthropic's organisation
/// id (recorded headers: ../shared/fixtures/*.headers.json). A gateway must not pass them on.
fn account_headers(path: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![("set-cookie", "__cf_bm=mock-cookie; path=/; domain=.mock-provider.invalid; HttpOnly; Secure".to_owned())];
    if path.starts_with("/v1/messages") {
        h.push(("anthropic-organization-id", "00000000-0000-4000-8000-00000000mock".to_owned()));
    } else if !path.starts_with("/v1beta/") {
        h.push(("openai-organization", "mock-org-4f2a".to_owned()));
        h.push(("openai-project", "proj_mock".to_owned()));
    }
    h
}

/// An API request (`/v1…`) that the failure mode lets through: key check, replay, or an answer.
fn api(request: &Request, shared: &Shared) -> Response {
    let path = request.path.as_str();
    if let Some(key) = &shared.required_authorization {
        let bearer = format!("Bearer {key}");
        let ok = request.header("authorization") == Some(bearer.as_str())
            || request.header("x-api-key") == Some(key.as_str())
            || request.header("x-goog-api-key") == Some(key.as_str());
        if !ok {
            return error(401, "Incorrect API key provided.", "invalid_api_key");
        }
    }
    if let Some(status) = request.header("x-mock-empty").and_then(|v| v.trim().parse::<u64>().ok()).and_then(status_code) {
        return Response { status, content_type: "", ..Default::default() };
    }
    if let Some(fixture) = request.header("x-mock-fixture") {
        return replay(request, &shared.fixtures, fixture);
    }
    let knobs = Knobs::of(request);
    let with_knobs = |mut response: Response| {
        response.delay_ms = knobs.delay_ms;
        response.reset_after = knobs.reset_after;
        response
    };
    let mut response = match (request.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => match serde_json::from_slice::<Value>(&request.body) {
            Ok(req) if req.get("stream") == Some(&Value::Bool(true)) => with_knobs(stream_response(&req, knobs.usage)),
            Ok(req) => json_response(200, &completion(&req, knobs.usage)),
            Err(e) => error(400, &format!("invalid JSON body: {e}"), "invalid_json"),
        },
        ("POST", "/v1/messages") => match serde_json::from_slice::<Value>(&request.body) {
            Ok(req) if req.get("stream") == Some(&Value::Bool(true)) => with_knobs(anthropic_stream(&req, knobs.usage)),
            Ok(req) => json_response(200, &anthropic_message(&req, knobs.usage)),
            Err(e) => mode_error_body(path, 400, &format!("invalid JSON body: {e}")),
        },
        ("POST", p) if p.starts_with("/v1beta/models/") => {
            let rest = &p["/v1beta/models/".len()..];
            let Some((model, method)) = rest.rsplit_once(':') else {
                return mode_error_body(p, 404, &format!("the mock provider has no route {p}"));
            };
            if let Err(e) = serde_json::from_slice::<Value>(&request.body) {
                return mode_error_body(p, 400, &format!("invalid JSON body: {e}"));
            }
            let sse = request.target.split_once('?').is_some_and(|(_, q)| q.split('&').any(|kv| kv == "alt=sse"));
            match method {
                "generateContent" => json_response(200, &gemini_answer(model, knobs.usage)),
                "streamGenerateContent" => with_knobs(gemini_stream(model, knobs.usage, sse)),
                _ => mode_error_body(p, 404, &format!("the mock provider has no method {method}")),
            }
        }
        (_, p) => error(404, &format!("the mock provider has no route {p}"), "unknown_url"),
    };
    if request.header("x-mock-spoof-tollgate").is_some() {
        // A provider sending Tollgate's own response headers (they must not steer anything).
        response.extra_headers.push(("x-tollgate-retry", "1".to_owned()));
        response.extra_headers.push(("x-tollgate-deployment", "spoofed".to_owned()));
    }
    response
}

/// An error answer with `message` in the path's dialect (Anthropic and Gemini paths).
fn mode_error_body(path: &str, status: u16, message: &str) -> Response {
    let mut response = mode_error(path, status, None);
    let mut body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    if let Some(m) = body.pointer_mut("/error/message") {
        *m = json!(message);
    }
    response.body = body.to_string().into_bytes();
    response
}

/// Answers with a recorded fixture (see the module docs).
fn replay(request: &Request, dir: &std::path::Path, name: &str) -> Response {
    if name.split('/').any(|part| part == ".." || part.is_empty()) {
        return error(400, "x-mock-fixture must be a relative path inside the fixtures directory", "bad_fixture");
    }
    let bytes = match std::fs::read(dir.join(name)) {
        Ok(b) => b,
        Err(e) => return error(404, &format!("no fixture {name}: {e}"), "no_fixture"),
    };
    let file = name.rsplit('/').next().unwrap_or(name);
    let status = request
        .header("x-mock-status")
        .and_then(|s| s.parse().ok())
        .or_else(|| file.strip_prefix("error_").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok()))
        .unwrap_or(200);
    let mut extra_headers = vec![];
    if let Some(r) = request.header("x-mock-retry-after") {
        extra_headers.push(("retry-after", r.to_owned()));
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if file.ends_with(".sse") {
        // one write per event, each ending at its blank line (LF or CRLF framing)
        let mut chunks = vec![];
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let end = [rest.find("\r\n\r\n").map(|i| i + 4), rest.find("\n\n").map(|i| i + 2)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(rest.len());
            chunks.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
        return Response {
            status,
            content_type: "text/event-stream",
            body: vec![],
            chunks: Some(chunks),
            extra_headers,
            ..Default::default()
        };
    }
    if file.starts_with("stream_array_") {
        let chunks = text.split_inclusive("\n,").map(str::to_owned).collect();
        return Response {
            status,
            content_type: "application/json",
            body: vec![],
            chunks: Some(chunks),
            extra_headers,
            ..Default::default()
        };
    }
    Response { status, content_type: "application/json", body: bytes, extra_headers, ..Default::default() }
}

/// The test knobs a chat request carries (see the module docs).
struct Knobs {
    /// (prompt, completion) tokens to report; `None`: the defaults, and no usage chunk.
    usage: Option<(u64, u64)>,
    delay_ms: u64,
    reset_after: Option<usize>,
}

impl Knobs {
    fn of(request: &Request) -> Knobs {
        let usage = request.header("x-mock-usage").and_then(|v| {
            let (p, c) = v.split_once(',')?;
            Some((p.trim().parse().ok()?, c.trim().parse().ok()?))
        });
        Knobs {
            usage,
            delay_ms: request.header("x-mock-delay-ms").and_then(|v| v.trim().parse().ok()).unwrap_or(0),
            reset_after: request.header("x-mock-reset-after").and_then(|v| v.trim().parse().ok()),
        }
    }
}

fn usage_json((prompt, completion): (u64, u64)) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt.saturating_add(completion)})
}

fn model(req: &Value) -> String {
    req.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_owned()
}

fn completion(req: &Value, usage: Option<(u64, u64)>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model(req),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
        "usage": usage_json(usage.unwrap_or((9, 8)))
    })
}

/// A streamed chat completion as OpenAI sends it: with `stream_options.include_usage`, every
/// chunk carries `"usage": null` and a last chunk with no choices carries the usage (the
/// `x-mock-usage` numbers, else the defaults); without it, no usage at all.
fn stream_response(req: &Value, usage: Option<(u64, u64)>) -> Response {
    let model = model(req);
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for word in REPLY.split_inclusive(' ') {
        events.push(chunk(json!({"content": word}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": model, "choices": [], "usage": usage_json(usage.unwrap_or((9, 8)))}));
    }
    let mut chunks: Vec<String> = events.into_iter().map(|e| format!("data: {e}\n\n")).collect();
    chunks.push("data: [DONE]\n\n".to_owned());
    sse_response(chunks)
}

fn anthropic_message(req: &Value, usage: Option<(u64, u64)>) -> Value {
    let (input, output) = usage.unwrap_or((9, 8));
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model(req),
        "content": [{"type": "text", "text": REPLY}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output}
    })
}

fn anthropic_stream(req: &Value, usage: Option<(u64, u64)>) -> Response {
    let (input, output) = usage.unwrap_or((9, 8));
    let mut events = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
               "model": model(req), "content": [], "stop_reason": null, "stop_sequence": null,
               "usage": {"input_tokens": input, "output_tokens": 1}}}),
    )];
    events.push((
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    for word in REPLY.split_inclusive(' ') {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    events.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"input_tokens": input, "output_tokens": output}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    sse_response(events.into_iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect())
}

fn gemini_usage((prompt, candidates): (u64, u64)) -> Value {
    json!({"promptTokenCount": prompt, "candidatesTokenCount": candidates, "totalTokenCount": prompt + candidates})
}

fn gemini_answer(model: &str, usage: Option<(u64, u64)>) -> Value {
    json!({
        "candidates": [{"content": {"parts": [{"text": REPLY}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": gemini_usage(usage.unwrap_or((9, 8))),
        "modelVersion": model,
        "responseId": "mock-response"
    })
}

/// Gemini's stream: `data:` events with CRLF framing (`alt=sse`), else one streamed JSON array.
fn gemini_stream(model: &str, usage: Option<(u64, u64)>, sse: bool) -> Response {
    let words: Vec<&str> = REPLY.split_inclusive(' ').collect();
    let last = words.len() - 1;
    let events = words.iter().enumerate().map(|(i, word)| {
        let mut candidate = json!({"content": {"parts": [{"text": word}], "role": "model"}, "index": 0});
        let mut event = json!({"candidates": [], "modelVersion": model, "responseId": "mock-response"});
        if i == last {
            candidate["finishReason"] = json!("STOP");
            event["usageMetadata"] = gemini_usage(usage.unwrap_or((9, 8)));
        }
        event["candidates"] = json!([candidate]);
        event
    });
    if sse {
        return sse_response(events.map(|e| format!("data: {e}\r\n\r\n")).collect());
    }
    let mut chunks: Vec<String> =
        events.enumerate().map(|(i, e)| if i == 0 { format!("[{e}") } else { format!("\n,\r\n{e}") }).collect();
    chunks.push("]".to_owned());
    Response { status: 200, content_type: "application/json", chunks: Some(chunks), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_json_knobs_and_empty_is_healthy() {
        assert_eq!(Mode::from_json(b"{}").unwrap(), Mode::default());
        assert_eq!(Mode::from_json(b"").unwrap(), Mode::default());
        let mode = Mode::from_json(br#"{"fail_status": 429, "retry_after": 3, "fail_first": 2, "quota_remaining": 0}"#).unwrap();
        assert_eq!(mode.fail_status, Some(429));
        assert_eq!(mode.retry_after.as_deref(), Some("3"));
        assert_eq!(mode.quota_remaining, Some(0));
        assert_eq!(
            [mode.failure(0), mode.failure(1), mode.failure(2)],
            [Some(Failure::Status(429, Some("3".into()))), Some(Failure::Status(429, Some("3".into()))), None]
        );
        assert_eq!(Mode::from_json(br#"{"hang": true}"#).unwrap().failure(7), Some(Failure::Hang));
        assert_eq!(Mode::from_json(br#"{"reset_after": 2}"#).unwrap().failure(0), Some(Failure::ResetAfter(2)));
        assert_eq!(Mode::from_json(br#"{"fail_first": 1}"#).unwrap().failure(0), Some(Failure::Status(500, None)));
        assert_eq!(Mode::default().failure(0), None);
        assert_eq!(Mode::from_json(br#"{"fail": 1}"#).unwrap_err(), "unknown mode key \"fail\"");
        assert!(Mode::from_json(br#"{"fail_status": 70000}"#).is_err());
        assert!(Mode::from_json(b"[1]").is_err());
    }

    #[test]
    fn errors_speak_the_dialect_of_the_path() {
        let body = |r: Response| serde_json::from_slice::<Value>(&r.body).unwrap();
        let r = mode_error("/v1/chat/completions", 500, None);
        assert_eq!(body(r)["error"]["type"], "server_error");
        let r = mode_error("/v1/messages", 429, Some("5"));
        assert_eq!(r.extra_headers, vec![("retry-after", "5".to_owned())]);
        assert_eq!(body(r)["error"]["type"], "rate_limit_error");
        let r = mode_error("/v1beta/models/gemini-2.5-flash:generateContent", 503, None);
        assert_eq!(body(r)["error"], json!({"code": 503, "message": "The mock provider is set to fail with 503.", "status": "UNAVAILABLE"}));
    }

    #[test]
    fn an_openai_stream_carries_usage_exactly_when_asked_as_openai_does() {
        let chunks = |req: Value, usage| stream_response(&req, usage).chunks.unwrap();
        let asked = chunks(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}), None);
        let usage_chunk: Value = serde_json::from_str(asked[asked.len() - 2].trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!((usage_chunk["choices"].as_array().map(Vec::len), &usage_chunk["usage"]), (Some(0), &usage_json((9, 8))));
        let first: Value = serde_json::from_str(asked[0].trim().strip_prefix("data: ").unwrap()).unwrap();
        assert!(first.get("usage").is_some_and(Value::is_null), "usage: null on the other chunks");
        let numbers = chunks(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}), Some((30, 4)));
        assert!(numbers[numbers.len() - 2].contains(r#""prompt_tokens":30"#));
        for not_asked in [json!({"model": "m", "stream": true}), json!({"model": "m", "stream": true, "stream_options": {"include_usage": false}})] {
            let c = chunks(not_asked, Some((30, 4)));
            assert!(c.iter().all(|c| !c.contains("usage")), "{c:?}");
            assert_eq!(c.last().map(String::as_str), Some("data: [DONE]\n\n"));
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn quota_headers_per_dialect() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(quota_headers("/v1/chat/completions", 4, at).len(), 3);
        let h = quota_headers("/v1/messages", 0, at);
        assert!(h.contains(&("anthropic-ratelimit-requests-remaining", "0".to_owned())));
        assert!(h.contains(&("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:22Z".to_owned())));
    }

    #[test]
    fn native_answers_echo_the_model() {
        let req = json!({"model": "claude-x"});
        assert_eq!(anthropic_message(&req, Some((3, 4)))["usage"], json!({"input_tokens": 3, "output_tokens": 4}));
        let chunks = anthropic_stream(&req, None).chunks.unwrap();
        assert!(chunks[0].starts_with("event: message_start\ndata: "));
        assert!(chunks.last().unwrap().starts_with("event: message_stop\n"));
        assert_eq!(gemini_answer("gemini-x", None)["modelVersion"], "gemini-x");
        let chunks = gemini_stream("gemini-x", None, true).chunks.unwrap();
        assert!(chunks.iter().all(|c| c.starts_with("data: {") && c.ends_with("}\r\n\r\n")));
        assert!(chunks.last().unwrap().contains("usageMetadata") && !chunks[0].contains("usageMetadata"));
        let array: String = gemini_stream("gemini-x", None, false).chunks.unwrap().concat();
        assert_eq!(serde_json::from_str::<Value>(&array).unwrap().as_array().unwrap().len(), chunks.len());
    }
}
