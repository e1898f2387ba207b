//! Helpers shared by core's tests.

use std::path::{Path, PathBuf};

/// The recorded provider traffic: `$TOLLGATE_FIXTURES`, else `../shared/fixtures` beside the
/// repository (where CI and every checkout have it). A missing directory fails the test: a
/// data-driven test that silently ran on nothing would prove nothing.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("TOLLGATE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(dir.is_dir(), "fixtures directory {} is missing (set TOLLGATE_FIXTURES)", dir.display());
    dir
}
