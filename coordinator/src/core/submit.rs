//! Submitting a sweep: checking a sweep file against the limits and its dataset, planning its
//! first stage ([`check_and_plan`], also all that `submit --dry-run` does, with no
//! coordinator), and storing and queueing it ([`Core::submit`]).

use std::path::PathBuf;

use super::{random_hex, task_needs, unix_ms, Core, CoreError, LatestStage, Limits};
use crate::dataset;
use crate::domain::{BlobRef, DatasetFormat, DatasetSpec, JudgeSpec, TrialSpec};
use crate::events::{Change, ChangeKind};
use crate::plan;
use crate::scheduler::TaskEntry;
use crate::store::{StoredTask, SweepRecord};
use crate::sweep::SweepFile;

/// A stage as `submit --dry-run` describes it: name, trial count, what it does.
pub type StagePlan = (String, u32, String);

/// What a submission planned.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The new sweep's id (none on a dry run).
    pub sweep_id: Option<String>,
    /// The first stage's tasks: (task id, spec).
    pub planned: Vec<(String, TrialSpec)>,
    /// Every stage: (name, trials, description).
    pub stages: Vec<(String, u32, String)>,
}

/// Task rows for newly planned trials, numbered on from `first_index` within the sweep.
pub(super) fn new_tasks(sweep_id: &str, sweep_seq: u64, first_index: usize, trials: Vec<TrialSpec>) -> Vec<StoredTask> {
    trials
        .into_iter()
        .enumerate()
        .map(|(offset, spec)| {
            let index = first_index + offset;
            let entry = TaskEntry::queued(
                format!("{sweep_id}.t{index}"),
                sweep_id.to_string(),
                (sweep_seq << 20) | index as u64,
                spec.max_attempts,
                spec.replicas,
            )
            .with_epochs(spec.config.epochs)
            .with_needs(task_needs(&spec));
            StoredTask { entry, spec }
        })
        .collect()
}

/// Checks a parsed sweep file against the limits and its dataset's files (`files` name their
/// blobs, `local` where their bytes lie) and plans its first stage: returns its trials and every
/// stage as (name, trials, description). Pure but for reading the dataset's files: what
/// `submit` checks before it stores a sweep, and all that `submit --dry-run` does, on the
/// user's machine, with no coordinator.
pub fn check_and_plan(
    sweep: &SweepFile,
    source_name: &str,
    files: Vec<(String, BlobRef)>,
    local: &[(String, PathBuf)],
    limits: &Limits,
) -> Result<(Vec<TrialSpec>, Vec<StagePlan>), CoreError> {
    check_and_plan_with_command(sweep, source_name, files, local, Vec::new(), None, limits)
}

/// [`check_and_plan`] for a sweep that may be a command sweep: `command_files` are its
/// `[command] files` (name → blob; empty for the built-in recipes), and `judge` the blob of its
/// `[train] judge` classifier when the blob store holds it (a sweep naming a judge is refused
/// without it; a dry run, which cannot look, passes the hash with size 0).
pub fn check_and_plan_with_command(
    sweep: &SweepFile,
    source_name: &str,
    files: Vec<(String, BlobRef)>,
    local: &[(String, PathBuf)],
    command_files: Vec<(String, BlobRef)>,
    judge: Option<BlobRef>,
    limits: &Limits,
) -> Result<(Vec<TrialSpec>, Vec<StagePlan>), CoreError> {
    sweep.check_trial_limit(source_name, limits.max_trials)?;
    sweep.check_name_limit(source_name, limits.max_name_bytes)?;
    if sweep.is_command() {
        check_command_files(&command_files, limits.max_name_bytes)?;
    } else if !command_files.is_empty() {
        return Err(CoreError::BadRequest("command files come only with a command sweep ([model] kind = \"command\")".into()));
    }
    if sweep.is_command() && !sweep.has_dataset() {
        if !files.is_empty() {
            return Err(CoreError::BadRequest("dataset files without a [dataset] section".into()));
        }
        let trials = crate::command::initial(sweep, DatasetSpec::default(), &command_files);
        return Ok((trials, plan::describe_stages(sweep)));
    }
    dataset::check_names(files.iter().map(|(name, _)| name.as_str()), limits.max_name_bytes)?;
    let format = sweep.dataset.format();
    match format {
        // A command's program reads its dataset as files: nothing to check but the names.
        DatasetFormat::Files | DatasetFormat::None => {}
        DatasetFormat::Idx if sweep.is_command() => {
            dataset::check_idx(local)?;
        }
        DatasetFormat::Idx => sweep.check_against_dataset(source_name, dataset::check_idx(local)?)?,
        DatasetFormat::Nifti => dataset::check_nifti(local)?,
        DatasetFormat::ImageFolder => dataset::check_image_folder(local)?,
    }
    let judge = match sweep.train.as_ref().and_then(|train| train.judge.as_ref()) {
        None => None,
        Some(wanted) => {
            let blob = judge.filter(|blob| blob.sha256 == *wanted).ok_or_else(|| {
                CoreError::BadRequest(format!(
                    "{source_name}: train.judge: no checkpoint {wanted} on this coordinator (name a classifier checkpoint it holds: `coordinator checkpoints ID` lists a finetune trial's)"
                ))
            })?;
            let classes = dataset::image_folder_classes(files.iter().map(|(name, _)| name.as_str()));
            let digits =
                dataset::digit_classes(&classes).map_err(|e| CoreError::BadRequest(format!("{source_name}: train.judge: {}", e.0)))?;
            Some(JudgeSpec { checkpoint: BlobRef { sha256: wanted.clone(), size: blob.size }, digits })
        }
    };
    let dataset = DatasetSpec {
        format,
        files,
        train_limit: sweep.dataset.train_limit,
        test_limit: sweep.dataset.test_limit,
        image_size: sweep.dataset.image_size,
        min_foreground: sweep.dataset.min_foreground,
    };
    if sweep.is_command() {
        return Ok((crate::command::initial(sweep, dataset, &command_files), plan::describe_stages(sweep)));
    }
    let mut trials = plan::initial(sweep, dataset);
    for recipe in trials.iter_mut().filter_map(|trial| trial.config.wgan.as_mut()) {
        recipe.judge = judge.clone();
    }
    Ok((trials, plan::describe_stages(sweep)))
}

/// Checks a command sweep's files: plain relative names within the name limit, and their count
/// and total size within [`crate::command::MAX_COMMAND_FILES`] and
/// [`crate::command::MAX_COMMAND_FILES_BYTES`].
fn check_command_files(files: &[(String, BlobRef)], max_name_bytes: usize) -> Result<(), CoreError> {
    use crate::command::{MAX_COMMAND_FILES, MAX_COMMAND_FILES_BYTES};
    if files.len() > MAX_COMMAND_FILES {
        return Err(CoreError::LimitExceeded(format!("command.files: {} files, more than the limit of {MAX_COMMAND_FILES}", files.len())));
    }
    let total: u64 = files.iter().map(|(_, blob)| blob.size).sum();
    if total > MAX_COMMAND_FILES_BYTES {
        return Err(CoreError::LimitExceeded(format!("command.files: {total} bytes, more than the limit of {MAX_COMMAND_FILES_BYTES}")));
    }
    for (name, _) in files {
        if name.len() > max_name_bytes || !cohort_proto::transfer::is_plain_relative_name(name) {
            return Err(CoreError::BadRequest(format!(
                "command.files: file name {name:?} is not a plain relative path of at most {max_name_bytes} bytes"
            )));
        }
    }
    Ok(())
}

/// The largest safetensors header [`classifier_checkpoint_problem`] reads.
const MAX_CHECKPOINT_HEADER_BYTES: u64 = 1 << 20;

/// What makes the file at `path` not a checkpoint of the autoencoder pipeline's classifier
/// (`finetune`), if anything: its safetensors header must name the encoder's and the 10-digit
/// head's weights. Only the header is read.
fn classifier_checkpoint_problem(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let not_one = |why: &str| {
        Some(format!("the blob is not a classifier checkpoint ({why}); name the final checkpoint of an autoencoder sweep's finetune trial"))
    };
    let mut file = std::fs::File::open(path).ok()?;
    let mut length = [0u8; 8];
    if file.read_exact(&mut length).is_err() {
        return not_one("no safetensors header");
    }
    let length = u64::from_le_bytes(length);
    if length > MAX_CHECKPOINT_HEADER_BYTES {
        return not_one("no safetensors header");
    }
    let mut header = Vec::new();
    if file.take(length).read_to_end(&mut header).is_err() {
        return not_one("no safetensors header");
    }
    let Ok(serde_json::Value::Object(tensors)) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return not_one("no safetensors header");
    };
    if !tensors.contains_key("model.encoder.fc2.weight") {
        return not_one("no model.encoder.fc2.weight");
    }
    let head = tensors.get("model.head.fc2.weight").and_then(|t| t.get("shape")).and_then(|shape| shape.as_array());
    match head.and_then(|shape| shape.first()).and_then(serde_json::Value::as_u64) {
        Some(10) => None,
        Some(classes) => not_one(&format!("its head has {classes} classes, not the 10 digits")),
        None => not_one("no model.head.fc2.weight"),
    }
}

/// A dry run's answer: the planned trials under placeholder task ids, nothing stored.
pub fn dry_run_plan(trials: Vec<TrialSpec>, stages: Vec<(String, u32, String)>) -> Submitted {
    let planned = new_tasks("dry-run", 0, 0, trials).into_iter().map(|t| (t.entry.id, t.spec)).collect();
    Submitted { sweep_id: None, planned, stages }
}

impl Core {
    /// Validates and plans a sweep; unless `dry_run`, stores it and queues its first stage.
    pub fn submit(&self, source: &str, source_name: &str, files: Vec<(String, BlobRef)>, dry_run: bool) -> Result<Submitted, CoreError> {
        self.submit_with_command(source, source_name, files, Vec::new(), dry_run)
    }

    /// [`Core::submit`] with a command sweep's `[command] files` (already uploaded blobs).
    pub fn submit_with_command(
        &self,
        source: &str,
        source_name: &str,
        files: Vec<(String, BlobRef)>,
        command_files: Vec<(String, BlobRef)>,
        dry_run: bool,
    ) -> Result<Submitted, CoreError> {
        let sweep = SweepFile::parse(source, source_name)?;
        for (name, blob) in &files {
            if self.blobs.size(&blob.sha256) != Some(blob.size) {
                return Err(CoreError::BadRequest(format!("dataset file {name} ({}) was not uploaded", blob.sha256)));
            }
        }
        for (name, blob) in &command_files {
            if self.blobs.size(&blob.sha256) != Some(blob.size) {
                return Err(CoreError::BadRequest(format!("command file {name} ({}) was not uploaded", blob.sha256)));
            }
        }
        // The judge's size from the blob store; a sweep naming one it lacks is refused by the planner.
        let judge = sweep
            .train
            .as_ref()
            .and_then(|train| train.judge.as_ref())
            .and_then(|sha256| self.blobs.size(sha256).map(|size| BlobRef { sha256: sha256.clone(), size }));
        if let Some(problem) = judge.as_ref().and_then(|blob| classifier_checkpoint_problem(&self.blobs.path(&blob.sha256)?)) {
            return Err(CoreError::BadRequest(format!("{source_name}: train.judge: {problem}")));
        }
        let local: Vec<(String, PathBuf)> =
            files.iter().map(|(name, blob)| (name.clone(), self.blobs.path(&blob.sha256).expect("checked present"))).collect();
        let (trials, stages) = check_and_plan_with_command(&sweep, source_name, files, &local, command_files, judge, &self.limits)?;
        if dry_run {
            return Ok(dry_run_plan(trials, stages));
        }
        let (sweep_id, planned) = self.change(|inner| {
            let seq = inner.store.next_sweep_seq()?;
            let sweep_id = format!("s{seq}-{}", random_hex(3));
            let tasks = new_tasks(&sweep_id, seq, 0, trials);
            let record = SweepRecord {
                id: sweep_id.clone(),
                seq,
                name: sweep.name,
                source: source.to_string(),
                created_ms: unix_ms(),
                cancelled: false,
            };
            inner.store.insert_sweep(&record, &tasks)?;
            if let Some(stage) = LatestStage::of(&tasks) {
                inner.stages.insert(sweep_id.clone(), stage);
            }
            let now = self.now();
            // The specs move into the answer rather than being copied: a sweep may hold 100,000.
            let mut planned = Vec::with_capacity(tasks.len());
            for task in tasks {
                planned.push((task.entry.id.clone(), task.spec));
                inner.scheduler.insert(task.entry, now);
            }
            Ok((sweep_id, planned))
        })?;
        self.work_available.notify_waiters();
        self.changes.publish(Change::sweep(&sweep_id, ChangeKind::Submitted));
        tracing::info!(sweep = %sweep_id, "sweep submitted");
        Ok(Submitted { sweep_id: Some(sweep_id), planned, stages })
    }
}
