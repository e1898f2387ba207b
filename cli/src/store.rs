//! `tollgate store`: the stateless service a fleet of Envoys reaches its shared counters through
//! (`store.redis` in the policy; docs/adr/0002-fleet-store.md).
//!
//! It answers `POST /v1/store/jobs` — one [`Envelope`] in, one [`Done`] out (JSON) — by
//! running core's own machines ([`remote::run`]) against Redis, through [`RedisStore`]: core's
//! [`CasStore`] on Redis, so the compare-and-set loop, the admission order, the releases after a
//! refusal and every byte of the records are core's, exactly as in Envoy's shared data and the
//! worker's Durable Objects. `GET /healthz` answers `ok` when Redis does; `GET /stats` counts
//! jobs, failed jobs, reads, writes and compare-and-set conflicts.
//!
//! **Atomicity.** A key's value is a 4-byte big-endian version followed by core's record. A
//! write is one Lua script that sets the new value only if the stored version is still the one
//! read (or the key still absent): never read-modify-write without the check, and nothing but
//! single-key commands, so a Redis Cluster works with any key layout (`--cluster`: [`Redis`]). Every write refreshes the
//! key's TTL ([`KEY_TTL_MS`]: longer than the longest calendar window), so state of identities
//! gone quiet leaves Redis by itself.
//!
//! Any number of replicas may run: they share nothing but Redis. Jobs run on tokio's blocking
//! pool with pooled synchronous connections (r2d2), each op a round trip or two. Within a
//! replica, the writes concurrent jobs make on one key are combined into one compare-and-set
//! ([`Combiner`]), so conflicts only arise between replicas, and a hot aggregate key (a tier's,
//! the global one) every request touches costs a write per batch, not per request. A replica remembers the last value it read
//! or wrote per key for a moment ([`Cache`]) and starts an update from it: one round trip (the
//! compare-and-set) instead of two while it is current, and a conflict answers the current value,
//! so the retry needs no read either.
//!
//! **Deadlines.** An admission carries how long its host waits (`wait_ms`); after half of it
//! the service makes no further reservation (core's [`tollgate_core::ops::sync::run_until`]:
//! what was reserved is released), so a request its host already answered with
//! `store.on_failure` is not counted as well.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use redis::{Commands, Script};
use tollgate_core::ops::remote::{self, Done, Envelope, Job};
use tollgate_core::ops::sync::{run_batch, run_op, Rules};
use tollgate_core::ops::{Op, Reply};
use tollgate_core::store::{CasStore, StoreError, Version, Written};
use tollgate_core::Policy;

/// How long a key lives after its last write: a month window's longest span, and a day.
pub const KEY_TTL_MS: u64 = 32 * 24 * 3600 * 1000;

/// Sets `KEYS[1]` to `ARGV[2]` (with TTL `ARGV[3]` ms) only if its version — the value's first 4
/// bytes — is still `ARGV[1]` (`""`: only if the key is still absent). Answers 1 when stored;
/// on a conflict the current value (0 when the key is absent), so the retry needs no read.
const CAS: &str = r"
local current = redis.call('GET', KEYS[1])
local ok
if current then
  ok = ARGV[1] ~= '' and string.sub(current, 1, 4) == ARGV[1]
else
  ok = ARGV[1] == ''
end
if ok then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if current then return current end
return 0
";

/// The most keys a replica remembers the last value of (then it forgets them all).
const CACHE_KEYS: usize = 100_000;

/// How long a remembered value may start an update: hot keys are written far more often, a
/// cold key is simply read again.
const CACHE_FOR: Duration = Duration::from_secs(2);

/// The last value and version a replica read or wrote per key: an update starts from it
/// instead of reading (the compare-and-set corrects a stale one and answers the current value,
/// and core reads again before an update that would not write). Reads (usage, health) always
/// go to Redis.
#[derive(Default)]
pub struct Cache(Mutex<HashMap<String, Remembered>>);

/// A key's value and version, and when they were read or written.
type Remembered = (Vec<u8>, Version, Instant);

impl Cache {
    fn get(&self, key: &str) -> Option<(Vec<u8>, Version)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (value, version, at) = map.get(key)?;
        (at.elapsed() < CACHE_FOR).then(|| (value.clone(), *version))
    }

    fn put(&self, key: &str, entry: Option<(Vec<u8>, Version)>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match entry {
            Some((value, version)) => {
                if map.len() >= CACHE_KEYS && !map.contains_key(key) {
                    map.clear();
                }
                map.insert(key.to_owned(), (value, version, Instant::now()));
            }
            None => {
                map.remove(key);
            }
        }
    }
}

/// A fresh key's first version: the clock's nanoseconds mixed with a counter.
fn first_version() -> Version {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = (nanos ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (mixed >> 32) as Version
}

fn decode(stored: &[u8]) -> Option<(Vec<u8>, Version)> {
    let version = Version::from_be_bytes(stored.get(..4)?.try_into().ok()?);
    Some((stored[4..].to_vec(), version))
}

/// Core's compare-and-set store on one Redis connection.
pub struct RedisStore<'c, C: redis::ConnectionLike> {
    conn: &'c mut C,
    cas: &'c Script,
    /// Told when a command fails on the connection.
    connections: Option<&'c Generation>,
    stats: Option<&'c Stats>,
    cache: Option<&'c Cache>,
}

/// What a replica has done (`GET /stats`, JSON): for benchmarks and operators.
#[derive(Default)]
pub struct Stats {
    /// Jobs answered.
    pub jobs: AtomicU64,
    /// Jobs answered `failed` (Redis unreachable, contention, another policy).
    pub failed: AtomicU64,
    /// Writes attempted.
    pub writes: AtomicU64,
    /// Writes that lost a compare-and-set to another writer (and were retried).
    pub conflicts: AtomicU64,
    /// Reads (GET).
    pub reads: AtomicU64,
}

impl<'c, C: redis::ConnectionLike> RedisStore<'c, C> {
    /// The store over `conn`, writing with `cas` (a [`Script`] of [`CAS`]).
    pub fn new(conn: &'c mut C, cas: &'c Script) -> Self {
        RedisStore { conn, cas, connections: None, stats: None, cache: None }
    }

    /// Retires `connections`' pooled connections when a command fails on this one.
    pub fn from_pool(mut self, connections: &'c Generation) -> Self {
        self.connections = Some(connections);
        self
    }

    fn failed(&self, _: redis::RedisError) -> StoreError {
        if let Some(c) = self.connections {
            c.retire_all();
        }
        StoreError::Host("redis failed")
    }

    /// Starts updates from `cache` ([`Cache`]).
    pub fn caching(mut self, cache: &'c Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Counts writes and conflicts in `stats`.
    pub fn counting(mut self, stats: &'c Stats) -> Self {
        self.stats = Some(stats);
        self
    }
}

/// The script every writer runs.
pub fn cas_script() -> Script {
    Script::new(CAS)
}

/// Redis connections for the pool: each remembers the generation it was made in, and a
/// connection error anywhere starts a new generation, so that after Redis restarts (or a
/// failover) one job finds out and every other pooled connection is replaced when next taken,
/// instead of each failing a job of its own. Checking a connection costs no round trip.
pub struct Connections {
    redis: Redis,
    generation: Arc<Generation>,
}

/// The Redis the service uses: one server (or a proxy, or a Sentinel-managed primary's
/// address), or a Redis Cluster (every command the service sends names one key, so the cluster
/// routes it; `SCRIPT LOAD` goes to every node).
pub enum Redis {
    /// One server.
    Single(redis::Client),
    /// A cluster, from its seed nodes.
    Cluster(redis::cluster::ClusterClient),
}

impl Redis {
    /// `urls`: one URL, or with `cluster` any of the cluster's nodes.
    pub fn open(urls: &[String], cluster: bool) -> Result<Redis, String> {
        if cluster {
            let client = redis::cluster::ClusterClient::new(urls.iter().map(String::as_str)).map_err(|e| format!("--redis {}: {e}", urls.join(",")))?;
            return Ok(Redis::Cluster(client));
        }
        match urls {
            [url] => redis::Client::open(url.as_str()).map(Redis::Single).map_err(|e| format!("--redis {url}: {e}")),
            _ => Err("give one --redis URL (several only with --cluster)".to_owned()),
        }
    }
}

/// A connection to a [`Redis`].
pub enum Connection {
    /// To one server.
    Single(redis::Connection),
    /// To a cluster (one connection per node, redirections followed).
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl redis::ConnectionLike for Connection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        // The cluster routes by the command (its key), not by packed bytes.
        match self {
            Connection::Single(c) => c.req_command(cmd),
            Connection::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Connection::Single(c) => c.supports_pipelining(),
            Connection::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Connection::Single(c) => c.check_connection(),
            Connection::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Connection::Single(c) => c.is_open(),
            Connection::Cluster(c) => c.is_open(),
        }
    }
}

/// The current generation of a pool's connections ([`Connections`]).
#[derive(Default)]
pub struct Generation(AtomicU64);

impl Generation {
    /// Retires every connection made so far (one of them failed).
    pub fn retire_all(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A pooled connection and its generation.
pub struct Pooled {
    conn: Connection,
    generation: u64,
}

impl Connections {
    /// Connections to `client`'s Redis, retired together through `generation`.
    pub fn new(redis: Redis, generation: Arc<Generation>) -> Self {
        Connections { redis, generation }
    }

    fn current(&self, c: &Pooled) -> bool {
        c.generation == self.generation.now()
    }
}

impl r2d2::ManageConnection for Connections {
    type Connection = Pooled;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<Pooled, redis::RedisError> {
        let generation = self.generation.now();
        let conn = match &self.redis {
            Redis::Single(c) => Connection::Single(c.get_connection()?),
            Redis::Cluster(c) => Connection::Cluster(Box::new(c.get_connection()?)),
        };
        Ok(Pooled { conn, generation })
    }

    fn is_valid(&self, c: &mut Pooled) -> Result<(), redis::RedisError> {
        if self.current(c) {
            Ok(())
        } else {
            Err((redis::ErrorKind::Io, "made before a connection failed").into())
        }
    }

    fn has_broken(&self, c: &mut Pooled) -> bool {
        !redis::ConnectionLike::is_open(&c.conn) || !self.current(c)
    }
}

impl<C: redis::ConnectionLike> CasStore for RedisStore<'_, C> {
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        if let Some(stats) = self.stats {
            stats.reads.fetch_add(1, Ordering::Relaxed);
        }
        let value: Option<Vec<u8>> = match self.conn.get(key) {
            Ok(v) => v,
            Err(e) => return Err(self.failed(e)),
        };
        let entry = value.as_deref().and_then(decode);
        if let Some(cache) = self.cache {
            cache.put(key, entry.clone());
        }
        Ok(entry)
    }

    fn guess(&mut self, key: &str) -> Option<(Vec<u8>, Version)> {
        self.cache?.get(key)
    }

    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
        // A new key starts at an unpredictable version, so a replica's memory of an expired
        // key can never match its successor.
        let next = expected.map_or_else(first_version, |v| v.wrapping_add(1));
        let mut stored = Vec::with_capacity(4 + value.len());
        stored.extend_from_slice(&next.to_be_bytes());
        stored.extend_from_slice(value);
        let expected: Vec<u8> = expected.map(|v| v.to_be_bytes().to_vec()).unwrap_or_default();
        let answer: redis::Value = match self.cas.key(key).arg(expected).arg(&stored).arg(KEY_TTL_MS).invoke(self.conn) {
            Ok(a) => a,
            Err(e) => return Err(self.failed(e)),
        };
        let stored_ok = matches!(answer, redis::Value::Int(1));
        if let Some(stats) = self.stats {
            stats.writes.fetch_add(1, Ordering::Relaxed);
            if !stored_ok {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(cache) = self.cache {
            let current = match &answer {
                redis::Value::Int(1) => decode(&stored),
                redis::Value::BulkString(v) => decode(v),
                _ => None,
            };
            cache.put(key, current);
        }
        Ok(if stored_ok { Written::Stored } else { Written::Conflict })
    }
}

/// Combines the ops concurrent jobs run on one key into one compare-and-set (core's
/// [`run_batch`]): while one job's thread — the key's leader — has the key's batch in flight,
/// other jobs queue their ops on that key; when it is done it hands the whole queue to the
/// first thread in it, which runs it as the next batch (its own op first) and hands on in turn.
/// A hot aggregate key every request touches then costs one Redis write per batch, not per
/// request, and within a replica ops on a key never race each other. Reads go straight to Redis.
#[derive(Default)]
pub struct Combiner {
    /// The keys with a leader, and the ops waiting for its next batch.
    queues: Mutex<HashMap<String, Vec<Waiting>>>,
}

/// An op waiting for a key's leader, and where its job's thread waits for its turn.
struct Waiting {
    op: Op<'static>,
    turn: mpsc::SyncSender<Turn>,
}

/// What a waiting thread gets: its op's reply, or the key's next batch to lead.
enum Turn {
    Reply(Box<Result<Reply, StoreError>>),
    Lead(Vec<Waiting>),
}

impl Combiner {
    /// Runs `op` against `store`, in a batch with other jobs' ops on its key when it writes.
    pub fn run<S: CasStore + ?Sized>(&self, store: &mut S, rules: Rules<'_>, op: &Op<'_>) -> Result<Reply, StoreError> {
        if !op.writes() {
            return run_op(store, rules, op);
        }
        let key = op.key().into_owned();
        let (tx, rx) = mpsc::sync_channel(1);
        let mine = Waiting { op: op.clone().into_owned(), turn: tx };
        let batch = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            match queues.get_mut(&key) {
                Some(queue) => {
                    queue.push(mine);
                    drop(queues);
                    match rx.recv() {
                        Ok(Turn::Reply(reply)) => return *reply,
                        Ok(Turn::Lead(batch)) => batch,
                        Err(_) => return Err(StoreError::Host("the key's batch failed")),
                    }
                }
                None => {
                    queues.insert(key.clone(), Vec::new());
                    vec![mine]
                }
            }
        };
        // This thread leads the batch; its own op is the first. Whatever happens (even a
        // panic), the next batch gets a leader.
        let _next = HandOn { combiner: self, key: &key };
        let (ops, turns): (Vec<Op<'static>>, Vec<mpsc::SyncSender<Turn>>) = batch.into_iter().map(|w| (w.op, w.turn)).unzip();
        let replies: Vec<Result<Reply, StoreError>> = match run_batch(store, rules, &ops) {
            Ok(replies) => replies.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); ops.len()],
        };
        let mut replies = replies.into_iter();
        let own = replies.next().unwrap_or(Err(StoreError::Host("the key's batch failed")));
        for (turn, reply) in turns.iter().skip(1).zip(replies) {
            let _ = turn.send(Turn::Reply(Box::new(reply)));
        }
        own
    }
}

/// Hands a key's queue to its first waiter as the next batch, or retires the key's leader.
struct HandOn<'a> {
    combiner: &'a Combiner,
    key: &'a str,
}

impl Drop for HandOn<'_> {
    fn drop(&mut self) {
        let mut queues = self.combiner.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = queues.get_mut(self.key).map(std::mem::take).unwrap_or_default();
        match queue.first() {
            None => {
                queues.remove(self.key);
            }
            Some(first) => {
                let next = first.turn.clone();
                drop(queues);
                let _ = next.send(Turn::Lead(queue));
            }
        }
    }
}

/// What every handler shares.
struct Service {
    policy: Policy,
    pool: r2d2::Pool<Connections>,
    generation: Arc<Generation>,
    cas: Script,
    combiner: Combiner,
    /// SHA-256 of the `authorization` every job must carry (`store.redis.key_secret`).
    key: Option<[u8; 32]>,
    stats: Stats,
    cache: Cache,
}

/// The service's options.
pub struct Options {
    /// `redis://host:port/db` or `redis+unix:///path/to/socket`; with `cluster`, any nodes of
    /// a Redis Cluster.
    pub redis: Vec<String>,
    /// Whether `redis` names a Redis Cluster's nodes.
    pub cluster: bool,
    /// Where to listen (port 0: any free port; the bound address is printed).
    pub listen: SocketAddr,
    /// Most pooled Redis connections.
    pub connections: u32,
}

/// Runs the service until the process is stopped. Prints `listening on http://ADDR` (the bound
/// address) on stdout first.
pub fn serve(policy: Policy, options: Options) -> Result<(), String> {
    let client = Redis::open(&options.redis, options.cluster)?;
    let key = match policy.remote_store.as_ref().and_then(|r| r.key_secret.as_deref()) {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(value) if !value.is_empty() => Some(bearer_digest(format!("Bearer {value}").as_bytes())),
            _ => return Err(format!("the policy's store.redis.key_secret names {name}: set it in this service's environment (the Envoys send it with every job)")),
        },
    };
    let generation = Arc::new(Generation::default());
    // Checked on checkout by generation only (no PING): see [`Connections`].
    let pool = r2d2::Pool::builder()
        .test_on_check_out(true)
        .max_size(options.connections.max(1))
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(Connections::new(client, generation.clone()));
    let service = Arc::new(Service { policy, pool, generation, key, cas: cas_script(), combiner: Combiner::default(), stats: Stats::default(), cache: Cache::default() });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen).await.map_err(|e| format!("--listen {}: {e}", options.listen))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening on http://{bound}");
        let app = Router::new().route("/v1/store/jobs", post(job)).route("/healthz", get(healthz)).route("/stats", get(stats)).with_state(service);
        axum::serve(listener, app).await.map_err(|e| e.to_string())
    })
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn bearer_digest(authorization: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(authorization).into()
}

async fn job(State(service): State<Arc<Service>>, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    if let Some(key) = &service.key {
        // Digests compared, so the time taken says nothing about the key.
        let given = headers.get(header::AUTHORIZATION).map(|v| bearer_digest(v.as_bytes()));
        if given.as_ref() != Some(key) {
            service.stats.failed.fetch_add(1, Ordering::Relaxed);
            return json(StatusCode::UNAUTHORIZED, serde_json::to_vec(&Done::Failed { error: "not authorized: the job lacks the store key (store.redis.key_secret)".to_owned() }).unwrap_or_default());
        }
    }
    let envelope: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return json(StatusCode::BAD_REQUEST, serde_json::to_vec(&Done::Failed { error: format!("not a job: {e}") }).unwrap_or_default()),
    };
    if matches!(envelope.job, Job::Adjust { .. } | Job::List { .. }) && service.key.is_none() {
        // The operator's calls change or list any identity's counts: only from hosts that hold
        // the store key (the operator's admin key was checked there).
        service.stats.failed.fetch_add(1, Ordering::Relaxed);
        let error = "operator jobs need the store key: set store.redis.key_secret".to_owned();
        return json(StatusCode::FORBIDDEN, serde_json::to_vec(&Done::Failed { error }).unwrap_or_default());
    }
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
        let pooled = &mut *conn;
        let mut store = RedisStore::new(&mut pooled.conn, &service.cas).from_pool(&service.generation).counting(&service.stats).caching(&service.cache);
        let rules: Rules<'_> = (&service.policy).into();
        if let (Job::List { key, after, limit }, true) = (&envelope.job, envelope.policy == service.policy.digest) {
            if !key.starts_with("tg2:x:") {
                return Done::Failed { error: "a listing names an activity index (tg2:x:…)".to_owned() };
            }
            let limit = (*limit).min(tollgate_core::admin::MAX_PAGE as u32 + 1);
            return list_index(&mut pooled.conn, key, after.as_deref(), limit);
        }
        let done = remote::run_with(rules, &service.policy.digest, &envelope, &expired, &mut |op| service.combiner.run(&mut store, rules, op));
        if let (Job::Admit { who, now, .. }, Done::Admitted { admission, .. }) = (&envelope.job, &done) {
            if admission.is_allowed() && service.policy.admin_key_secret.is_some() {
                index_activity(&mut pooled.conn, &service.policy, who, *now);
            }
        }
        service.stats.jobs.fetch_add(1, Ordering::Relaxed);
        if matches!(done, Done::Failed { .. }) {
            service.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        done
    })
    .await
    .unwrap_or_else(|e| Done::Failed { error: format!("the job failed: {e}") });
    json(StatusCode::OK, serde_json::to_vec(&answer).unwrap_or_default())
}

/// The index entries this process has written.
static INDEXED: std::sync::LazyLock<std::sync::Mutex<tollgate_core::admin::Noted>> = std::sync::LazyLock::new(|| std::sync::Mutex::new(tollgate_core::admin::Noted::new(100_000)));

/// Adds an admitted request's identity to its day's and month's activity index (sorted sets,
/// all scores 0: members in lexical order, which pages by `ZRANGEBYLEX`), each expiring a month
/// after its period. Best effort: a failure is logged, never the request's.
fn index_activity(conn: &mut impl redis::ConnectionLike, policy: &Policy, who: &tollgate_core::limits::engine::Who, now: u64) {
    let Ok((due, member)) = INDEXED.lock().map(|mut noted| noted.due(policy, who, now)) else { return };
    if due.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for (key, expires_ms) in &due {
        pipe.cmd("ZADD").arg(key).arg(0).arg(&member).ignore();
        pipe.cmd("PEXPIREAT").arg(key).arg(*expires_ms).ignore();
    }
    if let Err(e) = pipe.query::<()>(conn) {
        eprintln!("tollgate store: the activity index was not updated: {e}");
        if let Ok(mut noted) = INDEXED.lock() {
            for (key, _) in &due {
                noted.forget(key, &member);
            }
        }
    }
}

/// A page of an activity index: the members after `after`, at most `limit`.
fn list_index(conn: &mut impl redis::ConnectionLike, key: &str, after: Option<&str>, limit: u32) -> Done {
    let min = after.map_or("-".to_owned(), |a| format!("({a}"));
    let listed = redis::cmd("ZRANGEBYLEX").arg(key).arg(min).arg("+").arg("LIMIT").arg(0).arg(limit).query::<Vec<String>>(conn);
    match listed {
        Ok(members) => Done::Members { members },
        Err(e) => Done::Failed { error: format!("redis: {e}") },
    }
}

async fn stats(State(service): State<Arc<Service>>) -> Response {
    let s = &service.stats;
    let body = serde_json::json!({
        "jobs": s.jobs.load(Ordering::Relaxed),
        "failed": s.failed.load(Ordering::Relaxed),
        "writes": s.writes.load(Ordering::Relaxed),
        "conflicts": s.conflicts.load(Ordering::Relaxed),
        "reads": s.reads.load(Ordering::Relaxed),
    });
    json(StatusCode::OK, body.to_string().into_bytes())
}

async fn healthz(State(service): State<Arc<Service>>) -> Response {
    let ok = tokio::task::spawn_blocking(move || {
        let mut conn = service.pool.get().ok()?;
        let pong = redis::cmd("PING").query::<String>(&mut conn.conn);
        if pong.is_err() {
            service.generation.retire_all();
        }
        pong.ok()
    })
    .await
    .ok()
    .flatten();
    match ok {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::limits::engine::{Estimate, Who};
    use tollgate_core::ops::machine::{Admitting, Machine, Next};
    use tollgate_core::store::MemoryStore;

    /// One store shared by every thread, slow to write, counting writes.
    struct Shared<'a>(&'a Mutex<(MemoryStore, u32)>);
    impl CasStore for Shared<'_> {
        fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
            self.0.lock().unwrap().0.load(key)
        }
        fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
            std::thread::sleep(Duration::from_millis(2));
            let mut s = self.0.lock().unwrap();
            s.1 += 1;
            s.0.store(key, value, expected)
        }
    }

    #[test]
    fn concurrent_ops_on_one_key_are_combined_and_count_exactly() {
        let policy = Policy::from_json(br#"{"tier":{"default":"d"},"tiers":{"d":{"limits":[{"per":"tier","window":"day","requests":150}]}}}"#).unwrap();
        let store = Mutex::new((MemoryStore::new(), 0));
        let combiner = Combiner::default();
        let who = Who { identity_key: "tg1:q:00".into(), ip_key: None, tier: "d".into() };
        let estimate = Estimate { model: None, input_tokens: 0, output_tokens: 0 };
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let (policy, store, combiner, who, estimate) = (&policy, &store, &combiner, &who, &estimate);
                    s.spawn(move || {
                        let rules: Rules<'_> = policy.into();
                        let mut allowed = 0;
                        for i in 0..25u64 {
                            let mut m = Admitting::new(&policy.limits, who, estimate, t * 100 + i, 1_000);
                            let admission = loop {
                                match m.next() {
                                    Next::Done(out) => break out.unwrap(),
                                    Next::Op(op) => {
                                        let reply = combiner.run(&mut Shared(store), rules, &op);
                                        m.reply(reply);
                                    }
                                }
                            };
                            allowed += usize::from(admission.is_allowed());
                        }
                        allowed
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 150, "exactly the limit, from 200 requests");
        let writes = store.lock().unwrap().1;
        assert!(writes < 150, "{writes} writes: the ops were not combined");
        assert!(combiner.queues.lock().unwrap().is_empty(), "every leader retired");
    }
}
