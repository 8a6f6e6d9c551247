//! Alert rules, alerts and webhooks.

use crate::actors::rules::{AlertOp, Alerting};
use crate::error::{ApiError, ErrorCode};
use crate::model::alert::{Alert, AlertState, Delivery, DeliveryState, Webhook, check_assignee, check_comment};
use crate::model::event::EVENT_TYPES;
use crate::model::rule::{self, Compiled, RULES_PER_TENANT_MAX, Rule, RuleSpec};
use crate::storage::{Batch, Store};

use super::{Access, Api, Principal, internal, invalid};

/// Webhooks one tenant may have.
pub const WEBHOOKS_PER_TENANT_MAX: usize = 50;
/// Most alerts or deliveries one page returns.
pub const ALERT_PAGE_MAX: usize = 1_000;

/// What `POST /v1/webhooks` takes.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub tenant_id: Option<String>,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Deliveries in flight at once, each for a different orb (1..=128, default 32).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// For an https URL: CA certificates (PEM) to trust instead of the public roots (a private
    /// endpoint). Without it, https endpoints are verified against the Mozilla roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

impl Api {
    fn alerting(&self) -> Result<&Alerting, ApiError> {
        self.fleet()
            .ctx()
            .alerting
            .get()
            .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "the rule engine is starting"))
    }

    /// Validates and stores a rule; it applies to the next observation.
    pub async fn create_rule(&self, p: &Principal, tenant_id: Option<&str>, spec: RuleSpec) -> Result<Rule, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        self.existing_tenant(&tenant)?;
        if self.store().rules(&tenant).map_err(internal)?.len() >= RULES_PER_TENANT_MAX {
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!("a tenant has at most {RULES_PER_TENANT_MAX} rules"),
            ));
        }
        let rule = rule::validate(spec, tenant, new_id("rule"), self.now_ms()).map_err(invalid)?;
        let compiled = Compiled::new(rule.clone()).map_err(invalid)?;
        let mut batch = Batch::new();
        Store::add_rule(&mut batch, &rule);
        self.store().commit(batch).await.map_err(internal)?;
        self.alerting()?.ctx.book.insert(compiled);
        Ok(rule)
    }

    pub fn list_rules(&self, p: &Principal, tenant_id: Option<&str>) -> Result<Vec<Rule>, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        self.store().rules(&tenant).map_err(internal)
    }

    /// Deletes a rule; its open alerts stay as they are.
    pub async fn delete_rule(&self, p: &Principal, tenant_id: Option<&str>, rule_id: &str) -> Result<Rule, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        let rule = self
            .store()
            .rule(&tenant, rule_id)
            .map_err(internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no rule {rule_id}")))?;
        let alerting = self.alerting()?;
        alerting.ctx.book.remove(&tenant, rule_id);
        let mut batch = Batch::new();
        self.store().delete_rule(&mut batch, &tenant, rule_id).map_err(internal)?;
        self.store().commit(batch).await.map_err(internal)?;
        alerting.rule_removed(&tenant, rule_id).await;
        Ok(rule)
    }

    /// Alerts newest first, optionally in one state, cursor-paged.
    pub fn list_alerts(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        state: Option<&str>,
        orb_id: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<Alert>, Option<String>), ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        let state = match super::given(state) {
            Some(s) => Some(
                AlertState::parse(s).ok_or_else(|| invalid(format!("state {s:?}: open, acknowledged or resolved")))?,
            ),
            None => None,
        };
        let limit = if page_size == 0 { 100 } else { page_size };
        if limit > ALERT_PAGE_MAX {
            return Err(invalid(format!("page_size must be 1..{ALERT_PAGE_MAX}")));
        }
        let before = super::given(page_token);
        if before.is_some_and(|t| t.len() != 20 || !t.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(invalid("page_token is not one this server issued"));
        }
        let orb = super::given(orb_id);
        let (alerts, more) = self
            .store()
            .alerts(&tenant, before, limit, |a| {
                state.is_none_or(|s| a.state == s) && orb.is_none_or(|o| a.orb.as_str() == o)
            })
            .map_err(internal)?;
        let next = if more { alerts.last().map(|a| a.alert_id.clone()) } else { None };
        Ok((alerts, next))
    }

    pub async fn alert_op(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        alert_id: &str,
        op: AlertOp,
    ) -> Result<Alert, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Operate)?;
        let alert = self
            .store()
            .alert(&tenant, alert_id)
            .map_err(internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no alert {alert_id}")))?;
        self.alerting()?.alert_op(alert, op).await
    }

    /// Sets or clears an alert's assignee.
    pub async fn assign_alert(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        alert_id: &str,
        assignee: Option<&str>,
    ) -> Result<Alert, ApiError> {
        let assignee = assignee.map(str::trim).filter(|a| !a.is_empty());
        if let Some(a) = assignee {
            check_assignee(a).map_err(invalid)?;
        }
        self.alert_op(p, tenant_id, alert_id, AlertOp::Assign(assignee.map(str::to_string))).await
    }

    /// Adds an operator's comment to an alert.
    pub async fn comment_alert(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        alert_id: &str,
        text: &str,
    ) -> Result<Alert, ApiError> {
        check_comment(text).map_err(invalid)?;
        let op = AlertOp::Comment { author: p.name(), text: text.to_string() };
        self.alert_op(p, tenant_id, alert_id, op).await
    }

    /// Subscribes a URL to event types; the secret signs every delivery.
    pub async fn create_webhook(&self, p: &Principal, spec: WebhookSpec) -> Result<Webhook, ApiError> {
        let tenant = self.tenant_for(p, spec.tenant_id.as_deref(), Access::Admin)?;
        self.existing_tenant(&tenant)?;
        let url = spec.url.trim();
        let (host, https) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(h), _) => (h, true),
            (None, Some(h)) => (h, false),
            _ => return Err(invalid("url must start with https:// or http://")),
        };
        if host.is_empty() || host.starts_with('/') || url.len() > 2048 || url.chars().any(char::is_whitespace) {
            return Err(invalid("url must be http(s)://host[:port]/path without spaces, at most 2048 bytes"));
        }
        if let Some(pem) = &spec.ca_pem {
            if !https {
                return Err(invalid("ca_pem applies to https:// URLs only"));
            }
            crate::webhooks::ca_roots(pem).map_err(invalid)?;
        }
        if spec.events.is_empty() {
            return Err(invalid(format!("events must name at least one of: {}", EVENT_TYPES.join(" "))));
        }
        if let Some(e) = spec.events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
            return Err(invalid(format!("unknown event type {e:?}; types: {}", EVENT_TYPES.join(" "))));
        }
        if spec.secret.len() < 16 || spec.secret.len() > 256 {
            return Err(invalid("secret must be 16..256 bytes"));
        }
        let max_attempts = spec.max_attempts.unwrap_or(12);
        if !(1..=50).contains(&max_attempts) {
            return Err(invalid("max_attempts must be 1..50"));
        }
        let concurrency = spec.concurrency.unwrap_or(32);
        if !(1..=128).contains(&concurrency) {
            return Err(invalid("concurrency must be 1..128"));
        }
        if self.store().webhooks(&tenant).map_err(internal)?.len() >= WEBHOOKS_PER_TENANT_MAX {
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!("a tenant has at most {WEBHOOKS_PER_TENANT_MAX} webhooks"),
            ));
        }
        let mut events = spec.events.clone();
        events.sort();
        events.dedup();
        let w = Webhook {
            tenant,
            webhook_id: new_id("wh"),
            url: url.to_string(),
            events,
            secret: spec.secret,
            max_attempts,
            concurrency,
            created_ms: self.now_ms(),
            ca_pem: spec.ca_pem,
        };
        let mut batch = Batch::new();
        Store::add_webhook(&mut batch, &w);
        self.store().commit(batch).await.map_err(internal)?;
        self.alerting()?.ctx.webhooks.add(w.clone()).map_err(internal)?;
        Ok(w)
    }

    pub fn list_webhooks(&self, p: &Principal, tenant_id: Option<&str>) -> Result<Vec<Webhook>, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, Access::Read)?;
        self.store().webhooks(&tenant).map_err(internal)
    }

    fn webhook(&self, p: &Principal, tenant_id: Option<&str>, id: &str, need: Access) -> Result<Webhook, ApiError> {
        let tenant = self.tenant_for(p, tenant_id, need)?;
        self.store()
            .webhook(&tenant, id)
            .map_err(internal)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no webhook {id}")))
    }

    pub async fn delete_webhook(&self, p: &Principal, tenant_id: Option<&str>, id: &str) -> Result<Webhook, ApiError> {
        let w = self.webhook(p, tenant_id, id, Access::Admin)?;
        self.alerting()?.ctx.webhooks.remove(&w.tenant, id);
        let mut batch = Batch::new();
        self.store().delete_webhook(&mut batch, &w.tenant, id).map_err(internal)?;
        self.store().commit(batch).await.map_err(internal)?;
        Ok(w)
    }

    /// A webhook's deliveries, newest first (pending, delivered and dead).
    pub fn list_deliveries(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, ApiError> {
        let w = self.webhook(p, tenant_id, id, Access::Read)?;
        let limit = if limit == 0 { 100 } else { limit.min(ALERT_PAGE_MAX) };
        self.store().deliveries(&w.tenant, id, limit).map_err(internal)
    }

    /// Queues a dead-lettered delivery again, at the end of the webhook's outbox.
    pub async fn redeliver(
        &self,
        p: &Principal,
        tenant_id: Option<&str>,
        id: &str,
        seq: u64,
    ) -> Result<Delivery, ApiError> {
        let w = self.webhook(p, tenant_id, id, Access::Operate)?;
        let dead =
            self.store().logged_delivery(&w.tenant, id, seq).map_err(internal)?.ok_or_else(|| {
                ApiError::new(ErrorCode::NotFound, format!("no finished delivery {seq} of webhook {id}"))
            })?;
        if dead.state != DeliveryState::Dead {
            return Err(invalid(format!("delivery {seq} was delivered; only dead deliveries are redelivered")));
        }
        let webhooks = &self.alerting()?.ctx.webhooks;
        let new_seq = webhooks
            .reserve(&w.tenant, id)
            .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "the webhook's worker is not running"))?;
        let now = self.now_ms();
        let again = Delivery {
            seq: new_seq,
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: now,
            last_error: None,
            created_ms: now,
            finished_ms: None,
            ..dead.clone()
        };
        let mut batch = Batch::new();
        Store::unlog_delivery(&mut batch, &dead);
        Store::add_outbox(&mut batch, &again);
        self.store().commit(batch).await.map_err(internal)?;
        webhooks.poke(&w.tenant, id);
        Ok(again)
    }
}
