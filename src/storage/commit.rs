//! Group commit: one thread owns durability. Writers hand it a [`Batch`] and wait; it folds
//! every batch that is waiting into one fjall write batch and one fsync (`PersistMode::SyncAll`),
//! then answers them all. While one fsync runs, the next group forms, so durability costs one
//! fsync per group rather than one per message. `orbmanager_commit_latency_seconds` times a
//! group; `orbmanager_commit_wait_seconds` the time a request queued before its group started
//! (an fsync stalled behind other disk writes shows there, for every request behind it).
//!
//! Bound: the queue holds `commit_queue_max` requests; senders wait (back-pressure reaches the
//! MQTT connection, which stops reading). Invariant: a reply of `Ok` means the write is on disk.
//! A poisoned store (a failed fsync) is fatal: the thread answers every waiter with an error and
//! aborts the process, so nothing after the failure is acknowledged and recovery replays the
//! journal.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use fjall::{Database, Keyspace, PersistMode};
use tokio::sync::{mpsc, oneshot};

use super::dedupe::{DedupeFilter, identity_hash};
use super::{Error, Keyspaces, Ks};
use crate::limits::COMMIT_BATCH_MAX;
use crate::metrics::Metrics;

/// One write, as the committer applies it.
#[derive(Debug)]
pub(crate) enum Op {
    Put(Ks, Vec<u8>, Vec<u8>),
    Delete(Ks, Vec<u8>),
}

/// A `msg_id` check: the batch is dropped as a duplicate if the id was seen in the current or
/// the previous dedupe bucket, or earlier in the same group.
#[derive(Debug)]
pub(crate) struct DedupeProbe {
    /// Identity independent of the bucket (tenant, orb, msg_id), for the in-group check.
    pub id: Vec<u8>,
    /// The bucket of the receive time.
    pub bucket: u32,
    /// Key in the current bucket (written when the batch is stored).
    pub current: Vec<u8>,
    /// Key in the previous bucket (only read).
    pub previous: Vec<u8>,
}

/// Writes that become durable together.
#[derive(Debug, Default)]
pub struct Batch {
    pub(crate) ops: Vec<Op>,
    pub(crate) dedupe: Option<DedupeProbe>,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Appends the operations of `other` (which carries no dedupe probe), in order.
    pub fn append(&mut self, other: Batch) {
        debug_assert!(other.dedupe.is_none(), "a batch with a dedupe probe is committed on its own");
        self.ops.extend(other.ops);
    }

    pub(crate) fn put(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(ks, key, value));
    }

    pub(crate) fn delete(&mut self, ks: Ks, key: Vec<u8>) {
        self.ops.push(Op::Delete(ks, key));
    }
}

/// What became of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written and fsync'd.
    Stored,
    /// Its `msg_id` was seen already; nothing written (the first copy is durable).
    Duplicate,
}

enum Request {
    /// A batch, its reply and when it was queued.
    Commit(Batch, oneshot::Sender<Result<Outcome, Error>>, Instant),
    Shutdown,
}

/// The sending side, shared by every writer.
#[derive(Clone)]
pub(crate) struct Committer {
    tx: mpsc::Sender<Request>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Committer {
    pub(crate) fn start(
        db: Database,
        ks: Keyspaces,
        queue_max: usize,
        filter_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue_max);
        let thread = std::thread::Builder::new()
            .name("orb-commit".into())
            .spawn(move || run(db, ks, rx, DedupeFilter::new(filter_bytes), metrics))
            .expect("spawning the commit thread");
        Committer { tx, thread: Arc::new(std::sync::Mutex::new(Some(thread))) }
    }

    /// Submits a batch and waits until it is durable (or found to be a duplicate).
    pub(crate) async fn commit(&self, batch: Batch) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request::Commit(batch, reply, Instant::now())).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Submits a batch from a thread that is not async (bulk loads, tests).
    pub(crate) fn commit_blocking(&self, batch: Batch) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.blocking_send(Request::Commit(batch, reply, Instant::now())).map_err(|_| Error::Closed)?;
        rx.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Commits everything queued so far, then stops the thread. Later commits get `Closed`.
    pub(crate) fn shutdown(&self) {
        // If the queue is full this waits for room, which the running thread makes.
        let _ = self.tx.blocking_send(Request::Shutdown);
        let handle = self.thread.lock().map(|mut g| g.take()).unwrap_or(None);
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn run(db: Database, ks: Keyspaces, mut rx: mpsc::Receiver<Request>, mut filter: DedupeFilter, metrics: Arc<Metrics>) {
    let mut group: Vec<(Batch, oneshot::Sender<Result<Outcome, Error>>)> = Vec::with_capacity(256);
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(256);
    let mut stopping = false;
    while !stopping {
        match rx.blocking_recv() {
            Some(Request::Commit(b, r, queued)) => {
                metrics.commit_wait.observe(queued.elapsed());
                group.push((b, r));
            }
            Some(Request::Shutdown) | None => stopping = true,
        }
        while group.len() < COMMIT_BATCH_MAX {
            match rx.try_recv() {
                Ok(Request::Commit(b, r, queued)) => {
                    metrics.commit_wait.observe(queued.elapsed());
                    group.push((b, r));
                }
                Ok(Request::Shutdown) => stopping = true,
                Err(_) => break,
            }
        }
        if group.is_empty() {
            continue;
        }
        let started = Instant::now();
        let result = write_group(&db, &ks, &mut group, &mut seen, &mut filter, &mut outcomes);
        let elapsed = started.elapsed();
        metrics.commit_groups.inc();
        metrics.commit_requests.add(group.len() as u64);
        metrics.commit_latency.observe(elapsed);
        match result {
            Ok(()) => {
                for ((_, reply), outcome) in group.drain(..).zip(outcomes.drain(..)) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(GroupError { error: e, fatal }) => {
                tracing::error!(error = %e, "group commit failed; nothing in this group is acknowledged");
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(Error::CommitFailed(e.to_string())));
                }
                outcomes.clear();
                if fatal {
                    // A failed fsync leaves the journal in an unknown state: crash and let
                    // recovery replay what was durable. Never retry around it.
                    tracing::error!("storage is poisoned; aborting so recovery can run");
                    std::process::abort();
                }
            }
        }
        seen.clear();
    }
    // Drain done: make sure everything written is on disk before the thread ends.
    if let Err(e) = db.persist(PersistMode::SyncAll) {
        tracing::error!(error = %e, "final persist failed");
    }
}

/// A failed group; `fatal` when the journal write or fsync failed (the store is poisoned).
struct GroupError {
    error: Error,
    fatal: bool,
}

fn write_group(
    db: &Database,
    ks: &Keyspaces,
    group: &mut [(Batch, oneshot::Sender<Result<Outcome, Error>>)],
    seen: &mut HashSet<Vec<u8>>,
    filter: &mut DedupeFilter,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), GroupError> {
    let read_err = |e: fjall::Error| GroupError { error: Error::Engine(e), fatal: false };
    let write_err = |e: fjall::Error| GroupError { error: Error::Engine(e), fatal: true };
    let mut wb = db.batch();
    let dedupe: &Keyspace = ks.get(Ks::Dedupe);
    for (batch, _) in group.iter_mut() {
        if let Some(probe) = batch.dedupe.take() {
            filter.advance(probe.bucket, dedupe, ks.get(Ks::Tenants)).map_err(read_err)?;
            let h = identity_hash(&probe.id);
            // The filter rules out almost every id from memory; fjall decides the rest.
            let dup = seen.contains(&probe.id)
                || (filter.may_contain(probe.bucket, h)
                    && (dedupe.contains_key(&probe.current).map_err(read_err)?
                        || dedupe.contains_key(&probe.previous).map_err(read_err)?));
            if dup {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            filter.insert(probe.bucket, h);
            seen.insert(probe.id);
            wb.insert(dedupe, probe.current, Vec::<u8>::new());
        }
        for op in batch.ops.drain(..) {
            match op {
                Op::Put(which, k, v) => wb.insert(ks.get(which), k, v),
                Op::Delete(which, k) => wb.remove(ks.get(which), k),
            }
        }
        outcomes.push(Outcome::Stored);
    }
    if !wb.is_empty() {
        wb.commit().map_err(write_err)?;
        db.persist(PersistMode::SyncAll).map_err(write_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::metrics::Metrics;
    use crate::model::{OrbId, OrbKey, TenantId, telemetry};
    use crate::storage::{Batch, Outcome, Store, StoreOptions};

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn each_request_records_its_queue_wait_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let key = OrbKey::new(TenantId::parse("t1").unwrap(), OrbId::parse("o1").unwrap());
        let store = Store::open(dir.path(), &StoreOptions::default(), metrics.clone()).unwrap();
        for i in 0..3u64 {
            let raw = format!(r#"{{"ts": {}, "msg_id": "m{i}", "metrics": {{"load": {i}}}}}"#, NOW - 10 + i);
            let point = telemetry::parse(raw.as_bytes(), NOW, 4_096).unwrap();
            let mut batch = Batch::new();
            Store::add_telemetry(&mut batch, &key, &point, NOW, raw.as_bytes());
            assert_eq!(store.commit_blocking(batch).unwrap(), Outcome::Stored);
        }
        assert_eq!(metrics.commit_wait.count(), 3, "one queue wait per request");
        assert_eq!(metrics.commit_requests.get(), 3);
        assert!(metrics.render().contains("orbmanager_commit_wait_seconds_count 3\n"));
        store.close();
        drop(store);

        let store = Store::open(dir.path(), &StoreOptions::default(), Arc::new(Metrics::default())).unwrap();
        let latest = store.latest_point(&key).unwrap().expect("the committed points are there after a reopen");
        assert_eq!(latest.point.ts, NOW - 8);
        assert_eq!(latest.point.metrics.get("load"), Some(2.0));
    }
}
