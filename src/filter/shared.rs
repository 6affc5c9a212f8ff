//! What every HTTP stream of a root context shares with it: the configuration, the VM's metrics
//! and its report queue. Its own module, so the root context (which makes streams) and the
//! streams (which read it) do not import each other.

use std::cell::RefCell;
use std::rc::Rc;

use super::metrics::Metrics;
use super::reporter::Reporter;
use crate::config::Plugin;

/// What every stream of a root context shares with it.
pub struct Shared {
    pub plugin: Plugin,
    pub metrics: Rc<Metrics>,
    pub reporter: Rc<RefCell<Reporter>>,
    /// The root context's id (its timer is the one a stream arms).
    pub root: u32,
}
