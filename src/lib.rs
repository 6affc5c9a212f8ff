//! llm-token-ratelimit: a Proxy-Wasm filter that limits the LLM tokens each client may spend.
//!
//! The crate is a functional core (matching, keys, protocol codecs, decisions: plain Rust,
//! tested natively) and a thin proxy-wasm shell in [`filter`] that only moves data between
//! Envoy and that core.

pub mod body;
pub mod client_ip;
pub mod config;
pub mod cutoff;
pub mod exchange;
pub mod filter;
pub mod header_map;
pub mod lease;
pub mod limits;
pub mod matcher;
pub mod pricing;
pub mod protocol;
pub mod reply;
pub mod report;
pub mod request;
pub mod reserve;
pub mod response;
pub mod rls;
pub mod strip;
pub mod template;
pub mod text;
pub mod usage;
pub mod verdict;
