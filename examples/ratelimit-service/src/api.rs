//! The JSON bodies of protocol v1 and of the ASM endpoints (DESIGN sections 3 and 4), and the
//! checks that keep a malformed request from reaching the store.

use serde::{Deserialize, Serialize};

/// Bounds on what one request may ask, so no client can make the service allocate at will.
pub const MAX_DESCRIPTORS: usize = 64;
pub const MAX_RATES: usize = 16;
pub const MAX_TEXT: usize = 4096;
pub const MAX_REPORTS: usize = 1000;
pub const MAX_TOKENS: u64 = 1_000_000_000_000_000;
pub const MAX_WINDOW_S: u64 = 366 * 86_400;

#[derive(Debug, Clone, Deserialize)]
pub struct Rate {
    pub tokens: u64,
    pub window_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    pub limit: String,
    pub value: String,
    #[serde(default)]
    pub rates: Vec<Rate>,
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Deserialize)]
pub struct CheckRequest {
    pub descriptors: Vec<Descriptor>,
    #[serde(default)]
    pub reserve: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LimitStatus {
    pub limit: String,
    pub value: String,
    pub tokens: u64,
    pub window_s: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CheckResponse {
    pub allowed: bool,
    pub limits: Vec<LimitStatus>,
    pub retry_after_ms: u64,
    pub denied_by: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Report {
    pub id: String,
    pub descriptors: Vec<Descriptor>,
    pub tokens: u64,
    #[serde(default)]
    pub reserved: u64,
    /// Carried for logs and audits; the charge is `tokens − reserved`.
    #[serde(default)]
    pub usage: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ReportRequest {
    pub reports: Vec<Report>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ReportResponse {
    pub accepted: usize,
    pub duplicates: usize,
}

/// `GET /ratelimit` answer, as the ASM example service gives it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AsmCheckResponse {
    pub allow: bool,
    pub description: String,
}

/// `POST /update_ratelimit_record` body.
#[derive(Debug, Deserialize)]
pub struct AsmUpdate {
    pub ratelimit_keys: Vec<String>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// A request the service refuses (HTTP 400), with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

pub fn validate_descriptors(ds: &[Descriptor], at: &str) -> Result<(), BadRequest> {
    if ds.len() > MAX_DESCRIPTORS {
        return Err(BadRequest(format!(
            "{at}descriptors: more than {MAX_DESCRIPTORS}"
        )));
    }
    for (i, d) in ds.iter().enumerate() {
        let here = format!("{at}descriptors[{i}]");
        if d.limit.len() > MAX_TEXT || d.value.len() > MAX_TEXT {
            return Err(BadRequest(format!(
                "{here}: limit and value must be at most {MAX_TEXT} bytes"
            )));
        }
        if d.rates.len() > MAX_RATES {
            return Err(BadRequest(format!("{here}.rates: more than {MAX_RATES}")));
        }
        for (j, r) in d.rates.iter().enumerate() {
            if r.tokens == 0 || r.tokens > MAX_TOKENS {
                return Err(BadRequest(format!(
                    "{here}.rates[{j}].tokens must be between 1 and {MAX_TOKENS}"
                )));
            }
            if r.window_s == 0 || r.window_s > MAX_WINDOW_S {
                return Err(BadRequest(format!(
                    "{here}.rates[{j}].window_s must be between 1 and {MAX_WINDOW_S}"
                )));
            }
        }
    }
    Ok(())
}

pub fn validate_check(req: &CheckRequest) -> Result<(), BadRequest> {
    if req.reserve > MAX_TOKENS {
        return Err(BadRequest(format!("reserve must be at most {MAX_TOKENS}")));
    }
    validate_descriptors(&req.descriptors, "")
}

pub fn validate_reports(req: &ReportRequest) -> Result<(), BadRequest> {
    if req.reports.len() > MAX_REPORTS {
        return Err(BadRequest(format!(
            "reports: more than {MAX_REPORTS} in one batch"
        )));
    }
    for (i, r) in req.reports.iter().enumerate() {
        if r.id.is_empty() || r.id.len() > 256 {
            return Err(BadRequest(format!(
                "reports[{i}].id must be 1 to 256 bytes"
            )));
        }
        if r.tokens > MAX_TOKENS || r.reserved > MAX_TOKENS {
            return Err(BadRequest(format!(
                "reports[{i}]: tokens and reserved must be at most {MAX_TOKENS}"
            )));
        }
        validate_descriptors(&r.descriptors, &format!("reports[{i}]."))?;
    }
    Ok(())
}

pub fn validate_asm_keys(keys: &[String]) -> Result<(), BadRequest> {
    if keys.len() > MAX_DESCRIPTORS {
        return Err(BadRequest(format!(
            "ratelimit_keys: more than {MAX_DESCRIPTORS}"
        )));
    }
    if keys.iter().any(|k| k.len() > MAX_TEXT) {
        return Err(BadRequest(format!(
            "ratelimit_keys: a key is longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(())
}
