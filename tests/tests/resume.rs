//! Checkpoint round trip: 2 epochs straight and 1 epoch + checkpoint + resume + 1 epoch give
//! bitwise identical weights on CPU (the optimizer state and every seed are part of the resume).
//! Its own test binary, so no other test touches libtorch's global generator meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use cohort_worker::data::idx::{encode_images, encode_labels, IdxImages};
use cohort_worker::task::{BlobRef, DatasetSpec, Fold, Task, TrainingConfig, TrialKind};
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

fn task(epochs: u32) -> Task {
    Task {
        id: "t".into(),
        attempt: 1,
        trial_name: "resume".into(),
        kind: TrialKind::DaeFold,
        config: TrainingConfig {
            lr: 1e-3,
            weight_decay: 1e-5,
            batch_size: 16,
            epochs,
            noise_std: 0.3,
            latent: 4,
            seed: 9,
            lr_encoder: 0.0,
            augment: None,
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
        fold: Some(Fold { folds: 4, index: 1, shuffle_seed: 3 }),
        resume_from: None,
        init_from: None,
        checkpoint_every: 1,
        rank: 0,
        world: 1,
        collective_backend: String::new(),
    }
}

/// Runs a task and returns its checkpoints (epoch → file) and validation MSEs.
fn run(task: &Task, files: &BTreeMap<String, PathBuf>, resume: Option<&Path>, scratch: &Path) -> (BTreeMap<u32, PathBuf>, Vec<f64>) {
    std::fs::create_dir_all(scratch).unwrap();
    let root = files.values().next().and_then(|p| p.parent()).unwrap();
    let inputs = RunInputs { dataset_files: files, dataset_root: root, resume_from: resume, init_from: None, scratch_dir: scratch, device: Device::Cpu, gang: None };
    let mut checkpoints = BTreeMap::new();
    let mut val = Vec::new();
    let mut emit = |event| match event {
        TrainEvent::Checkpoint { epoch, path, .. } => {
            checkpoints.insert(epoch, path);
        }
        TrainEvent::Epoch(report) => val.push(report.values.iter().find(|(k, _)| k == "val_mse").unwrap().1),
        TrainEvent::Artifact { .. } => {}
    };
    let (stop, drain) = (AtomicBool::new(false), AtomicBool::new(false));
    train::run(task, &inputs, &mut Events { emit: &mut emit, stop: &stop, drain: &drain }).unwrap();
    (checkpoints, val)
}

#[test]
fn resumed_training_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_dataset(dir.path());
    let (straight, straight_val) = run(&task(2), &files, None, &dir.path().join("straight"));
    let (first_half, _) = run(&task(1), &files, None, &dir.path().join("first"));
    let (resumed, resumed_val) = run(&task(2), &files, Some(&first_half[&1]), &dir.path().join("resumed"));
    assert_eq!(resumed.keys().copied().collect::<Vec<_>>(), vec![2], "the resumed run starts at epoch 2");
    assert_eq!(resumed_val.len(), 1);
    assert_eq!(resumed_val[0], straight_val[1], "same validation MSE at epoch 2");

    let a: BTreeMap<String, Tensor> = Tensor::read_safetensors(&straight[&2]).unwrap().into_iter().collect();
    let b: BTreeMap<String, Tensor> = Tensor::read_safetensors(&resumed[&2]).unwrap().into_iter().collect();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|k| k.starts_with("optim.")) && a.keys().any(|k| k.starts_with("model.")));
    for (name, tensor) in &a {
        assert!(tensor.equal(&b[name]), "{name} differs after resuming");
    }
    // And the checkpoint really moved: epoch 1's weights differ from epoch 2's.
    let one: BTreeMap<String, Tensor> = Tensor::read_safetensors(&straight[&1]).unwrap().into_iter().collect();
    assert!(!one["model.encoder.fc2.weight"].equal(&a["model.encoder.fc2.weight"]));
}
