//! What a check comes to, whatever the protocol: the service's decision with its figures, or
//! why there is none. Every protocol reader makes these and the reply and the filter read them.

/// The budget figures of the most constrained rate, for the quota headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// The most constrained budget in money, for the quota headers and the denial's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoneyQuota {
    /// Micro units.
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub currency: String,
    /// The limit's name and the key value it counts.
    pub name: String,
    pub value: String,
    pub window_s: u64,
    /// A calendar rate: its period, and when the current one ends, in its zone.
    pub period: Option<wire::Period>,
    pub resets_at: Option<String>,
}

/// The service's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The most constrained budget in tokens; `None` when the protocol carries no figures
    /// (ASM) or no rate in tokens applied.
    pub quota: Option<Quota>,
    /// The most constrained budget in money (the denying one, when a budget in money denied).
    pub spend: Option<MoneyQuota>,
    pub retry_after_ms: u64,
    /// The limit that denied, when the service says.
    pub denied_by: Option<String>,
    /// The ASM service's text, used as the deny body for that protocol.
    pub description: Option<String>,
    /// When the service took the reservation (its clock): the report echoes it.
    pub reserved_at_ms: Option<u64>,
    /// A trimmed check: what the service took instead of the whole reserve.
    pub granted: Option<wire::Amount>,
    /// The shadow limits that would have denied (protocol v1).
    pub shadow_denied: Vec<String>,
    /// The answer to a quota lease ask (protocol v1).
    pub lease: Option<wire::LeaseAnswer>,
}

/// Why a check produced no decision; each kind has its own metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFailure {
    /// `dispatch_http_call` refused (unknown cluster, bad arguments).
    Dispatch,
    /// Envoy's 504: the service did not answer within `timeout_ms`.
    Timeout,
    /// Envoy's 503: no healthy host, connection refused.
    Unavailable,
    /// The call ended without response headers (reset).
    Reset,
    /// Any other status than 200 that means an outage (5xx, 408, 429, 1xx/3xx).
    Status,
    /// A 200 whose body is not a decision.
    Body,
    /// The service refused the check as malformed (4xx, gRPC `INVALID_ARGUMENT`): a contract
    /// bug, not an outage, so `failure_mode` does not apply and the request is refused.
    Rejected,
}

impl CheckFailure {
    pub const ALL: [CheckFailure; 7] = [
        CheckFailure::Dispatch,
        CheckFailure::Timeout,
        CheckFailure::Unavailable,
        CheckFailure::Reset,
        CheckFailure::Status,
        CheckFailure::Body,
        CheckFailure::Rejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CheckFailure::Dispatch => "dispatch",
            CheckFailure::Timeout => "timeout",
            CheckFailure::Unavailable => "unavailable",
            CheckFailure::Reset => "reset",
            CheckFailure::Status => "status",
            CheckFailure::Body => "body",
            CheckFailure::Rejected => "rejected",
        }
    }

    /// Whether the service may have seen the check (and taken its reservation).
    pub fn after_dispatch(self) -> bool {
        !matches!(self, CheckFailure::Dispatch | CheckFailure::Rejected)
    }
}
