//! Who is calling and what they may do, decided in one place for REST and gRPC.
//!
//! Credentials: the bootstrap token (`auth.admin_token`, every tenant, chosen per call), API
//! tokens (`oma/<tenant>/<secret>`, one tenant, one role, stored as SHA-256), device basic
//! auth (`tenant/orb:device-token`, only for the orb's own fallback endpoints), and under
//! `--dev` no credentials at all (an admin of the dev tenant). Answers never reveal whether an
//! id exists in another tenant: a token asking for another tenant is refused before any lookup.

use super::{Api, given, invalid};
use crate::error::{ApiError, ErrorCode};
use crate::model::orb::OrbStatus;
pub use crate::model::tenant::Role;
use crate::model::{OrbKey, TenantId};

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Read,
    Operate,
    Admin,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    /// The bootstrap token.
    Root,
    /// An API token of one tenant.
    Token { tenant: TenantId, role: Role, token_id: String },
    /// `--dev` without credentials.
    Dev,
    /// A device, for its own orb.
    Device(OrbKey),
}

impl Principal {
    /// Who this is, as audit fields and alert comments name it.
    pub fn name(&self) -> String {
        match self {
            Principal::Root => "root".into(),
            Principal::Token { token_id, .. } => token_id.clone(),
            Principal::Dev => "dev".into(),
            Principal::Device(key) => format!("device:{key}"),
        }
    }
}

/// Prefix of API tokens.
pub const API_TOKEN_PREFIX: &str = "oma/";

fn unauthenticated(msg: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, msg)
}

/// The tenant named inside an API token, if it is one.
pub fn token_tenant(token: &str) -> Option<TenantId> {
    let rest = token.strip_prefix(API_TOKEN_PREFIX)?;
    let (tenant, _) = rest.split_once('/')?;
    TenantId::parse(tenant).ok()
}

impl Api {
    /// Resolves an `Authorization` header value (REST) or `authorization` metadata (gRPC).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let Some(value) = authorization.filter(|v| !v.is_empty()) else {
            return if self.dev {
                Ok(Principal::Dev)
            } else {
                Err(unauthenticated("credentials required (Authorization: Bearer <token>)"))
            };
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            let token = token.trim();
            if !self.admin_token.is_empty()
                && crate::auth::constant_time_eq(token.as_bytes(), self.admin_token.as_bytes())
            {
                return Ok(Principal::Root);
            }
            let tenant = token_tenant(token).ok_or_else(|| unauthenticated("unknown API token"))?;
            let hash = crate::auth::hash_token(token.as_bytes());
            return match self.store().api_token(&tenant, &hash).map_err(super::internal)? {
                Some(t) if !t.revoked => Ok(Principal::Token { tenant, role: t.role, token_id: t.token_id }),
                _ => Err(unauthenticated("unknown or revoked API token")),
            };
        }
        if let Some(b64) = value.strip_prefix("Basic ") {
            let raw =
                base64_decode(b64.trim()).ok_or_else(|| unauthenticated("basic credentials are not valid base64"))?;
            let text = String::from_utf8(raw).map_err(|_| unauthenticated("basic credentials are not UTF-8"))?;
            let (user, pass) =
                text.split_once(':').ok_or_else(|| unauthenticated("basic credentials need user:password"))?;
            let key = OrbKey::parse_path(user).map_err(|_| unauthenticated("basic user must be tenant/orb"))?;
            let record = self.store().orb(&key).map_err(super::internal)?;
            let ok = match &record {
                Some(r) => match &r.token_hash {
                    Some(hash) => crate::auth::verify_token(pass.as_bytes(), hash),
                    None => self.dev && key.tenant.is_dev(),
                },
                None => false,
            };
            if !ok {
                return Err(unauthenticated("bad device credentials"));
            }
            if record.is_some_and(|r| r.status == OrbStatus::Decommissioned) {
                return Err(ApiError::new(ErrorCode::Decommissioned, format!("orb {key} is decommissioned")));
            }
            return Ok(Principal::Device(key));
        }
        Err(unauthenticated("expected Bearer or Basic credentials"))
    }

    /// The tenant an operator call acts in, if `p` may do `need` there.
    pub fn tenant_for(&self, p: &Principal, requested: Option<&str>, need: Access) -> Result<TenantId, ApiError> {
        let requested =
            given(requested).map(|t| TenantId::parse(t).map_err(|e| invalid(format!("tenant_id: {e}")))).transpose()?;
        match p {
            Principal::Root => match requested {
                Some(t) => Ok(t),
                None if self.dev => Ok(TenantId::dev()),
                None => Err(invalid("tenant_id is required")),
            },
            Principal::Token { tenant, role, .. } => {
                if requested.as_ref().is_some_and(|t| t != tenant) {
                    return Err(ApiError::new(
                        ErrorCode::PermissionDenied,
                        format!("this token is scoped to tenant {tenant}"),
                    ));
                }
                let allowed = match need {
                    Access::Read => true,
                    Access::Operate => *role >= Role::Operator,
                    Access::Admin => *role >= Role::Admin,
                };
                if !allowed {
                    return Err(ApiError::new(
                        ErrorCode::PermissionDenied,
                        format!("a {} token cannot do this", role.as_str()),
                    ));
                }
                Ok(tenant.clone())
            }
            Principal::Dev => match requested {
                Some(t) if !t.is_dev() => Err(unauthenticated("an API token is required outside the dev tenant")),
                _ => Ok(TenantId::dev()),
            },
            Principal::Device(_) => {
                Err(ApiError::new(ErrorCode::PermissionDenied, "devices may not use the operator API"))
            }
        }
    }

    /// The orb a device call is about: its own, and nobody else's.
    pub fn device_orb(&self, p: &Principal, orb_id: &str, requested: Option<&str>) -> Result<OrbKey, ApiError> {
        match p {
            Principal::Device(key)
                if key.orb.as_str() == orb_id && given(requested).is_none_or(|t| t == key.tenant.as_str()) =>
            {
                Ok(key.clone())
            }
            Principal::Device(_) => {
                Err(ApiError::new(ErrorCode::PermissionDenied, "a device may only act for its own orb"))
            }
            _ => Err(ApiError::new(ErrorCode::PermissionDenied, "only the orb itself may do this")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_rfc4648_vectors() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(base64_decode("YWNtZS9vMTpzZWNyZXQ=").unwrap(), b"acme/o1:secret");
        assert!(base64_decode("Zm9v*").is_none());
    }

    #[test]
    fn api_tokens_name_their_tenant() {
        assert_eq!(token_tenant("oma/acme/abcdef"), TenantId::parse("acme").ok());
        assert_eq!(token_tenant("oma/ac me/abc"), None);
        assert_eq!(token_tenant("omd_abc"), None);
    }
}
