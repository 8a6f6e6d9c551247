//! An in-memory Bloom filter per dedupe bucket in front of the `dedupe` keyspace.
//!
//! Almost every `msg_id` is new; proving that with two LSM point reads cost more than the rest
//! of the commit path together (measured: 16K -> 42K points/s in `benches/group_commit.rs`
//! without the reads). The filter answers "certainly new" from memory; only a "maybe" (a true
//! duplicate or a false positive) reads fjall, which stays the authority. The filter covers the
//! buckets it has seen since it was warmed from the keyspace at first use, so a negative is exact.

use fjall::Keyspace;

use super::keys;
use crate::limits::DEDUPE_BUCKET_MS;
use crate::model::ids::hash64;

/// A fixed-size Bloom filter with three probes derived from one 64-bit hash.
pub(crate) struct Bloom {
    bits: Vec<u64>,
    mask: u64,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finalizer: spreads FNV's output over all bits.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Bloom {
    /// A filter of about `bytes` bytes (rounded down to a power of two, at least 1 KiB).
    pub(crate) fn new(bytes: usize) -> Bloom {
        let words = (bytes.max(1024) / 8).next_power_of_two() / 2;
        let words = words.max(128);
        Bloom { bits: vec![0; words], mask: (words as u64 * 64) - 1 }
    }

    fn positions(&self, h: u64) -> [u64; 3] {
        let h1 = mix(h);
        let h2 = mix(h1) | 1;
        [h1 & self.mask, h1.wrapping_add(h2) & self.mask, h1.wrapping_add(h2.wrapping_mul(2)) & self.mask]
    }

    pub(crate) fn insert(&mut self, h: u64) {
        for p in self.positions(h) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    pub(crate) fn may_contain(&self, h: u64) -> bool {
        self.positions(h).iter().all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// Filters for the current and the previous bucket.
pub(crate) struct DedupeFilter {
    bytes: usize,
    current: Option<(u32, Bloom)>,
    previous: Option<(u32, Bloom)>,
}

/// Whether a bucket's filter can rule an id out.
enum Cover<'a> {
    Filter(&'a Bloom),
    Unknown,
}

impl DedupeFilter {
    pub(crate) fn new(bytes: usize) -> Self {
        DedupeFilter { bytes, current: None, previous: None }
    }

    /// The bucket of a receive time.
    pub(crate) fn bucket(received_ms: u64) -> u32 {
        (received_ms / DEDUPE_BUCKET_MS) as u32
    }

    /// Makes `bucket` the current one: warms from the keyspace at first use, rotates after.
    pub(crate) fn advance(&mut self, bucket: u32, dedupe: &Keyspace, tenants: &Keyspace) -> Result<(), fjall::Error> {
        match &self.current {
            None => {
                let cur = self.warm(bucket, dedupe, tenants)?;
                let prev = self.warm(bucket.saturating_sub(1), dedupe, tenants)?;
                self.current = Some((bucket, cur));
                self.previous = Some((bucket.saturating_sub(1), prev));
            }
            Some((b, _)) if bucket <= *b => {}
            Some((b, _)) if bucket == *b + 1 => {
                self.previous = self.current.take();
                self.current = Some((bucket, Bloom::new(self.bytes)));
            }
            Some(_) => {
                self.previous = Some((bucket - 1, Bloom::new(self.bytes)));
                self.current = Some((bucket, Bloom::new(self.bytes)));
            }
        }
        Ok(())
    }

    fn warm(&self, bucket: u32, dedupe: &Keyspace, tenants: &Keyspace) -> Result<Bloom, fjall::Error> {
        let mut bloom = Bloom::new(self.bytes);
        for tenant in tenants.iter() {
            let tenant = tenant.key()?;
            let t = String::from_utf8_lossy(&tenant);
            let prefix = keys::dedupe_bucket_prefix(&t, bucket);
            for entry in dedupe.prefix(&prefix) {
                let k = entry.key()?;
                bloom.insert(identity_hash_from_key(&tenant, &k[prefix.len()..]));
            }
        }
        Ok(bloom)
    }

    fn cover(&self, bucket: u32) -> Cover<'_> {
        for (b, bloom) in [&self.current, &self.previous].into_iter().flatten() {
            if *b == bucket {
                return Cover::Filter(bloom);
            }
        }
        Cover::Unknown
    }

    /// `false` when the id is certainly in neither `bucket` nor `bucket - 1`.
    pub(crate) fn may_contain(&self, bucket: u32, h: u64) -> bool {
        [bucket, bucket.saturating_sub(1)].iter().any(|b| match self.cover(*b) {
            Cover::Filter(bloom) => bloom.may_contain(h),
            Cover::Unknown => true,
        })
    }

    pub(crate) fn insert(&mut self, bucket: u32, h: u64) {
        for (b, bloom) in [&mut self.current, &mut self.previous].into_iter().flatten() {
            if *b == bucket {
                bloom.insert(h);
            }
        }
    }
}

/// Hash of a dedupe identity `t 0 o 0 msg_id`.
pub(crate) fn identity_hash(identity: &[u8]) -> u64 {
    hash64(identity)
}

/// The identity hash of a stored dedupe key, given its tenant and the part after the bucket
/// (`o 0 msg_id`).
fn identity_hash_from_key(tenant: &[u8], rest: &[u8]) -> u64 {
    let mut id = Vec::with_capacity(tenant.len() + 1 + rest.len());
    id.extend_from_slice(tenant);
    id.push(0);
    id.extend_from_slice(rest);
    identity_hash(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(64 * 1024);
        for i in 0..20_000u64 {
            b.insert(hash64(&i.to_le_bytes()));
        }
        assert!((0..20_000u64).all(|i| b.may_contain(hash64(&i.to_le_bytes()))));
        let fp = (20_000..120_000u64).filter(|i| b.may_contain(hash64(&i.to_le_bytes()))).count();
        assert!(fp < 2_000, "false positive rate {}%", fp as f64 / 1000.0);
    }

    #[test]
    fn buckets_not_covered_always_answer_maybe() {
        let mut f = DedupeFilter::new(4096);
        f.current = Some((10, Bloom::new(4096)));
        f.previous = Some((9, Bloom::new(4096)));
        assert!(!f.may_contain(10, 42));
        f.insert(10, 42);
        assert!(f.may_contain(10, 42));
        assert!(f.may_contain(11, 42), "bucket 11 checks 10 too");
        assert!(f.may_contain(20, 7), "uncovered buckets are unknown");
        assert!(f.may_contain(8, 7));
    }
}
