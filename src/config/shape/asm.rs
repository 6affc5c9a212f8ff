//! The ASM shape (Alibaba Cloud Service Mesh's LLM token rate limiting, DESIGN section 2.2):
//!
//! ```json
//! {"matches": [{"host": {"exact": "dashscope.aliyuncs.com"}}],
//!  "rateLimitKeys": ["{{request.headers.user-type}}"],
//!  "rateLimitService": {"service": "asm-llm-token-rate-limit-example.default.svc.cluster.local", "port": 80},
//!  "fallOpen": true}
//! ```
//!
//! Each key becomes a service-owned limit (the service's `RATE_LIMIT_CONFIG` decides), the
//! service becomes Istio's `outbound|<port>||<service>` cluster spoken to in protocol `asm`. The
//! native options (`usage`, `reserve`, `deny`, …) may be added; other fields are ignored with a
//! warning, as ASM itself would.

use serde::Deserialize;

use super::native::{self, request_matches, MatchSpec, Port, TimeoutMs};
use crate::config::builder::Builder;
use crate::config::de::{each, Path};
use crate::config::values::{ApiKey, Name};
use crate::config::*;
use crate::limits::Limit;
use crate::limits::LimitRates;
use crate::template::Template;

/// The ASM shape's own fields.
#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Asm {
    /// Which requests are limited, as in the native shape.
    #[serde(default)]
    matches: Vec<MatchSpec>,
    /// Key templates; each is a limit whose budgets the service's `RATE_LIMIT_CONFIG` sets.
    rate_limit_keys: Option<Vec<String>>,
    rate_limit_service: Option<AsmService>,
    /// Admit requests when the service cannot answer (`true`).
    fall_open: Option<bool>,
}

#[derive(Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct AsmService {
    /// The service's host, e.g. `asm-llm-token-rate-limit-example.default.svc.cluster.local`.
    service: Name,
    port: Option<Port>,
    #[serde(default)]
    protocol: AsmProtocol,
    timeout_ms: Option<TimeoutMs>,
    /// The service's API key, sent as `authorization: Bearer <key>`.
    api_key: Option<ApiKey>,
}

#[derive(Deserialize, Clone, Copy, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
enum AsmProtocol {
    #[default]
    Asm,
    V1,
}

impl Asm {
    pub fn into_builder(self, path: &Path) -> Result<Builder, ConfigError> {
        let matches = request_matches(&path.field("matches"), self.matches)?;
        let keys_path = path.field("rateLimitKeys");
        let limits = each(
            &keys_path,
            self.rate_limit_keys,
            "is required: list the key templates, e.g. [\"{{request.headers.user-type}}\"]",
            "is empty: list at least one key template",
            |text, at| {
                Ok(Limit {
                    key: Template::parse(&text).map_err(|e| at.error(e))?,
                    name: text,
                    rates: LimitRates::ServiceOwned,
                    exclusive: false,
                    when: None,
                    currency: None,
                    deny_status: None,
                    engine_window_s: None,
                    shadow: false,
                    alerts: Vec::new(),
                })
            },
        )?;
        native::within_contract(&keys_path, &limits)?;
        for (i, l) in limits.iter().enumerate() {
            if limits[..i].iter().any(|o| o.name == l.name) {
                return Err(keys_path.index(i).error("repeats an earlier key"));
            }
        }
        let service = self.rate_limit_service.ok_or_else(|| {
            path.field("rateLimitService")
                .error("is required: {\"service\": \"<rate-limit service host>\", \"port\": 80}")
        })?;
        let port = service.port.map_or(80, |p| p.0);
        let service = ServiceConfig {
            cluster: format!("outbound|{port}||{}", service.service.0),
            authority: service.service.0,
            protocol: match service.protocol {
                AsmProtocol::Asm => Protocol::Asm,
                AsmProtocol::V1 => Protocol::V1,
            },
            timeout_ms: service.timeout_ms.map_or(500, |t| t.0),
            failure_mode: if self.fall_open.unwrap_or(true) {
                FailureMode::Allow
            } else {
                FailureMode::Deny
            },
            failure_status: 503,
            domain: String::new(),
            descriptor_entries: Vec::new(),
            api_key: service.api_key.map(|k| k.0),
            leases: false,
        };
        Ok(Builder::new(service, matches, limits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_asm_example() {
        let p = Plugin::parse(
            json!({"matches": [{"host": {"exact": "dashscope.aliyuncs.com"}}],
                   "rateLimitKeys": ["{{request.headers.user-type}}"],
                   "rateLimitService": {"service": "asm-llm-token-rate-limit-example.default.svc.cluster.local", "port": 80},
                   "fallOpen": false, "logLevel": "info"})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.shape, Shape::Asm);
        let c = &p.policies[0].config;
        assert_eq!(
            c.service.cluster,
            "outbound|80||asm-llm-token-rate-limit-example.default.svc.cluster.local"
        );
        assert_eq!(c.service.protocol, Protocol::Asm);
        assert_eq!(c.service.failure_mode, FailureMode::Deny);
        assert!(matches!(c.limits[0].rates, LimitRates::ServiceOwned));
        assert_eq!(
            p.warnings,
            ["`logLevel`: not used by llm-token-ratelimit; ignored"]
        );
    }

    #[test]
    fn errors() {
        for (config, want) in [
            (
                json!({"rateLimitService": {"service": "s"}}),
                "`rateLimitKeys`: is required",
            ),
            (
                json!({"rateLimitKeys": ["{{x"], "rateLimitService": {"service": "s"}}),
                "`rateLimitKeys[0]`: unclosed",
            ),
            (
                json!({"rateLimitKeys": ["a"]}),
                "`rateLimitService`: is required",
            ),
            (
                json!({"rateLimitKeys": ["a"], "rateLimitService": {"port": 80}}),
                "`rateLimitService.service`: is required",
            ),
            (
                json!({"rateLimitKeys": ["a"], "rateLimitService": {"service": "s", "port": 0}}),
                "`rateLimitService.port`",
            ),
        ] {
            let got = Plugin::parse(config.to_string().as_bytes())
                .err()
                .unwrap()
                .to_string();
            assert!(got.contains(want), "{config}: {got}");
        }
    }
}
