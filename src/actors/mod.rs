//! The live side of the fleet: shard supervisors and one actor per active orb.
//!
//! [`Fleet`] is the only door in: listeners and the API call its methods, which route by a
//! stable hash of `(tenant, orb)` to a shard, which activates the orb's actor on demand.
//! Calls carry a timeout (`ACTOR_CALL_TIMEOUT_MS`); casts are used where nobody waits.

pub mod broadcast;
mod commands;
pub mod orb;
pub mod rules;
pub mod shard;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};

use crate::clock::Clock;
use crate::error::{ApiError, ErrorCode};
use crate::limits::ACTOR_CALL_TIMEOUT_MS;
use crate::metrics::Metrics;
use crate::model::TenantId;
use crate::model::broadcast::{Broadcast, Target};
use crate::model::command::{Command, CommandStatus, DeviceAck, ValidCreate};
use crate::model::orb::{ConnectRequest, DisconnectReason, OrbRecord, OrbState, OrbStatus};
use crate::model::state_report::StateReport;
use crate::model::{OrbKey, TelemetryPoint};
use crate::storage::Store;
use broadcast::{BroadcastManager, BroadcastMsg, ManagerArgs};
use orb::{KickSender, OrbMsg, OutboxSender};
use shard::{ShardActor, ShardArgs, ShardMsg};

/// What every orb actor and shard shares: immutable configuration and handles.
pub struct OrbCtx {
    pub store: Store,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    /// `--dev`: the dev tenant admits anonymous clients and registers orbs on first contact.
    pub dev: bool,
    /// Identifies this process in presence records.
    pub boot_id: u64,
    pub idle_passivate_ms: u64,
    /// The broadcast manager, set once the fleet has started.
    pub broadcasts: std::sync::OnceLock<ActorRef<BroadcastMsg>>,
    /// The live stream of orb changes.
    pub hub: crate::stream::Hub,
    /// The in-memory search index (a row per registered orb).
    pub index: crate::search::FleetIndex,
    /// The rule engine, set once the fleet has started.
    pub alerting: std::sync::OnceLock<rules::Alerting>,
    /// The tenant event log (alerts, command status, presence).
    pub events: crate::events::Events,
    /// Room for telemetry points queued in orb actors' mailboxes (see `Fleet::telemetry`).
    pub telemetry_room: Arc<tokio::sync::Semaphore>,
}

/// A telemetry point's place in the node-wide bound; given back when the actor is done with
/// the point (or the message is dropped).
pub struct InFlight {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.telemetry_in_flight.dec();
    }
}

impl OrbCtx {
    pub fn new(
        store: Store,
        clock: Clock,
        metrics: Arc<Metrics>,
        dev: bool,
        boot_id: u64,
        idle_passivate_ms: u64,
    ) -> Self {
        OrbCtx {
            store: store.clone(),
            clock,
            metrics: metrics.clone(),
            dev,
            boot_id,
            idle_passivate_ms,
            broadcasts: std::sync::OnceLock::new(),
            hub: crate::stream::Hub::new(crate::limits::STREAM_BUFFER_DEFAULT),
            index: crate::search::FleetIndex::default(),
            alerting: std::sync::OnceLock::new(),
            events: crate::events::Events::new(store, metrics, crate::events::Retention::default()),
            telemetry_room: Arc::new(tokio::sync::Semaphore::new(crate::limits::TELEMETRY_IN_FLIGHT_MAX)),
        }
    }

    /// Bounds the telemetry points queued in orb actors at `max` (from the config).
    pub fn with_telemetry_in_flight_max(mut self, max: usize) -> Self {
        self.telemetry_room = Arc::new(tokio::sync::Semaphore::new(max));
        self
    }

    /// Refreshes an orb's search row.
    pub fn index_orb(&self, state: &OrbState) {
        self.index.upsert(state.record.key(), crate::search::Row::of(state));
    }

    /// Keeps events for `retention` (from the config).
    pub fn with_event_retention(mut self, retention: crate::events::Retention) -> Self {
        self.events = crate::events::Events::new(self.store.clone(), self.metrics.clone(), retention);
        self
    }

    /// Uses `hub` for the live stream (its ring size comes from the config).
    pub fn with_hub(mut self, hub: crate::stream::Hub) -> Self {
        self.hub = hub;
        self
    }

    /// Tells the broadcast manager about a durable transition of a broadcast command.
    pub fn broadcast_event(&self, id: &str, key: &OrbKey, command_id: &str, status: CommandStatus) {
        if let Some(m) = self.broadcasts.get() {
            let _ = m.cast(BroadcastMsg::Event {
                id: id.to_string(),
                orb: key.clone(),
                command_id: command_id.to_string(),
                status,
            });
        }
    }
}

/// Handle to the shards; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    shards: Arc<Vec<ActorRef<ShardMsg>>>,
    ctx: Arc<OrbCtx>,
}

fn timeout() -> Option<Duration> {
    Some(Duration::from_millis(ACTOR_CALL_TIMEOUT_MS))
}

fn call_failed(what: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what}: the orb actor did not answer; retry"))
}

impl Fleet {
    /// Starts `shards` shard supervisors.
    pub async fn start(ctx: OrbCtx, shards: usize) -> Result<Fleet, ractor::SpawnErr> {
        let ctx = Arc::new(ctx);
        let mut refs = Vec::with_capacity(shards);
        for index in 0..shards {
            let (actor, _join) = Actor::spawn(None, ShardActor, ShardArgs { index, ctx: ctx.clone() }).await?;
            refs.push(actor);
        }
        let fleet = Fleet { shards: Arc::new(refs), ctx };
        // Fill the search index from the store in the background; searches answer
        // `unavailable` until it is complete, and live updates are never overwritten by it.
        let (store, index, boot) = (fleet.ctx.store.clone(), fleet.ctx.index.clone(), fleet.ctx.boot_id);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = store.for_each_orb(|record| {
                let key = record.key();
                let state = orb::restore(&store, &key, record, boot)?;
                index.insert_if_absent(key, crate::search::Row::of(&state));
                Ok(())
            });
            match result {
                Ok(n) => tracing::info!(orbs = n, ms = started.elapsed().as_millis() as u64, "search index loaded"),
                Err(e) => {
                    tracing::error!(error = %e, "loading the search index failed; searches see only orbs active since start")
                }
            }
            index.set_ready();
        });
        let (manager, _join) = Actor::spawn(None, BroadcastManager, ManagerArgs { fleet: fleet.clone() }).await?;
        let _ = fleet.ctx.broadcasts.set(manager);
        let ctx = &fleet.ctx;
        let webhooks = crate::webhooks::Webhooks::start(ctx.store.clone(), ctx.clock.clone(), ctx.metrics.clone())
            .map_err(|e| ractor::SpawnErr::StartupFailed(format!("webhooks: {e}").into()))?;
        ctx.events.set_webhooks(webhooks.clone());
        let alerting = rules::Alerting::start(rules::RuleCtx {
            store: ctx.store.clone(),
            clock: ctx.clock.clone(),
            metrics: ctx.metrics.clone(),
            index: ctx.index.clone(),
            book: Default::default(),
            webhooks,
            events: ctx.events.clone(),
            started_ms: ctx.clock.now_ms(),
        })
        .await
        .map_err(|e| ractor::SpawnErr::StartupFailed(format!("rule engine: {e}").into()))?;
        let _ = fleet.ctx.alerting.set(alerting);
        // Deadlines survive restarts: the pending index carries each command's deadline.
        match fleet.ctx.store.pending_deadlines() {
            Ok(deadlines) => {
                for (key, d) in deadlines {
                    let _ = fleet.shard(&key).cast(ShardMsg::Deadline(key.clone(), Some(d)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reading command deadlines failed; they fire when their orbs next activate")
            }
        }
        Ok(fleet)
    }

    pub fn ctx(&self) -> &Arc<OrbCtx> {
        &self.ctx
    }

    fn shard(&self, key: &OrbKey) -> &ActorRef<ShardMsg> {
        &self.shards[(key.route_hash() % self.shards.len() as u64) as usize]
    }

    fn cast(&self, key: &OrbKey, msg: OrbMsg) {
        if self.shard(key).cast(ShardMsg::Route(key.clone(), msg)).is_err() {
            tracing::debug!(orb = %key, "fleet is stopped; message dropped");
        }
    }

    /// Registers a new orb; `AlreadyExists` when the id is taken in its tenant.
    pub async fn register(&self, record: OrbRecord) -> Result<(), ApiError> {
        let key = record.key();
        match self.shard(&key).call(|reply| ShardMsg::Register(Box::new(record), reply), timeout()).await {
            Ok(CallResult::Success(r)) => r,
            _ => Err(call_failed("registration")),
        }
    }

    /// Admits a connection for `key`; returns its connection sequence number.
    pub async fn connect(&self, key: &OrbKey, req: ConnectRequest, kick: KickSender) -> Result<u64, ErrorCode> {
        let res = self
            .shard(key)
            .call(|reply| ShardMsg::Route(key.clone(), OrbMsg::Connect { req, kick, reply }), timeout())
            .await;
        match res {
            Ok(CallResult::Success(r)) => r,
            // The actor failed while handling the connect: the client may retry.
            Ok(CallResult::SenderError) => Err(ErrorCode::Unavailable),
            Ok(CallResult::Timeout) | Err(_) => Err(ErrorCode::Unavailable),
        }
    }

    pub fn disconnected(&self, key: &OrbKey, conn_seq: u64, reason: DisconnectReason) {
        self.cast(key, OrbMsg::Disconnected { conn_seq, reason });
    }

    /// Applies a durable point to the orb's live state.
    /// Hands a durable point to its orb's actor. Waits while `telemetry_in_flight_max` points
    /// are queued node-wide: the caller acknowledges only after this returns, so devices slow
    /// down when the actors (or the rule partitions behind them) fall behind.
    pub async fn telemetry(&self, key: &OrbKey, point: Arc<TelemetryPoint>) {
        let Ok(permit) = self.ctx.telemetry_room.clone().acquire_owned().await else { return };
        self.ctx.metrics.telemetry_in_flight.inc();
        let held = InFlight { _permit: permit, metrics: self.ctx.metrics.clone() };
        self.cast(key, OrbMsg::Telemetry(point, held));
    }

    pub fn refused(&self, key: &OrbKey, code: ErrorCode, reason: String) {
        self.cast(key, OrbMsg::Refused { code, reason });
    }

    /// Merges and persists a state report; returns when it is durable.
    pub async fn report(&self, key: &OrbKey, report: StateReport) -> Result<(), ApiError> {
        match self
            .shard(key)
            .call(|reply| ShardMsg::Route(key.clone(), OrbMsg::Report { report, reply }), timeout())
            .await
        {
            Ok(CallResult::Success(r)) => r,
            // The actor failed while handling it (unknown orbs are answered by the shard).
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed("state report")),
        }
    }

    /// Activates the orb (registering it when the dev tenant allows) and returns its status;
    /// `None` when there is no such orb.
    pub async fn touch(&self, key: &OrbKey) -> Result<Option<OrbStatus>, ApiError> {
        match self.shard(key).call(|reply| ShardMsg::Route(key.clone(), OrbMsg::Touch { reply }), timeout()).await {
            Ok(CallResult::Success(Ok(s))) => Ok(Some(s)),
            Ok(CallResult::Success(Err(ErrorCode::NotFound))) => Ok(None),
            Ok(CallResult::Success(Err(code))) => Err(ApiError::new(code, format!("orb {key} could not be activated"))),
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed("activation")),
        }
    }

    /// Sets the orb's current certificate (`None`: revoked); a live connection is closed.
    pub async fn set_certificate(&self, key: &OrbKey, serial: Option<String>) -> Result<(), ApiError> {
        match self
            .shard(key)
            .call(|reply| ShardMsg::Route(key.clone(), OrbMsg::Certificate { serial, reply }), timeout())
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed("certificate change")),
        }
    }

    pub async fn decommission(&self, key: &OrbKey) -> Result<(), ApiError> {
        match self
            .shard(key)
            .call(|reply| ShardMsg::Route(key.clone(), OrbMsg::Decommission { reply }), timeout())
            .await
        {
            Ok(CallResult::Success(r)) => r,
            // The actor failed while handling it (unknown orbs are answered by the shard).
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed("decommission")),
        }
    }

    /// Updates an orb's operator attributes through its actor (activating it).
    pub async fn set_attributes(
        &self,
        key: &OrbKey,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<(), ApiError> {
        match self
            .shard(key)
            .call(|reply| ShardMsg::Route(key.clone(), OrbMsg::SetAttributes { set, remove, reply }), timeout())
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed("attribute update")),
        }
    }

    /// The registry record and live state of an orb, from its actor when it is live and from
    /// the store otherwise (reads never activate an actor). `None` when there is no such orb.
    pub async fn view(&self, key: &OrbKey) -> Result<Option<OrbState>, ApiError> {
        let live = match self.shard(key).call(|reply| ShardMsg::ViewIfLive(key.clone(), reply), timeout()).await {
            Ok(CallResult::Success(live)) => live,
            _ => return Err(call_failed("view")),
        };
        // When the actor stopped between the two calls, read the store instead.
        if let Some(actor) = live
            && let Ok(CallResult::Success(v)) = actor.call(|reply| OrbMsg::View { reply }, timeout()).await
        {
            return Ok(Some(*v));
        }
        let store = &self.ctx.store;
        let Some(record) = store.orb(key).map_err(ApiError::internal)? else { return Ok(None) };
        let state = orb::restore(store, key, record, self.ctx.boot_id).map_err(ApiError::internal)?;
        Ok(Some(state))
    }

    /// Live orb actors across all shards.
    pub async fn live_count(&self) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            if let Ok(CallResult::Success(c)) = s.call(ShardMsg::LiveCount, timeout()).await {
                n += c;
            }
        }
        n
    }

    /// Creates a command; `Ok((command, true))` when created, `(command, false)` when an
    /// identical request with the same idempotency key was answered before.
    pub async fn create_command(&self, key: &OrbKey, req: ValidCreate) -> Result<(Command, bool), ApiError> {
        self.call_orb(key, "command creation", |reply| OrbMsg::CreateCommand { req, reply }).await
    }

    pub async fn command_ack(&self, key: &OrbKey, ack: DeviceAck) -> Result<(), ApiError> {
        self.call_orb(key, "command acknowledgement", |reply| OrbMsg::CommandAck { ack, reply }).await
    }

    pub async fn cancel_command(&self, key: &OrbKey, command_id: String) -> Result<Command, ApiError> {
        self.call_orb(key, "command cancel", |reply| OrbMsg::CancelCommand { command_id, reply }).await
    }

    /// The HTTP fallback's pull: every deliverable command, marked sent.
    pub async fn pull_commands(&self, key: &OrbKey) -> Result<Vec<Command>, ApiError> {
        self.call_orb(key, "command pull", |reply| OrbMsg::PullCommands { reply }).await
    }

    pub fn command_delivered(&self, key: &OrbKey, conn_seq: u64, command_id: String) {
        self.cast(key, OrbMsg::CommandDelivered { conn_seq, command_id });
    }

    pub fn commands_subscribed(&self, key: &OrbKey, conn_seq: u64, outbox: OutboxSender) {
        self.cast(key, OrbMsg::CommandsSubscribed { conn_seq, outbox });
    }

    /// A call routed through the orb's shard whose answer is a `Result<T, ApiError>`.
    async fn call_orb<T: Send + 'static>(
        &self,
        key: &OrbKey,
        what: &str,
        msg: impl FnOnce(RpcReplyPort<Result<T, ApiError>>) -> OrbMsg,
    ) -> Result<T, ApiError> {
        match self.shard(key).call(|reply| ShardMsg::Route(key.clone(), msg(reply)), timeout()).await {
            Ok(CallResult::Success(r)) => r,
            // The actor failed while handling it (unknown orbs are answered by the shard).
            Ok(CallResult::SenderError) | Ok(CallResult::Timeout) | Err(_) => Err(call_failed(what)),
        }
    }

    /// Fault injection: makes the orb's actor panic (activating it first).
    pub fn inject_panic(&self, key: &OrbKey) {
        self.cast(key, OrbMsg::InjectPanic);
    }

    fn manager(&self) -> Result<&ActorRef<BroadcastMsg>, ApiError> {
        self.ctx.broadcasts.get().ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "broadcasts are not running"))
    }

    async fn call_manager<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<Result<T, ApiError>>) -> BroadcastMsg,
    ) -> Result<T, ApiError> {
        match self.manager()?.call(msg, timeout()).await {
            Ok(CallResult::Success(r)) => r,
            _ => Err(call_failed("broadcast")),
        }
    }

    /// Starts a broadcast; returns its summary.
    pub async fn start_broadcast(&self, b: Broadcast, target: Target) -> Result<serde_json::Value, ApiError> {
        self.call_manager(|reply| BroadcastMsg::Start { b: Box::new(b), target, reply }).await
    }

    /// A broadcast's live summary: counts per command state.
    pub async fn broadcast(&self, tenant: &TenantId, id: &str) -> Result<serde_json::Value, ApiError> {
        self.call_manager(|reply| BroadcastMsg::Get { tenant: tenant.clone(), id: id.to_string(), reply }).await
    }

    pub async fn cancel_broadcast(&self, tenant: &TenantId, id: &str) -> Result<serde_json::Value, ApiError> {
        self.call_manager(|reply| BroadcastMsg::Cancel { tenant: tenant.clone(), id: id.to_string(), reply }).await
    }

    /// Stops every shard and, with them, every orb actor; waits until they are gone.
    pub async fn stop(&self) {
        if let Some(a) = self.ctx.alerting.get() {
            a.stop().await;
        }
        if let Some(m) = self.ctx.broadcasts.get() {
            let _ = m.stop_and_wait(Some("fleet stopping".into()), Some(Duration::from_secs(10))).await;
        }
        for s in self.shards.iter() {
            let _ = s.stop_and_wait(Some("fleet stopping".into()), Some(Duration::from_secs(10))).await;
        }
    }
}
