//! # tollgate-core
//!
//! All of Tollgate's logic, sans-IO. This crate never calls a host, never reads a clock and
//! never does I/O: adapters (the proxy-wasm filter, the Cloudflare worker) turn host data into
//! the inputs below, call in, and apply the returned plan through their host.
//!
//! Contract, in the order a request meets it:
//! 1. [`Policy::from_json`] parses and validates the one config schema both hosts share. Every
//!    error names the JSON path it is about (`tiers.free.limits[1].window: unknown window
//!    "fortnight"`).
//! 2. [`Policy::subject`] resolves who is asking (configured header, else the client address)
//!    and which tier applies; the identity is only ever kept as a SHA-256 digest.
//! 3. [`quota::check_and_count`] reads the subject's counters through a [`store::CasStore`],
//!    decides in a pure function, and writes back with compare-and-set, retrying a bounded
//!    number of times. Time is an argument: epoch milliseconds from the host.
//! 4. [`render`] turns the [`quota::Decision`] into response headers (allowed) or a complete
//!    OpenAI-style 429 (denied).

pub mod config;
pub mod duration;
pub mod guard;
pub mod message;
pub mod identity;
pub mod openai;
pub mod quota;
pub mod render;
pub mod routing;
pub mod store;
pub mod translate;
pub mod usage;
pub mod window;

#[cfg(test)]
mod test_support;
pub mod json_array;
pub mod limits;
pub mod sse;

pub use config::{ConfigError, FailureMode, Policy, Subject};
pub use quota::{check_and_count, Decision, Quota};
pub use render::LocalResponse;
pub use store::{CasStore, MemoryStore, StoreError, Version, Written};
pub use window::{Timestamp, Window};
