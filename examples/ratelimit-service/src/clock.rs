//! Time as the limiter sees it: the system clock, or a manual one so tests can step through
//! windows and refills without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system clock in milliseconds since the Unix epoch.
pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Clone, Debug)]
pub enum Clock {
    System,
    Manual(Arc<AtomicI64>),
    /// The system clock moved by this many ms, with stores on their own clock: a service host
    /// whose clock is off (tests and drills of clock skew against Redis).
    Skewed(i64),
}

impl Clock {
    pub fn manual(start_ms: i64) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// Milliseconds since the Unix epoch (every replica must share this time base).
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => system_ms(),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
            Clock::Skewed(offset) => system_ms().saturating_add(*offset),
        }
    }

    /// The time to hand a store: a manual clock's reading, or `None` so the store uses its
    /// own clock (Redis's `TIME`: one clock for every replica).
    pub fn for_store(&self) -> Option<i64> {
        match self {
            Clock::System | Clock::Skewed(_) => None,
            Clock::Manual(t) => Some(t.load(Ordering::SeqCst)),
        }
    }

    /// Moves a manual clock forward; the system clock ignores it.
    pub fn advance(&self, ms: i64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(ms, Ordering::SeqCst);
        }
    }
}
