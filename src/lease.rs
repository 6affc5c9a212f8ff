//! Quota leases on the plugin's side (`service.admission: "lease"`): a VM that holds a lease
//! for a set of descriptors admits requests for it by itself, with no check call, while the
//! lease covers their reservations.
//!
//! The service grants a lease as a reservation of the whole asked amount, taken from every
//! counter of the descriptors at once, and only while the counters are far from their limits.
//! A request admitted under a lease takes its own reservation out of it and is reported as a
//! checked one is (its reservation taken when the lease was); when the lease ends, what no
//! request took is given back by a report of its own. So a lease admits no more than checks
//! would, and ends with the window it was taken in.
//!
//! Here: which leases the VM holds, what local admission may take, when to ask for a lease
//! (the root context sends the asks in the background), and the reports that settle a lease's
//! end or an ask whose answer was never seen. Plain values and a clock passed in.

use std::collections::HashMap;

use wire::{Amount, LeaseAnswer, UsageFigures};

use crate::limits::Descriptor;
use crate::report::Spent;
use crate::verdict::{MoneyQuota, Quota};

/// A first lease asks for this many reservations of the largest request seen for its key; a
/// key whose leases run out before half their life asks for twice as many the next time (up
/// to [`MAX_REQUESTS_PER_LEASE`]), one whose lease ends three quarters unused for half.
pub const REQUESTS_PER_LEASE: u64 = 64;
pub const MAX_REQUESTS_PER_LEASE: u64 = 4096;
/// The most descriptor sets a VM keeps leases for; requests for others are checked.
pub const MAX_KEYS: usize = 256;
/// After a declined or failed ask, the key is checked for this long before the next ask.
pub const RETRY_MS: u64 = 1000;
/// A key nobody asked for in this long is forgotten (its lease, if any, ended before).
const IDLE_MS: u64 = 30_000;

/// A lease held: what it took, what requests took of it, until when it admits.
#[derive(Debug, Clone)]
struct Held {
    /// The ask's id: what its end-of-lease report and its requests are known by.
    id: String,
    amount: Amount,
    /// The reservations of the requests admitted under it.
    taken: Amount,
    /// What those requests used beyond their reservations (charged by their own reports):
    /// it shrinks what the lease still admits, never what it gives back.
    excess: Amount,
    /// When the service took it (its clock): the window its requests settle in.
    reserved_at_ms: u64,
    /// When it was granted and when local admission stops (this VM's clock).
    granted_ms: u64,
    expires_ms: u64,
    /// The figures of the check that granted it, the lease counted as spent: the quota
    /// headers of the requests admitted under it, and what bounds their streams.
    figures: Figures,
}

/// The budget figures of a check, for the requests admitted under the lease it granted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    pub quota: Option<Quota>,
    pub money: Option<MoneyQuota>,
}

impl Figures {
    /// The figures once `amount` is taken.
    fn less(mut self, amount: Amount) -> Figures {
        if let Some(q) = self.quota.as_mut() {
            q.remaining = q.remaining.saturating_sub(amount.tokens);
        }
        if let Some(m) = self.money.as_mut() {
            m.remaining = m.remaining.saturating_sub(amount.micros);
        }
        self
    }
}

impl Held {
    /// What local admission may still take.
    fn left(&self) -> Amount {
        self.amount.less(self.taken).less(self.excess)
    }

    /// Whether it admits `reserve` now: in its time (a clock that went back before the grant
    /// is past it) and within what is left.
    fn covers(&self, reserve: Amount, now_ms: u64) -> bool {
        let left = self.left();
        (self.granted_ms..self.expires_ms).contains(&now_ms)
            && reserve.tokens <= left.tokens
            && reserve.micros <= left.micros
    }

    /// Time for the next lease: half of it spent, or half of its life gone.
    fn running_out(&self, now_ms: u64) -> bool {
        self.half_spent() || now_ms >= self.half_life()
    }

    /// Three quarters of it untaken, in either unit it counts.
    fn mostly_unused(&self) -> bool {
        let (taken, amount) = (self.taken, self.amount);
        (amount.tokens > 0 && taken.tokens < amount.tokens / 4)
            || (amount.micros > 0 && taken.micros < amount.micros / 4)
    }

    fn half_spent(&self) -> bool {
        let left = self.left();
        left.tokens < self.amount.tokens / 2 || left.micros < self.amount.micros / 2
    }

    fn half_life(&self) -> u64 {
        self.granted_ms + self.expires_ms.saturating_sub(self.granted_ms) / 2
    }

    /// The report that gives back what no request took.
    fn end(self, descriptors: Vec<Descriptor>) -> Option<Spent> {
        let unused = self.amount.less(self.taken);
        (!unused.is_zero()).then(|| Spent {
            descriptors,
            used: Amount::ZERO,
            reserved: unused,
            reserved_at_ms: Some(self.reserved_at_ms),
            release: None,
            usage: UsageFigures::default(),
            lease: None,
            request: false,
            model: None,
        })
    }
}

/// An ask in flight.
#[derive(Debug, Clone)]
struct Asking {
    id: String,
    amount: Amount,
    /// The largest reservation of the key when it was asked for.
    unit: Amount,
    sent_ms: u64,
}

#[derive(Debug, Default)]
struct Entry {
    held: Option<Held>,
    asking: Option<Asking>,
    /// The largest reservation asked of this key since its last ask: a lease's unit.
    unit: Amount,
    /// A request found no lease that covered it, or the lease is running out.
    wanted: bool,
    /// The most the service would lease, as its last answer said.
    room: Option<Amount>,
    /// No ask before this time (after a declined or failed one).
    not_before_ms: u64,
    last_demand_ms: u64,
    /// Reservations the next lease asks for ([`REQUESTS_PER_LEASE`]; 0 before the first).
    size: u64,
}

/// Admitted under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The lease's id (its requests' reports say which lease they drew on).
    pub lease: String,
    pub reserved_at_ms: u64,
    pub figures: Figures,
}

/// An ask to send: a check of `descriptors` with no reservation of its own, asking for
/// `amount` under `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub descriptors: Vec<Descriptor>,
    pub id: String,
    pub amount: Amount,
}

/// The VM's leases, by descriptor set.
#[derive(Debug, Default)]
pub struct Leases {
    entries: HashMap<Vec<Descriptor>, Entry>,
    /// The VM is stopping: no more asks, no more leases.
    stopped: bool,
    /// An admission made an ask due: the root context's timer should run ([`Leases::woken`]).
    wake: bool,
}

impl Leases {
    /// Admits a request that reserves `reserve` if a lease of its descriptors covers it, and
    /// notes the demand either way. `None`: check it with the service. A request that reserves
    /// nothing is never admitted here (a lease could not bound it).
    pub fn admit(
        &mut self,
        descriptors: &[Descriptor],
        reserve: Amount,
        now_ms: u64,
    ) -> Option<Local> {
        if reserve.is_zero() {
            return None;
        }
        if !self.entries.contains_key(descriptors) {
            if self.entries.len() >= MAX_KEYS {
                return None;
            }
            self.entries.insert(descriptors.to_vec(), Entry::default());
        }
        let entry = self.entries.get_mut(descriptors)?;
        entry.last_demand_ms = now_ms;
        entry.unit = Amount::new(
            entry.unit.tokens.max(reserve.tokens),
            entry.unit.micros.max(reserve.micros),
        );
        // (An ask in flight is the next lease already.)
        let asking = entry.asking.is_some();
        let Some(held) = entry.held.as_mut().filter(|h| h.covers(reserve, now_ms)) else {
            entry.wanted |= !asking;
            self.wake |= Self::due(entry, now_ms);
            return None;
        };
        held.taken = held.taken.plus(reserve);
        let local = Local {
            lease: held.id.clone(),
            reserved_at_ms: held.reserved_at_ms,
            figures: held.figures.clone(),
        };
        if held.running_out(now_ms) && !asking {
            entry.wanted = true;
            self.wake |= Self::due(entry, now_ms);
        }
        Some(local)
    }

    /// A request admitted under lease `id` used `excess` beyond its reservation: the lease
    /// admits that much less.
    pub fn exceeded(&mut self, descriptors: &[Descriptor], id: &str, excess: Amount) {
        let held = self
            .entries
            .get_mut(descriptors)
            .and_then(|e| e.held.as_mut());
        if let Some(held) = held.filter(|h| h.id == id) {
            held.excess = held.excess.plus(excess);
        }
    }

    /// Whether an ask is due now (the root context's timer should run).
    pub fn ask_due(&self, now_ms: u64) -> bool {
        self.entries.values().any(|e| Self::due(e, now_ms))
    }

    /// Whether an admission made an ask due since the last call.
    pub fn woken(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    fn due(e: &Entry, now_ms: u64) -> bool {
        e.wanted && e.asking.is_none() && now_ms >= e.not_before_ms
    }

    /// The asks to send now, each with an id from `next_id`. A key whose next lease would
    /// be worth fewer than two of its requests (by the service's last word on its room) is
    /// not asked for until [`RETRY_MS`] has passed.
    pub fn asks(&mut self, now_ms: u64, mut next_id: impl FnMut() -> String) -> Vec<Ask> {
        let mut asks = Vec::new();
        if self.stopped {
            return asks;
        }
        for (descriptors, e) in self.entries.iter_mut() {
            if !Self::due(e, now_ms) {
                continue;
            }
            e.wanted = false;
            // Half spent before half its life: the key runs hot, the next lease is larger.
            let hot = e
                .held
                .as_ref()
                .is_some_and(|h| h.half_spent() && now_ms < h.half_life());
            e.size = match e.size {
                0 => REQUESTS_PER_LEASE,
                n if hot => (n * 2).min(MAX_REQUESTS_PER_LEASE),
                n => n,
            };
            let wanted = Amount::new(
                e.unit.tokens.saturating_mul(e.size),
                e.unit.micros.saturating_mul(e.size),
            );
            let amount = match e.room {
                Some(room) => Amount::new(
                    wanted.tokens.min(room.tokens),
                    wanted.micros.min(room.micros),
                ),
                None => wanted,
            };
            let worth = |figure: u64, unit: u64| figure >= unit.saturating_mul(2);
            if !worth(amount.tokens, e.unit.tokens) || !worth(amount.micros, e.unit.micros) {
                // The unit starts again from the requests that follow (one huge one must not
                // hold the key on checks).
                e.room = None;
                e.unit = Amount::ZERO;
                e.not_before_ms = now_ms + RETRY_MS;
                continue;
            }
            let id = next_id();
            e.asking = Some(Asking {
                id: id.clone(),
                amount,
                unit: e.unit,
                sent_ms: now_ms,
            });
            e.unit = Amount::ZERO;
            asks.push(Ask {
                descriptors: descriptors.clone(),
                id,
                amount,
            });
        }
        asks
    }

    /// The answer to ask `id`: a check that was `allowed`, with the service's lease answer and
    /// quota figures. A granted lease replaces the one held, whose unused part is given back
    /// (the report returned).
    pub fn answered(
        &mut self,
        id: &str,
        allowed: bool,
        answer: Option<LeaseAnswer>,
        figures: Figures,
        now_ms: u64,
    ) -> Option<Spent> {
        let (descriptors, e) = self.asked(id)?;
        let asking = e.asking.take()?;
        let answer = answer.filter(|_| allowed).unwrap_or_default();
        e.room = Some(answer.room);
        // A grant of another amount than asked (no service of this project's makes one) is
        // not used: what it took is given back.
        if let Some(other) = answer.granted.filter(|g| *g != asking.amount) {
            e.not_before_ms = now_ms + RETRY_MS;
            return Some(Spent {
                descriptors,
                used: Amount::ZERO,
                reserved: other,
                reserved_at_ms: Some(answer.reserved_at_ms),
                release: None,
                usage: UsageFigures::default(),
                lease: None,
                request: false,
                model: None,
            });
        }
        match answer.granted {
            Some(amount) => {
                // Its time counts from when the ask left (the service counted from later), or
                // from now if the clock stepped back since.
                let start = asking.sent_ms.min(now_ms);
                let held = Held {
                    id: asking.id,
                    amount,
                    taken: Amount::ZERO,
                    excess: Amount::ZERO,
                    reserved_at_ms: answer.reserved_at_ms,
                    granted_ms: start,
                    expires_ms: start.saturating_add(answer.ttl_ms),
                    figures: figures.less(amount),
                };
                e.wanted = false;
                let old = e.held.replace(held)?;
                if old.mostly_unused() {
                    e.size = (e.size / 2).max(REQUESTS_PER_LEASE);
                }
                old.end(descriptors)
            }
            // Declined: asked again at the next demand if the room the service named holds two
            // of the key's requests, else later.
            None => {
                let (room, unit) = (answer.room, asking.unit);
                let worth = room.tokens >= unit.tokens.saturating_mul(2)
                    && room.micros >= unit.micros.saturating_mul(2);
                e.not_before_ms = if allowed && worth {
                    now_ms
                } else {
                    now_ms + RETRY_MS
                };
                None
            }
        }
    }

    /// Ask `id` got no answer (or none that could be read): whatever it may have taken is
    /// released by a report naming it, settled in the window it left in (`offset_ms`: the
    /// service's clock less this VM's).
    pub fn failed(&mut self, id: &str, now_ms: u64, offset_ms: i64) -> Option<Spent> {
        let (descriptors, e) = self.asked(id)?;
        let asking = e.asking.take()?;
        e.not_before_ms = now_ms + RETRY_MS;
        Some(Spent {
            descriptors,
            used: Amount::ZERO,
            reserved: asking.amount,
            reserved_at_ms: Some((asking.sent_ms as i64).saturating_add(offset_ms).max(0) as u64),
            release: Some(asking.id),
            usage: UsageFigures::default(),
            lease: None,
            request: false,
            model: None,
        })
    }

    fn asked(&mut self, id: &str) -> Option<(Vec<Descriptor>, &mut Entry)> {
        self.entries.iter_mut().find_map(|(d, e)| {
            let ours = e.asking.as_ref().is_some_and(|a| a.id == id);
            ours.then(|| (d.clone(), e))
        })
    }

    /// Ends the leases whose time is up (`all`: every lease, as the VM stops) and forgets idle
    /// keys; the reports that give back what they did not use.
    pub fn expire(&mut self, now_ms: u64, all: bool) -> Vec<Spent> {
        let mut ends = Vec::new();
        for (descriptors, e) in self.entries.iter_mut() {
            if e.held
                .as_ref()
                .is_some_and(|h| all || now_ms >= h.expires_ms)
            {
                let Some(held) = e.held.take() else {
                    continue;
                };
                // Three quarters unused: the next lease is smaller.
                if held.mostly_unused() {
                    e.size = (e.size / 2).max(REQUESTS_PER_LEASE);
                }
                ends.extend(held.end(descriptors.clone()));
            }
        }
        self.entries.retain(|_, e| {
            e.held.is_some()
                || e.asking.is_some()
                || now_ms.saturating_sub(e.last_demand_ms) < IDLE_MS
        });
        ends
    }

    /// The VM stops: every lease ends (what it did not use is given back), every ask in
    /// flight is released by id (`offset_ms`: the service's clock less this VM's), and no
    /// lease is asked for or installed again.
    pub fn stop(&mut self, now_ms: u64, offset_ms: i64) -> Vec<Spent> {
        self.stopped = true;
        let mut reports = self.expire(now_ms, true);
        let asked: Vec<String> = self
            .entries
            .values()
            .filter_map(|e| e.asking.as_ref().map(|a| a.id.clone()))
            .collect();
        for id in asked {
            reports.extend(self.failed(&id, now_ms, offset_ms));
        }
        reports
    }

    /// The service changed: leases it did not grant must not admit for it, and reports of
    /// them must not go to it. They are forgotten; the old service keeps what they took
    /// until their window ends (budget lost there, never overspent).
    pub fn forget(&mut self) {
        self.entries.clear();
    }

    /// A root context configured again after the VM's last one stopped: leasing resumes.
    pub fn resume(&mut self) {
        self.stopped = false;
    }

    /// Leases held now (for the metrics).
    pub fn held(&self) -> usize {
        self.entries.values().filter(|e| e.held.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn key(user: &str) -> Vec<Descriptor> {
        vec![Descriptor {
            limit: "user".into(),
            value: user.into(),
            rates: vec![wire::Rate {
                budget: 1_000_000,
                window_s: 60,
                calendar: None,
            }],
            ..Default::default()
        }]
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("vm-{n}")
        }
    }

    fn granted(amount: Amount, ttl_ms: u64) -> Option<LeaseAnswer> {
        Some(LeaseAnswer {
            granted: Some(amount),
            reserved_at_ms: 5_000,
            ttl_ms,
            room: Amount::tokens(1_000_000),
        })
    }

    /// Demand for `k` at `asked_at`, its ask, and the grant of the whole ask for `ttl_ms`
    /// answered at `answered_at`.
    fn lease_for(
        leases: &mut Leases,
        k: &[Descriptor],
        reserve: Amount,
        asked_at: u64,
        ttl_ms: u64,
        answered_at: u64,
    ) -> Ask {
        leases.admit(k, reserve, asked_at);
        let ask = leases.asks(asked_at, ids()).remove(0);
        leases.answered(
            &ask.id,
            true,
            granted(ask.amount, ttl_ms),
            Figures::default(),
            answered_at,
        );
        ask
    }

    #[test]
    fn a_granted_lease_admits_until_its_reservations_run_out_and_gives_back_the_rest() {
        let mut leases = Leases::default();
        let alice = key("alice");
        let r = Amount::tokens(100);
        // No lease yet: checked, and an ask is due for 64 requests of the largest seen.
        assert_eq!(leases.admit(&alice, r, 0), None);
        assert_eq!(leases.admit(&alice, Amount::tokens(150), 0), None);
        assert!(leases.ask_due(0));
        let asks = leases.asks(0, ids());
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].amount, Amount::tokens(150 * 64));
        assert!(!leases.ask_due(0), "one ask in flight per key");
        assert_eq!(
            leases.answered(
                "vm-1",
                true,
                granted(asks[0].amount, 2_000),
                Figures::default(),
                10
            ),
            None
        );
        // 9,600 tokens: 96 requests of 100.
        for i in 0..96 {
            let local = leases
                .admit(&alice, r, 20)
                .unwrap_or_else(|| panic!("request {i}"));
            assert_eq!(
                (local.lease.as_str(), local.reserved_at_ms),
                ("vm-1", 5_000)
            );
        }
        assert_eq!(leases.admit(&alice, r, 20), None);
        assert!(leases.ask_due(20), "spent: the next lease is wanted");
        // Nothing of it left to give back at its end.
        assert!(leases.expire(2_000, false).is_empty());
        assert_eq!(leases.held(), 0);
    }

    #[test]
    fn a_lease_never_admits_past_its_expiry_and_its_end_gives_back_what_was_not_taken() {
        let mut leases = Leases::default();
        let bob = key("bob");
        lease_for(&mut leases, &bob, Amount::tokens(10), 1_000, 500, 1_200);
        assert!(leases.admit(&bob, Amount::tokens(10), 1_499).is_some());
        // Expiry is counted from when the ask left (1,000), not from the answer.
        assert_eq!(leases.admit(&bob, Amount::tokens(10), 1_500), None);
        let ends = leases.expire(1_500, false);
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].reserved, Amount::tokens(640 - 10));
        assert_eq!(
            (ends[0].used, ends[0].reserved_at_ms),
            (Amount::ZERO, Some(5_000))
        );
        assert_eq!(ends[0].release, None);
    }

    #[test]
    fn excess_shrinks_what_a_lease_admits_but_not_what_it_gives_back() {
        let mut leases = Leases::default();
        let carol = key("carol");
        lease_for(&mut leases, &carol, Amount::tokens(100), 0, 60_000, 0);
        let local = leases.admit(&carol, Amount::tokens(100), 1).unwrap();
        leases.exceeded(&carol, &local.lease, Amount::tokens(6_250));
        // 6,400 - 100 taken - 6,250 used beyond: 50 left, not enough for one more.
        assert_eq!(leases.admit(&carol, Amount::tokens(100), 2), None);
        assert!(leases.admit(&carol, Amount::tokens(50), 2).is_some());
        let ends = leases.expire(0, true);
        assert_eq!(ends[0].reserved, Amount::tokens(6_400 - 150));
        // An excess for a lease no longer held changes nothing.
        leases.exceeded(&carol, &local.lease, Amount::tokens(1));
    }

    #[test]
    fn a_renewal_replaces_the_lease_and_gives_back_the_old_one_s_rest() {
        let mut leases = Leases::default();
        let dave = key("dave");
        lease_for(&mut leases, &dave, Amount::tokens(100), 0, 2_000, 0);
        // Half its life gone: still admits, and wants the next one.
        assert!(leases.admit(&dave, Amount::tokens(100), 1_000).is_some());
        assert!(leases.ask_due(1_000));
        let second = leases.asks(1_000, || "vm-2".into()).remove(0);
        assert!(leases.admit(&dave, Amount::tokens(100), 1_001).is_some());
        let end = leases
            .answered(
                &second.id,
                true,
                granted(second.amount, 2_000),
                Figures::default(),
                1_002,
            )
            .unwrap();
        assert_eq!(end.reserved, Amount::tokens(6_400 - 200));
        assert_eq!(
            leases
                .admit(&dave, Amount::tokens(100), 1_003)
                .unwrap()
                .lease,
            "vm-2"
        );
    }

    #[test]
    fn a_declined_ask_waits_and_the_next_asks_for_the_room_the_service_named() {
        let mut leases = Leases::default();
        let erin = key("erin");
        leases.admit(&erin, Amount::tokens(100), 0);
        let ask = leases.asks(0, ids()).remove(0);
        let declined = LeaseAnswer {
            room: Amount::tokens(1_000),
            ttl_ms: 2_000,
            ..LeaseAnswer::default()
        };
        assert_eq!(
            leases.answered(&ask.id, true, Some(declined), Figures::default(), 10),
            None
        );
        // The room holds ten of its requests: asked for at once, at the next demand.
        assert!(!leases.ask_due(10));
        leases.admit(&erin, Amount::tokens(100), 20);
        assert!(leases.ask_due(20));
        let next = leases.asks(20, ids()).remove(0);
        assert_eq!(next.amount, Amount::tokens(1_000));
        // A room worth fewer than two requests: no ask, checks only, for a while.
        let tight = LeaseAnswer {
            room: Amount::tokens(150),
            ..declined
        };
        leases.answered(&next.id, true, Some(tight), Figures::default(), 2_000);
        leases.admit(&erin, Amount::tokens(100), 2_001);
        assert!(
            !leases.ask_due(2_001),
            "fewer than two of its requests: later"
        );
        leases.admit(&erin, Amount::tokens(100), 3_000);
        assert!(leases.asks(3_000, ids()).is_empty());
        assert!(!leases.ask_due(3_000 + RETRY_MS - 1));
        // A denied check's lease answer, or a grant of another amount, is no lease.
        leases.admit(&erin, Amount::tokens(100), 4_000);
        let ask = leases.asks(4_000, ids()).remove(0);
        leases.answered(
            &ask.id,
            false,
            granted(ask.amount, 2_000),
            Figures::default(),
            4_001,
        );
        assert_eq!(leases.held(), 0);
    }

    #[test]
    fn an_ask_never_answered_is_released_in_the_window_it_left_in() {
        let mut leases = Leases::default();
        let frank = key("frank");
        leases.admit(&frank, Amount::new(100, 2_000), 1_000);
        let ask = leases.asks(1_000, ids()).remove(0);
        let release = leases.failed(&ask.id, 1_500, 250).unwrap();
        assert_eq!(release.release.as_deref(), Some(ask.id.as_str()));
        assert_eq!(release.reserved, Amount::new(6_400, 128_000));
        assert_eq!(release.reserved_at_ms, Some(1_250));
        assert_eq!(leases.failed(&ask.id, 1_500, 250), None, "once");
        assert_eq!(
            leases.answered(
                &ask.id,
                true,
                granted(ask.amount, 2_000),
                Figures::default(),
                1_600
            ),
            None
        );
        assert_eq!(leases.held(), 0);
    }

    /// A key that spends half its lease before half its life asks for twice as many
    /// reservations the next time, up to the most; one that leaves three quarters unused, half.
    #[test]
    fn a_hot_key_s_leases_grow_and_an_idle_one_s_shrink() {
        let mut leases = Leases::default();
        let hot = key("hot");
        let mut now = 0;
        let mut sizes = Vec::new();
        leases.admit(&hot, Amount::tokens(10), now);
        for _ in 0..9 {
            let ask = leases.asks(now, ids()).remove(0);
            sizes.push(ask.amount.tokens / 10);
            leases.answered(
                &ask.id,
                true,
                granted(ask.amount, 2_000),
                Figures::default(),
                now,
            );
            now += 1;
            while leases.admit(&hot, Amount::tokens(10), now).is_some() && !leases.ask_due(now) {}
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024, 2048, 4096, 4096, 4096]);
        // Unused: it ends at its expiry three quarters untaken, and the next is half as large.
        let unused = leases.asks(now, ids()).remove(0);
        assert_eq!(unused.amount.tokens / 10, 4096);
        leases.answered(
            &unused.id,
            true,
            granted(unused.amount, 2_000),
            Figures::default(),
            now,
        );
        leases.expire(now + 2_000, false);
        leases.admit(&hot, Amount::tokens(10), now + 2_001);
        let ask = leases.asks(now + 2_001, ids()).remove(0);
        assert_eq!(ask.amount.tokens / 10, 2048);
    }

    /// Requests admitted while a renewal is in flight do not ask again: once it is granted,
    /// no ask is due until the new lease runs out.
    #[test]
    fn a_renewal_in_flight_is_the_only_ask() {
        let mut leases = Leases::default();
        let k = key("k");
        lease_for(&mut leases, &k, Amount::tokens(100), 0, 2_000, 0);
        while leases.admit(&k, Amount::tokens(100), 1).is_some() && !leases.ask_due(1) {}
        let second = leases.asks(1, || "vm-2".into()).remove(0);
        for _ in 0..10 {
            assert!(leases.admit(&k, Amount::tokens(100), 2).is_some());
        }
        assert!(!leases.ask_due(2));
        leases.answered(
            &second.id,
            true,
            granted(second.amount, 2_000),
            Figures::default(),
            3,
        );
        assert!(!leases.ask_due(3), "the new lease is fresh");
    }

    /// A clock that steps back between an ask and its answer cannot lengthen the lease: its
    /// time counts from the earlier of the two.
    #[test]
    fn a_clock_stepping_back_never_lengthens_a_lease() {
        let mut leases = Leases::default();
        let k = key("k");
        lease_for(&mut leases, &k, Amount::tokens(10), 10_000, 2_000, 8_500);
        assert!(leases.admit(&k, Amount::tokens(10), 10_499).is_some());
        assert_eq!(leases.admit(&k, Amount::tokens(10), 10_500), None);
        // And one that steps back before the grant ends it.
        assert_eq!(leases.admit(&k, Amount::tokens(10), 8_000), None);
    }

    /// A renewal that replaces a lease three quarters unused halves the next one.
    #[test]
    fn a_lease_replaced_mostly_unused_halves_the_next() {
        let mut leases = Leases::default();
        let k = key("k");
        leases.admit(&k, Amount::tokens(10), 0);
        let mut now = 0;
        let mut last = 0;
        for _ in 0..4 {
            let ask = leases.asks(now, ids()).remove(0);
            last = ask.amount.tokens / 10;
            leases.answered(
                &ask.id,
                true,
                granted(ask.amount, 2_000),
                Figures::default(),
                now,
            );
            now += 1;
            while leases.admit(&k, Amount::tokens(10), now).is_some() && !leases.ask_due(now) {}
        }
        assert_eq!(last, 512);
        // A trickle: one request at half its life asks for the next, which replaces it unused.
        let ask = leases.asks(now, ids()).remove(0);
        leases.answered(
            &ask.id,
            true,
            granted(ask.amount, 2_000),
            Figures::default(),
            now,
        );
        leases.admit(&k, Amount::tokens(10), now + 1_000);
        let next = leases.asks(now + 1_000, ids()).remove(0);
        leases.answered(
            &next.id,
            true,
            granted(next.amount, 2_000),
            Figures::default(),
            now + 1_000,
        );
        leases.admit(&k, Amount::tokens(10), now + 2_000);
        let after = leases.asks(now + 2_000, ids()).remove(0);
        assert!(
            after.amount.tokens / 10 < next.amount.tokens / 10,
            "{after:?} after {next:?}"
        );
    }

    /// A VM whose last root context stopped and which is configured again leases again.
    #[test]
    fn leasing_resumes_after_a_stop() {
        let mut leases = Leases::default();
        let k = key("k");
        leases.stop(0, 0);
        leases.admit(&k, Amount::tokens(10), 0);
        assert!(leases.asks(0, ids()).is_empty());
        leases.resume();
        leases.admit(&k, Amount::tokens(10), 1);
        assert_eq!(leases.asks(1, ids()).len(), 1);
    }

    #[test]
    fn keys_are_bounded_and_idle_ones_forgotten() {
        let mut leases = Leases::default();
        for i in 0..MAX_KEYS + 10 {
            leases.admit(&key(&i.to_string()), Amount::tokens(1), 0);
        }
        assert_eq!(leases.entries.len(), MAX_KEYS);
        assert_eq!(leases.admit(&key("late"), Amount::tokens(1), 0), None);
        assert!(!leases.entries.contains_key(&key("late")));
        leases.expire(IDLE_MS, false);
        assert!(leases.entries.is_empty());
        // Nothing reserved: never admitted under a lease, never asked for.
        assert_eq!(leases.admit(&key("free"), Amount::ZERO, 0), None);
        assert!(!leases.ask_due(0));
    }
}
