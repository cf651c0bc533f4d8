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

use serde::{Deserialize, Serialize};

use crate::domain::TaskState;

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
                format!("{} leaves no rung: the first rung must come before the last of the cv.epochs = {epochs} epochs", self.grace_epochs),
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
        let racing = format!("racing after {} folds at {}% confidence (paired t-test vs the leader)", self.min_folds, self.confidence * 100.0);
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
        if self.metric.is_empty() { "val_mse" } else { &self.metric }
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

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
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

/// The one-sided paired t-test of "`differences` are positive on average": (t, degrees of
/// freedom, p-value). Differences all equal give t = ±∞ (p 0 or 1) or, all zero, t = 0 (p 1).
pub fn paired_t(differences: &[f64]) -> (f64, u32, f64) {
    let n = differences.len();
    let df = n.saturating_sub(1) as u32;
    if n < 2 {
        return (0.0, df, 1.0);
    }
    let average = mean(differences);
    let variance = differences.iter().map(|d| (d - average).powi(2)).sum::<f64>() / (n - 1) as f64;
    let standard_error = (variance / n as f64).sqrt();
    if standard_error == 0.0 || !standard_error.is_finite() {
        return match average {
            a if a > 0.0 => (f64::INFINITY, df, 0.0),
            a if a < 0.0 => (f64::NEG_INFINITY, df, 1.0),
            _ => (0.0, df, 1.0),
        };
    }
    let t = average / standard_error;
    (t, df, student_t_upper_tail(t, f64::from(df)))
}

/// P(T ≥ t) for Student's t with `df` degrees of freedom.
pub fn student_t_upper_tail(t: f64, df: f64) -> f64 {
    if t.is_nan() {
        return f64::NAN;
    }
    let x = df / (df + t * t);
    let tail = 0.5 * regularized_incomplete_beta(x, df / 2.0, 0.5);
    if t >= 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// I_x(a, b), the regularized incomplete beta function, by its continued fraction (Lentz).
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The fraction converges fast for x < (a + 1) / (a + b + 2); otherwise use the symmetry.
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a);
    }
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = if d.abs() < TINY { TINY } else { d };
    d = 1.0 / d;
    let mut fraction = d;
    for m in 1..500 {
        let m = f64::from(m);
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        for term in [even, -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))] {
            d = 1.0 + term * d;
            d = if d.abs() < TINY { TINY } else { d };
            c = 1.0 + term / c;
            c = if c.abs() < TINY { TINY } else { c };
            d = 1.0 / d;
            fraction *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    front * fraction / a
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

#[cfg(test)]
mod tests {
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
        for expected in ["racing: fold round 2", "the leader c0", "paired t = ", "(df 1)", "[0.04000, 0.04150] vs the leader's [0.03000, 0.03200]"] {
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
        let snapshot = Snapshot { labels: labels(2), trials: vec![done(0, 0, 0.01), done(0, 1, 0.01), done(1, 0, 0.05), done(1, 1, 0.05)], ..Snapshot::default() };
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
        assert!(decision.reason.starts_with("asha: fold 0 rung 0 (epoch 2): best val_mse 0.07500 ranks 2 of the 3 trials"), "{}", decision.reason);
        assert!(decision.reason.contains("only the best 1 (1/3) continue; the rung's values [0.07000, 0.07500, 0.08000]"), "{}", decision.reason);
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
        let error = crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"both\"\nreduction = 1\n"), "s").unwrap_err().to_string();
        assert!(error.contains("s: cv.prune.reduction: 1 must be at least 2"), "{error}");
        let error = crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"fast\"\n"), "s").unwrap_err().to_string();
        assert!(error.contains("unknown variant `fast`"), "{error}");
        let error = crate::sweep::SweepFile::parse(&format!("{grid}[cv.prune]\nrule = \"asha\"\nrungs = 3\n"), "s").unwrap_err().to_string();
        assert!(error.contains("unknown field `rungs`"), "{error}");
    }

    fn dataset() -> crate::domain::DatasetSpec {
        crate::domain::DatasetSpec { format: "idx".into(), files: vec![], train_limit: 0, test_limit: 0, image_size: 64, min_foreground: 0.05 }
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
        let Case { configs, folds, epochs, workers, rule, min_folds, grace_epochs, reduction, confidence, ref quality, ref difficulty, seed } = *case;
        use crate::scheduler::{Scheduler, SecretSource, TaskEntry, Timeouts};
        let rule = if folds == 2 { PruneRule::Asha } else { rule };
        let settings = PruneSection { rule, min_folds: min_folds.min(folds - 1).max(2), confidence, grace_epochs: grace_epochs.min(epochs - 1), reduction };
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
                proptest::prop_assert!(sim.scheduler.check_lease(&worker, &lease.task_id, lease.attempt, &lease.secret).is_err(), "its reports are refused");
                proptest::prop_assert!(sim.scheduler.complete(&worker, &lease.task_id, lease.attempt, &lease.secret, 0).is_err());
                held[w] = None;
                continue;
            }
            if next() % 40 == 0 {
                // An infrastructure failure: the attempt is retried, resuming where it was.
                sim.scheduler.fail(&worker, &lease.task_id, lease.attempt, &lease.secret, crate::domain::FailureKind::Infrastructure, "lost", 0).unwrap();
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
        for config in 0..configs {
            let done = snapshot.trials.iter().filter(|t| t.config == config && t.state == TaskState::Succeeded).count();
            match standings[config] {
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
}
