//! The coordinator's core: the scheduler and the store behind one lock, with every change
//! committed to SQLite before the caller is answered. The gRPC handlers in [`crate::service`]
//! only convert messages and call in here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::blobs::BlobStore;
use crate::dataset::{self, DatasetError};
use crate::domain::{BlobRef, DatasetSpec, FailureKind, TaskState, TrialSpec};
use crate::metrics::CoordinatorMetrics;
use crate::plan;
use crate::scheduler::{Lease, Millis, Refusal, Scheduler, TaskEntry, Timeouts};
use crate::store::{ArtifactRecord, CheckpointRecord, EpochRecord, LogRecord, Store, StoreError, StoredTask, SweepRecord};
use crate::sweep::{SweepError, SweepFile};

/// Why the core refused or failed a request. Mapped to gRPC codes once, in the service.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The sweep file is invalid.
    #[error(transparent)]
    Sweep(#[from] SweepError),
    /// The dataset is unusable.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// A worker's call no longer applies (stale lease, unknown worker).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Local I/O failed.
    #[error("{0}")]
    Io(String),
}

/// How the core is set up.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Data directory: `state.db` and `blobs/` live here.
    pub data_dir: PathBuf,
    /// Lease and worker timeouts.
    pub timeouts: Timeouts,
    /// Bounds on what clients may ask for.
    pub limits: Limits,
}

/// Bounds on hostile or mistaken input, each configurable on `coordinator serve`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Trials one sweep's first stage may expand to.
    pub max_trials: usize,
    /// Largest blob (dataset file, checkpoint, artifact) accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Longest name (sweep, dataset file, artifact, worker) accepted, in bytes.
    pub max_name_bytes: usize,
    /// Longest forwarded log line kept, in bytes (longer ones are cut).
    pub max_log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_trials: crate::sweep::DEFAULT_MAX_TRIALS, max_blob_bytes: 4 << 30, max_name_bytes: 256, max_log_line_bytes: 4096 }
    }
}

/// What a submission planned.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The new sweep's id (none on a dry run).
    pub sweep_id: Option<String>,
    /// The first stage's tasks: (task id, spec).
    pub planned: Vec<(String, TrialSpec)>,
    /// Every stage: (name, trials, description).
    pub stages: Vec<(String, u32, String)>,
}

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
    /// What to run.
    pub spec: TrialSpec,
    /// The checkpoint to resume from (a retried attempt).
    pub resume_from: Option<BlobRef>,
}

/// Counts of a sweep's tasks by state, and the sweep's overall state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Total tasks.
    pub total: u32,
    /// Waiting.
    pub queued: u32,
    /// Running.
    pub running: u32,
    /// Done.
    pub succeeded: u32,
    /// Failed for good.
    pub failed: u32,
    /// Cancelled.
    pub cancelled: u32,
}

/// A sweep's overall state, derived from its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepState {
    /// Work remains.
    Running,
    /// Every task succeeded.
    Succeeded,
    /// Nothing remains and some task failed.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

impl Counts {
    fn add(&mut self, state: TaskState) {
        self.total += 1;
        match state {
            TaskState::Queued => self.queued += 1,
            TaskState::Running => self.running += 1,
            TaskState::Succeeded => self.succeeded += 1,
            TaskState::Failed => self.failed += 1,
            TaskState::Cancelled => self.cancelled += 1,
        }
    }

    /// The sweep state these counts imply.
    pub fn state(&self, cancelled: bool) -> SweepState {
        if cancelled {
            return SweepState::Cancelled;
        }
        if self.queued + self.running > 0 {
            return SweepState::Running;
        }
        if self.failed + self.cancelled > 0 {
            return SweepState::Failed;
        }
        SweepState::Succeeded
    }
}

/// A sweep with its counts.
#[derive(Debug, Clone)]
pub struct SweepSummary {
    /// The stored row.
    pub record: SweepRecord,
    /// Task counts.
    pub counts: Counts,
    /// Derived state.
    pub state: SweepState,
}

/// A task with its figures.
#[derive(Debug, Clone)]
pub struct TaskView {
    /// Row and spec.
    pub task: StoredTask,
    /// Epochs.
    pub epochs: Vec<EpochRecord>,
    /// Checkpoints.
    pub checkpoints: Vec<CheckpointRecord>,
    /// Artifacts.
    pub artifacts: Vec<ArtifactRecord>,
}

/// A sweep in full.
#[derive(Debug, Clone)]
pub struct SweepView {
    /// Summary.
    pub summary: SweepSummary,
    /// Its tasks, in plan order.
    pub tasks: Vec<TaskView>,
}

struct Inner {
    scheduler: Scheduler,
    store: Store,
}

/// The members of one gang attempt announcing their collective addresses.
#[derive(Debug)]
struct Gathering {
    attempt: u32,
    addresses: Vec<Option<String>>,
    secret: String,
    nccl_id: Vec<u8>,
}

/// A finished rendezvous: every member's address by rank, the attempt's secret, rank 0's NCCL id.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    /// Collective addresses by rank.
    pub peers: Vec<String>,
    /// The attempt's gang secret.
    pub secret: String,
    /// Rank 0's NCCL unique id (empty for the ring backend).
    pub nccl_id: Vec<u8>,
}

/// The coordinator's state.
pub struct Core {
    limits: Limits,
    metrics: CoordinatorMetrics,
    inner: Mutex<Inner>,
    blobs: BlobStore,
    work_available: Notify,
    gatherings: Mutex<HashMap<String, Gathering>>,
    gathered: Notify,
    started: Instant,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("blobs", &self.blobs).finish_non_exhaustive()
    }
}

/// Task rows for newly planned trials, numbered on from `first_index` within the sweep.
fn new_tasks(sweep_id: &str, sweep_seq: u64, first_index: usize, trials: Vec<TrialSpec>) -> Vec<StoredTask> {
    trials
        .into_iter()
        .enumerate()
        .map(|(offset, spec)| {
            let index = first_index + offset;
            let entry =
                TaskEntry::queued(format!("{sweep_id}.t{index}"), sweep_id.to_string(), (sweep_seq << 20) | index as u64, spec.max_attempts, spec.replicas);
            StoredTask { entry, spec }
        })
        .collect()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), buffer.as_mut_slice());
    hex::encode(buffer)
}

impl Core {
    /// Opens the data directory, reloading every sweep. Running tasks keep their leases (renewed)
    /// so that their workers can re-attach after a restart.
    pub fn open(config: &CoreConfig) -> Result<Self, CoreError> {
        std::fs::create_dir_all(config.data_dir.join("blobs"))
            .map_err(|e| CoreError::Io(format!("{}: {e}", config.data_dir.display())))?;
        let store = Store::open(&config.data_dir.join("state.db"))?;
        let mut scheduler = Scheduler::new(config.timeouts);
        for task in store.tasks(None)? {
            scheduler.insert(task.entry, 0);
        }
        Ok(Self {
            limits: config.limits,
            metrics: CoordinatorMetrics::new(),
            inner: Mutex::new(Inner { scheduler, store }),
            blobs: BlobStore::new(config.data_dir.join("blobs")),
            work_available: Notify::new(),
            gatherings: Mutex::new(HashMap::new()),
            gathered: Notify::new(),
            started: Instant::now(),
        })
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The blob store.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Folds the write-ahead log into the database file (at shutdown).
    pub fn flush(&self) -> Result<(), CoreError> {
        Ok(self.lock().store.checkpoint()?)
    }

    /// The metrics, refreshed with the current gauges.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        let inner = self.lock();
        let running = inner.scheduler.leases_by_worker().values().collect::<std::collections::HashSet<_>>().len();
        self.metrics.workers_connected.set(inner.scheduler.workers().len() as i64);
        self.metrics.tasks_queued.set(inner.scheduler.queued() as i64);
        self.metrics.tasks_running.set(running as i64);
        drop(inner);
        self.metrics.blob_bytes.set(self.blobs.total_bytes() as i64);
        &self.metrics
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Validates and plans a sweep; unless `dry_run`, stores it and queues its first stage.
    pub fn submit(
        &self,
        source: &str,
        source_name: &str,
        files: Vec<(String, BlobRef)>,
        dry_run: bool,
    ) -> Result<Submitted, CoreError> {
        let sweep = SweepFile::parse(source, source_name)?;
        sweep.check_trial_limit(source_name, self.limits.max_trials)?;
        sweep.check_name_limit(source_name, self.limits.max_name_bytes)?;
        dataset::check_names(files.iter().map(|(name, _)| name.as_str()), self.limits.max_name_bytes)?;
        for (name, blob) in &files {
            if self.blobs.size(&blob.sha256) != Some(blob.size) {
                return Err(CoreError::BadRequest(format!("dataset file {name} ({}) was not uploaded", blob.sha256)));
            }
        }
        let local: Vec<(String, PathBuf)> =
            files.iter().map(|(name, blob)| (name.clone(), self.blobs.path(&blob.sha256).expect("checked present"))).collect();
        match sweep.dataset.format.as_str() {
            "idx" => sweep.check_against_dataset(source_name, dataset::check_idx(&local)?)?,
            "nifti" => dataset::check_nifti(&local)?,
            _ => dataset::check_image_folder(&local)?,
        }

        let dataset = DatasetSpec {
            format: sweep.dataset.format.clone(),
            files,
            train_limit: sweep.dataset.train_limit,
            test_limit: sweep.dataset.test_limit,
            image_size: sweep.dataset.image_size,
            min_foreground: sweep.dataset.min_foreground,
        };
        let trials = plan::initial(&sweep, dataset);
        let mut inner = self.lock();
        let seq = inner.store.next_sweep_seq()?;
        let sweep_id = format!("s{seq}-{}", random_hex(3));
        let tasks = new_tasks(&sweep_id, seq, 0, trials);
        let planned = tasks.iter().map(|t| (t.entry.id.clone(), t.spec.clone())).collect();
        let stages = plan::describe_stages(&sweep);
        if dry_run {
            return Ok(Submitted { sweep_id: None, planned, stages });
        }
        let record = SweepRecord { id: sweep_id.clone(), seq, name: sweep.name, source: source.to_string(), created_ms: unix_ms(), cancelled: false };
        inner.store.insert_sweep(&record, &tasks)?;
        let now = self.now();
        for task in tasks {
            inner.scheduler.insert(task.entry, now);
        }
        drop(inner);
        self.work_available.notify_waiters();
        tracing::info!(sweep = %sweep_id, "sweep submitted");
        Ok(Submitted { sweep_id: Some(sweep_id), planned, stages })
    }

    fn persist(&self, inner: &mut Inner, changed: &[String]) -> Result<(), CoreError> {
        let Inner { scheduler, store } = inner;
        store.save_tasks(changed.iter().filter_map(|id| scheduler.task(id)))?;
        Ok(())
    }

    /// Persists the changed tasks, then plans the next stage of every sweep in which one of
    /// them ended. Returns whether new tasks were queued.
    fn persist_and_advance(&self, inner: &mut Inner, changed: &[String]) -> Result<bool, CoreError> {
        self.persist(inner, changed)?;
        let mut sweeps: Vec<String> = changed
            .iter()
            .filter_map(|id| inner.scheduler.task(id))
            .filter(|task| task.state.is_terminal())
            .map(|task| task.sweep_id.clone())
            .collect();
        sweeps.dedup();
        let mut queued = false;
        for sweep_id in sweeps {
            queued |= self.advance(inner, &sweep_id)?;
        }
        Ok(queued)
    }

    /// Plans and queues the sweep's next stage if its current one has ended.
    fn advance(&self, inner: &mut Inner, sweep_id: &str) -> Result<bool, CoreError> {
        let Some(record) = inner.store.sweep(sweep_id)? else {
            return Ok(false);
        };
        if record.cancelled {
            return Ok(false);
        }
        let stored = inner.store.tasks(Some(sweep_id))?;
        // Most trials end while others of their stage still run: settle that from the task rows
        // alone, before reading every trial's metrics and checkpoints (plan::next_stage would
        // answer Wait all the same).
        let current_stage = stored.last().map(|t| t.spec.stage.as_str()).unwrap_or_default();
        if stored.iter().any(|t| t.spec.stage == current_stage && !t.entry.state.is_terminal()) {
            return Ok(false);
        }
        let sweep = SweepFile::parse(&record.source, &record.name)
            .map_err(|e| CoreError::Io(format!("stored sweep {sweep_id} no longer parses: {e}")))?;
        let mut facts = Vec::with_capacity(stored.len());
        for task in &stored {
            let min_val_mse = inner.store.min_metric(&task.entry.id, "val_mse")?;
            let final_checkpoint = inner.store.checkpoints(&task.entry.id)?.into_iter().rev().find(|c| c.is_final).map(|c| c.blob);
            facts.push((task.entry.state, min_val_mse, final_checkpoint));
        }
        let outcomes: Vec<plan::Outcome<'_>> = stored
            .iter()
            .zip(facts)
            .map(|(task, (state, min_val_mse, final_checkpoint))| plan::Outcome { spec: &task.spec, state, min_val_mse, final_checkpoint })
            .collect();
        let plan::Next::Start(trials) = plan::next_stage(&sweep, &outcomes) else {
            return Ok(false);
        };
        let stage = trials.first().map(|t| t.stage.clone()).unwrap_or_default();
        let tasks = new_tasks(sweep_id, record.seq, stored.len(), trials);
        inner.store.insert_tasks(&tasks)?;
        let now = self.now();
        for task in tasks {
            inner.scheduler.insert(task.entry, now);
        }
        tracing::info!(sweep = %sweep_id, %stage, "next stage queued");
        Ok(true)
    }

    /// Registers a worker; re-attaches the tasks it still runs, returns those to abandon.
    pub fn register(&self, name: &str, running: &[Lease]) -> Result<(String, Vec<String>), CoreError> {
        if name.len() > self.limits.max_name_bytes {
            return Err(CoreError::BadRequest(format!("a worker name has at most {} bytes", self.limits.max_name_bytes)));
        }
        let worker_id = format!("w-{}", random_hex(4));
        let mut inner = self.lock();
        let now = self.now();
        let (abandon, changed) = inner.scheduler.register(&worker_id, name, now, running);
        self.persist(&mut inner, &changed)?;
        tracing::info!(worker = %worker_id, name, reattached = changed.len(), "worker registered");
        Ok((worker_id, abandon))
    }

    /// Renews the worker's leases; returns the tasks it must abandon.
    pub fn heartbeat(&self, worker_id: &str, running: &[Lease]) -> Result<Vec<String>, CoreError> {
        let now = self.now();
        Ok(self.lock().scheduler.heartbeat(worker_id, now, running)?)
    }

    /// Leases the next task to the worker, waiting up to `wait` for one to appear.
    pub async fn acquire(&self, worker_id: &str, wait: Duration) -> Result<Option<Dispatch>, CoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.work_available.notified();
            if let Some(dispatch) = self.try_acquire(worker_id)? {
                return Ok(Some(dispatch));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    fn try_acquire(&self, worker_id: &str) -> Result<Option<Dispatch>, CoreError> {
        let timer = self.metrics.dispatch_latency.start_timer();
        let mut inner = self.lock();
        let now = self.now();
        let Some(lease) = inner.scheduler.acquire(worker_id, now)? else {
            timer.stop_and_discard();
            return Ok(None);
        };
        self.persist(&mut inner, std::slice::from_ref(&lease.task_id))?;
        let stored = inner.store.task(&lease.task_id)?.ok_or_else(|| CoreError::NotFound(format!("task {}", lease.task_id)))?;
        let resume_from = match lease.attempt {
            1 => None,
            _ => inner.store.latest_checkpoint(&lease.task_id)?.map(|c| c.blob),
        };
        tracing::info!(task = %lease.task_id, worker = %worker_id, attempt = lease.attempt, resume = resume_from.is_some(), "task leased");
        Ok(Some(Dispatch {
            task_id: lease.task_id,
            sweep_id: stored.entry.sweep_id,
            attempt: lease.attempt,
            rank: lease.rank,
            world: lease.world,
            spec: stored.spec,
            resume_from,
        }))
    }

    /// Records a gang member's collective address and waits up to `wait` for the others; returns
    /// the rendezvous once every rank of the attempt has announced itself.
    pub async fn rendezvous(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        address: &str,
        nccl_id: Vec<u8>,
        wait: Duration,
    ) -> Result<Option<Rendezvous>, CoreError> {
        if address.is_empty() || address.len() > 256 {
            return Err(CoreError::BadRequest("a collective address is host:port".into()));
        }
        let (rank, world) = {
            let inner = self.lock();
            let rank = inner.scheduler.member_rank(worker_id, task_id, attempt)?;
            (rank, inner.scheduler.task(task_id).map_or(1, |t| t.gang_size as usize))
        };
        {
            let mut gatherings = self.gatherings.lock().unwrap_or_else(|p| p.into_inner());
            let gathering = gatherings.entry(task_id.to_string()).or_insert_with(|| Gathering {
                attempt,
                addresses: vec![None; world],
                secret: random_hex(16),
                nccl_id: vec![],
            });
            if gathering.attempt != attempt {
                *gathering = Gathering { attempt, addresses: vec![None; world], secret: random_hex(16), nccl_id: vec![] };
            }
            gathering.addresses[rank] = Some(address.to_string());
            if rank == 0 && !nccl_id.is_empty() {
                gathering.nccl_id = nccl_id;
            }
        }
        self.gathered.notify_waiters();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.gathered.notified();
            {
                let gatherings = self.gatherings.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(g) = gatherings.get(task_id).filter(|g| g.attempt == attempt) {
                    if let Some(peers) = g.addresses.iter().cloned().collect::<Option<Vec<String>>>() {
                        return Ok(Some(Rendezvous { peers, secret: g.secret.clone(), nccl_id: g.nccl_id.clone() }));
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Keeps log lines a lease holder forwarded (each line cut to the limit, at most 1,000 per call).
    pub fn append_logs(&self, worker_id: &str, task_id: &str, attempt: u32, lines: Vec<(i64, String, String)>) -> Result<(), CoreError> {
        if lines.len() > 1000 {
            return Err(CoreError::BadRequest(format!("{} log lines in one call, more than 1000", lines.len())));
        }
        let records: Vec<LogRecord> = lines
            .into_iter()
            .map(|(unix_ms, level, mut message)| {
                if message.len() > self.limits.max_log_line_bytes {
                    let mut cut = self.limits.max_log_line_bytes;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                }
                LogRecord { id: 0, task_id: task_id.to_string(), attempt, unix_ms, level, message }
            })
            .collect();
        let mut inner = self.lock();
        inner.scheduler.check_lease(worker_id, task_id, attempt)?;
        inner.store.append_logs(&records)?;
        Ok(())
    }

    /// Log lines of a sweep, or of one task, after `after_id`.
    pub fn logs(&self, sweep_id: &str, task_id: Option<&str>, after_id: i64) -> Result<Vec<LogRecord>, CoreError> {
        let inner = self.lock();
        if inner.store.sweep(sweep_id)?.is_none() {
            return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
        }
        Ok(inner.store.logs(sweep_id, task_id, after_id, 5000)?)
    }

    /// Records epochs reported by the lease holder.
    pub fn report_metrics(&self, worker_id: &str, task_id: &str, attempt: u32, epochs: &[EpochRecord]) -> Result<(), CoreError> {
        let mut inner = self.lock();
        inner.scheduler.check_lease(worker_id, task_id, attempt)?;
        inner.store.record_metrics(task_id, epochs)?;
        Ok(())
    }

    /// Records a checkpoint (already uploaded as a blob) of the lease holder.
    pub fn attach_checkpoint(&self, worker_id: &str, record: CheckpointRecord) -> Result<(), CoreError> {
        if self.blobs.size(&record.blob.sha256) != Some(record.blob.size) {
            return Err(CoreError::BadRequest(format!("checkpoint blob {} was not uploaded", record.blob.sha256)));
        }
        let inner = self.lock();
        inner.scheduler.check_lease(worker_id, &record.task_id, record.attempt)?;
        inner.store.record_checkpoint(&record)?;
        Ok(())
    }

    /// Records an artifact (already uploaded as a blob) of the lease holder.
    pub fn attach_artifact(&self, worker_id: &str, attempt: u32, record: ArtifactRecord) -> Result<(), CoreError> {
        if self.blobs.size(&record.blob.sha256) != Some(record.blob.size) {
            return Err(CoreError::BadRequest(format!("artifact blob {} was not uploaded", record.blob.sha256)));
        }
        if record.name.is_empty() || record.name.len() > self.limits.max_name_bytes {
            return Err(CoreError::BadRequest(format!("an artifact name has 1 to {} bytes", self.limits.max_name_bytes)));
        }
        let inner = self.lock();
        inner.scheduler.check_lease(worker_id, &record.task_id, attempt)?;
        inner.store.record_artifact(&record)?;
        Ok(())
    }

    /// The lease holder finished the task.
    pub fn complete(&self, worker_id: &str, task_id: &str, attempt: u32) -> Result<(), CoreError> {
        let mut inner = self.lock();
        let now = self.now();
        inner.scheduler.complete(worker_id, task_id, attempt, now)?;
        let queued = self.persist_and_advance(&mut inner, &[task_id.to_string()])?;
        drop(inner);
        tracing::info!(task = %task_id, worker = %worker_id, "task succeeded");
        if queued {
            self.work_available.notify_waiters();
        }
        Ok(())
    }

    /// The lease holder reports a failure.
    pub fn fail(&self, worker_id: &str, task_id: &str, attempt: u32, kind: FailureKind, error: &str) -> Result<(), CoreError> {
        let mut inner = self.lock();
        let now = self.now();
        let retry = inner.scheduler.fail(worker_id, task_id, attempt, kind, error, now)?;
        self.persist_and_advance(&mut inner, &[task_id.to_string()])?;
        drop(inner);
        tracing::warn!(task = %task_id, worker = %worker_id, ?kind, ?retry, error, "task failed");
        self.work_available.notify_waiters();
        Ok(())
    }

    /// Lapses overdue leases (requeueing or failing their tasks); call periodically.
    pub fn expire_leases(&self) -> Result<(), CoreError> {
        let mut inner = self.lock();
        let now = self.now();
        let lapsed = inner.scheduler.expire(now);
        if lapsed.is_empty() {
            return Ok(());
        }
        self.metrics.leases_expired.inc_by(lapsed.len() as u64);
        let changed: Vec<String> = lapsed.iter().map(|(id, _)| id.clone()).collect();
        self.persist_and_advance(&mut inner, &changed)?;
        drop(inner);
        for (task, retry) in lapsed {
            tracing::warn!(%task, ?retry, "lease lapsed");
        }
        self.work_available.notify_waiters();
        Ok(())
    }

    /// Cancels a sweep's unfinished tasks; returns how many.
    pub fn cancel(&self, sweep_id: &str) -> Result<u32, CoreError> {
        let mut inner = self.lock();
        if inner.store.sweep(sweep_id)?.is_none() {
            return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
        }
        let changed = inner.scheduler.cancel_sweep(sweep_id);
        self.persist(&mut inner, &changed)?;
        inner.store.set_cancelled(sweep_id, true)?;
        Ok(changed.len() as u32)
    }

    /// Queues a sweep's failed and cancelled trials again (each with its full attempt budget);
    /// returns how many. When none is left to retry but a stage is missing, plans it.
    pub fn retry(&self, sweep_id: &str) -> Result<u32, CoreError> {
        let mut inner = self.lock();
        if inner.store.sweep(sweep_id)?.is_none() {
            return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
        }
        let budgets: std::collections::HashMap<String, u32> =
            inner.store.tasks(Some(sweep_id))?.into_iter().map(|t| (t.entry.id, t.spec.max_attempts)).collect();
        let changed = inner.scheduler.retry_sweep(sweep_id, |id| budgets.get(id).copied().unwrap_or(1));
        inner.store.set_cancelled(sweep_id, false)?;
        self.persist(&mut inner, &changed)?;
        if changed.is_empty() {
            self.advance(&mut inner, sweep_id)?;
        }
        drop(inner);
        tracing::info!(sweep = %sweep_id, requeued = changed.len(), "sweep retried");
        self.work_available.notify_waiters();
        Ok(changed.len() as u32)
    }

    /// Registered workers: (id, name, seconds since last heard of, leased task).
    pub fn workers(&self) -> Vec<(String, String, f64, Option<String>)> {
        let now = self.now();
        let inner = self.lock();
        let leases = inner.scheduler.leases_by_worker();
        inner
            .scheduler
            .workers()
            .into_iter()
            .map(|(id, name, seen)| {
                let task = leases.get(&id).cloned();
                (id, name, now.saturating_sub(seen) as f64 / 1000.0, task)
            })
            .collect()
    }

    fn summarize(record: SweepRecord, tasks: &[StoredTask]) -> SweepSummary {
        let mut counts = Counts::default();
        for task in tasks {
            counts.add(task.entry.state);
        }
        let state = counts.state(record.cancelled);
        SweepSummary { record, counts, state }
    }

    /// Every sweep's summary, oldest first.
    pub fn sweeps(&self) -> Result<Vec<SweepSummary>, CoreError> {
        let inner = self.lock();
        let mut summaries = Vec::new();
        for record in inner.store.sweeps()? {
            let tasks = inner.store.tasks(Some(&record.id))?;
            summaries.push(Self::summarize(record, &tasks));
        }
        Ok(summaries)
    }

    /// One sweep in full.
    pub fn sweep(&self, sweep_id: &str) -> Result<SweepView, CoreError> {
        let inner = self.lock();
        let record = inner.store.sweep(sweep_id)?.ok_or_else(|| CoreError::NotFound(format!("sweep {sweep_id}")))?;
        let stored = inner.store.tasks(Some(sweep_id))?;
        let summary = Self::summarize(record, &stored);
        let mut tasks = Vec::with_capacity(stored.len());
        for task in stored {
            let epochs = inner.store.metrics(&task.entry.id)?;
            let checkpoints = inner.store.checkpoints(&task.entry.id)?;
            let artifacts = inner.store.artifacts(&task.entry.id)?;
            tasks.push(TaskView { task, epochs, checkpoints, artifacts });
        }
        Ok(SweepView { summary, tasks })
    }
}
