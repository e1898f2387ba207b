//! The HTTP side of the host: what a test sends, what the upstream sees and answers, and what the
//! client finally gets.

/// A header map as the host keeps it: keys lower-cased (Envoy's `Http::LowerCaseString`, applied
/// to every key a guest passes in `source/extensions/common/wasm/context.cc`), values as raw
/// bytes, order and duplicates preserved.
pub type HeaderList = Vec<(String, Vec<u8>)>;

pub(crate) fn lower(key: &[u8]) -> String {
    String::from_utf8_lossy(key).to_ascii_lowercase()
}

/// A downstream request. Build it with [`HttpRequest::post`] / [`HttpRequest::get`] and the
/// builder methods; header names are lower-cased when the stream starts.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// Includes the pseudo-headers `:method`, `:path`, `:authority`, `:scheme`.
    pub headers: HeaderList,
    /// Body chunks as they arrive; each is one `proxy_on_request_body` call, the last with
    /// `end_of_stream`.
    pub body: Vec<Vec<u8>>,
    /// The `source.address` property (`ip:port`); `None` makes the property NotFound.
    pub source_address: Option<String>,
    /// The `destination.address` property.
    pub destination_address: Option<String>,
}

impl HttpRequest {
    pub fn new(method: &str, path: &str) -> HttpRequest {
        HttpRequest {
            headers: vec![
                (":method".into(), method.as_bytes().to_vec()),
                (":path".into(), path.as_bytes().to_vec()),
                (":authority".into(), b"tollgate.test".to_vec()),
                (":scheme".into(), b"http".to_vec()),
            ],
            body: vec![],
            source_address: Some("192.0.2.10:50000".into()),
            destination_address: Some("127.0.0.1:10000".into()),
        }
    }

    pub fn post(path: &str) -> HttpRequest {
        HttpRequest::new("POST", path).header("content-type", "application/json")
    }

    pub fn get(path: &str) -> HttpRequest {
        HttpRequest::new("GET", path)
    }

    /// Adds a header (name as given; the host lower-cases it like Envoy's codec would).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> HttpRequest {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// The whole body in one chunk.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> HttpRequest {
        self.body = vec![body.as_ref().to_vec()];
        self
    }

    /// The body in several chunks (several `proxy_on_request_body` calls).
    pub fn body_chunks<I, B>(mut self, chunks: I) -> HttpRequest
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        self.body = chunks.into_iter().map(|c| c.as_ref().to_vec()).collect();
        self
    }

    /// The client's `ip:port`.
    pub fn from(mut self, address: &str) -> HttpRequest {
        self.source_address = Some(address.into());
        self
    }

    /// No `source.address` property at all.
    pub fn without_source_address(mut self) -> HttpRequest {
        self.source_address = None;
        self
    }
}

/// The request as it reached the upstream, after the filter's changes.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub headers: HeaderList,
    pub body: Vec<u8>,
}

impl UpstreamRequest {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        first(&self.headers, name)
    }
}

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: u16,
    /// Without `:status` (the host adds it from `status`).
    pub headers: HeaderList,
    pub body: Vec<u8>,
    /// The stream dies after the headers and `body` (which then never ends): an upstream reset
    /// or a client that went away — either way Envoy stops calling the filter and logs.
    pub cut: bool,
    /// The lengths of the pieces `body` reaches the filter in, one `proxy_on_response_body` each
    /// (empty: one piece).
    pub chunk_lens: Vec<usize>,
}

impl UpstreamResponse {
    pub fn new(status: u16) -> UpstreamResponse {
        UpstreamResponse { status, headers: vec![], body: vec![], cut: false, chunk_lens: vec![] }
    }

    /// The body, in pieces that reach the filter one callback each (as Envoy delivers an SSE
    /// stream that the upstream writes one event at a time).
    pub fn body_chunks<I, B>(mut self, chunks: I) -> UpstreamResponse
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        self.body.clear();
        self.chunk_lens.clear();
        for chunk in chunks {
            self.body.extend_from_slice(chunk.as_ref());
            self.chunk_lens.push(chunk.as_ref().len());
        }
        self
    }

    /// The body in the pieces [`UpstreamResponse::chunk_lens`] describes (none when empty).
    pub(crate) fn pieces(&self) -> Vec<Vec<u8>> {
        if self.body.is_empty() {
            return vec![];
        }
        if self.chunk_lens.iter().sum::<usize>() != self.body.len() {
            return vec![self.body.clone()];
        }
        let mut rest = self.body.as_slice();
        self.chunk_lens.iter().map(|&n| {
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            piece.to_vec()
        }).collect()
    }

    /// See [`UpstreamResponse::cut`].
    pub fn cut(mut self) -> UpstreamResponse {
        self.cut = true;
        self
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> UpstreamResponse {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    pub fn body(mut self, body: impl AsRef<[u8]>) -> UpstreamResponse {
        self.body = body.as_ref().to_vec();
        self.chunk_lens.clear();
        self
    }
}

/// A `proxy_send_local_response` as the guest made it (header keys lower-cased, as Envoy copies
/// them into `Http::LowerCaseString`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub headers: HeaderList,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

/// One finished stream.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The stream's context id in the VM.
    pub context_id: u32,
    /// The status the client got (0 when the stream was reset).
    pub status: u16,
    /// The response headers the client got, after `proxy_on_response_headers` (without
    /// `:status`).
    pub headers: HeaderList,
    /// The response body the client got.
    pub body: Vec<u8>,
    /// Set when the filter answered the request itself.
    pub local_reply: Option<LocalReply>,
    /// Whether the upstream was called.
    pub reached_upstream: bool,
    /// The request as the upstream received it.
    pub upstream_request: Option<UpstreamRequest>,
    /// The stream was reset: the guest asked for it (`proxy_close_stream`), or the response
    /// was cut ([`UpstreamResponse::cut`]) — then `status`, `headers` and `body` are what the
    /// client got before the reset (nothing, if the filter held the head).
    pub reset: bool,
    /// The stream's properties the guest set (Envoy: its filter state) as the stream ended,
    /// before `proxy_on_log` — what Envoy's access loggers read.
    pub properties: std::collections::HashMap<Vec<u8>, Vec<u8>>,
}

impl Exchange {
    /// The first value of a response header, as text (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        first(&self.headers, name).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of a response header.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn first<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    let name = name.to_ascii_lowercase();
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_slice())
}
