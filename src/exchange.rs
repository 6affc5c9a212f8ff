//! One request and its response, as a state machine over plain values: every decision the
//! plugin makes about an exchange lives here (which limits apply, what to reserve and price,
//! how to edit the request, what `failure_mode` does, what a denial says, which headers the
//! answer gets, what the request is finally charged), and the proxy-wasm shell
//! (`filter::http`) only moves bytes and calls between Envoy and it.
//!
//! It moves through request headers → (request body) → check → answer → response headers →
//! response chunks → finish. Each step takes the configuration and plain facts and returns what
//! the shell must do; what happened is left as [`Event`]s for the shell's metrics.

use crate::body::{self, path_model, Api, BodyFacts, Edits};
use crate::config::{Config, FailureMode, OnMissing};
use crate::cutoff::{Allowance, Cutoff, Ending};
use crate::lease::Local;
use crate::limits::{descriptors, Descriptor};
use crate::matcher::normalize_path;
use crate::protocol::{self, CheckFailure, MoneyQuota, Outbound, Quota};
use crate::reply::{self, Reply};
use crate::report::Spent;
use crate::request::{may_need_stream_usage, Properties, RequestBody, RequestView};
use crate::reserve::{full_cost, prompt_cost, prompt_tokens, reserve, reserve_cost, trim};
use crate::reserve::{Rule, TrimPlan};
use crate::response::{OnChunk, Response, Slice};
use crate::strip::Stripper;
use crate::usage::Count;
use crate::usage::{abandoned, is_encoded, settle, Basis, Charge, Observed, UsageScanner};
use wire::Amount;

/// What happened, for the shell's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Matched,
    /// No limit applies to the request.
    Unlimited,
    /// A limit in money applies and the request's model has no price.
    Unpriced,
    BodyUnreadable,
    StreamUsageInjected,
    CapWritten,
    /// The service granted less than the request's cap (`reserve.trim`).
    Trimmed,
    Allowed,
    Denied,
    CheckFailed(CheckFailure),
    FailureAllowed,
    FailureDenied,
    /// An answer for a callout this exchange does not wait for.
    CalloutUnknown,
    Charged(Basis),
    /// Admitted, though shadow limits would have denied it.
    ShadowDenied,
    /// Admitted under a quota lease the VM holds, with no check.
    Leased,
    /// A stream was ended in its provider's shape: its budget was spent.
    StreamCut,
    /// An ended stream's upstream went on past its drain, and the stream was reset.
    StreamReset,
}

/// What the shell does once the request's headers are read.
#[derive(Debug, PartialEq, Eq)]
pub enum OnHeaders {
    /// Check now, without a body.
    Check,
    /// Hold the body back until it is whole (or too large); with `drop_content_length`, the
    /// plugin may change its size.
    WaitForBody { drop_content_length: bool },
}

/// What the shell does with a request body chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum OnBody {
    Continue,
    Pause,
    /// The body is complete: read it (`size` bytes; `None` when it is too large to read) and
    /// hand it to [`Exchange::body`].
    Read {
        size: Option<usize>,
    },
}

/// A new request body for the shell to put in place of the held one (`size` bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct BodyEdit {
    pub body: Vec<u8>,
    pub size: usize,
    stream_usage: bool,
    cap: bool,
}

/// What the shell does about a check.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Let the request go on (no limit applies, or it was answered already).
    Continue,
    /// Answer the client and hold the request.
    Reply(Reply),
    /// Send this call and hold the request; tell [`Exchange::dispatched`] its token, or
    /// [`Exchange::failed`] why it could not leave.
    Dispatch(Outbound),
}

/// How a check ended, for the shell to carry out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Let the held request go on.
    pub resume: bool,
    /// Answer the client instead.
    pub reply: Option<Reply>,
    /// A report to queue (the release of a reservation nobody will charge).
    pub report: Option<Spent>,
    /// When the service took the reservation, by its clock (to learn the clocks' offset).
    pub service_time_ms: Option<u64>,
    /// The check was trimmed: the held body is rewritten ([`Exchange::trimmed_body`]) before
    /// the request resumes.
    pub rewrite: bool,
}

/// The response's head, as the shell read it.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub status: u32,
    /// `content-encoding`, as text.
    pub encoding: Option<String>,
    pub event_stream: bool,
    /// Gemini's `x-gemini-service-tier`.
    pub tier: Option<String>,
    pub end_of_stream: bool,
}

/// What the shell does to the response's head.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponsePlan {
    pub set_headers: Vec<(&'static str, String)>,
    /// The body changes length (the injected usage is taken out of the stream).
    pub drop_content_length: bool,
}

enum State {
    /// Not limited (unmatched, no limit applies), or answered by the plugin.
    Passthrough,
    /// Matched, with the headers its configuration reads; the check comes next.
    Matched { headers: Vec<(String, String)> },
    /// Matched; the check waits for the JSON body.
    AwaitingBody {
        headers: Vec<(String, String)>,
        inject: bool,
    },
    /// The check is about to leave (the shell dispatches it).
    Dispatching { spend: Spend },
    /// The check (callout `token`) is in flight; the request is held.
    Checking { spend: Spend, token: u32 },
    /// Admitted (by the service, or by `failure_mode: allow`): its usage is charged.
    Admitted {
        spend: Spend,
        quota: Option<Quota>,
        money: Option<Box<MoneyQuota>>,
        response: Option<Box<Response>>,
        /// Under `reserve.trim`: the output cap per choice what was taken pays for (written
        /// into the request), and whether the service granted less than the whole.
        cap: Option<(u64, bool)>,
        /// The shadow limits that would have denied it, for `x-ratelimit-shadow-denied`.
        shadow: Option<String>,
    },
}

/// What an admitted request is charged against.
struct Spend {
    descriptors: Vec<Descriptor>,
    /// What the check asked the service to take at admission.
    reserved: Amount,
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
    /// A limit in money applies: the request is priced (by `model`, unless the response
    /// names another).
    priced: bool,
    /// The check may be trimmed (`reserve.trim`): how a grant becomes a cap, and the least
    /// the service takes (what an unseen answer's release gives back).
    trim: Option<(TrimPlan, Amount)>,
    /// Admitted under this quota lease (its id), not by a check.
    lease: Option<String>,
    /// The model the request named, when the plugin read it (the spend ledger's breakdown).
    model: Option<String>,
}

impl Spend {
    /// What this request cost, for the report queue (`cost`: in micro units, for the limits
    /// in money); `None` when there is nothing to settle.
    /// `answered`: the model the response named, which the ledger prefers to the request's.
    fn spent(self, charge: &Charge, cost: u64, answered: Option<&str>) -> Option<Spent> {
        // Held to the wire's bound: a lying upstream cannot make a report the service refuses.
        let used = Amount::new(charge.tokens, cost);
        if used.is_zero() && self.reserved.is_zero() {
            return None;
        }
        Some(Spent {
            descriptors: self.descriptors,
            used,
            reserved: self.reserved,
            reserved_at_ms: self.reserved_at_ms,
            release: if self.release { self.id } else { None },
            usage: charge.usage.into(),
            lease: self.lease,
            request: true,
            // A name the wire would refuse (a report with it would be lost) is left out.
            model: answered
                .map(str::to_string)
                .or(self.model)
                .filter(|m| m.len() <= wire::MAX_ID),
        })
    }

    /// A reservation whose answer was never seen: released by its report, in the window its
    /// check left in (by the service's clock: `offset_ms` from this VM's).
    /// A trimmed check's release gives back only the least the service takes: what it took
    /// may be less than the whole, and giving back more would undo others' spending.
    fn unseen(self, offset_ms: i64) -> Spend {
        Spend {
            release: self.id.is_some(),
            reserved: self.trim.map_or(self.reserved, |(_, least)| least),
            reserved_at_ms: Some(
                (self.dispatched_ms as i64).saturating_add(offset_ms).max(0) as u64
            ),
            ..self
        }
    }

    /// The release of a reservation whose request will never be charged.
    fn release(self) -> Option<Spent> {
        if !self.release || self.reserved.is_zero() {
            return None;
        }
        let nothing = Charge {
            tokens: 0,
            usage: Default::default(),
            basis: Basis::UpstreamError,
        };
        let mut spent = self.spent(&nothing, 0, None)?;
        spent.request = false;
        Some(spent)
    }
}

/// What a check asks of the VM: an id for a reservation a report may have to release, and
/// admission under the VM's quota leases. A closure that makes ids admits under no lease.
pub trait Admission {
    fn next_id(&mut self) -> Option<String>;

    /// Admits a request under a lease of its descriptors that covers `reserve`; `None`: check.
    fn lease(
        &mut self,
        _descriptors: &[Descriptor],
        _reserve: Amount,
        _now_ms: u64,
    ) -> Option<Local> {
        None
    }
}

impl<F: FnMut() -> Option<String>> Admission for F {
    fn next_id(&mut self) -> Option<String> {
        self()
    }
}

/// One exchange: see the module documentation.
pub struct Exchange {
    state: State,
    /// The request body's size, for estimating the prompt when usage is missing.
    request_bytes: Option<u64>,
    /// The plugin rewrote the request to ask for usage in the stream.
    injected: bool,
    /// The request had a body the plugin could not read: it is charged at least the estimate.
    unreadable_body: bool,
    /// The size of the request body held (as edited), for a rewrite after the check.
    held: Option<usize>,
    /// What the request asked of a stream: how many choices, and usage in it.
    asked: StreamAsk,
    events: Vec<Event>,
}

/// What a streaming request asked for, for the end of a stream the plugin cuts.
#[derive(Debug, Clone, Copy)]
struct StreamAsk {
    choices: u32,
    usage: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            state: State::Passthrough,
            request_bytes: None,
            injected: false,
            unreadable_body: false,
            held: None,
            asked: StreamAsk {
                choices: 1,
                usage: false,
            },
            events: Vec::new(),
        }
    }
}

/// The request's path, normalised; empty when it has none.
fn request_path(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map(|(_, p)| normalize_path(p).into_owned())
        .unwrap_or_default()
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Exchange {
    /// What happened since the last call, for the metrics.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether the request was admitted: its response is scanned and it is charged.
    pub fn admitted(&self) -> bool {
        matches!(self.state, State::Admitted { .. })
    }

    /// A matched request's headers (those its configuration reads): check now, or wait for
    /// its body.
    pub fn request_headers(
        &mut self,
        config: &Config,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
    ) -> OnHeaders {
        self.events.push(Event::Matched);
        self.request_bytes = header(&headers, "content-length").and_then(|v| v.trim().parse().ok());
        let inject = config.inject_stream_usage
            && !end_of_stream
            && may_need_stream_usage(header(&headers, ":method"), header(&headers, ":path"));
        if (config.needs_request_body() || inject) && !end_of_stream {
            self.state = State::AwaitingBody { headers, inject };
            return OnHeaders::WaitForBody {
                drop_content_length: inject || config.write_cap || config.trim_min.is_some(),
            };
        }
        self.state = State::Matched { headers };
        OnHeaders::Check
    }

    /// A chunk of the request body arrived (`size`: the body so far).
    pub fn request_body(&mut self, config: &Config, size: usize, end_of_stream: bool) -> OnBody {
        match &self.state {
            State::AwaitingBody { .. } => {}
            State::Checking { .. } | State::Dispatching { .. } => return OnBody::Pause,
            _ => return OnBody::Continue,
        }
        let too_large = size > config.max_request_body_bytes;
        // The body's size so far (a chunked body states none): the prompt's estimate, even for
        // a body the plugin will not read.
        self.request_bytes = Some(self.request_bytes.unwrap_or(0).max(size as u64));
        if !end_of_stream && !too_large {
            return OnBody::Pause;
        }
        OnBody::Read {
            size: (!too_large).then_some(size),
        }
    }

    /// The request's trailers: a body still awaited ends here, unread. `Some`: what to do
    /// about the check that follows.
    pub fn request_trailers(&mut self) -> Option<bool> {
        match &self.state {
            State::AwaitingBody { headers, .. } => {
                self.events.push(Event::BodyUnreadable);
                self.unreadable_body = true;
                self.state = State::Matched {
                    headers: headers.clone(),
                };
                Some(true)
            }
            State::Checking { .. } | State::Dispatching { .. } => Some(false),
            _ => None,
        }
    }

    /// Decides the check of a request whose body (if awaited) arrived: `body` is what was
    /// read (`None`: none, too large, or ended by trailers), `size` its size as buffered.
    /// `vm` gives check ids (for a reservation a report may have to release) and, under
    /// `service.admission: lease`, admits under the VM's leases.
    pub fn check(
        &mut self,
        config: &Config,
        properties: &impl Properties,
        body: Option<(&[u8], usize)>,
        mut vm: impl Admission,
        now_ms: u64,
    ) -> (Check, Option<BodyEdit>) {
        let (headers, inject, awaited) =
            match std::mem::replace(&mut self.state, State::Passthrough) {
                State::AwaitingBody { headers, inject } => (headers, inject, true),
                State::Matched { headers } => (headers, false, false),
                other => {
                    self.state = other;
                    return (Check::Continue, None);
                }
            };
        let facts = body.and_then(|(bytes, _)| BodyFacts::parse(bytes));
        if let Some(f) = &facts {
            self.asked = StreamAsk {
                choices: f.streamed_choices(),
                usage: f.asks_for_usage(),
            };
        }
        let read = match (&facts, awaited || self.unreadable_body) {
            (Some(facts), _) => RequestBody::Read(facts),
            (None, true) => {
                if !self.unreadable_body {
                    self.events.push(Event::BodyUnreadable);
                    self.unreadable_body = true;
                }
                RequestBody::Unreadable
            }
            (None, false) => RequestBody::Absent,
        };
        let view = RequestView {
            headers: &headers,
            body: read,
            client_ip: &config.client_ip,
            client_ip_prefixes: config.client_ip_prefixes,
            consumer_header: &config.consumer_header,
            properties,
        };
        let mut descriptors = descriptors(&config.limits, &view);
        let path = request_path(&headers);
        let api = Api::of(&path);
        // Read once: prices, denials and the spend ledger all name it.
        let model = path_model(&path)
            .map(str::to_string)
            .or_else(|| facts.as_ref().and_then(|f| f.model.clone()));
        // Only shadow limits count money and the model has no price: they cannot count this
        // request, and never refuse it.
        let money = descriptors.iter().filter(|d| d.currency.is_some());
        if let Some(prices) = &config.prices {
            if money.clone().count() > 0
                && money.clone().all(|d| d.shadow)
                && prices.price(None, model.as_deref()).is_none()
            {
                self.events.push(Event::Unpriced);
                descriptors.retain(|d| d.currency.is_none());
            }
        }
        let held = body.map(|(bytes, size)| (bytes, size, inject));
        self.held = body.map(|(_, size)| size);
        if descriptors.is_empty() {
            self.events.push(Event::Unlimited);
            // Usage is still asked for: a limit that does not apply now may on the response's
            // model, and the client's stream is unchanged either way.
            let edit = self.edit(config, api, facts.as_ref(), held, None);
            return (Check::Continue, edit);
        }
        let rule = Rule {
            wanted: config.reserve,
            max: config.reserve_max,
            default: config.reserve_default,
        };
        let asked = facts.as_ref().map(|facts| (facts, api));
        let reservation = reserve(rule, config.service.protocol, asked, &descriptors);
        let mut reserve = Amount::tokens(reservation.tokens);
        let cap =
            (config.write_cap && reservation.per_choice > 0).then_some(reservation.per_choice);
        let edit = self.edit(config, api, facts.as_ref(), held, cap);
        // `reserve.trim`: the reservation pays for the whole request, and may be granted less.
        let mut trimmed = config.trim_min.and_then(|min| {
            let prompt = prompt_tokens(self.request_bytes);
            trim(rule, asked, config.count, prompt, min)
        });
        // A limit in money: the request's model must have a price (or `unknown_model` one).
        let (mut priced, mut prompt_micros) = (false, 0);
        if let Some(prices) = config
            .prices
            .as_ref()
            .filter(|_| descriptors.iter().any(|d| d.currency.is_some()))
        {
            let Some(price) = prices.price(None, model.as_deref()) else {
                self.events.push(Event::Unpriced);
                return (Check::Reply(reply::unpriced(model.as_deref())), edit);
            };
            // Trimmed: the whole cost, unless so large it no longer prices a grant in
            // proportion (then the request reserves as untrimmed ones do).
            let whole = full_cost(&price, rule, asked, self.request_bytes);
            if whole >= wire::MAX_AMOUNT {
                trimmed = None;
            }
            reserve.micros = match trimmed {
                Some(_) => whole,
                None => reserve_cost(&price, rule, asked, self.request_bytes, &descriptors),
            };
            prompt_micros = prompt_cost(&price, self.request_bytes).min(reserve.micros);
            priced = true;
        }
        let trim = trimmed.map(|t| {
            reserve.tokens = t.tokens;
            wire::Trim {
                min: t.min,
                fixed: Amount::new(t.plan.fixed, prompt_micros),
            }
        });
        // Under a quota lease that covers it: admitted here, its reservation taken from the
        // lease (a trimmed request is checked: the service decides its grant).
        let leased = (config.service.leases && trim.is_none())
            .then(|| vm.lease(&descriptors, reserve, now_ms))
            .flatten();
        if let Some(local) = leased {
            self.events.push(Event::Leased);
            self.state = State::Admitted {
                spend: Spend {
                    descriptors,
                    reserved: reserve,
                    reserved_at_ms: Some(local.reserved_at_ms),
                    id: None,
                    release: false,
                    dispatched_ms: now_ms,
                    api,
                    priced,
                    trim: None,
                    lease: Some(local.lease),
                    model,
                },
                quota: local.figures.quota,
                money: local.figures.money.map(Box::new),
                response: None,
                cap: None,
                shadow: None,
            };
            return (Check::Continue, edit);
        }
        // A reservation may need releasing later: its check carries the id its report will.
        let wire = config.service.protocol.wire();
        let id = (!reserve.is_zero() && wire.releases())
            .then(|| vm.next_id())
            .flatten();
        let call = wire.check_call(
            &config.service,
            &descriptors,
            reserve,
            trim.as_ref(),
            id.as_deref(),
        );
        self.state = State::Dispatching {
            spend: Spend {
                descriptors,
                reserved: reserve,
                reserved_at_ms: None,
                id,
                release: false,
                dispatched_ms: now_ms,
                api,
                priced,
                trim: trimmed
                    .zip(trim)
                    .map(|(t, w)| (t.plan, Amount::new(w.min, w.cost(reserve, w.min)))),
                lease: None,
                model,
            },
        };
        (Check::Dispatch(call), edit)
    }

    /// The plugin's edits to the held request body: usage asked for in the stream, and the
    /// output cap per choice (`cap`, under `reserve.write_cap`) written where the API reads
    /// it. The shell puts them in place before the request resumes.
    fn edit(
        &self,
        config: &Config,
        api: Api,
        facts: Option<&BodyFacts>,
        held: Option<(&[u8], usize, bool)>,
        cap: Option<u64>,
    ) -> Option<BodyEdit> {
        let ((bytes, size, inject), facts) = (held?, facts?);
        let edits = Edits {
            stream_usage: inject && config.inject_stream_usage && facts.needs_stream_usage(),
            cap: cap.map(|c| (c, api)),
        };
        let body = body::rewrite(bytes, facts, edits)?;
        Some(BodyEdit {
            body,
            size,
            stream_usage: edits.stream_usage,
            cap: edits.cap.is_some(),
        })
    }

    /// The held body with the cap a trimmed check granted written in, for the shell to put in
    /// place; `None` when there is none or the body cannot be read.
    pub fn trimmed_body(&mut self, body: &[u8]) -> Option<BodyEdit> {
        let State::Admitted {
            spend,
            cap: Some((cap, _)),
            ..
        } = &self.state
        else {
            return None;
        };
        let facts = BodyFacts::parse(body)?;
        let edits = Edits {
            stream_usage: false,
            cap: Some((*cap, spend.api)),
        };
        Some(BodyEdit {
            body: body::rewrite(body, &facts, edits)?,
            size: self.held?,
            stream_usage: false,
            cap: true,
        })
    }

    /// The size of the request body held, as the plugin last set it.
    pub fn held(&self) -> Option<usize> {
        self.held
    }

    /// The shell put `edit` in place.
    pub fn edited(&mut self, edit: &BodyEdit) {
        self.held = Some(edit.body.len());
        if edit.stream_usage {
            self.events.push(Event::StreamUsageInjected);
            self.injected = true;
        }
        if edit.cap {
            self.events.push(Event::CapWritten);
        }
    }

    /// The check left as callout `token`.
    pub fn dispatched(&mut self, token: u32) {
        if let State::Dispatching { spend } = std::mem::replace(&mut self.state, State::Passthrough)
        {
            self.state = State::Checking { spend, token };
        }
    }

    /// Whether callout `token` is this exchange's check; an answer for any other is counted.
    pub fn awaits(&mut self, token: u32) -> bool {
        let ours = matches!(self.state, State::Checking { token: t, .. } if t == token);
        if !ours {
            self.events.push(Event::CalloutUnknown);
        }
        ours
    }

    /// The check's answer (`status`: HTTP, or gRPC for envoy-rls), at `now_ms`.
    pub fn answered(
        &mut self,
        config: &Config,
        status: Option<u32>,
        body: &[u8],
        now_ms: u64,
        offset_ms: i64,
    ) -> Resolution {
        let State::Checking { mut spend, .. } =
            std::mem::replace(&mut self.state, State::Passthrough)
        else {
            return Resolution::default();
        };
        let mut verdict = config.service.protocol.wire().read_check(status, body);
        // A service that does not know shadow limits (an older one) may deny by one: the
        // request is admitted, nothing was taken, and its figures are not this request's.
        if let Ok(v) = verdict.as_mut() {
            let shadow = |n: &String| config.limits.iter().any(|l| l.shadow && &l.name == n);
            if let Some(name) = v.denied_by.clone().filter(|n| !v.allowed && shadow(n)) {
                v.allowed = true;
                v.shadow_denied.push(name);
                (v.quota, v.spend, v.reserved_at_ms, v.granted) = (None, None, None, None);
                spend.reserved = Amount::ZERO;
            }
        }
        let service_time_ms = verdict.as_ref().ok().and_then(|v| v.reserved_at_ms);
        let mut resolution = match verdict {
            Ok(verdict) if verdict.allowed => {
                self.events.push(Event::Allowed);
                let mut spend = Spend {
                    reserved_at_ms: verdict.reserved_at_ms,
                    ..spend
                };
                // Trimmed: what was taken is what the report settles against, and its cap is
                // written into the request (a whole reserve's cap too: the client's, or the
                // default when it named none).
                if let Some(taken) = verdict.granted.filter(|_| spend.trim.is_some()) {
                    self.events.push(Event::Trimmed);
                    spend.reserved = taken;
                }
                let cap = spend.trim.map(|(plan, _)| {
                    let trimmed = verdict.granted.is_some();
                    (plan.cap(spend.reserved.tokens), trimmed)
                });
                // Shadow limits never deny: a request they would have denied is marked (with
                // the names of this configuration's shadow limits only: they go in a header).
                let shadow_denied: Vec<&str> = config
                    .limits
                    .iter()
                    .filter(|l| l.shadow && verdict.shadow_denied.contains(&l.name))
                    .map(|l| l.name.as_str())
                    .collect();
                let shadow = (!shadow_denied.is_empty()).then(|| {
                    self.events.push(Event::ShadowDenied);
                    let names = shadow_denied.join(",");
                    log::info!("admitted a request shadow limits would have denied: {names}");
                    names
                });
                self.state = State::Admitted {
                    spend,
                    quota: verdict.quota,
                    money: verdict.spend.map(Box::new),
                    response: None,
                    cap,
                    shadow,
                };
                Resolution {
                    resume: true,
                    rewrite: cap.is_some(),
                    ..Resolution::default()
                }
            }
            Ok(mut verdict) => {
                self.events.push(Event::Denied);
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
                Resolution {
                    reply: Some(reply::denied(config, &verdict, spend.api, now_ms)),
                    ..Resolution::default()
                }
            }
            Err(CheckFailure::Rejected) => {
                log::error!(
                    "the rate-limit service refused the check as malformed (status {status:?}): {}; the request is refused",
                    protocol::error_message(body)
                );
                self.fail(config, spend, CheckFailure::Rejected, offset_ms)
            }
            Err(kind) => {
                log::warn!(
                    "rate-limit check failed ({}): status {status:?}",
                    kind.name()
                );
                self.fail(config, spend, kind, offset_ms)
            }
        };
        resolution.service_time_ms = service_time_ms;
        resolution
    }

    /// The check could not leave (`kind`): `failure_mode` applies.
    pub fn failed(&mut self, config: &Config, kind: CheckFailure, offset_ms: i64) -> Resolution {
        let spend = match std::mem::replace(&mut self.state, State::Passthrough) {
            State::Dispatching { spend } | State::Checking { spend, .. } => spend,
            other => {
                self.state = other;
                return Resolution::default();
            }
        };
        self.fail(config, spend, kind, offset_ms)
    }

    /// Applies `failure_mode` to a failed check. A request let through is still charged; a
    /// reservation the service may have taken unseen is released by the report (or, for a
    /// refused request, by a report of its own), so it is neither lost nor charged twice. A
    /// check the service refused as malformed is a contract bug: always refused.
    fn fail(
        &mut self,
        config: &Config,
        spend: Spend,
        kind: CheckFailure,
        offset: i64,
    ) -> Resolution {
        self.events.push(Event::CheckFailed(kind));
        let spend = if kind.after_dispatch() && spend.id.is_some() {
            spend.unseen(offset)
        } else {
            Spend {
                reserved: Amount::ZERO,
                ..spend
            }
        };
        // Shadow limits alone never refuse a request, the service's failure included.
        let mode = if spend.descriptors.iter().all(|d| d.shadow) {
            Some(FailureMode::Allow)
        } else {
            match kind {
                CheckFailure::Rejected => None,
                _ => Some(config.service.failure_mode),
            }
        };
        match mode {
            Some(FailureMode::Allow) => {
                self.events.push(Event::FailureAllowed);
                self.state = State::Admitted {
                    spend,
                    quota: None,
                    money: None,
                    response: None,
                    cap: None,
                    shadow: None,
                };
                Resolution {
                    resume: true,
                    ..Resolution::default()
                }
            }
            Some(FailureMode::Deny) | None => {
                if mode.is_some() {
                    self.events.push(Event::FailureDenied);
                }
                Resolution {
                    reply: Some(reply::unavailable(config)),
                    report: spend.release(),
                    ..Resolution::default()
                }
            }
        }
    }

    /// The response's head of an admitted request: the quota headers it gets, and whether
    /// its body is scanned (and stripped).
    pub fn response_headers(&mut self, config: &Config, head: ResponseHead) -> ResponsePlan {
        let State::Admitted {
            spend,
            quota,
            money,
            response,
            cap,
            shadow,
        } = &mut self.state
        else {
            return ResponsePlan::default();
        };
        let mut plan = ResponsePlan::default();
        if let Some(names) = shadow.take() {
            plan.set_headers.push(("x-ratelimit-shadow-denied", names));
        }
        if let Some((cap, true)) = cap {
            plan.set_headers
                .push(("x-ratelimit-granted-tokens", cap.to_string()));
        }
        if config.quota_headers {
            if let Some(q) = quota {
                plan.set_headers
                    .extend(reply::quota_headers(q, config.higress_headers));
            }
            if let Some(m) = money {
                plan.set_headers.extend(reply::cost_headers(m));
            }
        }
        let ok = (200..300).contains(&head.status);
        let scanner = ok.then(|| UsageScanner::new(head.encoding.as_deref()));
        let plain = !is_encoded(head.encoding.as_deref());
        let stripper = (ok && self.injected && head.event_stream && plain).then(Stripper::new);
        // What the stream may cost: what the check took for it plus what it reported left.
        // Only a stream labelled as one is cut (its length then changes).
        let watched = (config.stream_cutoff || spend.trim.is_some())
            && config.count != Count::Prompt
            && ok
            && head.event_stream
            && plain;
        let cutoff = watched.then(|| {
            let allowance = Allowance {
                tokens: quota.as_ref().map_or(u64::MAX, |q| {
                    q.remaining.saturating_add(spend.reserved.tokens)
                }),
                micros: money.as_ref().map_or(u64::MAX, |m| {
                    m.remaining.saturating_add(spend.reserved.micros)
                }),
            };
            Cutoff::new(spend.api, allowance, config.stream_drain_ms)
                .map(|c| c.with_choices(self.asked.choices))
        });
        plan.drop_content_length =
            stripper.is_some() || cutoff.as_ref().is_some_and(Option::is_some);
        *response = Some(Box::new(Response::new(
            head.status,
            scanner,
            stripper,
            head.end_of_stream,
            head.tier.filter(|t| t.len() <= 64),
            cutoff.flatten(),
        )));
        plan
    }

    /// How the shell handles the next response body chunk, arriving at `now_ms`.
    pub fn response_chunk(&mut self, now_ms: u64) -> OnChunk {
        let State::Admitted {
            response: Some(r), ..
        } = &mut self.state
        else {
            return OnChunk::Pass;
        };
        let on = r.on_chunk(now_ms);
        if on == (OnChunk::Drop { reset: true }) {
            self.events.push(Event::StreamReset);
        }
        on
    }

    /// One slice of a response body chunk ([`OnChunk::Read`], [`OnChunk::Rewrite`]). With
    /// `out` (rewriting), what the client gets for it is written there; without, an end of
    /// the stream is answered: the bytes of the slice to keep, and the end to put after them.
    pub fn response_slice(
        &mut self,
        config: &Config,
        slice: &[u8],
        now_ms: u64,
        out: Option<&mut Vec<u8>>,
    ) -> Option<(usize, Vec<u8>)> {
        let (request_bytes, unreadable, asked) =
            (self.request_bytes, self.unreadable_body, self.asked);
        let State::Admitted {
            spend,
            response: Some(r),
            ..
        } = &mut self.state
        else {
            return None;
        };
        let allowance = r.cutoff.as_ref().map(Cutoff::allowance);
        // The tier is read only to price a watched stream.
        let (status, tier) = (r.status, r.cutoff.as_ref().and(r.tier_header.clone()));
        let seen = r.see(slice, now_ms, |scanner| {
            // Priced as the stream would be charged if it ended here (the prompt as reported,
            // else estimated from the body's size), so a cut stream's charge is bounded.
            let held = request_bytes;
            let (charge, cost) = charge(
                config,
                spend,
                scanner,
                status,
                tier.as_deref(),
                held,
                unreadable,
                false,
            );
            allowance.is_some_and(|a| a.passed_by(charge.tokens, cost))
        });
        let keep = match seen {
            Slice::Dropped => return None,
            Slice::Pass => slice.len(),
            Slice::End { keep } => keep,
        };
        let ending = match (seen, r.scanner.as_ref()) {
            (Slice::End { .. }, Some(scanner)) => {
                self.events.push(Event::StreamCut);
                let (charge, _) = charge(
                    config,
                    spend,
                    scanner,
                    status,
                    tier.as_deref(),
                    request_bytes,
                    unreadable,
                    false,
                );
                let request_model = spend.model.as_deref().filter(|_| spend.priced);
                let ending = Ending {
                    model: scanner
                        .model()
                        .or(request_model)
                        .unwrap_or_default()
                        .to_string(),
                    id: scanner.response_id().map(str::to_string),
                    usage: charge.usage,
                    choices: asked.choices,
                    usage_chunk: asked.usage,
                    events: scanner.events(),
                    created_s: now_ms / 1000,
                };
                r.cutoff.as_ref().map(|c| c.ending(&ending))
            }
            _ => None,
        };
        let Some(out) = out else {
            return ending.map(|e| (keep, e));
        };
        let kept = slice.get(..keep).unwrap_or(slice);
        match r.stripper.as_mut() {
            Some(stripper) => stripper.feed(kept, out),
            None => out.extend_from_slice(kept),
        }
        if let Some(ending) = ending {
            if let Some(stripper) = r.stripper.as_mut() {
                stripper.finish(out);
            }
            out.extend_from_slice(&ending);
        }
        None
    }

    /// The last chunk of a rewritten body: what the stripper still holds goes to `out`.
    pub fn response_flush(&mut self, out: &mut Vec<u8>) {
        if let State::Admitted {
            response: Some(r), ..
        } = &mut self.state
        {
            if let Some(stripper) = r.stripper.as_mut() {
                stripper.finish(out);
            }
        }
    }

    /// The response ended (its last chunk, or trailers).
    pub fn response_end(&mut self) {
        if let State::Admitted {
            response: Some(r), ..
        } = &mut self.state
        {
            r.end();
        }
    }

    /// The stream is over, normally or not: what it cost, for the report queue.
    pub fn finish(&mut self, config: &Config, offset_ms: i64) -> Option<Spent> {
        let (spend, response) = match std::mem::replace(&mut self.state, State::Passthrough) {
            State::Admitted {
                spend, response, ..
            } => (spend, response),
            // Gone while its check was in flight: nobody will hear the answer, so a
            // reservation the service may have taken is released.
            State::Checking { spend, .. } => return spend.unseen(offset_ms).release(),
            _ => return None,
        };
        let (charge, cost) = match response.as_deref() {
            Some(r) => match &r.scanner {
                Some(scanner) => {
                    let (status, tier) = (r.status, r.tier_header.as_deref());
                    let complete = r.complete;
                    let bytes = self.request_bytes;
                    let unreadable = self.unreadable_body;
                    charge(
                        config, &spend, scanner, status, tier, bytes, unreadable, complete,
                    )
                }
                // A status other than 2xx: its body was not read.
                None => {
                    let seen = Observed {
                        status: Some(r.status),
                        ..Observed::default()
                    };
                    (settle(config.count, config.on_missing, &seen), 0)
                }
            },
            // Admitted and gone before any response: the upstream may bill it all the same.
            None => {
                let charge = abandoned(config.count, self.request_bytes, spend.reserved.tokens);
                let cost = price(config, &spend, None, None, &charge);
                (charge, cost)
            }
        };
        self.events.push(Event::Charged(charge.basis));
        let answered = response
            .as_deref()
            .and_then(|r| r.scanner.as_ref())
            .and_then(|s| s.model());
        spend.spent(&charge, cost, answered)
    }
}

/// What a response is charged as far as it was seen (`complete`: to its end), in tokens and
/// in micro units.
#[allow(clippy::too_many_arguments)]
fn charge(
    config: &Config,
    spend: &Spend,
    scanner: &UsageScanner,
    status: u32,
    tier: Option<&str>,
    request_bytes: Option<u64>,
    unreadable_body: bool,
    complete: bool,
) -> (Charge, u64) {
    let seen = scanner.observed(status, complete, request_bytes);
    // A body the plugin could not read is never free: without usage, the estimate.
    let on_missing = if unreadable_body {
        OnMissing::Estimate
    } else {
        config.on_missing
    };
    let charge = settle(config.count, on_missing, &seen);
    let cost = price(config, spend, Some(scanner), tier, &charge);
    (charge, cost)
}

/// What `charge` costs, in micro units: priced by the model the response names when the table
/// lists it, else the request's; 0 without a limit in money.
fn price(
    config: &Config,
    spend: &Spend,
    scanner: Option<&UsageScanner>,
    tier_header: Option<&str>,
    charge: &Charge,
) -> u64 {
    let Some(prices) = config.prices.as_ref().filter(|_| spend.priced) else {
        return 0;
    };
    let answered = scanner.and_then(UsageScanner::model);
    let tier = scanner.and_then(UsageScanner::service_tier).or(tier_header);
    prices
        .price(answered, spend.model.as_deref())
        .map_or(0, |price| prices.at_tier(price.cost(&charge.usage), tier))
}

#[cfg(test)]
mod tests {
    //! The exchange on its own, with plain values: no proxy, no fake host.

    use super::*;
    use serde_json::json;

    struct NoProperties;

    impl Properties for NoProperties {
        fn property(&self, _: &[&str]) -> Option<String> {
            None
        }
    }

    fn config(extra: serde_json::Value) -> Config {
        let mut c = json!({
            "service": {"cluster": "rl"},
            "limits": [{"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"}]
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Config::parse(c.to_string().as_bytes()).unwrap()
    }

    fn headers(user: &str) -> Vec<(String, String)> {
        [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("x-user", user),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Headers without a body, and the check sent as callout 7.
    fn checking(config: &Config, user: &str) -> Exchange {
        let mut x = Exchange::default();
        let on = x.request_headers(config, headers(user), true);
        assert_eq!(on, OnHeaders::Check);
        let (check, edit) = x.check(config, &NoProperties, None, || Some("id-1".into()), 1000);
        assert!(matches!(check, Check::Dispatch(_)), "{check:?}");
        assert_eq!(edit, None);
        x.dispatched(7);
        assert!(x.awaits(7));
        x
    }

    fn allowed() -> Vec<u8> {
        json!({"allowed": true, "limits": [{"limit": "user", "value": "ann", "tokens": 1000,
               "window_s": 3600, "remaining": 950, "reset_ms": 1000}], "reserved_at_ms": 5000})
        .to_string()
        .into_bytes()
    }

    fn respond(x: &mut Exchange, config: &Config, body: &[u8]) -> ResponsePlan {
        let plan = x.response_headers(
            config,
            ResponseHead {
                status: 200,
                ..ResponseHead::default()
            },
        );
        if x.response_chunk(0) == OnChunk::Read {
            assert_eq!(x.response_slice(config, body, 0, None), None);
        }
        x.response_end();
        plan
    }

    #[test]
    fn an_admitted_request_is_charged_its_usage() {
        let c = config(json!({}));
        let mut x = checking(&c, "ann");
        let r = x.answered(&c, Some(200), &allowed(), 1000, 0);
        assert!(r.resume && r.reply.is_none());
        assert_eq!(r.service_time_ms, Some(5000));
        let plan = respond(
            &mut x,
            &c,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert!(plan
            .set_headers
            .contains(&("x-ratelimit-remaining-tokens", "950".to_string())));
        let spent = x.finish(&c, 0).unwrap();
        assert_eq!(
            (
                spent.used.tokens,
                spent.reserved.tokens,
                spent.reserved_at_ms
            ),
            (7, 0, Some(5000))
        );
        assert_eq!(spent.descriptors[0].value, "ann");
        let events = x.take_events();
        assert!(events.contains(&Event::Allowed));
        assert!(events.contains(&Event::Charged(Basis::Reported)));
    }

    #[test]
    fn a_denial_is_answered_in_the_api_s_shape_and_charges_nothing() {
        let c = config(json!({}));
        let mut x = checking(&c, "ann");
        let denied =
            json!({"allowed": false, "limits": [], "retry_after_ms": 2000, "denied_by": "user"});
        let r = x.answered(&c, Some(200), denied.to_string().as_bytes(), 1000, 0);
        let reply = r.reply.unwrap();
        assert!(!r.resume);
        assert_eq!(reply.status, 429);
        assert!(reply.headers.contains(&("retry-after".into(), "2".into())));
        assert_eq!(x.finish(&c, 0), None);
        assert!(x.take_events().contains(&Event::Denied));
    }

    /// A check that timed out: `failure_mode: allow` lets the request through, charged, and
    /// its report releases the reservation the service may have taken unseen (in the window its
    /// check left in, by the service's clock).
    #[test]
    fn a_failed_check_follows_the_failure_mode_and_releases_what_it_may_have_taken() {
        let c = config(json!({"reserve": {"tokens": 100}}));
        let mut x = checking(&c, "ann");
        let r = x.answered(&c, Some(504), b"", 2000, 300);
        assert!(r.resume);
        respond(&mut x, &c, br#"{"usage":{"total_tokens":40}}"#);
        let spent = x.finish(&c, 300).unwrap();
        assert_eq!(spent.release.as_deref(), Some("id-1"));
        assert_eq!(
            (spent.reserved.tokens, spent.reserved_at_ms),
            (100, Some(1300))
        );
        let events = x.take_events();
        assert!(events.contains(&Event::CheckFailed(CheckFailure::Timeout)));
        assert!(events.contains(&Event::FailureAllowed));

        let c = config(
            json!({"reserve": {"tokens": 100}, "service": {"cluster": "rl", "failure_mode": "deny"}}),
        );
        let mut x = checking(&c, "ann");
        let r = x.answered(&c, Some(503), b"", 2000, 0);
        assert_eq!(r.reply.map(|r| r.status), Some(503));
        assert_eq!(r.report.and_then(|s| s.release), Some("id-1".into()));
    }

    #[test]
    fn a_stream_gone_during_its_check_releases_its_reservation() {
        let c = config(json!({"reserve": {"tokens": 100}}));
        let mut x = checking(&c, "ann");
        let spent = x.finish(&c, 50).unwrap();
        assert_eq!(
            (spent.used, spent.reserved),
            (Amount::ZERO, Amount::tokens(100))
        );
        assert_eq!(spent.release.as_deref(), Some("id-1"));
        assert_eq!(spent.reserved_at_ms, Some(1050));
    }

    /// A streamed chat request is rewritten to ask for usage; its stream is then stripped of
    /// the usage chunk the client did not ask for.
    #[test]
    fn a_stream_asks_for_usage_and_the_answer_loses_it_again() {
        let c = config(json!({}));
        let mut x = Exchange::default();
        let on = x.request_headers(&c, headers("ann"), false);
        assert_eq!(
            on,
            OnHeaders::WaitForBody {
                drop_content_length: true
            }
        );
        let body = br#"{"model":"m","stream":true}"#;
        assert_eq!(
            x.request_body(&c, body.len(), true),
            OnBody::Read {
                size: Some(body.len())
            }
        );
        let (check, edit) = x.check(&c, &NoProperties, Some((body, body.len())), || None, 0);
        assert!(matches!(check, Check::Dispatch(_)));
        let edit = edit.unwrap();
        assert!(String::from_utf8_lossy(&edit.body).contains("include_usage"));
        x.edited(&edit);
        x.dispatched(1);
        x.answered(&c, Some(200), &allowed(), 0, 0);
        // `identity` is no encoding: the stream is read and stripped as a plain one.
        let plan = x.response_headers(
            &c,
            ResponseHead {
                status: 200,
                event_stream: true,
                encoding: Some(" Identity ".into()),
                ..ResponseHead::default()
            },
        );
        assert!(
            plan.drop_content_length,
            "the stripped stream changes length"
        );
        assert_eq!(x.response_chunk(0), OnChunk::Rewrite);
    }

    /// `reserve.trim`: the check reserves the prompt's estimate and the whole cap, a grant of
    /// less becomes the cap written into the held body and a response header, and the report
    /// settles against what was taken.
    #[test]
    fn a_trimmed_grant_becomes_the_cap() {
        let c = config(json!({"reserve": {"tokens": "max_tokens", "trim": true, "min": 50}}));
        let mut x = Exchange::default();
        x.request_headers(&c, headers("ann"), false);
        // 400 bytes: a prompt of 100 tokens; a cap of 1,000.
        let body = format!(
            r#"{{"model":"m","max_tokens":1000,"messages":"{}"}}"#,
            "x".repeat(355)
        );
        let body = body.as_bytes();
        assert_eq!(body.len(), 400);
        x.request_body(&c, body.len(), true);
        let (check, _) = x.check(&c, &NoProperties, Some((body, body.len())), || None, 0);
        let Check::Dispatch(protocol::Outbound::Http(call)) = check else {
            panic!("{check:?}")
        };
        let sent: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(sent["reserve"], 1100);
        assert_eq!(sent["trim"], json!({"min": 150, "fixed": {"tokens": 100}}));
        x.dispatched(1);
        let granted = json!({"allowed": true, "granted": {"tokens": 400}, "reserved_at_ms": 5});
        let r = x.answered(&c, Some(200), granted.to_string().as_bytes(), 0, 0);
        assert!(r.resume && r.rewrite);
        assert!(x.take_events().contains(&Event::Trimmed));
        let edit = x.trimmed_body(body).unwrap();
        let written: serde_json::Value = serde_json::from_slice(&edit.body).unwrap();
        assert_eq!(written["max_tokens"], 300);
        assert_eq!(edit.size, 400);
        let plan = respond(&mut x, &c, br#"{"usage":{"total_tokens":350}}"#);
        assert!(plan
            .set_headers
            .contains(&("x-ratelimit-granted-tokens", "300".to_string())));
        let spent = x.finish(&c, 0).unwrap();
        assert_eq!(
            (spent.used, spent.reserved),
            (Amount::tokens(350), Amount::tokens(400))
        );

        // Gone while its trimmed check was in flight: the release gives back only the least
        // the service takes, never more than it took.
        let mut x = Exchange::default();
        x.request_headers(&c, headers("ann"), false);
        x.request_body(&c, body.len(), true);
        x.check(
            &c,
            &NoProperties,
            Some((body, body.len())),
            || Some("id-9".into()),
            0,
        );
        x.dispatched(2);
        let spent = x.finish(&c, 0).unwrap();
        assert_eq!(spent.release.as_deref(), Some("id-9"));
        assert_eq!(spent.reserved, Amount::tokens(150));
    }

    #[test]
    fn unlimited_and_unpriced_requests() {
        let c = config(json!({}));
        let no_user: Vec<(String, String)> = headers("")
            .into_iter()
            .filter(|(k, _)| k != "x-user")
            .collect();
        let mut x2 = Exchange::default();
        x2.request_headers(&c, no_user, true);
        let (check, _) = x2.check(&c, &NoProperties, None, || None, 0);
        assert_eq!(check, Check::Continue);
        assert!(x2.take_events().contains(&Event::Unlimited));

        let c = config(json!({
            "prices": {"currency": "USD", "models": [{"model": "gpt-4o", "input": "1", "output": "1"}]},
            "limits": [{"name": "team", "key": "{{request.headers.x-user}}", "unit": "cost", "budget": "1.00", "window": "1d"}]
        }));
        let mut x = Exchange::default();
        x.request_headers(&c, headers("ann"), false);
        let body = br#"{"model":"llama"}"#;
        x.request_body(&c, body.len(), true);
        let (check, _) = x.check(&c, &NoProperties, Some((body, body.len())), || None, 0);
        assert!(
            matches!(check, Check::Reply(ref r) if r.status == 403),
            "{check:?}"
        );
        assert!(x.take_events().contains(&Event::Unpriced));
    }

    fn shadow_config(extra: serde_json::Value) -> Config {
        let mut c = json!({
            "service": {"cluster": "rl", "failure_mode": "deny"},
            "limits": [{"name": "next", "key": "{{request.headers.x-user}}", "tokens": 10, "window": "1h", "mode": "shadow"}]
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Config::parse(c.to_string().as_bytes()).unwrap()
    }

    /// Shadow limits alone never refuse a request: not when the service fails, not when it
    /// refuses the check, not when it (an older one) denies by one of them.
    #[test]
    fn shadow_limits_alone_never_refuse() {
        let c = shadow_config(json!({}));
        for failure in [CheckFailure::Timeout, CheckFailure::Rejected] {
            let mut x = checking(&c, "ann");
            let r = x.failed(&c, failure, 0);
            assert!(r.resume && r.reply.is_none(), "{failure:?}");
        }
        let mut x = checking(&c, "ann");
        let denied = json!({"allowed": false, "denied_by": "next", "retry_after_ms": 5,
            "limits": [{"limit": "next", "value": "ann", "tokens": 10, "window_s": 3600, "remaining": 0, "reset_ms": 5}]});
        let r = x.answered(&c, Some(200), denied.to_string().as_bytes(), 0, 0);
        assert!(r.resume && r.reply.is_none());
        let plan = respond(&mut x, &c, b"{}");
        assert!(plan
            .set_headers
            .contains(&("x-ratelimit-shadow-denied", "next".to_string())));
        assert!(
            !plan
                .set_headers
                .iter()
                .any(|(k, _)| k.starts_with("x-ratelimit-remaining")),
            "a shadow limit's figures are not the request's"
        );
    }

    /// A shadow limit in money cannot price an unpriced model: it does not count the request,
    /// and never refuses it.
    #[test]
    fn a_shadow_limit_in_money_never_refuses_an_unpriced_model() {
        let c = shadow_config(json!({
            "prices": {"currency": "USD", "models": [{"model": "gpt-4o", "input": "1", "output": "1"}]},
            "limits": [
                {"name": "user", "key": "{{request.headers.x-user}}", "tokens": 1000, "window": "1h"},
                {"name": "spend", "key": "{{request.headers.x-user}}", "unit": "cost", "budget": "1", "window": "1h", "mode": "shadow"}
            ]
        }));
        let mut x = Exchange::default();
        x.request_headers(&c, headers("ann"), true);
        let (check, _) = x.check(&c, &NoProperties, None, || None, 0);
        let Check::Dispatch(call) = check else {
            panic!("refused: {check:?}");
        };
        let body = match call {
            Outbound::Http(call) => String::from_utf8(call.body.unwrap()).unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(
            body.contains("\"user\"") && !body.contains("\"spend\""),
            "{body}"
        );
    }
}
