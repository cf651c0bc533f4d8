//! The records the scheduler keeps and hands out: tasks and their needs, workers' abilities,
//! leases, refusals, the timeouts, and where lease secrets come from.

use crate::domain::TaskState;

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// The lease of a gang rank that reported its part done: it never lapses.
pub(super) const FINISHED: Millis = Millis::MAX;

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
    pub(super) fn charged_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.lapses)
    }

    /// The rank `worker_id` runs, if it is a member.
    pub(super) fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m == worker_id)
    }

    /// The rank `worker_id` still works on: a member whose part is not yet reported done.
    pub(super) fn active_rank_of(&self, worker_id: &str) -> Option<usize> {
        self.rank_of(worker_id).filter(|&rank| self.leases.get(rank).is_some_and(|&lease| lease != FINISHED))
    }
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

    /// The next secret.
    pub(super) fn next(&mut self) -> String {
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
