//! Early stopping's tests: the statistics, the race and the rungs on hand-made snapshots, and
//! whole pruning sweeps simulated on the real scheduler with random curves and interleavings.

use super::*;

fn settings(rule: PruneRule) -> PruneSection {
    PruneSection { rule, min_folds: 2, confidence: 0.95, grace_epochs: 2, reduction: 3 }
}

fn done(config: usize, fold: u32, score: f64) -> FoldTrial {
    FoldTrial { config, fold, state: TaskState::Succeeded, curve: vec![(1, score + 0.1), (2, score)] }
}

fn queued(config: usize, fold: u32) -> FoldTrial {
    FoldTrial { config, fold, state: TaskState::Queued, curve: vec![] }
}

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

#[test]
fn the_t_tail_matches_closed_forms_and_tables() {
    for t in [0.1f64, 1.0, 2.5, 6.314, 40.0] {
        let cauchy = 0.5 - t.atan() / std::f64::consts::PI;
        assert!((student_t_upper_tail(t, 1.0) - cauchy).abs() < 1e-10, "df 1, t {t}");
        let two = 0.5 * (1.0 - t / (2.0 + t * t).sqrt());
        assert!((student_t_upper_tail(t, 2.0) - two).abs() < 1e-10, "df 2, t {t}");
    }
    // One-sided 95 % critical values from the tables.
    for (df, critical) in [(1.0, 6.3138), (2.0, 2.9200), (3.0, 2.3534), (4.0, 2.1318), (10.0, 1.8125), (30.0, 1.6973)] {
        let p = student_t_upper_tail(critical, df);
        assert!((p - 0.05).abs() < 2e-4, "df {df}: {p}");
    }
    assert!((student_t_upper_tail(-2.92, 2.0) - 0.95).abs() < 1e-3);
    assert!((student_t_upper_tail(0.0, 3.0) - 0.5).abs() < 1e-12);
}

#[test]
fn two_folds_drop_only_consistent_differences() {
    // t = (d0 + d1) / |d0 − d1| at 2 folds: 0.75 of the larger difference passes 6.31, 0.7 does not.
    assert!(paired_t(&[0.010, 0.0075]).2 < 0.05);
    assert!(paired_t(&[0.010, 0.0070]).2 > 0.05);
    assert_eq!(paired_t(&[0.01, 0.01]).2, 0.0, "identical differences: certain");
    assert_eq!(paired_t(&[0.0, 0.0]).2, 1.0);
    assert_eq!(paired_t(&[-0.01, -0.01]).2, 1.0);
    assert_eq!(paired_t(&[0.01]).2, 1.0, "one fold decides nothing");
}

#[test]
fn the_race_waits_for_min_folds_and_drops_the_consistently_worse() {
    let s = settings(PruneRule::Racing);
    let mut snapshot = Snapshot { labels: labels(3), ..Snapshot::default() };
    for config in 0..3 {
        snapshot.trials.push(done(config, 0, [0.030, 0.031, 0.040][config]));
        snapshot.trials.push(queued(config, 2));
    }
    assert!(race(&s, &snapshot).is_empty(), "one fold round is not enough");
    snapshot.trials.push(done(0, 1, 0.032));
    snapshot.trials.push(done(1, 1, 0.0315));
    assert!(race(&s, &snapshot).is_empty(), "config 2 has not finished fold 1: no round yet");
    snapshot.trials.push(done(2, 1, 0.0415));
    let decisions = race(&s, &snapshot);
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].config, 2, "config 1 is worse on fold 0 and better on fold 1: kept");
    let reason = &decisions[0].reason;
    for expected in
        ["racing: fold round 2", "the leader c0", "paired t = ", "(df 1)", "[0.04000, 0.04150] vs the leader's [0.03000, 0.03200]"]
    {
        assert!(reason.contains(expected), "{expected:?} in {reason}");
    }
    // Applied, the decisions are final: the race finds nothing more.
    snapshot.apply(&decisions);
    assert!(race(&s, &snapshot).is_empty());
    assert_eq!(leader(&snapshot), Some(0));
}

#[test]
fn a_dropped_config_no_longer_holds_the_round_back() {
    let s = settings(PruneRule::Racing);
    let mut snapshot = Snapshot { labels: labels(3), ..Snapshot::default() };
    for (config, scores) in [(0, [0.03, 0.03]), (1, [0.05, 0.051])] {
        snapshot.trials.push(done(config, 0, scores[0]));
        snapshot.trials.push(done(config, 1, scores[1]));
        snapshot.trials.push(queued(config, 2));
    }
    snapshot.trials.push(done(2, 0, 0.02));
    snapshot.trials.push(FoldTrial { state: TaskState::Pruned, ..queued(2, 1) });
    assert_eq!(race(&s, &snapshot).iter().map(|d| d.config).collect::<Vec<_>>(), vec![1], "config 2 was pruned: folds 0 and 1 are common");
    // A failed config leaves the race too, and is not pruned.
    snapshot.trials.last_mut().unwrap().state = TaskState::Failed;
    assert_eq!(race(&s, &snapshot).iter().map(|d| d.config).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn configs_with_nothing_left_and_the_leader_are_never_dropped() {
    let s = settings(PruneRule::Racing);
    let snapshot = Snapshot {
        labels: labels(2),
        trials: vec![done(0, 0, 0.01), done(0, 1, 0.01), done(1, 0, 0.05), done(1, 1, 0.05)],
        ..Snapshot::default()
    };
    assert!(race(&s, &snapshot).is_empty(), "config 1 has every fold: selection decides");
    assert!(race(&settings(PruneRule::Asha), &snapshot).is_empty(), "asha alone never races");
}

#[test]
fn rungs_are_geometric_below_the_last_epoch() {
    assert_eq!(settings(PruneRule::Both).rungs(20), vec![2, 6, 18]);
    assert_eq!(settings(PruneRule::Both).rungs(18), vec![2, 6]);
    assert_eq!(PruneSection { grace_epochs: 1, reduction: 2, ..settings(PruneRule::Asha) }.rungs(9), vec![1, 2, 4, 8]);
    assert!(settings(PruneRule::Both).rungs(2).is_empty());
}

fn running(config: usize, fold: u32, curve: &[f64]) -> FoldTrial {
    FoldTrial { config, fold, state: TaskState::Running, curve: curve.iter().enumerate().map(|(i, &v)| (i as u32 + 1, v)).collect() }
}

#[test]
fn a_rung_keeps_the_best_third_of_its_fold_and_the_first_to_arrive() {
    let s = settings(PruneRule::Asha);
    let mut snapshot = Snapshot { labels: labels(5), trials: vec![running(0, 0, &[0.09, 0.08])], ..Snapshot::default() };
    assert_eq!(rung_check(&s, 20, &snapshot, 0, &[2]), None, "first at the rung");
    snapshot.trials.push(running(1, 0, &[0.10, 0.07]));
    assert_eq!(rung_check(&s, 20, &snapshot, 1, &[2]), None, "better than the one there");
    snapshot.trials.push(running(2, 0, &[0.085, 0.075]));
    let decision = rung_check(&s, 20, &snapshot, 2, &[2]).expect("second of three");
    assert_eq!(decision.config, 2);
    assert!(
        decision.reason.starts_with("asha: fold 0 rung 0 (epoch 2): best val_mse 0.07500 ranks 2 of the 3 trials"),
        "{}",
        decision.reason
    );
    assert!(
        decision.reason.contains("only the best 1 (1/3) continue; the rung's values [0.07000, 0.07500, 0.08000]"),
        "{}",
        decision.reason
    );
    assert_eq!(rung_check(&s, 20, &snapshot, 2, &[1]), None, "not a rung");
    // Another fold's trials are not compared.
    snapshot.trials.push(running(3, 1, &[0.2, 0.2]));
    assert_eq!(rung_check(&s, 20, &snapshot, 3, &[2]), None);
    // With 4 at the rung the best 2 continue.
    snapshot.trials.push(running(4, 0, &[0.074, 0.074]));
    assert_eq!(rung_check(&s, 20, &snapshot, 4, &[2]), None, "ranks 2 of 4");
}

#[test]
fn the_leaders_trials_are_never_stopped_at_a_rung() {
    let s = settings(PruneRule::Both);
    let snapshot = Snapshot {
        labels: labels(2),
        trials: vec![done(0, 0, 0.05), done(1, 0, 0.06), running(1, 1, &[0.01, 0.01]), running(0, 1, &[0.3, 0.3])],
        ..Snapshot::default()
    };
    assert_eq!(leader(&snapshot), Some(0));
    assert_eq!(rung_check(&s, 20, &snapshot, 3, &[2]), None, "config 0 leads on fold 0");
    // Once config 1 leads, config 0's poor fold 1 is stopped.
    let mut overtaken = snapshot.clone();
    overtaken.trials[0] = done(0, 0, 0.07);
    assert_eq!(leader(&overtaken), Some(1));
    assert_eq!(rung_check(&s, 20, &overtaken, 3, &[2]).map(|d| d.config), Some(0));
    // A config that failed a fold leaves the race: the leader is the best of the others.
    let mut failed = snapshot.clone();
    failed.trials[0].state = TaskState::Failed;
    assert_eq!(leader(&failed), Some(1));
}

#[test]
fn pruning_plans_cross_validation_fold_first() {
    let grid = &crate::sweep::tests::GOOD.replace("epochs = 2", "epochs = 20");
    let plain = crate::plan::initial(&crate::sweep::SweepFile::parse(grid, "s").unwrap(), dataset());
    assert_eq!(plain[1].name, "cv/c0/f1", "without [cv.prune]: config by config, as before");
    let pruned = format!("{grid}[cv.prune]\nrule = \"both\"\n");
    let sweep = crate::sweep::SweepFile::parse(&pruned, "s").unwrap();
    let prune = sweep.cv.as_ref().unwrap().prune.clone().unwrap();
    assert_eq!((prune.min_folds, prune.confidence, prune.grace_epochs, prune.reduction), (2, 0.95, 2, 3), "the defaults");
    let trials = crate::plan::initial(&sweep, dataset());
    let names: Vec<&str> = trials.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(&names[..9], ["cv/c0/f0", "cv/c1/f0", "cv/c2/f0", "cv/c3/f0", "cv/c4/f0", "cv/c5/f0", "cv/c6/f0", "cv/c7/f0", "cv/c0/f1"]);
    assert_eq!(trials.len(), 32);
    let described = crate::plan::describe_stages(&sweep);
    assert!(described[0].2.contains("pruned fold-first by racing after 2 folds at 95% confidence"), "{described:?}");
    // The settings are checked, naming the key.
    let error =
        crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"both\"\nreduction = 1\n"), "s").unwrap_err().to_string();
    assert!(error.contains("s: cv.prune.reduction: 1 must be at least 2"), "{error}");
    let error = crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"fast\"\n"), "s").unwrap_err().to_string();
    assert!(error.contains("unknown variant `fast`"), "{error}");
    let error = crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"asha\"\nrungs = 3\n"), "s").unwrap_err().to_string();
    assert!(error.contains("unknown field `rungs`"), "{error}");
}

fn dataset() -> crate::domain::DatasetSpec {
    let format = crate::domain::DatasetFormat::Idx;
    crate::domain::DatasetSpec { format, image_size: 64, min_foreground: 0.05, ..Default::default() }
}

/// A pruning sweep run on the real scheduler: `configs` × `folds` trials of `epochs` epochs
/// queued fold-first, workers taking them and reporting one epoch at a time in a random
/// interleaving (with failed attempts retried), the rung check at every report and the race
/// at every ending, each drop applied through [`crate::scheduler::Scheduler::prune`].
struct Simulation {
    scheduler: crate::scheduler::Scheduler,
    settings: PruneSection,
    epochs: u32,
    /// Task ids in plan (fold-first) order, with their config and fold.
    tasks: Vec<(String, usize, u32)>,
    curves: std::collections::HashMap<String, Vec<(u32, f64)>>,
    labels: Vec<String>,
    /// The leader every drop was decided against, and the dropped config.
    drops: Vec<(Option<usize>, usize)>,
}

impl Simulation {
    fn snapshot(&self) -> Snapshot {
        let trials = self
            .tasks
            .iter()
            .map(|(id, config, fold)| FoldTrial {
                config: *config,
                fold: *fold,
                state: self.scheduler.task(id).unwrap().state,
                curve: self.curves[id].clone(),
            })
            .collect();
        Snapshot { labels: self.labels.clone(), trials, ..Snapshot::default() }
    }

    /// Applies decisions as the core does; checks each spares the leader.
    fn apply(&mut self, decisions: &[Decision], leader: Option<usize>) {
        for decision in decisions {
            assert_ne!(Some(decision.config), leader, "the leader is never dropped: {}", decision.reason);
            let targets: Vec<String> = self.tasks.iter().filter(|(_, c, _)| *c == decision.config).map(|(id, _, _)| id.clone()).collect();
            self.scheduler.prune(&targets, &decision.reason);
            self.drops.push((leader, decision.config));
        }
    }

    /// The race after an ending, checked to be what a restarted coordinator recomputes: the
    /// same from the trials in any order, and nothing more once applied.
    fn race(&mut self) {
        let snapshot = self.snapshot();
        let decisions = race(&self.settings, &snapshot);
        let mut reversed = snapshot.clone();
        reversed.trials.reverse();
        assert_eq!(race(&self.settings, &reversed), decisions, "decisions do not depend on the order trials are read");
        self.apply(&decisions, leader(&snapshot));
        assert!(race(&self.settings, &self.snapshot()).is_empty(), "a restarted coordinator would decide nothing more");
    }

    /// Reports the trial's next epoch and checks its rung.
    fn report(&mut self, task_id: &str, value: f64) {
        let curve = self.curves.get_mut(task_id).unwrap();
        let epoch = curve.len() as u32 + 1;
        curve.push((epoch, value));
        let snapshot = self.snapshot();
        let index = self.tasks.iter().position(|(id, _, _)| id == task_id).unwrap();
        let decision = rung_check(&self.settings, self.epochs, &snapshot, index, &[epoch]);
        let mut reversed = snapshot.clone();
        reversed.trials.reverse();
        assert_eq!(rung_check(&self.settings, self.epochs, &reversed, reversed.trials.len() - 1 - index, &[epoch]), decision);
        if let Some(decision) = decision {
            self.apply(&[decision], leader(&snapshot));
            assert_eq!(self.scheduler.task(task_id).unwrap().state, TaskState::Pruned);
            self.race();
        }
    }
}

fn noise(seed: u64, config: usize, fold: u32, epoch: u32) -> f64 {
    let mut x = seed ^ ((config as u64) << 40) ^ (u64::from(fold) << 20) ^ u64::from(epoch);
    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    x ^= x >> 29;
    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.006
}

/// What one simulated sweep is made of.
#[derive(Debug, Clone)]
struct Case {
    configs: usize,
    folds: u32,
    epochs: u32,
    workers: usize,
    rule: PruneRule,
    min_folds: u32,
    grace_epochs: u32,
    reduction: u32,
    confidence: f64,
    /// Each config's error level (its validation error tends to it).
    quality: Vec<f64>,
    /// Each fold's extra error.
    difficulty: Vec<f64>,
    seed: u64,
}

/// Runs one simulated sweep, checking the invariants; returns the configs dropped.
fn simulate(case: &Case) -> Result<usize, proptest::test_runner::TestCaseError> {
    let Case { configs, folds, epochs, workers, rule, min_folds, grace_epochs, reduction, confidence, ref quality, ref difficulty, seed } =
        *case;
    use crate::scheduler::{Scheduler, SecretSource, TaskEntry, Timeouts};
    let rule = if folds == 2 { PruneRule::Asha } else { rule };
    let settings = PruneSection {
        rule,
        min_folds: min_folds.min(folds - 1).max(2),
        confidence,
        grace_epochs: grace_epochs.min(epochs - 1),
        reduction,
    };
    proptest::prop_assert_eq!(settings.problem(folds, epochs), None);
    let mut minted = 0u64;
    let secrets = SecretSource::new(move || {
        minted += 1;
        format!("secret-{minted}")
    });
    let mut scheduler = Scheduler::new(Timeouts::default(), secrets);
    let mut tasks = Vec::new();
    for fold in 0..folds {
        for config in 0..configs {
            let id = format!("c{config}f{fold}");
            scheduler.insert(TaskEntry::queued(id.clone(), "s".into(), tasks.len() as u64, 1000, 1).with_epochs(epochs), 0);
            tasks.push((id, config, fold));
        }
    }
    let worker_ids: Vec<String> = (0..workers).map(|w| format!("w{w}")).collect();
    for id in &worker_ids {
        scheduler.register(id, id, &format!("session-{id}"), 0, &[]);
    }
    let curves = tasks.iter().map(|(id, _, _)| (id.clone(), Vec::new())).collect();
    let labels = (0..configs).map(|c| format!("c{c}")).collect();
    let mut sim = Simulation { scheduler, settings, epochs, tasks, curves, labels, drops: vec![] };
    let mut held: Vec<Option<crate::scheduler::Lease>> = vec![None; workers];
    let mut rng = seed;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    for _ in 0..100_000 {
        if sim.tasks.iter().all(|(id, _, _)| sim.scheduler.task(id).unwrap().state.is_terminal()) {
            break;
        }
        let w = next() % workers;
        let worker = worker_ids[w].clone();
        let session = format!("session-{worker}");
        let Some(lease) = held[w].clone() else {
            held[w] = sim.scheduler.acquire(&worker, &session, 0).unwrap();
            continue;
        };
        let task = sim.scheduler.task(&lease.task_id).unwrap().clone();
        if task.state != TaskState::Running {
            proptest::prop_assert_eq!(task.state, TaskState::Pruned);
            let abandon = sim.scheduler.heartbeat(&worker, &session, 0, std::slice::from_ref(&lease)).unwrap();
            proptest::prop_assert_eq!(abandon, vec![lease.task_id.clone()], "the worker is told to stop");
            proptest::prop_assert!(
                sim.scheduler.check_lease(&worker, &lease.task_id, lease.attempt, &lease.secret).is_err(),
                "its reports are refused"
            );
            proptest::prop_assert!(sim.scheduler.complete(&worker, &lease.task_id, lease.attempt, &lease.secret, 0).is_err());
            held[w] = None;
            continue;
        }
        if next() % 40 == 0 {
            // An infrastructure failure: the attempt is retried, resuming where it was.
            sim.scheduler
                .fail(&worker, &lease.task_id, lease.attempt, &lease.secret, crate::domain::FailureKind::Infrastructure, "lost", 0)
                .unwrap();
            held[w] = None;
            sim.race();
            continue;
        }
        let (_, config, fold) = sim.tasks.iter().find(|(id, _, _)| *id == lease.task_id).unwrap().clone();
        let epoch = sim.curves[&lease.task_id].len() as u32 + 1;
        if epoch <= epochs {
            let value = quality[config] + difficulty[fold as usize] + 0.05 / f64::from(epoch) + noise(seed, config, fold, epoch);
            sim.report(&lease.task_id, value);
            continue;
        }
        sim.scheduler.complete(&worker, &lease.task_id, lease.attempt, &lease.secret, 0).unwrap();
        held[w] = None;
        sim.race();
    }
    let snapshot = sim.snapshot();
    proptest::prop_assert!(snapshot.trials.iter().all(|t| t.state.is_terminal()), "the sweep ended");
    let trial_epochs: usize = snapshot.trials.iter().map(|t| t.curve.len()).sum();
    proptest::prop_assert!(trial_epochs <= configs * folds as usize * epochs as usize);
    let standings = snapshot.standings();
    for (config, standing) in standings.iter().enumerate().take(configs) {
        let done = snapshot.trials.iter().filter(|t| t.config == config && t.state == TaskState::Succeeded).count();
        match standing {
            Standing::Live => proptest::prop_assert_eq!(done, folds as usize, "config {} survived with every fold", config),
            Standing::Dropped => {}
            Standing::Out => proptest::prop_assert!(false, "no trial fails for good here"),
        }
    }
    let results: Vec<crate::selection::FoldResult> = snapshot
        .trials
        .iter()
        .map(|t| crate::selection::FoldResult { config: format!("c{}", t.config), fold: t.fold, min_val_mse: t.score() })
        .collect();
    let summaries = crate::selection::summarize(&results);
    let winner = summaries.iter().position(|s| s.winner);
    proptest::prop_assert!(winner.is_some_and(|w| standings[w] == Standing::Live), "a surviving config wins: {:?}", summaries);
    proptest::prop_assert!(sim.drops.iter().all(|(leader, dropped)| *leader != Some(*dropped)));
    Ok(sim.drops.len())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

    /// Whatever the curves and the interleaving: never more trial-epochs than the full grid;
    /// the leader is never dropped; every config not dropped trains all its folds, and the
    /// winner is one of them; decisions are those a restarted coordinator recomputes; a
    /// pruned trial's worker is told to abandon it and its reports are refused.
    #[test]
    fn simulated_sweeps_keep_the_invariants(
        configs in 2usize..7,
        folds in 2u32..6,
        epochs in 2u32..13,
        workers in 1usize..4,
        rule in proptest::sample::select(vec![PruneRule::Racing, PruneRule::Asha, PruneRule::Both]),
        min_folds in 2u32..5,
        grace_epochs in 1u32..4,
        reduction in 2u32..4,
        confidence in proptest::sample::select(vec![0.8, 0.9, 0.95]),
        quality in proptest::collection::vec(0.02f64..0.1, 6),
        difficulty in proptest::collection::vec(0.0f64..0.01, 5),
        seed in proptest::prelude::any::<u64>(),
    ) {
        simulate(&Case { configs, folds, epochs, workers, rule, min_folds, grace_epochs, reduction, confidence, quality, difficulty, seed })?;
    }
}

/// The simulation does prune: on the seed's shape (8 configs × 4 folds × 20 epochs, 2
/// workers) with clearly separated configs, every rule drops some configs.
#[test]
fn every_rule_prunes_a_clearly_separated_grid() {
    for rule in [PruneRule::Racing, PruneRule::Asha, PruneRule::Both] {
        let case = Case {
            configs: 6,
            folds: 4,
            epochs: 20,
            workers: 2,
            rule,
            min_folds: 2,
            grace_epochs: 2,
            reduction: 3,
            confidence: 0.95,
            quality: vec![0.02, 0.03, 0.04, 0.05, 0.06, 0.07],
            difficulty: vec![0.0, 0.002, 0.004, 0.001, 0.0],
            seed: 7,
        };
        let dropped = simulate(&case).unwrap();
        assert!(dropped >= 3, "{rule:?} dropped {dropped} configs");
    }
}

#[test]
fn settings_are_checked_against_the_stage() {
    let s = settings(PruneRule::Both);
    assert_eq!(s.problem(4, 20), None);
    assert_eq!(s.problem(2, 20).unwrap().0, "cv.prune.min_folds", "2 folds leave nothing to race");
    assert_eq!(PruneSection { rule: PruneRule::Asha, ..s.clone() }.problem(2, 20), None);
    assert_eq!(s.problem(4, 2).unwrap().0, "cv.prune.grace_epochs");
    assert_eq!(PruneSection { confidence: 1.0, ..s.clone() }.problem(4, 20).unwrap().0, "cv.prune.confidence");
    assert_eq!(PruneSection { confidence: f64::NAN, ..s.clone() }.problem(4, 20).unwrap().0, "cv.prune.confidence");
    assert_eq!(PruneSection { reduction: 1, ..s.clone() }.problem(4, 20).unwrap().0, "cv.prune.reduction");
    assert_eq!(PruneSection { min_folds: 1, ..s.clone() }.problem(4, 20).unwrap().0, "cv.prune.min_folds");
}
