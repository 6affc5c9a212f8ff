//! The reference rate-limit service of llm-token-ratelimit: keeps token budgets for the
//! plugin, in memory by default and in Redis / Redis Cluster at scale.
//!
//! `server` speaks HTTP, `limiter` decides, `store` keeps counters using the algorithms of
//! `meter`; `settings` turns flags and environment into a running configuration.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod calendar;
pub mod clock;
pub mod console;
pub mod counter;
pub mod lease;
pub mod ledger;
pub mod limiter;
pub mod meter;
pub mod metrics;
pub mod rules;
pub mod server;
pub mod settings;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use clock::Clock;
use limiter::Limiter;
use settings::{Settings, StoreChoice};
use state::AppState;
use store::{MemoryStore, RedisStore, Store};

/// Builds the service the settings describe (connecting to Redis and the ledger's database
/// lazily).
pub fn app(settings: &Settings, clock: Clock) -> AppState {
    let ledger = settings.ledger.as_ref().and_then(|url| {
        ledger::SpendLedger::new(&url.0)
            .inspect_err(|e| tracing::error!("{e}"))
            .ok()
    });
    let store = match &settings.store {
        StoreChoice::Memory { max_counters } => Store::Memory(MemoryStore::new(*max_counters)),
        StoreChoice::Redis { target, timeout } => Store::Redis(std::sync::Arc::new(
            RedisStore::new(target.clone(), *timeout),
        )),
    };
    AppState::new(
        Limiter::new(store, settings.rules.clone(), clock, settings.sliding)
            .alerting(settings.alert_webhook.clone())
            .leasing(settings.leasing)
            .with_ledger(ledger),
        auth::Access::new(&settings.api_keys, settings.admin_token.as_deref()),
    )
}

/// Sweeps the memory store of expired counters until the service is dropped.
pub fn spawn_sweeper(state: &Arc<AppState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else {
                return;
            };
            let limiter = state.limiter();
            if let Store::Memory(m) = limiter.store() {
                m.sweep(limiter.clock().now_ms());
            }
        }
    });
}
