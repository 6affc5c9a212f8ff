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

use serde_json::Value;

use super::fields::{kind, Object, Path};
use super::native::{self, options};
use super::*;
use crate::limits::LimitRates;
use crate::template::Template;

pub fn parse(value: &Value) -> Result<(Config, Vec<String>), ConfigError> {
    let mut root = Object::new(Path::root(), value)?;
    let matches = native::matches(&mut root, "matches")?;

    let keys_path = root.path.field("rateLimitKeys");
    let limits: Vec<Limit> = match root.array("rateLimitKeys")? {
        None => {
            return Err(keys_path.error(
                "is required: list the key templates, e.g. [\"{{request.headers.user-type}}\"]",
            ))
        }
        Some(items) if items.is_empty() => {
            return Err(keys_path.error("is empty: list at least one key template"))
        }
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = keys_path.index(i);
                let text = match v {
                    Value::String(s) => s,
                    other => {
                        return Err(path.error(format!("expected a string, found {}", kind(other))))
                    }
                };
                let key = Template::parse(text).map_err(|e| path.error(e))?;
                Ok(Limit {
                    name: text.clone(),
                    key,
                    rates: LimitRates::ServiceOwned,
                    exclusive: false,
                    when: None,
                })
            })
            .collect::<Result<_, _>>()?,
    };
    native::within_contract(&keys_path, &limits)?;
    for (i, l) in limits.iter().enumerate() {
        if limits[..i].iter().any(|o| o.name == l.name) {
            return Err(keys_path.index(i).error("repeats an earlier key"));
        }
    }

    let fall_open = root.bool("fallOpen")?.unwrap_or(true);
    let service = match root.object("rateLimitService")? {
        None => {
            return Err(root
                .path
                .field("rateLimitService")
                .error("is required: {\"service\": \"<rate-limit service host>\", \"port\": 80}"))
        }
        Some(s) => service(s, fall_open)?,
    };
    let options = options(&mut root)?;
    let warnings = root
        .leftovers()
        .into_iter()
        .map(|f| format!("`{f}`: not used by llm-token-ratelimit; ignored"))
        .collect();
    Ok((options.into_config(service, matches, limits), warnings))
}

fn service(mut s: Object<'_>, fall_open: bool) -> Result<ServiceConfig, ConfigError> {
    let host = s.required_string("service")?;
    if host.is_empty() {
        return Err(s.path.field("service").error("must not be empty"));
    }
    let port = match s.u64_max("port", 65_535)? {
        Some(0) => return Err(s.path.field("port").error("must be between 1 and 65535")),
        Some(p) => p,
        None => 80,
    };
    let protocol = match s.string("protocol")? {
        None | Some("asm") => Protocol::Asm,
        Some("v1") => Protocol::V1,
        Some(other) => {
            return Err(s
                .path
                .field("protocol")
                .error(format!("\"{other}\" is not one of \"asm\", \"v1\"")))
        }
    };
    let timeout_ms = native::timeout_ms(&mut s)?;
    s.finish()?;
    Ok(ServiceConfig {
        cluster: format!("outbound|{port}||{host}"),
        authority: host.to_string(),
        protocol,
        timeout_ms,
        failure_mode: if fall_open {
            FailureMode::Allow
        } else {
            FailureMode::Deny
        },
        failure_status: 503,
        domain: String::new(),
        descriptor_entries: Vec::new(),
    })
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
