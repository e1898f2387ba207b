//! [`CasStore`] on proxy-wasm shared data.
//!
//! Semantics this relies on, as implemented by proxy-wasm-cpp-host `src/shared_data.cc`
//! (`SharedData::set`) and used by Envoy: values are per VM id, never expire and cannot be
//! deleted; every successful `set` assigns the key the next value of one global, wrapping,
//! never-zero cas counter; `set` with a cas that differs from the key's current one fails with
//! CasMismatch — except that cas 0 is unconditional, and on a key that does not exist yet the
//! cas is ignored altogether, so a plain "cas 0 after NotFound" first insert is NOT atomic
//! there: two VMs that both saw NotFound would both write, and the second would erase the
//! first one's count.
//!
//! Updates of an existing key use the portable pattern: `get`, then `set` with the returned cas.
//! A first insert ("create only if absent") is made atomic on both kinds of host:
//! 1. `set` with cas [`CREATE_CAS`] (`u32::MAX`). On Envoy the cas is ignored while the key is
//!    absent (the insert happens); if another VM created the key meanwhile, the write fails with
//!    CasMismatch, since that key's cas is not `u32::MAX` — cas numbers come from one global
//!    counter, so only the single write numbered 2^32-1 ever holds that value.
//! 2. On a mismatch, `get` again: if the key now exists, someone else created it — a conflict,
//!    read again. If it is still absent, the host compares cas on absent keys too (Kong's
//!    ngx_wasm_module: absent means cas 0), so retry with cas 0, which such hosts treat as an
//!    atomic create.
//!
//! Step 1 must not use a cas some live key plausibly holds. On ngx_wasm_module cas numbers count
//! per key from 1 (`ngx_wa_shm_kv_set_locked`), so the cas of another key (this module used a
//! sentinel key's) equals that of a record another VM has just created, and step 1 would
//! overwrite it: a lost update.

use tollgate_core::{CasStore, StoreError, Version, Written};

use crate::abi;

/// The cas of a first-insert attempt: a value no live key holds in practice (see above).
const CREATE_CAS: u32 = u32::MAX;

pub struct SharedData;

fn host(_: abi::Status) -> StoreError {
    StoreError::Host("shared data call failed")
}

fn written(result: Result<(), abi::Status>) -> Result<Written, StoreError> {
    match result {
        Ok(()) => Ok(Written::Stored),
        Err(abi::CAS_MISMATCH) => Ok(Written::Conflict),
        Err(s) => Err(host(s)),
    }
}

impl CasStore for SharedData {
    fn load(&mut self, key: &str) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        match abi::get_shared_data(key) {
            Ok(Some((_, 0))) => Err(StoreError::Host("shared data value without a cas")),
            Ok(found) => Ok(found),
            Err(abi::NOT_FOUND) => Ok(None),
            Err(s) => Err(host(s)),
        }
    }

    fn store(&mut self, key: &str, value: &[u8], expected: Option<Version>) -> Result<Written, StoreError> {
        if let Some(cas) = expected {
            return written(abi::set_shared_data(key, value, cas));
        }
        match written(abi::set_shared_data(key, value, CREATE_CAS))? {
            Written::Stored => Ok(Written::Stored),
            Written::Conflict => match self.load(key)? {
                Some(_) => Ok(Written::Conflict),
                None => written(abi::set_shared_data(key, value, 0)),
            },
        }
    }
}
