//! A bad plugin configuration is refused when Envoy loads it, with a log line naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use testkit::envoy::{cluster, Envoy};

fn start(config: &str) -> Result<Envoy, String> {
    Envoy::try_start(
        config,
        &[cluster("ratelimit", 1), cluster("upstream", 1)],
        "127.0.0.1",
    )
}

#[test]
fn invalid_field_is_named_and_envoy_refuses_the_filter() {
    let bad = r#"{"service": {"cluster": "ratelimit"}, "limits": [{"name": "a", "key": "", "tokens": 10, "window": "1 fortnight"}]}"#;
    let log = start(bad)
        .err()
        .expect("Envoy must refuse a bad plugin configuration");
    assert!(log.contains("`limits[0].window`"), "{log}");
    assert!(log.contains("is not a window"), "{log}");
}

#[test]
fn empty_configuration_is_refused() {
    let log = start("")
        .err()
        .expect("Envoy must refuse an empty plugin configuration");
    assert!(log.contains("the plugin configuration is empty"), "{log}");
}

#[test]
fn unknown_field_is_refused() {
    let bad = r#"{"service": {"cluster": "ratelimit", "failure_mod": "deny"}, "limits": [{"name": "a", "key": ""}]}"#;
    let log = start(bad)
        .err()
        .expect("a misspelt option must not be ignored");
    assert!(
        log.contains("`service.failure_mod`: unknown field"),
        "{log}"
    );
}

#[test]
fn valid_configuration_starts() {
    let good = r#"{"service": {"cluster": "ratelimit"}, "limits": [{"name": "a", "key": ""}]}"#;
    let envoy = start(good).unwrap_or_else(|log| panic!("{log}"));
    assert!(
        envoy
            .log()
            .contains("llm-token-ratelimit configured (native shape): 1 policy(ies), 1 limit(s)"),
        "{}",
        envoy.log()
    );
}
