//! The seed's networks, each a struct implementing `nn::ModuleT`, built from an `nn::Path`.

pub mod classifier;
pub mod dae;
pub mod wgan;

use tch::nn;

/// PyTorch's default initialisation of convolution and linear layers: weights from
/// kaiming_uniform(a = √5) and biases alike, which is U(−1/√fan_in, 1/√fan_in) for both.
/// (tch's own defaults differ: Kaiming with ReLU gain for weights, zero conv biases.)
/// `fan_in` is in_features for a linear layer, in_channels·k·k for a convolution and, as
/// PyTorch computes it from the weight's second dimension, out_channels·k·k for a transposed one.
pub fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// A linear layer initialised as PyTorch's `nn.Linear`.
pub fn torch_linear(path: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let init = torch_default_init(in_dim);
    nn::linear(path, in_dim, out_dim, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}
