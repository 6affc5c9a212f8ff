//! A header map in the form proxy-wasm hands it over whole (`proxy_get_header_map_pairs`).
//!
//! Every host call crosses from the Wasm VM into Envoy, and one that returns bytes crosses
//! back as well (Envoy asks the VM for memory to put them in). Reading the headers a request
//! needs one by one made such a pair per header; the whole map is one pair. This module reads
//! that form with bounds checks only: names and values stay bytes (a client may send any),
//! and a map that does not parse is empty, never a panic. The whole map, credentials
//! included, is in the VM's memory while a callback runs (bounded by Envoy's header size
//! limits), so the type has no `Debug`: it is never logged.
//!
//! The form: a little-endian `u32` count; then, per entry, the `u32` lengths of its name and
//! value; then, per entry, the name, a NUL, the value, a NUL.

use std::ops::Range;

/// The entries of one header map, in the proxy's order (repeated names kept, in order).
#[derive(Default)]
pub struct HeaderMap {
    raw: Vec<u8>,
    entries: Vec<(Range<usize>, Range<usize>)>,
}

fn u32_at(raw: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes) as usize)
}

impl HeaderMap {
    /// Reads `raw` in the form above; empty when it is not in that form (bytes past the last
    /// entry included, as the proxy's own reader refuses them).
    pub fn parse(raw: Vec<u8>) -> HeaderMap {
        match Self::entries(&raw) {
            Some(entries) => HeaderMap { raw, entries },
            None => HeaderMap::default(),
        }
    }

    fn entries(raw: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
        if raw.is_empty() {
            return Some(Vec::new());
        }
        let count = u32_at(raw, 0)?;
        // Each entry takes 10 bytes at least: never trust the count for an allocation.
        let mut entries = Vec::with_capacity(count.min(raw.len() / 10));
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        for i in 0..count {
            let sizes = 4 + i * 8;
            let (name_len, value_len) = (u32_at(raw, sizes)?, u32_at(raw, sizes + 4)?);
            let name = data..data.checked_add(name_len)?;
            let value_start = name.end.checked_add(1)?;
            let value = value_start..value_start.checked_add(value_len)?;
            // Both ends must be inside, each followed by its NUL.
            if raw.get(name.end) != Some(&0) || raw.get(value.end) != Some(&0) {
                return None;
            }
            data = value.end + 1;
            entries.push((name, value));
        }
        (data == raw.len()).then_some(entries)
    }

    /// The first value of header `name` (compared without regard to ASCII case), as Envoy's
    /// single-header read gives it.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries.iter().find_map(|(n, v)| {
            let found = self
                .raw
                .get(n.clone())?
                .eq_ignore_ascii_case(name.as_bytes());
            found.then(|| self.raw.get(v.clone())).flatten()
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `pairs` in the form above (what a proxy would hand over), for fakes and tests.
    pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (n, v) in pairs {
            out.extend_from_slice(&(n.as_ref().len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (n, v) in pairs {
            for part in [n.as_ref(), v.as_ref()] {
                out.extend_from_slice(part);
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::HeaderMap;

    /// The proxy-wasm SDK's own serialised map (its `hostcalls` tests), byte for byte.
    #[test]
    fn reads_the_map_the_sdk_reads() {
        #[rustfmt::skip]
        let raw: Vec<u8> = vec![
            4, 0, 0, 0,
            7, 0, 0, 0, 3, 0, 0, 0,
            5, 0, 0, 0, 8, 0, 0, 0,
            10, 0, 0, 0, 11, 0, 0, 0,
            10, 0, 0, 0, 10, 0, 0, 0,
            58, 109, 101, 116, 104, 111, 100, 0,
            71, 69, 84, 0,
            58, 112, 97, 116, 104, 0,
            47, 98, 121, 116, 101, 115, 47, 49, 0,
            58, 97, 117, 116, 104, 111, 114, 105, 116, 121, 0,
            104, 116, 116, 112, 98, 105, 110, 46, 111, 114, 103, 0,
            80, 111, 119, 101, 114, 101, 100, 45, 66, 121, 0,
            112, 114, 111, 120, 121, 45, 119, 97, 115, 109, 0,
        ];
        let map = HeaderMap::parse(raw.clone());
        assert_eq!(map.len(), 4);
        assert_eq!(map.get(":method"), Some(&b"GET"[..]));
        assert_eq!(map.get(":path"), Some(&b"/bytes/1"[..]));
        assert_eq!(map.get(":authority"), Some(&b"httpbin.org"[..]));
        assert_eq!(map.get("powered-by"), Some(&b"proxy-wasm"[..]));
        let pairs = [
            (":method", "GET"),
            (":path", "/bytes/1"),
            (":authority", "httpbin.org"),
            ("Powered-By", "proxy-wasm"),
        ];
        assert_eq!(HeaderMap::encode(&pairs), raw);
    }

    #[test]
    fn finds_the_first_of_a_name_in_any_case_with_any_bytes() {
        let raw = HeaderMap::encode(&[
            (&b":path"[..], &b"/v1/chat"[..]),
            (b"X-User", b"ann"),
            (b"x-user", b"bob"),
            (b"x-bytes", b"\xff\x00\xfe"),
            (b"\xc3\x28", b"name not UTF-8"),
            (b"empty", b""),
        ]);
        let map = HeaderMap::parse(raw);
        assert_eq!(map.len(), 6);
        assert_eq!(map.get(":path"), Some(&b"/v1/chat"[..]));
        assert_eq!(map.get("x-user"), Some(&b"ann"[..]));
        assert_eq!(map.get("X-USER"), Some(&b"ann"[..]));
        assert_eq!(map.get("x-bytes"), Some(&b"\xff\x00\xfe"[..]));
        assert_eq!(map.get("empty"), Some(&b""[..]));
        assert_eq!(map.get("absent"), None);
    }

    #[test]
    fn an_empty_map_and_no_map_are_empty() {
        assert!(HeaderMap::parse(Vec::new()).is_empty());
        let none: [(&str, &str); 0] = [];
        assert!(HeaderMap::parse(HeaderMap::encode(&none)).is_empty());
    }

    /// Every truncation of a valid map, and the map with a byte more, is empty; a corrupted
    /// byte either leaves a map whose every entry lies inside the bytes, or none.
    #[test]
    fn a_map_out_of_form_is_empty_never_a_panic() {
        let raw = HeaderMap::encode(&[("a", "1"), ("bb", "22"), ("ccc", "")]);
        for cut in 0..raw.len() {
            let map = HeaderMap::parse(raw[..cut].to_vec());
            assert!(map.is_empty(), "cut at {cut}");
        }
        let mut longer = raw.clone();
        longer.push(0);
        assert!(HeaderMap::parse(longer).is_empty());
        for at in 0..raw.len() {
            for byte in [0u8, 1, 2, 0x7f, 0xff] {
                let mut bad = raw.clone();
                bad[at] = byte;
                let len = bad.len();
                let map = HeaderMap::parse(bad);
                for (name, value) in &map.entries {
                    assert!(
                        name.start <= name.end && value.start <= value.end,
                        "at {at}"
                    );
                    assert!(name.end < len && value.end < len, "at {at}");
                }
                let _ = (map.get("bb"), map.get("zz"));
            }
        }
        // A count no buffer could hold.
        let mut huge = raw.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(huge).is_empty());
    }
}
