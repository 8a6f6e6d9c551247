//! Rules, rule windows, alerts, webhooks and their deliveries.
//!
//! | keyspace       | key                          | value          |
//! |----------------|------------------------------|----------------|
//! | `rules`        | `t 0 rule_id`                | `Rule`         |
//! | `rule_windows` | `t 0 rule_id 0 o`            | `WindowRecord` (only non-idle windows) |
//! | `alerts`       | `t 0 alert_id`               | `Alert`        |
//! | `open_alerts`  | `t 0 rule_id 0 o`            | alert_id       |
//! | `webhooks`     | `t 0 webhook_id`             | `Webhook`      |
//! | `outbox`       | `t 0 webhook_id 0 seq:u64`   | `Delivery` (pending, in order) |
//! | `deliveries`   | `t 0 webhook_id 0 seq:u64`   | `Delivery` (delivered or dead) |

use serde::{Deserialize, Serialize};

use super::{Batch, Error, Ks, Store, decode, encode, keys};
use crate::model::alert::{Alert, Delivery, Webhook};
use crate::model::rule::{Rule, Window};
use crate::model::{OrbId, TenantId};

/// A rule window with its owner, so a full scan needs no key parsing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub tenant: TenantId,
    pub rule_id: String,
    pub orb: OrbId,
    pub window: Window,
}

fn k2(t: &TenantId, a: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(t.as_str());
    k.extend_from_slice(a.as_bytes());
    k
}

fn k3(t: &TenantId, a: &str, b: &str) -> Vec<u8> {
    let mut k = k2(t, a);
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn kseq(t: &TenantId, webhook: &str, seq: u64) -> Vec<u8> {
    let mut k = k2(t, webhook);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    fn scan<T: serde::de::DeserializeOwned>(&self, ks: Ks, what: &'static str, prefix: &[u8]) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for guard in self.ks.get(ks).prefix(prefix) {
            out.push(decode(what, &guard.value()?)?);
        }
        Ok(out)
    }

    pub fn add_rule(batch: &mut Batch, rule: &Rule) {
        batch.put(Ks::Rules, k2(&rule.tenant, &rule.rule_id), encode(rule));
    }

    /// Deletes a rule with its windows and its open-alert index (the alerts themselves stay).
    pub fn delete_rule(&self, batch: &mut Batch, tenant: &TenantId, rule_id: &str) -> Result<(), Error> {
        batch.delete(Ks::Rules, k2(tenant, rule_id));
        let mut prefix = k2(tenant, rule_id);
        prefix.push(0);
        for ks in [Ks::RuleWindows, Ks::OpenAlerts] {
            for guard in self.ks.get(ks).prefix(&prefix) {
                batch.delete(ks, guard.key()?.to_vec());
            }
        }
        Ok(())
    }

    pub fn rule(&self, tenant: &TenantId, rule_id: &str) -> Result<Option<Rule>, Error> {
        self.get_decoded(Ks::Rules, "rule", &k2(tenant, rule_id))
    }

    /// Every rule of every tenant (start-up).
    pub fn all_rules(&self) -> Result<Vec<Rule>, Error> {
        self.scan(Ks::Rules, "rule", b"")
    }

    pub fn rules(&self, tenant: &TenantId) -> Result<Vec<Rule>, Error> {
        self.scan(Ks::Rules, "rule", &keys::tenant_prefix(tenant.as_str()))
    }

    /// Writes a window, or deletes it when it is idle.
    pub fn add_window(batch: &mut Batch, rec: &WindowRecord) {
        let key = k3(&rec.tenant, &rec.rule_id, rec.orb.as_str());
        if rec.window == Window::default() {
            batch.delete(Ks::RuleWindows, key);
        } else {
            batch.put(Ks::RuleWindows, key, encode(rec));
        }
    }

    pub fn all_windows(&self) -> Result<Vec<WindowRecord>, Error> {
        self.scan(Ks::RuleWindows, "rule window", b"")
    }

    pub fn add_alert(batch: &mut Batch, alert: &Alert) {
        batch.put(Ks::Alerts, k2(&alert.tenant, &alert.alert_id), encode(alert));
    }

    pub fn alert(&self, tenant: &TenantId, alert_id: &str) -> Result<Option<Alert>, Error> {
        self.get_decoded(Ks::Alerts, "alert", &k2(tenant, alert_id))
    }

    /// Alerts of a tenant, newest first, after the alert `before` (a cursor), at most `limit`,
    /// only those `keep` accepts; and whether more follow.
    pub fn alerts(
        &self,
        tenant: &TenantId,
        before: Option<&str>,
        limit: usize,
        keep: impl Fn(&Alert) -> bool,
    ) -> Result<(Vec<Alert>, bool), Error> {
        let prefix = keys::tenant_prefix(tenant.as_str());
        let hi = match before {
            Some(id) => k2(tenant, id),
            None => {
                let mut k = prefix.clone();
                k.push(0xff);
                k
            }
        };
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Alerts).range(prefix..hi).rev() {
            let a: Alert = decode("alert", &guard.value()?)?;
            if !keep(&a) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(a);
        }
        Ok((out, false))
    }

    pub fn set_open_alert(batch: &mut Batch, alert: &Alert, open: bool) {
        let key = k3(&alert.tenant, &alert.rule_id, alert.orb.as_str());
        if open {
            batch.put(Ks::OpenAlerts, key, alert.alert_id.as_bytes().to_vec());
        } else {
            batch.delete(Ks::OpenAlerts, key);
        }
    }

    /// The open (or acknowledged) alert of a rule and orb.
    pub fn open_alert(&self, tenant: &TenantId, rule_id: &str, orb: &OrbId) -> Result<Option<Alert>, Error> {
        match self.ks.get(Ks::OpenAlerts).get(k3(tenant, rule_id, orb.as_str()))? {
            Some(id) => self.alert(tenant, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Every open (or acknowledged) alert (start-up of the rule partitions).
    pub fn all_open_alerts(&self) -> Result<Vec<Alert>, Error> {
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::OpenAlerts).iter() {
            let (k, v) = guard.into_inner()?;
            let Some(end) = k.iter().position(|b| *b == 0) else { continue };
            let tenant = TenantId::parse(&String::from_utf8_lossy(&k[..end]))
                .map_err(|e| Error::Corrupt { what: "open alert key", detail: e.to_string() })?;
            if let Some(a) = self.alert(&tenant, &String::from_utf8_lossy(&v))? {
                out.push(a);
            }
        }
        Ok(out)
    }

    pub fn add_webhook(batch: &mut Batch, w: &Webhook) {
        batch.put(Ks::Webhooks, k2(&w.tenant, &w.webhook_id), encode(w));
    }

    /// Deletes a webhook with its pending deliveries (the delivery log stays).
    pub fn delete_webhook(&self, batch: &mut Batch, tenant: &TenantId, webhook_id: &str) -> Result<(), Error> {
        batch.delete(Ks::Webhooks, k2(tenant, webhook_id));
        let mut prefix = k2(tenant, webhook_id);
        prefix.push(0);
        for guard in self.ks.get(Ks::Outbox).prefix(&prefix) {
            batch.delete(Ks::Outbox, guard.key()?.to_vec());
        }
        Ok(())
    }

    pub fn webhook(&self, tenant: &TenantId, webhook_id: &str) -> Result<Option<Webhook>, Error> {
        self.get_decoded(Ks::Webhooks, "webhook", &k2(tenant, webhook_id))
    }

    pub fn all_webhooks(&self) -> Result<Vec<Webhook>, Error> {
        self.scan(Ks::Webhooks, "webhook", b"")
    }

    pub fn webhooks(&self, tenant: &TenantId) -> Result<Vec<Webhook>, Error> {
        self.scan(Ks::Webhooks, "webhook", &keys::tenant_prefix(tenant.as_str()))
    }

    /// Queues (or updates) a pending delivery.
    pub fn add_outbox(batch: &mut Batch, d: &Delivery) {
        batch.put(Ks::Outbox, kseq(&d.tenant, &d.webhook_id, d.seq), encode(d));
    }

    /// Moves a delivery from the outbox to the delivery log (delivered or dead).
    pub fn finish_delivery(batch: &mut Batch, d: &Delivery) {
        batch.delete(Ks::Outbox, kseq(&d.tenant, &d.webhook_id, d.seq));
        batch.put(Ks::Deliveries, kseq(&d.tenant, &d.webhook_id, d.seq), encode(d));
    }

    /// Takes a finished delivery out of the log (to queue it again).
    pub fn unlog_delivery(batch: &mut Batch, d: &Delivery) {
        batch.delete(Ks::Deliveries, kseq(&d.tenant, &d.webhook_id, d.seq));
    }

    /// Visits a webhook's pending deliveries in order, up to `limit`, while `f` says go on.
    pub fn scan_outbox(
        &self,
        tenant: &TenantId,
        webhook_id: &str,
        limit: usize,
        mut f: impl FnMut(Delivery) -> bool,
    ) -> Result<(), Error> {
        let mut prefix = k2(tenant, webhook_id);
        prefix.push(0);
        for guard in self.ks.get(Ks::Outbox).prefix(&prefix).take(limit) {
            if !f(decode("delivery", &guard.value()?)?) {
                break;
            }
        }
        Ok(())
    }

    pub fn outbox_len(&self, tenant: &TenantId, webhook_id: &str) -> Result<usize, Error> {
        let mut prefix = k2(tenant, webhook_id);
        prefix.push(0);
        Ok(self.ks.get(Ks::Outbox).prefix(&prefix).count())
    }

    /// The highest sequence number a webhook has used, pending or finished.
    pub fn last_delivery_seq(&self, tenant: &TenantId, webhook_id: &str) -> Result<u64, Error> {
        let mut prefix = k2(tenant, webhook_id);
        prefix.push(0);
        let mut last = 0;
        for ks in [Ks::Outbox, Ks::Deliveries] {
            if let Some(guard) = self.ks.get(ks).prefix(&prefix).next_back() {
                let d: Delivery = decode("delivery", &guard.value()?)?;
                last = last.max(d.seq);
            }
        }
        Ok(last)
    }

    /// A finished delivery.
    pub fn logged_delivery(&self, tenant: &TenantId, webhook_id: &str, seq: u64) -> Result<Option<Delivery>, Error> {
        self.get_decoded(Ks::Deliveries, "delivery", &kseq(tenant, webhook_id, seq))
    }

    /// Pending and finished deliveries of a webhook, newest first, at most `limit`.
    pub fn deliveries(&self, tenant: &TenantId, webhook_id: &str, limit: usize) -> Result<Vec<Delivery>, Error> {
        let mut prefix = k2(tenant, webhook_id);
        prefix.push(0);
        let mut all: Vec<Delivery> = Vec::new();
        for ks in [Ks::Outbox, Ks::Deliveries] {
            for guard in self.ks.get(ks).prefix(&prefix).rev().take(limit) {
                all.push(decode("delivery", &guard.value()?)?);
            }
        }
        all.sort_by_key(|d| std::cmp::Reverse(d.seq));
        all.truncate(limit);
        Ok(all)
    }
}
