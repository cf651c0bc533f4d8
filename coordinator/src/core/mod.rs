//! The coordinator's core: the scheduler and the store behind one lock, with every change
//! committed to SQLite before the caller is answered. The gRPC handlers in [`crate::service`]
//! only convert messages and call in here.
//!
//! Commit or nothing: every change runs through [`Core::change`]. When the store fails to
//! write (a full disk, an I/O error), the scheduler's memory is rebuilt from what the database
//! holds, so nothing is served from a state the database does not have, and the core refuses
//! all further changes (UNAVAILABLE, saying why) until a probe write succeeds again.
//!
//! Layout: this file holds [`Core`], its state and the change/commit path (with stage
//! progression, cancel and retry); `config.rs` the configuration, limits and errors;
//! `submit.rs` checking and planning a sweep file; `leases.rs` what workers call about their
//! leases (dispatch among them); `rendezvous.rs` the gangs' rendezvous; `views.rs` what the core
//! shows (sweeps, tasks, workers, logs); `progress.rs` and `pruning.rs` a sweep's progress and
//! early stopping; `tests.rs` the tests and the helpers other modules' tests share.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::blobs::BlobStore;
use crate::domain::{CollectiveBackend, Stage, TrialSpec};
use crate::events::{Change, ChangeKind, Changes};
use crate::metrics::CoordinatorMetrics;
use crate::plan;
use crate::scheduler::{Millis, Needs, Scheduler, SecretSource, Timeouts};
use crate::store::{Store, StoreError, StoredTask};
use crate::sweep::SweepFile;

mod config;
mod leases;
mod progress;
mod pruning;
mod rendezvous;
mod submit;
#[cfg(test)]
pub(crate) mod tests;
mod views;

pub use config::{CoreConfig, CoreError, Limits};
pub use leases::{Dispatch, LeaseProof};
pub use progress::{StageProgressView, SweepProgressView, MAX_RUNNING_SHOWN};
pub use rendezvous::Rendezvous;
use submit::new_tasks;
pub use submit::{check_and_plan, check_and_plan_with_command, dry_run_plan, Submitted};
pub use views::{Counts, HeldTask, SweepState, SweepSummary, SweepView, TaskView, WorkerView};

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
    /// The sweeps, each once, in which one of `changed` has ended.
    fn sweeps_with_ended(&self, changed: &[String]) -> Vec<String> {
        let mut sweeps: Vec<String> = changed
            .iter()
            .filter_map(|id| self.scheduler.task(id))
            .filter(|task| task.state.is_terminal())
            .map(|task| task.sweep_id.clone())
            .collect();
        sweeps.sort();
        sweeps.dedup();
        sweeps
    }

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
    Needs {
        cuda: spec.replicas > 1 && spec.collective_backend == CollectiveBackend::Nccl,
        commands: spec.kind == crate::domain::TrialKind::Command,
    }
}

/// Lease secrets: 128 random bits each.
fn lease_secrets() -> SecretSource {
    SecretSource::new(|| random_hex(16))
}

/// A sweep's latest planned stage.
#[derive(Debug, Clone, PartialEq)]
struct LatestStage {
    /// Which stage.
    name: Stage,
    /// The orders of its tasks: a stage's tasks are planned together and numbered on
    /// contiguously.
    orders: Range<u64>,
}

impl LatestStage {
    /// The stage `tasks` (planned together, in order) make up.
    fn of(tasks: &[StoredTask]) -> Option<Self> {
        let first = tasks.first()?;
        let last = tasks.last()?;
        Some(Self { name: first.spec.stage, orders: first.entry.order..last.entry.order + 1 })
    }
}

/// The coordinator's state.
pub struct Core {
    limits: Limits,
    timeouts: Timeouts,
    metrics: CoordinatorMetrics,
    inner: Mutex<Inner>,
    blobs: BlobStore,
    work_available: Notify,
    /// The gang rendezvous in progress, with their own lock ([`rendezvous`]).
    gatherings: rendezvous::Gatherings,
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
                latest.insert(task.entry.sweep_id.clone(), LatestStage { name: task.spec.stage, orders: order..order + 1 });
            }
        }
    }
    latest
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
        std::fs::create_dir_all(config.data_dir.join("blobs")).map_err(|e| CoreError::Io(format!("{}: {e}", config.data_dir.display())))?;
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
            gatherings: rendezvous::Gatherings::default(),
            started: Instant::now(),
            changes: Changes::default(),
        })
    }

    /// Milliseconds since the core opened: the scheduler's clock.
    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    /// The scheduler and the store, locked (a poisoned lock is taken over: every change is
    /// all or nothing).
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
        let mut queued = false;
        for sweep_id in inner.sweeps_with_ended(changed) {
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
        if latest.is_some_and(|stage| !plan::has_next_stage(&sweep, stage.name)) {
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
        let stage = trials.first().map(|t| t.stage.as_str()).unwrap_or_default();
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
        .inspect(|_| {
            // The sweep's gangs will not gather again: their rendezvous go with them.
            self.prune_rendezvous();
            self.changes.publish(Change::sweep(sweep_id, ChangeKind::State));
        })
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
}
