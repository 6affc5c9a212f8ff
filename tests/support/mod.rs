//! Shared pieces of the end-to-end tests: a real Envoy with the plugin, stand-in servers, a client.
#![allow(dead_code)]

pub mod envoy;
pub mod http;
