//! `tollgate envoy`: the Envoy routes and aggregate clusters a policy's aliases need
//! (docs/adr/0001-envoy-fallback.md), generated so that nobody keeps them in step with the
//! policy by hand.
//!
//! For every alias and every deployment as first choice: a route matching
//! `x-tollgate-cluster: <alias>/<first>` whose retry policy moves each retry to the next
//! cluster of an aggregate (`num_retries` = the alias's `max_attempts` − 1, `per_try_timeout` =
//! `fallback.attempt_timeout_ms`, `timeout` = max(`fallback.total_timeout_ms`, 600 s)), and the
//! aggregate cluster `<alias>.<first>` listing the deployment clusters in the plan's order (the
//! first, then the alias's order without it) with the filter as an upstream HTTP filter. Two
//! first choices with the same plan (aliases with the same order, or orders that agree once the
//! first is moved to the front) share one aggregate: the one generated first (aliases by name,
//! first choices in the alias's order).
//!
//! The output is JSON, which is also YAML: it can be pasted into an Envoy config or merged
//! into one. The deployment clusters themselves (addresses, TLS) stay the operator's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};
use tollgate_core::headers::{CLUSTER_HEADER, RETRY_HEADER};

use crate::Loaded;

/// The filter's path in a checkout after `scripts/build-wasm.sh`.
pub const DEFAULT_WASM: &str = "target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm";
/// The least route `timeout`: it bounds the whole exchange, a long stream included.
pub const MIN_ROUTE_TIMEOUT_MS: u64 = 600_000;
/// Envoy allows 3 concurrent retries per cluster unless the breakers say more.
const BREAKER_LIMIT: u64 = 100_000;

/// How the generated pieces name and find things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Put before a deployment's name to get its Envoy cluster (`""`: the name itself).
    pub deployment_cluster_prefix: String,
    /// `vm_config.code.local.filename` of the upstream filter.
    pub wasm: String,
    /// `host:port` of each `tollgate store` replica (`store.redis`).
    pub store_addresses: Vec<String>,
}

/// Where a store replica listens unless told otherwise (`tollgate store --listen`'s default).
pub const DEFAULT_STORE_ADDRESS: &str = "127.0.0.1:8089";

impl Default for Options {
    fn default() -> Self {
        Options { deployment_cluster_prefix: String::new(), wasm: DEFAULT_WASM.to_owned(), store_addresses: vec![DEFAULT_STORE_ADDRESS.to_owned()] }
    }
}

/// One route: requests the downstream filter sent to `<alias>/<first>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRoute {
    pub alias: String,
    pub first: String,
    /// The `x-tollgate-cluster` value matched exactly.
    pub header_value: String,
    /// The aggregate cluster (possibly shared with another alias of the same plan).
    pub cluster: String,
    pub timeout_ms: u64,
    pub num_retries: u32,
    pub per_try_timeout_ms: u64,
}

/// One aggregate cluster: the deployment clusters in a plan's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub name: String,
    /// Deployment cluster names (prefix included), in attempt order.
    pub clusters: Vec<String>,
}

/// The cluster threshold events are posted through (`notify.cluster`, reaching `notify.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyCluster {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `https`: TLS with the host as SNI.
    pub tls: bool,
}

/// What a policy's aliases and webhook need in Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub routes: Vec<AliasRoute>,
    pub aggregates: Vec<Aggregate>,
    /// The webhook's cluster, when the policy posts threshold events.
    pub notify: Option<NotifyCluster>,
    /// Every deployment cluster an aggregate names, sorted: the operator defines these.
    pub deployment_clusters: Vec<String>,
    /// The `jwt_authn` filter for the policy's `jwt` sources verified by Envoy, and the
    /// clusters its remote JWKS are fetched through.
    pub jwt_authn: Option<Value>,
    pub jwks_clusters: Vec<Value>,
    /// The cluster of the `tollgate store` replicas (`store.redis`).
    pub store_cluster: Option<Value>,
    /// The policy as the filter's configuration (compact JSON).
    policy: String,
    wasm: String,
}

/// Builds the routes and aggregates of `loaded`'s aliases. Errors (a cluster name generated
/// for two different plans, or equal to a deployment cluster) name the clash.
pub fn generate(loaded: &Loaded, options: &Options) -> Result<Generated, String> {
    let p = &loaded.policy;
    let policy = serde_json::to_string(&loaded.raw).map_err(|e| format!("cannot write the policy as JSON: {e}"))?;
    let prefixed = |d: &str| format!("{}{d}", options.deployment_cluster_prefix);
    let timeout_ms = p.fallback.total_timeout_ms.max(MIN_ROUTE_TIMEOUT_MS);

    let mut routes = Vec::new();
    let mut aggregates: Vec<Aggregate> = Vec::new();
    // Plan (deployment names in order) → index in `aggregates`; aggregate name → plan.
    let mut by_plan: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut deployment_clusters: BTreeMap<String, String> = BTreeMap::new();

    for alias in p.routes.aliases() {
        for d in alias.deployment_names() {
            deployment_clusters.insert(prefixed(d), d.to_owned());
        }
        for first in alias.deployment_names() {
            let plan: Vec<String> = std::iter::once(first)
                .chain(alias.deployment_names().filter(|d| *d != first))
                .map(str::to_owned)
                .collect();
            let header_value = format!("{}/{first}", alias.name);
            let cluster = match by_plan.get(&plan) {
                Some(&i) => aggregates[i].name.clone(),
                None => {
                    let name = format!("{}.{first}", alias.name);
                    if let Some((other, _)) = by_name.get(&name) {
                        return Err(format!(
                            "the aggregate cluster name \"{name}\" is generated for both {other} and {header_value} with different orders: rename an alias or a model"
                        ));
                    }
                    by_name.insert(name.clone(), (header_value.clone(), plan.clone()));
                    by_plan.insert(plan.clone(), aggregates.len());
                    aggregates.push(Aggregate { name: name.clone(), clusters: plan.iter().map(|d| prefixed(d)).collect() });
                    name
                }
            };
            routes.push(AliasRoute {
                alias: alias.name.clone(),
                first: first.to_owned(),
                header_value,
                cluster,
                timeout_ms,
                num_retries: alias.max_attempts.saturating_sub(1),
                per_try_timeout_ms: p.fallback.attempt_timeout_ms,
            });
        }
    }
    for a in &aggregates {
        if let Some(d) = deployment_clusters.get(&a.name) {
            return Err(format!(
                "the aggregate cluster name \"{}\" is also deployment {d}'s cluster: rename an alias or a model, or use --deployment-cluster-prefix",
                a.name
            ));
        }
    }
    let notify = match &p.notify {
        Some(n) => Some(notify_cluster(n)?),
        None => None,
    };
    let (jwt_authn, jwks_clusters) = jwt_authn(p)?;
    let store_cluster = match &p.remote_store {
        Some(store) => Some(store_cluster(&store.cluster, &options.store_addresses)?),
        None => None,
    };
    Ok(Generated {
        store_cluster,
        routes,
        aggregates,
        notify,
        jwt_authn,
        jwks_clusters,
        deployment_clusters: deployment_clusters.into_keys().collect(),
        policy,
        wasm: options.wasm.clone(),
    })
}

/// The cluster reaching `notify.url` (the filter refuses a `notify` without `notify.cluster`).
fn notify_cluster(n: &tollgate_core::config::Notify) -> Result<NotifyCluster, String> {
    let name = n.cluster.clone().ok_or("notify.cluster: required in Envoy (the cluster that reaches notify.url)")?;
    let tls = n.url.starts_with("https://");
    let (host, port) = match n.authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => (h.trim_start_matches('[').trim_end_matches(']').to_owned(), port),
            Err(_) => return Err(format!("notify.url: {:?} has no valid port", n.url)),
        },
        _ => (n.authority.clone(), if tls { 443 } else { 80 }),
    };
    Ok(NotifyCluster { name, host, port, tls })
}

/// The cluster of the store replicas: HTTP/1.1, short connect timeout (an admission waits at
/// most `store.redis.timeout_ms`), breakers high enough for every request in flight.
fn store_cluster(name: &str, addresses: &[String]) -> Result<Value, String> {
    if addresses.is_empty() {
        return Err("store.redis: give the store replicas' addresses (--store-address HOST:PORT)".to_owned());
    }
    let mut endpoints = Vec::new();
    let mut dns = false;
    for a in addresses {
        let (host, port) = a.rsplit_once(':').ok_or_else(|| format!("--store-address {a:?}: HOST:PORT"))?;
        let port: u16 = port.parse().map_err(|_| format!("--store-address {a:?}: the port is not a number"))?;
        dns |= host.parse::<std::net::IpAddr>().is_err();
        endpoints.push(json!({ "endpoint": { "address": { "socket_address": { "address": host, "port_value": port } } } }));
    }
    Ok(json!({
        "name": name,
        "type": if dns { "STRICT_DNS" } else { "STATIC" },
        "connect_timeout": "0.25s",
        "circuit_breakers": { "thresholds": [ { "max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000 } ] },
        // A replica that stops answering (or whose Redis did) is taken out within two seconds,
        // and one that refuses a connection at once: the others take its jobs. (The timeout
        // leaves room for Envoy's main thread compiling the filter at start.)
        "health_checks": [ {
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1,
            "http_health_check": { "path": "/healthz" }
        } ],
        "outlier_detection": {
            "split_external_local_origin_errors": true, "consecutive_local_origin_failure": 1,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 50
        },
        "load_assignment": { "cluster_name": name, "endpoints": [ { "lb_endpoints": endpoints } ] }
    }))
}

/// Envoy's `jwt_authn` filter for the policy's `jwt` sources with `payload_in_metadata`: one
/// provider each (the keys inline from `jwks`, or fetched from `jwks_uri` through a generated
/// cluster), and a rule that lets every request through (`allow_missing_or_failed`) — verified
/// tokens leave their claims in the metadata and are removed; the tollgate filter answers a
/// token that failed with its own OpenAI 401, and lets a request without one fall through to
/// the next identity source.
fn jwt_authn(p: &tollgate_core::Policy) -> Result<(Option<Value>, Vec<Value>), String> {
    let sources = p.identity.envoy_jwt_sources();
    if sources.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut providers = serde_json::Map::new();
    let mut clusters = Vec::new();
    for (i, j) in sources.iter().enumerate() {
        let name = format!("tollgate_jwt_{i}");
        let from = if j.header == "authorization" { json!({ "name": "authorization", "value_prefix": "Bearer " }) } else { json!({ "name": j.header }) };
        let mut provider = json!({
            "issuer": j.issuer,
            "audiences": j.audiences,
            "from_headers": [from],
            "payload_in_metadata": j.metadata_key,
            "clock_skew_seconds": j.skew_seconds,
            "forward": false,
        });
        match (j.jwks_uri, j.jwks) {
            (Some(uri), _) => {
                let cluster = format!("tollgate_jwks_{i}");
                let url = uri.split_once("://").map_or(uri, |(_, rest)| rest);
                let authority = url.split('/').next().unwrap_or(url);
                let tls = uri.starts_with("https://");
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, port)) if !h.ends_with(']') || h.starts_with('[') => {
                        (h.trim_start_matches('[').trim_end_matches(']').to_owned(), port.parse::<u16>().map_err(|_| format!("jwks_uri: {uri:?} has no valid port"))?)
                    }
                    _ => (authority.to_owned(), if tls { 443 } else { 80 }),
                };
                provider["remote_jwks"] = json!({
                    "http_uri": { "uri": uri, "cluster": cluster, "timeout": "5s" },
                    "cache_duration": "600s",
                    "async_fetch": { "fast_listener": false }
                });
                clusters.extend(notify_json_of(&NotifyCluster { name: cluster, host, port, tls }));
            }
            (None, Some(jwks)) => provider["local_jwks"] = json!({ "inline_string": jwks }),
            (None, None) => return Err(format!("the jwt source with payload_in_metadata {:?} needs jwks or jwks_uri for Envoy to verify with", j.metadata_key)),
        }
        providers.insert(name, provider);
    }
    let filter = json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "rules": [ { "match": { "prefix": "/" }, "requires": { "allow_missing_or_failed": {} } } ]
        }
    });
    Ok((Some(filter), clusters))
}


/// A cluster reaching `host:port` by DNS (TLS with the host as SNI when `tls`).
fn notify_json_of(n: &NotifyCluster) -> Option<Value> {
    let mut cluster = json!({
        "name": n.name,
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": n.name,
            "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": { "address": n.host, "port_value": n.port } } } } ] } ]
        }
    });
    if n.tls {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": n.host
            }
        });
    }
    Some(cluster)
}

/// An Envoy duration: `600s`, `0.001s`, `1.5s`.
pub fn duration(ms: u64) -> String {
    let (s, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0'))
    }
}

#[derive(Serialize)]
struct Output {
    routes: Vec<RouteJson>,
    clusters: Vec<Value>,
    /// HTTP filters that go before the tollgate filter (`jwt_authn` for `jwt` sources).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    http_filters: Vec<Value>,
}

#[derive(Serialize)]
struct RouteJson {
    #[serde(rename = "match")]
    matcher: Value,
    route: RouteAction,
    request_headers_to_remove: [&'static str; 1],
}

#[derive(Serialize)]
struct RouteAction {
    cluster: String,
    timeout: String,
    retry_policy: Value,
}

#[derive(Serialize)]
struct ClusterJson {
    name: String,
    connect_timeout: &'static str,
    lb_policy: &'static str,
    circuit_breakers: Value,
    cluster_type: Value,
    typed_extension_protocol_options: Value,
}

impl Generated {
    /// The routes as Envoy `RouteConfiguration.virtual_hosts[].routes` entries.
    fn routes_json(&self) -> Vec<RouteJson> {
        self.routes
            .iter()
            .map(|r| RouteJson {
                matcher: json!({
                    "prefix": "/",
                    "headers": [ { "name": CLUSTER_HEADER, "string_match": { "exact": r.header_value } } ]
                }),
                route: RouteAction {
                    cluster: r.cluster.clone(),
                    timeout: duration(r.timeout_ms),
                    retry_policy: json!({
                        "retry_on": "connect-failure,reset,retriable-headers",
                        "retriable_headers": [ { "name": RETRY_HEADER, "present_match": true } ],
                        "num_retries": r.num_retries,
                        "per_try_timeout": duration(r.per_try_timeout_ms),
                        "retry_back_off": { "base_interval": "0.001s", "max_interval": "0.005s" },
                        "retry_priority": {
                            "name": "envoy.retry_priorities.previous_priorities",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                                "update_frequency": 1
                            }
                        }
                    }),
                },
                request_headers_to_remove: [CLUSTER_HEADER],
            })
            .collect()
    }

    /// The aggregates as Envoy `Cluster`s.
    fn clusters_json(&self) -> Vec<ClusterJson> {
        let upstream_filter = json!({
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http_protocol_options": {} },
            "http_filters": [
                {
                    "name": "tollgate-upstream",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {
                            "name": "tollgate-upstream",
                            "root_id": "tollgate-upstream",
                            "failure_policy": "FAIL_RELOAD",
                            "allow_on_headers_stop_iteration": true,
                            "configuration": {
                                "@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": self.policy
                            },
                            "vm_config": {
                                "vm_id": "tollgate",
                                "runtime": "envoy.wasm.runtime.v8",
                                "code": { "local": { "filename": self.wasm } }
                            }
                        }
                    }
                },
                {
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                    }
                }
            ]
        });
        self.aggregates
            .iter()
            .map(|a| ClusterJson {
                name: a.name.clone(),
                connect_timeout: "1s",
                lb_policy: "CLUSTER_PROVIDED",
                circuit_breakers: json!({
                    "thresholds": [ {
                        "max_retries": BREAKER_LIMIT,
                        "max_requests": BREAKER_LIMIT,
                        "max_pending_requests": BREAKER_LIMIT,
                        "max_connections": BREAKER_LIMIT
                    } ]
                }),
                cluster_type: json!({
                    "name": "envoy.clusters.aggregate",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                        "clusters": a.clusters
                    }
                }),
                typed_extension_protocol_options: json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": upstream_filter.clone()
                }),
            })
            .collect()
    }

    /// The webhook's cluster as an Envoy `Cluster`.
    fn notify_json(&self) -> Option<Value> {
        notify_json_of(self.notify.as_ref()?)
    }

    /// `{"routes": [...], "clusters": [...]}`, pretty-printed, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut clusters: Vec<Value> = self.clusters_json().into_iter().filter_map(|c| serde_json::to_value(c).ok()).collect();
        clusters.extend(self.notify_json());
        clusters.extend(self.jwks_clusters.iter().cloned());
        clusters.extend(self.store_cluster.iter().cloned());
        let out = Output { routes: self.routes_json(), clusters, http_filters: self.jwt_authn.iter().cloned().collect() };
        // Only strings, numbers and maps with string keys: serialising cannot fail.
        let mut text = serde_json::to_string_pretty(&out).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The note for stderr: where the pieces go and what stays the operator's.
    pub fn note(&self) -> String {
        let mut o = String::new();
        if let Some(n) = &self.notify {
            let _ = writeln!(o, "cluster {}: threshold events (notify.url) are posted through it; add it to static_resources.clusters.", n.name);
        }
        if let Some(c) = &self.store_cluster {
            let _ = writeln!(o, "cluster {}: the tollgate store replicas (store.redis); add it to static_resources.clusters, and run `tollgate store --redis URL --listen ADDR POLICY` on each address with this same policy.", c["name"].as_str().unwrap_or("?"));
        }
        if self.jwt_authn.is_some() {
            let _ = writeln!(o, "http_filters: put the jwt_authn filter in the http_connection_manager's http_filters before the tollgate filter; it verifies tokens and leaves their claims in the metadata the jwt source reads (payload_in_metadata).");
            for c in &self.jwks_clusters {
                let _ = writeln!(o, "cluster {}: jwt_authn fetches the JWKS through it; add it to static_resources.clusters.", c["name"].as_str().unwrap_or("?"));
            }
        }
        if self.routes.is_empty() {
            let _ = writeln!(o, "no aliases in this policy: Envoy needs no routes or aggregate clusters for it");
            return o;
        }
        let aliases = {
            let mut names: Vec<&str> = self.routes.iter().map(|r| r.alias.as_str()).collect();
            names.dedup();
            names.len()
        };
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let _ = writeln!(
            o,
            "{} and {} for {}.",
            plural(self.routes.len(), "route", "routes"),
            plural(self.aggregates.len(), "aggregate cluster", "aggregate clusters"),
            plural(aliases, "alias", "aliases")
        );
        let _ = writeln!(
            o,
            "routes: add them to the virtual host that serves Tollgate, before its catch-all route."
        );
        let _ = writeln!(o, "clusters: add them to static_resources.clusters (or your CDS).");
        let _ = writeln!(
            o,
            "The deployment clusters they list are yours to define (addresses, TLS; no outlier detection or active health checks): {}.",
            self.deployment_clusters.join(", ")
        );
        let _ = writeln!(
            o,
            "The listener runs the downstream tollgate filter with the same policy and vm_config, and removes a client's {CLUSTER_HEADER} (examples/envoy/fallback.yaml)."
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/envoy/fallback.yaml");

    /// The policy embedded in the example: the lines between `value: |` and `vm_config:`.
    fn example_policy() -> String {
        let start = EXAMPLE.find("value: |\n").expect("policy block") + "value: |\n".len();
        let end = EXAMPLE[start..].find("vm_config:").expect("vm_config after the policy") + start;
        let block = &EXAMPLE[start..end];
        block.lines().map(str::trim).collect::<Vec<_>>().join("\n")
    }

    fn loaded(policy: &str) -> Loaded {
        crate::parse(policy.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{policy}"))
    }

    fn example() -> Generated {
        generate(&loaded(&example_policy()), &Options::default()).expect("generate")
    }

    /// The text after `key:` on the first line at or after `from` that has it.
    fn field_after<'a>(from: &'a str, key: &str) -> &'a str {
        let at = from.find(key).unwrap_or_else(|| panic!("no {key} in the example"));
        let rest = &from[at + key.len()..];
        rest[..rest.find('\n').unwrap_or(rest.len())].trim()
    }

    /// `[ m1, m2, m3 ]` → names.
    fn list(text: &str) -> Vec<String> {
        text.trim_start_matches('[').trim_end_matches(']').split(',').map(|s| s.trim().to_owned()).collect()
    }

    /// The hand-written example: (header value, cluster) per route, in file order.
    fn example_routes() -> Vec<(String, String)> {
        EXAMPLE
            .match_indices("string_match: { exact: ")
            .map(|(i, m)| {
                let rest = &EXAMPLE[i + m.len()..];
                let value = rest[..rest.find(' ').unwrap_or(0)].to_owned();
                let cluster = field_after(rest, "cluster: ");
                let cluster = cluster.split([',', ' ']).next().unwrap_or("").to_owned();
                (value, cluster)
            })
            .collect()
    }

    /// The hand-written example: (name, member clusters) per aggregate, in file order.
    fn example_aggregates() -> Vec<(String, Vec<String>)> {
        EXAMPLE
            .match_indices("lb_policy: CLUSTER_PROVIDED")
            .map(|(i, _)| {
                let before = &EXAMPLE[..i];
                let name_at = before.rfind("- name: ").expect("cluster name");
                let name = field_after(&before[name_at..], "- name: ").to_owned();
                (name, list(field_after(&EXAMPLE[i..], "clusters: ")))
            })
            .collect()
    }

    fn ms(envoy_duration: &str) -> u64 {
        let s = envoy_duration.trim_end_matches('s');
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let frac = format!("{frac:0<3}");
        whole.parse::<u64>().unwrap() * 1000 + frac[..3].parse::<u64>().unwrap()
    }

    #[test]
    fn the_example_policys_routes_and_aggregates_match_the_hand_written_ones() {
        let g = example();
        let routes: Vec<(String, String)> = g.routes.iter().map(|r| (r.header_value.clone(), r.cluster.clone())).collect();
        assert_eq!(routes, example_routes());
        assert_eq!(
            routes,
            [("scalix-free/m1", "scalix-free.m1"), ("scalix-free/m2", "scalix-free.m2"), ("scalix-free/m3", "scalix-free.m3")]
                .map(|(v, c)| (v.to_owned(), c.to_owned()))
        );
        let aggregates: Vec<(String, Vec<String>)> = g.aggregates.iter().map(|a| (a.name.clone(), a.clusters.clone())).collect();
        assert_eq!(aggregates, example_aggregates());
        assert_eq!(aggregates[1], ("scalix-free.m2".to_owned(), list("[m2, m1, m3]")));
        assert_eq!(g.deployment_clusters, ["m1", "m2", "m3"]);

        let num_retries: u32 = field_after(EXAMPLE, "num_retries: ").parse().unwrap();
        let per_try = ms(field_after(EXAMPLE, "per_try_timeout: "));
        let route = &EXAMPLE[EXAMPLE.find("route:\n").expect("the first route")..];
        let timeout = ms(field_after(route, "timeout: "));
        for r in &g.routes {
            assert_eq!((r.num_retries, r.per_try_timeout_ms, r.timeout_ms), (num_retries, per_try, timeout), "{r:?}");
        }
        assert_eq!((num_retries, per_try), (2, 30_000));
    }

    #[test]
    fn the_json_has_the_examples_retry_policy_and_upstream_filter() {
        let g = example();
        let v: Value = serde_json::from_str(&g.to_json()).unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["clusters", "routes"]);
        let route = &v["routes"][1];
        assert_eq!(
            route["match"],
            json!({"prefix": "/", "headers": [{"name": "x-tollgate-cluster", "string_match": {"exact": "scalix-free/m2"}}]})
        );
        assert_eq!(route["request_headers_to_remove"], json!(["x-tollgate-cluster"]));
        assert_eq!((&route["route"]["cluster"], &route["route"]["timeout"]), (&json!("scalix-free.m2"), &json!("600s")));
        let retry = &route["route"]["retry_policy"];
        assert_eq!(retry["retry_on"], field_after(EXAMPLE, "retry_on: "));
        assert_eq!(retry["retriable_headers"], json!([{"name": "x-tollgate-retry", "present_match": true}]));
        assert_eq!((&retry["num_retries"], &retry["per_try_timeout"]), (&json!(2), &json!("30s")));
        assert_eq!(retry["retry_back_off"], json!({"base_interval": "0.001s", "max_interval": "0.005s"}));
        assert_eq!(retry["retry_priority"]["name"], field_after(EXAMPLE, "retry_priority:\n").trim_start_matches("name: "));
        assert_eq!(retry["retry_priority"]["typed_config"]["update_frequency"], 1);

        let cluster = &v["clusters"][2];
        assert_eq!(cluster["name"], "scalix-free.m3");
        assert_eq!(cluster["lb_policy"], "CLUSTER_PROVIDED");
        assert_eq!(cluster["circuit_breakers"]["thresholds"][0]["max_retries"], 100_000);
        assert_eq!(cluster["cluster_type"]["name"], "envoy.clusters.aggregate");
        assert_eq!(cluster["cluster_type"]["typed_config"]["clusters"], json!(["m3", "m1", "m2"]));
        let options = &cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let filters = options["http_filters"].as_array().unwrap();
        assert_eq!(filters.len(), 2);
        let config = &filters[0]["typed_config"]["config"];
        assert_eq!(filters[0]["name"], "tollgate-upstream");
        assert_eq!((&config["root_id"], &config["name"]), (&json!("tollgate-upstream"), &json!("tollgate-upstream")));
        assert_eq!(config["failure_policy"], "FAIL_RELOAD");
        assert_eq!(config["allow_on_headers_stop_iteration"], true);
        assert_eq!(config["configuration"]["@type"], "type.googleapis.com/google.protobuf.StringValue");
        let policy: Value = serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(policy, serde_json::from_str::<Value>(&example_policy()).unwrap());
        assert_eq!(
            config["vm_config"],
            json!({"vm_id": "tollgate", "runtime": "envoy.wasm.runtime.v8",
                   "code": {"local": {"filename": field_after(EXAMPLE, "filename: ")}}})
        );
        assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
        // Every aggregate carries the same upstream filter (one shared VM).
        assert_eq!(v["clusters"][0]["typed_extension_protocol_options"], cluster["typed_extension_protocol_options"]);
    }

    /// The example's policy as JSON, without the free tier's model allowlist (which names the
    /// example's alias).
    fn example_json() -> Value {
        let mut v: Value = serde_json::from_str(&example_policy()).unwrap();
        v["tiers"]["free"].as_object_mut().unwrap().remove("guards");
        v
    }

    fn from_json(v: &Value) -> Loaded {
        loaded(&serde_json::to_string_pretty(v).unwrap())
    }

    /// The example's policy with `aliases` and `fallback` replaced.
    fn with_aliases(aliases: Value, fallback: Value) -> Loaded {
        let mut v = example_json();
        v["aliases"] = aliases;
        v["fallback"] = fallback;
        from_json(&v)
    }

    /// Renames a model (and its price) of the example's policy.
    fn rename_model(v: &mut Value, from: &str, to: &str) {
        for section in ["models", "prices"] {
            let map = v[section].as_object_mut().unwrap();
            let entry = map.remove(from).unwrap();
            map.insert(to.to_owned(), entry);
        }
    }

    #[test]
    fn num_retries_follow_each_aliases_attempt_cap_and_timeouts_the_fallback_settings() {
        let l = with_aliases(
            json!({ "a": { "deployments": ["m1", "m2", "m3"], "max_attempts": 2 },
                    "b": { "deployments": ["m3", "m1"] },
                    "c": { "deployments": ["m2"] } }),
            json!({ "max_attempts": 5, "attempt_timeout_ms": 1500, "total_timeout_ms": 900000 }),
        );
        let g = generate(&l, &Options::default()).unwrap();
        let got: Vec<(&str, u32)> = g.routes.iter().map(|r| (r.header_value.as_str(), r.num_retries)).collect();
        assert_eq!(got, [("a/m1", 1), ("a/m2", 1), ("a/m3", 1), ("b/m3", 1), ("b/m1", 1), ("c/m2", 0)]);
        assert!(g.routes.iter().all(|r| r.per_try_timeout_ms == 1500 && r.timeout_ms == 900_000));
        let v: Value = serde_json::from_str(&g.to_json()).unwrap();
        assert_eq!(v["routes"][0]["route"]["retry_policy"]["per_try_timeout"], "1.5s");
        assert_eq!(v["routes"][0]["route"]["timeout"], "900s");
        assert_eq!(v["clusters"][5]["cluster_type"]["typed_config"]["clusters"], json!(["m2"]));
    }

    #[test]
    fn first_choices_with_the_same_plan_share_one_aggregate() {
        let l = with_aliases(
            json!({ "a": { "deployments": ["m1", "m2", "m3"] },
                    "b": { "deployments": ["m1", "m2", "m3"], "strategy": "weighted", "max_attempts": 2 },
                    "c": { "deployments": ["m2", "m1", "m3"] } }),
            json!({}),
        );
        let g = generate(&l, &Options::default()).unwrap();
        let routes: Vec<(&str, &str, u32)> = g.routes.iter().map(|r| (r.header_value.as_str(), r.cluster.as_str(), r.num_retries)).collect();
        assert_eq!(
            routes,
            [
                ("a/m1", "a.m1", 2),
                ("a/m2", "a.m2", 2),
                ("a/m3", "a.m3", 2),
                ("b/m1", "a.m1", 1),
                ("b/m2", "a.m2", 1),
                ("b/m3", "a.m3", 1),
                // c's order differs, but with m1 first its plan is a's: m1, m2, m3.
                ("c/m2", "a.m2", 2),
                ("c/m1", "a.m1", 2),
                ("c/m3", "c.m3", 2),
            ]
        );
        let aggregates: Vec<(&str, Vec<&str>)> =
            g.aggregates.iter().map(|a| (a.name.as_str(), a.clusters.iter().map(String::as_str).collect())).collect();
        assert_eq!(
            aggregates,
            [
                ("a.m1", vec!["m1", "m2", "m3"]),
                ("a.m2", vec!["m2", "m1", "m3"]),
                ("a.m3", vec!["m3", "m1", "m2"]),
                ("c.m3", vec!["m3", "m2", "m1"]),
            ]
        );
        let v: Value = serde_json::from_str(&g.to_json()).unwrap();
        let names: Vec<&str> = v["clusters"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["a.m1", "a.m2", "a.m3", "c.m3"]);
        assert_eq!(v["routes"].as_array().unwrap().len(), 9);
    }

    #[test]
    fn the_prefix_and_wasm_path_are_applied() {
        let options = Options { deployment_cluster_prefix: "llm-".to_owned(), wasm: "/opt/tollgate.wasm".to_owned(), ..Options::default() };
        let g = generate(&loaded(&example_policy()), &options).unwrap();
        assert_eq!(g.aggregates[1].clusters, ["llm-m2", "llm-m1", "llm-m3"]);
        assert_eq!(g.aggregates[1].name, "scalix-free.m2");
        assert_eq!(g.deployment_clusters, ["llm-m1", "llm-m2", "llm-m3"]);
        let v: Value = serde_json::from_str(&g.to_json()).unwrap();
        let config = &v["clusters"][0]["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["http_filters"][0]["typed_config"]["config"];
        assert_eq!(config["vm_config"]["code"]["local"]["filename"], "/opt/tollgate.wasm");
        assert!(g.note().contains("llm-m1, llm-m2, llm-m3"), "{}", g.note());
    }

    #[test]
    fn a_policy_without_aliases_needs_nothing() {
        let mut v = example_json();
        v.as_object_mut().unwrap().remove("aliases");
        let g = generate(&from_json(&v), &Options::default()).unwrap();
        assert!(g.routes.is_empty() && g.aggregates.is_empty());
        assert_eq!(serde_json::from_str::<Value>(&g.to_json()).unwrap(), json!({"routes": [], "clusters": []}));
        assert!(g.note().starts_with("no aliases"), "{}", g.note());
    }

    #[test]
    fn clashing_cluster_names_are_refused() {
        // "a.b" + "c" and "a" + "b.c" are both "a.b.c", with different plans.
        let mut v = example_json();
        rename_model(&mut v, "m1", "c");
        rename_model(&mut v, "m2", "b.c");
        v["aliases"] = json!({ "a.b": { "deployments": ["c", "m3"] }, "a": { "deployments": ["b.c", "c"] } });
        let err = generate(&from_json(&v), &Options::default()).unwrap_err();
        assert_eq!(
            err,
            "the aggregate cluster name \"a.b.c\" is generated for both a/b.c and a.b/c with different orders: rename an alias or a model"
        );

        // An aggregate named like a deployment cluster; a prefix separates them.
        let mut v = example_json();
        rename_model(&mut v, "m3", "x.m2");
        v["aliases"] = json!({ "x": { "deployments": ["m2", "x.m2"] } });
        let err = generate(&from_json(&v), &Options::default()).unwrap_err();
        assert!(err.starts_with("the aggregate cluster name \"x.m2\" is also deployment x.m2's cluster"), "{err}");
        let prefixed = Options { deployment_cluster_prefix: "d-".to_owned(), ..Options::default() };
        assert!(generate(&from_json(&v), &prefixed).is_ok());
    }

    #[test]
    fn a_policy_that_posts_threshold_events_gets_its_webhook_cluster() {
        let template = include_str!("../../policies/templates/free.json");
        let g = generate(&crate::parse(template.as_bytes()).unwrap(), &Options::default()).unwrap();
        assert_eq!(g.notify, Some(NotifyCluster { name: "tollgate_notify".into(), host: "hooks.example.com".into(), port: 443, tls: true }));
        let v: Value = serde_json::from_str(&g.to_json()).unwrap();
        let cluster = v["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "tollgate_notify").expect("the notify cluster");
        assert_eq!(cluster["transport_socket"]["typed_config"]["sni"], "hooks.example.com");
        assert_eq!(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"], 443);
        let plain = template.replace("https://hooks.example.com/tollgate", "http://127.0.0.1:8089/hook");
        let g = generate(&crate::parse(plain.as_bytes()).unwrap(), &Options::default()).unwrap();
        assert_eq!(g.notify, Some(NotifyCluster { name: "tollgate_notify".into(), host: "127.0.0.1".into(), port: 8089, tls: false }));
        let without = template.replace(r#", "cluster": "tollgate_notify""#, "");
        assert!(generate(&crate::parse(without.as_bytes()).unwrap(), &Options::default()).unwrap_err().starts_with("notify.cluster: required"));
    }

    #[test]
    fn durations_are_envoy_durations() {
        assert_eq!([duration(600_000), duration(1), duration(1500), duration(30_000), duration(1250)], ["600s", "0.001s", "1.5s", "30s", "1.25s"]);
    }
    #[test]
    fn jwt_sources_verified_by_envoy_get_a_jwt_authn_filter() {
        let jwks = r#"{"keys":[{"kty":"EC","kid":"ec-1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        let policy = format!(
            r#"{{"identity": {{"sources": [
                 {{"jwt": {{"issuer": "https://id.example/", "audiences": ["tollgate"], "jwks": {jwks}, "payload_in_metadata": "jwt_payload", "tier_claim": "tier"}}}},
                 {{"jwt": {{"header": "x-app-token", "issuer": "https://other.example/", "audiences": ["a", "b"], "payload_in_metadata": "app", "jwks_uri": "https://other.example:8443/.well-known/jwks.json", "max_skew_seconds": 30}}}},
                 {{"client_ip": {{}}}}]}},
               "tier": {{"default": "free"}}, "tiers": {{"free": {{"limits": []}}}}}}"#
        );
        let g = generate(&loaded(&policy), &Options::default()).unwrap();
        let out: Value = serde_json::from_str(&g.to_json()).unwrap();
        let filter = &out["http_filters"][0];
        assert_eq!(filter["name"], "envoy.filters.http.jwt_authn");
        let providers = &filter["typed_config"]["providers"];
        let first = &providers["tollgate_jwt_0"];
        assert_eq!(first["issuer"], "https://id.example/");
        assert_eq!(first["from_headers"], json!([{"name": "authorization", "value_prefix": "Bearer "}]));
        assert_eq!(first["payload_in_metadata"], "jwt_payload");
        assert_eq!(first["forward"], false);
        let inline: Value = serde_json::from_str(first["local_jwks"]["inline_string"].as_str().unwrap()).unwrap();
        assert_eq!(inline["keys"][0]["kid"], "ec-1");
        let second = &providers["tollgate_jwt_1"];
        assert_eq!(second["from_headers"], json!([{"name": "x-app-token"}]));
        assert_eq!(second["clock_skew_seconds"], 30);
        assert_eq!(second["remote_jwks"]["http_uri"]["cluster"], "tollgate_jwks_1");
        let cluster = out["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "tollgate_jwks_1").unwrap();
        assert_eq!(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"], json!({"address": "other.example", "port_value": 8443}));
        assert_eq!(cluster["transport_socket"]["typed_config"]["sni"], "other.example");
        assert_eq!(filter["typed_config"]["rules"], json!([{"match": {"prefix": "/"}, "requires": {"allow_missing_or_failed": {}}}]));
        assert!(g.note().contains("jwt_authn"));
        // A policy without such sources gets no filter.
        let plain: Value = serde_json::from_str(&example().to_json()).unwrap();
        assert!(plain.get("http_filters").is_none());
    }
}
