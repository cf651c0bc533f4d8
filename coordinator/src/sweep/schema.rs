//! The sweep file's schema: one struct per TOML table, as serde reads it (unknown keys are
//! refused), with the defaults of what may be left out. The checks of the values are in
//! `check.rs`; the search over `[cv.grid]` and `[cv.random]` is [`crate::sweep::search`].

use serde::{Deserialize, Serialize};

use crate::domain::{AugmentSpec, CollectiveBackend, DatasetFormat, InitPolicy, TrainingConfig};
use crate::prune::PruneSection;

/// `[dataset]`: where the data is and how to read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// `"idx"` (MNIST layout), `"image-folder"` or `"nifti"` (a command sweep also `"files"`),
    /// as written; [`DatasetSection::format`] is the checked, typed value.
    #[serde(rename = "format")]
    pub format_name: String,
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
            format_name: String::new(),
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
    /// Where each trial's weights start: `"shared"` (every trial from the sweep's seed, the
    /// default) or `"per-trial"` (each its own, so the spread over folds includes the
    /// initialisation's).
    #[serde(default)]
    pub init: InitPolicy,
}

/// `[cv.grid]`: the values each searched hyperparameter takes; every combination is a config.
/// Names besides the typed ones land in `named`: a command sweep's hyperparameters (see
/// [`crate::command`]); a built-in recipe refuses them as unknown fields.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
pub struct GridSection {
    /// Learning rates.
    pub lr: Option<Vec<f64>>,
    /// L2 weight decays.
    pub weight_decay: Option<Vec<f64>>,
    /// Mini-batch sizes.
    pub batch_size: Option<Vec<u32>>,
    /// Noise standard deviations.
    pub noise_std: Option<Vec<f64>>,
    /// Latent sizes.
    pub latent: Option<Vec<u32>>,
    /// Any other name (command sweeps).
    #[serde(flatten)]
    pub named: std::collections::BTreeMap<String, toml::Value>,
}

/// How a random search draws one hyperparameter: from listed values, or from a range.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Axis<T> {
    /// Uniformly among these values.
    Values {
        /// The values.
        values: Vec<T>,
    },
    /// Uniformly (or log-uniformly) in `[min, max]`.
    Range {
        /// Lower bound.
        min: T,
        /// Upper bound.
        max: T,
        /// Draw the logarithm uniformly (for learning rates and decays).
        #[serde(default)]
        log: bool,
    },
}

/// `[cv.random]`: `samples` configs drawn at random (seeded by the sweep's `seed`). Names
/// besides the typed ones land in `named` (command sweeps; refused by the built-in recipes).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct RandomSection {
    /// Configs to draw.
    pub samples: u32,
    /// Learning rate.
    pub lr: Option<Axis<f64>>,
    /// Weight decay.
    pub weight_decay: Option<Axis<f64>>,
    /// Batch size.
    pub batch_size: Option<Axis<u32>>,
    /// Noise standard deviation.
    pub noise_std: Option<Axis<f64>>,
    /// Latent size.
    pub latent: Option<Axis<u32>>,
    /// Any other name (command sweeps).
    #[serde(flatten)]
    pub named: std::collections::BTreeMap<String, toml::Value>,
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
    /// Conditional GANs on digit classes: the SHA-256 of a classifier checkpoint in the
    /// coordinator's blob store (the `finetune` trial of an autoencoder sweep), which reports the
    /// class accuracy of the generated samples at every evaluation.
    #[serde(default)]
    pub judge: Option<String>,
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

impl DatasetSection {
    /// The format, typed (its name was checked when the file was; an unchecked name reads as
    /// [`DatasetFormat::None`]).
    pub fn format(&self) -> DatasetFormat {
        DatasetFormat::parse(&self.format_name).unwrap_or_default()
    }
}

impl SweepFile {
    /// What every trial's config starts from: the seed, `[augment]`, `[noise] std` and
    /// `[model] latent`; each stage sets its own hyperparameters on top.
    pub fn training_base(&self) -> TrainingConfig {
        let augment = self.augment.as_ref().map(|a| AugmentSpec {
            copies: a.copies,
            rotate_deg: a.rotate_deg,
            translate: a.translate,
            shear_deg: a.shear_deg,
            seed: self.seed,
        });
        TrainingConfig { noise_std: self.noise.std, latent: self.model.latent, seed: self.seed, augment, ..TrainingConfig::default() }
    }
}

fn default_files() -> String {
    ".".into()
}

/// `[distributed]`: data-parallel replicas of one training, for every trial kind that trains as
/// a gang: the autoencoder's `final` and `finetune`, the WGAN-GP's `train`, and a command sweep's
/// `final`. Cross-validation trials always run single.
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

impl DistributedSection {
    /// The backend, typed (the name was checked when the file was).
    pub fn backend(&self) -> CollectiveBackend {
        CollectiveBackend::parse(&self.backend).expect("checked by SweepFile::parse")
    }
}

fn default_lr() -> f64 {
    1e-3
}
/// `[cv] batch_size` and `[final] batch_size` when left out.
pub(super) fn default_batch_size() -> u32 {
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
