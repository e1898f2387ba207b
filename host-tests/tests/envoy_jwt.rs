//! The `jwt` identity source in real Envoy: `tollgate envoy` generates the `jwt_authn` filter
//! (keys inline from the policy's `jwks`), Envoy verifies tokens and leaves their claims in the
//! stream's metadata, the filter reads them (`payload_in_metadata`) and answers a token that
//! failed with its own OpenAI 401 (host-tests/src/jwt_cases.rs has the cases).

use tollgate_host_tests::envoy::{self, render};
use tollgate_host_tests::jwt_cases;
use tollgate_host_tests::proc::{agent, mock_request_count, post_json, start_mock_provider};

#[test]
fn jwt_authn_verifies_and_tollgate_answers_in_openais_format() {
    let (_mock, mock_url) = start_mock_provider();
    let port: u16 = mock_url.rsplit(':').next().unwrap().parse().unwrap();
    let policy = jwt_cases::policy(true);
    let text = serde_json::to_string_pretty(&policy).unwrap();
    let loaded = tollgate_cli::parse(text.as_bytes()).expect("the policy loads");
    let generated = tollgate_cli::envoy::generate(&loaded, &tollgate_cli::envoy::Options::default()).expect("generate");
    let filter = generated.jwt_authn.expect("a jwt_authn filter for the jwt source");
    let mut rendered = render("envoy.yaml", Some(port), Some(&text));
    let at = rendered.yaml.find("          http_filters:\n").expect("http_filters") + "          http_filters:\n".len();
    rendered.yaml.insert_str(at, &format!("          - {filter}\n"));
    let envoy = envoy::start(&rendered, &[]);
    let http = agent();
    let url = format!("{}/v1/chat/completions", envoy.url);
    let body = jwt_cases::body();
    let send = |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        post_json(&http, &url, &headers, &body)
    };
    jwt_cases::run(&send, &|| mock_request_count(&http, &mock_url));
}
