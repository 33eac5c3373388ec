//! The gRPC API (`moe.v1.Generation`, tonic), plus standard health checking
//! and server reflection (`grpc.reflection.v1` and `v1alpha`). Requests go through the same validation
//! (`frontend::params`), generation driver and error mapping as REST.

mod convert;
mod service;

use crate::frontend::state::AppState;
use moe_proto::v1::generation_server::GenerationServer;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Name of the generation service, as health checks know it.
pub const SERVICE_NAME: &str = "moe.v1.Generation";

/// Sets the health of both the server ("") and the generation service.
pub async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Serves gRPC on `listener` until `shutdown` resolves. Health starts
/// NOT_SERVING; the caller flips it with [`set_health`].
pub async fn run_grpc(
    listener: TcpListener,
    state: Arc<AppState>,
    reporter_health: (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = reporter_health;
    set_health(&reporter, state.ready().is_ok()).await;
    // both reflection versions: grpcurl and tonic clients speak v1, the Python
    // grpcio-reflection client (and older grpcurl / Postman) only v1alpha
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_alpha = reflection_builder().build_v1alpha()?;
    let key = state.cfg.api_key.clone();
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        if let Some(key) = &key {
            let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
            if !crate::frontend::auth::authorized(given, key) {
                return Err(Status::unauthenticated(
                    "missing or invalid API key (send `authorization: Bearer <key>` metadata)",
                ));
            }
        }
        Ok(req)
    };
    // requests are as large as REST bodies may be (tonic's default would be 4 MiB)
    let svc = GenerationServer::new(service::GenerationApi::new(state.clone()))
        .max_decoding_message_size(state.cfg.max_body_bytes)
        // a backstop for stream messages; unary responses are checked with a clear message
        .max_encoding_message_size(state.cfg.max_body_bytes);
    let svc = InterceptedService::new(svc, auth.clone());
    // health is open unless `--public-health false`; reflection is API surface: key-guarded
    let (open_health, guarded_health) = if state.cfg.public_health {
        (Some(health), None)
    } else {
        (None, Some(InterceptedService::new(health, auth.clone())))
    };
    let reflection = InterceptedService::new(reflection, auth.clone());
    let reflection_alpha = InterceptedService::new(reflection_alpha, auth);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(state.cfg.grpc_max_concurrent_streams)
        .add_optional_service(open_health)
        .add_optional_service(guarded_health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
