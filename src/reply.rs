//! What the client sees when the plugin answers itself: the 429, the fail-closed reply, and the
//! quota headers on admitted responses. OpenAI SDKs read these headers and this error shape.

use crate::body::Api;
use crate::config::Config;
use crate::pricing::format_amount;
use crate::protocol::{MoneyQuota, Quota, Verdict};

/// A local reply for the adapter to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// `x-ratelimit-*-tokens` headers describing the most constrained rate, and with `higress`
/// the `X-TokenRateLimit-Limit` / `-Remaining` pair Higress's `show_limit_quota_header` sends.
pub fn quota_headers(q: &Quota, higress: bool) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("x-ratelimit-limit-tokens", q.limit.to_string()),
        ("x-ratelimit-remaining-tokens", q.remaining.to_string()),
        ("x-ratelimit-reset-tokens", openai_duration(q.reset_ms)),
    ];
    if higress {
        headers.push(("x-tokenratelimit-limit", q.limit.to_string()));
        headers.push(("x-tokenratelimit-remaining", q.remaining.to_string()));
    }
    headers
}

/// The same for the most constrained budget in money: amounts as decimals of the currency,
/// which `x-ratelimit-currency` names.
pub fn cost_headers(m: &MoneyQuota) -> Vec<(&'static str, String)> {
    vec![
        ("x-ratelimit-limit-cost", format_amount(m.limit)),
        ("x-ratelimit-remaining-cost", format_amount(m.remaining)),
        ("x-ratelimit-reset-cost", openai_duration(m.reset_ms)),
        ("x-ratelimit-currency", m.currency.clone()),
    ]
}

/// The reply to a request the service denied, in the error shape of the request's API (so
/// each SDK raises its own rate-limit error with our message): Anthropic's on `…/messages`
/// (with its `anthropic-ratelimit-tokens-*` headers), Gemini's on `…:generateContent`, else
/// OpenAI's (`insufficient_quota` when a budget in money or a calendar period is spent).
/// `now_ms` dates Anthropic's reset header.
pub fn denied(config: &Config, verdict: &Verdict, api: Api, now_ms: u64) -> Reply {
    let status = verdict
        .denied_by
        .as_deref()
        .and_then(|name| config.limits.iter().find(|l| l.name == name))
        .and_then(|l| l.deny_status)
        .unwrap_or(config.deny.status);
    let retry_ms = retry_after_ms(verdict);
    let mut headers = vec![
        (
            "retry-after".to_string(),
            retry_ms.div_ceil(1000).max(1).to_string(),
        ),
        ("retry-after-ms".to_string(), retry_ms.to_string()),
    ];
    if let Some(m) = &verdict.spend {
        headers.extend(cost_headers(m).into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    if let Some(q) = &verdict.quota {
        let higress = config.higress_headers;
        headers.extend(
            quota_headers(q, higress)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        if higress {
            // Seconds until the budget is whole again.
            let reset = q.reset_ms.div_ceil(1000).max(1);
            headers.push(("x-tokenratelimit-reset".into(), reset.to_string()));
        }
    }
    // Only the ASM protocol's answers carry a description.
    let body = match (&config.deny.body, &verdict.description) {
        (Some(body), _) => body.clone().into_bytes(),
        (None, Some(description)) => {
            headers.push(("content-type".into(), "text/plain; charset=utf-8".into()));
            description.clone().into_bytes()
        }
        (None, None) => {
            headers.push(("content-type".into(), "application/json".into()));
            let message = deny_message(verdict, retry_ms);
            match api {
                Api::Messages => {
                    if let Some(q) = &verdict.quota {
                        let reset = rfc3339_utc(now_ms.saturating_add(q.reset_ms));
                        headers.extend([
                            ("anthropic-ratelimit-tokens-limit".into(), q.limit.to_string()),
                            (
                                "anthropic-ratelimit-tokens-remaining".into(),
                                q.remaining.to_string(),
                            ),
                            ("anthropic-ratelimit-tokens-reset".into(), reset),
                        ]);
                    }
                    // Anthropic's type for a 403 is `permission_error`.
                    let kind = if status == 403 { "permission_error" } else { "rate_limit_error" };
                    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
                        .to_string()
                        .into_bytes()
                }
                Api::Gemini => serde_json::json!({"error": {"code": status, "message": message, "status": if status == 403 { "PERMISSION_DENIED" } else { "RESOURCE_EXHAUSTED" }}})
                    .to_string()
                    .into_bytes(),
                _ if spent_budget(verdict) => {
                    openai_error(&message, "insufficient_quota", "insufficient_quota")
                }
                _ => openai_error(&message, "tokens", "rate_limit_exceeded"),
            }
        }
    };
    headers.extend(config.deny.headers.iter().cloned());
    Reply {
        status,
        headers,
        body,
    }
}

/// The reply when the check failed and `failure_mode` is `deny`.
pub fn unavailable(config: &Config) -> Reply {
    Reply {
        status: config.service.failure_status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "1".into()),
        ],
        body: openai_error(
            "The token rate-limit service is unavailable; the request was not admitted. Please retry.",
            "server_error",
            "rate_limit_service_unavailable",
        ),
    }
}

/// Whether the denial is a spent budget (in money, or of a calendar period) rather than a rate:
/// OpenAI answers those with `insufficient_quota`, which its SDKs do not retry.
fn spent_budget(v: &Verdict) -> bool {
    v.spend
        .as_ref()
        .is_some_and(|m| v.denied_by.as_deref() == Some(&m.name))
}

/// `ms` since the epoch as RFC 3339 in UTC, to the second (`2026-12-01T00:00:00Z`).
pub fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn retry_after_ms(v: &Verdict) -> u64 {
    match v.retry_after_ms {
        0 => v.quota.map_or(1000, |q| q.reset_ms.max(1)),
        ms => ms,
    }
}

fn deny_message(v: &Verdict, retry_ms: u64) -> String {
    if let Some(m) = v
        .spend
        .as_ref()
        .filter(|m| v.denied_by.as_deref() == Some(&m.name))
    {
        return budget_message(m, retry_ms);
    }
    let what = v
        .denied_by
        .as_deref()
        .map_or(String::new(), |l| format!(" ({l})"));
    let figures = v.quota.map_or(String::new(), |q| {
        format!(": limit {}, remaining {}", q.limit, q.remaining)
    });
    format!(
        "Rate limit reached for tokens{what}{figures}. Please try again in {}.",
        openai_duration(retry_ms)
    )
}

/// "Monthly budget of 20.00 USD for team-a reached; resets 2026-12-01T00:00:00+08:00".
fn budget_message(m: &MoneyQuota, retry_ms: u64) -> String {
    let amount = format!("{} {}", format_amount(m.limit), m.currency);
    let whose = if m.value.is_empty() {
        m.name.clone()
    } else {
        m.value.clone()
    };
    let when = match &m.resets_at {
        Some(at) if !at.is_empty() => format!("resets {at}"),
        _ => format!("try again in {}", openai_duration(retry_ms)),
    };
    match m.period {
        Some(p) => {
            let adjective = match p {
                wire::Period::Hour => "Hourly",
                wire::Period::Day => "Daily",
                wire::Period::Week => "Weekly",
                wire::Period::Month => "Monthly",
            };
            format!("{adjective} budget of {amount} for {whose} reached; {when}.")
        }
        None => format!(
            "Budget of {amount} per {} for {whose} reached; {when}.",
            openai_duration(m.window_s.saturating_mul(1000))
        ),
    }
}

/// The reply to a request whose model has no price while a limit counts money, under
/// `unknown_model: deny`: refused, not counted as free.
pub fn unpriced(model: Option<&str>) -> Reply {
    let model = model.unwrap_or("(none)");
    Reply {
        status: 403,
        headers: vec![("content-type".into(), "application/json".into())],
        body: openai_error(
            &format!("The model \"{model}\" has no price, and a budget in money applies to this request; ask the operator to add it to the price table."),
            "invalid_request_error",
            "model_not_priced",
        ),
    }
}

/// `{"error": {...}}` as the OpenAI API returns it.
fn openai_error(message: &str, kind: &str, code: &str) -> Vec<u8> {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        .to_string()
        .into_bytes()
}

/// OpenAI's duration style for reset headers: `250ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let json = format!(
            r#"{{"service": {{"cluster": "rl"}}, "limits": [{{"name": "g", "key": ""}}] {extra}}}"#
        );
        Config::parse(json.as_bytes()).unwrap()
    }

    fn verdict() -> Verdict {
        Verdict {
            allowed: false,
            spend: None,
            quota: Some(Quota {
                limit: 10,
                remaining: 0,
                reset_ms: 42_000,
            }),
            retry_after_ms: 41_500,
            denied_by: Some("per-key".into()),
            description: None,
            reserved_at_ms: None,
            granted: None,
            shadow_denied: Vec::new(),
            lease: None,
        }
    }

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Each SDK reads its own provider's error shape: Anthropic's on `/v1/messages` (with its
    /// rate-limit headers, the reset in RFC 3339), Gemini's on `:generateContent`.
    #[test]
    fn each_api_is_denied_in_its_own_shape() {
        // 2026-12-01T00:00:00Z, and the budget whole again 42 s later.
        let now = 1_796_083_200_000;
        let r = denied(&config(""), &verdict(), Api::Messages, now);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit reached"));
        assert_eq!(header(&r, "anthropic-ratelimit-tokens-limit"), Some("10"));
        assert_eq!(
            header(&r, "anthropic-ratelimit-tokens-remaining"),
            Some("0")
        );
        assert_eq!(
            header(&r, "anthropic-ratelimit-tokens-reset"),
            Some("2026-12-01T00:00:42Z")
        );
        assert_eq!(header(&r, "retry-after"), Some("42"));
        let r = denied(&config(""), &verdict(), Api::Gemini, now);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (
                body["error"]["code"].clone(),
                body["error"]["status"].clone()
            ),
            (
                serde_json::json!(429),
                serde_json::json!("RESOURCE_EXHAUSTED")
            )
        );
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn default_deny_is_openai_shaped() {
        let r = denied(&config(""), &verdict(), Api::Chat, 0);
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("42"));
        assert_eq!(header(&r, "retry-after-ms"), Some("41500"));
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("10"));
        assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("0"));
        assert_eq!(header(&r, "x-ratelimit-reset-tokens"), Some("42s"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["type"], "tokens");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("per-key") && msg.contains("limit 10"), "{msg}");
    }

    /// A limit's `deny_status` answers the requests it denies (403 as Azure API Management
    /// answers a spent quota); other limits keep the plugin's status.
    #[test]
    fn a_limit_may_deny_with_its_own_status() {
        let c = Config::parse(
            br#"{"service": {"cluster": "rl"}, "limits": [
                {"name": "per-key", "key": "", "deny_status": 403},
                {"name": "other", "key": ""}]}"#,
        )
        .unwrap();
        let r = denied(&c, &verdict(), Api::Chat, 0);
        assert_eq!(r.status, 403);
        let r = denied(&c, &verdict(), Api::Gemini, 0);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], 403);
        assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
        let r = denied(&c, &verdict(), Api::Messages, 0);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["type"], "permission_error");
        let other = Verdict {
            denied_by: Some("other".into()),
            ..verdict()
        };
        assert_eq!(denied(&c, &other, Api::Chat, 0).status, 429);
        let err = Config::parse(
            br#"{"service": {"cluster": "rl"}, "limits": [{"name": "g", "key": "", "deny_status": 99}]}"#,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("limits[0].deny_status"), "{err}");
    }

    #[test]
    fn configured_deny_reply_wins() {
        let c =
            config(r#", "deny": {"status": 403, "body": "no", "headers": {"X-Why": "budget"}}"#);
        let r = denied(&c, &verdict(), Api::Chat, 0);
        assert_eq!((r.status, r.body.as_slice()), (403, b"no".as_slice()));
        assert_eq!(header(&r, "x-why"), Some("budget"));
        assert_eq!(header(&r, "retry-after"), Some("42"));
    }

    #[test]
    fn asm_denial_shows_the_description() {
        let c = Config::parse(br#"{"service": {"cluster": "rl", "protocol": "asm"}, "limits": [{"name": "g", "key": ""}]}"#).unwrap();
        let v = Verdict {
            quota: None,
            retry_after_ms: 0,
            description: Some("u is being rate-limited".into()),
            ..verdict()
        };
        let r = denied(&c, &v, Api::Chat, 0);
        assert_eq!(r.body, b"u is being rate-limited");
        assert_eq!(header(&r, "retry-after"), Some("1"));
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), None);
    }

    #[test]
    fn fail_closed_reply() {
        let c = Config::parse(br#"{"service": {"cluster": "rl", "failure_status": 500}, "limits": [{"name": "g", "key": ""}]}"#).unwrap();
        let r = unavailable(&c);
        assert_eq!(r.status, 500);
        assert_eq!(header(&r, "retry-after"), Some("1"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_service_unavailable");
    }

    #[test]
    fn durations() {
        assert_eq!(openai_duration(250), "250ms");
        assert_eq!(openai_duration(1000), "1s");
        assert_eq!(openai_duration(1500), "1.5s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
    }
}
