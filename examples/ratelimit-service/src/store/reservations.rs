//! Which checks of each plugin VM took a reservation, so that a release (a report for a check
//! whose answer the plugin never saw) gives a reservation back only if it exists, and once.
//!
//! A check id is `<source>-<sequence>`; per source the store keeps the last [`SLOTS`]
//! sequences in a ring of two bits each (reserved, released) under a high-water mark, so the
//! state grows with sources, never with requests. A sequence that has left the ring is
//! unknown: its release gives nothing back (the client may be over-charged, never the budget
//! overdrawn). The Redis store keeps the same ring in a bit string (`ring.lua`).

/// Sequences remembered per source.
pub const SLOTS: u64 = 65_536;
/// How long an idle source's ring is kept.
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

/// One source's ring.
#[derive(Debug, Clone)]
pub struct Ring {
    /// The highest sequence seen; `None` before the first.
    high: Option<u64>,
    /// Two bits per slot, slot = sequence mod [`SLOTS`].
    bits: Vec<u64>,
    /// When the ring was last used (ms), for expiry.
    pub touched: i64,
}

impl Default for Ring {
    fn default() -> Ring {
        Ring {
            high: None,
            bits: vec![0; (SLOTS * 2 / 64) as usize],
            touched: 0,
        }
    }
}

impl Ring {
    /// The flags of `seq`; `None` when it is older than the ring remembers.
    fn flags(&self, seq: u64) -> Option<u8> {
        match self.high {
            Some(high) if seq.saturating_add(SLOTS) <= high => None,
            Some(high) if seq <= high => {
                let (word, shift) = Self::at(seq);
                Some(((self.bits[word] >> shift) & 3) as u8)
            }
            _ => Some(0),
        }
    }

    fn at(seq: u64) -> (usize, u32) {
        let bit = (seq % SLOTS) * 2;
        ((bit / 64) as usize, (bit % 64) as u32)
    }

    /// Sets the flags of `seq`, first forgetting the slots a new high-water mark overtakes.
    fn set(&mut self, seq: u64, flags: u8) {
        match self.high {
            Some(high) if seq <= high => {}
            Some(high) if seq - high < SLOTS => {
                for s in high + 1..seq {
                    self.put(s, 0);
                }
                self.high = Some(seq);
            }
            _ => {
                self.bits.iter_mut().for_each(|w| *w = 0);
                self.high = Some(seq);
            }
        }
        self.put(seq, flags);
    }

    fn put(&mut self, seq: u64, flags: u8) {
        let (word, shift) = Self::at(seq);
        self.bits[word] = (self.bits[word] & !(3 << shift)) | (u64::from(flags) << shift);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_gives_back_only_a_recorded_reservation_and_only_once() {
        let mut r = Ring::default();
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
        let mut r = Ring::default();
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
}
