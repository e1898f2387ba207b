//! The gateway benchmark's second floor (scripts/bench-gateway.sh): a proxy-wasm filter with
//! Tollgate's shape on the wire and none of its work. It holds the request headers until the
//! body has arrived, reads the body once, holds a non-stream answer until it is whole and reads
//! it once, and lets stream chunks through after reading each — so "Envoy + this filter" minus
//! "bare Envoy" is what any Wasm filter that reads bodies costs in Envoy, and Tollgate minus
//! this floor is Tollgate's own work.
//!
//! Probes (the benchmark's `probe` measurement; request headers, never set by the floor runs),
//! each `x-probe-KIND: N` makes N host calls of one kind per request — what one call costs in
//! Envoy: `headers` (set a response header), `pairs` (read the request header map), `property`
//! (`source.address`), `shared` (a shared-data read and a compare-and-set write), `metric`
//! (increment a counter), `body` (replace the request body with itself), `time` (the clock); and
//! `hold` (1: hold the answer's headers until its body is whole, then set the body, `:status`
//! and `content-length` again, as Tollgate rewrites an answer), `route` (1: set `:path` and the
//! cluster header again after the body, as Tollgate rewrites a request); and
//! `parses` parses the request body into a `serde_json::Value` and writes it back N times — what
//! the same guest computation costs in V8 and in wasmtime.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

thread_local! {
    static METRIC: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, "floor_probe") {
            METRIC.with(|m| m.set(id));
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor::default()))
    }
}

#[derive(Default, Clone, Copy)]
struct Probes {
    headers: u32,
    pairs: u32,
    property: u32,
    shared: u32,
    metric: u32,
    body: u32,
    time: u32,
    hold: u32,
    route: u32,
    parses: u32,
}

#[derive(Default)]
struct Floor {
    stream: bool,
    probes: Probes,
    /// What the parses wrote, so the work cannot be optimised away.
    written: usize,
}

impl Context for Floor {}

fn number(headers: &[(String, String)], name: &str) -> u32 {
    headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let headers = self.get_http_request_headers();
        let n = |kind: &str| number(&headers, &format!("x-probe-{kind}"));
        self.probes = Probes {
            headers: n("headers"),
            pairs: n("pairs"),
            property: n("property"),
            shared: n("shared"),
            metric: n("metric"),
            body: n("body"),
            time: n("time"),
            hold: n("hold"),
            route: n("route"),
            parses: n("parses"),
        };
        let p = self.probes;
        for _ in 0..p.pairs {
            self.written += self.get_http_request_headers().len();
        }
        for _ in 0..p.property {
            self.written += self.get_property(vec!["source", "address"]).map_or(0, |v| v.len());
        }
        for _ in 0..p.shared {
            let (value, cas) = self.get_shared_data("floor-probe");
            let mut value = value.unwrap_or_default();
            value.resize(64, 0);
            value[0] = value[0].wrapping_add(1);
            let _ = self.set_shared_data("floor-probe", Some(&value), cas);
        }
        let metric = METRIC.with(|m| m.get());
        for _ in 0..p.metric {
            let _ = hostcalls::increment_metric(metric, 1);
        }
        for _ in 0..p.time {
            self.written += self.get_current_time().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as usize & 1);
        }
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, size) {
            self.stream = body.windows(14).any(|w| w == b"\"stream\":true");
            if self.probes.route > 0 {
                self.set_http_request_header(":path", Some("/v1/chat/completions"));
                let cluster = self.get_http_request_header("x-tollgate-cluster").unwrap_or_default();
                self.set_http_request_header("x-tollgate-cluster", Some(&cluster));
                self.set_http_request_header("content-length", Some(&size.to_string()));
            }
            for _ in 0..self.probes.body {
                self.set_http_request_body(0, size, &body);
            }
            for _ in 0..self.probes.parses {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
                    self.written += serde_json::to_vec(&value).map_or(0, |v| v.len());
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = self.get_http_response_headers();
        for i in 0..self.probes.headers {
            self.set_http_response_header(&format!("x-probe-{i}"), Some("1"));
        }
        if self.written > 0 {
            self.set_http_response_header("x-probe-written", Some(&self.written.to_string()));
        }
        if self.probes.hold > 0 && !self.stream {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.stream {
            let _ = self.get_http_response_body(0, size);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size);
        if self.probes.hold > 0 {
            if let Some(body) = body {
                self.set_http_response_body(0, size, &body);
                self.set_http_response_header(":status", Some("200"));
                self.set_http_response_header("content-length", Some(&body.len().to_string()));
            }
        }
        Action::Continue
    }
}
