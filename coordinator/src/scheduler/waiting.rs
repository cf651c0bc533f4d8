//! Why a task is not making progress, worded for the user: a queued task's wait (no worker, no
//! able worker, a gang larger than the cluster, busy workers, trials ahead of it) and a running
//! task's silent worker.

use std::collections::{BTreeSet, HashMap};

use super::{Millis, Needs, Scheduler, WorkerEntry};

impl Scheduler {
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
            (false, true) => {
                format!("waiting: none of the {registered} connected workers allows command trials (start one with --allow-commands)")
            }
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
