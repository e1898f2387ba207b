//! Proxy-Wasm shared data: one store for every VM of a process, keyed by VM id.
//!
//! Two semantics, selected per store:
//!
//! - [`CasSemantics::Envoy`] follows proxy-wasm-cpp-host `src/shared_data.cc`
//!   (`SharedData::get`/`set`, `nextCas` in `src/shared_data.h`), which Envoy uses as is
//!   (`ContextBase::getSharedData`/`setSharedData` in `src/context.cc` pass the VM id):
//!   one map per VM id; no TTL and no delete through the ABI; every successful `set` stamps the
//!   key with the next value of ONE process-wide counter that starts at 1, wraps and skips 0;
//!   `set` on an existing key with a cas that is neither 0 nor the key's current cas is
//!   CasMismatch; cas 0 overwrites unconditionally; on an absent key the cas is ignored and the
//!   key is created (so "cas 0 after NotFound" is not an atomic create there).
//! - [`CasSemantics::Ngx`] follows Kong ngx_wasm_module `src/common/shm/ngx_wa_shm_kv.c`
//!   (`ngx_wa_shm_kv_set_locked`) and `ngx_proxy_wasm_hfuncs_set_shared_data`: a true
//!   compare-and-set — the given cas must equal the key's cas, which is 0 for an absent key —
//!   so cas 0 on an existing key is CasMismatch and cas 0 on an absent key is an atomic create;
//!   cas numbers count per key (a new key's first value has cas 1); a NULL value pointer
//!   deletes. Its eviction when the shm zone is full is not modelled.
//!
//! Tests can make the store fail ([`SharedStore::fail_reads_with`],
//! [`SharedStore::fail_writes_with`]) to exercise a filter's failure mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::abi::Status;

/// Which host's shared-data compare-and-set rules the store follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasSemantics {
    /// proxy-wasm-cpp-host / Envoy.
    Envoy,
    /// Kong ngx_wasm_module.
    Ngx,
}

/// Counts of what the store saw, for reports and assertions about contention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    pub gets: u64,
    pub sets: u64,
    pub cas_mismatches: u64,
    pub injected_failures: u64,
}

/// The process-wide shared-data store. Cloning shares it (it is an `Arc`).
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Mutex<Inner>>,
}

struct Entry {
    value: Vec<u8>,
    cas: u32,
}

struct Inner {
    semantics: CasSemantics,
    /// Envoy's global counter (`SharedData::cas_`), unused under ngx semantics.
    next_cas: u32,
    data: HashMap<String, HashMap<Vec<u8>, Entry>>,
    fail_reads: Option<Status>,
    fail_writes: Option<Status>,
    stats: SharedStats,
}

impl SharedStore {
    pub fn new(semantics: CasSemantics) -> SharedStore {
        SharedStore {
            inner: Arc::new(Mutex::new(Inner {
                semantics,
                next_cas: 1,
                data: HashMap::new(),
                fail_reads: None,
                fail_writes: None,
                stats: SharedStats::default(),
            })),
        }
    }

    /// A store with Envoy's (proxy-wasm-cpp-host's) semantics.
    pub fn envoy() -> SharedStore {
        SharedStore::new(CasSemantics::Envoy)
    }

    /// A store with Kong ngx_wasm_module's semantics.
    pub fn ngx() -> SharedStore {
        SharedStore::new(CasSemantics::Ngx)
    }

    /// Starts Envoy's global cas counter at `cas` (to test the wrap-around).
    pub fn with_next_cas(self, cas: u32) -> SharedStore {
        self.lock().next_cas = cas.max(1);
        self
    }

    pub fn semantics(&self) -> CasSemantics {
        self.lock().semantics
    }

    /// Makes every `proxy_get_shared_data` return `status` (None: behave normally).
    pub fn fail_reads_with(&self, status: Option<Status>) {
        self.lock().fail_reads = status;
    }

    /// Makes every `proxy_set_shared_data` return `status` (None: behave normally).
    pub fn fail_writes_with(&self, status: Option<Status>) {
        self.lock().fail_writes = status;
    }

    /// Both of the above.
    pub fn fail_with(&self, status: Option<Status>) {
        let mut inner = self.lock();
        inner.fail_reads = status;
        inner.fail_writes = status;
    }

    pub fn stats(&self) -> SharedStats {
        self.lock().stats
    }

    /// The value and cas stored under `key` for `vm_id`, bypassing injected failures and stats.
    pub fn peek(&self, vm_id: &str, key: impl AsRef<[u8]>) -> Option<(Vec<u8>, u32)> {
        let inner = self.lock();
        let entry = inner.data.get(vm_id)?.get(key.as_ref())?;
        Some((entry.value.clone(), entry.cas))
    }

    /// Every key stored for `vm_id`, sorted.
    pub fn keys(&self, vm_id: &str) -> Vec<Vec<u8>> {
        let inner = self.lock();
        let mut keys: Vec<Vec<u8>> = inner.data.get(vm_id).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        keys.sort();
        keys
    }

    /// `proxy_get_shared_data`: `(value, cas)`, NotFound, or an injected failure.
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Result<(Vec<u8>, u32), Status> {
        let mut inner = self.lock();
        inner.stats.gets += 1;
        if let Some(status) = inner.fail_reads {
            inner.stats.injected_failures += 1;
            return Err(status);
        }
        match inner.data.get(vm_id).and_then(|m| m.get(key)) {
            Some(entry) => Ok((entry.value.clone(), entry.cas)),
            None => Err(Status::NotFound),
        }
    }

    /// `proxy_set_shared_data`. `value` is `None` when the guest passed a NULL value pointer,
    /// which only ngx_wasm_module treats as a delete (Envoy stores an empty value).
    pub fn set(&self, vm_id: &str, key: &[u8], value: Option<&[u8]>, cas: u32) -> Status {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.stats.sets += 1;
        if let Some(status) = inner.fail_writes {
            inner.stats.injected_failures += 1;
            return status;
        }
        let map = inner.data.entry(vm_id.to_owned()).or_default();
        let status = match inner.semantics {
            CasSemantics::Envoy => {
                let value = value.unwrap_or_default().to_vec();
                match map.get_mut(key) {
                    Some(entry) if cas != 0 && cas != entry.cas => Status::CasMismatch,
                    Some(entry) => {
                        *entry = Entry { value, cas: next_cas(&mut inner.next_cas) };
                        Status::Ok
                    }
                    None => {
                        map.insert(key.to_vec(), Entry { value, cas: next_cas(&mut inner.next_cas) });
                        Status::Ok
                    }
                }
            }
            CasSemantics::Ngx => {
                let current = map.get(key).map_or(0, |e| e.cas);
                if cas != current {
                    Status::CasMismatch
                } else {
                    match value {
                        // ngx: a delete of an absent key is "not written", reported as a mismatch.
                        None => match map.remove(key) {
                            Some(_) => Status::Ok,
                            None => Status::CasMismatch,
                        },
                        Some(value) => {
                            map.insert(key.to_vec(), Entry { value: value.to_vec(), cas: current.wrapping_add(1) });
                            Status::Ok
                        }
                    }
                }
            }
        };
        if status == Status::CasMismatch {
            inner.stats.cas_mismatches += 1;
        }
        status
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock leaves consistent data behind: every
        // mutation above completes before the guard drops.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// cpp-host `SharedData::nextCas`: hand out the current value, advance, never hand out 0.
fn next_cas(counter: &mut u32) -> u32 {
    let cas = *counter;
    *counter = counter.wrapping_add(1);
    if *counter == 0 {
        *counter = 1;
    }
    cas
}
