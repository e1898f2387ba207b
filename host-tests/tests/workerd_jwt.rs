//! The `jwt` identity source in the worker under real workerd: the worker verifies tokens
//! itself against the policy's `jwks` (core's verifier), the same cases as in Envoy
//! (host-tests/src/jwt_cases.rs).

use tollgate_host_tests::jwt_cases;
use tollgate_host_tests::proc::{agent, mock_request_count, post_json, start_mock_provider};
use tollgate_host_tests::workerd::{seed_policy, start_wrangler, Scratch};

#[test]
fn the_worker_verifies_jwts_and_answers_in_openais_format() {
    let scratch = Scratch::new("workerd-jwt");
    let (_mock, mock_url) = start_mock_provider();
    seed_policy(&scratch.0, &jwt_cases::policy(false).to_string());
    let wrangler = start_wrangler(&scratch.0, &[("UPSTREAM_URL", &mock_url)], None);
    let http = agent();
    let url = format!("{}/v1/chat/completions", wrangler.url);
    let body = jwt_cases::body();
    let send = |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        post_json(&http, &url, &headers, &body)
    };
    jwt_cases::run(&send, &|| mock_request_count(&http, &mock_url));
}
