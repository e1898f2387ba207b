//! Arbitrary bytes into `SseDecoder`: it must never panic; one-shot, byte-by-byte and
//! content-driven chunkings must yield the same items and end; and re-encoding the decoded items
//! (`encode_into` / `write_comment`) must decode to the same items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::sse::{write_comment, SseDecoder, SseError, SseEvent, Truncated, DEFAULT_MAX_EVENT_SIZE};

type Decoded = (Vec<Result<SseEvent, SseError>>, Result<(), Truncated>);

fn decode<'a>(max: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Decoded {
    let mut decoder = SseDecoder::with_max_event_size(max);
    let mut items = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        items.extend(decoder.by_ref());
    }
    let end = decoder.finish();
    items.extend(decoder.by_ref());
    (items, end)
}

/// Chunks whose sizes (0..=30, so also empty feeds) come from the input itself, so the fuzzer
/// steers the boundaries as it mutates.
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
    for max in [DEFAULT_MAX_EVENT_SIZE, small] {
        let whole = decode(max, [data]);
        assert_eq!(decode(max, data.chunks(1)), whole, "byte by byte, max {max}");
        assert_eq!(decode(max, content_chunks(data)), whole, "content chunks, max {max}");
        if max == DEFAULT_MAX_EVENT_SIZE {
            let mut encoded = String::new();
            let mut expected = Vec::new();
            for item in whole.0 {
                match &item {
                    Ok(SseEvent::Message(m)) => m.encode_into(&mut encoded),
                    Ok(SseEvent::Comment(c)) => write_comment(&mut encoded, c),
                    Err(_) => continue,
                }
                expected.push(item);
            }
            assert_eq!(decode(max, [encoded.as_bytes()]), (expected, Ok(())), "re-encoded: {encoded:?}");
        }
    }
});
