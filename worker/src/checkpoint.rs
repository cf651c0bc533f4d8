//! Checkpoints: model weights, optimizer state and progress in one safetensors file.
//!
//! Keys: `model.<variable>` for weights (loadable on their own), `optim.*` for the optimizer,
//! `meta.epoch` for the last finished epoch.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Tensor};

use crate::optim::Adam;

const MODEL_PREFIX: &str = "model.";
const EPOCH_KEY: &str = "meta.epoch";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// libtorch failed to read or write the file.
    #[error("checkpoint {path}: {source}")]
    Torch {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: tch::TchError,
    },
    /// The file does not fit the model.
    #[error("checkpoint {path}: {message}")]
    Mismatch {
        /// The file.
        path: String,
        /// What does not fit.
        message: String,
    },
}

/// Writes the model's variables, the optimizers' state and `epoch` to `path`.
pub fn save(path: &Path, vars: &nn::VarStore, optimizers: &[&Adam], epoch: u32) -> Result<(), CheckpointError> {
    let mut tensors: Vec<(String, Tensor)> =
        vars.variables().into_iter().map(|(name, tensor)| (format!("{MODEL_PREFIX}{name}"), tensor)).collect();
    for optimizer in optimizers {
        tensors.extend(optimizer.state());
    }
    tensors.push((EPOCH_KEY.to_string(), Tensor::from(i64::from(epoch))));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&tensors, path).map_err(|source| CheckpointError::Torch { path: path.display().to_string(), source })
}

/// Restores weights and optimizer state from the checkpoint at `path`, if any; returns the
/// number of epochs already done (0 without a checkpoint).
pub fn resume(path: Option<&Path>, vars: &mut nn::VarStore, optimizers: &mut [&mut Adam]) -> Result<u32, CheckpointError> {
    let Some(path) = path else {
        return Ok(0);
    };
    let loaded = Loaded::read(path)?;
    loaded.restore_model(vars)?;
    for optimizer in optimizers {
        loaded.restore_optimizer(optimizer)?;
    }
    loaded.epoch()
}

/// A checkpoint read back into memory.
#[derive(Debug)]
pub struct Loaded {
    tensors: HashMap<String, Tensor>,
    path: String,
}

impl Loaded {
    /// Reads a checkpoint file.
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let tensors =
            Tensor::read_safetensors(path).map_err(|source| CheckpointError::Torch { path: path.display().to_string(), source })?;
        Ok(Self { tensors: tensors.into_iter().collect(), path: path.display().to_string() })
    }

    fn mismatch(&self, message: String) -> CheckpointError {
        CheckpointError::Mismatch { path: self.path.clone(), message }
    }

    /// The last finished epoch recorded in the checkpoint.
    pub fn epoch(&self) -> Result<u32, CheckpointError> {
        let epoch = self.tensors.get(EPOCH_KEY).ok_or_else(|| self.mismatch(format!("no {EPOCH_KEY}")))?;
        Ok(epoch.int64_value(&[]) as u32)
    }

    /// The shape of the model variable `name` (without the `model.` prefix), if the checkpoint
    /// holds it: how a reader learns sizes the checkpoint fixed (a classifier's latent size).
    pub fn model_shape(&self, name: &str) -> Option<Vec<i64>> {
        self.tensors.get(&format!("{MODEL_PREFIX}{name}")).map(Tensor::size)
    }

    /// Copies the weights into `vars`; every variable of `vars` must be present with its shape.
    pub fn restore_model(&self, vars: &mut nn::VarStore) -> Result<(), CheckpointError> {
        self.restore_matching(vars, |_| true)
    }

    /// Copies the weights of the variables whose names satisfy `wanted` (e.g. only `encoder.*`
    /// from an autoencoder into a classifier); each must be present with its shape.
    pub fn restore_matching(&self, vars: &mut nn::VarStore, wanted: impl Fn(&str) -> bool) -> Result<(), CheckpointError> {
        tch::no_grad(|| {
            for (name, mut variable) in vars.variables().into_iter().filter(|(name, _)| wanted(name)) {
                let key = format!("{MODEL_PREFIX}{name}");
                let saved = self.tensors.get(&key).ok_or_else(|| self.mismatch(format!("no weights for {name}")))?;
                if saved.size() != variable.size() {
                    return Err(self.mismatch(format!("{name} has shape {:?}, the model {:?}", saved.size(), variable.size())));
                }
                variable.copy_(saved);
            }
            Ok(())
        })
    }

    /// Restores the optimizer state.
    pub fn restore_optimizer(&self, optimizer: &mut Adam) -> Result<(), CheckpointError> {
        optimizer.load_state(|name| self.tensors.get(name).map(Tensor::shallow_clone)).map_err(|message| self.mismatch(message))
    }
}
