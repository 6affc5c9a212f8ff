//! An admitted request's response as it streams by: its usage scanned, the usage the plugin
//! asked for (and the client did not) taken out, and the stream ended when its budget is spent
//! ([`crate::cutoff`]). The exchange owns one; the shell hands it the body a slice at a time.

use crate::cutoff::{Cut, Cutoff};
use crate::strip::Stripper;
use crate::usage::{BodyFormat, UsageScanner};

/// What the shell does with a response body chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChunk {
    /// Nothing: the body is not read.
    Pass,
    /// Read it a slice at a time ([`crate::exchange::Exchange::response_slice`] without an
    /// output); an end it answers is put in place after.
    Read,
    /// Rewrite it a slice at a time: each slice is replaced with what the exchange writes.
    Rewrite,
    /// The stream was ended: the chunk is dropped, and with `reset` the stream is reset.
    Drop { reset: bool },
}

/// What one slice of the body comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// Seen, and forwarded as it is.
    Pass,
    /// The stream ends after its first `keep` bytes.
    End { keep: usize },
    /// After the end: neither forwarded nor counted.
    Dropped,
}

/// See the module documentation.
pub struct Response {
    pub status: u32,
    /// `None` for a status other than 2xx, whose body is not read.
    pub scanner: Option<UsageScanner>,
    /// Takes the usage the plugin asked for (and the client did not) out of the stream.
    pub stripper: Option<Stripper>,
    /// The upstream's stream ended (a stream the plugin ended never is: it was cut short).
    pub complete: bool,
    /// The tier Gemini's API says it served the request at, when the body does not say.
    pub tier_header: Option<String>,
    pub cutoff: Option<Cutoff>,
    /// The stream was reset after its drain.
    reset: bool,
}

impl Response {
    pub fn new(
        status: u32,
        scanner: Option<UsageScanner>,
        stripper: Option<Stripper>,
        complete: bool,
        tier_header: Option<String>,
        cutoff: Option<Cutoff>,
    ) -> Response {
        Response {
            status,
            scanner,
            stripper,
            complete,
            tier_header,
            cutoff,
            reset: false,
        }
    }

    fn ended(&self) -> bool {
        self.cutoff.as_ref().is_some_and(Cutoff::ended)
    }

    /// How the next chunk, arriving at `now_ms`, is handled.
    pub fn on_chunk(&mut self, now_ms: u64) -> OnChunk {
        if let Some(cutoff) = self.cutoff.as_ref().filter(|c| c.ended() || self.reset) {
            let reset = !self.reset && cutoff.reset_due(now_ms);
            self.reset |= reset;
            return OnChunk::Drop { reset };
        }
        // Past its budget inside one event that has not ended within the drain: an event the
        // plugin cannot end cleanly, so the stream is reset.
        if self.cutoff.as_ref().is_some_and(|c| c.stuck(now_ms)) {
            self.reset = true;
            return OnChunk::Drop { reset: true };
        }
        match (&self.scanner, &self.stripper) {
            (None, _) => OnChunk::Pass,
            (Some(_), None) => OnChunk::Read,
            (Some(_), Some(_)) => OnChunk::Rewrite,
        }
    }

    /// Sees a slice; `over` says whether what the stream would be charged now passes its
    /// allowance (asked of a watched event stream at each event's end).
    pub fn see(
        &mut self,
        slice: &[u8],
        now_ms: u64,
        mut over: impl FnMut(&UsageScanner) -> bool,
    ) -> Slice {
        if self.ended() {
            return Slice::Dropped;
        }
        let Some(scanner) = self.scanner.as_mut() else {
            return Slice::Pass;
        };
        let Some(cutoff) = self.cutoff.as_mut() else {
            scanner.feed(slice);
            return Slice::Pass;
        };
        let cut = cutoff.slice(slice, now_ms, |bytes| {
            scanner.feed(bytes);
            scanner.format() == BodyFormat::Sse && over(scanner)
        });
        match cut {
            Cut::Pass => Slice::Pass,
            Cut::End { keep } => Slice::End { keep },
        }
    }

    /// The upstream's stream ended (its last chunk, or trailers).
    pub fn end(&mut self) {
        if let Some(scanner) = &mut self.scanner {
            scanner.finish();
        }
        self.complete = !self.ended();
    }
}
