//! `tollgate-mock-provider [--port P] [--require-key KEY]`
//!
//! An OpenAI-compatible provider for local runs and tests, listening on 127.0.0.1 only.
//! Prints `listening on http://127.0.0.1:PORT` as its first line of output (port 0, the
//! default, picks a free port). HTTP/1.1 with keep-alive, one thread per connection (request
//! heads parsed by `httparse`; bodies by Content-Length or chunked).
//!
//! - `POST /v1/chat/completions`: a fixed chat completion (SSE chunks, sent chunked, when
//!   `"stream": true`), echoing the requested model.
//! - `GET /__mock/requests`: `{"count": N}`, how many `/v1/` requests it has received, so tests
//!   can prove a denied request never reached the upstream.
//! - `GET /__mock/last-headers`: `{"names": [...]}`, the header names (never values) of the
//!   last `/v1/` request, so tests can prove which headers reached the provider.
//! - `GET /__mock/last-path`: `{"path": "...", "model": ...}`, the path with its query and the
//!   body's `model` (or null) of the last `/v1/` request, so tests can prove where a translated
//!   request went.
//! - `POST /__mock/webhook…` (any path under it): records the request's path and body (a
//!   webhook receiver for threshold events) and answers 200 `{}`.
//! - `GET /__mock/webhooks`: `{"count": N, "hooks": [{"path": "...", "body": "..."}]}`, every
//!   recorded webhook in arrival order.
//! - anything else: 404 in OpenAI's error format.
//!
//! Test knobs on `POST /v1/chat/completions` (request headers; without them nothing changes):
//! - `x-mock-usage: P,C`: report `P` prompt and `C` completion tokens (default 9 and 8); on a
//!   stream, a usage-only chunk (`"choices": []`) is sent before `data: [DONE]`.
//! - `x-mock-delay-ms: N`: a stream waits N ms before each event after the first.
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
use std::sync::Arc;

use serde_json::{json, Value};

const REPLY: &str = "Hello from the Tollgate mock provider.";
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

struct Shared {
    served: AtomicU64,
    fixtures: std::path::PathBuf,
    last_header_names: std::sync::Mutex<Vec<String>>,
    last_path: std::sync::Mutex<Value>,
    webhooks: std::sync::Mutex<Vec<Value>>,
    required_authorization: Option<String>,
}

fn main() {
    let mut port = 0u16;
    let mut required_authorization = None;
    let mut fixtures = std::env::var_os("TOLLGATE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("../shared/fixtures"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        let parsed = match arg.as_str() {
            "--port" => value.and_then(|v| v.parse().ok()).map(|v| port = v),
            "--require-key" => value.map(|v| required_authorization = Some(v)),
            "--fixtures" => value.map(|v| fixtures = std::path::PathBuf::from(v)),
            _ => None,
        };
        if parsed.is_none() {
            eprintln!("usage: tollgate-mock-provider [--port P] [--require-key KEY] [--fixtures DIR]");
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
        503 => "Service Unavailable",
        529 => "Overloaded",
        404 => "Not Found",
        _ => "Status",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\nconnection: {connection}\r\n",
        r.status, r.content_type
    );
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
    Response {
        status,
        content_type: "application/json",
        body: body.to_string().into_bytes(),
        chunks: None,
        extra_headers: vec![],
        delay_ms: 0,
        reset_after: None,
    }
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
        if let Some(key) = &shared.required_authorization {
            let bearer = format!("Bearer {key}");
            let ok = request.header("authorization") == Some(bearer.as_str())
                || request.header("x-api-key") == Some(key.as_str())
                || request.header("x-goog-api-key") == Some(key.as_str());
            if !ok {
                return error(401, "Incorrect API key provided.", "invalid_api_key");
            }
        }
        if let Some(fixture) = request.header("x-mock-fixture") {
            return replay(request, &shared.fixtures, fixture);
        }
    }
    match (request.method.as_str(), path) {
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
        ("POST", "/v1/chat/completions") => match serde_json::from_slice::<Value>(&request.body) {
            Ok(req) if req.get("stream") == Some(&Value::Bool(true)) => {
                let knobs = Knobs::of(request);
                let mut response = stream_response(&req, knobs.usage);
                response.delay_ms = knobs.delay_ms;
                response.reset_after = knobs.reset_after;
                response
            }
            Ok(req) => json_response(200, &completion(&req, Knobs::of(request).usage)),
            Err(e) => error(400, &format!("invalid JSON body: {e}"), "invalid_json"),
        },
        (_, p) => error(404, &format!("the mock provider has no route {p}"), "unknown_url"),
    }
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
            delay_ms: 0,
            reset_after: None,
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
            delay_ms: 0,
            reset_after: None,
        };
    }
    Response { status, content_type: "application/json", body: bytes, chunks: None, extra_headers, delay_ms: 0, reset_after: None }
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
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
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

fn stream_response(req: &Value, usage: Option<(u64, u64)>) -> Response {
    let model = model(req);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for word in REPLY.split_inclusive(' ') {
        events.push(chunk(json!({"content": word}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if let Some(usage) = usage {
        events.push(json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": model, "choices": [], "usage": usage_json(usage)}));
    }
    let mut chunks: Vec<String> = events.into_iter().map(|e| format!("data: {e}\n\n")).collect();
    chunks.push("data: [DONE]\n\n".to_owned());
    Response {
        status: 200,
        content_type: "text/event-stream",
        body: Vec::new(),
        chunks: Some(chunks),
        extra_headers: vec![],
        delay_ms: 0,
        reset_after: None,
    }
}
