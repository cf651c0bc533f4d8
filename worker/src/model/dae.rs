//! The seed's convolutional denoising autoencoder (report §1.2).
//!
//! Encoder: three 3×3 stride-2 convolutions with 8, 16 and 32 filters (padding 1, 1, 0, so a
//! 28×28 digit becomes 32×3×3 = 288 features), then linear 288→64→latent. The decoder mirrors it
//! with transposed convolutions and ends in a sigmoid. ReLU between all layers.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::{torch_default_init, torch_linear};

/// Features after the last convolution: 32 channels of 3×3.
pub const CONV_FEATURES: i64 = 32 * 3 * 3;
/// Width of the hidden linear layer.
pub const HIDDEN: i64 = 64;

fn conv(path: nn::Path, c_in: i64, c_out: i64, padding: i64) -> nn::Conv2D {
    let init = torch_default_init(c_in * 3 * 3);
    nn::conv2d(path, c_in, c_out, 3, nn::ConvConfig { stride: 2, padding, ws_init: init, bs_init: init, ..Default::default() })
}

fn deconv(path: nn::Path, c_in: i64, c_out: i64, padding: i64, output_padding: i64) -> nn::ConvTranspose2D {
    let init = torch_default_init(c_out * 3 * 3);
    let config = nn::ConvTransposeConfig { stride: 2, padding, output_padding, ws_init: init, bs_init: init, ..Default::default() };
    nn::conv_transpose2d(path, c_in, c_out, 3, config)
}

/// The encoder: a `[N, 1, 28, 28]` image to a `[N, latent]` code.
#[derive(Debug)]
pub struct Encoder {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Encoder {
    /// Builds the encoder's variables under `path`.
    pub fn new(path: &nn::Path, latent: i64) -> Self {
        Self {
            conv1: conv(path / "conv1", 1, 8, 1),
            conv2: conv(path / "conv2", 8, 16, 1),
            conv3: conv(path / "conv3", 16, 32, 0),
            fc1: torch_linear(path / "fc1", CONV_FEATURES, HIDDEN),
            fc2: torch_linear(path / "fc2", HIDDEN, latent),
        }
    }
}

impl ModuleT for Encoder {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .apply(&self.conv2)
            .relu()
            .apply(&self.conv3)
            .relu()
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

/// The decoder: a `[N, latent]` code back to a `[N, 1, 28, 28]` image in (0, 1).
#[derive(Debug)]
pub struct Decoder {
    fc1: nn::Linear,
    fc2: nn::Linear,
    deconv1: nn::ConvTranspose2D,
    deconv2: nn::ConvTranspose2D,
    deconv3: nn::ConvTranspose2D,
}

impl Decoder {
    /// Builds the decoder's variables under `path`.
    pub fn new(path: &nn::Path, latent: i64) -> Self {
        Self {
            fc1: torch_linear(path / "fc1", latent, HIDDEN),
            fc2: torch_linear(path / "fc2", HIDDEN, CONV_FEATURES),
            deconv1: deconv(path / "deconv1", 32, 16, 0, 0),
            deconv2: deconv(path / "deconv2", 16, 8, 1, 1),
            deconv3: deconv(path / "deconv3", 8, 1, 1, 1),
        }
    }
}

impl ModuleT for Decoder {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        xs.apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
            .relu()
            .view([-1, 32, 3, 3])
            .apply(&self.deconv1)
            .relu()
            .apply(&self.deconv2)
            .relu()
            .apply(&self.deconv3)
            .sigmoid()
    }
}

/// The whole autoencoder; its variables live under `encoder.*` and `decoder.*`.
#[derive(Debug)]
pub struct Dae {
    /// Image to latent code.
    pub encoder: Encoder,
    /// Latent code to image.
    pub decoder: Decoder,
}

impl Dae {
    /// Builds the autoencoder's variables under `path`.
    pub fn new(path: &nn::Path, latent: i64) -> Self {
        Self { encoder: Encoder::new(&(path / "encoder"), latent), decoder: Decoder::new(&(path / "decoder"), latent) }
    }
}

impl ModuleT for Dae {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.decoder.forward_t(&self.encoder.forward_t(xs, train), train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn shapes_follow_the_seed() {
        let vs = nn::VarStore::new(Device::Cpu);
        let dae = Dae::new(&vs.root(), 4);
        let xs = Tensor::rand([5, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(dae.encoder.forward_t(&xs, false).size(), [5, 4]);
        let out = dae.forward_t(&xs, false);
        assert_eq!(out.size(), [5, 1, 28, 28]);
        assert!(out.min().double_value(&[]) > 0.0 && out.max().double_value(&[]) < 1.0);
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.contains(&"encoder.conv3.weight".to_string()), "{names:?}");
        assert!(names.contains(&"decoder.deconv3.bias".to_string()), "{names:?}");
    }

    #[test]
    fn initialisation_follows_pytorch_bounds() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _dae = Dae::new(&vs.root(), 4);
        let variables = vs.variables();
        // conv1: fan_in 1·3·3 → bound 1/3; deconv1 (transposed): fan_in out 16·3·3 → 1/12; fc1: 288.
        for (name, bound) in [
            ("encoder.conv1.weight", 1.0 / 3.0),
            ("encoder.conv1.bias", 1.0 / 3.0),
            ("decoder.deconv1.weight", 1.0 / 12.0),
            ("encoder.fc1.bias", 1.0 / 288f64.sqrt()),
        ] {
            let max = variables[name].abs().max().double_value(&[]);
            assert!(max <= bound && max > bound * 0.5, "{name}: max |w| {max}, bound {bound}");
        }
    }
}
