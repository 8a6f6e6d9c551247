//! Record encoding: one format-version byte, then postcard. Never bincode (unmaintained).
//!
//! The version is checked on every read; a record from a newer build is refused with a clear
//! error instead of being misread. When a record type changes, its old shape stays here as a
//! `V1` type and the decoder upgrades it; `tests/format_fixtures.rs` holds bytes written by each
//! version that every later build must still read.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;

/// The record format this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// Encodes a record with its version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_sized(value, 64)
}

/// [`encode`] into a buffer of `capacity` bytes to start with: a record larger than the
/// default would grow it several times (a telemetry point, per message).
pub fn encode_sized<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity.max(1));
    out.push(FORMAT_VERSION);
    // Serializing plain data into a Vec cannot fail: postcard only fails on unsupported serde
    // features (e.g. `deserialize_any`), which our record types do not use.
    postcard::to_io(value, &mut out).expect("record types are postcard-serializable");
    out
}

/// Decodes a record written by [`encode`], checking its version.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| Error::Corrupt { what, detail: e.to_string() })
        }
        Some((&v, _)) => Err(Error::UnsupportedVersion { what, found: v, supported: FORMAT_VERSION }),
        None => Err(Error::Corrupt { what, detail: "empty record".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let bytes = encode(&(7u32, "x".to_string()));
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: (u32, String) = decode("test", &bytes).unwrap();
        assert_eq!(back, (7, "x".into()));
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<(u32, String)>("test", &future),
            Err(Error::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        assert!(matches!(decode::<(u32, String)>("test", &[]), Err(Error::Corrupt { .. })));
        assert!(matches!(decode::<(u32, String)>("test", &[FORMAT_VERSION, 0xff]), Err(Error::Corrupt { .. })));
    }
}
