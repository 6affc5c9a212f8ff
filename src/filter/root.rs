//! The root context: owns the parsed configuration, the metrics and the report queue, and
//! hands them to each HTTP stream.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host;
use super::http::Http;
use super::metrics::Metrics;
use super::reporter::Reporter;
use crate::config::Plugin;

/// What every stream of the VM shares with the root context.
pub struct Shared {
    pub plugin: Plugin,
    pub metrics: Rc<Metrics>,
    pub reporter: Rc<RefCell<Reporter>>,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
}

impl Root {
    fn with_reporter(&self, f: impl FnOnce(&mut Reporter, &Metrics)) {
        if let Some(shared) = &self.shared {
            if let Ok(mut reporter) = shared.reporter.try_borrow_mut() {
                f(&mut reporter, &shared.metrics);
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        num_headers: usize,
        _body_size: usize,
        _trailers: usize,
    ) {
        let status = host::call_status(num_headers);
        self.with_reporter(|reporter, metrics| reporter.answered(status, metrics));
    }

    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, _response_size: usize) {
        self.with_reporter(|reporter, metrics| reporter.answered(Some(status_code), metrics));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::plugin_configuration(size).unwrap_or_default();
        let plugin = match Plugin::parse(&bytes) {
            Ok(plugin) => plugin,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let Some(service) = plugin.service().cloned() else {
            log::error!("invalid plugin configuration: no policy");
            return false;
        };
        for warning in &plugin.warnings {
            log::warn!("{} configuration: {warning}", plugin.shape.name());
        }
        log::info!(
            "llm-token-ratelimit configured ({} shape): {} policy(ies), {} limit(s), service cluster `{}`",
            plugin.shape.name(),
            plugin.policies.len(),
            plugin.policies.iter().map(|p| p.config.limits.len()).sum::<usize>(),
            service.cluster
        );
        // A reconfiguration keeps the metrics and the reports still queued.
        let shared = match self.shared.take() {
            Some(old) => {
                if let Ok(mut reporter) = old.reporter.try_borrow_mut() {
                    reporter.reconfigure(service);
                }
                Shared {
                    plugin,
                    metrics: Rc::clone(&old.metrics),
                    reporter: Rc::clone(&old.reporter),
                }
            }
            None => Shared {
                reporter: Rc::new(RefCell::new(Reporter::new(service))),
                metrics: Rc::new(Metrics::define()),
                plugin,
            },
        };
        self.shared = Some(Rc::new(shared));
        true
    }

    fn on_tick(&mut self) {
        self.with_reporter(|reporter, metrics| {
            reporter.pump(metrics);
            metrics.vm_memory_bytes.set(host::vm_memory_bytes());
        });
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; without a configuration the stream passes through.
        Some(Box::new(Http::new(self.shared.clone())))
    }
}
