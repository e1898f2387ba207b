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
//! 2. [`gate`] runs the request through the policy: [`identity`] (who, which tier), [`guard`]
//!    (abuse guards, the token estimate), [`limits::engine`] (reserve on every applicable
//!    limit through a [`store::CasStore`]: compare-and-set, bounded retries), and returns the
//!    local answer (OpenAI-style errors, a 429 with the tier's [`message`]) or the request to
//!    forward with its response headers, warning and soft-limit actions.
//! 3. [`translate`] turns the request into the provider's dialect and the answer back, and
//!    reports the provider's [`usage::Usage`].
//! 4. [`gate::finish`] settles the reservation with that usage when the request ends, however
//!    it ends, and releases its concurrency lease.
//!
//! Time is always an argument: epoch milliseconds from the host.

#![warn(missing_docs)]

pub mod admin;
pub mod answer;
pub mod attempt;
pub mod config;
pub(crate) mod duration;
pub mod ending;
pub(crate) mod error;
pub mod fallback;
pub mod fault;
pub mod forward;
pub mod gate;
pub mod guard;
pub mod headers;
pub mod identity;
pub mod jwt;
pub mod message;
pub mod metrics;
pub mod openai;
pub mod ops;
pub mod provider;
pub mod record;
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

pub use config::{ConfigError, FailureMode, Policy};
pub use render::LocalResponse;
pub use store::{CasStore, MemoryStore, StoreError, Version, Written};
pub use window::{Timestamp, Window};
