//! One leased task, start to end: its inputs fetched, training on a thread of its own with its
//! events relayed as they come, and the outcome reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use tokio::sync::mpsc;

use super::gang::join_rendezvous;
use super::relay::relay;
use super::session::{with_retry, Running, Shared};
use crate::blobs::{BlobCache, MaterializeError};
use crate::client::WorkerClient;
use crate::metrics::Phase;
use crate::task::{Task, TrialKind};
use crate::train::{self, Events, RunInputs, TrainError, TrainEvent};

/// Messages from the training thread to the daemon.
enum FromTrainer {
    Event(TrainEvent),
    Done(Result<(), TrainError>),
}

/// Runs one leased task to its end and reports the outcome.
pub(super) async fn execute(shared: &Shared, spec: pb::TaskSpec, stopping: &AtomicBool) {
    let phases = &crate::metrics::metrics().phases;
    phases.switch(Phase::Coordinator);
    let (task_id, attempt, rank, lease_secret) = (spec.task_id.clone(), spec.attempt, spec.rank, spec.lease_secret.clone());
    let current = Running {
        task_id: task_id.clone(),
        attempt,
        rank,
        lease_secret: lease_secret.clone(),
        stop: Arc::default(),
        drain: Arc::default(),
        abandoned: Arc::default(),
    };
    let task = match Task::try_from(spec) {
        Ok(task) => task,
        Err(error) => {
            report_failure(shared, &current, true, error.to_string()).await;
            return;
        }
    };
    // The coordinator gives command trials only to workers that allow them; should one arrive
    // anyway, it is refused here, and retried elsewhere.
    if task.spec.kind == TrialKind::Command && !shared.config.allow_commands {
        tracing::warn!(task = %task_id, "refusing a command trial: this worker was started without --allow-commands");
        report_failure(
            shared,
            &current,
            false,
            format!("worker {} does not run command trials (started without --allow-commands)", shared.config.name),
        )
        .await;
        return;
    }
    *shared.running.lock().unwrap() = Some(current.clone());
    crate::logs::buffer().start(&task_id, attempt);
    tracing::info!(task = %task_id, trial = %task.spec.name, attempt, worker = %shared.config.name, "task started");
    let outcome = run_and_relay(shared, task, &current).await;
    // What is left (uploads the end of training waits for, the report) waits on the coordinator.
    phases.switch(Phase::Coordinator);
    match &outcome {
        Ok(()) => tracing::info!(task = %task_id, "training finished"),
        Err(error) => tracing::warn!(task = %task_id, %error, "training ended"),
    }
    shared.ship_logs().await;
    crate::logs::buffer().stop();
    *shared.running.lock().unwrap() = None;
    if current.abandoned.load(Ordering::SeqCst) {
        return;
    }
    match outcome {
        Ok(()) => {
            let complete = |mut c: WorkerClient, worker_id| {
                let request = pb::CompleteTaskRequest { worker_id, task_id: task_id.clone(), attempt, lease_secret: lease_secret.clone() };
                async move { c.complete_task(request).await }
            };
            match with_retry(shared, "complete", complete).await {
                Ok(_) => tracing::info!(task = %task_id, "task succeeded"),
                Err(status) => tracing::warn!(task = %task_id, error = %status.message(), "completion refused"),
            }
        }
        Err(TrainError::Stopped) if stopping.load(Ordering::SeqCst) => {
            report_failure(shared, &current, false, "worker shutting down".into()).await;
        }
        Err(error) => report_failure(shared, &current, error.is_user_error(), error.to_string()).await,
    }
}

async fn report_failure(shared: &Shared, run: &Running, user_error: bool, error: String) {
    let task_id = run.task_id.as_str();
    tracing::warn!(task = %task_id, user_error, %error, "task failed");
    let kind = if user_error { pb::FailureKind::User } else { pb::FailureKind::Infrastructure };
    let fail = |mut c: WorkerClient, worker_id| {
        let request = pb::FailTaskRequest {
            worker_id,
            task_id: task_id.to_string(),
            attempt: run.attempt,
            kind: kind as i32,
            error: error.clone(),
            lease_secret: run.lease_secret.clone(),
        };
        async move { c.fail_task(request).await }
    };
    if let Err(status) = with_retry(shared, "fail", fail).await {
        tracing::warn!(task = %task_id, error = %status.message(), "failure report refused");
    }
}

/// Fetches the task's inputs, trains on a dedicated thread, and relays its events as they come.
async fn run_and_relay(shared: &Shared, task: Task, current: &Running) -> Result<(), TrainError> {
    let phases = &crate::metrics::metrics().phases;
    let cache = BlobCache::new(&shared.config.cache_dir);
    let mut client = shared.client.clone();
    phases.switch(Phase::Data);
    let mut fetched = Vec::with_capacity(task.spec.dataset.files.len());
    for (name, blob) in &task.spec.dataset.files {
        let path = cache.ensure(&mut client, blob).await.map_err(|e| fetch_error(name, e))?;
        fetched.push((name.clone(), path, blob.sha256.clone()));
    }
    let (dataset_root, dataset_files) = cache.materialize(&fetched).map_err(materialize_error)?;
    phases.switch(Phase::Checkpoint);
    let resume_from = match &task.resume_from {
        Some(blob) => Some(cache.ensure(&mut client, blob).await.map_err(|e| fetch_error("checkpoint", e))?),
        None => None,
    };
    let init_from = match &task.spec.init_from {
        Some(blob) => Some(cache.ensure(&mut client, blob).await.map_err(|e| fetch_error("pretrained checkpoint", e))?),
        None => None,
    };
    let judge_blob = task.spec.config.wgan.as_ref().and_then(|recipe| recipe.judge.as_ref());
    let judge = match judge_blob {
        Some(judge) => Some(cache.ensure(&mut client, &judge.checkpoint).await.map_err(|e| fetch_error("judge classifier", e))?),
        None => None,
    };
    phases.switch(Phase::Coordinator);
    let mut gang = if task.world > 1 { Some(join_rendezvous(shared, &task, &current.lease_secret).await?) } else { None };
    let command_inputs = match task.spec.kind {
        TrialKind::Command => Some(
            crate::command::prepare::inputs(&mut client, &cache, &shared.config, &task, &dataset_root, resume_from.clone(), gang.take())
                .await?,
        ),
        _ => None,
    };
    let scratch_dir = cache.scratch_dir();
    std::fs::create_dir_all(&scratch_dir).map_err(|e| {
        TrainError::Checkpoint(crate::checkpoint::CheckpointError::Mismatch {
            path: scratch_dir.display().to_string(),
            message: e.to_string(),
        })
    })?;

    let (sender, mut receiver) = mpsc::unbounded_channel();
    let device = shared.config.device;
    let stop = current.stop.clone();
    let drain = current.drain.clone();
    let thread_task = task.clone();
    let threads = shared.config.threads.clone();
    let trainer = std::thread::Builder::new()
        .name(format!("train-{}", task.id))
        .spawn(move || {
            if let Some(threads) = &threads {
                threads.apply();
            }
            let inputs = RunInputs {
                dataset_files: &dataset_files,
                dataset_root: &dataset_root,
                resume_from: resume_from.as_deref(),
                init_from: init_from.as_deref(),
                judge: judge.as_deref(),
                scratch_dir: &scratch_dir,
                device,
                gang: gang.as_ref(),
            };
            let events_sender = sender.clone();
            let mut emit = move |event| {
                let _ = events_sender.send(FromTrainer::Event(event));
            };
            let mut events = Events { emit: &mut emit, stop: &stop, drain: &drain };
            // The training thread owns the phase clock while it runs; the recipes mark their
            // data and checkpoint work, the rest is training.
            let phases = &crate::metrics::metrics().phases;
            phases.switch(Phase::Train);
            let result = match &command_inputs {
                Some(command_inputs) => crate::command::run(&thread_task, command_inputs, &mut events),
                None => train::run(&thread_task, &inputs, &mut events),
            };
            phases.switch(Phase::Coordinator);
            let _ = sender.send(FromTrainer::Done(result));
        })
        .map_err(|e| TrainError::Infrastructure(format!("cannot start the training thread: {e}")))?;

    let mut outcome = Err(TrainError::Stopped);
    while let Some(message) = receiver.recv().await {
        match message {
            FromTrainer::Event(event) => relay(shared, &task, current, event).await,
            FromTrainer::Done(result) => {
                outcome = result;
                break;
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || trainer.join()).await;
    outcome
}

/// A failed fetch of a task's input from the coordinator (a dataset file, a checkpoint): the
/// coordinator or the network failed, not the trial, so it is retried elsewhere.
fn fetch_error(what: &str, error: transfer::TransferError) -> TrainError {
    TrainError::Infrastructure(format!("cannot fetch {what}: {}", cohort_proto::errors::error_chain(&error)))
}

/// A dataset that could not be laid out: a file name that would leave its folder is the
/// dataset's fault; local disk trouble is the worker's.
fn materialize_error(error: MaterializeError) -> TrainError {
    match error {
        MaterializeError::UnsafeName(_) => TrainError::Invalid(error.to_string()),
        MaterializeError::Io { .. } => {
            TrainError::Infrastructure(format!("cannot lay out the dataset: {}", cohort_proto::errors::error_chain(&error)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// What the coordinator or the machine caused is retried; only what the dataset itself
    /// caused fails the trial at once.
    #[test]
    fn fetch_and_disk_failures_are_infrastructure_errors() {
        let dropped = transfer::TransferError::Stream(tonic::Status::unavailable("connection reset"));
        assert!(!fetch_error("train-images-idx3-ubyte", dropped).is_user_error());
        let missing = transfer::TransferError::Stream(tonic::Status::not_found("blob abc"));
        assert!(!fetch_error("checkpoint", missing).is_user_error());
        let disk = MaterializeError::Io {
            path: PathBuf::from("/cache/datasets/x"),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert!(!materialize_error(disk).is_user_error());
        assert!(materialize_error(MaterializeError::UnsafeName("../etc/passwd".into())).is_user_error());
    }
}
