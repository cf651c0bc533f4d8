//! `coordinator submit`: validate a sweep file, upload its dataset, register it.
//!
//! Each file is sent in one pass, its CRC-32 in the stream's last chunk; the coordinator checks
//! it, names the blob by the SHA-256 of what it received, and only then lets the blob appear. A
//! file this machine sent before, unchanged since ([`super::hash_cache`]), is named by its
//! cached hash and asked about with `HasBlobs` first, so a re-submitted dataset the coordinator
//! holds is not sent again.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use cohort_coordinator::convert;
use cohort_coordinator::core::{check_and_plan_with_command, dry_run_plan, Limits};
use cohort_coordinator::domain::{BlobRef, DatasetFormat, TrialSpec};
use cohort_coordinator::plan::{self, TrainSamples};
use cohort_coordinator::service::client::MAX_LISTED_TRIALS;
use cohort_coordinator::sweep::SweepFile;
use cohort_proto::task::MalformedTask;
use cohort_proto::transfer;
use cohort_proto::v1 as pb;

use super::hash_cache::{self, FileStamp, HashCache};

/// A sweep file read and checked locally.
#[derive(Debug)]
pub struct LocalSweep {
    /// The file's text.
    pub source: String,
    /// The file's path as given.
    pub source_name: String,
    /// The dataset's files: name and local path.
    pub dataset_files: Vec<(String, PathBuf)>,
    /// A command sweep's `[command] files`: name and local path.
    pub command_files: Vec<(String, PathBuf)>,
    /// What will train but not as the file most likely means (each naming the file), printed
    /// when the coordinator accepts the sweep.
    pub warnings: Vec<String>,
    /// The file as parsed.
    pub sweep: SweepFile,
}

/// Reads and validates a sweep file, and lists its dataset folder.
pub fn read(path: &Path) -> anyhow::Result<LocalSweep> {
    let source = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let source_name = path.display().to_string();
    let sweep = SweepFile::parse(&source, &source_name)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut dataset_files = Vec::new();
    if sweep.has_dataset() {
        let folder = base.join(&sweep.dataset.path);
        if !folder.is_dir() {
            bail!("{source_name}: dataset.path: {} is not a folder", folder.display());
        }
        list_files(&folder, "", &mut dataset_files)?;
        dataset_files.sort();
        if dataset_files.is_empty() {
            bail!("{source_name}: dataset.path: the folder {} holds no file", folder.display());
        }
    }
    let mut command_files = Vec::new();
    if let Some(command) = sweep.command.as_ref().filter(|_| sweep.is_command()) {
        let folder = base.join(&command.files);
        if !folder.is_dir() {
            bail!("{source_name}: command.files: {} is not a folder", folder.display());
        }
        list_files(&folder, "", &mut command_files)?;
        command_files.sort();
        let total: u64 = command_files.iter().map(|(_, path)| std::fs::metadata(path).map_or(0, |m| m.len())).sum();
        if total > cohort_coordinator::command::MAX_COMMAND_FILES_BYTES
            || command_files.len() > cohort_coordinator::command::MAX_COMMAND_FILES
        {
            bail!(
                "{source_name}: command.files: {} holds {} files, {total} bytes: more than the limit of {} files, {} bytes (hidden entries are skipped; point files at the program's own folder)",
                folder.display(),
                command_files.len(),
                cohort_coordinator::command::MAX_COMMAND_FILES,
                cohort_coordinator::command::MAX_COMMAND_FILES_BYTES
            );
        }
    }
    let mut warnings: Vec<String> = plan::schedule_warnings(&sweep, train_samples(&sweep, &dataset_files))
        .into_iter()
        .map(|warning| format!("{source_name}: {warning}"))
        .collect();
    warnings.extend(pooled_volumes_notice(&sweep, &dataset_files).map(|notice| format!("{source_name}: {notice}")));
    Ok(LocalSweep { source, source_name, dataset_files, command_files, warnings, sweep })
}

/// Plans the sweep on this machine, as the coordinator would, with no coordinator and nothing
/// uploaded (`submit --dry-run`): checks the file against the default limits and its dataset's
/// files where they lie, and answers as a dry-run submission would. The planned trials name
/// their dataset files by size only (no hash: nothing is uploaded).
pub fn plan_offline(sweep: &LocalSweep) -> anyhow::Result<pb::SubmitSweepResponse> {
    let mut files = Vec::with_capacity(sweep.dataset_files.len());
    for (name, path) in &sweep.dataset_files {
        let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        files.push((name.clone(), BlobRef { sha256: String::new(), size }));
    }
    let mut command_files = Vec::with_capacity(sweep.command_files.len());
    for (name, path) in &sweep.command_files {
        let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        command_files.push((name.clone(), BlobRef { sha256: String::new(), size }));
    }
    // The judge classifier is on the coordinator, which a dry run does not ask: named by its hash, size unknown.
    let judge = sweep.sweep.train.as_ref().and_then(|train| train.judge.clone()).map(|sha256| BlobRef { sha256, size: 0 });
    let (trials, stages) = check_and_plan_with_command(
        &sweep.sweep,
        &sweep.source_name,
        files,
        &sweep.dataset_files,
        command_files,
        judge,
        &Limits::default(),
    )?;
    let submitted = dry_run_plan(trials, stages);
    let planned = submitted.planned.iter().take(MAX_LISTED_TRIALS).map(|(id, spec)| convert::task_spec(id, "", 0, spec)).collect();
    let stages = submitted.stages.into_iter().map(|(name, trials, description)| pb::StagePlan { name, trials, description }).collect();
    for warning in &sweep.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(pb::SubmitSweepResponse { sweep_id: String::new(), planned, stages })
}

/// The most workers one trial of the sweep needs at once (its gangs' size; 1 without).
fn largest_gang(sweep: &SweepFile) -> u32 {
    sweep.distributed.as_ref().map_or(1, |d| d.replicas.max(1))
}

/// Warns on stderr when the workers connected now could never run the sweep: none at all, none
/// with the device its gangs need, or fewer than its gangs need. The sweep stays queued and
/// starts when enough register.
pub async fn warn_if_unrunnable(client: &mut super::Client, sweep: &LocalSweep) -> anyhow::Result<()> {
    let workers = client.list_workers(pb::ListWorkersRequest {}).await.map_err(super::rpc_error)?.into_inner().workers;
    let gang = largest_gang(&sweep.sweep);
    let needs_cuda = gang > 1 && sweep.sweep.distributed.as_ref().is_some_and(|d| d.backend == "nccl");
    let able = workers.iter().filter(|w| !needs_cuda || w.device.starts_with("cuda")).count() as u32;
    if sweep.sweep.is_command() && !workers.is_empty() && !workers.iter().any(|w| w.allow_commands) {
        eprintln!("warning: no connected worker allows command trials: the sweep waits until one does (start one with --allow-commands)");
    }
    if workers.is_empty() {
        eprintln!("warning: no worker is connected: the sweep waits until one registers (start one with `worker --coordinator URL --token-file FILE`)");
    } else if able == 0 {
        eprintln!("warning: none of the {} connected workers has a CUDA device, which the sweep's nccl gangs need: they wait until enough GPU workers register (or set [distributed] backend = \"auto\")", workers.len());
    } else if gang > able {
        let with = if needs_cuda { " with a CUDA device" } else { "" };
        eprintln!("warning: the sweep's gangs need {gang} workers{with} at once and {able} connected: those trials wait until {gang} are");
    }
    Ok(())
}

/// What the local dataset files tell of the training-sample count (before `train_limit`), for the
/// sweep's warnings; `None` when they tell nothing. Only a WGAN-GP's warnings need it, so other
/// sweeps read nothing here. Files that do not parse tell nothing: the coordinator refuses them,
/// naming the problem.
fn train_samples(sweep: &SweepFile, files: &[(String, PathBuf)]) -> Option<TrainSamples> {
    if !sweep.is_gan() {
        return None;
    }
    match sweep.dataset.format() {
        DatasetFormat::Nifti => {
            let slices = nifti_slices(files)?;
            // Every slice has at least no foreground: with 0 the workers keep them all.
            Some(if sweep.dataset.min_foreground <= 0.0 { TrainSamples::Exact(slices) } else { TrainSamples::AtMost(slices) })
        }
        DatasetFormat::ImageFolder => Some(TrainSamples::Exact(image_folder_images(files))),
        // A WGAN-GP does not train on IDX data (the sweep's validation refuses it).
        _ => None,
    }
}

/// A notice when a NIfTI dataset holds more than one volume: the workers pool every volume's
/// slices into one training set, which is what a folder of one subject's scans means but not
/// what a folder of unrelated volumes might.
fn pooled_volumes_notice(sweep: &SweepFile, files: &[(String, PathBuf)]) -> Option<String> {
    if sweep.dataset.format() != DatasetFormat::Nifti {
        return None;
    }
    let volumes: Vec<&str> =
        files.iter().map(|(name, _)| name.as_str()).filter(|name| name.ends_with(".nii") || name.ends_with(".nii.gz")).collect();
    if volumes.len() < 2 {
        return None;
    }
    Some(format!(
        "dataset.path: the slices of its {} NIfTI volumes ({}) are pooled into one training set; give a folder of one volume to train on it alone",
        volumes.len(),
        volumes.join(", ")
    ))
}

/// The axial slices of the dataset's NIfTI-1 volumes (every X×Y plane, as the workers cut them),
/// from their headers alone; `None` when a volume's header cannot be read. The workers keep only
/// the slices with enough foreground, so this bounds the training samples from above.
fn nifti_slices(files: &[(String, PathBuf)]) -> Option<u64> {
    const HEADER_LEN: usize = 348;
    const OFFSET_DIM: usize = 40;
    let mut slices = 0u64;
    for (name, path) in files.iter().filter(|(name, _)| name.ends_with(".nii") || name.ends_with(".nii.gz")) {
        let mut raw = std::fs::File::open(path).ok()?;
        let mut magic = [0u8; 2];
        raw.read_exact(&mut magic).ok()?;
        let chained = std::io::Cursor::new(magic).chain(raw);
        // Gzip is told by its magic bytes, as the workers do, not by the name.
        let mut reader: Box<dyn Read> =
            if magic == [0x1f, 0x8b] { Box::new(flate2::read::GzDecoder::new(chained)) } else { Box::new(chained) };
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).ok()?;
        let sizeof_hdr = [header[0], header[1], header[2], header[3]];
        let little_endian = match (i32::from_le_bytes(sizeof_hdr), i32::from_be_bytes(sizeof_hdr)) {
            (348, _) => true,
            (_, 348) => false,
            _ => return None,
        };
        let field = |index: usize| {
            let bytes = [header[OFFSET_DIM + 2 * index], header[OFFSET_DIM + 2 * index + 1]];
            if little_endian {
                i16::from_le_bytes(bytes)
            } else {
                i16::from_be_bytes(bytes)
            }
        };
        let used = usize::try_from(field(0)).ok().filter(|used| (3..=7).contains(used))?;
        let mut planes = 1u64;
        for index in 3..=used {
            planes *= u64::try_from(field(index)).ok().filter(|&size| size > 0)?;
        }
        tracing::debug!(file = %name, planes, "volume header read");
        slices += planes;
    }
    Some(slices)
}

/// The training images of an image-folder dataset as the workers load them: the .png/.jpg/.jpeg
/// files of each class folder, under `train/` when there is one.
fn image_folder_images(files: &[(String, PathBuf)]) -> u64 {
    let has_train = files.iter().any(|(name, _)| name.starts_with("train/"));
    let depth = if has_train { 3 } else { 2 };
    let is_image = |name: &str| {
        let extension = name.rsplit_once('.').map(|(_, extension)| extension.to_ascii_lowercase());
        matches!(extension.as_deref(), Some("png" | "jpg" | "jpeg"))
    };
    let training = |name: &str| name.split('/').count() == depth && (!has_train || name.starts_with("train/"));
    files.iter().filter(|(name, _)| training(name) && is_image(name)).count() as u64
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

/// What [`upload_dataset`] did with the files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadCounts {
    /// Files sent.
    pub sent: usize,
    /// Files named by their cached hash and not sent: the coordinator held them.
    pub skipped: usize,
}

/// Uploads the files the coordinator lacks; returns every file as a dataset entry.
///
/// Files `cache` knows, unchanged, are asked about in one `HasBlobs` call and not sent when the
/// coordinator holds them; every other file is sent (its checksum last) and, once stored,
/// recorded in `cache` under the coordinator's name for it (the caller saves it).
async fn upload_dataset(
    client: &mut super::Client,
    files: &[(String, PathBuf)],
    cache: &mut HashCache,
) -> anyhow::Result<(Vec<pb::DatasetFile>, UploadCounts)> {
    let mut known = Vec::with_capacity(files.len());
    for (_, path) in files {
        let stamp = FileStamp::of(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cached = cache.lookup(path, &stamp);
        known.push((stamp, cached));
    }
    let wanted: Vec<String> = known.iter().filter_map(|(_, cached)| cached.as_ref().map(|blob| blob.sha256.clone())).collect();
    let present: HashSet<String> = match wanted.is_empty() {
        true => HashSet::new(),
        false => client
            .has_blobs(pb::HasBlobsRequest { sha256: wanted })
            .await
            .map_err(super::rpc_error)?
            .into_inner()
            .present
            .into_iter()
            .collect(),
    };
    let mut counts = UploadCounts::default();
    let mut entries = Vec::with_capacity(files.len());
    for ((name, path), (stamp, cached)) in files.iter().zip(known) {
        if let Some(blob) = cached.filter(|blob| present.contains(&blob.sha256)) {
            tracing::debug!(file = %name, sha256 = %blob.sha256, "held by the coordinator, not sent");
            counts.skipped += 1;
            entries.push(pb::DatasetFile { name: name.clone(), blob: Some(blob) });
            continue;
        }
        // Taken before the file is opened: a write after it cannot share the cached stamp.
        let started = SystemTime::now();
        let blob = upload_file(client, path).await.with_context(|| format!("uploading {name}"))?;
        if let Ok(after) = FileStamp::of(path) {
            cache.record(path, &stamp, &after, &blob, started);
        }
        tracing::info!(file = %name, bytes = blob.size, "uploaded");
        counts.sent += 1;
        entries.push(pb::DatasetFile { name: name.clone(), blob: Some(blob) });
    }
    Ok((entries, counts))
}

/// Sends one file with its CRC-32 at the end; returns the blob the coordinator stored it as,
/// named by the SHA-256 of the bytes it received once they matched that checksum.
async fn upload_file(client: &mut super::Client, path: &Path) -> anyhow::Result<pb::BlobRef> {
    let (chunks, sent) = transfer::file_chunks_ending(path.to_path_buf(), transfer::StreamEnd::Checksum);
    let answer = client.upload_blob(chunks).await.map_err(super::rpc_error)?.into_inner();
    let sent = sent.await.with_context(|| format!("{} changed or could not be read while it was sent", path.display()))?;
    let Some(blob) = answer.blob.filter(|blob| transfer::is_sha256_hex(&blob.sha256) && blob.size == sent.size) else {
        bail!("the coordinator's answer does not name a blob of the {} bytes sent", sent.size);
    };
    Ok(blob)
}

/// Submits (or with `dry_run`, plans) the sweep; returns the response.
pub async fn submit(client: &mut super::Client, sweep: &LocalSweep, dry_run: bool) -> anyhow::Result<pb::SubmitSweepResponse> {
    let mut cache = HashCache::load(hash_cache::default_path(), hash_cache::SETTLE);
    let uploaded = upload_dataset(client, &sweep.dataset_files, &mut cache).await;
    let uploaded = match uploaded {
        Ok((dataset_files, _)) => upload_dataset(client, &sweep.command_files, &mut cache).await.map(|(files, _)| (dataset_files, files)),
        Err(error) => Err(error),
    };
    // What was sent before a failure is stored on the coordinator: worth remembering either way.
    if let Err(error) = cache.save() {
        tracing::warn!(%error, "cannot save the hash cache; the next submit sends these files again");
    }
    let (dataset_files, command_files) = uploaded?;
    let request = pb::SubmitSweepRequest {
        source: sweep.source.clone(),
        source_name: sweep.source_name.clone(),
        dataset_files,
        dry_run,
        command_files,
    };
    let response = client.submit_sweep(request).await.map_err(super::rpc_error)?;
    // Once accepted, so that a refused sweep shows its error alone; on stderr, so that the dry
    // run's JSON and the printed sweep id stay machine-readable.
    for warning in &sweep.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(response.into_inner())
}

/// Prints a dry run's plan: as a table, or as JSON (the stages, and the first stage's trials
/// with their hyperparameters).
pub fn print_dry_run(response: &pb::SubmitSweepResponse, json: bool) -> anyhow::Result<()> {
    if !json {
        return print_plan(response);
    }
    let stages: Vec<serde_json::Value> =
        response.stages.iter().map(|s| serde_json::json!({"stage": s.name, "trials": s.trials, "description": s.description})).collect();
    let trials: Vec<String> = planned_trials(response)?.into_iter().map(|t| t.name).collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"stages": stages, "first_stage_trials": trials}))?);
    Ok(())
}

/// The first stage's trials a submit answered with.
fn planned_trials(response: &pb::SubmitSweepResponse) -> Result<Vec<TrialSpec>, MalformedTask> {
    response.planned.iter().map(TrialSpec::from_wire).collect()
}

/// Prints a plan: the stages, then one line per task of the first stage.
pub fn print_plan(response: &pb::SubmitSweepResponse) -> anyhow::Result<()> {
    for stage in &response.stages {
        println!("stage {:<9} {:>5} trial(s)  {}", stage.name, stage.trials, stage.description);
    }
    println!();
    let planned = planned_trials(response)?;
    let fold = |task: &TrialSpec| task.fold.as_ref().map(|f| format!("{}/{}", f.index, f.folds)).unwrap_or_else(|| "-".into());
    if planned.iter().any(|task| task.command.is_some()) {
        // A command's hyperparameters are its own: listed by name, as COHORT_HPARAMS gets them.
        println!("{:<14} {:<10} {:>6} {:>6}  hyperparameters", "trial", "kind", "epochs", "fold");
        for task in &planned {
            let hparams = task.command.as_ref().map_or("", |c| c.hparams_json.as_str());
            println!("{:<14} {:<10} {:>6} {:>6}  {hparams}", task.name, task.kind, task.config.epochs, fold(task));
        }
    }
    let planned_builtin: Vec<&TrialSpec> = planned.iter().filter(|task| task.command.is_none()).collect();
    if !planned_builtin.is_empty() {
        println!("{:<14} {:<10} {:>9} {:>9} {:>6} {:>6} {:>6}", "trial", "kind", "lr", "wd", "batch", "epochs", "fold");
    }
    for task in planned_builtin {
        let config = &task.config;
        println!(
            "{:<14} {:<10} {:>9.1e} {:>9.1e} {:>6} {:>6} {:>6}",
            task.name,
            task.kind.as_str(),
            config.lr,
            config.weight_decay,
            config.batch_size,
            config.epochs,
            fold(task)
        );
    }
    let first_stage_trials = response.stages.first().map_or(planned.len(), |stage| stage.trials as usize);
    if first_stage_trials > planned.len() {
        println!("… and {} more", first_stage_trials - planned.len());
    }
    println!("{first_stage_trials} trials in the first stage; each later stage is planned when the one before it ends");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the coordinator crate lies in the workspace").to_path_buf()
    }

    /// Writes `text` as a sweep file in `dir` whose dataset is the committed MRI volume.
    fn sweep_on_the_committed_volume(dir: &Path, train: &str, min_foreground: f64) -> PathBuf {
        let data = repo_root().join("data/mri-sample");
        let text = format!(
            "name = \"g\"\n[dataset]\nformat = \"nifti\"\npath = \"{}\"\nmin_foreground = {min_foreground}\n[model]\nkind = \"wgan-gp\"\n[train]\nepochs = 2\n{train}",
            data.display()
        );
        let path = dir.join("gan.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Every shipped sweep file is valid as it stands (their data may still need writing:
    /// `make stand-in`).
    #[test]
    fn every_shipped_example_parses() {
        let examples: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "toml"))
            .collect();
        assert!(examples.len() >= 7, "{examples:?}");
        for path in examples {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(error) = SweepFile::parse(&text, &path.display().to_string()) {
                panic!("{error}");
            }
        }
    }

    #[test]
    fn the_shipped_wgan_example_reads_without_a_warning() {
        let sweep = read(&repo_root().join("examples/seed-wgan.toml")).unwrap();
        assert_eq!(sweep.warnings, Vec::<String>::new());
    }

    #[test]
    fn the_seeds_batch_on_the_committed_volume_is_warned_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sweep_on_the_committed_volume(dir.path(), "batch_size = 64\ncritic_steps = 5\n", 0.05);
        let sweep = read(&path).unwrap();
        assert_eq!(sweep.warnings.len(), 1, "{:?}", sweep.warnings);
        let warning = &sweep.warnings[0];
        assert!(warning.starts_with(&format!("{}: train.batch_size: ", path.display())), "{warning}");
        // The header's 181 axial slices bound the 134 the workers keep.
        assert!(warning.contains("an epoch has at most 2 batches (at most 181 training samples / batch 64)"), "{warning}");
    }

    #[test]
    fn volume_headers_count_slices_exactly_when_every_slice_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let volume = vec![("ch2bet.nii.gz".to_string(), repo_root().join("data/mri-sample/ch2bet.nii.gz"))];
        assert_eq!(nifti_slices(&volume), Some(181), "181×217×181 voxels");
        let path = sweep_on_the_committed_volume(dir.path(), "batch_size = 64\n", 0.0);
        let sweep = SweepFile::parse(&std::fs::read_to_string(&path).unwrap(), "gan.toml").unwrap();
        assert_eq!(train_samples(&sweep, &volume), Some(TrainSamples::Exact(181)));
        let not_a_volume = dir.path().join("broken.nii");
        std::fs::write(&not_a_volume, b"not a header").unwrap();
        assert_eq!(nifti_slices(&[("broken.nii".into(), not_a_volume)]), None, "an unreadable header tells nothing");
    }

    #[test]
    fn two_nifti_volumes_are_pooled_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let volume = repo_root().join("data/mri-sample/ch2bet.nii.gz");
        std::fs::copy(&volume, dir.path().join("a.nii.gz")).unwrap();
        std::fs::copy(&volume, dir.path().join("b.nii.gz")).unwrap();
        let text = format!(
            "name = \"g\"\n[dataset]\nformat = \"nifti\"\npath = \"{}\"\n[model]\nkind = \"wgan-gp\"\n[train]\nepochs = 2\nbatch_size = 16\n",
            dir.path().display()
        );
        let path = dir.path().join("gan.toml");
        std::fs::write(&path, text).unwrap();
        let sweep = read(&path).unwrap();
        assert!(
            sweep.warnings.iter().any(|w| w.contains("the slices of its 2 NIfTI volumes (a.nii.gz, b.nii.gz) are pooled")),
            "{:?}",
            sweep.warnings
        );
    }

    /// `submit --dry-run` plans the shipped demo on this machine, with no coordinator.
    #[test]
    fn the_dry_run_plans_the_demo_offline() {
        let sweep = read(&repo_root().join("examples/demo.toml")).unwrap();
        let plan = plan_offline(&sweep).unwrap();
        let stages: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(stages, vec!["cv", "final", "finetune"]);
        assert_eq!(plan.stages[0].trials, 32);
        assert_eq!(plan.planned.len(), 32);
        assert!(plan.sweep_id.is_empty());
    }

    /// A coordinator serving in this process on `dir`, and a client of it; the server stops
    /// when the returned sender is dropped.
    async fn serve_in_process(dir: &Path) -> (crate::cli::Client, tokio::sync::oneshot::Sender<()>) {
        use cohort_coordinator::auth::Tokens;
        use cohort_coordinator::core::CoreConfig;
        use cohort_coordinator::scheduler::Timeouts;
        use cohort_coordinator::server::{BoundServer, Security, DEFAULT_MAX_MESSAGE_BYTES};
        std::fs::write(dir.join("client.token"), "client-token\n").unwrap();
        let security =
            Security { tokens: Tokens::new("client-token", "worker-token"), tls: None, max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES };
        let config = CoreConfig { data_dir: dir.join("coordinator"), timeouts: Timeouts::default(), limits: Limits::default() };
        let server = BoundServer::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), &config, security).await.unwrap();
        let url = format!("http://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        let options = cohort_proto::auth::ConnectOptions { url, token_file: Some(dir.join("client.token")), tls_ca: None };
        (crate::cli::connect(&options).await.unwrap(), stop)
    }

    /// Every blob file the in-process coordinator stores.
    fn stored_blobs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("coordinator/blobs"))
            .map(|prefixes| {
                prefixes.flatten().filter(|p| p.path().is_dir()).flat_map(|p| std::fs::read_dir(p.path()).unwrap().flatten()).collect()
            })
            .unwrap_or_else(|_| Vec::new())
            .into_iter()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A first submit sends every file and caches their hashes; a re-submit sends none; a file
    /// changed since, or one the coordinator no longer holds, is sent again, and the dataset
    /// names what was sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resubmitted_files_are_sent_only_when_changed_or_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, _stop) = serve_in_process(dir.path()).await;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let big: Vec<u8> = (0..2 * cohort_proto::BLOB_CHUNK_BYTES + 5).map(|i| (i % 241) as u8).collect();
        std::fs::write(data.join("big.bin"), &big).unwrap();
        std::fs::write(data.join("small.txt"), b"labels").unwrap();
        let files = vec![("big.bin".to_string(), data.join("big.bin")), ("small.txt".to_string(), data.join("small.txt"))];
        // No settling time here: the files are written just before; `SETTLE` is tested apart.
        let cache_file = dir.path().join("cache/file-hashes.json");
        let mut cache = HashCache::load(Some(cache_file.clone()), std::time::Duration::ZERO);

        let (first, counts) = upload_dataset(&mut client, &files, &mut cache).await.unwrap();
        assert_eq!(counts, UploadCounts { sent: 2, skipped: 0 });
        let hashes: Vec<String> = first.iter().map(|f| f.blob.as_ref().unwrap().sha256.clone()).collect();
        for (file, (_, path)) in first.iter().zip(&files) {
            assert_eq!(file.blob.as_ref(), Some(&transfer::hash_file(path).await.unwrap()), "{}", file.name);
        }
        let mut sorted = hashes.clone();
        sorted.sort();
        assert_eq!(stored_blobs(dir.path()), sorted);
        cache.save().unwrap();

        // Again, with the cache as saved: nothing is sent, the same blobs are named.
        let mut cache = HashCache::load(Some(cache_file.clone()), std::time::Duration::ZERO);
        let (again, counts) = upload_dataset(&mut client, &files, &mut cache).await.unwrap();
        assert_eq!(counts, UploadCounts { sent: 0, skipped: 2 });
        assert_eq!(again, first);

        // One file changed (same size; its times moved back to what they were), and the other
        // lost by the coordinator: both are sent, and the changed one is named by its new hash.
        let modified = std::fs::metadata(data.join("small.txt")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(data.join("small.txt"), b"LABELS").unwrap();
        std::fs::File::options().write(true).open(data.join("small.txt")).unwrap().set_modified(modified).unwrap();
        let big_blob = dir.path().join("coordinator/blobs").join(&hashes[0][..2]).join(&hashes[0]);
        std::fs::remove_file(big_blob).unwrap();
        let (changed, counts) = upload_dataset(&mut client, &files, &mut cache).await.unwrap();
        assert_eq!(counts, UploadCounts { sent: 2, skipped: 0 });
        assert_eq!(changed[0], first[0]);
        assert_eq!(changed[1].blob.as_ref(), Some(&transfer::hash_file(&data.join("small.txt")).await.unwrap()));
        assert_ne!(changed[1], first[1]);
        assert_eq!(stored_blobs(dir.path()).len(), 3, "the big blob stored again, the new small one beside the old");
    }

    #[test]
    fn an_image_folder_counts_the_training_images_of_its_class_folders() {
        let file = |name: &str| (name.to_string(), PathBuf::from(name));
        let with_train = [
            file("train/AD/a.jpg"),
            file("train/AD/b.PNG"),
            file("train/CN/c.jpeg"),
            file("test/AD/d.jpg"),
            file("train/notes.txt"),
            file("train/CN/e.txt"),
        ];
        assert_eq!(image_folder_images(&with_train), 3);
        let flat = [file("AD/a.jpg"), file("CN/b.png"), file("README.md"), file("CN/deeper/c.png")];
        assert_eq!(image_folder_images(&flat), 2);
    }
}
