//! `coordinator submit`: validate a sweep file, upload its dataset, register it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cohort_coordinator::sweep::SweepFile;
use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use cohort_proto::v1::client_service_client::ClientServiceClient;
use tonic::transport::Channel;

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
    let entries = std::fs::read_dir(&folder)
        .with_context(|| format!("{source_name}: dataset.path: cannot read the folder {}", folder.display()))?;
    let mut dataset_files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        dataset_files.push((name, entry.path()));
    }
    dataset_files.sort();
    if dataset_files.is_empty() {
        bail!("{source_name}: dataset.path: the folder {} holds no file", folder.display());
    }
    Ok(LocalSweep { source, source_name, dataset_files })
}

/// Uploads the files the coordinator lacks; returns every file as a dataset entry.
async fn upload_dataset(client: &mut ClientServiceClient<Channel>, files: &[(String, PathBuf)]) -> anyhow::Result<Vec<pb::DatasetFile>> {
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
pub async fn submit(client: &mut ClientServiceClient<Channel>, sweep: &LocalSweep, dry_run: bool) -> anyhow::Result<pb::SubmitSweepResponse> {
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

/// Prints a plan: one line per task.
pub fn print_plan(planned: &[pb::TaskSpec]) {
    println!("{:<14} {:<8} {:>9} {:>9} {:>6} {:>6} {:>6}", "trial", "kind", "lr", "wd", "batch", "epochs", "fold");
    for task in planned {
        let config = task.config.clone().unwrap_or_default();
        let fold = task.fold.as_ref().map(|f| format!("{}/{}", f.index, f.folds)).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<8} {:>9.1e} {:>9.1e} {:>6} {:>6} {:>6}",
            task.trial_name,
            "dae-fold",
            config.lr,
            config.weight_decay,
            config.batch_size,
            config.epochs,
            fold
        );
    }
    println!("{} trials", planned.len());
}
