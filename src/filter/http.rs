//! One HTTP stream: match, build descriptors, check, then admit, deny or fail per config.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host;
use super::metrics::Metrics;
use crate::config::{Config, FailureMode, Reserve};
use crate::limits::descriptors;
use crate::matcher::any_matches;
use crate::protocol::{self, CheckFailure, Quota};
use crate::reply;
use crate::request::{BodyFacts, Properties, RequestView};

/// Envoy attributes, read through the host on demand.
struct EnvoyProperties;

impl Properties for EnvoyProperties {
    fn property(&self, path: &[&str]) -> Option<String> {
        host::property(path)
    }
}

enum State {
    /// Not limited (unmatched, unconfigured, no limit applies, or admitted by failure mode).
    Passthrough,
    /// Matched; the check waits for the JSON body (model, max_tokens).
    AwaitingBody { headers: Vec<(String, String)> },
    /// The check is in flight; the request is paused.
    Checking,
    /// The service admitted the request.
    Admitted { quota: Option<Quota> },
    /// The plugin answered the request itself.
    Replied,
}

pub struct Http {
    active: Option<(Rc<Config>, Rc<Metrics>)>,
    state: State,
}

impl Http {
    pub fn new(config: Option<Rc<Config>>, metrics: Option<Rc<Metrics>>) -> Http {
        Http {
            active: config.zip(metrics),
            state: State::Passthrough,
        }
    }

    /// Builds the descriptors and dispatches the check; returns what the current callback
    /// should answer.
    fn check(
        &mut self,
        config: &Config,
        metrics: &Metrics,
        headers: &[(String, String)],
        body: Option<&BodyFacts>,
    ) -> Action {
        let view = RequestView {
            headers,
            body,
            client_ip: &config.client_ip,
            consumer_header: &config.consumer_header,
            properties: &EnvoyProperties,
        };
        let descriptors = descriptors(&config.limits, &view);
        if descriptors.is_empty() {
            metrics.requests_unlimited.inc();
            self.state = State::Passthrough;
            return Action::Continue;
        }
        let reserve = match config.reserve {
            Reserve::Tokens(n) => n,
            Reserve::MaxTokens => body.and_then(BodyFacts::output_token_cap).unwrap_or(0),
        };
        let call = protocol::check_call(config.service.protocol, &descriptors, reserve);
        match host::dispatch(
            &config.service.cluster,
            &config.service.authority,
            &call,
            config.service.timeout_ms,
        ) {
            Ok(_) => {
                self.state = State::Checking;
                Action::Pause
            }
            Err(status) => {
                log::warn!(
                    "check could not be dispatched to cluster `{}`: {status:?}",
                    config.service.cluster
                );
                self.fail(config, metrics, CheckFailure::Dispatch)
            }
        }
    }

    /// Applies `failure_mode` to a failed check.
    fn fail(&mut self, config: &Config, metrics: &Metrics, kind: CheckFailure) -> Action {
        metrics.check_failure(kind).inc();
        match config.service.failure_mode {
            FailureMode::Allow => {
                metrics.failure_mode_allowed.inc();
                self.state = State::Passthrough;
                Action::Continue
            }
            FailureMode::Deny => {
                metrics.failure_mode_denied.inc();
                host::send_reply(&reply::unavailable(config));
                self.state = State::Replied;
                Action::Pause
            }
        }
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some((config, metrics)) = self.active.clone() else {
            return;
        };
        if !matches!(self.state, State::Checking) {
            return;
        }
        let status = host::call_status(num_headers);
        let body = host::call_body(body_size);
        let action = match protocol::read_check(config.service.protocol, status, &body) {
            Ok(verdict) if verdict.allowed => {
                metrics.checks_allowed.inc();
                self.state = State::Admitted {
                    quota: verdict.quota,
                };
                Action::Continue
            }
            Ok(verdict) => {
                metrics.checks_denied.inc();
                host::send_reply(&reply::denied(&config, &verdict));
                self.state = State::Replied;
                Action::Pause
            }
            Err(kind) => {
                log::warn!(
                    "rate-limit check failed ({}): status {status:?}",
                    kind.name()
                );
                self.fail(&config, &metrics, kind)
            }
        };
        if action == Action::Continue {
            host::resume_request();
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some((config, metrics)) = self.active.clone() else {
            return Action::Continue;
        };
        let headers = host::request_headers();
        let view = RequestView {
            headers: &headers,
            body: None,
            client_ip: &config.client_ip,
            consumer_header: &config.consumer_header,
            properties: &EnvoyProperties,
        };
        if !any_matches(&config.matches, &view) {
            return Action::Continue;
        }
        metrics.requests_matched.inc();
        if config.needs_request_body() && !end_of_stream {
            // Pausing here would stop Envoy's body callbacks; the body is held back instead.
            self.state = State::AwaitingBody { headers };
            return Action::Continue;
        }
        self.check(&config, &metrics, &headers, None)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some((config, metrics)) = self.active.clone() else {
            return Action::Continue;
        };
        match &self.state {
            State::AwaitingBody { .. } => {}
            State::Checking | State::Replied => return Action::Pause,
            State::Passthrough | State::Admitted { .. } => return Action::Continue,
        }
        let too_large = body_size > config.max_request_body_bytes;
        if !end_of_stream && !too_large {
            return Action::Pause;
        }
        let facts = if too_large {
            None
        } else {
            host::request_body(body_size).and_then(|b| BodyFacts::parse(&b))
        };
        if facts.is_none() {
            metrics.request_body_unreadable.inc();
        }
        let State::AwaitingBody { headers } = std::mem::replace(&mut self.state, State::Checking)
        else {
            return Action::Continue;
        };
        self.check(&config, &metrics, &headers, facts.as_ref())
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some((config, metrics)) = self.active.clone() else {
            return Action::Continue;
        };
        match std::mem::replace(&mut self.state, State::Checking) {
            // Trailers end a body whose last chunk did not say so.
            State::AwaitingBody { headers } => {
                metrics.request_body_unreadable.inc();
                self.check(&config, &metrics, &headers, None)
            }
            State::Checking => Action::Pause,
            other => {
                self.state = other;
                match self.state {
                    State::Replied => Action::Pause,
                    _ => Action::Continue,
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some((config, _)) = &self.active else {
            return Action::Continue;
        };
        if let State::Admitted { quota: Some(q) } = &self.state {
            if config.quota_headers {
                for (name, value) in reply::quota_headers(q) {
                    host::set_response_header(name, &value);
                }
            }
        }
        Action::Continue
    }
}
