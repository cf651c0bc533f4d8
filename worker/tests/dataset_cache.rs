//! The dataset cache keeps behaviour: a cross-validation fold trained on data decoded and
//! augmented afresh, on data made and kept, and on the kept data (a hit) reports the same
//! figures and ends with the same weights; another fold of the same dataset gets its own rows.
//! Its own test binary: the cache, the phase clock and libtorch's generator are process-wide.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use cohort_worker::data::cache::{TensorCache, DEFAULT_BUDGET_BYTES};
use cohort_worker::data::idx::{encode_images, encode_labels, IdxImages};
use cohort_worker::metrics::{metrics, Phase};
use cohort_worker::task::{Augment, BlobRef, DatasetSpec, Fold, Task, TrainingConfig, TrialKind};
use cohort_worker::train::{self, Events, RunInputs, TrainEvent};
use tch::{Device, Tensor};

fn write_dataset(dir: &Path) -> BTreeMap<String, PathBuf> {
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

fn fold_task(index: usize) -> Task {
    Task {
        id: format!("fold{index}"),
        attempt: 1,
        trial_name: format!("cv/c0/f{index}"),
        kind: TrialKind::DaeFold,
        config: TrainingConfig {
            lr: 1e-3,
            weight_decay: 1e-5,
            batch_size: 16,
            epochs: 2,
            noise_std: 0.3,
            latent: 4,
            seed: 9,
            lr_encoder: 0.0,
            augment: Some(Augment { copies: 1, rotate_deg: 15.0, translate: 0.1, shear_deg: 10.0, seed: 5 }),
            wgan: None,
        },
        dataset: DatasetSpec {
            format: "idx".into(),
            files: vec![("unused".into(), BlobRef { sha256: String::new(), size: 0 })],
            train_limit: 0,
            test_limit: 0,
            image_size: 0,
            min_foreground: 0.0,
        },
        fold: Some(Fold { folds: 4, index, shuffle_seed: 3 }),
        resume_from: None,
        init_from: None,
        checkpoint_every: 0,
        rank: 0,
        world: 1,
        collective_backend: String::new(),
    }
}

/// Runs a task; returns its validation MSEs and its final checkpoint's tensors.
fn run(task: &Task, files: &BTreeMap<String, PathBuf>, scratch: &Path) -> (Vec<f64>, BTreeMap<String, Tensor>) {
    std::fs::create_dir_all(scratch).unwrap();
    let root = files.values().next().and_then(|p| p.parent()).unwrap();
    let inputs = RunInputs { dataset_files: files, dataset_root: root, resume_from: None, init_from: None, scratch_dir: scratch, device: Device::Cpu, gang: None };
    let mut checkpoint = None;
    let mut val = Vec::new();
    let mut emit = |event| match event {
        TrainEvent::Checkpoint { path, .. } => checkpoint = Some(path),
        TrainEvent::Epoch(report) => val.push(report.values.iter().find(|(k, _)| k == "val_mse").unwrap().1),
        TrainEvent::Artifact { .. } => {}
    };
    let (stop, drain) = (AtomicBool::new(false), AtomicBool::new(false));
    train::run(task, &inputs, &mut Events { emit: &mut emit, stop: &stop, drain: &drain }).unwrap();
    let weights = Tensor::read_safetensors(checkpoint.expect("a final checkpoint")).unwrap().into_iter().collect();
    (val, weights)
}

fn assert_same_run(a: &(Vec<f64>, BTreeMap<String, Tensor>), b: &(Vec<f64>, BTreeMap<String, Tensor>), what: &str) {
    assert_eq!(a.0, b.0, "{what}: validation MSEs");
    assert_eq!(a.1.keys().collect::<Vec<_>>(), b.1.keys().collect::<Vec<_>>());
    for (name, tensor) in &a.1 {
        assert!(tensor.equal(&b.1[name]), "{what}: {name} differs");
    }
}

#[test]
fn cached_data_trains_exactly_like_fresh_data() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_dataset(dir.path());
    let cache = TensorCache::global();
    // As the daemon's training thread does: what the recipe does not mark is training.
    metrics().phases.switch(Phase::Train);

    cache.set_budget(0);
    let fresh = run(&fold_task(1), &files, &dir.path().join("fresh"));
    let fresh_other_fold = run(&fold_task(2), &files, &dir.path().join("fresh2"));
    assert_eq!(cache.bytes(), 0, "a zero budget keeps nothing");

    cache.set_budget(DEFAULT_BUDGET_BYTES);
    let made = run(&fold_task(1), &files, &dir.path().join("made"));
    let kept_bytes = cache.bytes();
    assert!(kept_bytes > 0, "the decoded dataset and the augmented fold are kept");
    let kept = run(&fold_task(1), &files, &dir.path().join("kept"));
    assert_eq!(cache.bytes(), kept_bytes, "the second run hit the cache");
    let other_fold = run(&fold_task(2), &files, &dir.path().join("other"));
    assert!(cache.bytes() > kept_bytes, "another fold's augmented rows are an entry of their own");

    assert_same_run(&fresh, &made, "made while caching");
    assert_same_run(&fresh, &kept, "from the cache");
    assert_same_run(&fresh_other_fold, &other_fold, "another fold, dataset from the cache");
    assert_ne!(fresh.0, fresh_other_fold.0, "the folds differ");

    let phases = &metrics().phases;
    for phase in [Phase::Train, Phase::Data, Phase::Checkpoint] {
        assert!(phases.seconds(phase) > 0.0, "{} was counted", phase.label());
    }
}
