//! A push decoder for one JSON array streamed over time: Gemini's `streamGenerateContent`
//! without `alt=sse`.
//!
//! Gemini then answers with a single array whose elements (each a `GenerateContentResponse`)
//! arrive one by one, pretty-printed and separated by `\n,\r\n`:
//!
//! ```text
//! [{
//!   "candidates": [ … ]
//! }
//! ,
//! {
//!   "candidates": [ … ],
//!   "usageMetadata": { … }
//! }
//! ]
//! ```
//!
//! [`JsonArrayDecoder`] yields each top-level element as soon as its last byte has arrived,
//! without waiting for the closing `]`. It finds element boundaries by tracking strings, escapes
//! and bracket nesting in one pass over each byte (bytes already scanned are never scanned
//! again, whatever the chunking), and parses each complete element once with `serde_json`.
//! Between tokens it accepts RFC 8259's insignificant whitespace:
//!
//! > Insignificant whitespace is allowed before or after any of the six structural characters.
//! > `ws = *( %x20 / %x09 / %x0A / %x0D )` ; Space, Horizontal tab, Line feed or New line,
//! > Carriage return
//!
//! Framing errors — a body that is not an array, bytes between elements other than whitespace
//! and one comma, a mismatched bracket, anything after the closing `]` — are reported once and
//! stop the decoder (the boundaries after them cannot be trusted). An element that is framed
//! correctly but is not valid JSON is reported as [`JsonArrayError::InvalidElement`] and decoding
//! goes on. Memory is bounded: an element longer than
//! [`JsonArrayDecoder::max_element_size`] is [`JsonArrayError::ElementTooLarge`], which stops
//! the decoder. [`JsonArrayDecoder::finish`] reports a body that ended before the closing `]`.

use std::collections::VecDeque;

use serde_json::Value;
use thiserror::Error;

/// Default bound on one element: 8 MiB (see [`JsonArrayDecoder::with_max_element_size`]).
pub const DEFAULT_MAX_ELEMENT_SIZE: usize = 8 * 1024 * 1024;

/// What went wrong with a streamed array. The provider's fault: it sent the body.
#[derive(Debug, Error)]
pub enum JsonArrayError {
    /// The first byte that is not whitespace is not `[` (for example an error object).
    #[error("response is not a JSON array: expected '[' at byte {offset}, found {}", show(.found))]
    NotAnArray {
        /// The byte's position in the body.
        offset: u64,
        /// The byte found instead.
        found: u8,
    },
    /// A byte that cannot come next: garbage between elements, a missing or extra comma, a
    /// mismatched closing bracket, or anything but whitespace after the closing `]`.
    #[error("malformed JSON array stream: expected {expected} at byte {offset}, found {}", show(.found))]
    Unexpected {
        /// The byte's position in the body.
        offset: u64,
        /// The byte found.
        found: u8,
        /// What could have come next, in words (`',' or ']' after an array element`).
        expected: &'static str,
    },
    /// Element `index` (0-based) grew past the limit before it ended.
    #[error("JSON array element {index} is larger than {limit} bytes")]
    ElementTooLarge {
        /// The element's position in the array.
        index: usize,
        /// The decoder's element size limit, in bytes.
        limit: usize,
    },
    /// Element `index` (0-based) is framed correctly but is not valid JSON.
    #[error("JSON array element {index} is not valid JSON: {source}")]
    InvalidElement {
        /// The element's position in the array.
        index: usize,
        /// Why `serde_json` refused it.
        #[source]
        source: serde_json::Error,
    },
    /// The body ended before the array's closing `]` (from [`JsonArrayDecoder::finish`]).
    #[error("JSON array stream truncated {context}, after {offset} bytes")]
    Truncated {
        /// Bytes received in all.
        offset: u64,
        /// Where the body ended, in words (`inside an array element`).
        context: &'static str,
    },
}

impl JsonArrayError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            JsonArrayError::NotAnArray { .. } => "json_array_not_an_array",
            JsonArrayError::Unexpected { .. } => "json_array_malformed",
            JsonArrayError::ElementTooLarge { .. } => "json_array_element_too_large",
            JsonArrayError::InvalidElement { .. } => "json_array_invalid_element",
            JsonArrayError::Truncated { .. } => "json_array_truncated",
        }
    }
}

fn show(byte: &u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(*byte))
    } else {
        format!("byte 0x{byte:02X}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[`.
    Start,
    /// After `[`: the first element or `]`.
    FirstOrEnd,
    /// After a comma: an element.
    AfterComma,
    /// After an element: `,` or `]`.
    AfterElement,
    /// Inside an element.
    Element,
    /// After the closing `]`: only whitespace.
    Done,
    /// A framing error was reported, or the stream was finished early: input is ignored.
    Failed,
}

/// Push decoder for one streamed JSON array.
///
/// ```
/// use tollgate_core::json_array::JsonArrayDecoder;
///
/// let mut decoder = JsonArrayDecoder::new();
/// decoder.feed(b"[{\"text\": \"a]\"}\n,\r\n{\"te");
/// assert_eq!(decoder.next().unwrap().unwrap()["text"], "a]"); // before the array ends
/// assert!(decoder.next().is_none()); // partial input is normal
/// decoder.feed(b"xt\": \"b\"}\n]");
/// assert_eq!(decoder.next().unwrap().unwrap()["text"], "b");
/// assert!(decoder.finish().is_ok());
/// ```
///
/// The [`Iterator`] is not fused: `None` means "feed more". Items wait in a queue until taken.
#[derive(Debug)]
pub struct JsonArrayDecoder {
    max_element_size: usize,
    state: State,
    /// Bytes fed so far (for error positions).
    offset: u64,
    /// The bytes of the current element that arrived in earlier chunks.
    element: Vec<u8>,
    /// The closing bracket expected for each container open inside the current element.
    /// Never longer than the element, so bounded by the element limit.
    open: Vec<u8>,
    in_string: bool,
    /// Inside a string, after a backslash.
    escaped: bool,
    /// The current element is a top-level number or literal (ends at a delimiter).
    scalar: bool,
    /// Elements started so far.
    elements: usize,
    out: VecDeque<Result<(usize, Vec<u8>), JsonArrayError>>,
}

impl Default for JsonArrayDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonArrayDecoder {
    /// A decoder with the default element size limit ([`DEFAULT_MAX_ELEMENT_SIZE`]).
    pub fn new() -> Self {
        Self::with_max_element_size(DEFAULT_MAX_ELEMENT_SIZE)
    }

    /// A decoder that buffers at most `max` bytes for one element.
    pub fn with_max_element_size(max: usize) -> Self {
        JsonArrayDecoder {
            max_element_size: max,
            state: State::Start,
            offset: 0,
            element: Vec::new(),
            open: Vec::new(),
            in_string: false,
            escaped: false,
            scalar: false,
            elements: 0,
            out: VecDeque::new(),
        }
    }

    /// The most bytes one element may take (see [`JsonArrayDecoder::with_max_element_size`]).
    pub fn max_element_size(&self) -> usize {
        self.max_element_size
    }

    /// The closing `]` has been read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// The next complete element's bytes, exactly as received (no surrounding whitespace),
    /// without parsing them: for deserialising into a typed struct or forwarding verbatim.
    /// Takes from the same queue as [`Iterator::next`].
    pub(crate) fn next_raw(&mut self) -> Option<Result<Vec<u8>, JsonArrayError>> {
        self.out.pop_front().map(|item| item.map(|(_, bytes)| bytes))
    }

    /// Decodes `input`, the next bytes of the body. Any split is fine, including an empty slice.
    pub fn feed(&mut self, input: &[u8]) {
        let base = self.offset;
        self.offset = self.offset.saturating_add(input.len() as u64);
        let at = |i: usize| base.saturating_add(i as u64);
        let mut i = 0;
        while i < input.len() {
            let byte = input[i];
            match self.state {
                State::Failed => return,
                State::Element => {
                    i = self.scan_element(input, i, i, base);
                    continue;
                }
                _ if is_ws(byte) => {}
                State::Start if byte == b'[' => self.state = State::FirstOrEnd,
                State::Start => {
                    return self.fail(JsonArrayError::NotAnArray { offset: at(i), found: byte });
                }
                State::FirstOrEnd if byte == b']' => self.state = State::Done,
                State::FirstOrEnd | State::AfterComma => {
                    let expected = match self.state {
                        State::FirstOrEnd => "an array element or ']'",
                        _ => "an array element",
                    };
                    match byte {
                        b'{' => self.open.push(b'}'),
                        b'[' => self.open.push(b']'),
                        b'"' => self.in_string = true,
                        b']' | b'}' | b',' | b':' => {
                            let error = JsonArrayError::Unexpected { offset: at(i), found: byte, expected };
                            return self.fail(error);
                        }
                        _ => self.scalar = true,
                    }
                    self.elements += 1;
                    self.state = State::Element;
                    i = self.scan_element(input, i, i + 1, base);
                    continue;
                }
                State::AfterElement => match byte {
                    b',' => self.state = State::AfterComma,
                    b']' => self.state = State::Done,
                    _ => {
                        let expected = "',' or ']' after an array element";
                        return self.fail(JsonArrayError::Unexpected {
                            offset: at(i),
                            found: byte,
                            expected,
                        });
                    }
                },
                State::Done => {
                    let expected = "nothing after the array's closing ']'";
                    return self.fail(JsonArrayError::Unexpected { offset: at(i), found: byte, expected });
                }
            }
            i += 1;
        }
    }

    /// Marks the end of the body: `Err(Truncated)` unless the closing `]` was read. A decoder
    /// that already reported a framing error returns `Ok` (the error was yielded once). Input
    /// fed afterwards is ignored.
    pub fn finish(&mut self) -> Result<(), JsonArrayError> {
        let context = match self.state {
            State::Done | State::Failed => return Ok(()),
            State::Start => "before the array's '['",
            State::FirstOrEnd | State::AfterComma | State::AfterElement => "between array elements",
            State::Element => "inside an array element",
        };
        self.state = State::Failed;
        self.element = Vec::new();
        self.open = Vec::new();
        Err(JsonArrayError::Truncated { offset: self.offset, context })
    }

    /// Scans the current element in `input[from..]`; its bytes in this chunk start at `start`.
    /// Returns where the caller goes on.
    fn scan_element(&mut self, input: &[u8], start: usize, from: usize, base: u64) -> usize {
        // The element may take `room` more bytes; at `limit` it is one byte too long. Scanning
        // stops there, so the error comes at the same byte whatever the chunking.
        let room = self.max_element_size.saturating_sub(self.element.len());
        let limit = start.saturating_add(room).saturating_add(1);
        let stop = limit.min(input.len());
        let mut j = from;
        let mut end = None;
        while j < stop {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    j += 1;
                    continue;
                }
                match input[j..stop].iter().position(|&b| b == b'"' || b == b'\\') {
                    None => j = stop,
                    Some(k) => {
                        j += k;
                        if input[j] == b'\\' {
                            self.escaped = true;
                        } else {
                            self.in_string = false;
                            if self.open.is_empty() {
                                end = Some(j + 1);
                                break;
                            }
                        }
                        j += 1;
                    }
                }
                continue;
            }
            let byte = input[j];
            if self.scalar {
                // A number or literal ends at whitespace or a structural character, which is
                // not part of it.
                if is_ws(byte) || matches!(byte, b',' | b']' | b'}' | b'[' | b'{' | b'"' | b':') {
                    end = Some(j);
                    break;
                }
            } else {
                match byte {
                    b'"' => self.in_string = true,
                    b'{' => self.open.push(b'}'),
                    b'[' => self.open.push(b']'),
                    b'}' | b']' => {
                        let expected = match self.open.pop() {
                            Some(close) if close == byte => None,
                            Some(b'}') => Some("'}' to close an object"),
                            _ => Some("']' to close an array"),
                        };
                        if let Some(expected) = expected {
                            let offset = base.saturating_add(j as u64);
                            self.fail(JsonArrayError::Unexpected { offset, found: byte, expected });
                            return input.len();
                        }
                        if self.open.is_empty() {
                            end = Some(j + 1);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            j += 1;
        }
        let index = self.elements - 1;
        let Some(end) = end else {
            if j >= limit {
                let limit = self.max_element_size;
                self.fail(JsonArrayError::ElementTooLarge { index, limit });
                return input.len();
            }
            self.element.extend_from_slice(&input[start..j]);
            return j;
        };
        if self.element.len() + (end - start) > self.max_element_size {
            let limit = self.max_element_size;
            self.fail(JsonArrayError::ElementTooLarge { index, limit });
            return input.len();
        }
        let bytes = if self.element.is_empty() {
            input[start..end].to_vec()
        } else {
            let mut bytes = std::mem::take(&mut self.element);
            bytes.extend_from_slice(&input[start..end]);
            bytes
        };
        self.out.push_back(Ok((index, bytes)));
        self.scalar = false;
        self.state = State::AfterElement;
        end
    }

    fn fail(&mut self, error: JsonArrayError) {
        self.out.push_back(Err(error));
        self.state = State::Failed;
        // Release what the failed element held.
        self.element = Vec::new();
        self.open = Vec::new();
    }
}

impl Iterator for JsonArrayDecoder {
    type Item = Result<Value, JsonArrayError>;

    /// The next complete element, parsed; or `None` until more input is fed.
    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.out.pop_front()? {
            Ok((index, bytes)) => serde_json::from_slice(&bytes)
                .map_err(|source| JsonArrayError::InvalidElement { index, source }),
            Err(error) => Err(error),
        })
    }
}

/// RFC 8259 `ws`.
fn is_ws(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Items as comparable strings (serde_json::Error has no PartialEq): `Ok` values are
    /// compared exactly, errors by their message.
    type Decoded = (Vec<Result<Value, String>>, Result<(), String>);

    fn decode_chunks<'a>(
        mut decoder: JsonArrayDecoder,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Decoded {
        let mut items = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk);
            items.extend(decoder.by_ref().map(|r| r.map_err(|e| e.to_string())));
        }
        let end = decoder.finish().map_err(|e| e.to_string());
        items.extend(decoder.by_ref().map(|r| r.map_err(|e| e.to_string())));
        (items, end)
    }

    fn one_shot(bytes: &[u8]) -> Decoded {
        decode_chunks(JsonArrayDecoder::new(), [bytes])
    }

    fn assert_split_invariant_with(max: usize, bytes: &[u8]) -> Decoded {
        let expected = decode_chunks(JsonArrayDecoder::with_max_element_size(max), [bytes]);
        let bytewise = decode_chunks(JsonArrayDecoder::with_max_element_size(max), bytes.chunks(1));
        assert_eq!(bytewise, expected, "byte by byte");
        for at in 0..=bytes.len() {
            let split = [&bytes[..at], &bytes[at..]];
            let got = decode_chunks(JsonArrayDecoder::with_max_element_size(max), split);
            assert_eq!(got, expected, "split at {at}");
        }
        expected
    }

    fn assert_split_invariant(bytes: &[u8]) -> Decoded {
        assert_split_invariant_with(DEFAULT_MAX_ELEMENT_SIZE, bytes)
    }

    /// The elements of a stream that must decode cleanly in any chunking.
    fn values(bytes: &[u8]) -> Vec<Value> {
        let (items, end) = assert_split_invariant(bytes);
        assert_eq!(end, Ok(()));
        items.into_iter().map(|r| r.expect("element")).collect()
    }

    /// The error messages of a stream, in any chunking.
    fn error(bytes: &[u8]) -> String {
        let (items, _) = assert_split_invariant(bytes);
        items.into_iter().find_map(Result::err).expect("an error")
    }

    #[test]
    fn yields_each_element_as_soon_as_it_is_complete() {
        let mut d = JsonArrayDecoder::new();
        d.feed(b"[{\"a\":1}");
        assert_eq!(d.next().unwrap().unwrap(), json!({"a": 1}));
        d.feed(b"\n,\r\n{\"b\":");
        assert!(d.next().is_none());
        d.feed(b"[2]}");
        assert_eq!(d.next().unwrap().unwrap(), json!({"b": [2]}));
        assert!(!d.is_complete());
        d.feed(b"\n]");
        assert!(d.is_complete());
        assert!(d.finish().is_ok());
    }

    #[test]
    fn gemini_pretty_printed_elements_separated_by_lf_comma_crlf() {
        let stream = b"[{\r\n  \"candidates\": [\n    {\"text\": \"Hi\"}\n  ]\n}\n,\r\n{\n  \"usageMetadata\": {\"totalTokenCount\": 3}\n}\n]";
        assert_eq!(
            values(stream),
            vec![json!({"candidates": [{"text": "Hi"}]}), json!({"usageMetadata": {"totalTokenCount": 3}})]
        );
    }

    #[test]
    fn whitespace_and_crlf_are_allowed_between_all_tokens() {
        assert_eq!(values(b" \r\n\t[ \r\n{}\r\n \t,\r\n[ ]\r\n\r\n] \r\n"), vec![json!({}), json!([])]);
    }

    #[test]
    fn empty_array_yields_nothing() {
        assert_eq!(values(b"[]"), Vec::<Value>::new());
        assert_eq!(values(b"[\r\n]\n"), Vec::<Value>::new());
    }

    #[test]
    fn brackets_quotes_and_escapes_inside_strings_do_not_end_an_element() {
        let stream = br#"[{"t":"}]\",{[\\"},{"u":"\\"},{"v":"\u005d\"]"}]"#;
        assert_eq!(values(stream), vec![json!({"t": "}]\",{[\\"}), json!({"u": "\\"}), json!({"v": "]\"]"})]);
    }

    #[test]
    fn multi_byte_utf8_split_between_chunks_decodes() {
        assert_eq!(values("[{\"t\":\"日本語 🦀\"}]".as_bytes()), vec![json!({"t": "日本語 🦀"})]);
    }

    #[test]
    fn any_json_value_can_be_an_element() {
        assert_eq!(
            values(br#"[1,-2.5e3 , "s,]" ,true,false,null,[1,[2,{"a":[]}]],{}]"#),
            vec![
                json!(1),
                json!(-2500.0),
                json!("s,]"),
                json!(true),
                json!(false),
                json!(null),
                json!([1, [2, {"a": []}]]),
                json!({})
            ]
        );
    }

    #[test]
    fn next_raw_returns_the_element_bytes_as_received() {
        let mut d = JsonArrayDecoder::new();
        d.feed(b"[ {\"a\" :\r\n 1}\n,\r\n7 ]");
        assert_eq!(d.next_raw().unwrap().unwrap(), b"{\"a\" :\r\n 1}");
        assert_eq!(d.next_raw().unwrap().unwrap(), b"7");
        assert!(d.next_raw().is_none());
    }

    #[test]
    fn body_that_is_not_an_array_is_an_error() {
        assert_eq!(
            error(b"{\"error\": {\"code\": 429}}"),
            "response is not a JSON array: expected '[' at byte 0, found '{'"
        );
        assert_eq!(
            error(b"\r\n data: {}"),
            "response is not a JSON array: expected '[' at byte 3, found 'd'"
        );
        assert_eq!(
            error(b"\xEF\xBB\xBF[]"),
            "response is not a JSON array: expected '[' at byte 0, found byte 0xEF"
        );
    }

    #[test]
    fn garbage_between_elements_is_an_error() {
        assert_eq!(
            error(b"[{} x {}]"),
            "malformed JSON array stream: expected ',' or ']' after an array element at byte 4, found 'x'"
        );
        assert_eq!(
            error(b"[{}{}]"),
            "malformed JSON array stream: expected ',' or ']' after an array element at byte 3, found '{'"
        );
        assert_eq!(
            error(b"[{},,{}]"),
            "malformed JSON array stream: expected an array element at byte 4, found ','"
        );
        assert_eq!(
            error(b"[,{}]"),
            "malformed JSON array stream: expected an array element or ']' at byte 1, found ','"
        );
    }

    #[test]
    fn trailing_comma_is_an_error() {
        assert_eq!(
            error(b"[{},\n]"),
            "malformed JSON array stream: expected an array element at byte 5, found ']'"
        );
    }

    #[test]
    fn anything_but_whitespace_after_the_closing_bracket_is_an_error() {
        assert_eq!(
            error(b"[{}]\r\n[{}]"),
            "malformed JSON array stream: expected nothing after the array's closing ']' at byte 6, found '['"
        );
    }

    #[test]
    fn mismatched_bracket_is_an_error() {
        assert_eq!(
            error(b"[{\"a\":[1}]"),
            "malformed JSON array stream: expected ']' to close an array at byte 8, found '}'"
        );
        assert_eq!(
            error(b"[{\"a\":1]]"),
            "malformed JSON array stream: expected '}' to close an object at byte 7, found ']'"
        );
    }

    #[test]
    fn invalid_element_is_reported_and_decoding_goes_on() {
        let (items, end) = assert_split_invariant(b"[{\"a\" 1},\n{\"b\":2}, tru]");
        assert_eq!(items.len(), 3);
        assert!(items[0].as_ref().unwrap_err().starts_with("JSON array element 0 is not valid JSON: "));
        assert_eq!(items[1], Ok(json!({"b": 2})));
        assert!(items[2].as_ref().unwrap_err().starts_with("JSON array element 2 is not valid JSON: "));
        assert_eq!(end, Ok(()));
    }

    #[test]
    fn framing_error_stops_the_decoder() {
        let mut d = JsonArrayDecoder::new();
        d.feed(b"[{} x");
        d.feed(b", {}]");
        assert_eq!(d.next().unwrap().unwrap(), json!({}));
        assert_eq!(d.next().unwrap().unwrap_err().kind(), "json_array_malformed");
        assert!(d.next().is_none());
        assert!(d.finish().is_ok());
    }

    #[test]
    fn stream_ending_before_the_closing_bracket_is_truncated() {
        let truncated = |bytes: &[u8]| assert_split_invariant(bytes).1.unwrap_err();
        assert_eq!(truncated(b""), "JSON array stream truncated before the array's '[', after 0 bytes");
        assert_eq!(truncated(b" \r\n"), "JSON array stream truncated before the array's '[', after 3 bytes");
        assert_eq!(
            truncated(b"[{}\n,\r\n"),
            "JSON array stream truncated between array elements, after 7 bytes"
        );
        assert_eq!(truncated(b"[{}\n"), "JSON array stream truncated between array elements, after 4 bytes");
        assert_eq!(truncated(b"["), "JSON array stream truncated between array elements, after 1 bytes");
        assert_eq!(
            truncated(b"[{\"a\": \"}"),
            "JSON array stream truncated inside an array element, after 9 bytes"
        );
        assert_eq!(truncated(b"[12"), "JSON array stream truncated inside an array element, after 3 bytes");
        // The elements that did complete were delivered.
        assert_eq!(one_shot(b"[{},{\"a\"").0, vec![Ok(json!({}))]);
    }

    #[test]
    fn element_larger_than_the_limit_is_an_error_at_the_same_byte_in_any_chunking() {
        let stream = b"[{\"a\":1},{\"b\":\"0123456789\"},{}]";
        let (items, end) = assert_split_invariant_with(10, stream);
        assert_eq!(
            items,
            vec![Ok(json!({"a": 1})), Err("JSON array element 1 is larger than 10 bytes".to_string())]
        );
        assert_eq!(end, Ok(()));
        // A mismatched bracket before the limit is reached is reported instead.
        let (items, _) = assert_split_invariant_with(10, b"[{\"b\":]\"0123456789\"}]");
        assert_eq!(
            items[0].as_ref().unwrap_err(),
            "malformed JSON array stream: expected '}' to close an object at byte 6, found ']'"
        );
    }

    #[test]
    fn element_exactly_at_the_limit_is_delivered() {
        assert_eq!(assert_split_invariant_with(7, b"[{\"a\":1}]").0, vec![Ok(json!({"a": 1}))]);
        assert_eq!(assert_split_invariant_with(7, b"[1234567]").0, vec![Ok(json!(1234567))]);
        assert_eq!(
            assert_split_invariant_with(6, b"[1234567]").0,
            vec![Err("JSON array element 0 is larger than 6 bytes".to_string())]
        );
        assert_eq!(
            assert_split_invariant_with(6, b"[{\"a\":1}]").0,
            vec![Err("JSON array element 0 is larger than 6 bytes".to_string())]
        );
    }

    #[test]
    fn oversized_element_is_never_buffered_whole() {
        let mut d = JsonArrayDecoder::with_max_element_size(1024);
        d.feed(b"[\"");
        for _ in 0..10_000 {
            d.feed(&[b'x'; 100]);
        }
        assert!(d.element.capacity() <= 2048);
        assert_eq!(d.next().unwrap().unwrap_err().kind(), "json_array_element_too_large");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut stream = b"[".to_vec();
        stream.extend(std::iter::repeat_n(b'[', 100_000));
        stream.extend(std::iter::repeat_n(b']', 100_000));
        stream.push(b']');
        let (items, end) = one_shot(&stream);
        assert_eq!(items.len(), 1);
        assert!(items[0].as_ref().unwrap_err().contains("recursion limit"), "{:?}", items[0]);
        assert_eq!(end, Ok(()));
    }

    #[test]
    fn error_kinds_are_metric_labels() {
        let kinds: Vec<_> = [
            JsonArrayError::NotAnArray { offset: 0, found: b'x' },
            JsonArrayError::Unexpected { offset: 0, found: b'x', expected: "" },
            JsonArrayError::ElementTooLarge { index: 0, limit: 0 },
            JsonArrayError::InvalidElement {
                index: 0,
                source: serde_json::from_str::<Value>("x").unwrap_err(),
            },
            JsonArrayError::Truncated { offset: 0, context: "" },
        ]
        .iter()
        .map(JsonArrayError::kind)
        .collect();
        assert_eq!(
            kinds,
            [
                "json_array_not_an_array",
                "json_array_malformed",
                "json_array_element_too_large",
                "json_array_invalid_element",
                "json_array_truncated"
            ]
        );
    }

    // ---- properties

    fn value() -> impl Strategy<Value = Value> {
        let text = || proptest::string::string_regex("[a-z \"\\\\\\[\\]{},:é日🦀\u{0}\r\n]{0,10}").unwrap();
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((text(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Serialises `elements` as one array, each element compact or pretty (with LF or CRLF),
    /// separated by one of several comma-with-whitespace forms.
    fn serialise(elements: &[Value], styles: &[u8]) -> Vec<u8> {
        const SEPARATORS: [&str; 5] = [",", "\n,\r\n", " , ", "\r\n,\r\n", "\t,\n"];
        let mut out = String::from(if styles[0].is_multiple_of(2) { "[" } else { " \r\n[\n" });
        for (i, element) in elements.iter().enumerate() {
            let style = styles[i % styles.len()];
            if i > 0 {
                out.push_str(SEPARATORS[usize::from(style) % SEPARATORS.len()]);
            }
            let text = match style % 3 {
                0 => serde_json::to_string(element).unwrap(),
                1 => serde_json::to_string_pretty(element).unwrap(),
                _ => serde_json::to_string_pretty(element).unwrap().replace('\n', "\r\n"),
            };
            out.push_str(&text);
        }
        out.push_str(if styles[0].is_multiple_of(3) { "]" } else { "\n]\r\n" });
        out.into_bytes()
    }

    fn chunked<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for cut in cuts {
            chunks.push(&bytes[from..cut]);
            from = cut;
        }
        chunks.push(&bytes[from..]);
        chunks
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_chunking_decodes_like_one_shot_and_round_trips(
            elements in proptest::collection::vec(value(), 0..6),
            styles in proptest::collection::vec(any::<u8>(), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes = serialise(&elements, &styles);
            let whole = one_shot(&bytes);
            let want: Vec<Result<Value, String>> = elements.into_iter().map(Ok).collect();
            prop_assert_eq!(&whole, &(want, Ok(())));
            prop_assert_eq!(&decode_chunks(JsonArrayDecoder::new(), chunked(&bytes, &cuts)), &whole);
            prop_assert_eq!(&decode_chunks(JsonArrayDecoder::new(), bytes.chunks(1)), &whole);
            for at in 0..=bytes.len() {
                let split = [&bytes[..at], &bytes[at..]];
                prop_assert_eq!(&decode_chunks(JsonArrayDecoder::new(), split), &whole, "split at {}", at);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_alike_in_any_chunking(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'['), Just(b']'), Just(b'{'), Just(b'}'), Just(b'"'), Just(b'\\'),
                            Just(b','), Just(b':'), Just(b' '), Just(b'\r'), Just(b'1'), any::<u8>()],
                0..200),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 0usize..64,
        ) {
            let run = |chunks: Vec<&[u8]>| decode_chunks(JsonArrayDecoder::with_max_element_size(max), chunks);
            let whole = run(vec![&bytes[..]]);
            prop_assert_eq!(&run(chunked(&bytes, &cuts)), &whole);
            prop_assert_eq!(&run(bytes.chunks(1).collect()), &whole);
        }
    }

    // ---- recorded provider traffic

    #[test]
    fn every_recorded_stream_array_fixture_decodes_in_any_chunking() {
        // `stream_array_<name>.json`, not its `.request.json` / `.headers.json` companions.
        let files = crate::sse::tests::fixture_files(|name| {
            name.starts_with("stream_array_")
                && name.strip_suffix(".json").is_some_and(|stem| !stem.contains('.'))
        });
        assert!(!files.is_empty(), "no stream_array_*.json fixtures found");
        let mut total = 0;
        for path in &files {
            let name = path.display();
            let bytes = std::fs::read(path).unwrap();
            let (items, end) = one_shot(&bytes);
            assert_eq!(end, Ok(()), "{name}");
            assert!(!items.is_empty(), "{name}: no elements");
            for item in &items {
                let value = item.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(value.is_object(), "{name}: element is not an object: {value}");
            }
            total += items.len();
            assert_eq!(
                decode_chunks(JsonArrayDecoder::new(), bytes.chunks(1)),
                (items.clone(), end.clone()),
                "{name}: byte by byte"
            );
            for at in 0..=bytes.len() {
                let split = [&bytes[..at], &bytes[at..]];
                assert_eq!(
                    decode_chunks(JsonArrayDecoder::new(), split),
                    (items.clone(), end.clone()),
                    "{name}: split at {at}"
                );
            }
        }
        eprintln!("{} JSON array fixtures, {total} elements", files.len());
    }
}
