//! Command endpoints: create (idempotent), list and read (from the store: reads never
//! activate an actor), cancel, broadcasts, and the device's HTTP fallback (pull pending,
//! acknowledge).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{HttpCtx, Problem, Query, TenantQuery, bad, caller, parse_json};
use crate::api::Principal;
use crate::error::ErrorCode;
use crate::model::OrbKey;
use crate::model::broadcast::BroadcastRequest;
use crate::model::command::{Command, CreateRequest, parse_ack};

type Ctx = State<Arc<HttpCtx>>;

/// `POST /v1/orbs/{id}/commands`: 201 when created, 200 when an identical request with the
/// same `idempotency_key` was answered before, 409 when the key was used for another body.
pub async fn create(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let req: CreateRequest = parse_json(&body)?;
    let (cmd, created) = ctx.api.create_command(&p, q.tenant_id.as_deref(), &id, req).await?;
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
    let p = caller(&ctx, &headers)?;
    if let Principal::Device(_) = &p {
        let key = ctx.api.device_orb(&p, &id, q.tenant_id.as_deref())?;
        if !matches!(q.status.as_deref(), None | Some("pending")) {
            return Err(bad(ErrorCode::InvalidArgument, "devices list their pending commands only"));
        }
        let cmds = ctx.api.fleet().pull_commands(&key).await?;
        return Ok(list_body(&key, &cmds, None));
    }
    if q.limit == Some(0) {
        return Err(bad(ErrorCode::InvalidArgument, "limit must be at least 1"));
    }
    let (cmds, next) = ctx.api.list_commands(
        &p,
        q.tenant_id.as_deref(),
        &id,
        q.status.as_deref(),
        q.limit.unwrap_or(0),
        q.page_token.as_deref(),
    )?;
    let key = ctx.api.orb_key(&p, q.tenant_id.as_deref(), &id, crate::api::Access::Read)?;
    Ok(list_body(&key, &cmds, next))
}

/// `GET /v1/orbs/{id}/commands/{command_id}`: one command with its status history.
pub async fn get(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, command_id)): Path<(String, String)>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let c = match &p {
        // A device may read its own commands.
        Principal::Device(_) => {
            let key = ctx.api.device_orb(&p, &id, q.tenant_id.as_deref())?;
            ctx.api.command_of(&key, &command_id)?
        }
        _ => ctx.api.get_command(&p, q.tenant_id.as_deref(), &id, &command_id)?,
    };
    Ok(Json(c.to_json()).into_response())
}

/// `POST /v1/orbs/{id}/commands/{command_id}/cancel` (operators).
pub async fn cancel(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, command_id)): Path<(String, String)>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.cancel_command(&p, q.tenant_id.as_deref(), &id, &command_id).await?.to_json()).into_response())
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
    let p = caller(&ctx, &headers)?;
    let key = ctx.api.device_orb(&p, &id, q.tenant_id.as_deref())?;
    let mut v: serde_json::Value = parse_json(&body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(bad(ErrorCode::MalformedPayload, "expected a JSON object"));
    };
    obj.insert("command_id".into(), command_id.into());
    let ack = parse_ack(v.to_string().as_bytes())?;
    ctx.api.fleet().command_ack(&key, ack).await?;
    Ok(Json(serde_json::json!({"ok": true})).into_response())
}

/// `POST /v1/commands/broadcasts`: fan a command out to a list of orbs (`orb_ids`) or to every
/// orb of the tenant (`all_orbs`), at `rate_per_s`, with an optional abort policy.
pub async fn start_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let req: BroadcastRequest = parse_json(&body)?;
    let summary = ctx.api.start_broadcast(&p, q.tenant_id.as_deref(), req).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// `GET /v1/commands/broadcasts/{id}`: the live summary, counts per command state.
pub async fn get_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.get_broadcast(&p, q.tenant_id.as_deref(), &id).await?).into_response())
}

/// `POST /v1/commands/broadcasts/{id}/cancel`: stop fanning out and cancel every command the
/// devices have not taken up.
pub async fn cancel_broadcast(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.cancel_broadcast(&p, q.tenant_id.as_deref(), &id).await?).into_response())
}
