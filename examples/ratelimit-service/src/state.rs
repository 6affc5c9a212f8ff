//! What every request handler reaches, built once at start and shared by every connection.

use crate::auth::Access;
use crate::limiter::Limiter;

/// The limiter (decisions, counters, the console's sink) and who may call.
pub struct AppState {
    limiter: Limiter,
    access: Access,
}

impl AppState {
    pub fn new(limiter: Limiter, access: Access) -> AppState {
        AppState { limiter, access }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// API keys and the admin token (none: checks and reads are open, the admin API is off).
    pub fn access(&self) -> &Access {
        &self.access
    }
}
