//! Command-line flags, each with an environment twin, plus ASM's own variables; turned into
//! a store, rules and a listen address, or an error that says what to fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::alerts::Webhook;
use crate::lease::{self, Leasing};
use crate::rules::Rules;
use crate::store::redis::RedisTarget;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WindowKind {
    Sliding,
    Fixed,
}

/// The reference rate-limit service of llm-token-ratelimit.
///
/// Keeps token budgets for the Proxy-Wasm plugin: protocol v1 (`POST /v1/check`,
/// `POST /v1/report`), the ASM endpoints (`GET /ratelimit`, `POST /update_ratelimit_record`),
/// `GET /v1/quota`, `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Parser)]
#[command(name = "ratelimit-service", version)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "RATELIMIT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Where counters live. Default: memory, or redis when a Redis URL or REDIS_ADDRESS is set.
    #[arg(long, env = "RATELIMIT_STORE", value_enum)]
    pub store: Option<StoreKind>,

    /// Redis URL: redis://[user:pass@]host:port/db for one server; repeat the flag, or use
    /// redis+cluster://[user:pass@]host:port,host:port, for Redis Cluster.
    #[arg(long = "redis-url", env = "RATELIMIT_REDIS_URL", value_delimiter = ' ')]
    pub redis_urls: Vec<String>,

    /// JSON file of service-owned rules (same shape as RATE_LIMIT_CONFIG).
    #[arg(long, env = "RATELIMIT_RULES")]
    pub rules: Option<PathBuf>,

    /// ASM: service-owned rules as a JSON array of {rate_limit_key_regex, fill_interval_second,
    /// tokens_per_fill, max_tokens, redis_expired_seconds}.
    #[arg(
        long = "rate-limit-config",
        env = "RATE_LIMIT_CONFIG",
        hide_env_values = true
    )]
    pub rate_limit_config: Option<String>,

    /// ASM: Redis address host:port (implies the Redis store).
    #[arg(long = "redis-address", env = "REDIS_ADDRESS")]
    pub redis_address: Option<String>,

    /// ASM: Redis password for REDIS_ADDRESS; `user:password` logs in as an ACL user.
    #[arg(
        long = "redis-password",
        env = "REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub redis_password: Option<String>,

    /// ASM: Redis database index for REDIS_ADDRESS.
    #[arg(long = "redis-db-index", env = "REDIS_DB_INDEX", default_value_t = 0)]
    pub redis_db_index: u32,

    /// Counting for plugin-owned rates: sliding windows, or fixed windows.
    #[arg(long, env = "RATELIMIT_WINDOW", value_enum, default_value = "sliding")]
    pub window: WindowKind,

    /// Memory store: the most live counters it holds; past it the least recently used are
    /// evicted (report ids are remembered per plugin VM, apart from the counters).
    #[arg(long, env = "RATELIMIT_MAX_COUNTERS", default_value_t = 1_000_000)]
    pub max_counters: usize,

    /// Redis store: deadline of one store call, in milliseconds.
    #[arg(long, env = "RATELIMIT_STORE_TIMEOUT_MS", default_value_t = 500)]
    pub store_timeout_ms: u64,

    /// Log filter (tracing syntax: info, debug, ratelimit_service=debug…).
    #[arg(long, env = "RATELIMIT_LOG", default_value = "info")]
    pub log: String,

    /// For tests and drills only: count on a manual clock that starts at this instant
    /// (RFC 3339, e.g. 2026-11-30T23:59:00+08:00) and moves only by
    /// `POST /v1/clock?advance_ms=N`, so a month's end can be crossed in a second.
    #[arg(long = "manual-clock", env = "RATELIMIT_MANUAL_CLOCK")]
    pub manual_clock: Option<String>,

    /// Enables the admin API (grant extra budget to a key, reset it) for requests carrying
    /// `Authorization: Bearer <this token>`; without it the admin API is disabled.
    #[arg(
        long = "admin-token",
        env = "RATELIMIT_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Requires `Authorization: Bearer <key>` on every endpoint but /healthz, /readyz and
    /// /metrics (the console's reads also take the admin token). Several keys, comma-separated,
    /// for a rotation; each at least 16 characters.
    #[arg(
        long = "api-key",
        env = "RATELIMIT_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,

    /// Seconds a connection may take to send a whole request head (a new connection: its first
    /// one); slower ones are closed.
    #[arg(
        long = "head-timeout",
        env = "RATELIMIT_HEAD_TIMEOUT_S",
        default_value_t = 10
    )]
    pub head_timeout_s: u64,

    /// Seconds a request may take to send its whole body; then 408 and the connection closes.
    #[arg(
        long = "body-timeout",
        env = "RATELIMIT_BODY_TIMEOUT_S",
        default_value_t = 10
    )]
    pub body_timeout_s: u64,

    /// Seconds a kept-alive connection may sit idle between requests before it is closed.
    #[arg(
        long = "idle-timeout",
        env = "RATELIMIT_IDLE_TIMEOUT_S",
        default_value_t = 300
    )]
    pub idle_timeout_s: u64,

    /// The most connections served at once; more wait to be accepted.
    #[arg(
        long = "max-connections",
        env = "RATELIMIT_MAX_CONNECTIONS",
        default_value_t = 4096
    )]
    pub max_connections: usize,

    /// Posts budget alerts (limits with `alerts` in the plugin's config) to this http:// or
    /// https:// URL as JSON, e.g. a Slack incoming webhook. Without it, alerts are counted,
    /// logged and shown on the console only.
    #[arg(
        long = "alert-webhook",
        env = "RATELIMIT_ALERT_WEBHOOK",
        hide_env_values = true
    )]
    pub alert_webhook: Option<String>,

    /// Signs every alert: `x-ltr-signature: v1=<hex HMAC-SHA256 of "<x-ltr-timestamp>.<body>">`.
    #[arg(
        long = "alert-secret",
        env = "RATELIMIT_ALERT_SECRET",
        hide_env_values = true
    )]
    pub alert_secret: Option<String>,

    /// Tries per alert, the first included; then it is counted as failed and dropped.
    #[arg(
        long = "alert-attempts",
        env = "RATELIMIT_ALERT_ATTEMPTS",
        default_value_t = 6
    )]
    pub alert_attempts: u32,

    /// Milliseconds before the first retry of an alert; doubled for each further one, up to a
    /// minute.
    #[arg(
        long = "alert-backoff-ms",
        env = "RATELIMIT_ALERT_BACKOFF_MS",
        default_value_t = 1000
    )]
    pub alert_backoff_ms: u64,

    /// Milliseconds one post of an alert may take.
    #[arg(
        long = "alert-timeout-ms",
        env = "RATELIMIT_ALERT_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub alert_timeout_ms: u64,

    /// The most one quota lease may take of what remains on each of its counters (plugins
    /// with `service.admission: lease`); 0 grants none. From 0 to 0.5.
    #[arg(
        long = "lease-fraction",
        env = "RATELIMIT_LEASE_FRACTION",
        default_value_t = 0.1
    )]
    pub lease_fraction: f64,

    /// The longest a quota lease lasts, in milliseconds (never past the end of the window it
    /// was taken in). From 100 to 60000.
    #[arg(
        long = "lease-ttl-ms",
        env = "RATELIMIT_LEASE_TTL_MS",
        default_value_t = 2000
    )]
    pub lease_ttl_ms: u64,

    /// Keeps what every report's requests spent in PostgreSQL (`postgres://user:pass@host/db`),
    /// for `GET /v1/spend` and for calendar budgets that outlive their store. The schema is
    /// created and migrated at first connection.
    #[arg(long = "ledger", env = "RATELIMIT_LEDGER")]
    pub ledger: Option<String>,
}

/// The ledger's database URL; its `Debug` hides the URL (it may hold a password).
pub struct LedgerUrl(pub String);

impl std::fmt::Debug for LedgerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerUrl(…)")
    }
}

/// How connections are bounded: none can hold the service's file descriptors for long
/// without sending a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub head_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 4096,
        }
    }
}

/// What the flags decide.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store: StoreChoice,
    pub rules: Rules,
    pub sliding: bool,
    pub log: String,
    /// `--manual-clock`: where the manual clock starts (ms since the epoch).
    pub manual_clock_ms: Option<i64>,
    pub admin_token: Option<String>,
    pub api_keys: Vec<String>,
    pub connections: ConnectionLimits,
    /// `--alert-webhook` and how to post to it.
    pub alert_webhook: Option<Webhook>,
    /// `--lease-fraction`, `--lease-ttl-ms`.
    pub leasing: Leasing,
    /// `--ledger`.
    pub ledger: Option<LedgerUrl>,
}

#[derive(Debug)]
pub enum StoreChoice {
    Memory {
        max_counters: usize,
    },
    Redis {
        target: RedisTarget,
        timeout: Duration,
    },
}

impl Cli {
    pub fn settings(self) -> Result<Settings, String> {
        let rules = match (&self.rules, &self.rate_limit_config) {
            (Some(_), Some(_)) => {
                return Err(
                    "give the rules either with --rules or with RATE_LIMIT_CONFIG, not both".into(),
                )
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --rules {}: {e}", path.display()))?;
                Rules::parse(&text).map_err(|e| format!("--rules {}: {e}", path.display()))?
            }
            (None, Some(json)) => {
                Rules::parse(json).map_err(|e| format!("RATE_LIMIT_CONFIG: {e}"))?
            }
            (None, None) => Rules::default(),
        };
        let mut urls = self.redis_urls.clone();
        if let Some(addr) = &self.redis_address {
            // ASM's documented `user:password` logs in as that ACL user; a bare password as
            // the default user.
            let auth = match self.redis_password.as_deref().map(|p| p.split_once(':')) {
                None => String::new(),
                Some(Some((user, password))) => {
                    format!("{}:{}@", encode_userinfo(user), encode_userinfo(password))
                }
                Some(None) => format!(
                    ":{}@",
                    encode_userinfo(self.redis_password.as_deref().unwrap_or_default())
                ),
            };
            urls.push(format!("redis://{auth}{addr}/{}", self.redis_db_index));
        }
        let kind = self.store.unwrap_or(if urls.is_empty() {
            StoreKind::Memory
        } else {
            StoreKind::Redis
        });
        let store = match kind {
            StoreKind::Memory if !urls.is_empty() => {
                return Err(
                    "--store memory was chosen but a Redis URL / REDIS_ADDRESS is set; drop one"
                        .into(),
                )
            }
            StoreKind::Memory => {
                if self.max_counters == 0 {
                    return Err("--max-counters must be at least 1".into());
                }
                StoreChoice::Memory {
                    max_counters: self.max_counters,
                }
            }
            StoreKind::Redis => {
                if urls.is_empty() {
                    return Err("--store redis needs --redis-url (or REDIS_ADDRESS)".into());
                }
                if self.store_timeout_ms == 0 {
                    return Err("--store-timeout-ms must be at least 1".into());
                }
                StoreChoice::Redis {
                    target: RedisTarget::parse(&urls).map_err(|e| format!("--redis-url: {e}"))?,
                    timeout: Duration::from_millis(self.store_timeout_ms),
                }
            }
        };
        let manual_clock_ms = match &self.manual_clock {
            None => None,
            Some(text) => Some(
                text.parse::<jiff::Timestamp>()
                    .map_err(|e| format!("--manual-clock {text}: {e}; write an RFC 3339 time"))?
                    .as_millisecond(),
            ),
        };
        let alert_webhook = self.webhook()?;
        if !(0.0..=0.5).contains(&self.lease_fraction) {
            return Err("--lease-fraction must be between 0 and 0.5".into());
        }
        if !(lease::MIN_TTL_MS as u64..=60_000).contains(&self.lease_ttl_ms) {
            return Err("--lease-ttl-ms must be between 100 and 60000".into());
        }
        if let Some(url) = &self.ledger {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("--ledger: not a PostgreSQL URL: {e}"))?;
        }
        Ok(Settings {
            ledger: self.ledger.map(LedgerUrl),
            alert_webhook,
            leasing: Leasing {
                fraction: self.lease_fraction,
                max_ttl_ms: self.lease_ttl_ms as i64,
            },
            listen: self.listen,
            store,
            rules,
            sliding: self.window == WindowKind::Sliding,
            log: self.log,
            manual_clock_ms,
            admin_token: match self.admin_token {
                Some(t) if t.len() < 16 => {
                    return Err("--admin-token must be at least 16 characters".into())
                }
                other => other,
            },
            api_keys: {
                let keys: Vec<String> = self
                    .api_keys
                    .into_iter()
                    .map(|k| k.trim().to_string())
                    .filter(|k| !k.is_empty())
                    .collect();
                if keys.iter().any(|k| k.len() < 16) {
                    return Err("--api-key: each key must be at least 16 characters".into());
                }
                keys
            },
            connections: {
                let secs = |flag: &str, s: u64| {
                    if s == 0 {
                        Err(format!("--{flag} must be at least 1 second"))
                    } else {
                        Ok(Duration::from_secs(s))
                    }
                };
                if self.max_connections == 0 {
                    return Err("--max-connections must be at least 1".into());
                }
                ConnectionLimits {
                    head_timeout: secs("head-timeout", self.head_timeout_s)?,
                    body_timeout: secs("body-timeout", self.body_timeout_s)?,
                    idle_timeout: secs("idle-timeout", self.idle_timeout_s)?,
                    max_connections: self.max_connections,
                }
            },
        })
    }
}

impl Cli {
    /// `--alert-webhook` and the flags that shape it, checked.
    fn webhook(&self) -> Result<Option<Webhook>, String> {
        let Some(url) = &self.alert_webhook else {
            if self.alert_secret.is_some() {
                return Err("--alert-secret signs what --alert-webhook posts: give both".into());
            }
            return Ok(None);
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("--alert-webhook: not a URL ({e})"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https"))
            || uri.host().is_none_or(str::is_empty)
        {
            return Err("--alert-webhook must be an http:// or https:// URL with a host".into());
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // It would be logged with the host, and never sent as credentials.
            return Err(
                "--alert-webhook must not hold credentials (user:password@): put a token in its path or query, or sign with --alert-secret".into(),
            );
        }
        let authority = uri.authority().map_or("", |a| a.as_str());
        let after_host = authority
            .rsplit_once(']')
            .map_or(authority, |(_, rest)| rest);
        if let Some((_, port)) = after_host.rsplit_once(':') {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err("--alert-webhook: its port is not a number from 1 to 65535".into());
            }
        }
        if !(1..=20).contains(&self.alert_attempts) {
            return Err("--alert-attempts must be between 1 and 20".into());
        }
        for (flag, ms) in [
            ("alert-backoff-ms", self.alert_backoff_ms),
            ("alert-timeout-ms", self.alert_timeout_ms),
        ] {
            if !(1..=60_000).contains(&ms) {
                return Err(format!("--{flag} must be between 1 and 60000"));
            }
        }
        if self.alert_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err("--alert-secret must be at least 16 characters".into());
        }
        Ok(Some(Webhook {
            url: uri,
            secret: self.alert_secret.clone(),
            attempts: self.alert_attempts,
            backoff: Duration::from_millis(self.alert_backoff_ms),
            timeout: Duration::from_millis(self.alert_timeout_ms),
        }))
    }
}

/// Percent-encodes a password for the userinfo part of a URL.
fn encode_userinfo(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["ratelimit-service"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .settings()
    }

    #[test]
    fn alert_webhooks_are_checked() {
        let hook = |extra: &[&str]| {
            let mut args = vec![
                "--alert-webhook",
                "https://hooks.example.com/services/T/B/X",
            ];
            args.extend_from_slice(extra);
            settings(&args).map(|s| s.alert_webhook)
        };
        let w = hook(&["--alert-secret", "0123456789abcdef"])
            .unwrap()
            .unwrap();
        assert_eq!(
            (w.attempts, w.origin().as_str()),
            (6, "https://hooks.example.com")
        );
        assert!(
            settings(&["--alert-webhook", "https://u:p@hooks.example.com/x"])
                .unwrap_err()
                .contains("credentials")
        );
        for bad in [
            vec!["--alert-webhook", "ftp://hooks.example.com/x"],
            vec!["--alert-webhook", "/relative"],
            vec!["--alert-webhook", "http://hooks.example.com:99999/x"],
            vec!["--alert-webhook", "http://:80/x"],
            vec!["--alert-secret", "0123456789abcdef"],
        ] {
            assert!(settings(&bad).is_err(), "{bad:?}");
        }
        for bad in [
            ["--alert-secret", "short"],
            ["--alert-attempts", "0"],
            ["--alert-attempts", "21"],
            ["--alert-backoff-ms", "0"],
            ["--alert-backoff-ms", "60001"],
            ["--alert-timeout-ms", "600000"],
        ] {
            assert!(hook(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_to_memory() {
        let s = settings(&[]).unwrap();
        assert!(matches!(
            s.store,
            StoreChoice::Memory {
                max_counters: 1_000_000
            }
        ));
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert!(s.sliding && s.rules.is_empty());
    }

    #[test]
    fn asm_variables_select_redis() {
        let s = settings(&[
            "--redis-address",
            "redis:6379",
            "--redis-password",
            "p@ss word",
            "--redis-db-index",
            "2",
        ])
        .unwrap();
        match s.store {
            StoreChoice::Redis {
                target: RedisTarget::Single(url),
                ..
            } => assert_eq!(url, "redis://:p%40ss%20word@redis:6379/2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conflicts_are_explained() {
        assert!(settings(&["--store", "redis"])
            .unwrap_err()
            .contains("needs --redis-url"));
        assert!(
            settings(&["--store", "memory", "--redis-url", "redis://x:1"])
                .unwrap_err()
                .contains("drop one")
        );
        assert!(settings(&["--redis-url", "http://x"])
            .unwrap_err()
            .contains("not a redis://"));
        assert!(settings(&["--rate-limit-config", "nope"])
            .unwrap_err()
            .contains("RATE_LIMIT_CONFIG"));
        assert!(settings(&["--listen", "nowhere"]).is_err());
    }
}
