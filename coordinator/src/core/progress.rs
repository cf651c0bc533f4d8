//! A sweep's progress as `watch` and `wait` follow it ([`Core::progress`]): its counts, each
//! stage's bar and time left, and its running trials, read in a number of queries that does not
//! grow with the sweep (a few per stage, and one per running trial), so that following a sweep of
//! 100,000 trials costs what following a small one does.

use std::collections::{BTreeSet, HashMap};

use super::{Core, CoreError, SweepSummary, TaskView};
use crate::domain::TaskState;

/// Running trials a progress view carries at most (`summary.counts.running` counts them all).
pub const MAX_RUNNING_SHOWN: usize = 100;

/// One stage's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct StageProgressView {
    /// Stage name.
    pub stage: String,
    /// Its trials.
    pub total: u32,
    /// Those that ended (succeeded, failed, cancelled or pruned).
    pub ended: u32,
    /// Those running.
    pub running: u32,
    /// Epochs its unfinished trials have still to train.
    pub remaining_epochs: u64,
    /// The mean time of the epochs reported in it so far (none yet: 0).
    pub mean_epoch_seconds: f64,
    /// Why its next queued trial has not started.
    pub waiting: Option<String>,
}

/// A sweep's progress.
#[derive(Debug, Clone)]
pub struct SweepProgressView {
    /// Its counts and state.
    pub summary: SweepSummary,
    /// Its stages in plan order.
    pub stages: Vec<StageProgressView>,
    /// Its running trials in plan order (at most [`MAX_RUNNING_SHOWN`]), with their epochs.
    pub running: Vec<TaskView>,
}

impl Core {
    /// The sweep's progress now.
    pub fn progress(&self, sweep_id: &str) -> Result<SweepProgressView, CoreError> {
        let inner = self.lock();
        let record = inner.store.sweep(sweep_id)?.ok_or_else(|| CoreError::NotFound(format!("sweep {sweep_id}")))?;
        let unfinished = inner.scheduler.unfinished_of(sweep_id);
        let mut running = Vec::new();
        // Epochs reported by each running trial (queued ones may have reported some before a
        // retry too; they count from their checkpoint, which is close enough for an estimate).
        let mut reported = HashMap::new();
        for task in unfinished.iter().filter(|t| t.state == TaskState::Running) {
            let epochs = inner.store.metrics(&task.id)?;
            reported.insert(task.id.clone(), epochs.len() as u64);
            if running.len() < MAX_RUNNING_SHOWN {
                running.push((task.id.clone(), epochs));
            }
        }
        let spans = inner.store.stage_spans(sweep_id)?;
        // Reasons are worded only for the trials shown: each stage's next queued one and the
        // running ones, in one walk of the queue.
        let mut shown: BTreeSet<u64> = spans
            .iter()
            .filter_map(|span| {
                unfinished.iter().find(|t| t.state == TaskState::Queued && (span.first..=span.last).contains(&(t.order as i64)))
            })
            .map(|task| task.order)
            .collect();
        shown.extend(unfinished.iter().filter(|t| t.state == TaskState::Running).take(MAX_RUNNING_SHOWN).map(|task| task.order));
        let mut waiting = inner.scheduler.waiting_at(sweep_id, &shown, self.now());
        let mut stages = Vec::new();
        // The stages cover the sweep: their counts add up to its own.
        let mut states = Vec::new();
        for span in spans {
            let progress = inner.store.span_progress(sweep_id, span.first, span.last)?;
            states.extend_from_slice(&progress.states);
            let counts = super::Counts::of(&progress.states);
            let in_span = unfinished.iter().filter(|t| (span.first..=span.last).contains(&(t.order as i64)));
            let remaining_epochs =
                in_span.clone().map(|t| u64::from(t.epochs).saturating_sub(reported.get(&t.id).copied().unwrap_or(0))).sum();
            let next_queued = in_span.filter(|t| t.state == TaskState::Queued).map(|t| t.id.clone()).next();
            let (seconds, epochs) = progress.epoch_seconds;
            stages.push(StageProgressView {
                stage: span.stage,
                total: counts.total,
                ended: counts.succeeded + counts.failed + counts.cancelled + counts.pruned,
                running: counts.running,
                remaining_epochs,
                mean_epoch_seconds: if epochs == 0 { 0.0 } else { seconds / epochs as f64 },
                waiting: next_queued.and_then(|id| waiting.get(&id).cloned()),
            });
        }
        let summary = Self::summarize(record, &states);
        let mut views = Vec::with_capacity(running.len());
        for (task_id, epochs) in running {
            let Some(entry) = inner.scheduler.task(&task_id).cloned() else { continue };
            let Some(spec) = inner.store.spec_json(&task_id)? else { continue };
            let spec = crate::store::Store::parse_spec(&spec)?;
            let worker_names = inner.scheduler.member_names(&entry);
            views.push(TaskView {
                waiting: waiting.remove(&task_id),
                task: crate::store::StoredTask { entry, spec },
                epochs,
                checkpoints: vec![],
                artifacts: vec![],
                worker_names,
                started_ms: 0,
                ended_ms: 0,
            });
        }
        Ok(SweepProgressView { summary, stages, running: views })
    }
}
