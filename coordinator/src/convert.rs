//! Conversions between protocol messages and the coordinator's domain types: the only place
//! where both meet.

use cohort_proto::task::task_message;
use cohort_proto::v1 as pb;

use crate::core::{Counts, Dispatch, StageProgressView, SweepProgressView, SweepState, SweepSummary, SweepView, TaskView};
use crate::domain::{BlobRef, FailureKind, TaskState, TrialSpec};
use crate::scheduler::Lease;
use crate::store::{ArtifactRecord, CheckpointRecord, EpochRecord};

/// The blob a message names, or an error naming the field.
pub fn require_blob(blob: Option<pb::BlobRef>, field: &str) -> Result<BlobRef, String> {
    BlobRef::from_wire(blob).ok_or_else(|| format!("{field} names no blob"))
}

/// Dataset files from a submit request.
pub fn dataset_files(files: Vec<pb::DatasetFile>) -> Result<Vec<(String, BlobRef)>, String> {
    files.into_iter().map(|file| Ok((file.name.clone(), require_blob(file.blob, &format!("dataset file {}", file.name))?))).collect()
}

/// Leases a worker says it holds.
pub fn leases(running: Vec<pb::RunningTask>) -> Vec<Lease> {
    running.into_iter().map(|r| Lease { task_id: r.task_id, attempt: r.attempt, rank: r.rank, world: 0, secret: r.lease_secret }).collect()
}

/// A failure kind from the wire (unspecified counts as infrastructure: retrying is the safe side).
pub fn failure_kind(kind: pb::FailureKind) -> FailureKind {
    match kind {
        pb::FailureKind::User => FailureKind::User,
        pb::FailureKind::Infrastructure | pb::FailureKind::Unspecified => FailureKind::Infrastructure,
    }
}

/// Epoch metrics from the wire.
pub fn epochs(attempt: u32, epochs: Vec<pb::EpochMetrics>) -> Vec<EpochRecord> {
    epochs
        .into_iter()
        .map(|e| {
            let mut values: Vec<(String, f64)> = e.values.into_iter().collect();
            values.sort_by(|a, b| a.0.cmp(&b.0));
            EpochRecord { epoch: e.epoch, attempt, values, seconds: e.seconds, samples: e.samples }
        })
        .collect()
}

/// A stored trial as a task message (rank 0 of `spec.replicas`), for listings.
pub fn task_spec(task_id: &str, sweep_id: &str, attempt: u32, spec: &TrialSpec) -> pb::TaskSpec {
    pb::TaskSpec { world_size: spec.replicas, ..task_message(task_id, sweep_id, attempt, spec.to_json(), None) }
}

impl From<Dispatch> for pb::TaskSpec {
    fn from(d: Dispatch) -> Self {
        // The stored JSON goes out as it was stored: a dispatch parses nothing.
        let message = task_message(&d.task_id, &d.sweep_id, d.attempt, d.spec_json, d.resume_from);
        pb::TaskSpec { rank: d.rank, world_size: d.world, lease_secret: d.lease_secret, ..message }
    }
}

fn task_state(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Queued => pb::TaskState::Queued,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Pruned => pb::TaskState::Pruned,
    }
}

fn sweep_state(state: SweepState) -> pb::SweepState {
    match state {
        SweepState::Running => pb::SweepState::Running,
        SweepState::Succeeded => pb::SweepState::Succeeded,
        SweepState::Failed => pb::SweepState::Failed,
        SweepState::Cancelled => pb::SweepState::Cancelled,
    }
}

impl From<SweepSummary> for pb::SweepSummary {
    fn from(s: SweepSummary) -> Self {
        let Counts { total, queued, running, succeeded, failed, cancelled: _, pruned } = s.counts;
        pb::SweepSummary {
            sweep_id: s.record.id,
            name: s.record.name,
            state: sweep_state(s.state) as i32,
            total,
            queued,
            running,
            succeeded,
            failed,
            pruned,
            created_unix_ms: s.record.created_ms,
        }
    }
}

fn checkpoint(c: CheckpointRecord) -> pb::Checkpoint {
    pb::Checkpoint { task_id: c.task_id, epoch: c.epoch, blob: Some(c.blob.into()), is_final: c.is_final }
}

fn artifact(a: ArtifactRecord) -> pb::Artifact {
    pb::Artifact { task_id: a.task_id, name: a.name, epoch: a.epoch, blob: Some(a.blob.into()) }
}

fn epoch(e: EpochRecord) -> pb::EpochMetrics {
    pb::EpochMetrics { epoch: e.epoch, values: e.values.into_iter().collect(), seconds: e.seconds, samples: e.samples, attempt: e.attempt }
}

impl From<TaskView> for pb::TaskResult {
    fn from(view: TaskView) -> Self {
        let entry = &view.task.entry;
        pb::TaskResult {
            spec: Some(task_spec(&entry.id, &entry.sweep_id, entry.attempt, &view.task.spec)),
            state: task_state(entry.state) as i32,
            worker: entry.members.join(","),
            error: entry.error.clone().unwrap_or_default(),
            epochs: view.epochs.into_iter().map(epoch).collect(),
            checkpoints: view.checkpoints.into_iter().map(checkpoint).collect(),
            artifacts: view.artifacts.into_iter().map(artifact).collect(),
            waiting: view.waiting.unwrap_or_default(),
            started_unix_ms: view.started_ms,
            ended_unix_ms: view.ended_ms,
            worker_names: view.worker_names.join(","),
        }
    }
}

impl From<SweepView> for pb::SweepDetail {
    fn from(view: SweepView) -> Self {
        let source = view.summary.record.source.clone();
        pb::SweepDetail {
            summary: Some(view.summary.into()),
            source,
            tasks: view.tasks.into_iter().map(Into::into).collect(),
            next_offset: 0,
        }
    }
}

impl From<StageProgressView> for pb::StageProgress {
    fn from(s: StageProgressView) -> Self {
        pb::StageProgress {
            stage: s.stage,
            total: s.total,
            ended: s.ended,
            running: s.running,
            remaining_epochs: s.remaining_epochs,
            mean_epoch_seconds: s.mean_epoch_seconds,
            waiting: s.waiting.unwrap_or_default(),
        }
    }
}

impl From<SweepProgressView> for pb::SweepProgress {
    fn from(view: SweepProgressView) -> Self {
        pb::SweepProgress {
            summary: Some(view.summary.into()),
            stages: view.stages.into_iter().map(Into::into).collect(),
            running: view.running.into_iter().map(Into::into).collect(),
            version: 0,
        }
    }
}
