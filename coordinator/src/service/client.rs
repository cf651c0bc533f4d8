//! `cohort.v1.ClientService`: what users' commands call.

use std::sync::Arc;

use cohort_proto::v1 as pb;
use cohort_proto::v1::client_service_server::ClientService;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, receive_blob, send_blob, BlobStream};
use crate::convert;
use crate::core::Core;

/// Most trial specs a submission's reply lists (the stage's count covers them all): a
/// 100,000-trial plan listed in full is 50 MB, beyond any sensible message limit, and the sweep
/// would be stored while the client reads a failure.
pub const MAX_LISTED_TRIALS: usize = 1000;

/// Most log lines one `GetLogs` reply holds (ask again after the last id for more).
pub const MAX_LOG_LINES_LISTED: usize = 5000;

/// About the most text one `GetLogs` reply holds, far below any message limit.
pub const MAX_LOG_REPLY_BYTES: usize = 1 << 20;

/// Most tasks one `GetSweep` reply holds.
pub const MAX_TASKS_LISTED: usize = 2000;

/// About the most one `GetSweep` reply holds, in encoded bytes.
pub const MAX_SWEEP_REPLY_BYTES: usize = 2 << 20;

/// The client service over a shared core.
#[derive(Debug, Clone)]
pub struct ClientApi {
    core: Arc<Core>,
}

impl ClientApi {
    /// Serves `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl ClientService for ClientApi {
    async fn submit_sweep(&self, request: Request<pb::SubmitSweepRequest>) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let request = request.into_inner();
        let files = convert::dataset_files(request.dataset_files).map_err(Status::invalid_argument)?;
        let command_files = convert::dataset_files(request.command_files).map_err(Status::invalid_argument)?;
        // Checking the dataset also reads (and un-gzips) its files.
        let submitted = blocking(&self.core, move |core| {
            core.submit_with_command(&request.source, &request.source_name, files, command_files, request.dry_run)
        })
        .await?;
        let sweep_id = submitted.sweep_id.unwrap_or_default();
        let planned =
            submitted.planned.into_iter().take(MAX_LISTED_TRIALS).map(|(id, spec)| convert::task_spec(&id, &sweep_id, 0, &spec)).collect();
        let stages = submitted.stages.into_iter().map(|(name, trials, description)| pb::StagePlan { name, trials, description }).collect();
        Ok(Response::new(pb::SubmitSweepResponse { sweep_id, planned, stages }))
    }

    async fn has_blobs(&self, request: Request<pb::HasBlobsRequest>) -> Result<Response<pb::HasBlobsResponse>, Status> {
        let present = request.into_inner().sha256.into_iter().filter(|sha| self.core.blobs().size(sha).is_some()).collect();
        Ok(Response::new(pb::HasBlobsResponse { present }))
    }

    async fn upload_blob(&self, request: Request<Streaming<pb::BlobChunk>>) -> Result<Response<pb::UploadBlobResponse>, Status> {
        let metadata = request.metadata().clone();
        Ok(Response::new(receive_blob(&self.core, &metadata, request.into_inner()).await?))
    }

    type DownloadBlobStream = BlobStream;

    async fn download_blob(&self, request: Request<pb::FetchBlobRequest>) -> Result<Response<BlobStream>, Status> {
        Ok(Response::new(send_blob(&self.core, &request.into_inner().sha256)?))
    }

    async fn list_sweeps(&self, _request: Request<pb::ListSweepsRequest>) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let sweeps = blocking(&self.core, |core| core.sweeps()).await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListSweepsResponse { sweeps }))
    }

    async fn get_sweep(&self, request: Request<pb::GetSweepRequest>) -> Result<Response<pb::SweepDetail>, Status> {
        let request = request.into_inner();
        let offset = request.offset as usize;
        let limit = match request.limit as usize {
            0 => MAX_TASKS_LISTED,
            limit => limit.min(MAX_TASKS_LISTED),
        };
        let view = blocking(&self.core, move |core| core.sweep_page(&request.sweep_id, offset, limit)).await?;
        let total = view.summary.counts.total as usize;
        let mut detail: pb::SweepDetail = view.into();
        // Keep the reply far below any message limit: stop before the page passes its budget
        // (never before its first task, which the per-trial bounds keep small).
        let mut size = 0;
        let kept = detail
            .tasks
            .iter()
            .position(|task| {
                size += prost::Message::encoded_len(task);
                size > MAX_SWEEP_REPLY_BYTES
            })
            .unwrap_or(detail.tasks.len())
            .max(1)
            .min(detail.tasks.len());
        detail.tasks.truncate(kept);
        let next = offset + detail.tasks.len();
        detail.next_offset = if next < total { next as u32 } else { 0 };
        Ok(Response::new(detail))
    }

    async fn cancel_sweep(&self, request: Request<pb::CancelSweepRequest>) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let sweep_id = request.into_inner().sweep_id;
        let cancelled = blocking(&self.core, move |core| core.cancel(&sweep_id)).await?;
        Ok(Response::new(pb::CancelSweepResponse { cancelled }))
    }

    async fn retry_sweep(&self, request: Request<pb::RetrySweepRequest>) -> Result<Response<pb::RetrySweepResponse>, Status> {
        let sweep_id = request.into_inner().sweep_id;
        let requeued = blocking(&self.core, move |core| core.retry(&sweep_id)).await?;
        Ok(Response::new(pb::RetrySweepResponse { requeued }))
    }

    async fn get_logs(&self, request: Request<pb::GetLogsRequest>) -> Result<Response<pb::GetLogsResponse>, Status> {
        let r = request.into_inner();
        let lines = blocking(&self.core, move |core| {
            let task = Some(r.task_id.as_str()).filter(|t| !t.is_empty());
            core.logs(&r.sweep_id, task, r.after_id, MAX_LOG_LINES_LISTED, MAX_LOG_REPLY_BYTES)
        })
        .await?;
        let entries = lines
            .into_iter()
            .map(|l| pb::LogEntry {
                id: l.id,
                task_id: l.task_id,
                attempt: l.attempt,
                line: Some(pb::LogLine { unix_ms: l.unix_ms, level: l.level, message: l.message }),
            })
            .collect();
        Ok(Response::new(pb::GetLogsResponse { entries }))
    }

    type WatchSweepStream = super::progress::ProgressStream;

    async fn watch_sweep(&self, request: Request<pb::WatchSweepRequest>) -> Result<Response<Self::WatchSweepStream>, Status> {
        let stream = super::progress::watch(self.core.clone(), request.into_inner().sweep_id).await?;
        Ok(Response::new(stream))
    }

    async fn list_workers(&self, _request: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = blocking(&self.core, |core| core.workers())
            .await?
            .into_iter()
            .map(|w| {
                let task = w.task.unwrap_or_default();
                pb::WorkerInfo {
                    worker_id: w.id,
                    name: w.name,
                    last_seen_secs: w.last_seen_secs,
                    task_id: task.task_id,
                    device: w.device,
                    allow_commands: w.allow_commands,
                    trial_name: task.trial_name,
                    sweep_id: task.sweep_id,
                    phase_seconds: w.phases.into_iter().collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::open_with_dataset;

    /// A plan larger than the listing limit is stored and acknowledged in full: the reply lists
    /// its first trials and counts them all (it used to list every one and exceed the message
    /// limit after the sweep was stored).
    #[tokio::test]
    async fn large_plans_are_counted_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let configs = MAX_LISTED_TRIALS / 2 + 100;
        let source = format!(
            "name = \"large\"\n[dataset]\nformat = \"idx\"\npath = \"data\"\n[model]\nkind = \"dae\"\n\
             [cv]\nfolds = 2\nepochs = 1\nbatch_size = 16\n[cv.random]\nsamples = {configs}\nlr = {{ min = 1e-4, max = 1e-2, log = true }}\n"
        );
        let dataset_files = files.into_iter().map(|(name, blob)| pb::DatasetFile { name, blob: Some(blob.into()) }).collect();
        let request =
            pb::SubmitSweepRequest { source, source_name: "large.toml".into(), dataset_files, dry_run: false, command_files: vec![] };
        let api = ClientApi::new(Arc::new(core));
        let response = api.submit_sweep(Request::new(request)).await.unwrap().into_inner();
        assert!(!response.sweep_id.is_empty());
        assert_eq!(response.planned.len(), MAX_LISTED_TRIALS);
        assert_eq!(response.stages[0].trials as usize, configs * 2);
        let stored = api.core.sweep(&response.sweep_id).unwrap().tasks.len();
        assert_eq!(stored, configs * 2);

        // Read back in pages: each bounded, together every task once, in plan order.
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let request = pb::GetSweepRequest { sweep_id: response.sweep_id.clone(), offset, limit: 500 };
            let page = api.get_sweep(Request::new(request)).await.unwrap().into_inner();
            assert!(page.tasks.len() <= 500);
            assert_eq!(page.summary.as_ref().unwrap().total as usize, configs * 2, "every page counts the whole sweep");
            names.extend(page.tasks.into_iter().map(|t| t.spec.unwrap().task_id));
            if page.next_offset == 0 {
                break;
            }
            offset = page.next_offset;
        }
        let expected: Vec<String> = (0..configs * 2).map(|i| format!("{}.t{i}", response.sweep_id)).collect();
        assert_eq!(names, expected);
    }
}
