//! The REST listener (axum): health, metrics, tenants and tokens, the registry, telemetry
//! (history and the device HTTP fallback), commands and broadcasts.
//!
//! Handlers authenticate through `api::Api` and call its operations, the same ones gRPC calls.
//! Errors are problem documents (`application/problem+json`) carrying the stable code of
//! `error::ErrorCode`. Every body is bounded (`HTTP_BODY_MAX_BYTES`).

mod alerts;
mod commands;
mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::api::{Access, Api, Principal};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{HTTP_BODY_MAX_BYTES, TELEMETRY_HTTP_BATCH_MAX};
use crate::model::orb::OrbStatus;
use crate::model::tenant::Role;
use crate::model::{TelemetryPoint, telemetry};
use crate::storage::Outcome;

/// Which listeners are up; `/healthz` answers 200 only when all are and nothing is draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pub mqtt: AtomicBool,
    pub grpc: AtomicBool,
    pub http: AtomicBool,
    pub draining: Arc<AtomicBool>,
}

/// What the handlers share.
pub struct HttpCtx {
    pub api: Arc<Api>,
    pub readiness: Arc<Readiness>,
}

type Ctx = State<Arc<HttpCtx>>;

/// A problem document.
pub struct Problem(pub ApiError);

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Self {
        Problem(e)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({
            "type": format!("https://orbmanager.dev/problems/{}", self.0.code.as_str()),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "code": self.0.code.as_str(),
            "detail": self.0.message,
        });
        let mut resp = (status, body.to_string()).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/problem+json"));
        if self.0.code == ErrorCode::Unauthenticated {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer, Basic realm=\"orbmanager\""),
            );
        }
        resp
    }
}

fn bad(code: ErrorCode, msg: impl Into<String>) -> Problem {
    Problem(ApiError::new(code, msg))
}

/// The query-string extractor of every handler: a malformed or unknown parameter is a problem
/// document (`invalid_argument`, naming it) like every other refusal, not axum's plain text.
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(bad(ErrorCode::InvalidArgument, e.body_text())),
        }
    }
}

/// The router with every route.
pub fn router(ctx: Arc<HttpCtx>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/tenants", post(create_tenant))
        .route("/v1/tenants/{tenant}/tokens", get(list_tokens).post(create_token))
        .route("/v1/tenants/{tenant}/tokens/{token_id}/revoke", post(revoke_token))
        .route("/v1/orbs", get(list_orbs))
        .route("/v1/orbs/stream", get(stream))
        .route("/v1/orbs/register", post(register))
        .route("/v1/orbs/{id}", get(get_orb))
        .route("/v1/orbs/{id}/decommission", post(decommission))
        .route("/v1/orbs/{id}/certificate", post(renew_certificate))
        .route("/v1/orbs/{id}/certificate/revoke", post(revoke_certificate))
        .route("/v1/orbs/{id}/attributes", patch(update_attributes))
        .route("/v1/orbs/{id}/versions", get(version_history))
        .route("/v1/orbs/{id}/telemetry", get(history).post(ingest))
        .route("/v1/orbs/{id}/commands", get(commands::list).post(commands::create))
        .route("/v1/orbs/{id}/commands/{command_id}", get(commands::get))
        .route("/v1/orbs/{id}/commands/{command_id}/cancel", post(commands::cancel))
        .route("/v1/orbs/{id}/commands/{command_id}/ack", post(commands::ack))
        .route("/v1/alerts", get(alerts::list_alerts))
        .route("/v1/alerts/rules", get(alerts::list_rules).post(alerts::create_rule))
        .route("/v1/alerts/rules/{id}", delete(alerts::delete_rule))
        .route("/v1/alerts/{id}/ack", post(alerts::ack_alert))
        .route("/v1/alerts/{id}/resolve", post(alerts::resolve_alert))
        .route("/v1/alerts/{id}/assign", post(alerts::assign_alert))
        .route("/v1/alerts/{id}/comments", post(alerts::comment_alert))
        .route("/v1/events", get(alerts::list_events))
        .route("/v1/events/stream", get(alerts::stream_events))
        .route("/v1/webhooks", get(alerts::list_webhooks).post(alerts::create_webhook))
        .route("/v1/webhooks/{id}", delete(alerts::delete_webhook))
        .route("/v1/webhooks/{id}/deliveries", get(alerts::list_deliveries))
        .route("/v1/webhooks/{id}/deliveries/{seq}/redeliver", post(alerts::redeliver))
        .route("/v1/orbs/{id}/trajectory", get(storage::trajectory))
        .route("/v1/fleet/at", get(storage::fleet_at))
        .route("/v1/storage/spill", post(storage::spill))
        .route("/v1/storage/checkpoint", post(storage::checkpoint))
        .route("/v1/tenants/{tenant}/retention", get(storage::get_retention).put(storage::put_retention))
        .route("/v1/tenants/{tenant}/mqtt", get(storage::get_mqtt))
        .route("/v1/tenants/{tenant}/mqtt/policy", put(storage::put_mqtt_policy))
        .route("/v1/exports", get(storage::list_exports).post(storage::create_export))
        .route("/v1/exports/{id}", get(storage::get_export))
        .route("/v1/exports/{id}/cancel", post(storage::cancel_export))
        .route("/v1/commands/broadcasts", post(commands::start_broadcast))
        .route("/v1/commands/broadcasts/{id}", get(commands::get_broadcast))
        .route("/v1/commands/broadcasts/{id}/cancel", post(commands::cancel_broadcast))
        .fallback(async || bad(ErrorCode::NotFound, "no such endpoint"))
        .layer(DefaultBodyLimit::max(HTTP_BODY_MAX_BYTES))
        .with_state(ctx)
}

/// Authenticates the request (and counts it).
fn caller(ctx: &HttpCtx, headers: &HeaderMap) -> Result<Principal, Problem> {
    ctx.api.ingest.metrics.http_requests.inc();
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("?"));
    Ok(ctx.api.authenticate(auth)?)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| bad(ErrorCode::InvalidArgument, format!("request body: {e}")))
}

async fn healthz(State(ctx): Ctx) -> Response {
    let r = &ctx.readiness;
    let listeners = [("mqtt", &r.mqtt), ("grpc", &r.grpc), ("http", &r.http)];
    let down: Vec<&str> = listeners.iter().filter(|(_, up)| !up.load(Ordering::Acquire)).map(|(n, _)| *n).collect();
    let draining = r.draining.load(Ordering::Acquire);
    let ok = down.is_empty() && !draining;
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::json!({"ok": ok, "down": down, "draining": draining}))).into_response()
}

async fn metrics(State(ctx): Ctx) -> Response {
    let m = &ctx.api.ingest.metrics;
    m.http_requests.inc();
    let backlog = ctx.api.ingest.store.telemetry_backlog();
    m.storage_telemetry_l0_tables.set(backlog.l0_tables as i64);
    m.storage_telemetry_l0_runs.set(backlog.l0_runs as i64);
    m.storage_telemetry_sealed_memtables.set(backlog.sealed_memtables as i64);
    m.storage_telemetry_blob_files.set(backlog.blob_files as i64);
    m.storage_telemetry_blob_stale_bytes.set(i64::try_from(backlog.blob_stale_bytes).unwrap_or(i64::MAX));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    tenant_id: String,
}

async fn create_tenant(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let req: TenantBody = parse_json(&body)?;
    let t = ctx.api.create_tenant(&p, &req.tenant_id).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"tenant_id": t.tenant, "created_ms": t.created_ms})))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    role: String,
    #[serde(default)]
    name: String,
}

async fn create_token(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let req: TokenBody = parse_json(&body)?;
    let role = Role::parse(&req.role)
        .ok_or_else(|| bad(ErrorCode::InvalidArgument, format!("role {:?}: viewer, operator or admin", req.role)))?;
    let (token, secret) = ctx.api.create_api_token(&p, Some(&tenant), role, &req.name).await?;
    let mut v = token.to_json();
    v["secret"] = secret.into();
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_tokens(State(ctx): Ctx, headers: HeaderMap, Path(tenant): Path<String>) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let tokens: Vec<serde_json::Value> =
        ctx.api.list_api_tokens(&p, Some(&tenant))?.iter().map(|t| t.to_json()).collect();
    Ok(Json(serde_json::json!({"tokens": tokens})).into_response())
}

async fn revoke_token(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path((tenant, token_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.revoke_api_token(&p, Some(&tenant), &token_id).await?.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    tenant_id: Option<String>,
    orb_id: Option<String>,
    csr_pem: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

async fn register(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let req: RegisterBody = parse_json(&body)?;
    let r = ctx
        .api
        .register_orb(&p, req.tenant_id.as_deref(), req.orb_id.as_deref(), req.attributes, req.csr_pem.as_deref())
        .await?;
    let body = serde_json::json!({
        "tenant_id": r.tenant,
        "orb_id": r.orb,
        "status": OrbStatus::Provisioned.as_str(),
        "device_token": r.device_token,
        "mqtt_username": format!("{}/{}", r.tenant, r.orb),
        "certificate_pem": r.certificate_pem,
        "ca_pem": r.ca_pem,
        "server_ca_pem": r.server_ca_pem,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantQuery {
    tenant_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    tenant_id: Option<String>,
    status: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    order: Option<String>,
    page_size: Option<usize>,
    page_token: Option<String>,
    /// Comma-separated projection.
    fields: Option<String>,
    count_by: Option<String>,
    stats: Option<String>,
}

/// `GET /v1/orbs?q=...`: fleet search (see `model::query` for the language).
async fn list_orbs(State(ctx): Ctx, headers: HeaderMap, Query(q): Query<ListQuery>) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let params = crate::api::orbs::SearchParams {
        query: q.q.unwrap_or_default(),
        status: q.status,
        sort: q.sort,
        order: q.order,
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token,
        fields: q.fields.map(|f| f.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()),
        count_by: q.count_by,
        stats: q.stats,
    };
    let (tenant, res, fields) = ctx.api.search_orbs(&p, q.tenant_id.as_deref(), params)?;
    let orbs: Vec<serde_json::Value> = res.rows.iter().map(|r| r.to_json(&tenant, fields.as_deref())).collect();
    Ok(Json(serde_json::json!({
        "orbs": orbs,
        "total": res.total,
        "next_page_token": res.next_page_token,
        "aggregate": res.aggregate,
    }))
    .into_response())
}

async fn get_orb(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.get_orb(&p, q.tenant_id.as_deref(), &id).await?.to_json()).into_response())
}

async fn decommission(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.decommission_orb(&p, q.tenant_id.as_deref(), &id).await?.to_json()).into_response())
}

/// `POST /v1/orbs/{id}/certificate/revoke`: the orb's certificate stops working now.
async fn revoke_certificate(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    Ok(Json(ctx.api.revoke_certificate(&p, q.tenant_id.as_deref(), &id).await?.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    csr_pem: String,
}

/// `POST /v1/orbs/{id}/certificate` `{"csr_pem"}`: a new certificate replacing the current one.
async fn renew_certificate(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: RenewBody = parse_json(&body)?;
    let r = ctx.api.renew_certificate(&p, q.tenant_id.as_deref(), &id, &b.csr_pem).await?;
    Ok(Json(serde_json::json!({
        "tenant_id": r.tenant.as_str(),
        "orb_id": r.orb.as_str(),
        "certificate_pem": r.certificate_pem,
        "ca_pem": r.ca_pem,
        "server_ca_pem": r.server_ca_pem,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttributesBody {
    tenant_id: Option<String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// `PATCH /v1/orbs/{id}/attributes`: `{"set": {"depot": "sf"}, "remove": ["team"]}` -> the orb.
async fn update_attributes(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let b: AttributesBody = parse_json(&body)?;
    let tenant = b.tenant_id.as_deref().or(q.tenant_id.as_deref());
    Ok(Json(ctx.api.update_attributes(&p, tenant, &id, b.set, b.remove).await?.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsQuery {
    tenant_id: Option<String>,
    component: Option<String>,
    page_size: Option<usize>,
    page_token: Option<String>,
}

/// `GET /v1/orbs/{id}/versions?component=&page_size=&page_token=`: reported version changes,
/// oldest first.
async fn version_history(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<VersionsQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    if q.page_size == Some(0) {
        return Err(bad(ErrorCode::InvalidArgument, "page_size must be at least 1"));
    }
    let page = ctx.api.version_history(
        &p,
        q.tenant_id.as_deref(),
        &id,
        q.component.as_deref(),
        q.page_size.unwrap_or(0),
        q.page_token.as_deref(),
    )?;
    let changes: Vec<serde_json::Value> = page.changes.iter().map(|c| c.to_json()).collect();
    Ok(Json(serde_json::json!({"changes": changes, "next_page_token": page.next_page_token})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    tenant_id: Option<String>,
    /// Comma-separated orb ids; all of the tenant's orbs when absent.
    orb_ids: Option<String>,
}

/// `GET /v1/orbs/stream`: Server-Sent Events, `event: change` with the orb's dashboard fields
/// and `event: lagged` with `{"missed": n}` when the subscriber fell behind (a snapshot of the
/// named orbs follows as changes of kind `snapshot`).
async fn stream(State(ctx): Ctx, headers: HeaderMap, Query(q): Query<StreamQuery>) -> Result<Response, Problem> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio_stream::StreamExt;
    let p = caller(&ctx, &headers)?;
    let orbs: Vec<String> = q
        .orb_ids
        .as_deref()
        .map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let rx = ctx.api.stream(&p, q.tenant_id.as_deref(), &orbs)?;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(|e| {
        Ok::<_, std::convert::Infallible>(match e {
            crate::api::orbs::StreamEvent::Change(c) => {
                Event::default().event("change").data(serde_json::to_string(&*c).unwrap_or_default())
            }
            crate::api::orbs::StreamEvent::Lagged(n) => {
                Event::default().event("lagged").data(format!("{{\"missed\":{n}}}"))
            }
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    tenant_id: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
    limit: Option<usize>,
    page_token: Option<String>,
}

async fn history(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    if q.limit == Some(0) {
        return Err(bad(ErrorCode::InvalidArgument, "limit must be at least 1"));
    }
    let range = crate::api::orbs::HistoryQuery {
        from: q.from.unwrap_or(0),
        to: q.to.unwrap_or(u64::MAX),
        limit: q.limit.unwrap_or(0),
        page_token: q.page_token.clone(),
    };
    let page = ctx.api.history(&p, q.tenant_id.as_deref(), &id, &range).await?;
    let points: Vec<serde_json::Value> = page
        .points
        .iter()
        .map(|sp| {
            let mut v = sp.point.to_json();
            v["received_ms"] = sp.received_ms.into();
            v
        })
        .collect();
    Ok(Json(serde_json::json!({
        "tenant_id": page.key.tenant,
        "orb_id": page.key.orb,
        "points": points,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

/// `POST /v1/orbs/{id}/telemetry`: one point or an array of points. Nothing is stored unless
/// every point is valid; the 200 comes only when every point is durable.
async fn ingest(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    let p = caller(&ctx, &headers)?;
    let ingest = &ctx.api.ingest;
    ingest.metrics.message_in(crate::metrics::MsgKind::Telemetry);
    let key = match &p {
        Principal::Device(_) => ctx.api.device_orb(&p, &id, q.tenant_id.as_deref())?,
        _ => {
            let key = ctx.api.orb_key(&p, q.tenant_id.as_deref(), &id, Access::Operate)?;
            match ctx.api.fleet().touch(&key).await? {
                None => return Err(Problem(crate::api::orbs::not_found(&key))),
                Some(OrbStatus::Decommissioned) => {
                    return Err(bad(ErrorCode::Decommissioned, format!("orb {key} is decommissioned")));
                }
                Some(_) => key,
            }
        }
    };
    if body.len() > ingest.max_payload_bytes.saturating_mul(TELEMETRY_HTTP_BATCH_MAX) {
        return Err(bad(ErrorCode::PayloadTooLarge, "request body too large"));
    }
    let now = ingest.clock.now_ms();
    let trimmed = body.iter().position(|b| !b.is_ascii_whitespace()).map(|i| body[i]);
    let points: Vec<(TelemetryPoint, Vec<u8>)> = if trimmed == Some(b'[') {
        let values: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| {
            let err = ApiError::new(ErrorCode::MalformedPayload, format!("payload is not a JSON array of points: {e}"));
            ingest.refuse(&key, &err);
            Problem(err)
        })?;
        if values.is_empty() || values.len() > TELEMETRY_HTTP_BATCH_MAX {
            return Err(bad(ErrorCode::InvalidArgument, format!("a batch holds 1..{TELEMETRY_HTTP_BATCH_MAX} points")));
        }
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let raw = serde_json::to_vec(v).map_err(ApiError::internal)?;
            if raw.len() > ingest.max_payload_bytes {
                let err = ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("point {i}: {} bytes; the limit is {}", raw.len(), ingest.max_payload_bytes),
                );
                ingest.refuse(&key, &err);
                return Err(Problem(err));
            }
            let p = telemetry::parse_value(v, now).map_err(|e| {
                let err = ApiError::new(e.code(), format!("point {i}: {e}"));
                ingest.refuse(&key, &err);
                Problem(err)
            })?;
            out.push((p, raw));
        }
        out
    } else {
        vec![(ingest.parse(&key, &body)?, body.to_vec())]
    };
    let mut set = tokio::task::JoinSet::new();
    for (point, raw) in points {
        let ingest = ingest.clone();
        let key = key.clone();
        set.spawn(async move { ingest.store(&key, point, &raw).await });
    }
    let (mut stored, mut duplicates) = (0usize, 0usize);
    let mut failure = None;
    while let Some(res) = set.join_next().await {
        match res {
            Ok(Ok(Outcome::Stored)) => stored += 1,
            Ok(Ok(Outcome::Duplicate)) => duplicates += 1,
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(ApiError::internal(e)),
        }
    }
    if let Some(e) = failure {
        return Err(Problem(e));
    }
    Ok(Json(serde_json::json!({"accepted": stored, "duplicates": duplicates})).into_response())
}
