//! Training recipes. They run on a dedicated thread and talk to the daemon through [`Events`].

pub mod dae;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Device;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::task::{Task, TrialKind};

/// One epoch's figures, as the recipe reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Named scalars, e.g. `train_mse`, `val_mse`.
    pub values: Vec<(String, f64)>,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
    /// Training samples processed in the epoch.
    pub samples: u64,
}

/// What a running recipe tells the outside world.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// An epoch finished.
    Epoch(EpochReport),
    /// A checkpoint file was written (the receiver uploads, then deletes it).
    Checkpoint {
        /// Last finished epoch in it.
        epoch: u32,
        /// Where it lies.
        path: PathBuf,
        /// The trial's last checkpoint.
        is_final: bool,
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
    /// The daemon asked the recipe to stop (cancel, lease lost, shutdown).
    #[error("stopped on request")]
    Stopped,
}

impl TrainError {
    /// True for errors that come from the trial itself, which retrying on another worker cannot fix.
    pub fn is_user_error(&self) -> bool {
        matches!(self, TrainError::Data(_) | TrainError::Diverged { .. } | TrainError::Invalid(_))
    }
}

/// What a recipe needs from its surroundings.
pub struct Events<'a> {
    /// Receives each event as it happens.
    pub emit: &'a mut dyn FnMut(TrainEvent),
    /// Set by the daemon to make the recipe stop at the next batch boundary.
    pub stop: &'a AtomicBool,
}

impl Events<'_> {
    fn check_stop(&self) -> Result<(), TrainError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(TrainError::Stopped);
        }
        Ok(())
    }
}

/// The inputs of a run besides the task: local dataset files, the checkpoint to resume, a scratch dir.
#[derive(Debug)]
pub struct RunInputs<'a> {
    /// Dataset files by the name the loader expects.
    pub dataset_files: &'a BTreeMap<String, PathBuf>,
    /// A checkpoint to resume from.
    pub resume_from: Option<&'a Path>,
    /// Where checkpoints are written before upload.
    pub scratch_dir: &'a Path,
    /// Where to compute.
    pub device: Device,
}

/// Runs `task` to completion, reporting through `events`.
pub fn run(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    match task.kind {
        TrialKind::DaeFold => dae::run_fold(task, inputs, events),
    }
}
