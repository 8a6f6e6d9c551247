//! Registry and telemetry operations: register, read, list, decommission, history.

use std::collections::BTreeMap;

use super::{Access, Api, Principal, given, internal, invalid};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, ORB_ATTRIBUTES_MAX};
use crate::model::orb::{OrbRecord, OrbState, OrbStatus};
use crate::model::state_report::VersionChange;
use crate::model::{OrbId, OrbKey, TenantId};
use crate::storage::StoredPoint;

/// Most orbs one list page holds.
pub const ORBS_PAGE_MAX: usize = 1_000;

/// Certificate, tenant CA and server CA (PEM) of an issued device certificate.
type CertPems = (Option<String>, Option<String>, Option<String>);

/// What a registration returns (the secrets once).
#[derive(Clone, Debug)]
pub struct Registration {
    pub tenant: TenantId,
    pub orb: OrbId,
    pub device_token: String,
    /// With a CSR: the device certificate, the tenant CA that issued it and the CA of the
    /// server certificate (to verify the MQTTS listener).
    pub certificate_pem: Option<String>,
    pub ca_pem: Option<String>,
    pub server_ca_pem: Option<String>,
}

/// A history request: `from <= ts <= to`, at most `limit` points (0: the default), after the
/// cursor `page_token`.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    pub from: u64,
    pub to: u64,
    pub limit: usize,
    pub page_token: Option<String>,
}

/// One page of history and the cursor to the next.
pub struct HistoryPage {
    pub key: OrbKey,
    pub points: Vec<StoredPoint>,
    pub next_page_token: Option<String>,
}

fn check_attributes(attrs: &BTreeMap<String, String>) -> Result<(), ApiError> {
    crate::model::orb::check_attributes(attrs).map_err(invalid)
}

pub(crate) fn not_found(key: &OrbKey) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no orb {} in tenant {}", key.orb, key.tenant))
}

impl Api {
    /// The orb an operator call is about, if `p` may do `need` in its tenant.
    pub fn orb_key(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        need: Access,
    ) -> Result<OrbKey, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, need)?;
        let orb = OrbId::parse(orb_id).map_err(|e| invalid(e.to_string()))?;
        Ok(OrbKey::new(tenant, orb))
    }

    /// NOT_FOUND unless the orb is registered (in any status).
    pub(crate) fn ensure_orb(&self, key: &OrbKey) -> Result<(), ApiError> {
        match self.store().orb(key).map_err(internal)? {
            Some(_) => Ok(()),
            None => Err(not_found(key)),
        }
    }

    pub async fn register_orb(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: Option<&str>,
        attributes: BTreeMap<String, String>,
        csr_pem: Option<&str>,
    ) -> Result<Registration, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        self.existing_tenant(&tenant)?;
        check_attributes(&attributes)?;
        let orb = match given(orb_id) {
            Some(id) => OrbId::parse(id).map_err(|e| invalid(e.to_string()))?,
            None => OrbId::parse(&format!("orb-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff))
                .expect("generated ids are valid"),
        };
        let token = crate::auth::generate_token();
        let now = self.now_ms();
        let key = OrbKey::new(tenant.clone(), orb.clone());
        let mut record = OrbRecord::provisioned(key, Some(crate::auth::hash_token(token.as_bytes())), now);
        record.attributes = attributes;
        let mut reg = Registration {
            tenant: tenant.clone(),
            orb: orb.clone(),
            device_token: token,
            certificate_pem: None,
            ca_pem: None,
            server_ca_pem: None,
        };
        if let Some(csr) = given(csr_pem) {
            let (serial, certs) = self.issue_certificate(&tenant, &orb, csr, now).await?;
            record.cert_serial = Some(serial);
            (reg.certificate_pem, reg.ca_pem, reg.server_ca_pem) = certs;
        }
        self.fleet().register(record).await?;
        Ok(reg)
    }

    /// The registry record and live state (never activates the orb's actor).
    pub async fn get_orb(&self, p: &Principal, tenant_id: Option<&str>, orb_id: &str) -> Result<OrbState, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Read)?;
        self.fleet().view(&key).await?.ok_or_else(|| not_found(&key))
    }

    /// Registered orbs in id order, optionally of one status.
    pub async fn list_orbs(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        status: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<OrbState>, Option<String>), ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let status = match given(status) {
            None => None,
            Some(s) => Some(
                [OrbStatus::Provisioned, OrbStatus::Active, OrbStatus::Decommissioned]
                    .into_iter()
                    .find(|x| x.as_str() == s)
                    .ok_or_else(|| invalid(format!("status {s:?}: provisioned, active or decommissioned")))?,
            ),
        };
        let page_size = if page_size == 0 { 100 } else { page_size };
        if page_size > ORBS_PAGE_MAX {
            return Err(invalid(format!("page_size must be at most {ORBS_PAGE_MAX}")));
        }
        let mut after = given(page_token)
            .map(|t| OrbId::parse(t).map_err(|_| invalid("page_token is not one this server issued")))
            .transpose()?;
        let mut out = Vec::with_capacity(page_size);
        // A filter that rarely matches pages on in bounded steps.
        for _ in 0..10 {
            let ids =
                self.store().orb_ids_after(&tenant, after.as_ref().map(OrbId::as_str), page_size).map_err(internal)?;
            let exhausted = ids.len() < page_size;
            for id in ids {
                after = Some(id.clone());
                let key = OrbKey::new(tenant.clone(), id);
                if let Some(state) = self.fleet().view(&key).await?
                    && status.is_none_or(|s| s == state.record.status)
                {
                    out.push(state);
                    if out.len() == page_size {
                        return Ok((out, after.map(|a| a.to_string())));
                    }
                }
            }
            if exhausted {
                return Ok((out, None));
            }
        }
        Ok((out, after.map(|a| a.to_string())))
    }

    pub async fn decommission_orb(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
    ) -> Result<OrbState, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Operate)?;
        let Some(record) = self.store().orb(&key).map_err(internal)? else { return Err(not_found(&key)) };
        self.fleet().decommission(&key).await?;
        // Its certificate is revoked with it (the token stops working with the status).
        if let Some(serial) = &record.cert_serial {
            self.revoke_serial(&key, serial).await?;
        }
        self.fleet().view(&key).await?.ok_or_else(|| not_found(&key))
    }

    /// Revokes the orb's current certificate: it is refused in the TLS handshake from now on,
    /// and a live connection of the orb is closed (DISCONNECT 0x87, presence `auth_revoked`).
    /// The revocation is durable before the orb hears of it. Operators and admins.
    pub async fn revoke_certificate(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
    ) -> Result<OrbState, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Operate)?;
        let Some(record) = self.store().orb(&key).map_err(internal)? else { return Err(not_found(&key)) };
        let Some(serial) = record.cert_serial else {
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                format!("orb {key} has no certificate to revoke"),
            ));
        };
        self.revoke_serial(&key, &serial).await?;
        self.fleet().set_certificate(&key, None).await?;
        self.fleet().view(&key).await?.ok_or_else(|| not_found(&key))
    }

    /// Issues the orb a new certificate from a CSR (rotation, or after a revocation). The
    /// previous one stops authenticating at once and a live connection is closed.
    pub async fn renew_certificate(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        csr_pem: &str,
    ) -> Result<Registration, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Operate)?;
        let Some(record) = self.store().orb(&key).map_err(internal)? else { return Err(not_found(&key)) };
        if record.status == crate::model::orb::OrbStatus::Decommissioned {
            return Err(ApiError::new(ErrorCode::Decommissioned, format!("orb {key} is decommissioned")));
        }
        let (serial, (certificate_pem, ca_pem, server_ca_pem)) =
            self.issue_certificate(&key.tenant, &key.orb, csr_pem, self.now_ms()).await?;
        self.fleet().set_certificate(&key, Some(serial)).await?;
        Ok(Registration {
            tenant: key.tenant.clone(),
            orb: key.orb.clone(),
            // The device token is not shown again.
            device_token: String::new(),
            certificate_pem,
            ca_pem,
            server_ca_pem,
        })
    }

    /// A device certificate from `csr` signed by the tenant's CA: its serial, and the PEMs a
    /// registration answers with (certificate, tenant CA, server CA).
    async fn issue_certificate(
        &self,
        tenant: &TenantId,
        orb: &OrbId,
        csr: &str,
        now: u64,
    ) -> Result<(String, CertPems), ApiError> {
        let ca = self.ca(Some(tenant)).await?;
        let issued = crate::pki::issue_device_cert(&ca, tenant, orb, csr, now).map_err(|e| match e {
            crate::pki::PkiError::Ca(_) => internal(e),
            e => invalid(e.to_string()),
        })?;
        let server_ca = self.ca(None).await?.cert_pem;
        Ok((issued.serial, (Some(issued.cert_pem), Some(ca.cert_pem), Some(server_ca))))
    }

    /// Adds a certificate serial to the tenant's revocation list, durably.
    async fn revoke_serial(&self, key: &OrbKey, serial: &str) -> Result<(), ApiError> {
        let mut batch = crate::storage::Batch::new();
        crate::storage::Store::add_revoked(&mut batch, key, serial, self.now_ms());
        self.store().commit(batch).await.map_err(internal)?;
        Ok(())
    }

    /// Sets and removes operator attributes (tags) of an orb; the answer is the orb after the
    /// change, durable. Refused whole (nothing changes) when any part is invalid.
    pub async fn update_attributes(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<OrbState, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Operate)?;
        if set.len() + remove.len() > 2 * ORB_ATTRIBUTES_MAX {
            return Err(invalid(format!("an update names at most {} attributes", 2 * ORB_ATTRIBUTES_MAX)));
        }
        check_attributes(&set)?;
        self.ensure_orb(&key)?;
        self.fleet().set_attributes(&key, set, remove).await?;
        self.fleet().view(&key).await?.ok_or_else(|| not_found(&key))
    }

    /// The history of an orb's reported component versions, oldest first, optionally of one
    /// component.
    pub fn version_history(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        component: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<VersionPage, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Read)?;
        let limit = if page_size == 0 { HISTORY_PAGE_DEFAULT } else { page_size };
        if limit > HISTORY_PAGE_MAX {
            return Err(invalid(format!("page_size must be 1..{HISTORY_PAGE_MAX}")));
        }
        let after = given(page_token).map(decode_version_token).transpose()?;
        self.ensure_orb(&key)?;
        let (changes, more) = self
            .store()
            .version_changes(&key, after.as_ref().map(|(at, c)| (*at, c.as_str())), given(component), limit)
            .map_err(internal)?;
        let next_page_token = if more {
            changes.last().map(|c| {
                let mut b = c.at_ms.to_be_bytes().to_vec();
                b.extend_from_slice(c.component.as_bytes());
                hex::encode(b)
            })
        } else {
            None
        };
        Ok(VersionPage { changes, next_page_token })
    }

    /// Telemetry history from both tiers, ordered by device time; cursor pages never split
    /// points that share a millisecond.
    pub async fn history(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_id: &str,
        q: &HistoryQuery,
    ) -> Result<HistoryPage, ApiError> {
        let key = self.orb_key(p, tenant_id, orb_id, Access::Read)?;
        let (from, to, limit, page_token) = (q.from, q.to, q.limit, q.page_token.as_deref());
        let limit = if limit == 0 { HISTORY_PAGE_DEFAULT } else { limit };
        if limit > HISTORY_PAGE_MAX {
            return Err(invalid(format!("limit must be 1..{HISTORY_PAGE_MAX}")));
        }
        if from > to {
            return Err(invalid("from is after to"));
        }
        let after = given(page_token).map(decode_page_token).transpose()?;
        self.ensure_orb(&key)?;
        let (rows, more) = self.history_page(&key, from, to, after, limit).await?;
        let next_page_token = if more {
            rows.last().map(|((ts, suffix), _)| {
                let mut b = ts.to_be_bytes().to_vec();
                b.extend_from_slice(&suffix.to_be_bytes());
                hex::encode(b)
            })
        } else {
            None
        };
        Ok(HistoryPage { key, points: rows.into_iter().map(|(_, p)| p).collect(), next_page_token })
    }
}

/// One page of an orb's version history.
pub struct VersionPage {
    pub changes: Vec<VersionChange>,
    pub next_page_token: Option<String>,
}

fn decode_version_token(t: &str) -> Result<(u64, String), ApiError> {
    let bad = || invalid("page_token is not one this server issued");
    let bytes = hex::decode(t).map_err(|_| bad())?;
    if bytes.len() < 9 {
        return Err(bad());
    }
    let at = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?);
    let component = String::from_utf8(bytes[8..].to_vec()).map_err(|_| bad())?;
    Ok((at, component))
}

fn decode_page_token(t: &str) -> Result<(u64, u64), ApiError> {
    let bad = || invalid("page_token is not one this server issued");
    let bytes = hex::decode(t).map_err(|_| bad())?;
    if bytes.len() != 16 {
        return Err(bad());
    }
    let ts = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?);
    let suffix = u64::from_be_bytes(bytes[8..].try_into().map_err(|_| bad())?);
    Ok((ts, suffix))
}

/// What a stream subscriber is sent.
pub enum StreamEvent {
    Change(std::sync::Arc<crate::stream::OrbChange>),
    Lagged(u64),
}

impl Api {
    /// Subscribes to live changes of a tenant's orbs (all, or the named ones). The returned
    /// receiver is bounded; a subscriber that reads too slowly is told it lagged and, for named
    /// orbs, resynchronised with a snapshot.
    pub fn stream(
        self: &std::sync::Arc<Self>,
        p: &Principal,
        tenant_id: Option<&str>,
        orb_ids: &[String],
    ) -> Result<tokio::sync::mpsc::Receiver<StreamEvent>, ApiError> {
        use crate::limits::STREAM_ORBS_MAX;
        use crate::stream::{ChangeKind, Filter, OrbChange, StreamItem};
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        if orb_ids.len() > STREAM_ORBS_MAX {
            return Err(invalid(format!("a stream names at most {STREAM_ORBS_MAX} orbs")));
        }
        let orbs = orb_ids
            .iter()
            .map(|o| OrbId::parse(o).map_err(|e| invalid(format!("orb_ids: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sub = self.fleet().ctx().hub.subscribe(Filter { tenant: tenant.clone(), orbs: orbs.clone() });
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let api = self.clone();
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = sub.next() => item,
                    _ = closing.wait_for(|c| *c) => None,
                };
                let Some(item) = item else { break };
                let ok = match item {
                    StreamItem::Change(c) => tx.send(StreamEvent::Change(c)).await.is_ok(),
                    StreamItem::Lagged(n) => {
                        let mut ok = tx.send(StreamEvent::Lagged(n)).await.is_ok();
                        let now = api.now_ms();
                        for orb in &orbs {
                            let key = OrbKey::new(tenant.clone(), orb.clone());
                            if let Ok(Some(state)) = api.fleet().view(&key).await {
                                let snap = OrbChange::of(&state, ChangeKind::Snapshot, now);
                                ok = ok && tx.send(StreamEvent::Change(std::sync::Arc::new(snap))).await.is_ok();
                            }
                        }
                        ok
                    }
                };
                if !ok {
                    break; // the subscriber is gone
                }
            }
        });
        Ok(rx)
    }
}

/// A search as the transports receive it (strings, validated here).
#[derive(Clone, Debug, Default)]
pub struct SearchParams {
    pub query: String,
    /// Extra status filter (ANDed), for `GET /v1/orbs?status=`.
    pub status: Option<String>,
    pub sort: Option<String>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
    pub page_size: usize,
    pub page_token: Option<String>,
    /// Projection: the fields to return besides `orb_id`.
    pub fields: Option<Vec<String>>,
    pub count_by: Option<String>,
    pub stats: Option<String>,
}

fn field(name: &str, what: &str) -> Result<crate::model::query::Field, ApiError> {
    crate::model::query::Field::parse(name).ok_or_else(|| invalid(format!("{what}: unknown field {name:?}")))
}

impl Api {
    /// Fleet search over the in-memory index: filter, sort, cursor pages, projection and one
    /// aggregation over every match.
    pub fn search_orbs(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        params: SearchParams,
    ) -> Result<(TenantId, crate::search::SearchResult, Option<Vec<String>>), ApiError> {
        use crate::model::query::{Expr, Field, Op, Value};
        use crate::search::{Aggregate, SearchRequest, Sort};
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let mut query = crate::model::query::parse(&params.query).map_err(|e| invalid(e.to_string()))?;
        if let Some(s) = given(params.status.as_deref()) {
            query = Expr::And(Box::new(query), Box::new(Expr::Cmp(Field::Status, Op::Eq, Value::Str(s.to_string()))));
        }
        let sort = match given(params.sort.as_deref()) {
            None => None,
            Some(name) => Some(Sort {
                field: field(name, "sort")?,
                descending: match given(params.order.as_deref()) {
                    None | Some("asc") => false,
                    Some("desc") => true,
                    Some(o) => return Err(invalid(format!("order {o:?}: asc or desc"))),
                },
            }),
        };
        let aggregate = match (given(params.count_by.as_deref()), given(params.stats.as_deref())) {
            (Some(_), Some(_)) => return Err(invalid("one aggregation at a time: count_by or stats")),
            (Some(f), None) => Some(Aggregate::CountBy(field(f, "count_by")?)),
            (None, Some(f)) => {
                let f = field(f, "stats")?;
                if !f.is_numeric() {
                    return Err(invalid("stats needs a numeric field: battery, speed, lat, lon, last_seen_ms"));
                }
                Some(Aggregate::Stats(f))
            }
            (None, None) => None,
        };
        let page_size = if params.page_size == 0 { 100 } else { params.page_size };
        if page_size > ORBS_PAGE_MAX {
            return Err(invalid(format!("page_size must be at most {ORBS_PAGE_MAX}")));
        }
        let req = SearchRequest {
            query,
            sort,
            page_size,
            page_token: params.page_token.filter(|t| !t.is_empty()),
            aggregate,
        };
        let result = self.fleet().ctx().index.search(&tenant, &req)?;
        Ok((tenant, result, params.fields.filter(|f| !f.is_empty())))
    }
}
