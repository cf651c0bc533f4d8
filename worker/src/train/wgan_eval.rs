//! The WGAN-GP's test-set metric: the sliced Wasserstein distance (`crate::swd`) between the
//! test images and as many generated ones, per pyramid level and their mean, and for a
//! conditional GAN per class too (each class's test images against images generated for it).
//!
//! The generated images come from noise of a fixed seed, so every evaluation of a trial uses
//! the same noise, patches and directions and the figures compare across epochs. The generator
//! runs in training mode (batch statistics, as the sample grids) in chunks; BatchNorm's running
//! statistics are put back afterwards, so evaluating changes nothing the training sees. Every
//! replica of a gang evaluates (and gets the same figures; rank 0 reports them), so none waits
//! for another in a collective meanwhile.

use tch::{Kind, Tensor};

use super::streams;
use super::wgan::Gan;
use super::TrainError;
use crate::data::split::derive_seed;
use crate::data::ImageSet;
use crate::model::wgan::NOISE_DIM;
use crate::swd::{self, SwdConfig};

/// Generated images per generator forward pass.
const CHUNK: i64 = 256;

/// Whether epoch `epoch` of `epochs` reports the metric: every `eval_every` epochs and at the
/// last one (never when `eval_every` is 0).
pub fn due(eval_every: u32, epoch: u32, epochs: u32) -> bool {
    eval_every > 0 && (epoch.is_multiple_of(eval_every) || epoch == epochs)
}

/// Images from the generator for `noise` (and `labels`), in chunks, with BatchNorm's running
/// statistics restored afterwards.
pub fn generate(gan: &Gan, noise: &Tensor, labels: Option<&Tensor>) -> Tensor {
    let buffers: Vec<(Tensor, Tensor)> =
        gan.vars.variables().into_iter().filter(|(_, t)| !t.requires_grad()).map(|(_, t)| (t.copy(), t)).collect();
    let n = noise.size()[0];
    let images = tch::no_grad(|| {
        let chunks: Vec<Tensor> = (0..n)
            .step_by(CHUNK as usize)
            .map(|start| {
                let len = CHUNK.min(n - start);
                let rows = labels.map(|l| l.narrow(0, start, len));
                gan.generator.generate(&noise.narrow(0, start, len), rows.as_ref(), true)
            })
            .collect();
        Tensor::cat(&chunks, 0)
    });
    tch::no_grad(|| {
        for (saved, mut live) in buffers {
            live.copy_(&saved);
        }
    });
    images
}

/// `swd` (the mean over levels), `swd_{resolution}` per level and, for a conditional GAN,
/// `swd_class{k}` (its levels' mean) per class with test images.
pub fn evaluate(gan: &Gan, test: &ImageSet, seed: u64) -> Result<Vec<(String, f64)>, TrainError> {
    let n = test.len() as i64;
    let device = test.images.device();
    let stream = derive_seed(seed, streams::SWD);
    tch::manual_seed(stream as i64);
    let noise = Tensor::randn([n, NOISE_DIM], (Kind::Float, device));
    let labels = (gan.classes() > 0).then(|| test.labels.shallow_clone());
    let fake = generate(gan, &noise, labels.as_ref());
    let config = SwdConfig::default();
    let overall = swd::swd(&test.images, &fake, stream, &config);
    let mut values = vec![("swd".to_string(), overall.mean)];
    values.extend(overall.levels.iter().map(|(resolution, distance)| (format!("swd_{resolution}"), *distance)));
    for class in 0..gan.classes() {
        let rows = test.labels.eq(class).nonzero().squeeze_dim(1);
        if rows.size()[0] == 0 {
            continue;
        }
        let per_class = swd::swd(&test.images.index_select(0, &rows), &fake.index_select(0, &rows), stream, &config);
        values.push((format!("swd_class{class}"), per_class.mean));
    }
    // A figure that is not a number (a generator that diverged) is left out rather than reported.
    values.retain(|(_, v)| v.is_finite());
    Ok(values)
}
