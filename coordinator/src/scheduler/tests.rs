//! The state machine's tests, the randomized interleavings that check its invariants among them.

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
            .map(|l| Lease {
                secret: if l.secret.is_empty() { self.secret_of(&l.task_id, worker_id) } else { l.secret.clone() },
                ..l.clone()
            })
            .collect();
        self.heartbeat(worker_id, &session(worker_id), now, &running)
    }

    fn complete_as(&mut self, worker_id: &str, task_id: &str, attempt: u32, now: Millis) -> Result<(), Refusal> {
        let secret = self.secret_of(task_id, worker_id);
        self.complete(worker_id, task_id, attempt, &secret, now)
    }

    fn fail_as(
        &mut self,
        worker_id: &str,
        task_id: &str,
        attempt: u32,
        kind: FailureKind,
        error: &str,
        now: Millis,
    ) -> Result<Retry, Refusal> {
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
    assert_eq!(
        s.complete("impostor", "a", 1, &lease.secret, 2),
        Err(Refusal::NotLeaseHolder { task_id: "a".into(), attempt: 1 }),
        "a stolen secret needs the holder's identity too"
    );
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
    s.heartbeat_as("w1", 90, std::slice::from_ref(&rank0)).unwrap();
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
