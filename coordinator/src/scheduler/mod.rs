//! The scheduling state machine: which task runs where, leases, retries, gangs. Pure: no I/O,
//! no clock (callers pass `now` in milliseconds), no async. The caller persists the tasks a call
//! changed before acknowledging it, so every mutation says which those are: most return their
//! ids; [`Scheduler::acquire`] returns the lease it hands out (its task changed, and so did the
//! caller's unfinished lease, [`Scheduler::unfinished_lease_of`] before the call); a refused
//! call changes nothing.
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
//!
//! Layout: this file holds the state machine; `entries.rs` the records it keeps and hands out
//! (tasks, leases, refusals, timeouts); `waiting.rs` the wording of why a task waits; `tests.rs`
//! its tests, the randomized invariant test among them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;

use crate::domain::{FailureKind, TaskState};

mod entries;
#[cfg(test)]
mod tests;
mod waiting;

use entries::FINISHED;
pub use entries::{secrets_match, Abilities, Lease, Millis, Needs, Refusal, Retry, SecretSource, TaskEntry, Timeouts, WorkerSnapshot};
pub use waiting::{waiting_reason, WorkerCounts};

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
    ///
    /// Returns the caller's lease, or none (nothing it can run, or it was reserved for a gang
    /// still gathering). It does not list the tasks it changed: they are the returned lease's
    /// task and the unfinished lease it ended, which the caller reads with
    /// [`Self::unfinished_lease_of`] before the call. A gang's other members get their leases
    /// at their next call.
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
    pub fn fail(
        &mut self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        secret: &str,
        kind: FailureKind,
        error: &str,
        now: Millis,
    ) -> Result<Retry, Refusal> {
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
