//! The OpenAI ⇄ Gemini exchange's response side on arbitrary provider answers: a fixed valid
//! request (tools; `n: 2` with mode bit 3), then the input as the `generateContent` response /
//! error body or as the stream. See `translate_common.rs` for the input layout and the
//! invariants.
//!
//! Mode bit 4 reads the stream as Gemini's JSON array (`streamGenerateContent` without
//! `alt=sse`). The pair itself always asks for `alt=sse`, so that framing is reached through a
//! thin wrapper around the same pair whose request path drops `?alt=sse`; the exchange then
//! picks the array decoder exactly as it would for such a path.
#![no_main]

mod translate_common;

use libfuzzer_sys::fuzz_target;
use tollgate_core::openai::{ChatCompletion, ChatRequest};
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::openai_gemini::OpenAiGemini;
use tollgate_core::fault::ApiError;
use tollgate_core::translate::{Pair, ProviderKind, ResponseMeta, StreamOut, Target, UpstreamRequest};
use tollgate_core::usage::Usage;

/// `OpenAiGemini` with the array stream's path.
struct ArrayStream(OpenAiGemini);

impl Pair for ArrayStream {
    fn request(&mut self, req: &ChatRequest, target: &Target) -> Result<UpstreamRequest, ApiError> {
        let mut up = self.0.request(req, target)?;
        up.path = up.path.replace("?alt=sse", "");
        Ok(up)
    }
    fn response(&mut self, body: &[u8]) -> Result<ChatCompletion, ApiError> {
        self.0.response(body)
    }
    fn error(&mut self, status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
        self.0.error(status, retry_after, body)
    }
    fn event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        self.0.event(event, data, out)
    }
    fn end(&mut self, out: &mut Vec<StreamOut>) -> Result<(), ApiError> {
        self.0.end(out)
    }
    fn usage(&self) -> Usage {
        self.0.usage()
    }
    fn stream_identity(&self) -> Option<ResponseMeta> {
        self.0.stream_identity()
    }
}

fuzz_target!(|data: &[u8]| {
    translate_common::fuzz(ProviderKind::Gemini, data, |mode| {
        let meta = translate_common::meta();
        if mode.extra() {
            Exchange::new(Box::new(ArrayStream(OpenAiGemini::new(meta.clone()))), meta)
        } else {
            Exchange::for_kind(ProviderKind::Gemini, meta)
        }
    });
});
