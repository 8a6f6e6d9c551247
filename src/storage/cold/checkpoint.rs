//! Checkpoints: a consistent copy of every keyspace but hot telemetry and the dedupe index
//! (registry, presence and reported state, command queues, tokens, CAs, rules, alerts,
//! webhooks and their outbox, the event log, the cold manifest) in object storage, so a node
//! whose disk is lost can be rebuilt with `orbmanager restore`.
//!
//! File `checkpoints/<created_ms>.ckpt`: `ORBCKPT1`, created_ms:u64, then entries
//! `1 name_len:u8 name key_len:u32 key value_len:u32 value`, then `0 entries:u64` and the
//! SHA-256 of everything before it. `checkpoints/LATEST` (JSON) names the newest complete one;
//! it is written only after the file, so a crash mid-upload leaves the previous one current.
//! Written from a fjall snapshot (one sequence number across keyspaces) and streamed in 8 MiB
//! multipart chunks, so memory stays bounded whatever the registry size.

use std::io::{Read, Write};

use object_store::ObjectStoreExt as _;
use object_store::WriteMultipart;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Cold, ColdError, task};
use crate::storage::{Error as StoreError, Ks, Store};

const MAGIC: &[u8; 8] = b"ORBCKPT1";
const CHUNK: usize = 8 * 1024 * 1024;
/// Checkpoints kept in the object store (older ones are deleted after a new one is complete).
pub const CHECKPOINTS_KEPT: usize = 3;

/// What `checkpoints/LATEST` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub path: String,
    pub created_ms: u64,
    pub entries: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Keyspaces a checkpoint carries: all but hot telemetry (the cold tier and the hot window
/// cover it) and the `msg_id` dedupe index (ten minutes of ids).
fn checkpointed(ks: Ks) -> bool {
    !matches!(ks, Ks::Telemetry | Ks::Dedupe)
}

impl Store {
    /// Streams every checkpointed entry of one consistent snapshot to `emit` as encoded frames.
    fn snapshot_frames(&self, mut emit: impl FnMut(Vec<u8>) -> bool) -> Result<u64, StoreError> {
        use fjall::Readable as _;
        let snap = self.db.snapshot();
        let mut n = 0u64;
        let mut buf = Vec::with_capacity(CHUNK + 64 * 1024);
        for ks in Ks::ALL.into_iter().filter(|k| checkpointed(*k)) {
            let name = ks.name().as_bytes();
            for g in snap.iter(self.ks.get(ks)) {
                let (k, v) = g.into_inner()?;
                buf.push(1);
                buf.push(name.len() as u8);
                buf.extend_from_slice(name);
                buf.extend_from_slice(&(k.len() as u32).to_be_bytes());
                buf.extend_from_slice(&k);
                buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
                buf.extend_from_slice(&v);
                n += 1;
                if buf.len() >= CHUNK && !emit(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 64 * 1024))) {
                    return Err(StoreError::Closed);
                }
            }
        }
        emit(buf);
        Ok(n)
    }

    /// Writes one restored entry batch.
    fn import_frames(&self, entries: &[(Ks, Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let mut wb = self.db.batch();
        for (ks, k, v) in entries {
            wb.insert(self.ks.get(*ks), k.clone(), v.clone());
        }
        wb.commit()?;
        Ok(())
    }

    /// True when no orb, tenant or command is stored (a fresh data dir).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        for ks in [Ks::Tenants, Ks::Orbs, Ks::Commands, Ks::Telemetry] {
            if self.ks.get(ks).first_key_value().is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn persist_all(&self) -> Result<(), StoreError> {
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

impl Cold {
    /// Writes a checkpoint and makes it `LATEST`; deletes checkpoints beyond the newest
    /// [`CHECKPOINTS_KEPT`].
    pub async fn checkpoint(&self, now_ms: u64) -> Result<CheckpointInfo, ColdError> {
        let r = self.write_checkpoint(now_ms).await;
        let m = self.store().metrics();
        match &r {
            Ok(_) => m.checkpoints.inc(),
            Err(_) => m.checkpoint_failures.inc(),
        }
        r
    }

    async fn write_checkpoint(&self, now_ms: u64) -> Result<CheckpointInfo, ColdError> {
        let rel = format!("checkpoints/{now_ms:013}.ckpt");
        let upload = self.objects().put_multipart(&self.path(&rel)).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&now_ms.to_be_bytes());
        let mut hash = Sha256::new();
        hash.update(&header);
        w.write(&header);
        let mut bytes = header.len() as u64;

        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let store = self.store().clone();
        let producer =
            tokio::task::spawn_blocking(move || store.snapshot_frames(|chunk| tx.blocking_send(chunk).is_ok()));
        while let Some(chunk) = rx.recv().await {
            hash.update(&chunk);
            bytes += chunk.len() as u64;
            w.wait_for_capacity(4).await?;
            w.write(&chunk);
        }
        let entries = match task(producer.await)? {
            Ok(n) => n,
            Err(e) => {
                w.abort().await?;
                return Err(e.into());
            }
        };
        let mut trailer = vec![0u8];
        trailer.extend_from_slice(&entries.to_be_bytes());
        hash.update(&trailer);
        let digest = hash.finalize();
        trailer.extend_from_slice(&digest);
        bytes += trailer.len() as u64;
        w.write(&trailer);
        w.finish().await?;

        let info = CheckpointInfo { path: rel, created_ms: now_ms, entries, bytes, sha256: hex::encode(digest) };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ColdError::Invalid(e.to_string()))?;
        self.objects().put(&self.path("checkpoints/LATEST"), json.into()).await?;
        self.prune_checkpoints().await?;
        tracing::info!(entries, bytes, path = %info.path, "checkpoint written");
        Ok(info)
    }

    async fn prune_checkpoints(&self) -> Result<(), ColdError> {
        use futures::TryStreamExt as _;
        let mut all: Vec<_> = self
            .objects()
            .list(Some(&self.path("checkpoints")))
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter(|m| m.location.as_ref().ends_with(".ckpt"))
            .map(|m| m.location)
            .collect();
        all.sort();
        let excess = all.len().saturating_sub(CHECKPOINTS_KEPT);
        for old in all.into_iter().take(excess) {
            self.objects().delete(&old).await?;
        }
        Ok(())
    }

    /// The newest complete checkpoint, if any.
    pub async fn latest_checkpoint(&self) -> Result<Option<CheckpointInfo>, ColdError> {
        match self.objects().get(&self.path("checkpoints/LATEST")).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ColdError::Invalid(format!("checkpoints/LATEST is not readable: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Rebuilds an empty store from a checkpoint (`LATEST` unless `path` names one), then adds
    /// cold files spilled after it from the manifest mirrors. Verifies the checksum before
    /// writing anything. Returns the checkpoint and how many entries were restored.
    pub async fn restore(
        &self,
        path: Option<&str>,
        scratch: &std::path::Path,
    ) -> Result<(CheckpointInfo, u64), ColdError> {
        if !self.store().is_empty()? {
            return Err(ColdError::Invalid(
                "the data directory already holds data; restore only into an empty one".into(),
            ));
        }
        let info = match path {
            Some(p) => {
                CheckpointInfo { path: p.to_string(), created_ms: 0, entries: 0, bytes: 0, sha256: String::new() }
            }
            None => self
                .latest_checkpoint()
                .await?
                .ok_or_else(|| ColdError::Invalid(format!("no checkpoint under {}", self.url())))?,
        };
        // Download to a scratch file (bounded memory), verify, then import.
        let tmp = scratch.join("restore.ckpt.tmp");
        let mut file =
            std::fs::File::create(&tmp).map_err(|e| ColdError::Invalid(format!("{}: {e}", tmp.display())))?;
        let mut stream = self.objects().get(&self.path(&info.path)).await?.into_stream();
        use futures::StreamExt as _;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).map_err(|e| ColdError::Invalid(format!("{}: {e}", tmp.display())))?;
        }
        file.sync_all().map_err(|e| ColdError::Invalid(e.to_string()))?;
        drop(file);
        let store = self.store().clone();
        let expected = info.sha256.clone();
        let t = tmp.clone();
        let (created_ms, n) = task(tokio::task::spawn_blocking(move || import_file(&store, &t, &expected)).await)??;
        let _ = std::fs::remove_file(&tmp);
        // Files spilled after the checkpoint are found through their manifest mirrors.
        let known: std::collections::HashSet<String> = self.all_objects()?.into_iter().map(|o| o.path).collect();
        let newer: Vec<_> = self.read_mirrors().await?.into_iter().filter(|o| !known.contains(&o.path)).collect();
        let store = self.store().clone();
        task(tokio::task::spawn_blocking(move || store.import_cold_objects(&newer)).await)??;
        // Files deleted by retention after the checkpoint are no longer referenced.
        let missing = self.drop_missing().await?;
        if missing > 0 {
            tracing::info!(files = missing, "restore: dropped manifest entries of files retention has deleted");
        }
        Ok((CheckpointInfo { created_ms, entries: n, ..info }, n))
    }
}

fn corrupt(detail: impl Into<String>) -> ColdError {
    ColdError::Invalid(format!("checkpoint is corrupt: {}", detail.into()))
}

/// Verifies a downloaded checkpoint, then writes its entries. Returns (created_ms, entries).
fn import_file(store: &Store, path: &std::path::Path, expected_sha: &str) -> Result<(u64, u64), ColdError> {
    let open = || std::fs::File::open(path).map_err(|e| ColdError::Invalid(format!("{}: {e}", path.display())));
    // Pass 1: the checksum over everything before the digest.
    let len = std::fs::metadata(path).map_err(|e| ColdError::Invalid(e.to_string()))?.len();
    if len < (MAGIC.len() + 8 + 1 + 8 + 32) as u64 {
        return Err(corrupt(format!("{len} bytes")));
    }
    let mut r = std::io::BufReader::new(open()?);
    let mut hash = Sha256::new();
    let mut left = len - 32;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).map_err(|e| corrupt(e.to_string()))?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    let mut digest = [0u8; 32];
    r.read_exact(&mut digest).map_err(|e| corrupt(e.to_string()))?;
    if hash.finalize().as_slice() != digest {
        return Err(corrupt("checksum mismatch"));
    }
    if !expected_sha.is_empty() && hex::encode(digest) != expected_sha {
        return Err(corrupt("checksum differs from LATEST"));
    }
    // Pass 2: the entries.
    let mut r = std::io::BufReader::new(open()?);
    let mut head = [0u8; 16];
    r.read_exact(&mut head).map_err(|e| corrupt(e.to_string()))?;
    if &head[..8] != MAGIC {
        return Err(corrupt("not a checkpoint file"));
    }
    let created_ms = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
    let mut batch = Vec::new();
    let mut n = 0u64;
    let read_u32 = |r: &mut dyn Read| -> Result<u32, ColdError> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|e| corrupt(e.to_string()))?;
        Ok(u32::from_be_bytes(b))
    };
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(|e| corrupt(e.to_string()))?;
        if tag[0] == 0 {
            let mut count = [0u8; 8];
            r.read_exact(&mut count).map_err(|e| corrupt(e.to_string()))?;
            if u64::from_be_bytes(count) != n {
                return Err(corrupt("entry count differs"));
            }
            break;
        }
        let mut name_len = [0u8; 1];
        r.read_exact(&mut name_len).map_err(|e| corrupt(e.to_string()))?;
        let mut name = vec![0u8; name_len[0] as usize];
        r.read_exact(&mut name).map_err(|e| corrupt(e.to_string()))?;
        let name = String::from_utf8(name).map_err(|_| corrupt("keyspace name"))?;
        let ks = Ks::ALL
            .into_iter()
            .find(|k| k.name() == name && checkpointed(*k))
            .ok_or_else(|| corrupt(format!("unknown keyspace {name}")))?;
        let kl = read_u32(&mut r)? as usize;
        let mut k = vec![0u8; kl];
        r.read_exact(&mut k).map_err(|e| corrupt(e.to_string()))?;
        let vl = read_u32(&mut r)? as usize;
        let mut v = vec![0u8; vl];
        r.read_exact(&mut v).map_err(|e| corrupt(e.to_string()))?;
        batch.push((ks, k, v));
        n += 1;
        if batch.len() >= 10_000 {
            store.import_frames(&batch)?;
            batch.clear();
        }
    }
    store.import_frames(&batch)?;
    store.persist_all()?;
    Ok((created_ms, n))
}
