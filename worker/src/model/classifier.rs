//! The seed's classifier (report §1.5): the autoencoder's encoder followed by linear
//! latent→256 (ReLU) → 10 with log-softmax, trained with negative log-likelihood.
//!
//! The encoder's variables live under `encoder.*`, the same names as in the autoencoder, so a
//! DAE checkpoint's encoder loads straight into it.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::dae::Encoder;
use super::torch_linear;

/// Width of the classifier's hidden layer.
pub const HIDDEN: i64 = 256;
/// Number of classes.
pub const CLASSES: i64 = 10;

/// Encoder plus classification head.
#[derive(Debug)]
pub struct Classifier {
    /// The (pretrained) encoder.
    pub encoder: Encoder,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Classifier {
    /// Builds the classifier's variables under `path` (`encoder.*`, `head.fc1.*`, `head.fc2.*`).
    pub fn new(path: &nn::Path, latent: i64) -> Self {
        let head = path / "head";
        Self {
            encoder: Encoder::new(&(path / "encoder"), latent),
            fc1: torch_linear(&head / "fc1", latent, HIDDEN),
            fc2: torch_linear(&head / "fc2", HIDDEN, CLASSES),
        }
    }

    /// True for variables of the encoder (they train with the smaller learning rate).
    pub fn is_encoder_variable(name: &str) -> bool {
        name.starts_with("encoder.")
    }
}

impl ModuleT for Classifier {
    /// Log-probabilities `[N, 10]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.encoder.forward_t(xs, train).apply(&self.fc1).relu().apply(&self.fc2).log_softmax(-1, xs.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn outputs_log_probabilities() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Classifier::new(&vs.root(), 4);
        let out = model.forward_t(&Tensor::rand([3, 1, 28, 28], (Kind::Float, Device::Cpu)), false);
        assert_eq!(out.size(), [3, 10]);
        let total = out.exp().sum_dim_intlist(-1, false, Kind::Float);
        assert!(total.allclose(&Tensor::ones([3], (Kind::Float, Device::Cpu)), 1e-5, 1e-5, false));
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.iter().any(|n| n == "encoder.fc2.weight") && names.iter().any(|n| n == "head.fc2.bias"), "{names:?}");
    }
}
