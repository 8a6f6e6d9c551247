//! The orb actor: one per active orb, holding its live state.
//!
//! Parent: its shard (`shard.rs`), which restarts it from durable state when it fails and
//! stops it when it has been idle and offline for `idle_passivate`.
//! Mailbox: unbounded in ractor; bounded in practice by the MQTT receive maximum per connection
//! and the group-commit queue that every telemetry message passes before it is routed here.
//! Invariants: decisions live in `model::orb::OrbState` (pure); this file only performs the
//! effects. Everything the actor shows is restored from the store on activation, so a restart
//! loses nothing that was acknowledged. The actor never touches fjall; it uses `storage::Store`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use super::shard::ShardMsg;
use super::{OrbCtx, commands};
use crate::error::{ApiError, ErrorCode};
use crate::model::command::{Command, DeviceAck, Queue, ValidCreate};
use crate::model::orb::{
    Admission, AttributeError, ConnectRequest, DisconnectReason, Effect, Event, OrbRecord, OrbState, OrbStatus,
};
use crate::model::state_report::StateReport;
use crate::model::{OrbKey, TelemetryPoint};
use crate::storage::{Batch, Store};
use crate::stream::{ChangeKind, OrbChange};

/// Closes a live connection; held by the actor for the orb's current connection.
pub type KickSender = oneshot::Sender<DisconnectReason>;

/// Messages to an orb actor.
pub enum OrbMsg {
    /// Admit a connection; the reply carries its connection sequence number.
    Connect { req: ConnectRequest, kick: KickSender, reply: RpcReplyPort<Result<u64, ErrorCode>> },
    /// A connection ended.
    Disconnected { conn_seq: u64, reason: DisconnectReason },
    /// A telemetry point that is durable already.
    /// A durable point and its place in the node-wide bound (released when handled).
    Telemetry(Arc<TelemetryPoint>, super::InFlight),
    /// A state report to merge, persist and apply; replies when durable.
    Report { report: StateReport, reply: RpcReplyPort<Result<(), ApiError>> },
    /// A message of this orb was refused at the edge.
    Refused { code: ErrorCode, reason: String },
    /// Activate (registering in the dev tenant if allowed) and report the status.
    Touch { reply: RpcReplyPort<Result<OrbStatus, ErrorCode>> },
    /// Retire the orb and close its connection.
    Decommission { reply: RpcReplyPort<Result<(), ApiError>> },
    /// The orb's certificate was revoked (`None`) or replaced.
    Certificate { serial: Option<String>, reply: RpcReplyPort<Result<(), ApiError>> },
    /// Operator attribute update; replies with the new record state when durable.
    SetAttributes { set: BTreeMap<String, String>, remove: Vec<String>, reply: RpcReplyPort<Result<(), ApiError>> },
    /// The registry record and live state.
    View { reply: RpcReplyPort<Box<OrbState>> },
    /// Create a command (idempotently); replies when it is durable, with `true` when created
    /// and `false` when an earlier identical request is answered again.
    CreateCommand { req: ValidCreate, reply: RpcReplyPort<Result<(Command, bool), ApiError>> },
    /// A device acknowledgement; replies when its effect is durable.
    CommandAck { ack: DeviceAck, reply: RpcReplyPort<Result<(), ApiError>> },
    /// The device's MQTT PUBACK for a command sent on connection `conn_seq`.
    CommandDelivered { conn_seq: u64, command_id: String },
    /// Connection `conn_seq` subscribed to the orb's command topic: deliver through `outbox`.
    CommandsSubscribed { conn_seq: u64, outbox: OutboxSender },
    /// Operator cancel.
    CancelCommand { command_id: String, reply: RpcReplyPort<Result<Command, ApiError>> },
    /// The HTTP fallback: hand every deliverable command to the device now.
    PullCommands { reply: RpcReplyPort<Result<Vec<Command>, ApiError>> },
    /// A command deadline may be due.
    Tick,
    /// Fault injection for supervision tests: the handler panics.
    InjectPanic,
}

/// A command on its way to a connection.
pub struct Outbound {
    pub command_id: String,
    pub payload: Vec<u8>,
}

/// The sending side of a connection's command outbox (bounded by `COMMAND_OUTBOX_MAX`).
pub type OutboxSender = tokio::sync::mpsc::Sender<Outbound>;

/// The actor (immutable configuration lives in `OrbCtx`).
pub struct OrbActor;

/// Start-up arguments.
pub struct OrbArgs {
    pub key: OrbKey,
    pub ctx: Arc<OrbCtx>,
    pub shard: ActorRef<ShardMsg>,
    /// The registry record when the shard has just read or created it.
    pub record: Option<OrbRecord>,
}

/// Actor state.
pub struct OrbActorState {
    pub(super) key: OrbKey,
    pub(super) ctx: Arc<OrbCtx>,
    pub(super) shard: ActorRef<ShardMsg>,
    pub(super) orb: OrbState,
    kick: Option<(u64, KickSender)>,
    pub(super) commands: Queue,
    pub(super) outbox: Option<Outbox>,
    /// The deadline last reported to the shard.
    pub(super) reported_deadline: Option<u64>,
}

/// Delivery state of the connection that subscribed to the orb's commands.
pub struct Outbox {
    pub(super) conn_seq: u64,
    pub(super) tx: OutboxSender,
    /// Highest sequence number handed to this connection.
    pub(super) sent_upto: u64,
    /// Handed over and not yet PUBACKed.
    pub(super) in_flight: usize,
}

/// Rebuilds an orb's state from the store; the same function serves activation and reads of
/// orbs that are not live. A presence record from an earlier process is marked offline: its
/// connection died with that process.
pub fn restore(
    store: &Store,
    key: &OrbKey,
    record: OrbRecord,
    boot_id: u64,
) -> Result<OrbState, crate::storage::Error> {
    let mut orb = OrbState::new(record);
    if let Some(mut presence) = store.presence(key)? {
        if presence.online && presence.boot_id != boot_id {
            presence.online = false;
            presence.disconnect_reason = Some(DisconnectReason::ServerShutdown);
        }
        orb.presence = presence;
    }
    if let Some(reported) = store.reported(key)? {
        orb.reported = reported;
    }
    if let Some(stored) = store.latest_point(key)? {
        orb.last_seen_ms = Some(stored.received_ms.max(orb.reported.updated_ms.unwrap_or(0)));
        orb.last = Some(std::sync::Arc::new(stored.point));
    }
    Ok(orb)
}

impl Actor for OrbActor {
    type Msg = OrbMsg;
    type State = OrbActorState;
    type Arguments = OrbArgs;

    async fn pre_start(&self, _myself: ActorRef<OrbMsg>, args: OrbArgs) -> Result<OrbActorState, ActorProcessingErr> {
        let OrbArgs { key, ctx, shard, record } = args;
        let record = match record {
            Some(r) => r,
            None => ctx.store.orb(&key)?.ok_or_else(|| format!("orb {key} is not registered"))?,
        };
        let orb = restore(&ctx.store, &key, record, ctx.boot_id)?;
        let commands = Queue::new(ctx.store.pending_commands(&key)?, ctx.store.last_command_seq(&key)? + 1);
        Ok(OrbActorState { key, ctx, shard, orb, kick: None, commands, outbox: None, reported_deadline: None })
    }

    async fn post_start(&self, _myself: ActorRef<OrbMsg>, state: &mut OrbActorState) -> Result<(), ActorProcessingErr> {
        if state.orb.presence.online {
            // Restarted while a connection of this process is live: keep the shard from
            // passivating us.
            let _ = state.shard.cast(ShardMsg::Online(state.key.clone(), true));
        }
        super::commands::report_deadline(state);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<OrbMsg>,
        msg: OrbMsg,
        state: &mut OrbActorState,
    ) -> Result<(), ActorProcessingErr> {
        // ractor keeps the future of its message loop, which holds this one inline, boxed for
        // the life of the actor: inline, this handler's ~2.7 KB future (twice that in ractor's
        // wrappers) was the largest part of a live orb's memory. Boxed, it exists only while a
        // message is handled (BENCHMARKS.md, "Memory per orb through gateways").
        Box::pin(handle(msg, state)).await
    }
}

async fn handle(msg: OrbMsg, state: &mut OrbActorState) -> Result<(), ActorProcessingErr> {
    let now = state.ctx.clock.now_ms();
    match msg {
        // The connection stopped waiting (its call timed out under load and it dropped the
        // kick receiver): admitting it would leave the orb online with a connection nobody
        // holds.
        OrbMsg::Connect { kick, reply, .. } if kick.is_closed() => {
            let _ = reply.send(Err(ErrorCode::Unavailable));
        }
        OrbMsg::Connect { req, kick, reply } => match state.orb.admit(&req, now) {
            Admission::Accepted { conn_seq, effects } => {
                state.orb.presence.boot_id = state.ctx.boot_id;
                perform(state, effects).await?;
                state.kick = Some((conn_seq, kick));
                let answered = reply.send(Ok(conn_seq)).is_ok();
                publish(state, ChangeKind::Presence, now);
                if !answered {
                    // It gave up while this was being made durable: the connection is gone.
                    let effects = state
                        .orb
                        .apply(Event::Disconnected { conn_seq, reason: DisconnectReason::ConnectionLost }, now);
                    state.kick = None;
                    perform(state, effects).await?;
                    publish(state, ChangeKind::Presence, now);
                }
            }
            Admission::Refused(code) => {
                let _ = reply.send(Err(code));
            }
        },
        OrbMsg::Disconnected { conn_seq, reason } => {
            let effects = state.orb.apply(Event::Disconnected { conn_seq, reason }, now);
            if !effects.is_empty() {
                state.kick = None;
            }
            if state.outbox.as_ref().is_some_and(|o| o.conn_seq == conn_seq) {
                state.outbox = None;
            }
            let changed = !effects.is_empty();
            perform(state, effects).await?;
            if changed {
                publish(state, ChangeKind::Presence, now);
            }
        }
        OrbMsg::Telemetry(point, _in_flight) => {
            let effects = state.orb.apply(Event::Telemetry(&point), now);
            perform(state, effects).await?;
            publish(state, ChangeKind::Telemetry, now);
            if let Some(alerting) = state.ctx.alerting.get()
                && let Some(vars) = alerting.interest(&state.key.tenant)
            {
                use crate::model::rule::var_bit;
                let wants_metrics = vars & (var_bit("metrics") | var_bit("rate") | var_bit("zscore")) != 0;
                let metrics = if wants_metrics { point.metrics.clone() } else { Default::default() };
                alerting.observe(&state.key, crate::search::Row::of(&state.orb), point.ts, metrics).await;
            }
        }
        OrbMsg::Report { report, reply } => {
            let result = report_state(state, &report, now).await;
            if result.is_ok() {
                publish(state, ChangeKind::Reported, now);
            }
            let _ = reply.send(result);
        }
        OrbMsg::Refused { code, reason } => {
            state.orb.apply(Event::Refused { code, reason: &reason }, now);
        }
        OrbMsg::Touch { reply } => {
            let _ = reply.send(Ok(state.orb.record.status));
        }
        OrbMsg::Certificate { serial, reply } => {
            let effects = state.orb.apply(Event::Certificate(serial.as_deref()), now);
            let result = perform(state, effects).await.map_err(ApiError::internal);
            publish(state, ChangeKind::Status, now);
            let _ = reply.send(result);
        }
        OrbMsg::Decommission { reply } => {
            let effects = state.orb.apply(Event::Decommission, now);
            let result = perform(state, effects).await.map_err(ApiError::internal);
            publish(state, ChangeKind::Status, now);
            let _ = reply.send(result);
        }
        OrbMsg::SetAttributes { set, remove, reply } => {
            let result = match state.orb.prepare_attributes(&set, &remove) {
                Ok(next) => {
                    let effects = state.orb.apply(Event::Attributes(&next), now);
                    let wrote = !effects.is_empty();
                    // A failed write fails the actor: it restarts from what is durable.
                    perform(state, effects).await?;
                    if wrote {
                        publish(state, ChangeKind::Attributes, now);
                    }
                    Ok(())
                }
                Err(AttributeError::Decommissioned) => {
                    Err(ApiError::new(ErrorCode::Decommissioned, format!("orb {} is decommissioned", state.key)))
                }
                Err(AttributeError::Invalid(m)) => Err(ApiError::new(ErrorCode::InvalidArgument, m)),
            };
            let _ = reply.send(result);
        }
        OrbMsg::View { reply } => {
            let _ = reply.send(Box::new(state.orb.clone()));
        }
        OrbMsg::CreateCommand { req, reply } => {
            // A failed commit fails the actor: the shard restarts it from the store, so the
            // in-memory queue never runs ahead of what is durable.
            let result = commands::create(state, req, now).await?;
            let created = result.as_ref().is_ok_and(|(_, created)| *created);
            let _ = reply.send(result);
            if created {
                commands::deliver(state, now).await?;
            }
        }
        OrbMsg::CommandAck { ack, reply } => {
            let result = commands::ack(state, &ack, now).await?;
            let _ = reply.send(result);
        }
        OrbMsg::CommandDelivered { conn_seq, command_id } => {
            commands::delivered(state, conn_seq, &command_id, now).await?;
        }
        OrbMsg::CommandsSubscribed { conn_seq, outbox } => {
            if state.orb.presence.online && state.orb.presence.conn_seq == conn_seq {
                state.outbox = Some(Outbox { conn_seq, tx: outbox, sent_upto: 0, in_flight: 0 });
                commands::deliver(state, now).await?;
            }
        }
        OrbMsg::CancelCommand { command_id, reply } => {
            let result = commands::cancel(state, &command_id, now).await?;
            let _ = reply.send(result);
        }
        OrbMsg::PullCommands { reply } => {
            let result = commands::pull(state, now).await?;
            let _ = reply.send(Ok(result));
        }
        OrbMsg::Tick => commands::tick(state, now).await?,
        OrbMsg::InjectPanic => {
            panic!("fault injection: orb actor {} panics on request", state.key);
        }
    }
    Ok(())
}

/// Tells live-stream subscribers and the search index about a change that was just applied.
fn publish(state: &OrbActorState, kind: ChangeKind, now: u64) {
    if kind == ChangeKind::Telemetry {
        state.ctx.index.refresh_telemetry(&state.key, &state.orb);
    } else {
        state.ctx.index_orb(&state.orb);
    }
    state.ctx.hub.publish(OrbChange::of(&state.orb, kind, now));
}

async fn report_state(state: &mut OrbActorState, report: &StateReport, now: u64) -> Result<(), ApiError> {
    // Version history keys are per millisecond: keep report times strictly increasing.
    let at = state.orb.reported.updated_ms.map_or(now, |last| now.max(last + 1));
    let next = state.orb.prepare_report(report, at).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    let mut batch = Batch::new();
    Store::add_reported(&mut batch, &state.key, &next);
    for change in state.orb.reported.changes_to(&next, at) {
        Store::add_version_change(&mut batch, &state.key, &change);
    }
    state.ctx.store.commit(batch).await.map_err(ApiError::internal)?;
    let effects = state.orb.apply(Event::Reported(&next), now);
    perform(state, effects).await.map_err(ApiError::internal)
}

/// Carries out the state machine's effects in order.
async fn perform(state: &mut OrbActorState, effects: Vec<Effect>) -> Result<(), crate::storage::Error> {
    // Consecutive writes share one batch (a first connect saves the record and the presence
    // with one fsync); any other effect waits until the writes before it are durable.
    let mut batch = Batch::new();
    let mut staged = state.ctx.events.stage();
    for effect in effects {
        match effect {
            Effect::SaveRecord => Store::add_orb(&mut batch, &state.orb.record),
            Effect::SavePresence => {
                let p = &state.orb.presence;
                Store::add_presence(&mut batch, &state.key, p);
                let kind = if p.online { "orb.presence.online" } else { "orb.presence.offline" };
                let data = serde_json::json!({
                    "online": p.online,
                    "conn_seq": p.conn_seq,
                    "connected_at_ms": p.connected_at_ms,
                    "disconnected_at_ms": p.disconnected_at_ms,
                    "disconnect_reason": p.disconnect_reason.map(|r| r.as_str()),
                    "protocol": p.protocol,
                    "client_id": p.client_id,
                });
                let now = state.ctx.clock.now_ms();
                state.ctx.events.append(&mut batch, &mut staged, &state.key, kind, data, now)?;
            }
            Effect::Emit(kind) => {
                let r = &state.orb.record;
                let data = serde_json::json!({
                    "status": r.status.as_str(),
                    "attributes": r.attributes,
                    "updated_ms": r.updated_ms,
                });
                let now = state.ctx.clock.now_ms();
                state.ctx.events.append(&mut batch, &mut staged, &state.key, kind.as_str(), data, now)?;
            }
            Effect::Kick { conn_seq, reason } => {
                commit_writes(state, &mut batch, &mut staged).await?;
                if let Some((_, tx)) = state.kick.take_if(|(seq, _)| *seq == conn_seq) {
                    let _ = tx.send(reason);
                }
            }
            Effect::Online(online) => {
                commit_writes(state, &mut batch, &mut staged).await?;
                let _ = state.shard.cast(ShardMsg::Online(state.key.clone(), online));
            }
        }
    }
    commit_writes(state, &mut batch, &mut staged).await
}

/// Commits the writes `perform` gathered. Awaited, so the records of one orb reach the store
/// in order (a connect can never overwrite the disconnect that followed it).
async fn commit_writes(
    state: &OrbActorState,
    batch: &mut Batch,
    staged: &mut crate::events::Staged,
) -> Result<(), crate::storage::Error> {
    if batch.is_empty() {
        return Ok(());
    }
    let events = std::mem::replace(staged, state.ctx.events.stage());
    events.commit(std::mem::take(batch)).await.map(|_| ())
}
