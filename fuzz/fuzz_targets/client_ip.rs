//! The peer address and X-Forwarded-For parsers: any text, any number of hops. The answer is
//! always an address the input contained, or the peer's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_token_ratelimit::client_ip::{client_ip, parse_address, ClientIpSource};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let hops = data.first().map_or(1, |b| usize::from(*b % 8) + 1);
    let (peer, header) = text.split_once('\n').unwrap_or(("127.0.0.1:1", &text));
    let _ = parse_address(peer);
    let source = ClientIpSource::Header {
        name: "x-forwarded-for".into(),
        trusted_hops: hops,
    };
    if let Some(ip) = client_ip(&source, Some(peer), Some(header)) {
        let from_header = header.split(',').any(|e| parse_address(e) == Some(ip));
        assert!(from_header || parse_address(peer) == Some(ip));
    }
});
