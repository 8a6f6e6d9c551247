//! Command endpoints: create (idempotent), list and read (from the store: reads never
//! activate an actor), cancel, and the device's HTTP fallback (pull pending, acknowledge).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{self, Caller};
use super::{HttpCtx, Problem, TenantQuery, bad, not_found, operator_orb, orb_key, parse_json};
use crate::error::{ApiError, ErrorCode};
use crate::limits::COMMANDS_PAGE_MAX;
use crate::model::OrbKey;
use crate::model::broadcast::BroadcastRequest;
use crate::model::command::{Command, CommandStatus, CreateRequest, parse_ack, seq_of};

type Ctx = State<Arc<HttpCtx>>;

fn ensure_orb(ctx: &HttpCtx, key: &OrbKey) -> Result<(), Problem> {
    match ctx.ingest.store.orb(key).map_err(ApiError::internal)? {
        Some(_) => Ok(()),
        None => Err(not_found(key)),
    }
}

/// `POST /v1/orbs/{id}/commands`: 201 when created, 200 when an identical request with the
/// same `idempotency_key` was answered before, 409 when the key was used for another body.
pub async fn create(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let key = operator_orb(&ctx, &headers, q.tenant_id.as_deref(), &id)?;
    let req: CreateRequest = parse_json(&body)?;
    let req = req.validate(ctx.ingest.clock.now_ms())?;
    ensure_orb(&ctx, &key)?;
    let (cmd, created) = ctx.ingest.fleet.create_command(&key, req).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(cmd.to_json())).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant_id: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    page_token: Option<String>,
}

fn list_body(key: &OrbKey, commands: &[Command], next: Option<String>) -> Response {
    let items: Vec<serde_json::Value> = commands.iter().map(Command::to_json).collect();
    Json(serde_json::json!({
        "tenant_id": key.tenant,
        "orb_id": key.orb,
        "commands": items,
        "next_page_token": next,
    }))
    .into_response()
}

/// `GET /v1/orbs/{id}/commands?status=pending`: for operators, the commands as stored; for a
/// device (basic auth), its pending commands, handed over now (the HTTP fallback's delivery).
pub async fn list(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Problem> {
    ctx.ingest.metrics.http_requests.inc();
    let status = match q.status.as_deref() {
        None => None,
        Some("pending") => Some(None),
        Some(s) => Some(Some(
            CommandStatus::parse(s).ok_or_else(|| bad(ErrorCode::InvalidArgument, format!("unknown status {s:?}")))?,
        )),
    };
    let key = match auth::device_or_operator(&ctx, &headers, q.tenant_id.as_deref(), &id).await? {
        Caller::Device(key) => {
            if !matches!(status, None | Some(None)) {
                return Err(bad(ErrorCode::InvalidArgument, "devices list their pending commands only"));
            }
            let cmds = ctx.ingest.fleet.pull_commands(&key).await?;
            return Ok(list_body(&key, &cmds, None));
        }
        Caller::Operator(tenant) => orb_key(tenant, &id)?,
    };
    ensure_orb(&ctx, &key)?;
    let store = &ctx.ingest.store;
    if status == Some(None) {
        let pending = store.pending_commands(&key).map_err(ApiError::internal)?;
        return Ok(list_body(&key, &pending, None));
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > COMMANDS_PAGE_MAX {
        return Err(bad(ErrorCode::InvalidArgument, format!("limit must be 1..{COMMANDS_PAGE_MAX}")));
    }
    let mut after: u64 = match q.page_token.as_deref() {
        Some(t) => {
            t.parse().map_err(|_| bad(ErrorCode::InvalidArgument, "page_token is not one this server issued"))?
        }
        None => 0,
    };
    // Scan a bounded window per request; a filter that matches rarely pages on.
    let scan = limit * 10;
    let rows = store.commands(&key, after, scan).map_err(ApiError::internal)?;
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
    Ok(list_body(&key, &out, more.then(|| after.to_string())))
}

async fn caller_orb(
    ctx: &HttpCtx,
    headers: &HeaderMap,
    tenant_id: Option<&str>,
    id: &str,
) -> Result<(OrbKey, bool), Problem> {
    ctx.ingest.metrics.http_requests.inc();
    Ok(match auth::device_or_operator(ctx, headers, tenant_id, id).await? {
        Caller::Device(key) => (key, true),
        Caller::Operator(tenant) => (orb_key(tenant, id)?, false),
    })
}

/// `GET /v1/orbs/{id}/commands/{command_id}`: one command with its status history.
pub async fn get(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, command_id)): Path<(String, String)>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let (key, _) = caller_orb(&ctx, &headers, q.tenant_id.as_deref(), &id).await?;
    let missing = || bad(ErrorCode::NotFound, format!("orb {} has no command {command_id}", key.orb));
    let seq = seq_of(&command_id).ok_or_else(missing)?;
    match ctx.ingest.store.command(&key, seq).map_err(ApiError::internal)? {
        Some(c) if c.command_id == command_id => Ok(Json(c.to_json()).into_response()),
        _ => Err(missing()),
    }
}

/// `POST /v1/orbs/{id}/commands/{command_id}/cancel` (operators).
pub async fn cancel(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, command_id)): Path<(String, String)>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let key = operator_orb(&ctx, &headers, q.tenant_id.as_deref(), &id)?;
    ensure_orb(&ctx, &key)?;
    let c = ctx.ingest.fleet.cancel_command(&key, command_id).await?;
    Ok(Json(c.to_json()).into_response())
}

/// `POST /v1/orbs/{id}/commands/{command_id}/ack` (the device, basic auth):
/// `{"status": "in_progress|succeeded|failed|rejected", "detail": "..."}`; 200 once durable.
pub async fn ack(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, command_id)): Path<(String, String)>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let (key, device) = caller_orb(&ctx, &headers, q.tenant_id.as_deref(), &id).await?;
    if !device {
        return Err(bad(ErrorCode::PermissionDenied, "only the orb itself acknowledges its commands"));
    }
    let mut v: serde_json::Value = parse_json(&body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(bad(ErrorCode::MalformedPayload, "expected a JSON object"));
    };
    obj.insert("command_id".into(), command_id.into());
    let ack = parse_ack(v.to_string().as_bytes())?;
    ctx.ingest.fleet.command_ack(&key, ack).await?;
    Ok(Json(serde_json::json!({"ok": true})).into_response())
}

fn operator_tenant(
    ctx: &HttpCtx,
    headers: &HeaderMap,
    tenant_id: Option<&str>,
) -> Result<crate::model::TenantId, Problem> {
    ctx.ingest.metrics.http_requests.inc();
    auth::operator(ctx, headers, tenant_id)
}

/// `POST /v1/commands/broadcasts`: fan a command out to a list of orbs (`orb_ids`) or to every
/// orb of the tenant (`all_orbs`), at `rate_per_s`, with an optional abort policy.
pub async fn start_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let tenant = operator_tenant(&ctx, &headers, q.tenant_id.as_deref())?;
    let req: BroadcastRequest = parse_json(&body)?;
    let (b, target) = req.validate(tenant, ctx.ingest.clock.now_ms())?;
    let summary = ctx.ingest.fleet.start_broadcast(b, target).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// `GET /v1/commands/broadcasts/{id}`: the live summary, counts per command state.
pub async fn get_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let tenant = operator_tenant(&ctx, &headers, q.tenant_id.as_deref())?;
    Ok(Json(ctx.ingest.fleet.broadcast(&tenant, &id).await?).into_response())
}

/// `POST /v1/commands/broadcasts/{id}/cancel`: stop fanning out and cancel every command the
/// devices have not taken up.
pub async fn cancel_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let tenant = operator_tenant(&ctx, &headers, q.tenant_id.as_deref())?;
    Ok(Json(ctx.ingest.fleet.cancel_broadcast(&tenant, &id).await?).into_response())
}
