// A minimal Proxy-Wasm host on Node's V8, to profile filter.wasm in the engine Envoy uses (not a
// test host: host-tests' wasmtime host is the faithful one). It runs the requests of one gateway
// benchmark case in a loop, as Envoy would call the filter (context create, request headers,
// request body, response headers, response body per piece, log, done, delete), with V8's
// optimising compiler only (`--no-liftoff`, as proxy-wasm-cpp-host sets it for Envoy).
//
//   node --no-liftoff [--perf-basic-prof] run.mjs CASE_DIR SECONDS
//
// CASE_DIR (written by host-tests/tests/filter_profile.rs `v8`): filter.wasm, policy.json,
// request.json, response.json (status, headers, pieces).

import fs from "node:fs";
import path from "node:path";

const [dir, secondsArg] = process.argv.slice(2);
const seconds = Number(secondsArg || "10");
const wasm = fs.readFileSync(path.join(dir, "filter.wasm"));
const policy = fs.readFileSync(path.join(dir, "policy.json"));
const request = JSON.parse(fs.readFileSync(path.join(dir, "request.json"), "utf8"));
const response = JSON.parse(fs.readFileSync(path.join(dir, "response.json"), "utf8"));

const OK = 0, NOT_FOUND = 1, BAD_ARGUMENT = 2, CAS_MISMATCH = 8;
const enc = new TextEncoder();
const dec = new TextDecoder();
let memory, ex;
const u8 = () => new Uint8Array(memory.buffer);
const dv = () => new DataView(memory.buffer);
const bytesAt = (p, n) => u8().slice(p, p + n);
const strAt = (p, n) => dec.decode(u8().subarray(p, p + n));

function give(bytes, ptrPtr, sizePtr) {
  const p = ex.malloc(bytes.length || 1);
  u8().set(bytes, p);
  dv().setUint32(ptrPtr, p, true);
  dv().setUint32(sizePtr, bytes.length, true);
}

function serializePairs(list) {
  const parts = list.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
  let size = 4 + parts.length * 8;
  for (const [k, v] of parts) size += k.length + v.length + 2;
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint32(0, parts.length, true);
  let o = 4;
  for (const [k, v] of parts) {
    view.setUint32(o, k.length, true);
    view.setUint32(o + 4, v.length, true);
    o += 8;
  }
  for (const [k, v] of parts) {
    out.set(k, o); o += k.length + 1;
    out.set(v, o); o += v.length + 1;
  }
  return out;
}

// The stream's state.
let maps = {};
let buffers = {};
const shared = new Map();
let localReplies = 0;
let sharedCas = 1;

const env = {
  proxy_log: () => OK,
  proxy_set_effective_context: () => OK,
  proxy_get_current_time_nanoseconds: (ret) => {
    dv().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true);
    return OK;
  },
  proxy_set_tick_period_milliseconds: () => OK,
  proxy_define_metric: (_type, _p, _n, ret) => { dv().setUint32(ret, 1, true); return OK; },
  proxy_increment_metric: () => OK,
  proxy_get_property: (p, n, retPtr, retSize) => {
    const key = strAt(p, n).split("\0").filter((s) => s.length).join(".");
    if (key === "source.address") { give(enc.encode("127.0.0.1:40000"), retPtr, retSize); return OK; }
    if (key === "plugin_root_id") { give(enc.encode(""), retPtr, retSize); return OK; }
    return NOT_FOUND;
  },
  proxy_set_property: () => OK,
  proxy_get_header_map_pairs: (type, retPtr, retSize) => {
    give(serializePairs(maps[type] || []), retPtr, retSize);
    return OK;
  },
  proxy_set_header_map_pairs: () => OK,
  proxy_get_header_map_value: (type, kp, kn, retPtr, retSize) => {
    const key = strAt(kp, kn);
    const found = (maps[type] || []).find(([k]) => k === key);
    if (!found) return NOT_FOUND;
    give(enc.encode(found[1]), retPtr, retSize);
    return OK;
  },
  proxy_replace_header_map_value: (type, kp, kn, vp, vn) => {
    const key = strAt(kp, kn), value = strAt(vp, vn);
    const list = (maps[type] ||= []);
    const kept = list.filter(([k]) => k !== key);
    kept.push([key, value]);
    maps[type] = kept;
    return OK;
  },
  proxy_add_header_map_value: (type, kp, kn, vp, vn) => {
    (maps[type] ||= []).push([strAt(kp, kn), strAt(vp, vn)]);
    return OK;
  },
  proxy_remove_header_map_value: (type, kp, kn) => {
    const key = strAt(kp, kn);
    maps[type] = (maps[type] || []).filter(([k]) => k !== key);
    return OK;
  },
  proxy_get_buffer_bytes: (type, start, max, retPtr, retSize) => {
    const b = buffers[type];
    if (!b) return NOT_FOUND;
    give(b.subarray(start, Math.min(b.length, start + max)), retPtr, retSize);
    return OK;
  },
  proxy_set_buffer_bytes: (type, start, size, p, n) => {
    const b = buffers[type] || new Uint8Array(0);
    const data = bytesAt(p, n);
    const out = new Uint8Array(b.length - Math.min(size, b.length - start) + n);
    out.set(b.subarray(0, start), 0);
    out.set(data, start);
    out.set(b.subarray(Math.min(b.length, start + size)), start + n);
    buffers[type] = out;
    return OK;
  },
  proxy_get_shared_data: (kp, kn, retPtr, retSize, retCas) => {
    const entry = shared.get(strAt(kp, kn));
    if (!entry) return NOT_FOUND;
    give(entry.value, retPtr, retSize);
    dv().setUint32(retCas, entry.cas, true);
    return OK;
  },
  proxy_set_shared_data: (kp, kn, vp, vn, cas) => {
    const key = strAt(kp, kn);
    const entry = shared.get(key);
    if (cas !== 0 && entry && entry.cas !== cas) return CAS_MISMATCH;
    shared.set(key, { value: bytesAt(vp, vn), cas: sharedCas++ });
    return OK;
  },
  proxy_send_local_response: () => { localReplies++; return OK; },
  proxy_continue_stream: () => OK,
  proxy_close_stream: () => OK,
  proxy_get_status: () => NOT_FOUND,
  proxy_done: () => OK,
  proxy_http_call: () => BAD_ARGUMENT,
  proxy_grpc_call: () => BAD_ARGUMENT,
  proxy_grpc_stream: () => BAD_ARGUMENT,
  proxy_grpc_send: () => BAD_ARGUMENT,
  proxy_grpc_cancel: () => BAD_ARGUMENT,
  proxy_grpc_close: () => BAD_ARGUMENT,
  proxy_register_shared_queue: () => BAD_ARGUMENT,
  proxy_resolve_shared_queue: () => NOT_FOUND,
  proxy_enqueue_shared_queue: () => NOT_FOUND,
  proxy_dequeue_shared_queue: () => NOT_FOUND,
  proxy_call_foreign_function: () => NOT_FOUND,
};
const wasi = {
  environ_sizes_get: (countPtr, sizePtr) => { dv().setUint32(countPtr, 0, true); dv().setUint32(sizePtr, 0, true); return 0; },
  environ_get: () => 0,
};

const instance = new WebAssembly.Instance(new WebAssembly.Module(wasm), { env, wasi_snapshot_preview1: wasi });
ex = instance.exports;
memory = ex.memory;
ex._initialize();
const ROOT = 1;
ex.proxy_on_context_create(ROOT, 0);
buffers[6] = new Uint8Array(0);
ex.proxy_on_vm_start(ROOT, 0);
buffers[7] = policy;
if (!ex.proxy_on_configure(ROOT, policy.length)) throw new Error("the filter refused the policy");

const requestBody = enc.encode(request.body);
const pieces = response.pieces.map((p) => enc.encode(p));
let next = 2;
function one() {
  const ctx = next++;
  maps = { 0: request.headers.map(([k, v]) => [k, v]), 2: [] };
  buffers = { 7: policy };
  ex.proxy_on_context_create(ctx, ROOT);
  ex.proxy_on_request_headers(ctx, maps[0].length, 0);
  buffers[0] = requestBody;
  ex.proxy_on_request_body(ctx, requestBody.length, 1);
  maps[2] = response.headers.map(([k, v]) => [k, v]);
  ex.proxy_on_response_headers(ctx, maps[2].length, 0);
  for (let i = 0; i < pieces.length; i++) {
    buffers[1] = pieces[i];
    ex.proxy_on_response_body(ctx, pieces[i].length, i + 1 === pieces.length ? 1 : 0);
  }
  ex.proxy_on_log(ctx);
  ex.proxy_on_done(ctx);
  ex.proxy_on_delete(ctx);
}

for (let i = 0; i < 2000; i++) one();
const warmBytes = memory.buffer.byteLength;
if (localReplies) throw new Error(`the filter answered ${localReplies} warm-up requests itself`);
const started = process.hrtime.bigint();
let n = 0;
while (Number(process.hrtime.bigint() - started) < seconds * 1e9) {
  for (let i = 0; i < 100; i++) one();
  n += 100;
}
const us = Number(process.hrtime.bigint() - started) / 1000 / n;
console.log(`${n} requests, ${us.toFixed(1)} µs per request in Node ${process.version} (V8 ${process.versions.v8}), host included; local replies: ${localReplies}; linear memory ${warmBytes / 65536} pages after warm-up, ${memory.buffer.byteLength / 65536} at the end`);
