//! `cohort.v1.WorkerService`: what worker daemons call.

use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status, Streaming};

use super::{receive_blob, send_blob, status, BlobStream};
use crate::convert;
use crate::core::{Core, CoreError, LeaseProof};
use crate::scheduler::{Abilities, Refusal};
use crate::store::{ArtifactRecord, CheckpointRecord};

/// Phase counters kept from a heartbeat (the worker has five), and the longest phase name.
const MAX_PHASES: usize = 8;
const MAX_PHASE_NAME: usize = 32;

/// Longest long-poll of an acquire call.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

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
        let (worker_id, session, abandon) =
            self.core.register(&name, &request.device, abilities, &convert::leases(request.running)).map_err(status)?;
        let heartbeat_interval_ms = self.core.heartbeat_interval().as_millis() as u32;
        Ok(Response::new(pb::RegisterResponse { worker_id, heartbeat_interval_ms, abandon, session }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let phases = request.phase_seconds.into_iter().filter(|(name, seconds)| name.len() <= MAX_PHASE_NAME && seconds.is_finite()).take(MAX_PHASES).collect();
        match self.core.heartbeat(&request.worker_id, &request.session, &convert::leases(request.running), phases) {
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
        let dispatch = self.core.acquire(&request.worker_id, &request.session, wait).await.map_err(status)?;
        Ok(Response::new(pb::AcquireTaskResponse { task: dispatch.map(Into::into) }))
    }

    async fn report_metrics(&self, request: Request<pb::ReportMetricsRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let epochs = convert::epochs(r.attempt, r.epochs);
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        self.core.report_metrics(&lease, &epochs).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn upload_blob(&self, request: Request<Streaming<pb::BlobChunk>>) -> Result<Response<pb::UploadBlobResponse>, Status> {
        let metadata = request.metadata().clone();
        Ok(Response::new(receive_blob(&self.core, &metadata, request.into_inner()).await?))
    }

    async fn attach_checkpoint(&self, request: Request<pb::AttachCheckpointRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let blob = convert::require_blob(r.blob, "checkpoint").map_err(Status::invalid_argument)?;
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        let record = CheckpointRecord { task_id: r.task_id.clone(), epoch: r.epoch, attempt: r.attempt, blob, is_final: r.is_final };
        self.core.attach_checkpoint(&lease, record).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn attach_artifact(&self, request: Request<pb::AttachArtifactRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let blob = convert::require_blob(r.blob, "artifact").map_err(Status::invalid_argument)?;
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        let record = ArtifactRecord { task_id: r.task_id.clone(), name: r.name.clone(), epoch: r.epoch, blob };
        self.core.attach_artifact(&lease, record).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn rendezvous(&self, request: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = request.into_inner();
        let wait = Duration::from_millis(u64::from(r.wait_ms)).min(MAX_ACQUIRE_WAIT);
        let result =
            self.core.rendezvous(&r.worker_id, &r.task_id, r.attempt, &r.lease_secret, &r.address, r.nccl_id, wait).await.map_err(status)?;
        let response = match result {
            Some(done) => pb::RendezvousResponse { ready: true, peers: done.peers, secret: done.secret, nccl_id: done.nccl_id },
            None => pb::RendezvousResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn append_logs(&self, request: Request<pb::AppendLogsRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        let lines = r.lines.into_iter().map(|l| (l.unix_ms, l.level, l.message)).collect();
        self.core.append_logs(&lease, lines).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn complete_task(&self, request: Request<pb::CompleteTaskRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        self.core.complete(&lease).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let kind = convert::failure_kind(r.kind());
        let lease = LeaseProof { worker_id: &r.worker_id, task_id: &r.task_id, attempt: r.attempt, secret: &r.lease_secret };
        self.core.fail(&lease, kind, &r.error).map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    type FetchBlobStream = BlobStream;

    async fn fetch_blob(&self, request: Request<pb::FetchBlobRequest>) -> Result<Response<BlobStream>, Status> {
        Ok(Response::new(send_blob(&self.core, &request.into_inner().sha256)?))
    }
}
