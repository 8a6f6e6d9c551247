//! Cold-tier operations: spill now, checkpoints, playback (trajectories and fleet time travel)
//! and batch export jobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::{Access, Api, Principal, given, internal, invalid};
use crate::error::{ApiError, ErrorCode};
use crate::model::downsample;
use crate::model::{OrbId, OrbKey, TenantId};
use crate::storage::StoredPoint;
use crate::storage::cold::export::{
    EXPORT_ORBS_MAX, EXPORTS_RUNNING_MAX, ExportFormat, ExportJob, ExportStatus, validate_destination,
};
use crate::storage::cold::{CheckpointInfo, ColdError, SpillOptions, SpillReport, TenantRetention};

/// Points a trajectory query reads at most (before downsampling): 24 h at 1 Hz is 86,400.
pub const TRAJECTORY_SCAN_MAX: usize = 1_000_000;
/// Points a trajectory returns at most.
pub const TRAJECTORY_POINTS_MAX: usize = 10_000;
/// Orbs per fleet time-travel page.
pub const FLEET_AT_PAGE_MAX: usize = 1_000;
/// Longest look-back of a fleet time-travel query.
pub const FLEET_AT_LOOKBACK_MAX_MS: u64 = 7 * 24 * 3_600_000;

pub(crate) fn cold_error(e: ColdError) -> ApiError {
    match e {
        ColdError::Invalid(m) => ApiError::new(ErrorCode::InvalidArgument, m),
        ColdError::Object(e) => ApiError::new(ErrorCode::Unavailable, format!("object store: {e}")),
        e => internal(e),
    }
}

/// Whether a caller may run a node-wide storage operation (every tenant's data): the
/// bootstrap token, or anyone in `--dev`.
fn node_wide(p: &Principal) -> Result<(), ApiError> {
    match p {
        Principal::Root | Principal::Dev => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "node-wide storage operations need the bootstrap admin token",
        )),
    }
}

/// A spill request.
#[derive(Clone, Debug, Default)]
pub struct SpillParams {
    /// One tenant (`None`: the caller's, or every tenant for the bootstrap token).
    pub tenant_id: Option<String>,
    /// Overrides `storage.hot_window` for this spill (a duration).
    pub hot_window: Option<String>,
}

/// One point of a trajectory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrajectoryPoint {
    pub ts: u64,
    pub lat: f64,
    pub lon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// A downsampled trajectory.
#[derive(Clone, Debug, Serialize)]
pub struct Trajectory {
    pub orb_id: OrbId,
    pub from: u64,
    pub to: u64,
    /// Points with a position in the range, before downsampling.
    pub total_points: u64,
    pub method: &'static str,
    pub field: String,
    pub points: Vec<TrajectoryPoint>,
}

/// Trajectory parameters as transports receive them.
#[derive(Clone, Debug, Default)]
pub struct TrajectoryParams {
    pub from: u64,
    pub to: u64,
    pub max_points: usize,
    /// `lttb` (default) or `minmax`.
    pub method: Option<String>,
    /// The value kept per point and downsampled on: `speed` (default), `battery` or a metric.
    pub field: Option<String>,
}

/// One orb's last known point at a time T.
#[derive(Clone, Debug, Serialize)]
pub struct OrbAt {
    pub orb_id: OrbId,
    /// Absent when the orb sent nothing within the look-back.
    pub point: Option<serde_json::Value>,
    /// `hot` or `cold`: where the point was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<&'static str>,
}

/// A page of fleet time travel.
#[derive(Clone, Debug, Serialize)]
pub struct FleetAt {
    pub at: u64,
    pub orbs: Vec<OrbAt>,
    pub next_page_token: Option<String>,
}

/// Export parameters as transports receive them.
#[derive(Clone, Debug, Default)]
pub struct ExportParams {
    pub tenant_id: Option<String>,
    pub from: u64,
    pub to: u64,
    pub query: String,
    pub format: String,
    pub destination: String,
}

fn value_of(p: &StoredPoint, field: &str) -> Option<f64> {
    let t = &p.point;
    match field {
        "speed" => t.speed,
        "battery" => t.battery,
        name => t.metrics.get(name),
    }
}

impl Api {
    fn spill_options(&self, hot_window: Option<&str>) -> Result<SpillOptions, ApiError> {
        let mut o = self.storage.spill.clone();
        if let Some(w) = given(hot_window) {
            o.hot_window_ms = crate::config::parse_duration(w).map_err(|e| invalid(format!("hot_window: {e}")))?;
            o.tenant_windows = false;
        }
        Ok(o)
    }

    /// Spills eligible hot telemetry now: the bootstrap token may spill every tenant, a tenant
    /// admin their own.
    pub async fn spill(&self, p: &Principal, params: &SpillParams) -> Result<SpillReport, ApiError> {
        let opts = self.spill_options(params.hot_window.as_deref())?;
        let only = match (p, given(params.tenant_id.as_deref())) {
            (Principal::Root, None) => None,
            _ => Some(self.tenant_for(p, params.tenant_id.as_deref(), Access::Admin)?),
        };
        self.storage.cold.spill(self.now_ms(), &opts, only.as_ref()).await.map_err(cold_error)
    }

    /// Writes a checkpoint now (node-wide: bootstrap token, or `--dev`).
    pub async fn checkpoint(&self, p: &Principal) -> Result<CheckpointInfo, ApiError> {
        node_wide(p)?;
        self.storage.cold.checkpoint(self.now_ms()).await.map_err(cold_error)
    }

    /// Telemetry history across both tiers (see `orbs::history` for paging).
    pub async fn history_page(
        &self,
        key: &OrbKey,
        from: u64,
        to: u64,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<(Vec<((u64, u64), StoredPoint)>, bool), ApiError> {
        self.storage.cold.history_page(key, from, to, after, limit).await.map_err(cold_error)
    }

    /// One orb's positions over `[from, to]`, downsampled server-side.
    pub async fn trajectory(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        q: &TrajectoryParams,
    ) -> Result<Trajectory, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Read)?;
        if q.from > q.to {
            return Err(invalid("from is after to"));
        }
        let max_points = if q.max_points == 0 { 1_000 } else { q.max_points };
        if max_points > TRAJECTORY_POINTS_MAX {
            return Err(invalid(format!("max_points must be 1..{TRAJECTORY_POINTS_MAX}")));
        }
        let method = match given(q.method.as_deref()) {
            None | Some("lttb") => "lttb",
            Some("minmax") => "minmax",
            Some(m) => return Err(invalid(format!("method {m:?}: lttb or minmax"))),
        };
        let field = given(q.field.as_deref()).unwrap_or("speed").to_string();
        if field.len() > crate::limits::TELEMETRY_METRIC_NAME_LEN_MAX {
            return Err(invalid("field is longer than a metric name may be"));
        }
        self.ensure_orb(&key)?;
        let all = self.storage.cold.range(&key, q.from, q.to, TRAJECTORY_SCAN_MAX).await.map_err(cold_error)?;
        let located: Vec<(u64, f64, f64, Option<f64>)> = all
            .iter()
            .filter_map(|(_, sp)| sp.point.position.map(|(la, lo)| (sp.point.ts, la, lo, value_of(sp, &field))))
            .collect();
        let xy: Vec<(f64, f64)> = located.iter().map(|(ts, _, _, v)| (*ts as f64, v.unwrap_or(0.0))).collect();
        let idx = match method {
            "minmax" => downsample::min_max(&xy, max_points),
            _ => downsample::lttb(&xy, max_points),
        };
        let points = idx
            .into_iter()
            .map(|i| {
                let (ts, lat, lon, value) = located[i];
                TrajectoryPoint { ts, lat, lon, value }
            })
            .collect();
        Ok(Trajectory {
            orb_id: key.orb,
            from: q.from,
            to: q.to,
            total_points: located.len() as u64,
            method,
            field,
            points,
        })
    }

    /// Every matching orb's newest point at or before `at` (within `lookback_ms`), from both
    /// tiers, a page of orbs (in id order) at a time.
    #[allow(clippy::too_many_arguments)]
    pub async fn fleet_at(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        at: u64,
        query: &str,
        lookback_ms: u64,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<FleetAt, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let page_size = if page_size == 0 { 100 } else { page_size };
        if page_size > FLEET_AT_PAGE_MAX {
            return Err(invalid(format!("page_size must be 1..{FLEET_AT_PAGE_MAX}")));
        }
        let lookback_ms = if lookback_ms == 0 { 24 * 3_600_000 } else { lookback_ms };
        if lookback_ms > FLEET_AT_LOOKBACK_MAX_MS {
            return Err(invalid("lookback must be at most 7 days"));
        }
        let mut orbs = self.matching_orbs(&tenant, query, EXPORT_ORBS_MAX)?;
        if let Some(after) = given(page_token) {
            orbs.retain(|o| o.as_str() > after);
        }
        let more = orbs.len() > page_size;
        orbs.truncate(page_size);
        let from = at.saturating_sub(lookback_ms);
        let mut found: BTreeMap<OrbId, (StoredPoint, &'static str)> = BTreeMap::new();
        let mut missing = Vec::new();
        for orb in &orbs {
            let key = OrbKey::new(tenant.clone(), orb.clone());
            match self.store().latest_point_between(&key, from, at).map_err(internal)? {
                Some(sp) => {
                    found.insert(orb.clone(), (sp, "hot"));
                }
                None => missing.push(orb.clone()),
            }
        }
        // The hot tier holds the newest points, so only orbs absent there are looked up cold.
        for (orb, sp) in self.storage.cold.latest_at(&tenant, &missing, at, lookback_ms).await.map_err(cold_error)? {
            found.insert(orb, (sp, "cold"));
        }
        let next_page_token = if more { orbs.last().map(|o| o.as_str().to_string()) } else { None };
        let orbs = orbs
            .into_iter()
            .map(|orb| match found.remove(&orb) {
                Some((sp, tier)) => {
                    let mut v = sp.point.to_json();
                    v["received_ms"] = sp.received_ms.into();
                    OrbAt { orb_id: orb, point: Some(v), tier: Some(tier) }
                }
                None => OrbAt { orb_id: orb, point: None, tier: None },
            })
            .collect();
        Ok(FleetAt { at, orbs, next_page_token })
    }

    /// Ids of a tenant's orbs matching a fleet query, sorted, refusing more than `max`.
    pub fn matching_orbs(&self, tenant: &TenantId, query: &str, max: usize) -> Result<Vec<OrbId>, ApiError> {
        use crate::search::SearchRequest;
        let expr = crate::model::query::parse(query).map_err(|e| invalid(e.to_string()))?;
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let req = SearchRequest {
                query: expr.clone(),
                sort: None,
                page_size: super::orbs::ORBS_PAGE_MAX,
                page_token: token,
                aggregate: None,
            };
            let r = self.fleet().ctx().index.search(tenant, &req)?;
            out.extend(r.rows.into_iter().map(|row| row.orb));
            if out.len() > max {
                return Err(invalid(format!("the query matches more than {max} orbs")));
            }
            match r.next_page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Starts an export job.
    pub async fn create_export(self: &Arc<Self>, p: &Principal, q: &ExportParams) -> Result<ExportJob, ApiError> {
        let tenant = self.tenant_for(p, q.tenant_id.as_deref(), Access::Operate)?;
        if q.from > q.to {
            return Err(invalid("from is after to"));
        }
        let format = ExportFormat::parse(&q.format)
            .ok_or_else(|| invalid(format!("format {:?}: parquet or jsonl", q.format)))?;
        validate_destination(&q.destination).map_err(|e| invalid(format!("destination: {e}")))?;
        let targets = self.matching_orbs(&tenant, &q.query, EXPORT_ORBS_MAX)?;
        let now = self.now_ms();
        let job = ExportJob {
            id: format!("exp-{:016x}", fastrand::u64(..)),
            tenant,
            from: q.from,
            to: q.to,
            query: q.query.clone(),
            format,
            destination: q.destination.clone(),
            status: ExportStatus::Running,
            orbs_total: targets.len() as u64,
            next_orb: 0,
            next_after: None,
            files: 0,
            rows: 0,
            file_rows: self.storage.export_file_rows,
            created_ms: now,
            updated_ms: now,
            error: None,
            created_by: p.name(),
        };
        let store = self.store().clone();
        let (j, t) = (job.clone(), targets);
        tokio::task::spawn_blocking(move || store.create_export(&j, &t)).await.map_err(internal)?.map_err(internal)?;
        self.spawn_export(job.clone());
        Ok(job)
    }

    pub fn get_export(&self, p: &Principal, tenant_id: Option<&str>, id: &str) -> Result<ExportJob, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        self.store()
            .export(&tenant, id)
            .map_err(internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("export {id} not found")))
    }

    pub fn list_exports(&self, p: &Principal, tenant_id: Option<&str>) -> Result<Vec<ExportJob>, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        self.store().exports(Some(&tenant)).map_err(internal)
    }

    /// Cancels a running job (files written so far stay).
    pub fn cancel_export(&self, p: &Principal, tenant_id: Option<&str>, id: &str) -> Result<ExportJob, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        let now = self.now_ms();
        let mut was = None;
        let job = self
            .store()
            .update_export(&tenant, id, |j| {
                was = Some(j.status);
                if j.status != ExportStatus::Running {
                    return false;
                }
                j.status = ExportStatus::Canceled;
                j.updated_ms = now;
                true
            })
            .map_err(internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("export {id} not found")))?;
        match was {
            Some(ExportStatus::Running) => Ok(job),
            _ => Err(ApiError::new(ErrorCode::FailedPrecondition, format!("export {id} is {}", job.status.as_str()))),
        }
    }

    /// Resumes every running job (at start-up).
    pub fn resume_exports(self: &Arc<Self>) -> Result<usize, ApiError> {
        let running: Vec<_> = self
            .store()
            .exports(None)
            .map_err(internal)?
            .into_iter()
            .filter(|j| j.status == ExportStatus::Running)
            .collect();
        let n = running.len();
        for job in running {
            self.spawn_export(job);
        }
        Ok(n)
    }

    fn spawn_export(self: &Arc<Self>, job: ExportJob) {
        let api = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = api.storage.export_slots.clone().acquire_owned().await else { return };
            let id = job.id.clone();
            let clock = api.ingest.clock.clone();
            let mut closing = api.closing.clone();
            let run = api.storage.cold.run_export(job.clone(), move || clock.now_ms());
            let outcome = tokio::select! {
                r = run => r,
                _ = closing.wait_for(|c| *c) => return,
            };
            match outcome {
                Ok(done) => {
                    tracing::info!(export = %id, rows = done.rows, files = done.files, status = done.status.as_str(), "export finished")
                }
                Err(e) => {
                    tracing::warn!(export = %id, error = %e, "export failed");
                    let now = api.now_ms();
                    let _ = api.store().update_export(&job.tenant, &id, |j| {
                        let run = j.status == ExportStatus::Running;
                        if run {
                            j.status = ExportStatus::Failed;
                            j.error = Some(e.to_string());
                            j.updated_ms = now;
                        }
                        run
                    });
                }
            }
        });
    }
}

/// A tenant's effective retention and whether each value is its own or the node default.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetentionView {
    pub tenant_id: TenantId,
    pub hot_window_ms: u64,
    pub hot_window_is_default: bool,
    /// 0: kept forever.
    pub cold_retention_ms: u64,
    pub cold_retention_is_default: bool,
}

/// Longest hot window a tenant may set.
pub const HOT_WINDOW_MAX_MS: u64 = 30 * 24 * 3_600_000;

impl Api {
    fn retention_view(&self, tenant: TenantId, own: Option<TenantRetention>) -> RetentionView {
        let own = own.unwrap_or_default();
        RetentionView {
            tenant_id: tenant,
            hot_window_ms: own.hot_window_ms.unwrap_or(self.storage.spill.hot_window_ms),
            hot_window_is_default: own.hot_window_ms.is_none(),
            cold_retention_ms: own.cold_retention_ms.unwrap_or(self.storage.cold_retention_ms),
            cold_retention_is_default: own.cold_retention_ms.is_none(),
        }
    }

    pub fn get_retention(&self, p: &Principal, tenant_id: Option<&str>) -> Result<RetentionView, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let own = self.store().retention(&tenant).map_err(internal)?;
        Ok(self.retention_view(tenant, own))
    }

    /// Sets (or with `None`, returns to the node default) a tenant's hot window and cold
    /// retention, given as durations. Tenant admins only.
    pub fn set_retention(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        hot_window: Option<&str>,
        cold_retention: Option<&str>,
    ) -> Result<RetentionView, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Admin)?;
        let parse = |what: &str, v: Option<&str>| {
            v.map(|v| crate::config::parse_duration(v).map_err(|e| invalid(format!("{what}: {e}")))).transpose()
        };
        let hot = parse("hot_window", hot_window)?;
        let cold = parse("cold_retention", cold_retention)?;
        if let Some(h) = hot
            && !(60_000..=HOT_WINDOW_MAX_MS).contains(&h)
        {
            return Err(invalid("hot_window must be 1m..30d"));
        }
        let effective_hot = hot.unwrap_or(self.storage.spill.hot_window_ms);
        if let Some(c) = cold
            && c != 0
            && c < effective_hot
        {
            return Err(invalid("cold_retention must be 0 (forever) or at least the hot window"));
        }
        let r = TenantRetention { hot_window_ms: hot, cold_retention_ms: cold, updated_ms: self.now_ms() };
        self.store().set_retention(&tenant, &r).map_err(internal)?;
        Ok(self.retention_view(tenant, Some(r)))
    }
}

/// The cold tier and its settings, as the API holds them.
pub struct StorageApi {
    pub cold: Arc<crate::storage::cold::Cold>,
    pub spill: SpillOptions,
    /// The node's `storage.cold_retention` (0: forever).
    pub cold_retention_ms: u64,
    /// Rows per exported file (`storage.export_file_rows`).
    pub export_file_rows: u64,
    pub export_slots: Arc<tokio::sync::Semaphore>,
}

impl StorageApi {
    pub fn new(
        cold: Arc<crate::storage::cold::Cold>,
        spill: SpillOptions,
        cold_retention_ms: u64,
        export_file_rows: u64,
    ) -> StorageApi {
        StorageApi {
            cold,
            spill,
            cold_retention_ms,
            export_file_rows,
            export_slots: Arc::new(tokio::sync::Semaphore::new(EXPORTS_RUNNING_MAX)),
        }
    }
}
