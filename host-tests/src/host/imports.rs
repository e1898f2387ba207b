//! The host functions: every `env` function of the Proxy-Wasm ABI 0.2.1 (plus the 0.2.0
//! leftovers Envoy still registers) and the few WASI functions the spec lists.
//!
//! Each follows proxy-wasm-cpp-host `src/exports.cc` for argument checking and memory handling
//! (a bad pointer is InvalidMemoryAccess, returned values are copied into memory obtained from
//! the guest's allocator, an empty value is returned as a NULL pointer with size 0 —
//! `WasmBase::copyToPointerSize`, `include/proxy-wasm/wasm.h`) and Envoy
//! `source/extensions/common/wasm/context.cc` for what the call does. Calls this host cannot
//! really serve (gRPC, shared queues) answer Unimplemented; `proxy_http_call` answers
//! BadArgument, which is what Envoy says for a cluster it does not know — and this host knows
//! none.

use wasmtime::{Caller, Linker, Memory};

use super::abi::{buffer, decode_pairs, encode_pairs, map, metric, stream, LogLevel, Status};
use super::http::{lower, LocalReply};
use super::vm::{MetricKind, MetricValue, VmState};

type C<'a> = Caller<'a, VmState>;
type R = wasmtime::Result<u32>;

const OK: u32 = Status::Ok as u32;
const NOT_FOUND: u32 = Status::NotFound as u32;
const BAD_ARGUMENT: u32 = Status::BadArgument as u32;
const INVALID_MEMORY: u32 = Status::InvalidMemoryAccess as u32;
const UNIMPLEMENTED: u32 = Status::Unimplemented as u32;

// WASI errno values (spec "wasi_errno_t").
const WASI_SUCCESS: u32 = 0;
const WASI_BADF: u32 = 8;
const WASI_FAULT: u32 = 21;
const WASI_INVAL: u32 = 28;
const WASI_NOTSUP: u32 = 58;

fn memory(c: &C) -> wasmtime::Result<Memory> {
    c.data().memory.ok_or_else(|| wasmtime::Error::msg("host function called before the module's memory was known"))
}

/// cpp-host `WasmVm::getMemory`: `None` when the range is outside linear memory.
fn read(c: &C, ptr: u32, len: u32) -> wasmtime::Result<Option<Vec<u8>>> {
    let data = memory(c)?.data(c);
    let (start, end) = (ptr as usize, ptr as usize + len as usize);
    Ok(data.get(start..end).map(<[u8]>::to_vec))
}

fn write(c: &mut C, ptr: u32, bytes: &[u8]) -> wasmtime::Result<bool> {
    let data = memory(c)?.data_mut(c);
    match data.get_mut(ptr as usize..ptr as usize + bytes.len()) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(true)
        }
        None => Ok(false),
    }
}

fn write_u32(c: &mut C, ptr: u32, value: u32) -> wasmtime::Result<bool> {
    write(c, ptr, &value.to_le_bytes())
}

fn write_u64(c: &mut C, ptr: u32, value: u64) -> wasmtime::Result<bool> {
    write(c, ptr, &value.to_le_bytes())
}

/// Memory from the guest's allocator; `None` when it returned 0. A trap inside the allocator
/// propagates.
fn alloc(c: &mut C, size: usize) -> wasmtime::Result<Option<u32>> {
    let malloc = c.data().malloc.clone().ok_or_else(|| wasmtime::Error::msg("the module has no allocator"))?;
    let Ok(size) = u32::try_from(size) else { return Ok(None) };
    let ptr = malloc.call(&mut *c, size)?;
    Ok((ptr != 0).then_some(ptr))
}

/// cpp-host `WasmBase::copyToPointerSize`: allocate, copy, store pointer and size. An empty
/// value is pointer 0, size 0 (nothing is allocated).
fn copy_out(c: &mut C, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> R {
    let mut pointer = 0;
    if !bytes.is_empty() {
        let Some(p) = alloc(c, bytes.len())? else { return Ok(INVALID_MEMORY) };
        if !write(c, p, bytes)? {
            return Ok(INVALID_MEMORY);
        }
        pointer = p;
    }
    if !write_u32(c, ptr_ptr, pointer)? || !write_u32(c, size_ptr, bytes.len() as u32)? {
        return Ok(INVALID_MEMORY);
    }
    Ok(OK)
}

/// Reads a guest range or returns InvalidMemoryAccess from the calling host function.
macro_rules! read_or_fail {
    ($c:expr, $ptr:expr, $len:expr) => {
        match read(&$c, $ptr, $len)? {
            Some(bytes) => bytes,
            None => return Ok(INVALID_MEMORY),
        }
    };
}

/// Envoy `HeaderMap::setCopy`: the first entry takes the value, later duplicates go; a missing
/// key is appended.
fn replace_header(headers: &mut Vec<(String, Vec<u8>)>, key: String, value: Vec<u8>) {
    match headers.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            headers[i].1 = value;
            let mut seen = 0;
            headers.retain(|(k, _)| {
                if *k == key {
                    seen += 1;
                    seen == 1
                } else {
                    true
                }
            });
        }
        None => headers.push((key, value)),
    }
}

/// The properties this host knows (Envoy `Context::getProperty`/`findValue`: path segments are
/// NUL-separated, strings are returned as bytes, integers as 8-byte little-endian).
fn property(state: &VmState, path: &[u8]) -> Result<Vec<u8>, Status> {
    let host = &state.host;
    let segments: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    if segments.first() == Some(&&b"ngx"[..]) {
        // nginx variables: ngx_wasm_module refuses scoped properties outside a request
        // (`ngx_proxy_wasm_properties.c`); Envoy knows no such property.
        return match host.flavour() {
            crate::host::Flavour::Ngx if state.stream().is_none() => Err(Status::InternalFailure),
            crate::host::Flavour::Ngx => Ok(b"4242".to_vec()),
            _ => Err(Status::NotFound),
        };
    }
    match segments.as_slice() {
        [b"plugin_name"] | [b"plugin_root_id"] => return Ok(Vec::new()),
        [b"plugin_vm_id"] => return Ok(host.vm_id().as_bytes().to_vec()),
        _ => {}
    }
    let stream = state.stream().ok_or(Status::NotFound)?;
    if let Some(value) = stream.properties.get(path) {
        return Ok(value.clone());
    }
    let header = |headers: &[(String, Vec<u8>)], name: &[u8]| -> Result<Vec<u8>, Status> {
        let name = lower(name);
        headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()).ok_or(Status::NotFound)
    };
    let port = |address: &Option<String>| -> Result<Vec<u8>, Status> {
        let address = address.as_deref().ok_or(Status::NotFound)?;
        let port: i64 = address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).ok_or(Status::NotFound)?;
        Ok(port.to_le_bytes().to_vec())
    };
    let request = &stream.original_request;
    match segments.as_slice() {
        [b"source", b"address"] => stream.source_address.clone().map(String::into_bytes).ok_or(Status::NotFound),
        [b"source", b"port"] => port(&stream.source_address),
        [b"destination", b"address"] => {
            stream.destination_address.clone().map(String::into_bytes).ok_or(Status::NotFound)
        }
        [b"destination", b"port"] => port(&stream.destination_address),
        [b"request", b"path"] => header(request, b":path"),
        [b"request", b"url_path"] => {
            header(request, b":path").map(|p| p.split(|b| *b == b'?').next().unwrap_or_default().to_vec())
        }
        [b"request", b"host"] => header(request, b":authority"),
        [b"request", b"method"] => header(request, b":method"),
        [b"request", b"scheme"] => header(request, b":scheme"),
        [b"request", b"protocol"] => Ok(b"HTTP/1.1".to_vec()),
        [b"request", b"headers", name] => header(request, name),
        [b"response", b"code"] => {
            stream.response_code.map(|c| (c as i64).to_le_bytes().to_vec()).ok_or(Status::NotFound)
        }
        [b"response", b"headers", name] if stream.response_code.is_some() => header(&stream.response_headers, name),
        _ => Err(Status::NotFound),
    }
}

pub(crate) fn define(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // --- Logging and time -------------------------------------------------------------------

    linker.func_wrap("env", "proxy_log", |c: C, level: u32, ptr: u32, size: u32| -> R {
        let Some(level) = LogLevel::from_u32(level) else { return Ok(BAD_ARGUMENT) };
        let message = read_or_fail!(c, ptr, size);
        c.data().log(level, String::from_utf8_lossy(&message).into_owned());
        Ok(OK)
    })?;

    linker.func_wrap("env", "proxy_get_log_level", |mut c: C, ptr: u32| -> R {
        // Envoy reports its logger's level; Envoy's default is info.
        Ok(if write_u32(&mut c, ptr, LogLevel::Info as u32)? { OK } else { INVALID_MEMORY })
    })?;

    linker.func_wrap("env", "proxy_get_current_time_nanoseconds", |mut c: C, ptr: u32| -> R {
        if c.data().host.clock().is_broken() {
            return Ok(Status::InternalFailure as u32);
        }
        let now = c.data().host.clock().now_nanos();
        Ok(if write_u64(&mut c, ptr, now)? { OK } else { INVALID_MEMORY })
    })?;

    linker.func_wrap("env", "proxy_set_tick_period_milliseconds", |mut c: C, period: u32| -> R {
        c.data_mut().tick_period_ms = period;
        Ok(OK)
    })?;

    // --- Buffers ----------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C, kind: u32, start: u32, max: u32, ptr_ptr: u32, size_ptr: u32| -> R {
            if kind > buffer::MAX {
                return Ok(BAD_ARGUMENT);
            }
            let bytes = {
                let Some(buf) = c.data().buffer(kind) else { return Ok(NOT_FOUND) };
                // cpp-host `get_buffer_bytes`: never read past the end; an empty range is (0, 0).
                let (start, len) = (start as u64, max as u64);
                let size = buf.len() as u64;
                let len = if start > size { 0 } else { len.min(size - start) };
                buf[start as usize..(start + len) as usize].to_vec()
            };
            copy_out(&mut c, &bytes, ptr_ptr, size_ptr)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C, kind: u32, start: u32, length: u32, ptr: u32, size: u32| -> R {
            if kind > buffer::MAX {
                return Ok(BAD_ARGUMENT);
            }
            match c.data_mut().buffer_mut(kind) {
                Ok(_) => {}
                Err(true) => return Ok(BAD_ARGUMENT),
                Err(false) => return Ok(NOT_FOUND),
            }
            let data = read_or_fail!(c, ptr, size);
            let Ok(buf) = c.data_mut().buffer_mut(kind) else { return Ok(NOT_FOUND) };
            // Envoy `Buffer::copyFrom`: (0, 0) prepends, (0, >= len) replaces everything,
            // start >= len appends; anything else (an edit inside the buffer) is BadArgument.
            let (start, length) = (start as usize, length as usize);
            if start == 0 {
                if length == 0 {
                    let mut joined = data;
                    joined.extend_from_slice(buf);
                    *buf = joined;
                } else if length >= buf.len() {
                    *buf = data;
                } else {
                    return Ok(BAD_ARGUMENT);
                }
            } else if start >= buf.len() {
                buf.extend_from_slice(&data);
            } else {
                return Ok(BAD_ARGUMENT);
            }
            Ok(OK)
        },
    )?;

    linker.func_wrap("env", "proxy_get_buffer_status", |mut c: C, kind: u32, len_ptr: u32, flags_ptr: u32| -> R {
        if kind > buffer::MAX {
            return Ok(BAD_ARGUMENT);
        }
        let Some(len) = c.data().buffer(kind).map(<[u8]>::len) else { return Ok(NOT_FOUND) };
        if !write_u32(&mut c, len_ptr, len as u32)? || !write_u32(&mut c, flags_ptr, 0)? {
            return Ok(INVALID_MEMORY);
        }
        Ok(OK)
    })?;

    // --- Header maps ------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C, kind: u32, key_ptr: u32, key_size: u32, ptr_ptr: u32, size_ptr: u32| -> R {
            if kind > map::MAX {
                return Ok(BAD_ARGUMENT);
            }
            let key = lower(&read_or_fail!(c, key_ptr, key_size));
            let value = {
                let Some(headers) = c.data().map(kind) else { return Ok(BAD_ARGUMENT) };
                // Envoy returns the first value only.
                match headers.iter().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.clone(),
                    None => return Ok(NOT_FOUND),
                }
            };
            copy_out(&mut c, &value, ptr_ptr, size_ptr)
        },
    )?;

    linker.func_wrap("env", "proxy_get_header_map_pairs", |mut c: C, kind: u32, ptr_ptr: u32, size_ptr: u32| -> R {
        if kind > map::MAX {
            return Ok(BAD_ARGUMENT);
        }
        // Envoy `getHeaderMapPairs`: an unavailable map reads as empty; cpp-host returns an
        // empty map as (0, 0).
        let bytes = match c.data().map(kind) {
            Some(headers) if !headers.is_empty() => encode_pairs(headers),
            _ => Vec::new(),
        };
        copy_out(&mut c, &bytes, ptr_ptr, size_ptr)
    })?;

    linker.func_wrap("env", "proxy_set_header_map_pairs", |mut c: C, kind: u32, ptr: u32, size: u32| -> R {
        if kind > map::MAX {
            return Ok(BAD_ARGUMENT);
        }
        let pairs = decode_pairs(&read_or_fail!(c, ptr, size));
        let Some(headers) = c.data_mut().map_mut(kind) else { return Ok(BAD_ARGUMENT) };
        *headers = pairs.into_iter().map(|(k, v)| (lower(&k), v)).collect();
        Ok(OK)
    })?;

    linker.func_wrap("env", "proxy_get_header_map_size", |mut c: C, kind: u32, ptr: u32| -> R {
        if kind > map::MAX {
            return Ok(BAD_ARGUMENT);
        }
        let Some(headers) = c.data_mut().map_mut(kind) else { return Ok(BAD_ARGUMENT) };
        // Envoy `HeaderMap::byteSize`: the sum of key and value lengths.
        let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        Ok(if write_u32(&mut c, ptr, size as u32)? { OK } else { INVALID_MEMORY })
    })?;

    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C, kind: u32, key_ptr: u32, key_size: u32, value_ptr: u32, value_size: u32| -> R {
            if kind > map::MAX {
                return Ok(BAD_ARGUMENT);
            }
            let key = lower(&read_or_fail!(c, key_ptr, key_size));
            let value = read_or_fail!(c, value_ptr, value_size);
            let Some(headers) = c.data_mut().map_mut(kind) else { return Ok(BAD_ARGUMENT) };
            headers.push((key, value));
            Ok(OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C, kind: u32, key_ptr: u32, key_size: u32, value_ptr: u32, value_size: u32| -> R {
            if kind > map::MAX {
                return Ok(BAD_ARGUMENT);
            }
            let key = lower(&read_or_fail!(c, key_ptr, key_size));
            let value = read_or_fail!(c, value_ptr, value_size);
            let Some(headers) = c.data_mut().map_mut(kind) else { return Ok(BAD_ARGUMENT) };
            replace_header(headers, key, value);
            Ok(OK)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C, kind: u32, key_ptr: u32, key_size: u32| -> R {
            if kind > map::MAX {
                return Ok(BAD_ARGUMENT);
            }
            let key = lower(&read_or_fail!(c, key_ptr, key_size));
            let Some(headers) = c.data_mut().map_mut(kind) else { return Ok(BAD_ARGUMENT) };
            headers.retain(|(k, _)| *k != key);
            Ok(OK)
        },
    )?;

    // --- Properties -------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C, path_ptr: u32, path_size: u32, ptr_ptr: u32, size_ptr: u32| -> R {
            let path = read_or_fail!(c, path_ptr, path_size);
            match property(c.data(), &path) {
                Ok(value) => copy_out(&mut c, &value, ptr_ptr, size_ptr),
                Err(status) => Ok(status.code()),
            }
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C, path_ptr: u32, path_size: u32, value_ptr: u32, value_size: u32| -> R {
            let path = read_or_fail!(c, path_ptr, path_size);
            let value = read_or_fail!(c, value_ptr, value_size);
            // Envoy stores it as filter state of the stream; without a stream: NotFound.
            let Some(stream) = c.data_mut().stream_mut() else { return Ok(NOT_FOUND) };
            stream.properties.insert(path, value);
            Ok(OK)
        },
    )?;

    // --- Shared data ------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C, key_ptr: u32, key_size: u32, ptr_ptr: u32, size_ptr: u32, cas_ptr: u32| -> R {
            let key = read_or_fail!(c, key_ptr, key_size);
            let (value, cas) = {
                let state = c.data();
                match state.host.shared().get(state.host.vm_id(), &key) {
                    Ok(found) => found,
                    Err(status) => return Ok(status.code()),
                }
            };
            let status = copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
            if status != OK {
                return Ok(status);
            }
            Ok(if write_u32(&mut c, cas_ptr, cas)? { OK } else { INVALID_MEMORY })
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C, key_ptr: u32, key_size: u32, value_ptr: u32, value_size: u32, cas: u32| -> R {
            let key = read_or_fail!(c, key_ptr, key_size);
            let value = read_or_fail!(c, value_ptr, value_size);
            if let Some(mut hook) = c.data_mut().shared_set_hook.take() {
                hook(&key, cas);
                c.data_mut().shared_set_hook = Some(hook);
            }
            let state = c.data();
            // Only ngx_wasm_module gives a NULL value pointer a meaning (delete).
            let value = (value_ptr != 0).then_some(value.as_slice());
            Ok(state.host.shared().set(state.host.vm_id(), &key, value, cas).code())
        },
    )?;

    // --- Shared queues, gRPC, foreign functions: not served by this host ----------------------

    linker
        .func_wrap("env", "proxy_register_shared_queue", |_: C, _: u32, _: u32, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap("env", "proxy_resolve_shared_queue", |_: C, _: u32, _: u32, _: u32, _: u32, _: u32| -> R {
        Ok(UNIMPLEMENTED)
    })?;
    linker.func_wrap("env", "proxy_enqueue_shared_queue", |_: C, _: u32, _: u32, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap("env", "proxy_dequeue_shared_queue", |_: C, _: u32, _: u32, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> R {
            Ok(UNIMPLEMENTED)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> R { Ok(UNIMPLEMENTED) },
    )?;
    linker.func_wrap("env", "proxy_grpc_send", |_: C, _: u32, _: u32, _: u32, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap("env", "proxy_grpc_cancel", |_: C, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap("env", "proxy_grpc_close", |_: C, _: u32| -> R { Ok(UNIMPLEMENTED) })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |c: C, name_ptr: u32, name_size: u32, args_ptr: u32, args_size: u32, _: u32, _: u32| -> R {
            read_or_fail!(c, name_ptr, name_size);
            read_or_fail!(c, args_ptr, args_size);
            // cpp-host `call_foreign_function`: no function registered under that name.
            Ok(NOT_FOUND)
        },
    )?;

    // --- HTTP -------------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C,
         uri_ptr: u32,
         uri_size: u32,
         headers_ptr: u32,
         headers_size: u32,
         body_ptr: u32,
         body_size: u32,
         trailers_ptr: u32,
         trailers_size: u32,
         _timeout_ms: u32,
         token_ptr: u32|
         -> R {
            read_or_fail!(c, uri_ptr, uri_size);
            read_or_fail!(c, headers_ptr, headers_size);
            read_or_fail!(c, body_ptr, body_size);
            read_or_fail!(c, trailers_ptr, trailers_size);
            if !write_u32(&mut c, token_ptr, 0)? {
                return Ok(INVALID_MEMORY);
            }
            // Envoy `Context::httpCall`: an unknown cluster is BadArgument. This host has none.
            Ok(BAD_ARGUMENT)
        },
    )?;

    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C,
         status: u32,
         details_ptr: u32,
         details_size: u32,
         body_ptr: u32,
         body_size: u32,
         headers_ptr: u32,
         headers_size: u32,
         grpc_status: i32|
         -> R {
            let details = read_or_fail!(c, details_ptr, details_size);
            let body = read_or_fail!(c, body_ptr, body_size);
            let headers = decode_pairs(&read_or_fail!(c, headers_ptr, headers_size));
            // Recorded now, sent after the callback returns (Envoy defers `sendLocalReply` with
            // `addAfterVmCallAction`). Outside a stream there is nothing to reply to, and Envoy
            // still says Ok.
            if let Some(stream) = c.data_mut().stream_mut() {
                if stream.local_reply.is_none() {
                    stream.local_reply = Some(LocalReply {
                        status: status as u16,
                        details: String::from_utf8_lossy(&details).into_owned(),
                        headers: headers.into_iter().map(|(k, v)| (lower(&k), v)).collect(),
                        body,
                        grpc_status,
                    });
                }
            }
            Ok(OK)
        },
    )?;

    fn continue_stream(c: &mut C, kind: u32) -> u32 {
        match kind {
            stream::HTTP_REQUEST | stream::HTTP_RESPONSE => {
                if let Some(s) = c.data_mut().stream_mut() {
                    if kind == stream::HTTP_REQUEST {
                        s.continue_request = true;
                    } else {
                        s.continue_response = true;
                    }
                }
                OK
            }
            stream::DOWNSTREAM => OK,
            stream::UPSTREAM => UNIMPLEMENTED,
            _ => BAD_ARGUMENT,
        }
    }
    linker
        .func_wrap("env", "proxy_continue_stream", |mut c: C, kind: u32| -> R { Ok(continue_stream(&mut c, kind)) })?;
    linker.func_wrap("env", "proxy_continue_request", |mut c: C| -> R {
        Ok(continue_stream(&mut c, stream::HTTP_REQUEST))
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: C| -> R {
        Ok(continue_stream(&mut c, stream::HTTP_RESPONSE))
    })?;
    linker.func_wrap("env", "proxy_close_stream", |mut c: C, kind: u32| -> R {
        if kind > stream::UPSTREAM {
            return Ok(BAD_ARGUMENT);
        }
        if let Some(s) = c.data_mut().stream_mut() {
            if kind <= stream::HTTP_RESPONSE {
                s.close = true;
            }
        }
        Ok(OK)
    })?;
    // No `proxy_clear_route_cache`: proxy-wasm-cpp-host `src/wasm.cc` registers it for ABI
    // 0.1.0 only, and Envoy refuses a 0.2.1 module that imports it. Like Envoy, this host
    // clears nothing explicitly: a request-header change is what re-picks the route.

    // --- Contexts ---------------------------------------------------------------------------

    linker.func_wrap("env", "proxy_get_status", |mut c: C, code_ptr: u32, ptr_ptr: u32, size_ptr: u32| -> R {
        // No HTTP or gRPC call ever completes here, so the root context's status is (0, "").
        if !write_u32(&mut c, code_ptr, 0)? {
            return Ok(INVALID_MEMORY);
        }
        copy_out(&mut c, b"", ptr_ptr, size_ptr)
    })?;

    linker.func_wrap("env", "proxy_done", |_: C| -> R {
        // cpp-host `WasmBase::done`: NotFound unless a root context is pending shutdown.
        Ok(NOT_FOUND)
    })?;

    linker.func_wrap("env", "proxy_set_effective_context", |mut c: C, context_id: u32| -> R {
        let state = c.data_mut();
        let known = context_id == state.root_id || state.stream.as_ref().is_some_and(|s| s.id == context_id);
        if !known {
            return Ok(BAD_ARGUMENT);
        }
        state.effective = Some(context_id);
        Ok(OK)
    })?;

    // --- Metrics (Envoy `Context::defineMetric` / `incrementMetric` / `recordMetric` /
    // `getMetric`) -----------------------------------------------------------------------------

    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C, kind: u32, name_ptr: u32, name_size: u32, id_ptr: u32| -> R {
            let name = String::from_utf8_lossy(&read_or_fail!(c, name_ptr, name_size)).into_owned();
            let (metric_kind, slot) = match kind {
                metric::COUNTER => (MetricKind::Counter, 0),
                metric::GAUGE => (MetricKind::Gauge, 1),
                metric::HISTOGRAM => (MetricKind::Histogram, 2),
                _ => return Ok(BAD_ARGUMENT),
            };
            let id = {
                let state = c.data_mut();
                state.last_metric_id[slot] += metric::ID_INCREMENT;
                let id = state.last_metric_id[slot];
                state.metric_ids.insert(id, name.clone());
                state.host.with_metrics(|m| {
                    m.entry(name).or_insert(MetricValue { kind: metric_kind, value: 0, samples: 0 });
                });
                id
            };
            Ok(if write_u32(&mut c, id_ptr, id)? { OK } else { INVALID_MEMORY })
        },
    )?;

    linker.func_wrap("env", "proxy_increment_metric", |c: C, id: u32, offset: i64| -> R {
        let state = c.data();
        let Some(name) = state.metric_ids.get(&id) else {
            return Ok(if id & metric::TYPE_MASK <= metric::GAUGE { NOT_FOUND } else { BAD_ARGUMENT });
        };
        Ok(state.host.with_metrics(|m| {
            let Some(value) = m.get_mut(name) else { return NOT_FOUND };
            match value.kind {
                // A counter only goes up: Envoy refuses offset <= 0.
                MetricKind::Counter if offset > 0 => {
                    value.value += offset;
                    OK
                }
                MetricKind::Counter => BAD_ARGUMENT,
                MetricKind::Gauge => {
                    value.value += offset;
                    OK
                }
                MetricKind::Histogram => BAD_ARGUMENT,
            }
        }))
    })?;

    linker.func_wrap("env", "proxy_record_metric", |c: C, id: u32, recorded: u64| -> R {
        let state = c.data();
        let Some(name) = state.metric_ids.get(&id) else { return Ok(NOT_FOUND) };
        Ok(state.host.with_metrics(|m| {
            let Some(value) = m.get_mut(name) else { return NOT_FOUND };
            match value.kind {
                // Envoy adds to a counter, sets a gauge, records into a histogram.
                MetricKind::Counter => value.value += recorded as i64,
                MetricKind::Gauge => value.value = recorded as i64,
                MetricKind::Histogram => {
                    value.value += recorded as i64;
                    value.samples += 1;
                }
            }
            OK
        }))
    })?;

    linker.func_wrap("env", "proxy_get_metric", |mut c: C, id: u32, ptr: u32| -> R {
        let value = {
            let state = c.data();
            let Some(name) = state.metric_ids.get(&id) else {
                return Ok(if id & metric::TYPE_MASK <= metric::GAUGE { NOT_FOUND } else { BAD_ARGUMENT });
            };
            match state.host.with_metrics(|m| m.get(name).cloned()) {
                Some(v) if v.kind != MetricKind::Histogram => v.value as u64,
                Some(_) => return Ok(BAD_ARGUMENT),
                None => return Ok(NOT_FOUND),
            }
        };
        Ok(if write_u64(&mut c, ptr, value)? { OK } else { INVALID_MEMORY })
    })?;

    // --- WASI, as far as the spec's "Functions exposed by the host" go ------------------------

    let fd_write = |mut c: C, fd: u32, iovs: u32, iovs_len: u32, written_ptr: u32| -> R {
        let level = match fd {
            1 => LogLevel::Info,
            2 => LogLevel::Error,
            _ => return Ok(WASI_BADF),
        };
        let mut message = Vec::new();
        for i in 0..iovs_len {
            let Some(iov) = read(&c, iovs.wrapping_add(i * 8), 8)? else { return Ok(WASI_FAULT) };
            let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
            let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            let Some(bytes) = read(&c, ptr, len)? else { return Ok(WASI_FAULT) };
            message.extend_from_slice(&bytes);
        }
        let written = message.len() as u32;
        c.data().log(level, String::from_utf8_lossy(&message).trim_end_matches('\n').to_owned());
        Ok(if write_u32(&mut c, written_ptr, written)? { WASI_SUCCESS } else { WASI_FAULT })
    };
    let clock_time_get = |mut c: C, clock: u32, _precision: u64, ptr: u32| -> R {
        if clock > 1 {
            return Ok(WASI_NOTSUP);
        }
        let now = c.data().host.clock().now_nanos();
        Ok(if write_u64(&mut c, ptr, now)? { WASI_SUCCESS } else { WASI_FAULT })
    };
    let random_get = |mut c: C, ptr: u32, len: u32| -> R {
        if len > 64 * 1024 {
            return Ok(WASI_INVAL);
        }
        // Not cryptographic: xorshift64, seeded per VM, so test runs are reproducible.
        let mut bytes = Vec::with_capacity(len as usize);
        let state = &mut c.data_mut().random_state;
        while bytes.len() < len as usize {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(len as usize);
        Ok(if write(&mut c, ptr, &bytes)? { WASI_SUCCESS } else { WASI_FAULT })
    };
    let zero_sizes = |mut c: C, count_ptr: u32, size_ptr: u32| -> R {
        Ok(if write_u32(&mut c, count_ptr, 0)? && write_u32(&mut c, size_ptr, 0)? { WASI_SUCCESS } else { WASI_FAULT })
    };
    let nothing_to_copy = |_: C, _: u32, _: u32| -> R { Ok(WASI_SUCCESS) };
    // WASI environ: `KEY=VALUE\0` strings in one buffer, and a pointer to each.
    let environ_sizes_get = |mut c: C, count_ptr: u32, size_ptr: u32| -> R {
        let env = c.data().env.clone();
        let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        Ok(if write_u32(&mut c, count_ptr, env.len() as u32)? && write_u32(&mut c, size_ptr, size as u32)? {
            WASI_SUCCESS
        } else {
            WASI_FAULT
        })
    };
    let environ_get = |mut c: C, environ_ptr: u32, buf_ptr: u32| -> R {
        let env = c.data().env.clone();
        let mut at = buf_ptr;
        for (i, (k, v)) in env.iter().enumerate() {
            let entry = format!("{k}={v}\0");
            if !write_u32(&mut c, environ_ptr + 4 * i as u32, at)? || !write(&mut c, at, entry.as_bytes())? {
                return Ok(WASI_FAULT);
            }
            at += entry.len() as u32;
        }
        Ok(WASI_SUCCESS)
    };
    let proc_exit =
        |_: C, code: u32| -> wasmtime::Result<()> { Err(wasmtime::Error::msg(format!("proc_exit({code})"))) };
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        linker.func_wrap(module, "fd_write", fd_write)?;
        linker.func_wrap(module, "clock_time_get", clock_time_get)?;
        linker.func_wrap(module, "random_get", random_get)?;
        linker.func_wrap(module, "environ_sizes_get", environ_sizes_get)?;
        linker.func_wrap(module, "environ_get", environ_get)?;
        linker.func_wrap(module, "args_sizes_get", zero_sizes)?;
        linker.func_wrap(module, "args_get", nothing_to_copy)?;
        linker.func_wrap(module, "proc_exit", proc_exit)?;
    }
    Ok(())
}
