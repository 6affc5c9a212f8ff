//! The client's address: the peer, or an entry of `X-Forwarded-For` counted from the right.

use std::net::IpAddr;

/// Where `source.ip` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The downstream peer (`source.address`).
    Remote,
    /// The entry `trusted_hops` from the right of a forwarding header. The right-most entry is
    /// written by the proxy in front of Envoy; the left-most is whatever the client claimed.
    Header { name: String, trusted_hops: usize },
}

/// Parses Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`) or a bare address.
pub fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, _) = rest.split_once(']')?;
        return host.parse().ok();
    }
    let (host, port) = text.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client IP for `source`, given the peer address and the forwarding header's value.
///
/// A header that is missing, too short or holds garbage at the trusted position falls back to
/// the peer address: a client must never escape its limit by sending a malformed header.
pub fn client_ip(
    source: &ClientIpSource,
    peer: Option<&str>,
    header: Option<&str>,
) -> Option<IpAddr> {
    let from_peer = || peer.and_then(parse_address);
    match source {
        ClientIpSource::Remote => from_peer(),
        ClientIpSource::Header { trusted_hops, .. } => header
            .and_then(|h| h.split(',').rev().nth(trusted_hops.saturating_sub(1)))
            .and_then(parse_address)
            .or_else(from_peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_peer_addresses() {
        assert_eq!(parse_address("10.1.2.3:443"), Some(ip("10.1.2.3")));
        assert_eq!(parse_address("[2001:db8::1]:8080"), Some(ip("2001:db8::1")));
        assert_eq!(parse_address("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_address(" 192.168.0.1 "), Some(ip("192.168.0.1")));
        assert_eq!(parse_address("host:80"), None);
        assert_eq!(parse_address("1.2.3.4:"), None);
        assert_eq!(parse_address("[::1"), None);
        assert_eq!(parse_address(""), None);
    }

    #[test]
    fn xff_is_counted_from_the_right() {
        let src = |hops| ClientIpSource::Header {
            name: "x-forwarded-for".into(),
            trusted_hops: hops,
        };
        let xff = Some("6.6.6.6, 1.1.1.1, 2.2.2.2");
        assert_eq!(
            client_ip(&src(1), Some("9.9.9.9:1"), xff),
            Some(ip("2.2.2.2"))
        );
        assert_eq!(
            client_ip(&src(2), Some("9.9.9.9:1"), xff),
            Some(ip("1.1.1.1"))
        );
        assert_eq!(
            client_ip(&src(3), Some("9.9.9.9:1"), xff),
            Some(ip("6.6.6.6"))
        );
    }

    #[test]
    fn short_or_bad_header_falls_back_to_peer() {
        let src = ClientIpSource::Header {
            name: "x-forwarded-for".into(),
            trusted_hops: 2,
        };
        assert_eq!(
            client_ip(&src, Some("9.9.9.9:1"), Some("1.1.1.1")),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(&src, Some("9.9.9.9:1"), Some("x, y")),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(&src, Some("9.9.9.9:1"), None),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(&ClientIpSource::Remote, Some("[::1]:5"), None),
            Some(ip("::1"))
        );
        assert_eq!(client_ip(&ClientIpSource::Remote, None, None), None);
    }
}
