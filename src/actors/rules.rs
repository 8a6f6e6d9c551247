//! Rule actors: every orb's observations evaluated against its tenant's rules.
//!
//! `PARTITIONS` actors, each owning the orbs whose routing hash falls in it (the same hash the
//! orb shards and the search index use), so evaluation spreads over the runtime's threads and
//! every (rule, orb) window and alert has exactly one writer. Orb actors send an observation
//! after each applied telemetry point; a one-second tick fires duration windows whose time has
//! come and heartbeat-absence rules for orbs that went quiet. Windows are checkpointed in the
//! same batch as the alert they cause, so a restart in the middle of a window resumes it.
//! Operator changes to alerts (acknowledge, resolve) go through the owning partition too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cel_interpreter::{Context, Program, Value};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::clock::Clock;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::model::alert::{Alert, AlertState};
use crate::model::rule::{Compiled, Ewma, Rule, Transition, Window, in_polygon, var_bit};
use crate::model::telemetry::MetricSet;
use crate::model::{OrbId, OrbKey, TenantId};
use crate::search::{FleetIndex, Row};
use crate::storage::{Batch, Store, WindowRecord};
use crate::webhooks::Webhooks;

/// Rule partitions (divides the index's shard count).
pub const PARTITIONS: usize = 4;
/// Observations queued for one partition before orb actors wait.
pub const PARTITION_QUEUE_MAX: usize = 8_192;
const TICK_MS: u64 = 1_000;
/// Staged writes are committed when the partition's queue is empty, when this many operations
/// are staged, or when the oldest is this old: one fsync for many decisions under load.
const FLUSH_OPS: usize = 512;
const FLUSH_AGE_MS: u64 = 20;
/// Orbs whose recent values a partition keeps for `rate` and `zscore`.
pub const HISTORY_ORBS_MAX: usize = 1_000_000;
/// Recent values untouched this long are forgotten.
const HISTORY_IDLE_MS: u64 = 3_600_000;

/// An orb's previous observation and per-field statistics (`rate`, `zscore`).
#[derive(Default)]
struct Recent {
    at_ms: u64,
    values: Vec<(Box<str>, f64)>,
    stats: Vec<(Box<str>, Ewma)>,
}

impl Recent {
    /// Derived maps for this observation, then remembers it.
    fn step(&mut self, now_ms: u64, fields: &[(&str, f64)]) -> (HashMap<String, f64>, HashMap<String, f64>) {
        let dt_s = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        let mut rate = HashMap::new();
        let mut z = HashMap::new();
        for (name, x) in fields {
            if dt_s > 0.0
                && let Some((_, prev)) = self.values.iter().find(|(n, _)| &**n == *name)
            {
                rate.insert(name.to_string(), (x - prev) / dt_s);
            }
            let stat = match self.stats.iter_mut().find(|(n, _)| &**n == *name) {
                Some((_, e)) => e,
                None => {
                    self.stats.push(((*name).into(), Ewma::default()));
                    &mut self.stats.last_mut().expect("just pushed").1
                }
            };
            if let Some(v) = stat.observe(*x) {
                z.insert(name.to_string(), v);
            }
        }
        self.at_ms = now_ms;
        self.values = fields.iter().map(|(n, x)| ((*n).into(), *x)).collect();
        (rate, z)
    }
}

/// The compiled rules of every tenant, shared by the partitions and updated by the API.
#[derive(Default)]
pub struct RuleBook(RwLock<HashMap<TenantId, Arc<Vec<Arc<Compiled>>>>>);

impl RuleBook {
    /// The variables any rule of `tenant` reads (see [`crate::model::rule::var_bit`]), or
    /// `None` when the tenant has no rules.
    pub fn interest(&self, tenant: &TenantId) -> Option<u16> {
        self.0.read().expect("rule book lock").get(tenant).map(|r| vars_of(r))
    }

    pub fn of(&self, tenant: &TenantId) -> Option<Arc<Vec<Arc<Compiled>>>> {
        self.0.read().expect("rule book lock").get(tenant).cloned()
    }

    fn tenants(&self) -> Vec<(TenantId, Arc<Vec<Arc<Compiled>>>)> {
        self.0.read().expect("rule book lock").iter().map(|(t, r)| (t.clone(), r.clone())).collect()
    }

    pub fn insert(&self, c: Compiled) {
        let mut m = self.0.write().expect("rule book lock");
        let tenant = c.rule.tenant.clone();
        let mut rules: Vec<Arc<Compiled>> = m.get(&tenant).map(|r| r.to_vec()).unwrap_or_default();
        rules.retain(|r| r.rule.rule_id != c.rule.rule_id);
        rules.push(Arc::new(c));
        m.insert(tenant, Arc::new(rules));
    }

    pub fn remove(&self, tenant: &TenantId, rule_id: &str) {
        let mut m = self.0.write().expect("rule book lock");
        if let Some(rules) = m.get(tenant) {
            let rest: Vec<Arc<Compiled>> = rules.iter().filter(|r| r.rule.rule_id != rule_id).cloned().collect();
            if rest.is_empty() {
                m.remove(tenant);
            } else {
                m.insert(tenant.clone(), Arc::new(rest));
            }
        }
    }
}

/// The variables any of `rules` reads.
fn vars_of(rules: &[Arc<Compiled>]) -> u16 {
    rules.iter().fold(0, |m, c| m | c.vars)
}

/// What an operator does to an alert.
#[derive(Clone, Debug)]
pub enum AlertOp {
    Acknowledge,
    Resolve,
    /// Sets (or with `None` clears) the assignee.
    Assign(Option<String>),
    Comment {
        author: String,
        text: String,
    },
}

pub enum RuleMsg {
    /// An orb's values after a telemetry point was applied.
    Observe {
        key: OrbKey,
        row: Box<Row>,
        /// The device time of the point observed.
        ts: u64,
        metrics: MetricSet,
    },
    Tick,
    Alert {
        alert: Box<Alert>,
        op: AlertOp,
        reply: RpcReplyPort<Result<Alert, ApiError>>,
    },
    /// A rule was deleted: forget its windows.
    RuleRemoved {
        tenant: TenantId,
        rule_id: String,
    },
    /// Fault injection for supervision tests: the handler panics.
    InjectPanic,
}

/// Everything a partition needs.
pub struct RuleCtx {
    pub store: Store,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub index: FleetIndex,
    pub book: Arc<RuleBook>,
    pub webhooks: Webhooks,
    pub events: crate::events::Events,
    /// When this process started: the reference of absence rules for orbs never heard from.
    pub started_ms: u64,
}

/// The handle the orb actors and the API use.
#[derive(Clone)]
pub struct Alerting {
    pub ctx: Arc<RuleCtx>,
    partitions: Arc<Vec<tokio::sync::Mutex<Slot>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// One partition: its actor and its queue length.
struct Slot {
    actor: ActorRef<RuleMsg>,
    queued: Arc<AtomicUsize>,
}

fn partition_of(key: &OrbKey) -> usize {
    (key.route_hash() % PARTITIONS as u64) as usize
}

/// What a partition keeps in memory: its non-idle windows and its open alerts.
type PartitionMemory = (HashMap<WinKey, Window>, HashMap<WinKey, Alert>);

/// The windows and open alerts of one partition, from the store.
fn load_partition(store: &Store, part: usize) -> Result<PartitionMemory, ActorProcessingErr> {
    let mut windows = HashMap::new();
    for w in store.all_windows()? {
        if partition_of(&OrbKey::new(w.tenant.clone(), w.orb.clone())) == part {
            windows.insert((w.tenant, w.rule_id, w.orb), w.window);
        }
    }
    let mut open = HashMap::new();
    for a in store.all_open_alerts()? {
        if partition_of(&OrbKey::new(a.tenant.clone(), a.orb.clone())) == part {
            open.insert((a.tenant.clone(), a.rule_id.clone(), a.orb.clone()), a);
        }
    }
    Ok((windows, open))
}

async fn spawn_partition(ctx: &Arc<RuleCtx>, part: usize) -> Result<Slot, ActorProcessingErr> {
    let (windows, open) = load_partition(&ctx.store, part)?;
    let queued = Arc::new(AtomicUsize::new(0));
    let args = PartitionArgs { ctx: ctx.clone(), part, windows, open, queued: queued.clone() };
    let (actor, _) = Actor::spawn(None, RulePartition, args).await?;
    Ok(Slot { actor, queued })
}

impl Alerting {
    /// Loads the rules, starts the partitions (with their windows) and the webhook workers.
    pub async fn start(ctx: RuleCtx) -> Result<Alerting, ActorProcessingErr> {
        for rule in ctx.store.all_rules()? {
            match Compiled::new(rule.clone()) {
                Ok(c) => ctx.book.insert(c),
                Err(e) => tracing::error!(rule = %rule.rule_id, error = %e, "a stored rule does not compile; skipped"),
            }
        }
        let ctx = Arc::new(ctx);
        let mut partitions = Vec::with_capacity(PARTITIONS);
        for part in 0..PARTITIONS {
            partitions.push(tokio::sync::Mutex::new(spawn_partition(&ctx, part).await?));
        }
        Ok(Alerting { ctx, partitions: Arc::new(partitions), stopping: Default::default() })
    }

    /// The variables the rules of `tenant` read, `None` when it has no rules: orb actors
    /// skip the observation entirely then, and copy metrics only when some rule reads them.
    pub fn interest(&self, tenant: &TenantId) -> Option<u16> {
        self.ctx.book.interest(tenant)
    }

    /// A partition's actor and queue; a partition that failed is started again from the store
    /// first (what it had staged but not committed was never acknowledged to anyone).
    async fn slot(&self, part: usize) -> (ActorRef<RuleMsg>, Arc<AtomicUsize>) {
        let mut slot = self.partitions[part].lock().await;
        let dead = matches!(slot.actor.get_status(), ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping);
        if dead && !self.stopping.load(Ordering::Acquire) {
            match spawn_partition(&self.ctx, part).await {
                Ok(fresh) => {
                    tracing::warn!(part, "rule partition failed; restarted from the store");
                    self.ctx.metrics.rule_partition_restarts.inc();
                    *slot = fresh;
                }
                Err(e) => tracing::error!(part, error = %e, "restarting a rule partition failed"),
            }
        }
        (slot.actor.clone(), slot.queued.clone())
    }

    /// Hands an observation to the orb's partition; waits while the partition is full, so
    /// orb actors slow down instead of memory growing.
    pub async fn observe(&self, key: &OrbKey, row: Row, ts: u64, metrics: MetricSet) {
        let part = partition_of(key);
        let (actor, queued) = loop {
            let (actor, queued) = self.slot(part).await;
            if queued.load(Ordering::Acquire) < PARTITION_QUEUE_MAX {
                break (actor, queued);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        queued.fetch_add(1, Ordering::AcqRel);
        if actor.cast(RuleMsg::Observe { key: key.clone(), row: Box::new(row), ts, metrics }).is_err() {
            queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Acknowledges or resolves an alert through the partition that owns it.
    pub async fn alert_op(&self, alert: Alert, op: AlertOp) -> Result<Alert, ApiError> {
        let key = OrbKey::new(alert.tenant.clone(), alert.orb.clone());
        let (actor, _) = self.slot(partition_of(&key)).await;
        match actor
            .call(|reply| RuleMsg::Alert { alert: Box::new(alert), op, reply }, Some(Duration::from_secs(10)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(ApiError::new(ErrorCode::Unavailable, "the rule engine did not answer; retry")),
        }
    }

    pub async fn rule_removed(&self, tenant: &TenantId, rule_id: &str) {
        for part in 0..PARTITIONS {
            let (actor, _) = self.slot(part).await;
            let _ = actor.cast(RuleMsg::RuleRemoved { tenant: tenant.clone(), rule_id: rule_id.to_string() });
        }
    }

    /// Fault injection for supervision tests: every partition panics on its next message.
    pub async fn inject_panic(&self) {
        for part in 0..PARTITIONS {
            let (actor, _) = self.slot(part).await;
            let _ = actor.cast(RuleMsg::InjectPanic);
        }
    }

    /// Stops the partitions (each commits what it has staged) and the webhook workers.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for part in 0..PARTITIONS {
            let actor = self.partitions[part].lock().await.actor.clone();
            let _ = actor.stop_and_wait(Some("fleet stopping".into()), Some(Duration::from_secs(10))).await;
        }
        self.ctx.webhooks.stop();
    }
}

type WinKey = (TenantId, String, OrbId);

pub struct RulePartition;

pub struct PartitionArgs {
    ctx: Arc<RuleCtx>,
    part: usize,
    windows: HashMap<WinKey, Window>,
    open: HashMap<WinKey, Alert>,
    queued: Arc<AtomicUsize>,
}

pub struct PartitionState {
    ctx: Arc<RuleCtx>,
    part: usize,
    /// Non-idle windows only.
    windows: HashMap<WinKey, Window>,
    queued: Arc<AtomicUsize>,
    /// Recent values of orbs whose tenant has rules reading `rate` or `zscore` (not
    /// checkpointed: rates and warm-ups start over after a restart).
    history: HashMap<OrbKey, Recent>,
    /// CEL's functions and ours, built once; each observation is a child scope of it.
    root: Conditions,
    /// The open (or acknowledged) alert of each (rule, orb): the partition is their only
    /// writer, so memory is the truth and the store its durable copy.
    open: HashMap<WinKey, Alert>,
    /// Writes staged for the next flush, with the events' webhook workers to wake after it.
    pending: Batch,
    pending_ops: usize,
    pending_since: u64,
    /// The events in `pending`, settled when it commits.
    pending_staged: crate::events::Staged,
    pending_events: Vec<&'static str>,
}

/// One decision to carry out.
struct Fired<'a> {
    rule: &'a Rule,
    orb: &'a OrbId,
    transition: Transition,
    values: String,
}

impl Actor for RulePartition {
    type Msg = RuleMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RuleMsg>,
        a: PartitionArgs,
    ) -> Result<PartitionState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(TICK_MS), || RuleMsg::Tick);
        Ok(PartitionState {
            pending_staged: a.ctx.events.stage(),
            ctx: a.ctx,
            part: a.part,
            windows: a.windows,
            queued: a.queued,
            history: HashMap::new(),
            root: Conditions::default(),
            open: a.open,
            pending: Batch::new(),
            pending_ops: 0,
            pending_since: 0,
            pending_events: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RuleMsg>,
        msg: RuleMsg,
        st: &mut PartitionState,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.ctx.clock.now_ms();
        match msg {
            RuleMsg::Observe { key, row, ts, metrics } => {
                st.queued.fetch_sub(1, Ordering::AcqRel);
                observe(st, &key, &row, ts, &metrics, now).await?;
            }
            RuleMsg::Tick => tick(st, now).await?,
            RuleMsg::Alert { alert, op, reply } => {
                let _ = reply.send(operator(st, *alert, op, now).await);
            }
            RuleMsg::RuleRemoved { tenant, rule_id } => {
                st.windows.retain(|(t, r, _), _| !(t == &tenant && r == &rule_id));
                st.open.retain(|(t, r, _), _| !(t == &tenant && r == &rule_id));
            }
            RuleMsg::InjectPanic => panic!("fault injection: rule partition {} panics on request", st.part),
        }
        if st.pending_ops > 0
            && (st.queued.load(Ordering::Acquire) == 0
                || st.pending_ops >= FLUSH_OPS
                || now.saturating_sub(st.pending_since) >= FLUSH_AGE_MS)
        {
            flush(st).await?;
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<RuleMsg>, st: &mut PartitionState) -> Result<(), ActorProcessingErr> {
        flush(st).await
    }
}

/// The environment rule conditions run in: the functions, built once; each observation binds
/// its values in a child scope. (Public so `benches/rule_eval.rs` measures this very path.)
pub struct Conditions(Context<'static>);

impl Default for Conditions {
    fn default() -> Self {
        Conditions(root_context())
    }
}

impl Conditions {
    /// The scope of one observation, holding only the variables some rule reads (`vars`, the
    /// union of [`Compiled::vars`] of the rules evaluated).
    pub fn scope(&self, vars: u16, row: &Row, metrics: &MetricSet) -> Context<'_> {
        let mut c = self.0.new_inner_scope();
        bind(&mut c, vars, row, metrics);
        c
    }
}

/// The functions every condition may call.
fn root_context() -> Context<'static> {
    let mut c = Context::default();
    c.add_function("in_polygon", |lat: f64, lon: f64, poly: Arc<Vec<Value>>| -> bool {
        let flat: Vec<f64> = poly
            .iter()
            .filter_map(|v| match v {
                Value::Float(f) => Some(*f),
                Value::Int(i) => Some(*i as f64),
                Value::UInt(u) => Some(*u as f64),
                _ => None,
            })
            .collect();
        flat.len() == poly.len() && in_polygon(lat, lon, &flat)
    });
    c.add_function("distance_km", |a: f64, b: f64, x: f64, y: f64| -> f64 {
        crate::model::query::distance_m(a, b, x, y) / 1000.0
    });
    c
}

/// Adds the variables of one observation that some rule reads (`vars`) to a child scope.
fn bind(c: &mut Context<'_>, vars: u16, row: &Row, metrics: &MetricSet) {
    let want = |name: &str| vars & var_bit(name) != 0;
    for (name, v) in [("battery", row.battery), ("speed", row.speed), ("lat", row.lat), ("lon", row.lon)] {
        if let Some(v) = v
            && want(name)
        {
            c.add_variable_from_value(name, v);
        }
    }
    if let Some(m) = &row.mode
        && want("mode")
    {
        c.add_variable_from_value("mode", m.to_string());
    }
    if want("orb_id") {
        c.add_variable_from_value("orb_id", row.orb.as_str().to_string());
    }
    if want("status") {
        c.add_variable_from_value("status", row.status.as_str().to_string());
    }
    if want("online") {
        c.add_variable_from_value("online", row.online);
    }
    if want("metrics") {
        let m: HashMap<String, f64> = metrics.iter().map(|(k, v)| (k.to_string(), v)).collect();
        c.add_variable_from_value("metrics", m);
    }
    let pairs = |p: &[(Box<str>, Box<str>)]| -> HashMap<String, String> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    if want("attr") {
        c.add_variable_from_value("attr", pairs(&row.attrs));
    }
    if want("version") {
        c.add_variable_from_value("version", pairs(&row.versions));
    }
}

/// A condition that does not evaluate to `true` (including one naming a value the orb has not
/// reported) does not hold.
pub fn holds(p: &Program, c: &Context<'_>) -> bool {
    matches!(p.execute(c), Ok(Value::Bool(true)))
}

/// The orb's values an alert keeps; `ts` is the device time of the point that decided it.
fn values_json(row: &Row, ts: Option<u64>, metrics: &MetricSet) -> String {
    let m: serde_json::Map<String, serde_json::Value> =
        metrics.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    serde_json::json!({
        "battery": row.battery, "speed": row.speed, "lat": row.lat, "lon": row.lon,
        "mode": row.mode.as_deref(), "online": row.online, "last_seen_ms": row.last_seen_ms, "ts": ts, "metrics": m,
    })
    .to_string()
}

async fn observe(
    st: &mut PartitionState,
    key: &OrbKey,
    row: &Row,
    ts: u64,
    metrics: &MetricSet,
    now: u64,
) -> Result<(), ActorProcessingErr> {
    let Some(rules) = st.ctx.book.of(&key.tenant) else { return Ok(()) };
    let vars = vars_of(&rules);
    let mut cel = st.root.scope(vars, row, metrics);
    if rules.iter().any(|c| c.needs_history) {
        let mut fields: Vec<(&str, f64)> = metrics.iter().collect();
        fields.extend(row.battery.map(|v| ("battery", v)));
        fields.extend(row.speed.map(|v| ("speed", v)));
        if st.history.len() < HISTORY_ORBS_MAX || st.history.contains_key(key) {
            let (rate, z) = st.history.entry(key.clone()).or_default().step(now, &fields);
            cel.add_variable_from_value("rate", rate);
            cel.add_variable_from_value("zscore", z);
        }
    }
    let mut decisions = Vec::new();
    let mut windows = Vec::new();
    for c in rules.iter() {
        if !row.matches(&c.scope) {
            continue;
        }
        let wkey = (key.tenant.clone(), c.rule.rule_id.clone(), key.orb.clone());
        let mut w = st.windows.get(&wkey).cloned().unwrap_or_default();
        let (t, changed) = match &c.condition {
            // Absence rules: any telemetry ends the absence.
            None if w.firing => (Transition::Clear, true),
            None => (Transition::None, false),
            Some(cond) => {
                let h = holds(cond, &cel);
                let clear = c.clear.as_ref().map(|p| holds(p, &cel));
                match c.rule.repeat_count {
                    Some(n) => w.observe_repeat(h, clear, n, c.rule.repeat_window_s * 1000, now),
                    None => w.observe(h, clear.unwrap_or(!h), c.rule.for_s * 1000, now),
                }
            }
        };
        if t == Transition::Clear && c.condition.is_none() {
            w = Window::default();
        }
        if changed {
            windows.push((wkey, w));
        }
        if t != Transition::None {
            decisions.push((c.clone(), t));
        }
    }
    if windows.is_empty() && decisions.is_empty() {
        return Ok(());
    }
    let values = values_json(row, Some(ts), metrics);
    let fired: Vec<Fired<'_>> = decisions
        .iter()
        .map(|(c, t)| Fired { rule: &c.rule, orb: &key.orb, transition: *t, values: values.clone() })
        .collect();
    commit(st, &key.tenant, &fired, windows, now).await
}

/// Stages the alerts, windows and webhook deliveries of some decisions for the next flush
/// (one batch), updating memory at once: later observations see the new state.
async fn commit(
    st: &mut PartitionState,
    tenant: &TenantId,
    fired: &[Fired<'_>],
    windows: Vec<(WinKey, Window)>,
    now: u64,
) -> Result<(), ActorProcessingErr> {
    let before = st.pending.len();
    let mut events = Vec::new();
    for f in fired {
        let wkey = (tenant.clone(), f.rule.rule_id.clone(), f.orb.clone());
        match (f.transition, st.open.get_mut(&wkey)) {
            (Transition::Fire, None) => {
                let alert = Alert {
                    tenant: tenant.clone(),
                    alert_id: format!("{now:012x}{:08x}", fastrand::u32(..)),
                    rule_id: f.rule.rule_id.clone(),
                    rule_name: f.rule.name.clone(),
                    orb: f.orb.clone(),
                    severity: f.rule.severity,
                    state: AlertState::Open,
                    opened_ms: now,
                    updated_ms: now,
                    resolved_ms: None,
                    resolved_by: None,
                    repeats: 0,
                    assignee: None,
                    comments: Vec::new(),
                    values: f.values.clone(),
                };
                Store::add_alert(&mut st.pending, &alert);
                Store::set_open_alert(&mut st.pending, &alert, true);
                st.open.insert(wkey, alert.clone());
                events.push(("orb.alert.triggered", alert));
            }
            // Fired again while the previous alert is still open: it counts as a repeat.
            (Transition::Fire | Transition::Repeat, Some(alert)) => {
                alert.repeats += 1;
                alert.updated_ms = now;
                Store::add_alert(&mut st.pending, alert);
            }
            (Transition::Clear, Some(_)) => {
                let mut alert = st.open.remove(&wkey).expect("just found");
                if alert.resolve("rule", now).is_ok() {
                    Store::add_alert(&mut st.pending, &alert);
                    events.push(("orb.alert.resolved", alert.clone()));
                }
                Store::set_open_alert(&mut st.pending, &alert, false);
            }
            _ => {}
        }
    }
    for ((t, rule_id, orb), w) in &windows {
        Store::add_window(
            &mut st.pending,
            &WindowRecord { tenant: t.clone(), rule_id: rule_id.clone(), orb: orb.clone(), window: w.clone() },
        );
    }
    for (kind, alert) in &events {
        let key = OrbKey::new(tenant.clone(), alert.orb.clone());
        st.ctx.events.append(&mut st.pending, &mut st.pending_staged, &key, kind, alert.to_json(), now)?;
    }
    st.pending_events.extend(events.iter().map(|(k, _)| *k));
    for (k, w) in windows {
        if w == Window::default() {
            st.windows.remove(&k);
        } else {
            st.windows.insert(k, w);
        }
    }
    let added = st.pending.len() - before;
    if added > 0 && st.pending_ops == 0 {
        st.pending_since = now;
    }
    st.pending_ops += added;
    Ok(())
}

/// Commits what is staged (one fsync) and wakes the webhook workers of its events. A failed
/// commit fails the partition: its memory ran ahead of the store.
async fn flush(st: &mut PartitionState) -> Result<(), ActorProcessingErr> {
    if st.pending_ops == 0 {
        return Ok(());
    }
    let batch = std::mem::take(&mut st.pending);
    let staged = std::mem::replace(&mut st.pending_staged, st.ctx.events.stage());
    st.pending_ops = 0;
    staged.commit(batch).await?;
    for kind in st.pending_events.drain(..) {
        st.ctx.metrics.alert_event(kind);
    }
    Ok(())
}

async fn tick(st: &mut PartitionState, now: u64) -> Result<(), ActorProcessingErr> {
    st.history.retain(|_, r| now.saturating_sub(r.at_ms) < HISTORY_IDLE_MS);
    for (tenant, rules) in st.ctx.book.tenants() {
        let mut due: Vec<(Arc<Compiled>, OrbId, String)> = Vec::new();
        for c in rules.iter() {
            match c.rule.absent_s {
                Some(absent_s) => {
                    let reference = c.rule.created_ms.max(st.ctx.started_ms);
                    st.ctx.index.for_each_in_partition(&tenant, &c.scope, st.part, PARTITIONS, |row| {
                        let last = row.last_seen_ms.unwrap_or(reference);
                        let wkey = (tenant.clone(), c.rule.rule_id.clone(), row.orb.clone());
                        let firing = st.windows.get(&wkey).is_some_and(|w| w.firing);
                        if !firing && now.saturating_sub(last.max(reference)) >= absent_s * 1000 {
                            let values = serde_json::json!({"last_seen_ms": row.last_seen_ms, "online": row.online});
                            due.push((c.clone(), row.orb.clone(), values.to_string()));
                        }
                    });
                }
                None if c.rule.for_s > 0 => {
                    for ((t, rule_id, orb), w) in &st.windows {
                        if t == &tenant
                            && rule_id == &c.rule.rule_id
                            && w.clone().tick(c.rule.for_s * 1000, now) == Transition::Fire
                        {
                            let row = st.ctx.index.get(&OrbKey::new(t.clone(), orb.clone()));
                            let values =
                                row.map_or_else(|| "{}".to_string(), |r| values_json(&r, None, &MetricSet::default()));
                            due.push((c.clone(), orb.clone(), values));
                        }
                    }
                }
                None => {}
            }
        }
        if due.is_empty() {
            continue;
        }
        let windows: Vec<(WinKey, Window)> = due
            .iter()
            .map(|(c, orb, _)| ((tenant.clone(), c.rule.rule_id.clone(), orb.clone()), Window::fired()))
            .collect();
        let fired: Vec<Fired<'_>> = due
            .iter()
            .map(|(c, orb, values)| Fired { rule: &c.rule, orb, transition: Transition::Fire, values: values.clone() })
            .collect();
        commit(st, &tenant, &fired, windows, now).await?;
    }
    Ok(())
}

async fn operator(st: &mut PartitionState, alert: Alert, op: AlertOp, now: u64) -> Result<Alert, ApiError> {
    // What the rules staged reaches the store first, so the event order holds.
    flush(st).await.map_err(ApiError::internal)?;
    let wkey = (alert.tenant.clone(), alert.rule_id.clone(), alert.orb.clone());
    // The open alert in memory is the truth; closed ones are read from the store.
    let mut current = match st.open.get(&wkey) {
        Some(a) if a.alert_id == alert.alert_id => a.clone(),
        _ => st
            .ctx
            .store
            .alert(&alert.tenant, &alert.alert_id)
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no alert {}", alert.alert_id)))?,
    };
    let mut batch = Batch::new();
    let refused = |m| ApiError::new(ErrorCode::InvalidArgument, m);
    let event = match &op {
        AlertOp::Acknowledge => {
            current.acknowledge(now).map_err(refused)?;
            "orb.alert.acknowledged"
        }
        AlertOp::Assign(who) => {
            current.assign(who.clone(), now).map_err(refused)?;
            "orb.alert.assigned"
        }
        AlertOp::Comment { author, text } => {
            current.comment(author, text, now).map_err(refused)?;
            "orb.alert.commented"
        }
        AlertOp::Resolve => {
            current.resolve("operator", now).map_err(refused)?;
            Store::set_open_alert(&mut batch, &current, false);
            // The window starts over: the rule fires again if its condition holds again.
            if st.windows.contains_key(&wkey) {
                let (tenant, rule_id, orb) = wkey.clone();
                Store::add_window(&mut batch, &WindowRecord { tenant, rule_id, orb, window: Window::default() });
            }
            "orb.alert.resolved"
        }
    };
    Store::add_alert(&mut batch, &current);
    let mut staged = st.ctx.events.stage();
    let events = &st.ctx.events;
    let key = OrbKey::new(current.tenant.clone(), current.orb.clone());
    events.append(&mut batch, &mut staged, &key, event, current.to_json(), now).map_err(ApiError::internal)?;
    staged.commit(batch).await.map_err(ApiError::internal)?;
    // Memory follows the store only once the change is durable.
    match op {
        AlertOp::Acknowledge | AlertOp::Assign(_) | AlertOp::Comment { .. } => {
            if let Some(a) = st.open.get_mut(&wkey).filter(|a| a.alert_id == current.alert_id) {
                *a = current.clone();
            }
        }
        AlertOp::Resolve => {
            st.open.remove(&wkey);
            st.windows.remove(&wkey);
        }
    }
    st.ctx.metrics.alert_event(event);
    Ok(current)
}
