//! Early stopping in the core (`[cv.prune]`, decided by the pure [`crate::prune`]): builds the
//! pruner's view of a sweep from the scheduler's states and the stored validation errors, ends
//! the trials of the configs it drops as pruned, and commits each decision together with the
//! report or completion that triggered it.
//!
//! - rungs are checked when a cv trial reports epochs ([`Core::record_epochs`]): the report
//!   and a drop it causes are one transaction;
//! - the race runs when a cv trial ends ([`Core::race_after`], called before the ending is
//!   persisted, so the drops are saved with it).
//!
//! A pruned running trial loses its lease: the worker is told to abandon it at its next
//! heartbeat, and its next report (at the latest its checkpoint upload at the end of the epoch)
//! is refused, so it stops without reporting a failure and is never retried.

use std::collections::HashMap;

use super::{Core, CoreError, Inner};
use crate::domain::Stage;
use crate::prune::{self, Decision, FoldTrial, PruneSection, Snapshot};
use crate::store::EpochRecord;
use crate::sweep::SweepFile;

/// Each sweep's `[cv.prune]` with its cv epochs (`None`: the sweep does not prune), read once
/// per sweep: a sweep file never changes.
pub(super) type PruneSettings = HashMap<String, Option<(PruneSection, u32)>>;

/// The value an epoch reported of the metric cross-validation minimises (`val_mse`, or a
/// command sweep's `[command] metric`), if any.
fn metric_value(epoch: &EpochRecord, metric: &str) -> Option<f64> {
    epoch.values.iter().find(|(name, _)| name == metric).map(|&(_, value)| value)
}

/// The metric a trial's cross-validation minimises.
fn selection_metric(spec: &crate::domain::TrialSpec) -> &str {
    spec.command.as_ref().map_or("val_mse", |command| command.metric.as_str())
}

/// The sweep's pruning settings, while its cross-validation stage is the latest one.
fn settings_while_in_cv(inner: &mut Inner, sweep_id: &str) -> Result<Option<(PruneSection, u32)>, CoreError> {
    if inner.stages.get(sweep_id).is_some_and(|stage| stage.name != Stage::Cv) {
        return Ok(None);
    }
    if let Some(cached) = inner.pruning.get(sweep_id) {
        return Ok(cached.clone());
    }
    let Some(record) = inner.store.sweep(sweep_id)? else {
        return Ok(None);
    };
    let settings = SweepFile::parse(&record.source, &record.name)
        .ok()
        .and_then(|sweep| sweep.cv)
        .and_then(|cv| cv.prune.map(|prune| (prune, cv.epochs)));
    inner.pruning.insert(sweep_id.to_string(), settings.clone());
    Ok(settings)
}

/// The sweep's cross-validation trials as the pruner sees them (states from memory, curves from
/// the store), with their task ids in the same order. Configs are numbered in plan order.
fn snapshot(inner: &Inner, sweep_id: &str) -> Result<(Snapshot, Vec<String>, String), CoreError> {
    let mut metric = String::from("val_mse");
    let mut snapshot = Snapshot::default();
    let mut ids = Vec::new();
    for task in inner.store.tasks(Some(sweep_id))?.into_iter().filter(|t| t.spec.stage == Stage::Cv) {
        let Some(fold) = task.spec.fold else {
            continue;
        };
        let config = match snapshot.labels.iter().position(|label| *label == task.spec.config_label) {
            Some(index) => index,
            None => {
                snapshot.labels.push(task.spec.config_label.clone());
                snapshot.labels.len() - 1
            }
        };
        let state = inner.scheduler.task(&task.entry.id).map_or(task.entry.state, |t| t.state);
        metric = selection_metric(&task.spec).to_string();
        let curve =
            inner.store.metrics(&task.entry.id)?.iter().filter_map(|e| metric_value(e, &metric).map(|value| (e.epoch, value))).collect();
        snapshot.trials.push(FoldTrial { config, fold: fold.index, state, curve });
        ids.push(task.entry.id);
    }
    snapshot.metric = metric.clone();
    Ok((snapshot, ids, metric))
}

/// Ends every unfinished trial of each decided config as pruned, in the scheduler and in
/// `snapshot`; returns the changed task ids.
fn apply(inner: &mut Inner, snapshot: &mut Snapshot, ids: &[String], decisions: &[Decision]) -> Vec<String> {
    let mut changed = Vec::new();
    for decision in decisions {
        let targets: Vec<String> = snapshot
            .trials
            .iter()
            .zip(ids)
            .filter(|(trial, _)| trial.config == decision.config && !trial.state.is_terminal())
            .map(|(_, id)| id.clone())
            .collect();
        let pruned = inner.scheduler.prune(&targets, &decision.reason);
        tracing::info!(config = %snapshot.labels[decision.config], trials = pruned.len(), reason = %decision.reason, "config pruned");
        changed.extend(pruned);
    }
    snapshot.apply(decisions);
    changed
}

impl Core {
    /// The race after some of `changed` ended: in every pruning sweep where a cv trial ended,
    /// ends the configs the race drops as pruned (in memory: the caller persists them with the
    /// rest of `changed`); returns their task ids.
    pub(super) fn race_after(inner: &mut Inner, changed: &[String]) -> Result<Vec<String>, CoreError> {
        let mut pruned = Vec::new();
        for sweep_id in inner.sweeps_with_ended(changed) {
            let Some((settings, _)) = settings_while_in_cv(inner, &sweep_id)?.filter(|(settings, _)| settings.rule.races()) else {
                continue;
            };
            let (mut snapshot, ids, _) = snapshot(inner, &sweep_id)?;
            let decisions = prune::race(&settings, &snapshot);
            pruned.extend(apply(inner, &mut snapshot, &ids, &decisions));
        }
        Ok(pruned)
    }

    /// Records the lease holder's epochs. In a sweep with `[cv.prune]` rungs, a cv trial that
    /// reaches a rung outside the best of its fold has its config pruned, in the same
    /// transaction as the report (a drop can end a fold round: the race runs too, and the next
    /// stage is planned when nothing is left to run). Returns the pruned task ids.
    pub(super) fn record_epochs(&self, inner: &mut Inner, task_id: &str, epochs: &[EpochRecord]) -> Result<Vec<String>, CoreError> {
        let sweep_id = inner.scheduler.task(task_id).map(|task| task.sweep_id.clone()).unwrap_or_default();
        let rungs = settings_while_in_cv(inner, &sweep_id)?.filter(|(settings, _)| settings.rule.has_rungs());
        let Some((settings, cv_epochs)) = rungs else {
            inner.store.record_metrics(task_id, epochs)?;
            return Ok(Vec::new());
        };
        let (mut snapshot, ids, metric) = snapshot(inner, &sweep_id)?;
        let Some(index) = ids.iter().position(|id| id == task_id) else {
            inner.store.record_metrics(task_id, epochs)?;
            return Ok(Vec::new());
        };
        // Rungs are judged once, when first reached: an epoch re-reported by a resumed attempt
        // is not judged again against trials that came later.
        let curve = &mut snapshot.trials[index].curve;
        let reported: Vec<u32> = epochs.iter().map(|e| e.epoch).filter(|epoch| !curve.iter().any(|(e, _)| e == epoch)).collect();
        for epoch in epochs {
            if let Some(value) = metric_value(epoch, &metric) {
                curve.retain(|(e, _)| *e != epoch.epoch);
                curve.push((epoch.epoch, value));
            }
        }
        curve.sort_by_key(|(epoch, _)| *epoch);
        let Some(decision) = prune::rung_check(&settings, cv_epochs, &snapshot, index, &reported) else {
            inner.store.record_metrics(task_id, epochs)?;
            return Ok(Vec::new());
        };
        let mut pruned = apply(inner, &mut snapshot, &ids, &[decision]);
        let decisions = prune::race(&settings, &snapshot);
        pruned.extend(apply(inner, &mut snapshot, &ids, &decisions));
        let Inner { store, scheduler, .. } = &mut *inner;
        store.in_one_transaction(|store| {
            store.record_metrics(task_id, epochs)?;
            store.save_tasks(pruned.iter().filter_map(|id| scheduler.task(id)))
        })?;
        self.advance(inner, &sweep_id)?;
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{open_with_dataset, register, TestWorker};
    use super::super::{Core, Dispatch, LeaseProof, SweepState};
    use crate::domain::TaskState;
    use crate::scheduler::Lease;
    use crate::store::EpochRecord;

    /// Three configs × three folds, pruned by rungs at epochs 1 and 2 (the best half goes on)
    /// and by the race after 2 folds at 90 % confidence.
    const SWEEP: &str = r#"
name = "prune"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 3
epochs = 4
batch_size = 16
[cv.grid]
lr = [1e-3, 1e-4, 1e-5]
[cv.prune]
rule = "both"
min_folds = 2
confidence = 0.9
grace_epochs = 1
reduction = 2
[final]
epochs = 1
"#;

    fn proof<'a>(worker: &'a TestWorker, dispatch: &'a Dispatch) -> LeaseProof<'a> {
        LeaseProof { worker_id: &worker.id, task_id: &dispatch.task_id, attempt: dispatch.attempt, secret: &dispatch.lease_secret }
    }

    fn epoch(dispatch: &Dispatch, number: u32, val_mse: f64) -> EpochRecord {
        EpochRecord { epoch: number, attempt: dispatch.attempt, values: vec![("val_mse".into(), val_mse)], seconds: 0.1, samples: 48 }
    }

    /// Leases the next trial, checks its name, and reports `curve` epoch by epoch.
    async fn start(core: &Core, worker: &TestWorker, name: &str, curve: &[f64]) -> Dispatch {
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().expect("a trial is queued");
        assert_eq!(dispatch.trial().name, name, "fold-first order");
        for (index, value) in curve.iter().enumerate() {
            core.report_metrics(&proof(worker, &dispatch), &[epoch(&dispatch, index as u32 + 1, *value)]).unwrap();
        }
        dispatch
    }

    async fn run(core: &Core, worker: &TestWorker, name: &str, curve: &[f64]) {
        let dispatch = start(core, worker, name, curve).await;
        core.complete(&proof(worker, &dispatch)).unwrap();
    }

    fn states(core: &Core, sweep_id: &str) -> Vec<(String, TaskState, usize, String)> {
        let view = core.sweep(sweep_id).unwrap();
        view.tasks
            .into_iter()
            .map(|t| (t.task.spec.name, t.task.entry.state, t.epochs.len(), t.task.entry.error.unwrap_or_default()))
            .collect()
    }

    /// A config below its fold's rung is pruned with its queued folds, while it runs: its
    /// report is kept, the next one refused and its worker told to abandon it; the race drops
    /// a consistently worse config's last fold; the decisions survive a restart; the winner
    /// trains `final`; and the sweep succeeds.
    #[tokio::test]
    async fn rungs_and_the_race_prune_configs_and_the_sweep_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let sweep_id = core.submit(SWEEP, "prune.toml", files, false).unwrap().sweep_id.unwrap();
        let worker = register(&core, "w");
        run(&core, &worker, "cv/c0/f0", &[0.5, 0.4, 0.3, 0.2]).await;
        run(&core, &worker, "cv/c1/f0", &[0.45, 0.35, 0.25, 0.21]).await;
        // Config 2 ranks 3rd of 3 at the first rung, where only the best 2 go on.
        let doomed = start(&core, &worker, "cv/c2/f0", &[0.9]).await;
        let after = states(&core, &sweep_id);
        let pruned: Vec<&str> = after.iter().filter(|t| t.1 == TaskState::Pruned).map(|t| t.0.as_str()).collect();
        assert_eq!(pruned, ["cv/c2/f0", "cv/c2/f1", "cv/c2/f2"]);
        let (_, _, epochs, reason) = after.iter().find(|t| t.0 == "cv/c2/f0").unwrap();
        assert_eq!(*epochs, 1, "the report that decided is kept");
        assert!(reason.starts_with("asha: fold 0 rung 0 (epoch 1): best val_mse 0.90000 ranks 3 of the 3 trials"), "{reason}");
        let refused = core.report_metrics(&proof(&worker, &doomed), &[epoch(&doomed, 2, 0.8)]).unwrap_err();
        assert!(refused.to_string().contains("is not leased to this worker"), "{refused}");
        assert!(core.complete(&proof(&worker, &doomed)).is_err(), "a pruned trial cannot succeed");
        let lease =
            Lease { task_id: doomed.task_id.clone(), attempt: doomed.attempt, rank: 0, world: 1, secret: doomed.lease_secret.clone() };
        assert_eq!(
            core.heartbeat(&worker.id, &worker.session, &[lease], vec![]).unwrap(),
            vec![doomed.task_id.clone()],
            "its worker is told to stop"
        );
        drop(core);

        // A restarted coordinator holds the same decisions.
        let (core, _) = open_with_dataset(dir.path());
        assert_eq!(states(&core, &sweep_id), after);
        let worker = register(&core, "w");
        run(&core, &worker, "cv/c0/f1", &[0.5, 0.4, 0.3, 0.22]).await;
        run(&core, &worker, "cv/c1/f1", &[0.45, 0.38, 0.3, 0.231]).await;
        // Fold round 2: config 1 is worse on both folds by 0.010 and 0.011 (t = 21, p = 0.015).
        let after = states(&core, &sweep_id);
        let (_, state, _, reason) = after.iter().find(|t| t.0 == "cv/c1/f2").unwrap();
        assert_eq!(*state, TaskState::Pruned);
        assert!(reason.starts_with("racing: fold round 2: worse than the leader lr=1e-3"), "{reason}");
        assert!(
            reason.contains("paired t = 21.000 (df 1)") && reason.contains("[0.21000, 0.23100] vs the leader's [0.20000, 0.22000]"),
            "{reason}"
        );
        assert_eq!(core.retry(&sweep_id).unwrap(), 0, "retry leaves pruned trials alone");
        run(&core, &worker, "cv/c0/f2", &[0.5, 0.4, 0.3, 0.19]).await;
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().expect("final");
        assert_eq!((dispatch.trial().name.as_str(), dispatch.trial().config.lr), ("final", 1e-3), "the only complete config wins");
        core.complete(&proof(&worker, &dispatch)).unwrap();
        let view = core.sweep(&sweep_id).unwrap();
        assert_eq!(view.summary.state, SweepState::Succeeded, "pruned trials are no failures");
        assert_eq!((view.summary.counts.pruned, view.summary.counts.succeeded, view.summary.counts.failed), (4, 6, 0));
        let trial_epochs: usize = view.tasks.iter().filter(|t| t.task.spec.stage == crate::domain::Stage::Cv).map(|t| t.epochs.len()).sum();
        assert_eq!(trial_epochs, 4 * 5 + 1, "21 of the full grid's 36 trial-epochs");
    }

    /// A command sweep prunes on its own `[command] metric`, and only a worker that allows
    /// commands is given its trials.
    #[tokio::test]
    async fn a_command_sweep_prunes_on_its_own_metric() {
        let dir = tempfile::tempdir().unwrap();
        let (core, _) = open_with_dataset(dir.path());
        let text = "name = \"cmd\"\n[model]\nkind = \"command\"\n[command]\nrun = [\"python3\", \"train.py\"]\nmetric = \"loss\"\n\
                    [cv]\nfolds = 3\nepochs = 4\n[cv.grid]\nwidth = [1, 2, 3]\n[cv.prune]\nrule = \"asha\"\ngrace_epochs = 1\nreduction = 2\n";
        let sweep_id = core.submit(text, "cmd.toml", vec![], false).unwrap().sweep_id.unwrap();
        let plain = register(&core, "plain");
        assert!(core.acquire(&plain.id, &plain.session, Duration::ZERO).await.unwrap().is_none(), "a plain worker gets no command trial");
        let (id, session, _) = core.register("trusted", "cpu", crate::scheduler::Abilities { cuda: false, commands: true }, &[]).unwrap();
        let worker = TestWorker { id, session };
        let report = |dispatch: &Dispatch, number: u32, loss: f64| EpochRecord {
            epoch: number,
            attempt: dispatch.attempt,
            values: vec![("loss".into(), loss), ("val_mse".into(), 0.0)],
            seconds: 0.1,
            samples: 1,
        };
        for (name, first) in [("cv/c0/f0", 0.5), ("cv/c1/f0", 0.45), ("cv/c2/f0", 0.9)] {
            let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().expect("a trial is queued");
            assert_eq!(dispatch.trial().name, name);
            core.report_metrics(&proof(&worker, &dispatch), &[report(&dispatch, 1, first)]).unwrap();
            if name != "cv/c2/f0" {
                core.complete(&proof(&worker, &dispatch)).unwrap();
            }
        }
        let pruned: Vec<(String, String)> =
            states(&core, &sweep_id).into_iter().filter(|t| t.1 == TaskState::Pruned).map(|t| (t.0, t.3)).collect();
        let names: Vec<&str> = pruned.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["cv/c2/f0", "cv/c2/f1", "cv/c2/f2"], "ranked on loss (val_mse, 0 everywhere, would tie)");
        assert!(pruned[0].1.contains("best loss 0.90000"), "the reason names the sweep's metric: {}", pruned[0].1);
    }
}
