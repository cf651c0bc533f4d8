//! The seed's WGAN-GP (report §2.3): a DCGAN-shaped generator and critic and the gradient penalty.
//!
//! The report says "stride=1" and initialisation "std=2"; neither can work (five stride-1 4×4
//! transposed convolutions from 1×1 give 16×16, not 64×64, and std 2 saturates every layer), so
//! as in DCGAN, which the cited WGAN-GP paper builds on, the first transposed convolution has
//! stride 1 and the rest stride 2 (padding 1), and weights are drawn from N(0, 0.02).

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

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
                let norm = (!last).then(|| nn::batch_norm2d(path / format!("bn{}", i + 1), channels[i + 1], Default::default()));
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
                Some(norm) => xs.apply_t(norm, train).relu(),
                None => xs.tanh(),
            };
        }
        xs
    }
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
    let wasserstein = critic.score(real, labels).mean(Kind::Float) - critic.score(fake, labels).mean(Kind::Float);
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
