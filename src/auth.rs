//! Credentials: device tokens (generated, hashed, verified) and the operator bootstrap token.
//!
//! Tokens are 32 random bytes from the OS, shown once as hex and stored only as SHA-256.
//! Comparisons are constant-time so response timing does not leak how much of a token matched.

use sha2::{Digest, Sha256};

/// Prefix that makes device tokens recognisable in logs and secret scanners.
pub const DEVICE_TOKEN_PREFIX: &str = "omd_";

/// A new device token.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not recoverable and must not produce weak tokens.
    getrandom::fill(&mut bytes).expect("operating system random source failed");
    format!("{DEVICE_TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// SHA-256 of a token as presented.
pub fn hash_token(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether `presented` hashes to `expected`, in constant time.
pub fn verify_token(presented: &[u8], expected: &[u8; 32]) -> bool {
    constant_time_eq(&hash_token(presented), expected)
}

/// Compares two byte strings without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_verify_and_differ() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with(DEVICE_TOKEN_PREFIX) && a.len() == DEVICE_TOKEN_PREFIX.len() + 64);
        let h = hash_token(a.as_bytes());
        assert!(verify_token(a.as_bytes(), &h));
        assert!(!verify_token(b.as_bytes(), &h));
        assert!(!verify_token(b"", &h));
    }

    #[test]
    fn constant_time_eq_checks_length_and_content() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
