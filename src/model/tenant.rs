//! Tenants' API tokens: roles and the stored record (the secret itself is never stored).

use serde::{Deserialize, Serialize};

use super::ids::TenantId;

/// What an API token may do in its tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Read registry, telemetry, commands.
    Viewer,
    /// Also register, decommission, send commands and broadcasts.
    Operator,
    /// Also manage the tenant's API tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

/// An API token as stored, keyed by the SHA-256 of its secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub token_id: String,
    pub tenant: TenantId,
    pub role: Role,
    pub name: String,
    pub created_ms: u64,
    pub revoked: bool,
}

impl ApiToken {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "token_id": self.token_id,
            "tenant_id": self.tenant,
            "role": self.role.as_str(),
            "name": self.name,
            "created_ms": self.created_ms,
            "revoked": self.revoked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
