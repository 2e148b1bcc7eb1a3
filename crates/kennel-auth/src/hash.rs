//! The keyed hash kept in place of a key, and the constant-time comparison of two hashes.
//! Hashing first makes every comparison the same length, so neither a key nor its length leaks
//! through timing; keying it means a leaked database does not let anyone test guesses offline
//! without the hash key too.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 under a secret hash key.
pub(crate) struct KeyHasher {
    hash_key: Vec<u8>,
}

impl KeyHasher {
    pub(crate) fn new(hash_key: Vec<u8>) -> Self {
        KeyHasher { hash_key }
    }

    /// The hash stored or kept for `key`.
    pub(crate) fn hash(&self, key: &str) -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.hash_key)
            .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// Whether two hashes are equal, in time that does not depend on where they differ. A
/// [`Choice`] so that callers checking several hashes can combine them without branching.
pub(crate) fn same_hash(a: &[u8], b: &[u8]) -> Choice {
    a.ct_eq(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_depend_on_the_hash_key() {
        let a = KeyHasher::new(b"a".repeat(32));
        let b = KeyHasher::new(b"b".repeat(32));
        assert_ne!(a.hash("kn_x"), b.hash("kn_x"));
        assert_eq!(a.hash("kn_x"), a.hash("kn_x"));
        assert_ne!(a.hash("kn_x"), a.hash("kn_y"));
    }

    #[test]
    fn only_equal_hashes_are_the_same() {
        let h = KeyHasher::new(b"k".repeat(32));
        assert!(bool::from(same_hash(&h.hash("one"), &h.hash("one"))));
        assert!(!bool::from(same_hash(&h.hash("one"), &h.hash("two"))));
        assert!(!bool::from(same_hash(&h.hash("one"), &[])));
    }
}
