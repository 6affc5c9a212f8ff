//! What the two HTTP protocols (v1 and `asm`) share: how a status reads as a decision or a
//! delivery, the service's words on a refusal, and query encoding.

use wire::Outcome;

use crate::report::Delivery;
use crate::verdict::CheckFailure;

/// A report call's HTTP status (`None`: no response headers); per-report outcomes from the
/// body of a 2xx.
pub(super) fn http_delivery(
    status: Option<u32>,
    outcomes: impl FnOnce() -> Vec<Outcome>,
) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Answered(outcomes()),
        Some(408 | 429) | Some(500..) | None => Delivery::Retry,
        Some(_) => Delivery::Refused,
    }
}

pub(super) fn outcomes(body: &[u8]) -> Vec<Outcome> {
    crate::config::read_json::<wire::ReportResponse>(body)
        .map(|r| r.results.into_iter().map(|r| r.outcome).collect())
        .unwrap_or_default()
}

/// A decision is an HTTP 200; the failure kind of anything else.
pub(super) fn http_decision(status: Option<u32>) -> Result<(), CheckFailure> {
    match status {
        None => Err(CheckFailure::Reset),
        Some(200) => Ok(()),
        Some(504) => Err(CheckFailure::Timeout),
        Some(503) => Err(CheckFailure::Unavailable),
        Some(408 | 429) => Err(CheckFailure::Status),
        Some(400..=499) => Err(CheckFailure::Rejected),
        Some(_) => Err(CheckFailure::Status),
    }
}

/// The service's own words on a refused check (`{"error": "…"}`), for the log, bounded.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Error {
        error: String,
    }
    let text = match crate::config::read_json::<Error>(body) {
        Some(e) => e.error,
        None => String::from_utf8_lossy(body).into_owned(),
    };
    let mut cut = text.len().min(512);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.get(..cut).unwrap_or_default().to_string()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
    out
}
