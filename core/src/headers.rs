//! Tollgate's own HTTP header names, in one leaf module. Every `x-tollgate-*` request header is
//! Tollgate's to set: hosts drop a client's own before routing
//! ([`crate::gate::is_private_request_header`]), and a provider's own on an answer
//! ([`crate::answer`]).

/// The prefix of every Tollgate header.
pub const PREFIX: &str = "x-tollgate-";
/// Request header naming the Envoy cluster (or an alias's aggregate cluster) the filter picked.
pub const CLUSTER_HEADER: &str = "x-tollgate-cluster";
/// Response header naming the alias deployment that served.
pub const DEPLOYMENT_HEADER: &str = "x-tollgate-deployment";
/// Set by the Envoy upstream filter on an attempt's answer it wants retried on the next
/// deployment (never reaches the client).
pub const RETRY_HEADER: &str = "x-tollgate-retry";
/// Response header naming the model a downgrade served the request with.
pub const DOWNGRADE_HEADER: &str = "x-tollgate-downgraded-to";
/// Response header with the tier's upgrade link, on a refusal.
pub(crate) const UPGRADE_HEADER: &str = "x-tollgate-upgrade-url";
/// Response header with a soft limit's warning (RFC 8941 parameters).
pub const WARNING_HEADER: &str = "x-tollgate-warning";
