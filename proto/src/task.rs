//! The one model of a trial: what the coordinator plans and stores, what the wire carries and
//! what the worker runs. Coordinator, worker and CLI all use these types; nothing else
//! describes a trial.
//!
//! On the wire a trial travels as versioned JSON of [`TrialSpec`] inside
//! [`pb::TaskSpec::spec_json`], next to the few fields that belong to one lease (task id,
//! attempt, rank, world, checkpoint to resume from, lease secret). The coordinator stores the
//! same JSON, so a dispatch hands the stored text on without parsing it, and a new
//! hyperparameter touches the sweep schema, this file and the code that uses it, and nothing
//! else. [`Task::try_from`] is the one place where a worker checks what it was sent.

use serde::{Deserialize, Serialize};

use crate::v1 as pb;

/// The version of [`TrialSpec`]'s JSON. A reader refuses a newer version than its own rather
/// than run a trial whose fields it would silently drop; adding an optional field with a
/// default keeps the version, changing the meaning of one bumps it.
pub const SPEC_VERSION: u32 = 1;

/// A content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl From<BlobRef> for pb::BlobRef {
    fn from(blob: BlobRef) -> Self {
        pb::BlobRef { sha256: blob.sha256, size: blob.size }
    }
}

impl From<pb::BlobRef> for BlobRef {
    fn from(blob: pb::BlobRef) -> Self {
        BlobRef { sha256: blob.sha256, size: blob.size }
    }
}

impl BlobRef {
    /// The blob a message names (`None` when absent or empty).
    pub fn from_wire(blob: Option<pb::BlobRef>) -> Option<BlobRef> {
        blob.filter(|b| !b.sha256.is_empty()).map(BlobRef::from)
    }
}

/// Implements `as_str`, `parse` and `Display` for a unit enum from one table of names, which
/// must be the same names serde uses.
macro_rules! named {
    ($kind:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $kind {
            /// Every value, in declaration order.
            pub const ALL: &'static [$kind] = &[$($kind::$variant),+];

            /// The name used in sweep files, tables and the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($kind::$variant => $name),+
                }
            }

            /// The value with this name.
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|value| value.as_str() == text)
            }
        }

        impl std::fmt::Display for $kind {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Which training a trial runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrialKind {
    /// DAE on k−1 folds, validated on the held-out fold every epoch.
    DaeFold,
    /// DAE on the whole training set, tested every epoch.
    DaeFinal,
    /// Classifier fine-tuned from the final DAE's encoder.
    Classifier,
    /// WGAN-GP, alone or data-parallel over a gang.
    Wgan,
    /// The user's own program (`[command]`, see docs/commands.md).
    Command,
}

named!(TrialKind { DaeFold => "dae-fold", DaeFinal => "dae-final", Classifier => "classifier", Wgan => "wgan", Command => "command" });

/// A stage of a sweep: the trials that start together once the stage before them ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Cross-validation over the grid.
    Cv,
    /// Retraining with the winner on the whole training set.
    Final,
    /// The classifier fine-tuned from `final`'s autoencoder.
    Finetune,
    /// WGAN-GP training.
    Train,
}

named!(Stage { Cv => "cv", Final => "final", Finetune => "finetune", Train => "train" });

/// How a dataset's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetFormat {
    /// No dataset (a command sweep without `[dataset]`).
    #[default]
    #[serde(alias = "")]
    None,
    /// MNIST's IDX files.
    Idx,
    /// `ROOT/[train|test/]{class}/*.png|jpg`.
    ImageFolder,
    /// `.nii`/`.nii.gz` volumes, cut into axial slices.
    Nifti,
    /// Plain files handed to a command trial as they are.
    Files,
}

named!(DatasetFormat { None => "none", Idx => "idx", ImageFolder => "image-folder", Nifti => "nifti", Files => "files" });

/// How a gang sums its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL when every member has a CUDA device, else the TCP ring.
    #[default]
    #[serde(alias = "")]
    Auto,
    /// The TCP ring (CPU tensors).
    Ring,
    /// NCCL (CUDA devices only).
    Nccl,
}

named!(CollectiveBackend { Auto => "auto", Ring => "ring", Nccl => "nccl" });

/// Where the cross-validation trials' weights start from (`[cv] init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitPolicy {
    /// Every trial starts from the initialisation of the sweep's seed, so configs differ only
    /// in their hyperparameters (the seed report's setting).
    #[default]
    Shared,
    /// Each trial draws its own initialisation, so the spread over folds includes the
    /// run-to-run spread of the initialisation.
    PerTrial,
}

named!(InitPolicy { Shared => "shared", PerTrial => "per-trial" });

/// Seed §1.1: augmented copies of the training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentSpec {
    /// Copies appended.
    pub copies: u32,
    /// ± degrees.
    pub rotate_deg: f64,
    /// ± fraction of the side.
    pub translate: f64,
    /// ± degrees.
    pub shear_deg: f64,
    /// Seeds the transforms.
    pub seed: u64,
}

/// The WGAN-GP recipe (seed §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WganSpec {
    /// Generator hidden widths, widest first: one per stride-2 stage (3 for 32×32 images, 4
    /// for 64×64, 5 for 128×128); the critic mirrors them.
    pub widths: Vec<u32>,
    /// Critic steps per generator step.
    pub critic_steps: u32,
    /// Gradient penalty weight λ.
    pub gp_lambda: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Sample grid period in epochs (0: only first and last epoch).
    pub sample_every: u32,
    /// Images per sample grid.
    pub sample_count: u32,
    /// Class-conditional generator and projection critic (classes from the image folder).
    #[serde(default)]
    pub conditional: bool,
    /// Sliced Wasserstein distance to the test set every this many epochs (0: never).
    #[serde(default)]
    pub eval_every: u32,
    /// Conditional GANs on digit classes: the classifier that judges the generated samples'
    /// class at every evaluation (`[train] judge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeSpec>,
}

/// The classifier that measures the class accuracy of a conditional GAN's samples: the
/// fine-tuned classifier of an autoencoder sweep, named by its checkpoint, and which of its
/// labels (MNIST digits) each of the GAN's classes is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSpec {
    /// The classifier's checkpoint (`model.encoder.*`, `model.head.*`).
    pub checkpoint: BlobRef,
    /// The classifier's label of each GAN class, by the GAN's label (the class folders in name
    /// order, each named by its digit).
    pub digits: Vec<u32>,
}

/// A trial's hyperparameters and recipe (`Default`: all zero, no recipe parts; planners and
/// tests fill in what their recipe reads).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Learning rate.
    pub lr: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Epochs.
    pub epochs: u32,
    /// Standard deviation of the Gaussian noise added to each input batch.
    pub noise_std: f64,
    /// Latent size.
    pub latent: u32,
    /// Seeds shuffling and noise, and the initialisation unless `init_seed` is set.
    pub seed: u64,
    /// Seeds the initialisation instead of `seed` (`[cv] init = "per-trial"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_seed: Option<u64>,
    /// The classifier encoder's learning rate (`lr` is the head's).
    #[serde(default)]
    pub lr_encoder: f64,
    /// Augmentation of the training set.
    #[serde(default)]
    pub augment: Option<AugmentSpec>,
    /// The WGAN-GP recipe.
    #[serde(default)]
    pub wgan: Option<WganSpec>,
}

impl TrainingConfig {
    /// The seed the model's weights are initialised from.
    pub fn weights_seed(&self) -> u64 {
        self.init_seed.unwrap_or(self.seed)
    }

    /// Whether two configs train with the same hyperparameters (what makes cross-validation
    /// trials one config: they differ only in fold and, per trial, in initialisation).
    pub fn same_hyperparameters(&self, other: &TrainingConfig) -> bool {
        TrainingConfig { init_seed: None, ..self.clone() } == TrainingConfig { init_seed: None, ..other.clone() }
    }
}

/// A command trial's program (`[command]`): what the worker runs, with which files and
/// hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// argv, run without a shell.
    pub run: Vec<String>,
    /// The `[command] files` folder: relative name → blob.
    pub files: Vec<(String, BlobRef)>,
    /// The metric cross-validation minimises.
    pub metric: String,
    /// Per-attempt limit in minutes (0: none).
    pub timeout_minutes: u32,
    /// The trial's hyperparameters as a JSON object (`COHORT_HPARAMS`).
    pub hparams_json: String,
}

impl CommandSpec {
    /// The per-attempt limit, if any.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        (self.timeout_minutes > 0).then(|| std::time::Duration::from_secs(u64::from(self.timeout_minutes) * 60))
    }
}

/// A dataset as stored blobs (empty: a command sweep without `[dataset]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DatasetSpec {
    /// How the files are laid out.
    pub format: DatasetFormat,
    /// File name → blob. Names are relative paths, never absolute, never `..`.
    pub files: Vec<(String, BlobRef)>,
    /// Training sample limit (0: all).
    pub train_limit: u64,
    /// Test sample limit (0: all).
    pub test_limit: u64,
    /// Side of the square images (image-folder, nifti).
    #[serde(default)]
    pub image_size: u32,
    /// nifti: minimum bright fraction of a kept slice.
    #[serde(default)]
    pub min_foreground: f64,
}

/// One fold of k-fold cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldSpec {
    /// k.
    pub folds: u32,
    /// The validating part, `0..folds`.
    pub index: u32,
    /// Seed of the permutation the folds are cut from.
    pub shuffle_seed: u64,
}

/// Everything needed to run one trial, as planned from a sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialSpec {
    /// Stage of the sweep.
    pub stage: Stage,
    /// Unique within the sweep, e.g. `cv/c3/f1`.
    pub name: String,
    /// Names the hyperparameter config for people (trials of one config differ only in fold).
    pub config_label: String,
    /// What to run.
    pub kind: TrialKind,
    /// Hyperparameters.
    pub config: TrainingConfig,
    /// Data.
    pub dataset: DatasetSpec,
    /// Fold, for cross-validation.
    pub fold: Option<FoldSpec>,
    /// Checkpoint period in epochs (0: only at the end).
    pub checkpoint_every: u32,
    /// Attempts before the trial fails for good.
    pub max_attempts: u32,
    /// Initialise from this checkpoint (the classifier's pretrained autoencoder).
    #[serde(default)]
    pub init_from: Option<BlobRef>,
    /// Workers that train it together (a gang; 1 for a plain trial).
    #[serde(default = "one")]
    pub replicas: u32,
    /// The gang's collective backend.
    #[serde(default)]
    pub collective_backend: CollectiveBackend,
    /// The program of a command trial ([`TrialKind::Command`]).
    #[serde(default)]
    pub command: Option<CommandSpec>,
}

fn one() -> u32 {
    1
}

/// A trial spec that cannot be run as it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed task {task_id}: {message}")]
pub struct MalformedTask {
    /// The task.
    pub task_id: String,
    /// What is wrong.
    pub message: String,
}

impl TrialSpec {
    /// A single-replica trial of `kind` in `stage`, checkpointed every epoch, one attempt, no
    /// fold, no label and nothing to start from: the planners set the rest on top.
    pub fn new(stage: Stage, name: impl Into<String>, kind: TrialKind, config: TrainingConfig, dataset: DatasetSpec) -> Self {
        Self {
            stage,
            name: name.into(),
            config_label: String::new(),
            kind,
            config,
            dataset,
            fold: None,
            checkpoint_every: 1,
            max_attempts: 1,
            init_from: None,
            replicas: 1,
            collective_backend: CollectiveBackend::Auto,
            command: None,
        }
    }

    /// The JSON that is stored and sent ([`SPEC_VERSION`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a trial spec is plain data")
    }

    /// Parses JSON written by [`TrialSpec::to_json`] (any version up to [`SPEC_VERSION`]).
    pub fn from_json(json: &str) -> Result<TrialSpec, String> {
        serde_json::from_str(json).map_err(|e| format!("unreadable trial spec: {e}"))
    }

    /// What makes the spec unrunnable, if anything: the checks a worker makes before it
    /// starts, so that a bad spec fails as a user error instead of deep inside a recipe.
    pub fn problem(&self) -> Option<&'static str> {
        let fold_ok = self.fold.is_none_or(|f| f.folds >= 2 && f.index < f.folds);
        let wgan_ok = self.config.wgan.as_ref().is_none_or(|w| (1..=8).contains(&w.widths.len()));
        let judge_ok = self
            .config
            .wgan
            .as_ref()
            .and_then(|w| w.judge.as_ref().map(|j| (w, j)))
            .is_none_or(|(w, j)| w.conditional && !j.digits.is_empty() && j.digits.iter().all(|&d| d < 10));
        let command_ok = self.command.as_ref().is_none_or(|c| !c.run.is_empty());
        [
            (self.kind == TrialKind::DaeFold && self.fold.is_none(), "a dae-fold trial needs a fold"),
            (!fold_ok, "a fold must be one of at least 2"),
            (
                self.kind == TrialKind::Classifier && self.init_from.is_none(),
                "a classifier trial needs a pretrained autoencoder (init_from)",
            ),
            (self.kind == TrialKind::Wgan && self.config.wgan.is_none(), "a wgan trial needs its recipe"),
            (!wgan_ok, "a wgan needs 1 to 8 widths"),
            (!judge_ok, "a judge classifier needs a conditional wgan with a digit for every class"),
            (self.kind == TrialKind::Command && self.command.is_none(), "a command trial needs its program"),
            (!command_ok, "a command trial needs a program to run"),
            (self.kind != TrialKind::Command && self.config.batch_size == 0, "the batch size must be positive"),
        ]
        .into_iter()
        .find_map(|(wrong, message)| wrong.then_some(message))
    }

    /// Reads the trial out of a task message (the CLI's view of a listed task).
    pub fn from_wire(task: &pb::TaskSpec) -> Result<TrialSpec, MalformedTask> {
        let malformed = |message: String| MalformedTask { task_id: task.task_id.clone(), message };
        if task.spec_version > SPEC_VERSION {
            return Err(malformed(format!(
                "the coordinator sent trial spec version {}; this program reads up to version {SPEC_VERSION}: upgrade it",
                task.spec_version
            )));
        }
        TrialSpec::from_json(&task.spec_json).map_err(malformed)
    }
}

/// The message for one lease of a stored trial: the stored JSON is passed on as it is.
pub fn task_message(task_id: &str, sweep_id: &str, attempt: u32, spec_json: String, resume_from: Option<BlobRef>) -> pb::TaskSpec {
    pb::TaskSpec {
        task_id: task_id.to_string(),
        sweep_id: sweep_id.to_string(),
        attempt,
        resume_from: resume_from.map(Into::into),
        rank: 0,
        world_size: 1,
        lease_secret: String::new(),
        spec_json,
        spec_version: SPEC_VERSION,
    }
}

/// A lease of a trial, as a worker runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Coordinator-wide task id.
    pub id: String,
    /// Which attempt this is (1 for the first).
    pub attempt: u32,
    /// Resume from this checkpoint when set.
    pub resume_from: Option<BlobRef>,
    /// This worker's rank in the gang (0 for a plain task).
    pub rank: u32,
    /// Members of the gang (1 for a plain task).
    pub world: u32,
    /// The trial.
    pub spec: TrialSpec,
}

impl TryFrom<pb::TaskSpec> for Task {
    type Error = MalformedTask;

    fn try_from(message: pb::TaskSpec) -> Result<Self, Self::Error> {
        let spec = TrialSpec::from_wire(&message)?;
        let malformed = |text: &str| MalformedTask { task_id: message.task_id.clone(), message: text.to_string() };
        if let Some(problem) = spec.problem() {
            return Err(malformed(problem));
        }
        let world = message.world_size.max(1);
        if message.rank >= world {
            return Err(malformed("rank outside the gang"));
        }
        Ok(Task {
            id: message.task_id,
            attempt: message.attempt,
            resume_from: BlobRef::from_wire(message.resume_from),
            rank: message.rank,
            world,
            spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TrialSpec {
        let config = TrainingConfig { lr: 1e-3, batch_size: 32, epochs: 2, noise_std: 0.3, latent: 4, ..TrainingConfig::default() };
        let dataset = DatasetSpec { format: DatasetFormat::Idx, ..DatasetSpec::default() };
        TrialSpec {
            config_label: "lr=1e-3".into(),
            fold: Some(FoldSpec { folds: 4, index: 1, shuffle_seed: 0 }),
            checkpoint_every: 0,
            max_attempts: 3,
            ..TrialSpec::new(Stage::Cv, "cv/c0/f1", TrialKind::DaeFold, config, dataset)
        }
    }

    fn message(spec: &TrialSpec) -> pb::TaskSpec {
        task_message("t1", "s1", 1, spec.to_json(), None)
    }

    #[test]
    fn a_task_travels_as_its_stored_json_and_comes_back_equal() {
        let task = Task::try_from(message(&spec())).unwrap();
        assert_eq!((task.id.as_str(), task.attempt, task.rank, task.world), ("t1", 1, 0, 1));
        assert_eq!(task.spec, spec());
    }

    #[test]
    fn specs_stored_before_the_typed_fields_still_read() {
        // What version 1 wrote before format and backend were enums: "" meant none and auto.
        let mut json: serde_json::Value = serde_json::from_str(&spec().to_json()).unwrap();
        json["dataset"]["format"] = "".into();
        json["collective_backend"] = "".into();
        let spec = TrialSpec::from_json(&json.to_string()).unwrap();
        assert_eq!((spec.dataset.format, spec.collective_backend), (DatasetFormat::None, CollectiveBackend::Auto));
        assert!(!json.to_string().contains("init_seed"), "an unset init seed is not written");
    }

    #[test]
    fn a_newer_spec_version_is_refused_by_name() {
        let mut sent = message(&spec());
        sent.spec_version = SPEC_VERSION + 1;
        let error = Task::try_from(sent).unwrap_err();
        assert!(error.message.contains("upgrade"), "{error}");
    }

    #[test]
    fn unrunnable_specs_are_refused_before_they_start() {
        type Breaks = fn(&mut TrialSpec);
        let cases: Vec<(Breaks, &str)> = vec![
            (|s| s.fold = None, "needs a fold"),
            (|s| s.fold = Some(FoldSpec { folds: 4, index: 4, shuffle_seed: 0 }), "one of at least 2"),
            (|s| s.kind = TrialKind::Classifier, "pretrained autoencoder"),
            (|s| s.kind = TrialKind::Wgan, "needs its recipe"),
            (|s| s.kind = TrialKind::Command, "needs its program"),
            (|s| s.config.batch_size = 0, "batch size"),
        ];
        for (break_it, expected) in cases {
            let mut broken = spec();
            break_it(&mut broken);
            let error = Task::try_from(message(&broken)).unwrap_err();
            assert!(error.message.contains(expected), "{error} should say {expected}");
        }
        let mut outside = message(&spec());
        (outside.rank, outside.world_size) = (2, 2);
        assert!(Task::try_from(outside).unwrap_err().message.contains("rank outside"));
        assert_eq!(Task::try_from(pb::TaskSpec { spec_json: "{".into(), ..message(&spec()) }).unwrap_err().task_id, "t1");
    }

    #[test]
    fn a_judge_needs_a_conditional_gan_and_a_digit_per_class() {
        let recipe = WganSpec {
            widths: vec![16, 8, 4],
            critic_steps: 5,
            gp_lambda: 10.0,
            beta1: 0.0,
            beta2: 0.9,
            sample_every: 0,
            sample_count: 4,
            conditional: true,
            eval_every: 1,
            judge: Some(JudgeSpec { checkpoint: BlobRef { sha256: "ab".repeat(32), size: 9 }, digits: vec![1, 7] }),
        };
        let mut gan = TrialSpec { kind: TrialKind::Wgan, fold: None, ..spec() };
        gan.config.wgan = Some(recipe.clone());
        let task = Task::try_from(message(&gan)).unwrap();
        assert_eq!(task.spec.config.wgan.and_then(|w| w.judge).map(|j| j.digits), Some(vec![1, 7]));
        for broken in [
            WganSpec { conditional: false, ..recipe.clone() },
            WganSpec { judge: Some(JudgeSpec { digits: vec![1, 10], ..recipe.judge.clone().unwrap() }), ..recipe.clone() },
        ] {
            gan.config.wgan = Some(broken);
            assert!(Task::try_from(message(&gan)).unwrap_err().message.contains("judge classifier"));
        }
        gan.config.wgan = Some(WganSpec { judge: None, ..recipe });
        assert!(!gan.to_json().contains("judge"), "no judge, no key: specs without one read as before");
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        for kind in TrialKind::ALL {
            assert_eq!(TrialKind::parse(kind.as_str()), Some(*kind));
            assert_eq!(serde_json::to_string(kind).unwrap(), format!("\"{kind}\""));
        }
        for stage in Stage::ALL {
            assert_eq!(serde_json::to_string(stage).unwrap(), format!("\"{stage}\""));
        }
        for format in DatasetFormat::ALL {
            assert_eq!(serde_json::to_string(format).unwrap(), format!("\"{format}\""));
        }
        for backend in CollectiveBackend::ALL {
            assert_eq!(serde_json::to_string(backend).unwrap(), format!("\"{backend}\""));
        }
        for init in InitPolicy::ALL {
            assert_eq!(serde_json::to_string(init).unwrap(), format!("\"{init}\""));
        }
    }

    #[test]
    fn a_per_trial_init_seed_changes_the_weights_seed_but_not_the_hyperparameters() {
        let shared = spec().config;
        let own = TrainingConfig { init_seed: Some(9), ..shared.clone() };
        assert_eq!((shared.weights_seed(), own.weights_seed()), (0, 9));
        assert!(shared.same_hyperparameters(&own));
        assert!(!shared.same_hyperparameters(&TrainingConfig { lr: 1.0, ..shared.clone() }));
    }
}
