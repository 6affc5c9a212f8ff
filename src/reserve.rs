//! What a check reserves: the output cap a request asks for (or a fixed figure), clamped to
//! what could ever be admitted, so no request body can produce a reserve the service refuses
//! or one that buries a budget in debt.

use crate::config::{Protocol, Reserve};
use crate::limits::Descriptor;
use crate::request::BodyFacts;

/// The tokens a check reserves for a request with `descriptors`.
///
/// * `Reserve::Tokens(n)`: `n`; `Reserve::MaxTokens`: the body's output cap (absent or
///   unreadable: 0, the request is then charged from its usage alone).
/// * Never more than `max` (the configured `reserve.max`, at most the wire's token bound),
///   nor, when every descriptor carries its rates, than the largest budget among them: a
///   larger reserve could not be admitted any sooner, and would only deepen the debt.
/// * The protocol's own rule last ([`crate::protocol::Wire::reservation`]: the ASM protocol
///   has no reservations, the RLS API counts every check as at least one hit).
pub fn reserve(
    wanted: Reserve,
    max: u64,
    protocol: Protocol,
    body: Option<&BodyFacts>,
    descriptors: &[Descriptor],
) -> u64 {
    let asked = match wanted {
        Reserve::Tokens(n) => n,
        Reserve::MaxTokens => body.and_then(BodyFacts::output_token_cap).unwrap_or(0),
    };
    let mut bound = max.min(wire::MAX_TOKENS);
    if descriptors.iter().all(|d| !d.rates.is_empty()) {
        let largest = descriptors
            .iter()
            .flat_map(|d| d.rates.iter().map(|r| r.tokens))
            .max();
        if let Some(largest) = largest {
            bound = bound.min(largest);
        }
    }
    protocol.wire().reservation(asked.min(bound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;

    fn d(rates: &[u64]) -> Descriptor {
        Descriptor {
            limit: "l".into(),
            value: "v".into(),
            rates: rates
                .iter()
                .map(|&tokens| Rate {
                    tokens,
                    window_s: 60,
                })
                .collect(),
            shared: false,
        }
    }

    fn facts(body: &str) -> BodyFacts {
        BodyFacts::parse(body.as_bytes()).unwrap_or_default()
    }

    #[test]
    fn every_output_cap_a_client_can_write_yields_a_valid_reserve() {
        let ds = [d(&[1000, 5000]), d(&[200])];
        let r = |body: &str| {
            reserve(
                Reserve::MaxTokens,
                u64::MAX,
                Protocol::V1,
                Some(&facts(body)),
                &ds,
            )
        };
        for (body, want) in [
            (r#"{"max_tokens": 100}"#, 100),
            (r#"{"max_tokens": 100000000000000000}"#, 5000),
            (r#"{"max_completion_tokens": 100000000000000000}"#, 5000),
            (r#"{"max_output_tokens": 1e300}"#, 5000),
            (r#"{"generationConfig": {"maxOutputTokens": 7000}}"#, 5000),
            (r#"{"generation_config": {"max_output_tokens": 70}}"#, 70),
            (r#"{"max_tokens": 10, "max_completion_tokens": 300}"#, 300),
            (r#"{"max_tokens": -5}"#, 0),
            (r#"{"max_tokens": 10.2}"#, 11),
            (r#"{"max_tokens": "250"}"#, 250),
            (r#"{"max_tokens": "lots"}"#, 0),
            (r#"{"max_tokens": null}"#, 0),
            (r#"{"max_tokens": [1]}"#, 0),
            (r#"{"max_tokens": 99999999999999999999999999}"#, 5000),
            (r#"{}"#, 0),
        ] {
            assert_eq!(r(body), want, "{body}");
        }
        assert_eq!(
            reserve(Reserve::MaxTokens, u64::MAX, Protocol::V1, None, &ds),
            0
        );
    }

    #[test]
    fn the_bound_is_the_configured_max_or_the_largest_budget() {
        let huge = facts(r#"{"max_tokens": 100000000000000000}"#);
        let plugin_owned = [d(&[1000])];
        let service_owned = [d(&[])];
        let mixed = [d(&[1000]), d(&[])];
        let r = |max, ds: &[Descriptor]| {
            reserve(Reserve::MaxTokens, max, Protocol::V1, Some(&huge), ds)
        };
        assert_eq!(r(u64::MAX, &plugin_owned), 1000);
        assert_eq!(r(300, &plugin_owned), 300);
        assert_eq!(r(u64::MAX, &service_owned), wire::MAX_TOKENS);
        assert_eq!(r(4096, &service_owned), 4096);
        assert_eq!(
            r(u64::MAX, &mixed),
            wire::MAX_TOKENS,
            "a bucket may be larger"
        );
        assert_eq!(
            reserve(
                Reserve::Tokens(50_000),
                u64::MAX,
                Protocol::V1,
                None,
                &plugin_owned
            ),
            1000
        );
    }

    #[test]
    fn reservations_per_protocol() {
        let reservation = |p: Protocol, wanted| p.wire().reservation(wanted);
        assert_eq!(reservation(Protocol::V1, 0), 0);
        assert_eq!(reservation(Protocol::V1, 70), 70);
        assert_eq!(reservation(Protocol::Asm, 70), 0);
        assert_eq!(reservation(Protocol::EnvoyRls, 0), 1);
        assert_eq!(reservation(Protocol::EnvoyRls, 70), 70);
    }
}
