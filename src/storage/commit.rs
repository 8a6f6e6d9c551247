//! Group commit: one thread owns durability. Writers hand it a [`Batch`] and wait; it folds
//! every batch that is waiting into one fjall write batch and one fsync (`PersistMode::SyncAll`),
//! then answers them all. While one fsync runs, the next group forms, so durability costs one
//! fsync per group rather than one per message. `orbmanager_commit_latency_seconds` times a
//! group; `orbmanager_commit_wait_seconds` the time a request queued before its group started
//! (an fsync stalled behind other disk writes shows there, for every request behind it).
//!
//! Replies: a writer on a thread that called [`deliver_replies_here`] (each MQTT worker) gets
//! its reply through that thread's reply hub: the committer hands each hub one list per group
//! and wakes it once; the hub's task, on the writer's own thread, completes the waits there.
//! Woken one by one from the commit thread instead, a single-threaded executor would run each
//! woken PUBLISH and then, before the next, the task that writes its PUBACK: one `sendto` per
//! acknowledgement. Other writers (actors, HTTP, bulk loads) are answered directly.
//!
//! Linger: on this kind of machine (a VM) an fsync costs ~90 µs of the commit thread's CPU
//! whatever the group's size (the block device's doorbell exits to the hypervisor). Devices
//! that each send one point at a time form small groups (~5 at 7,500 msg/s), so a small group
//! is held until its oldest request has waited `storage.commit_linger_us`, then topped up from
//! the queue (see [`Linger`]; `orbmanager_commit_lingers_total` counts the holds).
//!
//! Bound: the queue holds `commit_queue_max` requests; senders wait (back-pressure reaches the
//! MQTT connection, which stops reading). A hub holds at most the replies of requests that
//! passed that queue. Invariant: a reply of `Ok` means the write is on disk.
//! A poisoned store (a failed fsync) is fatal: the thread answers every waiter with an error and
//! aborts the process, so nothing after the failure is acknowledged and recovery replays the
//! journal.

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

type Answer = Result<Outcome, Error>;
/// One group's answers for one hub: each waiter with its answer.
type AnswerList = Vec<(oneshot::Sender<Answer>, Answer)>;

enum Request {
    /// A batch, its reply and when it was queued.
    Commit(Batch, Reply, Instant),
    Shutdown,
}

/// Where a request's answer goes: its waiter, through the waiter's thread's hub if it has one.
struct Reply {
    tx: oneshot::Sender<Answer>,
    hub: Option<Arc<Hub>>,
}

/// The committer's side of one thread's reply hub.
struct Hub {
    tx: mpsc::UnboundedSender<AnswerList>,
}

impl Hub {
    /// Whether the hub's task still runs (its executor has not dropped it).
    fn is_live(&self) -> bool {
        !self.tx.is_closed()
    }
}

thread_local! {
    static HUB: RefCell<Option<Arc<Hub>>> = const { RefCell::new(None) };
}

/// Makes commit replies to writers on this thread arrive as one batch per group (see the
/// module doc). `spawn` must run the hub's task on this thread's single-threaded executor
/// (an ntex worker's), which must keep polling it for as long as the thread commits: the
/// task runs until the executor drops it, and from then on replies go straight to their
/// waiters again. Idempotent per thread.
pub(crate) fn deliver_replies_here(spawn: impl FnOnce(Pin<Box<dyn Future<Output = ()>>>)) {
    if local_hub().is_some() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<AnswerList>();
    HUB.with(|h| *h.borrow_mut() = Some(Arc::new(Hub { tx })));
    spawn(Box::pin(async move {
        let mut lists = Vec::new();
        while rx.recv_many(&mut lists, 64).await > 0 {
            for (waiter, answer) in lists.drain(..).flatten() {
                // A waiter that gave up (its connection closed) has nothing to learn.
                let _ = waiter.send(answer);
            }
        }
    }));
}

/// This thread's hub, if it has a live one.
fn local_hub() -> Option<Arc<Hub>> {
    HUB.try_with(|h| h.borrow().as_ref().filter(|hub| hub.is_live()).cloned()).ok().flatten()
}

/// Collects a group's answers per hub, then delivers each hub's list with one wake.
#[derive(Default)]
struct Answers {
    lists: Vec<(Arc<Hub>, AnswerList)>,
}

impl Answers {
    fn add(&mut self, reply: Reply, answer: Answer) {
        let Some(hub) = reply.hub else {
            let _ = reply.tx.send(answer);
            return;
        };
        match self.lists.iter_mut().find(|(h, _)| Arc::ptr_eq(h, &hub)) {
            Some((_, list)) => list.push((reply.tx, answer)),
            None => self.lists.push((hub, vec![(reply.tx, answer)])),
        }
    }

    fn deliver(&mut self, metrics: &Metrics) {
        for (hub, mut list) in self.lists.drain(..) {
            if hub.is_live() {
                // Counted before the hand-over, so a waiter that has its answer sees it counted.
                metrics.commit_hub_lists.inc();
                metrics.commit_hub_answers.add(list.len() as u64);
                match hub.tx.send(list) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(back)) => list = back,
                }
            }
            // The hub's task is gone (its executor stopped): answer directly.
            for (waiter, answer) in list {
                let _ = waiter.send(answer);
            }
        }
    }
}

/// A group smaller than this may be held (see [`Linger`]); at this size an fsync is already
/// shared widely enough.
const LINGER_GROUP: usize = 32;
/// A hold during whose second half fewer requests than this were sent was not worth its
/// latency ...
const LINGER_MIN_GAIN: usize = 1;
/// ... and the next groups are not held: 1 after such a hold, twice as many after each further
/// one in a row, at most this many.
const LINGER_BACKOFF_GROUPS: u32 = 64;

/// When to hold a small group back so more writes share its fsync.
///
/// A group of fewer than [`LINGER_GROUP`] requests waits until its oldest request has waited
/// `window` (from its send, so a request that already waited through the previous fsync is not
/// held again). A hold only pays when writes keep arriving independently (devices). Writers
/// that commit in a loop (each waits for its answer before its next write) send their next
/// writes together right after a group's answers and nothing after that, so holding them only
/// stretches every round by the window. What tells the two apart is whether writes were still
/// being sent in the second half of a hold (of at least half the window). When none was, the
/// next group is not held, and after each further such hold in a row twice as many, up to
/// [`LINGER_BACKOFF_GROUPS`]: writers in a loop are held in 7 of their first 127 groups, then
/// once per 65. A hold that paid resets the back-off, so a burst that happened to leave one
/// hold's second half empty costs one unheld group. A zero window never holds.
#[derive(Debug)]
pub(crate) struct Linger {
    window: Duration,
    /// Groups still not to hold.
    skip: u32,
    /// Groups skipped after the last hold that did not pay (0: it paid).
    backoff: u32,
}

impl Linger {
    pub(crate) fn new(window: Duration) -> Self {
        Linger { window, skip: 0, backoff: 0 }
    }

    /// How long to hold a group of `len` requests whose oldest has waited `waited`, if at all.
    fn hold(&mut self, len: usize, waited: Duration) -> Option<Duration> {
        let left = self.window.saturating_sub(waited);
        if left.is_zero() || len >= LINGER_GROUP {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(left)
    }

    /// Records how many requests were sent during the second half of a hold of `held`. A hold
    /// shorter than half the window (its oldest write had already waited most of it, behind a
    /// slow fsync) says too little about arrivals to judge by.
    fn gathered(&mut self, held: Duration, n: usize) {
        if held < self.window / 2 {
            return;
        }
        if n < LINGER_MIN_GAIN {
            self.backoff = (self.backoff * 2).clamp(1, LINGER_BACKOFF_GROUPS);
            self.skip = self.backoff;
        } else {
            self.backoff = 0;
        }
    }
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
        linger: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue_max);
        let thread = std::thread::Builder::new()
            .name("orb-commit".into())
            .spawn(move || run(db, ks, rx, DedupeFilter::new(filter_bytes), Linger::new(linger), metrics))
            .expect("spawning the commit thread");
        Committer { tx, thread: Arc::new(std::sync::Mutex::new(Some(thread))) }
    }

    /// Submits a batch and waits until it is durable (or found to be a duplicate).
    pub(crate) async fn commit(&self, batch: Batch) -> Result<Outcome, Error> {
        let (tx, rx) = oneshot::channel();
        let reply = Reply { tx, hub: local_hub() };
        self.tx.send(Request::Commit(batch, reply, Instant::now())).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Submits a batch from a thread that is not async (bulk loads, tests).
    pub(crate) fn commit_blocking(&self, batch: Batch) -> Result<Outcome, Error> {
        let (tx, rx) = oneshot::channel();
        let reply = Reply { tx, hub: None };
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

/// Takes what is queued (up to a group's bound) into `group` without waiting; sets `stopping`
/// on a shutdown request. Returns how many of the requests taken were sent at or after `since`.
fn take_queued(
    rx: &mut mpsc::Receiver<Request>,
    group: &mut Vec<(Batch, Reply, Instant)>,
    stopping: &mut bool,
    since: Instant,
) -> usize {
    let mut late = 0;
    while group.len() < COMMIT_BATCH_MAX {
        match rx.try_recv() {
            Ok(Request::Commit(b, r, queued)) => {
                late += usize::from(queued >= since);
                group.push((b, r, queued));
            }
            Ok(Request::Shutdown) => *stopping = true,
            Err(_) => break,
        }
    }
    late
}

fn run(
    db: Database,
    ks: Keyspaces,
    mut rx: mpsc::Receiver<Request>,
    mut filter: DedupeFilter,
    mut linger: Linger,
    metrics: Arc<Metrics>,
) {
    let mut group: Vec<(Batch, Reply, Instant)> = Vec::with_capacity(256);
    let mut answers = Answers::default();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(256);
    let mut stopping = false;
    while !stopping {
        match rx.blocking_recv() {
            Some(Request::Commit(b, r, queued)) => group.push((b, r, queued)),
            Some(Request::Shutdown) | None => stopping = true,
        }
        take_queued(&mut rx, &mut group, &mut stopping, Instant::now());
        // The group starts empty, so its first entry is its oldest: a hold is measured from it.
        if !stopping
            && let Some(&(_, _, oldest)) = group.first()
            && let Some(hold) = linger.hold(group.len(), oldest.elapsed())
        {
            metrics.commit_lingers.inc();
            let second_half = Instant::now() + hold / 2;
            std::thread::sleep(hold);
            let late = take_queued(&mut rx, &mut group, &mut stopping, second_half);
            linger.gathered(hold, late);
        }
        if group.is_empty() {
            continue;
        }
        let started = Instant::now();
        for (_, _, queued) in &group {
            metrics.commit_wait.observe(started.saturating_duration_since(*queued));
        }
        let result = write_group(&db, &ks, &mut group, &mut seen, &mut filter, &mut outcomes);
        let elapsed = started.elapsed();
        metrics.commit_groups.inc();
        metrics.commit_requests.add(group.len() as u64);
        metrics.commit_latency.observe(elapsed);
        match result {
            Ok(()) => {
                for ((_, reply, _), outcome) in group.drain(..).zip(outcomes.drain(..)) {
                    answers.add(reply, Ok(outcome));
                }
                answers.deliver(&metrics);
            }
            Err(GroupError { error: e, fatal }) => {
                tracing::error!(error = %e, "group commit failed; nothing in this group is acknowledged");
                for (_, reply, _) in group.drain(..) {
                    answers.add(reply, Err(Error::CommitFailed(e.to_string())));
                }
                answers.deliver(&metrics);
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
    group: &mut [(Batch, Reply, Instant)],
    seen: &mut HashSet<Vec<u8>>,
    filter: &mut DedupeFilter,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), GroupError> {
    let read_err = |e: fjall::Error| GroupError { error: Error::Engine(e), fatal: false };
    let write_err = |e: fjall::Error| GroupError { error: Error::Engine(e), fatal: true };
    let mut wb = db.batch();
    let dedupe: &Keyspace = ks.get(Ks::Dedupe);
    for (batch, _, _) in group.iter_mut() {
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
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot};

    use super::{
        Answers, Error, Hub, LINGER_BACKOFF_GROUPS, LINGER_GROUP, Linger, Reply, deliver_replies_here, local_hub,
    };
    use crate::metrics::Metrics;
    use crate::model::{OrbId, OrbKey, TenantId, telemetry};
    use crate::storage::{Batch, Ks, Outcome, Store, StoreOptions};

    const NOW: u64 = 1_700_000_000_000;

    fn point_batch(key: &OrbKey, i: u64) -> Batch {
        let raw = format!(r#"{{"ts": {}, "msg_id": "h{i}", "metrics": {{"load": {i}}}}}"#, NOW - 1_000 + i);
        let point = telemetry::parse(raw.as_bytes(), NOW, 4_096).unwrap();
        let mut batch = Batch::new();
        Store::add_telemetry(&mut batch, key, &point, NOW, raw.as_bytes());
        batch
    }

    /// A fresh store with its metrics, and the key of orb `orb` of tenant t1.
    fn open_store(orb: &str) -> (tempfile::TempDir, Arc<Metrics>, OrbKey, Store) {
        open_store_with(orb, StoreOptions::default())
    }

    fn open_store_with(orb: &str, opts: StoreOptions) -> (tempfile::TempDir, Arc<Metrics>, OrbKey, Store) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let key = OrbKey::new(TenantId::parse("t1").unwrap(), OrbId::parse(orb).unwrap());
        let store = Store::open(dir.path(), &opts, metrics.clone()).unwrap();
        (dir, metrics, key, store)
    }

    fn lingering(window: Duration) -> StoreOptions {
        StoreOptions { commit_linger: window, ..StoreOptions::default() }
    }

    #[test]
    fn a_small_group_is_held_for_what_is_left_of_the_window() {
        let ms = Duration::from_millis;
        let mut l = Linger::new(ms(2));
        assert_eq!(l.hold(1, ms(0)), Some(ms(2)));
        assert_eq!(l.hold(5, Duration::from_micros(700)), Some(Duration::from_micros(1_300)), "measured from the send");
        assert_eq!(l.hold(5, ms(2)), None, "the oldest already waited the window (a slow fsync before it)");
        assert_eq!(l.hold(LINGER_GROUP - 1, ms(0)), Some(ms(2)));
        assert_eq!(l.hold(LINGER_GROUP, ms(0)), None, "a group this large already shares its fsync");
        let mut never = Linger::new(Duration::ZERO);
        assert_eq!(never.hold(1, ms(0)), None, "a zero window never holds");
    }

    #[test]
    fn holds_that_gather_nothing_back_off_exponentially_and_one_that_pays_resets() {
        let ms = Duration::from_millis;
        let mut l = Linger::new(ms(2));
        // Counts the groups not held before the next hold (at most 1,000).
        let unheld_before_next_hold = |l: &mut Linger| (0..1_000).take_while(|_| l.hold(3, ms(0)).is_none()).count();
        assert!(l.hold(3, ms(0)).is_some());
        l.gathered(ms(2), 5);
        assert_eq!(unheld_before_next_hold(&mut l), 0, "a hold that paid keeps holding");
        for expected in [1, 2, 4, 8, 16, 32, 64, 64] {
            l.gathered(ms(2), 0);
            assert_eq!(unheld_before_next_hold(&mut l), expected);
        }
        assert_eq!(LINGER_BACKOFF_GROUPS, 64);
        l.gathered(ms(1), 1);
        assert_eq!(unheld_before_next_hold(&mut l), 0, "one write in the second half pays and resets");
        l.gathered(Duration::from_micros(999), 0);
        assert_eq!(unheld_before_next_hold(&mut l), 0, "a hold under half the window is not judged");
        l.gathered(ms(1), 0);
        // Groups too large or too late to hold do not use up the back-off.
        assert_eq!(l.hold(LINGER_GROUP, ms(0)), None);
        assert_eq!(l.hold(1, ms(5)), None);
        assert_eq!(unheld_before_next_hold(&mut l), 1);
    }

    #[test]
    fn a_writer_that_commits_in_a_loop_is_held_ever_more_rarely() {
        let (_dir, metrics, key, store) = open_store_with("o3", lingering(Duration::from_millis(50)));
        let commits = 200;
        for i in 0..commits {
            assert_eq!(store.commit_blocking(point_batch(&key, i)).unwrap(), Outcome::Stored);
        }
        store.close();
        // One request in flight: nothing is sent during a hold, and the back-off grows to 64:
        // holds at groups 1, 3, 6, 11, 20, 37, 70, 135 and 200 (one later if a write reached
        // the commit thread only after the window).
        assert_eq!(metrics.commit_groups.get(), commits, "nothing to group with");
        let holds = metrics.commit_lingers.get();
        assert!((8..=9).contains(&holds), "{holds} holds for {commits} sequential commits");
    }

    #[test]
    fn writers_that_commit_in_a_loop_together_are_not_held_every_round() {
        let (_dir, metrics, key, store) = open_store_with("o5", lingering(Duration::from_millis(50)));
        let rounds = LINGER_BACKOFF_GROUPS as u64 + 1;
        // Four writers, each waiting for its answer before its next write: a round's writes
        // are sent together right after the previous round's answers, and nothing after them.
        std::thread::scope(|s| {
            for w in 0..4u64 {
                let (store, key) = (&store, &key);
                s.spawn(move || {
                    for i in 0..rounds {
                        let batch = point_batch(key, w * 1_000 + i);
                        assert_eq!(store.commit_blocking(batch).unwrap(), Outcome::Stored);
                    }
                });
            }
        });
        store.close();
        let (holds, groups) = (metrics.commit_lingers.get(), metrics.commit_groups.get());
        // Judged by what a hold gathers at all, nearly every group was held (62 in 67). The
        // back-off holds 7 of the first 127 groups, then one per 65; a writer woken late into
        // a hold's second half resets it and the ramp repeats (7 more holds), so allow for two
        // such resets and still fail when most groups are held.
        assert!(holds * 3 <= groups, "{holds} holds in {groups} groups of writers in a loop");
    }

    #[test]
    fn writes_that_trickle_in_share_held_groups() {
        let (_dir, metrics, key, store) = open_store_with("o4", lingering(Duration::from_millis(30)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let requests = 200u64;
        rt.block_on(async {
            // Open loop, like devices: one write about every millisecond, each awaited apart.
            let mut waits = Vec::new();
            for i in 0..requests {
                let (store, batch) = (store.clone(), point_batch(&key, i));
                waits.push(tokio::spawn(async move { store.commit(batch).await }));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for w in waits {
                assert_eq!(w.await.unwrap().unwrap(), Outcome::Stored);
            }
        });
        store.close();
        let groups = metrics.commit_groups.get();
        assert!(metrics.commit_lingers.get() >= 1, "small groups were held");
        // Unheld, each write would find the previous group's fsync done: about one group each.
        assert!(groups * 4 <= requests, "{groups} groups for {requests} trickling writes");
        assert!(metrics.render().contains("orbmanager_commit_lingers_total "));
        let latest = store.latest_point(&key).unwrap().expect("stored");
        assert_eq!(latest.point.metrics.get("load"), Some((requests - 1) as f64));
    }

    fn local_runtime() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        (rt, tokio::task::LocalSet::new())
    }

    #[test]
    fn a_thread_with_a_hub_gets_one_list_of_answers_per_group() {
        let (_dir, metrics, key, store) = open_store("o1");
        let groups_before = metrics.commit_groups.get();
        let (rt, local) = local_runtime();
        local.block_on(&rt, async {
            deliver_replies_here(|task| {
                tokio::task::spawn_local(task);
            });
            assert!(local_hub().is_some(), "the hub is installed on this thread");
            let waits: Vec<_> = (0..40)
                .map(|i| {
                    let (store, batch) = (store.clone(), point_batch(&key, i));
                    tokio::task::spawn_local(async move { store.commit(batch).await })
                })
                .collect();
            for w in waits {
                assert_eq!(w.await.unwrap().unwrap(), Outcome::Stored);
            }
        });
        let latest = store.latest_point(&key).unwrap().expect("the points are stored");
        assert_eq!(latest.point.metrics.get("load"), Some(39.0));
        // Joining the commit thread orders its counter updates before these reads.
        store.close();
        let groups = metrics.commit_groups.get() - groups_before;
        assert_eq!(metrics.commit_hub_answers.get(), 40, "every answer went through the hub");
        assert_eq!(metrics.commit_hub_lists.get(), groups, "one list per group");
        assert!(metrics.render().contains("orbmanager_commit_hub_answers_total 40\n"));
    }

    #[test]
    fn a_thread_whose_hub_stopped_is_answered_directly() {
        let (_dir, _metrics, key, store) = open_store("o2");
        {
            let (rt, local) = local_runtime();
            local.block_on(&rt, async {
                deliver_replies_here(|task| {
                    tokio::task::spawn_local(task);
                });
                assert!(local_hub().is_some());
            });
            // Dropping the executor drops the hub's task.
        }
        assert!(local_hub().is_none(), "a hub whose task is gone is not used");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(store.commit(point_batch(&key, 1))).unwrap(), Outcome::Stored);
        store.close();
    }

    #[test]
    fn answers_for_a_hub_that_went_away_meanwhile_reach_their_waiters() {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub { tx });
        drop(rx);
        let metrics = Metrics::default();
        let mut answers = Answers::default();
        let (stored_tx, stored_rx) = oneshot::channel();
        let (failed_tx, failed_rx) = oneshot::channel();
        answers.add(Reply { tx: stored_tx, hub: Some(hub.clone()) }, Ok(Outcome::Stored));
        answers.add(Reply { tx: failed_tx, hub: Some(hub.clone()) }, Err(Error::CommitFailed("disk".into())));
        answers.deliver(&metrics);
        assert_eq!(stored_rx.blocking_recv().unwrap().unwrap(), Outcome::Stored);
        assert!(matches!(failed_rx.blocking_recv().unwrap(), Err(Error::CommitFailed(m)) if m == "disk"));
        assert_eq!(metrics.commit_hub_lists.get(), 0, "nothing was handed to the gone hub");
    }

    /// Flushes `n` memtables into the telemetry keyspace, each with a point of orb `a` and
    /// one of `key`, so that each overlaps the others as a fleet's flushes do. The L0 table
    /// count after it.
    fn flush_points(store: &Store, key: &OrbKey, from: u64, n: u64) -> usize {
        let first = OrbKey::new(key.tenant.clone(), OrbId::parse("a").unwrap());
        for i in from..from + n {
            assert_eq!(store.commit_blocking(point_batch(&first, i)).unwrap(), Outcome::Stored);
            assert_eq!(store.commit_blocking(point_batch(key, i)).unwrap(), Outcome::Stored);
            store.flush_telemetry().unwrap();
        }
        let backlog = store.telemetry_backlog();
        assert_eq!(backlog.l0_runs, backlog.l0_tables, "one table per flush, each its own run: {backlog:?}");
        backlog.l0_tables
    }

    /// Waits (at most 30 s) until fjall's workers bring the telemetry keyspace's L0 table
    /// count to where `done` says; the count then.
    fn l0_settles(store: &Store, done: impl Fn(usize) -> bool) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done(store.telemetry_backlog().l0_tables) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        store.telemetry_backlog().l0_tables
    }

    /// The L0 table count at which the telemetry keyspace merges, as fjall keeps it.
    fn merge_threshold(store: &Store) -> Option<u8> {
        let strategy = &store.ks.get(Ks::Telemetry).config.compaction_strategy;
        let config = strategy.get_config();
        config.iter().find(|(k, _)| &k[..] == b"leveled_l0_threshold").and_then(|(_, v)| v.first().copied())
    }

    /// The L0 table count after giving fjall's workers half a second to merge what they would.
    fn l0_after_a_moment(store: &Store) -> usize {
        std::thread::sleep(Duration::from_millis(500));
        store.telemetry_backlog().l0_tables
    }

    #[test]
    fn telemetry_merges_twelve_flushes_at_a_time() {
        let (dir, _metrics, key, store) = open_store("z1");
        assert_eq!(merge_threshold(&store), Some(12));
        // The first flush finds the levels empty and is moved below L0.
        flush_points(&store, &key, 0, 1);
        assert_eq!(l0_settles(&store, |n| n == 0), 0);
        flush_points(&store, &key, 1, 7);
        // fjall's default (4 runs) would have merged these.
        assert_eq!(l0_after_a_moment(&store), 7);
        store.close();
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default(), Arc::new(Metrics::default())).unwrap();
        assert_eq!(merge_threshold(&store), Some(12));
        assert_eq!(flush_points(&store, &key, 8, 4), 11);
        assert_eq!(l0_after_a_moment(&store), 11, "eleven runs wait, also after a reopen");
        flush_points(&store, &key, 12, 1);
        assert_eq!(l0_settles(&store, |n| n == 0), 0, "the twelfth run starts the merge");
        let points = store.points(&key, 0, u64::MAX, None, 100).unwrap();
        let loads: Vec<f64> = points.iter().filter_map(|(_, p)| p.point.metrics.get("load")).collect();
        assert_eq!(loads, (0..13).map(|i| i as f64).collect::<Vec<_>>(), "nothing lost or reordered in the merge");
        store.close();
    }

    #[test]
    fn a_telemetry_keyspace_created_by_an_earlier_version_keeps_its_options() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What stores created before the telemetry keyspace had its own options hold.
            let db = fjall::Database::builder(dir.path().join("fjall")).open().unwrap();
            db.keyspace(Ks::Telemetry.name(), fjall::KeyspaceCreateOptions::default).unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default(), Arc::new(Metrics::default())).unwrap();
        assert_eq!(merge_threshold(&store), Some(4), "fjall's default, as the keyspace was created");
        let key = OrbKey::new(TenantId::parse("t1").unwrap(), OrbId::parse("z1").unwrap());
        flush_points(&store, &key, 0, 1);
        assert_eq!(l0_settles(&store, |n| n == 0), 0);
        flush_points(&store, &key, 1, 4);
        assert_eq!(l0_settles(&store, |n| n == 0), 0, "fjall's default merges at four runs");
        assert_eq!(store.points(&key, 0, u64::MAX, None, 100).unwrap().len(), 5);
        store.close();
    }

    #[test]
    fn each_request_records_its_queue_wait_and_survives_a_reopen() {
        let (dir, metrics, key, store) = open_store("o1");
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
