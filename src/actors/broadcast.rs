//! The broadcast manager: one actor per node running every broadcast's fan-out and keeping
//! its live summary.
//!
//! Parent: none (started and stopped by `Fleet`). Mailbox: fan-out results and per-command
//! events from orb actors (one per durable transition of a broadcast command), so its ingress is
//! bounded by the commit rate. Invariants: a broadcast's cursor is persisted only after every
//! command of the batch before it exists, and per-orb commands are created with the idempotency
//! key `bc-<id>`, so a fan-out resumed after a crash creates each orb's command exactly once.
//! The counts merge observations monotonically (a state never moves back), so events and the
//! start-up rebuild from the store may arrive in any order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;

use super::Fleet;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{BROADCAST_IN_FLIGHT_MAX, BROADCAST_TICK_MS, BROADCASTS_LIVE_MAX};
use crate::model::broadcast::{Broadcast, BroadcastStatus, Counts, Target};
use crate::model::command::{CommandStatus, seq_of};
use crate::model::{OrbId, OrbKey, TenantId};
use crate::storage::{Batch, Store};

pub enum BroadcastMsg {
    Start {
        b: Box<Broadcast>,
        target: Target,
        reply: RpcReplyPort<Result<serde_json::Value, ApiError>>,
    },
    Get {
        tenant: TenantId,
        id: String,
        reply: RpcReplyPort<Result<serde_json::Value, ApiError>>,
    },
    Cancel {
        tenant: TenantId,
        id: String,
        reply: RpcReplyPort<Result<serde_json::Value, ApiError>>,
    },
    /// A broadcast command's state, after a durable transition.
    Event {
        id: String,
        orb: OrbKey,
        command_id: String,
        status: CommandStatus,
    },
    /// A per-orb command was created (or found) by the fan-out, or could not be.
    Created {
        id: String,
        tenant: TenantId,
        orb: OrbId,
        result: Result<(String, CommandStatus), ApiError>,
    },
    Tick,
}

pub struct BroadcastManager;

pub struct ManagerArgs {
    pub fleet: Fleet,
}

struct Run {
    b: Broadcast,
    targets: Arc<Vec<OrbId>>,
    /// Per orb: its command id and the most advanced state seen.
    orbs: HashMap<OrbId, (String, CommandStatus)>,
    counts: Counts,
    /// Targets of the current batch still being created.
    in_flight: usize,
    /// Targets whose command could not be created (unknown or decommissioned orb, full queue).
    create_errors: u64,
    last_create_error: Option<String>,
    /// The batch being created: (count, cursor after it) to persist once it completes.
    pending_cursor: Option<(u64, Option<String>)>,
    /// Monotonic ms before which the next batch may not start (the rate limit).
    next_batch_ms: u64,
}

pub struct ManagerState {
    fleet: Fleet,
    runs: HashMap<(TenantId, String), Run>,
    /// Bounds the cancels an abort fans out at once.
    cancels: Arc<Semaphore>,
}

impl Run {
    fn new(b: Broadcast, targets: Arc<Vec<OrbId>>) -> Run {
        Run {
            b,
            targets,
            orbs: HashMap::new(),
            counts: Counts::default(),
            in_flight: 0,
            create_errors: 0,
            last_create_error: None,
            pending_cursor: None,
            next_batch_ms: 0,
        }
    }

    fn summary(&self) -> serde_json::Value {
        let b = &self.b;
        serde_json::json!({
            "broadcast_id": b.id,
            "tenant_id": b.tenant,
            "status": b.status.as_str(),
            "command_type": b.command_type,
            "total": b.total,
            "fanned_out": b.fanned_out,
            "counts": self.counts.to_json(),
            "create_errors": self.create_errors,
            "last_create_error": self.last_create_error,
            "rate_per_s": b.rate_per_s,
            "abort": b.abort.as_ref().map(|a| serde_json::json!({"failure_pct": a.failure_pct, "min_samples": a.min_samples})),
            "created_ms": b.created_ms,
            "finished_ms": b.finished_ms,
            "reason": b.reason,
        })
    }

    /// Merges an observation; returns whether anything changed.
    fn merge(&mut self, orb: OrbId, command_id: String, status: CommandStatus) -> bool {
        match self.orbs.get_mut(&orb) {
            Some((_, old)) if old.rank() >= status.rank() => false,
            Some((_, old)) => {
                self.counts.moved(Some(*old), status);
                *old = status;
                true
            }
            None => {
                self.counts.moved(None, status);
                self.orbs.insert(orb, (command_id, status));
                true
            }
        }
    }
}

fn new_id(now_ms: u64) -> String {
    format!("bc-{now_ms:x}-{:06x}", fastrand::u32(..0xff_ffff))
}

impl Actor for BroadcastManager {
    type Msg = BroadcastMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<BroadcastMsg>,
        args: ManagerArgs,
    ) -> Result<ManagerState, ActorProcessingErr> {
        let store = args.fleet.ctx().store.clone();
        // Rebuild the live summaries from the store (off the runtime: it reads every fanned-out
        // orb's command once).
        let runs = tokio::task::spawn_blocking(move || rebuild(&store)).await??;
        myself.send_interval(Duration::from_millis(BROADCAST_TICK_MS), || BroadcastMsg::Tick);
        Ok(ManagerState { fleet: args.fleet, runs, cancels: Arc::new(Semaphore::new(64)) })
    }

    async fn handle(
        &self,
        myself: ActorRef<BroadcastMsg>,
        msg: BroadcastMsg,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BroadcastMsg::Start { b, target, reply } => {
                let _ = reply.send(start(state, *b, target).await);
            }
            BroadcastMsg::Get { tenant, id, reply } => {
                let r = match state.runs.get(&(tenant.clone(), id.clone())) {
                    Some(run) => Ok(run.summary()),
                    None => Err(not_found(&tenant, &id)),
                };
                let _ = reply.send(r);
            }
            BroadcastMsg::Cancel { tenant, id, reply } => {
                let r = stop(state, &tenant, &id, BroadcastStatus::Canceled, "canceled by operator".into()).await;
                let _ = reply.send(r);
            }
            BroadcastMsg::Event { id, orb, command_id, status } => {
                let k = (orb.tenant.clone(), id);
                if let Some(run) = state.runs.get_mut(&k) {
                    run.merge(orb.orb, command_id, status);
                    check_abort(state, &k).await;
                }
            }
            BroadcastMsg::Created { id, tenant, orb, result } => {
                let k = (tenant, id);
                if let Some(run) = state.runs.get_mut(&k) {
                    run.in_flight = run.in_flight.saturating_sub(1);
                    match result {
                        Ok((command_id, status)) => {
                            // Created after an abort or cancel: cancel it like the others.
                            if run.b.status != BroadcastStatus::Running && status.awaiting_device() {
                                let (fleet, key, cid) =
                                    (state.fleet.clone(), OrbKey::new(k.0.clone(), orb.clone()), command_id.clone());
                                tokio::spawn(async move {
                                    let _ = fleet.cancel_command(&key, cid).await;
                                });
                            }
                            run.merge(orb, command_id, status);
                        }
                        Err(e) => {
                            run.create_errors += 1;
                            run.last_create_error = Some(format!("{orb}: {}", e.message));
                        }
                    }
                    let batch_done = state.runs.get(&k).is_some_and(|r| r.in_flight == 0);
                    check_abort(state, &k).await;
                    if batch_done {
                        // Start the next batch now if the rate allows, not at the next tick.
                        let _ = myself.cast(BroadcastMsg::Tick);
                    }
                }
            }
            BroadcastMsg::Tick => tick(&myself, state).await?,
        }
        Ok(())
    }
}

fn not_found(tenant: &TenantId, id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no live broadcast {id} in tenant {tenant}"))
}

/// Reads every stored broadcast and the state of each command it fanned out.
fn rebuild(store: &Store) -> Result<HashMap<(TenantId, String), Run>, crate::storage::Error> {
    let mut all = store.broadcasts()?;
    // Keep the running ones and the most recent finished ones.
    all.sort_by_key(|b| (b.status == BroadcastStatus::Running, b.created_ms));
    let skip = all.len().saturating_sub(BROADCASTS_LIVE_MAX);
    let mut runs = HashMap::new();
    for b in all.into_iter().skip(skip) {
        let targets = Arc::new(if b.all_orbs { Vec::new() } else { store.broadcast_targets(&b.tenant, &b.id)? });
        let fanned: Vec<OrbId> = if b.all_orbs {
            store.orb_ids_after(&b.tenant, None, usize::MAX)?.into_iter().take(b.fanned_out as usize).collect()
        } else {
            targets.iter().take(b.fanned_out as usize).cloned().collect()
        };
        let mut run = Run::new(b, targets);
        let idem = format!("bc-{}", run.b.id);
        for orb in fanned {
            let key = OrbKey::new(run.b.tenant.clone(), orb.clone());
            if let Some((seq, _)) = store.idempotency(&key, &idem)?
                && let Some(c) = store.command(&key, seq)?
            {
                run.merge(orb, c.command_id, c.status);
            }
        }
        runs.insert((run.b.tenant.clone(), run.b.id.clone()), run);
    }
    Ok(runs)
}

async fn start(state: &mut ManagerState, mut b: Broadcast, target: Target) -> Result<serde_json::Value, ApiError> {
    let store = state.fleet.ctx().store.clone();
    b.id = new_id(b.created_ms);
    if b.all_orbs {
        let (s, t) = (store.clone(), b.tenant.clone());
        b.total = tokio::task::spawn_blocking(move || s.tenant_orb_count(&t))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
    }
    let targets = match target {
        Target::Orbs(ids) => ids,
        Target::AllOrbs => Vec::new(),
    };
    let mut batch = Batch::new();
    Store::add_broadcast(&mut batch, &b);
    if !targets.is_empty() {
        Store::add_broadcast_targets(&mut batch, &b.tenant, &b.id, &targets);
    }
    store.commit(batch).await.map_err(ApiError::internal)?;
    if state.runs.len() >= BROADCASTS_LIVE_MAX {
        // Forget the oldest finished summary (its record stays in the store).
        if let Some(old) = state
            .runs
            .iter()
            .filter(|(_, r)| r.b.status != BroadcastStatus::Running)
            .min_by_key(|(_, r)| r.b.created_ms)
            .map(|(k, _)| k.clone())
        {
            state.runs.remove(&old);
        }
    }
    let run = Run::new(b, Arc::new(targets));
    let summary = run.summary();
    state.runs.insert((run.b.tenant.clone(), run.b.id.clone()), run);
    Ok(summary)
}

async fn persist(store: &Store, b: &Broadcast) -> Result<(), crate::storage::Error> {
    let mut batch = Batch::new();
    Store::add_broadcast(&mut batch, b);
    store.commit(batch).await.map(|_| ())
}

/// Fans out the next batch of every running broadcast whose previous batch completed.
async fn tick(myself: &ActorRef<BroadcastMsg>, state: &mut ManagerState) -> Result<(), crate::storage::Error> {
    let store = state.fleet.ctx().store.clone();
    let now = state.fleet.ctx().clock.now_ms();
    let mono = state.fleet.ctx().clock.mono_ms();
    for run in state.runs.values_mut() {
        if run.b.status != BroadcastStatus::Running || run.in_flight > 0 || mono < run.next_batch_ms {
            continue;
        }
        // The previous batch is complete: its cursor can be made durable.
        if let Some((fanned, cursor)) = run.pending_cursor.take() {
            run.b.fanned_out = fanned;
            run.b.cursor = cursor;
            persist(&store, &run.b).await?;
        }
        let budget = ((u64::from(run.b.rate_per_s) * BROADCAST_TICK_MS).div_ceil(1000) as usize)
            .clamp(1, BROADCAST_IN_FLIGHT_MAX);
        let batch: Vec<OrbId> = if run.b.all_orbs {
            store.orb_ids_after(&run.b.tenant, run.b.cursor.as_deref(), budget)?
        } else {
            let from = run.b.fanned_out as usize;
            run.targets.iter().skip(from).take(budget).cloned().collect()
        };
        if batch.is_empty() {
            run.b.status = BroadcastStatus::Completed;
            run.b.finished_ms = Some(now);
            if run.b.all_orbs {
                run.b.total = run.b.fanned_out;
            }
            persist(&store, &run.b).await?;
            continue;
        }
        run.pending_cursor = Some((run.b.fanned_out + batch.len() as u64, batch.last().map(|o| o.to_string())));
        run.in_flight = batch.len();
        run.next_batch_ms = mono + (batch.len() as u64 * 1000) / u64::from(run.b.rate_per_s);
        let req = run.b.command_request();
        for orb in batch {
            let (fleet, me, req) = (state.fleet.clone(), myself.clone(), req.clone());
            let (id, tenant) = (run.b.id.clone(), run.b.tenant.clone());
            tokio::spawn(async move {
                let key = OrbKey::new(tenant.clone(), orb.clone());
                let result = fleet.create_command(&key, req).await.map(|(c, _)| (c.command_id, c.status));
                let _ = me.cast(BroadcastMsg::Created { id, tenant, orb, result });
            });
        }
    }
    Ok(())
}

async fn check_abort(state: &mut ManagerState, k: &(TenantId, String)) {
    let Some(run) = state.runs.get(k) else { return };
    let Some(policy) = &run.b.abort else { return };
    if run.b.status == BroadcastStatus::Running && run.counts.should_abort(policy) {
        let (finished, failed) = run.counts.finished_and_failed();
        let why = format!("{failed} of {finished} finished commands failed (abort at {}%)", policy.failure_pct);
        let _ = stop(state, &k.0, &k.1, BroadcastStatus::Aborted, why).await;
    }
}

/// Stops a running broadcast (abort or cancel): no more fan-out, and every command the
/// devices have not taken up yet is canceled.
async fn stop(
    state: &mut ManagerState,
    tenant: &TenantId,
    id: &str,
    to: BroadcastStatus,
    reason: String,
) -> Result<serde_json::Value, ApiError> {
    let store = state.fleet.ctx().store.clone();
    let now = state.fleet.ctx().clock.now_ms();
    let Some(run) = state.runs.get_mut(&(tenant.clone(), id.to_string())) else { return Err(not_found(tenant, id)) };
    if run.b.status != BroadcastStatus::Running {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("broadcast {id} is {} already", run.b.status.as_str()),
        ));
    }
    run.b.status = to;
    run.b.reason = Some(reason);
    run.b.finished_ms = Some(now);
    if let Some((fanned, cursor)) = run.pending_cursor.take() {
        run.b.fanned_out = fanned;
        run.b.cursor = cursor;
    }
    persist(&store, &run.b).await.map_err(ApiError::internal)?;
    for (orb, (command_id, status)) in &run.orbs {
        if !status.awaiting_device() || seq_of(command_id).is_none() {
            continue;
        }
        let (fleet, key, cid, sem) =
            (state.fleet.clone(), OrbKey::new(tenant.clone(), orb.clone()), command_id.clone(), state.cancels.clone());
        tokio::spawn(async move {
            let _permit = sem.acquire().await;
            // A command the device took up meanwhile stays: cancel refuses it, which is right.
            let _ = fleet.cancel_command(&key, cid).await;
        });
    }
    Ok(run.summary())
}
