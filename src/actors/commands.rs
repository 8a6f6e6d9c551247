//! The orb actor's command queue: creation with idempotency, delivery through the subscribed
//! connection's outbox, acknowledgements, cancel, deadlines. Called from `orb.rs` only; every
//! decision is made by `model::command::Queue`, and every change is durable before it is
//! answered or delivered further.
//!
//! Errors returned as `Err(storage::Error)` fail the actor on purpose: its shard restarts it
//! from the store, so the in-memory queue never runs ahead of what is durable.

use tokio::sync::mpsc::error::TrySendError;

use super::OrbCtx;
use super::orb::{OrbActorState, Outbound};
use super::shard::ShardMsg;
use crate::error::{ApiError, ErrorCode};
use crate::limits::COMMAND_OUTBOX_MAX;
use crate::model::OrbKey;
use crate::model::command::{AckOutcome, Command, DeviceAck, Queue, ValidCreate, new_command_id, seq_of};
use crate::model::orb::OrbStatus;
use crate::storage::{Batch, Error, Store};

type Answer<T> = Result<Result<T, ApiError>, Error>;

/// Persists changed commands in one durable batch with an `orb.command.status` event for
/// each, then tells the broadcast manager about the ones fanned out from a broadcast.
async fn persist(ctx: &OrbCtx, key: &OrbKey, changed: &[Command], extra: impl FnOnce(&mut Batch)) -> Result<(), Error> {
    let mut batch = Batch::new();
    let mut staged = ctx.events.stage();
    let now = ctx.clock.now_ms();
    for c in changed {
        Store::add_command(&mut batch, key, c);
        ctx.events.append(&mut batch, &mut staged, key, "orb.command.status", status_data(c), now)?;
    }
    extra(&mut batch);
    if batch.is_empty() {
        return Ok(());
    }
    staged.commit(batch).await?;
    for c in changed {
        if c.status.is_terminal() {
            ctx.metrics.command_terminal(c.status);
        }
        if let Some(b) = &c.broadcast_id {
            ctx.broadcast_event(b, key, &c.command_id, c.status);
        }
    }
    Ok(())
}

/// What an `orb.command.status` event carries: the command without its payload and history,
/// and the transition that happened.
fn status_data(c: &Command) -> serde_json::Value {
    let last = c.history.last();
    serde_json::json!({
        "command_id": c.command_id,
        "seq": c.seq,
        "command_type": c.command_type,
        "status": c.status.as_str(),
        "at_ms": last.map(|t| t.at_ms),
        "reason": last.and_then(|t| t.reason.clone()),
        "attempts": c.attempts,
        "broadcast_id": c.broadcast_id,
    })
}

/// Tells the shard when this orb next needs a `Tick`.
pub(super) fn report_deadline(state: &mut OrbActorState) {
    let next = state.commands.next_deadline();
    if next != state.reported_deadline {
        state.reported_deadline = next;
        let _ = state.shard.cast(ShardMsg::Deadline(state.key.clone(), next));
    }
}

/// A command by id, from the queue or (terminal ones) the store.
fn find(state: &OrbActorState, command_id: &str) -> Result<Option<Command>, Error> {
    let Some(seq) = seq_of(command_id) else { return Ok(None) };
    if let Some(c) = state.commands.get(seq) {
        return Ok((c.command_id == command_id).then(|| c.clone()));
    }
    Ok(state.ctx.store.command(&state.key, seq)?.filter(|c| c.command_id == command_id))
}

pub(super) async fn create(state: &mut OrbActorState, req: ValidCreate, now: u64) -> Answer<(Command, bool)> {
    let status = state.orb.record.status;
    let result = create_in(&state.ctx, &state.key, status, &mut state.commands, req, now).await?;
    report_deadline(state);
    Ok(result)
}

/// Creates a command in `queue` (idempotently), durably. Shared by the live actor and the
/// shard's cold path for orbs that are not live (a broadcast to a mostly offline fleet must
/// not activate an actor per orb).
pub(super) async fn create_in(
    ctx: &OrbCtx,
    key: &OrbKey,
    status: OrbStatus,
    queue: &mut Queue,
    req: ValidCreate,
    now: u64,
) -> Answer<(Command, bool)> {
    if status == OrbStatus::Decommissioned {
        return Ok(Err(ApiError::new(ErrorCode::Decommissioned, format!("orb {key} is decommissioned"))));
    }
    if let Some(idem) = &req.idempotency_key
        && let Some((seq, hash)) = ctx.store.idempotency(key, idem)?
    {
        if hash != req.body_hash {
            return Ok(Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("idempotency_key {idem:?} was used for a different command on this orb"),
            )));
        }
        let original = match queue.get(seq) {
            Some(c) => Some(c.clone()),
            None => ctx.store.command(key, seq)?,
        };
        return match original {
            Some(c) => Ok(Ok((c, false))),
            None => Err(Error::Corrupt { what: "idempotency", detail: format!("key points at missing command {seq}") }),
        };
    }
    let command_id = new_command_id(queue.next_seq);
    let (cmd, superseded) = match queue.create(&req, command_id, now) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let mut changed = superseded;
    changed.push(cmd.clone());
    persist(ctx, key, &changed, |b| {
        if let Some(idem) = &req.idempotency_key {
            Store::add_idempotency(b, key, idem, cmd.seq, req.body_hash);
        }
    })
    .await?;
    ctx.metrics.commands_created.inc();
    Ok(Ok((cmd, true)))
}

/// Hands every deliverable command not yet given to the subscribed connection to its outbox,
/// in sequence order, up to `COMMAND_OUTBOX_MAX` awaiting their PUBACK.
pub(super) async fn deliver(state: &mut OrbActorState, now: u64) -> Result<(), Error> {
    let Some(outbox) = state.outbox.as_mut() else { return Ok(()) };
    let mut changed = Vec::new();
    let mut closed = false;
    for seq in state.commands.deliverable(outbox.sent_upto, now) {
        if outbox.in_flight >= COMMAND_OUTBOX_MAX {
            break;
        }
        let Some(cmd) = state.commands.get(seq) else { continue };
        let out = Outbound { command_id: cmd.command_id.clone(), payload: cmd.wire() };
        match outbox.tx.try_send(out) {
            Ok(()) => {
                outbox.sent_upto = seq;
                outbox.in_flight += 1;
                state.ctx.metrics.messages_out.inc();
                if let Some(c) = state.commands.sent(seq, now) {
                    changed.push(c);
                }
            }
            Err(TrySendError::Full(_)) => break,
            Err(TrySendError::Closed(_)) => {
                closed = true;
                break;
            }
        }
    }
    if closed {
        state.outbox = None;
    }
    persist(&state.ctx, &state.key, &changed, |_| {}).await
}

pub(super) async fn delivered(
    state: &mut OrbActorState,
    conn_seq: u64,
    command_id: &str,
    now: u64,
) -> Result<(), Error> {
    if let Some(o) = state.outbox.as_mut().filter(|o| o.conn_seq == conn_seq) {
        o.in_flight = o.in_flight.saturating_sub(1);
    }
    if let Some(c) = state.commands.delivered(command_id, now) {
        persist(&state.ctx, &state.key, &[c], |_| {}).await?;
    }
    deliver(state, now).await
}

pub(super) async fn ack(state: &mut OrbActorState, ack: &DeviceAck, now: u64) -> Answer<()> {
    match state.commands.ack(ack, now) {
        AckOutcome::Moved(c) => {
            persist(&state.ctx, &state.key, &[*c], |_| {}).await?;
            report_deadline(state);
            deliver(state, now).await?;
            Ok(Ok(()))
        }
        AckOutcome::Unchanged => Ok(Ok(())),
        // A late or duplicate acknowledgement of a finished command is harmless.
        AckOutcome::NotPending => match find(state, &ack.command_id)? {
            Some(_) => Ok(Ok(())),
            None => Ok(Err(ApiError::new(
                ErrorCode::NotFound,
                format!("orb {} has no command {}", state.key, ack.command_id),
            ))),
        },
    }
}

pub(super) async fn cancel(state: &mut OrbActorState, command_id: &str, now: u64) -> Answer<Command> {
    match state.commands.cancel(command_id, now) {
        Ok(c) => {
            persist(&state.ctx, &state.key, std::slice::from_ref(&c), |_| {}).await?;
            report_deadline(state);
            Ok(Ok(c))
        }
        Err(e) if e.code == ErrorCode::NotFound => match find(state, command_id)? {
            Some(c) => Ok(Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("command {command_id} is {} and cannot be canceled", c.status.as_str()),
            ))),
            None => Ok(Err(e)),
        },
        Err(e) => Ok(Err(e)),
    }
}

/// The HTTP fallback: every deliverable command, handed over now (QUEUED -> SENT).
pub(super) async fn pull(state: &mut OrbActorState, now: u64) -> Result<Vec<Command>, Error> {
    let seqs = state.commands.deliverable(0, now);
    let mut changed = Vec::new();
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        if let Some(c) = state.commands.sent(seq, now) {
            changed.push(c);
        }
        if let Some(c) = state.commands.get(seq) {
            out.push(c.clone());
        }
    }
    state.ctx.metrics.messages_out.add(out.len() as u64);
    persist(&state.ctx, &state.key, &changed, |_| {}).await?;
    Ok(out)
}

pub(super) async fn tick(state: &mut OrbActorState, now: u64) -> Result<(), Error> {
    let due = state.commands.due(now);
    if !due.is_empty() {
        for c in &due {
            let late = now.saturating_sub(c.fired_deadline().unwrap_or(now));
            state.ctx.metrics.deadline_lateness.observe(std::time::Duration::from_millis(late));
        }
        persist(&state.ctx, &state.key, &due, |_| {}).await?;
    }
    // The shard forgot this orb's deadline when it sent the tick.
    state.reported_deadline = None;
    report_deadline(state);
    Ok(())
}
