//! Fold-aware early stopping of cross-validation (`[cv.prune]`): which configs to stop before
//! they have trained every fold, decided from the trials' validation errors alone. Pure: no I/O,
//! no clock; the core hands it what the store and the scheduler hold ([`Snapshot`]) and ends the
//! trials of every config it drops as `pruned` (queued ones never start, running ones are told
//! to abandon at their next heartbeat and their later reports are refused).
//!
//! A config is the unit: when any of its trials is stopped the whole config is dropped, because
//! a config missing a fold cannot win (selection averages over all folds) and its other folds
//! would be wasted work. So every config that is not dropped trains all its folds, and selection
//! among them is exactly what it is without pruning.
//!
//! With pruning on, the planner queues fold 0 of every config before fold 1 of any (fold-first
//! order), so that comparisons on the same fold become possible as early as possible.
//!
//! # Racing across folds (`rule = "racing"` or `"both"`)
//!
//! After each fold round, the *live* configs (neither dropped nor failed) are compared on the
//! folds they have all completed, paired by fold: each config's score on a fold is its trial's
//! minimum validation MSE. The *leader* has the lowest mean over those folds (ties: the config
//! planned first). Every other config that still has work left is tested against the leader with
//! a **one-sided paired t-test** on the per-fold differences `d_f = score(config, f) −
//! score(leader, f)`: `t = mean(d) / (sd(d) / √n)` with `n − 1` degrees of freedom, and the config
//! is dropped when `P(T ≥ t) < 1 − confidence`. Nothing is decided before `min_folds` common folds.
//!
//! Why this test: folds are the blocks that make configs comparable (the same held-out digits
//! for every config), so the pairing removes the fold-to-fold difficulty that dominates the raw
//! scores; the t-test is exact for normal differences with as few as 2 folds, where Friedman's
//! rank test (F-race) cannot reach 95 % at all (its smallest p-value with 2 blocks is far above
//! 0.05 for a handful of configs), nor can a sign test (0.25 at best). Like F-race's post-hoc
//! comparisons and irace's t-test, each comparison is made at the stated level without a
//! multiplicity correction: the family-wise error over many configs is larger than
//! `1 − confidence`, which is why the leader is never dropped and `min_folds` defaults to 2.
//!
//! Its behaviour with few folds (one-sided critical t at 95 %): at 2 common folds (1 degree of
//! freedom, t > 6.31) `t = (d₀ + d₁) / |d₀ − d₁|`, so a config is dropped only when it is worse
//! than the leader on both folds and the smaller difference is at least 0.73 times the larger;
//! at 3 folds (t > 2.92) the mean difference must exceed 1.69 standard deviations of the
//! differences; at 4 folds (t > 2.35), 1.18. With `cv.folds = 4` the race decides after rounds 2
//! and 3 (after round 4 nothing is left to save).
//!
//! # Rungs within a fold (`rule = "asha"` or `"both"`)
//!
//! Asynchronous successive halving, decided when a trial reports an epoch: at the rungs
//! `grace_epochs · reduction^k` (below `cv.epochs`), a trial continues only if its best
//! validation MSE so far ranks within the best `⌈n / reduction⌉` of the `n` trials *of the same
//! fold* that have reached that rung (itself included; a trial that reached it earlier and was
//! stopped since still counts). Nobody waits for stragglers: the first trial at a rung always
//! continues, later ones are judged against those already there. The current leader's trials
//! are never stopped (the leader as the race defines it; before any fold round has completed,
//! the best config on the earliest fold any config has completed), nor the last config left.
//!
//! # Restarts
//!
//! Every decision is a function of the stored figures and states only (never of arrival order
//! in memory), and the core commits each one with the report or completion that triggered it,
//! so a coordinator that restarts holds the same decisions and would recompute no new ones.
//!
//! The statistics the race rests on (the paired t-test and Student's t tail) are in `stats.rs`.

use serde::{Deserialize, Serialize};

use crate::domain::TaskState;

mod stats;
#[cfg(test)]
mod tests;

use stats::mean;
pub use stats::{paired_t, student_t_upper_tail};

/// Which early-stopping rules a sweep uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneRule {
    /// Racing across folds only.
    Racing,
    /// Rungs within a fold only.
    Asha,
    /// Both.
    Both,
}

impl PruneRule {
    /// Whether the race across folds runs.
    pub fn races(self) -> bool {
        matches!(self, PruneRule::Racing | PruneRule::Both)
    }

    /// Whether the rungs within folds run.
    pub fn has_rungs(self) -> bool {
        matches!(self, PruneRule::Asha | PruneRule::Both)
    }

    /// The name in sweep files.
    pub fn as_str(self) -> &'static str {
        match self {
            PruneRule::Racing => "racing",
            PruneRule::Asha => "asha",
            PruneRule::Both => "both",
        }
    }
}

/// `[cv.prune]`: stop configs early (absent: every config trains every fold).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PruneSection {
    /// `"racing"`, `"asha"` or `"both"`.
    pub rule: PruneRule,
    /// Racing: folds every live config completes before any can be dropped.
    #[serde(default = "default_min_folds")]
    pub min_folds: u32,
    /// Racing: how sure a drop must be (the one-sided test's level is `1 − confidence`).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// ASHA: epochs before the first rung.
    #[serde(default = "default_grace_epochs")]
    pub grace_epochs: u32,
    /// ASHA: keep the best `1/reduction` at each rung; rungs are `reduction` times apart.
    #[serde(default = "default_reduction")]
    pub reduction: u32,
}

fn default_min_folds() -> u32 {
    2
}
fn default_confidence() -> f64 {
    0.95
}
fn default_grace_epochs() -> u32 {
    2
}
fn default_reduction() -> u32 {
    3
}

impl PruneSection {
    /// The first problem with these settings for `folds` folds of `epochs` epochs, as (key,
    /// message), for the sweep file's checker.
    pub fn problem(&self, folds: u32, epochs: u32) -> Option<(&'static str, String)> {
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            return Some(("cv.prune.confidence", format!("{} must be within (0.5, 1)", self.confidence)));
        }
        if self.min_folds < 2 {
            return Some(("cv.prune.min_folds", format!("{} must be at least 2: a paired test needs two folds", self.min_folds)));
        }
        if self.rule.races() && self.min_folds >= folds {
            return Some((
                "cv.prune.min_folds",
                format!("{} leaves nothing to race: the race decides after min_folds of the cv.folds = {folds} folds, so it must be below {folds}", self.min_folds),
            ));
        }
        if self.reduction < 2 {
            return Some(("cv.prune.reduction", format!("{} must be at least 2", self.reduction)));
        }
        if self.grace_epochs < 1 {
            return Some(("cv.prune.grace_epochs", format!("{} must be at least 1", self.grace_epochs)));
        }
        if self.rule.has_rungs() && self.grace_epochs >= epochs {
            return Some((
                "cv.prune.grace_epochs",
                format!(
                    "{} leaves no rung: the first rung must come before the last of the cv.epochs = {epochs} epochs",
                    self.grace_epochs
                ),
            ));
        }
        None
    }

    /// The rung epochs for trials of `epochs` epochs: `grace_epochs · reduction^k` below `epochs`
    /// (a rung at the last epoch would stop nothing).
    pub fn rungs(&self, epochs: u32) -> Vec<u32> {
        let mut rungs = Vec::new();
        let mut rung = u64::from(self.grace_epochs.max(1));
        while rung < u64::from(epochs) {
            rungs.push(rung as u32);
            rung *= u64::from(self.reduction.max(2));
        }
        rungs
    }

    /// A short description for `submit --dry-run`.
    pub fn describe(&self, epochs: u32) -> String {
        let racing =
            format!("racing after {} folds at {}% confidence (paired t-test vs the leader)", self.min_folds, self.confidence * 100.0);
        let rungs = format!("ASHA rungs at epochs {:?} keeping the best 1/{} per fold", self.rungs(epochs), self.reduction);
        match self.rule {
            PruneRule::Racing => format!("pruned fold-first by {racing}"),
            PruneRule::Asha => format!("pruned fold-first by {rungs}"),
            PruneRule::Both => format!("pruned fold-first by {racing} and {rungs}"),
        }
    }
}

/// A cross-validation trial as the pruner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldTrial {
    /// Its config: an index into [`Snapshot::labels`].
    pub config: usize,
    /// The fold it validates on.
    pub fold: u32,
    /// Its state (as the scheduler holds it now, not as last stored).
    pub state: TaskState,
    /// `(epoch, val_mse)` for every epoch it reported.
    pub curve: Vec<(u32, f64)>,
}

impl FoldTrial {
    /// Whether it reported epoch `rung` (or a later one).
    fn reached(&self, rung: u32) -> bool {
        self.curve.iter().any(|&(epoch, _)| epoch >= rung)
    }

    /// Its lowest validation MSE over epochs `1..=epoch`.
    fn best_until(&self, epoch: u32) -> Option<f64> {
        self.curve.iter().filter(|&&(e, _)| e <= epoch).map(|&(_, value)| value).reduce(f64::min)
    }

    /// Its fold's score: the minimum validation MSE, once it succeeded.
    fn score(&self) -> Option<f64> {
        (self.state == TaskState::Succeeded).then(|| self.best_until(u32::MAX)).flatten()
    }
}

/// A sweep's cross-validation trials: what every decision is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Config labels, in plan order (ties go to the lower index).
    pub labels: Vec<String>,
    /// Every cv trial, in any order.
    pub trials: Vec<FoldTrial>,
    /// The metric the trials' curves hold, as the reasons name it (empty: `val_mse`).
    pub metric: String,
}

/// A config to drop, and why: the rule, the rung or fold round, and the evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The config (index into [`Snapshot::labels`]).
    pub config: usize,
    /// The recorded reason.
    pub reason: String,
}

/// Where a config stands in the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Still competing.
    Live,
    /// One of its trials was pruned.
    Dropped,
    /// One of its trials failed for good or was cancelled: it cannot win, and leaves the race.
    Out,
}

impl Snapshot {
    /// The metric's name for the reasons.
    fn metric(&self) -> &str {
        if self.metric.is_empty() {
            "val_mse"
        } else {
            &self.metric
        }
    }

    fn config_count(&self) -> usize {
        self.trials.iter().map(|t| t.config + 1).max().unwrap_or(0).max(self.labels.len())
    }

    fn label(&self, config: usize) -> &str {
        self.labels.get(config).map_or("?", String::as_str)
    }

    fn standings(&self) -> Vec<Standing> {
        let mut standings = vec![Standing::Live; self.config_count()];
        for trial in &self.trials {
            let standing = &mut standings[trial.config];
            match trial.state {
                TaskState::Pruned => *standing = Standing::Dropped,
                TaskState::Failed | TaskState::Cancelled if *standing == Standing::Live => *standing = Standing::Out,
                _ => {}
            }
        }
        standings
    }

    /// Each config's score by fold (`None`: not completed).
    fn scores(&self) -> Vec<std::collections::BTreeMap<u32, f64>> {
        let mut scores = vec![std::collections::BTreeMap::new(); self.config_count()];
        for trial in &self.trials {
            if let Some(score) = trial.score() {
                scores[trial.config].insert(trial.fold, score);
            }
        }
        scores
    }

    /// Whether the config still has a trial to run (queued or running).
    fn has_work(&self, config: usize) -> bool {
        self.trials.iter().any(|t| t.config == config && !t.state.is_terminal())
    }

    /// Ends the unfinished trials of every decided config as pruned, as the caller does in the
    /// scheduler.
    pub fn apply(&mut self, decisions: &[Decision]) {
        for trial in &mut self.trials {
            if !trial.state.is_terminal() && decisions.iter().any(|d| d.config == trial.config) {
                trial.state = TaskState::Pruned;
            }
        }
    }
}

/// The folds every config of `live` has completed.
fn common_folds(live: &[usize], scores: &[std::collections::BTreeMap<u32, f64>]) -> Vec<u32> {
    let Some((&first, rest)) = live.split_first() else {
        return vec![];
    };
    scores[first].keys().copied().filter(|fold| rest.iter().all(|&c| scores[c].contains_key(fold))).collect()
}

/// The config with the lowest mean over `folds` among `live` (ties: the lower index).
fn lowest_mean(live: &[usize], folds: &[u32], scores: &[std::collections::BTreeMap<u32, f64>]) -> Option<usize> {
    live.iter()
        .map(|&c| (c, mean(&folds.iter().map(|f| scores[c][f]).collect::<Vec<_>>())))
        .fold(None, |best: Option<(usize, f64)>, (c, m)| match best {
            Some((_, best_mean)) if best_mean <= m => best,
            _ => Some((c, m)),
        })
        .map(|(c, _)| c)
}

/// The current leader: among live configs, the lowest mean over the folds they have all
/// completed; before they share one, the best on the earliest fold any of them has completed.
/// `None` before any live config completed a fold.
pub fn leader(snapshot: &Snapshot) -> Option<usize> {
    let standings = snapshot.standings();
    let scores = snapshot.scores();
    let live: Vec<usize> = (0..standings.len()).filter(|&c| standings[c] == Standing::Live).collect();
    let common = common_folds(&live, &scores);
    if !common.is_empty() {
        return lowest_mean(&live, &common, &scores);
    }
    let earliest = live.iter().filter_map(|&c| scores[c].keys().next().copied()).min()?;
    let completed: Vec<usize> = live.iter().copied().filter(|&c| scores[c].contains_key(&earliest)).collect();
    lowest_mean(&completed, &[earliest], &scores)
}

fn values_list(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.5}")).collect();
    format!("[{}]", shown.join(", "))
}

/// The race after a fold round: every config to drop now (none while fewer than `min_folds`
/// folds are shared). Drops are repeated until none is left to make, since a dropped config
/// that lacked a fold no longer holds the others' common folds back. Never the leader; never a
/// config with nothing left to run (dropping it would save nothing and only change selection).
pub fn race(settings: &PruneSection, snapshot: &Snapshot) -> Vec<Decision> {
    if !settings.rule.races() {
        return vec![];
    }
    let mut state = snapshot.clone();
    let mut decisions: Vec<Decision> = Vec::new();
    let alpha = 1.0 - settings.confidence;
    loop {
        let standings = state.standings();
        let scores = state.scores();
        let live: Vec<usize> = (0..standings.len()).filter(|&c| standings[c] == Standing::Live).collect();
        let common = common_folds(&live, &scores);
        if common.len() < settings.min_folds as usize {
            break;
        }
        let Some(leader) = lowest_mean(&live, &common, &scores) else {
            break;
        };
        let leader_values: Vec<f64> = common.iter().map(|f| scores[leader][f]).collect();
        let mut round = Vec::new();
        for &config in live.iter().filter(|&&c| c != leader && state.has_work(c)) {
            let values: Vec<f64> = common.iter().map(|f| scores[config][f]).collect();
            let differences: Vec<f64> = values.iter().zip(&leader_values).map(|(v, l)| v - l).collect();
            let (t, df, p) = paired_t(&differences);
            if p < alpha {
                round.push(Decision {
                    config,
                    reason: format!(
                        "racing: fold round {}: worse than the leader {} on folds {common:?} with {:.1}% confidence: paired t = {t:.3} (df {df}), one-sided p = {p:.4} < {alpha:.4}; min {} {} vs the leader's {}",
                        common.len(),
                        state.label(leader),
                        settings.confidence * 100.0,
                        snapshot.metric(),
                        values_list(&values),
                        values_list(&leader_values),
                    ),
                });
            }
        }
        if round.is_empty() {
            break;
        }
        state.apply(&round);
        decisions.extend(round);
    }
    decisions
}

/// The rung check of one trial that just reported `reported` epochs (its curve in `snapshot`
/// already holds them): the config to drop when the trial falls outside the best `1/reduction`
/// of its fold at a rung among them. `trial` indexes [`Snapshot::trials`].
pub fn rung_check(settings: &PruneSection, epochs: u32, snapshot: &Snapshot, trial: usize, reported: &[u32]) -> Option<Decision> {
    if !settings.rule.has_rungs() {
        return None;
    }
    let own = snapshot.trials.get(trial)?;
    let standings = snapshot.standings();
    if own.state != TaskState::Running || standings[own.config] != Standing::Live {
        return None;
    }
    // The leader is never stopped, nor the last live config (before any fold completed there
    // is no leader yet, and trials of dropped configs still count at the rungs they reached).
    let live = standings.iter().filter(|&&standing| standing == Standing::Live).count();
    if live <= 1 || leader(snapshot) == Some(own.config) {
        return None;
    }
    let reduction = settings.reduction.max(2) as usize;
    for (index, rung) in settings.rungs(epochs).into_iter().enumerate() {
        if !reported.contains(&rung) {
            continue;
        }
        let Some(value) = own.best_until(rung) else {
            continue;
        };
        let mut at_rung: Vec<f64> = snapshot
            .trials
            .iter()
            .enumerate()
            .filter(|&(i, t)| i != trial && t.fold == own.fold && t.reached(rung))
            .filter_map(|(_, t)| t.best_until(rung))
            .collect();
        let better = at_rung.iter().filter(|&&v| v < value).count();
        at_rung.push(value);
        let reached = at_rung.len();
        let kept = reached.div_ceil(reduction);
        if better < kept {
            continue;
        }
        at_rung.sort_by(f64::total_cmp);
        return Some(Decision {
            config: own.config,
            reason: format!(
                "asha: fold {} rung {index} (epoch {rung}): best {} {value:.5} ranks {} of the {reached} trials of the fold at this rung; only the best {kept} (1/{reduction}) continue; the rung's values {}",
                own.fold,
                snapshot.metric(),
                better + 1,
                values_list(&at_rung),
            ),
        });
    }
    None
}
