//! Counters: what one descriptor spends, and the storage key that names it.

use crate::meter::Meter;

/// The identity of one counter: a limit and one of its values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterId {
    /// The limit's name; `""` for keys that arrive through the ASM protocol.
    pub limit: String,
    pub value: String,
    /// A `shared` value rule's pool, kept apart from a plain value equal to its pattern.
    pub shared: bool,
}

impl CounterId {
    /// The storage key. Lengths prefix each part, so no limit or value (whatever bytes it
    /// holds) can produce another counter's key. The hash tag (a hash of the identity, never
    /// containing braces) keeps every rate of the counter in one Redis Cluster slot.
    pub fn storage_key(&self) -> String {
        format!(
            "ltr:{{{:016x}}}:{}:{}:{}:{}:{}",
            self.fingerprint(),
            if self.shared { "s" } else { "v" },
            self.limit.len(),
            self.limit,
            self.value.len(),
            self.value
        )
    }

    /// FNV-1a over the length-prefixed parts: stable across processes and versions.
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&[u8::from(self.shared)]);
        eat(&(self.limit.len() as u64).to_le_bytes());
        eat(self.limit.as_bytes());
        eat(self.value.as_bytes());
        h
    }
}

/// FNV-1a, 64 bits: stable across processes and versions (Redis hash tags).
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One counter and the meters a request asks of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: CounterId,
    pub meters: Vec<Meter>,
    /// A shadow limit's counter: charged as every other, but it never denies nor trims.
    pub shadow: bool,
    /// Fractions of the budget at which a report raises an alert, ascending, no two alike.
    pub alerts: Vec<wire::Threshold>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(limit: &str, value: &str, shared: bool) -> CounterId {
        CounterId {
            limit: limit.into(),
            value: value.into(),
            shared,
        }
    }

    #[test]
    fn keys_cannot_collide_across_limits_or_values() {
        let keys = [
            id("a:b", "c", false).storage_key(),
            id("a", "b:c", false).storage_key(),
            id("a", "1:b:c", false).storage_key(),
            id("a", "b", false).storage_key(),
            id("a", "b", true).storage_key(),
            id("", "a:b", false).storage_key(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn hash_tag_is_brace_free_and_stable() {
        let k = id("per-user", "{evil}", false).storage_key();
        assert!(k.starts_with("ltr:{"));
        let tag = &k[5..k.find('}').unwrap()];
        assert_eq!(tag.len(), 16);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, id("per-user", "{evil}", false).storage_key());
    }
}
