//! Any bytes as a plugin configuration, in every shape: an error or a model, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::config::Plugin;

fuzz_target!(|data: &[u8]| {
    if let Ok(plugin) = Plugin::parse(data) {
        // A configuration that loads names its service and at least one policy.
        assert!(plugin.service().is_some());
    }
});
