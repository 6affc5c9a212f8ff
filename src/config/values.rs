//! The leaf values of a configuration (a count of tokens, a window, a header name, a regular
//! expression), each a type that checks itself while it is read, so a bad one is refused with
//! its own field's path, and that describes itself in the generated JSON Schema.

use std::fmt;

use regex::Regex;
use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A whole number from `MIN` to `MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Whole<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeNumber { min: MIN, max: MAX })
            .map(Whole)
    }
}

/// A whole number from `min` to `max`, with the messages the operator reads. Values are
/// checked inside the visitor, so the error is raised where the reader knows the path.
struct WholeNumber {
    min: u64,
    max: u64,
}

impl Visitor<'_> for WholeNumber {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative whole number")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        if n > self.max {
            Err(E::custom(format!(
                "{n} is larger than the maximum {}",
                self.max
            )))
        } else if n < self.min {
            Err(E::custom(format!("must be at least {}", self.min)))
        } else {
            Ok(n)
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        Err(E::custom(format!(
            "expected a non-negative whole number, found {n}"
        )))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<u64, E> {
        Err(E::custom(format!(
            "expected a non-negative whole number, found {}",
            decimal(n)
        )))
    }
}

/// A number as the operator wrote it (serde_json's own formatting: the plugin carries no
/// second float formatter for one error message).
pub fn decimal(n: f64) -> String {
    serde_json::Number::from_f64(n).map_or_else(|| "a number".into(), |n| n.to_string())
}

/// An HTTP status a reply may carry: 200 to 599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Status;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an HTTP status")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Status, E> {
                match n {
                    200..=599 => Ok(Status(n as u32)),
                    n => Err(E::custom(format!(
                        "{n} is not an HTTP status between 200 and 599"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Status, E> {
                Err(E::custom(format!(
                    "{n} is not an HTTP status between 200 and 599"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A rolling window in seconds, written as a number of seconds or `"<count><s|m|h|d>"`, or a
/// calendar period (`"hour"`, `"day"`, `"week"`, `"month"`) that resets at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Rolling(u64),
    Calendar(wire::Period),
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WindowVisitor)
    }
}

impl Window {
    fn new<E: de::Error>(seconds: u64) -> Result<Window, E> {
        match seconds {
            0 => Err(E::custom("must be at least one second")),
            s if s > wire::MAX_WINDOW_S => Err(E::custom(format!(
                "is longer than the maximum of {} seconds",
                wire::MAX_WINDOW_S
            ))),
            s => Ok(Window::Rolling(s)),
        }
    }
}

struct WindowVisitor;

impl Visitor<'_> for WindowVisitor {
    type Value = Window;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a window such as \"1m\"")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Window, E> {
        Window::new(n)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Window, E> {
        WholeNumber { min: 0, max: 0 }
            .visit_i64(n)
            .map(Window::Rolling)
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Window, E> {
        WholeNumber { min: 0, max: 0 }
            .visit_f64(n)
            .map(Window::Rolling)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Window, E> {
        let period = match s {
            "hour" => Some(wire::Period::Hour),
            "day" => Some(wire::Period::Day),
            "week" => Some(wire::Period::Week),
            "month" => Some(wire::Period::Month),
            _ => None,
        };
        if let Some(p) = period {
            return Ok(Window::Calendar(p));
        }
        let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let scale = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => 0,
        };
        match digits.parse::<u64>() {
            Ok(n) if scale > 0 => Window::new(n.saturating_mul(scale)),
            _ => Err(E::custom(format!(
                "\"{s}\" is not a window; use \"1s\", \"1m\", \"1h\", \"1d\" (any count) or a number of seconds, or a calendar period: \"hour\", \"day\", \"week\", \"month\""
            ))),
        }
    }
}

/// An amount of money, written as a decimal (`"20.00"`; a JSON number is read by its
/// decimal text), in micro units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(pub u64);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount such as \"20.00\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Amount, E> {
                crate::pricing::parse_amount(s, wire::MAX_AMOUNT)
                    .map(Amount)
                    .map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Amount, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Amount, E> {
                self.visit_str(&decimal(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Amount, E> {
                self.visit_str(&n.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// An ISO 4217 currency code: three capital letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(pub String);

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|s: &str| {
            if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
                Ok(Currency(s.to_string()))
            } else {
                Err(format!(
                    "\"{s}\" is not a currency code; use three capital letters (ISO 4217) such as \"USD\""
                ))
            }
        }))
    }
}

/// An IANA time zone name (`Asia/Shanghai`, `UTC`). The plugin checks its spelling; the
/// rate-limit service, which holds the zone database, refuses a zone it does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone(pub String);

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|s: &str| {
            let valid = !s.is_empty()
                && s.len() <= wire::MAX_ZONE
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
            if valid {
                Ok(Zone(s.to_string()))
            } else {
                Err(format!(
                    "\"{s}\" is not an IANA time zone name such as \"Asia/Shanghai\" or \"UTC\""
                ))
            }
        }))
    }
}

/// An HTTP header name, kept in lower case (how Envoy hands headers to the plugin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub String);

impl HeaderName {
    /// A token of RFC 9110 (a pseudo-header's leading `:` allowed).
    pub fn valid(h: &str) -> bool {
        !h.is_empty()
            && h.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric()
                    || b"!#$%&'*+-.^_`|~".contains(&b)
                    || (i == 0 && b == b':')
            })
    }
}

/// A string visitor that checks (and converts) the string where the reader knows its path.
struct Text<F>(F);

impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for Text<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.0)(s).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|h: &str| {
            if HeaderName::valid(h) {
                Ok(HeaderName(h.to_ascii_lowercase()))
            } else {
                Err(format!("\"{h}\" is not a valid header name"))
            }
        }))
    }
}

/// A regular expression, compiled as it is read.
#[derive(Debug, Clone)]
pub struct Pattern(pub Regex);

impl Pattern {
    pub fn compile(text: &str) -> Result<Regex, String> {
        Regex::new(text).map_err(|e| format!("invalid regular expression: {e}"))
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|s: &str| Pattern::compile(s).map(Pattern)))
    }
}

/// A string that must not be empty (names, hosts, clusters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|s: &str| match s {
            "" => Err("must not be empty".to_string()),
            s => Ok(Name(s.to_string())),
        }))
    }
}

/// A credential sent in a header: visible ASCII only (no spaces, no control characters), so it
/// can never split or forge a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Text(|s: &str| {
            if s.is_empty() {
                Err("must not be empty".to_string())
            } else if !s.bytes().all(|b| b.is_ascii_graphic()) {
                Err(
                    "must be visible ASCII characters only (no spaces or control characters)"
                        .to_string(),
                )
            } else {
                Ok(ApiKey(s.to_string()))
            }
        }))
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[cfg(feature = "schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

    use super::*;

    impl<const MIN: u64, const MAX: u64> JsonSchema for Whole<MIN, MAX> {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            format!("Whole_{MIN}_{MAX}").into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "integer", "minimum": MIN, "maximum": MAX})
        }
    }

    impl JsonSchema for Status {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Status".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "integer", "minimum": 200, "maximum": 599})
        }
    }

    impl JsonSchema for Window {
        fn schema_name() -> Cow<'static, str> {
            "window".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "description": "A rolling window: \"1s\", \"1m\", \"1h\", \"1d\" (any count) or a number of seconds; or a calendar period that resets at its start: \"hour\", \"day\", \"week\", \"month\"",
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": wire::MAX_WINDOW_S},
                    {"type": "string", "pattern": "^([0-9]+[smhd]?|hour|day|week|month)$"}
                ]
            })
        }
    }

    impl JsonSchema for Amount {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Amount".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "description": "A decimal amount of money, at most six decimals, e.g. \"20.00\"",
                "oneOf": [
                    {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,6})?$"},
                    {"type": "number", "minimum": 0}
                ]
            })
        }
    }

    impl JsonSchema for Currency {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Currency".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "pattern": "^[A-Z]{3}$"})
        }
    }

    impl JsonSchema for Zone {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Zone".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "pattern": "^[A-Za-z0-9/_+-]{1,64}$"})
        }
    }

    impl JsonSchema for HeaderName {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "HeaderName".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "pattern": "^:?[A-Za-z0-9!#$%&'*+.^_`|~-]+$"})
        }
    }

    impl JsonSchema for Pattern {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Pattern".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "format": "regex"})
        }
    }

    impl JsonSchema for ApiKey {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "ApiKey".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "pattern": "^[!-~]+$"})
        }
    }

    impl JsonSchema for Name {
        fn inline_schema() -> bool {
            true
        }
        fn schema_name() -> Cow<'static, str> {
            "Name".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({"type": "string", "minLength": 1})
        }
    }
}
