//! Test support for Tollgate's host tests.
//!
//! - [`proc`]: servers started on 127.0.0.1 with free ports, each in its own process group
//!   and stopped by PID (the whole group) when the guard drops.
//! - `host` (the wasmtime Proxy-Wasm host) lives beside this module.

pub mod behaviour;
pub mod bench;
pub mod checks;
pub mod envoy;
pub mod fleet;
pub mod host;
pub mod jwt_cases;
pub mod proc;
pub mod tokens;
pub mod workerd;
