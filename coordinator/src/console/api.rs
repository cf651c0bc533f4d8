//! The console's JSON views. Each reads only what its screen shows: the sweep list counts tasks
//! in SQL, a sweep's page reads its stages' counts and one page of trials, curves come per trial
//! or aggregated per config. Queries run on the blocking pool, off the async workers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};

use super::{json as json_response, query, ApiError, Console};
use crate::core::Core;
use crate::domain::Stage;
use crate::events::sweep_of;
use crate::selection::{self, ConfigSummary, FoldResult};
use crate::store::views::{StageRow, SweepRow, TrialRow};
use crate::store::Store;

/// Most sweeps or trials one page holds.
const MAX_PAGE: u64 = 500;

/// Kept views by (sweep, view), each with the key it was computed for.
type MemoEntries = HashMap<(String, &'static str), (String, Value)>;

/// Views of sweeps, kept while the sweep's task counts stay the same.
#[derive(Debug, Default)]
pub struct Memo {
    entries: Mutex<MemoEntries>,
}

impl Memo {
    /// The view `what` of `sweep_id` for `key`, computed by `compute` when not kept.
    fn get_or(
        &self,
        sweep_id: &str,
        what: &'static str,
        key: &str,
        compute: impl FnOnce() -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let lookup = (sweep_id.to_string(), what);
        if let Some((kept_key, value)) = self.lock().get(&lookup) {
            if kept_key == key {
                return Ok(value.clone());
            }
        }
        let value = compute()?;
        let mut entries = self.lock();
        if entries.len() > 20_000 {
            entries.clear();
        }
        entries.insert(lookup, (key.to_string(), value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoEntries> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs a store query on the blocking pool.
pub async fn read<T: Send + 'static>(
    core: &Arc<Core>,
    query: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    off_runtime(core, move |core| core.read(query)).await?.map_err(ApiError::from)
}

/// Runs `call` on the core on the blocking pool, as the gRPC handlers do
/// ([`crate::service::blocking`]): the core's lock may be held for a commit's fsync, which must
/// not hold up the runtime. A call that panicked is an internal error.
pub async fn off_runtime<T: Send + 'static>(core: &Arc<Core>, call: impl FnOnce(&Core) -> T + Send + 'static) -> Result<T, ApiError> {
    let core = core.clone();
    tokio::task::spawn_blocking(move || call(&core)).await.map_err(|e| ApiError::Internal(e.to_string()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn count(counts: &HashMap<String, u32>, state: &str) -> u32 {
    counts.get(state).copied().unwrap_or(0)
}

/// A sweep's overall state from its task counts (as [`crate::core::Counts::state`]).
pub fn sweep_state(counts: &HashMap<String, u32>, cancelled: bool) -> &'static str {
    if cancelled {
        return "cancelled";
    }
    if count(counts, "queued") + count(counts, "running") > 0 {
        return "running";
    }
    if count(counts, "failed") + count(counts, "cancelled") > 0 {
        return "failed";
    }
    "succeeded"
}

fn counts_json(counts: &HashMap<String, u32>) -> Value {
    let total: u32 = counts.values().sum();
    json!({
        "total": total,
        "queued": count(counts, "queued"),
        "running": count(counts, "running"),
        "succeeded": count(counts, "succeeded"),
        "failed": count(counts, "failed"),
        "cancelled": count(counts, "cancelled"),
    })
}

/// A key that changes whenever any task of the sweep changes state.
fn counts_key(counts: &HashMap<String, u32>, cancelled: bool) -> String {
    let sorted: BTreeMap<&String, &u32> = counts.iter().collect();
    format!("{sorted:?}{cancelled}")
}

/// A stage's progress, with an estimate of the time left: the trials left times the mean
/// training time of its finished trials, over the trials running at once.
fn stage_json(stage: &StageRow) -> Value {
    let total: u32 = stage.counts.values().sum();
    let ended = count(&stage.counts, "succeeded") + count(&stage.counts, "failed") + count(&stage.counts, "cancelled");
    let running = count(&stage.counts, "running");
    let left = count(&stage.counts, "queued") + running;
    let (seconds, finished) = stage.finished_seconds;
    let mean = (finished > 0).then(|| seconds / f64::from(finished));
    let eta = mean.filter(|_| left > 0).map(|mean| mean * f64::from(left) / f64::from(running.max(1)));
    json!({"stage": stage.stage, "counts": counts_json(&stage.counts), "total": total, "ended": ended, "mean_trial_s": mean, "eta_s": eta})
}

fn sweep_json(row: &SweepRow, stages: Value, winner: Value, last_activity_ms: Option<i64>) -> Value {
    let state = sweep_state(&row.counts, row.cancelled);
    let end_ms = if state == "running" { Some(now_ms()) } else { last_activity_ms };
    json!({
        "id": row.id,
        "name": row.name,
        "state": state,
        "created_ms": row.created_ms,
        "duration_s": end_ms.map(|end| ((end - row.created_ms).max(0) as f64) / 1000.0),
        "counts": counts_json(&row.counts),
        "stages": stages,
        "winner": winner,
    })
}

/// The metric the sweep's cross-validation minimises: a command sweep's `[command] metric`, else
/// `val_mse`.
fn cv_metric(store: &Store, sweep_id: &str) -> Result<String, crate::store::StoreError> {
    let source = store.sweep(sweep_id)?.map(|record| record.source).unwrap_or_default();
    let command = crate::sweep::SweepFile::parse(&source, "sweep").ok().and_then(|sweep| sweep.command);
    Ok(command.map_or_else(|| "val_mse".to_string(), |command| command.metric))
}

/// The cross-validation table of a sweep: each config's fold minima (of succeeded trials) of
/// `metric`, mean, standard deviation, and the winner.
fn cv_summaries(store: &Store, sweep_id: &str, metric: &str) -> Result<(Vec<ConfigSummary>, u32), crate::store::StoreError> {
    let tasks = store.fold_tasks(sweep_id, Stage::Cv.as_str())?;
    if tasks.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut minima = store.min_metric_by_task(sweep_id, metric)?;
    let folds = tasks.iter().filter_map(|t| t.fold).max().map_or(0, |f| f + 1);
    let results: Vec<FoldResult> = tasks
        .into_iter()
        .map(|task| FoldResult {
            min_val_mse: minima.remove(&task.task_id).filter(|_| task.state == "succeeded"),
            config: task.config,
            fold: task.fold.unwrap_or(0),
        })
        .collect();
    Ok((selection::summarize(&results), folds))
}

/// Why the winner won, in words: "lowest mean validation MSE; 2nd (c1) is 0.4 std behind"
/// (for another `metric`: "lowest mean val_loss; …").
pub fn explain_winner(summaries: &[ConfigSummary], metric: &str) -> Option<String> {
    let winner = summaries.iter().find(|s| s.winner)?;
    let mean = winner.mean?;
    let mut others: Vec<&ConfigSummary> = summaries.iter().filter(|s| !s.winner && s.mean.is_some()).collect();
    others.sort_by(|a, b| a.mean.partial_cmp(&b.mean).unwrap_or(std::cmp::Ordering::Equal));
    let Some(second) = others.first() else {
        return Some("the only config with every fold finished".to_string());
    };
    let gap = second.mean.unwrap_or(mean) - mean;
    let std = winner.std.unwrap_or(0.0);
    let behind = if std > 0.0 { format!("{:.1} std behind", gap / std) } else { format!("{gap:.3e} behind") };
    let metric = if metric == "val_mse" { "validation MSE" } else { metric };
    Some(format!("lowest mean {metric}; 2nd ({}) is {behind}", second.config))
}

/// `GET /api/sweeps?state=&q=&offset=&limit=`: a page of sweeps, newest first.
pub async fn sweeps(State(console): State<Arc<Console>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let params = query::parse(raw.as_deref());
    let state = query::text(&params, "state").map(str::to_string);
    let name = query::text(&params, "q").map(str::to_lowercase);
    let offset = query::number(&params, "offset", 0, u64::MAX);
    let limit = query::number(&params, "limit", 50, MAX_PAGE).max(1);
    let rows = read(&console.core, |store| store.sweep_rows()).await?;
    let matching: Vec<SweepRow> = rows
        .into_iter()
        .rev()
        .filter(|row| state.as_deref().is_none_or(|state| sweep_state(&row.counts, row.cancelled) == state))
        .filter(|row| name.as_deref().is_none_or(|name| row.name.to_lowercase().contains(name) || row.id.contains(name)))
        .collect();
    let total = matching.len();
    let page: Vec<SweepRow> = matching.into_iter().skip(offset as usize).take(limit as usize).collect();
    let console_for_page = console.clone();
    let sweeps = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        page.iter().map(|row| summary_of(&console_for_page, row)).collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(json_response(&json!({"total": total, "offset": offset, "limit": limit, "sweeps": sweeps})))
}

/// One sweep's summary with its stages and (once known) winner; kept while its counts stand.
fn summary_of(console: &Console, row: &SweepRow) -> Result<Value, ApiError> {
    let key = counts_key(&row.counts, row.cancelled);
    let extra = console.memo.get_or(&row.id, "summary", &key, || {
        let id = row.id.clone();
        console
            .core
            .read(move |store| {
                let rows = store.stage_rows(&id)?;
                // A winner is known once cross-validation has no trial left to run.
                let cv_done = rows
                    .iter()
                    .any(|row| row.stage == Stage::Cv.as_str() && count(&row.counts, "queued") + count(&row.counts, "running") == 0);
                let winner = match cv_done {
                    true => cv_summaries(store, &id, &cv_metric(store, &id)?)?.0.into_iter().find(|s| s.winner).map(|s| s.config),
                    false => None,
                };
                let stages: Vec<Value> = rows.iter().map(stage_json).collect();
                let last = store.last_log_ms(&id)?;
                Ok(json!({"stages": stages, "winner": winner, "last_ms": last}))
            })
            .map_err(ApiError::from)
    })?;
    Ok(sweep_json(row, extra["stages"].clone(), extra["winner"].clone(), extra["last_ms"].as_i64()))
}

/// `GET /api/sweeps/{id}`: the sweep's summary and each stage's progress.
pub async fn sweep(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let sweep_id = id.clone();
    let (record, counts, stages, last) = read(&console.core, move |store| {
        let Some(record) = store.sweep(&sweep_id)? else {
            return Ok(None);
        };
        let stages = store.stage_rows(&sweep_id)?;
        let last = store.last_log_ms(&sweep_id)?;
        let mut counts: HashMap<String, u32> = HashMap::new();
        for stage in &stages {
            for (state, n) in &stage.counts {
                *counts.entry(state.clone()).or_default() += n;
            }
        }
        Ok(Some((record, counts, stages, last)))
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("sweep {id}")))?;
    let row = SweepRow {
        id: record.id.clone(),
        seq: record.seq,
        name: record.name.clone(),
        created_ms: record.created_ms,
        cancelled: record.cancelled,
        counts,
    };
    let stages: Vec<Value> = stages.iter().map(stage_json).collect();
    let mut view = sweep_json(&row, Value::Array(stages), Value::Null, last);
    view["source"] = Value::String(record.source);
    Ok(json_response(&view))
}

fn trial_json(row: &TrialRow) -> Value {
    let spec = Store::parse_spec(&row.spec).ok();
    let last: serde_json::Map<String, Value> = row.last_values.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "id": row.id,
        "sweep_id": sweep_of(&row.id),
        "name": spec.as_ref().map(|s| s.name.clone()),
        "stage": spec.as_ref().map(|s| s.stage),
        "config": spec.as_ref().map(|s| s.config_label.clone()),
        "kind": spec.as_ref().map(|s| s.kind.as_str()),
        "fold": spec.as_ref().and_then(|s| s.fold).map(|f| f.index),
        "planned_epochs": spec.as_ref().map(|s| s.config.epochs),
        "state": row.state,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "epochs": row.epochs,
        "last": last,
        "workers": row.members,
        "error": row.error,
    })
}

/// `GET /api/sweeps/{id}/trials?stage=&state=&offset=&limit=`: a page of trials in plan order.
pub async fn trials(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let params = query::parse(raw.as_deref());
    let stage = query::text(&params, "stage").map(str::to_string);
    let state = query::text(&params, "state").map(str::to_string);
    let offset = query::number(&params, "offset", 0, u64::MAX);
    let limit = query::number(&params, "limit", 50, MAX_PAGE).max(1);
    let sweep_id = id.clone();
    let (rows, total) = read(&console.core, move |store| {
        let span = match &stage {
            Some(stage) => match store.stage_span(&sweep_id, stage)? {
                Some(span) => Some(span),
                None => return Ok((Vec::new(), 0)),
            },
            None => None,
        };
        store.trial_rows(&sweep_id, span, state.as_deref(), offset, limit)
    })
    .await?;
    let mut waiting = if rows.iter().any(|row| row.state == "queued" || row.state == "running") {
        let sweep_id = id.clone();
        off_runtime(&console.core, move |core| core.waiting_reasons(&sweep_id)).await?
    } else {
        HashMap::new()
    };
    let trials: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut trial = trial_json(row);
            trial["waiting"] = waiting.remove(&row.id).map_or(Value::Null, Value::String);
            trial
        })
        .collect();
    Ok(json_response(&json!({"total": total, "offset": offset, "limit": limit, "trials": trials})))
}

/// `GET /api/sweeps/{id}/cv?limit=N`: the cross-validation table and why the winner won. A sweep
/// of more than `limit` configs (default 200) shows the `limit` with the lowest means, in grid
/// order; `total` says how many there are.
pub async fn cross_validation(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let limit = query::number(&query::parse(raw.as_deref()), "limit", 200, 100_000).max(1) as usize;
    let (summaries, folds, metric) = read(&console.core, move |store| {
        let metric = cv_metric(store, &id)?;
        let (summaries, folds) = cv_summaries(store, &id, &metric)?;
        Ok((summaries, folds, metric))
    })
    .await?;
    let explanation = explain_winner(&summaries, &metric);
    let total = summaries.len();
    Ok(json_response(
        &json!({"folds": folds, "configs": best_configs(summaries, limit), "total": total, "explanation": explanation, "metric": metric}),
    ))
}

/// The `limit` configs with the lowest means (unfinished ones last), kept in grid order.
fn best_configs(summaries: Vec<ConfigSummary>, limit: usize) -> Vec<ConfigSummary> {
    if summaries.len() <= limit {
        return summaries;
    }
    let mut ranked: Vec<(usize, f64)> = summaries.iter().enumerate().map(|(i, s)| (i, s.mean.unwrap_or(f64::INFINITY))).collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut keep: Vec<usize> = ranked.into_iter().take(limit).map(|(i, _)| i).collect();
    keep.sort_unstable();
    let mut summaries: Vec<Option<ConfigSummary>> = summaries.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| summaries[i].take()).collect()
}

/// Mean, sample standard deviation, and count of `values`.
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, variance.sqrt())
}

/// `GET /api/sweeps/{id}/curves?metric=val_mse`: each config's mean curve over its folds, with
/// the folds' spread (mean ± one standard deviation) per epoch; by default of the metric the
/// sweep's cross-validation minimises.
pub async fn config_curves(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let params = query::parse(raw.as_deref());
    let asked = query::text(&params, "metric").map(str::to_string);
    let (metric, epochs) = read(&console.core, move |store| {
        let metric = match asked {
            Some(metric) => metric,
            None => cv_metric(store, &id)?,
        };
        Ok((metric, store.stage_epochs(&id, Stage::Cv.as_str())?))
    })
    .await?;
    let mut by_config: Vec<(String, BTreeMap<u32, Vec<f64>>)> = Vec::new();
    for epoch in epochs {
        let Some(value) = epoch.values.iter().find(|(k, _)| *k == metric).map(|(_, v)| *v) else {
            continue;
        };
        let index = match by_config.iter().position(|(config, _)| *config == epoch.config) {
            Some(index) => index,
            None => {
                by_config.push((epoch.config.clone(), BTreeMap::new()));
                by_config.len() - 1
            }
        };
        by_config[index].1.entry(epoch.epoch).or_default().push(value);
    }
    let configs: Vec<Value> = by_config
        .into_iter()
        .map(|(config, epochs)| {
            let points: Vec<Value> = epochs
                .iter()
                .map(|(epoch, values)| {
                    let (mean, std) = mean_std(values);
                    json!({"epoch": epoch, "mean": mean, "low": mean - std, "high": mean + std, "folds": values.len()})
                })
                .collect();
            json!({"config": config, "points": points})
        })
        .collect();
    Ok(json_response(&json!({"metric": metric, "configs": configs})))
}

/// `GET /api/trials/{id}`: one trial with every epoch, its checkpoints and artifacts.
pub async fn trial(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let task_id = id.clone();
    let found = read(&console.core, move |store| {
        let Some(row) = store.trial_row(&task_id)? else {
            return Ok(None);
        };
        Ok(Some((row, store.metrics(&task_id)?, store.checkpoints(&task_id)?, store.artifacts(&task_id)?)))
    })
    .await?;
    let (row, epochs, checkpoints, artifacts) = found.ok_or_else(|| ApiError::NotFound(format!("trial {id}")))?;
    let mut view = trial_json(&row);
    view["epochs"] = epochs
        .iter()
        .map(|e| json!({"epoch": e.epoch, "attempt": e.attempt, "seconds": e.seconds, "values": e.values.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()}))
        .collect();
    view["checkpoints"] = checkpoints
        .iter()
        .map(|c| json!({"epoch": c.epoch, "attempt": c.attempt, "sha256": c.blob.sha256, "size": c.blob.size, "final": c.is_final}))
        .collect();
    view["artifacts"] =
        artifacts.iter().map(|a| json!({"name": a.name, "epoch": a.epoch, "sha256": a.blob.sha256, "size": a.blob.size})).collect();
    Ok(json_response(&view))
}

/// `GET /api/trials/{id}/logs?after=ID&limit=N`: the trial's log lines after a line id; without
/// `after`, the last `limit` lines (the tail).
pub async fn logs(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let params = query::parse(raw.as_deref());
    let limit = query::number(&params, "limit", 200, 1000) as usize;
    let core = console.core.clone();
    let after: Option<i64> = params.get("after").and_then(|a| a.parse().ok());
    let lines = tokio::task::spawn_blocking(move || -> Result<Vec<crate::store::LogRecord>, ApiError> {
        let sweep_id = sweep_of(&id).to_string();
        match after {
            Some(after) => Ok(core.logs(&sweep_id, Some(&id), after, limit, 1 << 20)?),
            None => {
                // The tail: page through from the start keeping the last `limit` lines.
                let mut tail: std::collections::VecDeque<crate::store::LogRecord> = std::collections::VecDeque::new();
                let mut after = 0;
                loop {
                    let page = core.logs(&sweep_id, Some(&id), after, 1000, 1 << 20)?;
                    let Some(last) = page.last() else { break };
                    after = last.id;
                    tail.extend(page);
                    while tail.len() > limit {
                        tail.pop_front();
                    }
                }
                Ok(tail.into_iter().collect())
            }
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| json!({"id": l.id, "attempt": l.attempt, "unix_ms": l.unix_ms, "level": l.level, "message": l.message}))
        .collect();
    Ok(json_response(&json!({"lines": lines})))
}

/// `GET /api/workers`: every registered worker: its device, what it runs, time by phase and
/// when it was last heard of.
pub async fn workers(State(console): State<Arc<Console>>, headers: HeaderMap) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let workers = off_runtime(&console.core, |core| core.workers()).await??;
    let task_ids: Vec<String> = workers.iter().filter_map(|w| w.task.as_ref().map(|t| t.task_id.clone())).collect();
    let trials = read(&console.core, move |store| {
        let mut trials = HashMap::new();
        for task_id in task_ids {
            if let Some(row) = store.trial_row(&task_id)? {
                trials.insert(task_id, trial_json(&row));
            }
        }
        Ok(trials)
    })
    .await?;
    let rows: Vec<Value> = workers
        .into_iter()
        .map(|w| {
            let trial = w.task.as_ref().and_then(|t| trials.get(&t.task_id)).cloned();
            let phases: serde_json::Map<String, Value> = w.phases.iter().map(|(phase, seconds)| (phase.clone(), json!(seconds))).collect();
            json!({
                "id": w.id,
                "name": w.name,
                "device": w.device,
                "allow_commands": w.allow_commands,
                "last_seen_s": w.last_seen_secs,
                "trial": trial,
                "phases": phases,
            })
        })
        .collect();
    Ok(json_response(&json!({"workers": rows})))
}

/// `POST /api/sweeps/{id}/cancel`: cancels the sweep's unfinished trials (client token and CSRF).
pub async fn cancel(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    console.auth.actor(&headers)?;
    let sweep_id = id.clone();
    let cancelled = off_runtime(&console.core, move |core| core.cancel(&sweep_id)).await??;
    tracing::info!(sweep = %id, cancelled, "sweep cancelled from the console");
    Ok(json_response(&json!({"cancelled": cancelled})))
}

/// `POST /api/sweeps/{id}/retry`: queues the sweep's failed and cancelled trials again.
pub async fn retry(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    console.auth.actor(&headers)?;
    let sweep_id = id.clone();
    let requeued = off_runtime(&console.core, move |core| core.retry(&sweep_id)).await??;
    tracing::info!(sweep = %id, requeued, "sweep retried from the console");
    Ok(json_response(&json!({"requeued": requeued})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(config: &str, mean: f64, std: f64, winner: bool) -> ConfigSummary {
        ConfigSummary { config: config.into(), folds: vec![Some(mean)], mean: Some(mean), std: Some(std), winner }
    }

    #[test]
    fn the_winner_is_explained_against_the_runner_up() {
        let text =
            explain_winner(&[summary("c0", 0.30, 0.1, false), summary("c1", 0.20, 0.1, true), summary("c2", 0.24, 0.2, false)], "val_mse")
                .unwrap();
        assert_eq!(text, "lowest mean validation MSE; 2nd (c2) is 0.4 std behind");
        assert_eq!(explain_winner(&[summary("c0", 0.3, 0.0, true)], "val_mse").unwrap(), "the only config with every fold finished");
        assert!(explain_winner(&[summary("c0", 0.3, 0.0, false)], "val_mse").is_none());
        let text = explain_winner(&[summary("c0", 0.30, 0.1, false), summary("c1", 0.20, 0.1, true)], "val_loss").unwrap();
        assert!(text.starts_with("lowest mean val_loss; 2nd (c0)"), "{text}");
    }

    #[test]
    fn a_big_table_keeps_the_best_configs_in_grid_order() {
        let summaries = vec![
            summary("c0", 0.5, 0.1, false),
            summary("c1", 0.1, 0.1, true),
            summary("c2", 0.3, 0.1, false),
            summary("c3", 0.2, 0.1, false),
        ];
        let kept: Vec<String> = best_configs(summaries, 2).into_iter().map(|s| s.config).collect();
        assert_eq!(kept, ["c1", "c3"]);
    }

    #[test]
    fn sweep_state_follows_the_counts() {
        let counts = |pairs: &[(&str, u32)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>();
        assert_eq!(sweep_state(&counts(&[("queued", 1), ("failed", 1)]), false), "running");
        assert_eq!(sweep_state(&counts(&[("succeeded", 2), ("failed", 1)]), false), "failed");
        assert_eq!(sweep_state(&counts(&[("succeeded", 2)]), false), "succeeded");
        assert_eq!(sweep_state(&counts(&[("succeeded", 2)]), true), "cancelled");
    }
}
