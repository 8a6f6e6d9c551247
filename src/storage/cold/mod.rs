//! The cold tier: telemetry older than the hot window, as Parquet in object storage.
//!
//! Layout under the object store's prefix:
//!
//! ```text
//! telemetry/tenant=<t>/date=<yyyy-mm-dd>/hour=<hh>/part-<created_ms>-<rand>.parquet
//! telemetry/tenant=<t>/_manifest/<hour_ms>-part-<created_ms>-<rand>.json   (one per file)
//! checkpoints/<created_ms>.ckpt, checkpoints/LATEST                      (checkpoint.rs)
//! exports/<destination>/part-<n>.parquet|jsonl                           (export.rs)
//! ```
//!
//! A spill moves one batch of points: the Parquet file is written first (an object store
//! `put` is atomic), then its manifest entry and the deletion of exactly the spilled hot keys
//! commit in one fjall batch with fsync. A crash before that commit leaves an unreferenced file
//! (never read; see `orphans`); after it, the points live only in the cold tier. Reads merge
//! both tiers by point key `(ts, suffix)`, hot first, so even a point present in both (a late
//! duplicate resend after a spill) is returned once.

pub mod checkpoint;
pub mod columns;
pub mod export;
mod objects;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::file::statistics::Statistics;
use serde::{Deserialize, Serialize};

pub use checkpoint::CheckpointInfo;
pub use columns::ColdRow;
pub use objects::{ObjectReader, ObjectTarget, S3Settings};

use super::{Error as StoreError, Ks, PointCursor, Store, StoredPoint, decode, encode, keys};
use crate::model::{OrbId, OrbKey, TenantId};

const HOUR_MS: u64 = 3_600_000;

/// Cold-tier errors.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Shape(#[from] columns::ShapeError),
    #[error("object store URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("background task failed: {0}")]
    Task(String),
}

fn task<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, ColdError> {
    r.map_err(|e| ColdError::Task(e.to_string()))
}

/// One spilled file, as the manifest knows it (keyspace `cold`, key `t 0 hour_ms:u64 name`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColdObject {
    /// Path under the store's prefix.
    pub path: String,
    pub tenant: TenantId,
    /// Start of the hour every row's `ts` falls in.
    pub hour_ms: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub rows: u64,
    pub bytes: u64,
    pub orb_min: String,
    pub orb_max: String,
    pub created_ms: u64,
}

impl ColdObject {
    fn key(&self) -> Vec<u8> {
        manifest_key(self.tenant.as_str(), self.hour_ms, &self.path)
    }

    /// The file's stem (`part-<created_ms>-<rand>`), unique per file.
    fn stem(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default().trim_end_matches(".parquet")
    }

    /// Where its manifest mirror lives: `telemetry/tenant=<t>/_manifest/<hour_ms>-<stem>.json`.
    fn mirror_path(&self) -> String {
        format!("telemetry/tenant={}/_manifest/{}-{}.json", self.tenant.as_str(), self.hour_ms, self.stem())
    }
}

fn manifest_key(tenant: &str, hour_ms: u64, path: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(tenant);
    k.extend_from_slice(&hour_ms.to_be_bytes());
    k.extend_from_slice(path.as_bytes());
    k
}

fn hour_prefix(tenant: &str, hour_ms: u64) -> Vec<u8> {
    let mut k = keys::tenant_prefix(tenant);
    k.extend_from_slice(&hour_ms.to_be_bytes());
    k
}

/// What one spill did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpillReport {
    pub objects: u64,
    pub rows: u64,
    /// Parquet bytes written.
    pub bytes: u64,
    /// Keys and values read from the hot tier (their encoded size in the LSM).
    pub hot_bytes: u64,
    pub tenants: u64,
    pub elapsed_ms: u64,
}

/// A tenant's own retention, overriding `storage.hot_window` / `storage.cold_retention`
/// (keyspace `retention`, key `t`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantRetention {
    /// How long telemetry stays in the hot tier.
    pub hot_window_ms: Option<u64>,
    /// How long cold telemetry is kept (0: forever).
    pub cold_retention_ms: Option<u64>,
    pub updated_ms: u64,
}

/// Spill tuning.
#[derive(Clone, Debug)]
pub struct SpillOptions {
    /// Points older than this (device time relative to now) are spilled, unless the tenant has
    /// its own window and `tenant_windows` is set.
    pub hot_window_ms: u64,
    /// Use each tenant's own hot window where it has one (off for an explicit one-off window).
    pub tenant_windows: bool,
    /// Buffered points (estimated decoded bytes) before the biggest hour is written out.
    pub buffer_bytes: usize,
}

/// The cold tier of one node.
pub struct Cold {
    store: Store,
    objects: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    /// One spill (or retention pass) at a time.
    spill_lock: tokio::sync::Mutex<()>,
}

/// Date and hour partition of a device time.
fn partition(hour_ms: u64) -> String {
    let dt =
        time::OffsetDateTime::from_unix_timestamp((hour_ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("date={:04}-{:02}-{:02}/hour={:02}", dt.year(), dt.month() as u8, dt.day(), dt.hour())
}

fn estimate(p: &StoredPoint) -> usize {
    160 + p.point.metrics.iter().map(|(n, _)| n.len() + 40).sum::<usize>()
}

impl Cold {
    /// Opens the tier at `target` (nothing is written until the first spill).
    pub fn open(store: Store, target: &ObjectTarget) -> Result<Cold, ColdError> {
        let (objects, prefix) = target.build()?;
        Ok(Cold { store, objects, prefix, url: target.url(), spill_lock: tokio::sync::Mutex::new(()) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// A path under the prefix.
    pub(crate) fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// Spills the points older than `now - hot_window` of one tenant, or of every tenant.
    pub async fn spill(
        &self,
        now_ms: u64,
        opts: &SpillOptions,
        only: Option<&TenantId>,
    ) -> Result<SpillReport, ColdError> {
        let _one = self.spill_lock.lock().await;
        let started = std::time::Instant::now();
        let mut report = SpillReport::default();
        let result = self.spill_tenants(now_ms, opts, only, &mut report).await;
        if result.is_err() {
            self.store.metrics().spill_failures.inc();
        }
        result?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        if report.rows > 0 {
            tracing::info!(
                rows = report.rows,
                objects = report.objects,
                bytes = report.bytes,
                ms = report.elapsed_ms,
                "spilled telemetry to the cold tier"
            );
        }
        Ok(report)
    }

    async fn spill_tenants(
        &self,
        now_ms: u64,
        opts: &SpillOptions,
        only: Option<&TenantId>,
        report: &mut SpillReport,
    ) -> Result<(), ColdError> {
        let tenants = match only {
            Some(t) => vec![t.clone()],
            None => self.store.tenant_ids()?,
        };
        for tenant in tenants {
            let before = report.rows;
            let window = match opts.tenant_windows {
                true => self.store.retention(&tenant)?.and_then(|r| r.hot_window_ms).unwrap_or(opts.hot_window_ms),
                false => opts.hot_window_ms,
            };
            let cutoff = now_ms.saturating_sub(window);
            self.spill_tenant(&tenant, cutoff, now_ms, opts, report).await?;
            if report.rows > before {
                report.tenants += 1;
            }
        }
        Ok(())
    }

    async fn spill_tenant(
        &self,
        tenant: &TenantId,
        cutoff: u64,
        now_ms: u64,
        opts: &SpillOptions,
        report: &mut SpillReport,
    ) -> Result<(), ColdError> {
        // Orbs are scanned in key order, a chunk at a time, off the async threads; each orb's
        // points below the cutoff land in their hour's buffer, already in (orb, ts) order.
        let mut buffers: BTreeMap<u64, (Vec<ColdRow>, usize)> = BTreeMap::new();
        let mut buffered = 0usize;
        let mut after: Option<String> = None;
        loop {
            let (store, t, a) = (self.store.clone(), tenant.clone(), after.clone());
            let chunk = task(
                tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                    let orbs = store.orb_ids_after(&t, a.as_deref(), 256)?;
                    let (mut rows, mut bytes) = (Vec::new(), 0);
                    for orb in &orbs {
                        let key = OrbKey::new(t.clone(), orb.clone());
                        bytes += store.points_before(&key, cutoff, &mut rows)?;
                    }
                    Ok((orbs, rows, bytes))
                })
                .await,
            )??;
            let (orbs, rows, bytes) = chunk;
            report.hot_bytes += bytes;
            for row in rows {
                let hour = row.point.point.ts / HOUR_MS * HOUR_MS;
                let size = estimate(&row.point);
                let b = buffers.entry(hour).or_default();
                b.0.push(row);
                b.1 += size;
                buffered += size;
            }
            while buffered > opts.buffer_bytes {
                let Some((&hour, _)) = buffers.iter().max_by_key(|(_, (_, bytes))| *bytes) else { break };
                let (rows, bytes) = buffers.remove(&hour).unwrap_or_default();
                buffered -= bytes;
                self.write_object(tenant, hour, rows, now_ms, report).await?;
            }
            match orbs.last() {
                Some(last) if orbs.len() == 256 => after = Some(last.as_str().to_string()),
                _ => break,
            }
        }
        for (hour, (rows, _)) in buffers {
            self.write_object(tenant, hour, rows, now_ms, report).await?;
        }
        Ok(())
    }

    /// Writes one file of one hour, then commits its manifest entry and the hot deletions.
    async fn write_object(
        &self,
        tenant: &TenantId,
        hour_ms: u64,
        mut rows: Vec<ColdRow>,
        now_ms: u64,
        report: &mut SpillReport,
    ) -> Result<(), ColdError> {
        if rows.is_empty() {
            return Ok(());
        }
        rows.sort_by(|a, b| a.orb.as_str().cmp(b.orb.as_str()).then(a.cursor().cmp(&b.cursor())));
        let rel = format!(
            "telemetry/tenant={}/{}/part-{now_ms}-{:08x}.parquet",
            tenant.as_str(),
            partition(hour_ms),
            fastrand::u32(..)
        );
        let (min_ts, max_ts) =
            rows.iter().fold((u64::MAX, 0), |(lo, hi), r| (lo.min(r.point.point.ts), hi.max(r.point.point.ts)));
        let (orb_min, orb_max) = (
            rows.first().map(|r| r.orb.as_str().to_string()).unwrap_or_default(),
            rows.last().map(|r| r.orb.as_str().to_string()).unwrap_or_default(),
        );
        let (bytes, rows) =
            task(tokio::task::spawn_blocking(move || columns::encode(&rows).map(|b| (b, rows))).await)??;
        let object = ColdObject {
            path: rel.clone(),
            tenant: tenant.clone(),
            hour_ms,
            min_ts,
            max_ts,
            rows: rows.len() as u64,
            bytes: bytes.len() as u64,
            orb_min,
            orb_max,
            created_ms: now_ms,
        };
        let size = bytes.len() as u64;
        self.objects.put(&self.path(&rel), bytes.into()).await?;
        // The manifest mirror lets a node that lost its disk find the files again.
        let mirror = object.mirror_path();
        let json = serde_json::to_vec(&object).map_err(|e| ColdError::Invalid(e.to_string()))?;
        self.objects.put(&self.path(&mirror), json.into()).await?;
        let store = self.store.clone();
        let moved = task(tokio::task::spawn_blocking(move || store.commit_spill(&object, &rows)).await)??;
        report.objects += 1;
        report.rows += moved;
        report.bytes += size;
        let m = self.store.metrics();
        m.spill_files.inc();
        m.spill_rows.add(moved);
        m.spill_bytes.add(size);
        Ok(())
    }

    /// Manifest entries of a tenant whose hour overlaps `[from, to]`.
    pub fn objects_between(&self, tenant: &TenantId, from: u64, to: u64) -> Result<Vec<ColdObject>, ColdError> {
        let lo = hour_prefix(tenant.as_str(), from / HOUR_MS * HOUR_MS);
        let hi = hour_prefix(tenant.as_str(), (to / HOUR_MS).saturating_add(1).saturating_mul(HOUR_MS));
        let mut out = Vec::new();
        for g in self.store.ks.get(Ks::Cold).range(lo..hi) {
            let v = g.value().map_err(StoreError::from)?;
            let o: ColdObject = decode("cold object", &v)?;
            if o.max_ts >= from && o.min_ts <= to {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Every manifest entry (all tenants), for checkpoints and retention.
    pub fn all_objects(&self) -> Result<Vec<ColdObject>, ColdError> {
        let mut out = Vec::new();
        for g in self.store.ks.get(Ks::Cold).iter() {
            out.push(decode("cold object", &g.value().map_err(StoreError::from)?)?);
        }
        Ok(out)
    }

    /// Reads the rows of one file that `keep` accepts, reading only row groups whose
    /// statistics can hold `orbs` (inclusive id range) and `[from, to]`.
    pub async fn read_object(
        &self,
        o: &ColdObject,
        orbs: Option<(&str, &str)>,
        from: u64,
        to: u64,
        keep: impl FnMut(&str, u64) -> bool,
        out: &mut Vec<ColdRow>,
    ) -> Result<(), ColdError> {
        let before = out.len();
        match self.read_file(o, orbs, from, to, keep, out).await {
            // Retention deleted it after this read listed it (the manifest entry goes first):
            // its points are past retention, the read goes on without them.
            Err(_) if !self.store.ks.get(Ks::Cold).contains_key(o.key()).unwrap_or(true) => {
                out.truncate(before);
                Ok(())
            }
            other => other,
        }
    }

    async fn read_file(
        &self,
        o: &ColdObject,
        orbs: Option<(&str, &str)>,
        from: u64,
        to: u64,
        mut keep: impl FnMut(&str, u64) -> bool,
        out: &mut Vec<ColdRow>,
    ) -> Result<(), ColdError> {
        self.store.metrics().cold_files_read.inc();
        let reader = ObjectReader { store: self.objects.clone(), path: self.path(&o.path), size: o.bytes };
        let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
        let groups: Vec<usize> = builder
            .metadata()
            .row_groups()
            .iter()
            .enumerate()
            .filter(|(_, rg)| {
                let orb_ok = match (orbs, rg.column(columns::COL_ORB).statistics()) {
                    (Some((lo, hi)), Some(s)) => match (s.min_bytes_opt(), s.max_bytes_opt()) {
                        (Some(min), Some(max)) => min <= hi.as_bytes() && lo.as_bytes() <= max,
                        _ => true,
                    },
                    _ => true,
                };
                let ts_ok = match rg.column(columns::COL_TS).statistics() {
                    Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                        (Some(&min), Some(&max)) => (min.max(0) as u64) <= to && (max.max(0) as u64) >= from,
                        _ => true,
                    },
                    _ => true,
                };
                orb_ok && ts_ok
            })
            .map(|(i, _)| i)
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let mut stream = builder.with_row_groups(groups).with_batch_size(8192).build()?;
        while let Some(batch) = stream.try_next().await? {
            columns::from_batch(&batch, &mut keep, out)?;
        }
        Ok(())
    }

    /// Cold points of one orb with `from <= ts <= to`, strictly after `after`, in key order,
    /// at least the first `limit` of them (whole hours are read, so possibly more).
    pub async fn points(
        &self,
        key: &OrbKey,
        from: u64,
        to: u64,
        after: Option<PointCursor>,
        limit: usize,
    ) -> Result<Vec<(PointCursor, StoredPoint)>, ColdError> {
        let from = match after {
            Some((ts, _)) => from.max(ts),
            None => from,
        };
        if from > to {
            return Ok(Vec::new());
        }
        let orb = key.orb.as_str();
        let mut by_hour: BTreeMap<u64, Vec<ColdObject>> = BTreeMap::new();
        for o in self.objects_between(&key.tenant, from, to)? {
            if o.orb_min.as_str() <= orb && orb <= o.orb_max.as_str() {
                by_hour.entry(o.hour_ms).or_default().push(o);
            }
        }
        let mut rows = Vec::new();
        for (_, objects) in by_hour {
            for o in &objects {
                self.read_object(
                    o,
                    Some((orb, orb)),
                    from,
                    to,
                    |id, ts| id == orb && ts >= from && ts <= to,
                    &mut rows,
                )
                .await?;
            }
            rows.retain(|r: &ColdRow| after.is_none_or(|a| r.cursor() > a));
            if rows.len() >= limit {
                break;
            }
        }
        let mut out: Vec<(PointCursor, StoredPoint)> = rows.into_iter().map(|r| (r.cursor(), r.point)).collect();
        out.sort_by_key(|(c, _)| *c);
        out.dedup_by_key(|(c, _)| *c);
        Ok(out)
    }

    /// One page of an orb's history from both tiers: up to `limit` points after `after`, and
    /// whether more follow.
    pub async fn history_page(
        &self,
        key: &OrbKey,
        from: u64,
        to: u64,
        after: Option<PointCursor>,
        limit: usize,
    ) -> Result<(Vec<(PointCursor, StoredPoint)>, bool), ColdError> {
        let hot = self.store.points(key, from, to, after, limit + 1)?;
        let cold = self.points(key, from, to, after, limit + 1).await?;
        let mut rows = merge_tiers(hot, cold, limit + 1);
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok((rows, more))
    }

    /// Every point of an orb in `[from, to]` from both tiers, refusing more than `max`.
    pub async fn range(
        &self,
        key: &OrbKey,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<(PointCursor, StoredPoint)>, ColdError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = self.history_page(key, from, to, after, 10_000).await?;
            after = page.last().map(|(c, _)| *c);
            out.extend(page);
            if out.len() > max {
                return Err(ColdError::Invalid(format!("more than {max} points in [{from}, {to}]; narrow the range")));
            }
            if !more {
                return Ok(out);
            }
        }
    }

    /// The newest cold point at or before `at` (and after `at - lookback`) of each orb in
    /// `orbs` (sorted ids).
    pub async fn latest_at(
        &self,
        tenant: &TenantId,
        orbs: &[OrbId],
        at: u64,
        lookback_ms: u64,
    ) -> Result<BTreeMap<OrbId, StoredPoint>, ColdError> {
        let mut found: BTreeMap<OrbId, StoredPoint> = BTreeMap::new();
        let (Some(first), Some(last)) = (orbs.first(), orbs.last()) else { return Ok(found) };
        let from = at.saturating_sub(lookback_ms);
        let mut by_hour: BTreeMap<u64, Vec<ColdObject>> = BTreeMap::new();
        for o in self.objects_between(tenant, from, at)? {
            if o.orb_min.as_str() <= last.as_str() && first.as_str() <= o.orb_max.as_str() {
                by_hour.entry(o.hour_ms).or_default().push(o);
            }
        }
        let wanted: std::collections::HashSet<&str> = orbs.iter().map(|o| o.as_str()).collect();
        // Newest hour first; an orb found in an hour is final (older hours hold older points).
        for (_, objects) in by_hour.into_iter().rev() {
            let mut rows = Vec::new();
            for o in &objects {
                self.read_object(
                    o,
                    Some((first.as_str(), last.as_str())),
                    from,
                    at,
                    |id, ts| ts >= from && ts <= at && wanted.contains(id),
                    &mut rows,
                )
                .await?;
            }
            let mut newest: BTreeMap<OrbId, StoredPoint> = BTreeMap::new();
            for r in rows {
                if found.contains_key(&r.orb) {
                    continue;
                }
                match newest.get(&r.orb) {
                    Some(p) if p.point.ts >= r.point.point.ts => {}
                    _ => {
                        newest.insert(r.orb, r.point);
                    }
                }
            }
            found.extend(newest);
            if found.len() == wanted.len() {
                break;
            }
        }
        Ok(found)
    }

    /// Deletes cold files of `tenant` whose every point is older than `before_ms`: the manifest
    /// entry first (from then on no read lists the file; a read that listed it before skips it,
    /// see [`Cold::read_object`]), then the file and its mirror.
    pub async fn expire(&self, tenant: &TenantId, before_ms: u64) -> Result<u64, ColdError> {
        let _one = self.spill_lock.lock().await;
        let old: Vec<ColdObject> = self
            .objects_between(tenant, 0, before_ms.saturating_sub(1))?
            .into_iter()
            .filter(|o| o.max_ts < before_ms)
            .collect();
        let mut n = 0;
        for o in old {
            let store = self.store.clone();
            let key = o.key();
            task(tokio::task::spawn_blocking(move || store.delete_durable(Ks::Cold, &key)).await)??;
            let _ = self.objects.delete(&self.path(&o.path)).await;
            let _ = self.objects.delete(&self.path(&o.mirror_path())).await;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes Parquet files and manifest mirrors that no manifest entry references and that
    /// are older than an hour: what a spill interrupted between its `put` and its commit left.
    /// Holds the spill lock, so a spill in progress is never mistaken for one.
    pub async fn collect_orphans(&self, now_ms: u64) -> Result<u64, ColdError> {
        let _one = self.spill_lock.lock().await;
        let objects = self.all_objects()?;
        let known: std::collections::HashSet<&str> = objects.iter().map(|o| o.path.as_str()).collect();
        // A mirror is named after its file's stem (`part-<ms>-<rand>`), unique per file.
        let stems: std::collections::HashSet<&str> = objects.iter().map(ColdObject::stem).collect();
        let listing: Vec<_> = self.objects.list(Some(&self.path("telemetry"))).try_collect().await?;
        let prefix_len = if self.prefix.as_ref().is_empty() { 0 } else { self.prefix.as_ref().len() + 1 };
        let mut n = 0;
        for meta in listing {
            let loc = meta.location.as_ref();
            let rel = loc.get(prefix_len..).unwrap_or(loc);
            let referenced = if rel.contains("/_manifest/") {
                // `<hour_ms>-<stem>.json` names the file `.../<stem>.parquet` of that hour.
                let stem = rel.rsplit('/').next().unwrap_or_default().trim_end_matches(".json");
                let stem = stem.split_once('-').map_or(stem, |(_, s)| s);
                stems.contains(stem)
            } else {
                known.contains(rel)
            };
            let age_ms = now_ms.saturating_sub(meta.last_modified.timestamp_millis().max(0) as u64);
            if !referenced && age_ms > HOUR_MS {
                self.objects.delete(&meta.location).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Drops manifest entries whose file is missing (a checkpoint older than a retention
    /// pass); returns how many.
    pub async fn drop_missing(&self) -> Result<u64, ColdError> {
        let mut n = 0;
        for o in self.all_objects()? {
            match self.objects.head(&self.path(&o.path)).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    let store = self.store.clone();
                    let key = o.key();
                    task(tokio::task::spawn_blocking(move || store.delete_durable(Ks::Cold, &key)).await)??;
                    n += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    /// Reads the manifest mirrors from the object store (for a restore onto an empty disk).
    pub async fn read_mirrors(&self) -> Result<Vec<ColdObject>, ColdError> {
        let mut out = Vec::new();
        let listing: Vec<_> = self.objects.list(Some(&self.path("telemetry"))).try_collect().await?;
        for meta in listing {
            let loc = meta.location.as_ref();
            if !loc.contains("/_manifest/") || !loc.ends_with(".json") {
                continue;
            }
            let bytes = self.objects.get(&meta.location).await?.bytes().await?;
            match serde_json::from_slice::<ColdObject>(&bytes) {
                Ok(o) => out.push(o),
                Err(e) => tracing::warn!(path = loc, error = %e, "skipping an unreadable manifest mirror"),
            }
        }
        Ok(out)
    }
}

impl Store {
    /// A tenant's own retention settings, if it has any.
    pub fn retention(&self, tenant: &TenantId) -> Result<Option<TenantRetention>, StoreError> {
        self.get_decoded(Ks::Retention, "retention", tenant.as_str().as_bytes())
    }

    /// Sets a tenant's retention durably.
    pub fn set_retention(&self, tenant: &TenantId, r: &TenantRetention) -> Result<(), StoreError> {
        self.ks.get(Ks::Retention).insert(tenant.as_str().as_bytes(), encode(r))?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }

    /// Appends the points of one orb with `ts < before`, in key order; returns the bytes read.
    pub(crate) fn points_before(&self, key: &OrbKey, before: u64, out: &mut Vec<ColdRow>) -> Result<u64, StoreError> {
        if before == 0 {
            return Ok(0);
        }
        let mut bytes = 0;
        let lo = keys::telemetry(key, 0, 0);
        let hi = keys::telemetry(key, before, 0);
        for g in self.ks.get(Ks::Telemetry).range(lo..hi) {
            let (k, v) = g.into_inner()?;
            let (_, suffix) = keys::telemetry_cursor(&k)
                .ok_or_else(|| StoreError::Corrupt { what: "telemetry key", detail: format!("{} bytes", k.len()) })?;
            bytes += (k.len() + v.len()) as u64;
            out.push(ColdRow { orb: key.orb.clone(), suffix, point: decode("telemetry", &v)? });
        }
        Ok(bytes)
    }

    /// Commits a spilled file's manifest entry and removes exactly its rows from the hot tier,
    /// in one atomic batch with fsync. Returns the rows removed.
    fn commit_spill(&self, object: &ColdObject, rows: &[ColdRow]) -> Result<u64, StoreError> {
        let tel = self.ks.get(Ks::Telemetry);
        let mut wb = self.db.batch();
        wb.insert(self.ks.get(Ks::Cold), object.key(), encode(object));
        for r in rows {
            let key = OrbKey::new(object.tenant.clone(), r.orb.clone());
            wb.remove(tel, keys::telemetry(&key, r.point.point.ts, r.suffix));
        }
        wb.commit()?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(rows.len() as u64)
    }

    /// Removes one key durably (outside the group committer: rare administrative writes).
    pub(crate) fn delete_durable(&self, which: Ks, key: &[u8]) -> Result<(), StoreError> {
        self.ks.get(which).remove(key)?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }

    /// Writes manifest entries found in the object store's mirrors (restore).
    pub(crate) fn import_cold_objects(&self, objects: &[ColdObject]) -> Result<(), StoreError> {
        let mut wb = self.db.batch();
        for o in objects {
            wb.insert(self.ks.get(Ks::Cold), o.key(), encode(o));
        }
        wb.commit()?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

/// Merges hot and cold points of one orb (each in key order) into the first `limit`, hot
/// winning on equal keys.
pub fn merge_tiers(
    hot: Vec<(PointCursor, StoredPoint)>,
    cold: Vec<(PointCursor, StoredPoint)>,
    limit: usize,
) -> Vec<(PointCursor, StoredPoint)> {
    let mut out = Vec::with_capacity(limit.min(hot.len() + cold.len()));
    let (mut h, mut c) = (hot.into_iter().peekable(), cold.into_iter().peekable());
    while out.len() < limit {
        let next = match (h.peek(), c.peek()) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                c.next();
                h.next()
            }
            (Some(a), Some(b)) if a.0 < b.0 => h.next(),
            (Some(_), Some(_)) => c.next(),
            (Some(_), None) => h.next(),
            (None, Some(_)) => c.next(),
            (None, None) => None,
        };
        match next {
            Some(p) => out.push(p),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TelemetryPoint;

    fn p(ts: u64, battery: f64) -> StoredPoint {
        StoredPoint {
            point: TelemetryPoint {
                ts,
                msg_id: None,
                battery: Some(battery),
                position: None,
                speed: None,
                mode: None,
                metrics: Default::default(),
            },
            received_ms: ts,
        }
    }

    #[test]
    fn merge_keeps_order_prefers_hot_and_counts_each_key_once() {
        let hot = vec![((2, 0), p(2, 1.0)), ((5, 1), p(5, 1.0)), ((9, 0), p(9, 1.0))];
        let cold = vec![((1, 0), p(1, 0.0)), ((5, 1), p(5, 0.0)), ((7, 0), p(7, 0.0))];
        let all = merge_tiers(hot.clone(), cold.clone(), 100);
        let cursors: Vec<_> = all.iter().map(|(c, _)| *c).collect();
        assert_eq!(cursors, vec![(1, 0), (2, 0), (5, 1), (7, 0), (9, 0)]);
        assert_eq!(all[2].1.point.battery, Some(1.0), "the hot copy wins");
        assert_eq!(merge_tiers(hot, cold, 3).len(), 3);
    }

    #[test]
    fn partitions_are_utc_date_and_hour() {
        // 2026-11-27T23:00:00Z
        assert_eq!(partition(1_795_820_400_000), "date=2026-11-27/hour=23");
        assert_eq!(partition(0), "date=1970-01-01/hour=00");
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use crate::model::{OrbId, TelemetryPoint};
    use crate::storage::{Batch, Ks, StoreOptions};

    /// A read that listed a file retention then deleted goes on without it; a file that is
    /// still referenced but unreadable is an error, as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_expired_during_a_read_is_skipped_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default(), Arc::new(crate::metrics::Metrics::default())).unwrap();
        let cold = Cold::open(store.clone(), &ObjectTarget::Local(dir.path().join("objects"))).unwrap();
        let key = OrbKey::new(TenantId::parse("acme").unwrap(), OrbId::parse("o1").unwrap());
        let hour = 3_600_000;
        let now = 1_795_820_400_000;
        let mut batch = Batch::new();
        Store::add_orb(&mut batch, &crate::model::orb::OrbRecord::provisioned(key.clone(), None, 1));
        store.commit(batch).await.unwrap();
        for (i, ts) in [now - 30 * hour, now - 29 * hour].into_iter().enumerate() {
            let point = TelemetryPoint {
                ts,
                msg_id: None,
                battery: Some(i as f64),
                position: None,
                speed: None,
                mode: None,
                metrics: Default::default(),
            };
            let mut batch = Batch::new();
            Store::add_telemetry(&mut batch, &key, &point, ts, format!("p{i}").as_bytes());
            store.commit(batch).await.unwrap();
        }
        let opts = SpillOptions { hot_window_ms: hour, tenant_windows: false, buffer_bytes: 1 << 20 };
        cold.spill(now, &opts, Some(&key.tenant)).await.unwrap();
        let listed = cold.objects_between(&key.tenant, 0, now).unwrap();
        assert_eq!(listed.len(), 2, "one file per hour");

        // Broken while referenced: an error.
        let broken = &listed[1];
        std::fs::write(dir.path().join("objects").join(&broken.path), b"not parquet").unwrap();
        let mut rows = Vec::new();
        assert!(cold.read_object(broken, None, 0, now, |_, _| true, &mut rows).await.is_err());

        // Expired after the listing: skipped.
        assert_eq!(cold.expire(&key.tenant, now).await.unwrap(), 2);
        for o in &listed {
            let mut rows = Vec::new();
            cold.read_object(o, None, 0, now, |_, _| true, &mut rows).await.unwrap();
            assert!(rows.is_empty());
        }
        drop(cold);
        tokio::task::spawn_blocking(move || store.close()).await.unwrap();
    }

    /// A store with `n` telemetry points of one orb, a second apart from 30 h ago, each with
    /// `metrics` metrics (about 14 bytes stored per metric); flushed.
    async fn filled(opts: &StoreOptions, metrics: usize, n: u64) -> (tempfile::TempDir, Store, Cold, OrbKey, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), opts, Arc::new(crate::metrics::Metrics::default())).unwrap();
        let cold = Cold::open(store.clone(), &ObjectTarget::Local(dir.path().join("objects"))).unwrap();
        let key = OrbKey::new(TenantId::parse("acme").unwrap(), OrbId::parse("o1").unwrap());
        let now = 1_795_820_400_000;
        let mut batch = Batch::new();
        Store::add_orb(&mut batch, &crate::model::orb::OrbRecord::provisioned(key.clone(), None, 1));
        store.commit(batch).await.unwrap();
        let fields: Vec<String> = (0..metrics).map(|m| format!(r#""m{m}": {m}.5"#)).collect();
        let raw = format!(r#"{{"ts": {now}, "metrics": {{{}}}}}"#, fields.join(","));
        let template = crate::model::telemetry::parse(raw.as_bytes(), now, 64 * 1024).unwrap();
        let mut batch = Batch::new();
        for i in 0..n {
            let point =
                TelemetryPoint { ts: now - 30 * 3_600_000 + i * 1_000, battery: Some(i as f64), ..template.clone() };
            Store::add_telemetry(&mut batch, &key, &point, point.ts, &i.to_be_bytes());
        }
        assert_eq!(store.commit(batch).await.unwrap(), crate::storage::Outcome::Stored);
        store.flush_telemetry().unwrap();
        (dir, store, cold, key, now)
    }

    fn batteries(store: &Store, key: &OrbKey) -> Vec<f64> {
        store.points(key, 0, u64::MAX, None, 10_000).unwrap().iter().filter_map(|(_, p)| p.point.battery).collect()
    }

    /// Points of 256 stored bytes and more live in blob files; once spilled (deleted from the
    /// hot tier) and compacted, the blob files have nothing live and are deleted whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn telemetry_values_live_in_blob_files_that_go_when_their_points_are_spilled() {
        let (dir, store, cold, key, now) = filled(&StoreOptions::default(), 40, 2_000).await;
        let ks = store.ks.get(Ks::Telemetry).clone();
        assert!(ks.blob_file_count() >= 1, "the flush wrote the values to a blob file");
        let blob_bytes: u64 = blob_files_on_disk(dir.path()).iter().map(|(_, len)| len).sum();
        assert!(blob_bytes > 2_000 * 256, "the values are in the blob files: {blob_bytes} bytes");
        assert_eq!(batteries(&store, &key), (0..2_000).map(|i| i as f64).collect::<Vec<_>>());
        let latest = store.latest_point(&key).unwrap().expect("a hot point").point;
        assert_eq!(latest.metrics.get("m39"), Some(39.5), "a point read through its blob");
        let small = TelemetryPoint { ts: now, metrics: Default::default(), ..latest };

        let opts = SpillOptions { hot_window_ms: 3_600_000, tenant_windows: false, buffer_bytes: 1 << 20 };
        assert_eq!(cold.spill(now, &opts, Some(&key.tenant)).await.unwrap().rows, 2_000);
        assert!(batteries(&store, &key).is_empty(), "the spill removed the hot points");
        store.flush_telemetry().unwrap();
        ks.major_compact().unwrap();
        let stale = store.telemetry_backlog().blob_stale_bytes;
        // Every value counted (the rest of the file is its own index and header).
        assert!(stale > blob_bytes * 3 / 4, "the compaction found the blobs dead: {stale} of {blob_bytes} bytes");
        // A dead blob file leaves the tree when a later merge compaction commits (lsm-tree 3.1
        // looks for dead files when a merge starts, in the version before it); here one
        // merging a point too small for a blob, whose flush adds no blob file.
        let mut batch = Batch::new();
        Store::add_telemetry(&mut batch, &key, &small.clone(), now, b"small");
        store.commit(batch).await.unwrap();
        store.flush_telemetry().unwrap();
        assert_eq!(store.telemetry_backlog().blob_files, 1, "a flush neither drops it nor adds one");
        ks.major_compact().unwrap();
        let backlog = store.telemetry_backlog();
        assert_eq!((backlog.blob_files, backlog.blob_stale_bytes), (0, 0), "the dead blob file is dropped whole");
        // Its file goes when no version of the tree refers to it any more: old versions are
        // let go at later flushes and compactions.
        let mut batch = Batch::new();
        Store::add_telemetry(&mut batch, &key, &TelemetryPoint { ts: now + 1, ..small }, now, b"later");
        store.commit(batch).await.unwrap();
        store.flush_telemetry().unwrap();
        assert_eq!(blob_files_on_disk(dir.path()), vec![], "blob files left on disk");
        let (rows, _) = cold.history_page(&key, 0, now + 1, None, 10_000).await.unwrap();
        assert_eq!(rows.len(), 2_002, "the spilled points (in the cold tier) and the two small ones");
        drop(cold);
        tokio::task::spawn_blocking(move || store.close()).await.unwrap();
    }

    /// fjall keeps the blob threshold with the keyspace: reopening with another
    /// `telemetry_blob_min_bytes` changes nothing, either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_blob_threshold_is_fixed_when_the_keyspace_is_created() {
        let inline = StoreOptions { telemetry_blob_min_bytes: 0, ..StoreOptions::default() };
        for (created, reopened, kept) in
            [(&inline, &StoreOptions::default(), 0), (&StoreOptions::default(), &inline, 256)]
        {
            let (dir, store, cold, key, _) = filled(created, 40, 500).await;
            assert_eq!(store.ks.telemetry_blob_min_bytes(), kept);
            let blob_files = store.telemetry_backlog().blob_files;
            assert_eq!(blob_files > 0, kept > 0, "{blob_files} blob files");
            drop(cold);
            let closing = store.clone();
            tokio::task::spawn_blocking(move || closing.close()).await.unwrap();
            drop(store);
            let store = Store::open(dir.path(), reopened, Arc::new(crate::metrics::Metrics::default())).unwrap();
            assert_eq!(store.ks.telemetry_blob_min_bytes(), kept, "as created, whatever the options now");
            let point = store.latest_point(&key).unwrap().unwrap().point;
            let mut batch = Batch::new();
            Store::add_telemetry(&mut batch, &key, &TelemetryPoint { ts: point.ts + 1, ..point }, 0, b"x");
            store.commit(batch).await.unwrap();
            store.flush_telemetry().unwrap();
            let more = usize::from(kept > 0);
            assert_eq!(store.telemetry_backlog().blob_files, blob_files + more, "the next flush does as created");
            assert_eq!(batteries(&store, &key).len(), 501);
            tokio::task::spawn_blocking(move || store.close()).await.unwrap();
        }
    }

    /// The blob files under a data directory and their sizes (`fjall/keyspaces/<id>/blobs/`).
    fn blob_files_on_disk(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
        let listing = |d: &std::path::Path| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path());
        listing(&dir.join("fjall/keyspaces"))
            .flat_map(|ks| listing(&ks.join("blobs")).collect::<Vec<_>>())
            .filter_map(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.len())))
            .collect()
    }
}
