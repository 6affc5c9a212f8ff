//! What the stores remember per source (a plugin VM, the first half of its ids
//! `<source>-<sequence>`), so that this state grows with sources, never with requests:
//!
//! * which of its checks took a reservation, so a release (a report for a check whose answer
//!   the plugin never saw) gives a reservation back only if it exists, and once: two bits per
//!   check id (reserved, released) for the last [`RESERVATION_SLOTS`] ids;
//! * which of its reports were applied, so a retry is never charged twice: one bit per report
//!   id for the last [`wire::REPORT_WINDOW`] ids.
//!
//! Each is a ring under a high-water mark. An id that has left its ring is unknown: its release
//! gives nothing back (the client may be over-charged, never the budget overdrawn), and a report
//! that old is refused (the plugin never sends one). The Redis store keeps the same rings in bit
//! strings (`ring.lua`, `limiter.lua`).

/// Check ids remembered per source.
pub const RESERVATION_SLOTS: u64 = 65_536;
/// How long an idle source's rings are kept.
pub const TTL_MS: i64 = 15 * 60 * 1000;

const RESERVED: u8 = 1;
const RELEASED: u8 = 2;

/// What recording a reservation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Recorded: a later release will give it back.
    Recorded,
    /// The check's release came first: the reservation must not stand.
    Released,
    /// Too old for the ring: it stands, unrecorded.
    Unknown,
}

impl Mark {
    /// The Redis script's answer (see `ring.lua`).
    pub fn from_code(code: i64) -> Mark {
        match code {
            1 => Mark::Recorded,
            0 => Mark::Released,
            _ => Mark::Unknown,
        }
    }
}

/// Whether a report id is seen for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    First,
    Duplicate,
    /// Older than the source's window: cannot be told apart, refused.
    Stale,
}

impl Dedup {
    /// The Redis script's answer (see `limiter.lua`).
    pub fn from_code(code: i64) -> Dedup {
        match code {
            1 => Dedup::First,
            0 => Dedup::Duplicate,
            _ => Dedup::Stale,
        }
    }
}

/// Flags of `width` bits for the last `slots` sequence numbers.
#[derive(Debug, Clone)]
pub struct Ring {
    /// The highest sequence seen; `None` before the first.
    high: Option<u64>,
    words: Vec<u64>,
    slots: u64,
    width: u64,
}

impl Ring {
    pub fn new(slots: u64, width: u64) -> Ring {
        Ring {
            high: None,
            words: vec![0; (slots * width).div_ceil(64) as usize],
            slots,
            width,
        }
    }

    /// The flags of `seq`; `None` when it is older than the ring remembers.
    fn flags(&self, seq: u64) -> Option<u8> {
        match self.high {
            Some(high) if seq.saturating_add(self.slots) <= high => None,
            Some(high) if seq <= high => {
                let (word, shift) = self.at(seq);
                Some(((self.words[word] >> shift) & self.mask()) as u8)
            }
            _ => Some(0),
        }
    }

    fn mask(&self) -> u64 {
        (1 << self.width) - 1
    }

    fn at(&self, seq: u64) -> (usize, u64) {
        let bit = (seq % self.slots) * self.width;
        ((bit / 64) as usize, bit % 64)
    }

    /// Sets the flags of `seq`, first forgetting the slots a new high-water mark overtakes.
    fn set(&mut self, seq: u64, flags: u8) {
        match self.high {
            Some(high) if seq <= high => {}
            Some(high) if seq - high < self.slots => {
                for s in high + 1..seq {
                    self.put(s, 0);
                }
                self.high = Some(seq);
            }
            _ => {
                self.words.iter_mut().for_each(|w| *w = 0);
                self.high = Some(seq);
            }
        }
        self.put(seq, flags);
    }

    fn put(&mut self, seq: u64, flags: u8) {
        let (word, shift) = self.at(seq);
        let mask = self.mask() << shift;
        self.words[word] = (self.words[word] & !mask) | ((u64::from(flags) << shift) & mask);
    }

    /// A check with id `seq` took its reservation.
    pub fn mark(&mut self, seq: u64) -> Mark {
        match self.flags(seq) {
            None => Mark::Unknown,
            Some(f) if f & RELEASED != 0 => Mark::Released,
            Some(_) => {
                self.set(seq, RESERVED);
                Mark::Recorded
            }
        }
    }

    /// Releases check `seq`: `true` when its reservation had been recorded and not released.
    pub fn release(&mut self, seq: u64) -> bool {
        match self.flags(seq) {
            None => false,
            Some(f) => {
                self.set(seq, RELEASED);
                f == RESERVED
            }
        }
    }

    /// Report `seq` arrives: is it new? (Marks it seen.)
    pub fn first_time(&mut self, seq: u64) -> Dedup {
        match self.flags(seq) {
            None => Dedup::Stale,
            Some(0) => {
                self.set(seq, 1);
                Dedup::First
            }
            Some(_) => Dedup::Duplicate,
        }
    }
}

/// Everything remembered of one source.
#[derive(Debug, Clone)]
pub struct SourceLog {
    pub reservations: Ring,
    pub reports: Ring,
    /// When the source was last heard of (ms), for expiry.
    pub touched: i64,
}

impl Default for SourceLog {
    fn default() -> SourceLog {
        SourceLog {
            reservations: Ring::new(RESERVATION_SLOTS, 2),
            reports: Ring::new(wire::REPORT_WINDOW, 1),
            touched: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: u64 = RESERVATION_SLOTS;

    #[test]
    fn a_release_gives_back_only_a_recorded_reservation_and_only_once() {
        let mut r = Ring::new(SLOTS, 2);
        assert_eq!(r.mark(5), Mark::Recorded);
        assert!(r.release(5));
        assert!(!r.release(5), "released once");
        assert!(!r.release(6), "never reserved");
        assert_eq!(r.mark(6), Mark::Released, "the release came first");
        // Out of order within the ring is fine.
        assert_eq!(r.mark(100), Mark::Recorded);
        assert_eq!(r.mark(50), Mark::Recorded);
        assert!(r.release(50));
    }

    #[test]
    fn old_sequences_are_unknown_and_overtaken_slots_are_forgotten() {
        let mut r = Ring::new(SLOTS, 2);
        assert_eq!(r.mark(1), Mark::Recorded);
        assert_eq!(r.mark(1 + SLOTS), Mark::Recorded);
        assert_eq!(r.mark(1), Mark::Unknown);
        assert!(!r.release(1));
        // A release before its check (a check still on its way) keeps the check from
        // reserving when it arrives.
        assert!(!r.release(2 + SLOTS));
        assert_eq!(r.mark(2 + SLOTS), Mark::Released);
        // The slots a new high-water mark overtakes start clean.
        assert_eq!(r.mark(3 + SLOTS), Mark::Recorded);
        assert_eq!(r.mark(2 + 2 * SLOTS), Mark::Recorded);
        assert!(!r.release(2 + 2 * SLOTS - 1));
        // A jump past the whole ring forgets everything.
        assert_eq!(r.mark(10 * SLOTS), Mark::Recorded);
        assert!(!r.release(10 * SLOTS - 1));
        assert!(r.release(10 * SLOTS));
    }

    #[test]
    fn report_ids_are_recognised_within_the_window() {
        let mut r = Ring::new(wire::REPORT_WINDOW, 1);
        assert_eq!(r.first_time(10), Dedup::First);
        assert_eq!(r.first_time(10), Dedup::Duplicate);
        assert_eq!(
            r.first_time(3),
            Dedup::First,
            "out of order within the window"
        );
        assert_eq!(r.first_time(3), Dedup::Duplicate);
        let later = 10 + wire::REPORT_WINDOW;
        assert_eq!(r.first_time(later), Dedup::First);
        assert_eq!(r.first_time(10), Dedup::Stale);
        assert_eq!(
            r.first_time(11),
            Dedup::First,
            "the slot of 11 was never used"
        );
        assert_eq!(r.first_time(later + 1), Dedup::First);
    }
}
