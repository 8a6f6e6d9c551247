//! Batch export jobs: one tenant's telemetry of a fleet query over a time range, from both
//! tiers, to Parquet or JSON lines under `exports/tenant=<t>/<destination>/`.
//!
//! A job is a record (keyspace `exports`, key `t 0 id`) plus its target orbs, resolved once at
//! creation (keyspace `export_targets`). It writes files of at most `file_rows` rows (fixed per
//! job from `storage.export_file_rows`, default [`EXPORT_FILE_ROWS`])
//! named by their index (`part-00000.parquet`, ...); after each file the cursor (orb index,
//! point cursor within that orb, files written) is committed. A restart resumes at the cursor
//! and rewrites the file that was in flight under the same name, so every point is exported
//! exactly once whatever happens.

use object_store::ObjectStoreExt as _;
use serde::{Deserialize, Serialize};

use super::{Cold, ColdError, ColdRow, columns, task};
use crate::model::{OrbId, OrbKey, TenantId};
use crate::storage::{Error as StoreError, Ks, PointCursor, Store, StoredPoint, decode, encode, keys};

/// Rows per exported file.
pub const EXPORT_FILE_ROWS: usize = 200_000;
/// Orbs one job may cover.
pub const EXPORT_ORBS_MAX: usize = 500_000;
/// Jobs running at once per node (more wait as `queued`).
pub const EXPORTS_RUNNING_MAX: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportFormat {
    Parquet,
    Jsonl,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Option<ExportFormat> {
        match s {
            "" | "parquet" => Some(ExportFormat::Parquet),
            "jsonl" => Some(ExportFormat::Jsonl),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Parquet => "parquet",
            ExportFormat::Jsonl => "jsonl",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportStatus {
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl ExportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportStatus::Running => "running",
            ExportStatus::Succeeded => "succeeded",
            ExportStatus::Failed => "failed",
            ExportStatus::Canceled => "canceled",
        }
    }
}

/// An export job and its progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportJob {
    pub id: String,
    pub tenant: TenantId,
    pub from: u64,
    pub to: u64,
    pub query: String,
    pub format: ExportFormat,
    /// Under `exports/tenant=<t>/`.
    pub destination: String,
    pub status: ExportStatus,
    pub orbs_total: u64,
    /// Index of the orb the next file starts at, and the cursor within it.
    pub next_orb: u64,
    pub next_after: Option<PointCursor>,
    pub files: u64,
    pub rows: u64,
    /// Rows per file, fixed at creation (so a resumed job names its files the same way).
    pub file_rows: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub error: Option<String>,
    pub created_by: String,
}

impl ExportJob {
    /// Where the job's files go, relative to the object store's prefix.
    pub fn prefix(&self) -> String {
        format!("exports/tenant={}/{}", self.tenant.as_str(), self.destination)
    }
}

/// Checks an export destination: 1-256 bytes of `[A-Za-z0-9._-]` segments joined by `/`.
pub fn validate_destination(d: &str) -> Result<(), String> {
    if d.is_empty() || d.len() > 256 {
        return Err("destination must be 1..256 bytes".into());
    }
    for seg in d.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err("destination has an empty, '.' or '..' segment".into());
        }
        if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
            return Err("destination segments use only A-Z a-z 0-9 . _ -".into());
        }
    }
    Ok(())
}

fn job_key(tenant: &TenantId, id: &str) -> Vec<u8> {
    let mut k = keys::tenant_prefix(tenant.as_str());
    k.extend_from_slice(id.as_bytes());
    k
}

impl Store {
    /// Creates a job and its targets durably.
    pub fn create_export(&self, job: &ExportJob, targets: &[OrbId]) -> Result<(), StoreError> {
        let k = job_key(&job.tenant, &job.id);
        let mut wb = self.db.batch();
        wb.insert(self.ks.get(Ks::ExportTargets), k.clone(), encode(&targets.to_vec()));
        wb.insert(self.ks.get(Ks::Exports), k, encode(job));
        wb.commit()?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }

    /// Changes a stored job durably under the node's one job lock (so a cancel and the
    /// runner's progress never overwrite each other). `f` sees the stored job and returns
    /// whether to write it; the job as stored afterwards is returned.
    pub fn update_export(
        &self,
        tenant: &TenantId,
        id: &str,
        f: impl FnOnce(&mut ExportJob) -> bool,
    ) -> Result<Option<ExportJob>, StoreError> {
        static JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = JOBS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut job) = self.export(tenant, id)? else { return Ok(None) };
        if f(&mut job) {
            self.ks.get(Ks::Exports).insert(job_key(&job.tenant, &job.id), encode(&job))?;
            self.db.persist(fjall::PersistMode::SyncAll)?;
        }
        Ok(Some(job))
    }

    pub fn export(&self, tenant: &TenantId, id: &str) -> Result<Option<ExportJob>, StoreError> {
        self.get_decoded(Ks::Exports, "export", &job_key(tenant, id))
    }

    pub fn export_targets(&self, tenant: &TenantId, id: &str) -> Result<Vec<OrbId>, StoreError> {
        Ok(self.get_decoded(Ks::ExportTargets, "export targets", &job_key(tenant, id))?.unwrap_or_default())
    }

    /// Jobs of one tenant, or of all (`None`).
    pub fn exports(&self, tenant: Option<&TenantId>) -> Result<Vec<ExportJob>, StoreError> {
        let ks = self.ks.get(Ks::Exports);
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = match tenant {
            Some(t) => Box::new(ks.prefix(keys::tenant_prefix(t.as_str()))),
            None => Box::new(ks.iter()),
        };
        iter.map(|g| decode("export", &g.value()?)).collect()
    }
}

fn jsonl_line(orb: &OrbId, p: &StoredPoint) -> String {
    let mut v = p.point.to_json();
    v["orb_id"] = orb.as_str().into();
    v["received_ms"] = p.received_ms.into();
    let mut s = v.to_string();
    s.push('\n');
    s
}

impl Cold {
    /// Runs a job from its cursor to the end (or until it is canceled). Progress is durable
    /// after every file.
    pub async fn run_export(&self, mut job: ExportJob, now: impl Fn() -> u64) -> Result<ExportJob, ColdError> {
        let targets = self.store().export_targets(&job.tenant, &job.id)?;
        while job.status == ExportStatus::Running && (job.next_orb as usize) < targets.len() {
            let (mut orb_i, mut after) = (job.next_orb as usize, job.next_after);
            let mut rows: Vec<ColdRow> = Vec::new();
            let file_rows = (job.file_rows as usize).max(1);
            while rows.len() < file_rows && orb_i < targets.len() {
                let key = OrbKey::new(job.tenant.clone(), targets[orb_i].clone());
                let want = (file_rows - rows.len()).min(10_000);
                let (page, more) = self.history_page(&key, job.from, job.to, after, want).await?;
                for (cursor, point) in page {
                    after = Some(cursor);
                    rows.push(ColdRow { orb: key.orb.clone(), suffix: cursor.1, point });
                }
                if !more {
                    orb_i += 1;
                    after = None;
                }
            }
            let written = rows.len() as u64;
            if !rows.is_empty() {
                let name = format!("{}/part-{:05}.{}", job.prefix(), job.files, job.format.as_str());
                let format = job.format;
                let body = task(
                    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ColdError> {
                        Ok(match format {
                            ExportFormat::Parquet => columns::encode(&rows)?,
                            ExportFormat::Jsonl => {
                                rows.iter().map(|r| jsonl_line(&r.orb, &r.point)).collect::<String>().into_bytes()
                            }
                        })
                    })
                    .await,
                )??;
                self.objects().put(&self.path(&name), body.into()).await?;
                job.files += 1;
            }
            job.rows += written;
            job.next_orb = orb_i as u64;
            job.next_after = after;
            job.updated_ms = now();
            if job.next_orb as usize >= targets.len() {
                job.status = ExportStatus::Succeeded;
            }
            // A cancel that arrived while the file was written wins.
            let (store, progress) = (self.store().clone(), job.clone());
            let stored = task(
                tokio::task::spawn_blocking(move || {
                    store.update_export(&progress.tenant.clone(), &progress.id.clone(), |j| {
                        if j.status != ExportStatus::Running {
                            return false;
                        }
                        *j = progress;
                        true
                    })
                })
                .await,
            )??;
            match stored {
                Some(s) => job = s,
                None => return Err(ColdError::Invalid(format!("export {} vanished", job.id))),
            }
        }
        if job.status == ExportStatus::Running {
            // Nothing to export (no targets).
            let (store, t, id, at) = (self.store().clone(), job.tenant.clone(), job.id.clone(), now());
            let stored = task(
                tokio::task::spawn_blocking(move || {
                    store.update_export(&t, &id, |j| {
                        let run = j.status == ExportStatus::Running;
                        if run {
                            j.status = ExportStatus::Succeeded;
                            j.updated_ms = at;
                        }
                        run
                    })
                })
                .await,
            )??;
            if let Some(s) = stored {
                job = s;
            }
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_plain_relative_paths() {
        for ok in ["daily", "2026/11/27", "fleet-eu_v1.2"] {
            assert!(validate_destination(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/abs", "a//b", "../x", "a/./b", "sp ace", "a\\b", &"x".repeat(257)] {
            assert!(validate_destination(bad).is_err(), "{bad}");
        }
    }
}
