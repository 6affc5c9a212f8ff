//! Budget alerts. A report that brings a limit's spend to one of its thresholds (`alerts:
//! [0.5, 0.8, 1.0]` in the plugin's config) raises an alert once per threshold, key and window:
//! the store writes the mark in the same atomic step as the charge, so of several replicas
//! exactly one raises it. The alert is counted, logged, shown on the console and, with
//! `--alert-webhook`, posted as JSON by a background sender. Raising never waits: the sender
//! works off a bounded queue, retries a failed post with exponential backoff a bounded number
//! of times, and counts what it could not deliver, so a dead receiver costs nothing but a
//! metric.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::console::board;

/// Alerts waiting for the sender; past it, new ones are dropped (and counted).
pub const ALERT_QUEUE: usize = 1024;
/// Posts in flight at once: a slow receiver holds at most this many.
const IN_FLIGHT: usize = 16;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The most of a key shown in an alert's `text` (the JSON's `key` has it whole).
const TEXT_KEY: usize = 200;

/// Where alerts are posted, and how.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// An `http://` or `https://` URL (a Slack incoming webhook's URL is a secret: never
    /// logged whole).
    pub url: Uri,
    /// Signs every post: `x-ltr-signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
    pub secret: Option<String>,
    /// Tries per alert, the first included.
    pub attempts: u32,
    /// The wait before the first retry; doubled for each further one (up to a minute).
    pub backoff: Duration,
    /// The deadline of one post.
    pub timeout: Duration,
}

impl Webhook {
    /// The URL without path or query, for logs.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            self.url.scheme_str().unwrap_or("http"),
            self.url.authority().map_or("", |a| a.as_str())
        )
    }
}

/// What the sender did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Deliveries {
    pub sent: AtomicU64,
    /// Given up: every attempt failed, or the receiver refused it (a 4xx other than 408/429).
    pub failed: AtomicU64,
    /// Not queued: the sender was [`ALERT_QUEUE`] behind.
    pub dropped: AtomicU64,
    pub retries: AtomicU64,
}

/// One alert: the webhook's JSON body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// The same on every replica and every retry of this alert: a receiver may deduplicate by it.
    pub id: String,
    pub limit: String,
    /// The key's value (the counter), e.g. a user or team.
    pub key: String,
    /// The key is a `shared` value rule's pool (`key` is then the rule's pattern).
    pub shared: bool,
    /// The fraction of the budget reached, e.g. 0.8.
    pub threshold: f64,
    /// Spent in the window, and the budget: tokens, or (with `currency`) money in its units.
    pub used: f64,
    pub budget: f64,
    pub currency: Option<String>,
    /// The window the alert is raised once in (RFC 3339, UTC): a calendar period, or the fixed
    /// window of the rate's length.
    pub window_start: String,
    pub window_end: String,
    /// When it was raised (RFC 3339, UTC).
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
    /// One line a Slack incoming webhook shows as it is.
    pub text: String,
}

impl Alert {
    /// The alert as the console lists it.
    pub fn note(&self) -> board::AlertNote {
        let amount = |n: f64| match &self.currency {
            Some(c) => format!("{} {c}", wire::format_micros((n * 1e6).round() as u64)),
            None => format!("{n} tokens"),
        };
        board::AlertNote {
            at_ms: self.at_ms,
            limit: self.limit.clone(),
            value: board::bounded(&self.key).to_string(),
            threshold: self.threshold.to_string(),
            used: amount(self.used),
            budget: amount(self.budget),
            window_end: self.window_end.clone(),
        }
    }
}

/// A threshold crossing, before it is worded.
#[derive(Debug, Clone)]
pub struct Raised<'a> {
    pub limit: &'a str,
    pub key: &'a str,
    pub shared: bool,
    /// The meter's identity (several rates of one limit alert apart).
    pub meter: &'a str,
    pub threshold: wire::Threshold,
    /// In the meter's unit: tokens, or micro units of `currency`.
    pub used: i64,
    pub budget: i64,
    pub currency: Option<&'a str>,
    pub window: (i64, i64),
    pub now_ms: i64,
}

impl Raised<'_> {
    /// The alert as it is posted.
    pub fn alert(&self) -> Alert {
        // A digest no client can aim at another key's alert (receivers drop repeats by it).
        let id = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for part in [self.limit, self.key, self.meter] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            h.update([u8::from(self.shared)]);
            h.update(self.window.0.to_le_bytes());
            h.finalize()
                .iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let (used, budget) = match self.currency {
            Some(_) => (self.used as f64 / 1e6, self.budget as f64 / 1e6),
            None => (self.used as f64, self.budget as f64),
        };
        Alert {
            id: format!("{id}-{}", self.threshold.permille()),
            limit: self.limit.to_string(),
            key: self.key.to_string(),
            shared: self.shared,
            threshold: self.threshold.fraction(),
            used,
            budget,
            currency: self.currency.map(str::to_string),
            window_start: rfc3339(self.window.0),
            window_end: rfc3339(self.window.1),
            at: rfc3339(self.now_ms),
            at_ms: self.now_ms,
            text: self.text(),
        }
    }

    /// The line a chat shows: the figures, and the key escaped for Slack's markup (a key is
    /// whatever a client sent: it must not mention `@channel` or forge a link).
    fn text(&self) -> String {
        let (amount, unit): (fn(i64) -> String, &str) = match self.currency {
            Some(c) => (|n| wire::format_micros(n.max(0) as u64), c),
            None => (grouped, "tokens"),
        };
        format!(
            "Budget alert: limit `{}`, key `{}` has used {}% of its budget: {} of {} {unit} in the window ending {}.",
            chat_safe(board::cut(self.limit, TEXT_KEY)),
            chat_safe(board::cut(self.key, TEXT_KEY)),
            f64::from(self.threshold.permille()) / 10.0,
            amount(self.used),
            amount(self.budget),
            rfc3339(self.window.1)
        )
    }
}

/// `n` with thousands separated by commas.
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Text safe inside a Slack code span: `&`, `<`, `>` escaped as Slack asks (no mention, no
/// link), a backtick cannot end the span, control characters cannot break the line, and
/// invisible formatting (bidirectional overrides, zero-width characters) cannot disguise a key.
fn chat_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\''),
            c if c.is_control() || invisible(c) => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Format characters that change how text around them shows without showing themselves.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{180e}' | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{e0000}'..='\u{e007f}')
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

/// `v1=<hex>`: HMAC-SHA256 over `<timestamp>.<body>` (the timestamp is sent beside it, so a
/// receiver can refuse an old post replayed).
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes a key of any length; never reached.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::from("v1=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Raises alerts: hands them to the sender without waiting.
pub struct Alerts {
    webhook: Option<Webhook>,
    deliveries: Arc<Deliveries>,
    /// The sender's queue, started on the first alert (inside the runtime).
    queue: OnceLock<mpsc::Sender<Alert>>,
}

impl Alerts {
    /// `deliveries`: where the sender counts what it did (the service's metrics).
    pub fn new(webhook: Option<Webhook>, deliveries: Arc<Deliveries>) -> Alerts {
        Alerts {
            webhook,
            deliveries,
            queue: OnceLock::new(),
        }
    }

    pub fn deliveries(&self) -> &Deliveries {
        &self.deliveries
    }

    /// Queues `alert` for the webhook, if there is one; never waits.
    pub fn send(&self, alert: Alert) {
        let Some(webhook) = &self.webhook else {
            return;
        };
        let tx = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(ALERT_QUEUE);
            tokio::spawn(sender(webhook.clone(), rx, self.deliveries.clone()));
            tx
        });
        if tx.try_send(alert).is_err() {
            let dropped = self.deliveries.dropped.fetch_add(1, Relaxed) + 1;
            // A burst logs a line per power of two, not one per alert.
            if dropped.is_power_of_two() {
                tracing::warn!(
                    "{dropped} alerts dropped so far: the webhook sender was {ALERT_QUEUE} behind"
                );
            }
        }
    }
}

/// Posts queued alerts, [`IN_FLIGHT`] at a time, until the queue's sender is dropped.
async fn sender(webhook: Webhook, mut rx: mpsc::Receiver<Alert>, deliveries: Arc<Deliveries>) {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let webhook = Arc::new(webhook);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(alert) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, webhook, deliveries) = (client.clone(), webhook.clone(), deliveries.clone());
        tokio::spawn(async move {
            deliver(&client, &webhook, &alert, &deliveries).await;
            drop(slot);
        });
    }
}

/// How one post went.
enum Attempt {
    Sent,
    /// Worth another try: no answer, a timeout, a 5xx, 408 or 429.
    Again(String),
    /// The receiver refused it: another try would be refused too.
    Refused(String),
}

/// Posts one alert, retrying with exponential backoff up to `webhook.attempts` tries.
async fn deliver(client: &Client, webhook: &Webhook, alert: &Alert, deliveries: &Deliveries) {
    let body = Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
    let mut wait = webhook.backoff;
    let mut last = String::new();
    for attempt in 0..webhook.attempts.max(1) {
        if attempt > 0 {
            deliveries.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
        match post(client, webhook, alert, body.clone()).await {
            Attempt::Sent => {
                deliveries.sent.fetch_add(1, Relaxed);
                return;
            }
            Attempt::Refused(why) => {
                last = why;
                break;
            }
            Attempt::Again(why) => last = why,
        }
    }
    deliveries.failed.fetch_add(1, Relaxed);
    tracing::warn!(
        id = %alert.id,
        limit = ?alert.limit,
        receiver = %webhook.origin(),
        "alert not delivered: {last}"
    );
}

async fn post(client: &Client, webhook: &Webhook, alert: &Alert, body: Bytes) -> Attempt {
    let mut req = hyper::Request::post(webhook.url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "llm-token-ratelimit-alerts")
        .header("x-ltr-alert-id", alert.id.as_str());
    if let Some(secret) = &webhook.secret {
        let timestamp = (crate::clock::system_ms() / 1000).to_string();
        req = req
            .header(
                "x-ltr-signature",
                signature(secret.as_bytes(), &timestamp, &body),
            )
            .header("x-ltr-timestamp", timestamp);
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return Attempt::Refused(format!("cannot build the request: {e}")),
    };
    let answer = tokio::time::timeout(webhook.timeout, async {
        let resp = client.request(req).await?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    })
    .await;
    match answer {
        Err(_) => Attempt::Again(format!("no answer within {:?}", webhook.timeout)),
        Ok(Err(e)) => Attempt::Again(format!("cannot post: {e}")),
        Ok(Ok(s)) if s.is_success() => Attempt::Sent,
        Ok(Ok(s)) if s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429 => {
            Attempt::Refused(format!("the receiver answered {s}"))
        }
        Ok(Ok(s)) => Attempt::Again(format!("the receiver answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_as_in_rfc_4231() {
        // RFC 4231, test case 7: its data holds a ".", so it splits into timestamp and body.
        let key = [0xaa_u8; 131];
        let timestamp =
            "This is a test using a larger than block-size key and a larger than block-size data";
        let body = b" The key needs to be hashed before being used by the HMAC algorithm.";
        assert_eq!(
            signature(&key, timestamp, body),
            "v1=9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn the_text_cannot_mention_or_link_and_states_the_figures() {
        let raised = Raised {
            limit: "per-team",
            key: "<!channel> <https://evil|click> `x`\nline",
            shared: false,
            meter: "t:3600000",
            threshold: wire::Threshold::of(0.8).unwrap(),
            used: 8_123,
            budget: 10_000,
            currency: None,
            window: (0, 3_600_000),
            now_ms: 1_000,
        };
        let a = raised.alert();
        assert!(
            !a.text.contains('<') && !a.text.contains('\n'),
            "{}",
            a.text
        );
        assert!(a.text.contains("&lt;!channel&gt;"), "{}", a.text);
        let spoof = Raised {
            key: "admin\u{202e}nimda\u{200b}",
            ..raised.clone()
        };
        assert!(spoof.alert().text.contains("admin\u{fffd}nimda\u{fffd}"));
        assert!(
            a.text.contains("80% of its budget: 8,123 of 10,000 tokens"),
            "{}",
            a.text
        );
        assert_eq!(a.key, raised.key, "the JSON keeps the key whole");
        assert_eq!((a.threshold, a.used, a.budget), (0.8, 8123.0, 10000.0));
        assert_eq!(a.window_end, "1970-01-01T01:00:00Z");
        let money = Raised {
            currency: Some("USD"),
            used: 412_500_000,
            budget: 500_000_000,
            threshold: wire::Threshold::of(0.5).unwrap(),
            ..raised.clone()
        }
        .alert();
        assert_eq!((money.used, money.budget), (412.5, 500.0));
        assert!(
            money
                .text
                .contains("50% of its budget: 412.50 of 500.00 USD"),
            "{}",
            money.text
        );
        assert_ne!(money.id, a.id, "each threshold has its own id");
    }

    #[test]
    fn ids_are_stable_and_apart_per_window_key_and_meter() {
        let base = Raised {
            limit: "l",
            key: "k",
            shared: false,
            meter: "t:60000",
            threshold: wire::Threshold::of(1.0).unwrap(),
            used: 10,
            budget: 10,
            currency: None,
            window: (0, 60_000),
            now_ms: 5,
        };
        let id = base.alert().id;
        assert_eq!(
            Raised {
                now_ms: 9,
                used: 11,
                ..base.clone()
            }
            .alert()
            .id,
            id
        );
        for other in [
            Raised {
                window: (60_000, 120_000),
                ..base.clone()
            },
            Raised {
                key: "k2",
                ..base.clone()
            },
            Raised {
                meter: "t:120000",
                ..base.clone()
            },
            Raised {
                shared: true,
                ..base.clone()
            },
        ] {
            assert_ne!(other.alert().id, id);
        }
    }
}
