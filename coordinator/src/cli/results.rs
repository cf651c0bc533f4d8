//! `coordinator status`, `results`, `wait` and `download`: reading a sweep back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cohort_coordinator::selection::{self, ConfigSummary, FoldResult};
use cohort_proto::task::{CommandSpec, MalformedTask, TrainingConfig, TrialKind, TrialSpec};
use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use serde::Serialize;

/// A trial as the results show it.
#[derive(Debug, Clone, Serialize)]
pub struct TrialRow {
    /// Task id.
    pub task_id: String,
    /// Sweep stage.
    pub stage: String,
    /// Trial kind.
    pub kind: String,
    /// Trial name.
    pub trial: String,
    /// Hyperparameter config label.
    pub config: String,
    /// Fold index.
    pub fold: Option<u32>,
    /// State.
    pub state: String,
    /// Attempts started.
    pub attempts: u32,
    /// Epochs the trial is planned to train.
    pub planned_epochs: u32,
    /// Epochs reported.
    pub epochs: Vec<EpochRow>,
    /// Minimum validation MSE (a command trial's: the minimum of its `metric`).
    pub min_val_mse: Option<f64>,
    /// The metric `min_val_mse` is the minimum of, for command trials (`None`: `val_mse`).
    pub metric: Option<String>,
    /// Final checkpoint blob.
    pub final_checkpoint: Option<String>,
    /// Artifacts: name → blob.
    pub artifacts: std::collections::BTreeMap<String, String>,
    /// Last worker.
    pub worker: String,
    /// The same workers by the names they registered with (where the coordinator knows them).
    pub worker_names: String,
    /// Last error.
    pub error: String,
    /// Why it is not making progress now (what a queued trial waits for, a silent worker);
    /// empty when it is fine.
    pub waiting: String,
    /// Its hyperparameters and recipe, by name (lr, weight_decay, batch_size, epochs, ...).
    pub hyperparameters: std::collections::BTreeMap<String, f64>,
    /// When its latest attempt started, Unix ms.
    pub started_unix_ms: Option<i64>,
    /// When it ended, Unix ms.
    pub ended_unix_ms: Option<i64>,
    /// Seconds from its latest start to its end.
    pub duration_secs: Option<f64>,
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRow {
    /// Epoch.
    pub epoch: u32,
    /// Named values.
    pub values: std::collections::BTreeMap<String, f64>,
    /// Seconds.
    pub seconds: f64,
    /// The attempt that produced it.
    pub attempt: u32,
    /// Training samples processed.
    pub samples: u64,
}

/// A sweep's results.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Sweep id.
    pub sweep_id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: String,
    /// When it was submitted, Unix ms.
    pub created_unix_ms: i64,
    /// When its last trial ended (once it has ended), Unix ms.
    pub ended_unix_ms: Option<i64>,
    /// Seconds from submission to its end.
    pub duration_secs: Option<f64>,
    /// Trials in plan order.
    pub trials: Vec<TrialRow>,
    /// Cross-validation summary per config.
    pub configs: Vec<ConfigRow>,
}

/// A cross-validation config's summary, with its hyperparameters as fields.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRow {
    /// Folds, mean, std, winner.
    #[serde(flatten)]
    pub summary: ConfigSummary,
    /// "complete" (every fold succeeded), "pending" (some fold has not run yet), "excluded"
    /// (some fold failed for good, so it cannot win) or "pruned" (stopped early by `[cv.prune]`).
    pub status: String,
    /// Its hyperparameters, by name.
    pub hyperparameters: std::collections::BTreeMap<String, f64>,
}

/// Whether a config's folds all succeeded, some have not run yet, or one failed for good.
pub fn config_status(summary: &ConfigSummary, fold_states: &[&str]) -> &'static str {
    if fold_states.contains(&"pruned") {
        return "pruned";
    }
    if fold_states.iter().any(|state| matches!(*state, "failed" | "cancelled")) {
        return "excluded";
    }
    if summary.mean.is_some() {
        return "complete";
    }
    "pending"
}

/// Names a sweep state.
pub fn sweep_state_name(state: i32) -> &'static str {
    match pb::SweepState::try_from(state).unwrap_or(pb::SweepState::Unspecified) {
        pb::SweepState::Running => "running",
        pb::SweepState::Succeeded => "succeeded",
        pb::SweepState::Failed => "failed",
        pb::SweepState::Cancelled => "cancelled",
        pb::SweepState::Unspecified => "unknown",
    }
}

fn task_state_name(state: i32) -> &'static str {
    match pb::TaskState::try_from(state).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Queued => "queued",
        pb::TaskState::Running => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Cancelled => "cancelled",
        pb::TaskState::Pruned => "pruned",
        pb::TaskState::Unspecified => "unknown",
    }
}

impl TryFrom<pb::SweepDetail> for Results {
    type Error = MalformedTask;

    fn try_from(detail: pb::SweepDetail) -> Result<Self, MalformedTask> {
        let summary = detail.summary.unwrap_or_default();
        let trials: Vec<TrialRow> = detail.tasks.into_iter().map(trial_row).collect::<Result<_, _>>()?;
        let folds: Vec<FoldResult> = trials
            .iter()
            .filter_map(|t| t.fold.map(|fold| (t, fold)))
            .map(|(t, fold)| FoldResult { config: t.config.clone(), fold, min_val_mse: t.min_val_mse.filter(|_| t.state == "succeeded") })
            .collect();
        let configs = selection::summarize(&folds)
            .into_iter()
            .map(|config| {
                let cv: Vec<&TrialRow> = trials.iter().filter(|t| t.fold.is_some() && t.config == config.config).collect();
                let states: Vec<&str> = cv.iter().map(|t| t.state.as_str()).collect();
                let status = config_status(&config, &states).to_string();
                let mut hyperparameters = cv.first().map(|t| t.hyperparameters.clone()).unwrap_or_default();
                hyperparameters.remove("epochs");
                ConfigRow { summary: config, status, hyperparameters }
            })
            .collect();
        let state = sweep_state_name(summary.state).to_string();
        let ended_unix_ms = if state == "running" { None } else { trials.iter().filter_map(|t| t.ended_unix_ms).max() };
        let duration_secs = ended_unix_ms.map(|end| (end - summary.created_unix_ms).max(0) as f64 / 1000.0);
        Ok(Results {
            sweep_id: summary.sweep_id,
            name: summary.name,
            state,
            created_unix_ms: summary.created_unix_ms,
            ended_unix_ms,
            duration_secs,
            trials,
            configs,
        })
    }
}

/// A trial's training config as named numbers: what `results --format json` lists per trial.
fn hyperparameters(config: &TrainingConfig, kind: TrialKind) -> std::collections::BTreeMap<String, f64> {
    let mut values = std::collections::BTreeMap::new();
    values.insert("lr".to_string(), config.lr);
    values.insert("weight_decay".to_string(), config.weight_decay);
    values.insert("batch_size".to_string(), f64::from(config.batch_size));
    values.insert("epochs".to_string(), f64::from(config.epochs));
    match kind {
        TrialKind::DaeFold | TrialKind::DaeFinal => {
            values.insert("noise_std".to_string(), config.noise_std);
            values.insert("latent".to_string(), f64::from(config.latent));
        }
        TrialKind::Classifier => {
            values.insert("lr_encoder".to_string(), config.lr_encoder);
        }
        TrialKind::Wgan => {
            if let Some(wgan) = &config.wgan {
                values.insert("critic_steps".to_string(), f64::from(wgan.critic_steps));
                values.insert("gp_lambda".to_string(), wgan.gp_lambda);
                values.insert("beta1".to_string(), wgan.beta1);
                values.insert("beta2".to_string(), wgan.beta2);
            }
        }
        // A command's hyperparameters are its own (added from its spec by the caller).
        TrialKind::Command => values.retain(|name, _| name == "epochs"),
    }
    values
}

/// A command trial's numeric hyperparameters (COHORT_HPARAMS), by name.
fn command_hyperparameters(command: &CommandSpec) -> std::collections::BTreeMap<String, f64> {
    let parsed: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_str(&command.hparams_json).unwrap_or_default();
    parsed.into_iter().filter_map(|(name, value)| Some((name, value.as_f64()?))).collect()
}

impl Results {
    /// The stages its trials belong to, in the order they first appear.
    pub fn stages(&self) -> Vec<&str> {
        let mut stages: Vec<&str> = Vec::new();
        for trial in &self.trials {
            if !stages.contains(&trial.stage.as_str()) {
                stages.push(&trial.stage);
            }
        }
        stages
    }

    /// The trials of one stage.
    pub fn stage_trials(&self, stage: &str) -> Vec<&TrialRow> {
        self.trials.iter().filter(|t| t.stage == stage).collect()
    }
}

pub(crate) fn trial_row(task: pb::TaskResult) -> Result<TrialRow, MalformedTask> {
    let message = task.spec.unwrap_or_default();
    let spec = TrialSpec::from_wire(&message)?;
    let epochs: Vec<EpochRow> = task
        .epochs
        .into_iter()
        .map(|e| EpochRow {
            epoch: e.epoch,
            values: e.values.into_iter().collect(),
            seconds: e.seconds,
            attempt: e.attempt,
            samples: e.samples,
        })
        .collect();
    // The metric cross-validation minimises: a command's own, else the recipes' validation MSE.
    let metric = spec.command.as_ref().map_or("val_mse", |c| c.metric.as_str());
    let min_val_mse = epochs.iter().filter_map(|e| e.values.get(metric).copied()).reduce(f64::min);
    let metric = spec.command.as_ref().map(|c| c.metric.clone());
    let kind = spec.kind.to_string();
    let planned_epochs = spec.config.epochs;
    let mut hyperparameters = hyperparameters(&spec.config, spec.kind);
    if let Some(command) = &spec.command {
        hyperparameters.extend(command_hyperparameters(command));
    }
    let started_unix_ms = Some(task.started_unix_ms).filter(|&ms| ms > 0);
    let ended_unix_ms = Some(task.ended_unix_ms).filter(|&ms| ms > 0);
    let duration_secs = started_unix_ms.zip(ended_unix_ms).map(|(start, end)| (end - start).max(0) as f64 / 1000.0);
    Ok(TrialRow {
        planned_epochs,
        task_id: message.task_id,
        stage: spec.stage.to_string(),
        kind,
        trial: spec.name,
        config: spec.config_label,
        fold: spec.fold.map(|f| f.index),
        state: task_state_name(task.state).into(),
        attempts: message.attempt,
        epochs,
        min_val_mse,
        metric,
        final_checkpoint: task.checkpoints.iter().rev().find(|c| c.is_final).and_then(|c| c.blob.as_ref()).map(|b| b.sha256.clone()),
        artifacts: task.artifacts.into_iter().filter_map(|a| Some((a.name, a.blob?.sha256))).collect(),
        worker_names: if task.worker_names.is_empty() { task.worker.clone() } else { task.worker_names },
        worker: task.worker,
        error: task.error,
        waiting: task.waiting,
        hyperparameters,
        started_unix_ms,
        ended_unix_ms,
        duration_secs,
    })
}

/// Fetches a sweep's results.
pub async fn fetch(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<Results> {
    Ok(fetch_detail(client, sweep_id).await?.try_into()?)
}

/// Fetches a sweep with all its tasks, page by page (each reply is bounded).
pub async fn fetch_detail(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<pb::SweepDetail> {
    let mut detail: Option<pb::SweepDetail> = None;
    let mut offset = 0;
    loop {
        let page = client
            .get_sweep(pb::GetSweepRequest { sweep_id: sweep_id.to_string(), offset, limit: 0 })
            .await
            .map_err(super::rpc_error)?
            .into_inner();
        let next = page.next_offset;
        match &mut detail {
            None => detail = Some(page),
            Some(detail) => detail.tasks.extend(page.tasks),
        }
        if next == 0 || next <= offset {
            break;
        }
        offset = next;
    }
    let mut detail = detail.expect("one page was read");
    detail.next_offset = 0;
    Ok(detail)
}

fn mse(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.5}")).unwrap_or_else(|| "-".into())
}

fn values_line(values: &std::collections::BTreeMap<String, f64>) -> String {
    values.iter().map(|(k, v)| format!("{k}={v:.5}")).collect::<Vec<_>>().join(" ")
}

/// Prints results as tables: the trials stage by stage, then the cross-validation table.
pub fn print_table(results: &Results) {
    println!("sweep {} ({}): {}", results.sweep_id, results.name, results.state);
    for stage in results.stages() {
        let trials = results.stage_trials(stage);
        println!();
        println!("stage {stage}: {} trial(s)", trials.len());
        if stage == "cv" {
            print_cv_trials(&trials);
            continue;
        }
        for t in trials {
            println!("{:<10} {:<11} {:<44} {:<10} try {} epochs {}", t.trial, t.kind, t.config, t.state, t.attempts, t.epochs.len());
            if let Some(last) = t.epochs.last() {
                println!("{:<10} last epoch: {}", "", values_line(&last.values));
            }
            for key in ["test_mse", "test_accuracy"] {
                let series: Vec<String> = t.epochs.iter().filter_map(|e| e.values.get(key)).map(|v| format!("{v:.4}")).collect();
                if !series.is_empty() {
                    println!("{:<10} {key} per epoch: {}", "", series.join(" "));
                }
            }
            if !t.error.is_empty() && t.state != "succeeded" {
                println!("{:<10} error: {}", "", t.error);
            }
            if !t.waiting.is_empty() {
                println!("{:<10} {}", "", t.waiting);
            }
        }
    }
    if results.configs.is_empty() {
        return;
    }
    println!();
    let metric = results.trials.iter().find_map(|t| t.metric.clone()).unwrap_or_else(|| "validation MSE".to_string());
    println!("cross-validation: minimum {metric} per fold, mean ± std over folds (* = winner)");
    for row in &results.configs {
        let c = &row.summary;
        let folds: Vec<String> = c.folds.iter().map(|v| mse(*v)).collect();
        let summary = match (c.mean, c.std) {
            (Some(mean), Some(std)) => format!("{mean:.5} ± {std:.5}"),
            _ if row.status == "excluded" => "incomplete: excluded".into(),
            _ if row.status == "pruned" => "pruned: excluded".into(),
            _ => "pending".into(),
        };
        println!("{} {:<30} [{}]  {}", if c.winner { "*" } else { " " }, c.config, folds.join(", "), summary);
    }
}

fn print_cv_trials(trials: &[&TrialRow]) {
    // A pruned config's trials share one reason: it is printed once, at the first of them.
    let mut pruned_configs: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    // A command sweep's own metric, else the recipes' validation MSE.
    let metric = trials.iter().find_map(|t| t.metric.as_deref()).unwrap_or("val_mse");
    println!(
        "{:<14} {:<30} {:>4} {:<10} {:>3} {:>6} {:>12} {:>12}",
        "trial",
        "config",
        "fold",
        "state",
        "try",
        "epochs",
        format!("min {metric}"),
        format!("last {metric}")
    );
    for t in trials {
        let last = t.epochs.last().and_then(|e| e.values.get(metric).copied());
        let fold = t.fold.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<30} {:>4} {:<10} {:>3} {:>6} {:>12} {:>12}",
            t.trial,
            t.config,
            fold,
            t.state,
            t.attempts,
            t.epochs.len(),
            mse(t.min_val_mse),
            mse(last)
        );
        if t.state == "pruned" {
            match pruned_configs.get(t.config.as_str()) {
                Some(first) => println!("{:<14} pruned with {first}", ""),
                None => {
                    println!("{:<14} pruned: {}", "", t.error);
                    pruned_configs.insert(&t.config, &t.trial);
                }
            }
        } else if !t.error.is_empty() && t.state != "succeeded" {
            println!("{:<14} error: {}", "", t.error);
        }
        if !t.waiting.is_empty() {
            println!("{:<14} {}", "", t.waiting);
        }
    }
}

/// Prints every epoch of every trial as CSV: one row per (trial, epoch, metric).
pub fn print_csv(results: &Results) {
    println!("sweep_id,stage,trial,task_id,config,fold,state,epoch,attempt,metric,value");
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    for t in &results.trials {
        let fold = t.fold.map(|f| f.to_string()).unwrap_or_default();
        for e in &t.epochs {
            for (metric, value) in &e.values {
                println!(
                    "{},{},{},{},{},{fold},{},{},{},{metric},{value}",
                    results.sweep_id,
                    t.stage,
                    t.trial,
                    t.task_id,
                    quote(&t.config),
                    t.state,
                    e.epoch,
                    e.attempt
                );
            }
        }
    }
}

/// Prints every checkpoint of a sweep (trial, epoch, size, whether final, blob) as a table,
/// JSON or CSV.
pub async fn print_checkpoints(client: &mut super::Client, sweep_id: &str, format: super::Format) -> anyhow::Result<()> {
    let detail = fetch_detail(client, sweep_id).await?;
    let mut rows = Vec::new();
    for task in &detail.tasks {
        let message = task.spec.clone().unwrap_or_default();
        let trial = TrialSpec::from_wire(&message)?.name;
        for c in &task.checkpoints {
            let blob = c.blob.clone().unwrap_or_default();
            rows.push(serde_json::json!({
                "task_id": message.task_id, "trial": trial, "epoch": c.epoch,
                "sha256": blob.sha256, "size": blob.size, "final": c.is_final,
            }));
        }
    }
    if format == super::Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cells = |row: &serde_json::Value, is_final: &str| {
        vec![
            row["task_id"].as_str().unwrap_or_default().to_string(),
            row["trial"].as_str().unwrap_or_default().to_string(),
            row["epoch"].to_string(),
            row["size"].to_string(),
            is_final.to_string(),
            row["sha256"].as_str().unwrap_or_default().to_string(),
        ]
    };
    if format == super::Format::Csv {
        let rows: Vec<Vec<String>> = rows.iter().map(|row| cells(row, if row["final"] == true { "true" } else { "false" })).collect();
        super::print_csv_rows(&["task_id", "trial", "epoch", "size", "final", "sha256"], &rows);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = rows.iter().map(|row| cells(row, if row["final"] == true { "yes" } else { "" })).collect();
    super::print_columns(&["task", "trial", "epoch", "bytes", "final", "sha256"], &rows, &[false, false, true, true, false, false]);
    Ok(())
}

/// The sweep's best trial: the one that trained the winning config on the whole training set
/// (`final`), else a sweep's only trial outside cross-validation (a WGAN-GP's `train`).
pub fn best_trial(results: &Results) -> Option<&TrialRow> {
    if let Some(trial) = results.trials.iter().find(|t| t.stage == "final") {
        return Some(trial);
    }
    let mut later = results.trials.iter().filter(|t| t.fold.is_none());
    match (later.next(), later.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// Prints the winning config (when the sweep cross-validates) and the trial that trained it.
pub fn print_best(results: &Results, format: super::Format) -> anyhow::Result<()> {
    let winner = results.configs.iter().find(|c| c.summary.winner);
    let trial = best_trial(results);
    if winner.is_none() && trial.is_none() {
        bail!("sweep {} has no best trial yet (no cross-validation winner and no final trial)", results.sweep_id);
    }
    let hyperparameters =
        trial.map(|t| t.hyperparameters.clone()).or_else(|| winner.map(|w| w.hyperparameters.clone())).unwrap_or_default();
    let row = serde_json::json!({
        "sweep_id": results.sweep_id,
        "config": winner.map(|w| w.summary.config.clone()).or_else(|| trial.map(|t| t.config.clone())),
        "mean_val_mse": winner.and_then(|w| w.summary.mean),
        "std_val_mse": winner.and_then(|w| w.summary.std),
        "hyperparameters": hyperparameters,
        "trial": trial.map(|t| t.trial.clone()),
        "task_id": trial.map(|t| t.task_id.clone()),
        "state": trial.map(|t| t.state.clone()),
        "final_checkpoint": trial.and_then(|t| t.final_checkpoint.clone()),
    });
    match format {
        super::Format::Json => println!("{}", serde_json::to_string_pretty(&row)?),
        super::Format::Csv => {
            let text = |key: &str| match &row[key] {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            let keys = ["sweep_id", "config", "mean_val_mse", "std_val_mse", "trial", "task_id", "state", "final_checkpoint"];
            super::print_csv_rows(&keys, &[keys.iter().map(|key| text(key)).collect()]);
        }
        super::Format::Table => {
            if let Some(winner) = winner {
                let score = winner
                    .summary
                    .mean
                    .zip(winner.summary.std)
                    .map(|(mean, std)| format!("  (val_mse {mean:.5} ± {std:.5})"))
                    .unwrap_or_default();
                println!("best config: {}{score}", winner.summary.config);
            }
            match trial {
                Some(t) => {
                    let checkpoint = t.final_checkpoint.as_deref().unwrap_or("none yet");
                    println!("trial: {} ({}): {}, final checkpoint {checkpoint}", t.trial, t.task_id, t.state);
                    println!("hyperparameters: {}", values_line(&t.hyperparameters));
                }
                None => println!("no trial trains the winner in this sweep (it has no [final] stage)"),
            }
        }
    }
    Ok(())
}

/// The longest pause between tries while a following command cannot reach the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a command that follows a sweep (`wait`, `watch`, `logs --follow`) rides out a coordinator
/// it cannot reach for a while (restarting): it tries again with backoff capped at 5 s, saying
/// so on stderr once per interval; anything else the coordinator answers ends the command.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Duration,
    last_warning: Option<Instant>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { backoff: Duration::from_millis(200), last_warning: None }
    }
}

impl Reconnect {
    /// True for the errors worth trying again: the coordinator could not be reached.
    pub fn is_transient(error: &anyhow::Error) -> bool {
        error.chain().filter_map(|cause| cause.downcast_ref::<super::RpcError>()).any(|rpc| {
            matches!(rpc.code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
        })
    }

    /// Passes a success through (resetting the backoff); on a transient error, warns (once per
    /// interval), waits, and answers `None` so the caller tries again; other errors end it.
    pub async fn outcome<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
        let error = match result {
            Ok(value) => {
                self.backoff = Duration::from_millis(200);
                return Ok(Some(value));
            }
            Err(error) => error,
        };
        if !Self::is_transient(&error) {
            return Err(error);
        }
        if self.last_warning.is_none_or(|at| at.elapsed() >= MAX_BACKOFF) {
            self.last_warning = Some(Instant::now());
            eprintln!(
                "warning: {}; retrying with backoff up to {} s",
                cohort_proto::errors::error_chain(error.as_ref()),
                MAX_BACKOFF.as_secs()
            );
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(None)
    }
}

/// Fetches a sweep's results for a command that follows it, riding out a coordinator that
/// cannot be reached for a while ([`Reconnect`]).
pub async fn fetch_following(client: &mut super::Client, sweep_id: &str, reconnect: &mut Reconnect) -> anyhow::Result<Results> {
    loop {
        if let Some(results) = reconnect.outcome(fetch(client, sweep_id).await).await? {
            return Ok(results);
        }
    }
}

/// The sweep's state alone (one page of one task: the summary counts the whole sweep), riding
/// out a coordinator that cannot be reached for a while ([`Reconnect`]).
pub async fn state_following(client: &mut super::Client, sweep_id: &str, reconnect: &mut Reconnect) -> anyhow::Result<String> {
    loop {
        let request = pb::GetSweepRequest { sweep_id: sweep_id.to_string(), offset: 0, limit: 1 };
        let fetched =
            client.get_sweep(request).await.map_err(super::rpc_error).map(|reply| reply.into_inner().summary.unwrap_or_default().state);
        if let Some(state) = reconnect.outcome(fetched).await? {
            return Ok(sweep_state_name(state).to_string());
        }
    }
}

/// What `download` fetches.
#[derive(Debug, Clone)]
pub enum Download {
    /// A blob hash, or a task id (its final checkpoint).
    Named(String),
    /// A trial of a sweep by name or task id: its final checkpoint.
    Trial {
        /// The sweep.
        sweep_id: String,
        /// The trial's name (e.g. `final`) or task id.
        trial: String,
    },
    /// The sweep's best trial ([`best_trial`]): its final checkpoint.
    Best {
        /// The sweep.
        sweep_id: String,
    },
}

/// The final checkpoint of a trial, refusing a trial that has none yet.
fn final_checkpoint_of(trial: &TrialRow) -> anyhow::Result<String> {
    trial
        .final_checkpoint
        .clone()
        .with_context(|| format!("trial {} ({}) has no final checkpoint yet ({})", trial.trial, trial.task_id, trial.state))
}

/// Downloads a blob named by hash, or the final checkpoint of a trial (by task id, by sweep and
/// trial name, or the sweep's best), to `output`.
pub async fn download(client: &mut super::Client, what: &Download, output: &Path) -> anyhow::Result<()> {
    let sha256 = match what {
        Download::Named(name) if transfer::is_sha256_hex(name) => name.clone(),
        Download::Named(task_id) => {
            let sweep_id = task_id.split('.').next().unwrap_or_default();
            let results = fetch(client, sweep_id).await.with_context(|| format!("{task_id} is neither a blob hash nor a task id"))?;
            let trial = results.trials.iter().find(|t| &t.task_id == task_id).with_context(|| format!("no task {task_id}"))?;
            final_checkpoint_of(trial)?
        }
        Download::Trial { sweep_id, trial } => {
            let results = fetch(client, sweep_id).await?;
            let row = results
                .trials
                .iter()
                .find(|t| &t.trial == trial || &t.task_id == trial)
                .with_context(|| format!("sweep {sweep_id} has no trial {trial}"))?;
            final_checkpoint_of(row)?
        }
        Download::Best { sweep_id } => {
            let results = fetch(client, sweep_id).await?;
            let row = best_trial(&results).with_context(|| format!("sweep {sweep_id} has no best trial (no final stage)"))?;
            final_checkpoint_of(row)?
        }
    };
    let stream = client.download_blob(pb::FetchBlobRequest { sha256: sha256.clone() }).await.map_err(super::rpc_error)?.into_inner();
    let output = if output.is_relative() { std::env::current_dir()?.join(output) } else { output.to_path_buf() };
    transfer::receive_to_file(stream, &output, Some(&sha256), u64::MAX).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(mean: Option<f64>) -> ConfigSummary {
        ConfigSummary { config: "lr=1e-3".into(), folds: vec![mean, None], mean, std: mean.map(|_| 0.0), winner: false }
    }

    /// A config whose folds have not run yet is pending; only one with a fold that failed for
    /// good is excluded.
    #[test]
    fn configs_not_yet_run_are_pending_not_excluded() {
        assert_eq!(config_status(&summary(None), &["queued", "running"]), "pending");
        assert_eq!(config_status(&summary(None), &["succeeded", "failed"]), "excluded");
        assert_eq!(config_status(&summary(None), &["cancelled", "queued"]), "excluded");
        assert_eq!(config_status(&summary(Some(0.1)), &["succeeded", "succeeded"]), "complete");
    }

    /// The results carry each trial's hyperparameters as numbers, its times, and the workers'
    /// names; the best trial of a cross-validated sweep is `final`.
    #[test]
    fn results_carry_hyperparameters_times_and_names() {
        let task = |name: &str, fold: Option<u32>, stage: &str| pb::TaskResult {
            spec: Some(pb::TaskSpec {
                task_id: format!("s1.{name}"),
                spec_json: serde_json::json!({
                    "name": name, "stage": stage, "config_label": "lr=1e-3",
                    "kind": if fold.is_some() { "dae-fold" } else { "dae-final" },
                    "config": {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 32, "epochs": 2, "latent": 4, "noise_std": 0.3, "seed": 0},
                    "dataset": {"format": "idx", "files": [], "train_limit": 0, "test_limit": 0},
                    "fold": fold.map(|index| serde_json::json!({"folds": 2, "index": index, "shuffle_seed": 0})),
                    "checkpoint_every": 1, "max_attempts": 3,
                })
                .to_string(),
                ..Default::default()
            }),
            state: pb::TaskState::Succeeded as i32,
            worker: "w-1".into(),
            worker_names: "alpha".into(),
            started_unix_ms: 1_000,
            ended_unix_ms: 3_500,
            epochs: vec![pb::EpochMetrics { epoch: 1, values: [("val_mse".to_string(), 0.2)].into(), ..Default::default() }],
            ..Default::default()
        };
        let detail = pb::SweepDetail {
            summary: Some(pb::SweepSummary {
                sweep_id: "s1".into(),
                state: pb::SweepState::Succeeded as i32,
                created_unix_ms: 500,
                ..Default::default()
            }),
            source: String::new(),
            tasks: vec![task("cv/c0/f0", Some(0), "cv"), task("cv/c0/f1", Some(1), "cv"), task("final", None, "final")],
            ..Default::default()
        };
        let results = Results::try_from(detail).unwrap();
        let trial = &results.trials[0];
        assert_eq!(trial.hyperparameters["lr"], 1e-3);
        assert_eq!(trial.hyperparameters["latent"], 4.0);
        assert_eq!(trial.duration_secs, Some(2.5));
        assert_eq!(trial.worker_names, "alpha");
        assert_eq!(results.duration_secs, Some(3.0));
        assert_eq!(results.configs[0].status, "complete");
        assert_eq!(results.configs[0].hyperparameters["batch_size"], 32.0);
        assert!(!results.configs[0].hyperparameters.contains_key("epochs"));
        assert_eq!(best_trial(&results).map(|t| t.trial.as_str()), Some("final"));
    }
}
