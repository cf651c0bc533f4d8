//! `cohort.v1.WorkerService`: what worker daemons call.

use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, off_runtime, receive_blob, send_blob, status, BlobStream};
use crate::convert;
use crate::core::{Core, CoreError, LeaseProof};
use crate::scheduler::{Abilities, Refusal};
use crate::store::{ArtifactRecord, CheckpointRecord};

/// Phase counters kept from a heartbeat (the worker has five), and the longest phase name.
const MAX_PHASES: usize = 8;
const MAX_PHASE_NAME: usize = 32;

/// Longest long-poll of an acquire call.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

/// The lease a worker's call about a task presents.
fn lease_of<'a>(worker_id: &'a str, task_id: &'a str, attempt: u32, secret: &'a str) -> LeaseProof<'a> {
    LeaseProof { worker_id, task_id, attempt, secret }
}

/// The worker service over a shared core.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    core: Arc<Core>,
}

impl WorkerApi {
    /// Serves `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let name = if request.name.is_empty() { "unnamed".to_string() } else { request.name };
        let abilities = Abilities { cuda: request.device.starts_with("cuda"), commands: request.allow_commands };
        let running = convert::leases(request.running);
        let (worker_id, session, abandon) =
            blocking(&self.core, move |core| core.register(&name, &request.device, abilities, &running)).await?;
        let heartbeat_interval_ms = self.core.heartbeat_interval().as_millis() as u32;
        Ok(Response::new(pb::RegisterResponse { worker_id, heartbeat_interval_ms, abandon, session }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let phases = request
            .phase_seconds
            .into_iter()
            .filter(|(name, seconds)| name.len() <= MAX_PHASE_NAME && seconds.is_finite())
            .take(MAX_PHASES)
            .collect();
        let running = convert::leases(request.running);
        let beat = off_runtime(&self.core, move |core| core.heartbeat(&request.worker_id, &request.session, &running, phases)).await?;
        match beat {
            Ok(abandon) => Ok(Response::new(pb::HeartbeatResponse { abandon, reregister: false })),
            Err(CoreError::Refused(Refusal::UnknownWorker(_))) => {
                Ok(Response::new(pb::HeartbeatResponse { abandon: vec![], reregister: true }))
            }
            Err(error) => Err(status(error)),
        }
    }

    async fn acquire_task(&self, request: Request<pb::AcquireTaskRequest>) -> Result<Response<pb::AcquireTaskResponse>, Status> {
        let request = request.into_inner();
        let wait = Duration::from_millis(u64::from(request.wait_ms)).min(MAX_ACQUIRE_WAIT);
        let (worker_id, session) = (request.worker_id, request.session);
        let dispatch = self
            .core
            .acquire_via(wait, || {
                let (worker_id, session) = (worker_id.clone(), session.clone());
                blocking(&self.core, move |core| core.try_acquire(&worker_id, &session))
            })
            .await?;
        Ok(Response::new(pb::AcquireTaskResponse { task: dispatch.map(Into::into) }))
    }

    async fn report_metrics(&self, request: Request<pb::ReportMetricsRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let epochs = convert::epochs(r.attempt, r.epochs);
        blocking(&self.core, move |core| core.report_metrics(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret), &epochs))
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn upload_blob(&self, request: Request<Streaming<pb::BlobChunk>>) -> Result<Response<pb::UploadBlobResponse>, Status> {
        let metadata = request.metadata().clone();
        Ok(Response::new(receive_blob(&self.core, &metadata, request.into_inner()).await?))
    }

    async fn attach_checkpoint(&self, request: Request<pb::AttachCheckpointRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let blob = convert::require_blob(r.blob, "checkpoint").map_err(Status::invalid_argument)?;
        let record = CheckpointRecord { task_id: r.task_id.clone(), epoch: r.epoch, attempt: r.attempt, blob, is_final: r.is_final };
        blocking(&self.core, move |core| core.attach_checkpoint(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret), record))
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn attach_artifact(&self, request: Request<pb::AttachArtifactRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let blob = convert::require_blob(r.blob, "artifact").map_err(Status::invalid_argument)?;
        let record = ArtifactRecord { task_id: r.task_id.clone(), name: r.name.clone(), epoch: r.epoch, blob };
        blocking(&self.core, move |core| core.attach_artifact(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret), record))
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn rendezvous(&self, request: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = request.into_inner();
        let wait = Duration::from_millis(u64::from(r.wait_ms)).min(MAX_ACQUIRE_WAIT);
        let (task_id, attempt) = (r.task_id.clone(), r.attempt);
        blocking(&self.core, move |core| core.announce(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret, &r.address, r.nccl_id))
            .await?;
        let response = match self.core.gathered(&task_id, attempt, wait).await {
            Some(done) => pb::RendezvousResponse { ready: true, peers: done.peers, secret: done.secret, nccl_id: done.nccl_id },
            None => pb::RendezvousResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn append_logs(&self, request: Request<pb::AppendLogsRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let lines = r.lines.into_iter().map(|l| (l.unix_ms, l.level, l.message)).collect();
        blocking(&self.core, move |core| core.append_logs(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret), lines)).await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn complete_task(&self, request: Request<pb::CompleteTaskRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        blocking(&self.core, move |core| core.complete(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret))).await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let kind = convert::failure_kind(r.kind());
        blocking(&self.core, move |core| core.fail(&lease_of(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret), kind, &r.error))
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    type FetchBlobStream = BlobStream;

    async fn fetch_blob(&self, request: Request<pb::FetchBlobRequest>) -> Result<Response<BlobStream>, Status> {
        Ok(Response::new(send_blob(&self.core, &request.into_inner().sha256)?))
    }
}
