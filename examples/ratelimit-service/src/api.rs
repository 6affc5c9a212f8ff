//! The JSON bodies of protocol v1 and of the ASM endpoints, and the checks that keep a
//! malformed request from reaching the store. Declared once, in the `wire` crate the plugin
//! builds its requests with, so the two sides cannot drift apart.

pub use wire::*;
