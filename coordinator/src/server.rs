//! `coordinator serve`: the gRPC server over a data directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::transfer::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_MAX_FRAME_BYTES, HTTP2_STREAM_WINDOW_BYTES};
use cohort_proto::v1::client_service_server::ClientServiceServer;
use cohort_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::auth::{Service, Tokens};
use crate::core::{Core, CoreConfig, CoreError};
use crate::grpc_gate::MethodGate;
use crate::service::client::ClientApi;
use crate::service::worker::WorkerApi;

/// How often overdue leases are looked for.
const EXPIRY_PERIOD: Duration = Duration::from_millis(500);
/// How the server admits connections and requests.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Accepted bearer tokens (none: authentication off).
    pub tokens: Tokens,
    /// PEM certificate chain and private key: TLS on.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Largest gRPC message accepted, in bytes (blobs move in 1 MiB chunks).
    pub max_message_bytes: usize,
}

/// The default message limit: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be opened.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, coordinator.
#[derive(Debug)]
pub struct BoundServer {
    listener: TcpListener,
    core: Arc<Core>,
    security: Security,
}

impl BoundServer {
    /// Opens the data dir and binds `address` (port 0 picks a free port).
    pub async fn bind(address: SocketAddr, config: &CoreConfig, security: Security) -> Result<Self, ServeError> {
        let core = Arc::new(Core::open(config)?);
        let listener = TcpListener::bind(address).await.map_err(|source| ServeError::Bind { address, source })?;
        Ok(Self { listener, core, security })
    }

    /// Serves the Prometheus metrics at `http://ADDRESS/metrics`; returns the bound address.
    pub async fn serve_metrics(&self, address: SocketAddr) -> Result<SocketAddr, ServeError> {
        let core = self.core.clone();
        cohort_proto::metrics_http::spawn(address, move || core.metrics().render())
            .await
            .map_err(|source| ServeError::Bind { address, source })
    }

    /// Serves the web console, its JSON API under `/api/` and the Prometheus metrics at
    /// `http://ADDRESS/` (one listener); returns the bound address.
    pub async fn serve_console(&self, address: SocketAddr) -> Result<SocketAddr, ServeError> {
        crate::console::spawn(address, self.core.clone(), self.security.tokens.clone())
            .await
            .map_err(|source| ServeError::Bind { address, source })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
        let expiry_core = self.core.clone();
        let expiry = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(EXPIRY_PERIOD);
            loop {
                ticker.tick().await;
                // A commit: off the runtime, like every handler's (`crate::service::blocking`).
                match crate::service::off_runtime(&expiry_core, |core| core.expire_leases()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(%error, "lease expiry failed"),
                    Err(error) => tracing::error!(%error, "lease expiry failed"),
                }
            }
        });
        let limit = self.security.max_message_bytes.max(2 << 20);
        let client =
            ClientServiceServer::new(ClientApi::new(self.core.clone())).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let worker =
            WorkerServiceServer::new(WorkerApi::new(self.core.clone())).max_decoding_message_size(limit).max_encoding_message_size(limit);
        let admit = |tokens: Tokens, service: Service| {
            move |request: Request<()>| -> Result<Request<()>, Status> {
                tokens.check(&request, service)?;
                Ok(request)
            }
        };
        // The client service is admitted by method: a viewer token may only query.
        let client = MethodGate::new(client, self.security.tokens.clone(), Service::Client);
        let worker = InterceptedService::new(worker, admit(self.security.tokens.clone(), Service::Worker));
        // grpc.health.v1 for probes (Kubernetes' gRPC probes send no token): SERVING once the
        // data dir is open and the port bound, NOT_SERVING while draining.
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<ClientServiceServer<ClientApi>>().await;
        health_reporter.set_serving::<WorkerServiceServer<WorkerApi>>().await;
        health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        // No `tcp_nodelay` here: the builder applies it only to listeners it binds itself;
        // [`incoming`] sets it on this one's connections.
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(HTTP2_MAX_FRAME_BYTES);
        if let Some((cert, key)) = &self.security.tls {
            builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
        }
        tracing::info!(
            address = %self.local_addr(),
            tls = self.security.tls.is_some(),
            auth = self.security.tokens.enabled(),
            "coordinator listening"
        );
        let core = self.core.clone();
        let draining = async move {
            shutdown.await;
            tracing::info!("draining: finishing in-flight requests");
            health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        };
        let result = builder
            .add_service(health)
            .add_service(client)
            .add_service(worker)
            .serve_with_incoming_shutdown(incoming(self.listener), draining)
            .await;
        expiry.abort();
        core.flush()?;
        tracing::info!("database flushed, coordinator stopped");
        Ok(result?)
    }
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set. Without it, Nagle's algorithm
/// holds back the small last segment of a response until the client's delayed ACK (tens of
/// milliseconds), which every download and reply would wait for.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let connection = accepted.next().await.unwrap().unwrap();
        assert!(connection.nodelay().unwrap(), "accepted connections must have TCP_NODELAY set");
    }
}
