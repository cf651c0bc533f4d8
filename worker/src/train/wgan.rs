//! The WGAN-GP recipe (report §2): `critic_steps` critic updates, each on a fresh real batch,
//! per generator update; both with Adam(lr, betas (β1, β2)); gradient penalty λ.
//!
//! Critic steps are counted over the whole trial, not per epoch: the generator steps after every
//! `critic_steps`-th critic step of the trial, whatever the epoch length. On a small dataset an
//! epoch may hold fewer batches than `critic_steps`; a count restarted every epoch would then
//! never reach it and the generator would never train. The count is the critic optimizer's step
//! count, which checkpoints save and resumes restore, so a resumed trial keeps the schedule.
//!
//! Class-conditional (`conditional`), the generator takes each row's class from the image
//! folder's labels and the critic is a projection critic (`model/wgan.rs`): a critic step's fakes
//! are made for the real batch's classes, and a generator step's for the same classes.
//! Every `eval_every` epochs, rank 0 reports the sliced Wasserstein distance of generated images
//! to the test set (`wgan_eval.rs`) and, with a judge classifier, the class accuracy of
//! generated samples (`wgan_judge.rs`).
//!
//! Data parallel over a gang of `world` replicas, it computes what one process would on the
//! global batch: every replica walks the same shuffled order and draws the same global noise
//! (shared seeds), takes its rows of each global batch for the critic, and averages gradients
//! after every backward pass. BatchNorm (in the generator) sees the global batch. In a critic
//! step, where the generator runs without gradients, each replica on the CPU generates its own
//! rows with the global batch's statistics, summed over the gang (`Generator::generate_synced`;
//! on CUDA it runs the generator over the global batch, as in the generator step). In a
//! generator step, whose gradient must also flow through the statistics from every replica's
//! rows, each replica runs the generator over all of the global batch's noise. So the batch
//! statistics, the running statistics and the generator's gradient equal the single-process
//! ones (within float rounding), and the work is split but for the generator step's generator.

use std::time::Instant;

use tch::nn;
use tch::{Device, Kind, Tensor};

use super::data_parallel::{self, Shard};
use super::wgan_eval;
use super::wgan_judge::Judge;
use super::{finite, streams, trainable, EpochReport, Events, Run, RunInputs, TrainError};
use crate::collective::{CollectiveError, Communicator};
use crate::data::split::{derive_seed, permutation};
use crate::model::wgan::{self, Critic, Generator, NOISE_DIM};
use crate::optim::{Adam, ParamGroup};
use crate::task::{Task, WganSpec};

/// The side of the images the seed's generator (four widths) makes.
pub const IMAGE_SIZE: i64 = 64;

/// Generator and critic with their optimizers.
pub struct Gan {
    /// Every variable of both networks (`generator.*`, `critic.*`).
    pub vars: nn::VarStore,
    /// The generator.
    pub generator: Generator,
    /// The critic.
    pub critic: Critic,
    generator_params: Vec<Tensor>,
    critic_params: Vec<Tensor>,
    generator_optimizer: Adam,
    critic_optimizer: Adam,
    classes: i64,
}

impl Gan {
    /// Builds both networks (initialised from libtorch's generator) and their optimizers.
    pub fn new(widths: impl AsRef<[i64]>, lr: f64, betas: (f64, f64), device: Device) -> Self {
        Self::conditional(widths, 0, lr, betas, device)
    }

    /// Builds class-conditional networks for `classes` classes (0: unconditional).
    pub fn conditional(widths: impl AsRef<[i64]>, classes: i64, lr: f64, betas: (f64, f64), device: Device) -> Self {
        let widths = widths.as_ref();
        let vars = nn::VarStore::new(device);
        let generator = Generator::new(&(vars.root() / "generator"), widths, classes);
        let critic = Critic::new(&(vars.root() / "critic"), widths, classes);
        let (generator_named, critic_named): (Vec<_>, Vec<_>) =
            trainable(&vars).into_iter().partition(|(name, _)| name.starts_with("generator."));
        let generator_params = generator_named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let critic_params = critic_named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let group = |params| vec![ParamGroup { params, lr, weight_decay: 0.0 }];
        let generator_optimizer = Adam::new(group(generator_named), betas, 1e-8).with_state_prefix("optim.generator.");
        let critic_optimizer = Adam::new(group(critic_named), betas, 1e-8).with_state_prefix("optim.critic.");
        Self { vars, generator, critic, generator_params, critic_params, generator_optimizer, critic_optimizer, classes }
    }

    /// The number of classes (0: unconditional).
    pub fn classes(&self) -> i64 {
        self.classes
    }

    /// The labels to condition on: `labels` for a conditional GAN, none otherwise.
    fn condition<'a>(&self, labels: Option<&'a Tensor>) -> Option<&'a Tensor> {
        labels.filter(|_| self.classes > 0)
    }

    /// Draws noise for `count` generator inputs from libtorch's (seeded) generator.
    pub fn noise(&self, count: i64) -> Tensor {
        Tensor::randn([count, NOISE_DIM], (Kind::Float, self.vars.device()))
    }

    /// The critic's loss on this replica's rows of a global batch (real images, generator noise,
    /// interpolation coefficients), back-propagated; gradients then averaged over the gang.
    /// Returns this replica's (loss, Wasserstein estimate, penalty).
    pub fn critic_gradients(
        &mut self,
        real: &Tensor,
        noise: &Tensor,
        epsilon: &Tensor,
        lambda: f64,
        shard: Shard,
        comm: Option<&mut (dyn Communicator + 'static)>,
    ) -> Result<(f64, f64, f64), CollectiveError> {
        self.critic_gradients_given(real, None, noise, epsilon, lambda, shard, comm)
    }

    /// [`Gan::critic_gradients`] with the global batch's class `labels` (conditional GANs: the
    /// fakes are generated for the real rows' classes).
    #[allow(clippy::too_many_arguments)]
    pub fn critic_gradients_given(
        &mut self,
        real: &Tensor,
        labels: Option<&Tensor>,
        noise: &Tensor,
        epsilon: &Tensor,
        lambda: f64,
        shard: Shard,
        comm: Option<&mut (dyn Communicator + 'static)>,
    ) -> Result<(f64, f64, f64), CollectiveError> {
        let labels = self.condition(labels);
        let own_labels = labels.map(|l| shard.slice(l));
        let mut comm = comm;
        // A gang's replica generates its own rows only, with the global batch's statistics. On
        // the CPU only: on CUDA each layer's statistics would cross to the host for the sum, four
        // device synchronisations a step, a trade no GPU has measured yet; there every replica
        // keeps running the generator over the global batch.
        let own_fake = match comm.as_deref_mut() {
            Some(comm) if shard.world > 1 && self.vars.device() == Device::Cpu => {
                let global_rows = noise.size()[0];
                let mut gang_sum = |values: &[f64]| data_parallel::sum_over_gang(Some(&mut *comm), values);
                tch::no_grad(|| self.generator.generate_synced(&shard.slice(noise), own_labels.as_ref(), global_rows, &mut gang_sum))?
            }
            _ => shard.slice(&tch::no_grad(|| self.generator.generate(noise, labels, true))),
        };
        let (loss, wasserstein, penalty) =
            wgan::critic_loss_given(&self.critic, &shard.slice(real), &own_fake, own_labels.as_ref(), &shard.slice(epsilon), lambda);
        self.critic_optimizer.zero_grad();
        loss.backward();
        if let Some(comm) = comm {
            data_parallel::average_gradients(comm, &self.critic_params)?;
        }
        Ok((loss.double_value(&[]), wasserstein.double_value(&[]), penalty.double_value(&[])))
    }

    /// The generator's loss on this replica's rows of the global batch made from `noise` (the
    /// generator itself runs on all of it, so BatchNorm sees the global batch), back-propagated;
    /// gradients then averaged over the gang. Returns this replica's loss.
    pub fn generator_gradients(
        &mut self,
        noise: &Tensor,
        shard: Shard,
        comm: Option<&mut (dyn Communicator + 'static)>,
    ) -> Result<f64, CollectiveError> {
        self.generator_gradients_given(noise, None, shard, comm)
    }

    /// [`Gan::generator_gradients`] for the global batch's class `labels` (conditional GANs).
    pub fn generator_gradients_given(
        &mut self,
        noise: &Tensor,
        labels: Option<&Tensor>,
        shard: Shard,
        comm: Option<&mut (dyn Communicator + 'static)>,
    ) -> Result<f64, CollectiveError> {
        let labels = self.condition(labels);
        let fake = self.generator.generate(noise, labels, true);
        let own_labels = labels.map(|l| shard.slice(l));
        let loss = wgan::generator_loss_given(&self.critic, &shard.slice(&fake), own_labels.as_ref());
        self.generator_optimizer.zero_grad();
        // The critic's weights take no gradient from this loss: the backward pass only goes
        // through the critic to its input (as PyTorch's recipes switch `requires_grad` off).
        set_requires_grad(&self.critic_params, false);
        loss.backward();
        set_requires_grad(&self.critic_params, true);
        if let Some(comm) = comm {
            data_parallel::average_gradients(comm, &self.generator_params)?;
        }
        Ok(loss.double_value(&[]))
    }

    /// Applies the critic's optimizer step (after [`Gan::critic_gradients`]).
    pub fn step_critic(&mut self) {
        self.critic_optimizer.step();
    }

    /// Applies the generator's optimizer step (after [`Gan::generator_gradients`]).
    pub fn step_generator(&mut self) {
        self.generator_optimizer.step();
    }

    /// Critic updates taken since the trial began. This is the critic optimizer's step count:
    /// it is part of every checkpoint and restored on resume, and it advances once per global
    /// batch on every replica of a gang, so all replicas agree on it. (Checkpoints written while
    /// the generator's schedule restarted every epoch carry the same count: the critic stepped
    /// once per batch then too.)
    pub fn critic_steps_taken(&self) -> u64 {
        u64::try_from(self.critic_optimizer.steps()).unwrap_or(0)
    }

    /// The gradients of the critic's or the generator's parameters, by name (for tests).
    pub fn gradients(&self, prefix: &str) -> Vec<(String, Tensor)> {
        trainable(&self.vars).into_iter().filter(|(name, _)| name.starts_with(prefix)).map(|(name, t)| (name, t.grad())).collect()
    }
}

/// Switches `requires_grad` on or off for every tensor of `params`, in place.
fn set_requires_grad(params: &[Tensor], requires_grad: bool) {
    for param in params {
        let _ = param.set_requires_grad(requires_grad);
    }
}

/// Whether a generator update follows the critic update that brought the trial's count of critic
/// updates to `critic_steps_taken`: one after every `critic_steps`-th critic update of the trial.
pub fn generator_step_due(critic_steps_taken: u64, critic_steps: u32) -> bool {
    critic_steps > 0 && critic_steps_taken > 0 && critic_steps_taken.is_multiple_of(u64::from(critic_steps))
}

/// Running sums of an epoch's figures: critic loss, Wasserstein estimate, penalty, generator loss.
#[derive(Default)]
struct Sums {
    critic: [f64; 3],
    generator: f64,
    critic_steps: f64,
    generator_steps: f64,
}

/// `wgan`: trains one WGAN-GP, alone or as one replica of a gang. Reports (rank 0) `critic_loss`,
/// `wasserstein` and `gradient_penalty` (epoch means over the gang) per epoch, `generator_loss`
/// for every epoch in which the generator stepped (every epoch when an epoch has at least
/// `critic_steps` batches), every `eval_every` epochs `swd*` and, with a judge classifier,
/// `class_accuracy*`, and at the end each replica's `param_checksum_rank{r}`. Artifacts
/// (rank 0): `real` (a grid's worth of training images) at the start, `samples-e{epoch}` (the
/// fixed noise through the generator) after the first epoch, every `sample_every` epochs and at
/// the end.
pub fn run(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let config = &task.spec.config;
    let recipe: &WganSpec = config.wgan.as_ref().ok_or_else(|| TrainError::Invalid("wgan trial without its recipe".into()))?;
    let data = super::load_dataset(task, inputs)?;
    let (train, test) = (data.train, data.test);
    let size = train.images.size();
    let side = wgan::image_size_for(recipe.widths.len());
    if size[2] != side || size[3] != side {
        return Err(TrainError::Invalid(format!(
            "{} widths make {side}×{side} images, the data is {}×{}",
            recipe.widths.len(),
            size[2],
            size[3]
        )));
    }
    let classes = if recipe.conditional { train.labels.max().int64_value(&[]) + 1 } else { 0 };
    let judge = match &recipe.judge {
        Some(spec) => {
            let path = inputs.judge.ok_or_else(|| TrainError::Invalid("the judge classifier's checkpoint was not fetched".into()))?;
            let judge = Judge::load(path, &spec.digits, inputs.device)?;
            if classes == 0 || classes > judge.classes() {
                return Err(TrainError::Invalid(format!(
                    "the judge knows the digits of {} classes, the training set has {classes}",
                    judge.classes()
                )));
            }
            Some(judge)
        }
        None => None,
    };
    let mut run = Run::join(task, inputs, events)?;
    let n = train.len();
    let batch = config.batch_size as usize;
    if batch < 2 || batch > n || recipe.critic_steps == 0 || !batch.is_multiple_of(run.shard.world) {
        return Err(TrainError::Invalid(format!(
            "batch size {batch} with {n} images, {} critic steps, {} replicas (the batch must split evenly)",
            recipe.critic_steps, run.shard.world
        )));
    }
    tch::manual_seed(config.weights_seed() as i64);
    let widths: Vec<i64> = recipe.widths.iter().map(|&width| i64::from(width)).collect();
    let mut gan = Gan::conditional(&widths, classes, config.lr, (recipe.beta1, recipe.beta2), inputs.device);
    let epochs = run.resume(&mut gan.vars, &mut [&mut gan.generator_optimizer, &mut gan.critic_optimizer])?;
    tch::manual_seed(derive_seed(config.seed, streams::EVALUATION) as i64);
    let sample_count = i64::from(recipe.sample_count.max(1));
    // Conditional grids: one row per class, sample_count / classes columns (at least one).
    let sample_labels = (classes > 0).then(|| {
        let columns = (sample_count / classes).max(1);
        Tensor::arange(classes, (Kind::Int64, inputs.device)).repeat_interleave_self_int(columns, Some(0), None::<i64>)
    });
    let fixed_noise = gan.noise(sample_labels.as_ref().map_or(sample_count, |l| l.size()[0]));
    if run.done_epochs == 0 && run.leader() {
        // Evenly spaced through the training set (a volume's slices run bottom to top).
        let count = sample_count.min(n as i64);
        let picks: Vec<i64> = (0..count).map(|i| i * n as i64 / count).collect();
        let picks = Tensor::from_slice(&picks).to_device(train.images.device());
        let mut tensors = vec![("images", train.images.index_select(0, &picks))];
        if classes > 0 {
            // The report draws them one row per class, as the samples.
            tensors.push(("labels", train.labels.index_select(0, &picks)));
        }
        run.emit_artifact("real", 0, &tensors)?;
    }
    for epoch in epochs {
        let started = Instant::now();
        let order = Tensor::from_slice(&permutation(n, derive_seed(config.seed, streams::SHUFFLE + u64::from(epoch))))
            .to_device(train.images.device());
        tch::manual_seed(derive_seed(config.seed, streams::NOISE + u64::from(epoch)) as i64);
        let mut sums = Sums::default();
        // Full global batches only, so every replica's share is the same size.
        for step in 0..n / batch {
            run.events.check_stop()?;
            let timer = crate::metrics::metrics().step_seconds.start_timer();
            let rows = order.narrow(0, (step * batch) as i64, batch as i64);
            let real = train.images.index_select(0, &rows);
            let labels = (classes > 0).then(|| train.labels.index_select(0, &rows));
            let noise = gan.noise(batch as i64);
            let epsilon = Tensor::rand([batch as i64], (Kind::Float, real.device()));
            let (loss, wasserstein, penalty) =
                gan.critic_gradients_given(&real, labels.as_ref(), &noise, &epsilon, recipe.gp_lambda, run.shard, run.comm())?;
            gan.step_critic();
            for (sum, value) in sums.critic.iter_mut().zip([loss, wasserstein, penalty]) {
                *sum += value;
            }
            sums.critic_steps += 1.0;
            // The trial's count, not the epoch's (see the module's documentation).
            if generator_step_due(gan.critic_steps_taken(), recipe.critic_steps) {
                let noise = gan.noise(batch as i64);
                sums.generator += gan.generator_gradients_given(&noise, labels.as_ref(), run.shard, run.comm())?;
                gan.step_generator();
                sums.generator_steps += 1.0;
            }
            timer.observe_duration();
        }
        let mut totals = [sums.critic[0] as f32, sums.critic[1] as f32, sums.critic[2] as f32, sums.generator as f32];
        if let Some(comm) = run.comm() {
            comm.all_reduce_sum(&mut totals)?;
        }
        let world = run.shard.world as f64;
        let critic_steps = sums.critic_steps.max(1.0) * world;
        let mut values = vec![
            ("critic_loss".to_string(), finite(f64::from(totals[0]) / critic_steps, epoch, "critic_loss")?),
            ("wasserstein".to_string(), f64::from(totals[1]) / critic_steps),
            ("gradient_penalty".to_string(), f64::from(totals[2]) / critic_steps),
        ];
        // An epoch without a generator step has no generator loss to report: rather than a
        // made-up figure, the key is left out (the submit warning names such configurations).
        if sums.generator_steps > 0.0 {
            values.push(("generator_loss".into(), finite(f64::from(totals[3]) / (sums.generator_steps * world), epoch, "generator_loss")?));
        }
        if epoch == config.epochs {
            let checksums = match run.comm() {
                Some(comm) => data_parallel::gather_scalar(comm, data_parallel::checksum(&gan.vars))?,
                None => vec![data_parallel::checksum(&gan.vars)],
            };
            for (rank, value) in checksums.into_iter().enumerate() {
                values.push((format!("param_checksum_rank{rank}"), f64::from(value)));
            }
        }
        let periodic = recipe.sample_every > 0 && epoch % recipe.sample_every == 0;
        // Every replica samples (in training mode the forward pass also moves BatchNorm's running
        // statistics, which must stay identical across replicas); rank 0 keeps the grid.
        // Every replica evaluates (the same figures): a rank 0 evaluating alone would keep the
        // others waiting in the next epoch's first collective, past its timeout on a large test set.
        if wgan_eval::due(recipe.eval_every, epoch, config.epochs) {
            if !test.is_empty() {
                values.extend(wgan_eval::evaluate(&gan, &test, config.seed)?);
            }
            if let Some(judge) = &judge {
                values.extend(judge.evaluate(&gan, config.seed));
            }
        }
        let samples = (epoch == 1 || periodic || epoch == config.epochs)
            .then(|| tch::no_grad(|| gan.generator.generate(&fixed_noise, sample_labels.as_ref(), true)));
        let report = EpochReport { epoch, values, seconds: started.elapsed().as_secs_f64(), samples: n as u64 };
        run.end_epoch(report, &gan.vars, &[&gan.generator_optimizer, &gan.critic_optimizer], |run| {
            let Some(samples) = samples else {
                return Ok(());
            };
            // Batch statistics, as in training: early on the running statistics are still far
            // from them and would show a blank image instead of the generator's output.
            let mut tensors = vec![("images", samples), ("noise", fixed_noise.shallow_clone())];
            if let Some(labels) = &sample_labels {
                tensors.push(("labels", labels.shallow_clone()));
            }
            run.emit_artifact(&format!("samples-e{epoch}"), epoch, &tensors)
        })?;
    }
    run.finish(&gan.vars, &[&gan.generator_optimizer, &gan.critic_optimizer]).map(|_leader| ())
}
