//! What the core shows of its state: a sweep's counts and overall state, its tasks with their
//! figures, the registered workers, and the log lines, read under the lock in a number of
//! queries that does not grow with the sweep.

use std::collections::HashMap;

use super::{Core, CoreError};
use crate::domain::{TaskState, TrialSpec};
use crate::store::{ArtifactRecord, CheckpointRecord, EpochRecord, LogRecord, Store, StoredTask, SweepRecord};

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

impl Core {
    /// Log lines of a sweep, or of one task, after `after_id`: at most `max_lines`, and no more
    /// than about `max_bytes` of text (the reply stays under the message limit; ask again after
    /// the last id for more).
    pub fn logs(
        &self,
        sweep_id: &str,
        task_id: Option<&str>,
        after_id: i64,
        max_lines: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, CoreError> {
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

    /// A sweep's summary from its row and its tasks counted by state.
    pub(super) fn summarize(record: SweepRecord, states: &[(TaskState, u32)]) -> SweepSummary {
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
