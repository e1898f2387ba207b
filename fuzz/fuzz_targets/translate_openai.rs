//! The OpenAI-compatible pass-through exchange's response side on arbitrary provider answers: a
//! fixed valid request (tools; `n: 2` with mode bit 3), then the input as the chat completion /
//! error body or as the SSE stream. See `translate_common.rs` for the input layout and the
//! invariants (data payloads need only be JSON here: chunks pass through).
#![no_main]

mod translate_common;

use libfuzzer_sys::fuzz_target;
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::ProviderKind;

fuzz_target!(|data: &[u8]| {
    translate_common::fuzz(ProviderKind::OpenAi, data, |_| {
        Exchange::for_kind(ProviderKind::OpenAi, translate_common::meta())
    });
});
