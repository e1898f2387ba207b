//! The gateway benchmark's second floor (scripts/bench-gateway.sh): a proxy-wasm filter with
//! Tollgate's shape on the wire and none of its work. It holds the request headers until the
//! body has arrived, reads the body once, holds a non-stream answer until it is whole and reads
//! it once, and lets stream chunks through after reading each — so "Envoy + this filter" minus
//! "bare Envoy" is what any Wasm filter that reads bodies costs in Envoy, and Tollgate minus
//! this floor is Tollgate's own work.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor { stream: false }))
    }
}

struct Floor {
    stream: bool,
}

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let _ = self.get_http_request_headers();
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
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = self.get_http_response_headers();
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
        let _ = self.get_http_response_body(0, size);
        Action::Continue
    }
}
