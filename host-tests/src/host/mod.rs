//! A Proxy-Wasm ABI 0.2.1 host on wasmtime 48 that runs `filter.wasm` with Envoy's semantics,
//! so the filter's behaviour can be tested in-process, deterministically, without an Envoy.
//!
//! ```no_run
//! use tollgate_host_tests::host::{FilterModule, Host, HttpRequest, SharedStore, Vm};
//!
//! let host = Host::new(SharedStore::envoy());
//! host.clock().set_epoch_ms(1_709_214_330_250); // 2024-02-29T13:45:30.250Z
//! let policy = br#"{"identity": {"header": "x-user"}, "tier": {"default": "free"},
//!                   "tiers": {"free": {"limits": [{"window": "minute", "requests": 3}]}}}"#;
//! let mut vm = Vm::load(&host, FilterModule::release_filter(), policy).unwrap();
//! let exchange = vm.request(HttpRequest::post("/v1/chat/completions").header("x-user", "alice")).unwrap();
//! assert_eq!(exchange.header("x-ratelimit-remaining-requests").as_deref(), Some("2"));
//! ```
//!
//! - [`FilterModule`]: a compiled module (compile once per process; [`FilterModule::release_filter`]
//!   is the built `filter.wasm`). [`Vm::load`] instantiates it, runs `_initialize`, creates the root
//!   context, `proxy_on_vm_start`, then `proxy_on_configure` with the plugin configuration.
//! - [`Host`]: what the VMs of one "proxy" share — the [`SharedStore`], the [`Clock`] behind
//!   `proxy_get_current_time_nanoseconds`, the metrics and the captured log. VMs of one host may run
//!   on different threads, like Envoy's worker threads.
//! - [`Vm::request`]: one HTTP stream through the filter, returning an [`Exchange`]; the upstream is
//!   a closure ([`Vm::set_upstream`]).
//!
//! Where the semantics come from (read, not copied):
//! - proxy-wasm/spec `abi-versions/v0.2.1/README.md`: signatures, status and enum values, the
//!   pairs serialization, `set_buffer_bytes` argument meaning.
//! - proxy-wasm-cpp-host `src/wasm.cc` (start-up order, `malloc` lookup), `src/context.cc`
//!   (`onStart`, `onConfigure`, `onCreate`, the `on*` callbacks), `src/exports.cc` (each host
//!   function's checks and memory handling), `src/shared_data.cc` + `src/shared_data.h` (shared
//!   data and the cas counter), `src/pairs_util.cc` (pairs parsing).
//! - Envoy `source/extensions/common/wasm/context.cc` (header maps, buffers and `copyFrom`,
//!   properties, local replies, metrics, the HTTP stream callbacks, `log`/`onDestroy`),
//!   `source/common/http/conn_manager_impl.cc` (`doDeferredStreamDestroy`: log, then destroy),
//!   `source/common/http/utility.cc` (`prepareLocalReply`).
//! - Kong ngx_wasm_module `src/common/shm/ngx_wa_shm_kv.c` for [`CasSemantics::Ngx`].
//!
//! Simplifications, all deliberate: one stream at a time per VM; no timers fire on their own
//! ([`Vm::tick`]); no HTTP/gRPC callouts (every cluster is unknown); a pause that nothing can
//! resume is an error ([`HostError::Stalled`]) rather than a hung request; a trap fails the VM and
//! surfaces as [`HostError::Trap`] instead of Envoy's 503; body buffers are unavailable (NotFound)
//! outside body callbacks; request properties read the request as it arrived.

mod abi;
mod http;
mod imports;
mod shared;
mod vm;

pub use abi::{decode_pairs, encode_pairs, LogLevel, Status};
pub use http::{Exchange, HeaderList, HttpRequest, LocalReply, UpstreamRequest, UpstreamResponse};
pub use shared::{CasSemantics, SharedStats, SharedStore};
pub use vm::{Clock, ConfigureError, FilterModule, Flavour, Host, HostError, LogEntry, Vm};
