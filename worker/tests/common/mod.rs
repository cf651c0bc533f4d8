//! What the worker's recipe-level tests share: a small synthetic MNIST on disk, a
//! cross-validation fold task over it, and a run of a task on this thread that collects what the
//! recipe emits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use cohort_worker::data::idx::{encode_images, encode_labels, IdxImages};
use cohort_worker::task::{AugmentSpec, BlobRef, DatasetFormat, DatasetSpec, FoldSpec, Stage, Task, TrainingConfig, TrialKind, TrialSpec};
use cohort_worker::train::{self, Events, RunInputs, TrainEvent};
use tch::Device;

/// Writes 96 training and 16 test digits (deterministic pixels) as IDX files under `dir`.
pub fn write_dataset(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut files = BTreeMap::new();
    for (prefix, count) in [("train", 96usize), ("t10k", 16)] {
        let pixels = (0..count * 784).map(|i| ((i * 7919) % 256) as u8).collect();
        let images = IdxImages { count, rows: 28, cols: 28, pixels };
        let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
        for (name, bytes) in [
            (format!("{prefix}-images-idx3-ubyte"), encode_images(&images)),
            (format!("{prefix}-labels-idx1-ubyte"), encode_labels(&labels)),
        ] {
            let path = dir.join(&name);
            std::fs::write(&path, bytes).unwrap();
            files.insert(name, path);
        }
    }
    files
}

/// A `dae-fold` task: fold `index` of 4, `epochs` epochs at batch 16, a checkpoint every
/// `checkpoint_every` epochs (0: only the final one), with `augment` if given.
pub fn fold_task(index: usize, epochs: u32, checkpoint_every: u32, augment: Option<AugmentSpec>) -> Task {
    Task {
        id: format!("fold{index}"),
        attempt: 1,
        resume_from: None,
        rank: 0,
        world: 1,
        spec: TrialSpec {
            fold: Some(FoldSpec { folds: 4, index: index as u32, shuffle_seed: 3 }),
            checkpoint_every,
            ..TrialSpec::new(
                Stage::Cv,
                format!("cv/c0/f{index}"),
                TrialKind::DaeFold,
                TrainingConfig {
                    lr: 1e-3,
                    weight_decay: 1e-5,
                    batch_size: 16,
                    epochs,
                    noise_std: 0.3,
                    latent: 4,
                    seed: 9,
                    augment,
                    ..TrainingConfig::default()
                },
                DatasetSpec {
                    format: DatasetFormat::Idx,
                    files: vec![("unused".into(), BlobRef { sha256: String::new(), size: 0 })],
                    ..DatasetSpec::default()
                },
            )
        },
    }
}

/// What a run emitted: its checkpoints (epoch → file) and its validation MSEs.
pub struct RunOutput {
    /// Checkpoint files by epoch.
    pub checkpoints: BTreeMap<u32, PathBuf>,
    /// Each epoch's validation MSE, in order.
    pub val_mse: Vec<f64>,
}

/// Runs `task` on `files` (resuming from `resume` if given) with `scratch` as its scratch folder.
pub fn run(task: &Task, files: &BTreeMap<String, PathBuf>, resume: Option<&Path>, scratch: &Path) -> RunOutput {
    std::fs::create_dir_all(scratch).unwrap();
    let root = files.values().next().and_then(|p| p.parent()).unwrap();
    let inputs = RunInputs {
        dataset_files: files,
        dataset_root: root,
        resume_from: resume,
        init_from: None,
        judge: None,
        scratch_dir: scratch,
        device: Device::Cpu,
        gang: None,
    };
    let mut checkpoints = BTreeMap::new();
    let mut val_mse = Vec::new();
    let mut emit = |event| match event {
        TrainEvent::Checkpoint { epoch, path, .. } => {
            checkpoints.insert(epoch, path);
        }
        TrainEvent::Epoch(report) => val_mse.push(report.values.iter().find(|(k, _)| k == "val_mse").unwrap().1),
        TrainEvent::Artifact { .. } => {}
    };
    let (stop, drain) = (AtomicBool::new(false), AtomicBool::new(false));
    train::run(task, &inputs, &mut Events { emit: &mut emit, stop: &stop, drain: &drain }).unwrap();
    RunOutput { checkpoints, val_mse }
}
