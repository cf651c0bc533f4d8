//! The coordinator's own types for what it plans, stores and schedules. Protocol types are
//! converted to and from these in [`crate::convert`] and nowhere else.

use serde::{Deserialize, Serialize};

/// A content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Which training a trial runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrialKind {
    /// DAE on k−1 folds, validated on the held-out fold.
    DaeFold,
    /// DAE on the whole training set, tested each epoch.
    DaeFinal,
    /// Classifier fine-tuned from the final DAE's encoder.
    Classifier,
    /// WGAN-GP.
    Wgan,
    /// The user's own program (`[command]`, see docs/commands.md).
    Command,
}

impl TrialKind {
    /// The name used in files and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            TrialKind::DaeFold => "dae-fold",
            TrialKind::DaeFinal => "dae-final",
            TrialKind::Classifier => "classifier",
            TrialKind::Wgan => "wgan",
            TrialKind::Command => "command",
        }
    }
}

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

/// The WGAN-GP recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WganSpec {
    /// Generator hidden widths, widest first (one per stride-2 stage).
    pub widths: Vec<u32>,
    /// Critic steps per generator step.
    pub critic_steps: u32,
    /// Gradient penalty weight.
    pub gp_lambda: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Sample grid period (0: only first and last epoch).
    pub sample_every: u32,
    /// Images per sample grid.
    pub sample_count: u32,
    /// Class-conditional generator and critic.
    #[serde(default)]
    pub conditional: bool,
    /// Sliced Wasserstein distance to the test set every this many epochs (0: never).
    #[serde(default)]
    pub eval_every: u32,
}

/// A trial's hyperparameters and recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Learning rate.
    pub lr: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Epochs.
    pub epochs: u32,
    /// Input noise standard deviation.
    pub noise_std: f64,
    /// Latent size.
    pub latent: u32,
    /// Initialisation / shuffling / noise seed.
    pub seed: u64,
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

/// A dataset as stored blobs (empty: a command sweep without `[dataset]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DatasetSpec {
    /// Format name (`idx`).
    pub format: String,
    /// File name → blob.
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
    /// The validating part.
    pub index: u32,
    /// Seed of the permutation the folds are cut from.
    pub shuffle_seed: u64,
}

/// Everything needed to run one trial, as planned from a sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialSpec {
    /// Stage of the sweep (`cv`).
    pub stage: String,
    /// Unique within the sweep, e.g. `cv/c3/f1`.
    pub name: String,
    /// Identifies the hyperparameter config (trials of the same config differ only in fold).
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
    /// The gang's collective backend: `auto`, `ring` or `nccl`.
    #[serde(default)]
    pub collective_backend: String,
    /// The program of a command trial ([`TrialKind::Command`]).
    #[serde(default)]
    pub command: Option<CommandSpec>,
}

fn one() -> u32 {
    1
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for a worker.
    Queued,
    /// Leased to a worker.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled by the user.
    Cancelled,
    /// Stopped early by `[cv.prune]`: its config cannot win (see [`crate::prune`]).
    Pruned,
}

impl TaskState {
    /// The name stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Pruned => "pruned",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [TaskState::Queued, TaskState::Running, TaskState::Succeeded, TaskState::Failed, TaskState::Cancelled, TaskState::Pruned]
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// True once the task will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Pruned)
    }
}

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The trial itself is wrong: fail at once.
    User,
    /// The machine or process failed: retry.
    Infrastructure,
}
