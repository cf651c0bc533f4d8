//! The scheduling state machine: which task runs where, leases, retries, gangs. Pure: no I/O,
//! no clock (callers pass `now` in milliseconds), no async. Every mutation returns the ids of
//! the tasks it changed so the caller can persist exactly those before acknowledging.
//!
//! Gangs (tasks that need `gang_size` workers at once, e.g. data-parallel training) are started
//! all-or-nothing: when a gang reaches the head of the queue, the workers that ask for work are
//! reserved for it one by one, and only when it has all of them does each get its lease (rank
//! 0..N−1). Tasks queued behind a collecting gang wait (no backfill), so a stream of small tasks
//! cannot starve it; only one gang collects at a time, so two gangs never hold partial
//! reservations against each other. A gang larger than the number of registered workers is
//! passed over until enough workers exist, so it blocks nobody meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;

use crate::domain::{FailureKind, TaskState};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// The lease of a gang rank that reported its part done: it never lapses.
const FINISHED: Millis = Millis::MAX;

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
    /// Workers it needs at once (1 for a plain task).
    pub gang_size: u32,
    /// The workers holding its leases, by rank, while running (the last ones, after).
    pub members: Vec<String>,
    /// When each rank's lease lapses unless renewed (empty unless running).
    pub leases: Vec<Millis>,
    /// The last error.
    pub error: Option<String>,
}

impl TaskEntry {
    /// A queued task that has never run.
    pub fn queued(id: String, sweep_id: String, order: u64, max_attempts: u32, gang_size: u32) -> Self {
        Self { id, sweep_id, order, state: TaskState::Queued, attempt: 0, max_attempts, gang_size: gang_size.max(1), members: vec![], leases: vec![], error: None }
    }

    /// The rank `worker_id` runs, if it is a member.
    fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m == worker_id)
    }

    /// The rank `worker_id` still works on: a member whose part is not yet reported done.
    fn active_rank_of(&self, worker_id: &str) -> Option<usize> {
        self.rank_of(worker_id).filter(|&rank| self.leases.get(rank).is_some_and(|&lease| lease != FINISHED))
    }
}

#[derive(Debug, Clone)]
struct WorkerEntry {
    name: String,
    last_seen: Millis,
}

/// A task (or one rank of a gang) handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The task.
    pub task_id: String,
    /// The attempt it runs as.
    pub attempt: u32,
    /// This worker's rank in the gang (0 for a plain task).
    pub rank: u32,
    /// The gang's size (1 for a plain task).
    pub world: u32,
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

/// A gang at the head of the queue, gathering its workers.
#[derive(Debug, Clone)]
struct Collecting {
    task_id: String,
    reserved: Vec<String>,
}

/// The state machine.
#[derive(Debug)]
pub struct Scheduler {
    tasks: HashMap<String, TaskEntry>,
    /// Queued tasks by order: the FIFO.
    queue: BTreeSet<(u64, String)>,
    /// Running tasks by order, so that lease expiry and stage checks visit only these, never
    /// every task ever planned.
    running: BTreeSet<(u64, String)>,
    workers: BTreeMap<String, WorkerEntry>,
    collecting: Option<Collecting>,
    /// Leases of a started gang waiting for their workers' next acquire call.
    pending: HashMap<String, Lease>,
    timeouts: Timeouts,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            tasks: HashMap::new(),
            queue: BTreeSet::new(),
            running: BTreeSet::new(),
            workers: BTreeMap::new(),
            collecting: None,
            pending: HashMap::new(),
            timeouts,
        }
    }

    /// Adds a task (new, or reloaded after a restart). A running task keeps its leases, renewed
    /// from `now`, so that its workers can re-attach when they reconnect.
    pub fn insert(&mut self, mut task: TaskEntry, now: Millis) {
        task.gang_size = task.gang_size.max(1);
        if task.state == TaskState::Queued {
            self.queue.insert((task.order, task.id.clone()));
        }
        if task.state == TaskState::Running {
            task.leases = vec![now + self.timeouts.lease_ms; task.members.len()];
            self.running.insert((task.order, task.id.clone()));
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

    /// Whether a task whose order lies in `orders` is still queued or running (a sweep's stage
    /// is a contiguous range of orders). Looks at no other task.
    pub fn any_unfinished(&self, orders: Range<u64>) -> bool {
        let range = (orders.start, String::new())..(orders.end, String::new());
        self.queue.range(range.clone()).next().is_some() || self.running.range(range).next().is_some()
    }

    /// Registered workers: (id, name, last seen).
    pub fn workers(&self) -> Vec<(String, String, Millis)> {
        self.workers.iter().map(|(id, w)| (id.clone(), w.name.clone(), w.last_seen)).collect()
    }

    /// Registers a worker under `worker_id`. `running` lists what it still runs from before (a
    /// coordinator restart, a lost connection): ranks whose lease it still holds by attempt are
    /// re-attached to it; the rest are returned as tasks it must abandon. Also returns the
    /// re-attached task ids.
    pub fn register(&mut self, worker_id: &str, name: &str, now: Millis, running: &[Lease]) -> (Vec<String>, Vec<String>) {
        self.workers.insert(worker_id.to_string(), WorkerEntry { name: name.to_string(), last_seen: now });
        let mut abandon = Vec::new();
        let mut changed = Vec::new();
        // Leases this id holds but no longer claims were lost with the worker's old process.
        let lost: Vec<String> = self
            .running
            .iter()
            .map(|(_, id)| &self.tasks[id])
            .filter(|t| t.active_rank_of(worker_id).is_some())
            .filter(|t| !running.iter().any(|l| l.task_id == t.id && l.attempt == t.attempt))
            .map(|t| t.id.clone())
            .collect();
        for task_id in lost {
            self.end_attempt(&task_id, FailureKind::Infrastructure, &format!("worker {worker_id} restarted without it"));
            changed.push(task_id);
        }
        self.pending.remove(worker_id);
        if let Some(collecting) = &mut self.collecting {
            collecting.reserved.retain(|w| w != worker_id);
        }
        for lease in running {
            let rank = lease.rank as usize;
            match self.tasks.get_mut(&lease.task_id) {
                Some(task) if task.state == TaskState::Running && task.attempt == lease.attempt && rank < task.members.len() => {
                    task.members[rank] = worker_id.to_string();
                    task.leases[rank] = now + self.timeouts.lease_ms;
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
    /// reports running but must abandon (cancelled, expired and moved, finished, or a gang
    /// attempt that failed elsewhere).
    pub fn heartbeat(&mut self, worker_id: &str, now: Millis, running: &[Lease]) -> Result<Vec<String>, Refusal> {
        self.touch(worker_id, now)?;
        let mut abandon = Vec::new();
        for lease in running {
            match self.tasks.get_mut(&lease.task_id) {
                Some(task) if holds(task, worker_id, lease.attempt) => {
                    let rank = task.rank_of(worker_id).expect("holds");
                    task.leases[rank] = now + self.timeouts.lease_ms;
                }
                _ => abandon.push(lease.task_id.clone()),
            }
        }
        Ok(abandon)
    }

    /// Hands the worker work: its rank of a gang that has just gathered, or the oldest queued
    /// task. Returns the lease and the tasks that changed (a started gang changes once).
    pub fn acquire(&mut self, worker_id: &str, now: Millis) -> Result<Option<Lease>, Refusal> {
        self.touch(worker_id, now)?;
        if let Some(lease) = self.pending.remove(worker_id) {
            return Ok(Some(lease));
        }
        if self.collecting.as_ref().is_some_and(|c| c.reserved.iter().any(|w| w == worker_id)) {
            return Ok(None);
        }
        let registered = self.workers.len() as u32;
        let Some(task_id) = self.next_startable(registered) else {
            return Ok(None);
        };
        let gang_size = self.tasks[&task_id].gang_size;
        let collecting = self.collecting.get_or_insert_with(|| Collecting { task_id: task_id.clone(), reserved: vec![] });
        collecting.reserved.push(worker_id.to_string());
        if (collecting.reserved.len() as u32) < gang_size {
            return Ok(None);
        }
        let members = self.collecting.take().expect("just filled").reserved;
        Ok(Some(self.start(&task_id, members, worker_id, now)))
    }

    /// The task whose turn it is: the collecting gang, else the oldest queued task, passing over
    /// gangs larger than the number of registered workers.
    fn next_startable(&self, registered: u32) -> Option<String> {
        if let Some(collecting) = &self.collecting {
            return Some(collecting.task_id.clone());
        }
        self.queue.iter().map(|(_, id)| id).find(|id| self.tasks[*id].gang_size <= registered.max(1)).cloned()
    }

    /// Starts a task on `members` (rank order); returns the caller's lease, queues the others'.
    fn start(&mut self, task_id: &str, members: Vec<String>, caller: &str, now: Millis) -> Lease {
        let task = self.tasks.get_mut(task_id).expect("queued task exists");
        self.queue.remove(&(task.order, task.id.clone()));
        self.running.insert((task.order, task.id.clone()));
        task.state = TaskState::Running;
        task.attempt += 1;
        task.leases = vec![now + self.timeouts.lease_ms; members.len()];
        task.members = members;
        let world = task.members.len() as u32;
        let mut own = None;
        for (rank, member) in task.members.iter().enumerate() {
            let lease = Lease { task_id: task.id.clone(), attempt: task.attempt, rank: rank as u32, world };
            if member == caller {
                own = Some(lease);
            } else {
                self.pending.insert(member.clone(), lease);
            }
        }
        own.expect("the caller is a member")
    }

    /// Checks that the worker holds one of the task's leases for `attempt` (before accepting its reports).
    pub fn check_lease(&self, worker_id: &str, task_id: &str, attempt: u32) -> Result<(), Refusal> {
        let task = self.tasks.get(task_id).ok_or_else(|| Refusal::UnknownTask(task_id.to_string()))?;
        if !holds(task, worker_id, attempt) {
            return Err(Refusal::StaleLease { task_id: task_id.to_string(), attempt });
        }
        Ok(())
    }

    /// The rank the worker holds in the task's current attempt.
    pub fn member_rank(&self, worker_id: &str, task_id: &str, attempt: u32) -> Result<usize, Refusal> {
        self.check_lease(worker_id, task_id, attempt)?;
        Ok(self.tasks[task_id].rank_of(worker_id).expect("checked"))
    }

    /// A member finished the task. Rank 0's report completes it, once: a second or late report
    /// is refused. Another rank's report only marks its own part done (its lease no longer
    /// lapses) while rank 0 finishes. The lease decides, not the registry: after a coordinator
    /// restart a worker may report under its old id before it has registered again.
    pub fn complete(&mut self, worker_id: &str, task_id: &str, attempt: u32, now: Millis) -> Result<(), Refusal> {
        let rank = self.member_rank(worker_id, task_id, attempt)?;
        let _ = self.touch(worker_id, now);
        let task = self.tasks.get_mut(task_id).expect("checked");
        if rank > 0 {
            task.leases[rank] = FINISHED;
            return Ok(());
        }
        task.state = TaskState::Succeeded;
        task.leases.clear();
        task.error = None;
        self.running.remove(&(task.order, task.id.clone()));
        self.drop_pending(task_id);
        Ok(())
    }

    /// A member reports the task failed: the whole attempt (every rank of a gang) ends.
    pub fn fail(&mut self, worker_id: &str, task_id: &str, attempt: u32, kind: FailureKind, error: &str, now: Millis) -> Result<Retry, Refusal> {
        self.check_lease(worker_id, task_id, attempt)?;
        let _ = self.touch(worker_id, now);
        Ok(self.end_attempt(task_id, kind, error))
    }

    fn drop_pending(&mut self, task_id: &str) {
        self.pending.retain(|_, lease| lease.task_id != task_id);
    }

    fn end_attempt(&mut self, task_id: &str, kind: FailureKind, error: &str) -> Retry {
        self.drop_pending(task_id);
        let task = self.tasks.get_mut(task_id).expect("caller checked");
        task.leases.clear();
        task.error = Some(error.to_string());
        self.running.remove(&(task.order, task.id.clone()));
        if kind == FailureKind::User || task.attempt >= task.max_attempts {
            task.state = TaskState::Failed;
            return Retry::GaveUp;
        }
        task.state = TaskState::Queued;
        self.queue.insert((task.order, task.id.clone()));
        Retry::Requeued
    }

    /// Lapses leases not renewed in time (one lapsed rank ends its gang's attempt), forgets
    /// silent workers and releases their reservations. Returns each changed task and what
    /// became of it.
    pub fn expire(&mut self, now: Millis) -> Vec<(String, Retry)> {
        let worker_ms = self.timeouts.worker_ms;
        self.workers.retain(|_, w| now.saturating_sub(w.last_seen) < worker_ms);
        let workers = &self.workers;
        self.pending.retain(|worker, _| workers.contains_key(worker));
        if let Some(collecting) = &mut self.collecting {
            collecting.reserved.retain(|w| workers.contains_key(w));
            let gang_size = self.tasks[&collecting.task_id].gang_size as usize;
            if collecting.reserved.is_empty() || workers.len() < gang_size {
                self.collecting = None;
            }
        }
        let lapsed: Vec<(String, String)> = self
            .running
            .iter()
            .map(|(_, id)| &self.tasks[id])
            .filter_map(|t| t.leases.iter().position(|&e| e <= now).map(|rank| (t.id.clone(), t.members[rank].clone())))
            .collect();
        lapsed
            .into_iter()
            .map(|(id, worker)| {
                let retry = self.end_attempt(&id, FailureKind::Infrastructure, &format!("lease lapsed: worker {worker} went silent"));
                (id, retry)
            })
            .collect()
    }

    /// Queues the sweep's failed and cancelled tasks again, each with `extra_attempts` more
    /// attempts; returns the changed ids.
    pub fn retry_sweep(&mut self, sweep_id: &str, extra_attempts: impl Fn(&str) -> u32) -> Vec<String> {
        let mut changed = Vec::new();
        for task in self.tasks.values_mut().filter(|t| t.sweep_id == sweep_id) {
            if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
                continue;
            }
            task.state = TaskState::Queued;
            task.max_attempts = task.attempt + extra_attempts(&task.id);
            task.leases.clear();
            self.queue.insert((task.order, task.id.clone()));
            changed.push(task.id.clone());
        }
        changed
    }

    /// The task each worker still works on.
    pub fn leases_by_worker(&self) -> HashMap<String, String> {
        self.running
            .iter()
            .map(|(_, id)| &self.tasks[id])
            .flat_map(|t| t.members.iter().filter(|w| t.active_rank_of(w).is_some()).map(|w| (w.clone(), t.id.clone())))
            .collect()
    }

    /// Cancels every unfinished task of the sweep; returns the changed ids.
    pub fn cancel_sweep(&mut self, sweep_id: &str) -> Vec<String> {
        let mut changed = Vec::new();
        for task in self.tasks.values_mut().filter(|t| t.sweep_id == sweep_id && !t.state.is_terminal()) {
            self.queue.remove(&(task.order, task.id.clone()));
            self.running.remove(&(task.order, task.id.clone()));
            task.state = TaskState::Cancelled;
            task.leases.clear();
            changed.push(task.id.clone());
        }
        if self.collecting.as_ref().is_some_and(|c| changed.contains(&c.task_id)) {
            self.collecting = None;
        }
        self.pending.retain(|_, lease| !changed.contains(&lease.task_id));
        changed
    }
}

fn holds(task: &TaskEntry, worker_id: &str, attempt: u32) -> bool {
    task.state == TaskState::Running && task.attempt == attempt && task.rank_of(worker_id).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Scheduler {
        /// The queue and the running index hold exactly the queued and the running tasks.
        fn assert_indexes_agree(&self) {
            let with_state = |state: TaskState| -> BTreeSet<(u64, String)> {
                self.tasks.values().filter(|t| t.state == state).map(|t| (t.order, t.id.clone())).collect()
            };
            assert_eq!(self.queue, with_state(TaskState::Queued), "the queue holds exactly the queued tasks");
            assert_eq!(self.running, with_state(TaskState::Running), "the running index holds exactly the running tasks");
        }
    }

    fn task(id: &str, order: u64) -> TaskEntry {
        TaskEntry::queued(id.into(), "s".into(), order, 3, 1)
    }

    fn held(task_id: &str, attempt: u32) -> Lease {
        Lease { task_id: task_id.into(), attempt, rank: 0, world: 1 }
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
        assert_eq!(s.acquire("w1", 1).unwrap().unwrap(), held("a", 1));
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
        s.heartbeat("w1", 50, &[held("a", 1)]).unwrap();
        assert!(s.expire(120).is_empty(), "the heartbeat renewed the lease");
        assert_eq!(s.expire(150), vec![("a".to_string(), Retry::Requeued)]);
        assert_eq!(s.task("a").unwrap().state, TaskState::Queued);
        let lease = s.acquire("w2", 160).unwrap().unwrap();
        assert_eq!(lease.attempt, 2);
        // The presumed-dead worker wakes up: its reports are refused, its heartbeat told to abandon.
        assert!(matches!(s.complete("w1", "a", 1, 170), Err(Refusal::StaleLease { .. })));
        assert_eq!(s.heartbeat("w1", 170, &[held("a", 1)]).unwrap(), vec!["a".to_string()]);
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
        s.heartbeat("w1", 90, &[held("a", 1)]).unwrap();
        let _ = s.expire(1500);
        assert_eq!(s.heartbeat("w1", 1500, &[]), Err(Refusal::UnknownWorker("w1".into())));
        // After a coordinator restart the task is reloaded as running and its worker re-registers.
        let mut restarted = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 1000 });
        let mut running = task("a", 0);
        running.state = TaskState::Running;
        running.attempt = 1;
        running.members = vec!["old-id".into()];
        restarted.insert(running, 0);
        let lease = held("a", 1);
        let stale = held("gone", 1);
        let (abandon, changed) = restarted.register("new-id", "one", 10, &[lease, stale]);
        assert_eq!(abandon, vec!["gone".to_string()]);
        assert_eq!(changed, vec!["a".to_string()]);
        restarted.assert_indexes_agree();
        restarted.complete("new-id", "a", 1, 20).unwrap();
        restarted.assert_indexes_agree();
    }

    #[test]
    fn a_range_is_unfinished_while_one_of_its_tasks_is_queued_or_running() {
        let mut s = scheduler(&["a", "b", "c"]);
        assert!(s.any_unfinished(0..2));
        assert_eq!(s.acquire("w1", 0).unwrap().unwrap().task_id, "a");
        assert_eq!(s.acquire("w2", 0).unwrap().unwrap().task_id, "b");
        s.complete("w1", "a", 1, 1).unwrap();
        assert!(s.any_unfinished(0..2), "b still runs");
        s.complete("w2", "b", 1, 1).unwrap();
        assert!(!s.any_unfinished(0..2));
        assert!(s.any_unfinished(2..3), "c is queued");
        s.acquire("w1", 2).unwrap();
        assert_eq!(s.fail("w1", "c", 1, FailureKind::Infrastructure, "x", 2).unwrap(), Retry::Requeued);
        assert!(s.any_unfinished(2..3), "c is queued again");
        s.assert_indexes_agree();
        s.acquire("w1", 3).unwrap();
        s.cancel_sweep("s");
        assert!(!s.any_unfinished(0..3));
        s.assert_indexes_agree();
        s.retry_sweep("s", |_| 1);
        assert!(s.any_unfinished(2..3));
        assert!(!s.any_unfinished(0..2));
        s.assert_indexes_agree();
    }

    #[test]
    fn retry_requeues_only_failed_and_cancelled_tasks() {
        let mut s = scheduler(&["a", "b", "c"]);
        s.acquire("w1", 0).unwrap();
        s.complete("w1", "a", 1, 0).unwrap();
        s.acquire("w1", 0).unwrap();
        s.fail("w1", "b", 1, FailureKind::User, "bad", 0).unwrap();
        s.cancel_sweep("s");
        let mut changed = s.retry_sweep("s", |_| 2);
        changed.sort();
        assert_eq!(changed, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
        assert_eq!(s.task("b").unwrap().max_attempts, 3, "one used plus two more");
        let lease = s.acquire("w2", 1).unwrap().unwrap();
        assert_eq!((lease.task_id.as_str(), lease.attempt), ("b", 2));
    }

    #[test]
    fn cancel_removes_queued_and_running_tasks() {
        let mut s = scheduler(&["a", "b"]);
        s.acquire("w1", 0).unwrap();
        let mut changed = s.cancel_sweep("s");
        changed.sort();
        assert_eq!(changed, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(s.acquire("w2", 0).unwrap(), None);
        assert_eq!(s.heartbeat("w1", 1, &[held("a", 1)]).unwrap(), vec!["a".to_string()]);
    }

    fn gang(id: &str, order: u64, size: u32) -> TaskEntry {
        TaskEntry::queued(id.into(), "s".into(), order, 3, size)
    }

    fn workers(s: &mut Scheduler, ids: &[&str]) {
        for id in ids {
            s.register(id, id, 0, &[]);
        }
    }

    #[test]
    fn a_gang_starts_all_or_nothing_with_ranks() {
        let mut s = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 1000 });
        s.insert(gang("g", 0, 3), 0);
        s.insert(task("small", 1), 0);
        workers(&mut s, &["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", 1).unwrap(), None, "reserved, waiting for the others");
        assert_eq!(s.acquire("w1", 2).unwrap(), None, "still waiting");
        assert_eq!(s.acquire("w2", 2).unwrap(), None, "the small task behind the gang does not jump the queue");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
        let third = s.acquire("w3", 3).unwrap().unwrap();
        assert_eq!((third.rank, third.world, third.attempt), (2, 3, 1));
        assert_eq!(s.task("g").unwrap().members, vec!["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", 4).unwrap().unwrap().rank, 0);
        assert_eq!(s.acquire("w2", 4).unwrap().unwrap().rank, 1);
        // Every member reports under the same task; a finished rank > 0 no longer lapses, and
        // rank 0's completion ends the task once.
        s.heartbeat("w2", 5, &[Lease { rank: 1, world: 3, ..held("g", 1) }]).unwrap();
        s.complete("w2", "g", 1, 6).unwrap();
        s.complete("w3", "g", 1, 6).unwrap();
        assert_eq!(s.task("g").unwrap().state, TaskState::Running);
        s.heartbeat("w1", 90, &[held("g", 1)]).unwrap();
        assert!(s.expire(150).is_empty(), "finished ranks do not lapse");
        s.complete("w1", "g", 1, 160).unwrap();
        assert_eq!(s.task("g").unwrap().state, TaskState::Succeeded);
        assert!(matches!(s.complete("w1", "g", 1, 170), Err(Refusal::StaleLease { .. })));
        assert_eq!(s.acquire("w2", 170).unwrap().unwrap().task_id, "small");
    }

    #[test]
    fn a_gang_too_large_for_the_cluster_blocks_nobody() {
        let mut s = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 1000 });
        s.insert(gang("g", 0, 4), 0);
        s.insert(task("small", 1), 0);
        workers(&mut s, &["w1", "w2"]);
        assert_eq!(s.acquire("w1", 1).unwrap().unwrap().task_id, "small");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
    }

    #[test]
    fn two_gangs_never_deadlock() {
        let mut s = Scheduler::new(Timeouts { lease_ms: 1000, worker_ms: 10_000 });
        s.insert(gang("g1", 0, 2), 0);
        s.insert(gang("g2", 1, 2), 0);
        workers(&mut s, &["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", 1).unwrap(), None);
        assert_eq!(s.acquire("w2", 1).unwrap().unwrap().task_id, "g1");
        assert_eq!(s.acquire("w1", 1).unwrap().unwrap().task_id, "g1");
        assert_eq!(s.acquire("w3", 1).unwrap(), None, "w3 waits for g2's second worker");
        s.complete("w1", "g1", 1, 2).unwrap();
        assert_eq!(s.acquire("w1", 3).unwrap().unwrap().task_id, "g2");
        let lease = s.acquire("w3", 3).unwrap().unwrap();
        assert_eq!((lease.task_id.as_str(), lease.rank), ("g2", 0));
    }

    #[test]
    fn one_lapsed_member_fails_the_gang_attempt_and_the_rest_abandon() {
        let mut s = Scheduler::new(Timeouts { lease_ms: 100, worker_ms: 10_000 });
        s.insert(gang("g", 0, 2), 0);
        workers(&mut s, &["w1", "w2"]);
        s.acquire("w1", 0).unwrap();
        s.acquire("w2", 0).unwrap().unwrap();
        let rank0 = s.acquire("w1", 0).unwrap().unwrap();
        s.heartbeat("w1", 90, &[rank0.clone()]).unwrap();
        assert_eq!(s.expire(150), vec![("g".to_string(), Retry::Requeued)], "w2 went silent");
        assert_eq!(s.heartbeat("w1", 160, &[rank0]).unwrap(), vec!["g".to_string()], "w1 is told to stop");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
        // A reserved worker that dies releases its reservation.
        assert_eq!(s.acquire("w1", 170).unwrap(), None);
        let _ = s.expire(20_000);
        s.register("w3", "w3", 20_000, &[]);
        s.register("w4", "w4", 20_000, &[]);
        assert_eq!(s.acquire("w3", 20_001).unwrap(), None);
        assert_eq!(s.acquire("w4", 20_001).unwrap().unwrap().attempt, 2);
    }

    /// A randomized run of interleaved events: every task ends terminal, succeeds at most once,
    /// and never runs on two workers at once.
    #[test]
    fn random_interleavings_keep_the_invariants() {
        for seed in 0..50u64 {
            let ids: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut s = scheduler(&refs);
            s.register("w3", "three", 0, &[]);
            for (order, id) in [(5u64, "gang-a"), (12, "gang-b")] {
                s.insert(gang(id, order * 2 + 1, 2), 0);
            }
            let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next = || {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (rng >> 33) as u32
            };
            let workers = ["w1", "w2", "w3"];
            let mut held: HashMap<&str, Lease> = HashMap::new();
            let mut successes: HashMap<String, u32> = HashMap::new();
            let mut now = 0;
            for _ in 0..2000 {
                now += u64::from(next() % 30);
                let w = workers[(next() % 3) as usize];
                match next() % 5 {
                    0 | 1 if !held.contains_key(w) => {
                        if let Ok(Some(lease)) = s.acquire(w, now) {
                            held.insert(w, lease);
                        }
                    }
                    0..=2 => {
                        if let Some(lease) = held.remove(w) {
                            let before = s.task(&lease.task_id).unwrap().state;
                            let accepted = s.complete(w, &lease.task_id, lease.attempt, now).is_ok();
                            let after = s.task(&lease.task_id).unwrap().state;
                            if accepted && before != TaskState::Succeeded && after == TaskState::Succeeded {
                                *successes.entry(lease.task_id).or_default() += 1;
                            }
                            assert!(before != TaskState::Succeeded || after == TaskState::Succeeded, "seed {seed}: a result was undone");
                        }
                    }
                    3 => {
                        if let Some(lease) = held.remove(w) {
                            let _ = s.fail(w, &lease.task_id, lease.attempt, FailureKind::Infrastructure, "x", now);
                        }
                    }
                    _ => {
                        let running: Vec<Lease> = held.get(w).cloned().into_iter().collect();
                        match s.heartbeat(w, now, &running) {
                            Ok(abandon) => {
                                if held.get(w).is_some_and(|l| abandon.contains(&l.task_id)) {
                                    held.remove(w);
                                }
                            }
                            Err(_) => {
                                let (abandon, _) = s.register(w, w, now, &running);
                                if held.get(w).is_some_and(|l| abandon.contains(&l.task_id)) {
                                    held.remove(w);
                                }
                            }
                        }
                        let _ = s.expire(now);
                    }
                }
                let running: Vec<&TaskEntry> = s.tasks.values().filter(|t| t.state == TaskState::Running).collect();
                let mut by_worker: HashMap<&str, u32> = HashMap::new();
                for t in running {
                    for member in t.members.iter().filter(|m| t.active_rank_of(m).is_some()) {
                        *by_worker.entry(member.as_str()).or_default() += 1;
                    }
                }
                assert!(by_worker.values().all(|&n| n <= 1), "seed {seed}: a worker holds two leases");
                s.assert_indexes_agree();
            }
            assert!(successes.values().all(|&n| n == 1), "seed {seed}: {successes:?}");
            let queued_count = s.tasks.values().filter(|t| t.state == TaskState::Queued).count();
            assert_eq!(queued_count, s.queued(), "seed {seed}: queue and states agree");
        }
    }
}
