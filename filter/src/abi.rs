//! The few Proxy-Wasm ABI 0.2.1 host calls the filter makes, wrapped so that no status a host
//! can return turns into a panic.
//!
//! The proxy-wasm SDK's `hostcalls` functions `panic!` on any status they did not expect (for
//! instance `get_map_value_bytes` on anything but Ok/NotFound, `send_http_response` on anything
//! but Ok), and a panic in a proxy-wasm VM makes Envoy answer 503 to every later request
//! (envoyproxy/envoy#34881). So the filter keeps the SDK for context dispatch and memory
//! allocation (`proxy_on_memory_allocate`, which hands out a boxed slice of exactly the
//! requested size: that is why returned buffers are rebuilt with `len == capacity`) and makes
//! its own host calls here, returning every non-Ok status as an error value.
//!
//! Signatures and status codes follow the ABI spec (proxy-wasm/spec `abi-versions/v0.2.1`) and
//! proxy-wasm-cpp-host `src/exports.cc`.

use std::ptr::{null, null_mut};

/// A Proxy-Wasm status code other than Ok, as numbered by proxy-wasm-cpp-host
/// `include/proxy-wasm/wasm_api_impl.h` / `proxy_wasm_enums.h` `WasmResult`: 1 NotFound,
/// 2 BadArgument, 3 SerializationFailure, 4 ParseFailure, 5 BadExpression,
/// 6 InvalidMemoryAccess, 7 Empty, 8 CasMismatch, 9 ResultMismatch, 10 InternalFailure,
/// 11 BrokenConnection, 12 Unimplemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

pub const OK: u32 = 0;
pub const NOT_FOUND: Status = Status(1);
pub const CAS_MISMATCH: Status = Status(8);

pub const HTTP_REQUEST_HEADERS: u32 = 0;
pub const HTTP_RESPONSE_HEADERS: u32 = 2;
/// The headers of an `http_call`'s answer.
pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const HTTP_REQUEST_BODY: u32 = 0;
pub const HTTP_RESPONSE_BODY: u32 = 1;
/// The body of an `http_call`'s answer.
pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const PLUGIN_CONFIGURATION: u32 = 7;
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_HISTOGRAM: u32 = 2;

pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;

// WASI's environment, which proxy-wasm hosts serve from their VM configuration (Envoy:
// `vm_config.environment_variables`; proxy-wasm-cpp-host `exports.cc` `wasi_unstable_environ_get`).
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn environ_sizes_get(count: *mut usize, buf_size: *mut usize) -> u16;
    fn environ_get(environ: *mut *mut u8, environ_buf: *mut u8) -> u16;
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn check(status: u32) -> Result<(), Status> {
    if status == OK {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Takes ownership of a buffer the host filled through `proxy_on_memory_allocate`.
///
/// SAFETY: `data`/`size` must come from a host call that just returned Ok; the SDK's allocator
/// allocated exactly `size` bytes at `data`.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: pointer and length of a live &str. A failed log is nothing to act on.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// Host time in epoch milliseconds.
pub fn now_ms() -> Result<u64, Status> {
    Ok(now_ns()? / 1_000_000)
}

/// Host time in epoch nanoseconds.
pub fn now_ns() -> Result<u64, Status> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 to a live local.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(nanos)
}

pub fn plugin_configuration(size: usize) -> Result<Vec<u8>, Status> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: out-pointers to live locals; buffer ownership per `take`.
    match unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len) } {
        OK => Ok(unsafe { take(data, len) }),
        1 => Ok(Vec::new()),
        s => Err(Status(s)),
    }
}

/// `size` bytes of a body buffer from `start` (fewer if the buffer is shorter: the host does
/// not overread). A buffer the host does not have (NotFound) reads as empty.
pub fn buffer(buffer_type: u32, start: usize, size: usize) -> Result<Vec<u8>, Status> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: as for `plugin_configuration`.
    match unsafe { proxy_get_buffer_bytes(buffer_type, start, size, &mut data, &mut len) } {
        OK => Ok(unsafe { take(data, len) }),
        1 => Ok(Vec::new()),
        s => Err(Status(s)),
    }
}

/// Envoy's `Buffer::copyFrom`: `(0, 0)` prepends, `(0, n ≥ len)` replaces the whole buffer,
/// `start ≥ len` appends, anything else is BadArgument. Callers pass the exact current length
/// to replace (newer Envoys drain `size` bytes then prepend, older ones need `size ≥ len`).
pub fn set_buffer(buffer_type: u32, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer and length of a live slice.
    check(unsafe { proxy_set_buffer_bytes(buffer_type, start, size, data.as_ptr(), data.len()) })
}

/// Every header of a map as (name, value) pairs, in the host's order.
pub fn headers(map: u32) -> Result<Vec<(String, Vec<u8>)>, Status> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: as for `plugin_configuration`.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut len) } {
        OK => Ok(deserialize_map(&unsafe { take(data, len) })),
        s => Err(Status(s)),
    }
}

/// A header's value, or `None` when absent.
pub fn header(map: u32, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: as for `plugin_configuration`.
    match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut len) } {
        OK => Ok(Some(unsafe { take(data, len) })),
        1 => Ok(None),
        s => Err(Status(s)),
    }
}

pub fn set_header(map: u32, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live strings.
    check(unsafe { proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

pub fn remove_header(map: u32, name: &str) -> Result<(), Status> {
    // SAFETY: pointer and length of a live string.
    check(unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) })
}

/// A property such as `["source", "address"]` (segments joined by NUL, as the ABI specifies).
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let joined = path.join("\0");
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: as for `plugin_configuration`.
    match unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut len) } {
        OK => Ok(Some(unsafe { take(data, len) })),
        1 => Ok(None),
        s => Err(Status(s)),
    }
}

/// Sets a property of the stream: Envoy keeps it as the stream's filter state `wasm.<name>`,
/// which access logs read (`%FILTER_STATE(wasm.<name>:PLAIN)%`).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live slices.
    check(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// `(value, cas)`, or `None` when the key does not exist.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let (mut data, mut len, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: as for `plugin_configuration`.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas) } {
        OK => Ok(Some((unsafe { take(data, len) }, cas))),
        1 => Ok(None),
        s => Err(Status(s)),
    }
}

pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live slices.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

/// Sends a local response; the host applies it after the current callback returns.
pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let map = serialize_map(headers);
    // SAFETY: pointers and lengths of live buffers; -1 = not a gRPC response.
    check(unsafe {
        proxy_send_local_response(status, null(), 0, body.as_ptr(), body.len(), map.as_ptr(), map.len(), -1)
    })
}

/// Dispatches an HTTP request to an Envoy cluster; the answer arrives on the calling context. Through the SDK, not a raw `proxy_http_call`: the SDK's dispatcher must
/// know the token, or it panics ("invalid token_id") when the answer arrives — which fails the
/// VM. The SDK panics only on a status other than Ok/BadArgument/InternalFailure, which is all
/// Envoy's `Context::httpCall` returns (`source/extensions/common/wasm/context.cc`).
pub fn http_call(cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u32) -> Result<u32, Status> {
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        Some(body),
        Vec::new(),
        std::time::Duration::from_millis(u64::from(timeout_ms)),
    )
    .map_err(|s| Status(s as u32))
}

/// Resumes a request paused in a request callback (after an `http_call`'s answer).
pub fn resume_request() -> Result<(), Status> {
    proxy_wasm::hostcalls::resume_http_request().map_err(|s| Status(s as u32))
}

/// Resumes a response paused in a response callback (after an `http_call`'s answer).
pub fn resume_response() -> Result<(), Status> {
    proxy_wasm::hostcalls::resume_http_response().map_err(|s| Status(s as u32))
}

/// The VM's environment variables (`KEY=VALUE` pairs); empty when the host gives none.
pub fn environment() -> Vec<(String, Vec<u8>)> {
    let (mut count, mut size) = (0usize, 0usize);
    // SAFETY: out-pointers to live locals.
    if unsafe { environ_sizes_get(&mut count, &mut size) } != 0 || count == 0 || count > 4096 || size > 1 << 20 {
        return Vec::new();
    }
    let mut pointers: Vec<*mut u8> = vec![null_mut(); count];
    let mut buf = vec![0u8; size];
    // SAFETY: `pointers` has room for `count` pointers and `buf` for `size` bytes, as the host
    // just said it needs.
    if unsafe { environ_get(pointers.as_mut_ptr(), buf.as_mut_ptr()) } != 0 {
        return Vec::new();
    }
    // The entries are NUL-terminated and lie in `buf` in order; read them from `buf` itself
    // rather than through the pointers.
    buf.split(|&b| b == 0)
        .take(count)
        .filter_map(|entry| {
            let i = entry.iter().position(|&b| b == b'=')?;
            Some((String::from_utf8_lossy(&entry[..i]).into_owned(), entry[i + 1..].to_vec()))
        })
        .collect()
}

/// Makes `context_id` the context later host calls act on (a stream, from the root's tick).
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: a plain value.
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Asks for `proxy_on_tick` on the root context every `period_ms` (0: never).
pub fn set_tick_period(period_ms: u32) -> Result<(), Status> {
    // SAFETY: a plain value.
    check(unsafe { proxy_set_tick_period_milliseconds(period_ms) })
}

pub fn define_counter(name: &str) -> Result<u32, Status> {
    define_metric(METRIC_COUNTER, name)
}

/// Defines a metric of `kind` ([`METRIC_COUNTER`], [`METRIC_HISTOGRAM`]); its id.
pub fn define_metric(kind: u32, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: pointer/length of a live string, out-pointer to a live local.
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Records `value` into a histogram.
pub fn record_metric(metric: u32, value: u64) {
    // SAFETY: plain values. A failed metric update is not worth failing a request over.
    unsafe { proxy_record_metric(metric, value) };
}

/// Adds `n` to a counter; nothing for 0 (Envoy refuses an offset that is not positive).
pub fn increment_by(metric: u32, n: u64) {
    if n == 0 {
        return;
    }
    let offset = i64::try_from(n).unwrap_or(i64::MAX);
    // SAFETY: plain values. A failed metric update is not worth failing a request over.
    unsafe { proxy_increment_metric(metric, offset) };
}

/// The ABI's header-map encoding: pair count (u32 LE), then each key and value length (u32 LE),
/// then each key and value followed by a NUL byte.
pub fn serialize_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes the ABI's header-map encoding (see [`serialize_map`]); a malformed map yields the
/// pairs read before the fault, never a panic.
pub fn deserialize_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    }
    let mut out = Vec::new();
    let Some(count) = u32_at(bytes, 0) else { return out };
    let mut sizes = 4usize;
    let mut data = match count.checked_mul(8).and_then(|n| n.checked_add(4)) {
        Some(d) => d,
        None => return out,
    };
    for _ in 0..count {
        let (Some(k), Some(v)) = (u32_at(bytes, sizes), u32_at(bytes, sizes + 4)) else { return out };
        sizes += 8;
        let key = data.checked_add(k).and_then(|end| bytes.get(data..end));
        let value_start = data.saturating_add(k).saturating_add(1);
        let value = value_start.checked_add(v).and_then(|end| bytes.get(value_start..end));
        let (Some(key), Some(value)) = (key, value) else { return out };
        out.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
        data = value_start.saturating_add(v).saturating_add(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip_and_malformed_ones_do_not_panic() {
        let pairs = [(":status", "200"), ("retry-after", "7"), ("empty", "")];
        let bytes = serialize_map(&pairs);
        let back = deserialize_map(&bytes);
        let expected: Vec<(String, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        assert_eq!(back, expected);
        for cut in 0..bytes.len() {
            let partial = deserialize_map(&bytes[..cut]);
            assert!(partial.len() <= pairs.len());
        }
        assert!(deserialize_map(&[0xff, 0xff, 0xff, 0xff]).is_empty());
    }
}
