//! The tenant event log and its live distribution: alerts, command status changes and
//! presence, one envelope for the event stream (SSE and gRPC) and webhook bodies.
//!
//! An event is written in the same batch as the change that caused it (so it exists exactly
//! when its cause is durable), with the tenant's next sequence number as its id. Batches of
//! one tenant commit concurrently, so ids can become durable out of order; each tenant's log
//! therefore has a *visible* watermark: the highest id below which every id is settled
//! (committed, or abandoned because its batch failed). Live subscribers receive events in id
//! order as the watermark passes them, and catch-up reads from the store stop at it, so a
//! client that resumes after id N misses nothing between N and what it sees next, within the
//! retention.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;

use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::model::event::Event;
use crate::model::{OrbKey, TenantId};
use crate::storage::{self, Batch, Store};
use crate::webhooks::{Webhooks, Woken};

/// Live events held for slow subscribers before they fall back to reading the store.
const LIVE_BUFFER: usize = 4_096;
/// Events one catch-up read takes from the store.
const CATCH_UP_PAGE: usize = 256;
/// Events deleted per tenant per pruning pass.
const PRUNE_CHUNK: usize = 10_000;

/// How long the log keeps events.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_age_ms: u64,
    /// Newest events kept per tenant, whatever their age.
    pub max_per_tenant: u64,
}

impl From<&crate::config::EventsConfig> for Retention {
    fn from(c: &crate::config::EventsConfig) -> Self {
        Retention { max_age_ms: c.retention_s.saturating_mul(1000), max_per_tenant: c.max_per_tenant }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention::from(&crate::config::EventsConfig::default())
    }
}

/// One tenant's position.
struct Log {
    /// The next id to hand out.
    next: u64,
    /// Every id up to this one is settled.
    visible: u64,
    /// The oldest id the store still holds (or would hold: `visible + 1` when empty).
    oldest: u64,
    /// Settled ids above `visible`: the event when it committed, `None` when abandoned.
    settled: BTreeMap<u64, Option<Arc<Event>>>,
}

struct Inner {
    store: Store,
    metrics: Arc<Metrics>,
    webhooks: OnceLock<Webhooks>,
    logs: Mutex<HashMap<TenantId, Log>>,
    live: broadcast::Sender<Arc<Event>>,
    retention: Retention,
}

/// The event log; cheap to clone.
#[derive(Clone)]
pub struct Events(Arc<Inner>);

/// Events added to one batch, settled once the batch commits (or fails). Dropping it
/// unsettled counts as a failed commit, so an early return never blocks the tenant's stream.
pub struct Staged {
    inner: Arc<Inner>,
    events: Vec<Arc<Event>>,
    woken: Vec<Woken>,
}

impl Events {
    pub fn new(store: Store, metrics: Arc<Metrics>, retention: Retention) -> Events {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Events(Arc::new(Inner {
            store,
            metrics,
            webhooks: OnceLock::new(),
            logs: Mutex::new(HashMap::new()),
            live,
            retention,
        }))
    }

    /// Connects webhook delivery (set once at start).
    pub fn set_webhooks(&self, w: Webhooks) {
        let _ = self.0.webhooks.set(w);
    }

    pub fn stage(&self) -> Staged {
        Staged { inner: self.0.clone(), events: Vec::new(), woken: Vec::new() }
    }

    /// Runs `f` on a tenant's log, loading its position from the store the first time.
    fn with_log<T>(&self, tenant: &TenantId, f: impl FnOnce(&mut Log) -> T) -> Result<T, storage::Error> {
        let mut logs = self.0.logs.lock().expect("event logs lock");
        if !logs.contains_key(tenant) {
            let (oldest, last) = match self.0.store.event_bounds(tenant)? {
                Some((first, last)) => (first, last),
                None => (1, 0),
            };
            logs.insert(tenant.clone(), Log { next: last + 1, visible: last, oldest, settled: BTreeMap::new() });
        }
        Ok(f(logs.get_mut(tenant).expect("just inserted")))
    }

    /// Adds an event to `batch` (and a delivery to each webhook subscribed to its type).
    pub fn append(
        &self,
        batch: &mut Batch,
        staged: &mut Staged,
        key: &OrbKey,
        event_type: &str,
        data: serde_json::Value,
        now_ms: u64,
    ) -> Result<(), storage::Error> {
        let (tenant, orb) = (&key.tenant, key.orb.as_str());
        let seq = self.with_log(tenant, |log| {
            log.next += 1;
            log.next - 1
        })?;
        let event = Arc::new(Event::new(tenant.clone(), seq, event_type, orb, now_ms, data));
        // Registered before anything can fail, so the id is settled whatever happens next.
        staged.events.push(event.clone());
        Store::add_event(batch, &event);
        if let Some(w) = self.0.webhooks.get() {
            staged.woken.push(w.enqueue(batch, &event, now_ms));
        }
        Ok(())
    }

    /// The highest id a reader may see now, and the oldest one kept.
    fn position(&self, tenant: &TenantId) -> Result<(u64, u64), storage::Error> {
        self.with_log(tenant, |log| (log.visible, log.oldest))
    }

    /// Events of a tenant after `after` (oldest first), up to `limit`, for paging.
    pub fn list(&self, tenant: &TenantId, after: Option<u64>, limit: usize) -> Result<Vec<Event>, ApiError> {
        let (visible, oldest) = self.position(tenant).map_err(ApiError::internal)?;
        let after = check_after(after.unwrap_or(oldest.saturating_sub(1)), visible, oldest)?;
        self.0.store.events(tenant, after, visible, limit).map_err(ApiError::internal)
    }

    /// A stream of a tenant's events after `after` (from now on when `None`), optionally only
    /// of some types.
    pub fn subscribe(
        &self,
        tenant: &TenantId,
        after: Option<u64>,
        types: Vec<String>,
    ) -> Result<Subscription, ApiError> {
        // Subscribed before the position is read: nothing settled later is missed.
        let rx = self.0.live.subscribe();
        let (visible, oldest) = self.position(tenant).map_err(ApiError::internal)?;
        let last = match after {
            Some(a) => check_after(a, visible, oldest)?,
            None => visible,
        };
        Ok(Subscription { events: self.clone(), tenant: tenant.clone(), last, rx, backlog: VecDeque::new(), types })
    }

    /// Deletes events past the retention; run periodically.
    pub fn prune(&self, now_ms: u64) -> Result<usize, storage::Error> {
        let tenants = self.0.store.tenant_ids()?;
        let cutoff = now_ms.saturating_sub(self.0.retention.max_age_ms);
        let mut removed = 0;
        for t in tenants {
            // In chunks, so one busy tenant never builds a huge delete batch.
            loop {
                let keep = self.0.retention.max_per_tenant;
                let (n, first_kept) = self.0.store.prune_events(&t, cutoff, keep, PRUNE_CHUNK)?;
                removed += n;
                if n > 0 {
                    self.with_log(&t, |log| {
                        log.oldest = first_kept.unwrap_or(log.visible + 1).max(log.oldest);
                    })?;
                }
                if n < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(removed)
    }
}

/// `after` must lie within what the log holds: not older than the retention (the client
/// would miss events) and not newer than the latest event (an id from another server or a
/// typo).
fn check_after(after: u64, visible: u64, oldest: u64) -> Result<u64, ApiError> {
    if after > visible {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("event id {after} is newer than the latest event ({visible})"),
        ));
    }
    if after + 1 < oldest {
        return Err(ApiError::new(
            ErrorCode::OutOfRange,
            format!(
                "events after {after} are no longer kept (the oldest kept is {oldest}); resume from {} and re-read current state",
                oldest - 1
            ),
        ));
    }
    Ok(after)
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Moves another batch's events into this one (they now commit together).
    pub fn absorb(&mut self, mut other: Staged) {
        self.events.append(&mut other.events);
        self.woken.append(&mut other.woken);
    }

    /// Commits `batch` (which holds these events) and settles them: committed ones become
    /// visible in id order and their webhook workers wake; if the commit fails their ids are
    /// abandoned (skipped by readers).
    pub async fn commit(mut self, batch: Batch) -> Result<crate::storage::Outcome, storage::Error> {
        let result = self.inner.store.commit(batch).await;
        self.settle_in(result.is_ok());
        result
    }

    fn settle_in(&mut self, committed: bool) {
        if self.events.is_empty() {
            return;
        }
        let inner = &self.inner;
        let mut logs = inner.logs.lock().expect("event logs lock");
        for e in self.events.drain(..) {
            let Some(log) = logs.get_mut(&e.tenant) else { continue };
            if committed {
                inner.metrics.events.inc();
            }
            log.settled.insert(e.seq, committed.then_some(e));
            while let Some(next) = log.settled.remove(&(log.visible + 1)) {
                log.visible += 1;
                if let Some(e) = next {
                    // Sent under the lock: the channel sees each tenant's events in id order.
                    let _ = inner.live.send(e);
                }
            }
        }
        drop(logs);
        if let (true, Some(w)) = (committed, inner.webhooks.get()) {
            for woken in self.woken.drain(..) {
                w.wake(&woken);
            }
        }
        self.woken.clear();
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.settle_in(false);
    }
}

/// A resumable stream of one tenant's events.
pub struct Subscription {
    events: Events,
    tenant: TenantId,
    /// The last id passed (delivered or filtered out).
    last: u64,
    rx: broadcast::Receiver<Arc<Event>>,
    backlog: VecDeque<Event>,
    types: Vec<String>,
}

impl Subscription {
    fn wanted(&self, e: &Event) -> bool {
        self.types.is_empty() || self.types.contains(&e.event_type)
    }

    /// Reads what the store holds after `last`, up to the visible watermark.
    fn catch_up(&mut self) -> Result<bool, ApiError> {
        let (visible, oldest) = self.events.position(&self.tenant).map_err(ApiError::internal)?;
        if self.last >= visible {
            return Ok(false);
        }
        if self.last + 1 < oldest {
            return Err(ApiError::new(
                ErrorCode::OutOfRange,
                format!("the stream fell behind the retention: events after {} are gone", self.last),
            ));
        }
        let page =
            self.events.0.store.events(&self.tenant, self.last, visible, CATCH_UP_PAGE).map_err(ApiError::internal)?;
        if page.is_empty() {
            // Only abandoned ids up to the watermark.
            self.last = visible;
        }
        self.backlog.extend(page);
        Ok(true)
    }

    /// The next event; waits for one. Errors end the stream.
    pub async fn next(&mut self) -> Result<Event, ApiError> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                self.last = e.seq;
                if self.wanted(&e) {
                    return Ok(e);
                }
                continue;
            }
            if self.catch_up()? {
                continue;
            }
            match self.rx.recv().await {
                Ok(e) if e.tenant != self.tenant || e.seq <= self.last => {}
                Ok(e) if e.seq == self.last + 1 => {
                    self.last = e.seq;
                    if self.wanted(&e) {
                        return Ok((*e).clone());
                    }
                }
                // A gap (abandoned ids, or published before the subscription read its
                // position) or a lag: the store has everything up to the watermark.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(ApiError::new(ErrorCode::Unavailable, "the server is shutting down"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::storage::StoreOptions;

    fn open(retention: Retention) -> (tempfile::TempDir, Store, Events) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let store = Store::open(dir.path(), &StoreOptions::default(), metrics.clone()).unwrap();
        let events = Events::new(store.clone(), metrics, retention);
        (dir, store, events)
    }

    fn append(events: &Events, t: &TenantId, at: u64) -> (Batch, Staged) {
        let (mut batch, mut staged) = (Batch::new(), events.stage());
        let key = OrbKey::new(t.clone(), crate::model::OrbId::parse("o1").unwrap());
        events.append(&mut batch, &mut staged, &key, "orb.presence.online", serde_json::json!({}), at).unwrap();
        (batch, staged)
    }

    async fn next(sub: &mut Subscription) -> Option<u64> {
        tokio::time::timeout(Duration::from_millis(200), sub.next()).await.ok().map(|e| e.unwrap().seq)
    }

    #[tokio::test]
    async fn ids_become_visible_in_order_and_abandoned_ids_are_skipped() {
        let (_dir, _store, events) = open(Retention::default());
        let t = TenantId::parse("acme").unwrap();
        let mut sub = events.subscribe(&t, None, Vec::new()).unwrap();
        let (b1, s1) = append(&events, &t, 10);
        let (b2, s2) = append(&events, &t, 10);
        // The second batch commits first: nothing is visible until the first settles.
        s2.commit(b2).await.unwrap();
        assert_eq!(next(&mut sub).await, None, "2 waits for 1");
        assert_eq!(events.list(&t, Some(0), 10).unwrap().len(), 0, "readers stop at the watermark");
        s1.commit(b1).await.unwrap();
        assert_eq!(next(&mut sub).await, Some(1));
        assert_eq!(next(&mut sub).await, Some(2));
        // A batch that never commits (dropped on an error path) leaves a hole, not a stall.
        let (_b3, s3) = append(&events, &t, 10);
        drop(s3);
        let (b4, s4) = append(&events, &t, 10);
        s4.commit(b4).await.unwrap();
        assert_eq!(next(&mut sub).await, Some(4));
        let seqs: Vec<u64> = events.list(&t, None, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 4]);
        // Another tenant's log is separate and starts at 1.
        let other = TenantId::parse("globex").unwrap();
        let (b, s) = append(&events, &other, 10);
        s.commit(b).await.unwrap();
        assert_eq!(events.list(&other, None, 10).unwrap()[0].seq, 1);
        assert_eq!(next(&mut sub).await, None, "acme's subscriber sees nothing of globex");
    }

    #[tokio::test]
    async fn retention_prunes_by_age_and_count_and_older_ids_are_out_of_range() {
        let (_dir, store, events) = open(Retention { max_age_ms: 1_000, max_per_tenant: 3 });
        let t = TenantId::parse("acme").unwrap();
        let mut batch = Batch::new();
        Store::add_tenant(&mut batch, &crate::storage::TenantRecord { tenant: t.clone(), created_ms: 1 });
        store.commit(batch).await.unwrap();
        for at in [100, 200, 5_000, 5_100, 5_200] {
            let (b, s) = append(&events, &t, at);
            s.commit(b).await.unwrap();
        }
        // At 5,500 the first two are older than a second; of the rest, 3 may stay.
        assert_eq!(events.prune(5_500).unwrap(), 2);
        let seqs: Vec<u64> = events.list(&t, None, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        let gone = events.subscribe(&t, Some(1), Vec::new()).err().unwrap();
        assert_eq!(gone.code, ErrorCode::OutOfRange);
        assert!(gone.message.contains("oldest kept is 3"), "{}", gone.message);
        assert!(events.subscribe(&t, Some(2), Vec::new()).is_ok(), "resuming right before the oldest misses nothing");
        // By count: two more events push the oldest past the 3 kept.
        for at in [5_300, 5_400] {
            let (b, s) = append(&events, &t, at);
            s.commit(b).await.unwrap();
        }
        assert_eq!(events.prune(5_500).unwrap(), 2);
        let seqs: Vec<u64> = events.list(&t, None, 10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [5, 6, 7]);
        let future = events.subscribe(&t, Some(99), Vec::new()).err().unwrap();
        assert_eq!(future.code, ErrorCode::InvalidArgument);
    }
}
