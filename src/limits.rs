//! Limits and the descriptors a request produces for the rate-limit service.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use crate::client_ip::parse_address;
use crate::matcher::Condition;
use crate::template::{Attribute, AttributeSource, Template};

pub use wire::{Descriptor, Rate};

/// How a value rule recognises a key value.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
    Any,
    Ip(IpNet),
}

impl ValueMatch {
    /// A value whose bytes were not UTF-8 is counted by `*` only: an exact or pattern rule
    /// (a cheaper tier) never fits it.
    fn matches(&self, value: &str, as_ip: &mut Option<Option<IpAddr>>) -> bool {
        if crate::text::is_opaque(value) {
            return matches!(self, ValueMatch::Any);
        }
        match self {
            ValueMatch::Exact(s) => s == value,
            ValueMatch::Regex(re) => re.is_match(value),
            ValueMatch::Any => true,
            ValueMatch::Ip(net) => as_ip
                .get_or_insert_with(|| parse_address(value))
                .is_some_and(|ip| net.contains(&ip)),
        }
    }
}

/// A `values` entry: the first one whose `match` fits the key value decides the rates.
#[derive(Debug, Clone)]
pub struct ValueRule {
    pub matcher: ValueMatch,
    /// The `match` text as configured; the counter's value when `shared`.
    pub pattern: String,
    pub rates: Vec<Rate>,
    pub shared: bool,
}

#[derive(Debug, Clone)]
pub enum LimitRates {
    /// The same rates for every distinct key value.
    Fixed(Vec<Rate>),
    /// Rates chosen per value; a value no rule matches is not limited.
    PerValue(Vec<ValueRule>),
    /// No rates here: the service's own rules decide (ASM style).
    ServiceOwned,
}

#[derive(Debug, Clone)]
pub struct Limit {
    pub name: String,
    pub key: Template,
    pub rates: LimitRates,
    /// Of the exclusive limits (Higress `rule_items`), only the first that applies to a
    /// request counts; the others are skipped for it.
    pub exclusive: bool,
    /// `when`: the limit applies only to requests these conditions hold for.
    pub when: Option<Condition>,
    /// A limit that counts money (`"unit": "cost"`): the price table's currency.
    pub currency: Option<String>,
    /// The status of a request this limit denies, when not the plugin's `deny.status`.
    pub deny_status: Option<u32>,
    /// Under envoy-rls, the engine's window for this limit in seconds, as declared by a
    /// `window` without `tokens`: the retry a denial states when the engine gives none
    /// (Limitador names no reset).
    pub engine_window_s: Option<u64>,
    /// `"mode": "shadow"`: checked and counted exactly, never denies.
    pub shadow: bool,
    /// Fractions of the budget at which the service raises alerts.
    pub alerts: Vec<wire::Threshold>,
}

impl Limit {
    /// The descriptors for this request: none when the limit does not apply to it, one per
    /// value of its key (a repeated query parameter or cookie is counted against each value).
    pub fn descriptors(&self, source: &impl AttributeSource) -> Vec<Descriptor> {
        if self.when.as_ref().is_some_and(|c| !c.holds(source)) {
            return Vec::new();
        }
        // A key of the client address alone: address and CIDR rules match the whole address,
        // while the value counted is its prefix group.
        let address = self
            .key
            .is_only(&Attribute::SourceIp)
            .then(|| source.client_address())
            .flatten();
        let mut out: Vec<Descriptor> = Vec::new();
        for value in self.key.render_all(source) {
            if let Some(d) = self.descriptor_of(value, address) {
                if !out.iter().any(|o| o.value == d.value) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// The descriptor for one value of the key, or `None` when no value rule takes it.
    fn descriptor_of(&self, value: String, address: Option<IpAddr>) -> Option<Descriptor> {
        let (value, rates, shared) = match &self.rates {
            LimitRates::Fixed(rates) => (value, rates.clone(), false),
            LimitRates::ServiceOwned => (value, Vec::new(), false),
            LimitRates::PerValue(rules) => {
                let mut as_ip = address.map(Some);
                let rule = rules
                    .iter()
                    .find(|r| r.matcher.matches(&value, &mut as_ip))?;
                let value = if rule.shared {
                    rule.pattern.clone()
                } else {
                    narrowed(value, &rule.matcher, address)
                };
                (value, rule.rates.clone(), rule.shared)
            }
        };
        Some(Descriptor {
            limit: self.name.clone(),
            value: bounded(value),
            rates,
            shared,
            currency: self.currency.clone(),
            shadow: self.shadow,
            alerts: self.alerts.clone(),
        })
    }
}

/// The counter of a client address matched by an address or CIDR rule narrower than the
/// client's prefix group: the rule's own network, so its rates (a stricter `/128`, say) have a
/// counter of their own and the rest of the group cannot borrow them.
fn narrowed(value: String, matcher: &ValueMatch, address: Option<IpAddr>) -> String {
    let (ValueMatch::Ip(net), Some(_)) = (matcher, address) else {
        return value;
    };
    match value.parse::<IpNet>() {
        Ok(group) if group.prefix_len() < net.prefix_len() => net.trunc().to_string(),
        _ => value,
    }
}

/// The longest key value sent to the service as it is.
pub const MAX_VALUE_BYTES: usize = 256;

/// A longer value (a long bearer token, or a client stuffing a header) is sent as its first
/// 128 bytes and a hash of the whole: it keeps a counter of its own, and a client cannot turn
/// its limit into a service error (which `failure_mode: allow` would let through).
fn bounded(value: String) -> String {
    if value.len() <= MAX_VALUE_BYTES {
        return value;
    }
    let mut cut = 128;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    // FNV-1a, 64 bits: stable across VMs and restarts.
    let hash = value.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}…#{hash:016x}", value.get(..cut).unwrap_or_default())
}

pub fn descriptors(limits: &[Limit], source: &impl AttributeSource) -> Vec<Descriptor> {
    let mut exclusive_taken = false;
    limits
        .iter()
        .filter_map(|l| {
            if l.exclusive && exclusive_taken {
                return None;
            }
            let ds = l.descriptors(source);
            exclusive_taken |= l.exclusive && !ds.is_empty();
            Some(ds)
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(l: &Limit, source: &impl AttributeSource) -> Option<Descriptor> {
        l.descriptors(source).into_iter().next()
    }
    use crate::template::Attribute;
    use std::borrow::Cow;

    struct Key(Option<&'static str>);
    impl AttributeSource for Key {
        fn attribute(&self, _: &Attribute) -> Option<Cow<'_, str>> {
            self.0.map(Cow::Borrowed)
        }
    }

    fn rate(tokens: u64, window_s: u64) -> Rate {
        Rate {
            budget: tokens,
            window_s,
            calendar: None,
        }
    }

    fn per_value() -> Limit {
        let rule = |matcher, pattern: &str, tokens, shared| ValueRule {
            matcher,
            pattern: pattern.into(),
            rates: vec![rate(tokens, 60)],
            shared,
        };
        Limit {
            name: "k".into(),
            key: Template::parse("{{request.headers.k}}").unwrap(),
            rates: LimitRates::PerValue(vec![
                rule(ValueMatch::Exact("vip".into()), "vip", 1, false),
                rule(
                    ValueMatch::Ip("10.0.0.0/8".parse().unwrap()),
                    "10.0.0.0/8",
                    2,
                    true,
                ),
                rule(
                    ValueMatch::Ip("2001:db8::/32".parse().unwrap()),
                    "2001:db8::/32",
                    3,
                    false,
                ),
                rule(
                    ValueMatch::Regex(Regex::new("^a").unwrap()),
                    "regexp:^a",
                    4,
                    false,
                ),
                rule(ValueMatch::Any, "*", 5, false),
            ]),
            exclusive: false,
            when: None,
            currency: None,
            deny_status: None,
            engine_window_s: None,
            shadow: false,
            alerts: Vec::new(),
        }
    }

    #[test]
    fn first_matching_value_rule_wins() {
        let l = per_value();
        let d = |v| one(&l, &Key(Some(v))).unwrap();
        assert_eq!(d("vip").rates, vec![rate(1, 60)]);
        assert_eq!(d("10.2.3.4").rates, vec![rate(2, 60)]);
        assert_eq!(d("2001:db8::7").rates, vec![rate(3, 60)]);
        assert_eq!(d("abc").rates, vec![rate(4, 60)]);
        assert_eq!(d("zzz").rates, vec![rate(5, 60)]);
    }

    /// A `{{source.ip}}` key counts the client's prefix group, while address and CIDR rules
    /// (Higress's `limit_by_per_ip` keys) still match the whole address.
    #[test]
    fn ip_rules_match_the_whole_address_of_a_grouped_key() {
        struct Client(&'static str);
        impl AttributeSource for Client {
            fn attribute(&self, attr: &Attribute) -> Option<Cow<'_, str>> {
                (*attr == Attribute::SourceIp).then(|| {
                    Cow::Owned(crate::client_ip::client_key(
                        self.0.parse().unwrap(),
                        crate::client_ip::Prefixes::default(),
                    ))
                })
            }
            fn client_address(&self) -> Option<IpAddr> {
                self.0.parse().ok()
            }
        }
        let rule = |pattern: &str, tokens| ValueRule {
            matcher: ValueMatch::Ip(pattern.parse().unwrap()),
            pattern: pattern.into(),
            rates: vec![rate(tokens, 60)],
            shared: false,
        };
        let l = Limit {
            key: Template::parse("{{source.ip}}").unwrap(),
            rates: LimitRates::PerValue(vec![
                rule("2001:db8:1:2::5/128", 1),
                rule("2001:db8::/32", 2),
            ]),
            ..per_value()
        };
        // The narrower rule counts on its own network, not on the group's counter.
        let vip = one(&l, &Client("2001:db8:1:2::5")).unwrap();
        assert_eq!(
            (vip.value.as_str(), vip.rates[0].budget),
            ("2001:db8:1:2::5/128", 1)
        );
        let other = one(&l, &Client("2001:db8:1:2::6")).unwrap();
        assert_eq!(
            (other.value.as_str(), other.rates[0].budget),
            ("2001:db8:1:2::/64", 2)
        );
        assert_eq!(one(&l, &Client("2001:db9::1")), None);
    }

    #[test]
    fn shared_rules_use_one_counter() {
        let l = per_value();
        let a = one(&l, &Key(Some("10.2.3.4"))).unwrap();
        let b = one(&l, &Key(Some("10.9.9.9"))).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.value, "10.0.0.0/8");
        assert!(a.shared);
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains("\"shared\":true"), "{json}");
        let not_shared = serde_json::to_string(&one(&l, &Key(Some("zzz"))).unwrap()).unwrap();
        assert!(!not_shared.contains("shared"), "{not_shared}");
    }

    #[test]
    fn unmatched_or_absent_values_skip_the_limit() {
        let mut l = per_value();
        if let LimitRates::PerValue(rules) = &mut l.rates {
            rules.pop();
        }
        assert_eq!(one(&l, &Key(Some("zzz"))), None);
        assert_eq!(one(&l, &Key(None)), None);
    }

    #[test]
    fn long_values_are_bounded_but_stay_distinct() {
        let l = Limit {
            name: "k".into(),
            key: Template::parse("{{request.headers.k}}").unwrap(),
            rates: LimitRates::Fixed(vec![rate(1, 60)]),
            exclusive: false,
            when: None,
            currency: None,
            deny_status: None,
            engine_window_s: None,
            shadow: false,
            alerts: Vec::new(),
        };
        let long_a: &'static str = Box::leak(format!("é{}", "a".repeat(5000)).into_boxed_str());
        let long_b: &'static str = Box::leak(format!("é{}b", "a".repeat(4999)).into_boxed_str());
        let a = one(&l, &Key(Some(long_a))).unwrap().value;
        let b = one(&l, &Key(Some(long_b))).unwrap().value;
        assert!(a.len() <= MAX_VALUE_BYTES && b.len() <= MAX_VALUE_BYTES);
        assert_ne!(a, b);
        assert_eq!(a, one(&l, &Key(Some(long_a))).unwrap().value, "stable");
        assert!(a.starts_with('é') && a.contains("…#"));
        let short = "x".repeat(MAX_VALUE_BYTES);
        let s: &'static str = Box::leak(short.clone().into_boxed_str());
        assert_eq!(one(&l, &Key(Some(s))).unwrap().value, short);
    }

    #[test]
    fn only_the_first_exclusive_limit_that_applies_counts() {
        let limit = |name: &str, key: &str, exclusive| Limit {
            name: name.into(),
            key: Template::parse(key).unwrap(),
            rates: LimitRates::Fixed(vec![rate(1, 60)]),
            exclusive,
            when: None,
            currency: None,
            deny_status: None,
            engine_window_s: None,
            shadow: false,
            alerts: Vec::new(),
        };
        struct Headers;
        impl AttributeSource for Headers {
            fn attribute(&self, a: &Attribute) -> Option<Cow<'_, str>> {
                match a {
                    Attribute::Header(h) if h == "b" || h == "c" => Some(Cow::Borrowed("v")),
                    _ => None,
                }
            }
        }
        let limits = [
            limit("a", "{{request.headers.a}}", true),
            limit("b", "{{request.headers.b}}", true),
            limit("c", "{{request.headers.c}}", true),
            limit("global", "", false),
        ];
        let names: Vec<String> = descriptors(&limits, &Headers)
            .into_iter()
            .map(|d| d.limit)
            .collect();
        assert_eq!(
            names,
            ["b", "global"],
            "a is absent, b applies, c is skipped"
        );
    }

    #[test]
    fn service_owned_limits_send_no_rates() {
        let l = Limit {
            name: "user-type".into(),
            key: Template::parse("{{request.headers.user-type}}").unwrap(),
            rates: LimitRates::ServiceOwned,
            exclusive: false,
            when: None,
            currency: None,
            deny_status: None,
            engine_window_s: None,
            shadow: false,
            alerts: Vec::new(),
        };
        let d = one(&l, &Key(Some("regular-user"))).unwrap();
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"limit":"user-type","value":"regular-user"}"#
        );
    }
}
