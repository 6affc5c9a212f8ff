//! The root context: owns the parsed configuration and hands it, with the VM's metrics and
//! report queue, to each HTTP stream.
//!
//! Envoy creates a root context per configuration, so a changed configuration brings a new
//! root context into the same VM while the old one winds down. The metrics and the report
//! queue therefore belong to the VM, and every root context shares them: nothing queued is lost
//! to a reconfiguration. The last root context of a VM to go (the VM shutting down) first sends
//! what is queued, for at most [`DRAIN_MS`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host::Host;
use super::http::Http;
use super::metrics::Metrics;
use super::reporter::{Reporter, HEARTBEAT_MS};
use super::shared::Shared;
use crate::config::Plugin;
use crate::lease::Leases;

/// How long the last root context of a VM may take to send what is queued.
pub const DRAIN_MS: u64 = 5000;

/// What every root context of the VM shares.
struct Vm {
    metrics: Rc<Metrics>,
    reporter: Rc<RefCell<Reporter>>,
    leases: Rc<RefCell<Leases>>,
}

thread_local! {
    static VM: RefCell<Option<Vm>> = const { RefCell::new(None) };
    /// Root contexts configured and not yet done.
    static LIVE_ROOTS: Cell<usize> = const { Cell::new(0) };
}

pub struct Root {
    id: u32,
    host: Rc<dyn Host>,
    shared: Option<Rc<Shared>>,
    /// Set once `on_done` asked to send what is queued first.
    draining_since: Option<u64>,
}

impl Root {
    pub fn new(id: u32, host: Rc<dyn Host>) -> Root {
        Root {
            id,
            host,
            shared: None,
            draining_since: None,
        }
    }

    /// A new stream's context.
    pub fn http(&self) -> Http {
        Http::new(Rc::clone(&self.host), self.shared.clone())
    }

    /// A callout's answer: a report call of this root context's, or nobody's (counted).
    fn answered(&self, token: u32, status: Option<u32>, body: &[u8]) {
        let root = self.id;
        self.with_reporter(|reporter, metrics| {
            if !reporter.answered(root, token, status, body, metrics) {
                metrics.callouts_unknown.inc();
            }
        });
    }

    fn with_reporter(&self, f: impl FnOnce(&mut Reporter, &Metrics)) {
        if let Some(shared) = &self.shared {
            if let Ok(mut reporter) = shared.reporter.try_borrow_mut() {
                f(&mut reporter, &shared.metrics);
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = self.host.call_status(num_headers);
        let body = self.host.call_body(body_size);
        self.answered(token, status, &body);
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        let body = self.host.grpc_body(response_size);
        self.answered(token, Some(status_code), &body);
    }

    /// The configuration is gone (replaced, or the VM stops). Another root context of the VM
    /// carries on with the queue; the last one sends it first.
    fn on_done(&mut self) -> bool {
        if self.shared.is_none() {
            return true;
        }
        let root = self.id;
        self.with_reporter(|reporter, _| reporter.forget_root(root));
        let others = LIVE_ROOTS.with(|n| {
            n.set(n.get().saturating_sub(1));
            n.get()
        });
        if others > 0 {
            return true;
        }
        // The VM stops: its leases end, and what they did not use is given back with the rest.
        self.with_reporter(|reporter, _| reporter.end_leases());
        let empty = self.shared.as_ref().map_or(true, |s| {
            s.reporter.try_borrow().map_or(true, |r| r.is_empty())
        });
        if empty {
            return true;
        }
        log::info!("sending the queued usage reports before the VM stops");
        self.draining_since = Some(self.host.now_ms());
        self.with_reporter(|reporter, metrics| reporter.flush(root, metrics));
        self.host.set_tick_ms(50);
        false
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = self.host.plugin_configuration(size).unwrap_or_default();
        let plugin = match Plugin::parse(&bytes) {
            Ok(plugin) => plugin,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let Some(service) = plugin.service().cloned() else {
            log::error!("invalid plugin configuration: no policy");
            return false;
        };
        for warning in &plugin.warnings {
            log::warn!("{} configuration: {warning}", plugin.shape.name());
        }
        log::info!(
            "llm-token-ratelimit configured ({} shape): {} policy(ies), {} limit(s), service cluster `{}`",
            plugin.shape.name(),
            plugin.policies.len(),
            plugin.policies.iter().map(|p| p.config.limits.len()).sum::<usize>(),
            service.cluster
        );
        let capacity = plugin.max_pending_reports();
        // The VM's queue and metrics outlive any one configuration.
        let (metrics, reporter, leases) = VM.with(|vm| {
            let mut vm = vm.borrow_mut();
            let vm = vm.get_or_insert_with(|| {
                let leases = Rc::new(RefCell::new(Leases::default()));
                Vm {
                    metrics: Rc::new(Metrics::define(&self.host)),
                    reporter: Rc::new(RefCell::new(Reporter::new(
                        Rc::clone(&self.host),
                        service.clone(),
                        capacity,
                        Rc::clone(&leases),
                    ))),
                    leases,
                }
            });
            if let Ok(mut r) = vm.reporter.try_borrow_mut() {
                r.reconfigure(service, capacity);
            }
            let shared = (&vm.metrics, &vm.reporter, &vm.leases);
            (
                Rc::clone(shared.0),
                Rc::clone(shared.1),
                Rc::clone(shared.2),
            )
        });
        if self.shared.is_none() {
            // The first root context alive again after the VM's last one stopped: it leases.
            if LIVE_ROOTS.with(|n| n.replace(n.get() + 1)) == 0 {
                if let Ok(mut leases) = leases.try_borrow_mut() {
                    leases.resume();
                }
            }
            self.host.set_tick_ms(HEARTBEAT_MS);
        }
        self.shared = Some(Rc::new(Shared {
            plugin,
            metrics,
            reporter,
            leases,
            root: self.id,
        }));
        true
    }

    fn on_tick(&mut self) {
        let root = self.id;
        self.with_reporter(|reporter, metrics| {
            reporter.pump(root, metrics);
            metrics.vm_memory_bytes.set(self.host.vm_memory_bytes());
        });
        if let Some(since) = self.draining_since {
            let empty = self.shared.as_ref().map_or(true, |s| {
                s.reporter.try_borrow().map_or(true, |r| r.is_empty())
            });
            if empty || self.host.now_ms() >= since + DRAIN_MS {
                self.host.set_tick_ms(0);
                self.host.done();
            } else {
                self.host.set_tick_ms(50);
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; without a configuration the stream passes through.
        Some(Box::new(self.http()))
    }
}
