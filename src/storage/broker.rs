//! The broker's durable records: retained messages and per-tenant topic policies.
//!
//! | keyspace         | key         | value            |
//! |------------------|-------------|------------------|
//! | `retained`       | `t 0 topic` | `RetainedRecord` |
//! | `topic_policies` | `t`         | `TopicPolicy`    |

use super::{Batch, Error, Ks, Store, decode, encode, keys};
use crate::broker::RetainedRecord;
use crate::model::TenantId;
use crate::model::topics::TopicPolicy;

fn retained_key(t: &TenantId, topic: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(t.as_str());
    k.extend_from_slice(topic.as_bytes());
    k
}

impl Store {
    pub fn add_retained(batch: &mut Batch, tenant: &TenantId, rec: &RetainedRecord) {
        batch.put(Ks::Retained, retained_key(tenant, &rec.topic), encode(rec));
    }

    pub fn delete_retained(batch: &mut Batch, tenant: &TenantId, topic: &str) {
        batch.delete(Ks::Retained, retained_key(tenant, topic));
    }

    /// Every retained message of every tenant.
    pub fn retained_all(&self) -> Result<Vec<(TenantId, RetainedRecord)>, Error> {
        let mut out = Vec::new();
        for g in self.ks.get(Ks::Retained).iter() {
            let (k, v) = g.into_inner()?;
            let Some(end) = k.iter().position(|b| *b == 0) else { continue };
            let Ok(t) = TenantId::parse(&String::from_utf8_lossy(&k[..end])) else { continue };
            out.push((t, decode("retained message", &v)?));
        }
        Ok(out)
    }

    pub fn add_topic_policy(batch: &mut Batch, tenant: &TenantId, policy: &TopicPolicy) {
        batch.put(Ks::TopicPolicies, tenant.as_str().as_bytes().to_vec(), encode(policy));
    }

    /// Every tenant's topic policy.
    pub fn topic_policies(&self) -> Result<Vec<(TenantId, TopicPolicy)>, Error> {
        let mut out = Vec::new();
        for g in self.ks.get(Ks::TopicPolicies).iter() {
            let (k, v) = g.into_inner()?;
            let Ok(t) = TenantId::parse(&String::from_utf8_lossy(&k)) else { continue };
            out.push((t, decode("topic policy", &v)?));
        }
        Ok(out)
    }
}
