//! The sweep file: one TOML document describing one experiment (see docs/sweep.md).
//!
//! Parsing is strict: unknown keys and wrong types are errors that name the file, line, column
//! and key. [`SweepFile::parse`] is the only way in, so everything past it is valid.

use serde::{Deserialize, Serialize};

use crate::prune::PruneSection;
use crate::search::{self, GridSection, Hyper, RandomSection};

/// Why a sweep file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The TOML does not parse or does not fit the schema (the message carries line and column).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// toml's message, with line, column and key.
        message: String,
    },
    /// A value is out of range or the parts of the file disagree.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The offending key, dotted (`cv.grid.lr`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// `[dataset]`: where the data is and how to read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// `"idx"` (MNIST layout), `"image-folder"` or `"nifti"`.
    pub format: String,
    /// Folder of the dataset, relative to the sweep file.
    pub path: String,
    /// Use at most this many training samples (0: all).
    #[serde(default)]
    pub train_limit: u64,
    /// Use at most this many test samples (0: all).
    #[serde(default)]
    pub test_limit: u64,
    /// Side of the square images for image-folder and nifti data.
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// nifti: keep a slice only when at least this fraction of its pixels is bright.
    #[serde(default = "default_min_foreground")]
    pub min_foreground: f64,
}

impl Default for DatasetSection {
    /// No dataset: what a command sweep without `[dataset]` has (an empty `path`).
    fn default() -> Self {
        Self {
            format: String::new(),
            path: String::new(),
            train_limit: 0,
            test_limit: 0,
            image_size: default_image_size(),
            min_foreground: default_min_foreground(),
        }
    }
}

fn default_image_size() -> u32 {
    64
}
fn default_min_foreground() -> f64 {
    0.05
}

/// `[augment]` (seed §1.1): randomly rotated, translated and sheared copies appended to the
/// training set.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AugmentSection {
    /// Copies appended.
    #[serde(default = "one")]
    pub copies: u32,
    /// Rotation range, ± degrees.
    #[serde(default = "default_rotate")]
    pub rotate_deg: f64,
    /// Translation range, ± fraction of the side.
    #[serde(default = "default_translate")]
    pub translate: f64,
    /// Shear range, ± degrees.
    #[serde(default = "default_shear")]
    pub shear_deg: f64,
}

fn one() -> u32 {
    1
}
fn default_rotate() -> f64 {
    15.0
}
fn default_translate() -> f64 {
    0.1
}
fn default_shear() -> f64 {
    10.0
}

/// `[noise]`: the corruption of the denoising autoencoder's inputs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoiseSection {
    /// Standard deviation of the additive white Gaussian noise.
    #[serde(default = "default_noise_std")]
    pub std: f64,
}

fn default_noise_std() -> f64 {
    0.3
}

impl Default for NoiseSection {
    fn default() -> Self {
        Self { std: default_noise_std() }
    }
}

/// `[model]`: which network.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"dae"` or `"wgan-gp"`.
    pub kind: String,
    /// DAE latent code size.
    #[serde(default = "default_latent")]
    pub latent: u32,
    /// WGAN-GP generator hidden widths, widest first (the critic mirrors them): one per
    /// stride-2 stage, so 3 for 32×32 images, 4 for 64×64, 5 for 128×128.
    #[serde(default = "default_widths")]
    pub widths: Vec<u32>,
    /// WGAN-GP: class-conditional generation (classes are the image folder's class folders).
    #[serde(default)]
    pub conditional: bool,
}

fn default_latent() -> u32 {
    4
}
fn default_widths() -> Vec<u32> {
    vec![1024, 512, 256, 128]
}

/// `[cv]`: k-fold cross-validation over a grid of hyperparameters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CvSection {
    /// k.
    pub folds: u32,
    /// Epochs per trial.
    pub epochs: u32,
    /// Learning rate when not gridded.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Weight decay when not gridded.
    #[serde(default)]
    pub weight_decay: f64,
    /// Batch size when not gridded.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Checkpoint every this many epochs (0: only at the end).
    #[serde(default = "one")]
    pub checkpoint_every: u32,
    /// Attempts per trial before it fails for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Grid search: every combination of the listed values is a config.
    #[serde(default)]
    pub grid: GridSection,
    /// Random search (instead of a grid): configs drawn from ranges.
    pub random: Option<RandomSection>,
    /// Early stopping: drop configs that are losing (absent: every config trains every fold).
    pub prune: Option<PruneSection>,
}

/// `[final]`: retrain on the whole training set with the cross-validation winner (or, without
/// `[cv]`, with the hyperparameters given here), testing every epoch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinalSection {
    /// Epochs.
    pub epochs: u32,
    /// Learning rate (only without `[cv]`).
    pub lr: Option<f64>,
    /// Weight decay (only without `[cv]`).
    pub weight_decay: Option<f64>,
    /// Batch size (only without `[cv]`).
    pub batch_size: Option<u32>,
    /// Checkpoint period.
    #[serde(default = "one")]
    pub checkpoint_every: u32,
    /// Attempts before failing for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

/// `[finetune]` (seed §1.5): a classifier from the final autoencoder's encoder.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    /// Epochs.
    pub epochs: u32,
    /// Learning rate of the new head.
    #[serde(default = "default_lr")]
    pub lr_head: f64,
    /// Learning rate of the pretrained encoder.
    #[serde(default = "default_lr_encoder")]
    pub lr_encoder: f64,
    /// Weight decay.
    #[serde(default = "default_finetune_weight_decay")]
    pub weight_decay: f64,
    /// Batch size.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Checkpoint period.
    #[serde(default = "one")]
    pub checkpoint_every: u32,
    /// Attempts before failing for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_lr_encoder() -> f64 {
    1e-4
}
fn default_finetune_weight_decay() -> f64 {
    1e-5
}

/// `[train]`: the WGAN-GP's training (seed §2.3).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Epochs (passes of the critic over the data).
    pub epochs: u32,
    /// Adam learning rate of both networks.
    #[serde(default = "default_gan_lr")]
    pub lr: f64,
    /// Adam β1.
    #[serde(default)]
    pub beta1: f64,
    /// Adam β2.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Batch size.
    #[serde(default = "default_gan_batch")]
    pub batch_size: u32,
    /// Critic steps per generator step.
    #[serde(default = "default_critic_steps")]
    pub critic_steps: u32,
    /// Gradient penalty weight λ.
    #[serde(default = "default_gp_lambda")]
    pub gp_lambda: f64,
    /// Sample grid every this many epochs (0: only the first and last).
    #[serde(default = "default_sample_every")]
    pub sample_every: u32,
    /// Images per sample grid.
    #[serde(default = "default_sample_count")]
    pub sample_count: u32,
    /// The sliced Wasserstein distance to the test set every this many epochs and at the last
    /// (0: never; no figure without a test set).
    #[serde(default = "default_eval_every")]
    pub eval_every: u32,
    /// Checkpoint period.
    #[serde(default = "default_gan_checkpoint_every")]
    pub checkpoint_every: u32,
    /// Attempts before failing for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_gan_lr() -> f64 {
    1e-4
}
fn default_beta2() -> f64 {
    0.9
}
fn default_gan_batch() -> u32 {
    64
}
fn default_critic_steps() -> u32 {
    5
}
fn default_gp_lambda() -> f64 {
    10.0
}
fn default_sample_every() -> u32 {
    10
}
fn default_sample_count() -> u32 {
    16
}
fn default_eval_every() -> u32 {
    10
}
fn default_gan_checkpoint_every() -> u32 {
    5
}

/// `[command]`: the user's own program (`[model] kind = "command"`, see docs/commands.md).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandSection {
    /// argv, run in the trial's working directory, without a shell.
    pub run: Vec<String>,
    /// Folder (relative to the sweep file) uploaded with the sweep and unpacked as the working
    /// directory.
    #[serde(default = "default_files")]
    pub files: String,
    /// The metric cross-validation minimises (per trial: its minimum over epochs).
    pub metric: String,
    /// Per-attempt limit (default: none).
    pub timeout_minutes: Option<u32>,
}

fn default_files() -> String {
    ".".into()
}

/// `[distributed]`: data-parallel replicas of one training.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// Workers training together.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Collective backend: `auto` (NCCL on CUDA workers, the TCP ring otherwise), `ring`, `nccl`.
    #[serde(default = "default_backend")]
    pub backend: String,
}

fn default_backend() -> String {
    "auto".into()
}

fn default_lr() -> f64 {
    1e-3
}
fn default_batch_size() -> u32 {
    256
}
fn default_max_attempts() -> u32 {
    3
}

/// A whole sweep file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The experiment's name.
    pub name: String,
    /// Seeds fold permutations, initialisation, shuffling, noise and augmentation.
    #[serde(default)]
    pub seed: u64,
    /// The data (optional for a command sweep only).
    #[serde(default)]
    pub dataset: DatasetSection,
    /// Augmentation of the training set.
    pub augment: Option<AugmentSection>,
    /// Input corruption.
    #[serde(default)]
    pub noise: NoiseSection,
    /// The network.
    pub model: ModelSection,
    /// Cross-validation stage (DAE).
    pub cv: Option<CvSection>,
    /// Final training stage (DAE).
    #[serde(rename = "final")]
    pub final_stage: Option<FinalSection>,
    /// Classifier fine-tune stage (DAE).
    pub finetune: Option<FinetuneSection>,
    /// Training (WGAN-GP).
    pub train: Option<TrainSection>,
    /// Data-parallel replicas: each trial of the `final`, `finetune` and `train` stages (and a
    /// command sweep's `final`) runs as a gang of this many workers; cross-validation trials stay single.
    pub distributed: Option<DistributedSection>,
    /// The user's program (`[model] kind = "command"`).
    pub command: Option<CommandSection>,
}

/// The most augmented copies `[augment] copies` may append: each is a whole training set more
/// for every trial's worker to hold.
pub const MAX_AUGMENT_COPIES: u32 = 16;

/// The largest latent code (`[model] latent`, and `latent` in `[cv.grid]` or `[cv.random]`).
pub const MAX_LATENT: u32 = 4096;

/// The most characters of one line of the sweep file (or of one line of a message) that an
/// error echoes; past it the line is cut, around the error's column, and the cut marked "…".
/// Errors travel back in a gRPC status, whose header one long line would overflow.
pub const MAX_ECHOED_LINE_CHARS: usize = 200;

/// The default largest number of trials one sweep may expand to (`serve --max-trials`).
pub const DEFAULT_MAX_TRIALS: usize = 10_000;
/// No configuration lets a sweep expand past this.
pub const HARD_MAX_TRIALS: usize = 1_000_000;

/// Reports the first failed check as an error naming the key.
struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn require(&self, ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), SweepError> {
        if ok {
            return Ok(());
        }
        Err(SweepError::Invalid { file: self.file.to_string(), key: key.to_string(), message: cut_long_lines(&message()) })
    }

    fn at_most(&self, value: u32, max: u32, key: &str) -> Result<(), SweepError> {
        self.require(value <= max, key, || format!("{value} must be at most {max}"))
    }

    fn positive(&self, value: f64, key: &str) -> Result<(), SweepError> {
        self.require(value > 0.0 && value.is_finite(), key, || format!("{value} must be a finite number > 0"))
    }

    fn non_negative(&self, value: f64, key: &str) -> Result<(), SweepError> {
        self.require(value >= 0.0 && value.is_finite(), key, || format!("{value} must be a finite number >= 0"))
    }

    fn at_least_one(&self, value: u32, key: &str) -> Result<(), SweepError> {
        self.require(value >= 1, key, || format!("{value} must be at least 1"))
    }
}

impl SweepFile {
    /// Parses and validates a sweep file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SweepError> {
        let sweep: SweepFile = toml::from_str(text).map_err(|e| SweepError::Syntax { file: file.to_string(), message: syntax_message(&e, text) })?;
        sweep.validate(file)?;
        Ok(sweep)
    }

    /// True for the WGAN-GP experiment, false for the autoencoder one.
    pub fn is_gan(&self) -> bool {
        self.model.kind == "wgan-gp"
    }

    /// True for a command sweep (the user's own program, `[command]`).
    pub fn is_command(&self) -> bool {
        self.model.kind == "command"
    }

    /// Whether the file has a `[dataset]` (only a command sweep may go without).
    pub fn has_dataset(&self) -> bool {
        !self.dataset.path.is_empty()
    }

    /// The metric cross-validation minimises: `[command] metric`, else the recipes' `val_mse`.
    pub fn selection_metric(&self) -> &str {
        self.command.as_ref().filter(|_| self.is_command()).map_or("val_mse", |c| c.metric.as_str())
    }

    fn validate(&self, file: &str) -> Result<(), SweepError> {
        let check = Checker { file };
        check.require(!self.name.trim().is_empty(), "name", || "must not be empty".into())?;
        check.require(matches!(self.model.kind.as_str(), "dae" | "wgan-gp" | "command"), "model.kind", || {
            format!("{:?} is not supported (supported: \"dae\", \"wgan-gp\", \"command\")", self.model.kind)
        })?;
        if self.is_command() {
            return match crate::command::problem(self) {
                Some((key, message)) => check.require(false, &key, || message),
                None => Ok(()),
            };
        }
        check.require(self.command.is_none(), "command", || "[command] belongs to model.kind = \"command\"".into())?;
        check.require(self.has_dataset(), "dataset", || "a [dataset] section with format and path is required".into())?;
        if let Some(cv) = &self.cv {
            let named = cv.grid.named.keys().map(|name| ("cv.grid", name)).chain(cv.random.iter().flat_map(|r| r.named.keys().map(|name| ("cv.random", name))));
            for (section, name) in named {
                check.require(false, section, || {
                    format!("unknown field `{name}`, expected one of `lr`, `weight_decay`, `batch_size`, `noise_std`, `latent` (any name is a hyperparameter only for model.kind = \"command\")")
                })?;
            }
        }
        check.require(matches!(self.dataset.format.as_str(), "idx" | "image-folder" | "nifti"), "dataset.format", || {
            format!("{:?} is not supported (supported: \"idx\", \"image-folder\", \"nifti\")", self.dataset.format)
        })?;
        if let Some(augment) = &self.augment {
            check.non_negative(augment.rotate_deg, "augment.rotate_deg")?;
            check.require((0.0..=0.5).contains(&augment.translate), "augment.translate", || format!("{} must be within [0, 0.5]", augment.translate))?;
            check.non_negative(augment.shear_deg, "augment.shear_deg")?;
            check.at_most(augment.copies, MAX_AUGMENT_COPIES, "augment.copies")?;
        }
        if self.is_gan() {
            self.validate_gan(&check)
        } else {
            self.validate_dae(&check)
        }
    }

    fn validate_dae(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        check.require(self.dataset.format == "idx", "dataset.format", || "the autoencoder trains on \"idx\" (28×28) data".into())?;
        check.at_least_one(self.model.latent, "model.latent")?;
        check.at_most(self.model.latent, MAX_LATENT, "model.latent")?;
        check.non_negative(self.noise.std, "noise.std")?;
        check.require(self.train.is_none(), "train", || "[train] belongs to model.kind = \"wgan-gp\"; the autoencoder uses [cv] and [final]".into())?;
        check.require(self.cv.is_some() || self.final_stage.is_some(), "cv", || "an autoencoder sweep needs [cv], [final] or both".into())?;
        check.require(self.finetune.is_none() || self.final_stage.is_some(), "finetune", || "[finetune] starts from [final]'s autoencoder: add [final]".into())?;
        if let Some(cv) = &self.cv {
            check.require(cv.folds >= 2, "cv.folds", || format!("{} must be at least 2", cv.folds))?;
            check.at_least_one(cv.epochs, "cv.epochs")?;
            check.at_least_one(cv.max_attempts, "cv.max_attempts")?;
            if let Some((key, message)) = cv.prune.as_ref().and_then(|prune| prune.problem(cv.folds, cv.epochs)) {
                check.require(false, key, || message)?;
            }
            let grid = &cv.grid;
            let gridded = grid.lr.is_some() || grid.weight_decay.is_some() || grid.batch_size.is_some() || grid.noise_std.is_some() || grid.latent.is_some();
            check.require(!(gridded && cv.random.is_some()), "cv.random", || "use either [cv.grid] or [cv.random], not both".into())?;
            for (key, axis) in [
                ("cv.grid.lr", grid.lr.as_ref().map(Vec::len)),
                ("cv.grid.weight_decay", grid.weight_decay.as_ref().map(Vec::len)),
                ("cv.grid.batch_size", grid.batch_size.as_ref().map(Vec::len)),
                ("cv.grid.noise_std", grid.noise_std.as_ref().map(Vec::len)),
                ("cv.grid.latent", grid.latent.as_ref().map(Vec::len)),
            ] {
                check.require(axis != Some(0), key, || "an empty grid axis leaves nothing to train".into())?;
            }
            if let Some(random) = &cv.random {
                check.require(random.samples >= 1, "cv.random.samples", || "must be at least 1".into())?;
                for (key, result) in [
                    ("cv.random.lr", random.lr.as_ref().map(search::check_axis)),
                    ("cv.random.weight_decay", random.weight_decay.as_ref().map(search::check_axis)),
                    ("cv.random.batch_size", random.batch_size.as_ref().map(search::check_axis)),
                    ("cv.random.noise_std", random.noise_std.as_ref().map(search::check_axis)),
                    ("cv.random.latent", random.latent.as_ref().map(search::check_axis)),
                ] {
                    if let Some(Err(message)) = result {
                        check.require(false, key, || message)?;
                    }
                }
            }
            // Bound the work of planning before expanding anything (the limit proper is checked by
            // `check_trial_limit`, with the coordinator's configured value).
            let axes = [grid.lr.as_ref().map(Vec::len), grid.weight_decay.as_ref().map(Vec::len), grid.batch_size.as_ref().map(Vec::len), grid.noise_std.as_ref().map(Vec::len), grid.latent.as_ref().map(Vec::len)];
            let grid_size = axes.iter().map(|a| a.unwrap_or(1) as u128).product::<u128>();
            let planned = cv.random.as_ref().map_or(grid_size, |r| u128::from(r.samples)) * u128::from(cv.folds);
            check.require(planned <= HARD_MAX_TRIALS as u128, "cv.grid", || format!("expands to {planned} trials, more than the limit of {HARD_MAX_TRIALS}"))?;
            let configs = search::configs(self, cv);
            let axis = if cv.random.is_some() { "cv.random" } else { "cv.grid" };
            for h in &configs {
                check.positive(h.lr, &format!("{axis}.lr"))?;
                check.non_negative(h.weight_decay, &format!("{axis}.weight_decay"))?;
                check.non_negative(h.noise_std, &format!("{axis}.noise_std"))?;
                check.at_least_one(h.batch_size, &format!("{axis}.batch_size"))?;
                check.at_least_one(h.latent, &format!("{axis}.latent"))?;
                check.at_most(h.latent, MAX_LATENT, &format!("{axis}.latent"))?;
            }
        }
        if let Some(stage) = &self.final_stage {
            check.at_least_one(stage.epochs, "final.epochs")?;
            check.at_least_one(stage.max_attempts, "final.max_attempts")?;
            let given = stage.lr.is_some() || stage.weight_decay.is_some() || stage.batch_size.is_some();
            check.require(!(given && self.cv.is_some()), "final", || "lr, weight_decay and batch_size come from the cross-validation winner; set them in [final] only without [cv]".into())?;
            if let Some(lr) = stage.lr {
                check.positive(lr, "final.lr")?;
            }
            if let Some(wd) = stage.weight_decay {
                check.non_negative(wd, "final.weight_decay")?;
            }
            check.require(stage.batch_size != Some(0), "final.batch_size", || "must be at least 1".into())?;
        }
        if let Some(finetune) = &self.finetune {
            check.at_least_one(finetune.epochs, "finetune.epochs")?;
            check.positive(finetune.lr_head, "finetune.lr_head")?;
            check.positive(finetune.lr_encoder, "finetune.lr_encoder")?;
            check.non_negative(finetune.weight_decay, "finetune.weight_decay")?;
            check.at_least_one(finetune.batch_size, "finetune.batch_size")?;
            check.at_least_one(finetune.max_attempts, "finetune.max_attempts")?;
        }
        self.validate_dae_distributed(check)
    }

    /// `[distributed]` of an autoencoder sweep: it applies to `final` and `finetune` (the
    /// cross-validation trials run side by side already), so it needs `[final]`, and every batch
    /// size those stages can get must split evenly over the replicas.
    fn validate_dae_distributed(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        let Some(replicas) = self.validate_distributed(check)? else {
            return Ok(());
        };
        check.require(self.final_stage.is_some(), "distributed", || "data-parallel training applies to [final] and [finetune]: add [final]".into())?;
        // The final training gets the cross-validation winner's batch size: any config's.
        let (key, final_batches): (&str, Vec<u32>) = match &self.cv {
            Some(cv) if cv.random.is_some() => ("cv.random.batch_size", self.cv_configs().iter().map(|h| h.batch_size).collect()),
            Some(_) => ("cv.grid.batch_size", self.cv_configs().iter().map(|h| h.batch_size).collect()),
            None => ("final.batch_size", vec![self.final_stage.as_ref().and_then(|f| f.batch_size).unwrap_or_else(default_batch_size)]),
        };
        for batch in final_batches {
            check.require(batch % replicas == 0, key, || format!("batch size {batch} of the final training must split evenly over {replicas} replicas"))?;
        }
        if let Some(finetune) = &self.finetune {
            check.require(finetune.batch_size % replicas == 0, "finetune.batch_size", || {
                format!("{} must split evenly over {replicas} replicas", finetune.batch_size)
            })?;
        }
        Ok(())
    }

    /// Checks `[distributed]` when present; returns its replica count.
    fn validate_distributed(&self, check: &Checker<'_>) -> Result<Option<u32>, SweepError> {
        let Some(distributed) = &self.distributed else {
            return Ok(None);
        };
        let replicas = distributed.replicas;
        check.require((1..=64).contains(&replicas), "distributed.replicas", || format!("{replicas} must be 1 to 64"))?;
        check.require(matches!(distributed.backend.as_str(), "auto" | "ring" | "nccl"), "distributed.backend", || {
            format!("{:?} is not a backend (auto, ring, nccl)", distributed.backend)
        })?;
        Ok(Some(replicas))
    }

    fn validate_gan(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        check.require(self.dataset.format != "idx", "dataset.format", || "the WGAN-GP trains on \"image-folder\" or \"nifti\" data".into())?;
        let size = self.dataset.image_size;
        check.require(matches!(size, 32 | 64 | 128), "dataset.image_size", || format!("{size} must be 32, 64 or 128"))?;
        let stages = match size {
            32 => 3,
            64 => 4,
            _ => 5,
        };
        check.require(self.model.widths.len() == stages, "model.widths", || {
            format!("{} widths make {}×{} images; image_size {size} needs {stages} (one per stride-2 stage)", self.model.widths.len(), 4 << self.model.widths.len(), 4 << self.model.widths.len())
        })?;
        check.require(!self.model.conditional || self.dataset.format == "image-folder", "model.conditional", || {
            "a conditional WGAN-GP takes its classes from an \"image-folder\" dataset's class folders".into()
        })?;
        check.require((0.0..1.0).contains(&self.dataset.min_foreground), "dataset.min_foreground", || "must be within [0, 1)".into())?;
        for (present, key) in [(self.cv.is_some(), "cv"), (self.final_stage.is_some(), "final"), (self.finetune.is_some(), "finetune")] {
            check.require(!present, key, || format!("[{key}] belongs to model.kind = \"dae\"; the WGAN-GP uses [train]"))?;
        }
        for (index, &width) in self.model.widths.iter().enumerate() {
            check.require((1..=4096).contains(&width), "model.widths", || format!("width {index} is {width}, must be 1 to 4096"))?;
        }
        let Some(train) = &self.train else {
            return check.require(false, "train", || "a WGAN-GP sweep needs [train]".into());
        };
        check.at_least_one(train.epochs, "train.epochs")?;
        check.positive(train.lr, "train.lr")?;
        check.require((0.0..1.0).contains(&train.beta1), "train.beta1", || format!("{} must be within [0, 1)", train.beta1))?;
        check.require((0.0..1.0).contains(&train.beta2), "train.beta2", || format!("{} must be within [0, 1)", train.beta2))?;
        check.require(train.batch_size >= 2, "train.batch_size", || format!("{} must be at least 2", train.batch_size))?;
        check.at_least_one(train.critic_steps, "train.critic_steps")?;
        check.non_negative(train.gp_lambda, "train.gp_lambda")?;
        check.at_least_one(train.sample_count, "train.sample_count")?;
        check.at_least_one(train.max_attempts, "train.max_attempts")?;
        let replicas = self.validate_distributed(check)?.unwrap_or(1);
        check.require(train.batch_size % replicas == 0, "train.batch_size", || {
            format!("{} must split evenly over {replicas} replicas", train.batch_size)
        })
    }

    /// The cross-validation configs (empty without `[cv]`).
    pub fn cv_configs(&self) -> Vec<Hyper> {
        self.cv.as_ref().map(|cv| search::configs(self, cv)).unwrap_or_default()
    }

    /// Checks the sweep's name against the coordinator's limit on names.
    pub fn check_name_limit(&self, file: &str, max_name_bytes: usize) -> Result<(), SweepError> {
        Checker { file }.require(self.name.len() <= max_name_bytes, "name", || format!("{} bytes, more than the limit of {max_name_bytes}", self.name.len()))
    }

    /// Checks the number of trials the sweep's first stage expands to against `max_trials`.
    pub fn check_trial_limit(&self, file: &str, max_trials: usize) -> Result<(), SweepError> {
        let trials = if self.is_command() { crate::command::first_stage_trials(self) } else { self.cv.as_ref().map_or(1, |cv| self.cv_configs().len() * cv.folds as usize) };
        Checker { file }.require(trials <= max_trials, "cv", || format!("expands to {trials} trials, more than the limit of {max_trials}"))
    }

    /// Checks what only the dataset can tell: a batch must fit in the training part of a fold.
    pub fn check_against_dataset(&self, file: &str, train_samples: u64) -> Result<(), SweepError> {
        let usable = match self.dataset.train_limit {
            0 => train_samples,
            limit => limit.min(train_samples),
        };
        let check = Checker { file };
        if let Some(cv) = &self.cv {
            let folds = u64::from(cv.folds);
            let fold_train = usable - usable.div_ceil(folds);
            if let Some(largest) = self.cv_configs().iter().map(|h| h.batch_size).max() {
                check.require(u64::from(largest) <= fold_train, "cv.grid.batch_size", || {
                    format!("batch size {largest} is larger than a fold's {fold_train} training samples")
                })?;
            }
        }
        if let Some(batch) = self.final_stage.as_ref().and_then(|f| f.batch_size) {
            check.require(u64::from(batch) <= usable, "final.batch_size", || format!("batch size {batch} is larger than the {usable} training samples"))?;
        }
        if let Some(finetune) = &self.finetune {
            check.require(u64::from(finetune.batch_size) <= usable, "finetune.batch_size", || {
                format!("batch size {} is larger than the {usable} training samples", finetune.batch_size)
            })?;
        }
        Ok(())
    }
}

/// toml's message for a parse error, with the offending line of `text` and every line of the
/// message cut to [`MAX_ECHOED_LINE_CHARS`]. The line keeps the part around the error's column,
/// so the caret still points at it.
fn syntax_message(error: &toml::de::Error, text: &str) -> String {
    let full = error.to_string();
    if full.lines().all(|line| line.chars().count() <= MAX_ECHOED_LINE_CHARS) {
        return full.trim_end().to_string();
    }
    let Some(start) = error.span().map(|span| span.start.min(text.len())).filter(|&start| text.is_char_boundary(start)) else {
        return cut_long_lines(full.trim_end());
    };
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |newline| start + newline);
    let line_number = text[..line_start].matches('\n').count() + 1;
    let content: Vec<char> = text[line_start..line_end].trim_end_matches('\r').chars().collect();
    let column = text[line_start..start].chars().count();

    // A window of the line around the column, marked "…" where it was cut.
    let window_start = column.saturating_sub(MAX_ECHOED_LINE_CHARS / 2).min(content.len().saturating_sub(MAX_ECHOED_LINE_CHARS));
    let window_end = (window_start + MAX_ECHOED_LINE_CHARS).min(content.len());
    let mut shown = String::new();
    if window_start > 0 {
        shown.push('…');
    }
    shown.extend(&content[window_start..window_end]);
    if window_end < content.len() {
        shown.push('…');
    }
    let caret = column - window_start + usize::from(window_start > 0);

    let gutter = " ".repeat(line_number.to_string().len() + 1);
    let mut message = format!(
        "TOML parse error at line {line_number}, column {}\n{gutter}|\n{line_number} | {shown}\n{gutter}|{}^\n",
        column + 1,
        " ".repeat(caret + 1)
    );
    message.push_str(&cut_long_lines(error.message().trim_end()));
    message
}

/// `text` with every line longer than [`MAX_ECHOED_LINE_CHARS`] cut there and marked "…".
fn cut_long_lines(text: &str) -> String {
    if text.lines().all(|line| line.chars().count() <= MAX_ECHOED_LINE_CHARS) {
        return text.to_string();
    }
    let cut: Vec<String> = text
        .lines()
        .map(|line| match line.char_indices().nth(MAX_ECHOED_LINE_CHARS) {
            Some((end, _)) => format!("{}…", &line[..end]),
            None => line.to_string(),
        })
        .collect();
    cut.join("\n")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The seed's grid over 4 folds (shared with the planner's tests).
    pub(crate) const GOOD: &str = r#"
name = "t"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 4
epochs = 2
[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [256, 512]
"#;

    fn error_of(text: &str) -> String {
        SweepFile::parse(text, "s.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_seed_grid() {
        let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
        let configs = sweep.cv_configs();
        assert_eq!(configs.len(), 8);
        assert_eq!((configs[0].lr, configs[0].batch_size), (1e-3, 256));
        assert_eq!((configs[7].lr, configs[7].weight_decay, configs[7].batch_size), (1e-4, 1e-6, 512));
        assert_eq!(sweep.noise.std, 0.3);
        assert_eq!(sweep.model.latent, 4);
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let err = error_of(&GOOD.replace("epochs = 2", "epochs = 2\nepoch = 3"));
        assert!(err.starts_with("s.toml: "), "{err}");
        assert!(err.contains("line 11, column 1"), "{err}");
        assert!(err.contains("unknown field `epoch`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = error_of(&GOOD.replace("folds = 4", "folds = \"four\""));
        assert!(err.contains("line 9") && err.contains("folds"), "{err}");
    }

    #[test]
    fn range_errors_name_the_key() {
        assert!(error_of(&GOOD.replace("folds = 4", "folds = 1")).contains("cv.folds: 1 must be at least 2"));
        assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = []")).contains("cv.grid.lr: an empty grid axis"));
        assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = [-1.0]")).contains("cv.grid.lr: -1 must be"));
        assert!(error_of(&GOOD.replace("[cv.grid]", "[cv.random]\nsamples = 3\n[cv.grid]")).contains("either [cv.grid] or [cv.random]"));
        assert!(error_of(&GOOD.replace("[cv.grid]\n", "[cv.random]\nsamples = 3\nlr = { min = 1.0, max = 0.1 }\n[cv.grid.unused]\n")).contains("unknown field"));
        assert!(error_of(&GOOD.replace("kind = \"dae\"", "kind = \"vae\"")).contains("model.kind"));
        assert!(error_of(&GOOD.replace("folds = 4", "folds = 400000")).contains("more than the limit of 1000000"));
        let big = SweepFile::parse(&GOOD.replace("folds = 4", "folds = 4000"), "s.toml").unwrap();
        assert!(big.check_trial_limit("s.toml", 10_000).unwrap_err().to_string().contains("expands to 32000 trials, more than the limit of 10000"));
        big.check_trial_limit("s.toml", 50_000).unwrap();
    }

    /// The seed's whole first experiment.
    pub(crate) const SEED: &str = r#"
name = "seed"
seed = 7
[dataset]
format = "idx"
path = "data"
[augment]
copies = 1
[model]
kind = "dae"
[cv]
folds = 4
epochs = 20
[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [256, 512]
[final]
epochs = 40
[finetune]
epochs = 10
"#;

    /// The seed's second experiment.
    pub(crate) const GAN: &str = r#"
name = "gan"
[dataset]
format = "nifti"
path = "mri"
[model]
kind = "wgan-gp"
[train]
epochs = 80
"#;

    #[test]
    fn parses_the_whole_seed_pipeline_with_its_defaults() {
        let sweep = SweepFile::parse(SEED, "s.toml").unwrap();
        let augment = sweep.augment.unwrap();
        assert_eq!((augment.rotate_deg, augment.translate, augment.shear_deg), (15.0, 0.1, 10.0));
        let finetune = sweep.finetune.unwrap();
        assert_eq!((finetune.lr_head, finetune.lr_encoder, finetune.weight_decay, finetune.batch_size), (1e-3, 1e-4, 1e-5, 256));
        assert_eq!(sweep.final_stage.unwrap().epochs, 40);
    }

    #[test]
    fn parses_the_gan_with_the_seed_recipe() {
        let sweep = SweepFile::parse(GAN, "g.toml").unwrap();
        assert!(sweep.is_gan());
        let train = sweep.train.unwrap();
        assert_eq!((train.lr, train.beta1, train.beta2, train.critic_steps, train.gp_lambda), (1e-4, 0.0, 0.9, 5, 10.0));
        assert_eq!(sweep.model.widths, [1024, 512, 256, 128]);
        assert_eq!(sweep.dataset.image_size, 64);
    }

    #[test]
    fn gan_image_sizes_set_the_stages_and_conditional_needs_classes() {
        let sized = |size: u32, widths: &str| GAN.replace("path = \"mri\"", &format!("path = \"mri\"\nimage_size = {size}")).replace("kind = \"wgan-gp\"", &format!("kind = \"wgan-gp\"\nwidths = {widths}"));
        for (size, widths) in [(32, "[64, 32, 16]"), (64, "[64, 32, 16, 8]"), (128, "[64, 32, 16, 8, 8]")] {
            let sweep = SweepFile::parse(&sized(size, widths), "g").unwrap();
            assert_eq!(sweep.model.widths.len(), match size { 32 => 3, 64 => 4, _ => 5 });
            assert_eq!(sweep.train.unwrap().eval_every, 10);
        }
        let err = SweepFile::parse(&sized(128, "[64, 32, 16, 8]"), "g").unwrap_err().to_string();
        assert!(err.contains("model.widths: 4 widths make 64×64 images; image_size 128 needs 5"), "{err}");
        let err = SweepFile::parse(&sized(96, "[64, 32, 16, 8]"), "g").unwrap_err().to_string();
        assert!(err.contains("dataset.image_size: 96 must be 32, 64 or 128"), "{err}");
        let err = SweepFile::parse(&GAN.replace("kind = \"wgan-gp\"", "kind = \"wgan-gp\"\nconditional = true"), "g").unwrap_err().to_string();
        assert!(err.contains("model.conditional: a conditional WGAN-GP takes its classes from an \"image-folder\""), "{err}");
        let folder = GAN.replace("format = \"nifti\"", "format = \"image-folder\"").replace("kind = \"wgan-gp\"", "kind = \"wgan-gp\"\nconditional = true");
        assert!(SweepFile::parse(&folder, "g").unwrap().model.conditional);
    }

    #[test]
    fn stages_must_fit_the_model() {
        let err = SweepFile::parse(&GAN.replace("[train]", "[cv]\nfolds = 2\nepochs = 1\n[train]"), "g").unwrap_err().to_string();
        assert!(err.contains("g: cv: [cv] belongs to model.kind = \"dae\""), "{err}");
        let err = SweepFile::parse(&SEED.replace("[final]\nepochs = 40", ""), "s").unwrap_err().to_string();
        assert!(err.contains("finetune: [finetune] starts from [final]"), "{err}");
        let err = SweepFile::parse(&SEED.replace("epochs = 40", "epochs = 40\nlr = 0.1"), "s").unwrap_err().to_string();
        assert!(err.contains("final: lr, weight_decay and batch_size come from the cross-validation winner"), "{err}");
        let err = SweepFile::parse(&format!("{GAN}[distributed]\nreplicas = 100\n"), "g").unwrap_err().to_string();
        assert!(err.contains("distributed.replicas: 100 must be 1 to 64"), "{err}");
        let err = SweepFile::parse(&format!("{}[distributed]\nreplicas = 3\n", GAN.replace("epochs = 80", "epochs = 80\nbatch_size = 64")), "g").unwrap_err().to_string();
        assert!(err.contains("train.batch_size: 64 must split evenly over 3 replicas"), "{err}");
        let err = SweepFile::parse(&format!("{GAN}[distributed]\nbackend = \"mpi\"\n"), "g").unwrap_err().to_string();
        assert!(err.contains("distributed.backend: \"mpi\" is not a backend"), "{err}");
        let err = SweepFile::parse(&GAN.replace("[train]", "[train]\nbeta2 = 1.0"), "g").unwrap_err().to_string();
        assert!(err.contains("train.beta2: 1 must be within [0, 1)"), "{err}");
        let err = SweepFile::parse(&GAN.replace("format = \"nifti\"", "format = \"idx\""), "g").unwrap_err().to_string();
        assert!(err.contains("dataset.format"), "{err}");
    }

    #[test]
    fn an_autoencoder_trains_final_and_finetune_data_parallel() {
        let sweep = SweepFile::parse(&format!("{SEED}[distributed]\nreplicas = 2\n"), "s").unwrap();
        assert_eq!(sweep.distributed.map(|d| (d.replicas, d.backend)), Some((2, "auto".to_string())));
        let without_final = SEED.replace("[final]\nepochs = 40\n[finetune]\nepochs = 10\n", "");
        let err = SweepFile::parse(&format!("{without_final}[distributed]\nreplicas = 2\n"), "s").unwrap_err().to_string();
        assert!(err.contains("distributed: data-parallel training applies to [final] and [finetune]: add [final]"), "{err}");
        let err = SweepFile::parse(&format!("{SEED}[distributed]\nreplicas = 3\n"), "s").unwrap_err().to_string();
        assert!(err.contains("cv.grid.batch_size: batch size 256 of the final training must split evenly over 3 replicas"), "{err}");
        let err = SweepFile::parse(&format!("{}[distributed]\nreplicas = 2\n", SEED.replace("[finetune]\n", "[finetune]\nbatch_size = 33\n")), "s").unwrap_err().to_string();
        assert!(err.contains("finetune.batch_size: 33 must split evenly over 2 replicas"), "{err}");
        let random = SEED.replace("[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]", "[cv.random]\nsamples = 8\nbatch_size = { values = [64, 96] }");
        let err = SweepFile::parse(&format!("{random}[distributed]\nreplicas = 64\n"), "s").unwrap_err().to_string();
        assert!(err.contains("cv.random.batch_size: batch size 96 of the final training must split evenly over 64 replicas"), "{err}");
        let final_only = SEED.replace("[cv]\nfolds = 4\nepochs = 20\n[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]\n", "");
        assert!(SweepFile::parse(&format!("{final_only}[distributed]\nreplicas = 4\n"), "s").is_ok(), "the default batch size 256 splits over 4");
        let err = SweepFile::parse(&format!("{}[distributed]\nreplicas = 4\n", final_only.replace("epochs = 40", "epochs = 40\nbatch_size = 30")), "s").unwrap_err().to_string();
        assert!(err.contains("final.batch_size: batch size 30 of the final training must split evenly over 4 replicas"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// Hostile input: any text parses or fails with an error naming the file; never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(error) = SweepFile::parse(&text, "fuzz.toml") {
                proptest::prop_assert!(error.to_string().starts_with("fuzz.toml: "));
            }
        }

        /// Valid files with a line replaced by a random key/value pair: parse or fail cleanly.
        #[test]
        fn edited_sweeps_never_panic(line in 0usize..40, key in "[a-z_.]{1,12}", value in "[-0-9a-z.\\[\\], \"]{0,16}") {
            let mut lines: Vec<String> = SEED.lines().map(str::to_string).collect();
            let index = line % lines.len();
            lines[index] = format!("{key} = {value}");
            let _ = SweepFile::parse(&lines.join("\n"), "fuzz.toml");
        }
    }

    #[test]
    fn a_long_offending_line_is_cut_around_the_error() {
        // 200 KB on the line of the error: the message keeps 200 characters of it, about the column.
        let padding = "x".repeat(100_000);
        let text = GOOD.replace("epochs = 2", &format!("epochs = 2\nnote = \"{padding}\" oops {padding}"));
        let err = error_of(&text);
        assert!(err.len() < 1000, "{} bytes: {}", err.len(), &err[..1000.min(err.len())]);
        assert!(err.starts_with("s.toml: TOML parse error at line 11, column 100011"), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        let shown = lines[2].strip_prefix("11 | ").unwrap();
        assert!(shown.starts_with('…') && shown.ends_with('…'), "{err}");
        assert_eq!(shown.chars().count(), MAX_ECHOED_LINE_CHARS + 2, "{err}");
        let caret = lines[3].chars().position(|c| c == '^').unwrap();
        assert_eq!(lines[2].chars().nth(caret), Some('o'), "the caret still points at the error: {err}");

        // A long value echoed in the message itself is cut too.
        let err = error_of(&GOOD.replace("folds = 4", &format!("folds = \"{padding}\"")));
        assert!(err.len() < 1000, "{} bytes", err.len());
        assert!(err.contains("line 9") && err.contains('…'), "{err}");

        // Short lines are echoed as toml writes them.
        let err = error_of(&GOOD.replace("epochs = 2", "epochs = 2 oops"));
        assert!(!err.contains('…') && err.contains("10 | epochs = 2 oops"), "{err}");
        let err = error_of(&GOOD.replace("kind = \"dae\"", &format!("kind = \"{padding}\"")));
        assert!(err.len() < 1000 && err.contains("model.kind: \"xxx"), "{} bytes", err.len());
    }

    #[test]
    fn augmented_copies_and_latent_sizes_are_bounded() {
        SweepFile::parse(&SEED.replace("copies = 1", "copies = 16"), "s").unwrap();
        let err = SweepFile::parse(&SEED.replace("copies = 1", "copies = 17"), "s").unwrap_err().to_string();
        assert!(err.contains("s: augment.copies: 17 must be at most 16"), "{err}");
        SweepFile::parse(&SEED.replace("kind = \"dae\"", "kind = \"dae\"\nlatent = 4096"), "s").unwrap();
        let err = SweepFile::parse(&SEED.replace("kind = \"dae\"", "kind = \"dae\"\nlatent = 4097"), "s").unwrap_err().to_string();
        assert!(err.contains("s: model.latent: 4097 must be at most 4096"), "{err}");
        let err = error_of(&GOOD.replace("batch_size = [256, 512]", "batch_size = [256, 512]\nlatent = [8, 100000]"));
        assert!(err.contains("cv.grid.latent: 100000 must be at most 4096"), "{err}");
        let random = GOOD.replace("[cv.grid]\nlr = [1e-3, 1e-4]\nweight_decay = [1e-5, 1e-6]\nbatch_size = [256, 512]", "[cv.random]\nsamples = 4\nlatent = { min = 5000, max = 6000 }");
        let err = error_of(&random);
        assert!(err.contains("cv.random.latent: ") && err.contains("must be at most 4096"), "{err}");
    }

    #[test]
    fn batch_larger_than_a_fold_is_refused() {
        let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
        let err = sweep.check_against_dataset("s.toml", 600).unwrap_err().to_string();
        assert!(err.contains("batch size 512 is larger than a fold's 450 training samples"), "{err}");
        sweep.check_against_dataset("s.toml", 8000).unwrap();
    }
}
