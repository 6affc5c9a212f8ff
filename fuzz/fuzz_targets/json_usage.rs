//! The JSON usage scanner, differential: any body gives the same usage whole and cut into the
//! chunks the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::usage::JsonScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let mut whole = JsonScanner::default();
    whole.feed(body);
    whole.next_document();
    let mut chunked = JsonScanner::default();
    let step = usize::from(cut).max(1);
    for chunk in body.chunks(step) {
        chunked.feed(chunk);
    }
    chunked.next_document();
    assert_eq!(whole.fields, chunked.fields);
    assert_eq!(whole.text_bytes, chunked.text_bytes);
});
