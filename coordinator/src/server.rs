//! `coordinator serve`: the gRPC server over a data directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1::client_service_server::ClientServiceServer;
use cohort_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::core::{Core, CoreConfig, CoreError};
use crate::service::client::ClientApi;
use crate::service::worker::WorkerApi;

/// How often overdue leases are looked for.
const EXPIRY_PERIOD: Duration = Duration::from_millis(500);
/// Largest gRPC message (blobs move in 1 MiB chunks; this bounds everything else).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

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
}

impl BoundServer {
    /// Opens the data dir and binds `address` (port 0 picks a free port).
    pub async fn bind(address: SocketAddr, config: &CoreConfig) -> Result<Self, ServeError> {
        let core = Arc::new(Core::open(config)?);
        let listener = TcpListener::bind(address).await.map_err(|source| ServeError::Bind { address, source })?;
        Ok(Self { listener, core })
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
                if let Err(error) = expiry_core.expire_leases() {
                    tracing::error!(%error, "lease expiry failed");
                }
            }
        });
        let client = ClientServiceServer::new(ClientApi::new(self.core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let worker = WorkerServiceServer::new(WorkerApi::new(self.core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tracing::info!(address = %self.local_addr(), "coordinator listening");
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(client)
            .add_service(worker)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await;
        expiry.abort();
        Ok(result?)
    }
}
