//! Who may call the service. Anyone who can reach its port could otherwise refund, charge or
//! read any key, so with `--api-key` every endpoint but health and metrics asks for
//! `Authorization: Bearer <key>`; the admin API asks for the admin token. Credentials are
//! compared as SHA-256 digests in constant time: neither a secret's bytes nor its length shows
//! in how long a refusal takes.

use sha2::{Digest, Sha256};

/// What an endpoint asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health, readiness, metrics, and the console's page (it holds no data; it asks for a key).
    Open,
    /// Checks and reports (v1 and ASM): an API key.
    Data,
    /// What operators read (`/v1/quota`, the console's data): an API key or the admin token.
    Read,
    /// Grants and resets: the admin token.
    Admin,
}

/// The service's credentials, kept as digests.
#[derive(Default)]
pub struct Access {
    api_keys: Vec<[u8; 32]>,
    admin: Option<[u8; 32]>,
}

impl Access {
    /// `api_keys`: every key accepted (several during a rotation); none leaves checks, reports
    /// and reads open, as a service reached only through mTLS may be.
    pub fn new(api_keys: &[String], admin_token: Option<&str>) -> Access {
        Access {
            api_keys: api_keys.iter().map(|k| digest(k.as_bytes())).collect(),
            admin: admin_token.map(|t| digest(t.as_bytes())),
        }
    }

    pub fn admin_enabled(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether a caller presenting `bearer` (the credential after `Bearer `, if any) may reach
    /// an endpoint that needs `need`.
    pub fn allows(&self, need: Need, bearer: Option<&[u8]>) -> bool {
        let given = bearer.map(digest);
        let is_key = || {
            // Every key is compared, whichever matches: the time does not tell which.
            given.is_some_and(|g| self.api_keys.iter().fold(false, |ok, k| ok | same(&g, k)))
        };
        let is_admin = || given.zip(self.admin).is_some_and(|(g, a)| same(&g, &a));
        match need {
            Need::Open => true,
            Need::Data => self.api_keys.is_empty() || is_key(),
            Need::Read => self.api_keys.is_empty() || is_key() | is_admin(),
            Need::Admin => is_admin(),
        }
    }
}

/// The credential of an `Authorization: Bearer <credential>` header (the scheme in any case).
pub fn bearer(header: Option<&[u8]>) -> Option<&[u8]> {
    let value = header?;
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value.get(7..))
        .flatten()
        .map(|rest| rest.trim_ascii())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_asks_for_its_credential() {
        let keys = [
            "k1-aaaaaaaaaaaaaaaa".to_string(),
            "k2-bbbbbbbbbbbbbbbb".into(),
        ];
        let access = Access::new(&keys, Some("admin-cccccccccccccc"));
        let k1 = Some(b"k1-aaaaaaaaaaaaaaaa".as_slice());
        let k2 = Some(b"k2-bbbbbbbbbbbbbbbb".as_slice());
        let admin = Some(b"admin-cccccccccccccc".as_slice());
        let wrong = Some(b"k1-aaaaaaaaaaaaaaa".as_slice());
        for (need, who, allowed) in [
            (Need::Open, None, true),
            (Need::Data, k1, true),
            (Need::Data, k2, true),
            (Need::Data, None, false),
            (Need::Data, wrong, false),
            (Need::Data, admin, false),
            (Need::Read, admin, true),
            (Need::Read, k2, true),
            (Need::Read, None, false),
            (Need::Admin, admin, true),
            (Need::Admin, k1, false),
            (Need::Admin, None, false),
        ] {
            assert_eq!(access.allows(need, who), allowed, "{need:?} {who:?}");
        }
        // Without API keys, checks and reads are open; the admin API needs its token.
        let open = Access::new(&[], None);
        assert!(open.allows(Need::Data, None) && open.allows(Need::Read, None));
        assert!(!open.allows(Need::Admin, admin));
    }

    #[test]
    fn the_bearer_credential() {
        assert_eq!(bearer(Some(b"Bearer abc")), Some(b"abc".as_slice()));
        assert_eq!(bearer(Some(b"bearer  abc ")), Some(b"abc".as_slice()));
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(b"Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
