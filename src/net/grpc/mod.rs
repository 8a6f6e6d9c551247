//! The gRPC listener (tonic): the operator API services, server reflection (v1 and v1alpha, so
//! grpcurl 1.8 works) and `grpc.health.v1`. Message sizes are bounded explicitly.

pub mod pb;
pub mod services;

use std::future::Future;
use std::sync::Arc;

use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::api::Api;
use services::Services;

/// Largest request a client may send, in bytes.
pub const GRPC_DECODE_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Largest response the server sends, in bytes.
pub const GRPC_ENCODE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Serves gRPC on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("orbmanager", tonic_health::ServingStatus::Serving).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1().expect("the embedded descriptor sets are valid");
    let v1alpha = reflection().build_v1alpha().expect("the embedded descriptor sets are valid");
    let s = Services { api };
    macro_rules! bounded {
        ($svc:expr) => {
            $svc.max_decoding_message_size(GRPC_DECODE_MAX_BYTES).max_encoding_message_size(GRPC_ENCODE_MAX_BYTES)
        };
    }
    Server::builder()
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(bounded!(pb::tenant_service_server::TenantServiceServer::new(s.clone())))
        .add_service(bounded!(pb::registry_service_server::RegistryServiceServer::new(s.clone())))
        .add_service(bounded!(pb::telemetry_service_server::TelemetryServiceServer::new(s.clone())))
        .add_service(bounded!(pb::command_service_server::CommandServiceServer::new(s.clone())))
        .add_service(bounded!(pb::alert_service_server::AlertServiceServer::new(s.clone())))
        .add_service(bounded!(pb::event_service_server::EventServiceServer::new(s.clone())))
        .add_service(bounded!(pb::storage_service_server::StorageServiceServer::new(s)))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
}
