//! # tollgate-cli
//!
//! The `tollgate` command's library: [`load`] reads and validates a policy file,
//! [`check::describe`] writes the effective policy in a readable form, [`envoy::generate`] builds
//! the Envoy routes and aggregate clusters a policy's aliases need, and
//! [`simulate::simulate`] replays a timed trace of requests through the real gate
//! ([`tollgate_core::gate::admit_chat`] and [`tollgate_core::gate::finish`]) against an
//! in-memory store, returning one [`simulate::Line`] per decision and per settlement.
//!
//! Like the core, nothing here reads a clock: a simulation's time is the trace's.

use std::path::Path;

use serde_json::Value;
use tollgate_core::Policy;

pub mod check;
pub mod envoy;
pub mod simulate;
pub mod store;
pub mod usage;

/// A validated policy and the JSON it was read from (for the few things the validated form
/// does not expose: identity source order, header names, message locales).
pub struct Loaded {
    pub policy: Policy,
    pub raw: Value,
}

/// Parses and validates policy bytes. The error is core's message, naming the JSON path.
pub fn parse(bytes: &[u8]) -> Result<Loaded, String> {
    let policy = Policy::from_json(bytes).map_err(|e| e.to_string())?;
    // Valid for the core, so valid JSON too.
    let raw = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(Loaded { policy, raw })
}

/// Reads and validates a policy file; errors are `FILE: message`.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// RFC 3339 UTC, to the millisecond when it has any.
pub fn timestamp(ms: u64) -> String {
    match i64::try_from(ms).ok().and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
        Some(t) => t.to_string(),
        None => format!("{ms}ms"),
    }
}
