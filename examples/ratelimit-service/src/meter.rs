//! The counting algorithms, as pure functions over a three-number state so that the memory
//! store runs them directly and the Redis store's Lua script mirrors them line by line.
//!
//! All arithmetic is in integers except the sliding window's weight of the previous window,
//! which both implementations compute with the same IEEE double operations.

/// What a meter counts: tokens (`None`), or micro units of a currency (an ISO 4217 code).
pub type Money = Option<[u8; 3]>;

/// The figure of a request's amount a meter with this money is charged: its tokens, or its
/// cost. Amounts are held to `wire::MAX_AMOUNT`, far inside the stores' integers.
pub fn counted(amount: wire::Amount, money: Money) -> i64 {
    amount.counted(money.is_some()).min(wire::MAX_AMOUNT) as i64
}

/// How one budget is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    /// Plugin-owned rate: `budget` (in the meter's unit) per `window_ms`, sliding (previous
    /// window weighted by overlap) or fixed.
    Window {
        budget: i64,
        window_ms: i64,
        sliding: bool,
        money: Money,
    },
    /// Plugin-owned calendar rate: `budget` in the period `[start_ms, end_ms)` that holds now
    /// (the service computed it in the rate's time zone); `zone` names the period and zone so
    /// that every month of one rate shares one stored state. State: `[start, used, end]`.
    Calendar {
        budget: i64,
        start_ms: i64,
        end_ms: i64,
        zone: i64,
        money: Money,
    },
    /// Service-owned rule: a bucket of `max` that starts full and gains `per_fill` every
    /// `interval_ms`, keeping partial intervals; it may go into debt.
    Bucket {
        max: i64,
        per_fill: i64,
        interval_ms: i64,
        expire_ms: i64,
    },
}

/// A meter's stored state. Window: `[window_start, current, previous]`.
/// Bucket: `[tokens, last_refill_ms, initialised]`.
pub type State = [i64; 3];

/// What a meter says at one instant, for `need` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The budget (`tokens`, or the bucket's `max`).
    pub limit: i64,
    /// Left now, clamped to `[0, limit]`.
    pub remaining: i64,
    /// Until the meter is back to its full budget, if nothing more is spent.
    pub reset_ms: i64,
    /// Until `remaining ≥ need`; 0 when it already is.
    pub retry_ms: i64,
}

impl Meter {
    pub fn limit(&self) -> i64 {
        match *self {
            Meter::Window { budget, .. } | Meter::Calendar { budget, .. } => budget,
            Meter::Bucket { max, .. } => max,
        }
    }

    /// The currency a meter counts in, if it counts money.
    pub fn money(&self) -> Money {
        match *self {
            Meter::Window { money, .. } | Meter::Calendar { money, .. } => money,
            Meter::Bucket { .. } => None,
        }
    }

    /// The name under which the meter's state is stored inside its counter: its identity,
    /// which is the window's length or the calendar period, never its budget. A budget edited
    /// mid-window (or two Envoys of a rolling deploy with different budgets, or a service
    /// restarted with another `--window`) keeps counting what was spent; the budget is applied
    /// when checking. A meter that counts money starts with `$<currency>:`.
    pub fn field(&self) -> String {
        let plain = match *self {
            Meter::Window { window_ms, .. } => format!("t:{window_ms}"),
            Meter::Calendar { zone, .. } => format!("c:{zone}"),
            Meter::Bucket {
                max,
                per_fill,
                interval_ms,
                ..
            } => format!("b:{max}:{per_fill}:{interval_ms}"),
        };
        match self.money() {
            Some(c) => format!("${}:{plain}", String::from_utf8_lossy(&c)),
            None => plain,
        }
    }

    /// The field a stored field is counted under now: itself, or for a field written before
    /// budgets left the identity (`w:<tokens>:<ms>`, `f:<tokens>:<ms>`, `c:<tokens>:<zone>`),
    /// the field that replaces it (the Redis script adopts such a state the first time).
    pub fn identity(field: &str) -> String {
        let (prefix, rest) = match field.strip_prefix('$').and_then(|r| r.split_once(':')) {
            Some((code, rest)) => (format!("${code}:"), rest),
            None => (String::new(), field),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.as_slice() {
            ["w" | "f", _, ms] => format!("{prefix}t:{ms}"),
            ["c", _, zone] => format!("{prefix}c:{zone}"),
            _ => field.to_string(),
        }
    }

    /// The meter a stored field describes (for read-only lookups): `budget` is the one stored
    /// beside its state (fields written before that name theirs), `sliding` how the service
    /// counts windows now.
    pub fn from_field(field: &str, budget: Option<i64>, sliding: bool) -> Option<Meter> {
        let (money, field) = match field.strip_prefix('$') {
            Some(rest) => {
                let (code, field) = rest.split_once(':')?;
                (Some(<[u8; 3]>::try_from(code.as_bytes()).ok()?), field)
            }
            None => (None, field),
        };
        let mut parts = field.split(':');
        let kind = parts.next()?;
        let nums: Vec<i64> = parts.map(|p| p.parse().ok()).collect::<Option<_>>()?;
        let budget = budget.filter(|b| *b > 0);
        match (kind, nums.as_slice()) {
            ("t", [window_ms]) if *window_ms > 0 => Some(Meter::Window {
                budget: budget?,
                window_ms: *window_ms,
                sliding,
                money,
            }),
            ("w" | "f", [tokens, window_ms]) if *tokens > 0 && *window_ms > 0 => {
                Some(Meter::Window {
                    budget: *tokens,
                    window_ms: *window_ms,
                    sliding: kind == "w",
                    money,
                })
            }
            // The period's bounds are in the stored state.
            ("c", [zone]) => Some(Meter::Calendar {
                budget: budget?,
                start_ms: 0,
                end_ms: 0,
                zone: *zone,
                money,
            }),
            ("c", [tokens, zone]) if *tokens > 0 => Some(Meter::Calendar {
                budget: *tokens,
                start_ms: 0,
                end_ms: 0,
                zone: *zone,
                money,
            }),
            ("b", [max, per_fill, interval_ms])
                if *max > 0 && *per_fill > 0 && *interval_ms > 0 =>
            {
                Some(Meter::Bucket {
                    max: *max,
                    per_fill: *per_fill,
                    interval_ms: *interval_ms,
                    expire_ms: 0,
                })
            }
            _ => None,
        }
    }

    /// A stored meter as it stands at `now`, without changing what is stored (`/v1/quota`).
    pub fn inspect(
        field: &str,
        mut state: State,
        budget: Option<i64>,
        now: i64,
        sliding: bool,
    ) -> Option<(Meter, Status)> {
        let meter = Meter::from_field(field, budget, sliding)?;
        meter.advance(&mut state, now);
        Some((meter, meter.status(&state, now, 1)))
    }

    /// How long an untouched state still matters.
    pub fn ttl_ms(&self) -> i64 {
        match *self {
            Meter::Window {
                window_ms, sliding, ..
            } => window_ms * if sliding { 2 } else { 1 },
            Meter::Calendar {
                start_ms, end_ms, ..
            } => (end_ms - start_ms).max(1),
            Meter::Bucket { expire_ms, .. } => expire_ms,
        }
    }

    /// Brings the state up to `now`: windows roll over, buckets refill.
    pub fn advance(&self, s: &mut State, now: i64) {
        match *self {
            Meter::Window {
                window_ms, sliding, ..
            } => {
                let start = now - now.rem_euclid(window_ms);
                // A clock behind the one that last wrote (another replica) never moves the
                // window back: it keeps counting in the newer one.
                if start <= s[0] {
                    return;
                }
                let previous = if sliding && s[0] == start - window_ms {
                    s[1]
                } else {
                    0
                };
                *s = [start, 0, previous];
            }
            Meter::Calendar {
                start_ms, end_ms, ..
            } => {
                // As with windows, a period never moves back.
                if start_ms > s[0] {
                    *s = [start_ms, 0, end_ms];
                }
            }
            Meter::Bucket {
                max,
                per_fill,
                interval_ms,
                ..
            } => {
                if s[2] == 0 {
                    *s = [max, now, 1];
                    return;
                }
                if now <= s[1] {
                    return;
                }
                let intervals = (now - s[1]) / interval_ms;
                if intervals > 0 {
                    s[0] = max.min(s[0].saturating_add(intervals.saturating_mul(per_fill)));
                    s[1] += intervals * interval_ms;
                    if s[0] >= max {
                        // Full: no credit accrues while full.
                        s[1] = now;
                    }
                }
            }
        }
    }

    /// The meter at `now` (state already advanced), for a request needing `need` tokens.
    pub fn status(&self, s: &State, now: i64, need: i64) -> Status {
        let limit = self.limit();
        let need = need.clamp(1, limit);
        match *self {
            Meter::Window {
                budget,
                window_ms: w,
                sliding,
                ..
            } => {
                let elapsed = (now - s[0]).clamp(0, w);
                let used = window_used(s, elapsed, w, sliding);
                let remaining = (budget - used).clamp(0, budget);
                let reset_ms = if s[1] > 0 {
                    s[0] + if sliding { 2 * w } else { w } - now
                } else if sliding && s[2] > 0 {
                    s[0] + w - now
                } else {
                    0
                };
                let retry_ms = if remaining >= need {
                    0
                } else {
                    let allowed = budget - need;
                    let at = if !sliding || s[1] > allowed {
                        // Wait for the next window, where the current one becomes "previous".
                        let next = s[0] + w;
                        if sliding {
                            next + time_to_decay(s[1], allowed, w)
                        } else {
                            next
                        }
                    } else {
                        s[0] + time_to_decay(s[2], allowed - s[1], w)
                    };
                    (at - now).max(1)
                };
                Status {
                    limit,
                    remaining,
                    reset_ms,
                    retry_ms,
                }
            }
            Meter::Calendar { budget, .. } => {
                if now >= s[2] {
                    // The stored period is over (read-only lookups): a full budget.
                    return Status {
                        limit,
                        remaining: budget,
                        reset_ms: 0,
                        retry_ms: 0,
                    };
                }
                let remaining = (budget - s[1].max(0)).clamp(0, budget);
                let until_end = (s[2] - now).max(1);
                Status {
                    limit,
                    remaining,
                    reset_ms: if s[1] > 0 { until_end } else { 0 },
                    retry_ms: if remaining >= need { 0 } else { until_end },
                }
            }
            Meter::Bucket {
                max,
                per_fill,
                interval_ms,
                ..
            } => {
                let remaining = s[0].clamp(0, max);
                let until = |target: i64| -> i64 {
                    if s[0] >= target {
                        return 0;
                    }
                    let intervals = (target - s[0] + per_fill - 1) / per_fill;
                    (s[1] + intervals.saturating_mul(interval_ms) - now).max(1)
                };
                Status {
                    limit,
                    remaining,
                    reset_ms: until(max),
                    retry_ms: until(need),
                }
            }
        }
    }

    /// What the meter has spent at `now` (state advanced), not clamped to its budget: a report
    /// beyond its reservation may carry it past. `None` for a bucket, which holds no spend.
    pub fn used(&self, s: &State, now: i64) -> Option<i64> {
        match *self {
            Meter::Window {
                window_ms: w,
                sliding,
                ..
            } => Some(window_used(s, (now - s[0]).clamp(0, w), w, sliding)),
            Meter::Calendar { .. } => Some(if now >= s[2] { 0 } else { s[1].max(0) }),
            Meter::Bucket { .. } => None,
        }
    }

    /// The window an alert is raised once in, `[start, end)` at `now`: a calendar period, or
    /// the fixed window of the rate's length that holds `now` (for a sliding window too, so an
    /// alert comes at most once per window length). `None` for a bucket.
    pub fn alert_window(&self, now: i64) -> Option<(i64, i64)> {
        match *self {
            Meter::Window { window_ms, .. } => {
                let start = now - now.rem_euclid(window_ms);
                Some((start, start + window_ms))
            }
            Meter::Calendar {
                start_ms, end_ms, ..
            } => Some((start_ms, end_ms)),
            Meter::Bucket { .. } => None,
        }
    }

    /// Spends `delta` tokens now (negative refunds, for a reservation taken in this window).
    pub fn charge(&self, s: &mut State, delta: i64) {
        match self {
            Meter::Window { .. } | Meter::Calendar { .. } => s[1] = s[1].saturating_add(delta),
            Meter::Bucket { max, .. } => s[0] = s[0].saturating_sub(delta).min(*max),
        }
    }

    /// Gives back `amount` tokens of a reservation taken at `reserved_at` (state advanced to
    /// now). A window gets them back only while it still counts — the current one, or the
    /// previous one of a sliding window — and never below zero, so a late refund cannot
    /// enlarge a later window; a bucket never above its maximum.
    pub fn refund(&self, s: &mut State, amount: i64, reserved_at: i64) {
        if amount <= 0 {
            return;
        }
        match *self {
            Meter::Window {
                window_ms, sliding, ..
            } => {
                let start = reserved_at - reserved_at.rem_euclid(window_ms);
                let slot = if start >= s[0] {
                    1
                } else if sliding && start == s[0] - window_ms {
                    2
                } else {
                    return;
                };
                if s[slot] > 0 {
                    s[slot] = (s[slot] - amount).max(0);
                }
            }
            Meter::Calendar { .. } => {
                // Only the period that holds the reservation gets it back.
                if reserved_at >= s[0] && s[1] > 0 {
                    s[1] = (s[1] - amount).max(0);
                }
            }
            Meter::Bucket { max, .. } => s[0] = s[0].saturating_add(amount).min(max),
        }
    }
}

/// Tokens counted against the window `elapsed` ms into it.
fn window_used(s: &State, elapsed: i64, w: i64, sliding: bool) -> i64 {
    let weighted = if sliding && s[2] != 0 {
        ((s[2] as f64) * ((w - elapsed) as f64) / (w as f64)).ceil() as i64
    } else {
        0
    };
    (s[1] + weighted).max(0)
}

/// Time into a window after which `amount`, decaying linearly over it, is ≤ `allowed`.
fn time_to_decay(amount: i64, allowed: i64, w: i64) -> i64 {
    if amount <= allowed {
        return 0;
    }
    let allowed = allowed.max(0);
    ((w as f64) - (allowed as f64) * (w as f64) / (amount as f64)).ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn sliding(tokens: i64) -> Meter {
        Meter::Window {
            budget: tokens,
            window_ms: MIN,
            sliding: true,
            money: None,
        }
    }

    fn at(m: &Meter, s: &mut State, now: i64, need: i64) -> Status {
        m.advance(s, now);
        m.status(s, now, need)
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let m = sliding(100);
        let mut s = State::default();
        assert_eq!(
            at(&m, &mut s, 0, 1),
            Status {
                limit: 100,
                remaining: 100,
                reset_ms: 0,
                retry_ms: 0
            }
        );
        m.charge(&mut s, 80);
        let st = at(&m, &mut s, 30_000, 1);
        assert_eq!((st.remaining, st.reset_ms), (20, 90_000));
        // Half-way through the next window, half of the previous window still counts.
        let st = at(&m, &mut s, 90_000, 1);
        assert_eq!((st.remaining, st.reset_ms), (60, 30_000));
        // Two windows later nothing counts.
        assert_eq!(at(&m, &mut s, 185_000, 1).remaining, 100);
    }

    #[test]
    fn sliding_retry_after_is_when_the_need_fits() {
        let m = sliding(100);
        let mut s = State::default();
        at(&m, &mut s, 0, 1);
        m.charge(&mut s, 100);
        let st = at(&m, &mut s, 10_000, 1);
        assert_eq!(st.remaining, 0);
        // Next window starts at 60 s; 1 token fits once 99/100 of it remains: 0.6 s in.
        assert_eq!(st.retry_ms, 60_000 + 600 - 10_000);
        let mut later = s;
        let st = at(&m, &mut later, 10_000 + st.retry_ms, 1);
        assert!(st.remaining >= 1, "{st:?}");
        let mut earlier = s;
        assert_eq!(at(&m, &mut earlier, 60_000 + 599, 1).remaining, 0);
    }

    #[test]
    fn debt_clamps_remaining_to_zero() {
        let m = sliding(10);
        let mut s = State::default();
        at(&m, &mut s, 0, 1);
        m.charge(&mut s, 500);
        let st = at(&m, &mut s, 1, 1);
        assert_eq!(st.remaining, 0);
        assert!(st.retry_ms > 60_000);
        m.charge(&mut s, -495);
        assert_eq!(at(&m, &mut s, 2, 1).remaining, 5);
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let m = Meter::Window {
            budget: 10,
            window_ms: MIN,
            sliding: false,
            money: None,
        };
        let mut s = State::default();
        at(&m, &mut s, 5_000, 1);
        m.charge(&mut s, 10);
        let st = at(&m, &mut s, 20_000, 1);
        assert_eq!(
            (st.remaining, st.reset_ms, st.retry_ms),
            (0, 40_000, 40_000)
        );
        assert_eq!(at(&m, &mut s, 60_000, 1).remaining, 10);
    }

    #[test]
    fn need_larger_than_the_budget_waits_for_a_full_budget() {
        let m = sliding(100);
        let mut s = State::default();
        assert_eq!(at(&m, &mut s, 0, 1_000).retry_ms, 0);
        m.charge(&mut s, 1);
        assert!(at(&m, &mut s, 1, 1_000).retry_ms > 0);
    }

    #[test]
    fn bucket_starts_full_refills_by_interval_and_keeps_partial_intervals() {
        let m = Meter::Bucket {
            max: 100,
            per_fill: 10,
            interval_ms: 1_000,
            expire_ms: 600_000,
        };
        let mut s = State::default();
        assert_eq!(at(&m, &mut s, 5_000, 1).remaining, 100);
        m.charge(&mut s, 150); // debt
        let st = at(&m, &mut s, 5_500, 1);
        assert_eq!(st.remaining, 0);
        // -50 needs 6 fills to reach 1 token, counted from the last refill (5 000).
        assert_eq!(st.retry_ms, 5_000 + 6_000 - 5_500);
        assert_eq!(st.reset_ms, 5_000 + 15_000 - 5_500);
        // 2.5 intervals later: 2 fills, the half interval is kept.
        let st = at(&m, &mut s, 7_500, 1);
        assert_eq!(s, [-30, 7_000, 1]);
        assert_eq!(st.remaining, 0);
        at(&m, &mut s, 8_000, 1);
        assert_eq!(s[0], -20);
        // Never above max.
        assert_eq!(at(&m, &mut s, 100_000, 1).remaining, 100);
        assert_eq!(s[1], 100_000);
    }

    #[test]
    fn refunds_never_overfill_a_bucket() {
        let m = Meter::Bucket {
            max: 100,
            per_fill: 10,
            interval_ms: 1_000,
            expire_ms: 600_000,
        };
        let mut s = State::default();
        at(&m, &mut s, 0, 1);
        m.charge(&mut s, -50);
        assert_eq!(at(&m, &mut s, 0, 1).remaining, 100);
    }
}
