//! The store: the only code that touches fjall. Actors and listeners go through [`Store`].
//!
//! Reads go straight to fjall (it is internally synchronized); every write goes through the
//! group committer (`commit.rs`) and is durable when its future resolves.

mod alerts;
mod broker;
mod codec;
pub mod cold;
mod commit;
mod dedupe;
mod events;
pub mod keys;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

pub use alerts::WindowRecord;
pub use codec::{FORMAT_VERSION, decode, encode};
pub(crate) use commit::deliver_replies_here;
pub use commit::{Batch, Outcome};
use commit::{Committer, DedupeProbe};

use crate::metrics::Metrics;
use crate::model::broadcast::Broadcast;
use crate::model::command::Command;
use crate::model::ids::hash64;
use crate::model::orb::{OrbRecord, Presence};
use crate::model::state_report::{Reported, VersionChange};
use crate::model::tenant::ApiToken;
use crate::model::{OrbId, OrbKey, TelemetryPoint, TenantId};
use crate::pki::StoredCa;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    #[error("{what} record is format version {found}; this build reads up to {supported}")]
    UnsupportedVersion { what: &'static str, found: u8, supported: u8 },
    #[error("corrupt {what} record: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("the store is closed")]
    Closed,
    #[error("group commit failed: {0}")]
    CommitFailed(String),
}

/// The keyspaces, named once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ks {
    Meta,
    Tenants,
    Orbs,
    Presence,
    Reported,
    Telemetry,
    Dedupe,
    Commands,
    Pending,
    Idempotency,
    Broadcasts,
    BroadcastTargets,
    ApiTokens,
    Cas,
    Revoked,
    Versions,
    Rules,
    RuleWindows,
    Alerts,
    OpenAlerts,
    Webhooks,
    Outbox,
    Deliveries,
    Events,
    Cold,
    Exports,
    ExportTargets,
    Retention,
    Retained,
    TopicPolicies,
    Sessions,
    SessionQueue,
}

impl Ks {
    const ALL: [Ks; 32] = [
        Ks::Meta,
        Ks::Tenants,
        Ks::Orbs,
        Ks::Presence,
        Ks::Reported,
        Ks::Telemetry,
        Ks::Dedupe,
        Ks::Commands,
        Ks::Pending,
        Ks::Idempotency,
        Ks::Broadcasts,
        Ks::BroadcastTargets,
        Ks::ApiTokens,
        Ks::Cas,
        Ks::Revoked,
        Ks::Versions,
        Ks::Rules,
        Ks::RuleWindows,
        Ks::Alerts,
        Ks::OpenAlerts,
        Ks::Webhooks,
        Ks::Outbox,
        Ks::Deliveries,
        Ks::Events,
        Ks::Cold,
        Ks::Exports,
        Ks::ExportTargets,
        Ks::Retention,
        Ks::Retained,
        Ks::TopicPolicies,
        Ks::Sessions,
        Ks::SessionQueue,
    ];

    fn name(self) -> &'static str {
        match self {
            Ks::Meta => "meta",
            Ks::Tenants => "tenants",
            Ks::Orbs => "orbs",
            Ks::Presence => "presence",
            Ks::Reported => "reported",
            Ks::Telemetry => "telemetry",
            Ks::Dedupe => "dedupe",
            Ks::Commands => "commands",
            Ks::Pending => "pending",
            Ks::Idempotency => "idempotency",
            Ks::Broadcasts => "broadcasts",
            Ks::BroadcastTargets => "broadcast_targets",
            Ks::ApiTokens => "api_tokens",
            Ks::Cas => "cas",
            Ks::Revoked => "revoked",
            Ks::Versions => "versions",
            Ks::Rules => "rules",
            Ks::RuleWindows => "rule_windows",
            Ks::Alerts => "alerts",
            Ks::OpenAlerts => "open_alerts",
            Ks::Webhooks => "webhooks",
            Ks::Outbox => "outbox",
            Ks::Deliveries => "deliveries",
            Ks::Events => "events",
            Ks::Cold => "cold",
            Ks::Exports => "exports",
            Ks::ExportTargets => "export_targets",
            Ks::Retention => "retention",
            Ks::Retained => "retained",
            Ks::TopicPolicies => "topic_policies",
            Ks::Sessions => "sessions",
            Ks::SessionQueue => "session_queue",
        }
    }
}

/// Open keyspace handles, indexed by [`Ks`].
#[derive(Clone)]
pub(crate) struct Keyspaces(Arc<[Keyspace; Ks::ALL.len()]>);

impl Keyspaces {
    pub(crate) fn get(&self, which: Ks) -> &Keyspace {
        &self.0[which as usize]
    }

    /// The stored size from which telemetry values are kept in blob files, as fjall keeps it
    /// with the keyspace (0: none).
    pub(crate) fn telemetry_blob_min_bytes(&self) -> u32 {
        self.get(Ks::Telemetry).config.kv_separation_opts.as_ref().map_or(0, |o| o.separation_threshold)
    }
}

/// A tenant as the registry knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub tenant: TenantId,
    pub created_ms: u64,
}

/// A telemetry point as stored: the point and when the server received it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredPoint {
    pub point: TelemetryPoint,
    pub received_ms: u64,
}

/// Position of a point in an orb's history: device time and the key suffix.
pub type PointCursor = (u64, u64);

/// Store tuning, from `[storage]` in the config.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub cache_bytes: u64,
    pub commit_queue_max: usize,
    /// Size of each of the two in-memory `msg_id` filters (current and previous bucket).
    pub dedupe_filter_bytes: usize,
    /// How long a small commit group may wait for more writes (zero: never); see `commit::Linger`.
    pub commit_linger: std::time::Duration,
    /// Telemetry values of at least this many bytes go to the keyspace's blob files (0: none);
    /// applies when the telemetry keyspace is created ([`keyspace_options`]).
    pub telemetry_blob_min_bytes: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 64 * 1024 * 1024,
            commit_queue_max: crate::limits::COMMIT_QUEUE_MAX,
            dedupe_filter_bytes: 16 * 1024 * 1024,
            commit_linger: std::time::Duration::from_micros(crate::limits::COMMIT_LINGER_US),
            telemetry_blob_min_bytes: crate::limits::TELEMETRY_BLOB_MIN_BYTES,
        }
    }
}

/// The store facade; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Database,
    ks: Keyspaces,
    committer: Committer,
    metrics: Arc<Metrics>,
}

const META_FORMAT: &[u8] = b"format_version";

/// The telemetry keyspace's write backlog and its blob files. fjall 3.1.13 makes each write
/// batch spin briefly from 21 L0 runs on and stops writers at 30 L0 runs or 4 sealed memtables
/// ([`crate::limits::TELEMETRY_L0_MERGE_TABLES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetryBacklog {
    /// Tables in L0: flushed, not merged into L1 yet (the merge starts at 12).
    pub l0_tables: usize,
    /// Runs in L0: one per flush (a flush of several sealed memtables is one run of several
    /// tables). fjall's write stalls count these.
    pub l0_runs: usize,
    /// Memtables sealed and waiting for their flush.
    pub sealed_memtables: usize,
    /// Blob files holding the keyspace's separated values.
    pub blob_files: usize,
    /// Bytes of blob values that merges have found deleted so far (not yet all that is dead):
    /// a file with nothing live is dropped whole by a later merge.
    pub blob_stale_bytes: u64,
}

/// How a keyspace is created. fjall keeps these options with the keyspace: a store created by
/// an earlier version (or with other [`StoreOptions`]) keeps the ones it was created with.
fn keyspace_options(k: Ks, opts: &StoreOptions) -> KeyspaceCreateOptions {
    let create = KeyspaceCreateOptions::default();
    match k {
        // Telemetry is most of what is written and its keys are orb-first, so every flushed
        // memtable overlaps all of L1: merging at 12 L0 tables instead of fjall's 4 merges
        // into L1 a third as often. In lsm-tree 3.1 the threshold also sets L1's
        // target size (64 MiB tables x 12 = 768 MiB instead of 256) and through it every
        // deeper level's: the tree is three times wider per level and shallower for the same
        // data (BENCHMARKS.md, "Telemetry compaction").
        // Values of `telemetry_blob_min_bytes` and more are written once, at their flush, to
        // blob files (LZ4 per value); the tree keeps the key and a pointer, so merges rewrite
        // ~50 bytes per point instead of the whole point. Points leave the hot tier by the
        // hour (the spill), so blob files mostly go dead whole and are dropped by a later
        // merge without rewriting (ADR 007; BENCHMARKS.md, "Telemetry values in blob files").
        Ks::Telemetry => {
            let create = create.compaction_strategy(Arc::new(
                fjall::compaction::Leveled::default().with_l0_threshold(crate::limits::TELEMETRY_L0_MERGE_TABLES),
            ));
            match opts.telemetry_blob_min_bytes {
                0 => create,
                min => create.with_kv_separation(Some(fjall::KvSeparationOptions::default().separation_threshold(min))),
            }
        }
        _ => create,
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`, recovering the journal.
    pub fn open(dir: &Path, opts: &StoreOptions, metrics: Arc<Metrics>) -> Result<Store, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::DataDir { path: dir.to_path_buf(), source })?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = cores.clamp(crate::limits::FJALL_WORKERS_MIN, crate::limits::FJALL_WORKERS_MAX);
        let db =
            Database::builder(dir.join("fjall")).cache_size(opts.cache_bytes).worker_threads(workers).open().map_err(
                |e| match e {
                    fjall::Error::Locked => Error::DataDir {
                        path: dir.to_path_buf(),
                        source: std::io::Error::other("in use by another orbmanager process"),
                    },
                    e => Error::Engine(e),
                },
            )?;
        let handles: Vec<Keyspace> =
            Ks::ALL.iter().map(|k| db.keyspace(k.name(), || keyspace_options(*k, opts))).collect::<Result<_, _>>()?;
        let handles: [Keyspace; Ks::ALL.len()] =
            handles.try_into().unwrap_or_else(|_| unreachable!("one handle per keyspace"));
        let ks = Keyspaces(Arc::new(handles));
        let kept = ks.telemetry_blob_min_bytes();
        if kept != opts.telemetry_blob_min_bytes {
            tracing::warn!(
                configured = opts.telemetry_blob_min_bytes,
                kept,
                "storage.telemetry_blob_min_bytes applies when a store is created; this store keeps what it was created with"
            );
        }
        let meta = ks.get(Ks::Meta);
        match meta.get(META_FORMAT)? {
            None => {
                meta.insert(META_FORMAT, [FORMAT_VERSION])?;
                db.persist(PersistMode::SyncAll)?;
            }
            Some(v) if v.first() == Some(&FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::UnsupportedVersion {
                    what: "store",
                    found: v.first().copied().unwrap_or(0),
                    supported: FORMAT_VERSION,
                });
            }
        }
        let committer = Committer::start(
            db.clone(),
            ks.clone(),
            opts.commit_queue_max,
            opts.dedupe_filter_bytes,
            opts.commit_linger,
            metrics.clone(),
        );
        Ok(Store { db, ks, committer, metrics })
    }

    /// Commits everything queued, fsyncs and stops the committer. Idempotent.
    pub fn close(&self) {
        self.committer.shutdown();
    }

    /// What the telemetry keyspace has not flushed, merged or collected yet (fjall slows and
    /// stops writers on the first two: see [`TelemetryBacklog`]).
    pub fn telemetry_backlog(&self) -> TelemetryBacklog {
        let ks = self.ks.get(Ks::Telemetry);
        TelemetryBacklog {
            l0_tables: ks.l0_table_count(),
            l0_runs: fjall::AbstractTree::l0_run_count(&ks.tree),
            sealed_memtables: ks.sealed_memtable_count(),
            blob_files: ks.blob_file_count(),
            blob_stale_bytes: ks.fragmented_blob_bytes(),
        }
    }

    /// Writes the telemetry keyspace's memtable out (a table, and blob files for separated
    /// values) and waits for it; for benches and tests, which would otherwise read from memory.
    #[doc(hidden)]
    pub fn flush_telemetry(&self) -> Result<(), Error> {
        Ok(self.ks.get(Ks::Telemetry).rotate_memtable_and_wait()?)
    }

    /// Makes `batch` durable.
    pub async fn commit(&self, batch: Batch) -> Result<Outcome, Error> {
        self.committer.commit(batch).await
    }

    /// Makes `batch` durable from a thread that is not async.
    pub fn commit_blocking(&self, batch: Batch) -> Result<Outcome, Error> {
        self.committer.commit_blocking(batch)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    // ---- batch builders: encoding happens in the caller's thread, not the committer's ----

    /// Adds a telemetry point (and its `msg_id` probe) to `batch`.
    pub fn add_telemetry(batch: &mut Batch, key: &OrbKey, point: &TelemetryPoint, received_ms: u64, raw: &[u8]) {
        // The suffix makes keys unique per point at the same millisecond: the hash of the msg_id
        // when there is one, else of the payload (an exact resend is the same point).
        let suffix = match &point.msg_id {
            Some(id) => hash64(id.as_bytes()),
            None => hash64(raw),
        };
        // Encoded as a `StoredPoint`, without copying the point into one.
        #[derive(Serialize)]
        struct StoredPointRef<'a> {
            point: &'a TelemetryPoint,
            received_ms: u64,
        }
        let stored = StoredPointRef { point, received_ms };
        let size = 64 + point.msg_id.as_ref().map_or(0, String::len) + point.metrics.encoded_len_hint();
        batch.put(Ks::Telemetry, keys::telemetry(key, point.ts, suffix), codec::encode_sized(&stored, size));
        if let Some(id) = &point.msg_id {
            let bucket = dedupe::DedupeFilter::bucket(received_ms);
            let mut ident = keys::orb_with_room(key, 1 + id.len());
            ident.push(0);
            ident.extend_from_slice(id.as_bytes());
            batch.dedupe = Some(DedupeProbe {
                id: ident,
                bucket,
                current: keys::dedupe(key, bucket, id),
                previous: keys::dedupe(key, bucket.saturating_sub(1), id),
            });
        }
    }

    pub fn add_orb(batch: &mut Batch, record: &OrbRecord) {
        batch.put(Ks::Orbs, keys::orb(&record.key()), encode(record));
    }

    pub fn add_tenant(batch: &mut Batch, record: &TenantRecord) {
        batch.put(Ks::Tenants, record.tenant.as_str().as_bytes().to_vec(), encode(record));
    }

    pub fn add_presence(batch: &mut Batch, key: &OrbKey, presence: &Presence) {
        batch.put(Ks::Presence, keys::orb(key), encode(presence));
    }

    pub fn add_reported(batch: &mut Batch, key: &OrbKey, reported: &Reported) {
        batch.put(Ks::Reported, keys::orb(key), encode(reported));
    }

    /// Adds one entry of an orb's component version history.
    pub fn add_version_change(batch: &mut Batch, key: &OrbKey, change: &VersionChange) {
        batch.put(Ks::Versions, keys::version_change(key, change.at_ms, &change.component), encode(change));
    }

    /// An orb's version history, oldest first, strictly after the entry `after` (its time and
    /// component), only `component` when given; at most `limit` entries and whether more follow.
    pub fn version_changes(
        &self,
        key: &OrbKey,
        after: Option<(u64, &str)>,
        component: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<VersionChange>, bool), Error> {
        let prefix = keys::telemetry_prefix(key);
        let lo = match after {
            Some((at, c)) => {
                let mut k = keys::version_change(key, at, c);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut hi = prefix;
        hi.extend_from_slice(&[0xff; 9]);
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Versions).range(lo..hi) {
            let change: VersionChange = decode("version change", &guard.value()?)?;
            if component.is_some_and(|c| c != change.component) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(change);
        }
        Ok((out, false))
    }

    /// Writes a command; keeps the pending index (value: the command's deadline, 0 for none)
    /// in step with its status.
    pub fn add_command(batch: &mut Batch, key: &OrbKey, cmd: &Command) {
        let k = keys::command(key, cmd.seq);
        batch.put(Ks::Commands, k.clone(), encode(cmd));
        if cmd.status.is_terminal() {
            batch.delete(Ks::Pending, k);
        } else {
            batch.put(Ks::Pending, k, cmd.deadline().unwrap_or(0).to_be_bytes().to_vec());
        }
    }

    pub fn add_idempotency(batch: &mut Batch, key: &OrbKey, idem: &str, seq: u64, body_hash: u64) {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(&body_hash.to_be_bytes());
        batch.put(Ks::Idempotency, keys::idempotency(key, idem), v);
    }

    pub fn add_api_token(batch: &mut Batch, hash: &[u8; 32], t: &ApiToken) {
        batch.put(Ks::ApiTokens, keys::api_token(t.tenant.as_str(), hash), encode(t));
    }

    pub fn api_token(&self, tenant: &TenantId, hash: &[u8; 32]) -> Result<Option<ApiToken>, Error> {
        self.get_decoded(Ks::ApiTokens, "api token", &keys::api_token(tenant.as_str(), hash))
    }

    /// Every API token of a tenant, with the hash that keys it.
    pub fn api_tokens(&self, tenant: &TenantId) -> Result<Vec<([u8; 32], ApiToken)>, Error> {
        let prefix = keys::tenant_prefix(tenant.as_str());
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::ApiTokens).prefix(&prefix) {
            let (k, v) = guard.into_inner()?;
            let hash: [u8; 32] = k[prefix.len()..]
                .try_into()
                .map_err(|_| Error::Corrupt { what: "api token key", detail: format!("{} bytes", k.len()) })?;
            out.push((hash, decode("api token", &v)?));
        }
        Ok(out)
    }

    /// A tenant's device CA (key `t`), or the platform server CA (key `0`: not a tenant id).
    pub fn add_ca(batch: &mut Batch, tenant: Option<&TenantId>, ca: &StoredCa) {
        batch.put(Ks::Cas, keys::ca(tenant.map(TenantId::as_str)), encode(ca));
    }

    pub fn ca(&self, tenant: Option<&TenantId>) -> Result<Option<StoredCa>, Error> {
        self.get_decoded(Ks::Cas, "certificate authority", &keys::ca(tenant.map(TenantId::as_str)))
    }

    /// Records a revoked device certificate (checked by the mTLS listener).
    pub fn add_revoked(batch: &mut Batch, key: &OrbKey, serial: &str, at_ms: u64) {
        batch.put(Ks::Revoked, keys::revoked(key.tenant.as_str(), serial), encode(&(key.orb.clone(), at_ms)));
    }

    pub fn is_revoked(&self, tenant: &TenantId, serial: &str) -> Result<bool, Error> {
        Ok(self.ks.get(Ks::Revoked).contains_key(keys::revoked(tenant.as_str(), serial))?)
    }

    pub fn add_broadcast(batch: &mut Batch, b: &Broadcast) {
        batch.put(Ks::Broadcasts, keys::broadcast(b.tenant.as_str(), &b.id), encode(b));
    }

    pub fn add_broadcast_targets(batch: &mut Batch, tenant: &TenantId, id: &str, targets: &[OrbId]) {
        batch.put(Ks::BroadcastTargets, keys::broadcast(tenant.as_str(), id), encode(&targets));
    }

    // ---- reads ----

    pub fn broadcast(&self, tenant: &TenantId, id: &str) -> Result<Option<Broadcast>, Error> {
        self.get_decoded(Ks::Broadcasts, "broadcast", &keys::broadcast(tenant.as_str(), id))
    }

    pub fn broadcast_targets(&self, tenant: &TenantId, id: &str) -> Result<Vec<OrbId>, Error> {
        Ok(self
            .get_decoded(Ks::BroadcastTargets, "broadcast targets", &keys::broadcast(tenant.as_str(), id))?
            .unwrap_or_default())
    }

    /// Every stored broadcast, oldest first within a tenant.
    pub fn broadcasts(&self) -> Result<Vec<Broadcast>, Error> {
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Broadcasts).iter() {
            out.push(decode("broadcast", &guard.value()?)?);
        }
        Ok(out)
    }

    /// Registered orb ids of a tenant after `after`, in id order, at most `limit`.
    pub fn orb_ids_after(&self, tenant: &TenantId, after: Option<&str>, limit: usize) -> Result<Vec<OrbId>, Error> {
        let prefix = keys::tenant_prefix(tenant.as_str());
        let mut lo = prefix.clone();
        if let Some(a) = after {
            lo.extend_from_slice(a.as_bytes());
            lo.push(0); // strictly after `a`: ids never contain 0x00
        }
        let mut hi = prefix.clone();
        hi.push(0xff);
        let mut out = Vec::with_capacity(limit.min(4096));
        for guard in self.ks.get(Ks::Orbs).range(lo..hi) {
            if out.len() >= limit {
                break;
            }
            let k = guard.key()?;
            let id = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|e| Error::Corrupt { what: "orb key", detail: e.to_string() })?;
            out.push(OrbId::parse(id).map_err(|e| Error::Corrupt { what: "orb key", detail: e.to_string() })?);
        }
        Ok(out)
    }

    /// Registered orbs of one tenant (a scan of its keys).
    pub fn tenant_orb_count(&self, tenant: &TenantId) -> Result<u64, Error> {
        let mut n = 0;
        for guard in self.ks.get(Ks::Orbs).prefix(keys::tenant_prefix(tenant.as_str())) {
            guard.key()?;
            n += 1;
        }
        Ok(n)
    }

    /// One command by sequence number.
    pub fn command(&self, key: &OrbKey, seq: u64) -> Result<Option<Command>, Error> {
        self.get_decoded(Ks::Commands, "command", &keys::command(key, seq))
    }

    /// Commands of one orb in sequence order, after `after_seq`, at most `limit`.
    pub fn commands(&self, key: &OrbKey, after_seq: u64, limit: usize) -> Result<Vec<Command>, Error> {
        let Some(start) = after_seq.checked_add(1) else { return Ok(Vec::new()) };
        let lo = keys::command(key, start);
        let hi = keys::command(key, u64::MAX);
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Commands).range(lo..=hi) {
            if out.len() >= limit {
                break;
            }
            out.push(decode("command", &guard.value()?)?);
        }
        Ok(out)
    }

    /// The non-terminal commands of one orb, in sequence order.
    pub fn pending_commands(&self, key: &OrbKey) -> Result<Vec<Command>, Error> {
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Pending).prefix(keys::command_prefix(key)) {
            let k = guard.key()?;
            match self.get_decoded::<Command>(Ks::Commands, "command", &k)? {
                Some(c) => out.push(c),
                None => return Err(Error::Corrupt { what: "pending index", detail: "entry without a command".into() }),
            }
        }
        Ok(out)
    }

    /// The highest sequence number used by an orb (0 when none).
    pub fn last_command_seq(&self, key: &OrbKey) -> Result<u64, Error> {
        match self.ks.get(Ks::Commands).prefix(keys::command_prefix(key)).next_back() {
            Some(guard) => Ok(keys::command_seq(&guard.key()?).unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// What an idempotency key was used for: `(seq, body_hash)`.
    pub fn idempotency(&self, key: &OrbKey, idem: &str) -> Result<Option<(u64, u64)>, Error> {
        match self.ks.get(Ks::Idempotency).get(keys::idempotency(key, idem))? {
            Some(v) if v.len() == 16 => {
                let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                let hash = u64::from_be_bytes(v[8..].try_into().expect("8 bytes"));
                Ok(Some((seq, hash)))
            }
            Some(_) => Err(Error::Corrupt { what: "idempotency", detail: "value is not 16 bytes".into() }),
            None => Ok(None),
        }
    }

    /// The earliest command deadline of every orb that has one (start-up scan of the pending
    /// index; values only, no command records).
    pub fn pending_deadlines(&self) -> Result<Vec<(OrbKey, u64)>, Error> {
        let mut out: Vec<(OrbKey, u64)> = Vec::new();
        for guard in self.ks.get(Ks::Pending).iter() {
            let (k, v) = guard.into_inner()?;
            let deadline = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
            if deadline == 0 {
                continue;
            }
            let Some(orb) = keys::command_orb(&k) else { continue };
            match out.last_mut() {
                Some((last, d)) if *last == orb => *d = (*d).min(deadline),
                _ => out.push((orb, deadline)),
            }
        }
        Ok(out)
    }

    // ---- reads of orbs ----

    fn get_decoded<T: serde::de::DeserializeOwned>(
        &self,
        which: Ks,
        what: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, Error> {
        match self.ks.get(which).get(key)? {
            Some(v) => decode(what, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every tenant's id.
    pub fn tenant_ids(&self) -> Result<Vec<TenantId>, Error> {
        let mut out = Vec::new();
        for g in self.ks.get(Ks::Tenants).iter() {
            let k = g.key()?;
            let s = String::from_utf8_lossy(&k);
            if let Ok(t) = TenantId::parse(&s) {
                out.push(t);
            }
        }
        Ok(out)
    }

    pub fn tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, Error> {
        self.get_decoded(Ks::Tenants, "tenant", tenant.as_str().as_bytes())
    }

    pub fn orb(&self, key: &OrbKey) -> Result<Option<OrbRecord>, Error> {
        self.get_decoded(Ks::Orbs, "orb", &keys::orb(key))
    }

    pub fn presence(&self, key: &OrbKey) -> Result<Option<Presence>, Error> {
        self.get_decoded(Ks::Presence, "presence", &keys::orb(key))
    }

    pub fn reported(&self, key: &OrbKey) -> Result<Option<Reported>, Error> {
        self.get_decoded(Ks::Reported, "reported", &keys::orb(key))
    }

    /// The orb's point with the greatest device time.
    pub fn latest_point(&self, key: &OrbKey) -> Result<Option<StoredPoint>, Error> {
        match self.ks.get(Ks::Telemetry).prefix(keys::telemetry_prefix(key)).next_back() {
            Some(guard) => {
                let v = guard.value()?;
                decode("telemetry", &v).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The orb's point with the greatest device time in `[from, to]`.
    pub fn latest_point_between(&self, key: &OrbKey, from: u64, to: u64) -> Result<Option<StoredPoint>, Error> {
        if from > to {
            return Ok(None);
        }
        let (lo, hi) = (keys::telemetry(key, from, 0), keys::telemetry(key, to, u64::MAX));
        match self.ks.get(Ks::Telemetry).range(lo..=hi).next_back() {
            Some(guard) => decode("telemetry", &guard.value()?).map(Some),
            None => Ok(None),
        }
    }

    /// Points of one orb with `from <= ts <= to`, in device-time order, at most `limit`,
    /// starting strictly after the cursor `after` (a `(ts, suffix)` returned earlier).
    pub fn points(
        &self,
        key: &OrbKey,
        from: u64,
        to: u64,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<(PointCursor, StoredPoint)>, Error> {
        let lo = match after {
            Some((ts, suffix)) if ts >= from => match suffix.checked_add(1) {
                Some(next) => keys::telemetry(key, ts, next),
                None => match ts.checked_add(1) {
                    Some(t) => keys::telemetry(key, t, 0),
                    None => return Ok(Vec::new()),
                },
            },
            _ => keys::telemetry(key, from, 0),
        };
        let hi = keys::telemetry(key, to, u64::MAX);
        if from > to || lo > hi {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for guard in self.ks.get(Ks::Telemetry).range(lo..=hi) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = guard.into_inner()?;
            let cursor = keys::telemetry_cursor(&k)
                .ok_or_else(|| Error::Corrupt { what: "telemetry key", detail: format!("{} bytes", k.len()) })?;
            out.push((cursor, decode("telemetry", &v)?));
        }
        Ok(out)
    }

    /// Calls `f` for every registered orb, in key order; returns how many there were.
    pub fn for_each_orb(&self, mut f: impl FnMut(OrbRecord) -> Result<(), Error>) -> Result<usize, Error> {
        let mut n = 0;
        for guard in self.ks.get(Ks::Orbs).iter() {
            f(decode("orb", &guard.value()?)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Number of registered orbs (exact; a scan of the registry keys).
    pub fn orb_count(&self) -> Result<usize, Error> {
        Ok(self.ks.get(Ks::Orbs).len()?)
    }

    /// Registers many orbs at once with one fsync, bypassing the committer (bulk import,
    /// benches and tests that need a big registry). Existing records are overwritten.
    pub fn import_orbs(&self, records: &[OrbRecord]) -> Result<(), Error> {
        let mut tenants = std::collections::BTreeSet::new();
        for chunk in records.chunks(10_000) {
            let mut wb = self.db.batch();
            for r in chunk {
                if tenants.insert(r.tenant.clone()) && self.tenant(&r.tenant)?.is_none() {
                    let t = TenantRecord { tenant: r.tenant.clone(), created_ms: r.created_ms };
                    wb.insert(self.ks.get(Ks::Tenants), r.tenant.as_str().as_bytes().to_vec(), encode(&t));
                }
                wb.insert(self.ks.get(Ks::Orbs), keys::orb(&r.key()), encode(r));
            }
            wb.commit()?;
        }
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Deletes dedupe buckets that can no longer match (older than the previous bucket).
    /// Returns how many entries were removed.
    pub fn sweep_dedupe(&self, now_ms: u64) -> Result<usize, Error> {
        let current = dedupe::DedupeFilter::bucket(now_ms);
        let Some(oldest_kept) = current.checked_sub(1) else { return Ok(0) };
        let dedupe = self.ks.get(Ks::Dedupe);
        let mut removed = 0;
        for tenant in self.tenant_ids()? {
            let lo = keys::dedupe_bucket_prefix(tenant.as_str(), 0);
            let hi = keys::dedupe_bucket_prefix(tenant.as_str(), oldest_kept);
            let stale: Vec<_> = dedupe.range(lo..hi).map(|g| g.key()).collect::<Result<_, _>>()?;
            for chunk in stale.chunks(10_000) {
                let mut wb = self.db.batch();
                for k in chunk {
                    wb.remove(dedupe, k.clone());
                }
                wb.commit()?;
                removed += chunk.len();
            }
        }
        Ok(removed)
    }
}
