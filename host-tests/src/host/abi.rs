//! Proxy-Wasm ABI 0.2.1 numbers and the header-map wire format.
//!
//! Values are those of proxy-wasm/spec `abi-versions/v0.2.1/README.md` ("Types"), which are the
//! ones proxy-wasm-cpp-host and Envoy use (`proxy_wasm_enums.h`) and the Rust SDK 0.2.5 declares
//! in `types.rs`. Note `CAS_MISMATCH` is 8; 11 is cpp-host's `BrokenConnection`, which the
//! 0.2.1 spec does not list.

/// `proxy_status_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_u32(level: u32) -> Option<LogLevel> {
        Some(match level {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
pub mod buffer {
    pub const HTTP_REQUEST_BODY: u32 = 0;
    pub const HTTP_RESPONSE_BODY: u32 = 1;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
    /// The largest defined buffer type (`FOREIGN_FUNCTION_ARGUMENTS`); above it is BadArgument.
    pub const MAX: u32 = 8;
}

/// `proxy_map_type_t`.
pub mod map {
    pub const HTTP_REQUEST_HEADERS: u32 = 0;
    pub const HTTP_RESPONSE_HEADERS: u32 = 2;
    /// The largest defined map type (`HTTP_CALL_RESPONSE_TRAILERS`); above it is BadArgument.
    pub const MAX: u32 = 7;
}

/// `proxy_stream_type_t`.
pub mod stream {
    pub const HTTP_REQUEST: u32 = 0;
    pub const HTTP_RESPONSE: u32 = 1;
    pub const DOWNSTREAM: u32 = 2;
    pub const UPSTREAM: u32 = 3;
}

/// `proxy_metric_type_t`, and Envoy's metric ids: the type sits in the low two bits and each
/// type counts up in steps of 4 from its type value, pre-incremented, so the first counter is 4
/// (envoy `source/extensions/common/wasm/wasm.h`: `kMetricTypeMask`, `kMetricIdIncrement`,
/// `nextCounterMetricId`).
pub mod metric {
    pub const COUNTER: u32 = 0;
    pub const GAUGE: u32 = 1;
    pub const HISTOGRAM: u32 = 2;
    pub const TYPE_MASK: u32 = 0x3;
    pub const ID_INCREMENT: u32 = 0x4;
}

/// cpp-host `include/proxy-wasm/limits.h`: larger pair buffers decode as empty.
const PAIRS_MAX_BYTES: usize = 1024 * 1024;
const PAIRS_MAX_COUNT: usize = 1024;

/// Serializes a header map as the spec's "Serialization" section describes: the number of pairs
/// (u32 LE), then each key's and value's length (u32 LE), then each key and value followed by a
/// NUL byte (cpp-host `src/pairs_util.cc`, `PairsUtil::marshalPairs`).
pub fn encode_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let body: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + body);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parses the pairs format. Like cpp-host's `PairsUtil::toPairs`, anything malformed (short
/// buffer, missing NUL, trailing bytes, more than 1024 pairs or 1 MiB) yields an empty list,
/// not an error.
pub fn decode_pairs(buf: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    decode_pairs_strict(buf).unwrap_or_default()
}

fn decode_pairs_strict(buf: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if buf.len() > PAIRS_MAX_BYTES {
        return None;
    }
    let word = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes) as usize)
    };
    let n = word(0)?;
    if n > PAIRS_MAX_COUNT {
        return None;
    }
    let mut pos = 4 + n * 8;
    if pos > buf.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let (klen, vlen) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = buf.get(pos..pos + klen)?.to_vec();
        pos += klen;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let value = buf.get(pos..pos + vlen)?.to_vec();
        pos += vlen;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        pairs.push((key, value));
    }
    (pos == buf.len()).then_some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_match_the_spec_example() {
        // The spec's example map {"a": "1"}, {"b": "22"}.
        let bytes = encode_pairs(&[("a", "1"), ("b", "22")]);
        assert_eq!(
            bytes,
            [2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b', 0, b'2', b'2', 0]
        );
        assert_eq!(decode_pairs(&bytes), vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"22".to_vec())]);
    }

    #[test]
    fn malformed_pairs_decode_as_empty() {
        let good = encode_pairs(&[("k", "v")]);
        assert!(decode_pairs(&good[..good.len() - 1]).is_empty());
        let mut trailing = good.clone();
        trailing.push(7);
        assert!(decode_pairs(&trailing).is_empty());
        let mut no_nul = good;
        let at = no_nul.len() - 1;
        no_nul[at] = b'x';
        assert!(decode_pairs(&no_nul).is_empty());
        assert!(decode_pairs(&[]).is_empty());
    }
}
