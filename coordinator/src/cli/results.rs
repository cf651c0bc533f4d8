//! `coordinator status`, `results`, `wait` and `download`: reading a sweep back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cohort_coordinator::selection::{self, ConfigSummary, FoldResult};
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
    /// Minimum validation MSE.
    pub min_val_mse: Option<f64>,
    /// Final checkpoint blob.
    pub final_checkpoint: Option<String>,
    /// Artifacts: name → blob.
    pub artifacts: std::collections::BTreeMap<String, String>,
    /// Last worker.
    pub worker: String,
    /// Last error.
    pub error: String,
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
    /// Trials in plan order.
    pub trials: Vec<TrialRow>,
    /// Cross-validation summary per config.
    pub configs: Vec<ConfigSummary>,
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
        pb::TaskState::Unspecified => "unknown",
    }
}

impl From<pb::SweepDetail> for Results {
    fn from(detail: pb::SweepDetail) -> Self {
        let summary = detail.summary.unwrap_or_default();
        let trials: Vec<TrialRow> = detail.tasks.into_iter().map(trial_row).collect();
        let folds: Vec<FoldResult> = trials
            .iter()
            .filter_map(|t| t.fold.map(|fold| (t, fold)))
            .map(|(t, fold)| FoldResult {
                config: t.config.clone(),
                fold,
                min_val_mse: t.min_val_mse.filter(|_| t.state == "succeeded"),
            })
            .collect();
        let configs = selection::summarize(&folds);
        Results { sweep_id: summary.sweep_id, name: summary.name, state: sweep_state_name(summary.state).into(), trials, configs }
    }
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

fn trial_row(task: pb::TaskResult) -> TrialRow {
    let spec = task.spec.unwrap_or_default();
    let epochs: Vec<EpochRow> = task
        .epochs
        .into_iter()
        .map(|e| EpochRow { epoch: e.epoch, values: e.values.into_iter().collect(), seconds: e.seconds, attempt: e.attempt, samples: e.samples })
        .collect();
    let min_val_mse = epochs.iter().filter_map(|e| e.values.get("val_mse").copied()).reduce(f64::min);
    let kind = super::submit::kind_name(spec.kind()).to_string();
    let planned_epochs = spec.config.as_ref().map_or(0, |c| c.epochs);
    TrialRow {
        planned_epochs,
        task_id: spec.task_id,
        stage: spec.stage,
        kind,
        trial: spec.trial_name,
        config: spec.config_label,
        fold: spec.fold.map(|f| f.index),
        state: task_state_name(task.state).into(),
        attempts: spec.attempt,
        epochs,
        min_val_mse,
        final_checkpoint: task.checkpoints.iter().rev().find(|c| c.is_final).and_then(|c| c.blob.as_ref()).map(|b| b.sha256.clone()),
        artifacts: task.artifacts.into_iter().filter_map(|a| Some((a.name, a.blob?.sha256))).collect(),
        worker: task.worker,
        error: task.error,
    }
}

/// Fetches a sweep's results.
pub async fn fetch(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<Results> {
    Ok(fetch_detail(client, sweep_id).await?.into())
}

/// Fetches a sweep with all its tasks, page by page (each reply is bounded).
pub async fn fetch_detail(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<pb::SweepDetail> {
    let mut detail: Option<pb::SweepDetail> = None;
    let mut offset = 0;
    loop {
        let page = client
            .get_sweep(pb::GetSweepRequest { sweep_id: sweep_id.to_string(), offset, limit: 0 })
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?
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
        }
    }
    if results.configs.is_empty() {
        return;
    }
    println!();
    println!("cross-validation: minimum validation MSE per fold, mean ± std over folds (* = winner)");
    for c in &results.configs {
        let folds: Vec<String> = c.folds.iter().map(|v| mse(*v)).collect();
        let summary = match (c.mean, c.std) {
            (Some(mean), Some(std)) => format!("{mean:.5} ± {std:.5}"),
            _ => "incomplete: excluded".into(),
        };
        println!("{} {:<30} [{}]  {}", if c.winner { "*" } else { " " }, c.config, folds.join(", "), summary);
    }
}

fn print_cv_trials(trials: &[&TrialRow]) {
    println!("{:<14} {:<30} {:>4} {:<10} {:>3} {:>6} {:>12} {:>12}", "trial", "config", "fold", "state", "try", "epochs", "min val_mse", "last val_mse");
    for t in trials {
        let last = t.epochs.last().and_then(|e| e.values.get("val_mse").copied());
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
        if !t.error.is_empty() && t.state != "succeeded" {
            println!("{:<14} error: {}", "", t.error);
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

/// Prints every checkpoint of a sweep: trial, epoch, blob, whether final.
pub async fn print_checkpoints(client: &mut super::Client, sweep_id: &str, json: bool) -> anyhow::Result<()> {
    let detail = fetch_detail(client, sweep_id).await?;
    let mut rows = Vec::new();
    for task in &detail.tasks {
        let spec = task.spec.clone().unwrap_or_default();
        for c in &task.checkpoints {
            let blob = c.blob.clone().unwrap_or_default();
            rows.push(serde_json::json!({
                "task_id": spec.task_id, "trial": spec.trial_name, "epoch": c.epoch,
                "sha256": blob.sha256, "size": blob.size, "final": c.is_final,
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<14} {:<14} {:>5} {:>10} {:<5} sha256", "task", "trial", "epoch", "bytes", "final");
    for row in rows {
        println!(
            "{:<14} {:<14} {:>5} {:>10} {:<5} {}",
            row["task_id"].as_str().unwrap_or_default(),
            row["trial"].as_str().unwrap_or_default(),
            row["epoch"],
            row["size"],
            if row["final"] == true { "yes" } else { "" },
            row["sha256"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// Waits until the sweep leaves the running state or `timeout` passes; returns its final state.
pub async fn wait(client: &mut super::Client, sweep_id: &str, timeout: Option<Duration>) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let results = fetch(client, sweep_id).await?;
        if results.state != "running" {
            return Ok(results.state);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bail!("sweep {sweep_id} still running after {:?}", timeout.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Downloads a blob named by hash, or a task's final checkpoint named by task id, to `output`.
pub async fn download(client: &mut super::Client, what: &str, output: &Path) -> anyhow::Result<()> {
    let sha256 = if transfer::is_sha256_hex(what) {
        what.to_string()
    } else {
        let sweep_id = what.split('.').next().unwrap_or_default();
        let results = fetch(client, sweep_id).await.with_context(|| format!("{what} is neither a blob hash nor a task id"))?;
        let trial = results.trials.iter().find(|t| t.task_id == what).with_context(|| format!("no task {what}"))?;
        trial.final_checkpoint.clone().with_context(|| format!("task {what} has no final checkpoint yet"))?
    };
    let stream = client
        .download_blob(pb::FetchBlobRequest { sha256: sha256.clone() })
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner();
    let output = if output.is_relative() { std::env::current_dir()?.join(output) } else { output.to_path_buf() };
    transfer::receive_to_file(stream, &output, Some(&sha256), u64::MAX).await?;
    Ok(())
}
