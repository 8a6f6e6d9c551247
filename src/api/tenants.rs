//! Tenants and their API tokens.

use super::{Access, Api, Principal, Role, internal, invalid};
use crate::error::{ApiError, ErrorCode};
use crate::model::TenantId;
use crate::model::tenant::ApiToken;
use crate::pki::StoredCa;
use crate::storage::{Batch, Store, TenantRecord};

/// Longest API token name, in bytes.
const TOKEN_NAME_LEN_MAX: usize = 128;

/// The stored CA of `tenant` (`None`: the platform's server CA), created and made durable
/// when there is none. Callers that may race serialize around it (`Api::ca` holds the tenant
/// lock; start-up runs before the API serves).
pub(crate) async fn stored_or_new_ca(store: &Store, tenant: Option<&TenantId>, now: u64) -> Result<StoredCa, ApiError> {
    if let Some(ca) = store.ca(tenant).map_err(internal)? {
        return Ok(ca);
    }
    let ca = match tenant {
        Some(t) => crate::pki::new_tenant_ca(t, now),
        None => crate::pki::new_ca("OrbManager server CA", now),
    }
    .map_err(internal)?;
    let mut batch = Batch::new();
    Store::add_ca(&mut batch, tenant, &ca);
    store.commit(batch).await.map_err(internal)?;
    Ok(ca)
}

impl Api {
    /// Creates a tenant (bootstrap token only).
    pub async fn create_tenant(&self, p: &Principal, tenant_id: &str) -> Result<TenantRecord, ApiError> {
        if *p != Principal::Root {
            return Err(ApiError::new(ErrorCode::PermissionDenied, "only the bootstrap token creates tenants"));
        }
        let tenant = TenantId::parse(tenant_id).map_err(|e| invalid(format!("tenant_id: {e}")))?;
        let _serial = self.tenant_lock.lock().await;
        if self.store().tenant(&tenant).map_err(internal)?.is_some() {
            return Err(ApiError::new(ErrorCode::AlreadyExists, format!("tenant {tenant} exists")));
        }
        let record = TenantRecord { tenant, created_ms: self.now_ms() };
        // The tenant's device CA is created with it.
        let ca = crate::pki::new_tenant_ca(&record.tenant, record.created_ms).map_err(internal)?;
        let mut batch = Batch::new();
        Store::add_tenant(&mut batch, &record);
        Store::add_ca(&mut batch, Some(&record.tenant), &ca);
        self.store().commit(batch).await.map_err(internal)?;
        Ok(record)
    }

    /// A tenant's device CA (`None`: the platform's server CA), created on first use where it
    /// does not exist yet (the dev tenant, stores from before CAs).
    pub(crate) async fn ca(&self, tenant: Option<&TenantId>) -> Result<StoredCa, ApiError> {
        if let Some(ca) = self.store().ca(tenant).map_err(internal)? {
            return Ok(ca);
        }
        let _serial = self.tenant_lock.lock().await;
        stored_or_new_ca(self.store(), tenant, self.now_ms()).await
    }

    /// Fails with `NotFound` unless the tenant exists (the dev tenant always does under --dev).
    pub(crate) fn existing_tenant(&self, tenant: &TenantId) -> Result<(), ApiError> {
        if self.dev && tenant.is_dev() {
            return Ok(());
        }
        match self.store().tenant(tenant).map_err(internal)? {
            Some(_) => Ok(()),
            None => Err(ApiError::new(ErrorCode::NotFound, format!("no tenant {tenant}"))),
        }
    }

    /// Issues an API token; the secret is returned once and only its hash is stored.
    pub async fn create_api_token(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        role: Role,
        name: &str,
    ) -> Result<(ApiToken, String), ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Admin)?;
        self.existing_tenant(&tenant)?;
        if name.len() > TOKEN_NAME_LEN_MAX || name.chars().any(char::is_control) {
            return Err(invalid(format!("name: at most {TOKEN_NAME_LEN_MAX} bytes, no control characters")));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("operating system random source failed");
        let token = format!("{}{tenant}/{}", super::auth::API_TOKEN_PREFIX, hex::encode(secret));
        let mut id = [0u8; 6];
        getrandom::fill(&mut id).expect("operating system random source failed");
        let record = ApiToken {
            token_id: format!("tok-{}", hex::encode(id)),
            tenant,
            role,
            name: name.to_string(),
            created_ms: self.now_ms(),
            revoked: false,
        };
        let mut batch = Batch::new();
        Store::add_api_token(&mut batch, &crate::auth::hash_token(token.as_bytes()), &record);
        self.store().commit(batch).await.map_err(internal)?;
        Ok((record, token))
    }

    pub fn list_api_tokens(&self, p: &Principal, tenant_id: Option<&str>) -> Result<Vec<ApiToken>, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Admin)?;
        Ok(self.store().api_tokens(&tenant).map_err(internal)?.into_iter().map(|(_, t)| t).collect())
    }

    /// Revokes a token: it stops working at once (every call looks it up).
    pub async fn revoke_api_token(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        token_id: &str,
    ) -> Result<ApiToken, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Admin)?;
        let tokens = self.store().api_tokens(&tenant).map_err(internal)?;
        let Some((hash, mut t)) = tokens.into_iter().find(|(_, t)| t.token_id == token_id) else {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no token {token_id} in tenant {tenant}")));
        };
        t.revoked = true;
        let mut batch = Batch::new();
        Store::add_api_token(&mut batch, &hash, &t);
        self.store().commit(batch).await.map_err(internal)?;
        Ok(t)
    }
}

/// A tenant's MQTT topic policy and, for operators, what its broker holds now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MqttView {
    pub tenant_id: String,
    pub policy: crate::model::topics::TopicPolicy,
    /// Sessions on this node: client id, online, filters.
    pub sessions: Vec<MqttSessionView>,
    /// Retained topics and payload sizes.
    pub retained: Vec<RetainedView>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MqttSessionView {
    pub client_id: String,
    pub online: bool,
    pub subscriptions: Vec<String>,
    /// Messages waiting for it (queued, and sent on an ended connection without their final
    /// acknowledgement).
    pub queued: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RetainedView {
    pub topic: String,
    pub payload_bytes: usize,
    pub qos: u8,
}

impl Api {
    /// The tenant's topic policy, sessions and retained messages (viewers and up).
    pub fn mqtt_view(&self, p: &Principal, tenant_id: Option<&str>) -> Result<MqttView, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let broker = &self.ingest.broker;
        Ok(MqttView {
            tenant_id: tenant.to_string(),
            policy: (*broker.policy(&tenant)).clone(),
            sessions: broker
                .sessions(&tenant)
                .into_iter()
                .map(|(client_id, online, subscriptions, queued)| MqttSessionView {
                    client_id,
                    online,
                    subscriptions,
                    queued,
                })
                .collect(),
            retained: broker
                .retained(&tenant)
                .iter()
                .map(|m| RetainedView { topic: m.topic.clone(), payload_bytes: m.payload.len(), qos: m.qos })
                .collect(),
        })
    }

    /// Replaces the tenant's topic policy (tenant admins). Entries are topic filters, `{orb}`
    /// standing for the connecting orb's id; an empty policy allows only platform topics.
    pub async fn set_topic_policy(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        policy: crate::model::topics::TopicPolicy,
    ) -> Result<crate::model::topics::TopicPolicy, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Admin)?;
        self.existing_tenant(&tenant)?;
        self.ingest.broker.set_policy(&tenant, policy.clone()).await?;
        Ok(policy)
    }
}
