//! One HTTP stream: moves bytes and calls between Envoy and its [`Exchange`], which decides
//! everything; this adapter reads what the exchange asks for, carries out what it answers,
//! and turns its events into metrics.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{pass_response, response_head, selected};
use super::host::{Host, HostProperties, HostScope};
use super::shared::{Shared, VmAdmission};
use crate::config::Config;
use crate::exchange::{BodyEdit, Check, Exchange, OnBody, OnHeaders, Resolution};
use crate::protocol::CheckFailure;

pub struct Http {
    host: Rc<dyn Host>,
    shared: Option<Rc<Shared>>,
    /// The policy chosen for this request (`Plugin::policies`).
    policy: usize,
    exchange: Exchange,
}

fn action(pause: bool) -> Action {
    [Action::Continue, Action::Pause][usize::from(pause)]
}

impl Http {
    pub fn new(host: Rc<dyn Host>, shared: Option<Rc<Shared>>) -> Http {
        Http {
            host,
            shared,
            policy: 0,
            exchange: Exchange::default(),
        }
    }

    /// Runs `f` with the stream's configuration; `default` when it has none.
    fn with_config<R>(
        &mut self,
        default: R,
        f: impl FnOnce(&mut Self, &Shared, &Config) -> R,
    ) -> R {
        let Some(shared) = self.shared.clone() else {
            return default;
        };
        match shared.plugin.config(self.policy) {
            Some(config) => f(self, &shared, config),
            None => default,
        }
    }

    /// Decides and sends the check; what the current callback answers.
    fn check(&mut self, body: Option<(&[u8], usize)>) -> Action {
        self.with_config(Action::Continue, |this, shared, config| {
            let (props, now) = (HostProperties(this.host.as_ref()), this.host.now_ms());
            let vm = VmAdmission(shared);
            let (check, edit) = this.exchange.check(config, &props, body, vm, now);
            if let Some(edit) = edit {
                this.edit(&edit);
            }
            let pause = match check {
                Check::Continue => false,
                Check::Reply(reply) => {
                    this.host.send_reply(&reply);
                    true
                }
                Check::Dispatch(call) => {
                    let service = &config.service;
                    match this.host.dispatch(service, &call, service.timeout_ms) {
                        Ok(token) => {
                            this.exchange.dispatched(token);
                            true
                        }
                        Err(status) => {
                            log::warn!(
                                "check could not be dispatched to cluster `{}`: {status:?}",
                                service.cluster
                            );
                            let offset = shared.service_offset_ms();
                            let r = this.exchange.failed(config, CheckFailure::Dispatch, offset);
                            !this.resolve(shared, r)
                        }
                    }
                }
            };
            shared.record(this.exchange.take_events());
            action(pause)
        })
    }

    fn edit(&mut self, edit: &BodyEdit) {
        if self.host.set_request_body(edit.size, &edit.body) {
            self.exchange.edited(edit);
        }
    }

    /// Carries out how a check ended; whether the request goes on.
    fn resolve(&self, shared: &Shared, r: Resolution) -> bool {
        if let Some(at) = r.service_time_ms {
            shared.learn_service_clock(at, self.host.now_ms());
        }
        if let Some(reply) = &r.reply {
            self.host.send_reply(reply);
        }
        shared.submit(r.report);
        r.resume
    }

    /// The check's answer arrived (`status`: HTTP, or gRPC for `envoy-rls`).
    fn checked(&mut self, token: u32, answer: impl FnOnce(&dyn Host) -> (Option<u32>, Vec<u8>)) {
        self.with_config((), |this, shared, config| {
            if this.exchange.awaits(token) {
                let (status, body) = answer(this.host.as_ref());
                let (now, offset) = (this.host.now_ms(), shared.service_offset_ms());
                let r = this.exchange.answered(config, status, &body, now, offset);
                let held = r.rewrite.then(|| this.exchange.held()).flatten();
                let body = held.and_then(|size| this.host.request_body(size));
                if let Some(edit) = body.and_then(|b| this.exchange.trimmed_body(&b)) {
                    this.edit(&edit);
                }
                if this.resolve(shared, r) {
                    this.host.resume_request();
                }
            }
            shared.record(this.exchange.take_events());
        })
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, headers: usize, size: usize, _: usize) {
        self.checked(token, |host| {
            (host.call_status(headers), host.call_body(size))
        });
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, size: usize) {
        self.checked(token, |host| (Some(status_code), host.grpc_body(size)));
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let map = self.host.request_headers();
        let Some(policy) = shared
            .plugin
            .select(&mut HostScope(self.host.as_ref(), &map))
        else {
            return Action::Continue;
        };
        self.policy = policy;
        let Some(config) = shared.plugin.config(policy) else {
            return Action::Continue;
        };
        let Some(headers) = selected(&map, config) else {
            return Action::Continue;
        };
        // Usage must be readable in the response.
        if map.get("accept-encoding").is_some() {
            self.host.remove_request_header("accept-encoding");
        }
        let on_headers = self
            .exchange
            .request_headers(config, headers, end_of_stream);
        let OnHeaders::WaitForBody {
            drop_content_length,
        } = on_headers
        else {
            return self.check(None);
        };
        if drop_content_length && map.get("content-length").is_some() {
            // The body may change size; the upstream then gets it chunked.
            self.host.remove_request_header("content-length");
        }
        shared.record(self.exchange.take_events());
        // Pausing here would stop Envoy's body callbacks; the body is held back instead.
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with_config(Action::Continue, |this, _, config| {
            match this.exchange.request_body(config, body_size, end_of_stream) {
                OnBody::Continue => Action::Continue,
                OnBody::Pause => Action::Pause,
                OnBody::Read { size } => {
                    let body = size.and_then(|s| this.host.request_body(s));
                    this.check(body.as_deref().map(|b| (b, body_size)))
                }
            }
        })
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.exchange.request_trailers() {
            // Trailers end a body whose last chunk did not say so: it goes unread.
            Some(true) => self.check(None),
            Some(false) => Action::Pause,
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if !self.exchange.admitted() {
            return Action::Continue;
        }
        self.with_config(Action::Continue, |this, _, config| {
            let head = response_head(this.host.as_ref(), end_of_stream, config.reads_tier());
            let plan = this.exchange.response_headers(config, head);
            for (name, value) in &plan.set_headers {
                this.host.set_response_header(name, value);
            }
            if plan.drop_content_length {
                // What the client receives changes length.
                this.host.remove_response_header("content-length");
            }
            Action::Continue
        })
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with_config(Action::Continue, |this, shared, config| {
            let host = this.host.as_ref();
            pass_response(host, &mut this.exchange, config, body_size, end_of_stream);
            shared.record(this.exchange.take_events());
            Action::Continue
        })
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.exchange.response_end();
        Action::Continue
    }

    /// The stream is over, normally or not: settle what it cost and queue the report.
    fn on_log(&mut self) {
        // (`vm_memory_bytes` is set by the root context's timer, which the report wakes.)
        self.with_config((), |this, shared, config| {
            let spent = this.exchange.finish(config, shared.service_offset_ms());
            shared.record(this.exchange.take_events());
            shared.submit(spent);
        })
    }
}
