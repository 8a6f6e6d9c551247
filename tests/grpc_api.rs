//! The operator API over gRPC with the generated tonic clients: tenants and tokens, the whole
//! register -> connect with token -> telemetry -> read path, commands and broadcasts,
//! cross-tenant probes refused, reflection (v1 and v1alpha) and health.

mod common;

use common::{ADMIN, TestServer, V3, now_ms, telemetry};
use orbmanager::net::grpc::pb;
use pb::command_service_client::CommandServiceClient;
use pb::registry_service_client::RegistryServiceClient;
use pb::telemetry_service_client::TelemetryServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn channel(ts: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", ts.grpc)).unwrap().connect().await.expect("grpc connects")
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn tenant_with_token(ch: &Channel, tenant: &str, role: pb::Role) -> String {
    let mut tenants = TenantServiceClient::new(ch.clone());
    let created = tenants.create_tenant(authed(pb::CreateTenantRequest { tenant_id: tenant.into() }, ADMIN)).await;
    assert!(created.is_ok() || created.as_ref().unwrap_err().code() == Code::AlreadyExists, "{created:?}");
    let t = tenants
        .create_api_token(authed(
            pb::CreateApiTokenRequest { tenant_id: tenant.into(), role: role as i32, name: "test".into() },
            ADMIN,
        ))
        .await
        .expect("token")
        .into_inner();
    assert!(t.secret.starts_with(&format!("oma/{tenant}/")));
    t.secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_connect_publish_and_read_over_grpc() {
    let ts = TestServer::start(false).await;
    let ch = channel(&ts).await;
    let op = tenant_with_token(&ch, "acme", pb::Role::Operator).await;

    let mut reg = RegistryServiceClient::new(ch.clone());
    let r = reg
        .register_orb(authed(
            pb::RegisterOrbRequest {
                orb_id: "g1".into(),
                attributes: [("depot".into(), "sf".into())].into(),
                ..Default::default()
            },
            &op,
        ))
        .await
        .expect("register")
        .into_inner();
    assert_eq!((r.tenant_id.as_str(), r.orb_id.as_str()), ("acme", "g1"));
    let dup = reg.register_orb(authed(pb::RegisterOrbRequest { orb_id: "g1".into(), ..Default::default() }, &op)).await;
    assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);

    let mut dev =
        V3::connect(ts.mqtt, "g1", Some(("acme/g1", &r.device_token))).await.expect("device connects with its token");
    let t0 = now_ms() - 1000;
    for i in 0..3 {
        dev.publish("telemetry/acme/g1", telemetry(t0 + i, &format!("m{i}"), 70.0 + i as f64)).await.unwrap();
    }
    let orb = reg
        .get_orb(authed(pb::GetOrbRequest { orb_id: "g1".into(), ..Default::default() }, &op))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(orb.status, "active");
    assert_eq!(orb.attributes.get("depot").map(String::as_str), Some("sf"));
    assert!(orb.connectivity.as_ref().unwrap().online);
    assert_eq!(orb.telemetry.as_ref().unwrap().battery, Some(72.0));

    let mut tel = TelemetryServiceClient::new(ch.clone());
    let hist = tel
        .query_telemetry(authed(pb::QueryTelemetryRequest { orb_id: "g1".into(), limit: 2, ..Default::default() }, &op))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hist.points.iter().map(|p| p.msg_id.as_str()).collect::<Vec<_>>(), ["m0", "m1"]);
    assert!(!hist.next_page_token.is_empty());

    let list = reg
        .list_orbs(authed(pb::ListOrbsRequest { status: "active".into(), ..Default::default() }, &op))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.orbs.len(), 1);

    let mut cmds = CommandServiceClient::new(ch.clone());
    let c = cmds
        .create_command(authed(
            pb::CreateCommandRequest {
                orb_id: "g1".into(),
                command_type: "go".into(),
                payload_json: r#"{"x":1}"#.into(),
                idempotency_key: "k1".into(),
                ..Default::default()
            },
            &op,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(c.created);
    let again = cmds
        .create_command(authed(
            pb::CreateCommandRequest {
                orb_id: "g1".into(),
                command_type: "go".into(),
                payload_json: r#"{"x":1}"#.into(),
                idempotency_key: "k1".into(),
                ..Default::default()
            },
            &op,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.command.unwrap().command_id, c.command.as_ref().unwrap().command_id);
    let bad = cmds
        .create_command(authed(
            pb::CreateCommandRequest {
                orb_id: "g1".into(),
                command_type: "go".into(),
                payload_json: "{".into(),
                ..Default::default()
            },
            &op,
        ))
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);

    let b = cmds
        .start_broadcast(authed(
            pb::StartBroadcastRequest { command_type: "sync".into(), all_orbs: true, ..Default::default() },
            &op,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.total, 1);
    common::wait_until("broadcast done", 15, || {
        let (mut cmds, id, op) = (cmds.clone(), b.broadcast_id.clone(), op.clone());
        async move {
            let s = cmds
                .get_broadcast(authed(pb::GetBroadcastRequest { broadcast_id: id, ..Default::default() }, &op))
                .await
                .unwrap()
                .into_inner();
            s.status == "completed" && s.fanned_out == 1
        }
    })
    .await;
    dev.disconnect().await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_another_tenant_and_roles_are_enforced() {
    let ts = TestServer::start(false).await;
    let ch = channel(&ts).await;
    let acme = tenant_with_token(&ch, "acme", pb::Role::Admin).await;
    let globex = tenant_with_token(&ch, "globex", pb::Role::Admin).await;
    let viewer = tenant_with_token(&ch, "acme", pb::Role::Viewer).await;
    let mut reg = RegistryServiceClient::new(ch.clone());
    reg.register_orb(authed(pb::RegisterOrbRequest { orb_id: "secret-orb".into(), ..Default::default() }, &acme))
        .await
        .unwrap();

    // Explicitly naming another tenant: refused before anything is looked up.
    let probe = |tenant: &str| pb::GetOrbRequest { tenant_id: tenant.into(), orb_id: "secret-orb".into() };
    assert_eq!(reg.get_orb(authed(probe("acme"), &globex)).await.unwrap_err().code(), Code::PermissionDenied);
    // Without naming it, the same id in the caller's own tenant: not found, like any unknown id.
    let own = reg.get_orb(authed(probe(""), &globex)).await.unwrap_err();
    assert_eq!(own.code(), Code::NotFound);
    let unknown = reg
        .get_orb(authed(pb::GetOrbRequest { orb_id: "never-was".into(), ..Default::default() }, &globex))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "an existing id elsewhere and a missing id answer alike");
    let list =
        reg.list_orbs(authed(pb::ListOrbsRequest { tenant_id: "acme".into(), ..Default::default() }, &globex)).await;
    assert_eq!(list.unwrap_err().code(), Code::PermissionDenied);
    let mine = reg.list_orbs(authed(pb::ListOrbsRequest::default(), &globex)).await.unwrap().into_inner();
    assert!(mine.orbs.is_empty());
    let dec = reg
        .decommission_orb(authed(
            pb::DecommissionOrbRequest { tenant_id: "acme".into(), orb_id: "secret-orb".into() },
            &globex,
        ))
        .await;
    assert_eq!(dec.unwrap_err().code(), Code::PermissionDenied);
    let mut tel = TelemetryServiceClient::new(ch.clone());
    let q = tel
        .query_telemetry(authed(
            pb::QueryTelemetryRequest { tenant_id: "acme".into(), orb_id: "secret-orb".into(), ..Default::default() },
            &globex,
        ))
        .await;
    assert_eq!(q.unwrap_err().code(), Code::PermissionDenied);
    let mut cmds = CommandServiceClient::new(ch.clone());
    let c = cmds
        .create_command(authed(
            pb::CreateCommandRequest {
                tenant_id: "acme".into(),
                orb_id: "secret-orb".into(),
                command_type: "x".into(),
                ..Default::default()
            },
            &globex,
        ))
        .await;
    assert_eq!(c.unwrap_err().code(), Code::PermissionDenied);
    let mut tenants = TenantServiceClient::new(ch.clone());
    let t = tenants.list_api_tokens(authed(pb::ListApiTokensRequest { tenant_id: "acme".into() }, &globex)).await;
    assert_eq!(t.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(
        tenants
            .create_tenant(authed(pb::CreateTenantRequest { tenant_id: "x".into() }, &acme))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // The same over REST with the same token.
    let (s, _) = common::http("GET", &ts.url("/v1/orbs/secret-orb?tenant_id=acme"), Some(&globex), None).await;
    assert_eq!(s, 403);
    let (s, _) = common::http("GET", &ts.url("/v1/orbs/secret-orb"), Some(&globex), None).await;
    assert_eq!(s, 404);
    let (s, body) = common::http("GET", &ts.url("/v1/orbs/secret-orb"), Some(&acme), None).await;
    assert_eq!((s, body["orb_id"].as_str()), (200, Some("secret-orb")), "a tenant token needs no tenant_id");

    // Roles: a viewer reads but does not write.
    assert!(reg.get_orb(authed(probe(""), &viewer)).await.is_ok());
    let w =
        reg.register_orb(authed(pb::RegisterOrbRequest { orb_id: "v1".into(), ..Default::default() }, &viewer)).await;
    assert_eq!(w.unwrap_err().code(), Code::PermissionDenied);
    let w = cmds
        .create_command(authed(
            pb::CreateCommandRequest { orb_id: "secret-orb".into(), command_type: "x".into(), ..Default::default() },
            &viewer,
        ))
        .await;
    assert_eq!(w.unwrap_err().code(), Code::PermissionDenied);

    // Revoked tokens stop working at once; garbage tokens are unauthenticated.
    let tokens =
        tenants.list_api_tokens(authed(pb::ListApiTokensRequest::default(), &acme)).await.unwrap().into_inner().tokens;
    let viewer_id = tokens.iter().find(|t| t.role == pb::Role::Viewer as i32).unwrap().token_id.clone();
    tenants
        .revoke_api_token(authed(pb::RevokeApiTokenRequest { token_id: viewer_id, ..Default::default() }, &acme))
        .await
        .unwrap();
    assert_eq!(reg.get_orb(authed(probe(""), &viewer)).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(reg.get_orb(authed(probe(""), "oma/acme/00")).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(reg.get_orb(Request::new(probe("acme"))).await.unwrap_err().code(), Code::Unauthenticated);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_health_is_serving() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let ts = TestServer::start(false).await;
    let ch = channel(&ts).await;
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "orbmanager.v1.TenantService",
        "orbmanager.v1.RegistryService",
        "orbmanager.v1.TelemetryService",
        "orbmanager.v1.CommandService",
        "orbmanager.v1.AlertService",
        "orbmanager.v1.EventService",
        "orbmanager.v1.StorageService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    ts.stop().await;
}
