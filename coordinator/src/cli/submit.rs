//! `coordinator submit`: validate a sweep file, upload its dataset, register it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cohort_coordinator::sweep::SweepFile;
use cohort_proto::transfer;
use cohort_proto::v1 as pb;

/// A sweep file read and checked locally.
#[derive(Debug)]
pub struct LocalSweep {
    /// The file's text.
    pub source: String,
    /// The file's path as given.
    pub source_name: String,
    /// The dataset's files: name and local path.
    pub dataset_files: Vec<(String, PathBuf)>,
}

/// Reads and validates a sweep file, and lists its dataset folder.
pub fn read(path: &Path) -> anyhow::Result<LocalSweep> {
    let source = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let source_name = path.display().to_string();
    let sweep = SweepFile::parse(&source, &source_name)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let folder = base.join(&sweep.dataset.path);
    if !folder.is_dir() {
        bail!("{source_name}: dataset.path: {} is not a folder", folder.display());
    }
    let mut dataset_files = Vec::new();
    list_files(&folder, "", &mut dataset_files)?;
    dataset_files.sort();
    if dataset_files.is_empty() {
        bail!("{source_name}: dataset.path: the folder {} holds no file", folder.display());
    }
    Ok(LocalSweep { source, source_name, dataset_files })
}

/// Lists regular files under `folder` recursively as (relative name with `/`, path), skipping
/// hidden entries. Symbolic links are not followed, so nothing outside the folder is uploaded.
fn list_files(folder: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(folder).with_context(|| format!("cannot read the folder {}", folder.display()))?;
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            bail!("{}: file names must be UTF-8", entry.path().display());
        };
        if name.starts_with('.') {
            continue;
        }
        let relative = format!("{prefix}{name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(&entry.path(), &format!("{relative}/"), out)?;
        } else if kind.is_file() {
            out.push((relative, entry.path()));
        }
    }
    Ok(())
}

/// Uploads the files the coordinator lacks; returns every file as a dataset entry.
async fn upload_dataset(client: &mut super::Client, files: &[(String, PathBuf)]) -> anyhow::Result<Vec<pb::DatasetFile>> {
    let mut entries = Vec::with_capacity(files.len());
    for (name, path) in files {
        let blob = transfer::hash_file(path).await?;
        entries.push((name.clone(), path.clone(), blob));
    }
    let wanted = entries.iter().map(|(_, _, blob)| blob.sha256.clone()).collect();
    let present = client.has_blobs(pb::HasBlobsRequest { sha256: wanted }).await?.into_inner().present;
    for (name, path, blob) in &entries {
        if present.contains(&blob.sha256) {
            continue;
        }
        client
            .upload_blob(transfer::file_chunks(path.clone(), blob.clone()))
            .await
            .with_context(|| format!("uploading {name}"))?;
        tracing::info!(file = %name, bytes = blob.size, "uploaded");
    }
    Ok(entries.into_iter().map(|(name, _, blob)| pb::DatasetFile { name, blob: Some(blob) }).collect())
}

/// Submits (or with `dry_run`, plans) the sweep; returns the response.
pub async fn submit(client: &mut super::Client, sweep: &LocalSweep, dry_run: bool) -> anyhow::Result<pb::SubmitSweepResponse> {
    let dataset_files = upload_dataset(client, &sweep.dataset_files).await?;
    let request = pb::SubmitSweepRequest {
        source: sweep.source.clone(),
        source_name: sweep.source_name.clone(),
        dataset_files,
        dry_run,
    };
    let response = client.submit_sweep(request).await.map_err(|status| anyhow::anyhow!("{}", status.message()))?;
    Ok(response.into_inner())
}

/// A trial kind's name.
pub fn kind_name(kind: pb::TrialKind) -> &'static str {
    match kind {
        pb::TrialKind::DaeFold => "dae-fold",
        pb::TrialKind::DaeFinal => "dae-final",
        pb::TrialKind::Classifier => "classifier",
        pb::TrialKind::Wgan => "wgan",
        pb::TrialKind::Unspecified => "unknown",
    }
}

/// Prints a plan: the stages, then one line per task of the first stage.
pub fn print_plan(response: &pb::SubmitSweepResponse) {
    for stage in &response.stages {
        println!("stage {:<9} {:>5} trial(s)  {}", stage.name, stage.trials, stage.description);
    }
    println!();
    let planned = &response.planned;
    println!("{:<14} {:<10} {:>9} {:>9} {:>6} {:>6} {:>6}", "trial", "kind", "lr", "wd", "batch", "epochs", "fold");
    for task in planned {
        let config = task.config.clone().unwrap_or_default();
        let fold = task.fold.as_ref().map(|f| format!("{}/{}", f.index, f.folds)).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<10} {:>9.1e} {:>9.1e} {:>6} {:>6} {:>6}",
            task.trial_name,
            kind_name(task.kind()),
            config.lr,
            config.weight_decay,
            config.batch_size,
            config.epochs,
            fold
        );
    }
    let first_stage_trials = response.stages.first().map_or(planned.len(), |stage| stage.trials as usize);
    if first_stage_trials > planned.len() {
        println!("… and {} more", first_stage_trials - planned.len());
    }
    println!("{first_stage_trials} trials in the first stage; each later stage is planned when the one before it ends");
}
