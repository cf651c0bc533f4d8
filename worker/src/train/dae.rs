//! The denoising autoencoder recipes (report §1.3–1.4): `dae-fold` for cross-validation and
//! `dae-final` on the whole training set.
//!
//! `dae-final` runs data parallel when the task comes with a gang, computing what one process
//! would on the global batch: every replica walks the same shuffled order and corrupts the whole
//! global batch with the same noise (shared seeds), then trains on its rows of it; gradients are
//! averaged after each backward pass (each replica's mean loss scaled by its share, so an uneven
//! last batch is exact too); evaluation is split by rows and summed over the gang; only rank 0
//! reports, checkpoints and emits artifacts.

use std::time::Instant;

use tch::nn::{self, ModuleT};
use tch::{Device, Reduction, Tensor};

use super::data_parallel::{self, Shard};
use super::{finite, streams, trainable, EpochReport, Events, Run, RunInputs, TrainError};
use crate::checkpoint::Loaded;
use crate::collective::Communicator;
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
    squared_error(model, noisy, clean, batch_size) / clean.numel() as f64
}

/// [`evaluate_mse`] in batches of 1024, split over the run's gang: each replica reconstructs its
/// shard's rows, and the squared errors are summed over the gang.
pub fn evaluate_mse_sharded(model: &impl ModuleT, noisy: &Tensor, clean: &Tensor, run: &mut Run<'_, '_>) -> Result<f64, TrainError> {
    let (shard, batch_size) = (run.shard, 1024);
    let Some(comm) = run.comm() else {
        return Ok(evaluate_mse(model, noisy, clean, batch_size));
    };
    let n = noisy.size()[0];
    if n == 0 {
        return Ok(f64::NAN);
    }
    let (start, rows) = shard.rows(n);
    let mine = squared_error(model, &noisy.narrow(0, start, rows), &clean.narrow(0, start, rows), batch_size);
    let total = data_parallel::sum_over_gang(Some(comm), &[mine])?[0];
    Ok(total / clean.numel() as f64)
}

/// Sum of squared errors of the model's reconstruction of `noisy` against `clean`, in batches.
fn squared_error(model: &impl ModuleT, noisy: &Tensor, clean: &Tensor, batch_size: usize) -> f64 {
    let n = noisy.size()[0];
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
    total
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
        let len = (config.batch_size as usize).min(n - start);
        let timer = crate::metrics::metrics().step_seconds.start_timer();
        step(&order.narrow(0, start as i64, len as i64))?;
        timer.observe_duration();
        start += len;
    }
    Ok(())
}

/// The autoencoder with its optimizer.
struct Trainee {
    vars: nn::VarStore,
    model: Dae,
    optimizer: Adam,
    /// The trainable variables, in the optimizer's (name) order: what the gang averages.
    params: Vec<Tensor>,
}

impl Trainee {
    /// A fresh autoencoder, initialised from the trial's seed.
    fn new(config: &TrainingConfig, device: Device) -> Self {
        tch::manual_seed(config.weights_seed() as i64);
        let vars = nn::VarStore::new(device);
        let model = Dae::new(&vars.root(), i64::from(config.latent));
        let named = trainable(&vars);
        let params = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let group = ParamGroup { params: named, lr: config.lr, weight_decay: config.weight_decay };
        let optimizer = Adam::new(vec![group], BETAS, EPS);
        Self { vars, model, optimizer, params }
    }

    /// One optimizer step on a global batch (`clean` images and their `noisy` copies), of which
    /// this replica trains on its shard's rows, with the gang's averaged gradients. Returns this
    /// replica's sum over its rows of the per-image MSE (its part of the epoch's training loss).
    fn train_step(
        &mut self,
        clean: &Tensor,
        noisy: &Tensor,
        shard: Shard,
        comm: Option<&mut (dyn Communicator + 'static)>,
    ) -> Result<f64, TrainError> {
        let global = clean.size()[0];
        let (start, rows) = shard.rows(global);
        let clean = clean.narrow(0, start, rows);
        let output = self.model.forward_t(&noisy.narrow(0, start, rows), true);
        let mean = output.mse_loss(&clean, Reduction::Mean);
        self.optimizer.zero_grad();
        shard.share_of_loss(&mean, &output, rows, global).backward();
        if let Some(comm) = comm {
            data_parallel::average_gradients(comm, &self.params)?;
        }
        self.optimizer.step();
        if rows == 0 {
            return Ok(0.0);
        }
        Ok(mean.double_value(&[]) * rows as f64)
    }

    /// One pass over `train` in a fresh order, with fresh noise; returns the mean training MSE
    /// (over the whole training set: every replica's rows).
    fn train_epoch(&mut self, run: &mut Run<'_, '_>, train: &ImageSet, epoch: u32) -> Result<f64, TrainError> {
        let config = &run.task.spec.config;
        let n = train.len();
        let mut weighted_loss = 0.0;
        for_each_batch(n, config, epoch, train.images.device(), run.events, |batch| {
            let clean = train.images.index_select(0, batch);
            // The whole global batch, so that every replica draws the same noise for every row.
            let noisy = corrupt(&clean, config.noise_std);
            weighted_loss += self.train_step(&clean, &noisy, run.shard, run.comm.as_deref_mut())?;
            Ok(())
        })?;
        let total = data_parallel::sum_over_gang(run.comm(), &[weighted_loss])?[0];
        Ok(total / n as f64)
    }
}

fn check_config(config: &TrainingConfig, train_len: usize) -> Result<(), TrainError> {
    if config.batch_size == 0 || config.batch_size as usize > train_len {
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
/// under `eval_name`, and end the epoch ([`Run::end_epoch`]), where `after_epoch` may emit
/// artifacts. With a gang (`inputs.gang`), every replica trains and evaluates its share and rank
/// 0 alone reports, checkpoints and calls `after_epoch`. Returns the trained autoencoder on rank
/// 0 with its run (to emit the final artifacts), `None` on the other replicas.
fn train_loop<'r, 'e>(
    task: &'r Task,
    inputs: &'r RunInputs<'r>,
    events: &'r mut Events<'e>,
    train: &ImageSet,
    eval: (&Tensor, &Tensor, &'static str),
    mut after_epoch: impl FnMut(&Dae, u32, &mut Run<'_, '_>) -> Result<(), TrainError>,
) -> Result<Option<(Trainee, Run<'r, 'e>)>, TrainError> {
    let config = &task.spec.config;
    check_config(config, train.len())?;
    let mut run = Run::join(task, inputs, events)?;
    let mut trainee = Trainee::new(config, inputs.device);
    let epochs = run.resume(&mut trainee.vars, &mut [&mut trainee.optimizer])?;
    let (eval_noisy, eval_clean, eval_name) = eval;
    for epoch in epochs {
        let started = Instant::now();
        let train_mse = finite(trainee.train_epoch(&mut run, train, epoch)?, epoch, "train_mse")?;
        let eval_mse = evaluate_mse_sharded(&trainee.model, eval_noisy, eval_clean, &mut run)?;
        let eval_mse = finite(eval_mse, epoch, eval_name)?;
        let report = EpochReport {
            epoch,
            values: vec![("train_mse".into(), train_mse), (eval_name.into(), eval_mse)],
            seconds: started.elapsed().as_secs_f64(),
            samples: train.len() as u64,
        };
        run.end_epoch(report, &trainee.vars, &[&trainee.optimizer], |run| after_epoch(&trainee.model, epoch, run))?;
    }
    let leader = run.finish(&trainee.vars, &[&trainee.optimizer])?;
    Ok(leader.then_some((trainee, run)))
}

/// `dae-fold`: train on k−1 folds, validate on the held-out fold each epoch.
///
/// Reports `train_mse` and `val_mse` per epoch; the coordinator takes the minimum of `val_mse`.
pub fn run_fold(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let fold = task.spec.fold.ok_or_else(|| TrainError::Invalid("dae-fold without a fold".into()))?;
    let data_phase = super::phase(Phase::Data);
    let all = super::load_dataset(task, inputs)?.train;
    if fold.folds < 2 || fold.index >= fold.folds || all.len() < fold.folds as usize {
        return Err(TrainError::Invalid(format!("fold {} of {} over {} samples", fold.index, fold.folds, all.len())));
    }
    let (train_idx, val_idx) = kfold(all.len(), fold.folds as usize, fold.index as usize, fold.shuffle_seed);
    let device = all.images.device();
    let train = super::augment(task, inputs, all.select(&Tensor::from_slice(&train_idx).to_device(device)), Some(fold));
    let val = all.select(&Tensor::from_slice(&val_idx).to_device(device));
    let val_noisy = fixed_noisy(&val.images, &task.spec.config);
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

/// `dae-final`: train on the whole (augmented) training set, report `test_mse` each epoch;
/// alone or as one replica of a gang (rank 0 reports and emits).
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
    let test_noisy = fixed_noisy(&data.test.images, &task.spec.config);
    drop(data_phase);
    let shown = RECONSTRUCTIONS.min(data.test.len() as i64);
    let last_epoch = task.spec.config.epochs;
    let trained = train_loop(task, inputs, events, &train, (&test_noisy, &data.test.images, "test_mse"), |model, epoch, run| {
        if epoch != 1 && epoch != last_epoch {
            return Ok(());
        }
        let noisy = test_noisy.narrow(0, 0, shown);
        let output = tch::no_grad(|| model.forward_t(&noisy, false));
        let clean = data.test.images.narrow(0, 0, shown);
        let tensors = [("noisy", noisy), ("output", output), ("clean", clean)];
        run.emit_artifact(&format!("reconstructions-e{epoch}"), epoch, &tensors)
    })?;
    let Some((trainee, mut run)) = trained else {
        return Ok(());
    };
    let latents = latent_codes(&trainee.model.encoder, &data.test.images);
    run.emit_artifact("latents", last_epoch, &[("latents", latents), ("labels", data.test.labels.shallow_clone())])
}

/// Loads a DAE's weights from a checkpoint file (for tools and tests).
pub fn load_model(path: &std::path::Path, latent: i64, device: Device) -> Result<(nn::VarStore, Dae), TrainError> {
    let mut vars = nn::VarStore::new(device);
    let model = Dae::new(&vars.root(), latent);
    Loaded::read(path)?.restore_model(&mut vars)?;
    Ok((vars, model))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::{Device, Kind};

    use super::*;
    use crate::collective::ring::local_ring;

    fn config() -> TrainingConfig {
        TrainingConfig {
            lr: 1e-2,
            weight_decay: 1e-4,
            batch_size: 4,
            epochs: 1,
            noise_std: 0.3,
            latent: 3,
            seed: 5,
            ..TrainingConfig::default()
        }
    }

    /// Adam's epsilon in these tests: large, so that an update is smooth in the gradient. With
    /// the recipe's 1e-8, the first steps move every weight by about ±lr whatever its gradient's
    /// size, so a gradient component within rounding of zero could flip a weight by 2 × lr.
    const SMOOTH_EPS: f64 = 1.0;

    /// Fixed, varied values of `shape` (no random generator: other tests share libtorch's).
    fn pattern(shape: &[i64], phase: f64, scale: f64) -> Tensor {
        let count: i64 = shape.iter().product();
        ((Tensor::arange(count, (Kind::Float, Device::Cpu)) * 0.7311 + phase).sin() * scale).view(shape)
    }

    /// A trainee holding `weights` (so the global generator, which other tests share, plays no part).
    fn trainee_with(weights: &[(String, Tensor)]) -> Trainee {
        let config = config();
        let vars = nn::VarStore::new(Device::Cpu);
        let model = Dae::new(&vars.root(), i64::from(config.latent));
        let named = trainable(&vars);
        tch::no_grad(|| {
            for ((name, mut variable), (weight_name, weight)) in named.iter().map(|(n, t)| (n, t.shallow_clone())).zip(weights) {
                assert_eq!(name, weight_name);
                variable.copy_(weight);
            }
        });
        let params = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let optimizer = Adam::new(vec![ParamGroup { params: named, lr: config.lr, weight_decay: config.weight_decay }], BETAS, SMOOTH_EPS);
        Trainee { vars, model, optimizer, params }
    }

    /// Tensors by variable name.
    type Weights = Vec<(String, Tensor)>;

    /// Weights for every variable of the autoencoder, by name.
    fn fresh_weights() -> Weights {
        let vars = nn::VarStore::new(Device::Cpu);
        let _model = Dae::new(&vars.root(), i64::from(config().latent));
        trainable(&vars).into_iter().enumerate().map(|(index, (name, t))| (name, pattern(&t.size(), index as f64, 0.2))).collect()
    }

    fn weights_of(trainee: &Trainee) -> Weights {
        trainable(&trainee.vars).into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
    }

    #[test]
    fn replicas_train_the_weights_one_process_would_even_on_uneven_batches() {
        let initial = fresh_weights();
        // Global batches of 4 (even shares), 3 (2 + 1), 1 (1 + nothing), 4 rows.
        let batches: Vec<(Tensor, Tensor)> = [4, 3, 1, 4]
            .iter()
            .enumerate()
            .map(|(step, &rows)| {
                let clean = pattern(&[rows, 1, 28, 28], step as f64, 1.0).abs();
                let noisy = &clean + pattern(&[rows, 1, 28, 28], step as f64 + 0.5, 0.3);
                (clean, noisy)
            })
            .collect();

        let mut single = trainee_with(&initial);
        let single_losses: Vec<f64> =
            batches.iter().map(|(clean, noisy)| single.train_step(clean, noisy, Shard::SOLE, None).unwrap()).collect();
        let expected = weights_of(&single);

        let ring = local_ring(2, "dae-equivalence", Duration::from_secs(30)).unwrap();
        let replicas: Vec<(Vec<f64>, Weights)> = std::thread::scope(|scope| {
            let handles: Vec<_> = ring
                .into_iter()
                .map(|mut member| {
                    let mut trainee = trainee_with(&initial);
                    let batches: Vec<(Tensor, Tensor)> = batches.iter().map(|(c, n)| (c.copy(), n.copy())).collect();
                    scope.spawn(move || {
                        let shard = Shard { rank: member.rank(), world: 2 };
                        let losses = batches
                            .iter()
                            .map(|(clean, noisy)| trainee.train_step(clean, noisy, shard, Some(&mut member)).unwrap())
                            .collect();
                        (losses, weights_of(&trainee))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        for (rank, (_, weights)) in replicas.iter().enumerate() {
            for (((name, ours), (_, theirs)), (_, start)) in weights.iter().zip(&expected).zip(&initial) {
                let error = (ours - theirs).abs().max().double_value(&[]);
                let moved = (theirs - start).abs().max().double_value(&[]);
                // A few float32 rounding steps, against how far training moved the tensor.
                assert!(error <= 1e-7 + 1e-3 * moved, "rank {rank}: {name} differs from one process by {error:e} (moved {moved:e})");
            }
        }
        for ((name, a), (_, b)) in replicas[0].1.iter().zip(&replicas[1].1) {
            assert!(a.equal(b), "{name}: the replicas hold identical weights");
        }
        for (step, single_loss) in single_losses.iter().enumerate() {
            let gang_loss = replicas[0].0[step] + replicas[1].0[step];
            assert!((gang_loss - single_loss).abs() < 1e-5 * single_loss.abs().max(1.0), "step {step}: {gang_loss} vs {single_loss}");
        }
        assert_eq!(replicas[1].0[2], 0.0, "the empty share adds nothing to the training loss");
        assert!(initial.iter().zip(&expected).any(|((_, a), (_, b))| !a.equal(b)), "training moved the weights");
    }
}
