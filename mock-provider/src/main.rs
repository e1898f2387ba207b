//! `tollgate-mock-provider [--port P] [--threads N]`
//!
//! An OpenAI-compatible provider for local runs and tests, listening on 127.0.0.1 only.
//! Prints `listening on http://127.0.0.1:PORT` as its first line of output (port 0, the
//! default, picks a free port).
//!
//! - `POST /v1/chat/completions`: a fixed chat completion (SSE chunks when `"stream": true`),
//!   echoing the requested model.
//! - `GET /__mock/requests`: `{"count": N}`, how many `/v1/` requests it has served, so tests
//!   can prove a denied request never reached the upstream.
//! - anything else: 404 in OpenAI's error format.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

const REPLY: &str = "Hello from the Tollgate mock provider.";

fn main() {
    let mut port = 0u16;
    let mut threads = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        let parsed = match arg.as_str() {
            "--port" => value.and_then(|v| v.parse().ok()).map(|v| port = v),
            "--threads" => value.and_then(|v| v.parse().ok()).map(|v: usize| threads = v.max(1)),
            _ => None,
        };
        if parsed.is_none() {
            eprintln!("usage: tollgate-mock-provider [--port P] [--threads N]");
            std::process::exit(2);
        }
    }
    let server = match Server::http(("127.0.0.1", port)) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("mock provider: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let addr = server.server_addr().to_ip().map(|a| a.to_string()).unwrap_or_default();
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();

    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let server = Arc::clone(&server);
            let served = Arc::clone(&served);
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    handle(request, &served);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("content-type", "application/json"))
}

fn handle(mut request: Request, served: &AtomicU64) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let response = match (request.method(), path.as_str()) {
        (Method::Get, "/__mock/requests") => json_response(200, &json!({"count": served.load(Ordering::SeqCst)})),
        (Method::Post, "/v1/chat/completions") => {
            served.fetch_add(1, Ordering::SeqCst);
            let mut body = Vec::new();
            let _ = request.as_reader().read_to_end(&mut body);
            match serde_json::from_slice::<Value>(&body) {
                Ok(req) if req.get("stream") == Some(&Value::Bool(true)) => stream_response(&req),
                Ok(req) => json_response(200, &completion(&req)),
                Err(e) => json_response(
                    400,
                    &json!({"error": {"message": format!("invalid JSON body: {e}"), "type": "invalid_request_error", "param": null, "code": null}}),
                ),
            }
        }
        (_, p) if p.starts_with("/v1/") => {
            served.fetch_add(1, Ordering::SeqCst);
            not_found(p)
        }
        (_, p) => not_found(p),
    };
    let _ = request.respond(response);
}

fn not_found(path: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    json_response(
        404,
        &json!({"error": {"message": format!("the mock provider has no route {path}"), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
    )
}

fn model(req: &Value) -> String {
    req.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_owned()
}

fn completion(req: &Value) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model(req),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}
    })
}

fn stream_response(req: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
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
    let mut body = String::new();
    for e in events {
        body.push_str(&format!("data: {e}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    Response::from_data(body.into_bytes()).with_header(header("content-type", "text/event-stream"))
}
