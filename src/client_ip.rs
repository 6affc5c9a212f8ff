//! The client's address: the peer, or an entry of `X-Forwarded-For` counted from the right.

use std::net::IpAddr;

use ipnet::{Ipv4Net, Ipv6Net};

/// Where `source.ip` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The downstream peer (`source.address`).
    Remote,
    /// The entry `trusted_hops` from the right of a forwarding header. The right-most entry is
    /// written by the proxy in front of Envoy; the left-most is whatever the client claimed.
    Header { name: String, trusted_hops: usize },
}

/// How many leading bits of an address are one client in keys (`client_ip.ipv4_prefix`,
/// `client_ip.ipv6_prefix`). An IPv6 host is usually handed a whole /64 (often a /56 or /48):
/// keyed by full address, it could take a fresh budget for every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixes {
    pub v4: u8,
    pub v6: u8,
}

impl Default for Prefixes {
    fn default() -> Self {
        Prefixes { v4: 32, v6: 64 }
    }
}

/// An IPv6 address that carries an IPv4 client is that IPv4 client: IPv4-mapped
/// (`::ffff:1.2.3.4`), NAT64's well-known prefix (`64:ff9b::1.2.3.4`, every IPv4 host behind a
/// NAT64 gateway), 6to4 (`2002:0102:0304::/48`, which hands any IPv4 host 2^80 addresses) and
/// Teredo (`2001:0::/32`, the client's address inverted in the last 32 bits). Otherwise a
/// client could multiply its budget, or share one with everyone behind the same gateway.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| IpAddr::V4(((u32::from(hi) << 16) | u32::from(lo)).into());
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        [0x2002, hi, lo, ..] => v4(hi, lo),
        [0x2001, 0, _, _, _, _, hi, lo] => v4(!hi, !lo),
        _ => ip,
    }
}

/// The client as keys name it: the address's network under its prefix, written with the prefix
/// (`2001:db8:1:2::/64`, `10.1.2.0/24`), or the address itself under a full-length prefix.
pub fn client_key(ip: IpAddr, prefixes: Prefixes) -> String {
    match canonical(ip) {
        IpAddr::V4(a) if prefixes.v4 < 32 => {
            Ipv4Net::new(a, prefixes.v4).map_or_else(|_| a.to_string(), |n| n.trunc().to_string())
        }
        IpAddr::V6(a) if prefixes.v6 < 128 => {
            Ipv6Net::new(a, prefixes.v6).map_or_else(|_| a.to_string(), |n| n.trunc().to_string())
        }
        ip => ip.to_string(),
    }
}

/// Parses Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`) or a bare address; an IPv6
/// zone (`fe80::1%eth0`) is dropped.
pub fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let without_zone = |host: &str| -> Option<IpAddr> {
        match host.split_once('%') {
            Some((addr, _)) => addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6),
            None => host.parse().ok(),
        }
    };
    if let Some(ip) = without_zone(text) {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, _) = rest.split_once(']')?;
        return without_zone(host);
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
    let ip = match source {
        ClientIpSource::Remote => from_peer(),
        ClientIpSource::Header { trusted_hops, .. } => header
            .and_then(|h| h.split(',').rev().nth(trusted_hops.saturating_sub(1)))
            .and_then(parse_address)
            .or_else(from_peer),
    };
    ip.map(canonical)
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

    /// IPv6 clients are keyed by their /64 (one host's usual allocation), IPv4 by address;
    /// mapped IPv4 is IPv4; zones are dropped; the prefixes are configurable.
    #[test]
    fn clients_are_keyed_by_prefix() {
        let key = |s: &str, v4, v6| client_key(parse_address(s).unwrap(), Prefixes { v4, v6 });
        assert_eq!(key("2001:db8:1:2:aaaa::1", 32, 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::9", 32, 64), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:3::1", 32, 64), "2001:db8:1:3::/64");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 32, 48), "2001:db8:1::/48");
        assert_eq!(key("2001:db8:1:2:aaaa::1", 32, 128), "2001:db8:1:2:aaaa::1");
        assert_eq!(key("2001:db8::1", 32, 1), "::/1");
        assert_eq!(key("10.1.2.3", 32, 64), "10.1.2.3");
        assert_eq!(key("10.1.2.3", 24, 64), "10.1.2.0/24");
        assert_eq!(key("::ffff:10.1.2.3", 32, 64), "10.1.2.3");
        assert_eq!(key("[::ffff:10.1.2.3]:443", 24, 64), "10.1.2.0/24");
        assert_eq!(key("fe80::1%eth0", 32, 64), "fe80::/64");
        assert_eq!(key("[fe80::1%25eth0]:8080", 32, 128), "fe80::1");
        assert_eq!(parse_address("fe80::1%"), Some(ip("fe80::1")));
        // IPv6 forms that carry an IPv4 client are that client.
        assert_eq!(key("64:ff9b::203.0.113.7", 32, 64), "203.0.113.7");
        assert_eq!(key("2002:cb00:7107:1:2::9", 32, 64), "203.0.113.7");
        assert_eq!(key("2002:cb00:7107:ffff::1", 32, 64), "203.0.113.7");
        // Teredo: server 65.54.227.120, client 192.0.2.45 (inverted: 3fff:fdd2).
        assert_eq!(
            key("2001:0:4136:e378:8000:63bf:3fff:fdd2", 32, 64),
            "192.0.2.45"
        );
        assert_eq!(key("::1", 32, 128), "::1", "loopback stays");
        assert_eq!(parse_address("10.0.0.1%eth0"), None);
        assert_eq!(
            client_ip(&ClientIpSource::Remote, Some("[::ffff:1.2.3.4]:5"), None),
            Some(ip("1.2.3.4"))
        );
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
