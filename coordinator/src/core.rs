//! The coordinator's core: the scheduler and the store behind one lock, with every change
//! committed to SQLite before the caller is answered. The gRPC handlers in [`crate::service`]
//! only convert messages and call in here.
//!
//! Commit or nothing: every change runs through [`Core::change`]. When the store fails to
//! write (a full disk, an I/O error), the scheduler's memory is rebuilt from what the database
//! holds, so nothing is served from a state the database does not have, and the core refuses
//! all further changes (UNAVAILABLE, saying why) until a probe write succeeds again.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::blobs::BlobStore;
use crate::dataset::{self, DatasetError};
use crate::domain::{BlobRef, DatasetSpec, FailureKind, TaskState, TrialSpec};
use crate::events::{Change, ChangeKind, Changes, EpochNotice};
use crate::metrics::CoordinatorMetrics;
use crate::plan;
use crate::scheduler::{Abilities, Lease, Millis, Needs, Refusal, Scheduler, SecretSource, TaskEntry, Timeouts};
use crate::store::{ArtifactRecord, CheckpointRecord, EpochRecord, LogRecord, Store, StoreError, StoredTask, SweepRecord};
use crate::sweep::{SweepError, SweepFile};

mod progress;
mod pruning;

pub use progress::{StageProgressView, SweepProgressView, MAX_RUNNING_SHOWN};

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
    /// A bound on what a caller may send or store was exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// The database cannot be written: the coordinator accepts no changes until it can.
    #[error("the coordinator cannot write its database ({0}); it accepts no work until it can (free disk space on its data dir)")]
    Unwritable(String),
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
    /// Longest log level kept, in bytes (longer ones are cut).
    pub max_log_level_bytes: usize,
    /// Log lines kept per trial (all attempts); later ones are refused.
    pub max_log_lines_per_trial: u64,
    /// Named values one reported epoch may hold.
    pub max_values_per_epoch: usize,
    /// Worker registrations accepted per minute (a token bucket of this size, refilled evenly).
    pub registrations_per_minute: u32,
    /// An upload waiting longer than this for its next chunk is dropped.
    pub upload_idle: Duration,
    /// An upload taking longer than this in all is dropped.
    pub upload_total: Duration,
    /// Most bytes the blob store may hold (none: no quota).
    pub blob_quota_bytes: Option<u64>,
    /// Free disk space an upload must leave on the data dir's filesystem.
    pub blob_reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_trials: crate::sweep::DEFAULT_MAX_TRIALS,
            max_blob_bytes: 4 << 30,
            max_name_bytes: 256,
            max_log_line_bytes: 4096,
            max_log_level_bytes: 16,
            max_log_lines_per_trial: 100_000,
            max_values_per_epoch: 64,
            registrations_per_minute: 600,
            upload_idle: cohort_proto::transfer::DEFAULT_IDLE_TIMEOUT,
            upload_total: cohort_proto::transfer::DEFAULT_TOTAL_TIMEOUT,
            blob_quota_bytes: None,
            blob_reserve_bytes: 1 << 30,
        }
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
    /// Proof of the lease, for every call about the task.
    pub lease_secret: String,
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
    /// Stopped early by `[cv.prune]` (not a failure).
    pub pruned: u32,
}

/// A sweep's overall state, derived from its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepState {
    /// Work remains.
    Running,
    /// Every task succeeded (or was pruned: stopping a losing config early is no failure).
    Succeeded,
    /// Nothing remains and some task failed.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

impl Counts {
    /// Counts from tasks counted by state (as the store groups them).
    pub fn of(states: &[(TaskState, u32)]) -> Self {
        let mut counts = Self::default();
        for &(state, count) in states {
            counts.add(state, count);
        }
        counts
    }

    fn add(&mut self, state: TaskState, count: u32) {
        self.total += count;
        let field = match state {
            TaskState::Queued => &mut self.queued,
            TaskState::Running => &mut self.running,
            TaskState::Succeeded => &mut self.succeeded,
            TaskState::Failed => &mut self.failed,
            TaskState::Cancelled => &mut self.cancelled,
            TaskState::Pruned => &mut self.pruned,
        };
        *field += count;
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
    /// Why it is not making progress now (a queued task's wait, a running task's silent
    /// worker), if it is not.
    pub waiting: Option<String>,
    /// The workers holding it (the last ones, after), by the names they registered with where
    /// the coordinator knows them, else by id.
    pub worker_names: Vec<String>,
    /// When its latest attempt started, Unix ms (0: not yet).
    pub started_ms: i64,
    /// When it ended, Unix ms (0: not yet).
    pub ended_ms: i64,
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
    /// Each sweep's latest planned stage, so that a task's end is checked against its stage
    /// without reading the sweep's task rows.
    stages: HashMap<String, LatestStage>,
    /// Why the store cannot be written, while it cannot: every change is refused meanwhile.
    unwritable: Option<String>,
    /// Log lines stored per task (counted from the database the first time a task logs).
    log_lines: HashMap<String, u64>,
    /// Registrations left in the current bucket, and when it was last refilled.
    registrations: (f64, Instant),
    /// Each sweep's `[cv.prune]`, read once per sweep (early stopping, [`pruning`]).
    pruning: pruning::PruneSettings,
}

impl Inner {
    /// Rebuilds the scheduler and the stage index from the database: after a failed write, so
    /// that memory holds exactly what was committed. Running tasks keep their (renewed) leases
    /// and secrets, so their workers re-attach as after a restart.
    fn reload(&mut self, timeouts: Timeouts, now: Millis) -> Result<(), StoreError> {
        let tasks = self.store.tasks(None)?;
        let mut scheduler = Scheduler::new(timeouts, lease_secrets());
        self.stages = latest_stages(&tasks);
        for task in tasks {
            let needs = task_needs(&task.spec);
            scheduler.insert(task.entry.with_needs(needs), now);
        }
        self.scheduler = scheduler;
        Ok(())
    }
}

/// What a worker must offer to run the trial: a CUDA device for an NCCL gang. Derived from
/// the spec whenever a task enters the scheduler (planned, or reloaded from the store).
fn task_needs(spec: &TrialSpec) -> Needs {
    Needs { cuda: spec.replicas > 1 && spec.collective_backend == "nccl", commands: spec.kind == crate::domain::TrialKind::Command }
}

/// A registered worker as `workers` and the console show it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// The name it registered with.
    pub name: String,
    /// Seconds since it was last heard from.
    pub last_seen_secs: f64,
    /// Its device ("cpu", "cuda:0").
    pub device: String,
    /// Whether it runs command trials.
    pub allow_commands: bool,
    /// The task it works on, with its sweep and trial name.
    pub task: Option<HeldTask>,
    /// Seconds of its life in each phase, as of its last heartbeat.
    pub phases: Vec<(String, f64)>,
}

/// The task a worker holds, named.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldTask {
    /// Task id.
    pub task_id: String,
    /// Its sweep.
    pub sweep_id: String,
    /// Its trial name ("cv/c3/f1").
    pub trial_name: String,
}

/// Lease secrets: 128 random bits each.
fn lease_secrets() -> SecretSource {
    SecretSource::new(|| random_hex(16))
}

/// A sweep's latest planned stage.
#[derive(Debug, Clone, PartialEq)]
struct LatestStage {
    /// Its name.
    name: String,
    /// The orders of its tasks: a stage's tasks are planned together and numbered on
    /// contiguously.
    orders: Range<u64>,
}

impl LatestStage {
    /// The stage `tasks` (planned together, in order) make up.
    fn of(tasks: &[StoredTask]) -> Option<Self> {
        let first = tasks.first()?;
        let last = tasks.last()?;
        Some(Self { name: first.spec.stage.clone(), orders: first.entry.order..last.entry.order + 1 })
    }
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
    timeouts: Timeouts,
    metrics: CoordinatorMetrics,
    inner: Mutex<Inner>,
    blobs: BlobStore,
    work_available: Notify,
    gatherings: Mutex<HashMap<String, Gathering>>,
    gathered: Notify,
    started: Instant,
    /// Change notices for live views (the web console).
    changes: Changes,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("blobs", &self.blobs).finish_non_exhaustive()
    }
}

/// Each sweep's latest stage from every stored task (in scheduling order): the tasks that
/// share the last task's stage.
fn latest_stages(tasks: &[StoredTask]) -> HashMap<String, LatestStage> {
    let mut latest: HashMap<String, LatestStage> = HashMap::new();
    for task in tasks {
        let order = task.entry.order;
        match latest.get_mut(&task.entry.sweep_id) {
            Some(stage) if stage.name == task.spec.stage => stage.orders.end = order + 1,
            _ => {
                latest.insert(task.entry.sweep_id.clone(), LatestStage { name: task.spec.stage.clone(), orders: order..order + 1 });
            }
        }
    }
    latest
}

/// Task rows for newly planned trials, numbered on from `first_index` within the sweep.
fn new_tasks(sweep_id: &str, sweep_seq: u64, first_index: usize, trials: Vec<TrialSpec>) -> Vec<StoredTask> {
    trials
        .into_iter()
        .enumerate()
        .map(|(offset, spec)| {
            let index = first_index + offset;
            let entry =
                TaskEntry::queued(format!("{sweep_id}.t{index}"), sweep_id.to_string(), (sweep_seq << 20) | index as u64, spec.max_attempts, spec.replicas)
                    .with_epochs(spec.config.epochs)
                    .with_needs(task_needs(&spec));
            StoredTask { entry, spec }
        })
        .collect()
}

/// Checks a parsed sweep file against the limits and its dataset's files (`files` name their
/// blobs, `local` where their bytes lie) and plans its first stage: returns its trials and every
/// stage as (name, trials, description). Pure but for reading the dataset's files: what
/// `submit` checks before it stores a sweep, and all that `submit --dry-run` does, on the
/// user's machine, with no coordinator.
pub fn check_and_plan(
    sweep: &SweepFile,
    source_name: &str,
    files: Vec<(String, BlobRef)>,
    local: &[(String, PathBuf)],
    limits: &Limits,
) -> Result<(Vec<TrialSpec>, Vec<(String, u32, String)>), CoreError> {
    check_and_plan_with_command(sweep, source_name, files, local, Vec::new(), limits)
}

/// [`check_and_plan`] for a sweep that may be a command sweep: `command_files` are its
/// `[command] files` (name → blob; empty for the built-in recipes).
pub fn check_and_plan_with_command(
    sweep: &SweepFile,
    source_name: &str,
    files: Vec<(String, BlobRef)>,
    local: &[(String, PathBuf)],
    command_files: Vec<(String, BlobRef)>,
    limits: &Limits,
) -> Result<(Vec<TrialSpec>, Vec<(String, u32, String)>), CoreError> {
    sweep.check_trial_limit(source_name, limits.max_trials)?;
    sweep.check_name_limit(source_name, limits.max_name_bytes)?;
    if sweep.is_command() {
        check_command_files(&command_files, limits.max_name_bytes)?;
    } else if !command_files.is_empty() {
        return Err(CoreError::BadRequest("command files come only with a command sweep ([model] kind = \"command\")".into()));
    }
    if sweep.is_command() && !sweep.has_dataset() {
        if !files.is_empty() {
            return Err(CoreError::BadRequest("dataset files without a [dataset] section".into()));
        }
        let trials = crate::command::initial(sweep, DatasetSpec::default(), &command_files);
        return Ok((trials, plan::describe_stages(sweep)));
    }
    dataset::check_names(files.iter().map(|(name, _)| name.as_str()), limits.max_name_bytes)?;
    match sweep.dataset.format.as_str() {
        // A command's program reads its dataset as files: nothing to check but the names.
        "files" => {}
        "idx" if sweep.is_command() => {
            dataset::check_idx(local)?;
        }
        "idx" => sweep.check_against_dataset(source_name, dataset::check_idx(local)?)?,
        "nifti" => dataset::check_nifti(local)?,
        _ => dataset::check_image_folder(local)?,
    }
    let dataset = DatasetSpec {
        format: sweep.dataset.format.clone(),
        files,
        train_limit: sweep.dataset.train_limit,
        test_limit: sweep.dataset.test_limit,
        image_size: sweep.dataset.image_size,
        min_foreground: sweep.dataset.min_foreground,
    };
    if sweep.is_command() {
        return Ok((crate::command::initial(sweep, dataset, &command_files), plan::describe_stages(sweep)));
    }
    Ok((plan::initial(sweep, dataset), plan::describe_stages(sweep)))
}

/// Checks a command sweep's files: plain relative names within the name limit, and their count
/// and total size within [`crate::command::MAX_COMMAND_FILES`] and
/// [`crate::command::MAX_COMMAND_FILES_BYTES`].
fn check_command_files(files: &[(String, BlobRef)], max_name_bytes: usize) -> Result<(), CoreError> {
    use crate::command::{MAX_COMMAND_FILES, MAX_COMMAND_FILES_BYTES};
    if files.len() > MAX_COMMAND_FILES {
        return Err(CoreError::LimitExceeded(format!("command.files: {} files, more than the limit of {MAX_COMMAND_FILES}", files.len())));
    }
    let total: u64 = files.iter().map(|(_, blob)| blob.size).sum();
    if total > MAX_COMMAND_FILES_BYTES {
        return Err(CoreError::LimitExceeded(format!("command.files: {total} bytes, more than the limit of {MAX_COMMAND_FILES_BYTES}")));
    }
    for (name, _) in files {
        if name.len() > max_name_bytes || !cohort_proto::transfer::is_plain_relative_name(name) {
            return Err(CoreError::BadRequest(format!("command.files: file name {name:?} is not a plain relative path of at most {max_name_bytes} bytes")));
        }
    }
    Ok(())
}

/// A dry run's answer: the planned trials under placeholder task ids, nothing stored.
pub fn dry_run_plan(trials: Vec<TrialSpec>, stages: Vec<(String, u32, String)>) -> Submitted {
    let planned = new_tasks("dry-run", 0, 0, trials).into_iter().map(|t| (t.entry.id, t.spec)).collect();
    Submitted { sweep_id: None, planned, stages }
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
        // Uploads cut off by a crash left their partial files behind; no upload is live yet.
        let blobs = BlobStore::new(config.data_dir.join("blobs"));
        let removed = blobs.remove_partials().map_err(|e| CoreError::Io(format!("removing partial uploads: {e}")))?;
        if removed > 0 {
            tracing::info!(removed, "partial uploads from before the restart removed");
        }
        let store = Store::open(&config.data_dir.join("state.db"))?;
        let mut inner = Inner {
            scheduler: Scheduler::new(config.timeouts, lease_secrets()),
            store,
            stages: HashMap::new(),
            unwritable: None,
            log_lines: HashMap::new(),
            registrations: (f64::from(config.limits.registrations_per_minute), Instant::now()),
            pruning: HashMap::new(),
        };
        inner.reload(config.timeouts, 0)?;
        Ok(Self {
            limits: config.limits,
            timeouts: config.timeouts,
            metrics: CoordinatorMetrics::new(),
            inner: Mutex::new(inner),
            blobs,
            work_available: Notify::new(),
            gatherings: Mutex::new(HashMap::new()),
            gathered: Notify::new(),
            started: Instant::now(),
            changes: Changes::default(),
        })
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs a change under the lock, all or nothing. Refused while the store cannot be written.
    /// When the change fails in the database, memory is rolled back to what the database holds
    /// and further changes are refused until [`Core::expire_leases`]'s probe write succeeds.
    fn change<T>(&self, change: impl FnOnce(&mut Inner) -> Result<T, CoreError>) -> Result<T, CoreError> {
        let mut inner = self.lock();
        if let Some(reason) = &inner.unwritable {
            return Err(CoreError::Unwritable(reason.clone()));
        }
        match change(&mut inner) {
            Err(CoreError::Store(StoreError::Sqlite(error))) => {
                let reason = error.to_string();
                tracing::error!(error = %reason, "database write failed: rolling memory back to the database and refusing work until it can be written");
                inner.unwritable = Some(reason.clone());
                inner.log_lines.clear();
                let now = self.now();
                if let Err(error) = inner.reload(self.timeouts, now) {
                    tracing::error!(%error, "reloading the database failed too");
                }
                Err(CoreError::Unwritable(reason))
            }
            other => other,
        }
    }

    /// Whether the store can be written (false after a failed write, until a probe succeeds).
    pub fn writable(&self) -> bool {
        self.lock().unwritable.is_none()
    }

    /// While the store is unwritable, tries a write; on success reloads memory from the
    /// database (leases renewed from now) and accepts work again.
    fn probe_store(&self, inner: &mut Inner) {
        if inner.unwritable.is_none() {
            return;
        }
        if let Err(error) = inner.store.probe() {
            inner.unwritable = Some(error.to_string());
            return;
        }
        let now = self.now();
        match inner.reload(self.timeouts, now) {
            Ok(()) => {
                inner.unwritable = None;
                tracing::info!("database writable again: accepting work");
            }
            Err(error) => inner.unwritable = Some(error.to_string()),
        }
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

    /// Change notices, published after each committed change (for live views).
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Runs a read-only query on the store under the lock (for views the gRPC API lacks).
    pub fn read<T>(&self, query: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, CoreError> {
        Ok(query(&self.lock().store)?)
    }

    /// Why each unfinished task of a sweep is not making progress, by task id (see
    /// [`Scheduler::waiting`]; tasks that are fine are left out).
    pub fn waiting_reasons(&self, sweep_id: &str) -> HashMap<String, String> {
        let now = self.now();
        self.lock().scheduler.waiting(sweep_id, now)
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// How often workers should heartbeat: a quarter of a lease, so that a lease survives
    /// three lost or late beats.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis((self.timeouts.lease_ms / 4).clamp(100, 5_000))
    }

    /// Validates and plans a sweep; unless `dry_run`, stores it and queues its first stage.
    pub fn submit(
        &self,
        source: &str,
        source_name: &str,
        files: Vec<(String, BlobRef)>,
        dry_run: bool,
    ) -> Result<Submitted, CoreError> {
        self.submit_with_command(source, source_name, files, Vec::new(), dry_run)
    }

    /// [`Core::submit`] with a command sweep's `[command] files` (already uploaded blobs).
    pub fn submit_with_command(
        &self,
        source: &str,
        source_name: &str,
        files: Vec<(String, BlobRef)>,
        command_files: Vec<(String, BlobRef)>,
        dry_run: bool,
    ) -> Result<Submitted, CoreError> {
        let sweep = SweepFile::parse(source, source_name)?;
        for (name, blob) in &files {
            if self.blobs.size(&blob.sha256) != Some(blob.size) {
                return Err(CoreError::BadRequest(format!("dataset file {name} ({}) was not uploaded", blob.sha256)));
            }
        }
        for (name, blob) in &command_files {
            if self.blobs.size(&blob.sha256) != Some(blob.size) {
                return Err(CoreError::BadRequest(format!("command file {name} ({}) was not uploaded", blob.sha256)));
            }
        }
        let local: Vec<(String, PathBuf)> =
            files.iter().map(|(name, blob)| (name.clone(), self.blobs.path(&blob.sha256).expect("checked present"))).collect();
        let (trials, stages) = check_and_plan_with_command(&sweep, source_name, files, &local, command_files, &self.limits)?;
        if dry_run {
            return Ok(dry_run_plan(trials, stages));
        }
        let (sweep_id, planned) = self.change(|inner| {
            let seq = inner.store.next_sweep_seq()?;
            let sweep_id = format!("s{seq}-{}", random_hex(3));
            let tasks = new_tasks(&sweep_id, seq, 0, trials);
            let record =
                SweepRecord { id: sweep_id.clone(), seq, name: sweep.name, source: source.to_string(), created_ms: unix_ms(), cancelled: false };
            inner.store.insert_sweep(&record, &tasks)?;
            if let Some(stage) = LatestStage::of(&tasks) {
                inner.stages.insert(sweep_id.clone(), stage);
            }
            let now = self.now();
            // The specs move into the answer rather than being copied: a sweep may hold 100,000.
            let mut planned = Vec::with_capacity(tasks.len());
            for task in tasks {
                planned.push((task.entry.id.clone(), task.spec));
                inner.scheduler.insert(task.entry, now);
            }
            Ok((sweep_id, planned))
        })?;
        self.work_available.notify_waiters();
        self.changes.publish(Change::sweep(&sweep_id, ChangeKind::Submitted));
        tracing::info!(sweep = %sweep_id, "sweep submitted");
        Ok(Submitted { sweep_id: Some(sweep_id), planned, stages })
    }

    fn persist(inner: &mut Inner, changed: &[String]) -> Result<(), CoreError> {
        let Inner { scheduler, store, .. } = inner;
        store.save_tasks(changed.iter().filter_map(|id| scheduler.task(id)))?;
        Ok(())
    }

    /// Persists the changed tasks, then plans the next stage of every sweep in which one of
    /// them ended. Returns whether new tasks were queued.
    fn persist_and_advance(&self, inner: &mut Inner, changed: &[String]) -> Result<bool, CoreError> {
        // Early stopping: configs the race drops now are saved with the endings that decided it.
        let pruned = Self::race_after(inner, changed)?;
        let changed = &[changed, pruned.as_slice()].concat();
        Self::persist(inner, changed)?;
        for task_id in &pruned {
            self.changes.publish(Change::task(task_id, ChangeKind::State));
        }
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
        // Most trials end while others of their stage still run: settle that in memory, before
        // reading the sweep's rows (plan::next_stage would answer Wait all the same).
        let latest = inner.stages.get(sweep_id).cloned();
        if latest.as_ref().is_some_and(|stage| inner.scheduler.any_unfinished(stage.orders.clone())) {
            return Ok(false);
        }
        let Some(record) = inner.store.sweep(sweep_id)? else {
            return Ok(false);
        };
        if record.cancelled {
            return Ok(false);
        }
        let sweep = SweepFile::parse(&record.source, &record.name)
            .map_err(|e| CoreError::Io(format!("stored sweep {sweep_id} no longer parses: {e}")))?;
        // The sweep ends with a stage that has no successor, whatever its outcomes: no need to
        // read them (a stage may hold 100,000 trials).
        if latest.is_some_and(|stage| !plan::has_next_stage(&sweep, &stage.name)) {
            return Ok(false);
        }
        let stored = inner.store.tasks(Some(sweep_id))?;
        // Two queries for the whole sweep, not two per trial.
        let mut min_val_mse = inner.store.min_metric_by_task(sweep_id, sweep.selection_metric())?;
        let mut final_checkpoints = inner.store.final_checkpoints(sweep_id)?;
        let outcomes: Vec<plan::Outcome<'_>> = stored
            .iter()
            .map(|task| plan::Outcome {
                spec: &task.spec,
                state: task.entry.state,
                min_val_mse: min_val_mse.remove(&task.entry.id),
                final_checkpoint: final_checkpoints.remove(&task.entry.id),
            })
            .collect();
        let plan::Next::Start(trials) = plan::next_stage(&sweep, &outcomes) else {
            return Ok(false);
        };
        let stage = trials.first().map(|t| t.stage.clone()).unwrap_or_default();
        let tasks = new_tasks(sweep_id, record.seq, stored.len(), trials);
        inner.store.insert_tasks(&tasks)?;
        if let Some(stage) = LatestStage::of(&tasks) {
            inner.stages.insert(sweep_id.to_string(), stage);
        }
        let now = self.now();
        for task in tasks {
            inner.scheduler.insert(task.entry, now);
        }
        tracing::info!(sweep = %sweep_id, %stage, "next stage queued");
        Ok(true)
    }

    /// Registers a worker: mints its id and session, re-attaches the tasks whose leases it
    /// proves, and returns (worker id, session, tasks to abandon). Registrations are rate
    /// limited: a flood of fake workers is refused, not remembered.
    pub fn register(&self, name: &str, device: &str, abilities: Abilities, running: &[Lease]) -> Result<(String, String, Vec<String>), CoreError> {
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
    pub fn heartbeat(&self, worker_id: &str, session: &str, running: &[Lease], phases: Vec<(String, f64)>) -> Result<Vec<String>, CoreError> {
        let now = self.now();
        let mut inner = self.lock();
        let abandon = inner.scheduler.heartbeat(worker_id, session, now, running)?;
        inner.scheduler.note_phases(worker_id, phases);
        Ok(abandon)
    }

    /// Leases the next task to the worker, waiting up to `wait` for one to appear.
    pub async fn acquire(&self, worker_id: &str, session: &str, wait: Duration) -> Result<Option<Dispatch>, CoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.work_available.notified();
            if let Some(dispatch) = self.try_acquire(worker_id, session)? {
                return Ok(Some(dispatch));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    fn try_acquire(&self, worker_id: &str, session: &str) -> Result<Option<Dispatch>, CoreError> {
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
        // The lease is committed: parsing the spec needs no lock.
        let spec = Store::parse_spec(&spec)?;
        self.changes.publish(Change::task(&lease.task_id, ChangeKind::State));
        tracing::info!(task = %lease.task_id, worker = %worker_id, attempt = lease.attempt, resume = resume_from.is_some(), "task leased");
        Ok(Some(Dispatch {
            task_id: lease.task_id,
            sweep_id,
            attempt: lease.attempt,
            rank: lease.rank,
            world: lease.world,
            spec,
            resume_from,
            lease_secret: lease.secret,
        }))
    }

    /// Records a gang member's collective address and waits up to `wait` for the others; returns
    /// the rendezvous once every rank of the attempt has announced itself.
    #[allow(clippy::too_many_arguments)]
    pub async fn rendezvous(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        lease_secret: &str,
        address: &str,
        nccl_id: Vec<u8>,
        wait: Duration,
    ) -> Result<Option<Rendezvous>, CoreError> {
        if address.is_empty() || address.len() > 256 {
            return Err(CoreError::BadRequest("a collective address is host:port".into()));
        }
        if nccl_id.len() > 1024 {
            return Err(CoreError::BadRequest("an NCCL unique id has 128 bytes".into()));
        }
        let (rank, world) = {
            let inner = self.lock();
            let rank = inner.scheduler.member_rank(worker_id, task_id, attempt, lease_secret)?;
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

    /// Forgets a finished task's rendezvous.
    fn forget_gathering(&self, task_id: &str) {
        self.gatherings.lock().unwrap_or_else(|p| p.into_inner()).remove(task_id);
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

    /// Log lines of a sweep, or of one task, after `after_id`: at most `max_lines`, and no more
    /// than about `max_bytes` of text (the reply stays under the message limit; ask again after
    /// the last id for more).
    pub fn logs(&self, sweep_id: &str, task_id: Option<&str>, after_id: i64, max_lines: usize, max_bytes: usize) -> Result<Vec<LogRecord>, CoreError> {
        let inner = self.lock();
        if inner.store.sweep(sweep_id)?.is_none() {
            return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
        }
        let mut lines = inner.store.logs(sweep_id, task_id, after_id, max_lines)?;
        let mut total = 0;
        let keep = lines
            .iter()
            .position(|line| {
                total += line.message.len() + line.level.len() + line.task_id.len() + 32;
                total > max_bytes
            })
            .unwrap_or(lines.len())
            .max(1);
        lines.truncate(keep);
        Ok(lines)
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
            return Err(CoreError::LimitExceeded(format!("epoch {} reports {} values, more than {most} (--max-values-per-epoch)", epoch.epoch, epoch.values.len())));
        }
        for (name, value) in &epoch.values {
            if name.is_empty() || name.len() > self.limits.max_name_bytes {
                return Err(CoreError::BadRequest(format!("a metric name has 1 to {} bytes", self.limits.max_name_bytes)));
            }
            if !value.is_finite() {
                return Err(CoreError::BadRequest(format!("metric {name} of epoch {} is {value}: only finite values are recorded", epoch.epoch)));
            }
        }
        if !epoch.seconds.is_finite() || epoch.seconds < 0.0 {
            return Err(CoreError::BadRequest(format!("epoch {} took {} seconds: a duration is finite and not negative", epoch.epoch, epoch.seconds)));
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
            self.forget_gathering(lease.task_id);
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
        self.forget_gathering(lease.task_id);
        self.changes.publish(Change::task(lease.task_id, ChangeKind::State));
        tracing::warn!(task = %lease.task_id, worker = %lease.worker_id, ?kind, ?retry, error, "task failed");
        self.work_available.notify_waiters();
        Ok(())
    }

    /// Lapses overdue leases (requeueing or failing their tasks); call periodically. While the
    /// store cannot be written, probes it instead and changes nothing.
    pub fn expire_leases(&self) -> Result<(), CoreError> {
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

    /// Cancels a sweep's unfinished tasks; returns how many. A sweep that has already ended
    /// keeps its outcome: cancelling it changes nothing.
    pub fn cancel(&self, sweep_id: &str) -> Result<u32, CoreError> {
        self.change(|inner| {
            let Some(record) = inner.store.sweep(sweep_id)? else {
                return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
            };
            if record.cancelled {
                return Ok(0);
            }
            let changed = inner.scheduler.cancel_sweep(sweep_id);
            if changed.is_empty() {
                return Ok(0);
            }
            Self::persist(inner, &changed)?;
            inner.store.set_cancelled(sweep_id, true)?;
            Ok(changed.len() as u32)
        })
        .inspect(|_| self.changes.publish(Change::sweep(sweep_id, ChangeKind::State)))
    }

    /// Queues a sweep's failed and cancelled trials again (each with its full attempt budget);
    /// returns how many. When none is left to retry but a stage is missing, plans it.
    pub fn retry(&self, sweep_id: &str) -> Result<u32, CoreError> {
        let requeued = self.change(|inner| {
            if inner.store.sweep(sweep_id)?.is_none() {
                return Err(CoreError::NotFound(format!("sweep {sweep_id}")));
            }
            let budgets: std::collections::HashMap<String, u32> =
                inner.store.tasks(Some(sweep_id))?.into_iter().map(|t| (t.entry.id, t.spec.max_attempts)).collect();
            let changed = inner.scheduler.retry_sweep(sweep_id, |id| budgets.get(id).copied().unwrap_or(1));
            inner.store.set_cancelled(sweep_id, false)?;
            Self::persist(inner, &changed)?;
            if changed.is_empty() {
                self.advance(inner, sweep_id)?;
            }
            Ok(changed.len() as u32)
        })?;
        self.changes.publish(Change::sweep(sweep_id, ChangeKind::State));
        tracing::info!(sweep = %sweep_id, requeued, "sweep retried");
        self.work_available.notify_waiters();
        Ok(requeued)
    }

    /// Registered workers, with the trial each works on.
    pub fn workers(&self) -> Result<Vec<WorkerView>, CoreError> {
        let now = self.now();
        let inner = self.lock();
        let leases = inner.scheduler.leases_by_worker();
        let mut views = Vec::new();
        for worker in inner.scheduler.workers() {
            let task = match leases.get(&worker.id) {
                Some(task_id) => {
                    let sweep_id = inner.scheduler.task(task_id).map_or_else(String::new, |t| t.sweep_id.clone());
                    Some(Self::held_task(&inner.store, task_id, sweep_id)?)
                }
                None => None,
            };
            views.push(WorkerView {
                last_seen_secs: now.saturating_sub(worker.last_seen) as f64 / 1000.0,
                allow_commands: worker.abilities.commands,
                id: worker.id,
                name: worker.name,
                device: worker.device,
                task,
                phases: worker.phases,
            });
        }
        Ok(views)
    }

    /// A held task with its sweep and trial name (the id stands in for a name it cannot read).
    fn held_task(store: &Store, task_id: &str, sweep_id: String) -> Result<HeldTask, CoreError> {
        let row = store.trial_row(task_id)?;
        let spec = row.and_then(|row| serde_json::from_str::<TrialSpec>(&row.spec).ok());
        let trial_name = spec.map_or_else(|| task_id.to_string(), |spec| spec.name);
        Ok(HeldTask { task_id: task_id.to_string(), sweep_id, trial_name })
    }

    fn summarize(record: SweepRecord, states: &[(TaskState, u32)]) -> SweepSummary {
        let counts = Counts::of(states);
        let state = counts.state(record.cancelled);
        SweepSummary { record, counts, state }
    }

    /// Every sweep's summary, oldest first: two queries, the tasks counted in SQL.
    pub fn sweeps(&self) -> Result<Vec<SweepSummary>, CoreError> {
        let inner = self.lock();
        let mut counts = inner.store.state_counts()?;
        let records = inner.store.sweeps()?;
        Ok(records
            .into_iter()
            .map(|record| {
                let states = counts.remove(&record.id).unwrap_or_default();
                Self::summarize(record, &states)
            })
            .collect())
    }

    /// One sweep in full.
    pub fn sweep(&self, sweep_id: &str) -> Result<SweepView, CoreError> {
        self.sweep_page(sweep_id, 0, usize::MAX)
    }

    /// One sweep with its tasks `offset..offset + limit` in plan order (the summary counts them
    /// all): replies stay bounded however large the sweep, and take seven queries however many
    /// tasks it has.
    pub fn sweep_page(&self, sweep_id: &str, offset: usize, limit: usize) -> Result<SweepView, CoreError> {
        let inner = self.lock();
        let record = inner.store.sweep(sweep_id)?.ok_or_else(|| CoreError::NotFound(format!("sweep {sweep_id}")))?;
        let summary = Self::summarize(record, &inner.store.sweep_state_counts(sweep_id)?);
        let mut page = inner.store.task_page(sweep_id, offset, limit)?;
        let mut waiting = match (page.tasks.first(), page.tasks.last()) {
            (Some(first), Some(last)) => inner.scheduler.waiting_in(sweep_id, first.entry.order..=last.entry.order, self.now()),
            _ => HashMap::new(),
        };
        let mut tasks = Vec::with_capacity(page.tasks.len());
        for task in std::mem::take(&mut page.tasks) {
            let id = &task.entry.id;
            let worker_names = inner.scheduler.member_names(&task.entry);
            let (started_ms, ended_ms) = page.times.get(id).copied().unwrap_or_default();
            tasks.push(TaskView {
                epochs: page.epochs.remove(id).unwrap_or_default(),
                checkpoints: page.checkpoints.remove(id).unwrap_or_default(),
                artifacts: page.artifacts.remove(id).unwrap_or_default(),
                waiting: waiting.remove(id),
                worker_names,
                started_ms,
                ended_ms,
                task,
            });
        }
        Ok(SweepView { summary, tasks })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SWEEP: &str = r#"
name = "stages"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 2
epochs = 1
batch_size = 16
[cv.grid]
lr = [1e-3, 1e-4]
[final]
epochs = 1
"#;

    pub(crate) fn idx_file(magic: u32, dims: &[u32]) -> Vec<u8> {
        let items: u32 = dims.iter().product();
        let mut bytes: Vec<u8> = std::iter::once(magic).chain(dims.iter().copied()).flat_map(u32::to_be_bytes).collect();
        bytes.resize(bytes.len() + items as usize, 0);
        bytes
    }

    /// Opens a core on `dir`, storing a 64-image IDX dataset in its blob store.
    pub(crate) fn open_with_dataset(dir: &std::path::Path) -> (Core, Vec<(String, BlobRef)>) {
        let config = CoreConfig { data_dir: dir.to_path_buf(), timeouts: Timeouts::default(), limits: Limits::default() };
        let core = Core::open(&config).unwrap();
        let mut files = Vec::new();
        for (name, bytes) in [
            ("train-images-idx3-ubyte", idx_file(0x803, &[64, 28, 28])),
            ("train-labels-idx1-ubyte", idx_file(0x801, &[64])),
            ("t10k-images-idx3-ubyte", idx_file(0x803, &[16, 28, 28])),
            ("t10k-labels-idx1-ubyte", idx_file(0x801, &[16])),
        ] {
            let sha256 = format!("{:064x}", files.len() + 1);
            let path = core.blobs().path(&sha256).unwrap();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            files.push((name.to_string(), BlobRef { sha256, size: bytes.len() as u64 }));
        }
        (core, files)
    }

    /// A registered worker: its id and session.
    #[derive(Debug, Clone)]
    pub(crate) struct TestWorker {
        pub(crate) id: String,
        pub(crate) session: String,
    }

    pub(crate) fn register(core: &Core, name: &str) -> TestWorker {
        let (id, session, _) = core.register(name, "cpu", Abilities::default(), &[]).unwrap();
        TestWorker { id, session }
    }

    pub(crate) fn proof<'a>(worker: &'a TestWorker, dispatch: &'a Dispatch) -> LeaseProof<'a> {
        LeaseProof { worker_id: &worker.id, task_id: &dispatch.task_id, attempt: dispatch.attempt, secret: &dispatch.lease_secret }
    }

    fn epoch(number: u32, values: &[(&str, f64)]) -> EpochRecord {
        EpochRecord { epoch: number, attempt: 1, values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(), seconds: 0.1, samples: 48 }
    }

    /// Leases the next task to `worker`, reports a validation error, and completes it.
    pub(crate) async fn run_one(core: &Core, worker: &TestWorker, val_mse: f64) -> String {
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().expect("a task is queued");
        let epoch = EpochRecord { epoch: 1, attempt: dispatch.attempt, values: vec![("val_mse".into(), val_mse)], seconds: 0.1, samples: 48 };
        core.report_metrics(&proof(worker, &dispatch), &[epoch]).unwrap();
        core.complete(&proof(worker, &dispatch)).unwrap();
        dispatch.spec.name
    }

    /// A sweep's view says why its queued trials wait, names the workers by the names they
    /// gave, and stamps when a trial started and ended.
    #[tokio::test]
    async fn the_sweep_view_says_why_trials_wait_and_names_workers() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(SWEEP, "view.toml", files, false).unwrap().sweep_id.unwrap();
        let view = core.sweep(&sweep_id).unwrap();
        assert!(view.tasks.iter().all(|t| t.waiting.as_deref() == Some("waiting: no worker connected")), "{:?}", view.tasks[0].waiting);
        let worker = register(&core, "alpha");
        run_one(&core, &worker, 0.5).await;
        let view = core.sweep(&sweep_id).unwrap();
        let done = &view.tasks[0];
        assert_eq!(done.worker_names, vec!["alpha".to_string()]);
        assert!(done.waiting.is_none());
        assert!(done.started_ms > 0 && done.ended_ms >= done.started_ms, "{} {}", done.started_ms, done.ended_ms);
        assert_eq!(view.tasks[1].waiting.as_deref(), Some("waiting: next to start"));
        assert_eq!(view.tasks[2].waiting.as_deref(), Some("waiting: 1 earlier trial queued"));
    }

    /// The dry run's planning is the submission's, with nothing stored.
    #[test]
    fn a_dry_run_plans_without_storing() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let local: Vec<(String, PathBuf)> = files.iter().map(|(name, blob)| (name.clone(), core.blobs().path(&blob.sha256).unwrap())).collect();
        let sweep = SweepFile::parse(SWEEP, "dry.toml").unwrap();
        let (trials, stages) = check_and_plan(&sweep, "dry.toml", files, &local, &Limits::default()).unwrap();
        let planned = dry_run_plan(trials, stages);
        assert_eq!(planned.planned.len(), 4);
        assert_eq!(planned.stages.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), vec!["cv", "final"]);
        assert!(core.sweeps().unwrap().is_empty());
    }

    /// Non-finite values and epochs outside the plan are refused, naming the problem, and
    /// change nothing; a report under a wrong secret is refused as not the lease holder's.
    #[tokio::test]
    async fn reports_are_checked_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(SWEEP, "edge.toml", files, false).unwrap().sweep_id.unwrap();
        let worker = register(&core, "w");
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
        let lease = proof(&worker, &dispatch);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let error = core.report_metrics(&lease, &[epoch(1, &[("val_mse", bad)])]).unwrap_err();
            assert!(matches!(error, CoreError::BadRequest(_)) && error.to_string().contains("val_mse"), "{error}");
        }
        let error = core.report_metrics(&lease, &[epoch(2, &[("val_mse", 0.5)])]).unwrap_err();
        assert!(error.to_string().contains("outside the trial's plan of epochs 1 to 1"), "{error}");
        let many: Vec<(String, f64)> = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
        let wide = EpochRecord { values: many, ..epoch(1, &[]) };
        assert!(matches!(core.report_metrics(&lease, &[wide]), Err(CoreError::LimitExceeded(_))));
        let forged = LeaseProof { secret: "guessed", ..lease };
        assert!(matches!(core.report_metrics(&forged, &[epoch(1, &[("val_mse", 1e-6)])]), Err(CoreError::Refused(Refusal::NotLeaseHolder { .. }))));
        assert!(matches!(core.complete(&forged), Err(CoreError::Refused(Refusal::NotLeaseHolder { .. }))));
        let view = core.sweep(&sweep_id).unwrap();
        assert!(view.tasks.iter().all(|t| t.epochs.is_empty()), "nothing refused was stored");
        core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
        core.complete(&lease).unwrap();
    }

    /// A checkpoint is attached only from a blob uploaded under the same lease, for an epoch the
    /// trial has reported.
    #[tokio::test]
    async fn checkpoints_come_only_from_the_lease_holders_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let foreign = files[0].1.clone();
        core.submit(SWEEP, "attach.toml", files, false).unwrap();
        let worker = register(&core, "w");
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
        let lease = proof(&worker, &dispatch);
        let record = |blob: &BlobRef, epoch: u32| CheckpointRecord { task_id: dispatch.task_id.clone(), epoch, attempt: 1, blob: blob.clone(), is_final: true };
        let error = core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap_err();
        assert!(error.to_string().contains("not uploaded under this lease"), "{error}");
        core.record_lease_upload(&lease, &foreign).unwrap();
        let error = core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap_err();
        assert!(error.to_string().contains("before that epoch was reported"), "{error}");
        core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
        core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap();
    }

    /// When the database cannot be written, the failed change leaves memory as the database
    /// has it, every further change is refused as UNAVAILABLE, and once writes work again the
    /// coordinator resumes, its leases intact.
    #[tokio::test]
    async fn a_full_store_changes_nothing_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(SWEEP, "full.toml", files, false).unwrap().sweep_id.unwrap();
        let worker = register(&core, "w");
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
        let lease = proof(&worker, &dispatch);
        core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
        let pages: u64 = core.lock().store.page_count().unwrap();
        core.lock().store.set_max_pages(pages).unwrap();
        // Filling the last pages: log lines until the database is full.
        let line = "x".repeat(4000);
        let mut refused = None;
        for _ in 0..1000 {
            if let Err(error) = core.append_logs(&lease, vec![(0, "INFO".into(), line.clone()); 50]) {
                refused = Some(error);
                break;
            }
        }
        assert!(matches!(refused, Some(CoreError::Unwritable(_))), "{refused:?}");
        assert!(!core.writable());
        assert!(matches!(core.complete(&lease), Err(CoreError::Unwritable(_))), "no change while unwritable");
        assert!(matches!(core.acquire(&worker.id, &worker.session, Duration::ZERO).await, Err(CoreError::Unwritable(_))));
        assert_eq!(core.sweep(&sweep_id).unwrap().tasks.iter().filter(|t| t.task.entry.state == TaskState::Running).count(), 1, "reads still work");
        core.expire_leases().unwrap();
        assert!(!core.writable(), "the probe fails while the store is full");

        core.lock().store.set_max_pages(1 << 30).unwrap();
        core.expire_leases().unwrap();
        assert!(core.writable(), "the probe succeeded");
        // Memory was rebuilt from the database: the worker registers again and re-attaches.
        let (id, session, abandon) = core.register("w", "cpu", Abilities::default(), &[Lease { task_id: dispatch.task_id.clone(), attempt: 1, rank: 0, world: 1, secret: dispatch.lease_secret.clone() }]).unwrap();
        assert!(abandon.is_empty(), "the lease survived the failure");
        let worker = TestWorker { id, session };
        core.complete(&proof(&worker, &dispatch)).unwrap();
        assert_eq!(core.sweep(&sweep_id).unwrap().tasks[0].task.entry.state, TaskState::Succeeded);
    }

    fn stages_of(core: &Core, sweep_id: &str) -> Vec<String> {
        core.sweep(sweep_id).unwrap().tasks.into_iter().map(|t| t.task.spec.stage).collect()
    }

    /// A member reserved for a gang while it long-polls gets its lease as soon as the last
    /// member's acquire completes the gang, not when its own wait runs out. (Time is paused: a
    /// member left waiting would sleep through to its deadline and come back empty.)
    #[tokio::test(start_paused = true)]
    async fn a_waiting_gang_member_wakes_when_the_gang_completes() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let source = format!("{SWEEP}[distributed]\nreplicas = 2\n");
        let sweep_id = core.submit(&source, "gang.toml", files, false).unwrap().sweep_id.unwrap();
        let core = std::sync::Arc::new(core);
        let first = register(&core, "w1");
        let second = register(&core, "w2");
        for val_mse in [0.5, 0.4, 0.3, 0.2] {
            run_one(&core, &first, val_mse).await;
        }
        assert_eq!(stages_of(&core, &sweep_id).last().map(String::as_str), Some("final"));
        let waiting = tokio::spawn({
            let core = core.clone();
            async move { core.acquire(&first.id, &first.session, Duration::from_secs(30)).await }
        });
        // Let the first member reserve its place and start waiting.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let completing = core.acquire(&second.id, &second.session, Duration::ZERO).await.unwrap().expect("the gang is complete");
        let waited = waiting.await.unwrap().unwrap().expect("the waiting member gets its lease");
        assert_eq!((completing.world, waited.world), (2, 2));
        assert_eq!(completing.task_id, waited.task_id);
    }

    /// The next stage is planned once, when the last trial of the current one ends, also when
    /// the coordinator restarted in the middle of the stage.
    #[tokio::test]
    async fn the_next_stage_starts_once_after_the_last_trial_of_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(SWEEP, "stages.toml", files, false).unwrap().sweep_id.unwrap();
        let worker = register(&core, "w");
        for val_mse in [0.5, 0.4, 0.3] {
            run_one(&core, &worker, val_mse).await;
            assert_eq!(stages_of(&core, &sweep_id), ["cv"; 4], "final waits for every cv trial");
        }
        drop(core);

        let (core, _) = open_with_dataset(dir.path());
        let worker = register(&core, "w");
        assert_eq!(run_one(&core, &worker, 0.2).await, "cv/c1/f1");
        assert_eq!(stages_of(&core, &sweep_id), ["cv", "cv", "cv", "cv", "final"]);
        let view = core.sweep(&sweep_id).unwrap();
        assert_eq!(view.tasks[4].task.spec.config.lr, 1e-4, "the config with the lower mean wins");
        assert_eq!(run_one(&core, &worker, 0.1).await, "final");
        let view = core.sweep(&sweep_id).unwrap();
        assert_eq!(view.tasks.len(), 5, "no stage after final");
        assert_eq!(view.summary.state, SweepState::Succeeded);
    }
}
