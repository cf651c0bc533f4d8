//! The WGAN-GP recipe (report §2): `critic_steps` critic updates, each on a fresh real batch,
//! per generator update; both with Adam(lr, betas (β1, β2)); gradient penalty λ.

use std::time::Instant;

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use super::{checkpoint_due, emit_artifact, finite, save_checkpoint, streams, trainable, EpochReport, Events, RunInputs, TrainError, TrainEvent};
use crate::checkpoint;
use crate::data::split::{derive_seed, permutation};
use crate::model::wgan::{self, Critic, Generator, NOISE_DIM};
use crate::optim::{Adam, ParamGroup};
use crate::task::{Task, WganConfig};

/// The side of the images the generator makes.
pub const IMAGE_SIZE: i64 = 64;

/// Generator and critic with their optimizers.
struct Gan {
    vars: nn::VarStore,
    generator: Generator,
    critic: Critic,
    generator_optimizer: Adam,
    critic_optimizer: Adam,
    done_epochs: u32,
}

impl Gan {
    fn new(task: &Task, recipe: &WganConfig, inputs: &RunInputs<'_>) -> Result<Self, TrainError> {
        let config = &task.config;
        tch::manual_seed(config.seed as i64);
        let mut vars = nn::VarStore::new(inputs.device);
        let generator = Generator::new(&(vars.root() / "generator"), recipe.widths);
        let critic = Critic::new(&(vars.root() / "critic"), recipe.widths);
        let (generator_params, critic_params): (Vec<_>, Vec<_>) =
            trainable(&vars).into_iter().partition(|(name, _)| name.starts_with("generator."));
        let betas = (recipe.beta1, recipe.beta2);
        let group = |params| vec![ParamGroup { params, lr: config.lr, weight_decay: config.weight_decay }];
        let mut generator_optimizer = Adam::new(group(generator_params), betas, 1e-8).with_state_prefix("optim.generator.");
        let mut critic_optimizer = Adam::new(group(critic_params), betas, 1e-8).with_state_prefix("optim.critic.");
        let done_epochs = checkpoint::resume(inputs.resume_from, &mut vars, &mut [&mut generator_optimizer, &mut critic_optimizer])?;
        Ok(Self { vars, generator, critic, generator_optimizer, critic_optimizer, done_epochs })
    }

    fn noise(&self, count: i64) -> Tensor {
        Tensor::randn([count, NOISE_DIM], (Kind::Float, self.vars.device()))
    }

    /// One critic update on a real batch; returns (loss, Wasserstein estimate, penalty).
    fn critic_step(&mut self, real: &Tensor, lambda: f64) -> (f64, f64, f64) {
        let count = real.size()[0];
        let fake = tch::no_grad(|| self.generator.forward_t(&self.noise(count), true));
        let epsilon = Tensor::rand([count], (Kind::Float, real.device()));
        let (loss, wasserstein, penalty) = wgan::critic_loss(&self.critic, real, &fake, &epsilon, lambda);
        self.critic_optimizer.zero_grad();
        loss.backward();
        self.critic_optimizer.step();
        (loss.double_value(&[]), wasserstein.double_value(&[]), penalty.double_value(&[]))
    }

    /// One generator update; returns its loss.
    fn generator_step(&mut self, count: i64) -> f64 {
        let loss = wgan::generator_loss(&self.critic, &self.generator.forward_t(&self.noise(count), true));
        self.generator_optimizer.zero_grad();
        loss.backward();
        self.generator_optimizer.step();
        loss.double_value(&[])
    }
}

/// Running means of an epoch's figures.
#[derive(Default)]
struct Means {
    sums: [f64; 4],
    critic_steps: f64,
    generator_steps: f64,
}

/// `wgan`: trains one replica. Reports `critic_loss`, `generator_loss`, `wasserstein` and
/// `gradient_penalty` (epoch means) per epoch. Artifacts: `real` (a grid's worth of training
/// images) at the start, `samples-e{epoch}` (the fixed noise through the generator) after the
/// first epoch, every `sample_every` epochs and at the end.
pub fn run(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let config = &task.config;
    let recipe = config.wgan.as_ref().ok_or_else(|| TrainError::Invalid("wgan trial without its recipe".into()))?;
    let train = super::load_dataset(task, inputs)?.train;
    let size = train.images.size();
    if size[2] != IMAGE_SIZE || size[3] != IMAGE_SIZE {
        return Err(TrainError::Invalid(format!("the generator makes {IMAGE_SIZE}×{IMAGE_SIZE} images, the data is {}×{}", size[2], size[3])));
    }
    let n = train.len();
    if config.batch_size < 2 || config.batch_size > n || recipe.critic_steps == 0 {
        return Err(TrainError::Invalid(format!("batch size {} with {n} images, {} critic steps", config.batch_size, recipe.critic_steps)));
    }
    let mut gan = Gan::new(task, recipe, inputs)?;
    tch::manual_seed(derive_seed(config.seed, streams::EVALUATION) as i64);
    let sample_count = i64::from(recipe.sample_count.max(1));
    let fixed_noise = gan.noise(sample_count);
    if gan.done_epochs == 0 {
        let real = train.images.narrow(0, 0, sample_count.min(n as i64));
        emit_artifact(task, inputs, "real", 0, &[("images", real)], events)?;
    }
    for epoch in gan.done_epochs + 1..=config.epochs {
        let started = Instant::now();
        let order = Tensor::from_slice(&permutation(n, derive_seed(config.seed, streams::SHUFFLE + u64::from(epoch)))).to_device(train.images.device());
        tch::manual_seed(derive_seed(config.seed, streams::NOISE + u64::from(epoch)) as i64);
        let mut means = Means::default();
        let mut start = 0;
        while start < n {
            events.check_stop()?;
            let len = config.batch_size.min(n - start);
            let real = train.images.index_select(0, &order.narrow(0, start as i64, len as i64));
            start += len;
            let (loss, wasserstein, penalty) = gan.critic_step(&real, recipe.gp_lambda);
            means.sums[0] += loss;
            means.sums[2] += wasserstein;
            means.sums[3] += penalty;
            means.critic_steps += 1.0;
            if means.critic_steps as u32 % recipe.critic_steps == 0 {
                means.sums[1] += gan.generator_step(config.batch_size as i64);
                means.generator_steps += 1.0;
            }
        }
        let critic_loss = finite(means.sums[0] / means.critic_steps, epoch, "critic_loss")?;
        let mut values = vec![
            ("critic_loss".to_string(), critic_loss),
            ("wasserstein".to_string(), means.sums[2] / means.critic_steps),
            ("gradient_penalty".to_string(), means.sums[3] / means.critic_steps),
        ];
        if means.generator_steps > 0.0 {
            values.push(("generator_loss".into(), finite(means.sums[1] / means.generator_steps, epoch, "generator_loss")?));
        }
        (events.emit)(TrainEvent::Epoch(EpochReport {
            epoch,
            values,
            seconds: started.elapsed().as_secs_f64(),
            samples: n as u64,
        }));
        let periodic = recipe.sample_every > 0 && epoch % recipe.sample_every == 0;
        if epoch == 1 || periodic || epoch == config.epochs {
            let samples = tch::no_grad(|| gan.generator.forward_t(&fixed_noise, false));
            emit_artifact(task, inputs, &format!("samples-e{epoch}"), epoch, &[("images", samples), ("noise", fixed_noise.shallow_clone())], events)?;
        }
        if let Some(is_final) = checkpoint_due(task, epoch) {
            save_checkpoint(task, inputs, &gan.vars, &[&gan.generator_optimizer, &gan.critic_optimizer], epoch, is_final, events)?;
        }
    }
    if gan.done_epochs >= config.epochs {
        save_checkpoint(task, inputs, &gan.vars, &[&gan.generator_optimizer, &gan.critic_optimizer], config.epochs, true, events)?;
    }
    Ok(())
}
