//! A proxy-wasm HTTP filter that does nothing. `make bench` runs it beside the real plugin so
//! that the cost of Envoy's Wasm machinery (VMs, callbacks) is measured apart from the plugin's
//! own work.
//!
//! Its configuration may be a number N: it then reads the request header `x-user` N times per
//! request and does nothing with it, so that the bench can tell what one host call that hands
//! bytes back costs (Envoy asks the VM for memory to put them in: a second crossing).

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root { reads: Rc::new(Cell::new(0)) }));
}}

struct Root {
    reads: Rc<Cell<u32>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size);
        let text = config.ok().flatten().unwrap_or_default();
        let reads = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        self.reads.set(reads.unwrap_or(0));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            reads: self.reads.get(),
        }))
    }
}

struct Stream {
    reads: u32,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        for _ in 0..self.reads {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-user");
        }
        Action::Continue
    }
}
