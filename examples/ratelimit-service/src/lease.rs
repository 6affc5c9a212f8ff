//! Quota leases: what the service may hand a plugin VM so that it admits requests for a
//! descriptor set by itself, with no check call each.
//!
//! A lease is a reservation like any other: taken from every counter of the descriptors at
//! once, all of the asked amount or nothing, and settled by reports (the requests admitted
//! under it report what they used against their share; the plugin gives back what was left
//! when the lease ends). So leases never let more through than checks would; what they cost is
//! budget held by a VM that may not use it, for at most the lease's life. This module decides
//! whether and for how long a lease may be taken; the limiter takes it.
//!
//! What leases hold is bounded per counter, not per ask: the [`Ledger`] remembers what this
//! replica leased on each counter recently, and a counter never has more than `fraction` of
//! what remains on it held by leases, however many keys (a global limit shared by every user)
//! or VMs lease it.

use std::collections::HashMap;
use std::sync::Mutex;

use wire::Amount;

use crate::counter::Plan;
use crate::meter::{Meter, Status};

/// Leases are taken only while this much of a lease's life would remain: shorter ones would
/// cost a call for next to nothing.
pub const MIN_TTL_MS: i64 = 100;

/// How the service leases (`--lease-fraction`, `--lease-ttl-ms`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Leasing {
    /// The most one lease may take of what remains on each counter (0: no leases).
    pub fraction: f64,
    /// The longest a lease lasts.
    pub max_ttl_ms: i64,
}

impl Default for Leasing {
    fn default() -> Self {
        Leasing {
            fraction: 0.1,
            max_ttl_ms: 2000,
        }
    }
}

/// What may be leased on a descriptor set now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The most one lease may take, per unit (a unit no counter counts: [`wire::MAX_AMOUNT`]).
    pub room: Amount,
    /// How long it may last: never past the end of the window or calendar period that holds
    /// `at`, on any counter, so every request admitted under it is counted in the window its
    /// reservation is in, exactly as a checked request is.
    pub ttl_ms: i64,
}

impl Leasing {
    /// What may be leased, from the counters' statuses after the check at `at_ms` (shadow
    /// limits' counters included: a request admitted under a lease could not have been denied
    /// by them either) and what leases already hold on each (`held`, counted as spent in
    /// `remaining`). `None`: no lease at all (leasing off, a counter that is a service rule's
    /// bucket, or too little time left in a window).
    pub fn offer(
        &self,
        plans: &[Plan],
        statuses: &[Vec<Status>],
        at_ms: i64,
        held: impl Fn(&Plan) -> u64,
    ) -> Option<Offer> {
        if self.fraction <= 0.0 || plans.is_empty() {
            return None;
        }
        let mut room = Amount::new(wire::MAX_AMOUNT, wire::MAX_AMOUNT);
        let mut ttl_ms = self.max_ttl_ms;
        for (plan, statuses) in plans.iter().zip(statuses) {
            let held = held(plan);
            for (meter, status) in plan.meters.iter().zip(statuses) {
                // A bucket refills as time passes: a charge taken early is not the same charge.
                let (_, end) = meter.alert_window(at_ms)?;
                ttl_ms = ttl_ms.min(end.saturating_sub(at_ms));
                // Leases may hold `fraction` of what remains, leases included.
                let unheld = status.remaining.max(0) as u64;
                let bound = (unheld.saturating_add(held) as f64 * self.fraction).floor() as u64;
                let share = bound.saturating_sub(held);
                match meter {
                    Meter::Window { money: None, .. } | Meter::Calendar { money: None, .. } => {
                        room.tokens = room.tokens.min(share)
                    }
                    _ => room.micros = room.micros.min(share),
                }
            }
        }
        (ttl_ms >= MIN_TTL_MS).then_some(Offer { room, ttl_ms })
    }
}

/// Counters whose leases are remembered at most; past it no lease is granted until older
/// ones are forgotten.
pub const MAX_LEDGER: usize = 100_000;

/// What this replica leased on each counter in the current and the previous stretch of the
/// longest lease's life: every lease still held was granted in one of the two.
#[derive(Debug, Default)]
pub struct Ledger {
    counters: Mutex<HashMap<String, Slots>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slots {
    slot: i64,
    current: u64,
    previous: u64,
}

impl Slots {
    fn at(mut self, slot: i64) -> Slots {
        if slot == self.slot + 1 {
            self.previous = self.current;
            self.current = 0;
        } else if slot > self.slot + 1 {
            (self.previous, self.current) = (0, 0);
        }
        self.slot = self.slot.max(slot);
        self
    }

    fn held(&self) -> u64 {
        self.current.saturating_add(self.previous)
    }
}

impl Ledger {
    /// Decides a lease ask with what is held on its counters, and books it if it fits (the
    /// limiter then takes it, or [`Ledger::unbook`]s it). One lock over the decision and the
    /// booking: two asks at once cannot both take the last share.
    pub fn book(
        &self,
        leasing: &Leasing,
        plans: &[Plan],
        statuses: &[Vec<Status>],
        at_ms: i64,
        ask: Amount,
    ) -> (Option<Offer>, bool) {
        let slot = at_ms.div_euclid(leasing.max_ttl_ms.max(1));
        let Ok(mut counters) = self.counters.lock() else {
            return (None, false);
        };
        if counters.len() >= MAX_LEDGER {
            counters.retain(|_, s| s.slot >= slot - 1);
        }
        let held = |plan: &Plan| {
            counters
                .get(&plan.id.storage_key())
                .map_or(0, |s| s.at(slot).held())
        };
        let offer = leasing.offer(plans, statuses, at_ms, held);
        let known = plans
            .iter()
            .all(|p| counters.contains_key(&p.id.storage_key()));
        let room = known || counters.len() + plans.len() <= MAX_LEDGER;
        let fits = offer.is_some_and(|o| o.covers(ask)) && room;
        if fits {
            for plan in plans {
                let s = counters.entry(plan.id.storage_key()).or_default();
                *s = s.at(slot);
                s.current = s.current.saturating_add(unit(plan, ask));
            }
        }
        (offer, fits)
    }

    /// An ask booked but not taken (the store refused it, or failed).
    pub fn unbook(&self, leasing: &Leasing, plans: &[Plan], at_ms: i64, ask: Amount) {
        let slot = at_ms.div_euclid(leasing.max_ttl_ms.max(1));
        if let Ok(mut counters) = self.counters.lock() {
            for plan in plans {
                if let Some(s) = counters.get_mut(&plan.id.storage_key()) {
                    if s.slot == slot {
                        s.current = s.current.saturating_sub(unit(plan, ask));
                    }
                }
            }
        }
    }
}

/// The figure of `ask` a counter counts.
fn unit(plan: &Plan, ask: Amount) -> u64 {
    let money = plan.meters.first().is_some_and(|m| m.money().is_some());
    ask.counted(money)
}

impl Offer {
    /// Whether `ask` may be granted whole: within the room in both units.
    pub fn covers(&self, ask: Amount) -> bool {
        ask.tokens <= self.room.tokens && ask.micros <= self.room.micros
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::CounterId;

    fn plan(meters: Vec<Meter>) -> Plan {
        Plan {
            id: CounterId {
                limit: "user".into(),
                value: "alice".into(),
                shared: false,
            },
            meters,
            shadow: false,
            alerts: Vec::new(),
        }
    }

    fn window(budget: i64, window_ms: i64, money: bool) -> Meter {
        Meter::Window {
            budget,
            window_ms,
            sliding: true,
            money: money.then_some(*b"USD"),
        }
    }

    fn status(remaining: i64) -> Status {
        Status {
            limit: 0,
            remaining,
            reset_ms: 0,
            retry_ms: 0,
        }
    }

    #[test]
    fn a_lease_takes_at_most_the_fraction_of_the_least_that_remains_per_unit() {
        let leasing = Leasing::default();
        let plans = [
            plan(vec![
                window(100_000, 60_000, false),
                window(1_000_000, 3_600_000, false),
            ]),
            plan(vec![window(5_000_000, 60_000, true)]),
        ];
        let statuses = [
            vec![status(50_000), status(20_000)],
            vec![status(3_000_000)],
        ];
        let offer = leasing.offer(&plans, &statuses, 1_000, |_| 0).unwrap();
        assert_eq!(offer.room, Amount::new(2_000, 300_000));
        assert!(offer.covers(Amount::new(2_000, 300_000)));
        assert!(!offer.covers(Amount::new(2_001, 0)));
        assert!(!offer.covers(Amount::new(0, 300_001)));
        // Tokens only: the unit nobody counts is no bound.
        let offer = leasing
            .offer(&plans[..1], &statuses[..1], 1_000, |_| 0)
            .unwrap();
        assert_eq!(offer.room.micros, wire::MAX_AMOUNT);
    }

    #[test]
    fn a_lease_ends_with_the_window_it_was_taken_in() {
        let leasing = Leasing::default();
        let plans = [plan(vec![window(100, 60_000, false)])];
        let statuses = [vec![status(100)]];
        assert_eq!(
            leasing
                .offer(&plans, &statuses, 10_000, |_| 0)
                .unwrap()
                .ttl_ms,
            2_000
        );
        assert_eq!(
            leasing
                .offer(&plans, &statuses, 59_000, |_| 0)
                .unwrap()
                .ttl_ms,
            1_000
        );
        assert_eq!(leasing.offer(&plans, &statuses, 59_950, |_| 0), None);
    }

    /// Many keys (a user limit each) share one global counter: whatever each asks, leases never
    /// hold more than the fraction of what remains on it, leases included.
    #[test]
    fn leases_on_a_counter_shared_by_many_keys_hold_at_most_the_fraction_of_it() {
        let leasing = Leasing::default();
        let ledger = Ledger::default();
        let global = plan(vec![window(1_000_000, 3_600_000, false)]);
        let mut remaining = 1_000_000;
        let mut held = 0;
        for user in 0..100 {
            let mine = Plan {
                id: CounterId {
                    limit: "user".into(),
                    value: format!("u{user}"),
                    shared: false,
                },
                ..plan(vec![window(1_000_000, 3_600_000, false)])
            };
            let plans = [mine, global.clone()];
            let statuses = [vec![status(1_000_000)], vec![status(remaining)]];
            let (_, fits) = ledger.book(&leasing, &plans, &statuses, 1_000, Amount::tokens(20_000));
            if fits {
                // Taken: the counter's remaining counts it as spent.
                remaining -= 20_000;
                held += 20_000;
            }
            assert!(
                held as f64 <= 0.1 * (remaining + held) as f64,
                "{held} held"
            );
        }
        assert_eq!(
            held, 100_000,
            "five leases of 20,000: a tenth of the million"
        );
        // An ask booked and not taken is given back; the next stretch of time frees the rest.
        let plans = [global.clone()];
        ledger.unbook(&leasing, &plans, 1_000, Amount::tokens(20_000));
        let statuses = [vec![status(remaining + 20_000)]];
        assert!(
            ledger
                .book(&leasing, &plans, &statuses, 1_500, Amount::tokens(20_000))
                .1
        );
        assert!(
            !ledger
                .book(&leasing, &plans, &statuses, 1_500, Amount::tokens(20_000))
                .1
        );
        // One stretch later the leases of the last one still count as held; two later, not.
        let next = 1_000 + leasing.max_ttl_ms;
        assert!(
            !ledger
                .book(&leasing, &plans, &statuses, next, Amount::tokens(20_000))
                .1
        );
        let later = 1_000 + 2 * leasing.max_ttl_ms;
        assert!(
            ledger
                .book(&leasing, &plans, &statuses, later, Amount::tokens(20_000))
                .1
        );
    }

    #[test]
    fn no_lease_on_a_bucket_nor_with_leasing_off() {
        let bucket = Meter::Bucket {
            max: 100,
            per_fill: 10,
            interval_ms: 1000,
            expire_ms: 60_000,
        };
        let statuses = [vec![status(100)]];
        assert_eq!(
            Leasing::default().offer(&[plan(vec![bucket])], &statuses, 0, |_| 0),
            None
        );
        let off = Leasing {
            fraction: 0.0,
            ..Leasing::default()
        };
        let plans = [plan(vec![window(100, 60_000, false)])];
        assert_eq!(off.offer(&plans, &statuses, 0, |_| 0), None);
    }
}
