//! The proxy-wasm shell: moves data between Envoy and the core, decides nothing itself.

mod host;
mod http;
mod metrics;
mod reporter;
mod root;
mod shared;

#[cfg(any(test, fuzzing))]
#[cfg_attr(not(test), allow(dead_code))] // the fuzz target uses part of it
mod fake;
#[cfg(fuzzing)]
pub mod fuzzing;
#[cfg(test)]
mod tests;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| Box::new(root::Root::new(id, std::rc::Rc::new(host::Envoy))));
}}
