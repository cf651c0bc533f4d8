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
/// The seed's channel widths, widest first.
pub const SEED_WIDTHS: [i64; 4] = [1024, 512, 256, 128];
/// Negative slope of the critic's LeakyReLU.
const LEAKY_SLOPE: f64 = 0.2;
/// Standard deviation of the weight initialisation.
const INIT_STD: f64 = 0.02;

fn init() -> nn::Init {
    nn::Init::Randn { mean: 0.0, stdev: INIT_STD }
}

/// Generator: `[N, 100]` noise to `[N, 1, 64, 64]` images in (−1, 1).
#[derive(Debug)]
pub struct Generator {
    layers: Vec<(nn::ConvTranspose2D, Option<nn::BatchNorm>)>,
}

impl Generator {
    /// Builds the generator under `path`; `widths` are the four hidden channel counts, widest first.
    pub fn new(path: &nn::Path, widths: [i64; 4]) -> Self {
        let channels = [NOISE_DIM, widths[0], widths[1], widths[2], widths[3], 1];
        let layers = (0..5)
            .map(|i| {
                let (stride, padding) = if i == 0 { (1, 0) } else { (2, 1) };
                let config = nn::ConvTransposeConfig { stride, padding, ws_init: init(), bias: i == 4, ..Default::default() };
                let conv = nn::conv_transpose2d(path / format!("deconv{}", i + 1), channels[i], channels[i + 1], 4, config);
                let norm = (i < 4).then(|| nn::batch_norm2d(path / format!("bn{}", i + 1), channels[i + 1], Default::default()));
                (conv, norm)
            })
            .collect();
        Self { layers }
    }
}

impl ModuleT for Generator {
    fn forward_t(&self, noise: &Tensor, train: bool) -> Tensor {
        let mut xs = noise.view([-1, NOISE_DIM, 1, 1]);
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

/// Critic: `[N, 1, 64, 64]` images to `[N]` scores, no final activation.
#[derive(Debug)]
pub struct Critic {
    convs: Vec<nn::Conv2D>,
    norms: Vec<InstanceNorm>,
}

impl Critic {
    /// Builds the critic under `path`, mirroring a generator of the same `widths`.
    pub fn new(path: &nn::Path, widths: [i64; 4]) -> Self {
        let channels = [1, widths[3], widths[2], widths[1], widths[0], 1];
        let convs = (0..5)
            .map(|i| {
                let (stride, padding) = if i == 4 { (1, 0) } else { (2, 1) };
                let config = nn::ConvConfig { stride, padding, ws_init: init(), bias: i == 0 || i == 4, ..Default::default() };
                nn::conv2d(path / format!("conv{}", i + 1), channels[i], channels[i + 1], 4, config)
            })
            .collect();
        // The first layer sees raw pixels and is not normalised (as in DCGAN); layers 2–4 are.
        let norms = (1..4).map(|i| InstanceNorm::new(path / format!("in{}", i + 1), channels[i + 1])).collect();
        Self { convs, norms }
    }

    /// LeakyReLU with the seed's slope, as `lerp(x, relu(x), 1 − slope)` = slope·x + (1 − slope)·relu(x).
    /// tch's `leaky_relu` takes no slope. Of the compositions that do, this one costs least in the
    /// gradient penalty's double backward (docs/performance.md): `maximum(x, slope·x)` takes
    /// comparison masks in each backward, and PReLU's backward kernel is not vectorised.
    fn leaky_relu(xs: &Tensor) -> Tensor {
        xs.lerp(&xs.relu(), 1.0 - LEAKY_SLOPE)
    }
}

impl ModuleT for Critic {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let mut xs = Self::leaky_relu(&xs.apply(&self.convs[0]));
        for (conv, norm) in self.convs[1..4].iter().zip(&self.norms) {
            xs = Self::leaky_relu(&norm.forward(&xs.apply(conv)));
        }
        xs.apply(&self.convs[4]).view([-1])
    }
}

/// The gradient penalty λ·E[(‖∇D(x̂)‖₂ − 1)²] on interpolates x̂ = fake + ε·(real − fake), with
/// ε ~ U(0, 1) per sample given as `epsilon` (`[N]`). Keeps the graph for the double backward.
pub fn gradient_penalty(critic: &Critic, real: &Tensor, fake: &Tensor, epsilon: &Tensor, lambda: f64) -> Tensor {
    let eps = epsilon.view([-1, 1, 1, 1]);
    let interpolates = (fake + (real - fake) * &eps).detach().set_requires_grad(true);
    let scores = critic.forward_t(&interpolates, true);
    let gradients = Tensor::run_backward(&[scores.sum(Kind::Float)], &[&interpolates], true, true).remove(0);
    let norms = gradients.flatten(1, -1).norm_scalaropt_dim(2, [1], false);
    (norms - 1.0).square().mean(Kind::Float) * lambda
}

/// The critic's loss: E[D(fake)] − E[D(real)] + penalty. Returns (loss, Wasserstein estimate, penalty).
pub fn critic_loss(critic: &Critic, real: &Tensor, fake: &Tensor, epsilon: &Tensor, lambda: f64) -> (Tensor, Tensor, Tensor) {
    let wasserstein = critic.forward_t(real, true).mean(Kind::Float) - critic.forward_t(fake, true).mean(Kind::Float);
    let penalty = gradient_penalty(critic, real, fake, epsilon, lambda);
    (&penalty - &wasserstein, wasserstein, penalty)
}

/// The generator's loss: −E[D(G(z))].
pub fn generator_loss(critic: &Critic, fake: &Tensor) -> Tensor {
    -critic.forward_t(fake, true).mean(Kind::Float)
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
        let generator = Generator::new(&(vs.root() / "generator"), widths);
        let critic = Critic::new(&(vs.root() / "critic"), widths);
        let noise = Tensor::randn([3, NOISE_DIM], (Kind::Float, Device::Cpu));
        let images = generator.forward_t(&noise, true);
        assert_eq!(images.size(), [3, 1, 64, 64]);
        assert!(images.abs().max().double_value(&[]) < 1.0);
        assert_eq!(critic.forward_t(&images, true).size(), [3]);
        let eps = Tensor::rand([3], (Kind::Float, Device::Cpu));
        let (loss, _, penalty) = critic_loss(&critic, &images.detach(), &images.detach().flip([3]), &eps, 10.0);
        assert!(penalty.double_value(&[]) > 0.0 && loss.double_value(&[]).is_finite());
    }
}
