//! Key layout. Every key is tenant-first; ids never contain `0x00`, so `0x00` separates parts
//! and prefix scans are exact. Integers are big-endian so byte order is numeric order.
//!
//! | keyspace    | key                                        | value            |
//! |-------------|--------------------------------------------|------------------|
//! | `tenants`   | `t`                                        | `TenantRecord`   |
//! | `orbs`      | `t 0 o`                                    | `OrbRecord`      |
//! | `presence`  | `t 0 o`                                    | `Presence`       |
//! | `reported`  | `t 0 o`                                    | `Reported`       |
//! | `telemetry` | `t 0 o 0 ts:u64 suffix:u64`                | `StoredPoint`    |
//! | `dedupe`    | `t 0 bucket:u32 o 0 msg_id`                | empty            |
//! | `commands`  | `t 0 o 0 seq:u64`                          | `Command`        |
//! | `pending`   | `t 0 o 0 seq:u64` (non-terminal only)      | deadline:u64     |
//! | `idempotency` | `t 0 o 0 key`                            | seq:u64 hash:u64 |
//! | `broadcasts` | `t 0 id`                                  | `Broadcast`      |
//! | `broadcast_targets` | `t 0 id`                           | `Vec<OrbId>`     |
//! | `api_tokens` | `t 0 sha256(secret)`                      | `ApiToken`       |
//! | `cas`       | `t` (or `0`: the platform server CA)       | `StoredCa`       |
//! | `revoked`   | `t 0 serial`                               | (orb, at_ms)     |
//! | `versions`  | `t 0 o 0 at_ms:u64 component`              | `VersionChange`  |
//! | `events`    | `t 0 seq:u64`                              | `Event`          |
//! | `cold`      | `t 0 hour_ms:u64 path`                     | `ColdObject`     |
//! | `exports`   | `t 0 id`                                   | `ExportJob`      |
//! | `export_targets` | `t 0 id`                              | `Vec<OrbId>`     |
//! | `retention` | `t`                                        | `TenantRetention`|
//! | `meta`      | ascii name                                 | per name         |
//!
//! Rules, alerts, webhooks and their outbox are laid out in `alerts.rs`; retained messages and
//! topic policies in `broker.rs`.

use crate::model::OrbKey;

/// `t 0 o`: the key of an orb's registry, presence and reported records.
pub fn orb(key: &OrbKey) -> Vec<u8> {
    orb_with_room(key, 0)
}

/// [`orb`] in a buffer with room for `extra` more bytes (one allocation for longer keys).
pub(crate) fn orb_with_room(key: &OrbKey, extra: usize) -> Vec<u8> {
    let (t, o) = (key.tenant.as_str().as_bytes(), key.orb.as_str().as_bytes());
    let mut k = Vec::with_capacity(t.len() + 1 + o.len() + extra);
    k.extend_from_slice(t);
    k.push(0);
    k.extend_from_slice(o);
    k
}

/// `t 0`: the prefix of every orb of a tenant in `orbs`.
pub fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

/// `t 0 o 0`: the prefix of one orb's telemetry.
pub fn telemetry_prefix(key: &OrbKey) -> Vec<u8> {
    let mut k = orb_with_room(key, 1);
    k.push(0);
    k
}

/// The key of one telemetry point.
pub fn telemetry(key: &OrbKey, ts: u64, suffix: u64) -> Vec<u8> {
    let mut k = orb_with_room(key, 17);
    k.push(0);
    k.extend_from_slice(&ts.to_be_bytes());
    k.extend_from_slice(&suffix.to_be_bytes());
    k
}

/// Device time and suffix of a telemetry key, if it is one.
pub fn telemetry_cursor(k: &[u8]) -> Option<(u64, u64)> {
    let n = k.len();
    if n < 17 {
        return None;
    }
    let ts = k[n - 16..n - 8].try_into().ok().map(u64::from_be_bytes)?;
    let suffix = k[n - 8..].try_into().ok().map(u64::from_be_bytes)?;
    Some((ts, suffix))
}

/// The key of one entry of an orb's version history.
pub fn version_change(key: &OrbKey, at_ms: u64, component: &str) -> Vec<u8> {
    let mut k = telemetry_prefix(key);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(component.as_bytes());
    k
}

/// `t 0 o 0`: the prefix of one orb's commands (and pending entries).
pub fn command_prefix(key: &OrbKey) -> Vec<u8> {
    telemetry_prefix(key)
}

/// The key of one command.
pub fn command(key: &OrbKey, seq: u64) -> Vec<u8> {
    let mut k = command_prefix(key);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number of a command key.
pub fn command_seq(k: &[u8]) -> Option<u64> {
    k.get(k.len().checked_sub(8)?..)?.try_into().ok().map(u64::from_be_bytes)
}

/// The orb of a command key.
pub fn command_orb(k: &[u8]) -> Option<OrbKey> {
    let body = k.get(..k.len().checked_sub(9)?)?;
    let sep = body.iter().position(|b| *b == 0)?;
    let tenant = std::str::from_utf8(&body[..sep]).ok()?;
    let orb = std::str::from_utf8(&body[sep + 1..]).ok()?;
    OrbKey::parse_path(&format!("{tenant}/{orb}")).ok()
}

/// The key of an idempotency key.
pub fn idempotency(key: &OrbKey, idem: &str) -> Vec<u8> {
    let mut k = command_prefix(key);
    k.extend_from_slice(idem.as_bytes());
    k
}

/// `t 0 sha256`: an API token by the hash of its secret.
pub fn api_token(tenant: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(hash);
    k
}

/// The key of a CA: the tenant id, or `0` for the platform's server CA.
pub fn ca(tenant: Option<&str>) -> Vec<u8> {
    match tenant {
        Some(t) => t.as_bytes().to_vec(),
        None => vec![0],
    }
}

/// `t 0 serial`: a revoked device certificate.
pub fn revoked(tenant: &str, serial: &str) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(serial.as_bytes());
    k
}

/// `t 0 id`: a broadcast (and its target list, in its own keyspace).
pub fn broadcast(tenant: &str, id: &str) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The key of a remembered `msg_id` in a dedupe bucket.
pub fn dedupe(key: &OrbKey, bucket: u32, msg_id: &str) -> Vec<u8> {
    let (t, o) = (key.tenant.as_str().as_bytes(), key.orb.as_str().as_bytes());
    let mut k = Vec::with_capacity(t.len() + 6 + o.len() + msg_id.len());
    k.extend_from_slice(t);
    k.push(0);
    k.extend_from_slice(&bucket.to_be_bytes());
    k.extend_from_slice(o);
    k.push(0);
    k.extend_from_slice(msg_id.as_bytes());
    k
}

/// `t 0 bucket`: everything of a tenant's dedupe bucket.
pub fn dedupe_bucket_prefix(tenant: &str, bucket: u32) -> Vec<u8> {
    let mut k = tenant_prefix(tenant);
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, o: &str) -> OrbKey {
        OrbKey::parse_path(&format!("{t}/{o}")).unwrap()
    }

    #[test]
    fn telemetry_keys_sort_by_time_within_an_orb() {
        let k = key("acme", "o1");
        let a = telemetry(&k, 1_000, u64::MAX);
        let b = telemetry(&k, 1_001, 0);
        assert!(a < b);
        assert_eq!(telemetry_cursor(&a), Some((1_000, u64::MAX)));
        assert!(a.starts_with(&telemetry_prefix(&k)));
    }

    #[test]
    fn one_orb_prefix_never_covers_another() {
        // "o1" must not be a prefix match for "o10".
        let p = telemetry_prefix(&key("acme", "o1"));
        let other = telemetry(&key("acme", "o10"), 5, 5);
        assert!(!other.starts_with(&p));
        let tp = tenant_prefix("ac");
        assert!(!orb(&key("acme", "o1")).starts_with(&tp));
    }

    #[test]
    fn command_keys_round_trip() {
        let k = key("acme", "o1");
        let c = command(&k, 0x0102);
        assert_eq!(command_seq(&c), Some(0x0102));
        assert_eq!(command_orb(&c), Some(k.clone()));
        assert!(command(&k, 9) < command(&k, 10));
    }

    #[test]
    fn dedupe_keys_group_by_bucket_within_a_tenant() {
        let k = key("acme", "o1");
        let d = dedupe(&k, 7, "m1");
        assert!(d.starts_with(&dedupe_bucket_prefix("acme", 7)));
        assert!(!d.starts_with(&dedupe_bucket_prefix("acme", 8)));
    }
}
