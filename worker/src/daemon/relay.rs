//! What a running task reports, sent on to the coordinator: epoch figures, and checkpoints and
//! artifacts uploaded under the task's lease.

use std::sync::atomic::Ordering;

use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use tch::Device;

use super::session::{with_retry, Running, Shared};
use crate::blobs::BlobCache;
use crate::client::WorkerClient;
use crate::task::Task;
use crate::train::TrainEvent;

/// An epoch's figures as a log line says them: `train_mse=0.29012 val_mse=0.30114`.
fn values_line<'a>(values: impl IntoIterator<Item = &'a (String, f64)>) -> String {
    values.into_iter().map(|(name, value)| format!("{name}={value:.5}")).collect::<Vec<_>>().join(" ")
}

/// Sends one training event to the coordinator. A refusal (stale lease) stops the run.
pub(super) async fn relay(shared: &Shared, task: &Task, current: &Running, event: TrainEvent) {
    if current.abandoned.load(Ordering::SeqCst) {
        return;
    }
    let result = match event {
        TrainEvent::Epoch(report) => {
            tracing::info!(task = %task.id, epoch = report.epoch, "epoch done: {}", values_line(&report.values));
            if let Device::Cuda(ordinal) = shared.config.device {
                crate::metrics::metrics().record_gpu_memory(ordinal);
            }
            let epochs = vec![pb::EpochMetrics {
                epoch: report.epoch,
                values: report.values.into_iter().collect(),
                seconds: report.seconds,
                samples: report.samples,
                attempt: task.attempt,
            }];
            let report_metrics = |mut c: WorkerClient, worker_id| {
                let request = pb::ReportMetricsRequest {
                    worker_id,
                    task_id: task.id.clone(),
                    attempt: task.attempt,
                    epochs: epochs.clone(),
                    lease_secret: current.lease_secret.clone(),
                };
                async move { c.report_metrics(request).await }
            };
            with_retry(shared, "metrics", report_metrics).await.map(|_| ())
        }
        TrainEvent::Checkpoint { epoch, path, is_final } => upload_checkpoint(shared, task, current, epoch, &path, is_final).await,
        TrainEvent::Artifact { name, epoch, path } => upload_artifact(shared, task, current, &name, epoch, &path).await,
    };
    if let Err(status) = result {
        tracing::warn!(task = %task.id, error = %status.message(), "coordinator refused a report, stopping the task");
        current.abandoned.store(true, Ordering::SeqCst);
        current.stop.store(true, Ordering::SeqCst);
    }
}

/// Uploads a file as a blob under the running task's lease (retrying while the coordinator is
/// unreachable) and returns its ref. The lease travels in the call's metadata: the coordinator
/// accepts a checkpoint or artifact only from a blob uploaded under the same lease.
async fn upload_file(shared: &Shared, current: &Running, path: &std::path::Path) -> Result<pb::BlobRef, tonic::Status> {
    // One pass over the file, ending with its CRC-32; the coordinator names the blob by the
    // SHA-256 it computes of what it received (its answer says which).
    let response = with_retry(shared, "upload", |mut c, worker_id| {
        let chunks = transfer::file_chunks_checksum_at_end(path.to_path_buf());
        let lease = cohort_proto::lease::UploadLease {
            worker_id,
            task_id: current.task_id.clone(),
            attempt: current.attempt,
            secret: current.lease_secret.clone(),
        };
        async move {
            let mut request = tonic::Request::new(chunks);
            lease.attach(request.metadata_mut())?;
            c.upload_blob(request).await
        }
    })
    .await?;
    response.into_inner().blob.ok_or_else(|| tonic::Status::internal("the coordinator answered an upload without its blob"))
}

async fn upload_artifact(
    shared: &Shared,
    task: &Task,
    current: &Running,
    name: &str,
    epoch: u32,
    path: &std::path::Path,
) -> Result<(), tonic::Status> {
    let blob = upload_file(shared, current, path).await?;
    let attach = |mut c: WorkerClient, worker_id| {
        let request = pb::AttachArtifactRequest {
            worker_id,
            task_id: task.id.clone(),
            attempt: task.attempt,
            name: name.to_string(),
            epoch,
            blob: Some(blob.clone()),
            lease_secret: current.lease_secret.clone(),
        };
        async move { c.attach_artifact(request).await }
    };
    with_retry(shared, "artifact", attach).await?;
    let _ = std::fs::remove_file(path);
    tracing::info!(task = %task.id, artifact = name, "artifact uploaded");
    Ok(())
}

async fn upload_checkpoint(
    shared: &Shared,
    task: &Task,
    current: &Running,
    epoch: u32,
    path: &std::path::Path,
    is_final: bool,
) -> Result<(), tonic::Status> {
    let blob = upload_file(shared, current, path).await?;
    let attach = |mut c: WorkerClient, worker_id| {
        let request = pb::AttachCheckpointRequest {
            worker_id,
            task_id: task.id.clone(),
            attempt: task.attempt,
            epoch,
            blob: Some(blob.clone()),
            is_final,
            lease_secret: current.lease_secret.clone(),
        };
        async move { c.attach_checkpoint(request).await }
    };
    with_retry(shared, "attach", attach).await?;
    // Keep the newest checkpoint in the cache under its hash: a resumed attempt here needs no download.
    let cached = BlobCache::new(&shared.config.cache_dir).path(&blob.sha256);
    if let Some(folder) = cached.parent() {
        let _ = std::fs::create_dir_all(folder);
    }
    if std::fs::rename(path, &cached).is_err() {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(task = %task.id, epoch, sha256 = %blob.sha256, "checkpoint uploaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_values_are_logged_as_name_value_pairs() {
        let values = vec![("train_mse".to_string(), 0.29012345), ("val_mse".to_string(), 0.3)];
        assert_eq!(values_line(&values), "train_mse=0.29012 val_mse=0.30000");
    }
}
