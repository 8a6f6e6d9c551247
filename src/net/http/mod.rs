//! The REST listener (axum): health, metrics, the read side of the registry and telemetry,
//! registration, and the device HTTP fallback for telemetry.
//!
//! Errors are problem documents (`application/problem+json`) carrying the stable code of
//! `error::ErrorCode`. Every body is bounded (`HTTP_BODY_MAX_BYTES`).

mod auth;
mod commands;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::actors::Fleet;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{
    HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, HTTP_BODY_MAX_BYTES, ORB_ATTRIBUTE_LEN_MAX, ORB_ATTRIBUTES_MAX,
    TELEMETRY_HTTP_BATCH_MAX,
};
use crate::model::orb::{OrbRecord, OrbStatus};
use crate::model::{OrbId, OrbKey, TelemetryPoint, telemetry};
use crate::net::ingest::Ingest;
use crate::storage::Outcome;
pub use auth::Caller;

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
    pub ingest: Arc<Ingest>,
    pub dev: bool,
    /// Bootstrap operator token (`auth.admin_token`); empty disables it.
    pub admin_token: String,
    pub readiness: Arc<Readiness>,
}

type Ctx = State<Arc<HttpCtx>>;

impl HttpCtx {
    fn fleet(&self) -> &Fleet {
        &self.ingest.fleet
    }
}

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

/// The router with every route.
pub fn router(ctx: Arc<HttpCtx>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/orbs/register", post(register))
        .route("/v1/orbs/{id}", get(get_orb))
        .route("/v1/orbs/{id}/decommission", post(decommission))
        .route("/v1/orbs/{id}/telemetry", get(history).post(ingest))
        .route("/v1/orbs/{id}/commands", get(commands::list).post(commands::create))
        .route("/v1/orbs/{id}/commands/{command_id}", get(commands::get))
        .route("/v1/orbs/{id}/commands/{command_id}/cancel", post(commands::cancel))
        .route("/v1/orbs/{id}/commands/{command_id}/ack", post(commands::ack))
        .route("/v1/commands/broadcasts", post(commands::start_broadcast))
        .route("/v1/commands/broadcasts/{id}", get(commands::get_broadcast))
        .route("/v1/commands/broadcasts/{id}/cancel", post(commands::cancel_broadcast))
        .fallback(async || bad(ErrorCode::NotFound, "no such endpoint"))
        .layer(DefaultBodyLimit::max(HTTP_BODY_MAX_BYTES))
        .with_state(ctx)
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
    let m = &ctx.ingest.metrics;
    m.http_requests.inc();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()).into_response()
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

fn check_attributes(attrs: &BTreeMap<String, String>) -> Result<(), Problem> {
    if attrs.len() > ORB_ATTRIBUTES_MAX {
        return Err(bad(ErrorCode::InvalidArgument, format!("at most {ORB_ATTRIBUTES_MAX} attributes")));
    }
    for (k, v) in attrs {
        if k.is_empty() || k.len() > ORB_ATTRIBUTE_LEN_MAX || v.len() > ORB_ATTRIBUTE_LEN_MAX {
            return Err(bad(
                ErrorCode::InvalidArgument,
                format!(
                    "attribute {k:?}: keys must be 1..{ORB_ATTRIBUTE_LEN_MAX} bytes and values at most {ORB_ATTRIBUTE_LEN_MAX}"
                ),
            ));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(bad(ErrorCode::InvalidArgument, format!("attribute {k:?} contains control characters")));
        }
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| bad(ErrorCode::InvalidArgument, format!("request body: {e}")))
}

async fn register(State(ctx): Ctx, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    ctx.ingest.metrics.http_requests.inc();
    let req: RegisterBody = parse_json(&body)?;
    let tenant = auth::operator(&ctx, &headers, req.tenant_id.as_deref())?;
    if req.csr_pem.is_some() {
        return Err(bad(
            ErrorCode::NotImplemented,
            "certificate issuance from a CSR is not available in this build; omit csr_pem to receive a device token",
        ));
    }
    check_attributes(&req.attributes)?;
    let orb = match req.orb_id.as_deref() {
        Some(id) => OrbId::parse(id).map_err(|e| bad(ErrorCode::InvalidArgument, e.to_string()))?,
        None => OrbId::parse(&format!("orb-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff))
            .expect("generated ids are valid"),
    };
    let token = crate::auth::generate_token();
    let now = ctx.ingest.clock.now_ms();
    let mut record = OrbRecord::provisioned(
        OrbKey::new(tenant.clone(), orb.clone()),
        Some(crate::auth::hash_token(token.as_bytes())),
        now,
    );
    record.attributes = req.attributes;
    ctx.fleet().register(record).await?;
    let body = serde_json::json!({
        "tenant_id": tenant,
        "orb_id": orb,
        "status": OrbStatus::Provisioned.as_str(),
        "device_token": token,
        "mqtt_username": format!("{tenant}/{orb}"),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantQuery {
    tenant_id: Option<String>,
}

fn orb_key(tenant: crate::model::TenantId, id: &str) -> Result<OrbKey, Problem> {
    let orb = OrbId::parse(id).map_err(|e| bad(ErrorCode::InvalidArgument, e.to_string()))?;
    Ok(OrbKey::new(tenant, orb))
}

/// The orb an operator call is about: authenticates, then scopes `id` to the caller's tenant.
fn operator_orb(ctx: &HttpCtx, headers: &HeaderMap, tenant_id: Option<&str>, id: &str) -> Result<OrbKey, Problem> {
    ctx.ingest.metrics.http_requests.inc();
    let tenant = auth::operator(ctx, headers, tenant_id)?;
    orb_key(tenant, id)
}

fn not_found(key: &OrbKey) -> Problem {
    bad(ErrorCode::NotFound, format!("no orb {} in tenant {}", key.orb, key.tenant))
}

async fn get_orb(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let key = operator_orb(&ctx, &headers, q.tenant_id.as_deref(), &id)?;
    match ctx.fleet().view(&key).await? {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(not_found(&key)),
    }
}

async fn decommission(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, Problem> {
    let key = operator_orb(&ctx, &headers, q.tenant_id.as_deref(), &id)?;
    ctx.fleet().decommission(&key).await?;
    let view = ctx.fleet().view(&key).await?.ok_or_else(|| not_found(&key))?;
    Ok(Json(view).into_response())
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

fn decode_page_token(t: &str) -> Result<(u64, u64), Problem> {
    let invalid = || bad(ErrorCode::InvalidArgument, "page_token is not one this server issued");
    let bytes = hex::decode(t).map_err(|_| invalid())?;
    if bytes.len() != 16 {
        return Err(invalid());
    }
    let ts = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| invalid())?);
    let suffix = u64::from_be_bytes(bytes[8..].try_into().map_err(|_| invalid())?);
    Ok((ts, suffix))
}

async fn history(
    State(ctx): Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, Problem> {
    let key = operator_orb(&ctx, &headers, q.tenant_id.as_deref(), &id)?;
    let limit = q.limit.unwrap_or(HISTORY_PAGE_DEFAULT);
    if limit == 0 || limit > HISTORY_PAGE_MAX {
        return Err(bad(ErrorCode::InvalidArgument, format!("limit must be 1..{HISTORY_PAGE_MAX}")));
    }
    let from = q.from.unwrap_or(0);
    let to = q.to.unwrap_or(u64::MAX);
    if from > to {
        return Err(bad(ErrorCode::InvalidArgument, "from is after to"));
    }
    let after = q.page_token.as_deref().map(decode_page_token).transpose()?;
    let store = &ctx.ingest.store;
    if store.orb(&key).map_err(ApiError::internal)?.is_none() {
        return Err(not_found(&key));
    }
    // One extra point tells whether another page exists.
    let mut rows = store.points(&key, from, to, after, limit + 1).map_err(ApiError::internal)?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|((ts, suffix), _)| {
            let mut b = ts.to_be_bytes().to_vec();
            b.extend_from_slice(&suffix.to_be_bytes());
            hex::encode(b)
        })
    } else {
        None
    };
    let points: Vec<serde_json::Value> = rows
        .iter()
        .map(|(_, sp)| {
            let mut v = sp.point.to_json();
            v["received_ms"] = sp.received_ms.into();
            v
        })
        .collect();
    Ok(Json(serde_json::json!({
        "tenant_id": key.tenant,
        "orb_id": key.orb,
        "points": points,
        "next_page_token": next,
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
    let ingest = &ctx.ingest;
    ingest.metrics.http_requests.inc();
    ingest.metrics.message_in(crate::metrics::MsgKind::Telemetry);
    let key = match auth::device_or_operator(&ctx, &headers, q.tenant_id.as_deref(), &id).await? {
        Caller::Device(key) => key,
        Caller::Operator(tenant) => {
            let key = orb_key(tenant, &id)?;
            match ctx.fleet().touch(&key).await? {
                None => return Err(not_found(&key)),
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
