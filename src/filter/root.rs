//! The root context: owns the parsed configuration and the metrics, and hands both to each
//! HTTP stream.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host;
use super::http::Http;
use super::metrics::Metrics;
use crate::config::Config;

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::plugin_configuration(size).unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(config) => {
                log::info!(
                    "llm-token-ratelimit configured: {} limit(s), service cluster `{}`",
                    config.limits.len(),
                    config.service.cluster
                );
                self.config = Some(Rc::new(config));
                self.metrics
                    .get_or_insert_with(|| Rc::new(Metrics::define()));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; without a configuration the stream passes through.
        Some(Box::new(Http::new(
            self.config.clone(),
            self.metrics.clone(),
        )))
    }
}
