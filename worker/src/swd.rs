//! The sliced Wasserstein distance between two image sets over Laplacian-pyramid patches, as
//! used to evaluate progressive GANs (Karras et al., 2018, and their `sliced_wasserstein.py`).
//!
//! Each set's images are split into a Laplacian pyramid (a 5×5 binomial filter with mirrored
//! borders; levels from the full resolution down to 16×16, the last one the Gaussian residual).
//! From every level, `patches_per_image` random 7×7 neighbourhoods per image become
//! descriptors, normalised per channel by the set's own mean and standard deviation. The
//! distance of a level is the mean, over `repeats` × `directions` random unit directions, of the
//! mean absolute difference between the two sets' sorted projections. It needs no pretrained
//! network. Patch positions and directions come from a SplitMix64 stream of the given seed, so
//! the figure is deterministic for a seed (`tools/reference/swd_reference.py` is the NumPy
//! implementation the tests check it against).

use tch::{Device, Kind, Tensor};

use crate::data::split::{derive_seed, SplitMix64};

/// The smallest pyramid level.
pub const MIN_RESOLUTION: i64 = 16;

/// The knobs of the metric (the paper's values by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwdConfig {
    /// Side of a neighbourhood.
    pub patch: i64,
    /// Neighbourhoods drawn per image and level.
    pub patches_per_image: i64,
    /// Sets of random directions.
    pub repeats: usize,
    /// Directions per set.
    pub directions: i64,
}

impl Default for SwdConfig {
    fn default() -> Self {
        Self { patch: 7, patches_per_image: 128, repeats: 4, directions: 128 }
    }
}

/// The distance at every pyramid level and their mean.
#[derive(Debug, Clone, PartialEq)]
pub struct Swd {
    /// (level resolution, distance), finest first.
    pub levels: Vec<(i64, f64)>,
    /// Mean over the levels.
    pub mean: f64,
}

/// The resolutions of the pyramid levels of `size`×`size` images: `size`, `size/2`, … ≥ 16.
pub fn resolutions(size: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut resolution = size;
    while resolution >= MIN_RESOLUTION {
        out.push(resolution);
        resolution /= 2;
    }
    out
}

fn binomial_kernel(scale: f64) -> Tensor {
    let taps = Tensor::from_slice(&[1.0f32, 4.0, 6.0, 4.0, 1.0]) / 16.0;
    (taps.view([5, 1]) * taps.view([1, 5]) * scale).view([1, 1, 5, 5])
}

/// Filters every channel with the 5×5 binomial kernel (times `scale`), mirrored borders, stride `stride`.
fn filter(images: &Tensor, scale: f64, stride: i64) -> Tensor {
    let size = images.size();
    let flat = images.reshape([size[0] * size[1], 1, size[2], size[3]]).reflection_pad2d([2, 2, 2, 2]);
    let kernel = binomial_kernel(scale).to_device(images.device());
    let out = flat.conv2d(&kernel, None::<&Tensor>, [stride, stride], [0, 0], [1, 1], 1);
    let out_size = out.size();
    out.reshape([size[0], size[1], out_size[2], out_size[3]])
}

fn pyramid_down(images: &Tensor) -> Tensor {
    filter(images, 1.0, 2)
}

fn pyramid_up(images: &Tensor) -> Tensor {
    let [n, c, h, w]: [i64; 4] = images.size().try_into().expect("images are [N, C, H, W]");
    let columns = Tensor::stack(&[images.shallow_clone(), images.zeros_like()], 4).view([n, c, h, 2 * w]);
    let rows = Tensor::stack(&[columns.shallow_clone(), columns.zeros_like()], 3).view([n, c, 2 * h, 2 * w]);
    filter(&rows, 4.0, 1)
}

/// The Laplacian pyramid of `images` (`[N, C, H, W]`, float) with `levels` levels, finest first;
/// the last level is the Gaussian residual.
pub fn laplacian_pyramid(images: &Tensor, levels: usize) -> Vec<Tensor> {
    let mut pyramid = vec![images.to_kind(Kind::Float)];
    for _ in 1..levels {
        let down = pyramid_down(pyramid.last().expect("not empty"));
        let last = pyramid.len() - 1;
        pyramid[last] = &pyramid[last] - pyramid_up(&down);
        pyramid.push(down);
    }
    pyramid
}

/// The `patch`×`patch` neighbourhoods of `level` (`[N, C, H, W]`) whose top-left corners are
/// `positions` (`[N, P, 2]` int64, (y, x)), as rows `[N·P, C·patch·patch]` (channel-major),
/// normalised per channel by their mean and (population) standard deviation (at least 1e-12).
pub fn descriptors(level: &Tensor, positions: &Tensor, patch: i64) -> Tensor {
    let [n, c, h, w]: [i64; 4] = level.size().try_into().expect("a level is [N, C, H, W]");
    let p = positions.size()[1];
    let device = level.device();
    let offsets = Tensor::arange(patch, (Kind::Int64, device));
    let ys = positions.select(2, 0).view([n, p, 1, 1]) + offsets.view([1, 1, patch, 1]);
    let xs = positions.select(2, 1).view([n, p, 1, 1]) + offsets.view([1, 1, 1, patch]);
    let index = (ys * w + xs).view([n, 1, p * patch * patch]).expand([n, c, p * patch * patch], false);
    let picked = level.reshape([n, c, h * w]).gather(2, &index, false).view([n, c, p, patch * patch]);
    let rows = picked.permute([0, 2, 1, 3]).reshape([n * p, c, patch * patch]);
    let mean = rows.mean_dim(&[0i64, 2][..], true, Kind::Float);
    // A constant set (a generator stuck at one grey level) has no spread: kept finite.
    let std = rows.std_dim(&[0i64, 2][..], false, true).clamp_min(1e-12);
    ((rows - mean) / std).reshape([n * p, c * patch * patch])
}

/// The sliced Wasserstein distance between descriptor sets `a` and `b` (same shape `[K, D]`)
/// along each matrix of `directions` (`[D, M]`, unit columns): the mean absolute difference of
/// the sorted projections, averaged over the matrices.
pub fn sliced_wasserstein(a: &Tensor, b: &Tensor, directions: &[Tensor]) -> f64 {
    let total: f64 = directions
        .iter()
        .map(|dirs| {
            // Each direction's projections as a contiguous row: sorting rows is faster than columns.
            let (projected_a, _) = a.matmul(dirs).tr().contiguous().sort(1, false);
            let (projected_b, _) = b.matmul(dirs).tr().contiguous().sort(1, false);
            (projected_a - projected_b).abs().to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
        })
        .sum();
    total / directions.len() as f64
}

/// A uniform double in (0, 1).
fn uniform(rng: &mut SplitMix64) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let (u, v) = (uniform(rng), uniform(rng));
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// `count` images' `per_image` random corners in `0..limit` (both axes), `[count, per_image, 2]`.
pub fn random_positions(seed: u64, count: i64, per_image: i64, limit: i64, device: Device) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let values: Vec<i64> = (0..count * per_image * 2).map(|_| rng.below(limit as u64) as i64).collect();
    Tensor::from_slice(&values).view([count, per_image, 2]).to_device(device)
}

/// A `[dim, count]` matrix of random unit columns.
pub fn random_directions(seed: u64, dim: i64, count: i64, device: Device) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let values: Vec<f32> = (0..dim * count).map(|_| normal(&mut rng) as f32).collect();
    let dirs = Tensor::from_slice(&values).view([dim, count]);
    let norms = dirs.square().sum_dim_intlist(&[0i64][..], true, Kind::Float).sqrt();
    (dirs / norms).to_device(device)
}

/// The metric between `real` and `fake` (`[N, C, S, S]` each, the same N and size, S ≥ 16),
/// its randomness drawn from `seed`.
///
/// # Panics
///
/// When the sets differ in shape or are smaller than 16×16 or empty.
pub fn swd(real: &Tensor, fake: &Tensor, seed: u64, config: &SwdConfig) -> Swd {
    assert_eq!(real.size(), fake.size(), "both sets have the same shape");
    let size = real.size();
    assert!(size[0] > 0, "the sets are not empty");
    let levels = resolutions(size[2]);
    assert!(!levels.is_empty(), "images of at least {MIN_RESOLUTION}×{MIN_RESOLUTION}");
    let device = real.device();
    let (real_pyramid, fake_pyramid) = tch::no_grad(|| (laplacian_pyramid(real, levels.len()), laplacian_pyramid(fake, levels.len())));
    let mut out = Vec::with_capacity(levels.len());
    for (index, (resolution, (real_level, fake_level))) in levels.iter().zip(real_pyramid.iter().zip(&fake_pyramid)).enumerate() {
        let stream = derive_seed(seed, index as u64);
        let limit = resolution - config.patch;
        let real_positions = random_positions(derive_seed(stream, 1), size[0], config.patches_per_image, limit, device);
        let fake_positions = random_positions(derive_seed(stream, 2), size[0], config.patches_per_image, limit, device);
        let dim = size[1] * config.patch * config.patch;
        let directions: Vec<Tensor> =
            (0..config.repeats).map(|r| random_directions(derive_seed(stream, 3 + r as u64), dim, config.directions, device)).collect();
        let distance = tch::no_grad(|| {
            let a = descriptors(real_level, &real_positions, config.patch);
            let b = descriptors(fake_level, &fake_positions, config.patch);
            sliced_wasserstein(&a, &b, &directions)
        });
        out.push((*resolution, distance));
    }
    let mean = out.iter().map(|(_, d)| d).sum::<f64>() / out.len() as f64;
    Swd { levels: out, mean }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(seed: i64, n: i64, size: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::rand([n, 1, size, size], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
    }

    #[test]
    fn levels_follow_the_size() {
        assert_eq!(resolutions(32), [32, 16]);
        assert_eq!(resolutions(64), [64, 32, 16]);
        assert_eq!(resolutions(128), [128, 64, 32, 16]);
    }

    #[test]
    fn a_pyramid_adds_back_up_to_the_image() {
        let image = images(3, 2, 32);
        let pyramid = laplacian_pyramid(&image, 2);
        let rebuilt = &pyramid[0] + pyramid_up(&pyramid[1]);
        assert!(rebuilt.allclose(&image, 1e-5, 1e-5, false));
    }

    #[test]
    fn deterministic_for_a_seed_and_zero_between_equal_sets() {
        let config = SwdConfig { patches_per_image: 16, directions: 32, ..Default::default() };
        let (a, b) = (images(1, 6, 32), images(2, 6, 32));
        let first = swd(&a, &b, 7, &config);
        assert_eq!(first, swd(&a, &b, 7, &config));
        assert_eq!(first.levels.len(), 2);
        assert!(first.mean > 0.0);
        // The same set against itself with the same patches: only the positions differ, so
        // compare descriptors directly.
        let positions = random_positions(5, 6, 16, 32 - 7, Device::Cpu);
        let d = descriptors(&a, &positions, 7);
        let dirs = [random_directions(9, 49, 32, Device::Cpu)];
        assert_eq!(sliced_wasserstein(&d, &d, &dirs), 0.0);
    }
}
