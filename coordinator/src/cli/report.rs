//! `coordinator report`: fetches a sweep's results and artifacts and draws the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cohort_coordinator::report::{self, ReportInput, TrialRow as ReportTrial};
use cohort_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::results::{self, Results};
use super::Client;

/// Downloads a blob into memory.
async fn download_bytes(client: &mut Client, sha256: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream =
        client.download_blob(pb::FetchBlobRequest { sha256: sha256.to_string() }).await.map_err(super::rpc_error)?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk?.data);
    }
    Ok(bytes)
}

/// The stages whose single trial's curves and artifacts the figures use.
const FIGURE_STAGES: [&str; 3] = ["final", "finetune", "train"];

async fn gather(client: &mut Client, results: &Results) -> anyhow::Result<ReportInput> {
    let mut input = ReportInput {
        sweep_id: results.sweep_id.clone(),
        name: results.name.clone(),
        state: results.state.clone(),
        cv: results.configs.iter().map(|c| c.summary.clone()).collect(),
        ..ReportInput::default()
    };
    for trial in &results.trials {
        let last = trial.epochs.last().map(|e| e.values.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default();
        input.trials.push(ReportTrial {
            stage: trial.stage.clone(),
            trial: trial.trial.clone(),
            config: trial.config.clone(),
            state: trial.state.clone(),
            attempts: trial.attempts,
            last,
            note: if trial.state == "succeeded" { String::new() } else { trial.error.clone() },
        });
        if !FIGURE_STAGES.contains(&trial.stage.as_str()) {
            continue;
        }
        for epoch in &trial.epochs {
            for (key, value) in &epoch.values {
                input.series.entry((trial.stage.clone(), key.clone())).or_default().push((f64::from(epoch.epoch), *value));
            }
        }
        for (name, sha256) in &trial.artifacts {
            let bytes = download_bytes(client, sha256).await.with_context(|| format!("downloading artifact {name}"))?;
            input.artifacts.insert((trial.stage.clone(), name.clone()), report::read_artifact(name, &bytes)?);
        }
    }
    Ok(input)
}

/// Writes TensorBoard event files of every trial of `sweep_id` under `out`; returns how many runs.
pub async fn export_tensorboard(client: &mut Client, sweep_id: &str, out: &Path) -> anyhow::Result<usize> {
    let results = results::fetch(client, sweep_id).await?;
    let mut records = Vec::new();
    for trial in &results.trials {
        let mut record = report::TrialRecord { run: trial.trial.clone(), ..Default::default() };
        for epoch in &trial.epochs {
            for (key, value) in &epoch.values {
                record.scalars.push((key.clone(), i64::from(epoch.epoch), *value));
            }
        }
        for (name, sha256) in &trial.artifacts {
            let (tag, step, parts): (&str, &str, &[&str]) = if let Some(step) = name.strip_prefix("samples-e") {
                ("samples", step, &["images"])
            } else if let Some(step) = name.strip_prefix("reconstructions-e") {
                ("reconstructions", step, &["noisy", "output", "clean"])
            } else if name == "real" {
                ("real", "0", &["images"])
            } else {
                continue;
            };
            let Ok(step) = step.parse::<i64>() else { continue };
            let bytes = download_bytes(client, sha256).await.with_context(|| format!("downloading artifact {name}"))?;
            let tensors = report::read_artifact(name, &bytes)?;
            // Generated and real slices lie in [-1, 1]; digits in [0, 1].
            let (low, high) = if tag == "reconstructions" { (0.0, 1.0) } else { (-1.0, 1.0) };
            for part in parts {
                if let Some(tensor) = tensors.get(*part) {
                    let full_tag = if parts.len() > 1 { format!("{tag}/{part}") } else { tag.to_string() };
                    record.images.push((full_tag, step, tensor.images(low, high)));
                }
            }
        }
        records.push(record);
    }
    Ok(report::export_tensorboard(&records, out)?)
}

/// Writes the report of `sweep_id` into `out`; returns the path of its `index.html`.
pub async fn write(client: &mut Client, sweep_id: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let results = results::fetch(client, sweep_id).await?;
    let input = gather(client, &results).await?;
    let figures = report::render(&input, out)?;
    let names: BTreeMap<&str, &str> = figures.iter().map(|(f, c)| (f.as_str(), c.as_str())).collect();
    tracing::info!(figures = names.len(), out = %out.display(), "report written");
    Ok(out.join("index.html"))
}
