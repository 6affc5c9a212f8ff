//! The SSE parser, differential: whole, byte by byte and in the input's own chunk size, any
//! stream gives the same usage, events and text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::usage::SseParser;

fn parse<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> SseParser {
    let mut p = SseParser::default();
    for c in chunks {
        p.feed(c);
    }
    p.finish();
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = parse(std::iter::once(body));
    for other in [
        parse(body.chunks(1)),
        parse(body.chunks(usize::from(cut).max(1))),
    ] {
        assert_eq!(whole.json.fields, other.json.fields);
        assert_eq!(whole.json.text_bytes, other.json.text_bytes);
        assert_eq!(whole.events, other.events);
    }
});
