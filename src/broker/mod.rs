//! The MQTT broker inside each tenant's namespace: sessions (clean or persistent, with an
//! offline queue and redelivery), subscriptions with wildcards and shared groups, retained
//! messages (durable) and wills (with a delay). The platform topics ride on top: a telemetry
//! point, once durable, is also routed to the tenant's subscribers of its topic.
//!
//! Wire-format free: `net::mqtt` turns packets into [`Message`]s and [`Delivery`]s into
//! packets. Topics of one tenant never reach another: every structure is per tenant and keyed
//! by the tenant of the connection's identity, never by anything in a topic.
//!
//! Durable: retained messages, topic policies and persistent sessions (subscriptions and every
//! QoS 1/2 message queued for them, written before the publisher's acknowledgement and
//! deleted on the subscriber's). A persistent session survives disconnects and restarts up to
//! its expiry; a clean one lives in memory only.

mod trie;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::clock::Clock;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{
    BROKER_RETAINED_BYTES_MAX, BROKER_RETAINED_MAX, BROKER_SESSION_QUEUE_MAX, BROKER_SESSIONS_MAX,
    BROKER_SUBSCRIPTIONS_MAX,
};
use crate::metrics::Metrics;
use crate::model::orb::DisconnectReason;
use crate::model::topics::{self, TopicPolicy};
use crate::model::{OrbKey, TenantId};
use crate::storage::{Batch, Store};
pub use trie::{Entry, Node};

/// MQTT 5 properties carried from publisher to subscribers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Props {
    pub user: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    /// Payload format indicator 1 (UTF-8).
    pub utf8: bool,
    /// Absolute expiry (message expiry interval added to the arrival time).
    pub expires_at_ms: Option<u64>,
}

/// One application message inside a tenant.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: ntex::util::Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
    /// The publishing session (for no-local); 0 for the platform.
    pub origin: u64,
}

impl Message {
    /// Seconds left before it expires (`None`: no expiry); `Some(0)`: expired.
    pub fn remaining_s(&self, now_ms: u64) -> Option<u32> {
        self.props.expires_at_ms.map(|at| (at.saturating_sub(now_ms).div_ceil(1000)).min(u32::MAX as u64) as u32)
    }
}

/// A message on its way to one session.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// A redelivery after the connection it was sent on ended.
    pub dup: bool,
    /// Position in the session's queue (QoS 1/2; 0 for QoS 0). A QoS 2 delivery's packet id
    /// is derived from it, so a resend after a reconnect or a restart carries the same id.
    pub seq: u64,
    /// Written to the session's durable queue (deleted once acknowledged).
    pub stored: bool,
}

impl Delivery {
    /// The packet id of a QoS 2 delivery: stable across resends of the same message.
    pub fn packet_id(&self) -> u16 {
        (((self.seq.max(1) - 1) % u16::MAX as u64) + 1) as u16
    }
}

/// Options of one subscription.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
    pub id: Option<u32>,
}

/// A will: published when a connection ends without a normal DISCONNECT, after its delay.
#[derive(Clone, Debug)]
pub struct Will {
    pub msg: Message,
    pub delay_s: u32,
}

/// One session: `tenant` + `client_id`, owned by the identity that created it.
pub struct Session {
    pub id: u64,
    pub tenant: TenantId,
    pub client_id: String,
    /// The orb that owns it; `None` for anonymous dev clients.
    pub owner: Option<OrbKey>,
    tx: mpsc::Sender<Delivery>,
    /// The queue's receiving end: held by the online connection's delivery task, which
    /// gives it back when the connection ends (a taken-over session waits for it).
    pub rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Delivery>>>,
    online: AtomicBool,
    /// Notified when a QoS 1 message found the queue full: the connection is closed.
    pub overflow: Notify,
    /// The next queue position.
    seq: AtomicU64,
    state: Mutex<SessionState>,
}

#[derive(Default)]
struct SessionState {
    /// Full SUBSCRIBE filter (with any `$share/group/`) -> options.
    filters: HashMap<String, SubOpts>,
    /// QoS 1 messages sent on a connection that ended before their PUBACK: sent first (DUP).
    redeliver: VecDeque<Delivery>,
    expiry_s: u32,
    /// Bumped by every attach and detach; timers act only if it is unchanged.
    generation: u64,
    kick: Option<oneshot::Sender<DisconnectReason>>,
    ended: bool,
    /// A record of it is in the store (written once a persistent session subscribes).
    stored: bool,
    /// Packet ids of QoS 2 publishes taken from the client and not yet released (PUBREL):
    /// a resend after a reconnect is acknowledged without being processed again. At most
    /// 65,535 (the id space).
    qos2_in: std::collections::HashSet<u16>,
}

impl Session {
    fn new(id: u64, tenant: &TenantId, client_id: &str, owner: Option<OrbKey>, state: SessionState) -> Session {
        let (tx, rx) = mpsc::channel(BROKER_SESSION_QUEUE_MAX);
        Session {
            id,
            tenant: tenant.clone(),
            client_id: client_id.to_string(),
            owner,
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            online: AtomicBool::new(true),
            overflow: Notify::new(),
            seq: AtomicU64::new(1),
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ended(&self) -> bool {
        self.lock().ended
    }

    /// Whether QoS 1/2 messages for it are written to its durable queue: it is persistent
    /// (expiry > 0) and stored.
    fn is_durable(&self) -> bool {
        let st = self.lock();
        st.stored && st.expiry_s > 0 && !st.ended
    }

    fn record(&self, st: &SessionState, detached_ms: Option<u64>) -> SessionRecord {
        let mut filters: Vec<(String, SubOpts)> = st.filters.iter().map(|(f, o)| (f.clone(), *o)).collect();
        filters.sort_by(|a, b| a.0.cmp(&b.0));
        SessionRecord { owner: self.owner.clone(), expiry_s: st.expiry_s, filters, detached_ms }
    }

    /// Whether a message sent to it now would be queued and taken soon.
    pub fn can_take(&self) -> bool {
        self.online.load(Ordering::Acquire) && self.tx.capacity() > 0
    }

    /// Queues a delivery; a full queue sheds QoS 0 and closes the connection for QoS 1
    /// (a subscriber that cannot keep up is told so instead of losing messages silently).
    fn offer(&self, d: Delivery, metrics: &Metrics) -> bool {
        if d.qos == 0 && !self.online.load(Ordering::Acquire) {
            // QoS 0 is not queued for offline sessions.
            return false;
        }
        match self.tx.try_send(d) {
            Ok(()) => {
                metrics.broker_routed.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(d)) => {
                metrics.broker_shed.inc();
                if d.qos > 0 && self.online.load(Ordering::Acquire) {
                    self.overflow.notify_one();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Gives back what a connection sent without a PUBACK (oldest first), to be sent first on
    /// the next connection.
    pub fn return_unacked(&self, unacked: impl IntoIterator<Item = Delivery>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut back: VecDeque<Delivery> = unacked
            .into_iter()
            .map(|mut d| {
                d.dup = true;
                d
            })
            .collect();
        back.extend(st.redeliver.drain(..));
        st.redeliver = back;
    }

    /// Whether the QoS 2 publish `id` was taken and not yet released.
    pub fn qos2_pending(&self, id: u16) -> bool {
        self.lock().qos2_in.contains(&id)
    }

    /// The QoS 2 publish `id` was taken (its PUBREC goes out).
    pub fn qos2_taken(&self, id: u16) {
        self.lock().qos2_in.insert(id);
    }

    /// The client released the QoS 2 publish `id` (PUBREL).
    pub fn qos2_released(&self, id: u16) {
        self.lock().qos2_in.remove(&id);
    }

    /// Takes what must be sent first on a new connection.
    pub fn take_redeliver(&self) -> VecDeque<Delivery> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).redeliver)
    }

    /// The session's filters (for tests and the admin view).
    pub fn filters(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = st.filters.keys().cloned().collect();
        v.sort();
        v
    }
}

/// What [`Broker::attach`] gives a new connection.
pub struct Attached {
    pub session: Arc<Session>,
    /// The session existed and was resumed (CONNACK session present).
    pub present: bool,
    /// The session expiry granted (may be lower than asked).
    pub expiry_s: u32,
    /// Names this connection's tenure of the session (for [`Broker::detach`]).
    pub generation: u64,
}

/// Why a CONNECT cannot have a session.
#[derive(Debug)]
pub enum AttachError {
    /// The client id belongs to a session of another identity in this tenant.
    ClientIdInUse,
    /// Too many sessions on this node.
    TooManySessions,
}

/// One tenant's topic space.
#[derive(Default)]
struct Space {
    trie: RwLock<Node>,
    retained: Mutex<Retained>,
}

#[derive(Default)]
struct Retained {
    by_topic: BTreeMap<String, Arc<Message>>,
    bytes: usize,
}

/// The broker shared by every MQTT worker and the HTTP fallback.
pub struct Broker {
    spaces: RwLock<HashMap<TenantId, Arc<Space>>>,
    sessions: Mutex<HashMap<(TenantId, String), Arc<Session>>>,
    policies: RwLock<HashMap<TenantId, Arc<TopicPolicy>>>,
    next_id: AtomicU64,
    store: Store,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Where will and expiry timers run (the main runtime, not an MQTT worker).
    runtime: tokio::runtime::Handle,
    /// Session writes that nobody waits for, committed in order by one task.
    writes: mpsc::Sender<Write>,
    pub session_expiry_max_s: u32,
}

impl Broker {
    /// A broker with the retained messages, topic policies and persistent sessions of `store`.
    pub fn load(
        store: Store,
        clock: Clock,
        metrics: Arc<Metrics>,
        session_expiry_max_s: u32,
    ) -> Result<Arc<Broker>, crate::storage::Error> {
        let (writes, rx) = mpsc::channel(crate::limits::BROKER_WRITES_MAX);
        tokio::spawn(run_writes(store.clone(), rx));
        let broker = Broker {
            writes,
            spaces: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            policies: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            store,
            clock,
            metrics,
            runtime: tokio::runtime::Handle::current(),
            session_expiry_max_s,
        };
        for (tenant, policy) in broker.store.topic_policies()? {
            broker.policies.write().unwrap_or_else(|e| e.into_inner()).insert(tenant, Arc::new(policy));
        }
        let mut count = 0;
        for (tenant, rec) in broker.store.retained_all()? {
            let space = broker.space(&tenant);
            let msg = Arc::new(rec.into_message());
            let mut r = space.retained.lock().unwrap_or_else(|e| e.into_inner());
            r.bytes += msg.payload.len() + msg.topic.len();
            r.by_topic.insert(msg.topic.clone(), msg);
            count += 1;
        }
        broker.metrics.broker_retained.add(count);
        let broker = Arc::new(broker);
        broker.load_sessions()?;
        Ok(broker)
    }

    /// Restores the persistent sessions of the store, offline: subscriptions back in the
    /// trees, queues refilled (oldest first), expiry counted from the last disconnect (or from
    /// now for a session that was online when the server stopped).
    fn load_sessions(self: &Arc<Self>) -> Result<(), crate::storage::Error> {
        let now = self.clock.now_ms();
        let mut expired = Batch::new();
        for (tenant, client_id, rec) in self.store.sessions_all()? {
            let detached = rec.detached_ms.unwrap_or(now);
            let expires_ms = detached.saturating_add(rec.expiry_s as u64 * 1000);
            if rec.expiry_s == 0 || expires_ms <= now {
                self.store.delete_session(&mut expired, &tenant, &client_id)?;
                continue;
            }
            let state = SessionState {
                filters: rec.filters.iter().cloned().collect(),
                expiry_s: rec.expiry_s,
                generation: 1,
                stored: true,
                ..SessionState::default()
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let session = Arc::new(Session::new(id, &tenant, &client_id, rec.owner.clone(), state));
            session.online.store(false, Ordering::Release);
            let space = self.space(&tenant);
            {
                let mut trie = space.trie.write().unwrap_or_else(|e| e.into_inner());
                for (f, opts) in &rec.filters {
                    if let Ok(sub) = topics::parse_subscription(f) {
                        trie.insert(sub.filter, sub.group, Entry { session: session.clone(), opts: *opts });
                    }
                }
            }
            let mut last = 0;
            for (seq, q) in self.store.session_queue(&tenant, &client_id)? {
                last = seq;
                let d = q.into_delivery(seq);
                if session.tx.try_send(d).is_err() {
                    Store::delete_queued(&mut expired, &tenant, &client_id, seq);
                }
            }
            session.seq.store(last + 1, Ordering::Relaxed);
            if rec.detached_ms.is_none() {
                let mut b = Batch::new();
                Store::put_session(&mut b, &tenant, &client_id, &session.record(&session.lock(), Some(now)));
                self.write_later(b);
            }
            self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert((tenant, client_id), session.clone());
            self.spawn_expiry(&session, 1, Duration::from_millis(expires_ms - now));
        }
        let n = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.metrics.broker_sessions.set(n as i64);
        self.write_later(expired);
        Ok(())
    }

    /// Queues a write nobody waits for; writes are committed in the order they are made.
    fn write_later(&self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(w)) = self.writes.try_send(Write::Batch(batch)) {
            let tx = self.writes.clone();
            self.runtime.spawn(async move {
                let _ = tx.send(w).await;
            });
        }
    }

    /// Commits every background write made so far and stops the writer (at shutdown, after
    /// the listeners stopped: acknowledged deliveries and disconnect times are on disk).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Write::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Ends `session` after `after` unless something attached since `generation`. Timers hold
    /// the broker weakly: a stopped server's store is not kept open by them.
    fn spawn_expiry(self: &Arc<Self>, session: &Arc<Session>, generation: u64, after: Duration) {
        let (broker, s) = (Arc::downgrade(self), session.clone());
        self.runtime.spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(broker) = broker.upgrade() {
                broker.end_session(&s, generation);
            }
        });
    }

    fn space(&self, tenant: &TenantId) -> Arc<Space> {
        if let Some(s) = self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(tenant) {
            return s.clone();
        }
        self.spaces.write().unwrap_or_else(|e| e.into_inner()).entry(tenant.clone()).or_default().clone()
    }

    fn existing_space(&self, tenant: &TenantId) -> Option<Arc<Space>> {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(tenant).cloned()
    }

    /// The tenant's topic policy (the default: platform topics only).
    pub fn policy(&self, tenant: &TenantId) -> Arc<TopicPolicy> {
        self.policies.read().unwrap_or_else(|e| e.into_inner()).get(tenant).cloned().unwrap_or_default()
    }

    /// Replaces the tenant's topic policy (validated), durably. Live sessions keep the
    /// subscriptions they have; new SUBSCRIBEs and every PUBLISH are checked against it.
    pub async fn set_policy(&self, tenant: &TenantId, policy: TopicPolicy) -> Result<(), ApiError> {
        policy.validate().map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e))?;
        let mut batch = Batch::new();
        Store::add_topic_policy(&mut batch, tenant, &policy);
        self.store.commit(batch).await.map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        self.policies.write().unwrap_or_else(|e| e.into_inner()).insert(tenant.clone(), Arc::new(policy));
        Ok(())
    }

    /// Opens or resumes the session `tenant`/`client_id` for a new connection. A session
    /// online elsewhere is taken over (its connection is closed through `kick`); a session of
    /// another identity is refused, so nobody can take over a device's session by its id.
    pub fn attach(
        &self,
        tenant: &TenantId,
        client_id: &str,
        owner: Option<&OrbKey>,
        clean_start: bool,
        expiry_s: u32,
        kick: oneshot::Sender<DisconnectReason>,
    ) -> Result<Attached, AttachError> {
        let expiry_s = expiry_s.min(self.session_expiry_max_s);
        let key = (tenant.clone(), client_id.to_string());
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = sessions.get(&key).cloned() {
            if old.owner.as_ref() != owner {
                return Err(AttachError::ClientIdInUse);
            }
            let mut st = old.lock();
            if let Some(k) = st.kick.take() {
                let _ = k.send(DisconnectReason::Takeover);
            }
            st.generation += 1;
            if !clean_start {
                st.expiry_s = expiry_s;
                st.kick = Some(kick);
                // A delayed will of the previous connection is not sent (its timer sees the
                // new generation).
                let generation = st.generation;
                old.online.store(true, Ordering::Release);
                if st.stored {
                    let mut b = Batch::new();
                    Store::put_session(&mut b, tenant, client_id, &old.record(&st, None));
                    self.write_later(b);
                }
                drop(st);
                return Ok(Attached { session: old, present: true, expiry_s, generation });
            }
            // A clean start ends the old session: its subscriptions and queue go (the old
            // connection's end publishes its will).
            let filters: Vec<(String, SubOpts)> = st.filters.drain().collect();
            st.ended = true;
            let stored = std::mem::take(&mut st.stored);
            drop(st);
            sessions.remove(&key);
            self.unsubscribe_all(&old, filters.into_iter().map(|(f, _)| f));
            if stored {
                self.forget_session(&old);
            }
        }
        if sessions.len() >= BROKER_SESSIONS_MAX {
            return Err(AttachError::TooManySessions);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = SessionState { expiry_s, kick: Some(kick), generation: 1, ..SessionState::default() };
        let session = Arc::new(Session::new(id, tenant, client_id, owner.cloned(), state));
        sessions.insert(key, session.clone());
        self.metrics.broker_sessions.set(sessions.len() as i64);
        Ok(Attached { session, present: false, expiry_s, generation: 1 })
    }

    /// The connection of `session` ended; `will` is its will unless it sent a normal DISCONNECT.
    /// A session with expiry 0 ends now; otherwise it stays (queueing QoS 1) until it expires
    /// or is resumed. The will is published after its delay or when the session ends,
    /// whichever is first, unless the session is resumed before.
    pub fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_generation: u64,
        will: Option<Will>,
        expiry_override: Option<u32>,
    ) {
        let (generation, expiry_s) = {
            let mut st = session.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.ended || st.generation != conn_generation {
                // Taken over (resumed by a newer connection, or replaced by a clean start):
                // the session is not this connection's any more. Its will goes out now unless
                // it was delayed and the session lives on.
                drop(st);
                if let Some(w) = will.filter(|w| w.delay_s == 0 || session.is_ended()) {
                    self.publish_will_now(&session.tenant, w.msg);
                }
                return;
            }
            st.generation += 1;
            st.kick = None;
            if let Some(e) = expiry_override {
                st.expiry_s = e.min(self.session_expiry_max_s);
            }
            if st.stored && st.expiry_s > 0 {
                let mut b = Batch::new();
                Store::put_session(
                    &mut b,
                    &session.tenant,
                    &session.client_id,
                    &session.record(&st, Some(self.clock.now_ms())),
                );
                self.write_later(b);
            }
            (st.generation, st.expiry_s)
        };
        session.online.store(false, Ordering::Release);
        if expiry_s == 0 {
            self.end_session(session, generation);
            if let Some(w) = will {
                self.publish_will_now(&session.tenant, w.msg);
            }
            return;
        }
        if let Some(w) = will {
            let delay = w.delay_s.min(expiry_s);
            if delay == 0 {
                self.publish_will_now(&session.tenant, w.msg);
            } else {
                let (broker, s) = (Arc::downgrade(self), session.clone());
                self.runtime.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                    let Some(broker) = broker.upgrade() else { return };
                    let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                    // Unchanged, or ended by a clean start elsewhere: the will is due.
                    let due = st.generation == generation || st.ended;
                    drop(st);
                    if due {
                        broker.publish_will_now(&s.tenant, w.msg);
                    }
                });
            }
        }
        self.spawn_expiry(session, generation, Duration::from_secs(expiry_s as u64));
    }

    /// Ends an offline session if nothing attached since `generation`.
    fn end_session(&self, session: &Arc<Session>, generation: u64) {
        let key = (session.tenant.clone(), session.client_id.clone());
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (filters, stored): (Vec<String>, bool) = {
            let mut st = session.lock();
            if st.generation != generation || st.ended {
                return;
            }
            st.ended = true;
            st.redeliver.clear();
            (st.filters.drain().map(|(f, _)| f).collect(), std::mem::take(&mut st.stored))
        };
        if sessions.get(&key).is_some_and(|s| s.id == session.id) {
            sessions.remove(&key);
        }
        self.metrics.broker_sessions.set(sessions.len() as i64);
        drop(sessions);
        self.unsubscribe_all(session, filters.into_iter());
        if stored {
            self.forget_session(session);
        }
    }

    /// Deletes an ended session's record and queue. Called after `ended` is set, so a route
    /// that stored a message for it after this read sees `ended` and deletes its own write.
    fn forget_session(&self, session: &Session) {
        let mut b = Batch::new();
        match self.store.delete_session(&mut b, &session.tenant, &session.client_id) {
            Ok(()) => self.write_later(b),
            Err(e) => {
                tracing::warn!(client_id = session.client_id, error = %e, "ended session not deleted from the store")
            }
        }
    }

    /// Writes a persistent session's record (its subscriptions), before the SUBACK or
    /// UNSUBACK that reports them. A clean session writes nothing.
    pub async fn save_session(&self, session: &Session) -> Result<(), ApiError> {
        let batch = {
            let mut st = session.lock();
            if st.expiry_s == 0 || st.ended || (!st.stored && st.filters.is_empty()) {
                return Ok(());
            }
            st.stored = true;
            let mut b = Batch::new();
            Store::put_session(&mut b, &session.tenant, &session.client_id, &session.record(&st, None));
            b
        };
        self.store.commit(batch).await.map(|_| ()).map_err(|e| {
            tracing::error!(client_id = session.client_id, error = %e, "session commit failed");
            ApiError::new(ErrorCode::Unavailable, "the session could not be made durable")
        })
    }

    /// A stored delivery was acknowledged by its subscriber: its queue entry goes.
    pub fn acked(&self, session: &Session, d: &Delivery) {
        if d.stored {
            let mut b = Batch::new();
            Store::delete_queued(&mut b, &session.tenant, &session.client_id, d.seq);
            self.write_later(b);
        }
    }

    fn publish_will_now(self: &Arc<Self>, tenant: &TenantId, msg: Message) {
        let broker = self.clone();
        let tenant = tenant.clone();
        self.runtime.spawn(async move {
            if let Err(e) = broker.publish(&tenant, msg).await {
                tracing::warn!(%tenant, error = %e, "will message not published");
            }
        });
    }

    fn unsubscribe_all(&self, session: &Session, filters: impl Iterator<Item = String>) {
        let Some(space) = self.existing_space(&session.tenant) else { return };
        let mut trie = space.trie.write().unwrap_or_else(|e| e.into_inner());
        for f in filters {
            if let Ok(sub) = topics::parse_subscription(&f) {
                trie.remove(sub.filter, sub.group, session.id);
            }
        }
    }

    /// Adds (or replaces) a subscription; the retained messages it should get are added to
    /// `retained` (for [`Broker::enqueue`] once the session is saved). Returns whether the
    /// session had this filter already.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        opts: SubOpts,
        retained: &mut Vec<Delivery>,
    ) -> Result<bool, ApiError> {
        let sub = topics::parse_subscription(filter)
            .map_err(|e| ApiError::new(ErrorCode::TopicInvalid, format!("filter {filter:?}: {e}")))?;
        {
            let mut st = session.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.filters.contains_key(filter) && st.filters.len() >= BROKER_SUBSCRIPTIONS_MAX {
                return Err(ApiError::new(
                    ErrorCode::Overloaded,
                    format!("a session has at most {BROKER_SUBSCRIPTIONS_MAX} subscriptions"),
                ));
            }
            st.filters.insert(filter.to_string(), opts);
        }
        let space = self.space(&session.tenant);
        let existed = space.trie.write().unwrap_or_else(|e| e.into_inner()).insert(
            sub.filter,
            sub.group,
            Entry { session: session.clone(), opts },
        );
        // Retained messages: never for shared subscriptions [MQTT-4.8.2-6].
        let send_retained =
            sub.group.is_none() && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed));
        if send_retained {
            self.purge_expired(&session.tenant, &space);
            let matching: Vec<Arc<Message>> = {
                let r = space.retained.lock().unwrap_or_else(|e| e.into_inner());
                r.by_topic.values().filter(|m| topics::matches(sub.filter, &m.topic)).cloned().collect()
            };
            for msg in matching {
                let qos = msg.qos.min(opts.qos);
                let sub_ids = opts.id.into_iter().collect();
                retained.push(Delivery { msg, qos, retain: true, sub_ids, dup: false, seq: 0, stored: false });
            }
        }
        Ok(existed)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, session: &Session, filter: &str) -> bool {
        let had = session.state.lock().unwrap_or_else(|e| e.into_inner()).filters.remove(filter).is_some();
        if had
            && let Ok(sub) = topics::parse_subscription(filter)
            && let Some(space) = self.existing_space(&session.tenant)
        {
            space.trie.write().unwrap_or_else(|e| e.into_inner()).remove(sub.filter, sub.group, session.id);
        }
        had
    }

    /// Publishes within `tenant`: a retained message is made durable first (an empty payload
    /// clears it), then the message is queued for every matching session. Returns how many
    /// sessions it was queued for.
    pub async fn publish(&self, tenant: &TenantId, msg: Message) -> Result<usize, ApiError> {
        let msg = Arc::new(msg);
        if msg.retain {
            self.retain(tenant, &msg).await?;
        }
        self.route(tenant, &msg).await
    }

    async fn retain(&self, tenant: &TenantId, msg: &Arc<Message>) -> Result<(), ApiError> {
        let space = self.space(tenant);
        let clear = msg.payload.is_empty();
        {
            let r = space.retained.lock().unwrap_or_else(|e| e.into_inner());
            let old = r.by_topic.get(&msg.topic);
            let replaced = old.map_or(0, |m| m.payload.len() + m.topic.len());
            let after = r.bytes - replaced + msg.payload.len() + msg.topic.len();
            let count_after = r.by_topic.len() + usize::from(old.is_none());
            if !clear && (count_after > BROKER_RETAINED_MAX || after > BROKER_RETAINED_BYTES_MAX) {
                return Err(ApiError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "retained messages of this tenant are limited to {BROKER_RETAINED_MAX} and {BROKER_RETAINED_BYTES_MAX} bytes"
                    ),
                ));
            }
        }
        let mut batch = Batch::new();
        if clear {
            Store::delete_retained(&mut batch, tenant, &msg.topic);
        } else {
            Store::add_retained(&mut batch, tenant, &RetainedRecord::of(msg));
        }
        self.store.commit(batch).await.map_err(|e| {
            tracing::error!(%tenant, error = %e, "retained message commit failed");
            ApiError::new(ErrorCode::Unavailable, "retained message could not be made durable")
        })?;
        let mut r = space.retained.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = r.by_topic.remove(&msg.topic) {
            r.bytes -= old.payload.len() + old.topic.len();
            self.metrics.broker_retained.sub(1);
        }
        if !clear {
            r.bytes += msg.payload.len() + msg.topic.len();
            r.by_topic.insert(msg.topic.clone(), msg.clone());
            self.metrics.broker_retained.add(1);
        }
        Ok(())
    }

    /// Queues `msg` for every session with a matching subscription: one copy per session
    /// (the highest QoS and every subscription id of its matching filters), one member per
    /// shared group. Copies for persistent sessions are durable when this returns.
    pub async fn route(&self, tenant: &TenantId, msg: &Arc<Message>) -> Result<usize, ApiError> {
        let targets = self.targets(tenant, msg);
        if targets.is_empty() {
            return Ok(0);
        }
        self.enqueue(targets).await
    }

    /// Queues deliveries: those of QoS 1/2 to persistent sessions are written to the
    /// sessions' durable queues first (one commit), then every delivery is offered.
    pub async fn enqueue(&self, mut targets: Vec<(Arc<Session>, Delivery)>) -> Result<usize, ApiError> {
        let mut batch = Batch::new();
        for (s, d) in &mut targets {
            if d.qos == 0 {
                continue;
            }
            d.seq = s.seq.fetch_add(1, Ordering::Relaxed);
            if s.is_durable() {
                Store::put_queued(&mut batch, &s.tenant, &s.client_id, d.seq, &QueuedRecord::of(d));
                d.stored = true;
            }
        }
        if !batch.is_empty() {
            self.store.commit(batch).await.map_err(|e| {
                tracing::error!(error = %e, "session queue commit failed");
                ApiError::new(ErrorCode::Unavailable, "the message could not be queued durably")
            })?;
        }
        let mut undo = Batch::new();
        let mut count = 0;
        for (s, d) in targets {
            let (stored, seq) = (d.stored, d.seq);
            if s.offer(d, &self.metrics) {
                count += 1;
                // Ended meanwhile: its queue was deleted before this write landed.
                if stored && s.is_ended() {
                    Store::delete_queued(&mut undo, &s.tenant, &s.client_id, seq);
                }
            } else if stored {
                Store::delete_queued(&mut undo, &s.tenant, &s.client_id, seq);
            }
        }
        self.write_later(undo);
        Ok(count)
    }

    fn targets(&self, tenant: &TenantId, msg: &Arc<Message>) -> Vec<(Arc<Session>, Delivery)> {
        let Some(space) = self.existing_space(tenant) else { return Vec::new() };
        let trie = space.trie.read().unwrap_or_else(|e| e.into_inner());
        if trie.is_empty() {
            return Vec::new();
        }
        let mut targets: HashMap<u64, (Arc<Session>, Delivery)> = HashMap::new();
        let mut add = |e: &Entry| {
            if e.opts.no_local && e.session.id == msg.origin {
                return;
            }
            let qos = msg.qos.min(e.opts.qos);
            let retain = msg.retain && e.opts.retain_as_published;
            let d = targets.entry(e.session.id).or_insert_with(|| {
                let d =
                    Delivery { msg: msg.clone(), qos, retain, sub_ids: Vec::new(), dup: false, seq: 0, stored: false };
                (e.session.clone(), d)
            });
            d.1.qos = d.1.qos.max(qos);
            d.1.retain |= retain;
            if let Some(id) = e.opts.id {
                d.1.sub_ids.push(id);
            }
        };
        trie.for_matches(&msg.topic, &mut |subs| {
            subs.plain.iter().for_each(&mut add);
            for g in &subs.groups {
                if let Some(e) = g.pick() {
                    add(e);
                }
            }
        });
        drop(trie);
        targets.into_values().collect()
    }

    /// Whether any session of `tenant` subscribes to anything (the platform's fast path).
    pub fn has_subscribers(&self, tenant: &TenantId) -> bool {
        self.existing_space(tenant).is_some_and(|s| !s.trie.read().unwrap_or_else(|e| e.into_inner()).is_empty())
    }

    /// Retained messages of a tenant (topic order), for the operator API and tests.
    pub fn retained(&self, tenant: &TenantId) -> Vec<Arc<Message>> {
        self.existing_space(tenant).map_or_else(Vec::new, |s| {
            self.purge_expired(tenant, &s);
            s.retained.lock().unwrap_or_else(|e| e.into_inner()).by_topic.values().cloned().collect()
        })
    }

    /// Drops retained messages whose expiry has passed, from memory now and from the store
    /// in the background (a crash before that only means they are dropped again at the next
    /// look: an expired message is never delivered).
    fn purge_expired(&self, tenant: &TenantId, space: &Space) {
        let now = self.clock.now_ms();
        let mut r = space.retained.lock().unwrap_or_else(|e| e.into_inner());
        let expired: Vec<String> =
            r.by_topic.values().filter(|m| m.remaining_s(now) == Some(0)).map(|m| m.topic.clone()).collect();
        if expired.is_empty() {
            return;
        }
        let mut batch = Batch::new();
        for topic in &expired {
            if let Some(m) = r.by_topic.remove(topic) {
                r.bytes -= m.payload.len() + m.topic.len();
                self.metrics.broker_retained.sub(1);
            }
            Store::delete_retained(&mut batch, tenant, topic);
        }
        drop(r);
        let store = self.store.clone();
        self.runtime.spawn(async move {
            if let Err(e) = store.commit(batch).await {
                tracing::warn!(error = %e, "expired retained messages not deleted; retried at the next look");
            }
        });
    }

    /// Sessions of a tenant: (client id, online, filters, messages waiting). What an online
    /// connection has sent and not yet had acknowledged is not counted.
    pub fn sessions(&self, tenant: &TenantId) -> Vec<(String, bool, Vec<String>, usize)> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = sessions
            .values()
            .filter(|s| &s.tenant == tenant)
            .map(|s| {
                let waiting = s.tx.max_capacity() - s.tx.capacity() + s.lock().redeliver.len();
                (s.client_id.clone(), s.online.load(Ordering::Acquire), s.filters(), waiting)
            })
            .collect();
        v.sort();
        v
    }
}

/// A retained message as stored.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RetainedRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub props: Props,
}

impl RetainedRecord {
    fn of(msg: &Message) -> Self {
        RetainedRecord {
            topic: msg.topic.clone(),
            payload: msg.payload.to_vec(),
            qos: msg.qos,
            props: msg.props.clone(),
        }
    }

    fn into_message(self) -> Message {
        Message {
            topic: self.topic,
            payload: ntex::util::Bytes::from(self.payload),
            qos: self.qos,
            retain: true,
            props: self.props,
            origin: 0,
        }
    }
}

/// A persistent session as stored: who owns it, its expiry and subscriptions. What is queued
/// for it is stored per message ([`QueuedRecord`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub owner: Option<OrbKey>,
    pub expiry_s: u32,
    pub filters: Vec<(String, SubOpts)>,
    /// When its last connection ended; `None` while a connection holds it.
    pub detached_ms: Option<u64>,
}

/// A QoS 1/2 delivery as queued durably for a persistent session.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct QueuedRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The message's own QoS and retain flag (as published).
    pub msg_qos: u8,
    pub msg_retain: bool,
    pub props: Props,
    /// The delivery's QoS, retain flag and subscription ids.
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
}

impl QueuedRecord {
    fn of(d: &Delivery) -> Self {
        QueuedRecord {
            topic: d.msg.topic.clone(),
            payload: d.msg.payload.to_vec(),
            msg_qos: d.msg.qos,
            msg_retain: d.msg.retain,
            props: d.msg.props.clone(),
            qos: d.qos,
            retain: d.retain,
            sub_ids: d.sub_ids.clone(),
        }
    }

    fn into_delivery(self, seq: u64) -> Delivery {
        let msg = Message {
            topic: self.topic,
            payload: ntex::util::Bytes::from(self.payload),
            qos: self.msg_qos,
            retain: self.msg_retain,
            props: self.props,
            origin: 0,
        };
        Delivery {
            msg: Arc::new(msg),
            qos: self.qos,
            retain: self.retain,
            sub_ids: self.sub_ids,
            dup: false,
            seq,
            stored: true,
        }
    }
}

/// A background write, or the request to stop once those before it are committed.
enum Write {
    Batch(Batch),
    Close(oneshot::Sender<()>),
}

/// Commits the broker's background writes in the order they were made, merging whatever
/// is waiting into one commit.
async fn run_writes(store: Store, mut rx: mpsc::Receiver<Write>) {
    while let Some(w) = rx.recv().await {
        let (mut batch, mut close) = (Batch::new(), None);
        match w {
            Write::Batch(b) => batch.append(b),
            Write::Close(tx) => close = Some(tx),
        }
        while batch.len() < 10_000 && close.is_none() {
            match rx.try_recv() {
                Ok(Write::Batch(b)) => batch.append(b),
                Ok(Write::Close(tx)) => close = Some(tx),
                Err(_) => break,
            }
        }
        if !batch.is_empty()
            && let Err(e) = store.commit(batch).await
        {
            tracing::warn!(error = %e, "broker session writes not committed");
        }
        if let Some(tx) = close {
            let _ = tx.send(());
            return;
        }
    }
}
