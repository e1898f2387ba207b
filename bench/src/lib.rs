//! # tollgate-bench
//!
//! What translation costs, per request and per stream event, natively and under wasmtime. The
//! operations are defined once here and run by two drivers:
//! - natively, by the `bench-translation` binary (`src/bin/bench-translation.rs`);
//! - compiled to `wasm32-unknown-unknown` with the filter's `wasm` profile (this crate's cdylib),
//!   loaded by the same binary into wasmtime 48 (the guest exports [`guest`]'s `bench_*`
//!   functions and imports one clock, `tollgate_bench.now_ns`).
//!
//! Each [`Case`] is measured twice on the same input bytes: the translation ([`Mode::Translate`],
//! exactly the calls the filter makes) and a baseline ([`Mode::Baseline`]): a bare
//! `serde_json` parse into a `Value` and serialize back, of the whole body (requests,
//! responses) or of each stream event's `data` (streams, `[DONE]` excepted).
//!
//! What a timed iteration contains:
//! - request: `serde_json::from_slice::<ChatRequest>`, `Exchange::for_kind`, `Exchange::request`
//!   (the filter's `translation::translate` minus the route lookup);
//! - response: `Exchange::response(200, None, body)`, the exchange having translated the
//!   request beforehand, outside the clock;
//! - stream: the upstream stream fed to `Exchange::stream` one event per call (a new output
//!   buffer per call, as the filter does), then `Exchange::finish`; reported per input event
//!   (every event the SSE decoder yields, pings included), so `finish` is spread over them.
//!
//! Inputs: a 1 KB OpenAI chat request with a system prompt, a tool, a tool call and its result
//! (`inputs/chat_request_1k.json`), and recorded provider traffic from `../shared/fixtures`
//! (`$TOLLGATE_FIXTURES`), read by the driver and handed over as bytes.

use std::hint::black_box;

/// Admission and settlement with six limits, and the shared-data key space (`bench-limits`).
pub mod limits;
#[cfg(not(target_arch = "wasm32"))]
pub mod runner;

use tollgate_core::openai::{ChatRequest, StreamOptions};
use tollgate_core::sse::{SseDecoder, SseEvent};
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::{ProviderKind, ResponseMeta, Target};

/// The client request every case starts from.
pub const CHAT_REQUEST_1K: &[u8] = include_bytes!("../inputs/chat_request_1k.json");

/// What a case does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The client's request translated for a backend.
    Request(ProviderKind),
    /// A backend's non-stream answer translated back.
    Response(ProviderKind),
    /// A backend's stream translated back, chunk by chunk.
    Stream(ProviderKind),
}

/// Where a case's input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// [`CHAT_REQUEST_1K`].
    ChatRequest,
    /// A file under the shared fixtures directory.
    Fixture(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub name: &'static str,
    pub op: Op,
    pub input: Input,
}

impl Case {
    /// The unit a row reports: one request or response, or one input stream event.
    pub fn unit(&self) -> &'static str {
        match self.op {
            Op::Stream(_) => "event",
            _ => "op",
        }
    }
}

/// Every case, in table order. The index is the case's id across the wasm boundary.
pub const CASES: &[Case] = &[
    Case { name: "request → Anthropic", op: Op::Request(ProviderKind::Anthropic), input: Input::ChatRequest },
    Case { name: "request → Gemini", op: Op::Request(ProviderKind::Gemini), input: Input::ChatRequest },
    Case { name: "request → OpenAI-compatible", op: Op::Request(ProviderKind::OpenAi), input: Input::ChatRequest },
    Case {
        name: "response Anthropic → OpenAI",
        op: Op::Response(ProviderKind::Anthropic),
        input: Input::Fixture("anthropic/messages_nonstream_tool_use.json"),
    },
    Case {
        name: "response Gemini → OpenAI",
        op: Op::Response(ProviderKind::Gemini),
        input: Input::Fixture("gemini/generate_function_call.vercel.json"),
    },
    Case {
        name: "response OpenAI-compatible (pass-through)",
        op: Op::Response(ProviderKind::OpenAi),
        input: Input::Fixture("openai/chat_nonstream_tool_call.json"),
    },
    Case {
        name: "stream Anthropic → OpenAI chunks",
        op: Op::Stream(ProviderKind::Anthropic),
        input: Input::Fixture("anthropic/stream_text_tool_use.sse"),
    },
    Case {
        name: "stream Gemini alt=sse → OpenAI chunks",
        op: Op::Stream(ProviderKind::Gemini),
        input: Input::Fixture("gemini/stream_sse_text.sse"),
    },
    Case {
        name: "stream Gemini alt=sse (thinking) → OpenAI chunks",
        op: Op::Stream(ProviderKind::Gemini),
        input: Input::Fixture("gemini/stream_sse_thinking.sse"),
    },
    Case {
        name: "stream OpenAI-compatible (pass-through)",
        op: Op::Stream(ProviderKind::OpenAi),
        input: Input::Fixture("openai/chat_stream_include_usage_cached.sse"),
    },
];

/// The translation, or the `serde_json` baseline on the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Translate,
    Baseline,
}

impl Mode {
    pub fn from_u32(v: u32) -> Option<Mode> {
        match v {
            0 => Some(Mode::Translate),
            1 => Some(Mode::Baseline),
            _ => None,
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            Mode::Translate => 0,
            Mode::Baseline => 1,
        }
    }
}

/// A case made ready to time: inputs parsed and split outside the clock.
pub struct Prepared {
    work: Work,
    /// Units per iteration: 1, or the number of stream events.
    pub units: u64,
}

enum Work {
    Request { kind: ProviderKind, body: Vec<u8> },
    Response { kind: ProviderKind, req: ChatRequest, body: Vec<u8> },
    Stream { kind: ProviderKind, req: ChatRequest, chunks: Vec<Vec<u8>> },
    Baseline { docs: Vec<Vec<u8>> },
}

/// Exchanges built per clock reading for responses and streams (their setup is not timed).
const BATCH: u64 = 16;

fn target(kind: ProviderKind) -> Target {
    let upstream_model = match kind {
        ProviderKind::Anthropic => "claude-sonnet-4-5",
        ProviderKind::Gemini => "gemini-2.5-flash",
        ProviderKind::OpenAi => "gpt-4o",
    };
    Target { kind, upstream_model: upstream_model.to_owned(), default_max_tokens: Some(1024) }
}

fn meta(req: &ChatRequest) -> ResponseMeta {
    // The shape of the filter's ids (`translation::response_id`).
    ResponseMeta {
        id: "chatcmpl-tg4f1c9a0e7d2b3c5a81e0f9d2c".to_owned(),
        model: req.model.clone(),
        created: 1_700_000_000,
    }
}

fn chat_request(stream: bool) -> Result<ChatRequest, String> {
    let mut req: ChatRequest = serde_json::from_slice(CHAT_REQUEST_1K).map_err(|e| format!("chat request: {e}"))?;
    if stream {
        req.stream = Some(true);
        req.stream_options = Some(StreamOptions { include_usage: Some(true), extra: Default::default() });
    }
    Ok(req)
}

fn exchange(kind: ProviderKind, req: &ChatRequest) -> Result<Exchange, String> {
    let mut x = Exchange::for_kind(kind, meta(req));
    x.request(req, &target(kind)).map_err(|e| format!("request: {e}"))?;
    Ok(x)
}

/// The stream cut after every event (at each blank line), the way an event-at-a-time upstream
/// delivers it. Only the chunking: parsing is the decoder's.
pub fn split_events(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let (mut start, mut line_start, mut i) = (0, 0, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' || b == b'\r' {
            let end = if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') { i + 2 } else { i + 1 };
            if i == line_start {
                chunks.push(bytes[start..end].to_vec());
                start = end;
            }
            i = end;
            line_start = end;
        } else {
            i += 1;
        }
    }
    if start < bytes.len() {
        chunks.push(bytes[start..].to_vec());
    }
    chunks
}

/// Events the spec decoder yields for a whole stream, and the `data` of each message that is
/// JSON (the baseline's documents).
fn decode_events(bytes: &[u8]) -> Result<(u64, Vec<Vec<u8>>), String> {
    let mut d = SseDecoder::new();
    d.feed(bytes);
    d.finish().map_err(|e| format!("stream fixture: {e}"))?;
    let mut n = 0;
    let mut docs = Vec::new();
    for e in d {
        n += 1;
        if let SseEvent::Message(m) = e.map_err(|e| format!("stream fixture: {e}"))? {
            if serde_json::from_str::<serde_json::Value>(&m.data).is_ok() {
                docs.push(m.data.into_bytes());
            }
        }
    }
    Ok((n, docs))
}

/// Prepares `case` in `mode` on `input` (the file's bytes; ignored for [`Input::ChatRequest`])
/// and checks once, untimed, that the operation succeeds and says what it produced.
pub fn prepare(case: &Case, mode: Mode, input: &[u8]) -> Result<(Prepared, String), String> {
    let input = match case.input {
        Input::ChatRequest => CHAT_REQUEST_1K,
        Input::Fixture(_) => input,
    };
    let (work, units) = match (mode, case.op) {
        (Mode::Translate, Op::Request(kind)) => (Work::Request { kind, body: input.to_vec() }, 1),
        (Mode::Translate, Op::Response(kind)) => {
            (Work::Response { kind, req: chat_request(false)?, body: input.to_vec() }, 1)
        }
        (Mode::Translate, Op::Stream(kind)) => {
            let (n, _) = decode_events(input)?;
            (Work::Stream { kind, req: chat_request(true)?, chunks: split_events(input) }, n)
        }
        (Mode::Baseline, Op::Stream(_)) => {
            let (n, docs) = decode_events(input)?;
            (Work::Baseline { docs }, n)
        }
        (Mode::Baseline, _) => (Work::Baseline { docs: vec![input.to_vec()] }, 1),
    };
    let p = Prepared { work, units };
    let said = p.check()?;
    Ok((p, said))
}

impl Prepared {
    /// One untimed run with its output checked.
    fn check(&self) -> Result<String, String> {
        match &self.work {
            Work::Request { kind, body } => {
                let req: ChatRequest = serde_json::from_slice(body).map_err(|e| format!("parse: {e}"))?;
                let mut x = Exchange::for_kind(*kind, meta(&req));
                let up = x.request(&req, &target(*kind)).map_err(|e| format!("request: {e}"))?;
                serde_json::from_slice::<serde_json::Value>(&up.body).map_err(|e| format!("upstream body: {e}"))?;
                Ok(format!("{} B → {} B to {}", body.len(), up.body.len(), up.path))
            }
            Work::Response { kind, req, body } => {
                let r = exchange(*kind, req)?.response(200, None, body);
                if r.status != 200 {
                    return Err(format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body)));
                }
                Ok(format!("{} B → {} B", body.len(), r.body.len()))
            }
            Work::Stream { kind, req, chunks } => {
                let mut x = exchange(*kind, req)?;
                let mut out = Vec::new();
                for c in chunks {
                    x.stream(c, &mut out);
                }
                x.finish(&mut out);
                if let Some(e) = x.stream_error() {
                    return Err(format!("stream error: {e}"));
                }
                if !out.ends_with(b"data: [DONE]\n\n") {
                    return Err(format!("no [DONE]: {}", String::from_utf8_lossy(&out)));
                }
                let n_out = out.windows(6).filter(|w| w == b"data: ").count();
                let n_in: usize = chunks.iter().map(Vec::len).sum();
                Ok(format!("{} events, {n_in} B → {n_out} events, {} B", self.units, out.len()))
            }
            Work::Baseline { docs } => {
                let mut n = 0;
                for d in docs {
                    let v: serde_json::Value = serde_json::from_slice(d).map_err(|e| format!("baseline: {e}"))?;
                    n += serde_json::to_vec(&v).map_err(|e| format!("baseline: {e}"))?.len();
                }
                Ok(format!("{} documents, {} B → {n} B", docs.len(), docs.iter().map(Vec::len).sum::<usize>()))
            }
        }
    }

    /// Runs `iters` iterations; returns the nanoseconds spent in the timed parts, read from
    /// `now` (a clock in nanoseconds; the runner passes thread CPU time). `Err` only if an operation that succeeded in
    /// [`prepare`]'s check fails now.
    pub fn run(&self, iters: u64, now: &dyn Fn() -> u64) -> Result<u64, String> {
        match &self.work {
            Work::Request { kind, body } => {
                let t = target(*kind);
                let start = now();
                timed(|| {
                    for _ in 0..iters {
                        let req: ChatRequest = serde_json::from_slice(black_box(body)).map_err(|e| e.to_string())?;
                        let mut x = Exchange::for_kind(*kind, meta(&req));
                        let up = x.request(&req, &t).map_err(|e| e.to_string())?;
                        black_box((&x, &up));
                    }
                    Ok::<_, String>(())
                })?;
                Ok(now() - start)
            }
            Work::Response { kind, req, body } => batched(iters, *kind, req, now, |x| {
                black_box(x.response(200, None, black_box(body)));
            }),
            Work::Stream { kind, req, chunks } => batched(iters, *kind, req, now, |x| {
                let mut last = Vec::new();
                for c in chunks {
                    let mut out = Vec::with_capacity(c.len() + 64);
                    x.stream(black_box(c), &mut out);
                    last = black_box(out);
                }
                x.finish(&mut last);
                black_box(last);
            }),
            Work::Baseline { docs } => {
                let start = now();
                timed(|| {
                    for _ in 0..iters {
                        for d in docs {
                            let v: serde_json::Value =
                                serde_json::from_slice(black_box(d)).map_err(|e| e.to_string())?;
                            black_box(serde_json::to_vec(&v).map_err(|e| e.to_string())?);
                        }
                    }
                    Ok::<_, String>(())
                })?;
                Ok(now() - start)
            }
        }
    }
}

/// The timed part of every run, and nothing else: a function of its own so that callgrind can
/// count exactly it (`--toggle-collect=tollgate_bench::timed*`), leaving out the untimed setup.
#[inline(never)]
pub fn timed<R>(f: impl FnOnce() -> R) -> R {
    black_box(f())
}

/// Times `f` on `iters` fresh exchanges (request already translated), built and dropped
/// [`BATCH`] at a time outside the clock.
fn batched(
    iters: u64,
    kind: ProviderKind,
    req: &ChatRequest,
    now: &dyn Fn() -> u64,
    mut f: impl FnMut(&mut Exchange),
) -> Result<u64, String> {
    let mut spent = 0;
    let mut done = 0;
    while done < iters {
        let n = BATCH.min(iters - done);
        let mut xs = (0..n).map(|_| exchange(kind, req)).collect::<Result<Vec<_>, _>>()?;
        let start = now();
        timed(|| {
            for x in &mut xs {
                f(x);
            }
        });
        spent += now() - start;
        drop(black_box(xs));
        done += n;
    }
    Ok(spent)
}

/// The wasm guest's exports. The host writes a case's input into memory it got from
/// `bench_alloc`, then calls `bench_run`, which prepares (untimed) and times `iters` iterations
/// with the host's clock.
#[cfg(target_arch = "wasm32")]
pub mod guest {
    use super::{prepare, Mode, CASES};

    #[link(wasm_import_module = "tollgate_bench")]
    extern "C" {
        /// A monotonic clock in nanoseconds, from the host.
        fn now_ns() -> u64;
    }

    /// `len` bytes the host may write into; never freed (a benchmark allocates a few inputs).
    #[no_mangle]
    pub extern "C" fn bench_alloc(len: u32) -> *mut u8 {
        let mut v = Vec::<u8>::with_capacity(len as usize);
        let p = v.as_mut_ptr();
        std::mem::forget(v);
        p
    }

    /// Nanoseconds for `iters` iterations of case `case` in mode `mode` (0 translate,
    /// 1 baseline), or a negative number: -1 bad arguments, -2 the untimed check failed, -3 an
    /// iteration failed.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be memory from `bench_alloc`, written by the host.
    #[no_mangle]
    pub unsafe extern "C" fn bench_run(case: u32, mode: u32, ptr: *const u8, len: u32, iters: u64) -> i64 {
        let (Some(case), Some(mode)) = (CASES.get(case as usize), Mode::from_u32(mode)) else {
            return -1;
        };
        let input = if len == 0 { &[][..] } else { std::slice::from_raw_parts(ptr, len as usize) };
        let Ok((p, _)) = prepare(case, mode, input) else {
            return -2;
        };
        match p.run(iters, &|| now_ns()) {
            Ok(ns) => ns as i64,
            Err(_) => -3,
        }
    }

    /// Units per iteration of a case (1, or its stream's event count), -1 if it cannot be
    /// prepared.
    ///
    /// # Safety
    /// As [`bench_run`].
    #[no_mangle]
    pub unsafe extern "C" fn bench_units(case: u32, mode: u32, ptr: *const u8, len: u32) -> i64 {
        let (Some(case), Some(mode)) = (CASES.get(case as usize), Mode::from_u32(mode)) else {
            return -1;
        };
        let input = if len == 0 { &[][..] } else { std::slice::from_raw_parts(ptr, len as usize) };
        match prepare(case, mode, input) {
            Ok((p, _)) => p.units as i64,
            Err(_) => -1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_at_blank_lines_whatever_the_line_ending() {
        let chunks = split_events(b"data: a\n\nevent: x\ndata: b\n\ndata: c\r\n\r\ndata: d\r\rtail");
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        assert_eq!(
            chunks,
            [&b"data: a\n\n"[..], b"event: x\ndata: b\n\n", b"data: c\r\n\r\n", b"data: d\r\r", b"tail"]
        );
    }
}
