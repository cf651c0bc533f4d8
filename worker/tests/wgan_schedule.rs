//! The WGAN-GP's generator schedule: the generator steps after every `critic_steps`-th critic
//! step of the whole trial, however few batches an epoch holds, and a resumed trial keeps the
//! schedule (the count is part of the checkpoint). And the shipped `examples/seed-wgan.toml`
//! trains its generator in every epoch on the committed volume (run here at reduced widths).
//! Its own test binary: libtorch's global generator and the dataset cache are process-wide, and
//! the runs here are compared bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use cohort_worker::task::{BlobRef, DatasetFormat, DatasetSpec, Stage, Task, TrainingConfig, TrialKind, TrialSpec, WganSpec};
use cohort_worker::train::wgan::generator_step_due;
use cohort_worker::train::{self, EpochReport, Events, RunInputs, TrainEvent};
use tch::{Device, Tensor};

/// Serialises the tests of this file: two runs drawing from libtorch's global generator at once
/// would not be reproducible.
static LIBTORCH: Mutex<()> = Mutex::new(());

/// Small widths: the schedule does not depend on them, and they keep a run to seconds on a CPU.
const TEST_WIDTHS: [i64; 4] = [32, 16, 8, 4];

/// Slices of the committed Colin27 volume kept at 64×64 with `min_foreground = 0.05`.
const COMMITTED_SLICES: u64 = 134;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the worker crate lies in the workspace").to_path_buf()
}

/// The committed MRI volume as a dataset: file name → local path.
fn committed_volume() -> BTreeMap<String, PathBuf> {
    let path = repo_root().join("data/mri-sample/ch2bet.nii.gz");
    assert!(path.is_file(), "{} is committed", path.display());
    BTreeMap::from([("ch2bet.nii.gz".to_string(), path)])
}

/// The value of `key` in the shipped `examples/seed-wgan.toml` (a plain `key = value` line; the
/// worker has no TOML parser, and the example's keys are unique across its sections).
fn example_setting(key: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("examples/seed-wgan.toml")).expect("the example is committed");
    text.lines()
        .filter_map(|line| line.split('#').next()?.split_once('='))
        .find(|(name, _)| name.trim() == key)
        .map(|(_, value)| value.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("examples/seed-wgan.toml sets no {key}"))
}

/// What a WGAN-GP trial's schedule and size are made of.
struct Schedule {
    epochs: u32,
    batch_size: usize,
    critic_steps: u32,
    /// Training slices used (0: all).
    train_limit: usize,
}

/// A single-replica WGAN-GP task at [`TEST_WIDTHS`] on the committed volume, with the seed's
/// optimiser settings and a checkpoint after every epoch.
fn wgan_task(schedule: &Schedule, min_foreground: f64) -> Task {
    let wgan = WganSpec {
        widths: TEST_WIDTHS.iter().map(|&width| width as u32).collect(),
        critic_steps: schedule.critic_steps,
        gp_lambda: 10.0,
        beta1: 0.0,
        beta2: 0.9,
        sample_every: 0,
        sample_count: 4,
        conditional: false,
        eval_every: 0,
        judge: None,
    };
    let config = TrainingConfig {
        lr: 1e-4,
        batch_size: schedule.batch_size as u32,
        epochs: schedule.epochs,
        wgan: Some(wgan),
        ..TrainingConfig::default()
    };
    let dataset = DatasetSpec {
        format: DatasetFormat::Nifti,
        files: vec![("ch2bet.nii.gz".into(), BlobRef { sha256: String::new(), size: 0 })],
        train_limit: schedule.train_limit as u64,
        image_size: 64,
        min_foreground,
        ..DatasetSpec::default()
    };
    Task {
        id: "gan".into(),
        attempt: 1,
        resume_from: None,
        rank: 0,
        world: 1,
        spec: TrialSpec::new(Stage::Train, "train", TrialKind::Wgan, config, dataset),
    }
}

/// What a run emitted.
struct Run {
    /// Every epoch's report, in order.
    epochs: Vec<EpochReport>,
    /// Checkpoint files by epoch.
    checkpoints: BTreeMap<u32, PathBuf>,
}

impl Run {
    /// The epochs whose report carries a `generator_loss` (the generator stepped in them).
    fn epochs_with_generator_loss(&self) -> Vec<u32> {
        self.epochs.iter().filter(|report| generator_loss(report).is_some()).map(|report| report.epoch).collect()
    }
}

fn generator_loss(report: &EpochReport) -> Option<f64> {
    report.values.iter().find(|(name, _)| name == "generator_loss").map(|(_, value)| *value)
}

/// Runs `task` on the committed volume on the CPU, resuming from `resume` if given.
fn run(task: &Task, resume: Option<&Path>, scratch: &Path) -> Run {
    std::fs::create_dir_all(scratch).unwrap();
    let files = committed_volume();
    let root = files.values().next().and_then(|path| path.parent()).unwrap().to_path_buf();
    let inputs = RunInputs {
        dataset_files: &files,
        dataset_root: &root,
        resume_from: resume,
        init_from: None,
        judge: None,
        scratch_dir: scratch,
        device: Device::Cpu,
        gang: None,
    };
    let mut output = Run { epochs: Vec::new(), checkpoints: BTreeMap::new() };
    let mut emit = |event| match event {
        TrainEvent::Epoch(report) => output.epochs.push(report),
        TrainEvent::Checkpoint { epoch, path, .. } => {
            output.checkpoints.insert(epoch, path);
        }
        TrainEvent::Artifact { .. } => {}
    };
    let (stop, drain) = (AtomicBool::new(false), AtomicBool::new(false));
    train::run(task, &inputs, &mut Events { emit: &mut emit, stop: &stop, drain: &drain }).expect("the trial trains");
    output
}

fn read_checkpoint(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// The critic's and the generator's step counts recorded in a checkpoint.
fn recorded_steps(checkpoint: &BTreeMap<String, Tensor>) -> (i64, i64) {
    (checkpoint["optim.critic.step"].int64_value(&[]), checkpoint["optim.generator.step"].int64_value(&[]))
}

#[test]
fn a_generator_step_follows_every_critic_steps_th_critic_step_of_the_trial() {
    // 2 batches an epoch, 5 critic steps per generator step: the 5th and 10th critic steps of the
    // trial, in epochs 3 and 5, are followed by a generator step.
    let due: Vec<u64> = (1..=10).filter(|&taken| generator_step_due(taken, 5)).collect();
    assert_eq!(due, vec![5, 10]);
    assert!((1..=4).all(|taken| generator_step_due(taken, 1)), "critic_steps = 1 alternates");
    assert!(!generator_step_due(0, 5), "no generator step before the first critic step");
    assert!(!generator_step_due(5, 0), "critic_steps = 0 is refused before training; never due");
}

#[test]
fn the_shipped_example_trains_its_generator_every_epoch_on_the_committed_volume() {
    let _libtorch = LIBTORCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    assert_eq!(example_setting("path"), "../data/mri-sample", "the example trains on the committed volume");
    assert_eq!(example_setting("format"), "nifti");
    let schedule = Schedule {
        epochs: 3,
        batch_size: example_setting("batch_size").parse().unwrap(),
        critic_steps: example_setting("critic_steps").parse().unwrap(),
        train_limit: 0,
    };
    let min_foreground: f64 = example_setting("min_foreground").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = run(&wgan_task(&schedule, min_foreground), None, dir.path());

    assert_eq!(output.epochs.len(), 3);
    for report in &output.epochs {
        assert_eq!(report.samples, COMMITTED_SLICES, "the committed volume's slices");
        let loss =
            generator_loss(report).unwrap_or_else(|| panic!("epoch {} reports no generator_loss: {:?}", report.epoch, report.values));
        assert!(loss.is_finite(), "epoch {}: generator_loss {loss}", report.epoch);
    }
    let batches = COMMITTED_SLICES / schedule.batch_size as u64;
    let (critic, generator) = recorded_steps(&read_checkpoint(&output.checkpoints[&3]));
    assert_eq!(critic as u64, 3 * batches, "one critic step per batch");
    assert_eq!(
        generator as u64,
        3 * batches / u64::from(schedule.critic_steps),
        "one generator step per {} critic steps",
        schedule.critic_steps
    );
}

#[test]
fn critic_steps_count_across_epochs_and_across_a_resume() {
    let _libtorch = LIBTORCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // 24 slices at batch 8: 3 critic steps an epoch, fewer than the 5 per generator step. Counted
    // over the trial, the 5th, 10th and 15th critic steps fall in epochs 2, 4 and 5.
    let schedule = Schedule { epochs: 5, batch_size: 8, critic_steps: 5, train_limit: 24 };
    let task = wgan_task(&schedule, 0.05);
    let dir = tempfile::tempdir().unwrap();
    let straight = run(&task, None, &dir.path().join("straight"));
    assert_eq!(straight.epochs_with_generator_loss(), vec![2, 4, 5]);
    for (&epoch, path) in &straight.checkpoints {
        let critic_steps = 3 * i64::from(epoch);
        assert_eq!(recorded_steps(&read_checkpoint(path)), (critic_steps, critic_steps / 5), "the steps taken by the end of epoch {epoch}");
    }

    // Stopped after epoch 1 (mid-way to the first generator step) or 2 (just past it) and resumed
    // from that checkpoint, the trial steps its generator where the uninterrupted one did.
    let last_straight = read_checkpoint(&straight.checkpoints[&5]);
    for stopped_after in [1, 2] {
        let resumed = run(&task, Some(&straight.checkpoints[&stopped_after]), &dir.path().join(format!("resumed-after-{stopped_after}")));
        let expected: Vec<u32> = straight.epochs_with_generator_loss().into_iter().filter(|&epoch| epoch > stopped_after).collect();
        assert_eq!(resumed.epochs_with_generator_loss(), expected, "resumed after epoch {stopped_after}");
        for report in &resumed.epochs {
            let same_epoch = &straight.epochs[report.epoch as usize - 1];
            assert_eq!(generator_loss(report), generator_loss(same_epoch), "epoch {} resumed after {stopped_after}", report.epoch);
        }
        let last_resumed = read_checkpoint(&resumed.checkpoints[&5]);
        assert_eq!(last_resumed.keys().collect::<Vec<_>>(), last_straight.keys().collect::<Vec<_>>());
        for (name, tensor) in &last_straight {
            assert!(tensor.equal(&last_resumed[name]), "{name} differs after resuming from epoch {stopped_after}");
        }
    }
}
