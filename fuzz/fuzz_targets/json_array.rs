//! Arbitrary bytes into `JsonArrayDecoder`: it must never panic, and one-shot, byte-by-byte and
//! content-driven chunkings must yield the same items and end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::json_array::{JsonArrayDecoder, DEFAULT_MAX_ELEMENT_SIZE};

/// serde_json::Error has no PartialEq: errors are compared by message.
type Decoded = (Vec<Result<serde_json::Value, String>>, Result<(), String>);

fn decode<'a>(max: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Decoded {
    let mut decoder = JsonArrayDecoder::with_max_element_size(max);
    let mut items = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        items.extend(decoder.by_ref().map(|r| r.map_err(|e| e.to_string())));
    }
    let end = decoder.finish().map_err(|e| e.to_string());
    items.extend(decoder.by_ref().map(|r| r.map_err(|e| e.to_string())));
    (items, end)
}

/// Chunks whose sizes (0..=30, so also empty feeds) come from the input itself.
fn content_chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut rest = data;
    while let Some(&b) = rest.first() {
        let size = usize::from(b % 31);
        if size == 0 {
            chunks.extend([&rest[..0], &rest[..1]]);
            rest = &rest[1..];
        } else {
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
    }
    chunks
}

fuzz_target!(|data: &[u8]| {
    let small = data.last().map_or(0, |&b| usize::from(b % 128));
    for max in [DEFAULT_MAX_ELEMENT_SIZE, small] {
        let whole = decode(max, [data]);
        assert_eq!(decode(max, data.chunks(1)), whole, "byte by byte, max {max}");
        assert_eq!(decode(max, content_chunks(data)), whole, "content chunks, max {max}");
    }
});
