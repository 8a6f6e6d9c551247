//! The tenant event log.
//!
//! | keyspace | key             | value   |
//! |----------|-----------------|---------|
//! | `events` | `t 0 seq:u64`   | `Event` |

use super::{Batch, Error, Ks, Store, decode, encode, keys};
use crate::model::TenantId;
use crate::model::event::Event;

fn key(t: &TenantId, seq: u64) -> Vec<u8> {
    let mut k = keys::tenant_prefix(t.as_str());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    pub fn add_event(batch: &mut Batch, e: &Event) {
        batch.put(Ks::Events, key(&e.tenant, e.seq), encode(e));
    }

    /// The first and last sequence numbers a tenant's log holds.
    pub fn event_bounds(&self, tenant: &TenantId) -> Result<Option<(u64, u64)>, Error> {
        let prefix = keys::tenant_prefix(tenant.as_str());
        let ks = self.ks.get(Ks::Events);
        let first = match ks.prefix(&prefix).next() {
            Some(g) => decode::<Event>("event", &g.value()?)?.seq,
            None => return Ok(None),
        };
        let last = match ks.prefix(&prefix).next_back() {
            Some(g) => decode::<Event>("event", &g.value()?)?.seq,
            None => first,
        };
        Ok(Some((first, last)))
    }

    /// Up to `limit` events with `after < seq <= upto`, in order.
    pub fn events(&self, tenant: &TenantId, after: u64, upto: u64, limit: usize) -> Result<Vec<Event>, Error> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Events).range(key(tenant, after + 1)..=key(tenant, upto)).take(limit) {
            out.push(decode("event", &guard.value()?)?);
        }
        Ok(out)
    }

    /// Deletes a tenant's events older than `cutoff_ms` and beyond the newest `keep_max`, up to
    /// `chunk` of them; returns how many went and the first sequence number still kept.
    pub fn prune_events(
        &self,
        tenant: &TenantId,
        cutoff_ms: u64,
        keep_max: u64,
        chunk: usize,
    ) -> Result<(usize, Option<u64>), Error> {
        let Some((_, last)) = self.event_bounds(tenant)? else { return Ok((0, None)) };
        let prefix = keys::tenant_prefix(tenant.as_str());
        let ks = self.ks.get(Ks::Events);
        let mut batch = self.db.batch();
        let mut removed = 0;
        let mut first_kept = None;
        for guard in ks.prefix(&prefix) {
            let (k, v) = guard.into_inner()?;
            let e: Event = decode("event", &v)?;
            let over = last.saturating_sub(e.seq) >= keep_max;
            if (e.occurred_ms >= cutoff_ms && !over) || removed == chunk {
                first_kept = Some(e.seq);
                break;
            }
            batch.remove(ks, k.to_vec());
            removed += 1;
        }
        if removed > 0 {
            batch.commit()?;
        }
        Ok((removed, first_kept))
    }
}
