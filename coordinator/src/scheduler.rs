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
//!
//! Trust: every worker holds the same worker token, so the token proves nothing about which
//! worker calls. Two secrets do: a worker's *session* (minted at registration) guards what it
//! does as itself (heartbeat, acquire), and each lease's *secret* (minted per attempt and rank,
//! persisted with the task) guards what it does to a task (reports, completion, re-attach after
//! a coordinator restart). Task ids are guessable; secrets are not.
//!
//! Lapses and failures have separate budgets: a lapsed lease (the worker went silent: killed,
//! partitioned, or too slow to heartbeat) does not use up one of `max_attempts`, which count
//! the attempts that failed; lapses have their own budget, `max_lapses`, so a trial that keeps
//! losing its workers still ends.

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
    /// Each rank's lease secret for the current attempt (the last one's, after it ended).
    pub secrets: Vec<String>,
    /// Attempts that ended because their lease lapsed (not charged to `max_attempts`).
    pub lapses: u32,
    /// Epochs the trial is planned for: reports of later epochs are refused.
    pub epochs: u32,
    /// What a worker must offer to run it (every member of a gang).
    pub needs: Needs,
}

/// What a task needs of the workers that run it. The default needs nothing special.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A CUDA device (an NCCL gang).
    pub cuda: bool,
    /// A worker that runs user code (a command trial; `worker --allow-commands`).
    pub commands: bool,
}

/// What a worker offers, as it registered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Abilities {
    /// It trains on a CUDA device.
    pub cuda: bool,
    /// It was started with `--allow-commands`.
    pub commands: bool,
}

impl Abilities {
    /// Whether a worker with these abilities can run a task with `needs`.
    pub fn cover(self, needs: Needs) -> bool {
        (self.cuda || !needs.cuda) && (self.commands || !needs.commands)
    }
}

impl TaskEntry {
    /// A queued task that has never run.
    pub fn queued(id: String, sweep_id: String, order: u64, max_attempts: u32, gang_size: u32) -> Self {
        Self {
            id,
            sweep_id,
            order,
            state: TaskState::Queued,
            attempt: 0,
            max_attempts,
            gang_size: gang_size.max(1),
            members: vec![],
            leases: vec![],
            error: None,
            secrets: vec![],
            lapses: 0,
            epochs: u32::MAX,
            needs: Needs::default(),
        }
    }

    /// Sets what a worker must offer to run it.
    pub fn with_needs(mut self, needs: Needs) -> Self {
        self.needs = needs;
        self
    }

    /// Sets the planned epoch count (reports beyond it are refused).
    pub fn with_epochs(mut self, epochs: u32) -> Self {
        self.epochs = epochs;
        self
    }

    /// Attempts charged to `max_attempts`: those that did not end by a lapse.
    fn charged_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.lapses)
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
    /// The credential minted at registration; heartbeat and acquire must present it.
    session: String,
    /// The last task this worker was given or re-attached to: the only one it can still hold
    /// (checked against the task when it matters, so it is never cleared).
    holding: Option<String>,
    /// What it can run.
    abilities: Abilities,
    /// Its device as it named it ("cpu", "cuda:0"): shown, never interpreted.
    device: String,
    /// Seconds of its life in each phase, as of its last heartbeat: shown, never interpreted.
    phases: Vec<(String, f64)>,
}

/// A registered worker as `workers` and the console show it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSnapshot {
    /// Its id.
    pub id: String,
    /// The name it registered with.
    pub name: String,
    /// When it was last heard from.
    pub last_seen: Millis,
    /// Its device ("cpu", "cuda:0").
    pub device: String,
    /// What it can run.
    pub abilities: Abilities,
    /// Seconds of its life in each phase.
    pub phases: Vec<(String, f64)>,
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
    /// Proof of this lease, minted for this attempt and rank.
    pub secret: String,
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
    /// The attempt is live but the caller did not prove it holds the lease (wrong secret, or
    /// another worker's).
    #[error("task {task_id} attempt {attempt}: the lease secret does not match; only the lease holder may act on a task")]
    NotLeaseHolder {
        /// The task.
        task_id: String,
        /// The attempt the caller named.
        attempt: u32,
    },
    /// The caller named a registered worker but not its session.
    #[error("worker {0}: wrong session; a worker acts only as itself (register to get a session)")]
    WrongSession(String),
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
    /// Lapsed attempts a trial may have before it fails for good (its own budget, apart from
    /// `max_attempts`).
    pub max_lapses: u32,
    /// A gap between two expiry passes longer than this means the coordinator itself stalled
    /// (it runs them every 500 ms): leases and workers are credited with the gap.
    pub stall_ms: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { lease_ms: 10_000, worker_ms: 30_000, max_lapses: 10, stall_ms: 1_000 }
    }
}

/// Where lease secrets come from: random in the coordinator, a counter in tests (the state
/// machine itself draws no randomness).
pub struct SecretSource(Box<dyn FnMut() -> String + Send>);

impl SecretSource {
    /// Secrets from `mint`.
    pub fn new(mint: impl FnMut() -> String + Send + 'static) -> Self {
        Self(Box::new(mint))
    }

    fn next(&mut self) -> String {
        (self.0)()
    }
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretSource")
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn secrets_match(presented: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()))
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
    secrets: SecretSource,
    /// When `expire` last ran: a long gap means the coordinator itself stalled.
    last_expire: Option<Millis>,
}

impl Scheduler {
    /// An empty scheduler minting lease secrets from `secrets`.
    pub fn new(timeouts: Timeouts, secrets: SecretSource) -> Self {
        Self {
            tasks: HashMap::new(),
            queue: BTreeSet::new(),
            running: BTreeSet::new(),
            workers: BTreeMap::new(),
            collecting: None,
            pending: HashMap::new(),
            timeouts,
            secrets,
            last_expire: None,
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

    /// The sweep's queued and running tasks, in plan order. Visits every unfinished task of
    /// every sweep, never a finished one.
    pub fn unfinished_of(&self, sweep_id: &str) -> Vec<&TaskEntry> {
        let mut tasks: Vec<&TaskEntry> =
            self.queue.iter().chain(self.running.iter()).map(|(_, id)| &self.tasks[id]).filter(|t| t.sweep_id == sweep_id).collect();
        tasks.sort_by_key(|t| t.order);
        tasks
    }

    /// Registered workers, by id.
    pub fn workers(&self) -> Vec<WorkerSnapshot> {
        self.workers
            .iter()
            .map(|(id, w)| WorkerSnapshot {
                id: id.clone(),
                name: w.name.clone(),
                last_seen: w.last_seen,
                device: w.device.clone(),
                abilities: w.abilities,
                phases: w.phases.clone(),
            })
            .collect()
    }

    /// Records what a registered worker runs on and can run (right after [`Self::register`]).
    pub fn set_profile(&mut self, worker_id: &str, device: &str, abilities: Abilities) {
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.device = device.to_string();
            worker.abilities = abilities;
        }
    }

    /// Records a worker's phase counters from its heartbeat (display only).
    pub fn note_phases(&mut self, worker_id: &str, phases: Vec<(String, f64)>) {
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.phases = phases;
        }
    }

    /// Registers a worker under `worker_id` with its `session`. `running` lists what it still
    /// runs from before (a coordinator restart, a lost connection): ranks whose lease it proves
    /// (attempt and secret) are re-attached to it; the rest are returned as tasks it must
    /// abandon. Also returns the re-attached task ids.
    pub fn register(&mut self, worker_id: &str, name: &str, session: &str, now: Millis, running: &[Lease]) -> (Vec<String>, Vec<String>) {
        let entry = WorkerEntry {
            name: name.to_string(),
            last_seen: now,
            session: session.to_string(),
            holding: None,
            abilities: Abilities::default(),
            device: String::new(),
            phases: vec![],
        };
        self.workers.insert(worker_id.to_string(), entry);
        let mut abandon = Vec::new();
        let mut changed = Vec::new();
        // Leases this id holds but no longer claims were lost with the worker's old process.
        let lost: Vec<String> = self
            .running
            .iter()
            .map(|(_, id)| &self.tasks[id])
            .filter(|t| t.active_rank_of(worker_id).is_some())
            .filter(|t| !running.iter().any(|l| l.task_id == t.id && proves(t, l)))
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
                Some(task) if proves(task, lease) => {
                    if let Some(worker) = self.workers.get_mut(worker_id) {
                        worker.holding = Some(task.id.clone());
                    }
                    task.members[rank] = worker_id.to_string();
                    task.leases[rank] = now + self.timeouts.lease_ms;
                    changed.push(task.id.clone());
                }
                _ => abandon.push(lease.task_id.clone()),
            }
        }
        (abandon, changed)
    }

    /// Checks the worker's session and notes that it was heard from.
    fn authenticate(&mut self, worker_id: &str, session: &str, now: Millis) -> Result<(), Refusal> {
        let worker = self.workers.get_mut(worker_id).ok_or_else(|| Refusal::UnknownWorker(worker_id.to_string()))?;
        if !secrets_match(session, &worker.session) {
            return Err(Refusal::WrongSession(worker_id.to_string()));
        }
        worker.last_seen = now;
        Ok(())
    }

    /// Notes that a worker was heard from (a call already proven by a lease secret).
    fn touch(&mut self, worker_id: &str, now: Millis) {
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.last_seen = now;
        }
    }

    /// Records a heartbeat: renews the leases the worker still holds; returns the tasks it
    /// reports running but must abandon (cancelled, expired and moved, finished, or a gang
    /// attempt that failed elsewhere).
    pub fn heartbeat(&mut self, worker_id: &str, session: &str, now: Millis, running: &[Lease]) -> Result<Vec<String>, Refusal> {
        self.authenticate(worker_id, session, now)?;
        let mut abandon = Vec::new();
        for lease in running {
            match self.tasks.get_mut(&lease.task_id) {
                Some(task) if holds(task, worker_id, lease.attempt, &lease.secret) => {
                    let rank = task.rank_of(worker_id).expect("holds");
                    task.leases[rank] = now + self.timeouts.lease_ms;
                }
                _ => abandon.push(lease.task_id.clone()),
            }
        }
        Ok(abandon)
    }

    /// Hands the worker work: its rank of a gang that has just gathered, or the oldest queued
    /// task. A worker holds one lease at a time: one that asks for work while it still holds an
    /// unfinished lease has lost that run (its report never arrived), which ends that attempt.
    pub fn acquire(&mut self, worker_id: &str, session: &str, now: Millis) -> Result<Option<Lease>, Refusal> {
        self.authenticate(worker_id, session, now)?;
        if let Some(task_id) = self.unfinished_lease_of(worker_id) {
            self.end_attempt(&task_id, FailureKind::Infrastructure, &format!("worker {worker_id} asked for new work while holding it"));
        }
        if let Some(lease) = self.pending.remove(worker_id) {
            return Ok(Some(lease));
        }
        if self.collecting.as_ref().is_some_and(|c| c.reserved.iter().any(|w| w == worker_id)) {
            return Ok(None);
        }
        let Some(task_id) = self.next_startable(worker_id) else {
            return Ok(None);
        };
        let gang_size = self.tasks[&task_id].gang_size;
        if gang_size == 1 && self.collecting.as_ref().is_some_and(|c| c.task_id != task_id) {
            // A worker that cannot serve the gathering gang runs a plain task it can run.
            return Ok(Some(self.start(&task_id, vec![worker_id.to_string()], worker_id, now)));
        }
        let collecting = self.collecting.get_or_insert_with(|| Collecting { task_id: task_id.clone(), reserved: vec![] });
        collecting.reserved.push(worker_id.to_string());
        if (collecting.reserved.len() as u32) < gang_size {
            return Ok(None);
        }
        let members = self.collecting.take().expect("just filled").reserved;
        Ok(Some(self.start(&task_id, members, worker_id, now)))
    }

    /// The task whose lease the worker still holds unfinished, other than a gang lease waiting
    /// for it to pick up: what its next acquire ends. O(1): a worker can only come to hold a
    /// lease by being given it or re-attaching to it, and both record the task.
    pub fn unfinished_lease_of(&self, worker_id: &str) -> Option<String> {
        let task_id = self.workers.get(worker_id)?.holding.as_ref()?;
        let task = self.tasks.get(task_id)?;
        let unfinished = task.state == TaskState::Running && task.active_rank_of(worker_id).is_some();
        let waiting_pickup = self.pending.get(worker_id).is_some_and(|lease| &lease.task_id == task_id);
        (unfinished && !waiting_pickup).then(|| task_id.clone())
    }

    /// The task whose turn it is for this worker: the gathering gang if it can serve it, else
    /// the oldest queued task it can run, passing over tasks it cannot run and gangs larger than
    /// the number of registered workers able to run them. While a gang gathers, a worker that
    /// cannot serve it is only given plain tasks, so that the gang is never starved of a
    /// worker it could use.
    fn next_startable(&self, worker_id: &str) -> Option<String> {
        let abilities = self.workers.get(worker_id).map(|w| w.abilities).unwrap_or_default();
        let gathering = self.collecting.as_ref().map(|c| c.task_id.as_str());
        if let Some(task_id) = gathering {
            if abilities.cover(self.tasks[task_id].needs) {
                return Some(task_id.to_string());
            }
        }
        let mut able_by_needs: Vec<(Needs, u32)> = Vec::new();
        self.queue
            .iter()
            .map(|(_, id)| &self.tasks[id])
            .filter(|task| abilities.cover(task.needs) && Some(task.id.as_str()) != gathering)
            .find(|task| {
                if gathering.is_some() || task.gang_size == 1 {
                    return task.gang_size == 1;
                }
                let able = match able_by_needs.iter().find(|(needs, _)| *needs == task.needs) {
                    Some((_, able)) => *able,
                    None => {
                        let able = self.able_workers(task.needs);
                        able_by_needs.push((task.needs, able));
                        able
                    }
                };
                task.gang_size <= able
            })
            .map(|task| task.id.clone())
    }

    /// Registered workers able to run a task with `needs`.
    fn able_workers(&self, needs: Needs) -> u32 {
        self.workers.values().filter(|w| w.abilities.cover(needs)).count() as u32
    }

    /// Starts a task on `members` (rank order); returns the caller's lease, queues the others'.
    fn start(&mut self, task_id: &str, members: Vec<String>, caller: &str, now: Millis) -> Lease {
        let task = self.tasks.get_mut(task_id).expect("queued task exists");
        self.queue.remove(&(task.order, task.id.clone()));
        self.running.insert((task.order, task.id.clone()));
        task.state = TaskState::Running;
        task.attempt += 1;
        task.leases = vec![now + self.timeouts.lease_ms; members.len()];
        task.secrets = members.iter().map(|_| self.secrets.next()).collect();
        for member in &members {
            if let Some(worker) = self.workers.get_mut(member) {
                worker.holding = Some(task.id.clone());
            }
        }
        task.members = members;
        let world = task.members.len() as u32;
        let mut own = None;
        for (rank, member) in task.members.iter().enumerate() {
            let secret = task.secrets[rank].clone();
            let lease = Lease { task_id: task.id.clone(), attempt: task.attempt, rank: rank as u32, world, secret };
            if member == caller {
                own = Some(lease);
            } else {
                self.pending.insert(member.clone(), lease);
            }
        }
        own.expect("the caller is a member")
    }

    /// Checks that the worker holds one of the task's leases for `attempt` and proves it with
    /// the lease's secret (before accepting anything it says about the task).
    pub fn check_lease(&self, worker_id: &str, task_id: &str, attempt: u32, secret: &str) -> Result<(), Refusal> {
        self.member_rank(worker_id, task_id, attempt, secret).map(|_| ())
    }

    /// The rank the worker holds in the task's current attempt, proven by the lease's secret.
    pub fn member_rank(&self, worker_id: &str, task_id: &str, attempt: u32, secret: &str) -> Result<usize, Refusal> {
        let task = self.tasks.get(task_id).ok_or_else(|| Refusal::UnknownTask(task_id.to_string()))?;
        if task.state != TaskState::Running || task.attempt != attempt {
            return Err(Refusal::StaleLease { task_id: task_id.to_string(), attempt });
        }
        let rank = task.rank_of(worker_id).filter(|&rank| task.secrets.get(rank).is_some_and(|expected| secrets_match(secret, expected)));
        rank.ok_or_else(|| Refusal::NotLeaseHolder { task_id: task_id.to_string(), attempt })
    }

    /// The task's planned epoch count, once the caller proved its lease.
    pub fn planned_epochs(&self, task_id: &str) -> Option<u32> {
        self.tasks.get(task_id).map(|t| t.epochs)
    }

    /// A member finished the task. Rank 0's report completes it, once: a second or late report
    /// is refused. Another rank's report only marks its own part done (its lease no longer
    /// lapses) while rank 0 finishes. The lease decides, not the registry: after a coordinator
    /// restart a worker may report under its old id before it has registered again.
    pub fn complete(&mut self, worker_id: &str, task_id: &str, attempt: u32, secret: &str, now: Millis) -> Result<(), Refusal> {
        let rank = self.member_rank(worker_id, task_id, attempt, secret)?;
        self.touch(worker_id, now);
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
    #[allow(clippy::too_many_arguments)]
    pub fn fail(&mut self, worker_id: &str, task_id: &str, attempt: u32, secret: &str, kind: FailureKind, error: &str, now: Millis) -> Result<Retry, Refusal> {
        self.check_lease(worker_id, task_id, attempt, secret)?;
        self.touch(worker_id, now);
        Ok(self.end_attempt(task_id, kind, error))
    }

    fn drop_pending(&mut self, task_id: &str) {
        self.pending.retain(|_, lease| lease.task_id != task_id);
    }

    /// Ends the running attempt because it failed (charged to `max_attempts`).
    fn end_attempt(&mut self, task_id: &str, kind: FailureKind, error: &str) -> Retry {
        self.finish_attempt(task_id, Ending::Failed(kind), error)
    }

    fn finish_attempt(&mut self, task_id: &str, ending: Ending, error: &str) -> Retry {
        self.drop_pending(task_id);
        let max_lapses = self.timeouts.max_lapses;
        let task = self.tasks.get_mut(task_id).expect("caller checked");
        task.leases.clear();
        task.error = Some(error.to_string());
        self.running.remove(&(task.order, task.id.clone()));
        let give_up = match ending {
            Ending::Failed(kind) => kind == FailureKind::User || task.charged_attempts() >= task.max_attempts,
            Ending::Lapsed => {
                task.lapses += 1;
                if task.lapses > max_lapses {
                    task.error = Some(format!("{error} (its lease lapsed {} times, more than --max-lapses {max_lapses})", task.lapses));
                }
                task.lapses > max_lapses
            }
        };
        if give_up {
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
    ///
    /// A gap since the previous call longer than `stall_ms` means the coordinator itself was
    /// stalled (starved of CPU, paused): the heartbeats that arrived meanwhile may not have been
    /// heard in time, so every lease and worker is first credited with the stall.
    pub fn expire(&mut self, now: Millis) -> Vec<(String, Retry)> {
        let previous = self.last_expire.replace(now);
        let stall = previous.map_or(0, |previous| now.saturating_sub(previous));
        if stall > self.timeouts.stall_ms {
            for (_, id) in &self.running {
                let task = self.tasks.get_mut(id).expect("running tasks exist");
                for lease in task.leases.iter_mut().filter(|lease| **lease != FINISHED) {
                    *lease = lease.saturating_add(stall);
                }
            }
            for worker in self.workers.values_mut() {
                worker.last_seen = worker.last_seen.saturating_add(stall).min(now);
            }
        }
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
                let retry = self.finish_attempt(&id, Ending::Lapsed, &format!("lease lapsed: worker {worker} went silent"));
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
            task.lapses = 0;
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

    /// Why each unfinished task of the sweep is not making progress, by task id: for a queued
    /// task, what it waits for ([`waiting_reason`]); for a running task, a worker holding it that
    /// has not been heard from for more than half a lease ("worker w1 silent for 3.2 s"), before
    /// its lease lapses. Tasks that are fine are left out.
    pub fn waiting(&self, sweep_id: &str, now: Millis) -> HashMap<String, String> {
        self.waiting_in(sweep_id, 0..=Millis::MAX, now)
    }

    /// [`Self::waiting`] for the sweep's tasks whose order lies in `orders` (a page of them).
    pub fn waiting_in(&self, sweep_id: &str, orders: std::ops::RangeInclusive<u64>, now: Millis) -> HashMap<String, String> {
        self.waiting_where(sweep_id, *orders.end(), |order| orders.contains(&order), now)
    }

    /// [`Self::waiting`] for the sweep's tasks at the given orders (the trials a view shows).
    pub fn waiting_at(&self, sweep_id: &str, orders: &BTreeSet<u64>, now: Millis) -> HashMap<String, String> {
        let last = orders.last().copied().unwrap_or(0);
        self.waiting_where(sweep_id, last, |order| orders.contains(&order), now)
    }

    /// Why the sweep's `wanted` tasks (none past order `last`) are not making progress: walks the
    /// queue only up to `last`, and words only the wanted tasks' reasons.
    fn waiting_where(&self, sweep_id: &str, last: u64, wanted: impl Fn(u64) -> bool, now: Millis) -> HashMap<String, String> {
        let registered = self.workers.len() as u32;
        let busy = self.leases_by_worker();
        let reserved: &[String] = self.collecting.as_ref().map_or(&[], |c| &c.reserved);
        let free_workers: Vec<&WorkerEntry> = self
            .workers
            .iter()
            .filter(|(id, _)| !busy.contains_key(*id) && !self.pending.contains_key(*id) && !reserved.contains(id))
            .map(|(_, worker)| worker)
            .collect();
        let mut reasons = HashMap::new();
        // Queued tasks ahead of each task with the same needs: those its workers would run first.
        let mut ahead_by_needs: Vec<(Needs, usize)> = Vec::new();
        // The workers each kind of task could use (at most four kinds of needs).
        let mut counts_by_needs: Vec<(Needs, WorkerCounts)> = Vec::new();
        for (order, id) in &self.queue {
            if *order > last {
                break;
            }
            let task = &self.tasks[id];
            let ahead = match ahead_by_needs.iter_mut().find(|(needs, _)| *needs == task.needs) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    ahead_by_needs.push((task.needs, 1));
                    0
                }
            };
            if task.sweep_id != sweep_id || !wanted(*order) {
                continue;
            }
            let ahead = if self.collecting.as_ref().is_some_and(|c| &c.task_id == id) { 0 } else { ahead };
            let counts = match counts_by_needs.iter().find(|(needs, _)| *needs == task.needs) {
                Some((_, counts)) => *counts,
                None => {
                    let able = self.able_workers(task.needs);
                    let free = free_workers.iter().filter(|w| w.abilities.cover(task.needs)).count() as u32;
                    let counts = WorkerCounts { registered, able, free };
                    counts_by_needs.push((task.needs, counts));
                    counts
                }
            };
            reasons.insert(id.clone(), waiting_reason(task.gang_size, task.needs, counts, ahead));
        }
        for (_, id) in &self.running {
            let task = &self.tasks[id];
            if task.sweep_id != sweep_id || !wanted(task.order) {
                continue;
            }
            let silent = task
                .members
                .iter()
                .filter(|w| task.active_rank_of(w).is_some())
                .filter_map(|w| self.workers.get(w).map(|entry| (entry, now.saturating_sub(entry.last_seen))))
                .filter(|(_, quiet)| *quiet > self.timeouts.lease_ms / 2)
                .max_by_key(|(_, quiet)| *quiet);
            if let Some((worker, quiet)) = silent {
                reasons.insert(id.clone(), format!("worker {} silent for {:.1} s", worker.name, quiet as f64 / 1000.0));
            }
        }
        reasons
    }

    /// The workers holding the task (the last ones, after it ended), by the names they
    /// registered with where known, else by id.
    pub fn member_names(&self, task: &TaskEntry) -> Vec<String> {
        task.members.iter().map(|id| self.worker_name(id).map_or_else(|| id.clone(), str::to_string)).collect()
    }

    /// The name a worker registered with, if it is registered.
    pub fn worker_name(&self, worker_id: &str) -> Option<&str> {
        self.workers.get(worker_id).map(|w| w.name.as_str())
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

    /// Ends the given unfinished tasks as pruned (early stopping, [`crate::prune`]), recording
    /// `reason` as their error; returns the changed ids. Queued ones leave the queue; running
    /// ones lose their leases, so their workers are told to abandon them at the next heartbeat
    /// and every later report (metrics, completion, failure) is refused: a pruned trial is never
    /// retried. Ended tasks are left as they are.
    pub fn prune(&mut self, task_ids: &[String], reason: &str) -> Vec<String> {
        let mut changed = Vec::new();
        for id in task_ids {
            let Some(task) = self.tasks.get_mut(id).filter(|t| !t.state.is_terminal()) else {
                continue;
            };
            self.queue.remove(&(task.order, task.id.clone()));
            self.running.remove(&(task.order, task.id.clone()));
            task.state = TaskState::Pruned;
            task.leases.clear();
            task.error = Some(reason.to_string());
            changed.push(task.id.clone());
        }
        if self.collecting.as_ref().is_some_and(|c| changed.contains(&c.task_id)) {
            self.collecting = None;
        }
        self.pending.retain(|_, lease| !changed.contains(&lease.task_id));
        changed
    }
}

/// The workers a queued task could use, as [`waiting_reason`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Registered workers.
    pub registered: u32,
    /// Those whose abilities cover the task's needs.
    pub able: u32,
    /// Those of the able ones that are free (no lease, not reserved for a gang).
    pub free: u32,
}

/// Why a queued task that needs `gang_size` workers at once, each offering `needs`, has not
/// started, given the workers it could use and the queued tasks `ahead` of it in the FIFO with
/// the same needs.
pub fn waiting_reason(gang_size: u32, needs: Needs, counts: WorkerCounts, ahead: usize) -> String {
    let WorkerCounts { registered, able, free } = counts;
    if registered == 0 {
        return "waiting: no worker connected".into();
    }
    let with = match (needs.cuda, needs.commands) {
        (true, true) => " with a CUDA device and --allow-commands",
        (true, false) => " with a CUDA device",
        (false, true) => " with --allow-commands",
        (false, false) => "",
    };
    if able == 0 {
        return match (needs.cuda, needs.commands) {
            (false, true) => format!("waiting: none of the {registered} connected workers allows command trials (start one with --allow-commands)"),
            _ => format!("waiting: none of the {registered} connected workers has the device it needs (it runs on workers{with})"),
        };
    }
    let registered = able;
    if gang_size > registered {
        return format!("waiting: a gang of {gang_size} needs {gang_size} workers{with}, {registered} connected");
    }
    if ahead > 0 {
        let trials = if ahead == 1 { "trial" } else { "trials" };
        return match free {
            0 => format!("waiting: {ahead} earlier {trials} queued, all {registered} workers busy"),
            _ => format!("waiting: {ahead} earlier {trials} queued"),
        };
    }
    if gang_size > 1 && gang_size > free {
        return format!("waiting: a gang of {gang_size} with {free} of {registered} workers free");
    }
    if free == 0 {
        return format!("waiting: all {registered} workers busy");
    }
    "waiting: next to start".into()
}

/// How an attempt ended, for the budgets.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Reported failed, or lost: charged to `max_attempts`.
    Failed(FailureKind),
    /// Its lease lapsed: charged to `max_lapses`.
    Lapsed,
}

/// Whether `worker_id` holds a rank of the task's running `attempt` and proves it with that
/// rank's secret.
fn holds(task: &TaskEntry, worker_id: &str, attempt: u32, secret: &str) -> bool {
    task.state == TaskState::Running
        && task.attempt == attempt
        && task.rank_of(worker_id).is_some_and(|rank| task.secrets.get(rank).is_some_and(|expected| secrets_match(secret, expected)))
}

/// Whether `lease` (as a re-registering worker presents it) proves the task's running attempt
/// at its rank: the attempt and that rank's secret.
fn proves(task: &TaskEntry, lease: &Lease) -> bool {
    let rank = lease.rank as usize;
    task.state == TaskState::Running
        && task.attempt == lease.attempt
        && rank < task.members.len()
        && task.secrets.get(rank).is_some_and(|expected| secrets_match(&lease.secret, expected))
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

    /// A lease as a test names it; `heartbeat_as` and friends fill in the holder's secret.
    fn held(task_id: &str, attempt: u32) -> Lease {
        Lease { task_id: task_id.into(), attempt, rank: 0, world: 1, secret: String::new() }
    }

    fn session(worker_id: &str) -> String {
        format!("session-{worker_id}")
    }

    fn new_scheduler(lease_ms: Millis, worker_ms: Millis) -> Scheduler {
        let mut minted = 0u64;
        let source = SecretSource::new(move || {
            minted += 1;
            format!("secret-{minted}")
        });
        Scheduler::new(Timeouts { lease_ms, worker_ms, max_lapses: 10, stall_ms: Millis::MAX }, source)
    }

    impl Scheduler {
        /// The secret of `worker_id`'s rank in the task's current attempt ("" when it holds none).
        fn secret_of(&self, task_id: &str, worker_id: &str) -> String {
            let task = &self.tasks[task_id];
            task.rank_of(worker_id).and_then(|rank| task.secrets.get(rank)).cloned().unwrap_or_default()
        }

        fn heartbeat_as(&mut self, worker_id: &str, now: Millis, running: &[Lease]) -> Result<Vec<String>, Refusal> {
            let running: Vec<Lease> = running
                .iter()
                .map(|l| Lease { secret: if l.secret.is_empty() { self.secret_of(&l.task_id, worker_id) } else { l.secret.clone() }, ..l.clone() })
                .collect();
            self.heartbeat(worker_id, &session(worker_id), now, &running)
        }

        fn complete_as(&mut self, worker_id: &str, task_id: &str, attempt: u32, now: Millis) -> Result<(), Refusal> {
            let secret = self.secret_of(task_id, worker_id);
            self.complete(worker_id, task_id, attempt, &secret, now)
        }

        fn fail_as(&mut self, worker_id: &str, task_id: &str, attempt: u32, kind: FailureKind, error: &str, now: Millis) -> Result<Retry, Refusal> {
            let secret = self.secret_of(task_id, worker_id);
            self.fail(worker_id, task_id, attempt, &secret, kind, error, now)
        }
    }

    fn scheduler(tasks: &[&str]) -> Scheduler {
        let mut s = new_scheduler(100, 1000);
        for (i, id) in tasks.iter().enumerate() {
            s.insert(task(id, i as u64), 0);
        }
        s.register("w1", "one", &session("w1"), 0, &[]);
        s.register("w2", "two", &session("w2"), 0, &[]);
        s
    }

    #[test]
    fn tasks_go_out_in_fifo_order_once() {
        let mut s = scheduler(&["a", "b"]);
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap().unwrap(), Lease { secret: "secret-1".into(), ..held("a", 1) });
        assert_eq!(s.acquire("w2", &session("w2"), 1).unwrap().unwrap().task_id, "b");
        s.complete_as("w1", "a", 1, 1).unwrap();
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap(), None);
        assert_eq!(s.acquire("ghost", &session("ghost"), 1), Err(Refusal::UnknownWorker("ghost".into())));
    }

    #[test]
    fn result_is_recorded_exactly_once() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", &session("w1"), 1).unwrap();
        s.complete_as("w1", "a", 1, 2).unwrap();
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
        assert!(matches!(s.complete_as("w1", "a", 1, 3), Err(Refusal::StaleLease { .. })));
        assert!(matches!(s.fail_as("w1", "a", 1, FailureKind::Infrastructure, "x", 3), Err(Refusal::StaleLease { .. })));
    }

    #[test]
    fn lapsed_lease_requeues_and_late_report_is_refused() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", &session("w1"), 0).unwrap();
        assert!(s.expire(50).is_empty());
        s.heartbeat_as("w1", 50, &[held("a", 1)]).unwrap();
        assert!(s.expire(120).is_empty(), "the heartbeat renewed the lease");
        assert_eq!(s.expire(150), vec![("a".to_string(), Retry::Requeued)]);
        assert_eq!(s.task("a").unwrap().state, TaskState::Queued);
        let lease = s.acquire("w2", &session("w2"), 160).unwrap().unwrap();
        assert_eq!(lease.attempt, 2);
        // The presumed-dead worker wakes up: its reports are refused, its heartbeat told to abandon.
        assert!(matches!(s.complete_as("w1", "a", 1, 170), Err(Refusal::StaleLease { .. })));
        assert_eq!(s.heartbeat_as("w1", 170, &[held("a", 1)]).unwrap(), vec!["a".to_string()]);
        s.complete_as("w2", "a", 2, 180).unwrap();
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
    }

    #[test]
    fn attempts_are_bounded_and_user_errors_are_not_retried() {
        let mut s = scheduler(&["a", "b"]);
        for attempt in 1..=3 {
            let lease = s.acquire("w1", &session("w1"), 0).unwrap().unwrap();
            assert_eq!((lease.task_id.as_str(), lease.attempt), ("a", attempt));
            let retry = s.fail_as("w1", "a", attempt, FailureKind::Infrastructure, "boom", 0).unwrap();
            assert_eq!(retry, if attempt < 3 { Retry::Requeued } else { Retry::GaveUp });
        }
        assert_eq!(s.task("a").unwrap().state, TaskState::Failed);
        assert_eq!(s.task("a").unwrap().error.as_deref(), Some("boom"));
        s.acquire("w1", &session("w1"), 0).unwrap();
        assert_eq!(s.fail_as("w1", "b", 1, FailureKind::User, "nan", 0).unwrap(), Retry::GaveUp);
    }

    #[test]
    fn silent_workers_are_forgotten_and_can_reattach() {
        let mut s = scheduler(&["a"]);
        s.acquire("w1", &session("w1"), 0).unwrap();
        s.heartbeat_as("w2", 900, &[]).unwrap();
        s.heartbeat_as("w1", 90, &[held("a", 1)]).unwrap();
        let _ = s.expire(1500);
        assert_eq!(s.heartbeat_as("w1", 1500, &[]), Err(Refusal::UnknownWorker("w1".into())));
        // After a coordinator restart the task is reloaded as running and its worker re-registers.
        let mut restarted = new_scheduler(100, 1000);
        let mut running = task("a", 0);
        running.state = TaskState::Running;
        running.attempt = 1;
        running.members = vec!["old-id".into()];
        running.secrets = vec!["stored-secret".into()];
        restarted.insert(running, 0);
        let lease = Lease { secret: "stored-secret".into(), ..held("a", 1) };
        let stale = Lease { secret: "stored-secret".into(), ..held("gone", 1) };
        let (abandon, changed) = restarted.register("new-id", "one", &session("new-id"), 10, &[lease, stale]);
        assert_eq!(abandon, vec!["gone".to_string()]);
        assert_eq!(changed, vec!["a".to_string()]);
        restarted.assert_indexes_agree();
        restarted.complete_as("new-id", "a", 1, 20).unwrap();
        restarted.assert_indexes_agree();
    }

    /// Naming a task (ids are guessable) proves nothing: re-registering with another worker's
    /// task, reporting on it or completing it is refused without the lease's secret, and the
    /// holder keeps its lease.
    #[test]
    fn only_the_lease_secret_proves_a_lease() {
        let mut s = scheduler(&["a"]);
        let lease = s.acquire("w1", &session("w1"), 0).unwrap().unwrap();
        assert!(!lease.secret.is_empty());
        let forged = Lease { secret: "guess".into(), ..lease.clone() };
        let (abandon, changed) = s.register("impostor", "evil", &session("impostor"), 1, std::slice::from_ref(&forged));
        assert_eq!(abandon, vec!["a".to_string()], "the impostor is told to drop what it claimed");
        assert!(changed.is_empty());
        assert_eq!(s.task("a").unwrap().members, vec!["w1"], "the holder keeps its lease");
        assert_eq!(s.complete("impostor", "a", 1, &lease.secret, 2), Err(Refusal::NotLeaseHolder { task_id: "a".into(), attempt: 1 }), "a stolen secret needs the holder's identity too");
        assert_eq!(s.complete("w1", "a", 1, "guess", 2), Err(Refusal::NotLeaseHolder { task_id: "a".into(), attempt: 1 }));
        assert_eq!(s.fail("w1", "a", 1, "", FailureKind::User, "x", 2), Err(Refusal::NotLeaseHolder { task_id: "a".into(), attempt: 1 }));
        assert_eq!(s.heartbeat("impostor", &session("impostor"), 3, &[forged]).unwrap(), vec!["a".to_string()]);
        assert_eq!(s.heartbeat("w1", &session("w1"), 3, std::slice::from_ref(&lease)).unwrap(), Vec::<String>::new());
        s.complete("w1", "a", 1, &lease.secret, 4).unwrap();
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
    }

    #[test]
    fn a_worker_acts_as_itself_only_with_its_session() {
        let mut s = scheduler(&["a"]);
        assert_eq!(s.acquire("w1", "session-w2", 0), Err(Refusal::WrongSession("w1".into())));
        assert_eq!(s.acquire("w1", "", 0), Err(Refusal::WrongSession("w1".into())));
        assert_eq!(s.heartbeat("w1", "nope", 0, &[]), Err(Refusal::WrongSession("w1".into())));
        assert_eq!(s.task("a").unwrap().state, TaskState::Queued, "a refused call changes nothing");
        assert!(s.acquire("w1", &session("w1"), 0).unwrap().is_some());
    }

    #[test]
    fn a_worker_holds_one_lease_at_a_time() {
        let mut s = scheduler(&["a", "b"]);
        let first = s.acquire("w1", &session("w1"), 0).unwrap().unwrap();
        let second = s.acquire("w1", &session("w1"), 1).unwrap().unwrap();
        assert_eq!((first.task_id.as_str(), second.task_id.as_str(), second.attempt), ("a", "a", 2), "asking again gave up the first run");
        assert!(s.task("a").unwrap().error.as_deref().unwrap().contains("asked for new work"));
        assert_eq!(s.complete("w1", "a", 1, &first.secret, 2), Err(Refusal::StaleLease { task_id: "a".into(), attempt: 1 }));
        assert_eq!(s.leases_by_worker().len(), 1);
    }

    #[test]
    fn lapses_have_their_own_budget() {
        let mut s = new_scheduler(100, 1_000_000);
        s.insert(task("a", 0), 0);
        s.register("w1", "one", &session("w1"), 0, &[]);
        let mut now = 0;
        for lapse in 1..=10 {
            assert_eq!(s.acquire("w1", &session("w1"), now).unwrap().unwrap().attempt, lapse);
            now += 50;
            assert!(s.expire(now).is_empty());
            now += 60;
            assert_eq!(s.expire(now), vec![("a".to_string(), Retry::Requeued)], "lapse {lapse} is not one of the 3 attempts");
        }
        // Failures still have all three attempts.
        for failure in 1..=3 {
            let lease = s.acquire("w1", &session("w1"), now).unwrap().unwrap();
            let retry = s.fail("w1", "a", lease.attempt, &lease.secret, FailureKind::Infrastructure, "boom", now).unwrap();
            assert_eq!(retry, if failure < 3 { Retry::Requeued } else { Retry::GaveUp });
        }
        // A trial that keeps lapsing still ends.
        let mut s = new_scheduler(100, 1_000_000);
        s.insert(task("b", 0), 0);
        s.register("w1", "one", &session("w1"), 0, &[]);
        let mut outcomes = Vec::new();
        for _ in 0..11 {
            s.acquire("w1", &session("w1"), now).unwrap().unwrap();
            now += 50;
            let _ = s.expire(now);
            now += 60;
            outcomes.extend(s.expire(now).into_iter().map(|(_, retry)| retry));
        }
        assert_eq!(outcomes.last(), Some(&Retry::GaveUp));
        assert_eq!(outcomes.iter().filter(|r| **r == Retry::Requeued).count(), 10);
        assert!(s.task("b").unwrap().error.as_deref().unwrap().contains("--max-lapses"));
    }

    /// A coordinator that was itself stalled (no expiry pass for longer than half a lease) does
    /// not blame its workers for heartbeats it could not hear.
    #[test]
    fn a_stalled_coordinator_credits_leases_with_the_stall() {
        let mut s = new_scheduler(100, 1000);
        s.timeouts.stall_ms = 50;
        s.insert(task("a", 0), 0);
        s.register("w1", "one", &session("w1"), 0, &[]);
        s.acquire("w1", &session("w1"), 0).unwrap().unwrap();
        assert!(s.expire(10).is_empty());
        assert!(s.expire(500).is_empty(), "a 490 ms stall is not the worker's silence");
        let mut now = 500;
        let mut lapsed = Vec::new();
        while lapsed.is_empty() && now < 1000 {
            now += 20;
            lapsed = s.expire(now);
        }
        assert_eq!(now, 600, "the lease ran its full 100 ms plus the 490 ms stall");
    }

    #[test]
    fn a_range_is_unfinished_while_one_of_its_tasks_is_queued_or_running() {
        let mut s = scheduler(&["a", "b", "c"]);
        assert!(s.any_unfinished(0..2));
        assert_eq!(s.acquire("w1", &session("w1"), 0).unwrap().unwrap().task_id, "a");
        assert_eq!(s.acquire("w2", &session("w2"), 0).unwrap().unwrap().task_id, "b");
        s.complete_as("w1", "a", 1, 1).unwrap();
        assert!(s.any_unfinished(0..2), "b still runs");
        s.complete_as("w2", "b", 1, 1).unwrap();
        assert!(!s.any_unfinished(0..2));
        assert!(s.any_unfinished(2..3), "c is queued");
        s.acquire("w1", &session("w1"), 2).unwrap();
        assert_eq!(s.fail_as("w1", "c", 1, FailureKind::Infrastructure, "x", 2).unwrap(), Retry::Requeued);
        assert!(s.any_unfinished(2..3), "c is queued again");
        s.assert_indexes_agree();
        s.acquire("w1", &session("w1"), 3).unwrap();
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
        s.acquire("w1", &session("w1"), 0).unwrap();
        s.complete_as("w1", "a", 1, 0).unwrap();
        s.acquire("w1", &session("w1"), 0).unwrap();
        s.fail_as("w1", "b", 1, FailureKind::User, "bad", 0).unwrap();
        s.cancel_sweep("s");
        let mut changed = s.retry_sweep("s", |_| 2);
        changed.sort();
        assert_eq!(changed, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(s.task("a").unwrap().state, TaskState::Succeeded);
        assert_eq!(s.task("b").unwrap().max_attempts, 3, "one used plus two more");
        let lease = s.acquire("w2", &session("w2"), 1).unwrap().unwrap();
        assert_eq!((lease.task_id.as_str(), lease.attempt), ("b", 2));
    }

    #[test]
    fn cancel_removes_queued_and_running_tasks() {
        let mut s = scheduler(&["a", "b"]);
        s.acquire("w1", &session("w1"), 0).unwrap();
        let mut changed = s.cancel_sweep("s");
        changed.sort();
        assert_eq!(changed, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(s.acquire("w2", &session("w2"), 0).unwrap(), None);
        assert_eq!(s.heartbeat_as("w1", 1, &[held("a", 1)]).unwrap(), vec!["a".to_string()]);
    }

    fn gang(id: &str, order: u64, size: u32) -> TaskEntry {
        TaskEntry::queued(id.into(), "s".into(), order, 3, size)
    }

    fn workers(s: &mut Scheduler, ids: &[&str]) {
        for id in ids {
            s.register(id, id, &session(id), 0, &[]);
        }
    }

    #[test]
    fn a_gang_starts_all_or_nothing_with_ranks() {
        let mut s = new_scheduler(100, 1000);
        s.insert(gang("g", 0, 3), 0);
        s.insert(task("small", 1), 0);
        workers(&mut s, &["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap(), None, "reserved, waiting for the others");
        assert_eq!(s.acquire("w1", &session("w1"), 2).unwrap(), None, "still waiting");
        assert_eq!(s.acquire("w2", &session("w2"), 2).unwrap(), None, "the small task behind the gang does not jump the queue");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
        let third = s.acquire("w3", &session("w3"), 3).unwrap().unwrap();
        assert_eq!((third.rank, third.world, third.attempt), (2, 3, 1));
        assert_eq!(s.task("g").unwrap().members, vec!["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", &session("w1"), 4).unwrap().unwrap().rank, 0);
        assert_eq!(s.acquire("w2", &session("w2"), 4).unwrap().unwrap().rank, 1);
        // Every member reports under the same task; a finished rank > 0 no longer lapses, and
        // rank 0's completion ends the task once.
        s.heartbeat_as("w2", 5, &[Lease { rank: 1, world: 3, ..held("g", 1) }]).unwrap();
        s.complete_as("w2", "g", 1, 6).unwrap();
        s.complete_as("w3", "g", 1, 6).unwrap();
        assert_eq!(s.task("g").unwrap().state, TaskState::Running);
        s.heartbeat_as("w1", 90, &[held("g", 1)]).unwrap();
        assert!(s.expire(150).is_empty(), "finished ranks do not lapse");
        s.complete_as("w1", "g", 1, 160).unwrap();
        assert_eq!(s.task("g").unwrap().state, TaskState::Succeeded);
        assert!(matches!(s.complete_as("w1", "g", 1, 170), Err(Refusal::StaleLease { .. })));
        assert_eq!(s.acquire("w2", &session("w2"), 170).unwrap().unwrap().task_id, "small");
    }

    #[test]
    fn a_gang_too_large_for_the_cluster_blocks_nobody() {
        let mut s = new_scheduler(100, 1000);
        s.insert(gang("g", 0, 4), 0);
        s.insert(task("small", 1), 0);
        workers(&mut s, &["w1", "w2"]);
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap().unwrap().task_id, "small");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
    }

    #[test]
    fn two_gangs_never_deadlock() {
        let mut s = new_scheduler(1000, 10_000);
        s.insert(gang("g1", 0, 2), 0);
        s.insert(gang("g2", 1, 2), 0);
        workers(&mut s, &["w1", "w2", "w3"]);
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap(), None);
        assert_eq!(s.acquire("w2", &session("w2"), 1).unwrap().unwrap().task_id, "g1");
        assert_eq!(s.acquire("w1", &session("w1"), 1).unwrap().unwrap().task_id, "g1");
        assert_eq!(s.acquire("w3", &session("w3"), 1).unwrap(), None, "w3 waits for g2's second worker");
        s.complete_as("w1", "g1", 1, 2).unwrap();
        assert_eq!(s.acquire("w1", &session("w1"), 3).unwrap().unwrap().task_id, "g2");
        let lease = s.acquire("w3", &session("w3"), 3).unwrap().unwrap();
        assert_eq!((lease.task_id.as_str(), lease.rank), ("g2", 0));
    }

    #[test]
    fn one_lapsed_member_fails_the_gang_attempt_and_the_rest_abandon() {
        let mut s = new_scheduler(100, 10_000);
        s.insert(gang("g", 0, 2), 0);
        workers(&mut s, &["w1", "w2"]);
        s.acquire("w1", &session("w1"), 0).unwrap();
        s.acquire("w2", &session("w2"), 0).unwrap().unwrap();
        let rank0 = s.acquire("w1", &session("w1"), 0).unwrap().unwrap();
        s.heartbeat_as("w1", 90, &[rank0.clone()]).unwrap();
        assert_eq!(s.expire(150), vec![("g".to_string(), Retry::Requeued)], "w2 went silent");
        assert_eq!(s.heartbeat_as("w1", 160, &[rank0]).unwrap(), vec!["g".to_string()], "w1 is told to stop");
        assert_eq!(s.task("g").unwrap().state, TaskState::Queued);
        // A reserved worker that dies releases its reservation.
        assert_eq!(s.acquire("w1", &session("w1"), 170).unwrap(), None);
        let _ = s.expire(20_000);
        s.register("w3", "w3", &session("w3"), 20_000, &[]);
        s.register("w4", "w4", &session("w4"), 20_000, &[]);
        assert_eq!(s.acquire("w3", &session("w3"), 20_001).unwrap(), None);
        assert_eq!(s.acquire("w4", &session("w4"), 20_001).unwrap().unwrap().attempt, 2);
    }

    /// A randomized run of interleaved events: every task ends terminal, succeeds at most once,
    /// never runs on two workers at once, and runs only on workers able to run it (some tasks
    /// and one gang need command trials, which w2 does not run).
    #[test]
    fn random_interleavings_keep_the_invariants() {
        for seed in 0..50u64 {
            let ids: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut s = scheduler(&refs);
            s.register("w3", "three", &session("w3"), 0, &[]);
            let commands = Needs { commands: true, ..Needs::default() };
            let abilities = |w: &str| Abilities { cuda: false, commands: w != "w2" };
            for w in ["w1", "w2", "w3"] {
                s.set_profile(w, "cpu", abilities(w));
            }
            for (order, id) in [(5u64, "gang-a"), (12, "gang-b")] {
                let needs = if id == "gang-b" { commands } else { Needs::default() };
                s.insert(gang(id, order * 2 + 1, 2).with_needs(needs), 0);
            }
            for id in ["t3", "t8", "t13"] {
                let task = s.tasks.get_mut(id).unwrap();
                task.needs = commands;
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
                        if let Ok(Some(lease)) = s.acquire(w, &session(w), now) {
                            held.insert(w, lease);
                        }
                    }
                    0..=2 => {
                        if let Some(lease) = held.remove(w) {
                            let before = s.task(&lease.task_id).unwrap().state;
                            let accepted = s.complete(w, &lease.task_id, lease.attempt, &lease.secret, now).is_ok();
                            let after = s.task(&lease.task_id).unwrap().state;
                            if accepted && before != TaskState::Succeeded && after == TaskState::Succeeded {
                                *successes.entry(lease.task_id).or_default() += 1;
                            }
                            assert!(before != TaskState::Succeeded || after == TaskState::Succeeded, "seed {seed}: a result was undone");
                        }
                    }
                    3 => {
                        if let Some(lease) = held.remove(w) {
                            let _ = s.fail(w, &lease.task_id, lease.attempt, &lease.secret, FailureKind::Infrastructure, "x", now);
                        }
                    }
                    _ => {
                        let running: Vec<Lease> = held.get(w).cloned().into_iter().collect();
                        // An impostor with the same worker token names the same task: it is told
                        // to abandon it, and the holder keeps its lease.
                        if let Some(lease) = running.first() {
                            let forged = Lease { secret: "guessed".into(), ..lease.clone() };
                            let (abandon, changed) = s.register("impostor", "evil", &session("impostor"), now, std::slice::from_ref(&forged));
                            assert_eq!((abandon, changed), (vec![forged.task_id.clone()], vec![]), "seed {seed}");
                            assert!(s.complete("impostor", &forged.task_id, forged.attempt, &forged.secret, now).is_err());
                        }
                        match s.heartbeat(w, &session(w), now, &running) {
                            Ok(abandon) => {
                                if held.get(w).is_some_and(|l| abandon.contains(&l.task_id)) {
                                    held.remove(w);
                                }
                            }
                            Err(_) => {
                                let (abandon, _) = s.register(w, w, &session(w), now, &running);
                                s.set_profile(w, "cpu", abilities(w));
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
                        assert!(abilities(member).cover(t.needs), "seed {seed}: {} runs on {member}, which cannot run it", t.id);
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

    #[test]
    fn waiting_reasons_name_what_a_queued_task_lacks() {
        let any = Needs::default();
        let counts = |registered, free| WorkerCounts { registered, able: registered, free };
        assert_eq!(waiting_reason(1, any, counts(0, 0), 0), "waiting: no worker connected");
        assert_eq!(waiting_reason(2, any, counts(1, 1), 0), "waiting: a gang of 2 needs 2 workers, 1 connected");
        assert_eq!(waiting_reason(2, any, counts(3, 1), 0), "waiting: a gang of 2 with 1 of 3 workers free");
        assert_eq!(waiting_reason(1, any, counts(2, 0), 0), "waiting: all 2 workers busy");
        assert_eq!(waiting_reason(1, any, counts(2, 0), 3), "waiting: 3 earlier trials queued, all 2 workers busy");
        let commands = Needs { commands: true, ..Needs::default() };
        let cuda = Needs { cuda: true, ..Needs::default() };
        let none_able = WorkerCounts { registered: 2, able: 0, free: 0 };
        assert_eq!(
            waiting_reason(1, commands, none_able, 0),
            "waiting: none of the 2 connected workers allows command trials (start one with --allow-commands)"
        );
        assert_eq!(
            waiting_reason(2, cuda, none_able, 0),
            "waiting: none of the 2 connected workers has the device it needs (it runs on workers with a CUDA device)"
        );
        let one_able = WorkerCounts { registered: 3, able: 1, free: 1 };
        assert_eq!(waiting_reason(2, cuda, one_able, 0), "waiting: a gang of 2 needs 2 workers with a CUDA device, 1 connected");
    }

    #[test]
    fn tasks_go_only_to_workers_that_can_run_them() {
        let mut s = new_scheduler(10_000, 60_000);
        let commands = Needs { commands: true, ..Needs::default() };
        let cuda = Needs { cuda: true, ..Needs::default() };
        s.insert(task("cmd", 1).with_needs(commands), 0);
        s.insert(TaskEntry::queued("nccl".into(), "s".into(), 2, 3, 2).with_needs(cuda), 0);
        s.insert(task("plain", 3), 0);
        s.register("cpu", "cpu", &session("cpu"), 0, &[]);
        s.set_profile("cpu", "cpu", Abilities::default());
        let reasons = s.waiting("s", 0);
        assert!(reasons["cmd"].contains("allows command trials"), "{reasons:?}");
        assert!(reasons["nccl"].contains("the device it needs"), "{reasons:?}");
        // The plain worker passes over what it cannot run.
        assert_eq!(s.acquire("cpu", &session("cpu"), 1).unwrap().map(|l| l.task_id).as_deref(), Some("plain"));
        let secret = s.task("plain").unwrap().secrets[0].clone();
        s.complete("cpu", "plain", 1, &secret, 1).unwrap();
        s.register("gpu0", "gpu0", &session("gpu0"), 0, &[]);
        s.set_profile("gpu0", "cuda:0", Abilities { cuda: true, commands: false });
        assert!(s.waiting("s", 1)["nccl"].contains("a gang of 2 needs 2 workers with a CUDA device, 1 connected"));
        assert_eq!(s.acquire("gpu0", &session("gpu0"), 1).unwrap(), None, "a gang of 2 with one able worker never gathers");
        s.register("gpu1", "gpu1", &session("gpu1"), 0, &[]);
        s.set_profile("gpu1", "cuda:1", Abilities { cuda: true, commands: true });
        // gpu1 could run the command trial, and it is older: it takes that; the gang then gathers.
        assert_eq!(s.acquire("gpu1", &session("gpu1"), 2).unwrap().map(|l| l.task_id).as_deref(), Some("cmd"));
        let secret = s.task("cmd").unwrap().secrets[0].clone();
        s.complete("gpu1", "cmd", 1, &secret, 3).unwrap();
        assert_eq!(s.acquire("gpu0", &session("gpu0"), 4).unwrap(), None, "gathering");
        // While the gang gathers, the CPU worker is given nothing it cannot run.
        s.insert(task("plain2", 4), 0);
        assert_eq!(s.acquire("cpu", &session("cpu"), 4).unwrap().map(|l| l.task_id).as_deref(), Some("plain2"));
        let lease = s.acquire("gpu1", &session("gpu1"), 5).unwrap().expect("the gang starts");
        assert_eq!((lease.task_id.as_str(), lease.world), ("nccl", 2));
        assert_eq!(s.task("nccl").unwrap().members, vec!["gpu0".to_string(), "gpu1".to_string()]);
    }

    #[test]
    fn the_scheduler_says_why_tasks_wait_and_which_workers_went_silent() {
        let mut s = new_scheduler(10_000, 60_000);
        s.insert(task("a", 1), 0);
        s.insert(TaskEntry::queued("g".into(), "s".into(), 2, 3, 2), 0);
        assert_eq!(s.waiting("s", 0)["a"], "waiting: no worker connected");
        s.register("w1", "alpha", &session("w1"), 0, &[]);
        assert_eq!(s.waiting("s", 0)["g"], "waiting: a gang of 2 needs 2 workers, 1 connected");
        assert_eq!(s.acquire("w1", &session("w1"), 0).unwrap().unwrap().task_id, "a");
        assert!(!s.waiting("s", 1_000).contains_key("a"), "a running task heard from is fine");
        // Silent for more than half a lease, the lease not yet lapsed.
        assert_eq!(s.waiting("s", 6_200)["a"], "worker alpha silent for 6.2 s");
        assert_eq!(s.worker_name("w1"), Some("alpha"));
    }
}
