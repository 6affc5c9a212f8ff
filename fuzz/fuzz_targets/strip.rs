//! The stream stripper, differential: whole, byte by byte and in the input's own chunk size,
//! any stream comes out the same, never longer than it went in, and an event it keeps is the
//! upstream's bytes but for a removed `"usage": null`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::strip::Stripper;

fn strip<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut s = Stripper::new();
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, &mut out);
    }
    s.finish(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = strip(std::iter::once(body));
    assert!(whole.len() <= body.len());
    for other in [strip(body.chunks(1)), strip(body.chunks(usize::from(cut).max(1)))] {
        assert_eq!(whole, other);
    }
});
