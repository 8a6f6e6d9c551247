//! Who is calling the REST API: the bootstrap operator (bearer token, tenant chosen by
//! `tenant_id`), a device (basic auth `tenant/orb:device-token`, telemetry fallback only), or,
//! under `--dev`, an anonymous caller acting as an admin of the dev tenant.
//!
//! Answers never reveal whether an id exists in another tenant.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use super::{HttpCtx, Problem, bad};
use crate::error::{ApiError, ErrorCode};
use crate::model::orb::OrbStatus;
use crate::model::{OrbKey, TenantId};

/// An authenticated caller.
pub enum Caller {
    Operator(TenantId),
    Device(OrbKey),
}

fn unauthenticated(msg: &str) -> Problem {
    bad(ErrorCode::Unauthenticated, msg)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

fn basic(headers: &HeaderMap) -> Option<Result<(String, String), Problem>> {
    use base64_decode as b64;
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let Some(raw) = b64(v.trim()) else {
        return Some(Err(unauthenticated("basic credentials are not valid base64")));
    };
    let Ok(text) = String::from_utf8(raw) else {
        return Some(Err(unauthenticated("basic credentials are not UTF-8")));
    };
    match text.split_once(':') {
        Some((user, pass)) => Some(Ok((user.to_string(), pass.to_string()))),
        None => Some(Err(unauthenticated("basic credentials need user:password"))),
    }
}

/// Standard base64 (RFC 4648) decoding, padding optional; `None` on any invalid character.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn tenant_param(tenant_id: Option<&str>) -> Result<Option<TenantId>, Problem> {
    tenant_id
        .map(|t| TenantId::parse(t).map_err(|e| bad(ErrorCode::InvalidArgument, format!("tenant_id: {e}"))))
        .transpose()
}

/// An operator call: the bootstrap bearer token, or anonymous under `--dev` (dev tenant only).
pub fn operator(ctx: &HttpCtx, headers: &HeaderMap, tenant_id: Option<&str>) -> Result<TenantId, Problem> {
    let tenant = tenant_param(tenant_id)?;
    match bearer(headers) {
        Some(token) => {
            if ctx.admin_token.is_empty()
                || !crate::auth::constant_time_eq(token.as_bytes(), ctx.admin_token.as_bytes())
            {
                return Err(unauthenticated("unknown API token"));
            }
            match tenant {
                Some(t) => Ok(t),
                None if ctx.dev => Ok(TenantId::dev()),
                None => Err(bad(ErrorCode::InvalidArgument, "tenant_id is required")),
            }
        }
        None if headers.contains_key(AUTHORIZATION) => Err(unauthenticated("expected a Bearer token")),
        None if ctx.dev => match tenant {
            Some(t) if !t.is_dev() => Err(unauthenticated("an API token is required outside the dev tenant")),
            _ => Ok(TenantId::dev()),
        },
        None => Err(unauthenticated("an API token is required (Authorization: Bearer ...)")),
    }
}

/// The telemetry fallback: a device with basic auth `tenant/orb:token` for its own orb, or an
/// operator.
pub async fn device_or_operator(
    ctx: &HttpCtx,
    headers: &HeaderMap,
    tenant_id: Option<&str>,
    orb_id: &str,
) -> Result<Caller, Problem> {
    let Some(creds) = basic(headers) else {
        return operator(ctx, headers, tenant_id).map(Caller::Operator);
    };
    let (user, token) = creds?;
    let key = OrbKey::parse_path(&user).map_err(|_| unauthenticated("basic user must be tenant/orb"))?;
    let store = &ctx.ingest.store;
    let record = store.orb(&key).map_err(ApiError::internal)?;
    let ok = match &record {
        Some(r) => match &r.token_hash {
            Some(hash) => crate::auth::verify_token(token.as_bytes(), hash),
            None => ctx.dev && key.tenant.is_dev(),
        },
        None => false,
    };
    if !ok {
        return Err(unauthenticated("bad device credentials"));
    }
    if key.orb.as_str() != orb_id || tenant_id.is_some_and(|t| t != key.tenant.as_str()) {
        return Err(bad(ErrorCode::PermissionDenied, "a device may only post its own telemetry"));
    }
    if record.is_some_and(|r| r.status == OrbStatus::Decommissioned) {
        return Err(bad(ErrorCode::Decommissioned, format!("orb {key} is decommissioned")));
    }
    Ok(Caller::Device(key))
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_rfc4648_vectors() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(base64_decode("YWNtZS9vMTpzZWNyZXQ=").unwrap(), b"acme/o1:secret");
        assert!(base64_decode("Zm9v*").is_none());
    }
}
