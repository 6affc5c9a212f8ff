//! What the operator console shows, kept bounded whatever the traffic: the heaviest keys per
//! limit (a space-saving summary), the most recent denials, and tokens and money per minute.
//! The memory store keeps them here; the Redis store keeps the same shapes in Redis, shared by
//! every replica (`insights.lua`, see [`super::redis`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Keys kept per limit: any key that used more than 1/64 of a limit's tokens is among them.
pub const TOP_K: usize = 64;
/// Limits tracked (limit names come from plugin configurations).
pub const MAX_LIMITS: usize = 256;
/// Denials kept, newest first.
pub const DENIALS: usize = 100;
/// Alerts the console keeps, newest first.
pub const ALERTS: usize = 100;
/// Minutes of history.
pub const MINUTES: usize = 15;
/// The longest key value kept in the console's data (longer ones are cut, as the plugin cuts
/// what it sends).
pub const MAX_VALUE: usize = 256;

/// The space-saving summary (Metwally et al.): at most `capacity` keys; a new key, when full,
/// replaces the one counted least and inherits its count as its possible overestimate. Every
/// key whose true count exceeds `total / capacity` is kept, and no count is under its true one.
#[derive(Debug, Clone, Default)]
pub struct SpaceSaving {
    capacity: usize,
    /// key → (count, overestimate).
    entries: HashMap<String, (u64, u64)>,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    /// Counts `amount` for `key`; a negative amount (a refund) lowers a key already kept, and
    /// is dropped for one that is not.
    pub fn add(&mut self, key: &str, amount: i64) {
        if let Some((count, _)) = self.entries.get_mut(key) {
            *count = count.saturating_add_signed(amount);
            return;
        }
        let Ok(amount) = u64::try_from(amount) else {
            return;
        };
        if self.entries.len() < self.capacity {
            self.entries.insert(key.to_string(), (amount, 0));
            return;
        }
        let Some((least, (floor, _))) = self
            .entries
            .iter()
            .min_by_key(|(k, (c, _))| (*c, k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
        else {
            return;
        };
        self.entries.remove(&least);
        self.entries
            .insert(key.to_string(), (floor.saturating_add(amount), floor));
    }

    /// The `n` heaviest keys, heaviest first.
    pub fn top(&self, n: usize) -> Vec<Heavy> {
        let mut all: Vec<Heavy> = self
            .entries
            .iter()
            .map(|(k, (c, e))| Heavy::stored(k, *c, *e))
            .collect();
        all.sort_by(|a, b| b.tokens.cmp(&a.tokens).then_with(|| a.value.cmp(&b.value)));
        all.truncate(n);
        all
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One of a limit's heaviest keys: the tokens counted for it, of which at most `over` may be
/// another key's (space-saving's bound).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heavy {
    pub value: String,
    /// The counter of a `shared` rule (its value is the rule's pattern): grants and resets
    /// must name it so, or they change another counter.
    pub shared: bool,
    pub tokens: u64,
    pub over: u64,
}

impl Heavy {
    /// A heavy hitter as stored: a [`member`] name and its counts.
    pub fn stored(member: &str, tokens: u64, over: u64) -> Heavy {
        let (value, shared) = match member.split_at_checked(1) {
            Some(("s", value)) => (value, true),
            Some(("v", value)) => (value, false),
            // Written before members said whether they are shared.
            _ => (member, false),
        };
        Heavy {
            value: value.to_string(),
            shared,
            tokens,
            over,
        }
    }
}

/// The name a counter is ranked under: its value, marked shared (`s`) or not (`v`), so a shared
/// pool and a client whose own value equals the pool's pattern rank apart.
pub fn member(value: &str, shared: bool) -> String {
    format!("{}{value}", if shared { 's' } else { 'v' })
}

/// Every limit seen, with its heaviest keys, heaviest first.
pub type Ranking = Vec<(String, Vec<Heavy>)>;

/// What the console is told: what reached the counters, or a denial.
pub enum ConsoleEvent {
    Charged {
        now_ms: i64,
        tokens: i64,
        spend: BTreeMap<String, i64>,
        used: BTreeMap<(String, String), i64>,
    },
    Denied(Denial),
    Alerted(AlertNote),
}

/// An alert raised, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AlertNote {
    pub at_ms: i64,
    pub limit: String,
    pub value: String,
    /// The fraction reached, e.g. `"0.8"`.
    pub threshold: String,
    /// Spent and budget, worded (`"8,123 tokens"`, `"412.50 USD"`).
    pub used: String,
    pub budget: String,
    /// The end of the window it was raised in (RFC 3339, UTC).
    pub window_end: String,
}

/// One denied check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Denial {
    pub at_ms: i64,
    pub limit: String,
    pub value: String,
    pub reason: String,
    /// A shadow limit would have denied: the check was admitted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// Tokens used and money spent in one minute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// The minute's start, ms since the epoch.
    pub minute_ms: i64,
    /// Net of refunds: a minute may give back more than it took.
    pub tokens: i64,
    /// Micro units spent (net of refunds) per currency.
    pub spend: BTreeMap<String, i64>,
}

/// The console's data in process (the memory store's side).
#[derive(Default)]
pub struct Board {
    top: Mutex<BTreeMap<String, SpaceSaving>>,
    denials: Mutex<VecDeque<Denial>>,
    alerts: Mutex<VecDeque<AlertNote>>,
    minutes: Mutex<VecDeque<Minute>>,
}

/// The start of the minute holding `now_ms`.
pub fn minute_of(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(60_000)
}

/// `value` cut to [`MAX_VALUE`] bytes at a character boundary.
pub fn bounded(value: &str) -> &str {
    cut(value, MAX_VALUE)
}

/// `s` cut to at most `n` bytes at a character boundary.
pub fn cut(s: &str, n: usize) -> &str {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

impl Board {
    /// `tokens` (or micro units, for a limit in money) charged under `limit` to `value`;
    /// negative: given back.
    pub fn used(&self, limit: &str, value: &str, tokens: i64) {
        if tokens == 0 {
            return;
        }
        let mut top = self.top.lock().unwrap_or_else(|p| p.into_inner());
        if !top.contains_key(limit) && top.len() >= MAX_LIMITS {
            return;
        }
        top.entry(limit.to_string())
            .or_insert_with(|| SpaceSaving::new(TOP_K))
            .add(bounded(value), tokens);
    }

    /// Tokens used and money spent (micro units per currency) now, for the timeline.
    pub fn per_minute(&self, now_ms: i64, tokens: i64, spend: &BTreeMap<String, i64>) {
        let minute_ms = minute_of(now_ms);
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        if minutes.back().is_none_or(|m| m.minute_ms < minute_ms) {
            minutes.push_back(Minute {
                minute_ms,
                ..Minute::default()
            });
            while minutes.len() > MINUTES {
                minutes.pop_front();
            }
        }
        // A report from a clock behind lands in the newest minute.
        if let Some(m) = minutes.back_mut() {
            m.tokens = m.tokens.saturating_add(tokens);
            for (currency, micros) in spend {
                *m.spend.entry(currency.clone()).or_default() += micros;
            }
        }
    }

    pub fn denied(&self, denial: Denial) {
        let mut d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        d.push_front(denial);
        d.truncate(DENIALS);
    }

    pub fn alerted(&self, note: AlertNote) {
        let mut a = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        a.push_front(note);
        a.truncate(ALERTS);
    }

    pub fn alerts(&self) -> Vec<AlertNote> {
        let a = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        a.iter().cloned().collect()
    }

    /// The limits seen, and the `n` heaviest keys of each.
    pub fn top(&self, n: usize) -> Ranking {
        let top = self.top.lock().unwrap_or_else(|p| p.into_inner());
        top.iter().map(|(l, s)| (l.clone(), s.top(n))).collect()
    }

    pub fn denials(&self) -> Vec<Denial> {
        let d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        d.iter().cloned().collect()
    }

    /// The last [`MINUTES`] minutes up to `now_ms`, oldest first, empty minutes included.
    pub fn timeline(&self, now_ms: i64) -> Vec<Minute> {
        let minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        timeline(now_ms, minutes.iter().cloned())
    }

    /// Entries held (keys across limits, denials, minutes): the memory bound's measure.
    pub fn size(&self) -> usize {
        let top = self.top.lock().unwrap_or_else(|p| p.into_inner());
        top.values().map(SpaceSaving::len).sum::<usize>()
            + self.denials.lock().map_or(0, |d| d.len())
            + self.alerts.lock().map_or(0, |a| a.len())
            + self.minutes.lock().map_or(0, |m| m.len())
    }
}

/// Fills the last [`MINUTES`] minutes up to `now_ms` from the minutes known.
pub fn timeline(now_ms: i64, known: impl Iterator<Item = Minute>) -> Vec<Minute> {
    let known: BTreeMap<i64, Minute> = known.map(|m| (m.minute_ms, m)).collect();
    let last = minute_of(now_ms);
    (0..MINUTES as i64)
        .rev()
        .map(|i| last - i * 60_000)
        .map(|minute_ms| {
            known.get(&minute_ms).cloned().unwrap_or(Minute {
                minute_ms,
                ..Minute::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_bound_and_keeps_the_heavy_ones() {
        let insights = Board::default();
        // Two heavy users among a million one-token keys, across more limits than are kept.
        for i in 0..1_000_000u64 {
            insights.used("per-user", &format!("flood-{i}"), 1);
            if i % 100 == 0 {
                insights.used("per-user", "alice", 50);
                insights.used("per-user", "bob", 20);
            }
            if i % 1000 == 0 {
                insights.used(&format!("limit-{i}"), "x", 1);
            }
        }
        let top = insights.top(2);
        let per_user = &top.iter().find(|(l, _)| l == "per-user").unwrap().1;
        assert_eq!(per_user[0].value, "alice");
        assert_eq!(per_user[1].value, "bob");
        // Never under the true count, and over it by at most total / capacity.
        let total = 1_000_000 + 10_000 * 70;
        let alice = per_user[0].tokens;
        assert!(
            (500_000..=500_000 + total / TOP_K as u64).contains(&alice),
            "{alice}"
        );
        assert!(per_user[0].over <= total / TOP_K as u64);
        assert!(insights.size() <= MAX_LIMITS * TOP_K, "{}", insights.size());
        assert_eq!(insights.top(1).len(), MAX_LIMITS);
        // A key of any length is kept at a bounded length.
        insights.used("per-user", &"k".repeat(10_000), i64::MAX);
        let top = insights.top(1);
        let per_user = &top.iter().find(|(l, _)| l == "per-user").unwrap().1;
        assert_eq!(per_user[0].value.len(), MAX_VALUE);
    }

    #[test]
    fn denials_and_minutes_are_bounded_rings() {
        let insights = Board::default();
        for i in 0..1_000 {
            insights.denied(Denial {
                at_ms: i,
                limit: "l".into(),
                value: format!("v{i}"),
                reason: "r".into(),
                shadow: false,
            });
            insights.per_minute(i * 30_000, 10, &BTreeMap::from([("USD".to_string(), 5)]));
        }
        let d = insights.denials();
        assert_eq!((d.len(), d[0].at_ms), (DENIALS, 999));
        let now = 999 * 30_000;
        let t = insights.timeline(now);
        assert_eq!(t.len(), MINUTES);
        assert_eq!(t.last().unwrap().minute_ms, minute_of(now));
        assert!(
            t.iter().all(|m| m.tokens == 20 && m.spend["USD"] == 10),
            "{t:?}"
        );
        // Minutes without traffic are there, empty.
        let later = insights.timeline(now + 5 * 60_000);
        assert_eq!(later.iter().filter(|m| m.tokens == 0).count(), 5);
    }
}
