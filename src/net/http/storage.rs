//! Cold-tier endpoints: spill now, checkpoint now, trajectories, fleet time travel and
//! export jobs.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{HttpCtx, Problem, Query, TenantQuery, caller, parse_json};
use crate::api::storage::{ExportParams, SpillParams, TrajectoryParams};
use crate::storage::cold::export::ExportJob;

type Ctx = State<Arc<HttpCtx>>;

/// An export job as REST and the CLI show it.
pub fn export_json(j: &ExportJob) -> serde_json::Value {
    serde_json::json!({
        "export_id": j.id,
        "tenant_id": j.tenant,
        "from": j.from,
        "to": j.to,
        "query": j.query,
        "format": j.format.as_str(),
        "destination": j.prefix(),
        "status": j.status.as_str(),
        "orbs_total": j.orbs_total,
        "orbs_done": j.next_orb,
        "files": j.files,
        "rows": j.rows,
        "created_ms": j.created_ms,
        "updated_ms": j.updated_ms,
        "error": j.error,
        "created_by": j.created_by,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SpillBody {
    tenant_id: Option<String>,
    hot_window: Option<String>,
}

/// `POST /v1/storage/spill`: spill eligible hot telemetry now; answers what moved.
pub async fn spill(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: SpillBody = if body.iter().all(u8::is_ascii_whitespace) { SpillBody::default() } else { parse_json(&body)? };
    let report = ctx.api.spill(&p, &SpillParams { tenant_id: b.tenant_id, hot_window: b.hot_window }).await?;
    Ok(Json(report).into_response())
}

/// `POST /v1/storage/checkpoint`: write a checkpoint now.
pub async fn checkpoint(State(ctx): Ctx, headers: HeaderMap) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.checkpoint(&p).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrajectoryQuery {
    tenant_id: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
    max_points: Option<usize>,
    method: Option<String>,
    field: Option<String>,
}

/// `GET /v1/orbs/{id}/trajectory`: positions over a range, downsampled (LTTB or min/max).
pub async fn trajectory(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TrajectoryQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let params = TrajectoryParams {
        from: q.from.unwrap_or(0),
        to: q.to.unwrap_or(u64::MAX),
        max_points: q.max_points.unwrap_or(0),
        method: q.method,
        field: q.field,
    };
    Ok(Json(ctx.api.trajectory(&p, q.tenant_id.as_deref(), &id, &params).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetAtQuery {
    tenant_id: Option<String>,
    t: u64,
    q: Option<String>,
    lookback_s: Option<u64>,
    page_size: Option<usize>,
    page_token: Option<String>,
}

/// `GET /v1/fleet/at?t=`: every matching orb's last known point at time `t`.
pub async fn fleet_at(State(ctx): Ctx, headers: HeaderMap, Query(q): Query<FleetAtQuery>) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let page = ctx
        .api
        .fleet_at(
            &p,
            q.tenant_id.as_deref(),
            q.t,
            q.q.as_deref().unwrap_or(""),
            q.lookback_s.unwrap_or(0).saturating_mul(1000),
            q.page_size.unwrap_or(0),
            q.page_token.as_deref(),
        )
        .await?;
    Ok(Json(page).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    tenant_id: Option<String>,
    from: u64,
    to: u64,
    #[serde(default)]
    query: String,
    #[serde(default)]
    format: String,
    destination: String,
}

/// `POST /v1/exports`: start an export job (201).
pub async fn create_export(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: ExportBody = parse_json(&body)?;
    let job = ctx
        .api
        .create_export(
            &p,
            &ExportParams {
                tenant_id: b.tenant_id,
                from: b.from,
                to: b.to,
                query: b.query,
                format: b.format,
                destination: b.destination,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(export_json(&job))).into_response())
}

pub async fn list_exports(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let jobs: Vec<_> = ctx.api.list_exports(&p, q.tenant_id.as_deref())?.iter().map(export_json).collect();
    Ok(Json(serde_json::json!({ "exports": jobs })).into_response())
}

pub async fn get_export(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(export_json(&ctx.api.get_export(&p, q.tenant_id.as_deref(), &id)?)).into_response())
}

pub async fn cancel_export(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(export_json(&ctx.api.cancel_export(&p, q.tenant_id.as_deref(), &id)?)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    hot_window: Option<String>,
    cold_retention: Option<String>,
}

/// `GET /v1/tenants/{tenant}/retention`: the effective hot window and cold retention.
pub async fn get_retention(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.get_retention(&p, Some(&tenant))?).into_response())
}

/// `PUT /v1/tenants/{tenant}/retention` `{"hot_window": "2h"|null, "cold_retention": "90d"|null}`
/// (null or absent: the node default).
pub async fn put_retention(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: RetentionBody = parse_json(&body)?;
    Ok(Json(ctx.api.set_retention(&p, Some(&tenant), b.hot_window.as_deref(), b.cold_retention.as_deref())?)
        .into_response())
}

/// `GET /v1/tenants/{tenant}/mqtt`: the topic policy, sessions and retained messages.
pub async fn get_mqtt(State(ctx): Ctx, headers: HeaderMap, Path(tenant): Path<String>) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.mqtt_view(&p, Some(&tenant))?).into_response())
}

/// `PUT /v1/tenants/{tenant}/mqtt/policy` `{"publish": [filter...], "subscribe": [filter...]}`.
pub async fn put_mqtt_policy(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let policy: crate::model::topics::TopicPolicy = parse_json(&body)?;
    Ok(Json(ctx.api.set_topic_policy(&p, Some(&tenant), policy).await?).into_response())
}
