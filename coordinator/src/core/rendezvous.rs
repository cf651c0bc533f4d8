//! The gang rendezvous: the members of one attempt of a gang announce their collective
//! addresses (rank 0 its NCCL id too) and wait until every rank has; each then gets all the
//! addresses by rank and the attempt's secret.
//!
//! The rendezvous has its own lock, taken only while the scheduler's is not held, so that
//! members waiting here never hold up the rest of the coordinator. An entry lives as long as its
//! attempt runs: it is dropped when the task ends through its lease holders
//! ([`Core::complete`], [`Core::fail`]), and otherwise by `Core::prune_rendezvous` on every
//! expiry pass and on cancel, once the scheduler no longer runs its attempt (a lapsed lease, an
//! abandoned task, a cancelled sweep, an attempt superseded by the next one).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{random_hex, Core, CoreError};
use crate::domain::TaskState;

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

/// The members of one gang attempt announcing their collective addresses.
#[derive(Debug)]
struct Gathering {
    attempt: u32,
    addresses: Vec<Option<String>>,
    secret: String,
    nccl_id: Vec<u8>,
}

impl Gathering {
    /// An attempt's gathering before anyone announced itself, with a fresh secret.
    fn new(attempt: u32, world: usize) -> Self {
        Self { attempt, addresses: vec![None; world], secret: random_hex(16), nccl_id: vec![] }
    }

    /// The rendezvous, once every rank has announced itself.
    fn finished(&self) -> Option<Rendezvous> {
        let peers = self.addresses.iter().cloned().collect::<Option<Vec<String>>>()?;
        Some(Rendezvous { peers, secret: self.secret.clone(), nccl_id: self.nccl_id.clone() })
    }
}

/// The rendezvous in progress, by task id (one attempt each: a later attempt replaces an
/// earlier one's), and the signal that someone announced itself.
#[derive(Debug, Default)]
pub(super) struct Gatherings {
    open: Mutex<HashMap<String, Gathering>>,
    gathered: tokio::sync::Notify,
}

impl Gatherings {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Gathering>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes rank `rank`'s address (and rank 0's NCCL id) for the attempt, replacing the
    /// gathering of an earlier attempt, and wakes the members waiting.
    fn announce(&self, task_id: &str, attempt: u32, world: usize, rank: usize, address: &str, nccl_id: Vec<u8>) {
        {
            let mut open = self.lock();
            let gathering = open.entry(task_id.to_string()).or_insert_with(|| Gathering::new(attempt, world));
            if gathering.attempt != attempt {
                *gathering = Gathering::new(attempt, world);
            }
            gathering.addresses[rank] = Some(address.to_string());
            if rank == 0 && !nccl_id.is_empty() {
                gathering.nccl_id = nccl_id;
            }
        }
        self.gathered.notify_waiters();
    }

    /// Waits up to `wait` for every rank of the attempt to announce itself.
    async fn wait(&self, task_id: &str, attempt: u32, wait: Duration) -> Option<Rendezvous> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.gathered.notified();
            if let Some(rendezvous) = self.lock().get(task_id).filter(|g| g.attempt == attempt).and_then(Gathering::finished) {
                return Some(rendezvous);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Drops a task's gathering, whatever its attempt.
    pub(super) fn forget(&self, task_id: &str) {
        self.lock().remove(task_id);
    }

    /// Every open gathering: (task id, attempt).
    fn attempts(&self) -> Vec<(String, u32)> {
        self.lock().iter().map(|(task_id, g)| (task_id.clone(), g.attempt)).collect()
    }

    /// Drops the gatherings of these attempts (not a later attempt's that replaced one since).
    fn forget_attempts(&self, stale: &[(String, u32)]) {
        let mut open = self.lock();
        for (task_id, attempt) in stale {
            if open.get(task_id).is_some_and(|g| g.attempt == *attempt) {
                open.remove(task_id);
            }
        }
    }

    /// How many gatherings are open.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Core {
    /// The first half of a member's rendezvous (the RPC `Rendezvous`): checks the member's lease
    /// (under the core's lock: the gRPC service calls this on the blocking pool) and records its
    /// collective address.
    pub fn announce(
        &self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        lease_secret: &str,
        address: &str,
        nccl_id: Vec<u8>,
    ) -> Result<(), CoreError> {
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
        self.gatherings.announce(task_id, attempt, world, rank, address, nccl_id);
        Ok(())
    }

    /// The second half of a member's rendezvous, after [`Core::announce`]: waits up to `wait` for
    /// every rank of the attempt to have announced itself; returns the rendezvous once they have.
    /// Takes none of the core's locks but the rendezvous' own.
    pub async fn gathered(&self, task_id: &str, attempt: u32, wait: Duration) -> Option<Rendezvous> {
        self.gatherings.wait(task_id, attempt, wait).await
    }

    /// Drops every rendezvous whose attempt the scheduler no longer runs: its task ended
    /// (cancelled, failed or requeued after a lapsed lease) or went on to a later attempt. The
    /// two locks are taken one after the other, never together; an entry announced meanwhile
    /// for an attempt that just ended goes on the next pass.
    pub(super) fn prune_rendezvous(&self) {
        let open = self.gatherings.attempts();
        if open.is_empty() {
            return;
        }
        let stale: Vec<(String, u32)> = {
            let inner = self.lock();
            let running = |task_id: &str, attempt: u32| {
                inner.scheduler.task(task_id).is_some_and(|t| t.state == TaskState::Running && t.attempt == attempt)
            };
            open.into_iter().filter(|(task_id, attempt)| !running(task_id, *attempt)).collect()
        };
        if !stale.is_empty() {
            tracing::debug!(dropped = stale.len(), "rendezvous of ended attempts dropped");
            self.gatherings.forget_attempts(&stale);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{open_with_dataset, register, run_one, SWEEP};

    /// The core tests' sweep, its `final` trained by a gang of two.
    fn gang_sweep() -> String {
        format!("{SWEEP}[distributed]\nreplicas = 2\n")
    }

    /// A rendezvous entry lives while its attempt runs and is dropped once the attempt ends:
    /// here by cancelling the sweep, with no member ever calling in again.
    #[tokio::test]
    async fn a_rendezvous_is_dropped_when_its_attempt_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(&gang_sweep(), "gang.toml", files, false).unwrap().sweep_id.unwrap();
        let core = std::sync::Arc::new(core);
        let first = register(&core, "w1");
        let second = register(&core, "w2");
        for val_mse in [0.5, 0.4, 0.3, 0.2] {
            run_one(&core, &first, val_mse).await;
        }
        let waiting = tokio::spawn({
            let (core, first) = (core.clone(), first.clone());
            async move { core.acquire(&first.id, &first.session, Duration::from_secs(30)).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let second_lease = core.acquire(&second.id, &second.session, Duration::ZERO).await.unwrap().expect("the gang is complete");
        let first_lease = waiting.await.unwrap().unwrap().expect("the gang is complete");
        let (rank0, rank0_lease) = if first_lease.rank == 0 { (&first, &first_lease) } else { (&second, &second_lease) };
        core.announce(&rank0.id, &rank0_lease.task_id, rank0_lease.attempt, &rank0_lease.lease_secret, "127.0.0.1:1", vec![]).unwrap();
        let alone = core.gathered(&rank0_lease.task_id, rank0_lease.attempt, Duration::ZERO).await;
        assert!(alone.is_none(), "the other member has not announced itself");
        assert_eq!(core.gatherings.len(), 1);
        core.expire_leases().unwrap();
        assert_eq!(core.gatherings.len(), 1, "a running attempt keeps its rendezvous");

        core.cancel(&sweep_id).unwrap();
        assert_eq!(core.gatherings.len(), 0, "the cancelled attempt's rendezvous is gone");
    }

    /// An entry of an attempt that ended without anyone telling the rendezvous goes on the
    /// next expiry pass; a finished rendezvous still answers both members.
    #[tokio::test]
    async fn the_expiry_pass_drops_rendezvous_of_ended_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        core.submit(&gang_sweep(), "gang.toml", files, false).unwrap();
        let worker = register(&core, "w1");
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
        // A stale entry, as a gang attempt that lapsed would leave behind.
        core.gatherings.announce(&dispatch.task_id, dispatch.attempt + 1, 2, 0, "127.0.0.1:1", vec![]);
        assert_eq!(core.gatherings.len(), 1);
        core.expire_leases().unwrap();
        assert_eq!(core.gatherings.len(), 0);
    }
}
