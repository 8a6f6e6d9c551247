//! The gRPC services: each call authenticates from `authorization` metadata, calls the same
//! `api::Api` operation as REST, and converts between protobuf and model types here only.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use crate::api::orbs::{HistoryQuery, StreamEvent};
use crate::api::{Api, Principal};
use crate::error::ApiError;
use crate::model::broadcast::{AbortPolicy, BroadcastRequest};
use crate::model::command::{Command, CreateRequest};
use crate::model::orb::OrbState;
use crate::model::tenant::{ApiToken, Role};
use crate::storage::StoredPoint;

/// The services' shared state.
#[derive(Clone)]
pub struct Services {
    pub api: Arc<Api>,
}

type R<T> = Result<Response<T>, Status>;

/// An `ApiError` as a gRPC status; the message starts with the stable code.
pub fn status(e: ApiError) -> Status {
    Status::new(tonic::Code::from_i32(e.code.grpc_code()), format!("{}: {}", e.code, e.message))
}

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl Services {
    fn principal<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let auth = match req.metadata().get("authorization") {
            Some(v) => Some(v.to_str().map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?),
            None => None,
        };
        self.api.authenticate(auth).map_err(status)
    }
}

fn role_to_pb(r: Role) -> i32 {
    match r {
        Role::Viewer => pb::Role::Viewer as i32,
        Role::Operator => pb::Role::Operator as i32,
        Role::Admin => pb::Role::Admin as i32,
    }
}

fn token_to_pb(t: &ApiToken) -> pb::ApiToken {
    pb::ApiToken {
        token_id: t.token_id.clone(),
        tenant_id: t.tenant.to_string(),
        role: role_to_pb(t.role),
        name: t.name.clone(),
        created_ms: t.created_ms,
        revoked: t.revoked,
    }
}

pub fn point_to_pb(sp: &crate::model::TelemetryPoint, received_ms: u64) -> pb::TelemetryPoint {
    pb::TelemetryPoint {
        ts: sp.ts,
        msg_id: sp.msg_id.clone().unwrap_or_default(),
        battery: sp.battery,
        lat: sp.position.map(|p| p.0),
        lon: sp.position.map(|p| p.1),
        speed: sp.speed,
        mode: sp.mode.clone().unwrap_or_default(),
        metrics: sp.metrics.iter().map(|(k, v)| (k.to_string(), v)).collect(),
        received_ms,
    }
}

pub fn orb_to_pb(s: &OrbState) -> pb::Orb {
    let r = &s.record;
    let p = &s.presence;
    pb::Orb {
        tenant_id: r.tenant.to_string(),
        orb_id: r.orb.to_string(),
        status: r.status.as_str().into(),
        attributes: r.attributes.clone().into_iter().collect(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        auto_registered: r.auto_registered,
        connectivity: Some(pb::Connectivity {
            online: p.online,
            conn_seq: p.conn_seq,
            connected_at_ms: p.connected_at_ms,
            disconnected_at_ms: p.disconnected_at_ms,
            disconnect_reason: p.disconnect_reason.map(|d| d.as_str().to_string()).unwrap_or_default(),
            protocol: p.protocol.map(|v| if v == 5 { "5.0" } else { "3.1.1" }.to_string()).unwrap_or_default(),
            client_id: p.client_id.clone().unwrap_or_default(),
            last_seen_ms: s.last_seen_ms,
        }),
        telemetry: s.last.as_ref().map(|pt| point_to_pb(pt, s.last_seen_ms.unwrap_or(0))),
        reported: Some(pb::Reported {
            versions: s.reported.versions.clone().into_iter().collect(),
            config_json: s.reported.config.clone().unwrap_or_default(),
            updated_ms: s.reported.updated_ms,
        }),
    }
}

fn command_to_pb(c: &Command) -> pb::Command {
    pb::Command {
        command_id: c.command_id.clone(),
        seq: c.seq,
        command_type: c.command_type.clone(),
        payload_json: c.payload.clone(),
        status: c.status.as_str().into(),
        created_ms: c.created_ms,
        expiry_ts: c.expiry_ts,
        timeout_s: c.timeout_ms.map(|t| t / 1000),
        idempotency_key: c.idempotency_key.clone().unwrap_or_default(),
        attempts: c.attempts,
        broadcast_id: c.broadcast_id.clone().unwrap_or_default(),
        history: c
            .history
            .iter()
            .map(|t| pb::Transition {
                status: t.status.as_str().into(),
                at_ms: t.at_ms,
                reason: t.reason.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn broadcast_to_pb(v: &serde_json::Value) -> pb::Broadcast {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let counts: HashMap<String, u64> = v["counts"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    pb::Broadcast {
        broadcast_id: s("broadcast_id"),
        status: s("status"),
        command_type: s("command_type"),
        total: u("total"),
        fanned_out: u("fanned_out"),
        counts,
        create_errors: u("create_errors"),
        reason: s("reason"),
        created_ms: u("created_ms"),
    }
}

fn payload(json: &str) -> Result<serde_json::Value, Status> {
    if json.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(json).map_err(|e| Status::invalid_argument(format!("invalid_argument: payload_json: {e}")))
}

#[tonic::async_trait]
impl pb::tenant_service_server::TenantService for Services {
    async fn create_tenant(&self, req: Request<pb::CreateTenantRequest>) -> R<pb::Tenant> {
        let p = self.principal(&req)?;
        let t = self.api.create_tenant(&p, &req.get_ref().tenant_id).await.map_err(status)?;
        Ok(Response::new(pb::Tenant { tenant_id: t.tenant.to_string(), created_ms: t.created_ms }))
    }

    async fn create_api_token(&self, req: Request<pb::CreateApiTokenRequest>) -> R<pb::CreatedApiToken> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Viewer) => Role::Viewer,
            Ok(pb::Role::Operator) => Role::Operator,
            Ok(pb::Role::Admin) => Role::Admin,
            _ => return Err(Status::invalid_argument("invalid_argument: role must be VIEWER, OPERATOR or ADMIN")),
        };
        let (t, secret) = self.api.create_api_token(&p, opt(&r.tenant_id), role, &r.name).await.map_err(status)?;
        Ok(Response::new(pb::CreatedApiToken { token: Some(token_to_pb(&t)), secret }))
    }

    async fn list_api_tokens(&self, req: Request<pb::ListApiTokensRequest>) -> R<pb::ListApiTokensResponse> {
        let p = self.principal(&req)?;
        let tokens = self.api.list_api_tokens(&p, opt(&req.get_ref().tenant_id)).map_err(status)?;
        Ok(Response::new(pb::ListApiTokensResponse { tokens: tokens.iter().map(token_to_pb).collect() }))
    }

    async fn revoke_api_token(&self, req: Request<pb::RevokeApiTokenRequest>) -> R<pb::ApiToken> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let t = self.api.revoke_api_token(&p, opt(&r.tenant_id), &r.token_id).await.map_err(status)?;
        Ok(Response::new(token_to_pb(&t)))
    }

    async fn get_mqtt(&self, req: Request<pb::GetMqttRequest>) -> R<pb::MqttView> {
        let p = self.principal(&req)?;
        let v = self.api.mqtt_view(&p, opt(&req.get_ref().tenant_id)).map_err(status)?;
        Ok(Response::new(pb::MqttView {
            tenant_id: v.tenant_id,
            policy: Some(policy_to_pb(v.policy)),
            sessions: v
                .sessions
                .into_iter()
                .map(|s| pb::MqttSession {
                    client_id: s.client_id,
                    online: s.online,
                    subscriptions: s.subscriptions,
                    queued: s.queued as u64,
                })
                .collect(),
            retained: v
                .retained
                .into_iter()
                .map(|r| pb::RetainedMessage {
                    topic: r.topic,
                    payload_bytes: r.payload_bytes as u64,
                    qos: r.qos.into(),
                })
                .collect(),
        }))
    }

    async fn set_topic_policy(&self, req: Request<pb::SetTopicPolicyRequest>) -> R<pb::TopicPolicy> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let policy = r.policy.unwrap_or_default();
        let policy = crate::model::topics::TopicPolicy { publish: policy.publish, subscribe: policy.subscribe };
        let set = self.api.set_topic_policy(&p, opt(&r.tenant_id), policy).await.map_err(status)?;
        Ok(Response::new(policy_to_pb(set)))
    }
}

fn policy_to_pb(p: crate::model::topics::TopicPolicy) -> pb::TopicPolicy {
    pb::TopicPolicy { publish: p.publish, subscribe: p.subscribe }
}

#[tonic::async_trait]
impl pb::registry_service_server::RegistryService for Services {
    async fn register_orb(&self, req: Request<pb::RegisterOrbRequest>) -> R<pb::RegisterOrbResponse> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let reg = self
            .api
            .register_orb(&p, opt(&r.tenant_id), opt(&r.orb_id), r.attributes.into_iter().collect(), opt(&r.csr_pem))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RegisterOrbResponse {
            tenant_id: reg.tenant.to_string(),
            orb_id: reg.orb.to_string(),
            device_token: reg.device_token,
            certificate_pem: reg.certificate_pem.unwrap_or_default(),
            ca_pem: reg.ca_pem.unwrap_or_default(),
            server_ca_pem: reg.server_ca_pem.unwrap_or_default(),
        }))
    }

    async fn get_orb(&self, req: Request<pb::GetOrbRequest>) -> R<pb::Orb> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let s = self.api.get_orb(&p, opt(&r.tenant_id), &r.orb_id).await.map_err(status)?;
        Ok(Response::new(orb_to_pb(&s)))
    }

    async fn list_orbs(&self, req: Request<pb::ListOrbsRequest>) -> R<pb::ListOrbsResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let (orbs, next) = self
            .api
            .list_orbs(&p, opt(&r.tenant_id), opt(&r.status), r.page_size as usize, opt(&r.page_token))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListOrbsResponse {
            orbs: orbs.iter().map(orb_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn search_orbs(&self, req: Request<pb::SearchOrbsRequest>) -> R<pb::SearchOrbsResponse> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let params = crate::api::orbs::SearchParams {
            query: r.query,
            status: None,
            sort: opt(&r.sort).map(str::to_string),
            order: Some(if r.descending { "desc" } else { "asc" }.into()),
            page_size: r.page_size as usize,
            page_token: opt(&r.page_token).map(str::to_string),
            fields: None,
            count_by: opt(&r.count_by).map(str::to_string),
            stats: opt(&r.stats).map(str::to_string),
        };
        let (_, res, _) = self.api.search_orbs(&p, opt(&r.tenant_id), params).map_err(status)?;
        let agg = res.aggregate.unwrap_or_default();
        let count_by = agg["count_by"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default();
        let stats = agg.get("stats").map(|s| pb::Stats {
            count: s["count"].as_u64().unwrap_or(0),
            min: s["min"].as_f64().unwrap_or(0.0),
            max: s["max"].as_f64().unwrap_or(0.0),
            avg: s["avg"].as_f64().unwrap_or(0.0),
            p50: s["p50"].as_f64().unwrap_or(0.0),
            p90: s["p90"].as_f64().unwrap_or(0.0),
            p99: s["p99"].as_f64().unwrap_or(0.0),
        });
        let orbs = res
            .rows
            .iter()
            .map(|row| pb::OrbSummary {
                orb_id: row.orb.to_string(),
                status: row.status.as_str().into(),
                online: row.online,
                battery: row.battery,
                speed: row.speed,
                lat: row.lat,
                lon: row.lon,
                mode: row.mode.as_deref().unwrap_or_default().into(),
                last_seen_ms: row.last_seen_ms,
                versions: row.versions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                attributes: row.attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            })
            .collect();
        Ok(Response::new(pb::SearchOrbsResponse {
            orbs,
            total: res.total,
            next_page_token: res.next_page_token.unwrap_or_default(),
            count_by,
            stats,
        }))
    }

    async fn renew_certificate(&self, req: Request<pb::RenewCertificateRequest>) -> R<pb::RegisterOrbResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let reg = self.api.renew_certificate(&p, opt(&r.tenant_id), &r.orb_id, &r.csr_pem).await.map_err(status)?;
        Ok(Response::new(pb::RegisterOrbResponse {
            tenant_id: reg.tenant.to_string(),
            orb_id: reg.orb.to_string(),
            device_token: String::new(),
            certificate_pem: reg.certificate_pem.unwrap_or_default(),
            ca_pem: reg.ca_pem.unwrap_or_default(),
            server_ca_pem: reg.server_ca_pem.unwrap_or_default(),
        }))
    }

    async fn revoke_certificate(&self, req: Request<pb::DecommissionOrbRequest>) -> R<pb::Orb> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let s = self.api.revoke_certificate(&p, opt(&r.tenant_id), &r.orb_id).await.map_err(status)?;
        Ok(Response::new(orb_to_pb(&s)))
    }

    async fn decommission_orb(&self, req: Request<pb::DecommissionOrbRequest>) -> R<pb::Orb> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let s = self.api.decommission_orb(&p, opt(&r.tenant_id), &r.orb_id).await.map_err(status)?;
        Ok(Response::new(orb_to_pb(&s)))
    }

    async fn update_attributes(&self, req: Request<pb::UpdateAttributesRequest>) -> R<pb::Orb> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let s = self
            .api
            .update_attributes(&p, opt(&r.tenant_id), &r.orb_id, r.set.into_iter().collect(), r.remove)
            .await
            .map_err(status)?;
        Ok(Response::new(orb_to_pb(&s)))
    }

    async fn list_version_changes(
        &self,
        req: Request<pb::ListVersionChangesRequest>,
    ) -> R<pb::ListVersionChangesResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let page = self
            .api
            .version_history(
                &p,
                opt(&r.tenant_id),
                &r.orb_id,
                opt(&r.component),
                r.page_size as usize,
                opt(&r.page_token),
            )
            .map_err(status)?;
        Ok(Response::new(pb::ListVersionChangesResponse {
            changes: page
                .changes
                .into_iter()
                .map(|c| pb::VersionChange { component: c.component, from: c.from, to: c.to, at_ms: c.at_ms })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}

fn event_to_pb(e: StreamEvent) -> pb::OrbEvent {
    match e {
        StreamEvent::Lagged(n) => pb::OrbEvent { kind: "lagged".into(), lagged: n, ..Default::default() },
        StreamEvent::Change(c) => pb::OrbEvent {
            kind: serde_json::to_value(c.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            orb_id: c.orb_id.to_string(),
            at_ms: c.at_ms,
            status: c.status.into(),
            online: c.online,
            ts: c.ts,
            battery: c.battery,
            lat: c.lat,
            lon: c.lon,
            speed: c.speed,
            mode: c.mode.clone().unwrap_or_default(),
            lagged: 0,
        },
    }
}

#[tonic::async_trait]
impl pb::telemetry_service_server::TelemetryService for Services {
    type StreamOrbsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::OrbEvent, Status>> + Send + 'static>>;

    async fn stream_orbs(&self, req: Request<pb::StreamOrbsRequest>) -> R<Self::StreamOrbsStream> {
        use tokio_stream::StreamExt;
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let rx = self.api.stream(&p, opt(&r.tenant_id), &r.orb_ids).map_err(status)?;
        let s = tokio_stream::wrappers::ReceiverStream::new(rx).map(|e| Ok(event_to_pb(e)));
        Ok(Response::new(Box::pin(s)))
    }

    async fn query_telemetry(&self, req: Request<pb::QueryTelemetryRequest>) -> R<pb::QueryTelemetryResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let q = HistoryQuery {
            from: r.from,
            to: if r.to == 0 { u64::MAX } else { r.to },
            limit: r.limit as usize,
            page_token: opt(&r.page_token).map(str::to_string),
        };
        let page = self.api.history(&p, opt(&r.tenant_id), &r.orb_id, &q).await.map_err(status)?;
        let points = page.points.iter().map(|sp: &StoredPoint| point_to_pb(&sp.point, sp.received_ms)).collect();
        Ok(Response::new(pb::QueryTelemetryResponse {
            points,
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl pb::command_service_server::CommandService for Services {
    async fn create_command(&self, req: Request<pb::CreateCommandRequest>) -> R<pb::CreateCommandResponse> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let create = CreateRequest {
            command_type: r.command_type,
            payload: payload(&r.payload_json)?,
            expiry_ts: r.expiry_ts,
            timeout_s: r.timeout_s,
            idempotency_key: opt(&r.idempotency_key).map(str::to_string),
            supersede: r.supersede,
        };
        let (c, created) = self.api.create_command(&p, opt(&r.tenant_id), &r.orb_id, create).await.map_err(status)?;
        Ok(Response::new(pb::CreateCommandResponse { command: Some(command_to_pb(&c)), created }))
    }

    async fn get_command(&self, req: Request<pb::GetCommandRequest>) -> R<pb::Command> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let c = self.api.get_command(&p, opt(&r.tenant_id), &r.orb_id, &r.command_id).map_err(status)?;
        Ok(Response::new(command_to_pb(&c)))
    }

    async fn list_commands(&self, req: Request<pb::ListCommandsRequest>) -> R<pb::ListCommandsResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let (cmds, next) = self
            .api
            .list_commands(&p, opt(&r.tenant_id), &r.orb_id, opt(&r.status), r.limit as usize, opt(&r.page_token))
            .map_err(status)?;
        Ok(Response::new(pb::ListCommandsResponse {
            commands: cmds.iter().map(command_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn cancel_command(&self, req: Request<pb::CancelCommandRequest>) -> R<pb::Command> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let c = self.api.cancel_command(&p, opt(&r.tenant_id), &r.orb_id, &r.command_id).await.map_err(status)?;
        Ok(Response::new(command_to_pb(&c)))
    }

    async fn start_broadcast(&self, req: Request<pb::StartBroadcastRequest>) -> R<pb::Broadcast> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let abort = match (r.abort_failure_pct, r.abort_min_samples) {
            (None, None) => None,
            (Some(failure_pct), Some(min_samples)) => Some(AbortPolicy { failure_pct, min_samples }),
            _ => {
                return Err(Status::invalid_argument(
                    "invalid_argument: abort needs both abort_failure_pct and abort_min_samples",
                ));
            }
        };
        let b = BroadcastRequest {
            command_type: r.command_type,
            payload: payload(&r.payload_json)?,
            expiry_ts: r.expiry_ts,
            timeout_s: r.timeout_s,
            orb_ids: (!r.orb_ids.is_empty()).then_some(r.orb_ids),
            all_orbs: r.all_orbs,
            rate_per_s: (r.rate_per_s != 0).then_some(r.rate_per_s),
            abort,
        };
        let v = self.api.start_broadcast(&p, opt(&r.tenant_id), b).await.map_err(status)?;
        Ok(Response::new(broadcast_to_pb(&v)))
    }

    async fn get_broadcast(&self, req: Request<pb::GetBroadcastRequest>) -> R<pb::Broadcast> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let v = self.api.get_broadcast(&p, opt(&r.tenant_id), &r.broadcast_id).await.map_err(status)?;
        Ok(Response::new(broadcast_to_pb(&v)))
    }

    async fn cancel_broadcast(&self, req: Request<pb::CancelBroadcastRequest>) -> R<pb::Broadcast> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let v = self.api.cancel_broadcast(&p, opt(&r.tenant_id), &r.broadcast_id).await.map_err(status)?;
        Ok(Response::new(broadcast_to_pb(&v)))
    }
}

fn rule_to_pb(r: &crate::model::rule::Rule) -> pb::AlertRule {
    pb::AlertRule {
        tenant_id: r.tenant.to_string(),
        rule_id: r.rule_id.clone(),
        name: r.name.clone(),
        condition: r.condition.clone(),
        clear_condition: r.clear_condition.clone(),
        severity: r.severity.as_str().into(),
        for_s: r.for_s,
        absent_s: r.absent_s,
        scope: r.scope.clone(),
        created_ms: r.created_ms,
        repeat_count: r.repeat_count,
        repeat_window_s: r.repeat_window_s,
    }
}

fn alert_to_pb(a: &crate::model::alert::Alert) -> pb::Alert {
    pb::Alert {
        tenant_id: a.tenant.to_string(),
        alert_id: a.alert_id.clone(),
        rule_id: a.rule_id.clone(),
        rule_name: a.rule_name.clone(),
        orb_id: a.orb.to_string(),
        severity: a.severity.as_str().into(),
        state: a.state.as_str().into(),
        opened_ms: a.opened_ms,
        updated_ms: a.updated_ms,
        resolved_ms: a.resolved_ms,
        resolved_by: a.resolved_by.clone().unwrap_or_default(),
        repeats: a.repeats,
        values_json: a.values.clone(),
        assignee: a.assignee.clone().unwrap_or_default(),
        comments: a
            .comments
            .iter()
            .map(|c| pb::AlertComment { author: c.author.clone(), text: c.text.clone(), at_ms: c.at_ms })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::alert_service_server::AlertService for Services {
    async fn create_rule(&self, req: Request<pb::CreateRuleRequest>) -> R<pb::AlertRule> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let spec = crate::model::rule::RuleSpec {
            name: r.name,
            condition: r.condition,
            clear_condition: r.clear_condition,
            severity: r.severity,
            for_s: r.for_s,
            absent_s: r.absent_s,
            scope: r.scope,
            repeat_count: r.repeat_count,
            repeat_window_s: r.repeat_window_s,
        };
        let rule = self.api.create_rule(&p, opt(&r.tenant_id), spec).await.map_err(status)?;
        Ok(Response::new(rule_to_pb(&rule)))
    }

    async fn list_rules(&self, req: Request<pb::ListRulesRequest>) -> R<pb::ListRulesResponse> {
        let p = self.principal(&req)?;
        let rules = self.api.list_rules(&p, opt(&req.get_ref().tenant_id)).map_err(status)?;
        Ok(Response::new(pb::ListRulesResponse { rules: rules.iter().map(rule_to_pb).collect() }))
    }

    async fn delete_rule(&self, req: Request<pb::DeleteRuleRequest>) -> R<pb::AlertRule> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let rule = self.api.delete_rule(&p, opt(&r.tenant_id), &r.rule_id).await.map_err(status)?;
        Ok(Response::new(rule_to_pb(&rule)))
    }

    async fn list_alerts(&self, req: Request<pb::ListAlertsRequest>) -> R<pb::ListAlertsResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let (alerts, next) = self
            .api
            .list_alerts(&p, opt(&r.tenant_id), opt(&r.state), opt(&r.orb_id), r.page_size as usize, opt(&r.page_token))
            .map_err(status)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(alert_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn acknowledge_alert(&self, req: Request<pb::AlertRequest>) -> R<pb::Alert> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let op = crate::actors::rules::AlertOp::Acknowledge;
        let a = self.api.alert_op(&p, opt(&r.tenant_id), &r.alert_id, op).await.map_err(status)?;
        Ok(Response::new(alert_to_pb(&a)))
    }

    async fn resolve_alert(&self, req: Request<pb::AlertRequest>) -> R<pb::Alert> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let op = crate::actors::rules::AlertOp::Resolve;
        let a = self.api.alert_op(&p, opt(&r.tenant_id), &r.alert_id, op).await.map_err(status)?;
        Ok(Response::new(alert_to_pb(&a)))
    }

    async fn assign_alert(&self, req: Request<pb::AssignAlertRequest>) -> R<pb::Alert> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let a = self.api.assign_alert(&p, opt(&r.tenant_id), &r.alert_id, opt(&r.assignee)).await.map_err(status)?;
        Ok(Response::new(alert_to_pb(&a)))
    }

    async fn comment_alert(&self, req: Request<pb::CommentAlertRequest>) -> R<pb::Alert> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let a = self.api.comment_alert(&p, opt(&r.tenant_id), &r.alert_id, &r.text).await.map_err(status)?;
        Ok(Response::new(alert_to_pb(&a)))
    }
}

fn tenant_event_to_pb(e: &crate::model::event::Event) -> pb::TenantEvent {
    pb::TenantEvent {
        event_id: e.event_id(),
        r#type: e.event_type.clone(),
        orb_id: e.orb.clone(),
        occurred_ms: e.occurred_ms,
        body_json: e.body.clone(),
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for Services {
    async fn list_events(&self, req: Request<pb::ListEventsRequest>) -> R<pb::ListEventsResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let page = self
            .api
            .list_events(&p, opt(&r.tenant_id), opt(&r.after), &r.types, r.page_size as usize)
            .map_err(status)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: page.events.iter().map(tenant_event_to_pb).collect(),
            next_after: page.next_after.unwrap_or_default(),
        }))
    }

    type StreamEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TenantEvent, Status>> + Send + 'static>>;

    /// Ends with the error that stopped it (UNAVAILABLE while draining, OUT_OF_RANGE when the
    /// client fell behind the retention).
    async fn stream_events(&self, req: Request<pb::StreamEventsRequest>) -> R<Self::StreamEventsStream> {
        use tokio_stream::StreamExt;
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let rx = self.api.stream_events(&p, opt(&r.tenant_id), opt(&r.after), r.types).map_err(status)?;
        let s = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item| item.map(|e| tenant_event_to_pb(&e)).map_err(status));
        Ok(Response::new(Box::pin(s)))
    }
}

fn retention_to_pb(v: crate::api::storage::RetentionView) -> pb::Retention {
    pb::Retention {
        tenant_id: v.tenant_id.to_string(),
        hot_window_ms: v.hot_window_ms,
        hot_window_is_default: v.hot_window_is_default,
        cold_retention_ms: v.cold_retention_ms,
        cold_retention_is_default: v.cold_retention_is_default,
    }
}

fn export_to_pb(j: &crate::storage::cold::export::ExportJob) -> pb::ExportJob {
    pb::ExportJob {
        export_id: j.id.clone(),
        tenant_id: j.tenant.to_string(),
        from: j.from,
        to: j.to,
        query: j.query.clone(),
        format: j.format.as_str().into(),
        destination: j.prefix(),
        status: j.status.as_str().into(),
        orbs_total: j.orbs_total,
        orbs_done: j.next_orb,
        files: j.files,
        rows: j.rows,
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
        error: j.error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::storage_service_server::StorageService for Services {
    async fn spill(&self, req: Request<pb::SpillRequest>) -> R<pb::SpillResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let params = crate::api::storage::SpillParams {
            tenant_id: opt(&r.tenant_id).map(str::to_string),
            hot_window: opt(&r.hot_window).map(str::to_string),
        };
        let s = self.api.spill(&p, &params).await.map_err(status)?;
        Ok(Response::new(pb::SpillResponse {
            objects: s.objects,
            rows: s.rows,
            bytes: s.bytes,
            tenants: s.tenants,
            elapsed_ms: s.elapsed_ms,
        }))
    }

    async fn checkpoint(&self, req: Request<pb::CheckpointRequest>) -> R<pb::CheckpointResponse> {
        let p = self.principal(&req)?;
        let c = self.api.checkpoint(&p).await.map_err(status)?;
        Ok(Response::new(pb::CheckpointResponse {
            path: c.path,
            created_ms: c.created_ms,
            entries: c.entries,
            bytes: c.bytes,
            sha256: c.sha256,
        }))
    }

    async fn get_trajectory(&self, req: Request<pb::GetTrajectoryRequest>) -> R<pb::Trajectory> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let params = crate::api::storage::TrajectoryParams {
            from: r.from,
            to: if r.to == 0 { u64::MAX } else { r.to },
            max_points: r.max_points as usize,
            method: opt(&r.method).map(str::to_string),
            field: opt(&r.field).map(str::to_string),
        };
        let t = self.api.trajectory(&p, opt(&r.tenant_id), &r.orb_id, &params).await.map_err(status)?;
        Ok(Response::new(pb::Trajectory {
            orb_id: t.orb_id.to_string(),
            total_points: t.total_points,
            method: t.method.into(),
            field: t.field,
            points: t
                .points
                .into_iter()
                .map(|x| pb::TrajectoryPoint { ts: x.ts, lat: x.lat, lon: x.lon, value: x.value })
                .collect(),
        }))
    }

    async fn fleet_at(&self, req: Request<pb::FleetAtRequest>) -> R<pb::FleetAtResponse> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let page = self
            .api
            .fleet_at(
                &p,
                opt(&r.tenant_id),
                r.at,
                &r.query,
                r.lookback_s.saturating_mul(1000),
                r.page_size as usize,
                opt(&r.page_token),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FleetAtResponse {
            at: page.at,
            orbs: page
                .orbs
                .into_iter()
                .map(|o| pb::OrbAt {
                    orb_id: o.orb_id.to_string(),
                    point_json: o.point.map(|v| v.to_string()).unwrap_or_default(),
                    tier: o.tier.unwrap_or_default().into(),
                })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn create_export(&self, req: Request<pb::CreateExportRequest>) -> R<pb::ExportJob> {
        let p = self.principal(&req)?;
        let r = req.into_inner();
        let params = crate::api::storage::ExportParams {
            tenant_id: opt(&r.tenant_id).map(str::to_string),
            from: r.from,
            to: r.to,
            query: r.query,
            format: r.format,
            destination: r.destination,
        };
        let job = self.api.create_export(&p, &params).await.map_err(status)?;
        Ok(Response::new(export_to_pb(&job)))
    }

    async fn get_export(&self, req: Request<pb::ExportRequest>) -> R<pb::ExportJob> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let job = self.api.get_export(&p, opt(&r.tenant_id), &r.export_id).map_err(status)?;
        Ok(Response::new(export_to_pb(&job)))
    }

    async fn list_exports(&self, req: Request<pb::ListExportsRequest>) -> R<pb::ListExportsResponse> {
        let p = self.principal(&req)?;
        let jobs = self.api.list_exports(&p, opt(&req.get_ref().tenant_id)).map_err(status)?;
        Ok(Response::new(pb::ListExportsResponse { exports: jobs.iter().map(export_to_pb).collect() }))
    }

    async fn get_retention(&self, req: Request<pb::GetRetentionRequest>) -> R<pb::Retention> {
        let p = self.principal(&req)?;
        let v = self.api.get_retention(&p, opt(&req.get_ref().tenant_id)).map_err(status)?;
        Ok(Response::new(retention_to_pb(v)))
    }

    async fn set_retention(&self, req: Request<pb::SetRetentionRequest>) -> R<pb::Retention> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let v = self
            .api
            .set_retention(&p, opt(&r.tenant_id), opt(&r.hot_window), opt(&r.cold_retention))
            .map_err(status)?;
        Ok(Response::new(retention_to_pb(v)))
    }

    async fn cancel_export(&self, req: Request<pb::ExportRequest>) -> R<pb::ExportJob> {
        let p = self.principal(&req)?;
        let r = req.get_ref();
        let job = self.api.cancel_export(&p, opt(&r.tenant_id), &r.export_id).map_err(status)?;
        Ok(Response::new(export_to_pb(&job)))
    }
}
