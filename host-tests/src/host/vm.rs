//! The host environment ([`Host`]), compiled modules ([`FilterModule`]) and VM instances
//! ([`Vm`]) with their context and stream lifecycle.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Engine, Instance, Linker, Memory, Module, Store, TypedFunc, WasmParams, WasmResults};

use super::abi::{buffer, map, LogLevel};
use super::http::{lower, Exchange, HeaderList, HttpRequest, LocalReply, UpstreamRequest, UpstreamResponse};
use super::imports;
use super::shared::SharedStore;

// ---------------------------------------------------------------------------------------------
// Modules

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        // `scripts/profile-filter.sh`: perf names the guest's functions from /tmp/perf-PID.map.
        if std::env::var_os("TOLLGATE_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        Engine::new(&config).unwrap_or_else(|e| panic!("wasmtime engine: {e:#}"))
    })
}

/// A compiled guest module. Compiling is the slow part; instantiating ([`Vm::load`]) is cheap,
/// and a module is shared by any number of VMs on any number of threads.
pub struct FilterModule {
    module: Module,
    name: String,
}

impl FilterModule {
    pub fn from_bytes(name: &str, wasm: &[u8]) -> Result<FilterModule, HostError> {
        let module =
            Module::new(engine(), wasm).map_err(|e| HostError::Setup(format!("cannot compile {name}: {e:#}")))?;
        Ok(FilterModule { module, name: name.to_owned() })
    }

    pub fn from_file(path: &Path) -> Result<FilterModule, HostError> {
        let bytes =
            std::fs::read(path).map_err(|e| HostError::Setup(format!("cannot read {}: {e}", path.display())))?;
        FilterModule::from_bytes(&path.display().to_string(), &bytes)
    }

    /// The release `filter.wasm` ([`crate::proc::filter_wasm_path`]), compiled once per process.
    ///
    /// Panics with the command to run when the file is missing or older than one of the sources
    /// cargo's dep-info (`tollgate_filter.d`) lists for it, so a test never runs a stale build.
    pub fn release_filter() -> &'static FilterModule {
        static FILTER: OnceLock<FilterModule> = OnceLock::new();
        FILTER.get_or_init(|| {
            let path = crate::proc::filter_wasm_path();
            let build = "cargo build -p tollgate-filter --target wasm32-unknown-unknown --profile wasm";
            let built = match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => t,
                Err(e) => panic!("filter.wasm is not built ({}: {e}); build it first with `{build}`", path.display()),
            };
            if let Some(source) = newer_source(&path.with_extension("d"), built) {
                panic!("{} is older than {} — rebuild it with `{build}`", path.display(), source.display());
            }
            FilterModule::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(module, name)` of every import, as the linker must satisfy them.
    pub fn imports(&self) -> Vec<(String, String)> {
        self.module.imports().map(|i| (i.module().to_owned(), i.name().to_owned())).collect()
    }

    /// Names of every export.
    pub fn exports(&self) -> Vec<String> {
        self.module.exports().map(|e| e.name().to_owned()).collect()
    }
}

/// A source listed in a cargo dep-info file (`target: dep dep ...`, spaces escaped as `\ `)
/// that was modified after `built`.
fn newer_source(dep_info: &Path, built: SystemTime) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dep_info).ok()?;
    let first = text.lines().next()?;
    let (_, deps) = first.split_once(": ")?;
    deps.replace("\\ ", "\0")
        .split_whitespace()
        .map(|dep| PathBuf::from(dep.replace('\0', " ")))
        .find(|dep| std::fs::metadata(dep).and_then(|m| m.modified()).is_ok_and(|t| t > built))
}

// ---------------------------------------------------------------------------------------------
// The environment shared by VMs

/// The clock behind `proxy_get_current_time_nanoseconds`. Real time unless a test fixes it.
/// Cloning shares it.
#[derive(Clone, Default)]
pub struct Clock(Arc<AtomicU64>);

/// `Clock` value meaning "read the system clock". (Epoch nanos would reach it in year 2554.)
const REAL_TIME: u64 = 0;
/// `Clock` value meaning "the host cannot tell the time" (`proxy_get_current_time_nanoseconds`
/// answers InternalFailure).
const BROKEN: u64 = u64::MAX;

impl Clock {
    pub fn set_epoch_ms(&self, ms: u64) {
        self.set_epoch_nanos(ms * 1_000_000);
    }

    pub fn set_epoch_nanos(&self, nanos: u64) {
        self.0.store(nanos.clamp(1, BROKEN - 1), Ordering::SeqCst);
    }

    /// Moves a fixed clock forward (a real clock is fixed at "now" first).
    pub fn advance_ms(&self, ms: u64) {
        let now = self.now_nanos();
        self.set_epoch_nanos(now + ms * 1_000_000);
    }

    pub fn use_real_time(&self) {
        self.0.store(REAL_TIME, Ordering::SeqCst);
    }

    /// From now on the guest's time calls fail (until a `set_*` or `use_real_time`).
    pub fn break_it(&self) {
        self.0.store(BROKEN, Ordering::SeqCst);
    }

    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::SeqCst) == BROKEN
    }

    pub fn now_nanos(&self) -> u64 {
        match self.0.load(Ordering::SeqCst) {
            REAL_TIME => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            fixed => fixed,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_nanos() / 1_000_000
    }
}

/// One `proxy_log` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    /// Which VM of the host logged it ([`Vm::index`]).
    pub vm: usize,
    /// The context the guest was running in (the root context during configuration).
    pub context_id: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
pub(crate) struct MetricValue {
    pub kind: MetricKind,
    /// Counter and gauge value; for a histogram the sum of the recorded values.
    pub value: i64,
    pub samples: u64,
}

/// What a group of VMs shares, like one Envoy process running one plugin on several worker
/// threads: the shared-data store, the clock, the stats (Envoy's stats live in one store, so VMs
/// that define the same metric name update the same stat) and the log. Cloning shares it.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

/// Which proxy-wasm host the [`Host`] behaves like, where hosts differ in how a request
/// reaches the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    /// Envoy with `allow_on_headers_stop_iteration: true` (what Tollgate's configs ask for):
    /// request headers held by the filter stay modifiable while the body flows to it.
    #[default]
    Envoy,
    /// Envoy without that flag (e.g. an Istio `WasmPlugin`): a filter that holds the request
    /// headers gets no body callback until it resumes (proxy-wasm-cpp-host `context.cc`:
    /// StopIteration becomes StopAllIterationAndWatermark). The host then only ticks the root
    /// context (the clock advancing by the tick period), as time passing would, until the
    /// stream is answered or a minute has passed.
    EnvoyWithoutHeaderStop,
    /// Kong's ngx_wasm_module (docs/PROXY_WASM.md, `src/http/proxy_wasm/ngx_http_proxy_wasm.c`):
    /// `proxy_on_request_headers` always says end_of_stream false; a pause returned from it is
    /// never resumed (the request hangs: [`HostError::Stalled`]); the body arrives once, whole,
    /// with end_of_stream true, before the request is proxied, with the request headers still
    /// modifiable — and not at all when it is empty; `ngx.*` properties are refused outside a
    /// request (InternalFailure) and answered inside one. Use it with [`CasSemantics::Ngx`].
    Ngx,
}

struct HostInner {
    flavour: Flavour,
    shared: SharedStore,
    vm_id: String,
    clock: Clock,
    metrics: Mutex<BTreeMap<String, MetricValue>>,
    logs: Mutex<Vec<LogEntry>>,
    vms: AtomicUsize,
    echo_logs: bool,
    /// Count every host call by name ([`Host::counting_host_calls`]).
    count_calls: bool,
}

impl Host {
    /// A host whose VMs use the VM id `tollgate` (shared data is per VM id).
    pub fn new(shared: SharedStore) -> Host {
        Host::with_vm_id(shared, "tollgate")
    }

    /// A host of another [`Flavour`].
    pub fn with_flavour(shared: SharedStore, flavour: Flavour) -> Host {
        let host = Host::with_vm_id(shared, "tollgate");
        let mut inner = Arc::try_unwrap(host.inner).unwrap_or_else(|_| unreachable!("a new host has one owner"));
        inner.flavour = flavour;
        Host { inner: Arc::new(inner) }
    }

    /// This host, its VMs counting every host call the guest makes, by name
    /// ([`Vm::take_host_calls`]): for measurements (every call goes through a dynamic wrapper).
    pub fn counting_host_calls(self) -> Host {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|_| panic!("count host calls before loading a VM"));
        inner.count_calls = true;
        Host { inner: Arc::new(inner) }
    }

    /// The flavour this host behaves like.
    pub fn flavour(&self) -> Flavour {
        self.inner.flavour
    }

    pub fn with_vm_id(shared: SharedStore, vm_id: &str) -> Host {
        Host {
            inner: Arc::new(HostInner {
                flavour: Flavour::Envoy,
                shared,
                vm_id: vm_id.to_owned(),
                clock: Clock::default(),
                metrics: Mutex::new(BTreeMap::new()),
                logs: Mutex::new(Vec::new()),
                vms: AtomicUsize::new(0),
                echo_logs: std::env::var_os("TOLLGATE_WASM_LOG").is_some(),
                count_calls: false,
            }),
        }
    }

    pub fn shared(&self) -> &SharedStore {
        &self.inner.shared
    }

    pub fn vm_id(&self) -> &str {
        &self.inner.vm_id
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// A counter's or gauge's value (a histogram's sum), by the name the guest defined.
    /// Envoy exports these as `wasmcustom.<name>`.
    pub fn metric(&self, name: &str) -> Option<i64> {
        lock(&self.inner.metrics).get(name).map(|m| m.value)
    }

    /// Every metric by name.
    pub fn metrics(&self) -> BTreeMap<String, i64> {
        lock(&self.inner.metrics).iter().map(|(k, v)| (k.clone(), v.value)).collect()
    }

    /// Everything logged so far, by every VM of this host.
    pub fn logs(&self) -> Vec<LogEntry> {
        lock(&self.inner.logs).clone()
    }

    /// Log messages containing `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<LogEntry> {
        lock(&self.inner.logs).iter().filter(|e| e.message.contains(needle)).cloned().collect()
    }

    pub(crate) fn log(&self, entry: LogEntry) {
        if self.inner.echo_logs {
            eprintln!("[wasm vm{} ctx{} {:?}] {}", entry.vm, entry.context_id, entry.level, entry.message);
        }
        lock(&self.inner.logs).push(entry);
    }

    fn log_len(&self) -> usize {
        lock(&self.inner.logs).len()
    }

    fn logs_since(&self, mark: usize, vm: usize, min: LogLevel) -> Vec<String> {
        lock(&self.inner.logs)
            .iter()
            .skip(mark)
            .filter(|e| e.vm == vm && e.level >= min)
            .map(|e| format!("[{:?}] {}", e.level, e.message))
            .collect()
    }

    pub(crate) fn with_metrics<R>(&self, f: impl FnOnce(&mut BTreeMap<String, MetricValue>) -> R) -> R {
        f(&mut lock(&self.inner.metrics))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Something went wrong running the guest.
#[derive(Debug, Clone)]
pub enum HostError {
    /// The guest trapped (a Rust panic aborts into `unreachable`). cpp-host then marks the VM
    /// failed (`FailState::RuntimeError`) and Envoy answers 503 to this and every later request
    /// on it (envoyproxy/envoy#34881).
    Trap { callback: &'static str, context_id: u32, message: String, guest_log: Vec<String> },
    /// A call into a VM that trapped earlier.
    VmFailed { first_trap: String },
    /// The guest paused the stream and nothing will resume it: this host has no asynchronous
    /// events, and Envoy would hold the request until a timeout.
    Stalled { callback: &'static str, context_id: u32 },
    /// Compiling, linking or instantiating failed, or a required export is missing.
    Setup(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Trap { callback, context_id, message, guest_log } => {
                write!(f, "the guest trapped in {callback} (context {context_id}): {message}")?;
                if !guest_log.is_empty() {
                    write!(f, "\nguest log before the trap:\n  {}", guest_log.join("\n  "))?;
                }
                write!(f, "\n(a trapped VM is failed: Envoy answers 503 to every later request on it)")
            }
            HostError::VmFailed { first_trap } => {
                write!(f, "the VM failed earlier and takes no more calls; {first_trap}")
            }
            HostError::Stalled { callback, context_id } => write!(
                f,
                "{callback} (context {context_id}) paused the stream without a local reply and nothing can resume it"
            ),
            HostError::Setup(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for HostError {}

/// Why [`Vm::load`] did not give a configured VM.
#[derive(Debug, Clone)]
pub enum ConfigureError {
    /// `proxy_on_configure` returned false: the host refuses the plugin. `log` holds what the
    /// guest logged at warn level or above while configuring.
    Rejected {
        log: Vec<String>,
    },
    /// `proxy_on_vm_start` returned false.
    VmStartFailed {
        log: Vec<String>,
    },
    Host(HostError),
}

impl ConfigureError {
    /// The guest's log lines (empty for host errors).
    pub fn log(&self) -> &[String] {
        match self {
            ConfigureError::Rejected { log } | ConfigureError::VmStartFailed { log } => log,
            ConfigureError::Host(_) => &[],
        }
    }
}

impl fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigureError::Rejected { log } => {
                write!(f, "proxy_on_configure returned false; guest log: {}", log.join(" | "))
            }
            ConfigureError::VmStartFailed { log } => {
                write!(f, "proxy_on_vm_start returned false; guest log: {}", log.join(" | "))
            }
            ConfigureError::Host(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConfigureError {}

impl From<HostError> for ConfigureError {
    fn from(e: HostError) -> Self {
        ConfigureError::Host(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Per-VM state seen by the host functions

/// Which callbacks may touch a header map (Envoy keeps a pointer to the map only while the
/// filter is in — or paused from — the callback that owns it, and exposes read-only access-log
/// copies during `proxy_on_log`: `Context::decodeHeaders`/`encodeHeaders`/`log` in
/// `source/extensions/common/wasm/context.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) enum Access {
    #[default]
    None,
    Read,
    ReadWrite,
}

/// One HTTP stream in flight.
#[derive(Default)]
pub(crate) struct Stream {
    pub id: u32,
    pub original_request: HeaderList,
    pub request_headers: HeaderList,
    pub request_access: Access,
    pub request_body: Vec<u8>,
    pub request_body_open: bool,
    pub response_headers: HeaderList,
    pub response_access: Access,
    pub response_body: Vec<u8>,
    pub response_body_open: bool,
    pub response_code: Option<u16>,
    pub source_address: Option<String>,
    pub destination_address: Option<String>,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    // Actions the guest asked for during a callback; Envoy runs them after it returns
    // (`DeferAfterCallActions`, `addAfterVmCallAction`).
    pub local_reply: Option<LocalReply>,
    pub local_reply_sent: bool,
    pub continue_request: bool,
    pub continue_response: bool,
    pub close: bool,
}

pub(crate) type SharedSetHook = Box<dyn FnMut(&[u8], u32) + Send>;

pub(crate) struct VmState {
    pub host: Host,
    pub vm: usize,
    pub memory: Option<Memory>,
    pub malloc: Option<TypedFunc<u32, u32>>,
    pub root_id: u32,
    /// The context whose callback is running.
    pub active: u32,
    /// Set by `proxy_set_effective_context` for the rest of the callback.
    pub effective: Option<u32>,
    /// The plugin configuration, visible only during `proxy_on_configure` (Envoy's
    /// `temp_plugin_`).
    pub plugin_config: Option<Vec<u8>>,
    pub vm_config: Vec<u8>,
    pub stream: Option<Stream>,
    pub metric_ids: HashMap<u32, String>,
    /// Last id handed out per metric type (counter, gauge, histogram).
    pub last_metric_id: [u32; 3],
    pub tick_period_ms: u32,
    pub shared_set_hook: Option<SharedSetHook>,
    pub random_state: u64,
    /// What WASI `environ_get` serves: Envoy's `vm_config.environment_variables`.
    pub env: Vec<(String, String)>,
    /// Host calls by name, when the host counts them.
    pub calls: BTreeMap<String, u64>,
}

impl VmState {
    pub fn current_context(&self) -> u32 {
        self.effective.unwrap_or(self.active)
    }

    /// The stream the current context belongs to, if it is a stream context.
    pub fn stream(&self) -> Option<&Stream> {
        let ctx = self.current_context();
        self.stream.as_ref().filter(|s| s.id == ctx)
    }

    pub fn stream_mut(&mut self) -> Option<&mut Stream> {
        let ctx = self.current_context();
        self.stream.as_mut().filter(|s| s.id == ctx)
    }

    /// A header map the current callback may read (Envoy `getConstMap`).
    pub fn map(&self, kind: u32) -> Option<&HeaderList> {
        let s = self.stream()?;
        match kind {
            map::HTTP_REQUEST_HEADERS if s.request_access >= Access::Read => Some(&s.request_headers),
            map::HTTP_RESPONSE_HEADERS if s.response_access >= Access::Read => Some(&s.response_headers),
            _ => None,
        }
    }

    /// A header map the current callback may modify (Envoy `getMap`).
    pub fn map_mut(&mut self, kind: u32) -> Option<&mut HeaderList> {
        let s = self.stream_mut()?;
        match kind {
            map::HTTP_REQUEST_HEADERS if s.request_access == Access::ReadWrite => Some(&mut s.request_headers),
            map::HTTP_RESPONSE_HEADERS if s.response_access == Access::ReadWrite => Some(&mut s.response_headers),
            _ => None,
        }
    }

    /// A buffer's bytes, `None` when it is not available now (NotFound).
    pub fn buffer(&self, kind: u32) -> Option<&[u8]> {
        match kind {
            buffer::VM_CONFIGURATION => Some(&self.vm_config),
            buffer::PLUGIN_CONFIGURATION => self.plugin_config.as_deref(),
            buffer::HTTP_REQUEST_BODY => {
                self.stream().filter(|s| s.request_body_open).map(|s| s.request_body.as_slice())
            }
            buffer::HTTP_RESPONSE_BODY => {
                self.stream().filter(|s| s.response_body_open).map(|s| s.response_body.as_slice())
            }
            _ => None,
        }
    }

    /// A buffer to modify: `Err(true)` when it exists but is immutable (the configurations),
    /// `Err(false)` when it is not available.
    pub fn buffer_mut(&mut self, kind: u32) -> Result<&mut Vec<u8>, bool> {
        match kind {
            buffer::VM_CONFIGURATION => Err(true),
            buffer::PLUGIN_CONFIGURATION if self.plugin_config.is_some() => Err(true),
            buffer::HTTP_REQUEST_BODY => match self.stream_mut() {
                Some(s) if s.request_body_open => Ok(&mut s.request_body),
                _ => Err(false),
            },
            buffer::HTTP_RESPONSE_BODY => match self.stream_mut() {
                Some(s) if s.response_body_open => Ok(&mut s.response_body),
                _ => Err(false),
            },
            _ => Err(false),
        }
    }

    pub fn log(&self, level: LogLevel, message: String) {
        self.host.log(LogEntry { level, message, vm: self.vm, context_id: self.current_context() });
    }
}

// ---------------------------------------------------------------------------------------------
// VMs

/// The guest's callbacks (all optional, as the spec says; cpp-host `WasmBase::getFunctions`).
#[derive(Clone)]
struct Callbacks {
    on_context_create: Option<TypedFunc<(u32, u32), ()>>,
    on_vm_start: Option<TypedFunc<(u32, u32), u32>>,
    on_configure: Option<TypedFunc<(u32, u32), u32>>,
    on_request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_done: Option<TypedFunc<u32, u32>>,
    on_log: Option<TypedFunc<u32, ()>>,
    on_delete: Option<TypedFunc<u32, ()>>,
    on_tick: Option<TypedFunc<u32, ()>>,
}

type Upstream = Box<dyn FnMut(&UpstreamRequest) -> UpstreamResponse + Send>;

/// One instance of a guest module with its root context configured — what Envoy runs per worker
/// thread. A `Vm` is `Send` (move it to a thread) but runs one stream at a time.
pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    callbacks: Callbacks,
    host: Host,
    index: usize,
    root_id: u32,
    next_context_id: u32,
    failed: Option<String>,
    upstream: Upstream,
}

/// Which side a `proxy_continue_stream` must be for to resume a pause.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// What the stream does after a callback returned and its deferred actions ran.
enum Next {
    Proceed,
    Paused,
    LocalReply,
    Reset,
}

fn default_upstream(_: &UpstreamRequest) -> UpstreamResponse {
    UpstreamResponse::new(200).header("content-type", "application/json").body(
        r#"{"id":"chatcmpl-host","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#,
    )
}

impl Vm {
    /// Instantiates `module` and starts it the way proxy-wasm-cpp-host and Envoy do:
    /// `_initialize` (then `main(0, 0)` if exported; `_start` only when there is no
    /// `_initialize`) — `WasmBase::initialize`, `src/wasm.cc`; then for the root context
    /// `proxy_on_context_create(root, 0)` and `proxy_on_vm_start(root, vm_config_size)`
    /// (`ContextBase::onStart`, `src/context.cc`), then `proxy_on_configure(root,
    /// plugin_config_size)` with the plugin configuration readable through
    /// `proxy_get_buffer_bytes(PLUGIN_CONFIGURATION)` (`ContextBase::onConfigure`).
    pub fn load(host: &Host, module: &FilterModule, plugin_config: &[u8]) -> Result<Vm, ConfigureError> {
        Vm::load_with_vm_config(host, module, plugin_config, b"")
    }

    /// As [`Vm::load`], with environment variables the VM reads through WASI `environ_get`
    /// (Envoy: `vm_config.environment_variables`, `host_env_keys` or `key_values`).
    pub fn load_with_env(host: &Host, module: &FilterModule, plugin_config: &[u8], env: &[(&str, &str)]) -> Result<Vm, ConfigureError> {
        Vm::load_full(host, module, plugin_config, b"", env)
    }

    pub fn load_with_vm_config(
        host: &Host,
        module: &FilterModule,
        plugin_config: &[u8],
        vm_config: &[u8],
    ) -> Result<Vm, ConfigureError> {
        Vm::load_full(host, module, plugin_config, vm_config, &[])
    }

    /// The host calls counted since the last take ([`Host::counting_host_calls`]).
    pub fn take_host_calls(&mut self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.store.data_mut().calls)
    }

    fn load_full(
        host: &Host,
        module: &FilterModule,
        plugin_config: &[u8],
        vm_config: &[u8],
        env: &[(&str, &str)],
    ) -> Result<Vm, ConfigureError> {
        let setup = |what: &str, e: wasmtime::Error| HostError::Setup(format!("{what} {}: {e:#}", module.name));
        let engine = module.module.engine();
        let mut linker = Linker::new(engine);
        imports::define(&mut linker).map_err(|e| setup("cannot define the host functions for", e))?;
        let index = host.inner.vms.fetch_add(1, Ordering::SeqCst);
        let state = VmState {
            host: host.clone(),
            vm: index,
            memory: None,
            malloc: None,
            root_id: 1,
            active: 0,
            effective: None,
            plugin_config: None,
            vm_config: vm_config.to_vec(),
            stream: None,
            metric_ids: HashMap::new(),
            last_metric_id: [0, 1, 2],
            tick_period_ms: 0,
            shared_set_hook: None,
            random_state: 0x9e37_79b9_7f4a_7c15 ^ index as u64,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            calls: BTreeMap::new(),
        };
        let mut store = Store::new(engine, state);
        let linker = if host.inner.count_calls { counting(&linker, &mut store).map_err(|e| setup("cannot count the host calls of", e))? } else { linker };
        let instance = linker.instantiate(&mut store, &module.module).map_err(|e| setup("cannot instantiate", e))?;

        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| HostError::Setup(format!("{} exports no memory", module.name)))?;
        // cpp-host `WasmBase::getFunctions` looks for `malloc` first, then
        // `proxy_on_memory_allocate` (the spec prefers the latter; the Rust SDK exports its
        // allocator as `malloc` on wasm32-unknown-unknown).
        let malloc = ["malloc", "proxy_on_memory_allocate"]
            .iter()
            .find_map(|name| instance.get_typed_func::<u32, u32>(&mut store, name).ok())
            .ok_or_else(|| HostError::Setup(format!("{} is missing malloc function", module.name)))?;
        let abi = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"]
            .iter()
            .any(|name| instance.get_func(&mut store, name).is_some());
        if !abi {
            return Err(HostError::Setup(format!(
                "{} does not export proxy_abi_version_0_2_1 (or 0_2_0)",
                module.name
            ))
            .into());
        }
        store.data_mut().memory = Some(memory);
        store.data_mut().malloc = Some(malloc);

        let callbacks = Callbacks {
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            on_vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            on_configure: typed(&instance, &mut store, "proxy_on_configure")?,
            on_request_headers: typed(&instance, &mut store, "proxy_on_request_headers")?,
            on_request_body: typed(&instance, &mut store, "proxy_on_request_body")?,
            on_response_headers: typed(&instance, &mut store, "proxy_on_response_headers")?,
            on_response_body: typed(&instance, &mut store, "proxy_on_response_body")?,
            on_done: typed(&instance, &mut store, "proxy_on_done")?,
            on_log: typed(&instance, &mut store, "proxy_on_log")?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete")?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick")?,
        };
        let initialize = typed::<(), ()>(&instance, &mut store, "_initialize")?;
        let main = typed::<(u32, u32), u32>(&instance, &mut store, "main")?;
        let start = typed::<(), ()>(&instance, &mut store, "_start")?;

        let mut vm = Vm {
            store,
            instance,
            callbacks,
            host: host.clone(),
            index,
            root_id: 1,
            next_context_id: 2,
            failed: None,
            upstream: Box::new(default_upstream),
        };

        if initialize.is_some() {
            vm.invoke("_initialize", 0, initialize, ())?;
            vm.invoke("main", 0, main, (0, 0))?;
        } else {
            vm.invoke("_start", 0, start, ())?;
        }

        let root = vm.root_id;
        let mark = host.log_len();
        vm.invoke("proxy_on_context_create", root, vm.callbacks.on_context_create.clone(), (root, 0))?;
        let vm_config_len = vm.store.data().vm_config.len() as u32;
        let started = vm.invoke("proxy_on_vm_start", root, vm.callbacks.on_vm_start.clone(), (root, vm_config_len))?;
        if started == Some(0) {
            return Err(ConfigureError::VmStartFailed { log: host.logs_since(mark, index, LogLevel::Warn) });
        }

        let mark = host.log_len();
        vm.store.data_mut().plugin_config = Some(plugin_config.to_vec());
        let configured = vm.invoke(
            "proxy_on_configure",
            root,
            vm.callbacks.on_configure.clone(),
            (root, plugin_config.len() as u32),
        );
        vm.store.data_mut().plugin_config = None;
        if configured? == Some(0) {
            return Err(ConfigureError::Rejected { log: host.logs_since(mark, index, LogLevel::Warn) });
        }
        Ok(vm)
    }

    /// This VM's number within its [`Host`] (as in [`LogEntry::vm`]).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Whether a trap has failed this VM.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Replaces the upstream (default: 200 with a small JSON body).
    pub fn set_upstream(&mut self, upstream: impl FnMut(&UpstreamRequest) -> UpstreamResponse + Send + 'static) {
        self.upstream = Box::new(upstream);
    }

    /// Runs `hook(key, cas)` inside every `proxy_set_shared_data` this VM makes, just before the
    /// store applies it — a deterministic point to interleave another VM's writes.
    pub fn on_shared_data_set(&mut self, hook: impl FnMut(&[u8], u32) + Send + 'static) {
        self.store.data_mut().shared_set_hook = Some(Box::new(hook));
    }

    pub fn clear_shared_data_hook(&mut self) {
        self.store.data_mut().shared_set_hook = None;
    }

    /// The value of an exported i32 global (for synthetic test guests that record results).
    pub fn global_i32(&mut self, name: &str) -> Option<i32> {
        let global = self.instance.get_global(&mut self.store, name)?;
        global.get(&mut self.store).i32()
    }

    /// The size of the guest's linear memory in bytes (it only ever grows: its high-water mark).
    pub fn memory_bytes(&self) -> usize {
        self.store.data().memory.map_or(0, |m| m.data_size(&self.store))
    }

    /// The tick period the guest asked for with `proxy_set_tick_period_milliseconds`.
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// Delivers one `proxy_on_tick` to the root context.
    pub fn tick(&mut self) -> Result<(), HostError> {
        let root = self.root_id;
        self.invoke("proxy_on_tick", root, self.callbacks.on_tick.clone(), root)?;
        Ok(())
    }

    /// Runs one HTTP stream through the filter, as Envoy's HTTP filter chain would with this
    /// filter in it (`Context::decodeHeaders` … `encodeData`, `log`, `onDestroy` in
    /// `source/extensions/common/wasm/context.cc`):
    ///
    /// 1. `proxy_on_context_create(ctx, root)`.
    /// 2. `proxy_on_request_headers(ctx, header_count, end_of_stream)`.
    /// 3. `proxy_on_request_body(ctx, buffered_size, end_of_stream)` per body chunk. Pause
    ///    buffers: the next chunk is appended and the next call sees (and may rewrite) the whole
    ///    buffer; Continue forwards the buffer and empties it.
    /// 4. The upstream, unless a local reply was sent. `proxy_send_local_response` only records
    ///    the reply; it takes effect after the callback returns, whatever the callback returned
    ///    (cpp-host `exports.cc` `send_local_response` + `stopNextIteration(true)`, Envoy
    ///    `Context::sendLocalResponse` + `addAfterVmCallAction`).
    /// 5. `proxy_on_response_headers` / `proxy_on_response_body` over the upstream response —
    ///    or over the local reply, which Envoy also encodes through the filter chain.
    /// 6. `proxy_on_log`, then `proxy_on_done`, `proxy_on_delete` (Envoy logs before it destroys
    ///    filters: `ConnectionManagerImpl::doDeferredStreamDestroy`,
    ///    `source/common/http/conn_manager_impl.cc`).
    ///
    /// A trap returns [`HostError::Trap`] and fails the VM; a pause nothing can resume returns
    /// [`HostError::Stalled`].
    pub fn request(&mut self, request: HttpRequest) -> Result<Exchange, HostError> {
        self.alive()?;
        let ctx = self.next_context_id;
        self.next_context_id += 1;
        let HttpRequest { headers, body, source_address, destination_address } = request;
        let headers: HeaderList = headers.into_iter().map(|(k, v)| (lower(k.as_bytes()), v)).collect();
        self.store.data_mut().stream = Some(Stream {
            id: ctx,
            original_request: headers.clone(),
            request_headers: headers,
            source_address,
            destination_address,
            ..Stream::default()
        });
        let result = self.drive(ctx, body);
        self.store.data_mut().stream = None;
        result
    }

    fn drive(&mut self, ctx: u32, body: Vec<Vec<u8>>) -> Result<Exchange, HostError> {
        let root = self.root_id;
        let cb = self.callbacks.clone();
        self.invoke("proxy_on_context_create", ctx, cb.on_context_create, (ctx, root))?;

        let flavour = self.host.flavour();
        // Request headers (nginx never says end_of_stream here).
        let count = self.stream().request_headers.len() as u32;
        self.stream().request_access = Access::ReadWrite;
        let end_of_stream = body.is_empty() && flavour != Flavour::Ngx;
        let action = self.invoke("proxy_on_request_headers", ctx, cb.on_request_headers, (ctx, count, end_of_stream as u32))?;
        // Envoy with `allow_on_headers_stop_iteration: true` (what the filter's configuration
        // asks for): headers paused by the filter are held — and stay modifiable — while the
        // body still flows to the filter; the first body callback that continues releases them.
        let mut headers_held = false;
        match self.settle(action, Side::Request) {
            Next::Proceed if flavour == Flavour::Ngx => {
                // nginx reads the whole body before it proxies; headers stay modifiable.
                return self.ngx_body(ctx, body);
            }
            Next::Proceed => self.stream().request_access = Access::None,
            // nginx never resumes a pause from the request headers: the request hangs.
            Next::Paused if flavour == Flavour::Ngx => return self.stalled(ctx, "proxy_on_request_headers"),
            Next::Paused if !body.is_empty() && flavour == Flavour::EnvoyWithoutHeaderStop => return self.ticks_until_answered(ctx),
            Next::Paused if !body.is_empty() => headers_held = true,
            Next::Paused => return self.stalled(ctx, "proxy_on_request_headers"),
            Next::LocalReply => return self.reply_locally(ctx, None),
            Next::Reset => return self.reset(ctx, None),
        }

        // Request body.
        let mut forwarded = Vec::new();
        let chunks = body.len();
        let mut buffering = false;
        for (i, chunk) in body.into_iter().enumerate() {
            let end_of_stream = i + 1 == chunks;
            let size = {
                let s = self.stream();
                if buffering {
                    s.request_body.extend_from_slice(&chunk);
                } else {
                    s.request_body = chunk;
                }
                s.request_body_open = true;
                s.request_body.len() as u32
            };
            let action = self.invoke(
                "proxy_on_request_body",
                ctx,
                cb.on_request_body.clone(),
                (ctx, size, end_of_stream as u32),
            )?;
            match self.settle(action, Side::Request) {
                Next::Proceed => {
                    forwarded.append(&mut self.stream().request_body);
                    buffering = false;
                    if headers_held {
                        headers_held = false;
                        self.stream().request_access = Access::None;
                    }
                }
                Next::Paused if !end_of_stream => buffering = true,
                Next::Paused => return self.stalled(ctx, "proxy_on_request_body"),
                Next::LocalReply => return self.reply_locally(ctx, None),
                Next::Reset => return self.reset(ctx, None),
            }
        }
        self.stream().request_body_open = false;
        self.call_upstream(ctx, forwarded)
    }

    /// The upstream's answer to the request as it now stands, through the response callbacks.
    fn call_upstream(&mut self, ctx: u32, forwarded: Vec<u8>) -> Result<Exchange, HostError> {
        let upstream_request = UpstreamRequest { headers: self.stream().request_headers.clone(), body: forwarded };
        let mut response = (self.upstream)(&upstream_request);
        let mut headers: HeaderList = vec![(":status".into(), response.status.to_string().into_bytes())];
        headers.extend(std::mem::take(&mut response.headers).into_iter().map(|(k, v)| (lower(k.as_bytes()), v)));
        if response.cut {
            return self.cut_response(ctx, headers, response.body, upstream_request);
        }
        let pieces = response.pieces();
        self.encode_response(ctx, headers, pieces, Some(upstream_request))
    }

    /// ngx_wasm_module: the body, whole, in one `proxy_on_request_body` with end_of_stream —
    /// none when it is empty — while the request headers are still modifiable; then proxied.
    fn ngx_body(&mut self, ctx: u32, body: Vec<Vec<u8>>) -> Result<Exchange, HostError> {
        let whole: Vec<u8> = body.concat();
        if whole.is_empty() {
            self.stream().request_access = Access::None;
            return self.call_upstream(ctx, whole);
        }
        let size = {
            let s = self.stream();
            s.request_body = whole;
            s.request_body_open = true;
            s.request_body.len() as u32
        };
        let cb = self.callbacks.clone();
        let action = self.invoke("proxy_on_request_body", ctx, cb.on_request_body, (ctx, size, 1))?;
        match self.settle(action, Side::Request) {
            Next::Proceed => {}
            Next::Paused => return self.stalled(ctx, "proxy_on_request_body"),
            Next::LocalReply => return self.reply_locally(ctx, None),
            Next::Reset => return self.reset(ctx, None),
        }
        let forwarded = std::mem::take(&mut self.stream().request_body);
        {
            let s = self.stream();
            s.request_body_open = false;
            s.request_access = Access::None;
        }
        self.call_upstream(ctx, forwarded)
    }

    /// Envoy without `allow_on_headers_stop_iteration`: the held request gets no body callback;
    /// time passes (the root context ticks, the clock advancing by the tick period) until the
    /// filter answers the stream — from the tick, through `proxy_set_effective_context` — or
    /// a minute has passed ([`HostError::Stalled`]).
    fn ticks_until_answered(&mut self, ctx: u32) -> Result<Exchange, HostError> {
        let mut waited = 0u64;
        while waited < 60_000 {
            let period = u64::from(self.tick_period_ms().max(1));
            self.host.clock().advance_ms(period);
            waited += period;
            if self.tick_period_ms() > 0 {
                self.tick()?;
            }
            let answered = self.stream().local_reply.is_some();
            if answered {
                return self.reply_locally(ctx, None);
            }
        }
        self.stalled(ctx, "proxy_on_request_headers")
    }

    /// Runs the response (upstream's or local) through `proxy_on_response_headers` and
    /// `proxy_on_response_body`, then finishes the stream.
    fn encode_response(
        &mut self,
        ctx: u32,
        headers: HeaderList,
        body: Vec<Vec<u8>>,
        upstream_request: Option<UpstreamRequest>,
    ) -> Result<Exchange, HostError> {
        let cb = self.callbacks.clone();
        let count = headers.len() as u32;
        let status = headers.first().and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        {
            let s = self.stream();
            s.response_headers = headers;
            s.response_code = status;
            s.response_access = Access::ReadWrite;
        }
        let action = self.invoke(
            "proxy_on_response_headers",
            ctx,
            cb.on_response_headers,
            (ctx, count, body.is_empty() as u32),
        )?;
        // As on the request side (`allow_on_headers_stop_iteration: true`): paused response
        // headers are held, and stay modifiable, while the body flows to the filter.
        match self.settle(action, Side::Response) {
            Next::Proceed => self.stream().response_access = Access::None,
            Next::Paused if !body.is_empty() => {}
            Next::Paused => return self.stalled(ctx, "proxy_on_response_headers"),
            // The response has not gone downstream yet: Envoy replaces it with the local reply.
            Next::LocalReply => return self.reply_locally(ctx, upstream_request),
            Next::Reset => return self.reset(ctx, upstream_request),
        }

        // Each piece through `proxy_on_response_body`: Pause buffers (the next call sees the
        // whole buffer), Continue sends the buffer on and empties it.
        let mut sent_body = Vec::new();
        let pieces = body.len();
        let mut buffering = false;
        for (i, piece) in body.into_iter().enumerate() {
            let end_of_stream = i + 1 == pieces;
            let size = {
                let s = self.stream();
                if buffering {
                    s.response_body.extend_from_slice(&piece);
                } else {
                    s.response_body = piece;
                }
                s.response_body_open = true;
                s.response_body.len() as u32
            };
            let action =
                self.invoke("proxy_on_response_body", ctx, cb.on_response_body.clone(), (ctx, size, end_of_stream as u32))?;
            match self.settle(action, Side::Response) {
                Next::Proceed => {
                    sent_body.append(&mut self.stream().response_body);
                    self.stream().response_access = Access::None;
                    buffering = false;
                }
                Next::Paused if !end_of_stream => buffering = true,
                Next::Paused => return self.stalled(ctx, "proxy_on_response_body"),
                Next::LocalReply => return self.reply_locally(ctx, upstream_request),
                Next::Reset => return self.reset(ctx, upstream_request),
            }
        }
        self.stream().response_body_open = false;

        let s = self.stream();
        let status = s
            .response_headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        let headers: HeaderList = s.response_headers.iter().filter(|(k, _)| !k.starts_with(':')).cloned().collect();
        let local_reply = if s.local_reply_sent { s.local_reply.clone() } else { None };
        let exchange = Exchange {
            context_id: ctx,
            status: status.unwrap_or(0),
            headers,
            body: sent_body,
            local_reply,
            reached_upstream: upstream_request.is_some(),
            upstream_request,
            reset: false,
            properties: self.stream().properties.clone(),
        };
        self.finish(ctx)?;
        Ok(exchange)
    }

    /// Sends the recorded local reply: Envoy's `Http::Utility::sendLocalReply`
    /// (`prepareLocalReply`, `source/common/http/utility.cc`) builds `:status`, adds the
    /// filter's headers, sets `content-length` and — if the filter set none — `content-type:
    /// text/plain` for a non-empty body (and drops both for an empty one), then encodes the reply
    /// through the encoder filters, this one included.
    fn reply_locally(&mut self, ctx: u32, upstream_request: Option<UpstreamRequest>) -> Result<Exchange, HostError> {
        let reply = {
            let s = self.stream();
            s.local_reply_sent = true;
            s.request_access = Access::None;
            s.request_body_open = false;
            s.response_body_open = false;
            s.local_reply.clone().expect("settle() saw a local reply")
        };
        let mut headers: HeaderList = vec![(":status".into(), reply.status.to_string().into_bytes())];
        headers.extend(reply.headers.iter().cloned());
        headers.retain(|(k, _)| k != "content-length");
        if reply.body.is_empty() {
            headers.retain(|(k, _)| k != "content-type");
        } else {
            headers.push(("content-length".into(), reply.body.len().to_string().into_bytes()));
            if !headers.iter().any(|(k, _)| k == "content-type") {
                headers.push(("content-type".into(), b"text/plain".to_vec()));
            }
        }
        let pieces = if reply.body.is_empty() { vec![] } else { vec![reply.body.clone()] };
        self.encode_response(ctx, headers, pieces, upstream_request)
    }

    /// A response that dies mid-way: headers (not the end), the body so far (not the end), then
    /// the stream is reset — Envoy calls no more body callbacks, then logs and destroys the
    /// filter (`proxy_on_log`, `proxy_on_done`, `proxy_on_delete`).
    fn cut_response(&mut self, ctx: u32, headers: HeaderList, body: Vec<u8>, upstream_request: UpstreamRequest) -> Result<Exchange, HostError> {
        let cb = self.callbacks.clone();
        let count = headers.len() as u32;
        {
            let s = self.stream();
            s.response_code = headers.first().and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
            s.response_headers = headers;
            s.response_access = Access::ReadWrite;
        }
        let action = self.invoke("proxy_on_response_headers", ctx, cb.on_response_headers, (ctx, count, 0))?;
        // What went to the client before the reset: the head, if the filter let it go, and the
        // body chunks it let through.
        let head_sent = matches!(self.settle(action, Side::Response), Next::Proceed);
        self.stream().response_access = Access::None;
        let mut sent_body = Vec::new();
        if !body.is_empty() {
            let size = {
                let s = self.stream();
                s.response_body = body;
                s.response_body_open = true;
                s.response_body.len() as u32
            };
            let action = self.invoke("proxy_on_response_body", ctx, cb.on_response_body.clone(), (ctx, size, 0))?;
            if head_sent && matches!(self.settle(action, Side::Response), Next::Proceed) {
                sent_body = std::mem::take(&mut self.stream().response_body);
            }
        }
        let head = head_sent.then(|| {
            let s = self.stream();
            let status = s.response_headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
            let headers: HeaderList = s.response_headers.iter().filter(|(k, _)| !k.starts_with(':')).cloned().collect();
            (status.unwrap_or(0), headers)
        });
        let mut exchange = self.reset(ctx, Some(upstream_request))?;
        if let Some((status, headers)) = head {
            exchange.status = status;
            exchange.headers = headers;
            exchange.body = sent_body;
        }
        Ok(exchange)
    }

    /// Envoy would hold the paused stream until a timeout or the client gave up, then log and
    /// destroy it; this host gives up at once, so the guest still gets its last callbacks.
    fn stalled(&mut self, ctx: u32, callback: &'static str) -> Result<Exchange, HostError> {
        self.finish(ctx)?;
        Err(HostError::Stalled { callback, context_id: ctx })
    }

    fn reset(&mut self, ctx: u32, upstream_request: Option<UpstreamRequest>) -> Result<Exchange, HostError> {
        let exchange = Exchange {
            context_id: ctx,
            status: 0,
            headers: vec![],
            body: vec![],
            local_reply: None,
            reached_upstream: upstream_request.is_some(),
            upstream_request,
            reset: true,
            properties: self.stream().properties.clone(),
        };
        self.finish(ctx)?;
        Ok(exchange)
    }

    /// `proxy_on_log` (request and response headers readable, as Envoy's access-log maps), then
    /// `proxy_on_done` and `proxy_on_delete` (`Context::onDestroy`, which deletes the context
    /// whatever `proxy_on_done` returned).
    fn finish(&mut self, ctx: u32) -> Result<(), HostError> {
        let cb = self.callbacks.clone();
        {
            let s = self.stream();
            s.request_access = Access::Read;
            s.response_access = if s.response_code.is_some() { Access::Read } else { Access::None };
            s.request_body_open = false;
            s.response_body_open = false;
        }
        self.invoke("proxy_on_log", ctx, cb.on_log, ctx)?;
        {
            let s = self.stream();
            s.request_access = Access::None;
            s.response_access = Access::None;
        }
        self.invoke("proxy_on_done", ctx, cb.on_done, ctx)?;
        self.invoke("proxy_on_delete", ctx, cb.on_delete, ctx)?;
        Ok(())
    }

    /// Applies what the guest asked for during the callback that just returned `action`.
    fn settle(&mut self, action: Option<u32>, side: Side) -> Next {
        let s = self.stream();
        if s.local_reply.is_some() && !s.local_reply_sent {
            return Next::LocalReply;
        }
        if s.close {
            return Next::Reset;
        }
        let resumed = match side {
            Side::Request => std::mem::take(&mut s.continue_request),
            Side::Response => std::mem::take(&mut s.continue_response),
        };
        if action.unwrap_or(0) == 0 || resumed {
            Next::Proceed
        } else {
            Next::Paused
        }
    }

    fn stream(&mut self) -> &mut Stream {
        self.store.data_mut().stream.as_mut().expect("a stream is in flight")
    }

    fn alive(&self) -> Result<(), HostError> {
        match &self.failed {
            Some(first_trap) => Err(HostError::VmFailed { first_trap: first_trap.clone() }),
            None => Ok(()),
        }
    }

    /// Calls a guest export for `context`; a missing export is `Ok(None)`.
    fn invoke<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        context: u32,
        func: Option<TypedFunc<P, R>>,
        params: P,
    ) -> Result<Option<R>, HostError> {
        let Some(func) = func else { return Ok(None) };
        self.alive()?;
        let mark = self.host.log_len();
        {
            let state = self.store.data_mut();
            state.active = context;
            state.effective = None;
        }
        let result = func.call(&mut self.store, params);
        self.store.data_mut().effective = None;
        match result {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let error = HostError::Trap {
                    callback,
                    context_id: context,
                    message: format!("{e:?}"),
                    guest_log: self.host.logs_since(mark, self.index, LogLevel::Error),
                };
                self.failed = Some(error.to_string());
                Err(error)
            }
        }
    }
}

/// An optional export with a checked signature.
fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<VmState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, HostError> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| HostError::Setup(format!("export {name} has an unexpected signature: {e:#}"))),
    }
}

/// `linker`'s functions, each counted by name in [`VmState::calls`] before it runs.
fn counting(linker: &Linker<VmState>, store: &mut Store<VmState>) -> wasmtime::Result<Linker<VmState>> {
    let mut counted: Linker<VmState> = Linker::new(store.engine());
    let funcs: Vec<(String, String, wasmtime::Func)> =
        linker.iter(&mut *store).filter_map(|(module, name, item)| item.into_func().map(|f| (module.to_owned(), name.to_owned(), f))).collect();
    for (module, name, func) in funcs {
        let ty = func.ty(&*store);
        let label = name.clone();
        counted.func_new(&module, &name, ty, move |mut caller, params, results| {
            *caller.data_mut().calls.entry(label.clone()).or_default() += 1;
            func.call(&mut caller, params, results)
        })?;
    }
    Ok(counted)
}
