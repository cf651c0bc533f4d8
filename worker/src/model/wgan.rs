//! The seed's WGAN-GP (report §2.3): a DCGAN-shaped generator and critic and the gradient penalty.
//!
//! The report says "stride=1" and initialisation "std=2"; neither can work (five stride-1 4×4
//! transposed convolutions from 1×1 give 16×16, not 64×64, and std 2 saturates every layer), so
//! as in DCGAN, which the cited WGAN-GP paper builds on, the first transposed convolution has
//! stride 1 and the rest stride 2 (padding 1), and weights are drawn from N(0, 0.02).

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use crate::collective::CollectiveError;

/// Length of the generator's input noise.
pub const NOISE_DIM: i64 = 100;
/// Length of the conditional generator's learned class embedding, concatenated to the noise.
pub const CLASS_EMBED_DIM: i64 = 32;
/// The seed's channel widths, widest first.
pub const SEED_WIDTHS: [i64; 4] = [1024, 512, 256, 128];
/// Negative slope of the critic's LeakyReLU.
const LEAKY_SLOPE: f64 = 0.2;
/// Standard deviation of the weight initialisation.
const INIT_STD: f64 = 0.02;
/// The generator's BatchNorm settings (tch's defaults), named because the gang's synchronised
/// statistics ([`Generator::generate_synced`]) apply them by hand.
const NORM_EPS: f64 = 1e-5;
const NORM_MOMENTUM: f64 = 0.1;

/// Sums float64 values element-wise over every replica of a gang, every replica getting
/// bitwise the same sums (`train::data_parallel::sum_over_gang`).
pub type GangSum<'a> = dyn FnMut(&[f64]) -> Result<Vec<f64>, CollectiveError> + 'a;

fn init() -> nn::Init {
    nn::Init::Randn { mean: 0.0, stdev: INIT_STD }
}

/// The side of the images made by networks with `stages` hidden widths: a 4×4 start doubled by
/// every stride-2 stage (3 widths: 32, 4 widths: 64, 5 widths: 128).
pub fn image_size_for(stages: usize) -> i64 {
    4 << stages
}

/// How many hidden widths (stride-2 stages) networks need for `image_size`×`image_size` images:
/// `Some(3)` for 32, `Some(4)` for 64, `Some(5)` for 128, `None` for a size that is not 4·2^k
/// with k ≥ 1.
pub fn stages_for(image_size: i64) -> Option<usize> {
    (1..=8).find(|&stages| image_size_for(stages) == image_size)
}

/// Generator: `[N, 100]` noise (with `[N]` class labels when conditional) to
/// `[N, 1, S, S]` images in (−1, 1), S = 4·2^(number of widths).
#[derive(Debug)]
pub struct Generator {
    layers: Vec<(nn::ConvTranspose2D, Option<nn::BatchNorm>)>,
    /// The conditional generator's class embedding (`[classes, CLASS_EMBED_DIM]`).
    embedding: Option<nn::Embedding>,
}

impl Generator {
    /// Builds the generator under `path`; `widths` are the hidden channel counts, widest first,
    /// one per stage (four for the seed's 64×64). With `classes` > 0 it is class-conditional: a
    /// learned class embedding (`embedding.weight`) is concatenated to the noise.
    pub fn new(path: &nn::Path, widths: impl AsRef<[i64]>, classes: i64) -> Self {
        let widths = widths.as_ref();
        let input = if classes > 0 { NOISE_DIM + CLASS_EMBED_DIM } else { NOISE_DIM };
        let channels: Vec<i64> = std::iter::once(input).chain(widths.iter().copied()).chain([1]).collect();
        let stages = widths.len();
        let layers = (0..=stages)
            .map(|i| {
                let (stride, padding) = if i == 0 { (1, 0) } else { (2, 1) };
                let last = i == stages;
                let config = nn::ConvTransposeConfig { stride, padding, ws_init: init(), bias: last, ..Default::default() };
                let conv = nn::conv_transpose2d(path / format!("deconv{}", i + 1), channels[i], channels[i + 1], 4, config);
                let norm_config = nn::BatchNormConfig { eps: NORM_EPS, momentum: NORM_MOMENTUM, ..Default::default() };
                let norm = (!last).then(|| nn::batch_norm2d(path / format!("bn{}", i + 1), channels[i + 1], norm_config));
                (conv, norm)
            })
            .collect();
        let embedding = (classes > 0).then(|| {
            let config = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 1.0 }, ..Default::default() };
            nn::embedding(path / "embedding", classes, CLASS_EMBED_DIM, config)
        });
        Self { layers, embedding }
    }

    /// The number of classes of a conditional generator (0 when unconditional).
    pub fn classes(&self) -> i64 {
        self.embedding.as_ref().map_or(0, |e| e.ws.size()[0])
    }

    /// Images from `noise` and, for a conditional generator, the class `labels` (`[N]` int64).
    ///
    /// # Panics
    ///
    /// When a conditional generator gets no labels.
    pub fn generate(&self, noise: &Tensor, labels: Option<&Tensor>, train: bool) -> Tensor {
        self.generate_with(noise, labels, |xs, norm| Ok::<_, std::convert::Infallible>(xs.apply_t(norm, train)))
            .unwrap_or_else(|never| match never {})
    }

    /// [`Generator::generate`] in training mode for one replica's rows (`noise`, `labels`) of a
    /// global batch of `global_rows` rows, with BatchNorm's batch statistics taken over the global
    /// batch: each layer's per-channel sums and sums of squares (float64) are summed over the
    /// gang by `gang_sum`. The images are the global batch's images' rows within float rounding,
    /// and every replica's running statistics move as one process's do, bitwise alike on every
    /// replica. So a replica computes its own rows only, not the whole global batch.
    ///
    /// No gradient flows through the gang's statistics: this is for the critic's steps, which
    /// run the generator under `no_grad`. (The generator's own step needs the statistics'
    /// gradient from every replica, and runs [`Generator::generate`] on the global batch.)
    pub fn generate_synced(
        &self,
        noise: &Tensor,
        labels: Option<&Tensor>,
        global_rows: i64,
        gang_sum: &mut GangSum<'_>,
    ) -> Result<Tensor, CollectiveError> {
        self.generate_with(noise, labels, |xs, norm| synced_batch_norm(xs, norm, global_rows, gang_sum))
    }

    /// The generator's layers with `normalize` as each hidden layer's BatchNorm.
    fn generate_with<E>(
        &self,
        noise: &Tensor,
        labels: Option<&Tensor>,
        mut normalize: impl FnMut(&Tensor, &nn::BatchNorm) -> Result<Tensor, E>,
    ) -> Result<Tensor, E> {
        let noise = noise.view([-1, NOISE_DIM]);
        let input = match &self.embedding {
            Some(embedding) => {
                let labels = labels.expect("a conditional generator needs class labels");
                Tensor::cat(&[noise, labels.apply(embedding)], 1)
            }
            None => noise,
        };
        let channels = input.size()[1];
        let mut xs = input.view([-1, channels, 1, 1]);
        for (conv, norm) in &self.layers {
            xs = xs.apply(conv);
            xs = match norm {
                Some(norm) => normalize(&xs, norm)?.relu(),
                None => xs.tanh(),
            };
        }
        Ok(xs)
    }
}

/// Training-mode BatchNorm of one replica's rows `xs` (`[n, C, H, W]`) with the statistics of
/// the global batch of `global_rows` rows (see [`Generator::generate_synced`]). Updates the
/// running statistics as libtorch does: the biased variance normalises, the unbiased one is
/// averaged in.
fn synced_batch_norm(xs: &Tensor, norm: &nn::BatchNorm, global_rows: i64, gang_sum: &mut GangSum<'_>) -> Result<Tensor, CollectiveError> {
    let size = xs.size();
    let channels = size[1];
    let count = (global_rows * size[2] * size[3]) as f64;
    let wide = xs.to_kind(Kind::Double);
    let dims = &[0i64, 2, 3][..];
    let local =
        Tensor::cat(&[wide.sum_dim_intlist(dims, false, Kind::Double), wide.square().sum_dim_intlist(dims, false, Kind::Double)], 0);
    let local = Vec::<f64>::try_from(&local.to_device(tch::Device::Cpu)).expect("float64 statistics to host");
    let global = Tensor::from_slice(&gang_sum(&local)?).to_device(xs.device());
    let mean = global.narrow(0, 0, channels) / count;
    let variance = (global.narrow(0, channels, channels) / count - mean.square()).clamp_min(0.0);
    tch::no_grad(|| {
        let unbiased = &variance * (count / (count - 1.0).max(1.0));
        let mut running_mean = norm.running_mean.shallow_clone();
        let mut running_var = norm.running_var.shallow_clone();
        let moved_mean = running_mean.to_kind(Kind::Double) * (1.0 - NORM_MOMENTUM) + &mean * NORM_MOMENTUM;
        let moved_var = running_var.to_kind(Kind::Double) * (1.0 - NORM_MOMENTUM) + unbiased * NORM_MOMENTUM;
        running_mean.copy_(&moved_mean);
        running_var.copy_(&moved_var);
    });
    let (mean, variance) = (mean.to_kind(xs.kind()), variance.to_kind(xs.kind()));
    Ok(Tensor::batch_norm(xs, norm.ws.as_ref(), norm.bs.as_ref(), Some(&mean), Some(&variance), false, 0.0, NORM_EPS, false))
}

impl ModuleT for Generator {
    fn forward_t(&self, noise: &Tensor, train: bool) -> Tensor {
        self.generate(noise, None, train)
    }
}

/// An affine instance normalisation (per-sample statistics, so the penalty stays per-sample).
#[derive(Debug)]
struct InstanceNorm {
    weight: Tensor,
    bias: Tensor,
}

impl InstanceNorm {
    fn new(path: nn::Path, channels: i64) -> Self {
        Self { weight: path.ones("weight", &[channels]), bias: path.zeros("bias", &[channels]) }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        Tensor::instance_norm(xs, Some(&self.weight), Some(&self.bias), None::<&Tensor>, None::<&Tensor>, true, 0.1, 1e-5, false)
    }
}

/// Critic: `[N, 1, S, S]` images (with `[N]` class labels when conditional) to `[N]` scores, no
/// final activation.
///
/// The conditional critic is a projection critic (Miyato & Koyama, 2018): the unconditional
/// score plus the inner product of a learned class embedding (`projection.weight`,
/// `[classes, widths[0]]`) with the last feature map summed over its 4×4 positions. Every
/// operation is per sample, so the gradient penalty stays per sample.
#[derive(Debug)]
pub struct Critic {
    convs: Vec<nn::Conv2D>,
    norms: Vec<InstanceNorm>,
    projection: Option<nn::Embedding>,
}

impl Critic {
    /// Builds the critic under `path`, mirroring a generator of the same `widths`; with
    /// `classes` > 0, a projection critic for that many classes.
    pub fn new(path: &nn::Path, widths: impl AsRef<[i64]>, classes: i64) -> Self {
        let widths = widths.as_ref();
        let stages = widths.len();
        let channels: Vec<i64> = std::iter::once(1).chain(widths.iter().rev().copied()).chain([1]).collect();
        let convs = (0..=stages)
            .map(|i| {
                let last = i == stages;
                let (stride, padding) = if last { (1, 0) } else { (2, 1) };
                let config = nn::ConvConfig { stride, padding, ws_init: init(), bias: i == 0 || last, ..Default::default() };
                nn::conv2d(path / format!("conv{}", i + 1), channels[i], channels[i + 1], 4, config)
            })
            .collect();
        // The first layer sees raw pixels and is not normalised (as in DCGAN); the other hidden ones are.
        let norms = (1..stages).map(|i| InstanceNorm::new(path / format!("in{}", i + 1), channels[i + 1])).collect();
        let projection = (classes > 0).then(|| {
            let config = nn::EmbeddingConfig { ws_init: init(), ..Default::default() };
            nn::embedding(path / "projection", classes, channels[stages], config)
        });
        Self { convs, norms, projection }
    }

    /// LeakyReLU with the seed's slope, as `lerp(x, relu(x), 1 − slope)` = slope·x + (1 − slope)·relu(x).
    /// tch's `leaky_relu` takes no slope. Of the compositions that do, this one costs least in the
    /// gradient penalty's double backward (docs/performance.md): `maximum(x, slope·x)` takes
    /// comparison masks in each backward, and PReLU's backward kernel is not vectorised.
    fn leaky_relu(xs: &Tensor) -> Tensor {
        xs.lerp(&xs.relu(), 1.0 - LEAKY_SLOPE)
    }

    /// The scores of `images`, with the class `labels` for a projection critic.
    ///
    /// # Panics
    ///
    /// When a conditional critic gets no labels.
    pub fn score(&self, images: &Tensor, labels: Option<&Tensor>) -> Tensor {
        let mut xs = Self::leaky_relu(&images.apply(&self.convs[0]));
        let hidden = self.convs.len() - 1;
        for (conv, norm) in self.convs[1..hidden].iter().zip(&self.norms) {
            xs = Self::leaky_relu(&norm.forward(&xs.apply(conv)));
        }
        let scores = xs.apply(&self.convs[hidden]).view([-1]);
        match &self.projection {
            Some(projection) => {
                let labels = labels.expect("a conditional critic needs class labels");
                let features = xs.sum_dim_intlist(&[2i64, 3][..], false, Kind::Float);
                scores + (labels.apply(projection) * features).sum_dim_intlist(&[1i64][..], false, Kind::Float)
            }
            None => scores,
        }
    }
}

impl ModuleT for Critic {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.score(xs, None)
    }
}

/// The gradient penalty λ·E[(‖∇D(x̂)‖₂ − 1)²] on interpolates x̂ = fake + ε·(real − fake), with
/// ε ~ U(0, 1) per sample given as `epsilon` (`[N]`). Keeps the graph for the double backward.
pub fn gradient_penalty(critic: &Critic, real: &Tensor, fake: &Tensor, epsilon: &Tensor, lambda: f64) -> Tensor {
    gradient_penalty_given(critic, real, fake, None, epsilon, lambda)
}

/// [`gradient_penalty`] for a conditional critic: each interpolate is scored with its row's
/// class (real and fake rows share their labels).
pub fn gradient_penalty_given(
    critic: &Critic,
    real: &Tensor,
    fake: &Tensor,
    labels: Option<&Tensor>,
    epsilon: &Tensor,
    lambda: f64,
) -> Tensor {
    let eps = epsilon.view([-1, 1, 1, 1]);
    let interpolates = (fake + (real - fake) * &eps).detach().set_requires_grad(true);
    let scores = critic.score(&interpolates, labels);
    let gradients = Tensor::run_backward(&[scores.sum(Kind::Float)], &[&interpolates], true, true).remove(0);
    let norms = gradients.flatten(1, -1).norm_scalaropt_dim(2, [1], false);
    (norms - 1.0).square().mean(Kind::Float) * lambda
}

/// The critic's loss: E[D(fake)] − E[D(real)] + penalty. Returns (loss, Wasserstein estimate, penalty).
pub fn critic_loss(critic: &Critic, real: &Tensor, fake: &Tensor, epsilon: &Tensor, lambda: f64) -> (Tensor, Tensor, Tensor) {
    critic_loss_given(critic, real, fake, None, epsilon, lambda)
}

/// [`critic_loss`] with the rows' class `labels` for a conditional critic (the fake rows were
/// generated for the real rows' classes).
pub fn critic_loss_given(
    critic: &Critic,
    real: &Tensor,
    fake: &Tensor,
    labels: Option<&Tensor>,
    epsilon: &Tensor,
    lambda: f64,
) -> (Tensor, Tensor, Tensor) {
    // Real and fake rows in one pass: every operation of the critic is per sample, and one
    // larger batch keeps the convolutions' kernels busier than two halves.
    let rows = real.size()[0];
    let both_labels = labels.map(|labels| Tensor::cat(&[labels, labels], 0));
    let scores = critic.score(&Tensor::cat(&[real, fake], 0), both_labels.as_ref());
    let wasserstein = scores.narrow(0, 0, rows).mean(Kind::Float) - scores.narrow(0, rows, rows).mean(Kind::Float);
    let penalty = gradient_penalty_given(critic, real, fake, labels, epsilon, lambda);
    (&penalty - &wasserstein, wasserstein, penalty)
}

/// The generator's loss: −E[D(G(z))].
pub fn generator_loss(critic: &Critic, fake: &Tensor) -> Tensor {
    generator_loss_given(critic, fake, None)
}

/// [`generator_loss`] for a conditional critic: −E[D(G(z, y), y)].
pub fn generator_loss_given(critic: &Critic, fake: &Tensor, labels: Option<&Tensor>) -> Tensor {
    -critic.score(fake, labels).mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The critic's LeakyReLU is x for x > 0 and 0.2·x otherwise, with derivative 1 or 0.2 (also at
    /// 0, as PyTorch's), and its gradient is differentiable again (the penalty's double backward).
    #[test]
    fn leaky_relu_is_the_seeds() {
        let xs = Tensor::from_slice(&[-3.0f32, -0.5, 0.0, 0.25, 2.0]).set_requires_grad(true);
        let ys = Critic::leaky_relu(&xs);
        let expected = Tensor::from_slice(&[-0.6f32, -0.1, 0.0, 0.25, 2.0]);
        assert!(ys.allclose(&expected, 1e-6, 1e-7, false), "{ys}");
        let grads = Tensor::run_backward(&[(&ys * &xs).sum(Kind::Float)], &[&xs], true, true).remove(0);
        // d/dx (x·f(x)) = f(x) + x·f'(x) = 2·f(x) for this piecewise-linear f.
        assert!(grads.allclose(&(&expected * 2.0), 1e-6, 1e-6, false), "{grads}");
        let second = Tensor::run_backward(&[grads.sum(Kind::Float)], &[&xs], false, false).remove(0);
        let slopes = Tensor::from_slice(&[0.4f32, 0.4, 0.4, 2.0, 2.0]);
        assert!(second.allclose(&slopes, 1e-6, 1e-6, false), "{second}");
    }

    /// Every variable of `vars`, sorted by name.
    fn sorted(vars: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Variables of `vars` whose names contain `part`, as host copies, sorted by name.
    fn named(vars: &nn::VarStore, part: &str) -> Vec<(String, Vec<f32>)> {
        sorted(vars)
            .into_iter()
            .filter(|(name, _)| name.contains(part))
            .map(|(name, t)| (name, Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()))
            .collect()
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Replicas that each generate their own rows with the gang's statistics make the global
    /// batch's images and move the running statistics as one process does, alike on every replica.
    #[test]
    fn synced_statistics_make_the_global_batchs_images() {
        let widths = [16, 8, 8, 4];
        let (rows, world) = (12i64, 3usize);
        tch::manual_seed(5);
        let noise = Tensor::randn([rows, NOISE_DIM], (Kind::Float, Device::Cpu));
        tch::manual_seed(6);
        let (whole_vars, whole) = {
            let vs = nn::VarStore::new(Device::Cpu);
            let generator = Generator::new(&(vs.root() / "generator"), widths, 0);
            (vs, generator)
        };
        // Each replica starts from the same weights (copied: libtorch's generator is shared by
        // the replicas' threads, so seeding it in each would race).
        let weights = named(&whole_vars, "");
        let build = || {
            let vs = nn::VarStore::new(Device::Cpu);
            let generator = Generator::new(&(vs.root() / "generator"), widths, 0);
            tch::no_grad(|| {
                for ((_, values), (_, mut variable)) in weights.iter().zip(sorted(&vs)) {
                    variable.copy_(&Tensor::from_slice(values).view(variable.size().as_slice()));
                }
            });
            (vs, generator)
        };
        let expected = Vec::<f32>::try_from(&tch::no_grad(|| whole.generate(&noise, None, true)).flatten(0, -1)).unwrap();
        let expected_running = named(&whole_vars, "running");
        assert!(!expected_running.is_empty());

        let ring = crate::collective::ring::local_ring(world, "synced", std::time::Duration::from_secs(30)).unwrap();
        let noise_rows: Vec<f32> = Vec::try_from(&noise.flatten(0, -1)).unwrap();
        type Replica = (Vec<f32>, Vec<(String, Vec<f32>)>);
        let replicas: Vec<Replica> = std::thread::scope(|scope| {
            let handles: Vec<_> = ring
                .into_iter()
                .enumerate()
                .map(|(rank, mut member)| {
                    let noise_rows = noise_rows.clone();
                    scope.spawn(move || {
                        let (vars, generator) = build();
                        let per = rows / world as i64;
                        let own = Tensor::from_slice(&noise_rows).view([rows, NOISE_DIM]).narrow(0, rank as i64 * per, per);
                        let mut gang_sum = |values: &[f64]| crate::train::data_parallel::sum_over_gang(Some(&mut member), values);
                        let images = tch::no_grad(|| generator.generate_synced(&own, None, rows, &mut gang_sum)).unwrap();
                        (Vec::<f32>::try_from(&images.flatten(0, -1)).unwrap(), named(&vars, "running"))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let images: Vec<f32> = replicas.iter().flat_map(|(images, _)| images.iter().copied()).collect();
        assert!(max_difference(&images, &expected) < 1e-5, "images differ by {}", max_difference(&images, &expected));
        for (_, running) in &replicas {
            assert_eq!(running, &replicas[0].1, "every replica's running statistics are bitwise alike");
            for ((name, ours), (_, theirs)) in running.iter().zip(&expected_running) {
                assert!(max_difference(ours, theirs) < 1e-6, "{name} differs by {}", max_difference(ours, theirs));
            }
        }
        // One process: the identity as the gang's sum gives generate's images.
        let (_, sole) = build();
        let alone = tch::no_grad(|| sole.generate_synced(&noise, None, rows, &mut |values: &[f64]| Ok(values.to_vec()))).unwrap();
        assert!(max_difference(&Vec::<f32>::try_from(&alone.flatten(0, -1)).unwrap(), &expected) < 1e-5);
    }

    #[test]
    fn shapes_follow_the_seed() {
        let vs = nn::VarStore::new(Device::Cpu);
        let widths = [32, 16, 8, 4];
        let generator = Generator::new(&(vs.root() / "generator"), widths, 0);
        let critic = Critic::new(&(vs.root() / "critic"), widths, 0);
        let noise = Tensor::randn([3, NOISE_DIM], (Kind::Float, Device::Cpu));
        let images = generator.forward_t(&noise, true);
        assert_eq!(images.size(), [3, 1, 64, 64]);
        assert!(images.abs().max().double_value(&[]) < 1.0);
        assert_eq!(critic.forward_t(&images, true).size(), [3]);
        let eps = Tensor::rand([3], (Kind::Float, Device::Cpu));
        let (loss, _, penalty) = critic_loss(&critic, &images.detach(), &images.detach().flip([3]), &eps, 10.0);
        assert!(penalty.double_value(&[]) > 0.0 && loss.double_value(&[]).is_finite());
    }

    #[test]
    fn a_stage_more_or_less_changes_the_size() {
        assert_eq!((stages_for(32), stages_for(64), stages_for(128), stages_for(100)), (Some(3), Some(4), Some(5), None));
        for widths in [vec![16i64, 8, 4], vec![16, 8, 8, 4, 4]] {
            let vs = nn::VarStore::new(Device::Cpu);
            let generator = Generator::new(&(vs.root() / "generator"), &widths, 3);
            let critic = Critic::new(&(vs.root() / "critic"), &widths, 3);
            let labels = Tensor::from_slice(&[0i64, 2]);
            let images = generator.generate(&Tensor::randn([2, NOISE_DIM], (Kind::Float, Device::Cpu)), Some(&labels), true);
            let side = image_size_for(widths.len());
            assert_eq!(images.size(), [2, 1, side, side]);
            assert_eq!(critic.score(&images, Some(&labels)).size(), [2]);
            assert_eq!(generator.classes(), 3);
        }
    }
}
