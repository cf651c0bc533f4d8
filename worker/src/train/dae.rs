//! The denoising autoencoder recipes (report §1.3–1.4).

use std::time::Instant;

use tch::nn::{self, ModuleT};
use tch::{Device, Reduction, Tensor};

use super::{EpochReport, Events, RunInputs, TrainError, TrainEvent};
use crate::checkpoint::{self, Loaded};
use crate::data::split::{derive_seed, kfold, permutation};
use crate::data::{self, ImageSet};
use crate::model::dae::Dae;
use crate::optim::{Adam, ParamGroup};
use crate::task::{Task, TrainingConfig};

/// Adam's betas and epsilon: PyTorch's defaults, which the seed used.
const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;
/// Seed stream of the validation noise (fixed, so epochs are compared on the same noisy inputs).
const VALIDATION_STREAM: u64 = u64::MAX;
/// Seed streams of per-epoch shuffling and noise start here (epoch is added).
const SHUFFLE_STREAM: u64 = 1 << 32;
const NOISE_STREAM: u64 = 2 << 32;

/// Adds fresh white Gaussian noise of standard deviation `std` (the seed's corruption).
pub fn corrupt(images: &Tensor, std: f64) -> Tensor {
    if std == 0.0 {
        return images.shallow_clone();
    }
    images + images.randn_like() * std
}

/// Mean squared error of the model's reconstruction of `noisy` against `clean`, in batches.
pub fn evaluate_mse(model: &impl ModuleT, noisy: &Tensor, clean: &Tensor, batch_size: usize) -> f64 {
    let n = noisy.size()[0];
    if n == 0 {
        return f64::NAN;
    }
    let mut total = 0.0;
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let len = (batch_size as i64).min(n - start);
            let out = model.forward_t(&noisy.narrow(0, start, len), false);
            let sse = out.mse_loss(&clean.narrow(0, start, len), Reduction::Sum).double_value(&[]);
            total += sse;
            start += len;
        }
    });
    total / clean.numel() as f64
}

/// A model, its variables and its optimizer, optionally restored from a checkpoint.
struct Trainee {
    vars: nn::VarStore,
    model: Dae,
    optimizer: Adam,
    /// The last epoch already done (0 for a fresh start).
    done_epochs: u32,
}

impl Trainee {
    fn new(config: &TrainingConfig, inputs: &RunInputs<'_>) -> Result<Self, TrainError> {
        tch::manual_seed(config.seed as i64);
        let mut vars = nn::VarStore::new(inputs.device);
        let model = Dae::new(&vars.root(), config.latent);
        let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let group = ParamGroup { params: named, lr: config.lr, weight_decay: config.weight_decay };
        let mut optimizer = Adam::new(vec![group], BETAS, EPS);
        let mut done_epochs = 0;
        if let Some(path) = inputs.resume_from {
            let loaded = Loaded::read(path)?;
            loaded.restore_model(&mut vars)?;
            loaded.restore_optimizer(&mut optimizer)?;
            done_epochs = loaded.epoch()?;
        }
        Ok(Self { vars, model, optimizer, done_epochs })
    }

    /// One pass over `train` in a fresh order, with fresh noise; returns the mean training MSE.
    fn train_epoch(&mut self, train: &ImageSet, config: &TrainingConfig, epoch: u32, events: &Events<'_>) -> Result<f64, TrainError> {
        let n = train.len();
        let order = Tensor::from_slice(&permutation(n, derive_seed(config.seed, SHUFFLE_STREAM + u64::from(epoch))))
            .to_device(train.images.device());
        tch::manual_seed(derive_seed(config.seed, NOISE_STREAM + u64::from(epoch)) as i64);
        let mut weighted_loss = 0.0;
        let mut start = 0;
        while start < n {
            events.check_stop()?;
            let len = config.batch_size.min(n - start);
            let clean = train.images.index_select(0, &order.narrow(0, start as i64, len as i64));
            let noisy = corrupt(&clean, config.noise_std);
            let loss = self.model.forward_t(&noisy, true).mse_loss(&clean, Reduction::Mean);
            self.optimizer.zero_grad();
            loss.backward();
            self.optimizer.step();
            weighted_loss += loss.double_value(&[]) * len as f64;
            start += len;
        }
        Ok(weighted_loss / n as f64)
    }

    fn checkpoint(&self, inputs: &RunInputs<'_>, task: &Task, epoch: u32, is_final: bool, events: &mut Events<'_>) -> Result<(), TrainError> {
        let path = inputs.scratch_dir.join(format!("{}-a{}-e{epoch}.safetensors", task.id, task.attempt));
        checkpoint::save(&path, &self.vars, &self.optimizer, epoch)?;
        (events.emit)(TrainEvent::Checkpoint { epoch, path, is_final });
        Ok(())
    }
}

fn check_config(config: &TrainingConfig, train_len: usize) -> Result<(), TrainError> {
    if config.batch_size == 0 || config.batch_size > train_len {
        return Err(TrainError::Invalid(format!("batch size {} with {train_len} training samples", config.batch_size)));
    }
    if !(config.lr > 0.0 && config.lr.is_finite()) || !(config.weight_decay >= 0.0) || !(config.noise_std >= 0.0) {
        return Err(TrainError::Invalid(format!(
            "lr {} / weight decay {} / noise std {} out of range",
            config.lr, config.weight_decay, config.noise_std
        )));
    }
    if config.latent < 1 {
        return Err(TrainError::Invalid(format!("latent size {}", config.latent)));
    }
    Ok(())
}

fn finite(value: f64, epoch: u32, what: &'static str) -> Result<f64, TrainError> {
    if value.is_finite() {
        return Ok(value);
    }
    Err(TrainError::Diverged { epoch, what, value })
}

fn load_dataset(task: &Task, inputs: &RunInputs<'_>) -> Result<data::TrainTest, TrainError> {
    match task.dataset.format.as_str() {
        "idx" => Ok(data::load_idx(inputs.dataset_files)?),
        other => Err(TrainError::Invalid(format!("dataset format {other:?} is not supported by dae trials"))),
    }
}

/// `dae-fold`: train on k−1 folds, validate on the held-out fold each epoch.
///
/// Reports `train_mse` and `val_mse` per epoch; the coordinator takes the minimum of `val_mse`.
pub fn run_fold(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let config = &task.config;
    let fold = task.fold.ok_or_else(|| TrainError::Invalid("dae-fold without a fold".into()))?;
    let dataset = load_dataset(task, inputs)?;
    let all = dataset.train.truncate(task.dataset.train_limit);
    if fold.folds < 2 || fold.index >= fold.folds || all.len() < fold.folds {
        return Err(TrainError::Invalid(format!("fold {} of {} over {} samples", fold.index, fold.folds, all.len())));
    }
    let (train_idx, val_idx) = kfold(all.len(), fold.folds, fold.index, fold.shuffle_seed);
    let train = to_device(all.select(&Tensor::from_slice(&train_idx)), inputs.device);
    let val = to_device(all.select(&Tensor::from_slice(&val_idx)), inputs.device);
    check_config(config, train.len())?;

    let mut trainee = Trainee::new(config, inputs)?;
    tch::manual_seed(derive_seed(config.seed, VALIDATION_STREAM) as i64);
    let val_noisy = corrupt(&val.images, config.noise_std);
    for epoch in trainee.done_epochs + 1..=config.epochs {
        let started = Instant::now();
        let train_mse = finite(trainee.train_epoch(&train, config, epoch, events)?, epoch, "train_mse")?;
        let val_mse = finite(evaluate_mse(&trainee.model, &val_noisy, &val.images, 1024), epoch, "val_mse")?;
        (events.emit)(TrainEvent::Epoch(EpochReport {
            epoch,
            values: vec![("train_mse".into(), train_mse), ("val_mse".into(), val_mse)],
            seconds: started.elapsed().as_secs_f64(),
            samples: train.len() as u64,
        }));
        let is_final = epoch == config.epochs;
        let periodic = task.checkpoint_every > 0 && epoch % task.checkpoint_every == 0;
        if is_final || periodic {
            trainee.checkpoint(inputs, task, epoch, is_final, events)?;
        }
    }
    if trainee.done_epochs >= config.epochs {
        // Resumed from the final checkpoint (the upload of completion was lost): re-emit it.
        trainee.checkpoint(inputs, task, config.epochs, true, events)?;
    }
    Ok(())
}

fn to_device(set: ImageSet, device: Device) -> ImageSet {
    if device == Device::Cpu {
        return set;
    }
    ImageSet { images: set.images.to_device(device), labels: set.labels.to_device(device) }
}

/// Loads a DAE's weights from a checkpoint file (for tools and tests).
pub fn load_model(path: &std::path::Path, latent: i64, device: Device) -> Result<(nn::VarStore, Dae), TrainError> {
    let mut vars = nn::VarStore::new(device);
    let model = Dae::new(&vars.root(), latent);
    Loaded::read(path)?.restore_model(&mut vars)?;
    Ok((vars, model))
}
