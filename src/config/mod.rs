//! The validated configuration model, and the entry point that reads any accepted shape into it.
//!
//! Every shape (native today; ASM and Higress translate into the same model) ends up as one
//! [`Config`], so the request path never needs to know which dialect the operator wrote.

mod fields;
mod native;

use thiserror::Error;

use crate::client_ip::ClientIpSource;
use crate::limits::Limit;
use crate::matcher::RequestMatch;
use crate::template::Attribute;

/// A configuration problem, naming the field (`limits[1].window`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid plugin configuration: `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// Which wire protocol the rate-limit service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON `/v1/check` and `/v1/report` (DESIGN section 3).
    V1,
    /// The ASM example service's `/ratelimit` and `/update_ratelimit_record` (section 4).
    Asm,
}

/// What a failed check (service down, slow, broken) does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The Envoy cluster `dispatch_http_call` targets.
    pub cluster: String,
    /// The `:authority` sent to the service.
    pub authority: String,
    pub protocol: Protocol,
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
    pub failure_status: u32,
}

/// Which tokens a request is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    Total,
    Prompt,
    Completion,
    Weighted { prompt: f64, completion: f64 },
}

/// What a successful response without usage is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    Estimate,
    Zero,
}

/// Tokens taken from every budget when a request is admitted, before its usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Tokens(u64),
    /// The request's own `max_tokens` (or `max_completion_tokens` / `max_output_tokens`).
    MaxTokens,
}

/// The reply to a denied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyConfig {
    pub status: u32,
    /// `None` → an OpenAI-style error JSON (or the ASM service's description).
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    /// Empty: every request is limited.
    pub matches: Vec<RequestMatch>,
    pub limits: Vec<Limit>,
    pub count: Count,
    pub on_missing: OnMissing,
    pub reserve: Reserve,
    pub inject_stream_usage: bool,
    pub deny: DenyConfig,
    pub quota_headers: bool,
    pub client_ip: ClientIpSource,
    /// Lower-case header name carrying the authenticated consumer.
    pub consumer_header: String,
    pub max_request_body_bytes: usize,
}

impl Config {
    /// Reads the plugin configuration as Envoy hands it over.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let root = fields::Path::root();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(root.error(
                "the plugin configuration is empty; it needs at least `service` and `limits`",
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| root.error(format!("not valid JSON: {e}")))?;
        native::parse(&value)
    }

    /// Whether the JSON request body must be read before the check can be made.
    pub fn needs_request_body(&self) -> bool {
        self.reserve == Reserve::MaxTokens
            || self
                .limits
                .iter()
                .any(|l| l.key.attributes().any(|a| *a == Attribute::Model))
    }
}
