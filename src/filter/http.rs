//! One HTTP stream: match, build descriptors, check, then admit, deny or fail per config; on
//! the way back, scan the response for usage and hand a report to the root context.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{response_body_slices, rewrite_response_body, Host, APPEND};
use super::shared::Shared;
use crate::body::{self, path_model, Api, BodyFacts, Edits};
use crate::config::{Config, FailureMode, OnMissing, ScopeFacts};
use crate::limits::{descriptors, Descriptor};
use crate::matcher::normalize_path;
use crate::matcher::{any_matches, HeaderList, RequestHeaders};
use crate::protocol::{self, CheckFailure, MoneyQuota, Quota};
use crate::reply;
use crate::report::Spent;
use crate::request::{may_need_stream_usage, Properties, RequestBody, RequestView};
use crate::reserve::{reserve, reserve_cost, Rule};
use crate::strip::Stripper;
use crate::text::from_wire;
use crate::usage::{abandoned, settle, Charge, Observed, UsageScanner};

/// Envoy attributes, read through the host on demand.
struct HostProperties<'h>(&'h dyn Host);

impl Properties for HostProperties<'_> {
    fn property(&self, path: &[&str]) -> Option<String> {
        self.0.property(path).map(from_wire)
    }
}

/// What a Higress-style scope looks at, read only when a scope asks.
struct HostScope<'h>(&'h dyn Host);

impl ScopeFacts for HostScope<'_> {
    fn route(&mut self) -> Option<String> {
        self.0
            .property(&["xds", "route_name"])
            .map(from_wire)
            .filter(|r| !r.is_empty())
    }

    fn host(&mut self) -> Option<String> {
        self.0
            .request_header(":authority")
            .map(|a| crate::matcher::normalize_host(&from_wire(a)))
    }

    fn cluster(&mut self) -> Option<String> {
        self.0
            .property(&["xds", "cluster_name"])
            .map(from_wire)
            .filter(|c| !c.is_empty())
    }
}

/// Whether the request is selected by `matches`, reading only the headers they need.
fn selected(host: &dyn Host, config: &Config) -> bool {
    if config.matches.is_empty() {
        return true;
    }
    let probe = read_headers(host, config.match_headers());
    any_matches(&config.matches, &HeaderList(&probe))
}

/// The request headers `names`, each asked for by name, as text ([`from_wire`]).
fn read_headers(host: &dyn Host, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|name| {
            host.request_header(name)
                .map(|v| (name.clone(), from_wire(v)))
        })
        .collect()
}

enum State {
    /// Not limited (unmatched, unconfigured, no limit applies), or answered by the plugin.
    Passthrough,
    /// Matched; the check waits for the JSON body (model, max_tokens, usage injection).
    AwaitingBody {
        headers: Vec<(String, String)>,
        inject: bool,
    },
    /// The check (callout `token`) is in flight; the request is paused.
    Checking { spend: Spend, token: u32 },
    /// Admitted (by the service, or by `failure_mode: allow`): its usage is charged.
    Admitted {
        spend: Spend,
        quota: Option<Quota>,
        money: Option<Box<MoneyQuota>>,
        response: Option<Box<Response>>,
    },
}

/// What an admitted request is charged against.
struct Spend {
    descriptors: Vec<Descriptor>,
    /// Tokens the check asked the service to take at admission.
    reserved: u64,
    /// When the service took them (its clock), echoed so the refund settles in that window.
    reserved_at_ms: Option<u64>,
    /// The id the check was sent with (protocol v1 with a reservation); the report carries it,
    /// so a release can find the reservation.
    id: Option<String>,
    /// The check's answer was never seen after it left: whether `reserved` was taken is the
    /// service's to say, so the report releases it by `id`.
    release: bool,
    /// When the check left, by this VM's clock.
    dispatched_ms: u64,
    /// The request's API (from its path): the shape of a denial.
    api: Api,
    /// A limit in money applies: the model the request named (for its price) and the micro
    /// units the check reserved.
    priced: Option<Priced>,
}

struct Priced {
    request_model: Option<String>,
    reserved_cost: u64,
}

impl Spend {
    /// What this request cost, for the report queue (`cost`: in micro units, for the limits
    /// in money); `None` when there is nothing to settle.
    fn spent(self, charge: &Charge, cost: u64) -> Option<Spent> {
        let reserved_cost = self.priced.as_ref().map_or(0, |p| p.reserved_cost);
        if charge.tokens == 0 && self.reserved == 0 && cost == 0 && reserved_cost == 0 {
            return None;
        }
        Some(Spent {
            descriptors: self.descriptors,
            // A lying upstream cannot turn the report into one the service refuses.
            tokens: charge.tokens.min(wire::MAX_TOKENS),
            reserved: self.reserved,
            cost: cost.min(wire::MAX_TOKENS),
            reserved_cost,
            reserved_at_ms: self.reserved_at_ms,
            release: if self.release { self.id } else { None },
            usage: charge.usage.into(),
        })
    }
}

/// The response as it streams by.
struct Response {
    status: u32,
    /// `None` for a status other than 2xx, whose body is not read.
    scanner: Option<UsageScanner>,
    /// Takes the usage the plugin asked for (and the client did not) out of the stream.
    stripper: Option<Stripper>,
    complete: bool,
    /// The tier Gemini's API says it served the request at (`x-gemini-service-tier`), when
    /// the body does not say.
    tier_header: Option<String>,
}

pub struct Http {
    host: Rc<dyn Host>,
    shared: Option<Rc<Shared>>,
    /// The policy chosen for this request (`Plugin::policies`).
    policy: usize,
    state: State,
    /// The request body's size, for estimating the prompt when usage is missing.
    request_bytes: Option<u64>,
    /// The plugin rewrote the request to ask for usage in the stream.
    injected: bool,
    /// The request had a body the plugin could not read: it is charged at least the estimate.
    unreadable_body: bool,
}

/// The request's path, normalised (see [`normalize_path`]); empty when it has none.
fn request_path(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map(|(_, p)| normalize_path(p).into_owned())
        .unwrap_or_default()
}

/// The buffered request body, for the plugin's edits once the reservation is known.
struct HeldBody<'a> {
    bytes: &'a [u8],
    /// Its size as Envoy buffered it.
    size: usize,
    /// Ask for usage in the stream (`inject_stream_usage` on a completions route).
    inject: bool,
}

impl Http {
    pub fn new(host: Rc<dyn Host>, shared: Option<Rc<Shared>>) -> Http {
        Http {
            host,
            shared,
            policy: 0,
            state: State::Passthrough,
            request_bytes: None,
            injected: false,
            unreadable_body: false,
        }
    }

    /// Builds the descriptors and dispatches the check; returns what the current callback
    /// should answer.
    fn check(
        &mut self,
        shared: &Shared,
        headers: &[(String, String)],
        body: RequestBody<'_>,
        held: Option<HeldBody<'_>>,
    ) -> Action {
        let Some(config) = shared.plugin.config(self.policy) else {
            return Action::Continue;
        };
        let view = RequestView {
            headers,
            body,
            client_ip: &config.client_ip,
            client_ip_prefixes: config.client_ip_prefixes,
            consumer_header: &config.consumer_header,
            properties: &HostProperties(self.host.as_ref()),
        };
        let descriptors = descriptors(&config.limits, &view);
        if descriptors.is_empty() {
            shared.metrics.requests_unlimited.inc();
            self.state = State::Passthrough;
            // Usage is still asked for: a limit that does not apply now may on the response's
            // model, and the client's stream is unchanged either way.
            self.edit_body(shared, config, headers, body.facts(), held, None);
            return Action::Continue;
        }
        let rule = Rule {
            wanted: config.reserve,
            max: config.reserve_max,
            default: config.reserve_default,
        };
        let path = request_path(headers);
        let api = Api::of(&path);
        let asked = body.facts().map(|facts| (facts, api));
        let reservation = reserve(rule, config.service.protocol, asked, &descriptors);
        let reserve = reservation.tokens;
        let cap =
            (config.write_cap && reservation.per_choice > 0).then_some(reservation.per_choice);
        self.edit_body(shared, config, headers, body.facts(), held, cap);
        // A limit in money: the request's model must have a price (or `unknown_model` one).
        let mut priced = None;
        if let Some(prices) = config
            .prices
            .as_ref()
            .filter(|_| descriptors.iter().any(|d| d.currency.is_some()))
        {
            let request_model = path_model(&path)
                .map(str::to_string)
                .or_else(|| body.facts().and_then(|f| f.model.clone()));
            let Some(price) = prices.price(None, request_model.as_deref()) else {
                shared.metrics.requests_unpriced.inc();
                self.host
                    .send_reply(&reply::unpriced(request_model.as_deref()));
                self.state = State::Passthrough;
                return Action::Pause;
            };
            priced = Some(Priced {
                reserved_cost: reserve_cost(&price, rule, asked, self.request_bytes, &descriptors),
                request_model,
            });
        }
        let reserve_cost = priced.as_ref().map_or(0, |p| p.reserved_cost);
        // A reservation may need releasing later: its check carries the id its report will.
        let wire = config.service.protocol.wire();
        let id = ((reserve > 0 || reserve_cost > 0) && wire.releases())
            .then(|| {
                shared
                    .reporter
                    .try_borrow_mut()
                    .ok()
                    .map(|mut r| r.next_check_id())
            })
            .flatten();
        let call = wire.check_call(
            &config.service,
            &descriptors,
            reserve,
            reserve_cost,
            id.as_deref(),
        );
        let spend = Spend {
            descriptors,
            reserved: reserve,
            reserved_at_ms: None,
            id,
            release: false,
            dispatched_ms: self.host.now_ms(),
            api,
            priced,
        };
        match self
            .host
            .dispatch(&config.service, &call, config.service.timeout_ms)
        {
            Ok(token) => {
                self.state = State::Checking { spend, token };
                Action::Pause
            }
            Err(status) => {
                log::warn!(
                    "check could not be dispatched to cluster `{}`: {status:?}",
                    config.service.cluster
                );
                self.fail(shared, config, spend, CheckFailure::Dispatch)
            }
        }
    }

    /// Makes the plugin's edits to the held request body: usage asked for in the stream, and
    /// the output cap per choice (`cap`, under `reserve.write_cap`) written where the API reads
    /// it. The edits must happen before the request resumes.
    fn edit_body(
        &mut self,
        shared: &Shared,
        config: &Config,
        headers: &[(String, String)],
        facts: Option<&BodyFacts>,
        held: Option<HeldBody<'_>>,
        cap: Option<u64>,
    ) {
        let (Some(held), Some(facts)) = (held, facts) else {
            return;
        };
        let path = request_path(headers);
        let edits = Edits {
            stream_usage: held.inject && config.inject_stream_usage && facts.needs_stream_usage(),
            cap: cap.map(|c| (c, Api::of(&path))),
        };
        let Some(rewritten) = body::rewrite(held.bytes, facts, edits) else {
            return;
        };
        if self.host.set_request_body(held.size, &rewritten) {
            if edits.stream_usage {
                shared.metrics.stream_usage_injected.inc();
                self.injected = true;
            }
            if edits.cap.is_some() {
                shared.metrics.request_caps_written.inc();
            }
        }
    }

    /// Applies `failure_mode` to a failed check. A request let through is still charged; a
    /// reservation the service may have taken unseen is released by the report (or, for a
    /// refused request, by a report of its own), so it is neither lost nor charged twice. A
    /// check the service refused as malformed is a contract bug: always refused.
    fn fail(
        &mut self,
        shared: &Shared,
        config: &Config,
        spend: Spend,
        kind: CheckFailure,
    ) -> Action {
        shared.metrics.check_failure(kind).inc();
        let unseen = kind.after_dispatch() && spend.id.is_some();
        let spend = Spend {
            reserved: if unseen { spend.reserved } else { 0 },
            reserved_at_ms: unseen.then(|| reserved_when(shared, &spend)),
            release: unseen,
            priced: spend.priced.map(|p| Priced {
                reserved_cost: if unseen { p.reserved_cost } else { 0 },
                ..p
            }),
            ..spend
        };
        let mode = match kind {
            CheckFailure::Rejected => None,
            _ => Some(config.service.failure_mode),
        };
        match mode {
            Some(FailureMode::Allow) => {
                shared.metrics.failure_mode_allowed.inc();
                self.state = State::Admitted {
                    spend,
                    quota: None,
                    money: None,
                    response: None,
                };
                Action::Continue
            }
            Some(FailureMode::Deny) | None => {
                if mode.is_some() {
                    shared.metrics.failure_mode_denied.inc();
                }
                self.host.send_reply(&reply::unavailable(config));
                release_unsettled(shared, spend);
                self.state = State::Passthrough;
                Action::Pause
            }
        }
    }
}

/// When a reservation whose answer was never seen was taken, by the service's clock: when its
/// check left, moved by the offset between the clocks the last answer showed.
fn reserved_when(shared: &Shared, spend: &Spend) -> u64 {
    let offset = shared
        .reporter
        .try_borrow()
        .ok()
        .and_then(|r| r.service_offset_ms)
        .unwrap_or(0);
    (spend.dispatched_ms as i64).saturating_add(offset).max(0) as u64
}

/// Queues the release of a reservation whose request will never be charged (refused after
/// its check failed, or gone while the check was in flight).
fn release_unsettled(shared: &Shared, spend: Spend) {
    let reserved_cost = spend.priced.as_ref().map_or(0, |p| p.reserved_cost);
    if !(spend.release && (spend.reserved > 0 || reserved_cost > 0)) {
        return;
    }
    let nothing = Charge {
        tokens: 0,
        usage: Default::default(),
        basis: crate::usage::Basis::UpstreamError,
    };
    submit(shared, spend.spent(&nothing, 0));
}

/// Hands what a request spent to the VM's report queue.
fn submit(shared: &Shared, spent: Option<Spent>) {
    if let (Some(spent), Ok(mut reporter)) = (spent, shared.reporter.try_borrow_mut()) {
        reporter.submit(spent, shared.root, &shared.metrics);
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.awaits(token) {
            let status = self.host.call_status(num_headers);
            let body = self.host.call_body(body_size);
            self.checked(status, &body);
        }
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        if self.awaits(token) {
            let body = self.host.grpc_body(response_size);
            self.checked(Some(status_code), &body);
        }
    }
}

impl Http {
    /// Whether callout `token` is this stream's check; an answer for any other is ignored and
    /// counted.
    fn awaits(&self, token: u32) -> bool {
        let ours = matches!(self.state, State::Checking { token: t, .. } if t == token);
        if !ours {
            if let Some(shared) = &self.shared {
                shared.metrics.callouts_unknown.inc();
            }
        }
        ours
    }

    /// The check's answer arrived (`status`: HTTP, or gRPC for `envoy-rls`).
    fn checked(&mut self, status: Option<u32>, body: &[u8]) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some(config) = shared.plugin.config(self.policy) else {
            return;
        };
        let State::Checking { spend, .. } = std::mem::replace(&mut self.state, State::Passthrough)
        else {
            return;
        };
        let verdict = config.service.protocol.wire().read_check(status, body);
        if let (Ok(Some(at)), Ok(mut reporter)) = (
            verdict.as_ref().map(|v| v.reserved_at_ms),
            shared.reporter.try_borrow_mut(),
        ) {
            reporter.service_offset_ms = Some(at as i64 - self.host.now_ms() as i64);
        }
        let action = match verdict {
            Ok(verdict) if verdict.allowed => {
                shared.metrics.checks_allowed.inc();
                self.state = State::Admitted {
                    spend: Spend {
                        reserved_at_ms: verdict.reserved_at_ms,
                        ..spend
                    },
                    quota: verdict.quota,
                    money: verdict.spend.map(Box::new),
                    response: None,
                };
                Action::Continue
            }
            Ok(mut verdict) => {
                shared.metrics.checks_denied.inc();
                if verdict.retry_after_ms == 0 && verdict.quota.is_none() {
                    // The engine named no reset (Limitador): the longest declared window of
                    // the limits that applied, when after it the budget is whole again.
                    verdict.retry_after_ms = config
                        .limits
                        .iter()
                        .filter(|l| spend.descriptors.iter().any(|d| d.limit == l.name))
                        .filter_map(|l| l.engine_window_s)
                        .max()
                        .map_or(0, |s| s.saturating_mul(1000));
                }
                let now = self.host.now_ms();
                self.host
                    .send_reply(&reply::denied(config, &verdict, spend.api, now));
                Action::Pause
            }
            Err(CheckFailure::Rejected) => {
                log::error!(
                    "the rate-limit service refused the check as malformed (status {status:?}): {}; the request is refused",
                    protocol::error_message(body)
                );
                self.fail(&shared, config, spend, CheckFailure::Rejected)
            }
            Err(kind) => {
                log::warn!(
                    "rate-limit check failed ({}): status {status:?}",
                    kind.name()
                );
                self.fail(&shared, config, spend, kind)
            }
        };
        if action == Action::Continue {
            self.host.resume_request();
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let Some(policy) = shared.plugin.select(&mut HostScope(self.host.as_ref())) else {
            return Action::Continue;
        };
        self.policy = policy;
        let Some(config) = shared.plugin.config(policy) else {
            return Action::Continue;
        };
        if !selected(self.host.as_ref(), config) {
            return Action::Continue;
        }
        let headers = read_headers(self.host.as_ref(), config.request_headers());
        let view = RequestView {
            headers: &headers,
            body: RequestBody::Absent,
            client_ip: &config.client_ip,
            client_ip_prefixes: config.client_ip_prefixes,
            consumer_header: &config.consumer_header,
            properties: &HostProperties(self.host.as_ref()),
        };
        shared.metrics.requests_matched.inc();
        // Usage must be readable in the response.
        self.host.remove_request_header("accept-encoding");
        self.request_bytes = view
            .header("content-length")
            .and_then(|v| v.trim().parse().ok());
        let inject = config.inject_stream_usage
            && !end_of_stream
            && may_need_stream_usage(view.header(":method"), view.header(":path"));
        if (config.needs_request_body() || inject) && !end_of_stream {
            if inject || config.write_cap {
                // The body may change size; the upstream then gets it chunked.
                self.host.remove_request_header("content-length");
            }
            // Pausing here would stop Envoy's body callbacks; the body is held back instead.
            self.state = State::AwaitingBody { headers, inject };
            return Action::Continue;
        }
        self.check(&shared, &headers, RequestBody::Absent, None)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.state {
            State::AwaitingBody { .. } => {}
            State::Checking { .. } => return Action::Pause,
            State::Passthrough | State::Admitted { .. } => return Action::Continue,
        }
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let Some(config) = shared.plugin.config(self.policy) else {
            return Action::Continue;
        };
        let too_large = body_size > config.max_request_body_bytes;
        // The body's size so far (a chunked body states none): the prompt's estimate, even for
        // a body the plugin will not read.
        self.request_bytes = Some(self.request_bytes.unwrap_or(0).max(body_size as u64));
        if !end_of_stream && !too_large {
            return Action::Pause;
        }
        let State::AwaitingBody { headers, inject } =
            std::mem::replace(&mut self.state, State::Passthrough)
        else {
            return Action::Continue;
        };
        let body = if too_large {
            None
        } else {
            self.host.request_body(body_size)
        };
        let facts = body.as_deref().and_then(BodyFacts::parse);
        if facts.is_none() {
            shared.metrics.request_body_unreadable.inc();
            self.unreadable_body = true;
        }
        let read = match &facts {
            Some(facts) => RequestBody::Read(facts),
            None => RequestBody::Unreadable,
        };
        let held = body.as_deref().map(|bytes| HeldBody {
            bytes,
            size: body_size,
            inject,
        });
        self.check(&shared, &headers, read, held)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        match std::mem::replace(&mut self.state, State::Passthrough) {
            // Trailers end a body whose last chunk did not say so.
            State::AwaitingBody { headers, .. } => {
                shared.metrics.request_body_unreadable.inc();
                self.unreadable_body = true;
                self.check(&shared, &headers, RequestBody::Unreadable, None)
            }
            other => {
                let pause = matches!(other, State::Checking { .. });
                self.state = other;
                if pause {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = &self.shared else {
            return Action::Continue;
        };
        let State::Admitted {
            quota,
            money,
            response,
            ..
        } = &mut self.state
        else {
            return Action::Continue;
        };
        let headers = shared
            .plugin
            .config(self.policy)
            .filter(|c| c.quota_headers)
            .map(|c| c.higress_headers);
        if let (Some(q), Some(higress)) = (quota, headers) {
            for (name, value) in reply::quota_headers(q, higress) {
                self.host.set_response_header(name, &value);
            }
        }
        if let (Some(m), Some(_)) = (money, headers) {
            for (name, value) in reply::cost_headers(m) {
                self.host.set_response_header(name, &value);
            }
        }
        let status = self
            .host
            .response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
            .unwrap_or(0);
        let ok = (200..300).contains(&status);
        // Upstream bytes: an encoding that is not UTF-8 is one the scanner cannot read.
        let encoding = self.host.response_header("content-encoding").map(from_wire);
        let scanner = ok.then(|| UsageScanner::new(encoding.as_deref()));
        let event_stream = self.host.response_header("content-type").is_some_and(|t| {
            t.get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
        });
        let stripper = (ok && self.injected && event_stream && encoding.is_none()).then(|| {
            // What the client receives changes length.
            self.host.remove_response_header("content-length");
            Stripper::new()
        });
        let tier_header = self
            .host
            .response_header("x-gemini-service-tier")
            .and_then(|t| String::from_utf8(t).ok())
            .filter(|t| t.len() <= 64);
        *response = Some(Box::new(Response {
            status,
            scanner,
            stripper,
            complete: end_of_stream,
            tier_header,
        }));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let State::Admitted {
            response: Some(r), ..
        } = &mut self.state
        {
            if let Some(scanner) = &mut r.scanner {
                let host = self.host.as_ref();
                match &mut r.stripper {
                    None => response_body_slices(host, body_size, |chunk| scanner.feed(chunk)),
                    Some(stripper) => {
                        let mut rewritten = rewrite_response_body(host, body_size, |chunk, out| {
                            scanner.feed(chunk);
                            stripper.feed(chunk, out);
                        });
                        if end_of_stream {
                            let mut rest = Vec::new();
                            stripper.finish(&mut rest);
                            rewritten &=
                                rest.is_empty() || host.edit_response_body(APPEND, 0, &rest);
                        }
                        if !rewritten {
                            log::warn!("could not take the injected usage out of the stream");
                        }
                    }
                }
                if end_of_stream {
                    scanner.finish();
                }
            }
            r.complete |= end_of_stream;
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let State::Admitted {
            response: Some(r), ..
        } = &mut self.state
        {
            if let Some(scanner) = &mut r.scanner {
                scanner.finish();
            }
            r.complete = true;
        }
        Action::Continue
    }

    /// The stream is over, normally or not: settle what it cost and queue the report.
    fn on_log(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let (spend, response) = match std::mem::replace(&mut self.state, State::Passthrough) {
            State::Admitted {
                spend, response, ..
            } => (spend, response),
            // Gone while its check was in flight: nobody will hear the answer, so a
            // reservation the service may have taken is released.
            State::Checking { spend, .. } => {
                let release = spend.id.is_some();
                let reserved_at_ms = Some(reserved_when(&shared, &spend));
                release_unsettled(
                    &shared,
                    Spend {
                        release,
                        reserved_at_ms,
                        ..spend
                    },
                );
                return;
            }
            State::Passthrough | State::AwaitingBody { .. } => return,
        };
        let Some(config) = shared.plugin.config(self.policy) else {
            return;
        };
        let charge = match &response {
            Some(r) => {
                let seen = match &r.scanner {
                    Some(scanner) => scanner.observed(r.status, r.complete, self.request_bytes),
                    // A status other than 2xx: its body was not read.
                    None => Observed {
                        status: Some(r.status),
                        ..Observed::default()
                    },
                };
                // A body the plugin could not read is never free: without usage, the estimate.
                let on_missing = if self.unreadable_body {
                    OnMissing::Estimate
                } else {
                    config.on_missing
                };
                settle(config.count, on_missing, &seen)
            }
            // Admitted and gone before any response: the upstream may bill it all the same.
            None => abandoned(config.count, self.request_bytes, spend.reserved),
        };
        shared.metrics.charged(charge.basis);
        // Priced by the model the response names when the table lists it, else the request's.
        let cost = match (&spend.priced, &config.prices) {
            (Some(p), Some(prices)) => {
                let scanner = response.as_ref().and_then(|r| r.scanner.as_ref());
                let answered = scanner.and_then(UsageScanner::model);
                let tier = scanner
                    .and_then(UsageScanner::service_tier)
                    .or_else(|| response.as_ref().and_then(|r| r.tier_header.as_deref()));
                prices
                    .price(answered, p.request_model.as_deref())
                    .map_or(0, |price| prices.at_tier(price.cost(&charge.usage), tier))
            }
            _ => 0,
        };
        shared
            .metrics
            .vm_memory_bytes
            .set(self.host.vm_memory_bytes());
        submit(&shared, spend.spent(&charge, cost));
    }
}
