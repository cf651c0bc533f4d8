//! The scheduling state machine: which task runs where, leases, retries. Pure: no I/O, no
//! clock (callers pass `now` in milliseconds), no async. Every mutation returns the ids of the
//! tasks it changed so the caller can persist exactly those before acknowledging.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::domain::{FailureKind, TaskState};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// A task as the scheduler tracks it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEntry {
    /// Task id.
    pub id: String,
    /// Its sweep.
    pub sweep_id: String,
    /// Position in the global FIFO (sweep submission order, then plan order).
    pub order: u64,
    /// Current state.
    pub state: TaskState,
    /// Attempts started so far (the running one included).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The worker holding the lease while running (also the last one, after).
    pub worker: Option<String>,
    /// When the lease lapses unless renewed.
    pub lease_expires: Option<Millis>,
    /// The last error.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct WorkerEntry {
    name: String,
    last_seen: Millis,
}

/// A task handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The task.
    pub task_id: String,
    /// The attempt it runs as.
    pub attempt: u32,
}

/// Why the scheduler refused a worker's call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The worker is not registered (or was declared dead).
    #[error("unknown worker {0}")]
    UnknownWorker(String),
    /// The task does not exist.
    #[error("unknown task {0}")]
    UnknownTask(String),
    /// The caller no longer holds the task's lease (it expired, moved, or the task ended).
    #[error("task {task_id} attempt {attempt} is not leased to this worker")]
    StaleLease {
        /// The task.
        task_id: String,
        /// The attempt the caller named.
        attempt: u32,
    },
}

/// What became of a failed or expired task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Queued again for another attempt.
    Requeued,
    /// Out of attempts, or not retryable: failed for good.
    GaveUp,
}

/// Timing rules.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A lease lapses this long after its last renewal.
    pub lease_ms: Millis,
    /// A worker unheard of for this long is forgotten.
    pub worker_ms: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { lease_ms: 10_000, worker_ms: 30_000 }
    }
}

/// The state machine.
#[derive(Debug)]
pub struct Scheduler {
    tasks: HashMap<String, TaskEntry>,
    queue: BTreeSet<(u64, String)>,
    workers: BTreeMap<String, WorkerEntry>,
    timeouts: Timeouts,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(timeouts: Timeouts) -> Self {
        Self { tasks: HashMap::new(), queue: BTreeSet::new(), workers: BTreeMap::new(), timeouts }
    }

    /// Adds a task (new, or reloaded after a restart). A running task keeps its lease, renewed
    /// from `now`, so that its worker can re-attach when it reconnects.
    pub fn insert(&mut self, mut task: TaskEntry, now: Millis) {
        if task.state == TaskState::Queued {
            self.queue.insert((task.order, task.id.clone()));
        }
        if task.state == TaskState::Running {
            task.lease_expires = Some(now + self.timeouts.lease_ms);
        }
        self.tasks.insert(task.id.clone(), task);
    }

    /// The task with this id.
    pub fn task(&self, id: &str) -> Option<&TaskEntry> {
        self.tasks.get(id)
    }

    /// Number of queued tasks.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Registered workers: (id, name, last seen).
    pub fn workers(&self) -> Vec<(String, String, Millis)> {
        self.workers.iter().map(|(id, w)| (id.clone(), w.name.clone(), w.last_seen)).collect()
    }

    /// Registers a worker under `worker_id`. `running` lists what it still runs from before (a
    /// coordinator restart, a lost connection): tasks whose lease it still holds by attempt are
    /// re-attached to it; the rest are returned as tasks it must abandon.
    pub fn register(&mut self, worker_id: &str, name: &str, now: Millis, running: &[Lease]) -> (Vec<String>, Vec<String>) {
        self.workers.insert(worker_id.to_string(), WorkerEntry { name: name.to_string(), last_seen: now });
        let mut abandon = Vec::new();
        let mut changed = Vec::new();
        for lease in running {
            match self.tasks.get_mut(&lease.task_id) {
                Some(task) if task.state == TaskState::Running && task.attempt == lease.attempt => {
                    task.worker = Some(worker_id.to_string());
                    task.lease_expires = Some(now + self.timeouts.lease_ms);
                    changed.push(task.id.clone());
                }
                _ => abandon.push(lease.task_id.clone()),
            }
        }
        (abandon, changed)
    }

    fn touch(&mut self, worker_id: &str, now: Millis) -> Result<(), Refusal> {
        let worker = self.workers.get_mut(worker_id).ok_or_else(|| Refusal::UnknownWorker(worker_id.to_string()))?;
        worker.last_seen = now;
        Ok(())
    }

    /// Records a heartbeat: renews the leases the worker still holds; returns the tasks it
    /// reports running but must abandon (cancelled, expired and moved, or finished).
    pub fn heartbeat(&mut self, worker_id: &str, now: Millis, running: &[Lease]) -> Result<Vec<String>, Refusal> {
        self.touch(worker_id, now)?;
        let mut abandon = Vec::new();
        for lease in running {
            match self.tasks.get_mut(&lease.task_id) {
                Some(task) if holds(task, worker_id, lease.attempt) => {
                    task.lease_expires = Some(now + self.timeouts.lease_ms);
                }
                _ => abandon.push(lease.task_id.clone()),
            }
        }
        Ok(abandon)
    }

    /// Leases the oldest queued task to the worker, if any.
    pub fn acquire(&mut self, worker_id: &str, now: Millis) -> Result<Option<Lease>, Refusal> {
        self.touch(worker_id, now)?;
        let Some((order, task_id)) = self.queue.pop_first() else {
            return Ok(None);
        };
        let task = self.tasks.get_mut(&task_id).expect("queued task exists");
        debug_assert_eq!(task.order, order);
        task.state = TaskState::Running;
        task.attempt += 1;
        task.worker = Some(worker_id.to_string());
        task.lease_expires = Some(now + self.timeouts.lease_ms);
        Ok(Some(Lease { task_id, attempt: task.attempt }))
    }

    /// Checks that the worker holds the task's lease for `attempt` (before accepting its reports).
    pub fn check_lease(&self, worker_id: &str, task_id: &str, attempt: u32) -> Result<(), Refusal> {
        let task = self.tasks.get(task_id).ok_or_else(|| Refusal::UnknownTask(task_id.to_string()))?;
        if !holds(task, worker_id, attempt) {
            return Err(Refusal::StaleLease { task_id: task_id.to_string(), attempt });
        }
        Ok(())
    }

    /// The worker finished the task. Recorded once: a second or late report is refused.
    pub fn complete(&mut self, worker_id: &str, task_id: &str, attempt: u32, now: Millis) -> Result<(), Refusal> {
        self.check_lease(worker_id, task_id, attempt)?;
        self.touch(worker_id, now)?;
        let task = self.tasks.get_mut(task_id).expect("checked");
        task.state = TaskState::Succeeded;
        task.lease_expires = None;
        task.error = None;
        Ok(())
    }

    /// The worker reports the task failed.
    pub fn fail(&mut self, worker_id: &str, task_id: &str, attempt: u32, kind: FailureKind, error: &str, now: Millis) -> Result<Retry, Refusal> {
        self.check_lease(worker_id, task_id, attempt)?;
        self.touch(worker_id, now)?;
        Ok(self.end_attempt(task_id, kind, error))
    }

    fn end_attempt(&mut self, task_id: &str, kind: FailureKind, error: &str) -> Retry {
        let task = self.tasks.get_mut(task_id).expect("caller checked");
        task.lease_expires = None;
        task.error = Some(error.to_string());
        if kind == FailureKind::User || task.attempt >= task.max_attempts {
            task.state = TaskState::Failed;
            return Retry::GaveUp;
        }
        task.state = TaskState::Queued;
        self.queue.insert((task.order, task.id.clone()));
        Retry::Requeued
    }

    /// Lapses leases not renewed in time and forgets silent workers. Returns each changed task
    /// and what became of it.
    pub fn expire(&mut self, now: Millis) -> Vec<(String, Retry)> {
        let worker_ms = self.timeouts.worker_ms;
        self.workers.retain(|_, w| now.saturating_sub(w.last_seen) < worker_ms);
        let lapsed: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running && t.lease_expires.is_some_and(|e| e <= now))
            .map(|t| t.id.clone())
            .collect();
        lapsed
            .into_iter()
            .map(|id| {
                let worker = self.tasks[&id].worker.clone().unwrap_or_default();
                let retry = self.end_attempt(&id, FailureKind::Infrastructure, &format!("lease lapsed: worker {worker} went silent"));
                (id, retry)
            })
            .collect()
    }

    /// Cancels every unfinished task of the sweep; returns the changed ids.
    pub fn cancel_sweep(&mut self, sweep_id: &str) -> Vec<String> {
        let mut changed = Vec::new();
        for task in self.tasks.values_mut().filter(|t| t.sweep_id == sweep_id && !t.state.is_terminal()) {
            self.queue.remove(&(task.order, task.id.clone()));
            task.state = TaskState::Cancelled;
            task.lease_expires = None;
            changed.push(task.id.clone());
        }
        changed
    }
}

fn holds(task: &TaskEntry, worker_id: &str, attempt: u32) -> bool {
    task.state == TaskState::Running && task.attempt == attempt && task.worker.as_deref() == Some(worker_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, order: u64) -> TaskEntry {
        TaskEntry {
            id: id.into(),
            sweep_id: "s".into(),
            order,
            state: TaskState::Queued,
            attempt: 0,
            max_attempts: 3,
            worker: None,
            lease_expires: None,
            error: None,
        }
    }

    fn scheduler(tasks: &[&str]) -> Scheduler {
        let mut s = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 1000 });
        for (i, id) in tasks.iter().enumerate() {
            s.insert(task(id, i as u64), 0);
        }
        s.register("w1", "one", 0, &[]);
        s.register("w2", "two", 0, &[]);
        s
    }

    #[test]
    fn tasks_go_out_in_fifo_order_once() {
        let mut s = scheduler(&["a", "b"]);
        assert_eq!(s.acquire("w1", 1).unwrap().unwrap(), Lease { task_id: "a".into(), attempt: 1 });
        assert_eq!(s.acquire("w2", 1).unwrap().unwrap().task_id, "b");
        assert_eq!(s.acquire("w1", 1).unwrap(), None);
        assert_eq!(s.acquire("ghost", 1), Err(Refusal::UnknownWorker("ghost".into())));
    }

    #[test]
    fn result_is_recorded_exactly_once() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", 1).unwrap();
        s.complete("w1", "a", 1, 2).unwrap();
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
        assert!(matches!(s.complete("w1", "a", 1, 3), Err(Refusal::StaleLease { .. })));
        assert!(matches!(s.fail("w1", "a", 1, FailureKind::Infrastructure, "x", 3), Err(Refusal::StaleLease { .. })));
    }

    #[test]
    fn lapsed_lease_requeues_and_late_report_is_refused() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", 0).unwrap();
        assert!(s.expire(50).is_empty());
        s.heartbeat("w1", 50, &[Lease { task_id: "a".into(), attempt: 1 }]).unwrap();
        assert!(s.expire(120).is_empty(), "the heartbeat renewed the lease");
        assert_eq!(s.expire(150), vec![("a".to_string(), Retry::Requeued)]);
        assert_eq!(s.task("a").unwrap().state, TaskState::Queued);
        let lease = s.acquire("w2", 160).unwrap().unwrap();
        assert_eq!(lease.attempt, 2);
        // The presumed-dead worker wakes up: its reports are refused, its heartbeat told to abandon.
        assert!(matches!(s.complete("w1", "a", 1, 170), Err(Refusal::StaleLease { .. })));
        assert_eq!(s.heartbeat("w1", 170, &[Lease { task_id: "a".into(), attempt: 1 }]).unwrap(), vec!["a".to_string()]);
        s.complete("w2", "a", 2, 180).unwrap();
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
    }

    #[test]
    fn attempts_are_bounded_and_user_errors_are_not_retried() {
        let mut s = scheduler(&["a", "b"]);
        for attempt in 1..=3 {
            let lease = s.acquire("w1", 0).unwrap().unwrap();
            assert_eq!((lease.task_id.as_str(), lease.attempt), ("a", attempt));
            let retry = s.fail("w1", "a", attempt, FailureKind::Infrastructure, "boom", 0).unwrap();
            assert_eq!(retry, if attempt < 3 { Retry::Requeued } else { Retry::GaveUp });
        }
        assert_eq!(s.task("a").unwrap().state, TaskState::Failed);
        assert_eq!(s.task("a").unwrap().error.as_deref(), Some("boom"));
        s.acquire("w1", 0).unwrap();
        assert_eq!(s.fail("w1", "b", 1, FailureKind::User, "nan", 0).unwrap(), Retry::GaveUp);
    }

    #[test]
    fn silent_workers_are_forgotten_and_can_reattach() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", 0).unwrap();
        s.heartbeat("w2", 900, &[]).unwrap();
        s.heartbeat("w1", 90, &[Lease { task_id: "a".into(), attempt: 1 }]).unwrap();
        let _ = s.expire(1500);
        assert_eq!(s.heartbeat("w1", 1500, &[]), Err(Refusal::UnknownWorker("w1".into())));
        // After a coordinator restart the task is reloaded as running and its worker re-registers.
        let mut restarted = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 1000 });
        let mut running = task("a", 0);
        running.state = TaskState::Running;
        running.attempt = 1;
        running.worker = Some("old-id".into());
        restarted.insert(running, 0);
        let lease = Lease { task_id: "a".into(), attempt: 1 };
        let stale = Lease { task_id: "gone".into(), attempt: 1 };
        let (abandon, changed) = restarted.register("new-id", "one", 10, &[lease, stale]);
        assert_eq!(abandon, vec!["gone".to_string()]);
        assert_eq!(changed, vec!["a".to_string()]);
        restarted.complete("new-id", "a", 1, 20).unwrap();
    }

    #[test]
    fn cancel_removes_queued_and_running_tasks() {
        let mut s = scheduler(&["a", "b"]);
        s.acquire("w1", 0).unwrap();
        let mut changed = s.cancel_sweep("s");
        changed.sort();
        assert_eq!(changed, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(s.acquire("w2", 0).unwrap(), None);
        assert_eq!(s.heartbeat("w1", 1, &[Lease { task_id: "a".into(), attempt: 1 }]).unwrap(), vec!["a".to_string()]);
    }

    /// A randomized run of interleaved events: every task ends terminal, succeeds at most once,
    /// and never runs on two workers at once.
    #[test]
    fn random_interleavings_keep_the_invariants() {
        for seed in 0..50u64 {
            let ids: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut s = scheduler(&refs);
            let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next = || {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (rng >> 33) as u32
            };
            let workers = ["w1", "w2"];
            let mut held: HashMap<&str, Lease> = HashMap::new();
            let mut successes: HashMap<String, u32> = HashMap::new();
            let mut now = 0;
            for _ in 0..2000 {
                now += u64::from(next() % 30);
                let w = workers[(next() % 2) as usize];
                match next() % 5 {
                    0 | 1 if !held.contains_key(w) => {
                        if let Ok(Some(lease)) = s.acquire(w, now) {
                            held.insert(w, lease);
                        }
                    }
                    0 | 1 | 2 => {
                        if let Some(lease) = held.remove(w) {
                            if s.complete(w, &lease.task_id, lease.attempt, now).is_ok() {
                                *successes.entry(lease.task_id).or_default() += 1;
                            }
                        }
                    }
                    3 => {
                        if let Some(lease) = held.remove(w) {
                            let _ = s.fail(w, &lease.task_id, lease.attempt, FailureKind::Infrastructure, "x", now);
                        }
                    }
                    _ => {
                        let running: Vec<Lease> = held.get(w).cloned().into_iter().collect();
                        if s.heartbeat(w, now, &running).is_err() {
                            s.register(w, w, now, &running);
                        }
                        let _ = s.expire(now);
                    }
                }
                let running: Vec<&TaskEntry> = s.tasks.values().filter(|t| t.state == TaskState::Running).collect();
                let mut by_worker: HashMap<&str, u32> = HashMap::new();
                for t in running {
                    *by_worker.entry(t.worker.as_deref().unwrap()).or_default() += 1;
                }
                assert!(by_worker.values().all(|&n| n <= 1), "seed {seed}: a worker holds two leases");
            }
            assert!(successes.values().all(|&n| n == 1), "seed {seed}: {successes:?}");
            let queued_count = s.tasks.values().filter(|t| t.state == TaskState::Queued).count();
            assert_eq!(queued_count, s.queued(), "seed {seed}: queue and states agree");
        }
    }
}
