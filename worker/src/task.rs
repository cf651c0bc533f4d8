//! The worker's view of a task, converted from the protocol once, at the edge.

use cohort_proto::v1 as pb;

/// A content-addressed blob: its SHA-256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Which kind of training a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialKind {
    /// DAE on k−1 folds, validated on the held-out fold every epoch.
    DaeFold,
    /// DAE on the whole training set, tested every epoch.
    DaeFinal,
    /// Classifier fine-tuned from a DAE's encoder.
    Classifier,
    /// WGAN-GP, one replica.
    Wgan,
    /// The user's own program (see [`crate::command`] and docs/commands.md).
    Command,
}

/// A command trial's program.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    /// argv, run without a shell.
    pub run: Vec<String>,
    /// The files unpacked as its working directory: relative name → blob.
    pub files: Vec<(String, BlobRef)>,
    /// The metric cross-validation minimises.
    pub metric: String,
    /// Per-attempt limit (`None`: none).
    pub timeout: Option<std::time::Duration>,
    /// The trial's hyperparameters, a JSON object (`COHORT_HPARAMS`).
    pub hparams_json: String,
}

/// Seed §1.1: an augmented copy of the training set.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// How many augmented copies to append.
    pub copies: u32,
    /// Rotation range, ± degrees.
    pub rotate_deg: f64,
    /// Translation range, ± fraction of the side.
    pub translate: f64,
    /// Shear range, ± degrees.
    pub shear_deg: f64,
    /// Seeds the random transforms.
    pub seed: u64,
}

/// The WGAN-GP recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct WganConfig {
    /// Generator hidden widths, widest first: one per stride-2 stage (3 for 32×32 images, 4 for
    /// 64×64, 5 for 128×128).
    pub widths: Vec<i64>,
    /// Critic steps per generator step.
    pub critic_steps: u32,
    /// Gradient penalty weight λ.
    pub gp_lambda: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Sample grid period in epochs (0: only at the end).
    pub sample_every: u32,
    /// Images in a sample grid.
    pub sample_count: u32,
    /// Class-conditional generator and projection critic (classes from the image folder).
    pub conditional: bool,
    /// Sliced Wasserstein distance to the test set every this many epochs (0: never).
    pub eval_every: u32,
}

/// The hyperparameters and recipe of a trial.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingConfig {
    /// Learning rate.
    pub lr: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Epochs to train.
    pub epochs: u32,
    /// Standard deviation of the Gaussian noise added to each input batch.
    pub noise_std: f64,
    /// Size of the latent code.
    pub latent: i64,
    /// Seeds initialisation, shuffling and noise.
    pub seed: u64,
    /// The classifier encoder's learning rate (`lr` is the head's).
    pub lr_encoder: f64,
    /// Augmentation of the training set, if any.
    pub augment: Option<Augment>,
    /// The WGAN-GP recipe (wgan trials).
    pub wgan: Option<WganConfig>,
}

/// A dataset: its format and files (name the loader expects → blob).
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// "idx".
    pub format: String,
    /// Files by name.
    pub files: Vec<(String, BlobRef)>,
    /// At most this many training samples (0: all).
    pub train_limit: usize,
    /// At most this many test samples (0: all).
    pub test_limit: usize,
    /// Side of the square images (image-folder, nifti).
    pub image_size: i64,
    /// nifti: minimum bright fraction of a kept slice.
    pub min_foreground: f64,
}

/// One fold of k-fold cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fold {
    /// k.
    pub folds: usize,
    /// Which part validates, `0..folds`.
    pub index: usize,
    /// Seeds the permutation the folds are cut from.
    pub shuffle_seed: u64,
}

/// A unit of work handed to this worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Coordinator-wide task id.
    pub id: String,
    /// Which attempt this is (1 for the first).
    pub attempt: u32,
    /// Human-readable trial name, for logs.
    pub trial_name: String,
    /// What to run.
    pub kind: TrialKind,
    /// Hyperparameters.
    pub config: TrainingConfig,
    /// Data.
    pub dataset: DatasetSpec,
    /// The fold, for cross-validation trials.
    pub fold: Option<Fold>,
    /// Resume from this checkpoint when set.
    pub resume_from: Option<BlobRef>,
    /// Initialise weights from this checkpoint (the classifier's pretrained encoder).
    pub init_from: Option<BlobRef>,
    /// Upload a checkpoint every this many epochs (0: only at the end).
    pub checkpoint_every: u32,
    /// This worker's rank in the gang (0 for a plain task).
    pub rank: u32,
    /// Replicas in the gang (1 for a plain task).
    pub world: u32,
    /// Collective backend: `auto`, `ring` or `nccl`.
    pub collective_backend: String,
    /// The program of a command trial.
    pub command: Option<CommandSpec>,
}

/// A task the coordinator sent that this worker cannot interpret.
#[derive(Debug, thiserror::Error)]
#[error("malformed task {task_id}: {message}")]
pub struct MalformedTask {
    /// The task.
    pub task_id: String,
    /// What is wrong.
    pub message: String,
}

fn blob_ref(blob: Option<pb::BlobRef>) -> Option<BlobRef> {
    blob.filter(|b| !b.sha256.is_empty()).map(|b| BlobRef { sha256: b.sha256, size: b.size })
}

impl TryFrom<pb::TaskSpec> for Task {
    type Error = MalformedTask;

    fn try_from(spec: pb::TaskSpec) -> Result<Self, Self::Error> {
        let malformed = |message: &str| MalformedTask { task_id: spec.task_id.clone(), message: message.to_string() };
        let kind = match spec.kind() {
            pb::TrialKind::DaeFold => TrialKind::DaeFold,
            pb::TrialKind::DaeFinal => TrialKind::DaeFinal,
            pb::TrialKind::Classifier => TrialKind::Classifier,
            pb::TrialKind::Wgan => TrialKind::Wgan,
            pb::TrialKind::Command => TrialKind::Command,
            pb::TrialKind::Unspecified => return Err(malformed("unknown trial kind")),
        };
        let config = spec.config.as_ref().ok_or_else(|| malformed("no training config"))?;
        let dataset = spec.dataset.as_ref().ok_or_else(|| malformed("no dataset"))?;
        let mut files = Vec::with_capacity(dataset.files.len());
        for file in &dataset.files {
            let blob = blob_ref(file.blob.clone()).ok_or_else(|| malformed("dataset file without blob"))?;
            files.push((file.name.clone(), blob));
        }
        let fold = spec.fold.as_ref().filter(|f| f.folds > 0).map(|f| Fold {
            folds: f.folds as usize,
            index: f.index as usize,
            shuffle_seed: f.shuffle_seed,
        });
        if kind == TrialKind::DaeFold && fold.is_none() {
            return Err(malformed("a dae-fold trial needs a fold"));
        }
        if spec.world_size > 1 && spec.rank >= spec.world_size {
            return Err(malformed("rank outside the gang"));
        }
        let command = match (&spec.command, kind) {
            (Some(c), TrialKind::Command) => {
                let mut files = Vec::with_capacity(c.files.len());
                for file in &c.files {
                    let blob = blob_ref(file.blob.clone()).ok_or_else(|| malformed("command file without blob"))?;
                    files.push((file.name.clone(), blob));
                }
                if c.run.is_empty() {
                    return Err(malformed("a command trial needs a program to run"));
                }
                let timeout = (c.timeout_minutes > 0).then(|| std::time::Duration::from_secs(u64::from(c.timeout_minutes) * 60));
                Some(CommandSpec { run: c.run.clone(), files, metric: c.metric.clone(), timeout, hparams_json: c.hparams_json.clone() })
            }
            (None, TrialKind::Command) => return Err(malformed("a command trial needs its program")),
            _ => None,
        };
        let init_from = blob_ref(spec.init_from.clone());
        if kind == TrialKind::Classifier && init_from.is_none() {
            return Err(malformed("a classifier trial needs a pretrained autoencoder (init_from)"));
        }
        let augment = config.augment.as_ref().filter(|a| a.copies > 0).map(|a| Augment {
            copies: a.copies,
            rotate_deg: a.rotate_deg,
            translate: a.translate,
            shear_deg: a.shear_deg,
            seed: a.seed,
        });
        let wgan = match (&config.wgan, kind) {
            (Some(w), _) => {
                let widths: Vec<i64> = w.widths.iter().map(|&v| i64::from(v)).collect();
                if !(1..=8).contains(&widths.len()) {
                    return Err(malformed("a wgan needs 1 to 8 widths"));
                }
                Some(WganConfig {
                    widths,
                    critic_steps: w.critic_steps,
                    gp_lambda: w.gp_lambda,
                    beta1: w.beta1,
                    beta2: w.beta2,
                    sample_every: w.sample_every,
                    sample_count: w.sample_count,
                    conditional: w.conditional,
                    eval_every: w.eval_every,
                })
            }
            (None, TrialKind::Wgan) => return Err(malformed("a wgan trial needs its recipe")),
            (None, _) => None,
        };
        Ok(Task {
            id: spec.task_id.clone(),
            attempt: spec.attempt,
            trial_name: spec.trial_name.clone(),
            kind,
            config: TrainingConfig {
                lr: config.lr,
                weight_decay: config.weight_decay,
                batch_size: config.batch_size as usize,
                epochs: config.epochs,
                noise_std: config.noise_std,
                latent: i64::from(config.latent),
                seed: config.seed,
                lr_encoder: config.lr_encoder,
                augment,
                wgan,
            },
            dataset: DatasetSpec {
                format: dataset.format.clone(),
                files,
                train_limit: dataset.train_limit as usize,
                test_limit: dataset.test_limit as usize,
                image_size: i64::from(dataset.image_size),
                min_foreground: dataset.min_foreground,
            },
            fold,
            resume_from: blob_ref(spec.resume_from.clone()),
            init_from,
            checkpoint_every: spec.checkpoint_every,
            rank: spec.rank,
            world: spec.world_size.max(1),
            collective_backend: spec.collective_backend.clone(),
            command,
        })
    }
}
