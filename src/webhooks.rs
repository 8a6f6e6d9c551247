//! Webhook delivery: a durable outbox per webhook, one worker per webhook delivering in
//! sequence order (so events of one orb arrive in order), signed, retried with exponential
//! backoff and jitter, dead-lettered after `max_attempts` and redeliverable.
//!
//! Events enter the outbox in the same batch as the change that caused them (see `events.rs`), so an event
//! exists exactly when its cause is durable. A delivery leaves the outbox (into the delivery
//! log) only after the receiver answered 2xx or the attempts ran out: a crash re-sends the
//! head, so receivers see each event at least once and dedupe by `event_id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::model::TenantId;
use crate::model::alert::{Delivery, DeliveryState, Webhook, backoff_ms, signature};
use crate::model::event::Event;
use crate::storage::{self, Batch, Store};

/// Pending deliveries one webhook may have; beyond it new events go straight to the dead
/// letter log (from where they can be redelivered) instead of growing the outbox.
pub const OUTBOX_MAX: usize = 100_000;
/// Longest `ca_pem` a webhook may carry, in bytes.
pub const CA_PEM_MAX: usize = 64 * 1024;
/// Time one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

struct Hook {
    w: Webhook,
    /// The HTTP client for this webhook (its own when it trusts a private CA).
    agent: ureq::Agent,
    last_seq: AtomicU64,
    pending: AtomicUsize,
    wake: Notify,
    stop: AtomicBool,
}

struct Inner {
    store: Store,
    clock: Clock,
    metrics: Arc<Metrics>,
    hooks: RwLock<HashMap<TenantId, Vec<Arc<Hook>>>>,
    /// The shared client: https verified against the Mozilla roots.
    agent: ureq::Agent,
}

/// The certificates of a webhook's `ca_pem`; an error says what is wrong with it.
pub fn ca_roots(pem: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    if pem.len() > CA_PEM_MAX {
        return Err(format!("ca_pem is longer than {CA_PEM_MAX} bytes"));
    }
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem.as_bytes()) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => return Err("ca_pem must hold certificates only (no private keys)".into()),
            Err(e) => return Err(format!("ca_pem: {e}")),
        }
    }
    if certs.is_empty() {
        return Err("ca_pem holds no PEM certificate".into());
    }
    Ok(certs)
}

/// An HTTP client for deliveries; `roots` replaces the public roots for https.
fn agent(roots: Option<Vec<ureq::tls::Certificate<'static>>>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        .user_agent("orbmanager-webhooks");
    if let Some(roots) = roots {
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&roots)).build();
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// The dispatcher; cheap to clone.
#[derive(Clone)]
pub struct Webhooks(Arc<Inner>);

/// Workers to wake after a batch with their deliveries is durable.
pub struct Woken(Vec<Arc<Hook>>);

impl Webhooks {
    /// Loads every webhook and starts its worker.
    pub fn start(store: Store, clock: Clock, metrics: Arc<Metrics>) -> Result<Webhooks, storage::Error> {
        let agent = agent(None);
        let w = Webhooks(Arc::new(Inner { store, clock, metrics, hooks: RwLock::new(HashMap::new()), agent }));
        for hook in w.0.store.all_webhooks()? {
            w.add(hook)?;
        }
        Ok(w)
    }

    /// Starts delivering for a (durable) webhook.
    pub fn add(&self, w: Webhook) -> Result<(), storage::Error> {
        let last_seq = self.0.store.last_delivery_seq(&w.tenant, &w.webhook_id)?;
        let pending = self.0.store.outbox_len(&w.tenant, &w.webhook_id)?;
        // Validated at creation; a stored CA that no longer parses fails its deliveries
        // visibly (unknown issuer) rather than falling back to the public roots.
        let client = match w.ca_pem.as_deref().map(ca_roots) {
            None => self.0.agent.clone(),
            Some(Ok(roots)) => agent(Some(roots)),
            Some(Err(e)) => {
                tracing::error!(webhook = %w.webhook_id, error = %e, "the webhook's ca_pem does not parse");
                agent(Some(Vec::new()))
            }
        };
        let hook = Arc::new(Hook {
            w,
            agent: client,
            last_seq: AtomicU64::new(last_seq),
            pending: AtomicUsize::new(pending),
            wake: Notify::new(),
            stop: AtomicBool::new(false),
        });
        self.0.hooks.write().expect("webhooks lock").entry(hook.w.tenant.clone()).or_default().push(hook.clone());
        tokio::spawn(run(self.0.clone(), hook));
        Ok(())
    }

    /// Stops a deleted webhook's worker.
    pub fn remove(&self, tenant: &TenantId, webhook_id: &str) {
        let mut m = self.0.hooks.write().expect("webhooks lock");
        if let Some(v) = m.get_mut(tenant) {
            v.retain(|h| {
                let keep = h.w.webhook_id != webhook_id;
                if !keep {
                    h.stop.store(true, Ordering::Release);
                    h.wake.notify_one();
                }
                keep
            });
        }
    }

    fn hook(&self, tenant: &TenantId, webhook_id: &str) -> Option<Arc<Hook>> {
        let m = self.0.hooks.read().expect("webhooks lock");
        m.get(tenant)?.iter().find(|h| h.w.webhook_id == webhook_id).cloned()
    }

    /// Reserves the next sequence number of a webhook for a delivery queued again.
    pub fn reserve(&self, tenant: &TenantId, webhook_id: &str) -> Option<u64> {
        let h = self.hook(tenant, webhook_id)?;
        h.pending.fetch_add(1, Ordering::AcqRel);
        Some(h.last_seq.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Wakes a webhook's worker.
    pub fn poke(&self, tenant: &TenantId, webhook_id: &str) {
        if let Some(h) = self.hook(tenant, webhook_id) {
            h.wake.notify_one();
        }
    }

    /// Adds a delivery of `event` to `batch` for each webhook subscribed to its type.
    pub fn enqueue(&self, batch: &mut Batch, event: &Event, now_ms: u64) -> Woken {
        let mut woken = Vec::new();
        let hooks = self.0.hooks.read().expect("webhooks lock").get(&event.tenant).cloned().unwrap_or_default();
        for h in hooks.iter().filter(|h| h.w.events.contains(&event.event_type)) {
            let seq = h.last_seq.fetch_add(1, Ordering::AcqRel) + 1;
            let mut d = Delivery {
                tenant: event.tenant.clone(),
                webhook_id: h.w.webhook_id.clone(),
                seq,
                orb: event.orb.clone(),
                event_type: event.event_type.clone(),
                body: event.body.clone(),
                state: DeliveryState::Pending,
                attempts: 0,
                next_attempt_ms: now_ms,
                last_error: None,
                created_ms: now_ms,
                finished_ms: None,
            };
            if h.pending.load(Ordering::Acquire) >= OUTBOX_MAX {
                d.state = DeliveryState::Dead;
                d.last_error = Some(format!("outbox full ({OUTBOX_MAX} pending); redeliver when it drains"));
                d.finished_ms = Some(now_ms);
                Store::finish_delivery(batch, &d);
                self.0.metrics.webhook_dead.inc();
                continue;
            }
            h.pending.fetch_add(1, Ordering::AcqRel);
            Store::add_outbox(batch, &d);
            woken.push(h.clone());
        }
        Woken(woken)
    }

    pub fn wake(&self, woken: &Woken) {
        for h in &woken.0 {
            h.wake.notify_one();
        }
    }

    pub fn stop(&self) {
        for v in self.0.hooks.read().expect("webhooks lock").values() {
            for h in v {
                h.stop.store(true, Ordering::Release);
                h.wake.notify_one();
            }
        }
    }
}

/// Outbox entries a worker looks at, at most, to find work.
const WINDOW: usize = 512;

type Attempt = (Delivery, Result<(), String>);

/// One webhook's worker, until stopped. Up to `concurrency` POSTs are in flight at once, each
/// for a different orb: the first pending delivery of each orb in the outbox head (so one
/// orb's events stay in order and a failing one holds back only its own orb). As attempts
/// finish, their outcomes (with any others finished meanwhile) are recorded in one batch and
/// freed slots are refilled at once: the pipeline never waits for its slowest POST.
async fn run(inner: Arc<Inner>, hook: Arc<Hook>) {
    let (tenant, id) = (hook.w.tenant.clone(), hook.w.webhook_id.clone());
    let slots = hook.w.concurrency as usize;
    let mut busy: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut set: tokio::task::JoinSet<Attempt> = tokio::task::JoinSet::new();
    while !hook.stop.load(Ordering::Acquire) {
        let now = inner.clock.now_ms();
        let mut next_wake = now + 5_000;
        if set.len() < slots {
            let free = slots - set.len();
            let mut first_of = std::collections::HashSet::new();
            let mut picked = Vec::new();
            let scanned = inner.store.scan_outbox(&tenant, &id, WINDOW, |d| {
                if !first_of.insert(d.orb.clone()) || busy.contains(&d.orb) {
                    return true;
                }
                if d.next_attempt_ms > now {
                    next_wake = next_wake.min(d.next_attempt_ms);
                    return true;
                }
                picked.push(d);
                picked.len() < free
            });
            if let Err(e) = scanned {
                tracing::error!(webhook = %id, error = %e, "reading the outbox failed");
            }
            for d in picked {
                busy.insert(d.orb.clone());
                let hook = hook.clone();
                set.spawn(async move {
                    let r = attempt(&hook, &d, now).await;
                    (d, r)
                });
            }
        }
        let wait = Duration::from_millis(next_wake.saturating_sub(now).max(1));
        if set.is_empty() {
            let _ = tokio::time::timeout(wait, hook.wake.notified()).await;
            continue;
        }
        let first = tokio::select! {
            joined = set.join_next() => joined,
            _ = hook.wake.notified(), if set.len() < slots => continue,
            _ = tokio::time::sleep(wait), if set.len() < slots => continue,
        };
        let mut finished: Vec<Attempt> = first.into_iter().filter_map(Result::ok).collect();
        while let Some(joined) = set.try_join_next() {
            finished.extend(joined.ok());
        }
        record(&inner, &hook, finished, &mut busy).await;
    }
}

/// Records finished attempts in one batch: delivered and dead ones leave the outbox for the
/// delivery log, failed ones stay with their next attempt time. Their orbs are free again
/// once the batch is durable (or, if it failed, to retry from what the store says).
async fn record(
    inner: &Arc<Inner>,
    hook: &Arc<Hook>,
    finished: Vec<Attempt>,
    busy: &mut std::collections::HashSet<String>,
) {
    let id = &hook.w.webhook_id;
    let mut batch = Batch::new();
    let mut done = Vec::with_capacity(finished.len());
    for (mut d, result) in finished {
        d.attempts += 1;
        let now = inner.clock.now_ms();
        match result {
            Ok(()) => {
                d.state = DeliveryState::Delivered;
                d.finished_ms = Some(now);
                d.last_error = None;
                Store::finish_delivery(&mut batch, &d);
            }
            Err(e) if d.attempts >= hook.w.max_attempts => {
                tracing::warn!(webhook = %id, seq = d.seq, error = %e, "delivery dead-lettered");
                d.state = DeliveryState::Dead;
                d.finished_ms = Some(now);
                d.last_error = Some(e);
                Store::finish_delivery(&mut batch, &d);
            }
            Err(e) => {
                tracing::debug!(webhook = %id, seq = d.seq, attempt = d.attempts, error = %e, "delivery failed");
                d.next_attempt_ms = now + backoff_ms(d.attempts, fastrand::f64());
                d.last_error = Some(e);
                Store::add_outbox(&mut batch, &d);
            }
        }
        done.push(d);
    }
    let committed = inner.store.commit(batch).await;
    for d in &done {
        busy.remove(&d.orb);
    }
    if let Err(e) = committed {
        tracing::error!(webhook = %id, error = %e, "recording deliveries failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
        return;
    }
    let now = inner.clock.now_ms();
    for d in done {
        match d.state {
            DeliveryState::Delivered => {
                hook.pending.fetch_sub(1, Ordering::AcqRel);
                inner.metrics.webhook_delivered.inc();
                inner.metrics.webhook_latency.observe(Duration::from_millis(now.saturating_sub(d.created_ms)));
            }
            DeliveryState::Dead => {
                hook.pending.fetch_sub(1, Ordering::AcqRel);
                inner.metrics.webhook_failed_attempts.inc();
                inner.metrics.webhook_dead.inc();
            }
            DeliveryState::Pending => inner.metrics.webhook_failed_attempts.inc(),
        }
    }
}

/// One signed POST; `Ok` on 2xx.
async fn attempt(hook: &Hook, d: &Delivery, now_ms: u64) -> Result<(), String> {
    let w = &hook.w;
    let ts = now_ms / 1000;
    let sig = signature(&w.secret, ts, &d.body);
    let (agent, url, body) = (hook.agent.clone(), w.url.clone(), d.body.clone());
    let (event, delivery) = (d.event_type.clone(), format!("{}/{}", d.webhook_id, d.seq));
    let r = tokio::task::spawn_blocking(move || {
        agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Orbmanager-Timestamp", ts.to_string())
            .header("X-Orbmanager-Signature", sig)
            .header("X-Orbmanager-Event", event)
            .header("X-Orbmanager-Delivery", delivery)
            .send(body.as_bytes())
            .map(|resp| resp.status().as_u16())
    })
    .await
    .map_err(|e| format!("delivery task failed: {e}"))?;
    match r {
        Ok(s) if (200..300).contains(&s) => Ok(()),
        Ok(s) => Err(format!("HTTP {s}")),
        Err(e) => Err(e.to_string()),
    }
}
