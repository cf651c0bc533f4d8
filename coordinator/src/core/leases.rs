//! What workers call about their leases: registering, heartbeats, acquiring a task, and the
//! lease holder's reports (logs, epochs, uploads, checkpoints, artifacts, the end of the task),
//! and the periodic expiry of the leases nobody renews.

use std::time::{Duration, Instant};

use super::{random_hex, Core, CoreError, Inner};
use crate::domain::{BlobRef, FailureKind, TaskState};
use crate::events::{Change, ChangeKind, EpochNotice};
use crate::scheduler::{Abilities, Lease};
use crate::store::{ArtifactRecord, CheckpointRecord, EpochRecord, LogRecord};

/// A task handed to a worker, with everything it needs.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Task id.
    pub task_id: String,
    /// Sweep id.
    pub sweep_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// This worker's rank in the gang (0 for a plain task).
    pub rank: u32,
    /// The gang's size (1 for a plain task).
    pub world: u32,
    /// What to run: the stored [`TrialSpec`] JSON, handed on as it is.
    pub spec_json: String,
    /// The checkpoint to resume from (a retried attempt).
    pub resume_from: Option<BlobRef>,
    /// Proof of the lease, for every call about the task.
    pub lease_secret: String,
}

impl Dispatch {
    /// The trial, parsed (tests read what they were handed).
    #[cfg(test)]
    pub fn trial(&self) -> crate::domain::TrialSpec {
        crate::domain::TrialSpec::from_json(&self.spec_json).expect("the store holds readable specs")
    }
}

/// What a worker's call about a task presents: who it is, the task and attempt, and the lease's
/// secret proving it holds them.
#[derive(Debug, Clone, Copy)]
pub struct LeaseProof<'a> {
    /// The calling worker.
    pub worker_id: &'a str,
    /// The task.
    pub task_id: &'a str,
    /// The attempt.
    pub attempt: u32,
    /// The lease's secret.
    pub secret: &'a str,
}

/// Cuts `text` to at most `limit` bytes, at a character boundary.
fn cut_at_char(text: &mut String, limit: usize) {
    if text.len() <= limit {
        return;
    }
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
}

impl Core {
    /// Registers a worker: mints its id and session, re-attaches the tasks whose leases it
    /// proves, and returns (worker id, session, tasks to abandon). Registrations are rate
    /// limited: a flood of fake workers is refused, not remembered.
    pub fn register(
        &self,
        name: &str,
        device: &str,
        abilities: Abilities,
        running: &[Lease],
    ) -> Result<(String, String, Vec<String>), CoreError> {
        if name.len() > self.limits.max_name_bytes {
            return Err(CoreError::BadRequest(format!("a worker name has at most {} bytes", self.limits.max_name_bytes)));
        }
        if device.len() > self.limits.max_name_bytes {
            return Err(CoreError::BadRequest(format!("a device name has at most {} bytes", self.limits.max_name_bytes)));
        }
        let worker_id = format!("w-{}", random_hex(4));
        let session = random_hex(16);
        let per_minute = f64::from(self.limits.registrations_per_minute.max(1));
        let abandon = self.change(|inner| {
            let (tokens, refilled) = &mut inner.registrations;
            *tokens = (*tokens + refilled.elapsed().as_secs_f64() * per_minute / 60.0).min(per_minute);
            *refilled = Instant::now();
            if *tokens < 1.0 {
                return Err(CoreError::LimitExceeded(format!(
                    "more than {per_minute} worker registrations a minute (--registrations-per-minute); try again shortly"
                )));
            }
            *tokens -= 1.0;
            let now = self.now();
            let (abandon, changed) = inner.scheduler.register(&worker_id, name, &session, now, running);
            inner.scheduler.set_profile(&worker_id, device, abilities);
            Self::persist(inner, &changed)?;
            tracing::info!(worker = %worker_id, name, reattached = changed.len(), refused = abandon.len(), "worker registered");
            Ok(abandon)
        })?;
        Ok((worker_id, session, abandon))
    }

    /// Renews the worker's leases and notes its phase counters; returns the tasks it must
    /// abandon.
    pub fn heartbeat(
        &self,
        worker_id: &str,
        session: &str,
        running: &[Lease],
        phases: Vec<(String, f64)>,
    ) -> Result<Vec<String>, CoreError> {
        let now = self.now();
        let mut inner = self.lock();
        let abandon = inner.scheduler.heartbeat(worker_id, session, now, running)?;
        inner.scheduler.note_phases(worker_id, phases);
        Ok(abandon)
    }

    /// Leases the next task to the worker, waiting up to `wait` for one to appear.
    pub async fn acquire(&self, worker_id: &str, session: &str, wait: Duration) -> Result<Option<Dispatch>, CoreError> {
        self.acquire_via(wait, || std::future::ready(self.try_acquire(worker_id, session))).await
    }

    /// [`Core::acquire`] with each try ([`Core::try_acquire`], a commit) made by `attempt`: the
    /// gRPC service makes it on the blocking pool ([`crate::service::blocking`]), so that the
    /// long-poll waits on the runtime and commits off it.
    pub async fn acquire_via<E, Fut>(&self, wait: Duration, mut attempt: impl FnMut() -> Fut) -> Result<Option<Dispatch>, E>
    where
        Fut: std::future::Future<Output = Result<Option<Dispatch>, E>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Created before the try, so that work queued during it wakes this wait.
            let notified = self.work_available.notified();
            if let Some(dispatch) = attempt().await? {
                return Ok(Some(dispatch));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// One try of [`Core::acquire`]: leases the next task to the worker now, if there is one.
    pub fn try_acquire(&self, worker_id: &str, session: &str) -> Result<Option<Dispatch>, CoreError> {
        let timer = self.metrics.dispatch_latency.start_timer();
        let leased = self.change(|inner| {
            let now = self.now();
            let before: Vec<String> = inner.scheduler.unfinished_lease_of(worker_id).into_iter().collect();
            let Some(lease) = inner.scheduler.acquire(worker_id, session, now)? else {
                // Asking for work may still have ended a lease the worker held (its run was lost).
                if !before.is_empty() {
                    Self::persist_and_advance(self, inner, &before)?;
                }
                return Ok(None);
            };
            let mut changed = before;
            changed.push(lease.task_id.clone());
            Self::persist_and_advance(self, inner, &changed)?;
            let sweep_id = inner.scheduler.task(&lease.task_id).map(|t| t.sweep_id.clone()).expect("a leased task exists");
            let spec = inner.store.spec_json(&lease.task_id)?.ok_or_else(|| CoreError::NotFound(format!("task {}", lease.task_id)))?;
            let resume_from = match lease.attempt {
                1 => None,
                _ => inner.store.latest_checkpoint(&lease.task_id)?.map(|c| c.blob),
            };
            Ok(Some((lease, sweep_id, spec, resume_from)))
        })?;
        let Some((lease, sweep_id, spec, resume_from)) = leased else {
            timer.stop_and_discard();
            return Ok(None);
        };
        if lease.world > 1 {
            // This acquire completed a gang: the members reserved before it hold pending leases
            // and are waiting in their long-polls. Wake them now, or each would sit out the rest
            // of its wait while the others wait for it at the rendezvous.
            self.work_available.notify_waiters();
        }
        self.changes.publish(Change::task(&lease.task_id, ChangeKind::State));
        tracing::info!(task = %lease.task_id, worker = %worker_id, attempt = lease.attempt, resume = resume_from.is_some(), "task leased");
        Ok(Some(Dispatch {
            task_id: lease.task_id,
            sweep_id,
            attempt: lease.attempt,
            rank: lease.rank,
            world: lease.world,
            spec_json: spec,
            resume_from,
            lease_secret: lease.secret,
        }))
    }

    /// Keeps log lines a lease holder forwarded: at most 1,000 per call, each line and level
    /// cut to their limits, and at most `max_log_lines_per_trial` per trial.
    pub fn append_logs(&self, lease: &LeaseProof<'_>, lines: Vec<(i64, String, String)>) -> Result<(), CoreError> {
        if lines.len() > 1000 {
            return Err(CoreError::BadRequest(format!("{} log lines in one call, more than 1000", lines.len())));
        }
        let count = lines.len() as u64;
        let records: Vec<LogRecord> = lines
            .into_iter()
            .map(|(unix_ms, mut level, mut message)| {
                cut_at_char(&mut message, self.limits.max_log_line_bytes);
                cut_at_char(&mut level, self.limits.max_log_level_bytes);
                LogRecord { id: 0, task_id: lease.task_id.to_string(), attempt: lease.attempt, unix_ms, level, message }
            })
            .collect();
        let most = self.limits.max_log_lines_per_trial;
        self.change(|inner| {
            inner.scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?;
            let stored = match inner.log_lines.get(lease.task_id) {
                Some(&stored) => stored,
                None => inner.store.log_count(lease.task_id)?,
            };
            if stored + count > most {
                return Err(CoreError::LimitExceeded(format!(
                    "trial {} already has {stored} log lines; at most {most} are kept (--max-log-lines-per-trial)",
                    lease.task_id
                )));
            }
            inner.store.append_logs(&records)?;
            inner.log_lines.insert(lease.task_id.to_string(), stored + count);
            Ok(())
        })?;
        self.changes.publish(Change::task(lease.task_id, ChangeKind::Logs));
        Ok(())
    }

    /// Records epochs reported by the lease holder. Every value must be finite, named within the
    /// name limit, at most `max_values_per_epoch` of them, for an epoch of the trial's plan.
    pub fn report_metrics(&self, lease: &LeaseProof<'_>, epochs: &[EpochRecord]) -> Result<(), CoreError> {
        if epochs.len() > 1000 {
            return Err(CoreError::BadRequest(format!("{} epochs in one report, more than 1000", epochs.len())));
        }
        for epoch in epochs {
            self.check_epoch(epoch)?;
        }
        let pruned = self.change(|inner| {
            inner.scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?;
            let planned = inner.scheduler.planned_epochs(lease.task_id).unwrap_or(u32::MAX);
            if let Some(epoch) = epochs.iter().find(|e| e.epoch == 0 || e.epoch > planned) {
                return Err(CoreError::BadRequest(format!("epoch {} is outside the trial's plan of epochs 1 to {planned}", epoch.epoch)));
            }
            self.record_epochs(inner, lease.task_id, epochs)
        })?;
        if !pruned.is_empty() {
            for task_id in &pruned {
                self.changes.publish(Change::task(task_id, ChangeKind::State));
            }
            self.work_available.notify_waiters();
        }
        let mut change = Change::task(lease.task_id, ChangeKind::Epochs);
        change.epochs = epochs.iter().map(|e| EpochNotice { epoch: e.epoch, values: e.values.clone(), seconds: e.seconds }).collect();
        self.changes.publish(change);
        Ok(())
    }

    /// Checks one reported epoch against the limits, naming what is wrong.
    fn check_epoch(&self, epoch: &EpochRecord) -> Result<(), CoreError> {
        let most = self.limits.max_values_per_epoch;
        if epoch.values.len() > most {
            return Err(CoreError::LimitExceeded(format!(
                "epoch {} reports {} values, more than {most} (--max-values-per-epoch)",
                epoch.epoch,
                epoch.values.len()
            )));
        }
        for (name, value) in &epoch.values {
            if name.is_empty() || name.len() > self.limits.max_name_bytes {
                return Err(CoreError::BadRequest(format!("a metric name has 1 to {} bytes", self.limits.max_name_bytes)));
            }
            if !value.is_finite() {
                return Err(CoreError::BadRequest(format!(
                    "metric {name} of epoch {} is {value}: only finite values are recorded",
                    epoch.epoch
                )));
            }
        }
        if !epoch.seconds.is_finite() || epoch.seconds < 0.0 {
            return Err(CoreError::BadRequest(format!(
                "epoch {} took {} seconds: a duration is finite and not negative",
                epoch.epoch, epoch.seconds
            )));
        }
        Ok(())
    }

    /// Notes that the lease holder uploaded `blob` under its lease: only such blobs can become
    /// its checkpoints and artifacts.
    pub fn record_lease_upload(&self, lease: &LeaseProof<'_>, blob: &BlobRef) -> Result<(), CoreError> {
        self.change(|inner| {
            inner.scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?;
            inner.store.record_lease_upload(lease.task_id, lease.attempt, &blob.sha256)?;
            Ok(())
        })
    }

    /// Checks, before an upload's bytes are received, that its lease is live and proven.
    pub fn check_upload_lease(&self, lease: &LeaseProof<'_>) -> Result<(), CoreError> {
        Ok(self.lock().scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?)
    }

    /// Checks that `blob` was uploaded under this lease and is stored whole.
    fn check_own_blob(&self, inner: &Inner, task_id: &str, attempt: u32, blob: &BlobRef, what: &str) -> Result<(), CoreError> {
        if self.blobs.size(&blob.sha256) != Some(blob.size) {
            return Err(CoreError::BadRequest(format!("{what} blob {} was not uploaded", blob.sha256)));
        }
        if !inner.store.uploaded_under(task_id, attempt, &blob.sha256)? {
            return Err(CoreError::BadRequest(format!("{what} blob {} was not uploaded under this lease", blob.sha256)));
        }
        Ok(())
    }

    /// Records a checkpoint of the lease holder: a blob it uploaded under the same lease, for an
    /// epoch the trial has reported.
    pub fn attach_checkpoint(&self, lease: &LeaseProof<'_>, record: CheckpointRecord) -> Result<(), CoreError> {
        self.change(|inner| {
            inner.scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?;
            self.check_own_blob(inner, &record.task_id, record.attempt, &record.blob, "checkpoint")?;
            let reached = inner.store.last_epoch(&record.task_id)?;
            if record.epoch == 0 || reached.is_none_or(|reached| record.epoch > reached) {
                return Err(CoreError::BadRequest(format!(
                    "a checkpoint of epoch {} is attached before that epoch was reported (last reported: {})",
                    record.epoch,
                    reached.map_or("none".to_string(), |e| e.to_string())
                )));
            }
            inner.store.record_checkpoint(&record)?;
            Ok(())
        })?;
        self.changes.publish(Change::task(lease.task_id, ChangeKind::Files));
        Ok(())
    }

    /// Records an artifact of the lease holder: a blob it uploaded under the same lease.
    pub fn attach_artifact(&self, lease: &LeaseProof<'_>, record: ArtifactRecord) -> Result<(), CoreError> {
        if record.name.is_empty() || record.name.len() > self.limits.max_name_bytes {
            return Err(CoreError::BadRequest(format!("an artifact name has 1 to {} bytes", self.limits.max_name_bytes)));
        }
        self.change(|inner| {
            inner.scheduler.check_lease(lease.worker_id, lease.task_id, lease.attempt, lease.secret)?;
            self.check_own_blob(inner, &record.task_id, lease.attempt, &record.blob, "artifact")?;
            inner.store.record_artifact(&record)?;
            Ok(())
        })?;
        self.changes.publish(Change::task(lease.task_id, ChangeKind::Files));
        Ok(())
    }

    /// The lease holder finished the task.
    pub fn complete(&self, lease: &LeaseProof<'_>) -> Result<(), CoreError> {
        let (queued, ended) = self.change(|inner| {
            let now = self.now();
            inner.scheduler.complete(lease.worker_id, lease.task_id, lease.attempt, lease.secret, now)?;
            let queued = Self::persist_and_advance(self, inner, &[lease.task_id.to_string()])?;
            let ended = inner.scheduler.task(lease.task_id).is_some_and(|t| t.state != TaskState::Running);
            Ok((queued, ended))
        })?;
        if ended {
            self.gatherings.forget(lease.task_id);
        }
        self.changes.publish(Change::task(lease.task_id, ChangeKind::State));
        tracing::info!(task = %lease.task_id, worker = %lease.worker_id, "task succeeded");
        if queued {
            self.work_available.notify_waiters();
        }
        Ok(())
    }

    /// The lease holder reports a failure.
    pub fn fail(&self, lease: &LeaseProof<'_>, kind: FailureKind, error: &str) -> Result<(), CoreError> {
        let mut error = error.to_string();
        cut_at_char(&mut error, self.limits.max_log_line_bytes);
        let retry = self.change(|inner| {
            let now = self.now();
            let retry = inner.scheduler.fail(lease.worker_id, lease.task_id, lease.attempt, lease.secret, kind, &error, now)?;
            Self::persist_and_advance(self, inner, &[lease.task_id.to_string()])?;
            Ok(retry)
        })?;
        self.gatherings.forget(lease.task_id);
        self.changes.publish(Change::task(lease.task_id, ChangeKind::State));
        tracing::warn!(task = %lease.task_id, worker = %lease.worker_id, ?kind, ?retry, error, "task failed");
        self.work_available.notify_waiters();
        Ok(())
    }

    /// Lapses overdue leases (requeueing or failing their tasks); call periodically. While the
    /// store cannot be written, probes it instead and changes nothing.
    pub fn expire_leases(&self) -> Result<(), CoreError> {
        // The rendezvous of attempts that ended since the last pass (lapsed, abandoned,
        // cancelled) will not be finished: drop them.
        self.prune_rendezvous();
        {
            let mut inner = self.lock();
            if inner.unwritable.is_some() {
                self.probe_store(&mut inner);
                if inner.unwritable.is_some() {
                    return Ok(());
                }
                drop(inner);
                self.work_available.notify_waiters();
            }
        }
        let lapsed = self.change(|inner| {
            let now = self.now();
            let lapsed = inner.scheduler.expire(now);
            if lapsed.is_empty() {
                return Ok(Vec::new());
            }
            let changed: Vec<String> = lapsed.iter().map(|(id, _)| id.clone()).collect();
            Self::persist_and_advance(self, inner, &changed)?;
            let errors = lapsed.into_iter().map(|(id, retry)| {
                let error = inner.scheduler.task(&id).and_then(|t| t.error.clone());
                (id, retry, error)
            });
            Ok(errors.collect::<Vec<_>>())
        })?;
        if lapsed.is_empty() {
            return Ok(());
        }
        self.metrics.leases_expired.inc_by(lapsed.len() as u64);
        for (task, retry, error) in lapsed {
            self.changes.publish(Change::task(&task, ChangeKind::State));
            tracing::warn!(%task, ?retry, error = error.as_deref().unwrap_or(""), "lease lapsed");
        }
        self.work_available.notify_waiters();
        Ok(())
    }
}
