//! Command operations for operators: create, read, list, cancel, broadcasts.

use super::{Access, Api, Principal, given, internal, invalid};
use crate::error::{ApiError, ErrorCode};
use crate::limits::COMMANDS_PAGE_MAX;
use crate::model::OrbKey;
use crate::model::broadcast::BroadcastRequest;
use crate::model::command::{Command, CommandStatus, CreateRequest, seq_of};

impl Api {
    fn existing_orb(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        need: Access,
    ) -> Result<OrbKey, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, need)?;
        self.ensure_orb(&key)?;
        Ok(key)
    }

    /// Creates a command; `(command, true)` when created, `false` when an identical request
    /// with the same idempotency key was answered before.
    pub async fn create_command(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        req: CreateRequest,
    ) -> Result<(Command, bool), ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Operate)?;
        let req = req.validate(self.now_ms())?;
        self.ensure_orb(&key)?;
        self.fleet().create_command(&key, req).await
    }

    pub fn get_command(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        command_id: &str,
    ) -> Result<Command, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Read)?;
        self.command_of(&key, command_id)
    }

    /// One command of an orb the caller was already authorized for.
    pub fn command_of(&self, key: &OrbKey, command_id: &str) -> Result<Command, ApiError> {
        let missing = || ApiError::new(ErrorCode::NotFound, format!("orb {} has no command {command_id}", key.orb));
        let seq = seq_of(command_id).ok_or_else(missing)?;
        match self.store().command(key, seq).map_err(internal)? {
            Some(c) if c.command_id == command_id => Ok(c),
            _ => Err(missing()),
        }
    }

    /// Commands of an orb as stored: `status` is `pending` (every non-terminal one), a state,
    /// or absent (all, paged by sequence number).
    pub fn list_commands(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        status: Option<&str>,
        limit: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<Command>, Option<String>), ApiError> {
        let key = self.existing_orb(p, tenant_id, orb_id, Access::Read)?;
        let status = match given(status) {
            None => None,
            Some("pending") => Some(None),
            Some(s) => Some(Some(CommandStatus::parse(s).ok_or_else(|| invalid(format!("unknown status {s:?}")))?)),
        };
        if status == Some(None) {
            return Ok((self.store().pending_commands(&key).map_err(internal)?, None));
        }
        let limit = if limit == 0 { 100 } else { limit };
        if limit > COMMANDS_PAGE_MAX {
            return Err(invalid(format!("limit must be 1..{COMMANDS_PAGE_MAX}")));
        }
        let mut after: u64 = match given(page_token) {
            Some(t) => t.parse().map_err(|_| invalid("page_token is not one this server issued"))?,
            None => 0,
        };
        // Scan a bounded window per request; a filter that matches rarely pages on.
        let scan = limit * 10;
        let rows = self.store().commands(&key, after, scan).map_err(internal)?;
        let mut out = Vec::new();
        let mut more = rows.len() == scan;
        for c in rows {
            after = c.seq;
            if status.flatten().is_none_or(|s| s == c.status) {
                out.push(c);
                if out.len() == limit {
                    more = true;
                    break;
                }
            }
        }
        Ok((out, more.then(|| after.to_string())))
    }

    pub async fn cancel_command(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        command_id: &str,
    ) -> Result<Command, ApiError> {
        let key = self.existing_orb(p, tenant_id, orb_id, Access::Operate)?;
        self.fleet().cancel_command(&key, command_id.to_string()).await
    }

    pub async fn start_broadcast(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        req: BroadcastRequest,
    ) -> Result<serde_json::Value, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        let (b, target) = req.validate(tenant, self.now_ms())?;
        self.fleet().start_broadcast(b, target).await
    }

    pub async fn get_broadcast(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        self.fleet().broadcast(&tenant, id).await
    }

    pub async fn cancel_broadcast(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        self.fleet().cancel_broadcast(&tenant, id).await
    }
}
