//! The gRPC listener (tonic): the operator API services, reflection (v1 and v1alpha, so
//! grpcurl 1.8 works) and `grpc.health.v1`.

use std::future::Future;

use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

/// Serves gRPC on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("orbmanager", tonic_health::ServingStatus::Serving).await;
    Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
}
pub mod pb;
