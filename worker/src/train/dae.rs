//! The denoising autoencoder recipes (report §1.3–1.4): `dae-fold` for cross-validation and
//! `dae-final` on the whole training set.

use std::time::Instant;

use tch::nn::{self, ModuleT};
use tch::{Device, Reduction, Tensor};

use super::{checkpoint_due, drain_point, emit_artifact, finite, save_checkpoint, streams, trainable, EpochReport, Events, RunInputs, TrainError};
use crate::checkpoint::{self, Loaded};
use crate::data::split::{derive_seed, kfold, permutation};
use crate::data::ImageSet;
use crate::metrics::Phase;
use crate::model::dae::Dae;
use crate::optim::{Adam, ParamGroup};
use crate::task::{Task, TrainingConfig};

/// Adam's betas and epsilon: PyTorch's defaults, which the seed used.
pub const BETAS: (f64, f64) = (0.9, 0.999);
/// Adam's epsilon.
pub const EPS: f64 = 1e-8;
/// Test digits kept in the reconstruction artifacts (noisy input, output, clean).
const RECONSTRUCTIONS: i64 = 8;

/// Adds fresh white Gaussian noise of standard deviation `std` (the seed's corruption).
pub fn corrupt(images: &Tensor, std: f64) -> Tensor {
    if std == 0.0 {
        return images.shallow_clone();
    }
    images + images.randn_like() * std
}

/// The same noisy copy of an evaluation set every time (seeded from the trial seed).
pub fn fixed_noisy(images: &Tensor, config: &TrainingConfig) -> Tensor {
    tch::manual_seed(derive_seed(config.seed, streams::EVALUATION) as i64);
    corrupt(images, config.noise_std)
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
            total += out.mse_loss(&clean.narrow(0, start, len), Reduction::Sum).double_value(&[]);
            start += len;
        }
    });
    total / clean.numel() as f64
}

/// Calls `step(batch_indices)` for each mini-batch of a fresh permutation of `0..n` for `epoch`,
/// after seeding the epoch's noise; stops early when asked to.
pub fn for_each_batch(
    n: usize,
    config: &TrainingConfig,
    epoch: u32,
    device: Device,
    events: &Events<'_>,
    mut step: impl FnMut(&Tensor) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let order = Tensor::from_slice(&permutation(n, derive_seed(config.seed, streams::SHUFFLE + u64::from(epoch)))).to_device(device);
    tch::manual_seed(derive_seed(config.seed, streams::NOISE + u64::from(epoch)) as i64);
    let mut start = 0;
    while start < n {
        events.check_stop()?;
        let len = config.batch_size.min(n - start);
        let timer = crate::metrics::metrics().step_seconds.start_timer();
        step(&order.narrow(0, start as i64, len as i64))?;
        timer.observe_duration();
        start += len;
    }
    Ok(())
}

/// The autoencoder with its optimizer, optionally restored from a checkpoint.
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
        let group = ParamGroup { params: trainable(&vars), lr: config.lr, weight_decay: config.weight_decay };
        let mut optimizer = Adam::new(vec![group], BETAS, EPS);
        let done_epochs = {
            let _checkpoint = super::phase(Phase::Checkpoint);
            checkpoint::resume(inputs.resume_from, &mut vars, &mut [&mut optimizer])?
        };
        Ok(Self { vars, model, optimizer, done_epochs })
    }

    /// One pass over `train` in a fresh order, with fresh noise; returns the mean training MSE.
    fn train_epoch(&mut self, train: &ImageSet, config: &TrainingConfig, epoch: u32, events: &Events<'_>) -> Result<f64, TrainError> {
        let n = train.len();
        let mut weighted_loss = 0.0;
        for_each_batch(n, config, epoch, train.images.device(), events, |batch| {
            let clean = train.images.index_select(0, batch);
            let noisy = corrupt(&clean, config.noise_std);
            let loss = self.model.forward_t(&noisy, true).mse_loss(&clean, Reduction::Mean);
            self.optimizer.zero_grad();
            loss.backward();
            self.optimizer.step();
            weighted_loss += loss.double_value(&[]) * clean.size()[0] as f64;
            Ok(())
        })?;
        Ok(weighted_loss / n as f64)
    }
}

fn check_config(config: &TrainingConfig, train_len: usize) -> Result<(), TrainError> {
    if config.batch_size == 0 || config.batch_size > train_len {
        return Err(TrainError::Invalid(format!("batch size {} with {train_len} training samples", config.batch_size)));
    }
    // Written so that NaN, which fails every comparison, is out of range too.
    let in_range = config.lr > 0.0 && config.lr.is_finite() && config.weight_decay >= 0.0 && config.noise_std >= 0.0;
    if !in_range {
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

/// Shared loop of both recipes: train each remaining epoch, evaluate on `eval` (noisy, clean)
/// under `eval_name`, report, checkpoint; `after_epoch` may emit artifacts.
fn train_loop(
    task: &Task,
    inputs: &RunInputs<'_>,
    events: &mut Events<'_>,
    train: &ImageSet,
    eval: (&Tensor, &Tensor, &'static str),
    mut after_epoch: impl FnMut(&Dae, u32, &mut Events<'_>) -> Result<(), TrainError>,
) -> Result<Trainee, TrainError> {
    let config = &task.config;
    check_config(config, train.len())?;
    let mut trainee = Trainee::new(config, inputs)?;
    let (eval_noisy, eval_clean, eval_name) = eval;
    for epoch in trainee.done_epochs + 1..=config.epochs {
        let started = Instant::now();
        let train_mse = finite(trainee.train_epoch(train, config, epoch, events)?, epoch, "train_mse")?;
        let eval_mse = finite(evaluate_mse(&trainee.model, eval_noisy, eval_clean, 1024), epoch, eval_name)?;
        super::report_epoch(events, EpochReport {
            epoch,
            values: vec![("train_mse".into(), train_mse), (eval_name.into(), eval_mse)],
            seconds: started.elapsed().as_secs_f64(),
            samples: train.len() as u64,
        });
        after_epoch(&trainee.model, epoch, events)?;
        let due = checkpoint_due(task, epoch);
        if let Some(is_final) = due {
            save_checkpoint(task, inputs, &trainee.vars, &[&trainee.optimizer], epoch, is_final, events)?;
        }
        drain_point(task, inputs, &trainee.vars, &[&trainee.optimizer], epoch, due.is_some(), events)?;
    }
    if trainee.done_epochs >= config.epochs {
        // Resumed from the final checkpoint (its completion report was lost): hand it back again.
        save_checkpoint(task, inputs, &trainee.vars, &[&trainee.optimizer], config.epochs, true, events)?;
    }
    Ok(trainee)
}

/// `dae-fold`: train on k−1 folds, validate on the held-out fold each epoch.
///
/// Reports `train_mse` and `val_mse` per epoch; the coordinator takes the minimum of `val_mse`.
pub fn run_fold(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let fold = task.fold.ok_or_else(|| TrainError::Invalid("dae-fold without a fold".into()))?;
    let data_phase = super::phase(Phase::Data);
    let all = super::load_dataset(task, inputs)?.train;
    if fold.folds < 2 || fold.index >= fold.folds || all.len() < fold.folds {
        return Err(TrainError::Invalid(format!("fold {} of {} over {} samples", fold.index, fold.folds, all.len())));
    }
    let (train_idx, val_idx) = kfold(all.len(), fold.folds, fold.index, fold.shuffle_seed);
    let device = all.images.device();
    let train = super::augment(task, inputs, all.select(&Tensor::from_slice(&train_idx).to_device(device)), Some(fold));
    let val = all.select(&Tensor::from_slice(&val_idx).to_device(device));
    let val_noisy = fixed_noisy(&val.images, &task.config);
    drop(data_phase);
    train_loop(task, inputs, events, &train, (&val_noisy, &val.images, "val_mse"), |_, _, _| Ok(()))?;
    Ok(())
}

/// The test set's latent codes and labels, for the PCA figures.
pub fn latent_codes(encoder: &impl ModuleT, images: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let chunks: Vec<Tensor> = images.split(1024, 0).iter().map(|chunk| encoder.forward_t(chunk, false)).collect();
        Tensor::cat(&chunks, 0)
    })
}

/// `dae-final`: train on the whole (augmented) training set, report `test_mse` each epoch.
///
/// Artifacts: `reconstructions-e{epoch}` (noisy input, output and clean image of a few test
/// digits) after the first and last epoch, and `latents` (the clean test set's latent codes with
/// labels) at the end.
pub fn run_final(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let data_phase = super::phase(Phase::Data);
    let data = super::load_dataset(task, inputs)?;
    if data.test.is_empty() {
        return Err(TrainError::Invalid("dae-final needs a test set".into()));
    }
    let train = super::augment(task, inputs, data.train, None);
    let test_noisy = fixed_noisy(&data.test.images, &task.config);
    drop(data_phase);
    let shown = RECONSTRUCTIONS.min(data.test.len() as i64);
    let last_epoch = task.config.epochs;
    let trainee = train_loop(task, inputs, events, &train, (&test_noisy, &data.test.images, "test_mse"), |model, epoch, events| {
        if epoch != 1 && epoch != last_epoch {
            return Ok(());
        }
        let noisy = test_noisy.narrow(0, 0, shown);
        let output = tch::no_grad(|| model.forward_t(&noisy, false));
        let clean = data.test.images.narrow(0, 0, shown);
        let tensors = [("noisy", noisy), ("output", output), ("clean", clean)];
        emit_artifact(task, inputs, &format!("reconstructions-e{epoch}"), epoch, &tensors, events)
    })?;
    let latents = latent_codes(&trainee.model.encoder, &data.test.images);
    emit_artifact(task, inputs, "latents", last_epoch, &[("latents", latents), ("labels", data.test.labels.shallow_clone())], events)
}

/// Loads a DAE's weights from a checkpoint file (for tools and tests).
pub fn load_model(path: &std::path::Path, latent: i64, device: Device) -> Result<(nn::VarStore, Dae), TrainError> {
    let mut vars = nn::VarStore::new(device);
    let model = Dae::new(&vars.root(), latent);
    Loaded::read(path)?.restore_model(&mut vars)?;
    Ok((vars, model))
}
