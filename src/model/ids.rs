//! Tenant and orb identifiers, validated once at the edge and trusted everywhere after.
//!
//! Allowed: 1 to 64 bytes of `A-Z a-z 0-9 - _ . :`. That excludes `/`, `+`, `#`, NUL,
//! whitespace and control characters, so an id can never widen an MQTT topic pattern and can
//! be used inside storage keys with `0x00` as the separator.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::ID_LEN_MAX;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong { kind: &'static str, len: usize, max: usize },
    #[error("{kind} contains {ch:?} at byte {pos}; allowed are A-Z a-z 0-9 - _ . :")]
    BadChar { kind: &'static str, ch: char, pos: usize },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > ID_LEN_MAX {
        return Err(IdError::TooLong { kind, len: s.len(), max: ID_LEN_MAX });
    }
    for (pos, ch) in s.char_indices() {
        if !(ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | ':')) {
            return Err(IdError::BadChar { kind, ch, pos });
        }
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A validated ", $kind, ".")]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            #[doc = concat!("Validates `s` as a ", $kind, ".")]
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate($kind, s)?;
                Ok($name(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(TenantId, "tenant id");
id_type!(OrbId, "orb id");

impl TenantId {
    /// The development tenant that `--dev` opens to anonymous clients.
    pub fn dev() -> Self {
        TenantId(Arc::from(DEV_TENANT))
    }

    pub fn is_dev(&self) -> bool {
        &*self.0 == DEV_TENANT
    }
}

/// Name of the development tenant.
pub const DEV_TENANT: &str = "default";

/// The full identity of an orb: ids are unique within a tenant only.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrbKey {
    pub tenant: TenantId,
    pub orb: OrbId,
}

impl OrbKey {
    pub fn new(tenant: TenantId, orb: OrbId) -> Self {
        OrbKey { tenant, orb }
    }

    /// Parses `tenant/orb`, the MQTT username form.
    pub fn parse_path(s: &str) -> Result<Self, IdError> {
        let (t, o) = s.split_once('/').ok_or(IdError::BadChar {
            kind: "identity (expected tenant/orb)",
            ch: '?',
            pos: s.len(),
        })?;
        Ok(OrbKey { tenant: TenantId::parse(t)?, orb: OrbId::parse(o)? })
    }

    /// A stable 64-bit hash (FNV-1a) used for shard routing; stable across restarts and
    /// builds, unlike `std`'s randomly seeded hasher.
    pub fn route_hash(&self) -> u64 {
        let mut h = fnv1a64(FNV_OFFSET, self.tenant.as_str().as_bytes());
        h = fnv1a64(h, &[0]);
        fnv1a64(h, self.orb.as_str().as_bytes())
    }
}

impl fmt::Display for OrbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.orb)
    }
}

impl fmt::Debug for OrbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.orb)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `h`. Deterministic and dependency-free.
pub fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a of `bytes` from the standard offset basis.
pub fn hash64(bytes: &[u8]) -> u64 {
    fnv1a64(FNV_OFFSET, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "orb-1", "Orb_2.x:y", &"z".repeat(ID_LEN_MAX)] {
            assert!(OrbId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_topic_wildcards_separators_and_controls() {
        for bad in ["", "a/b", "a+", "#", "a b", "a\0b", "a\nb", "é", "$sys"] {
            assert!(OrbId::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = "x".repeat(ID_LEN_MAX + 1);
        assert_eq!(OrbId::parse(&long), Err(IdError::TooLong { kind: "orb id", len: ID_LEN_MAX + 1, max: ID_LEN_MAX }));
    }

    #[test]
    fn error_names_the_offending_character_and_position() {
        let err = TenantId::parse("ab+c").unwrap_err().to_string();
        assert!(err.contains("'+'") && err.contains("byte 2"), "{err}");
    }

    #[test]
    fn path_form_splits_at_the_first_slash_only() {
        let k = OrbKey::parse_path("acme/orb-7").unwrap();
        assert_eq!(k.tenant.as_str(), "acme");
        assert_eq!(k.orb.as_str(), "orb-7");
        assert!(OrbKey::parse_path("acme/orb/7").is_err());
        assert!(OrbKey::parse_path("acme").is_err());
    }

    #[test]
    fn route_hash_is_stable() {
        let k = OrbKey::parse_path("acme/orb-7").unwrap();
        // A fixed value: shard routing must not change between builds.
        assert_eq!(k.route_hash(), k.route_hash());
        assert_eq!(hash64(b""), FNV_OFFSET);
        assert_eq!(hash64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
