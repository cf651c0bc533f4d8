//! A gang member's way into its gang: the collective listener it binds and advertises, and the
//! rendezvous through the coordinator that tells it its peers.

use std::time::Duration;

use cohort_proto::v1 as pb;

use super::session::{with_retry, Shared};
use super::WorkerConfig;
use crate::client::WorkerClient;
use crate::collective::{nccl, Backend, GangSettings};
use crate::task::Task;
use crate::train::{GangInputs, TrainError};

/// How long a gang member waits for the others at the rendezvous.
const RENDEZVOUS_FOR: Duration = Duration::from_secs(120);

/// The host peers should dial: the flag's, else this machine's address on the route to the
/// coordinator (found by connecting a UDP socket, which sends nothing).
fn advertise_host(config: &WorkerConfig) -> Result<String, TrainError> {
    if let Some(host) = &config.advertise_host {
        return Ok(host.clone());
    }
    let uri: tonic::codegen::http::Uri = config.connect.url.parse().map_err(|e| TrainError::Collective(format!("coordinator url: {e}")))?;
    let host = uri.host().unwrap_or("127.0.0.1").trim_matches(|c| c == '[' || c == ']');
    let port = uri.port_u16().unwrap_or(50051);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| TrainError::Collective(format!("route lookup: {e}")))?;
    socket.connect((host, port)).map_err(|e| TrainError::Collective(format!("route to the coordinator: {e}")))?;
    Ok(socket.local_addr().map_err(|e| TrainError::Collective(e.to_string()))?.ip().to_string())
}

/// Binds this member's collective listener, announces it, and waits for the whole gang.
pub(super) async fn join_rendezvous(shared: &Shared, task: &Task, lease_secret: &str) -> Result<GangInputs, TrainError> {
    let collective = |message: String| TrainError::Collective(message);
    let listener = std::net::TcpListener::bind((shared.config.collective_bind, shared.config.collective_port))
        .map_err(|e| collective(format!("bind: {e}")))?;
    let port = listener.local_addr().map_err(|e| collective(e.to_string()))?.port();
    let address = format!("{}:{port}", advertise_host(&shared.config)?);
    // Rank 0 decides the backend for the whole gang and relays NCCL's id; the others follow.
    let nccl_id = match task.rank {
        0 => match Backend::resolve(task.spec.collective_backend, shared.config.device) {
            Backend::Nccl => nccl::unique_id()?,
            Backend::Ring => vec![],
        },
        _ => vec![],
    };
    let started = tokio::time::Instant::now();
    loop {
        let rendezvous = |mut c: WorkerClient, worker_id| {
            let request = pb::RendezvousRequest {
                worker_id,
                task_id: task.id.clone(),
                attempt: task.attempt,
                rank: task.rank,
                address: address.clone(),
                wait_ms: 2_000,
                nccl_id: nccl_id.clone(),
                lease_secret: lease_secret.to_string(),
            };
            async move { c.rendezvous(request).await }
        };
        let response = with_retry(shared, "rendezvous", rendezvous)
            .await
            .map_err(|s| collective(format!("rendezvous: {}", s.message())))?
            .into_inner();
        if response.ready {
            tracing::info!(task = %task.id, rank = task.rank, world = task.world, "gang assembled");
            let settings = GangSettings {
                rank: task.rank as usize,
                peers: response.peers,
                secret: response.secret,
                timeout: shared.config.collective_timeout,
            };
            let backend = if response.nccl_id.is_empty() { Backend::Ring } else { Backend::Nccl };
            return Ok(GangInputs { listener, settings, backend, nccl_id: response.nccl_id });
        }
        if started.elapsed() >= RENDEZVOUS_FOR {
            return Err(collective(format!("the gang did not assemble within {RENDEZVOUS_FOR:?}")));
        }
    }
}
