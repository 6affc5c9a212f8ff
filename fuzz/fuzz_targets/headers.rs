//! The shell through the fake host: any bytes (UTF-8 or not) in every request and response
//! header the plugin reads, and the same bytes read as a serialised header map. No input may
//! panic, and a request that names a user is always checked against that user's limit (a
//! value is data, never dropped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::filter::fuzzing::{request, HEADERS};
use llm_token_ratelimit::header_map::HeaderMap;

fuzz_target!(|data: &[u8]| {
    // The same bytes as a header map as the proxy hands it over: read within bounds or empty.
    let map = HeaderMap::parse(data.to_vec());
    let _ = (map.get("x-user"), map.get(":path"), map.len());
    // Values separated by 0xff 0x00 (a pair no value below needs); an empty one is absent.
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(2).position(|w| w == [0xff, 0]) {
        parts.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    parts.push(rest);
    let value = |i: usize| parts.get(i).filter(|v| !v.is_empty()).map(|v| v.to_vec());
    let req: Vec<Option<Vec<u8>>> = (0..HEADERS.len()).map(value).collect();
    let response: Vec<(String, Vec<u8>)> = [":status", "content-type", "content-encoding"]
        .iter()
        .enumerate()
        .filter_map(|(i, name)| Some((name.to_string(), value(HEADERS.len() + i)?)))
        .collect();
    let body = value(HEADERS.len() + 3).unwrap_or_default();
    request(&req, &response, &body);
});
