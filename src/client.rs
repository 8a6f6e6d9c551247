//! The operator CLI (`orbmanager tenants|tokens|orbs|telemetry|commands ...`) over the gRPC
//! API: tables for people, `--json` for scripts.

use std::fmt::Write as _;

use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::cli::{
    AlertsCmd, ClientArgs, CommandsCmd, EventsCmd, ExportsCmd, OrbsCmd, StorageCmd, TelemetryCmd, TenantsCmd, TokensCmd,
};
use crate::net::grpc::pb;
use pb::alert_service_client::AlertServiceClient;
use pb::command_service_client::CommandServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::registry_service_client::RegistryServiceClient;
use pb::storage_service_client::StorageServiceClient;
use pb::telemetry_service_client::TelemetryServiceClient;
use pb::tenant_service_client::TenantServiceClient;

/// A failed CLI call, printed to stderr.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {server}: {source}")]
    Connect { server: String, source: tonic::transport::Error },
    #[error("{}", .0.message())]
    Call(#[from] Status),
    #[error("{0}")]
    Usage(String),
}

struct Client {
    ch: Channel,
    args: ClientArgs,
}

impl Client {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = self.stream_req(msg);
        r.set_timeout(std::time::Duration::from_secs(30));
        r
    }

    /// A request without a deadline (server streams run until interrupted).
    fn stream_req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.args.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    fn tenant(&self) -> String {
        self.args.tenant.clone().unwrap_or_default()
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Columns padded to their widest cell.
/// The line under a table that tells how to ask for the next page.
fn more_pages(out: &mut String, next_page_token: &str) {
    if !next_page_token.is_empty() {
        let _ = writeln!(out, "(more: --page-token {next_page_token})");
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn opt_f(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_else(|| "-".into())
}

fn orb_text(o: &pb::Orb) -> String {
    let c = o.connectivity.clone().unwrap_or_default();
    let t = o.telemetry.clone().unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "orb        {}/{}", o.tenant_id, o.orb_id);
    let _ = writeln!(s, "status     {}", o.status);
    let _ = writeln!(
        s,
        "online     {} (conn {}, {})",
        c.online,
        c.conn_seq,
        if c.protocol.is_empty() { "-" } else { &c.protocol }
    );
    let _ = writeln!(s, "battery    {}", opt_f(t.battery));
    let _ = writeln!(s, "position   {} {}", opt_f(t.lat), opt_f(t.lon));
    let _ = writeln!(s, "speed      {}", opt_f(t.speed));
    let _ = writeln!(s, "mode       {}", if t.mode.is_empty() { "-" } else { &t.mode });
    for (k, v) in &o.attributes {
        let _ = writeln!(s, "attr       {k}={v}");
    }
    if let Some(r) = &o.reported {
        for (k, v) in &r.versions {
            let _ = writeln!(s, "version    {k}={v}");
        }
    }
    s
}

fn command_row(c: &pb::Command) -> Vec<String> {
    vec![c.command_id.clone(), c.seq.to_string(), c.command_type.clone(), c.status.clone(), c.attempts.to_string()]
}

const COMMAND_HEADER: [&str; 5] = ["COMMAND_ID", "SEQ", "TYPE", "STATUS", "ATTEMPTS"];

fn payload(p: &Option<String>) -> Result<String, ClientError> {
    match p {
        None => Ok(String::new()),
        Some(p) => {
            serde_json::from_str::<serde_json::Value>(p)
                .map_err(|e| ClientError::Usage(format!("--payload is not JSON: {e}")))?;
            Ok(p.clone())
        }
    }
}

async fn connect(args: &ClientArgs) -> Result<Client, ClientError> {
    let ch = Channel::from_shared(args.server.clone())
        .map_err(|e| ClientError::Usage(format!("--server {}: {e}", args.server)))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| ClientError::Connect { server: args.server.clone(), source })?;
    Ok(Client { ch, args: args.clone() })
}

pub async fn tenants(args: &ClientArgs, cmd: &TenantsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = TenantServiceClient::new(c.ch.clone());
    match cmd {
        TenantsCmd::Create { tenant_id } => {
            let t =
                svc.create_tenant(c.req(pb::CreateTenantRequest { tenant_id: tenant_id.clone() })).await?.into_inner();
            Ok(if args.json { json(&t) } else { format!("created tenant {}\n", t.tenant_id) })
        }
        TenantsCmd::Mqtt => {
            let v = svc.get_mqtt(c.req(pb::GetMqttRequest { tenant_id: c.tenant() })).await?.into_inner();
            if args.json {
                return Ok(json(&v));
            }
            let policy = v.policy.unwrap_or_default();
            let mut out = format!(
                "tenant {}\npublish    {}\nsubscribe  {}\n\n",
                v.tenant_id,
                policy.publish.join(" "),
                policy.subscribe.join(" ")
            );
            let rows: Vec<Vec<String>> = v
                .sessions
                .iter()
                .map(|s| {
                    vec![s.client_id.clone(), s.online.to_string(), s.queued.to_string(), s.subscriptions.join(" ")]
                })
                .collect();
            out.push_str(&table(&["CLIENT_ID", "ONLINE", "QUEUED", "SUBSCRIPTIONS"], &rows));
            let rows: Vec<Vec<String>> = v
                .retained
                .iter()
                .map(|r| vec![r.topic.clone(), r.payload_bytes.to_string(), r.qos.to_string()])
                .collect();
            out.push('\n');
            out.push_str(&table(&["RETAINED_TOPIC", "BYTES", "QOS"], &rows));
            Ok(out)
        }
        TenantsCmd::Policy { publish, subscribe } => {
            let policy = pb::TopicPolicy { publish: publish.clone(), subscribe: subscribe.clone() };
            let p = svc
                .set_topic_policy(c.req(pb::SetTopicPolicyRequest { tenant_id: c.tenant(), policy: Some(policy) }))
                .await?
                .into_inner();
            Ok(if args.json {
                json(&p)
            } else {
                format!("publish    {}\nsubscribe  {}\n", p.publish.join(" "), p.subscribe.join(" "))
            })
        }
    }
}

pub async fn tokens(args: &ClientArgs, cmd: &TokensCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = TenantServiceClient::new(c.ch.clone());
    let token_rows = |ts: &[pb::ApiToken]| {
        let rows: Vec<Vec<String>> = ts
            .iter()
            .map(|t| {
                let role = pb::Role::try_from(t.role)
                    .map(|r| r.as_str_name().trim_start_matches("ROLE_").to_lowercase())
                    .unwrap_or_default();
                vec![t.token_id.clone(), role, t.name.clone(), t.revoked.to_string()]
            })
            .collect();
        table(&["TOKEN_ID", "ROLE", "NAME", "REVOKED"], &rows)
    };
    match cmd {
        TokensCmd::Create { role, name } => {
            let role = match role.as_str() {
                "viewer" => pb::Role::Viewer,
                "operator" => pb::Role::Operator,
                _ => pb::Role::Admin,
            };
            let t = svc
                .create_api_token(c.req(pb::CreateApiTokenRequest {
                    tenant_id: c.tenant(),
                    role: role as i32,
                    name: name.clone(),
                }))
                .await?
                .into_inner();
            Ok(if args.json { json(&t) } else { format!("{}\n(the secret is shown once; store it now)\n", t.secret) })
        }
        TokensCmd::List => {
            let ts = svc.list_api_tokens(c.req(pb::ListApiTokensRequest { tenant_id: c.tenant() })).await?.into_inner();
            Ok(if args.json { json(&ts) } else { token_rows(&ts.tokens) })
        }
        TokensCmd::Revoke { token_id } => {
            let t = svc
                .revoke_api_token(
                    c.req(pb::RevokeApiTokenRequest { tenant_id: c.tenant(), token_id: token_id.clone() }),
                )
                .await?
                .into_inner();
            Ok(if args.json { json(&t) } else { token_rows(&[t]) })
        }
    }
}

pub async fn orbs(args: &ClientArgs, cmd: &OrbsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = RegistryServiceClient::new(c.ch.clone());
    match cmd {
        OrbsCmd::Register { id, attrs, csr } => {
            let csr_pem = match csr {
                Some(p) => {
                    std::fs::read_to_string(p).map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))?
                }
                None => String::new(),
            };
            let r = svc
                .register_orb(c.req(pb::RegisterOrbRequest {
                    tenant_id: c.tenant(),
                    orb_id: id.clone().unwrap_or_default(),
                    attributes: attrs.iter().cloned().collect(),
                    csr_pem,
                }))
                .await?
                .into_inner();
            Ok(if args.json {
                json(&r)
            } else {
                format!(
                    "registered {}/{}\nmqtt username  {}/{}\ndevice token   {}\n(the token is shown once; store it on the device)\n",
                    r.tenant_id, r.orb_id, r.tenant_id, r.orb_id, r.device_token
                )
            })
        }
        OrbsCmd::Get { orb_id } => {
            let o = svc
                .get_orb(c.req(pb::GetOrbRequest { tenant_id: c.tenant(), orb_id: orb_id.clone() }))
                .await?
                .into_inner();
            Ok(if args.json { json(&o) } else { orb_text(&o) })
        }
        OrbsCmd::List { query, sort, desc, page_size, page_token, count_by, stats } => {
            let r = svc
                .search_orbs(c.req(pb::SearchOrbsRequest {
                    tenant_id: c.tenant(),
                    query: query.clone(),
                    sort: sort.clone().unwrap_or_default(),
                    descending: *desc,
                    page_size: *page_size,
                    page_token: page_token.clone().unwrap_or_default(),
                    count_by: count_by.clone().unwrap_or_default(),
                    stats: stats.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if args.json {
                return Ok(json(&r));
            }
            if count_by.is_some() {
                let mut groups: Vec<(&String, &u64)> = r.count_by.iter().collect();
                groups.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let rows: Vec<Vec<String>> = groups.iter().map(|(k, n)| vec![(*k).clone(), n.to_string()]).collect();
                return Ok(table(&["VALUE", "COUNT"], &rows));
            }
            if let Some(s) = &r.stats {
                return Ok(format!(
                    "count {}  min {}  max {}  avg {:.3}  p50 {}  p90 {}  p99 {}\n",
                    s.count, s.min, s.max, s.avg, s.p50, s.p90, s.p99
                ));
            }
            let rows: Vec<Vec<String>> = r
                .orbs
                .iter()
                .map(|o| {
                    vec![o.orb_id.clone(), o.status.clone(), o.online.to_string(), opt_f(o.battery), o.mode.clone()]
                })
                .collect();
            let mut out = table(&["ORB", "STATUS", "ONLINE", "BATTERY", "MODE"], &rows);
            let _ = writeln!(out, "({} matching)", r.total);
            more_pages(&mut out, &r.next_page_token);
            Ok(out)
        }
        OrbsCmd::RenewCert { orb_id, csr } => {
            let csr_pem =
                std::fs::read_to_string(csr).map_err(|e| ClientError::Usage(format!("{}: {e}", csr.display())))?;
            let r = svc
                .renew_certificate(c.req(pb::RenewCertificateRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    csr_pem,
                }))
                .await?
                .into_inner();
            Ok(if args.json { json(&r) } else { r.certificate_pem })
        }
        OrbsCmd::RevokeCert { orb_id } => {
            let o = svc
                .revoke_certificate(c.req(pb::DecommissionOrbRequest { tenant_id: c.tenant(), orb_id: orb_id.clone() }))
                .await?
                .into_inner();
            Ok(if args.json { json(&o) } else { orb_text(&o) })
        }
        OrbsCmd::Decommission { orb_id } => {
            let o = svc
                .decommission_orb(c.req(pb::DecommissionOrbRequest { tenant_id: c.tenant(), orb_id: orb_id.clone() }))
                .await?
                .into_inner();
            Ok(if args.json { json(&o) } else { orb_text(&o) })
        }
        OrbsCmd::Tag { orb_id, set, remove } => {
            let o = svc
                .update_attributes(c.req(pb::UpdateAttributesRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    set: set.iter().cloned().collect(),
                    remove: remove.clone(),
                }))
                .await?
                .into_inner();
            Ok(if args.json { json(&o) } else { orb_text(&o) })
        }
        OrbsCmd::Versions { orb_id, component, page_size, page_token } => {
            let r = svc
                .list_version_changes(c.req(pb::ListVersionChangesRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    component: component.clone().unwrap_or_default(),
                    page_size: *page_size,
                    page_token: page_token.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if args.json {
                return Ok(json(&r));
            }
            let rows: Vec<Vec<String>> = r
                .changes
                .iter()
                .map(|ch| {
                    vec![
                        ch.at_ms.to_string(),
                        ch.component.clone(),
                        ch.from.clone().unwrap_or_else(|| "-".into()),
                        ch.to.clone(),
                    ]
                })
                .collect();
            let mut out = table(&["AT_MS", "COMPONENT", "FROM", "TO"], &rows);
            more_pages(&mut out, &r.next_page_token);
            Ok(out)
        }
    }
}

/// Prints live changes as they come (one line, or one JSON object, per event).
/// Prints a server stream a line per message, flushed as each arrives (`tail` is read by
/// people and pipes alike), until it ends or `count` messages were printed.
async fn follow<T>(
    mut stream: tonic::Streaming<T>,
    count: Option<usize>,
    line: impl Fn(&T) -> String,
) -> Result<String, ClientError> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        let Some(m) = stream.message().await? else { break };
        let _ = writeln!(out, "{}", line(&m));
        let _ = out.flush();
        n += 1;
    }
    Ok(String::new())
}

async fn tail(c: &Client, orb_ids: &[String], count: Option<usize>) -> Result<String, ClientError> {
    let mut svc = TelemetryServiceClient::new(c.ch.clone());
    let req = c.stream_req(pb::StreamOrbsRequest { tenant_id: c.tenant(), orb_ids: orb_ids.to_vec() });
    let stream = svc.stream_orbs(req).await?.into_inner();
    follow(stream, count, |e| {
        if c.args.json {
            json_line(&e)
        } else if e.kind == "lagged" {
            format!("(fell behind: {} changes missed; resyncing)", e.lagged)
        } else {
            format!(
                "{:>13}  {:<20} {:<10} online={} battery={} pos={},{} mode={}",
                e.at_ms,
                e.orb_id,
                e.kind,
                e.online,
                opt_f(e.battery),
                opt_f(e.lat),
                opt_f(e.lon),
                if e.mode.is_empty() { "-" } else { &e.mode }
            )
        }
    })
    .await
}

pub async fn alerts(args: &ClientArgs, cmd: &AlertsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = AlertServiceClient::new(c.ch.clone());
    let one = |id: &String| pb::AlertRequest { tenant_id: c.tenant(), alert_id: id.clone() };
    let alert = match cmd {
        AlertsCmd::List { state, orb_id, page_size, page_token } => {
            let r = svc
                .list_alerts(c.req(pb::ListAlertsRequest {
                    tenant_id: c.tenant(),
                    state: state.clone().unwrap_or_default(),
                    orb_id: orb_id.clone().unwrap_or_default(),
                    page_size: *page_size,
                    page_token: page_token.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if args.json {
                return Ok(json(&r));
            }
            let rows: Vec<Vec<String>> = r
                .alerts
                .iter()
                .map(|a| {
                    vec![
                        a.alert_id.clone(),
                        a.orb_id.clone(),
                        a.severity.clone(),
                        a.state.clone(),
                        a.rule_name.clone(),
                        a.opened_ms.to_string(),
                        a.repeats.to_string(),
                        if a.assignee.is_empty() { "-".into() } else { a.assignee.clone() },
                    ]
                })
                .collect();
            let mut out =
                table(&["ALERT", "ORB", "SEVERITY", "STATE", "RULE", "OPENED_MS", "REPEATS", "ASSIGNEE"], &rows);
            more_pages(&mut out, &r.next_page_token);
            return Ok(out);
        }
        AlertsCmd::Ack { alert_id } => svc.acknowledge_alert(c.req(one(alert_id))).await?,
        AlertsCmd::Resolve { alert_id } => svc.resolve_alert(c.req(one(alert_id))).await?,
        AlertsCmd::Assign { alert_id, assignee } => {
            let req = pb::AssignAlertRequest {
                tenant_id: c.tenant(),
                alert_id: alert_id.clone(),
                assignee: assignee.clone().unwrap_or_default(),
            };
            svc.assign_alert(c.req(req)).await?
        }
        AlertsCmd::Comment { alert_id, text } => {
            let req = pb::CommentAlertRequest { tenant_id: c.tenant(), alert_id: alert_id.clone(), text: text.clone() };
            svc.comment_alert(c.req(req)).await?
        }
    }
    .into_inner();
    Ok(if args.json {
        json(&alert)
    } else {
        let who = if alert.assignee.is_empty() { "unassigned" } else { &alert.assignee };
        format!("alert {}  {}  {}  {} comments\n", alert.alert_id, alert.state, who, alert.comments.len())
    })
}

fn event_line(e: &pb::TenantEvent, as_json: bool) -> String {
    if as_json {
        return e.body_json.clone();
    }
    let data =
        serde_json::from_str::<serde_json::Value>(&e.body_json).map(|v| v["data"].to_string()).unwrap_or_default();
    format!("{:>8}  {:>13}  {:<24} {:<20} {data}", e.event_id, e.occurred_ms, e.r#type, e.orb_id)
}

pub async fn events(args: &ClientArgs, cmd: &EventsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = EventServiceClient::new(c.ch.clone());
    match cmd {
        EventsCmd::List { after, types, page_size } => {
            let r = svc
                .list_events(c.req(pb::ListEventsRequest {
                    tenant_id: c.tenant(),
                    after: after.clone().unwrap_or_default(),
                    types: types.clone(),
                    page_size: *page_size,
                }))
                .await?
                .into_inner();
            let mut out = String::new();
            for e in &r.events {
                let _ = writeln!(out, "{}", event_line(e, args.json));
            }
            if !args.json && !r.next_after.is_empty() {
                let _ = writeln!(out, "(next: --after {})", r.next_after);
            }
            Ok(out)
        }
        EventsCmd::Tail { after, types, count } => {
            let req = c.stream_req(pb::StreamEventsRequest {
                tenant_id: c.tenant(),
                after: after.clone().unwrap_or_default(),
                types: types.clone(),
            });
            let stream = svc.stream_events(req).await?.into_inner();
            follow(stream, *count, |e| event_line(e, args.json)).await
        }
    }
}

fn json_line<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub async fn telemetry(args: &ClientArgs, cmd: &TelemetryCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = TelemetryServiceClient::new(c.ch.clone());
    let (orb_id, from, to, limit, page_token) = match cmd {
        TelemetryCmd::Tail { orb_ids, count } => return tail(&c, orb_ids, *count).await,
        TelemetryCmd::Query { orb_id, from, to, limit, page_token } => (orb_id, from, to, limit, page_token),
    };
    let r = svc
        .query_telemetry(c.req(pb::QueryTelemetryRequest {
            tenant_id: c.tenant(),
            orb_id: orb_id.clone(),
            from: *from,
            to: *to,
            limit: *limit,
            page_token: page_token.clone().unwrap_or_default(),
        }))
        .await?
        .into_inner();
    if args.json {
        return Ok(json(&r));
    }
    let rows: Vec<Vec<String>> = r
        .points
        .iter()
        .map(|p| vec![p.ts.to_string(), opt_f(p.battery), opt_f(p.lat), opt_f(p.lon), opt_f(p.speed), p.mode.clone()])
        .collect();
    let mut out = table(&["TS", "BATTERY", "LAT", "LON", "SPEED", "MODE"], &rows);
    more_pages(&mut out, &r.next_page_token);
    Ok(out)
}

pub async fn commands(args: &ClientArgs, cmd: &CommandsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = CommandServiceClient::new(c.ch.clone());
    let broadcast_text = |b: &pb::Broadcast| {
        let mut counts: Vec<(&String, &u64)> = b.counts.iter().filter(|(_, n)| **n > 0).collect();
        counts.sort();
        let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
        format!(
            "broadcast {}  {}  {}/{} fanned out  {}\n",
            b.broadcast_id,
            b.status,
            b.fanned_out,
            b.total,
            counts.join(" ")
        )
    };
    match cmd {
        CommandsCmd::Send { orb_id, command_type, payload: p, expiry_ts, timeout_s, idempotency_key, supersede } => {
            let r = svc
                .create_command(c.req(pb::CreateCommandRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    command_type: command_type.clone(),
                    payload_json: payload(p)?,
                    expiry_ts: *expiry_ts,
                    timeout_s: *timeout_s,
                    idempotency_key: idempotency_key.clone().unwrap_or_default(),
                    supersede: *supersede,
                }))
                .await?
                .into_inner();
            if args.json {
                return Ok(json(&r));
            }
            let cmd = r.command.unwrap_or_default();
            Ok(table(&COMMAND_HEADER, &[command_row(&cmd)])
                + if r.created { "" } else { "(already created with this idempotency key)\n" })
        }
        CommandsCmd::Get { orb_id, command_id } => {
            let cmd = svc
                .get_command(c.req(pb::GetCommandRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    command_id: command_id.clone(),
                }))
                .await?
                .into_inner();
            if args.json {
                return Ok(json(&cmd));
            }
            let rows: Vec<Vec<String>> =
                cmd.history.iter().map(|t| vec![t.at_ms.to_string(), t.status.clone(), t.reason.clone()]).collect();
            Ok(table(&COMMAND_HEADER, &[command_row(&cmd)]) + "\n" + &table(&["AT_MS", "STATUS", "REASON"], &rows))
        }
        CommandsCmd::List { orb_id, status } => {
            let r = svc
                .list_commands(c.req(pb::ListCommandsRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    status: status.clone().unwrap_or_default(),
                    limit: 0,
                    page_token: String::new(),
                }))
                .await?
                .into_inner();
            Ok(if args.json {
                json(&r)
            } else {
                table(&COMMAND_HEADER, &r.commands.iter().map(command_row).collect::<Vec<_>>())
            })
        }
        CommandsCmd::Cancel { orb_id, command_id } => {
            let cmd = svc
                .cancel_command(c.req(pb::CancelCommandRequest {
                    tenant_id: c.tenant(),
                    orb_id: orb_id.clone(),
                    command_id: command_id.clone(),
                }))
                .await?
                .into_inner();
            Ok(if args.json { json(&cmd) } else { table(&COMMAND_HEADER, &[command_row(&cmd)]) })
        }
        CommandsCmd::Broadcast { command_type, payload: p, orbs, rate_per_s } => {
            let b = svc
                .start_broadcast(c.req(pb::StartBroadcastRequest {
                    tenant_id: c.tenant(),
                    command_type: command_type.clone(),
                    payload_json: payload(p)?,
                    orb_ids: orbs.clone(),
                    all_orbs: orbs.is_empty(),
                    rate_per_s: *rate_per_s,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            Ok(if args.json { json(&b) } else { broadcast_text(&b) })
        }
        CommandsCmd::BroadcastStatus { broadcast_id } => {
            let b = svc
                .get_broadcast(
                    c.req(pb::GetBroadcastRequest { tenant_id: c.tenant(), broadcast_id: broadcast_id.clone() }),
                )
                .await?
                .into_inner();
            Ok(if args.json { json(&b) } else { broadcast_text(&b) })
        }
    }
}

pub async fn storage(args: &ClientArgs, cmd: &StorageCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = StorageServiceClient::new(c.ch.clone());
    match cmd {
        StorageCmd::Spill { hot_window } => {
            let r = svc
                .spill(c.req(pb::SpillRequest {
                    tenant_id: c.tenant(),
                    hot_window: hot_window.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            Ok(if args.json {
                format!(
                    "{}\n",
                    serde_json::json!({"objects": r.objects, "rows": r.rows, "bytes": r.bytes, "tenants": r.tenants, "elapsed_ms": r.elapsed_ms})
                )
            } else {
                format!(
                    "spilled {} points into {} files ({} bytes) in {} ms\n",
                    r.rows, r.objects, r.bytes, r.elapsed_ms
                )
            })
        }
        StorageCmd::Retention { hot_window, cold_retention } => {
            let r = if hot_window.is_none() && cold_retention.is_none() {
                svc.get_retention(c.req(pb::GetRetentionRequest { tenant_id: c.tenant() })).await?.into_inner()
            } else {
                let keep = |v: &Option<String>| v.clone().filter(|v| v != "default").unwrap_or_default();
                svc.set_retention(c.req(pb::SetRetentionRequest {
                    tenant_id: c.tenant(),
                    hot_window: keep(hot_window),
                    cold_retention: keep(cold_retention),
                }))
                .await?
                .into_inner()
            };
            let mark = |default: bool| if default { " (node default)" } else { "" };
            Ok(if args.json {
                format!(
                    "{}\n",
                    serde_json::json!({"tenant_id": r.tenant_id, "hot_window_ms": r.hot_window_ms, "hot_window_is_default": r.hot_window_is_default, "cold_retention_ms": r.cold_retention_ms, "cold_retention_is_default": r.cold_retention_is_default})
                )
            } else {
                format!(
                    "tenant {}: hot window {} s{}, cold retention {}{}\n",
                    r.tenant_id,
                    r.hot_window_ms / 1000,
                    mark(r.hot_window_is_default),
                    if r.cold_retention_ms == 0 {
                        "forever".to_string()
                    } else {
                        format!("{} s", r.cold_retention_ms / 1000)
                    },
                    mark(r.cold_retention_is_default)
                )
            })
        }
        StorageCmd::Checkpoint => {
            let r = svc.checkpoint(c.req(pb::CheckpointRequest {})).await?.into_inner();
            Ok(if args.json {
                format!(
                    "{}\n",
                    serde_json::json!({"path": r.path, "created_ms": r.created_ms, "entries": r.entries, "bytes": r.bytes, "sha256": r.sha256})
                )
            } else {
                format!("checkpoint {} ({} entries, {} bytes)\n", r.path, r.entries, r.bytes)
            })
        }
    }
}

fn export_row(j: &pb::ExportJob) -> Vec<String> {
    vec![
        j.export_id.clone(),
        j.status.clone(),
        format!("{}/{}", j.orbs_done, j.orbs_total),
        j.files.to_string(),
        j.rows.to_string(),
        j.destination.clone(),
    ]
}

fn export_out(j: &pb::ExportJob, json: bool) -> String {
    if json {
        let v = serde_json::json!({
            "export_id": j.export_id, "tenant_id": j.tenant_id, "from": j.from, "to": j.to,
            "query": j.query, "format": j.format, "destination": j.destination, "status": j.status,
            "orbs_total": j.orbs_total, "orbs_done": j.orbs_done, "files": j.files, "rows": j.rows,
            "created_ms": j.created_ms, "updated_ms": j.updated_ms, "error": j.error,
        });
        format!("{v}\n")
    } else {
        table(&["EXPORT", "STATUS", "ORBS", "FILES", "ROWS", "DESTINATION"], &[export_row(j)])
    }
}

pub async fn exports(args: &ClientArgs, cmd: &ExportsCmd) -> Result<String, ClientError> {
    let c = connect(args).await?;
    let mut svc = StorageServiceClient::new(c.ch.clone());
    let req = |id: &str| pb::ExportRequest { tenant_id: c.tenant(), export_id: id.to_string() };
    match cmd {
        ExportsCmd::Create { from, to, query, format, destination } => {
            let j = svc
                .create_export(c.req(pb::CreateExportRequest {
                    tenant_id: c.tenant(),
                    from: *from,
                    to: *to,
                    query: query.clone(),
                    format: format.clone(),
                    destination: destination.clone(),
                }))
                .await?
                .into_inner();
            Ok(export_out(&j, args.json))
        }
        ExportsCmd::Get { export_id } => {
            Ok(export_out(&svc.get_export(c.req(req(export_id))).await?.into_inner(), args.json))
        }
        ExportsCmd::Cancel { export_id } => {
            Ok(export_out(&svc.cancel_export(c.req(req(export_id))).await?.into_inner(), args.json))
        }
        ExportsCmd::List => {
            let r = svc.list_exports(c.req(pb::ListExportsRequest { tenant_id: c.tenant() })).await?.into_inner();
            if args.json {
                Ok(r.exports.iter().map(|j| export_out(j, true)).collect())
            } else {
                let rows: Vec<_> = r.exports.iter().map(export_row).collect();
                Ok(table(&["EXPORT", "STATUS", "ORBS", "FILES", "ROWS", "DESTINATION"], &rows))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn tables_pad_to_the_widest_cell() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A     LONGER\nxxxx  y\n");
    }
}
