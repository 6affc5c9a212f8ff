//! Service-owned rules (ASM's `RATE_LIMIT_CONFIG`): token buckets chosen by a regex over the
//! key value, for limits whose rates the plugin does not name.

use regex::Regex;
use serde::Deserialize;

use crate::meter::Meter;

/// One rule as ASM writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub rate_limit_key_regex: String,
    pub fill_interval_second: u64,
    pub tokens_per_fill: u64,
    pub max_tokens: u64,
    /// How long an idle bucket is kept; default: long enough to refill completely.
    #[serde(default)]
    pub redis_expired_seconds: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    regex: Regex,
    meter: Meter,
}

/// The rules, first match wins; a value no rule matches is not limited.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

impl Rules {
    /// Parses a JSON array of ASM rules; errors name the rule and the field.
    pub fn parse(json: &str) -> Result<Rules, String> {
        let specs: Vec<RuleSpec> = serde_json::from_str(json)
            .map_err(|e| format!("rate-limit rules are not a valid JSON array of rules: {e}"))?;
        specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| Rule::new(s).map_err(|e| format!("rule {i}: {e}")))
            .collect::<Result<_, _>>()
            .map(Rules)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bucket for a key value, if any rule claims it.
    pub fn meter_for(&self, value: &str) -> Option<Meter> {
        self.0
            .iter()
            .find(|r| r.regex.is_match(value))
            .map(|r| r.meter)
    }
}

impl Rule {
    fn new(s: RuleSpec) -> Result<Rule, String> {
        let regex = Regex::new(&s.rate_limit_key_regex).map_err(|e| {
            format!(
                "rate_limit_key_regex `{}` is invalid: {e}",
                s.rate_limit_key_regex
            )
        })?;
        if s.fill_interval_second == 0 || s.fill_interval_second > 366 * 86_400 {
            return Err("fill_interval_second must be between 1 and 31622400".into());
        }
        if s.tokens_per_fill == 0 || s.max_tokens == 0 {
            return Err("tokens_per_fill and max_tokens must be at least 1".into());
        }
        let big = 1_000_000_000_000_000;
        if s.tokens_per_fill > big || s.max_tokens > big {
            return Err(format!(
                "tokens_per_fill and max_tokens must be at most {big}"
            ));
        }
        let interval_ms = s.fill_interval_second as i64 * 1000;
        let per_fill = s.tokens_per_fill as i64;
        let max = s.max_tokens as i64;
        let refill_ms = ((max + per_fill - 1) / per_fill).saturating_mul(interval_ms);
        let expire_ms = s
            .redis_expired_seconds
            .map_or(refill_ms + interval_ms, |e| (e as i64).saturating_mul(1000))
            .max(interval_ms);
        Ok(Rule {
            regex,
            meter: Meter::Bucket {
                max,
                per_fill,
                interval_ms,
                expire_ms,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ASM's documented example rules.
    pub const ASM_EXAMPLE: &str = r#"[
        {"rate_limit_key_regex": "regular-user", "fill_interval_second": 60, "tokens_per_fill": 100, "max_tokens": 1000, "redis_expired_seconds": 600},
        {"rate_limit_key_regex": "subscriber", "fill_interval_second": 60, "tokens_per_fill": 1000, "max_tokens": 10000, "redis_expired_seconds": 600}
    ]"#;

    #[test]
    fn asm_example_rules() {
        let rules = Rules::parse(ASM_EXAMPLE).unwrap();
        assert_eq!(
            rules.meter_for("regular-user"),
            Some(Meter::Bucket {
                max: 1000,
                per_fill: 100,
                interval_ms: 60_000,
                expire_ms: 600_000
            })
        );
        assert!(matches!(
            rules.meter_for("subscriber"),
            Some(Meter::Bucket { max: 10000, .. })
        ));
        assert_eq!(rules.meter_for("anonymous"), None);
    }

    #[test]
    fn bad_rules_are_explained() {
        assert!(Rules::parse("{}").unwrap_err().contains("JSON array"));
        let bad = r#"[{"rate_limit_key_regex": "(", "fill_interval_second": 1, "tokens_per_fill": 1, "max_tokens": 1}]"#;
        assert!(Rules::parse(bad)
            .unwrap_err()
            .contains("rule 0: rate_limit_key_regex"));
        let zero = r#"[{"rate_limit_key_regex": "a", "fill_interval_second": 0, "tokens_per_fill": 1, "max_tokens": 1}]"#;
        assert!(Rules::parse(zero)
            .unwrap_err()
            .contains("fill_interval_second"));
        let typo = r#"[{"rate_limit_key_regex": "a", "fill_interval_seconds": 1, "tokens_per_fill": 1, "max_tokens": 1}]"#;
        assert!(Rules::parse(typo)
            .unwrap_err()
            .contains("fill_interval_seconds"));
    }
}
