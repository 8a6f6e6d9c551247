//! A shard supervisor: owns the orb actors whose `(tenant, orb)` hashes to it.
//!
//! Parent: none (shards are started and stopped by `Fleet`); children: orb actors.
//! Restart policy: a failed orb actor is restarted at once from durable state, at most
//! `ORB_RESTARTS_MAX` times per `ORB_RESTART_WINDOW_MS`; past that it stays stopped until the
//! next message for it re-activates it.
//! Mailbox: every message to an orb passes here, so per-orb order is the order of this mailbox.
//! Activation: the first message for an orb that is not live loads its record and spawns its
//! actor (registering it first in the dev tenant under `--dev`). Passivation: every
//! `SHARD_SWEEP_INTERVAL_MS`, actors idle for `idle_passivate_ms` and without a live
//! connection are stopped.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::orb::{OrbActor, OrbArgs, OrbMsg};
use super::{OrbCtx, commands};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{DEADLINE_TICK_MS, ORB_RESTART_WINDOW_MS, ORB_RESTARTS_MAX, SHARD_SWEEP_INTERVAL_MS};
use crate::model::OrbKey;
use crate::model::command::{Command, Queue, ValidCreate};
use crate::model::orb::OrbRecord;
use crate::storage::{Batch, Store, TenantRecord};

/// Messages to a shard.
pub enum ShardMsg {
    /// Deliver to the orb's actor, activating it if needed.
    Route(OrbKey, OrbMsg),
    /// The orb's view if its actor is live, `None` otherwise (reads never activate).
    ViewIfLive(OrbKey, RpcReplyPort<Option<ActorRef<OrbMsg>>>),
    /// Sent by an orb actor when its connection comes or goes.
    Online(OrbKey, bool),
    /// Create a registry record unless the orb exists; serialized per orb by this mailbox.
    Register(Box<OrbRecord>, RpcReplyPort<Result<(), ApiError>>),
    /// An orb's earliest command deadline (`None`: it has none).
    Deadline(OrbKey, Option<u64>),
    /// Send `Tick` to orbs whose deadline has come.
    DeadlineTick,
    /// Look for idle actors to passivate.
    Sweep,
    /// Number of live orb actors in this shard.
    LiveCount(RpcReplyPort<usize>),
}

pub struct ShardActor;

pub struct ShardArgs {
    pub index: usize,
    pub ctx: Arc<OrbCtx>,
}

struct Slot {
    actor: ActorRef<OrbMsg>,
    last_activity_ms: u64,
    online: bool,
    restarts: u32,
    restart_window_start_ms: u64,
}

pub struct ShardState {
    index: usize,
    ctx: Arc<OrbCtx>,
    slots: HashMap<OrbKey, Slot>,
    /// Command deadlines of this shard's orbs, live or not (passivation keeps them).
    deadlines: BTreeSet<(u64, OrbKey)>,
    deadline_of: HashMap<OrbKey, u64>,
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, myself: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(SHARD_SWEEP_INTERVAL_MS), || ShardMsg::Sweep);
        myself.send_interval(Duration::from_millis(DEADLINE_TICK_MS), || ShardMsg::DeadlineTick);
        Ok(ShardState {
            index: args.index,
            ctx: args.ctx,
            slots: HashMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
        })
    }

    async fn post_stop(&self, myself: ActorRef<ShardMsg>, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        // Wait for the orb actors to end, so nothing of this shard outlives the fleet's stop.
        myself.stop_children_and_wait(Some("shard stopping".into()), Some(Duration::from_secs(10))).await;
        for _ in state.slots.drain() {
            state.ctx.metrics.live_actors.dec();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.ctx.clock.mono_ms();
        match msg {
            ShardMsg::Route(key, msg) => route(&myself, state, key, msg, now).await,
            ShardMsg::ViewIfLive(key, reply) => {
                let _ = reply.send(state.slots.get(&key).map(|s| s.actor.clone()));
            }
            ShardMsg::Online(key, online) => {
                if let Some(slot) = state.slots.get_mut(&key) {
                    slot.online = online;
                    slot.last_activity_ms = now;
                }
            }
            ShardMsg::Register(record, reply) => {
                let _ = reply.send(register(state, *record).await);
            }
            ShardMsg::Deadline(key, deadline) => set_deadline(state, key, deadline),
            ShardMsg::DeadlineTick => {
                let wall = state.ctx.clock.now_ms();
                while let Some((d, key)) = state.deadlines.first().cloned() {
                    if d > wall {
                        break;
                    }
                    state.deadlines.pop_first();
                    state.deadline_of.remove(&key);
                    route(&myself, state, key, OrbMsg::Tick, now).await;
                }
            }
            ShardMsg::Sweep => sweep(state, now),
            ShardMsg::LiveCount(reply) => {
                let _ = reply.send(state.slots.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ShardMsg>,
        evt: SupervisionEvent,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            restart(&myself, state, &cell, &err.to_string()).await;
        }
        Ok(())
    }
}

/// Whether a message may create its orb (dev tenant under `--dev` only).
fn may_auto_register(ctx: &OrbCtx, key: &OrbKey, msg: &OrbMsg) -> bool {
    ctx.dev
        && key.tenant.is_dev()
        && matches!(msg, OrbMsg::Connect { .. } | OrbMsg::Touch { .. } | OrbMsg::Report { .. })
}

/// Answers a message whose orb cannot be activated.
fn reject(msg: OrbMsg, code: ErrorCode, why: &str) {
    match msg {
        // Connection refusals never say whether the orb exists.
        OrbMsg::Connect { reply, .. } => {
            let _ = reply.send(Err(if code == ErrorCode::NotFound { ErrorCode::Unauthenticated } else { code }));
        }
        OrbMsg::Report { reply, .. }
        | OrbMsg::Decommission { reply }
        | OrbMsg::Certificate { reply, .. }
        | OrbMsg::CommandAck { reply, .. }
        | OrbMsg::SetAttributes { reply, .. } => {
            let _ = reply.send(Err(ApiError::new(code, why)));
        }
        OrbMsg::CreateCommand { reply, .. } => {
            let _ = reply.send(Err(ApiError::new(code, why)));
        }
        OrbMsg::CancelCommand { reply, .. } => {
            let _ = reply.send(Err(ApiError::new(code, why)));
        }
        OrbMsg::PullCommands { reply } => {
            let _ = reply.send(Err(ApiError::new(code, why)));
        }
        OrbMsg::Touch { reply } => {
            let _ = reply.send(Err(code));
        }
        // Views are only asked of live actors; nobody waits on the others.
        OrbMsg::View { .. } => {}
        OrbMsg::Disconnected { .. }
        | OrbMsg::Telemetry(..)
        | OrbMsg::Refused { .. }
        | OrbMsg::InjectPanic
        | OrbMsg::CommandDelivered { .. }
        | OrbMsg::CommandsSubscribed { .. }
        | OrbMsg::Tick => {}
    }
}

async fn route(myself: &ActorRef<ShardMsg>, state: &mut ShardState, key: OrbKey, msg: OrbMsg, now: u64) {
    if let Some(slot) = state.slots.get_mut(&key) {
        slot.last_activity_ms = now;
        if let Err(e) = slot.actor.cast(msg) {
            // The actor is stopping (it failed and its restart is queued behind us): activate
            // a fresh one for this message; the failure event will find its slot replaced.
            let msg = match e {
                ractor::MessagingErr::SendErr(m) => m,
                _ => return,
            };
            remove_slot(state, &key);
            activate_and_deliver(myself, state, key, msg, now).await;
        }
        return;
    }
    match msg {
        OrbMsg::CreateCommand { req, reply } => {
            let result = cold_create(state, &key, req).await.unwrap_or_else(|e| Err(ApiError::internal(e)));
            let _ = reply.send(result);
        }
        msg => activate_and_deliver(myself, state, key, msg, now).await,
    }
}

/// Creates a command for an orb that is not live without activating it (a broadcast to a
/// mostly offline fleet must not cost an actor per orb). Safe because every message for the
/// orb passes this mailbox: nothing else touches its queue meanwhile.
async fn cold_create(
    state: &mut ShardState,
    key: &OrbKey,
    req: ValidCreate,
) -> Result<Result<(Command, bool), ApiError>, crate::storage::Error> {
    let ctx = state.ctx.clone();
    let Some(record) = ctx.store.orb(key)? else {
        return Ok(Err(ApiError::new(ErrorCode::NotFound, format!("no orb {} in tenant {}", key.orb, key.tenant))));
    };
    let mut queue = Queue::new(ctx.store.pending_commands(key)?, ctx.store.last_command_seq(key)? + 1);
    let result = commands::create_in(&ctx, key, record.status, &mut queue, req, ctx.clock.now_ms()).await?;
    set_deadline(state, key.clone(), queue.next_deadline());
    Ok(result)
}

async fn activate_and_deliver(myself: &ActorRef<ShardMsg>, state: &mut ShardState, key: OrbKey, msg: OrbMsg, now: u64) {
    let ctx = state.ctx.clone();
    let record = match ctx.store.orb(&key) {
        Ok(Some(r)) => r,
        Ok(None) if may_auto_register(&ctx, &key, &msg) => match auto_register(&ctx, &key, gateway_of(&msg)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(orb = %key, error = %e, "auto-registration failed");
                return reject(msg, ErrorCode::Internal, "registration failed");
            }
        },
        Ok(None) => return reject(msg, ErrorCode::NotFound, "no such orb"),
        Err(e) => {
            tracing::error!(orb = %key, error = %e, "reading the registry failed");
            return reject(msg, ErrorCode::Internal, "registry read failed");
        }
    };
    match spawn_orb(myself, state, key.clone(), Some(record), now).await {
        Some(actor) => {
            let _ = actor.cast(msg);
        }
        None => reject(msg, ErrorCode::Internal, "activation failed"),
    }
}

async fn register(state: &ShardState, record: OrbRecord) -> Result<(), ApiError> {
    let key = record.key();
    let exists = state.slots.contains_key(&key) || state.ctx.store.orb(&key).map_err(ApiError::internal)?.is_some();
    if exists {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("orb {} already exists in tenant {}", key.orb, key.tenant),
        ));
    }
    persist_new(&state.ctx, &record).await.map_err(ApiError::internal)
}

/// Writes a new orb (and its tenant, the first time) durably.
async fn persist_new(ctx: &OrbCtx, record: &OrbRecord) -> Result<(), crate::storage::Error> {
    let mut batch = Batch::new();
    if ctx.store.tenant(&record.tenant)?.is_none() {
        Store::add_tenant(&mut batch, &TenantRecord { tenant: record.tenant.clone(), created_ms: record.created_ms });
    }
    Store::add_orb(&mut batch, record);
    let mut staged = ctx.events.stage();
    let data = serde_json::json!({
        "status": record.status.as_str(),
        "attributes": record.attributes,
        "auto_registered": record.auto_registered,
    });
    ctx.events.append(&mut batch, &mut staged, &record.key(), "orb.registered", data, record.created_ms)?;
    staged.commit(batch).await?;
    ctx.index_orb(&crate::model::orb::OrbState::new(record.clone()));
    Ok(())
}

/// The gateway a connect comes through, if any.
fn gateway_of(msg: &OrbMsg) -> Option<String> {
    match msg {
        OrbMsg::Connect { req, .. } => match &req.credential {
            crate::model::orb::Credential::Gateway(gw) => Some(gw.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Registers a dev-tenant orb on first contact; one first seen through a gateway is
/// registered under it.
async fn auto_register(
    ctx: &OrbCtx,
    key: &OrbKey,
    gateway: Option<String>,
) -> Result<OrbRecord, crate::storage::Error> {
    let mut record = OrbRecord::provisioned(key.clone(), None, ctx.clock.now_ms());
    if let Some(gw) = gateway {
        record.attributes.insert(crate::model::orb::GATEWAY_ATTR.to_string(), gw);
    }
    persist_new(ctx, &record).await?;
    tracing::debug!(orb = %key, "registered on first contact (dev tenant)");
    Ok(record)
}

async fn spawn_orb(
    myself: &ActorRef<ShardMsg>,
    state: &mut ShardState,
    key: OrbKey,
    record: Option<OrbRecord>,
    now: u64,
) -> Option<ActorRef<OrbMsg>> {
    let args = OrbArgs { key: key.clone(), ctx: state.ctx.clone(), shard: myself.clone(), record };
    match Actor::spawn_linked(None, OrbActor, args, myself.get_cell()).await {
        Ok((actor, _join)) => {
            state.ctx.metrics.actor_activations.inc();
            let slot = Slot {
                actor: actor.clone(),
                last_activity_ms: now,
                online: false,
                restarts: 0,
                restart_window_start_ms: now,
            };
            match state.slots.entry(key) {
                Entry::Occupied(mut e) => {
                    let old = e.get();
                    // Keep the restart history across re-activations within the window.
                    let (restarts, start) = (old.restarts, old.restart_window_start_ms);
                    e.insert(Slot { restarts, restart_window_start_ms: start, ..slot });
                }
                Entry::Vacant(e) => {
                    state.ctx.metrics.live_actors.inc();
                    e.insert(slot);
                }
            }
            Some(actor)
        }
        Err(e) => {
            tracing::error!(shard = state.index, error = %e, "orb actor failed to start");
            None
        }
    }
}

async fn restart(myself: &ActorRef<ShardMsg>, state: &mut ShardState, cell: &ActorCell, why: &str) {
    let now = state.ctx.clock.mono_ms();
    let Some(key) = state.slots.iter().find(|(_, s)| s.actor.get_id() == cell.get_id()).map(|(k, _)| k.clone()) else {
        return; // Already replaced or passivated.
    };
    let slot = state.slots.get_mut(&key).expect("found above");
    if now.saturating_sub(slot.restart_window_start_ms) > ORB_RESTART_WINDOW_MS {
        slot.restarts = 0;
        slot.restart_window_start_ms = now;
    }
    slot.restarts += 1;
    if slot.restarts > ORB_RESTARTS_MAX {
        tracing::error!(orb = %key, error = why, "orb actor keeps failing; leaving it stopped until its next message");
        remove_slot(state, &key);
        return;
    }
    tracing::warn!(orb = %key, error = why, restarts = slot.restarts, "orb actor failed; restarting from durable state");
    state.ctx.metrics.actor_restarts.inc();
    if spawn_orb(myself, state, key.clone(), None, now).await.is_none() {
        remove_slot(state, &key);
    }
}

/// Forgets an orb's actor (it has stopped or failed); keeps the live gauge equal to the slots.
fn remove_slot(state: &mut ShardState, key: &OrbKey) {
    if state.slots.remove(key).is_some() {
        state.ctx.metrics.live_actors.dec();
    }
}

fn set_deadline(state: &mut ShardState, key: OrbKey, deadline: Option<u64>) {
    if let Some(old) = state.deadline_of.remove(&key) {
        state.deadlines.remove(&(old, key.clone()));
    }
    if let Some(d) = deadline {
        state.deadlines.insert((d, key.clone()));
        state.deadline_of.insert(key, d);
    }
}

fn sweep(state: &mut ShardState, now: u64) {
    let idle = state.ctx.idle_passivate_ms;
    let metrics = &state.ctx.metrics;
    state.slots.retain(|_, slot| {
        let keep = slot.online || now.saturating_sub(slot.last_activity_ms) < idle;
        if !keep {
            slot.actor.stop(Some("passivated".into()));
            metrics.actor_passivations.inc();
            metrics.live_actors.dec();
        }
        keep
    });
}
