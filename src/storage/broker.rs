//! The broker's durable records: retained messages, per-tenant topic policies and persistent
//! sessions with their queues.
//!
//! | keyspace         | key                       | value            |
//! |------------------|---------------------------|------------------|
//! | `retained`       | `t 0 topic`               | `RetainedRecord` |
//! | `topic_policies` | `t`                       | `TopicPolicy`    |
//! | `sessions`       | `t 0 client_id`           | `SessionRecord`  |
//! | `session_queue`  | `t 0 client_id 0 seq(be)` | `QueuedRecord`   |
//!
//! Client ids never contain NUL (refused at CONNECT), so `t 0 client_id 0` is the exact prefix
//! of one session's queue.

use super::{Batch, Error, Ks, Store, decode, encode, keys};
use crate::broker::{QueuedRecord, RetainedRecord, SessionRecord};
use crate::model::TenantId;
use crate::model::topics::TopicPolicy;

fn retained_key(t: &TenantId, topic: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(t.as_str());
    k.extend_from_slice(topic.as_bytes());
    k
}

fn session_key(t: &TenantId, client_id: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(t.as_str());
    k.extend_from_slice(client_id.as_bytes());
    k
}

fn queue_prefix(t: &TenantId, client_id: &str) -> Vec<u8> {
    let mut k = session_key(t, client_id);
    k.push(0);
    k
}

fn queued_key(t: &TenantId, client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(t, client_id);
    k.extend_from_slice(&seq.to_be_bytes());
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

impl Store {
    pub fn put_session(batch: &mut Batch, tenant: &TenantId, client_id: &str, rec: &SessionRecord) {
        batch.put(Ks::Sessions, session_key(tenant, client_id), encode(rec));
    }

    /// Deletes a session and everything queued for it.
    pub fn delete_session(&self, batch: &mut Batch, tenant: &TenantId, client_id: &str) -> Result<(), Error> {
        batch.delete(Ks::Sessions, session_key(tenant, client_id));
        for g in self.ks.get(Ks::SessionQueue).prefix(queue_prefix(tenant, client_id)) {
            batch.delete(Ks::SessionQueue, g.key()?.to_vec());
        }
        Ok(())
    }

    pub fn put_queued(batch: &mut Batch, tenant: &TenantId, client_id: &str, seq: u64, rec: &QueuedRecord) {
        batch.put(Ks::SessionQueue, queued_key(tenant, client_id, seq), encode(rec));
    }

    pub fn delete_queued(batch: &mut Batch, tenant: &TenantId, client_id: &str, seq: u64) {
        batch.delete(Ks::SessionQueue, queued_key(tenant, client_id, seq));
    }

    /// Every persistent session of every tenant: (tenant, client id, record).
    pub fn sessions_all(&self) -> Result<Vec<(TenantId, String, SessionRecord)>, Error> {
        let mut out = Vec::new();
        for g in self.ks.get(Ks::Sessions).iter() {
            let (k, v) = g.into_inner()?;
            let Some(end) = k.iter().position(|b| *b == 0) else { continue };
            let Ok(t) = TenantId::parse(&String::from_utf8_lossy(&k[..end])) else { continue };
            let client_id = String::from_utf8_lossy(&k[end + 1..]).into_owned();
            out.push((t, client_id, decode("session", &v)?));
        }
        Ok(out)
    }

    /// What is queued for one session, oldest first: (seq, record).
    pub fn session_queue(&self, tenant: &TenantId, client_id: &str) -> Result<Vec<(u64, QueuedRecord)>, Error> {
        let prefix = queue_prefix(tenant, client_id);
        let mut out = Vec::new();
        for g in self.ks.get(Ks::SessionQueue).prefix(&prefix) {
            let (k, v) = g.into_inner()?;
            let Ok(seq) = <[u8; 8]>::try_from(&k[prefix.len()..]) else { continue };
            out.push((u64::from_be_bytes(seq), decode("queued message", &v)?));
        }
        Ok(out)
    }
}
