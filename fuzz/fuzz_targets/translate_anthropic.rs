//! The OpenAI ⇄ Anthropic exchange's response side on arbitrary provider answers: a fixed valid
//! request (tools, or `response_format: json_object` with mode bit 3), then the input as the
//! Messages response / error body or as the SSE stream. See `translate_common.rs` for the input
//! layout and the invariants.
#![no_main]

mod translate_common;

use libfuzzer_sys::fuzz_target;
use tollgate_core::translate::exchange::Exchange;
use tollgate_core::translate::ProviderKind;

fuzz_target!(|data: &[u8]| {
    translate_common::fuzz(ProviderKind::Anthropic, data, |_| {
        Exchange::for_kind(ProviderKind::Anthropic, translate_common::meta())
    });
});
