//! Configuration errors: a leaf module every policy section imports (none of them imports the
//! policy itself back).

use thiserror::Error;

/// Why a policy was refused. `Invalid` names the JSON path it is about
/// (`tiers.free.limits[1].window: unknown window "fortnight"`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The plugin configuration is empty.
    #[error("configuration is empty: the plugin needs a JSON policy")]
    Empty,
    /// The configuration is not JSON.
    #[error("configuration is not valid JSON: {0}")]
    Syntax(String),
    /// A value at `path` is wrong.
    #[error("{path}: {message}")]
    Invalid {
        /// The JSON path, e.g. `tiers.free.limits[1].window`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A [`ConfigError::Invalid`].
pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: path.into(), message: message.into() }
}
