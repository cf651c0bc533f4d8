//! `coordinator generate`: samples a trained WGAN-GP's generator on demand. The checkpoint (a
//! sweep's `train` trial's final one, a task's final one, or a named blob) is downloaded from
//! the coordinator, then `worker generate` (the worker binary beside this one, which holds
//! libtorch) runs the generator on the CPU of this machine: no worker daemon takes part. The
//! coordinator's binary links no libtorch, so every other command starts without loading it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use cohort_proto::sampling::GridShape;
use cohort_proto::task::{TrialKind, TrialSpec};

use super::results::{self, Download};

/// What `generate` was asked for.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// A sweep id (its `train` trial) or a task id.
    pub target: String,
    /// A checkpoint blob (SHA-256) to load instead of the final one.
    pub checkpoint: Option<String>,
    /// A class by name (or index): only its row.
    pub class: Option<String>,
    /// The noise vectors.
    pub latents: cohort_proto::sampling::LatentArgs,
    /// The PNG.
    pub out: PathBuf,
}

/// The class names of an image-folder dataset from its file names: the folders under `train/`
/// (or at the top without one), sorted, as the worker labels them.
pub fn class_names<'a>(files: impl Iterator<Item = &'a str> + Clone) -> Vec<String> {
    let has_train = files.clone().any(|name| name.starts_with("train/"));
    let names: BTreeSet<String> = files
        .filter_map(|name| {
            let parts: Vec<&str> = name.split('/').collect();
            match (has_train, parts.as_slice()) {
                (true, ["train", class, _file]) => Some((*class).to_string()),
                (false, [class, _file]) => Some((*class).to_string()),
                _ => None,
            }
        })
        .collect();
    names.into_iter().collect()
}

/// The sweep's WGAN-GP task id and trial (`task` names a task; else the sweep's `train` trial).
async fn wgan_spec(client: &mut super::Client, sweep_id: &str, task: Option<&str>) -> anyhow::Result<(String, TrialSpec)> {
    let detail = results::fetch_detail(client, sweep_id).await?;
    for message in detail.tasks.into_iter().filter_map(|t| t.spec) {
        let trial = TrialSpec::from_wire(&message)?;
        let wanted = match task {
            Some(task) => message.task_id == task,
            None => trial.kind == TrialKind::Wgan,
        };
        if wanted {
            return Ok((message.task_id, trial));
        }
    }
    anyhow::bail!("sweep {sweep_id} has no WGAN-GP trial{}", task.map(|t| format!(" {t}")).unwrap_or_default())
}

/// Runs the command; returns the line to print.
pub async fn run(client: &mut super::Client, options: GenerateOptions) -> anyhow::Result<String> {
    let is_task = options.target.contains('.');
    let sweep_id = options.target.split('.').next().unwrap_or_default().to_string();
    let (task_id, spec) = wgan_spec(client, &sweep_id, is_task.then_some(options.target.as_str())).await?;
    anyhow::ensure!(spec.kind == TrialKind::Wgan, "{} is not a WGAN-GP trial", options.target);
    let names = class_names(spec.dataset.files.iter().map(|(name, _)| name.as_str()));
    let classes = match &options.class {
        None => Vec::new(),
        Some(class) => {
            let index = names.iter().position(|n| n == class).or_else(|| class.parse::<usize>().ok().filter(|&i| i < names.len().max(1)));
            let index = index.with_context(|| format!("no class {class:?}: the classes are {names:?}"))?;
            vec![index as i64]
        }
    };
    let what = match &options.checkpoint {
        Some(blob) => Download::Named(blob.clone()),
        None => Download::Named(task_id),
    };
    let dir = tempfile::tempdir()?;
    let checkpoint = dir.path().join("checkpoint.safetensors");
    results::download(client, &what, &checkpoint).await.with_context(|| format!("downloading the checkpoint of {}", options.target))?;
    let mut command = tokio::process::Command::new(super::local::worker_binary()?);
    command.arg("generate").arg("--checkpoint").arg(&checkpoint).arg("--out").arg(&options.out);
    for class in classes {
        command.arg("--class-index").arg(class.to_string());
    }
    command.args(options.latents.to_args());
    let output = command.kill_on_drop(true).output().await.context("running `worker generate`")?;
    if !output.status.success() {
        // The worker says why on stderr, as "error: …".
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.trim().strip_prefix("error: ").unwrap_or(stderr.trim());
        anyhow::bail!("{reason}");
    }
    let grid: GridShape = serde_json::from_slice(&output.stdout).context("reading `worker generate`'s answer")?;
    let GridShape { rows, columns, row_classes } = grid;
    let labels: Vec<String> = row_classes.iter().map(|&c| names.get(c as usize).cloned().unwrap_or_else(|| c.to_string())).collect();
    let rows_text = if labels.is_empty() { format!("{rows} rows") } else { format!("rows: {}", labels.join(", ")) };
    Ok(format!("wrote {} ({rows_text}; {columns} columns)", options.out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_the_sorted_training_folders() {
        let files = ["train/b/1.png", "train/a/2.png", "test/c/1.png", "train/b/3.png"];
        assert_eq!(class_names(files.into_iter()), ["a", "b"]);
        assert_eq!(class_names(["x/1.png", "w/1.png"].into_iter()), ["w", "x"]);
    }
}
