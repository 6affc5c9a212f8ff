//! What every store takes and gives: a check's outcome, a report's settlement, and the check and settlement over loaded states that the memory store runs (and
//! `limiter.lua` mirrors). Apart from [`super::Store`], which dispatches to the stores, so the
//! stores and their dispatcher do not import each other.

use thiserror::Error;

use crate::counter::Plan;
use wire::{Amount, Threshold, Trim};

use crate::meter::{counted, Meter, State, Status};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's clock (Redis `TIME`, in ms) is in another calendar period than the one the
    /// request was planned for: plan again at that time. Nothing was written.
    #[error("the store's clock is in another calendar period")]
    Replan(i64),
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// Its id was applied before: nothing done.
    Duplicate,
    /// Its id is older than its source's window: cannot be told apart, nothing done.
    Stale,
}

/// A check's result: the decision and every meter's status after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Per plan, per meter, in request order.
    pub statuses: Vec<Vec<Status>>,
    /// The store's time of the decision (ms since the epoch): where a reservation was taken.
    pub at_ms: i64,
    /// A trimmed check: what was taken instead of the whole reserve.
    pub granted: Option<Amount>,
    /// Per plan: a shadow limit that could not have taken what was asked (the reserve, or
    /// the grant), and would have denied had it been enforced.
    pub shadow_denied: Vec<bool>,
}

/// What a report does to its counters once its usage is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Beyond the reservation: charged now, in the current window.
    pub excess: Amount,
    /// Reserved but not used: given back to the window the reservation was taken in.
    pub refund: Amount,
    /// When the reservation was taken; `None`: now.
    pub refund_at: Option<i64>,
}

impl Settlement {
    /// A request that used `used` after `reserved` were taken at `reserved_at`.
    pub fn of(used: Amount, reserved: Amount, reserved_at: Option<i64>) -> Settlement {
        Settlement {
            excess: used.less(reserved),
            refund: reserved.less(used),
            refund_at: reserved_at,
        }
    }

    /// What it adds to the counters in all, tokens and micro units (a refund is negative).
    pub fn net(&self) -> (i64, i64) {
        let signed = |charged: u64, given_back: u64| charged as i64 - given_back as i64;
        (
            signed(self.excess.tokens, self.refund.tokens),
            signed(self.excess.micros, self.refund.micros),
        )
    }
}

/// The check over loaded states (the memory store's core; `limiter.lua` mirrors it): admits
/// iff every meter can take the reserve, and takes it. Under `trim`, a reserve that does not
/// fit gives way to the largest grant every meter can take, if it is at least `trim.min`.
pub fn check_states(
    plans: &[Plan],
    states: &mut [Vec<State>],
    reserve: Amount,
    trim: Option<Trim>,
    now: i64,
) -> CheckOutcome {
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            meter.advance(state, now);
        }
    }
    let takes = |plan: &Plan, states: &[State], amount: Amount| {
        plan.meters.iter().zip(states).all(|(meter, state)| {
            let need = counted(amount, meter.money()).max(1);
            meter.status(state, now, need).retry_ms == 0
        })
    };
    // Shadow limits never decide.
    let fits = |states: &[Vec<State>], amount: Amount| {
        plans
            .iter()
            .zip(states)
            .all(|(plan, states)| plan.shadow || takes(plan, states, amount))
    };
    // Under `trim` the whole reserve must fit what is left (a reserve beyond a budget is not
    // admitted on a whole budget, as an untrimmed one is): else the largest grant that does.
    let (allowed, granted) = match trim {
        None => (fits(states, reserve), None),
        Some(trim) => match grant(plans, states, reserve, &trim, now) {
            Some(g) if g == reserve => (fits(states, g), None),
            Some(g) => (fits(states, g), Some(g)),
            None => (false, None),
        },
    };
    let granted = granted.filter(|_| allowed);
    let reserve = granted.unwrap_or(reserve);
    let shadow_denied = plans
        .iter()
        .zip(states.iter())
        .map(|(plan, states)| plan.shadow && !takes(plan, states, reserve))
        .collect();
    let need = |m: &Meter| counted(reserve, m.money()).max(1);
    let statuses = plans
        .iter()
        .zip(states.iter_mut())
        .map(|(plan, states)| {
            plan.meters
                .iter()
                .zip(states.iter_mut())
                .map(|(meter, state)| {
                    let reserve = counted(reserve, meter.money());
                    if allowed && reserve > 0 {
                        meter.charge(state, reserve);
                    }
                    meter.status(state, now, need(meter))
                })
                .collect()
        })
        .collect();
    CheckOutcome {
        allowed,
        statuses,
        at_ms: now,
        granted,
        shadow_denied,
    }
}

/// The largest grant of at least `trim.min` tokens every meter can take now (states advanced),
/// and what it costs; `None` when there is none.
fn grant(
    plans: &[Plan],
    states: &[Vec<State>],
    reserve: Amount,
    trim: &Trim,
    now: i64,
) -> Option<Amount> {
    let mut tokens = reserve.tokens;
    for (plan, states) in plans.iter().zip(states).filter(|(p, _)| !p.shadow) {
        for (meter, state) in plan.meters.iter().zip(states) {
            let remaining = meter.status(state, now, 1).remaining.max(0) as u64;
            let most = match meter.money() {
                None => Some(remaining),
                Some(_) => trim.tokens_for(reserve, remaining),
            };
            tokens = tokens.min(most?);
        }
    }
    (tokens >= trim.min).then(|| Amount::new(tokens, trim.cost(reserve, tokens)))
}

/// A report that brought one meter's spend to alert thresholds not yet raised in its window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The plan and its meter, in the request's order.
    pub plan: usize,
    pub meter: usize,
    /// The thresholds newly reached, ascending.
    pub thresholds: Vec<Threshold>,
    /// The meter's spend after the report (it may pass the budget), and its budget.
    pub used: i64,
    pub budget: i64,
    /// The window the alerts are raised once in: `[start, end)`, ms since the epoch.
    pub window: (i64, i64),
}

/// What one meter's alerts have raised: `[window start, highest threshold raised (‰)]`. Kept
/// beside the meter's state, so every replica sees it and it expires with the counter.
pub type AlertMark = [i64; 2];

/// The thresholds of `alerts` that meter `m` (state advanced to `now`) has newly reached, if
/// any, with its spend and alert window; `mark` then records them. A threshold is raised once
/// per window, however the spend falls and rises again in it (`limiter.lua` mirrors this).
pub fn crossed(
    alerts: &[Threshold],
    m: &Meter,
    state: &State,
    mark: &mut AlertMark,
    now: i64,
) -> Option<(Vec<Threshold>, i64, (i64, i64))> {
    let used = m.used(state, now)?;
    let window = m.alert_window(now)?;
    // A mark from a later window (a replica whose clock is ahead wrote it) stands.
    if mark[0] > window.0 {
        return None;
    }
    let raised = if mark[0] == window.0 { mark[1] } else { 0 };
    let budget = m.limit();
    let new: Vec<Threshold> = alerts
        .iter()
        .copied()
        .filter(|t| i64::from(t.permille()) > raised && t.reached(used, budget))
        .collect();
    let highest = new.last()?;
    *mark = [window.0, i64::from(highest.permille())];
    Some((new, used, window))
}

/// Applies a settlement to loaded states; with `marks` (a report's settlement: per plan, one
/// per meter of a plan with alerts, else none), the alert thresholds it brought meters to.
pub fn settle_states(
    plans: &[Plan],
    states: &mut [Vec<State>],
    marks: Option<&mut [Vec<AlertMark>]>,
    s: &Settlement,
    now: i64,
) -> Vec<Crossing> {
    for (plan, states) in plans.iter().zip(states.iter_mut()) {
        for (meter, state) in plan.meters.iter().zip(states.iter_mut()) {
            meter.advance(state, now);
            meter.charge(state, counted(s.excess, meter.money()));
            meter.refund(
                state,
                counted(s.refund, meter.money()),
                s.refund_at.unwrap_or(now),
            );
        }
    }
    let Some(marks) = marks else {
        return Vec::new();
    };
    let mut crossings = Vec::new();
    for (p, ((plan, states), marks)) in plans.iter().zip(states.iter()).zip(marks).enumerate() {
        for (i, ((meter, state), mark)) in plan.meters.iter().zip(states).zip(marks).enumerate() {
            if let Some((thresholds, used, window)) = crossed(&plan.alerts, meter, state, mark, now)
            {
                crossings.push(Crossing {
                    plan: p,
                    meter: i,
                    thresholds,
                    used,
                    budget: meter.limit(),
                    window,
                });
            }
        }
    }
    crossings
}
