//! `tollgate envoy` (cli/src/envoy.rs) in a real Envoy 1.40: a complete config built around the
//! generated routes and aggregate clusters — a listener with the downstream tollgate filter, the
//! generated routes before a catch-all, the generated clusters, and the deployment clusters on
//! free loopback ports — passes `envoy --mode validate`. The same config without one generated
//! cluster does not (so validation does check what the routes name).
//!
//! Needs Envoy (`scripts/setup.sh envoy`) and the release filter (`scripts/build-wasm.sh`).

use serde_json::{json, Value};
use tollgate_cli::envoy::{generate, Options};
use tollgate_host_tests::envoy::{validate, Rendered};
use tollgate_host_tests::proc::{filter_wasm_path, free_port, workspace_root};

/// The policy embedded in examples/envoy/fallback.yaml (between `value: |` and `vm_config:`),
/// with a second alias whose plans partly coincide with the first's (shared aggregates).
fn policy() -> String {
    let yaml = std::fs::read_to_string(workspace_root().join("examples/envoy/fallback.yaml")).expect("read the example");
    let start = yaml.find("value: |\n").expect("policy block") + "value: |\n".len();
    let end = yaml[start..].find("vm_config:").expect("vm_config after the policy") + start;
    let mut policy: Value = serde_json::from_str(&yaml[start..end]).expect("the example's policy is JSON");
    policy["aliases"]["scalix-pro"] = json!({ "deployments": ["m2", "m1", "m3"], "strategy": "weighted", "max_attempts": 2 });
    serde_json::to_string_pretty(&policy).expect("policy JSON")
}

/// A plain cluster for one deployment on a loopback port.
fn deployment_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "connect_timeout": "0.5s",
        "circuit_breakers": { "thresholds": [ { "max_retries": 100000, "max_requests": 100000, "max_pending_requests": 100000 } ] },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } } } } ] } ]
        }
    })
}

/// A complete Envoy config (JSON, which Envoy reads as YAML) around the generated pieces.
fn config(policy: &str, wasm: &str, generated: &Value, deployments: &[String], listen_port: u16, admin_port: u16) -> String {
    let mut routes = generated["routes"].as_array().expect("routes").clone();
    routes.push(json!({
        "match": { "prefix": "/" },
        "direct_response": { "status": 404, "body": { "inline_string": "{\"error\":{\"message\":\"Tollgate serves POST /v1/chat/completions only.\"}}" } }
    }));
    let mut clusters = generated["clusters"].as_array().expect("clusters").clone();
    clusters.extend(deployments.iter().map(|d| deployment_cluster(d, free_port())));
    let downstream = json!({
        "name": "tollgate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tollgate",
                "root_id": "tollgate",
                "failure_policy": "FAIL_RELOAD",
                "allow_on_headers_stop_iteration": true,
                "configuration": { "@type": "type.googleapis.com/google.protobuf.StringValue", "value": policy },
                "vm_config": { "vm_id": "tollgate", "runtime": "envoy.wasm.runtime.v8", "code": { "local": { "filename": wasm } } }
            }
        }
    });
    let config = json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": admin_port } } },
        "static_resources": {
            "listeners": [ {
                "name": "tollgate",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": listen_port } },
                "filter_chains": [ { "filters": [ {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "tollgate",
                        "early_header_mutation_extensions": [ {
                            "name": "envoy.http.early_header_mutation.header_mutation",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                                "mutations": [ { "remove": "x-tollgate-cluster" } ]
                            }
                        } ],
                        "route_config": { "virtual_hosts": [ { "name": "deployments", "domains": ["*"], "routes": routes } ] },
                        "http_filters": [
                            downstream,
                            { "name": "envoy.filters.http.router",
                              "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }
                        ]
                    }
                } ] } ]
            } ],
            "clusters": clusters
        }
    });
    serde_json::to_string_pretty(&config).expect("config JSON")
}

#[test]
fn a_config_built_around_the_generated_routes_and_clusters_validates() {
    let wasm = filter_wasm_path();
    assert!(wasm.exists(), "{} is missing: run scripts/build-wasm.sh first", wasm.display());
    let wasm = wasm.display().to_string();
    let policy = policy();
    let loaded = tollgate_cli::parse(policy.as_bytes()).expect("valid policy");
    let options = Options { deployment_cluster_prefix: "deploy-".to_owned(), wasm: wasm.clone(), ..Options::default() };
    let generated = generate(&loaded, &options).expect("generate");
    let json: Value = serde_json::from_str(&generated.to_json()).expect("the output is JSON");

    // Two aliases × three first choices; scalix-pro's m1-first and m2-first plans are
    // scalix-free's, its m3-first plan (m3, m2, m1) is its own.
    let names: Vec<&str> = json["clusters"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["scalix-free.m1", "scalix-free.m2", "scalix-free.m3", "scalix-pro.m3"]);
    assert_eq!(json["routes"].as_array().unwrap().len(), 6);
    assert_eq!(generated.deployment_clusters, ["deploy-m1", "deploy-m2", "deploy-m3"]);

    // `--mode validate` binds nothing.
    let (listen_port, admin_port) = (0, 0);
    let yaml = config(&policy, &wasm, &json, &generated.deployment_clusters, listen_port, admin_port);
    let (ok, output) = validate(&Rendered { yaml });
    assert!(ok, "envoy --mode validate refused the generated config:\n{output}");

    // Without the aggregate a route names, the same config is refused.
    let mut partial = json.clone();
    partial["clusters"].as_array_mut().unwrap().remove(0);
    let yaml = config(&policy, &wasm, &partial, &generated.deployment_clusters, listen_port, admin_port);
    let (ok, output) = validate(&Rendered { yaml });
    assert!(!ok && output.contains("scalix-free.m1"), "a route to a missing cluster validated:\n{output}");
}

/// examples/envoy/jwt.yaml holds what `tollgate envoy` generates for its policy (the
/// jwt_authn filter and its JWKS cluster) and passes `envoy --mode validate`.
#[test]
fn the_jwt_example_is_what_the_generator_makes_and_validates() {
    let rendered = tollgate_host_tests::envoy::render("examples/envoy/jwt.yaml", Some(free_port()), None);
    let yaml = &rendered.yaml;
    let start = yaml.find("value: |\n").expect("policy block") + "value: |\n".len();
    let end = yaml[start..].find("vm_config:").expect("vm_config after the policy") + start;
    let loaded = tollgate_cli::parse(&yaml.as_bytes()[start..end]).expect("the example's policy loads");
    let g = generate(&loaded, &Options::default()).expect("generate");
    let filter = g.jwt_authn.as_ref().expect("a jwt_authn filter");
    let provider = &filter["typed_config"]["providers"]["tollgate_jwt_0"];
    let remote = &provider["remote_jwks"]["http_uri"];
    for line in [
        "- name: envoy.filters.http.jwt_authn".to_owned(),
        format!("issuer: {}", provider["issuer"].as_str().unwrap()),
        format!("audiences: [ {} ]", provider["audiences"][0]),
        format!("payload_in_metadata: {}", provider["payload_in_metadata"].as_str().unwrap()),
        format!("clock_skew_seconds: {}", provider["clock_skew_seconds"]),
        "forward: false".to_owned(),
        format!("http_uri: {{ uri: {}, cluster: {}, timeout: 5s }}", remote["uri"], remote["cluster"].as_str().unwrap()),
        "requires: { allow_missing_or_failed: {} }".to_owned(),
        format!("- name: {}", g.jwks_clusters[0]["name"].as_str().unwrap()),
        format!("sni: {}", g.jwks_clusters[0]["transport_socket"]["typed_config"]["sni"].as_str().unwrap()),
    ] {
        assert!(yaml.contains(&line), "examples/envoy/jwt.yaml lacks {line:?}");
    }
    assert!(yaml.find("- name: envoy.filters.http.jwt_authn").unwrap() < yaml.find("          - name: tollgate\n").unwrap(), "jwt_authn runs first");
    let (ok, output) = validate(&rendered);
    assert!(ok, "{output}");
}

/// examples/envoy/fleet.yaml holds the store cluster `tollgate envoy --store-address` generates
/// for its policy (health checks and outlier detection included) and passes
/// `envoy --mode validate`.
#[test]
fn the_fleet_example_is_what_the_generator_makes_and_validates() {
    let rendered = tollgate_host_tests::envoy::render("examples/envoy/fleet.yaml", Some(free_port()), None);
    let template = std::fs::read_to_string(workspace_root().join("examples/envoy/fleet.yaml")).expect("read the example");
    let start = template.find("value: |\n").expect("policy block") + "value: |\n".len();
    let end = template[start..].find("vm_config:").expect("vm_config after the policy") + start;
    let loaded = tollgate_cli::parse(&template.as_bytes()[start..end]).expect("the example's policy loads");
    let options = Options { store_addresses: vec!["127.0.0.1:8089".to_owned(), "127.0.0.1:8090".to_owned()], ..Options::default() };
    let g = generate(&loaded, &options).expect("generate");
    let c = g.store_cluster.as_ref().expect("a store cluster");
    let hc = &c["health_checks"][0];
    let od = &c["outlier_detection"];
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    for line in [
        format!("- name: {}", s(&c["name"])),
        format!("type: {}", s(&c["type"])),
        format!("connect_timeout: {}", s(&c["connect_timeout"])),
        format!("- timeout: {}", s(&hc["timeout"])),
        format!("interval: {}", s(&hc["interval"])),
        format!("no_traffic_interval: {}", s(&hc["no_traffic_interval"])),
        format!("unhealthy_threshold: {}", hc["unhealthy_threshold"]),
        format!("healthy_threshold: {}", hc["healthy_threshold"]),
        format!("http_health_check: {{ path: {} }}", s(&hc["http_health_check"]["path"])),
        format!("split_external_local_origin_errors: {}", od["split_external_local_origin_errors"]),
        format!("consecutive_local_origin_failure: {}", od["consecutive_local_origin_failure"]),
        format!("base_ejection_time: {}", s(&od["base_ejection_time"])),
        format!("max_ejection_percent: {}", od["max_ejection_percent"]),
        "port_value: 8089".to_owned(),
        "port_value: 8090".to_owned(),
    ] {
        assert!(template.contains(&line), "examples/envoy/fleet.yaml lacks {line:?}");
    }
    let (ok, output) = validate(&rendered);
    assert!(ok, "{output}");
}
