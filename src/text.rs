//! Bytes from the wire as text. A header value, an Envoy property or an upstream's header may
//! be any bytes (HTTP allows `obs-text`, 0x80–0xFF), and proxy-wasm 0.2.5's string getters
//! panic on bytes that are not UTF-8. The plugin reads bytes only, and turns them into text here:
//! UTF-8 stays as it is; anything else becomes an *opaque* string that still names its bytes
//! exactly, so as a key it keeps a counter of its own and as a condition it matches nothing.

use std::borrow::Cow;

/// The mark an opaque value starts with. Envoy refuses NUL in a header value, so no value it
/// hands over as UTF-8 can start with it: opaque values and readable ones never collide.
const OPAQUE: char = '\0';

/// `bytes` as text: itself when it is UTF-8, else [`OPAQUE`] followed by the bytes with every
/// byte that is not part of a UTF-8 sequence written `\xNN` (and `\` written `\\`). Distinct
/// byte strings always give distinct texts.
pub fn from_wire(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => escape(e.as_bytes()),
    }
}

fn escape(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2 + 1);
    out.push(OPAQUE);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Whether `text` came from bytes that were not UTF-8: such a value matches no condition.
pub fn is_opaque(text: &str) -> bool {
    text.starts_with(OPAQUE)
}

/// The bytes `text` was made from: the inverse of [`from_wire`]. Parsers of structured
/// values (a query string, cookies, credentials) work on these, so a byte that is not UTF-8 in
/// one part of a header does not change how another part reads.
pub fn to_bytes(text: &str) -> Cow<'_, [u8]> {
    let Some(escaped) = text.strip_prefix(OPAQUE) else {
        return Cow::Borrowed(text.as_bytes());
    };
    let b = escaped.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|h| (*h as char).to_digit(16));
        match (c, b.get(i + 1)) {
            (b'\\', Some(b'\\')) => {
                out.push(b'\\');
                i += 2;
            }
            (b'\\', Some(b'x')) => match (hex(i + 2), hex(i + 3)) {
                (Some(h), Some(l)) => {
                    out.push((h << 4 | l) as u8);
                    i += 4;
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            },
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stays_and_the_rest_is_named_exactly() {
        assert_eq!(from_wire(b"Bearer sk-1".to_vec()), "Bearer sk-1");
        assert_eq!(from_wire("中文".as_bytes().to_vec()), "中文");
        assert!(!is_opaque("Bearer sk-1"));
        let junk = from_wire(b"\xff\xfe".to_vec());
        assert!(is_opaque(&junk));
        assert_eq!(junk, "\0\\xff\\xfe");
        // Valid parts are kept, a backslash is escaped: distinct bytes, distinct texts.
        assert_eq!(from_wire(b"a\\b\xc3".to_vec()), "\0a\\\\b\\xc3");
        let a = from_wire(b"\\xff\xff".to_vec());
        let b = from_wire(b"\xff\\xff".to_vec());
        assert_ne!(a, b);
        // A truncated sequence and a lone continuation byte.
        assert_eq!(from_wire(b"\xe4\xb8".to_vec()), "\0\\xe4\\xb8");
        assert_eq!(from_wire(b"x\x80".to_vec()), "\0x\\x80");
    }

    #[test]
    fn the_bytes_come_back() {
        for bytes in [
            b"plain".as_slice(),
            b"\xff\xfe",
            b"a\\b\xc3",
            b"\\xff\xff",
            b"\xff\\xff",
            b"\\",
            b"\xe4\xb8",
            "中\\".as_bytes(),
        ] {
            assert_eq!(&*to_bytes(&from_wire(bytes.to_vec())), bytes, "{bytes:?}");
        }
    }
}
