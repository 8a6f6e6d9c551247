//! Alert rules, alerts and webhooks over REST.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{HttpCtx, Problem, Query, TenantQuery, caller, parse_json};
use crate::actors::rules::AlertOp;
use crate::api::alerts::WebhookSpec;
use crate::model::rule::RuleSpec;

type Ctx = State<Arc<HttpCtx>>;

#[derive(Deserialize)]
struct RuleBody {
    tenant_id: Option<String>,
    #[serde(flatten)]
    spec: serde_json::Value,
}

/// `POST /v1/alerts/rules`: `{"name", "condition", "severity", "for_s"?, "clear_condition"?,
/// "absent_s"?, "scope"?}` -> 201 with the rule.
pub async fn create_rule(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: RuleBody = parse_json(&body)?;
    let spec: RuleSpec = serde_json::from_value(b.spec)
        .map_err(|e| super::bad(crate::error::ErrorCode::InvalidArgument, format!("rule: {e}")))?;
    let rule = ctx.api.create_rule(&p, b.tenant_id.as_deref(), spec).await?;
    Ok((StatusCode::CREATED, Json(rule.to_json())).into_response())
}

pub async fn list_rules(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let rules: Vec<_> = ctx.api.list_rules(&p, q.tenant_id.as_deref())?.iter().map(|r| r.to_json()).collect();
    Ok(Json(serde_json::json!({ "rules": rules })).into_response())
}

pub async fn delete_rule(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.delete_rule(&p, q.tenant_id.as_deref(), &id).await?.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    tenant_id: Option<String>,
    state: Option<String>,
    orb_id: Option<String>,
    page_size: Option<usize>,
    page_token: Option<String>,
}

/// `GET /v1/alerts?state=open&orb_id=&page_size=&page_token=`: newest first.
pub async fn list_alerts(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<AlertsQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let (alerts, next) = ctx.api.list_alerts(
        &p,
        q.tenant_id.as_deref(),
        q.state.as_deref(),
        q.orb_id.as_deref(),
        q.page_size.unwrap_or(0),
        q.page_token.as_deref(),
    )?;
    let alerts: Vec<_> = alerts.iter().map(|a| a.to_json()).collect();
    Ok(Json(serde_json::json!({ "alerts": alerts, "next_page_token": next })).into_response())
}

async fn op(ctx: &HttpCtx, headers: &HeaderMap, id: &str, q: &TenantQuery, op: AlertOp) -> Result<Response, Problem> {
    let p = caller(ctx, headers)?;
    Ok(Json(ctx.api.alert_op(&p, q.tenant_id.as_deref(), id, op).await?.to_json()).into_response())
}

pub async fn ack_alert(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    op(&ctx, &headers, &id, &q, AlertOp::Acknowledge).await
}

pub async fn resolve_alert(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    op(&ctx, &headers, &id, &q, AlertOp::Resolve).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    tenant_id: Option<String>,
    /// `null` or `""` unassigns.
    assignee: Option<String>,
}

/// `POST /v1/alerts/{id}/assign`: `{"assignee": "name" | null}` -> the alert.
pub async fn assign_alert(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: AssignBody = parse_json(&body)?;
    let alert = ctx.api.assign_alert(&p, b.tenant_id.as_deref(), &id, b.assignee.as_deref()).await?;
    Ok(Json(alert.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommentBody {
    tenant_id: Option<String>,
    text: String,
}

/// `POST /v1/alerts/{id}/comments`: `{"text"}` -> 201 with the alert.
pub async fn comment_alert(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: CommentBody = parse_json(&body)?;
    let alert = ctx.api.comment_alert(&p, b.tenant_id.as_deref(), &id, &b.text).await?;
    Ok((StatusCode::CREATED, Json(alert.to_json())).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    tenant_id: Option<String>,
    /// Continue after this event id.
    after: Option<String>,
    /// Comma-separated event types; all when absent.
    types: Option<String>,
    page_size: Option<usize>,
}

fn types_of(q: &EventsQuery) -> Vec<String> {
    q.types.as_deref().map(|s| s.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect()).unwrap_or_default()
}

fn envelope(e: &crate::model::event::Event) -> serde_json::Value {
    serde_json::from_str(&e.body).unwrap_or(serde_json::Value::Null)
}

/// `GET /v1/events?after=&types=&page_size=`: the tenant's events, oldest first, and the id to
/// continue after.
pub async fn list_events(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    if q.page_size == Some(0) {
        return Err(super::bad(crate::error::ErrorCode::InvalidArgument, "page_size must be at least 1"));
    }
    let page =
        ctx.api.list_events(&p, q.tenant_id.as_deref(), q.after.as_deref(), &types_of(&q), q.page_size.unwrap_or(0))?;
    let events: Vec<_> = page.events.iter().map(envelope).collect();
    Ok(Json(serde_json::json!({ "events": events, "next_after": page.next_after })).into_response())
}

/// `GET /v1/events/stream?after=&types=`: Server-Sent Events, one per event (`id:` the event
/// id, `event:` its type, `data:` the envelope). A reconnecting client sends `Last-Event-ID`
/// (or `after`) and misses nothing within the retention. If the stream must end (server
/// draining, fell behind the retention) a last `event: error` carries the problem.
pub async fn stream_events(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, Problem> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio_stream::StreamExt;
    let p = caller(&ctx, &headers)?;
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let after = last_id.or(q.after.clone());
    let rx = ctx.api.stream_events(&p, q.tenant_id.as_deref(), after.as_deref(), types_of(&q))?;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        Ok::<_, std::convert::Infallible>(match item {
            Ok(e) => Event::default().id(e.event_id()).event(e.event_type.as_str()).data(e.body),
            Err(err) => Event::default()
                .event("error")
                .data(serde_json::json!({"code": err.code.as_str(), "detail": err.message}).to_string()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// `POST /v1/webhooks`: `{"url", "events": [...], "secret", "max_attempts"?}` -> 201.
pub async fn create_webhook(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let spec: WebhookSpec = parse_json(&body)?;
    let w = ctx.api.create_webhook(&p, spec).await?;
    Ok((StatusCode::CREATED, Json(w.to_json())).into_response())
}

pub async fn list_webhooks(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let hooks: Vec<_> = ctx.api.list_webhooks(&p, q.tenant_id.as_deref())?.iter().map(|w| w.to_json()).collect();
    Ok(Json(serde_json::json!({ "webhooks": hooks })).into_response())
}

pub async fn delete_webhook(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.delete_webhook(&p, q.tenant_id.as_deref(), &id).await?.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    tenant_id: Option<String>,
    limit: Option<usize>,
}

pub async fn list_deliveries(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let d: Vec<_> = ctx
        .api
        .list_deliveries(&p, q.tenant_id.as_deref(), &id, q.limit.unwrap_or(0))?
        .iter()
        .map(|d| d.to_json())
        .collect();
    Ok(Json(serde_json::json!({ "deliveries": d })).into_response())
}

pub async fn redeliver(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((id, seq)): Path<(String, u64)>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let d = ctx.api.redeliver(&p, q.tenant_id.as_deref(), &id, seq).await?;
    Ok((StatusCode::ACCEPTED, Json(d.to_json())).into_response())
}
