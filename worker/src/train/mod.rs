//! Training recipes. They run on a dedicated thread and talk to the daemon through [`Events`].
//!
//! Every recipe draws its randomness per epoch from seeds derived from (trial seed, epoch), so
//! a trial resumed from the checkpoint of epoch k continues exactly as if it had never stopped.

pub mod classifier;
pub mod dae;
pub mod data_parallel;
pub mod wgan;
pub mod wgan_eval;
pub mod wgan_judge;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use tch::{nn, Device, Tensor};

use crate::checkpoint::{self, CheckpointError};
use crate::collective::Communicator;
use crate::data::augment::{augmented_copy, AugmentRanges};
use crate::data::cache::TensorCache;
use crate::data::{self, DataError, ImageSet, TrainTest};
use crate::metrics::{Phase, PhaseGuard};
use crate::optim::Adam;
use crate::task::{AugmentSpec, DatasetFormat, DatasetSpec, FoldSpec, Task, TrialKind};
use data_parallel::Shard;

/// One epoch's figures, as the recipe reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Named scalars, e.g. `train_mse`, `val_mse`.
    pub values: Vec<(String, f64)>,
    /// Wall time of the epoch (training and evaluation).
    pub seconds: f64,
    /// Training samples processed in the epoch.
    pub samples: u64,
}

/// What a running recipe tells the outside world.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// An epoch finished.
    Epoch(EpochReport),
    /// A checkpoint file was written (the receiver uploads, then moves or deletes it).
    Checkpoint {
        /// Last finished epoch in it.
        epoch: u32,
        /// Where it lies.
        path: PathBuf,
        /// The trial's last checkpoint.
        is_final: bool,
    },
    /// An artifact file (safetensors) was written: latent codes, samples, reconstructions.
    Artifact {
        /// Unique within the trial, e.g. `latents`, `samples-e10`.
        name: String,
        /// Epoch it belongs to.
        epoch: u32,
        /// Where it lies.
        path: PathBuf,
    },
}

/// Why a recipe stopped without finishing.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset could not be loaded (user error).
    #[error(transparent)]
    Data(#[from] DataError),
    /// The loss stopped being a finite number (user error: usually the learning rate).
    #[error("loss diverged at epoch {epoch}: {what} = {value}")]
    Diverged {
        /// Epoch where it happened.
        epoch: u32,
        /// Which figure.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// The task asks for something that cannot be trained (user error).
    #[error("invalid trial: {0}")]
    Invalid(String),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective with the other replicas failed (infrastructure: the gang restarts).
    #[error("collective: {0}")]
    Collective(String),
    /// The daemon asked the recipe to stop (cancel, lease lost, shutdown).
    #[error("stopped on request")]
    Stopped,
    /// A command trial's program failed on its own: a non-zero exit, a malformed or non-finite
    /// `cohort-metrics` line, a limit passed (user error, not retried).
    #[error("{0}")]
    Program(String),
    /// The machine, the network or the coordinator failed (an input that could not be
    /// fetched, local disk trouble, a thread that could not start): retried elsewhere.
    #[error("{0}")]
    Infrastructure(String),
}

impl TrainError {
    /// True for errors that come from the trial itself, which retrying on another worker cannot fix.
    pub fn is_user_error(&self) -> bool {
        matches!(self, TrainError::Data(_) | TrainError::Diverged { .. } | TrainError::Invalid(_) | TrainError::Program(_))
    }
}

/// What a recipe needs from its surroundings.
pub struct Events<'a> {
    /// Receives each event as it happens.
    pub emit: &'a mut dyn FnMut(TrainEvent),
    /// Set by the daemon to make the recipe stop at the next batch boundary.
    pub stop: &'a AtomicBool,
    /// Set by the daemon when it shuts down: finish the epoch, checkpoint it, then stop.
    pub drain: &'a AtomicBool,
}

impl Events<'_> {
    fn check_stop(&self) -> Result<(), TrainError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(TrainError::Stopped);
        }
        Ok(())
    }

    fn draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed)
    }
}

/// Counts the time until the guard drops to `phase` (the worker's `cohort_worker_seconds_total`);
/// a recipe's time is training but for what it marks so.
pub fn phase(phase: Phase) -> PhaseGuard<'static> {
    crate::metrics::metrics().phases.enter(phase)
}

/// Reports an epoch: to the daemon, and to the worker's metrics.
pub fn report_epoch(events: &mut Events<'_>, report: EpochReport) {
    crate::metrics::metrics().epoch_done(report.samples, report.seconds);
    (events.emit)(TrainEvent::Epoch(report));
}

/// The inputs of a run besides the task.
#[derive(Debug)]
pub struct RunInputs<'a> {
    /// Dataset files by their relative name, each at its local path under `dataset_root`.
    pub dataset_files: &'a BTreeMap<String, PathBuf>,
    /// The folder holding the dataset's files under their relative names.
    pub dataset_root: &'a Path,
    /// A checkpoint to resume from.
    pub resume_from: Option<&'a Path>,
    /// A checkpoint to initialise weights from (the classifier's pretrained autoencoder).
    pub init_from: Option<&'a Path>,
    /// The classifier checkpoint that judges a conditional GAN's samples (`WganSpec::judge`).
    pub judge: Option<&'a Path>,
    /// Where checkpoints and artifacts are written before upload.
    pub scratch_dir: &'a Path,
    /// Where to compute.
    pub device: Device,
    /// The gang, when the task runs on several replicas.
    pub gang: Option<&'a GangInputs>,
}

/// What a replica needs to join its gang: its bound collective listener and the rendezvous result.
#[derive(Debug)]
pub struct GangInputs {
    /// Bound to this replica's advertised collective address (the ring backend).
    pub listener: std::net::TcpListener,
    /// Rank, peers, secret, timeout.
    pub settings: crate::collective::GangSettings,
    /// The backend rank 0 chose.
    pub backend: crate::collective::Backend,
    /// Rank 0's NCCL unique id (NCCL backend).
    pub nccl_id: Vec<u8>,
}

/// Runs `task` to completion, reporting through `events`.
pub fn run(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    match task.spec.kind {
        TrialKind::DaeFold => dae::run_fold(task, inputs, events),
        TrialKind::DaeFinal => dae::run_final(task, inputs, events),
        TrialKind::Classifier => classifier::run(task, inputs, events),
        TrialKind::Wgan => wgan::run(task, inputs, events),
        // The daemon runs command trials through crate::command, never as a recipe.
        TrialKind::Command => Err(TrainError::Invalid("a command trial is not a built-in recipe".into())),
    }
}

/// Seed streams: each kind of randomness of each epoch gets its own seed.
pub(crate) mod streams {
    /// Shuffling of epoch e: `SHUFFLE + e`.
    pub const SHUFFLE: u64 = 1 << 32;
    /// Input noise / GAN noise of epoch e: `NOISE + e`.
    pub const NOISE: u64 = 2 << 32;
    /// The fixed noise of evaluation sets and sample grids.
    pub const EVALUATION: u64 = u64::MAX;
    /// The generated images and the patches and directions of the WGAN-GP's sliced Wasserstein
    /// distance (the same at every evaluation, so the figures compare across epochs).
    pub const SWD: u64 = u64::MAX - 1;
    /// The noise of the images a judge classifier classifies (the same at every evaluation).
    pub const JUDGE: u64 = u64::MAX - 2;
}

/// The trainable variables of `vars`, by name, sorted (so optimizer state keys are stable).
pub fn trainable(vars: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// `value` if finite, else the divergence error naming `what`.
pub fn finite(value: f64, epoch: u32, what: &'static str) -> Result<f64, TrainError> {
    if value.is_finite() {
        return Ok(value);
    }
    Err(TrainError::Diverged { epoch, what, value })
}

/// A recipe's run: the task, its inputs and events, and this replica's place in the gang. It does
/// what every recipe does alike: joining the gang, resuming, ending each epoch, the last checkpoint.
pub struct Run<'r, 'e> {
    /// The task.
    pub task: &'r Task,
    /// Its inputs.
    pub inputs: &'r RunInputs<'r>,
    /// Where events go; the stop and drain flags.
    pub events: &'r mut Events<'e>,
    /// This replica's place in the gang ([`Shard::SOLE`] alone).
    pub shard: Shard,
    /// The gang's communicator (none alone).
    pub comm: Option<Box<dyn Communicator>>,
    /// The last epoch done before this attempt (0 for a fresh start), set by [`Run::resume`].
    pub done_epochs: u32,
}

/// Whether epoch `epoch` of `epochs` ends with a checkpoint (every `every` epochs, 0: only the
/// last), and whether it is the final one.
fn checkpoint_due(epoch: u32, epochs: u32, every: u32) -> Option<bool> {
    let is_final = epoch == epochs;
    (is_final || (every > 0 && epoch.is_multiple_of(every))).then_some(is_final)
}

/// Whether a replica stops at the end of an epoch: only while the worker drains, and then the
/// `leader` first checkpoints the epoch (`Some(true)`) unless one was due (`saved`), so the next
/// attempt resumes right after it.
fn drain_stop(leader: bool, saved: bool, draining: bool) -> Option<bool> {
    draining.then_some(leader && !saved)
}

impl<'r, 'e> Run<'r, 'e> {
    /// Starts a run of `task`, joining its gang if it has one (setting the stop flag ends the wait).
    pub fn join(task: &'r Task, inputs: &'r RunInputs<'r>, events: &'r mut Events<'e>) -> Result<Self, TrainError> {
        let (shard, comm) = data_parallel::join_gang(inputs, events.stop)?;
        Ok(Self { task, inputs, events, shard, comm, done_epochs: 0 })
    }

    /// Whether this replica reports, checkpoints and emits artifacts (rank 0).
    pub fn leader(&self) -> bool {
        self.shard.rank == 0
    }

    /// The gang's communicator, if any.
    pub fn comm(&mut self) -> Option<&mut (dyn Communicator + 'static)> {
        self.comm.as_deref_mut()
    }

    /// Restores `vars` and `optimizers` from the checkpoint to resume from, if any, and gives every
    /// replica rank 0's variables. Returns the epochs left to train.
    pub fn resume(&mut self, vars: &mut nn::VarStore, optimizers: &mut [&mut Adam]) -> Result<RangeInclusive<u32>, TrainError> {
        self.done_epochs = {
            let _checkpoint = phase(Phase::Checkpoint);
            checkpoint::resume(self.inputs.resume_from, vars, optimizers)?
        };
        if let Some(comm) = self.comm.as_deref_mut() {
            data_parallel::broadcast_variables(comm, vars)?;
        }
        Ok(self.done_epochs + 1..=self.task.spec.config.epochs)
    }

    /// Ends an epoch alike for every recipe: the leader reports it, calls `artifacts`, and
    /// checkpoints `vars` and `optimizers` when due; a draining worker then stops (`drain_stop`).
    pub fn end_epoch(
        &mut self,
        report: EpochReport,
        vars: &nn::VarStore,
        optimizers: &[&Adam],
        artifacts: impl FnOnce(&mut Self) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let (epoch, mut saved) = (report.epoch, false);
        if self.leader() {
            report_epoch(self.events, report);
            artifacts(self)?;
            if let Some(is_final) = checkpoint_due(epoch, self.task.spec.config.epochs, self.task.spec.checkpoint_every) {
                self.save_checkpoint(vars, optimizers, epoch, is_final)?;
                saved = true;
            }
        }
        let Some(checkpoint) = drain_stop(self.leader(), saved, self.events.draining()) else {
            return Ok(());
        };
        if checkpoint {
            self.save_checkpoint(vars, optimizers, epoch, false)?;
        }
        Err(TrainError::Stopped)
    }

    /// After the last epoch: whether this replica is the leader (which emits the final artifacts).
    /// A leader resumed from the final checkpoint (its completion report was lost) hands it back.
    pub fn finish(&mut self, vars: &nn::VarStore, optimizers: &[&Adam]) -> Result<bool, TrainError> {
        let epochs = self.task.spec.config.epochs;
        if self.leader() && self.done_epochs >= epochs {
            self.save_checkpoint(vars, optimizers, epochs, true)?;
        }
        Ok(self.leader())
    }

    /// Writes a checkpoint into the scratch folder and announces it.
    fn save_checkpoint(&mut self, vars: &nn::VarStore, optimizers: &[&Adam], epoch: u32, is_final: bool) -> Result<(), TrainError> {
        let _checkpoint = phase(Phase::Checkpoint);
        let path = self.scratch_path(&format!("e{epoch}"));
        checkpoint::save(&path, vars, optimizers, epoch)?;
        (self.events.emit)(TrainEvent::Checkpoint { epoch, path, is_final });
        Ok(())
    }

    /// Writes named tensors as a safetensors artifact into the scratch folder and announces it.
    pub fn emit_artifact(&mut self, name: &str, epoch: u32, tensors: &[(&str, Tensor)]) -> Result<(), TrainError> {
        let _checkpoint = phase(Phase::Checkpoint);
        let path = self.scratch_path(name);
        let on_cpu: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (*n, t.to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&on_cpu, &path).map_err(|source| CheckpointError::Torch { path: path.display().to_string(), source })?;
        (self.events.emit)(TrainEvent::Artifact { name: name.to_string(), epoch, path });
        Ok(())
    }

    /// `<task>-a<attempt>-<suffix>.safetensors` in the scratch folder.
    fn scratch_path(&self, suffix: &str) -> PathBuf {
        self.inputs.scratch_dir.join(format!("{}-a{}-{suffix}.safetensors", self.task.id, self.task.attempt))
    }
}

/// Names a dataset's decoded content: its format and decoding options, the blobs the task names,
/// and the local files it reads (path, size, modification time: the daemon lays blobs out under
/// content-addressed folders, but a caller of [`run`] may pass any files).
fn dataset_key(spec: &DatasetSpec, inputs: &RunInputs<'_>) -> String {
    let mut files = Sha256::new();
    for (name, blob) in &spec.files {
        files.update(format!("blob {name}\0{}\n", blob.sha256).as_bytes());
    }
    files.update(format!("root {}\n", inputs.dataset_root.display()).as_bytes());
    for (name, path) in inputs.dataset_files {
        let metadata = std::fs::metadata(path).ok();
        let size = metadata.as_ref().map(std::fs::Metadata::len);
        let modified = metadata.and_then(|m| m.modified().ok());
        files.update(format!("file {name}\0{}\0{size:?}\0{modified:?}\n", path.display()).as_bytes());
    }
    format!("{} size {} foreground {} files {}", spec.format, spec.image_size, spec.min_foreground, hex::encode(files.finalize()))
}

/// Decodes the task's dataset files by their format.
fn decode_dataset(task: &Task, inputs: &RunInputs<'_>) -> Result<TrainTest, TrainError> {
    let spec = &task.spec.dataset;
    let side = i64::from(spec.image_size);
    let loaded = match spec.format {
        DatasetFormat::Idx => data::load_idx(inputs.dataset_files)?,
        DatasetFormat::ImageFolder => data::image_folder::load_image_folder(inputs.dataset_root, side)?,
        DatasetFormat::Nifti => {
            let volumes: Vec<PathBuf> = inputs
                .dataset_files
                .iter()
                .filter(|(name, _)| name.ends_with(".nii") || name.ends_with(".nii.gz"))
                .map(|(_, path)| path.clone())
                .collect();
            let train = data::nifti::load_nifti_slices(&volumes, side, spec.min_foreground)?;
            let test = ImageSet { images: train.images.narrow(0, 0, 0), labels: train.labels.narrow(0, 0, 0) };
            TrainTest { train, test }
        }
        other @ (DatasetFormat::None | DatasetFormat::Files) => {
            return Err(TrainError::Invalid(format!("the built-in recipes cannot train on dataset format {other}")))
        }
    };
    Ok(loaded)
}

/// Loads the task's dataset by its format, applies the sample limits, and moves it to the device.
/// The decoded dataset stays in the worker's [`TensorCache`], so the next task on the same data
/// skips decoding.
pub fn load_dataset(task: &Task, inputs: &RunInputs<'_>) -> Result<TrainTest, TrainError> {
    let _data = phase(Phase::Data);
    let spec = &task.spec.dataset;
    let key = format!("decoded {}", dataset_key(spec, inputs));
    let tensors = TensorCache::global().get_or_make(&key, || {
        let loaded = decode_dataset(task, inputs)?;
        Ok::<_, TrainError>(vec![loaded.train.images, loaded.train.labels, loaded.test.images, loaded.test.labels])
    })?;
    let [train_images, train_labels, test_images, test_labels]: [Tensor; 4] =
        tensors.try_into().expect("a decoded dataset is four tensors");
    let loaded = TrainTest {
        train: ImageSet { images: train_images, labels: train_labels },
        test: ImageSet { images: test_images, labels: test_labels },
    };
    let data = TrainTest {
        train: to_device(loaded.train.truncate(spec.train_limit as usize), inputs.device),
        test: to_device(loaded.test.truncate(spec.test_limit as usize), inputs.device),
    };
    tracing::info!(format = %spec.format, train = data.train.len(), test = data.test.len(), device = ?inputs.device, "dataset loaded");
    Ok(data)
}

/// Appends the task's augmented copies (seed §1.1) to a training set: `train`, the rows of the
/// (limited) training part of the task's dataset that `fold` trains on, or all of them without a
/// fold. The result stays in the worker's [`TensorCache`]: every config of a cross-validation
/// augments the same folds.
pub fn augment(task: &Task, inputs: &RunInputs<'_>, train: ImageSet, fold: Option<FoldSpec>) -> ImageSet {
    let Some(augment) = &task.spec.config.augment else {
        return train;
    };
    let _data = phase(Phase::Data);
    let rows = match fold {
        Some(fold) => format!("fold {} of {} shuffled by {}", fold.index, fold.folds, fold.shuffle_seed),
        None => "all".to_string(),
    };
    let key =
        format!("augmented {} limit {} rows {rows} {augment:?}", dataset_key(&task.spec.dataset, inputs), task.spec.dataset.train_limit);
    let device = train.images.device();
    let tensors = TensorCache::global().get_or_make(&key, || {
        let augmented = augmented_set(augment, train);
        Ok::<_, Infallible>(vec![augmented.images, augmented.labels])
    });
    let [images, labels]: [Tensor; 2] = tensors.unwrap_or_else(|never| match never {}).try_into().expect("an image set is two tensors");
    to_device(ImageSet { images, labels }, device)
}

/// `train` followed by its augmented copies.
fn augmented_set(augment: &AugmentSpec, train: ImageSet) -> ImageSet {
    let ranges = AugmentRanges { rotate_deg: augment.rotate_deg, translate: augment.translate, shear_deg: augment.shear_deg };
    let mut images = vec![train.images.shallow_clone()];
    let mut labels = vec![train.labels.shallow_clone()];
    for copy in 0..augment.copies {
        let seed = crate::data::split::derive_seed(augment.seed, u64::from(copy));
        images.push(tch::no_grad(|| augmented_copy(&train.images, &ranges, seed)));
        labels.push(train.labels.shallow_clone());
    }
    ImageSet { images: Tensor::cat(&images, 0), labels: Tensor::cat(&labels, 0) }
}

fn to_device(set: ImageSet, device: Device) -> ImageSet {
    if device == Device::Cpu {
        return set;
    }
    ImageSet { images: set.images.to_device(device), labels: set.labels.to_device(device) }
}

#[cfg(test)]
mod tests {
    use super::{checkpoint_due, drain_stop};

    #[test]
    fn checkpoints_fall_every_few_epochs_and_on_the_last_and_a_drain_stops_every_replica() {
        let due: Vec<Option<bool>> = (1..=7).map(|epoch| checkpoint_due(epoch, 7, 3)).collect();
        assert_eq!(due, [None, None, Some(false), None, None, Some(false), Some(true)]);
        assert_eq!(checkpoint_due(6, 6, 3), Some(true), "the last epoch's checkpoint is final even when periodic");
        assert_eq!((1..=2).map(|epoch| checkpoint_due(epoch, 2, 0)).collect::<Vec<_>>(), [None, Some(true)]);
        for (leader, saved) in [(false, false), (true, false), (true, true)] {
            assert_eq!(drain_stop(leader, saved, false), None, "not draining: go on");
        }
        assert_eq!(drain_stop(true, false, true), Some(true), "the leader checkpoints the epoch to resume from");
        assert_eq!(drain_stop(true, true, true), Some(false), "a checkpoint already written is not written again");
        assert_eq!(drain_stop(false, false, true), Some(false), "a follower never checkpoints");
    }
}
