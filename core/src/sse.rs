//! Server-Sent Events: one spec-exact push decoder and a matching encoder.
//!
//! Every translator frames provider streams with [`SseDecoder`]; none splits on `"\n\n"` itself.
//! The decoder follows the WHATWG HTML Living Standard, §9.2.5 "Parsing an event stream" and
//! §9.2.6 "Interpreting an event stream"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html>). The rules it implements are
//! quoted on the items that implement them; in short:
//!
//! > Streams must be decoded using the UTF-8 decode algorithm. The UTF-8 decode algorithm strips
//! > one leading UTF-8 Byte Order Mark (BOM), if any.
//!
//! > The stream must then be parsed by reading everything line by line, with a U+000D CARRIAGE
//! > RETURN U+000A LINE FEED (CRLF) character pair, a single U+000A LINE FEED (LF) character not
//! > preceded by a U+000D CARRIAGE RETURN (CR) character, and a single U+000D CARRIAGE RETURN (CR)
//! > character not followed by a U+000A LINE FEED (LF) character being the ways in which a line
//! > can end.
//!
//! Push style (DESIGN.md principle 4): [`SseDecoder::feed`] takes whatever bytes arrived — a chunk
//! may end anywhere, inside a CRLF pair or inside a UTF-8 sequence — and the decoder yields the
//! same items whatever the chunking. Items come out of its [`Iterator`] implementation;
//! [`SseDecoder::finish`] marks the end of the body and says whether it ended inside an event.
//!
//! What this module adds to the spec, because a gateway (not a browser) is the user agent:
//! * Comments are not silently ignored but yielded as [`SseEvent::Comment`], so translators can
//!   see or forward keep-alives such as OpenRouter's `: OPENROUTER PROCESSING`.
//! * Memory is bounded: an event larger than [`SseDecoder::max_event_size`] yields
//!   [`SseError::EventTooLarge`] once and is discarded up to the next blank line.
//! * The end of the stream is observable: [`SseDecoder::finish`] returns [`Truncated`] when bytes
//!   after the last complete event were discarded (the spec discards them silently).
//!
//! Cost: each input byte is scanned for line ends once; bytes of a complete line inside one chunk
//! are processed in place, and only the unterminated tail of a chunk is copied (into a buffer
//! whose capacity is reused). Data is decoded as UTF-8 once, when its line is complete. A
//! dispatched message costs one allocation for its data (plus one for a non-empty event type and
//! one for an id).

use std::borrow::Cow;
use std::collections::VecDeque;

use thiserror::Error;

/// Default bound on one event: 8 MiB (see [`SseDecoder::with_max_event_size`]).
pub const DEFAULT_MAX_EVENT_SIZE: usize = 8 * 1024 * 1024;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Data buffers that grew beyond this are released after dispatch instead of being kept for the
/// next event, so one large event does not pin its memory for the rest of a long stream.
const KEEP_CAPACITY: usize = 64 * 1024;

/// One item of a decoded event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// A dispatched event (the spec's `MessageEvent`).
    Message(SseMessage),
    /// A comment line, yielded as soon as its line is complete.
    ///
    /// > If the line starts with a U+003A COLON character (:) — Ignore the line.
    ///
    /// The spec ignores comments; a gateway may need to forward them. The text is what follows
    /// the colon with one leading U+0020 SPACE removed (the same rule as for field values), so
    /// `: OPENROUTER PROCESSING` yields `"OPENROUTER PROCESSING"` and
    /// [`encode_comment`] writes it back byte for byte.
    Comment(String),
}

/// A dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseMessage {
    /// The event type buffer; `None` when it was empty, which the spec dispatches as `message`:
    ///
    /// > If the event type buffer has a value other than the empty string, change the type of
    /// > the newly created event to equal the value of the event type buffer.
    pub event: Option<String>,
    /// The data buffer, its lines joined with U+000A LINE FEED (never `\r`), without the final LF:
    ///
    /// > If the field name is "data" — Append the field value to the data buffer, then append a
    /// > single U+000A LINE FEED (LF) character to the data buffer.
    ///
    /// > If the data buffer's last character is a U+000A LINE FEED (LF) character, then remove
    /// > the last character from the data buffer.
    pub data: String,
    /// The value of an `id` field given in *this* event's block (`Some("")` for a bare `id`,
    /// which resets the last event ID); `None` when the block had no (valid) `id` field. The
    /// spec's `lastEventId` — which persists across events — is [`SseDecoder::last_event_id`].
    pub id: Option<String>,
}

impl SseMessage {
    /// The event's type as the spec dispatches it: the `event` field, or `"message"`.
    pub fn event_type(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// Appends this event in wire form to `out` (see [`write_event`]).
    pub fn encode_into(&self, out: &mut String) {
        write_event(out, self.event.as_deref(), &self.data, self.id.as_deref());
    }
}

/// An event the decoder could not deliver. The provider's fault: it sent it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SseError {
    /// The event's buffered bytes (its data and event type so far plus the line being read)
    /// exceeded the limit. Nothing of it is dispatched; decoding resumes after the next blank
    /// line.
    #[error("server-sent event larger than {limit} bytes: discarded up to the next blank line")]
    EventTooLarge {
        /// The decoder's event size limit, in bytes.
        limit: usize,
    },
}

impl SseError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SseError::EventTooLarge { .. } => "sse_event_too_large",
        }
    }
}

/// The stream ended inside an event: [`SseDecoder::finish`] discarded it.
///
/// > Once the end of the file is reached, any pending data must be discarded. (If the file ends
/// > in the middle of an event, before the final empty line, the incomplete event is not
/// > dispatched.)
///
/// Comment lines and blank lines are never pending; an unterminated line, and every field line
/// after the last blank line, are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("event stream truncated: {discarded} bytes after the last complete event were discarded")]
pub struct Truncated {
    /// Bytes of the discarded lines, line ends not counted.
    pub discarded: usize,
}

impl Truncated {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        "sse_truncated"
    }
}

/// Where the decoder is in the optional leading byte order mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bom {
    /// At the start of the stream, `n` bytes of `EF BB BF` seen (and held back) so far.
    Checking(u8),
    /// Past it (stripped, or the stream did not start with one).
    Done,
}

/// Push decoder for a `text/event-stream` body.
///
/// ```
/// use tollgate_core::sse::{SseDecoder, SseEvent};
///
/// let mut decoder = SseDecoder::new();
/// decoder.feed(b"event: ping\r\ndata: {\"a\":");
/// assert!(decoder.next().is_none()); // partial input is normal
/// decoder.feed(b"1}\r\n\r\n: keep-alive\n");
/// let Some(Ok(SseEvent::Message(message))) = decoder.next() else { panic!() };
/// assert_eq!((message.event_type(), message.data.as_str()), ("ping", "{\"a\":1}"));
/// assert_eq!(decoder.next(), Some(Ok(SseEvent::Comment("keep-alive".into()))));
/// assert_eq!(decoder.finish(), Ok(()));
/// ```
///
/// The [`Iterator`] is not fused: `None` means "feed more". Items wait in a queue until taken,
/// so the queue holds at most what was fed.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    max_event_size: usize,
    bom: Bom,
    /// The last byte fed was a CR that ended a line: an LF at the start of the next chunk is the
    /// second half of that CRLF, not a line of its own.
    after_cr: bool,
    /// The unterminated line carried over from earlier chunks.
    line: Vec<u8>,
    /// Discarding an oversized event until the next blank line.
    skipping: bool,
    /// While skipping: the current line has bytes (so its end is not a blank line).
    skip_line_has_bytes: bool,
    /// The data buffer, without the spec's trailing LF (tracked by `has_data`).
    data: String,
    /// At least one `data` field since the last dispatch (the spec's "data buffer is not empty").
    has_data: bool,
    /// The event type buffer.
    event_type: String,
    /// The last event ID buffer (kept across events, as the spec says).
    last_event_id: String,
    /// The current block set the last event ID buffer.
    block_has_id: bool,
    /// Bytes of field lines since the last blank line (what `finish` would discard).
    block_bytes: usize,
    /// The stream's reconnection time, from the last valid `retry` field.
    retry: Option<u64>,
    out: VecDeque<Result<SseEvent, SseError>>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the default event size limit ([`DEFAULT_MAX_EVENT_SIZE`]).
    pub fn new() -> Self {
        Self::with_max_event_size(DEFAULT_MAX_EVENT_SIZE)
    }

    /// A decoder that buffers at most `max` bytes for one event: the data and event type
    /// collected so far plus the line being read (a comment line counts as a line).
    pub fn with_max_event_size(max: usize) -> Self {
        SseDecoder {
            max_event_size: max,
            bom: Bom::Checking(0),
            after_cr: false,
            line: Vec::new(),
            skipping: false,
            skip_line_has_bytes: false,
            data: String::new(),
            has_data: false,
            event_type: String::new(),
            last_event_id: String::new(),
            block_has_id: false,
            block_bytes: 0,
            retry: None,
            out: VecDeque::new(),
        }
    }

    /// The most bytes one event may take (see [`SseDecoder::with_max_event_size`]).
    pub fn max_event_size(&self) -> usize {
        self.max_event_size
    }

    /// The spec's last event ID buffer after everything fed so far: set by every `id` field
    /// without U+0000 NULL, and never reset by dispatch.
    ///
    /// > If the field name is "id" — If the field value does not contain U+0000 NULL, then set
    /// > the last event ID buffer to the field value. Otherwise, ignore the field.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection time (milliseconds) from the last valid `retry` field, if any.
    ///
    /// > If the field name is "retry" — If the field value consists of only ASCII digits, then
    /// > interpret the field value as an integer in base ten, and set the event stream's
    /// > reconnection time to that integer. Otherwise, ignore the field.
    ///
    /// An empty value and a value too large for a `u64` are ignored.
    pub fn reconnection_time(&self) -> Option<u64> {
        self.retry
    }

    /// Decodes `input`, the next bytes of the body. Any split is fine, including an empty slice.
    pub fn feed(&mut self, mut input: &[u8]) {
        // "The UTF-8 decode algorithm strips one leading UTF-8 Byte Order Mark (BOM), if any."
        // The BOM may itself arrive split, so a matching prefix is held back until decided.
        if let Bom::Checking(seen) = self.bom {
            let mut seen = usize::from(seen);
            loop {
                if seen == BOM.len() {
                    self.bom = Bom::Done;
                    break;
                }
                match input.first() {
                    None => {
                        self.bom = Bom::Checking(seen as u8);
                        return;
                    }
                    Some(&b) if b == BOM[seen] => {
                        seen += 1;
                        input = &input[1..];
                    }
                    Some(_) => {
                        // Not a BOM: the held-back bytes are ordinary input.
                        self.bom = Bom::Done;
                        self.scan(&BOM[..seen]);
                        break;
                    }
                }
            }
        }
        self.scan(input);
    }

    /// Marks the end of the body. Per the spec the event being read, if any, is discarded; this
    /// reports it as [`Truncated`] so a translator can tell a cut-off stream from a complete one.
    ///
    /// Items already decoded stay available. Afterwards the decoder starts a new stream (as after
    /// a reconnection): the last event ID and reconnection time are kept, everything else resets.
    pub fn finish(&mut self) -> Result<(), Truncated> {
        let held_bom = match self.bom {
            Bom::Checking(n) => usize::from(n),
            Bom::Done => 0,
        };
        let discarded = held_bom + self.line.len() + self.block_bytes;
        self.bom = Bom::Checking(0);
        self.after_cr = false;
        self.line.clear();
        self.skipping = false;
        self.skip_line_has_bytes = false;
        self.reset_event();
        self.block_bytes = 0;
        if discarded == 0 {
            Ok(())
        } else {
            Err(Truncated { discarded })
        }
    }

    /// Splits `input` into lines: CRLF, LF and CR each end one line, also when a CRLF pair is
    /// split between two chunks.
    fn scan(&mut self, mut input: &[u8]) {
        if self.after_cr {
            match input.first() {
                None => return,
                Some(&b'\n') => input = &input[1..],
                Some(_) => {}
            }
            self.after_cr = false;
        }
        while !input.is_empty() {
            let Some(end) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.partial_line(input);
                return;
            };
            self.line_end(&input[..end]);
            let skip = if input[end] == b'\n' {
                1
            } else {
                match input.get(end + 1) {
                    Some(&b'\n') => 2,
                    Some(_) => 1,
                    None => {
                        self.after_cr = true;
                        1
                    }
                }
            };
            input = &input[end + skip..];
        }
    }

    /// Bytes held for the open event besides the line being read.
    fn buffered(&self) -> usize {
        self.data.len() + self.event_type.len()
    }

    /// The start or middle of a line whose end has not arrived yet.
    fn partial_line(&mut self, bytes: &[u8]) {
        if self.skipping {
            self.skip_line_has_bytes = true;
            self.block_bytes = self.block_bytes.saturating_add(bytes.len());
            return;
        }
        if self.line.len() + bytes.len() + self.buffered() > self.max_event_size {
            self.block_bytes = self.block_bytes.saturating_add(self.line.len() + bytes.len());
            self.too_large();
            self.skip_line_has_bytes = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// A line end; `tail` is the part of the line in the current chunk.
    fn line_end(&mut self, tail: &[u8]) {
        if self.skipping {
            let has_bytes = self.skip_line_has_bytes || !tail.is_empty();
            self.skip_line_has_bytes = false;
            if has_bytes {
                self.block_bytes = self.block_bytes.saturating_add(tail.len());
            } else {
                // The blank line that ends the oversized event.
                self.skipping = false;
                self.block_bytes = 0;
            }
            return;
        }
        // Checked again on the whole line, so the outcome does not depend on the chunking.
        // (A blank line never trips it: data and event type alone stay within the limit.)
        if self.line.len() + tail.len() + self.buffered() > self.max_event_size {
            self.block_bytes = self.block_bytes.saturating_add(self.line.len() + tail.len());
            self.too_large();
            return;
        }
        if self.line.is_empty() {
            self.process_line(tail);
        } else {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(tail);
            self.process_line(&line);
            line.clear();
            self.line = line;
        }
    }

    fn too_large(&mut self) {
        self.out.push_back(Err(SseError::EventTooLarge { limit: self.max_event_size }));
        self.line.clear();
        self.reset_event();
        self.skipping = true;
        self.skip_line_has_bytes = false;
    }

    /// One complete line, without its line end.
    fn process_line(&mut self, line: &[u8]) {
        // "If the line is empty (a blank line) — Dispatch the event, as defined below."
        let Some((&first, _)) = line.split_first() else {
            self.dispatch();
            return;
        };
        // "If the line starts with a U+003A COLON character (:) — Ignore the line."
        // (Yielded as a comment instead; see `SseEvent::Comment`.)
        if first == b':' {
            let text = strip_space(&line[1..]);
            self.out.push_back(Ok(SseEvent::Comment(utf8(text).into_owned())));
            return;
        }
        self.block_bytes = self.block_bytes.saturating_add(line.len());
        // "If the line contains a U+003A COLON character (:) — Collect the characters on the line
        // before the first U+003A COLON character (:), and let field be that string. Collect the
        // characters on the line after the first U+003A COLON character (:), and let value be
        // that string. If value starts with a U+0020 SPACE character, remove it from value."
        // "Otherwise, the string is not empty but does not contain a U+003A COLON character (:)
        // — Process the field using the steps described below, using the whole line as the
        // field name, and the empty string as the field value."
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => (&line[..colon], strip_space(&line[colon + 1..])),
            None => (line, &[][..]),
        };
        // "Field names must be compared literally, with no case folding performed."
        // Names are compared as bytes: ':', CR and LF are ASCII, so splitting before decoding
        // gives what decoding the whole stream first would (invalid sequences never swallow an
        // ASCII byte), and a name with U+FFFD in it matches none of these anyway.
        match name {
            b"event" => {
                // "Set the event type buffer to the field value."
                self.event_type.clear();
                self.event_type.push_str(&utf8(value));
            }
            b"data" => {
                // "Append the field value to the data buffer, then append a single U+000A LINE
                // FEED (LF) character to the data buffer." The LF is added lazily, before the
                // next value, which is the same once dispatch removes the last one.
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&utf8(value));
                self.has_data = true;
            }
            // "If the field value does not contain U+0000 NULL, then set the last event ID
            // buffer to the field value. Otherwise, ignore the field."
            b"id" if !value.contains(&0) => {
                self.last_event_id.clear();
                self.last_event_id.push_str(&utf8(value));
                self.block_has_id = true;
            }
            // "If the field value consists of only ASCII digits, then interpret the field value
            // as an integer in base ten, and set the event stream's reconnection time to that
            // integer. Otherwise, ignore the field." (Empty, or too large for u64: ignored.)
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                    self.retry = Some(ms);
                }
            }
            // "Otherwise — The field is ignored."
            _ => {}
        }
    }

    /// "Dispatch the event": a blank line.
    fn dispatch(&mut self) {
        self.block_bytes = 0;
        // "If the data buffer is an empty string, set the data buffer and the event type buffer
        // to the empty string and return."
        if !self.has_data {
            self.reset_event();
            return;
        }
        // Cloning gives the message an exactly-sized string and keeps the buffer's capacity.
        let message = SseMessage {
            event: (!self.event_type.is_empty()).then(|| self.event_type.clone()),
            data: self.data.clone(),
            id: self.block_has_id.then(|| self.last_event_id.clone()),
        };
        // "Set the data buffer and the event type buffer to the empty string."
        self.reset_event();
        self.out.push_back(Ok(SseEvent::Message(message)));
    }

    fn reset_event(&mut self) {
        self.data.clear();
        if self.data.capacity() > KEEP_CAPACITY {
            self.data.shrink_to(KEEP_CAPACITY);
        }
        self.has_data = false;
        self.event_type.clear();
        self.block_has_id = false;
    }
}

impl Iterator for SseDecoder {
    type Item = Result<SseEvent, SseError>;

    /// The next decoded item, or `None` until more input is fed.
    fn next(&mut self) -> Option<Self::Item> {
        self.out.pop_front()
    }
}

fn strip_space(value: &[u8]) -> &[u8] {
    value.strip_prefix(b" ").unwrap_or(value)
}

/// The Encoding Standard's UTF-8 decode (without BOM sniffing, done once per stream): invalid
/// sequences become U+FFFD, each maximal subpart once, which is what `from_utf8_lossy` does.
fn utf8(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// One event in wire form: `event: {event}\n`, `data: {line}\n` for each line of `data`, then a
/// blank line. `data` is split at CRLF, LF and CR (each one line end, as the decoder reads them),
/// so it decodes back to `data` with line ends normalised to LF; an empty `data` is one empty
/// `data:` line, which still dispatches (with empty data).
///
/// ```
/// assert_eq!(
///     tollgate_core::sse::encode_event(Some("delta"), "a\nb"),
///     "event: delta\ndata: a\ndata: b\n\n"
/// );
/// ```
pub fn encode_event(event: Option<&str>, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + event.map_or(0, str::len) + 16);
    write_event(&mut out, event, data, None);
    out
}

/// Appends one event to `out` (see [`encode_event`]), with an `id` field when `id` is given.
/// `None` or an empty `event` writes no `event` field (the type is then `message`). Line breaks
/// cannot be represented inside an event type or id and are removed from them.
pub fn write_event(out: &mut String, event: Option<&str>, data: &str, id: Option<&str>) {
    if let Some(event) = event.filter(|e| !e.is_empty()) {
        out.push_str("event: ");
        push_one_line(out, event);
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str("id: ");
        push_one_line(out, id);
        out.push('\n');
    }
    for line in Lines(Some(data)) {
        if line.is_empty() {
            out.push_str("data:\n");
        } else {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
}

/// A comment in wire form, `: {text}\n` (`:\n` when empty), one comment line per line of
/// `text`. The decoder yields each as [`SseEvent::Comment`] with exactly that line's text.
/// A comment dispatches nothing and does not end an event.
pub fn encode_comment(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    write_comment(&mut out, text);
    out
}

/// Appends a comment to `out` (see [`encode_comment`]).
pub fn write_comment(out: &mut String, text: &str) {
    for line in Lines(Some(text)) {
        if line.is_empty() {
            out.push_str(":\n");
        } else {
            out.push_str(": ");
            out.push_str(line);
            out.push('\n');
        }
    }
}

fn push_one_line(out: &mut String, s: &str) {
    if s.contains(['\r', '\n']) {
        out.extend(s.chars().filter(|c| !matches!(c, '\r' | '\n')));
    } else {
        out.push_str(s);
    }
}

/// Lines of a string split at CRLF, LF and CR; `""` is one empty line, and a trailing line end
/// is followed by an empty line (so joining with LF gives the string back, normalised).
struct Lines<'a>(Option<&'a str>);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.0?;
        // A byte search: `str::find` with a char set decodes every character.
        match s.bytes().position(|b| b == b'\r' || b == b'\n') {
            None => {
                self.0 = None;
                Some(s)
            }
            Some(end) => {
                let skip = if s[end..].starts_with("\r\n") { 2 } else { 1 };
                self.0 = Some(&s[end + skip..]);
                Some(&s[..end])
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};

    fn decode_chunks<'a>(
        decoder: &mut SseDecoder,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<Result<SseEvent, SseError>>, Result<(), Truncated>) {
        let mut items = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk);
            items.extend(decoder.by_ref());
        }
        let end = decoder.finish();
        items.extend(decoder.by_ref());
        (items, end)
    }

    type Decoded = (Vec<Result<SseEvent, SseError>>, Result<(), Truncated>);

    fn one_shot(bytes: &[u8]) -> Decoded {
        decode_chunks(&mut SseDecoder::new(), [bytes])
    }

    fn byte_by_byte(bytes: &[u8]) -> Decoded {
        decode_chunks(&mut SseDecoder::new(), bytes.chunks(1))
    }

    fn split_at(bytes: &[u8], at: usize) -> Decoded {
        decode_chunks(&mut SseDecoder::new(), [&bytes[..at], &bytes[at..]])
    }

    /// Asserts every chunking this test can think of decodes like the one-shot feed.
    fn assert_split_invariant(bytes: &[u8]) -> Decoded {
        let expected = one_shot(bytes);
        assert_eq!(byte_by_byte(bytes), expected, "byte by byte");
        for at in 0..=bytes.len() {
            assert_eq!(split_at(bytes, at), expected, "split at {at}");
        }
        expected
    }

    fn msg(event: Option<&str>, data: &str, id: Option<&str>) -> Result<SseEvent, SseError> {
        Ok(SseEvent::Message(SseMessage {
            event: event.map(String::from),
            data: data.to_string(),
            id: id.map(String::from),
        }))
    }

    fn data(d: &str) -> Result<SseEvent, SseError> {
        msg(None, d, None)
    }

    fn comment(c: &str) -> Result<SseEvent, SseError> {
        Ok(SseEvent::Comment(c.to_string()))
    }

    fn events(bytes: &[u8]) -> Vec<Result<SseEvent, SseError>> {
        let (items, end) = assert_split_invariant(bytes);
        assert_eq!(end, Ok(()), "stream should end cleanly");
        items
    }

    #[test]
    fn lf_crlf_and_cr_each_end_a_line() {
        let want = vec![data("a\nb"), data("c")];
        assert_eq!(events(b"data: a\ndata: b\n\ndata: c\n\n"), want);
        assert_eq!(events(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"), want);
        assert_eq!(events(b"data: a\rdata: b\r\rdata: c\r\r"), want);
        assert_eq!(events(b"data: a\rdata: b\r\n\ndata: c\n\r"), want);
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        // With the CRLF as one line end there is no blank line, so no event yet.
        let mut d = SseDecoder::new();
        d.feed(b"data: a\r");
        d.feed(b"\ndata: b\r");
        d.feed(b"\n");
        assert_eq!(d.next(), None);
        d.feed(b"\r");
        d.feed(b"");
        d.feed(b"\n");
        assert_eq!(d.collect::<Vec<_>>(), vec![data("a\nb")]);
    }

    #[test]
    fn cr_at_chunk_end_followed_by_other_byte_ends_the_line() {
        let (items, end) = decode_chunks(&mut SseDecoder::new(), [&b"data: a\r"[..], b"\r"]);
        assert_eq!((items, end), (vec![data("a")], Ok(())));
    }

    #[test]
    fn lone_lf_after_cr_crlf_is_a_blank_line() {
        // CR LF is one line end; the next LF is a second one (a blank line).
        assert_eq!(events(b"data: x\r\n\n"), vec![data("x")]);
        // LF CR: two line ends.
        assert_eq!(events(b"data: x\n\r"), vec![data("x")]);
    }

    #[test]
    fn leading_bom_is_stripped_even_when_split() {
        let stream = b"\xEF\xBB\xBFdata: x\n\n";
        assert_eq!(events(stream), vec![data("x")]);
        // Without stripping, the first field name would be "\u{FEFF}data" and nothing dispatches.
    }

    #[test]
    fn only_one_leading_bom_is_stripped() {
        let stream = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n";
        assert_eq!(events(stream), vec![data("y")]);
    }

    #[test]
    fn bom_after_the_start_is_content() {
        assert_eq!(events(b"data: \xEF\xBB\xBFx\n\n"), vec![data("\u{FEFF}x")]);
    }

    #[test]
    fn partial_bom_prefix_is_ordinary_input() {
        // EF BB then 'x': not a BOM; the held-back bytes are an invalid sequence in the name.
        assert_eq!(events(b"\xEF\xBBx\n\ndata: y\n\n"), vec![data("y")]);
        assert_eq!(events(b"\xEF\xBB:c\n\n"), vec![]); // a field line, not a comment
        assert_eq!(events(b":\xEF\xBB\n"), vec![comment("\u{FFFD}")]);
        assert_eq!(one_shot(b"\xEF\xBB").1, Err(Truncated { discarded: 2 }));
    }

    #[test]
    fn comment_lines_are_yielded_with_one_leading_space_removed() {
        assert_eq!(
            events(b": OPENROUTER PROCESSING\n\n:\n:x\n:  two\n"),
            vec![comment("OPENROUTER PROCESSING"), comment(""), comment("x"), comment(" two")]
        );
    }

    #[test]
    fn comment_inside_an_event_does_not_end_it() {
        assert_eq!(events(b"data: a\n: ping\ndata: b\n\n"), vec![comment("ping"), data("a\nb")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        // The spec's example.
        assert_eq!(events(b"data: YHOO\ndata: +2\ndata: 10\n\n"), vec![data("YHOO\n+2\n10")]);
    }

    #[test]
    fn one_leading_space_is_removed_from_a_value() {
        // "The following stream fires two identical events"
        assert_eq!(events(b"data:test\n\ndata: test\n\n"), vec![data("test"), data("test")]);
        assert_eq!(events(b"data:  two\n\n"), vec![data(" two")]);
        assert_eq!(events(b"data:\ttab\n\n"), vec![data("\ttab")]);
    }

    #[test]
    fn value_keeps_everything_after_the_first_colon() {
        assert_eq!(events(b"data: a: b:c\n\n"), vec![data("a: b:c")]);
    }

    #[test]
    fn field_without_colon_has_an_empty_value() {
        // The spec's example: "The following stream fires two events".
        let (items, end) = assert_split_invariant(b"data\n\ndata\ndata\n\ndata:");
        assert_eq!(items, vec![data(""), data("\n")]);
        assert_eq!(end, Err(Truncated { discarded: 5 }));
    }

    #[test]
    fn spec_example_with_four_blocks() {
        let stream =
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n";
        assert_eq!(
            events(stream),
            vec![
                comment("test stream"),
                msg(None, "first event", Some("1")),
                msg(None, "second event", Some("")),
                data(" third event"),
            ]
        );
    }

    #[test]
    fn event_without_data_dispatches_nothing_and_resets_the_type() {
        assert_eq!(events(b"event: x\n\ndata: y\n\n"), vec![data("y")]);
        assert_eq!(events(b"event: x\nid: 3\n\n"), vec![]);
    }

    #[test]
    fn empty_data_field_dispatches_an_event_with_empty_data() {
        assert_eq!(events(b"data:\n\n"), vec![data("")]);
        assert_eq!(events(b"data: \n\n"), vec![data("")]);
    }

    #[test]
    fn event_type_applies_to_one_event_only() {
        assert_eq!(
            events(b"event: delta\ndata: 1\n\ndata: 2\n\n"),
            vec![msg(Some("delta"), "1", None), data("2")]
        );
        let Some(Ok(SseEvent::Message(m))) = events(b"data: 2\n\n").pop() else { panic!() };
        assert_eq!(m.event_type(), "message");
    }

    #[test]
    fn last_event_of_several_event_fields_wins() {
        assert_eq!(events(b"event: a\nevent: b\ndata: x\n\n"), vec![msg(Some("b"), "x", None)]);
        // An empty event field empties the buffer: the type is "message" again.
        assert_eq!(events(b"event: a\nevent\ndata: x\n\n"), vec![data("x")]);
    }

    #[test]
    fn id_containing_nul_is_ignored() {
        let mut d = SseDecoder::new();
        d.feed(b"id: 7\ndata: a\n\nid: x\0y\ndata: b\n\n");
        assert_eq!(d.by_ref().collect::<Vec<_>>(), vec![msg(None, "a", Some("7")), data("b")]);
        assert_eq!(d.last_event_id(), "7");
    }

    #[test]
    fn last_event_id_persists_across_events_and_finish() {
        let mut d = SseDecoder::new();
        d.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\n");
        assert_eq!(d.by_ref().collect::<Vec<_>>(), vec![msg(None, "a", Some("1")), data("b")]);
        assert_eq!(d.last_event_id(), "2");
        assert_eq!(d.finish(), Err(Truncated { discarded: 5 }));
        assert_eq!(d.last_event_id(), "2");
    }

    #[test]
    fn retry_accepts_only_ascii_digits() {
        let retry = |s: &[u8]| {
            let mut d = SseDecoder::new();
            d.feed(s);
            d.reconnection_time()
        };
        assert_eq!(retry(b"retry: 3000\n"), Some(3000));
        assert_eq!(retry(b"retry:0\n"), Some(0));
        assert_eq!(retry(b"retry: 30s\n"), None);
        assert_eq!(retry(b"retry: -1\n"), None);
        assert_eq!(retry(b"retry:  1\n"), None);
        assert_eq!(retry(b"retry: 1.5\n"), None);
        assert_eq!(retry(b"retry:\n"), None);
        assert_eq!(retry(b"retry\n"), None);
        assert_eq!(retry(b"retry: 99999999999999999999999\n"), None);
        assert_eq!(retry(b"retry: 5\nretry: x\n"), Some(5));
        // retry alone dispatches nothing.
        assert_eq!(events(b"retry: 5\n\n"), vec![]);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_eq!(events(b"foo: bar\ndata: x\nobfuscation: y\n\n"), vec![data("x")]);
    }

    #[test]
    fn field_names_are_case_sensitive() {
        assert_eq!(events(b"Data: x\nDATA: y\n\n"), vec![]);
        assert_eq!(events(b"data : x\n\n"), vec![]);
    }

    #[test]
    fn utf8_sequence_split_between_chunks_decodes() {
        let stream = "event: é\ndata: 日本語 🦀\n\n".as_bytes();
        assert_eq!(events(stream), vec![msg(Some("é"), "日本語 🦀", None)]);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_character() {
        assert_eq!(events(b"data: a\xFFb\n\n"), vec![data("a\u{FFFD}b")]);
        // A truncated sequence before the line end: one U+FFFD, the line end is kept.
        assert_eq!(events(b"data: \xE2\x82\ndata: x\n\n"), vec![data("\u{FFFD}\nx")]);
        // Maximal subparts: F0 9F 80 then 'x' is one U+FFFD; a lone continuation byte another.
        assert_eq!(events(b"data: \xF0\x9F\x80x\x80\n\n"), vec![data("\u{FFFD}x\u{FFFD}")]);
        // Surrogates encoded in UTF-8 are invalid, one U+FFFD per byte.
        assert_eq!(events(b"data: \xED\xA0\x80\n\n"), vec![data("\u{FFFD}\u{FFFD}\u{FFFD}")]);
    }

    #[test]
    fn nul_in_data_is_kept() {
        assert_eq!(events(b"data: a\0b\n\n"), vec![data("a\0b")]);
    }

    #[test]
    fn end_of_stream_discards_incomplete_event_and_reports_truncated() {
        assert_eq!(one_shot(b"data: a\n\ndata: b\n"), (vec![data("a")], Err(Truncated { discarded: 7 })));
        assert_eq!(one_shot(b"data: a\n\ndata: b"), (vec![data("a")], Err(Truncated { discarded: 7 })));
        assert_eq!(one_shot(b"data: a\n\nev"), (vec![data("a")], Err(Truncated { discarded: 2 })));
        // A last line ended by CR alone is complete.
        assert_eq!(one_shot(b"data: a\r\r"), (vec![data("a")], Ok(())));
    }

    #[test]
    fn end_of_stream_after_comments_and_blank_lines_is_not_truncated() {
        assert_eq!(one_shot(b"data: a\n\n: bye\n\n\n"), (vec![data("a"), comment("bye")], Ok(())));
        assert_eq!(one_shot(b""), (vec![], Ok(())));
    }

    #[test]
    fn finish_starts_a_new_stream() {
        let mut d = SseDecoder::new();
        d.feed(b"data: partial");
        assert!(d.finish().is_err());
        d.feed(b"\xEF\xBB\xBFdata: fresh\n\n");
        assert_eq!(d.by_ref().collect::<Vec<_>>(), vec![data("fresh")]);
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn oversized_event_yields_one_error_and_decoding_resumes_after_blank_line() {
        let stream = b"data: 0123456789\ndata: 0123456789\ndata: more\n: hidden\n\ndata: ok\n\n";
        let (items, end) = decode_chunks(&mut SseDecoder::with_max_event_size(20), [&stream[..]]);
        assert_eq!(items, vec![Err(SseError::EventTooLarge { limit: 20 }), data("ok")]);
        assert_eq!(end, Ok(()));
        // Same outcome whatever the chunking.
        for at in 0..=stream.len() {
            let split = [&stream[..at], &stream[at..]];
            let got = decode_chunks(&mut SseDecoder::with_max_event_size(20), split);
            assert_eq!(got.0, items, "split at {at}");
        }
        let got = decode_chunks(&mut SseDecoder::with_max_event_size(20), stream.chunks(1));
        assert_eq!(got.0, items);
    }

    #[test]
    fn oversized_line_is_never_buffered_whole() {
        let mut d = SseDecoder::with_max_event_size(1024);
        d.feed(b"data: ");
        for _ in 0..10_000 {
            d.feed(&[b'x'; 100]);
        }
        assert!(d.line.capacity() <= 2048, "line buffer grew to {}", d.line.capacity());
        d.feed(b"\n\ndata: next\n\n");
        assert_eq!(
            d.by_ref().collect::<Vec<_>>(),
            vec![Err(SseError::EventTooLarge { limit: 1024 }), data("next")]
        );
    }

    #[test]
    fn event_exactly_at_the_size_limit_is_delivered() {
        // "data: " + 8 bytes = 14 byte line; limit 14 fits, 13 does not.
        let stream = b"data: 01234567\n\n";
        assert_eq!(
            decode_chunks(&mut SseDecoder::with_max_event_size(14), [&stream[..]]).0,
            vec![data("01234567")]
        );
        assert_eq!(
            decode_chunks(&mut SseDecoder::with_max_event_size(13), [&stream[..]]).0,
            vec![Err(SseError::EventTooLarge { limit: 13 })]
        );
    }

    #[test]
    fn oversized_comment_line_is_an_error() {
        let (items, _) = decode_chunks(&mut SseDecoder::with_max_event_size(4), [&b": 12345\n\n: ok\n"[..]]);
        assert_eq!(items, vec![Err(SseError::EventTooLarge { limit: 4 }), comment("ok")]);
    }

    #[test]
    fn truncated_inside_an_oversized_event_is_reported() {
        let (items, end) = decode_chunks(&mut SseDecoder::with_max_event_size(4), [&b"data: 12345\n"[..]]);
        assert_eq!(items, vec![Err(SseError::EventTooLarge { limit: 4 })]);
        assert_eq!(end, Err(Truncated { discarded: 11 }));
    }

    #[test]
    fn error_kinds_are_metric_labels() {
        assert_eq!(SseError::EventTooLarge { limit: 1 }.kind(), "sse_event_too_large");
        assert_eq!(Truncated { discarded: 1 }.kind(), "sse_truncated");
    }

    // ---- encoder

    #[test]
    fn encode_event_writes_event_and_one_data_line_per_line() {
        assert_eq!(encode_event(Some("message_start"), "{}"), "event: message_start\ndata: {}\n\n");
        assert_eq!(encode_event(None, "a\nb\r\nc\rd"), "data: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(encode_event(Some(""), ""), "data:\n\n");
        assert_eq!(encode_event(None, "a\n"), "data: a\ndata:\n\n");
        assert_eq!(encode_event(None, " lead"), "data:  lead\n\n");
    }

    #[test]
    fn encoded_event_decodes_to_the_same_event() {
        for (event, d) in
            [(Some("x"), "a\nb"), (None, ""), (None, "\n"), (Some(" sp"), "  two"), (None, "a\r\nb\rc")]
        {
            let want = data(&d.replace("\r\n", "\n").replace('\r', "\n"));
            let want = match want {
                Ok(SseEvent::Message(mut m)) => {
                    m.event = event.map(String::from);
                    Ok(SseEvent::Message(m))
                }
                other => other,
            };
            assert_eq!(events(encode_event(event, d).as_bytes()), vec![want]);
        }
    }

    #[test]
    fn write_event_with_id_and_line_breaks_removed_from_type_and_id() {
        let mut out = String::new();
        write_event(&mut out, Some("a\nb"), "x", Some("4\r2"));
        assert_eq!(out, "event: ab\nid: 42\ndata: x\n\n");
        let m = SseMessage { event: None, data: "d".into(), id: Some(String::new()) };
        let mut out = String::new();
        m.encode_into(&mut out);
        assert_eq!(out, "id: \ndata: d\n\n");
        assert_eq!(events(out.as_bytes()), vec![Ok(SseEvent::Message(m))]);
    }

    #[test]
    fn encode_comment_writes_one_comment_line_per_line() {
        assert_eq!(encode_comment("OPENROUTER PROCESSING"), ": OPENROUTER PROCESSING\n");
        assert_eq!(encode_comment(""), ":\n");
        assert_eq!(encode_comment("a\nb"), ": a\n: b\n");
        assert_eq!(events(encode_comment(" x").as_bytes()), vec![comment(" x")]);
    }

    // ---- properties

    #[derive(Debug, Clone)]
    enum Item {
        Message {
            event: Option<String>,
            data: String,
            id: Option<String>,
        },
        Comment(String),
        /// A block that dispatches nothing: an unknown field or a retry, then a blank line.
        Noise(String),
    }

    fn text(line_breaks: bool) -> impl Strategy<Value = String> {
        let chars = if line_breaks {
            "[a-z :é日🦀\u{0}\u{FEFF}\r\n]{0,12}"
        } else {
            "[a-z :é日🦀\u{0}\u{FEFF}]{0,12}"
        };
        proptest::string::string_regex(chars).unwrap()
    }

    fn item() -> impl Strategy<Value = Item> {
        let name = proptest::string::string_regex("[a-z_é]{1,8}").unwrap();
        let id = proptest::string::string_regex("[a-z0-9 é]{0,6}").unwrap();
        prop_oneof![
            4 => (proptest::option::of(name), text(true), proptest::option::of(id))
                .prop_map(|(event, data, id)| Item::Message { event, data, id }),
            1 => text(false).prop_map(Item::Comment),
            1 => prop_oneof![Just("retry: 15".to_string()), Just("x-unknown: v".to_string()), Just("retry: nope".to_string())]
                .prop_map(Item::Noise),
        ]
    }

    /// Serialises with a chosen line end per line (cycling through `ends`): 0 = LF, 1 = CRLF,
    /// 2 = CR. A CR line end followed by an empty line ended by LF would read as one CRLF, which
    /// is the encoder's mistake, not the decoder's, so that LF becomes a CR.
    fn serialise(items: &[Item], ends: &[u8], bom: bool) -> Vec<u8> {
        let mut lines: Vec<String> = Vec::new();
        for item in items {
            match item {
                Item::Message { event, data, id } => {
                    let mut s = String::new();
                    write_event(&mut s, event.as_deref(), data, id.as_deref());
                    lines.extend(s.split('\n').map(String::from));
                    lines.pop(); // after the final '\n'
                }
                Item::Comment(c) => lines.push(encode_comment(c).trim_end_matches('\n').to_string()),
                Item::Noise(n) => lines.extend([n.clone(), String::new()]),
            }
        }
        let mut out = Vec::new();
        if bom {
            out.extend_from_slice(&BOM);
        }
        let mut previous_cr = false;
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(line.as_bytes());
            let mut end = ends[i % ends.len()];
            if end == 0 && previous_cr && line.is_empty() {
                end = 2;
            }
            out.extend_from_slice(match end {
                0 => b"\n",
                1 => b"\r\n",
                _ => b"\r",
            });
            previous_cr = end == 2;
        }
        out
    }

    fn expected(items: &[Item]) -> Vec<Result<SseEvent, SseError>> {
        items
            .iter()
            .filter_map(|item| match item {
                Item::Message { event, data, id } => Some(msg(
                    event.as_deref(),
                    &data.replace("\r\n", "\n").replace('\r', "\n"),
                    id.as_deref(),
                )),
                Item::Comment(c) => Some(comment(c)),
                Item::Noise(_) => None,
            })
            .collect()
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
            items in proptest::collection::vec(item(), 0..8),
            ends in proptest::collection::vec(0u8..3, 1..6),
            bom in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes = serialise(&items, &ends, bom);
            let whole = one_shot(&bytes);
            prop_assert_eq!(&whole.0, &expected(&items));
            prop_assert_eq!(whole.1, Ok(()));
            prop_assert_eq!(&decode_chunks(&mut SseDecoder::new(), chunked(&bytes, &cuts)), &whole);
            prop_assert_eq!(&byte_by_byte(&bytes), &whole);
            for at in 0..=bytes.len() {
                prop_assert_eq!(&split_at(&bytes, at), &whole, "split at {}", at);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_alike_in_any_chunking(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), Just(0xEF), Just(0xBB), Just(0xBF),
                            Just(b'd'), Just(b'a'), Just(b't'), any::<u8>()],
                0..200),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 0usize..64,
        ) {
            let run = |chunks: Vec<&[u8]>| decode_chunks(&mut SseDecoder::with_max_event_size(max), chunks);
            let whole = run(vec![&bytes[..]]);
            prop_assert_eq!(&run(chunked(&bytes, &cuts)), &whole);
            prop_assert_eq!(&run(bytes.chunks(1).collect()), &whole);
        }
    }

    // ---- recorded provider traffic

    /// Every file under the fixtures directory whose name satisfies `wanted`, sorted.
    pub(crate) fn fixture_files(wanted: impl Fn(&str) -> bool) -> Vec<PathBuf> {
        fn walk(dir: &Path, wanted: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
            let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for entry in entries {
                let path = entry.expect("directory entry").path();
                if path.is_dir() {
                    walk(&path, wanted, out);
                } else if path.file_name().and_then(|n| n.to_str()).is_some_and(wanted) {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(&crate::test_support::fixtures_dir(), &wanted, &mut files);
        files.sort();
        files
    }

    /// Checks one recorded stream; returns its number of events.
    fn check_sse_fixture(path: &Path) -> usize {
        let name = path.display();
        let bytes = std::fs::read(path).unwrap();
        let (items, end) = one_shot(&bytes);
        assert_eq!(end, Ok(()), "{name}: truncated");
        let mut messages = 0;
        for item in &items {
            match item {
                Ok(SseEvent::Message(m)) => {
                    messages += 1;
                    if m.data != "[DONE]" {
                        if let Err(e) = serde_json::from_str::<serde_json::Value>(&m.data) {
                            panic!("{name}: data is not JSON ({e}): {:?}", m.data);
                        }
                    }
                }
                Ok(SseEvent::Comment(_)) => {}
                Err(e) => panic!("{name}: {e}"),
            }
        }
        assert!(messages > 0, "{name}: no events");
        let whole = (items, end);
        assert_eq!(byte_by_byte(&bytes), whole, "{name}: byte by byte");
        for at in 0..=bytes.len() {
            assert_eq!(split_at(&bytes, at), whole, "{name}: split at {at}");
        }
        messages
    }

    #[test]
    fn every_recorded_sse_fixture_decodes_in_any_chunking() {
        let files = fixture_files(|name| name.ends_with(".sse"));
        assert!(!files.is_empty(), "no *.sse fixtures found");
        // Every split of every file is quadratic work: spread the files over the cores.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len());
        let total: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let files = &files;
                    scope.spawn(move || {
                        files.iter().skip(w).step_by(workers).map(|f| check_sse_fixture(f)).sum::<usize>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a fixture failed")).sum()
        });
        eprintln!("{} SSE fixtures, {total} events", files.len());
    }
}
