//! `tollgate store`: the stateless service a fleet of Envoys reaches its shared counters through
//! (`store.redis` in the policy; docs/adr/0002-fleet-store.md).
//!
//! It answers `POST /v1/store/jobs` — one [`Envelope`] in, one [`Done`] out (JSON) — by
//! running core's own machines ([`remote::run`]) against Redis, through [`RedisStore`]: core's
//! [`CasStore`] on Redis, so the compare-and-set loop, the admission order, the releases after a
//! refusal and every byte of the records are core's, exactly as in Envoy's shared data and the
//! worker's Durable Objects. `GET /healthz` answers `ok` when Redis does.
//!
//! **Atomicity.** A key's value is a 4-byte big-endian version followed by core's record. A
//! write is one Lua script that sets the new value only if the stored version is still the one
//! read (or the key still absent): never read-modify-write without the check, and nothing but
//! single-key commands, so a Redis Cluster works with any key layout. Every write refreshes the
//! key's TTL ([`KEY_TTL_MS`]: longer than the longest calendar window), so state of identities
//! gone quiet leaves Redis by itself.
//!
//! Any number of replicas may run: they share nothing but Redis. Jobs run on tokio's blocking
//! pool with pooled synchronous connections (r2d2), each op a handful of round trips. Within a
//! replica, ops on one key take turns ([`LOCK_SHARDS`] locks by key hash), so compare-and-set
//! conflicts only arise between replicas: a hot aggregate key (a tier's, the global one) every
//! request touches does not turn into a retry storm.
//!
//! **Deadlines.** An admission carries how long its host waits (`wait_ms`); after half of it
//! the service makes no further reservation (core's [`tollgate_core::ops::sync::run_until`]:
//! what was reserved is released), so a request its host already answered with
//! `store.on_failure` is not counted as well.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use redis::{Commands, Script};
use tollgate_core::ops::remote::{self, Done, Envelope};
use tollgate_core::store::{CasStore, StoreError, Version, Written};
use tollgate_core::Policy;

/// How long a key lives after its last write: a month window's longest span, and a day.
pub const KEY_TTL_MS: u64 = 32 * 24 * 3600 * 1000;

/// Sets `KEYS[1]` to `ARGV[2]` (with TTL `ARGV[3]` ms) only if its version — the value's first 4
/// bytes — is still `ARGV[1]` (`""`: only if the key is still absent). 1: stored, 0: conflict.
const CAS: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[1] == '' or string.sub(current, 1, 4) ~= ARGV[1] then return 0 end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Locks by key hash, so ops on one key take turns within a replica.
pub const LOCK_SHARDS: usize = 1024;

/// Core's compare-and-set store on one Redis connection.
pub struct RedisStore<'c, C: redis::ConnectionLike> {
    conn: &'c mut C,
    cas: &'c Script,
    locks: &'c [Mutex<()>],
    /// The lock of the key last loaded, held until its write (or the next load).
    held: Option<MutexGuard<'c, ()>>,
}

impl<'c, C: redis::ConnectionLike> RedisStore<'c, C> {
    /// The store over `conn`, writing with `cas` (a [`Script`] of [`CAS`]); `locks` are the
    /// replica's key locks ([`key_locks`]).
    pub fn new(conn: &'c mut C, cas: &'c Script, locks: &'c [Mutex<()>]) -> Self {
        RedisStore { conn, cas, locks, held: None }
    }
}

/// A replica's key locks.
pub fn key_locks() -> Vec<Mutex<()>> {
    (0..LOCK_SHARDS).map(|_| Mutex::new(())).collect()
}

/// The script every writer runs.
pub fn cas_script() -> Script {
    Script::new(CAS)
}

fn redis_error(_: redis::RedisError) -> StoreError {
    StoreError::Host("redis failed")
}

impl<C: redis::ConnectionLike> CasStore for RedisStore<'_, C> {
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        self.held = None;
        if !self.locks.is_empty() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            let lock = &self.locks[(h.finish() % self.locks.len() as u64) as usize];
            self.held = Some(lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        }
        let value: Option<Vec<u8>> = self.conn.get(key).map_err(redis_error)?;
        Ok(value.and_then(|v| {
            let version = Version::from_be_bytes(v.get(..4)?.try_into().ok()?);
            Some((v[4..].to_vec(), version))
        }))
    }

    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
        let next = expected.map_or(1, |v| v.wrapping_add(1).max(1));
        let mut stored = Vec::with_capacity(4 + value.len());
        stored.extend_from_slice(&next.to_be_bytes());
        stored.extend_from_slice(value);
        let expected: Vec<u8> = expected.map(|v| v.to_be_bytes().to_vec()).unwrap_or_default();
        let ok: i64 = self.cas.key(key).arg(expected).arg(stored).arg(KEY_TTL_MS).invoke(self.conn).map_err(redis_error)?;
        Ok(if ok == 1 { Written::Stored } else { Written::Conflict })
    }
}

/// What every handler shares.
struct Service {
    policy: Policy,
    pool: r2d2::Pool<redis::Client>,
    cas: Script,
    locks: Vec<Mutex<()>>,
}

/// The service's options.
pub struct Options {
    /// `redis://host:port/db` or `redis+unix:///path/to/socket`.
    pub redis: String,
    /// Where to listen (port 0: any free port; the bound address is printed).
    pub listen: SocketAddr,
    /// Most pooled Redis connections.
    pub connections: u32,
}

/// Runs the service until the process is stopped. Prints `listening on http://ADDR` (the bound
/// address) on stdout first.
pub fn serve(policy: Policy, options: Options) -> Result<(), String> {
    let client = redis::Client::open(options.redis.as_str()).map_err(|e| format!("--redis {}: {e}", options.redis))?;
    let pool = r2d2::Pool::builder()
        .max_size(options.connections.max(1))
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(client);
    let service = Arc::new(Service { policy, pool, cas: cas_script(), locks: key_locks() });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen).await.map_err(|e| format!("--listen {}: {e}", options.listen))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening on http://{bound}");
        let app = Router::new().route("/v1/store/jobs", post(job)).route("/healthz", get(healthz)).with_state(service);
        axum::serve(listener, app).await.map_err(|e| e.to_string())
    })
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn job(State(service): State<Arc<Service>>, body: Bytes) -> Response {
    let envelope: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return json(StatusCode::BAD_REQUEST, serde_json::to_vec(&Done::Failed { error: format!("not a job: {e}") }).unwrap_or_default()),
    };
    let received = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        // A host waiting `wait_ms` gets no reservation made after half of it.
        let deadline = envelope.wait_ms.map(|ms| received + Duration::from_millis(u64::from(ms) / 2));
        let expired = || deadline.is_some_and(|d| Instant::now() >= d);
        let wait = deadline.map_or(Duration::from_secs(2), |d| d.saturating_duration_since(Instant::now()));
        let mut conn = match service.pool.get_timeout(wait.max(Duration::from_millis(1))) {
            Ok(c) => c,
            Err(e) => return Done::Failed { error: format!("redis unreachable: {e}") },
        };
        let mut store = RedisStore::new(&mut *conn, &service.cas, &service.locks);
        remote::run(&mut store, (&service.policy).into(), &service.policy.digest, &envelope, &expired)
    })
    .await
    .unwrap_or_else(|e| Done::Failed { error: format!("the job failed: {e}") });
    json(StatusCode::OK, serde_json::to_vec(&answer).unwrap_or_default())
}

async fn healthz(State(service): State<Arc<Service>>) -> Response {
    let ok = tokio::task::spawn_blocking(move || {
        let mut conn = service.pool.get().ok()?;
        redis::cmd("PING").query::<String>(&mut *conn).ok()
    })
    .await
    .ok()
    .flatten();
    match ok {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n").into_response(),
    }
}
