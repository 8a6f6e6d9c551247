//! The operator API, independent of transport. REST (`net/http`) and gRPC (`net/grpc`) both
//! authenticate a caller into a [`Principal`] and call these operations, so the two surfaces
//! cannot drift apart in what they allow or answer. Operations return model types and
//! [`ApiError`]s; only `net` turns them into JSON or protobuf.

pub mod alerts;
pub mod auth;
pub mod commands;
pub mod events;
pub mod orbs;
pub mod storage;
pub mod tenants;

use std::sync::Arc;

pub use auth::{Access, Principal, Role};

use crate::actors::Fleet;
use crate::error::{ApiError, ErrorCode};
use crate::net::ingest::Ingest;
use crate::storage::Store;

/// What the operations need.
pub struct Api {
    pub ingest: Arc<Ingest>,
    pub dev: bool,
    /// Bootstrap operator token (`auth.admin_token`); empty disables it.
    pub admin_token: String,
    /// Serializes tenant creation (exists-then-create).
    pub tenant_lock: tokio::sync::Mutex<()>,
    /// Turns true when the server drains: live streams end so listeners can stop.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// The cold tier: history across tiers, spills, checkpoints, exports.
    pub storage: storage::StorageApi,
}

impl Api {
    pub fn new(
        ingest: Arc<Ingest>,
        dev: bool,
        admin_token: String,
        closing: tokio::sync::watch::Receiver<bool>,
        storage: storage::StorageApi,
    ) -> Api {
        Api { ingest, dev, admin_token, tenant_lock: tokio::sync::Mutex::new(()), closing, storage }
    }
}

impl Api {
    pub fn fleet(&self) -> &Fleet {
        &self.ingest.fleet
    }

    pub fn store(&self) -> &Store {
        &self.ingest.store
    }

    pub fn now_ms(&self) -> u64 {
        self.ingest.clock.now_ms()
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e)
}

/// An empty string is "not given" (protobuf has no absent strings).
pub(crate) fn given(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}
