//! Random affine augmentation (rotation, translation, shear) of image batches.
//!
//! The parameters come from a [`SplitMix64`] stream seeded by the caller, not from libtorch's
//! global generator, so an augmented epoch is the same on every run and every device. The warp
//! itself is libtorch's `affine_grid` + `grid_sample`: bilinear, zeros outside the image.

use tch::Tensor;

use super::split::SplitMix64;

/// `grid_sampler` interpolation mode: bilinear.
const BILINEAR: i64 = 0;
/// `grid_sampler` padding mode: zeros outside the image.
const ZEROS_PADDING: i64 = 0;

/// How far the random transforms of [`augmented_copy`] may go; each parameter is drawn uniformly
/// in ±its range, so all zeros leaves images as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AugmentRanges {
    /// Largest rotation about the image centre, in degrees.
    pub rotate_deg: f64,
    /// Largest shift as a fraction of the image size, drawn independently for x (of the width)
    /// and y (of the height).
    pub translate: f64,
    /// Largest shear along x (x moves in proportion to y), in degrees.
    pub shear_deg: f64,
}

/// One image's transform: shear along x, then rotation about the centre, then shift.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Transform {
    rotate_deg: f64,
    /// Shift right, as a fraction of the width.
    translate_x: f64,
    /// Shift down, as a fraction of the height.
    translate_y: f64,
    shear_deg: f64,
}

/// A uniform draw in `[-range, range)`.
fn uniform(rng: &mut SplitMix64, range: f64) -> f64 {
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (2.0 * unit - 1.0) * range
}

impl Transform {
    /// Draws a transform within `ranges`. Every parameter is drawn, even with a zero range, so
    /// the stream stays aligned whatever the ranges.
    fn draw(rng: &mut SplitMix64, ranges: &AugmentRanges) -> Self {
        Self {
            rotate_deg: uniform(rng, ranges.rotate_deg),
            translate_x: uniform(rng, ranges.translate),
            translate_y: uniform(rng, ranges.translate),
            shear_deg: uniform(rng, ranges.shear_deg),
        }
    }

    /// The `[2, 3]` sampling matrix (row-major) that `affine_grid` wants for this transform on a
    /// `height`×`width` image: it maps an output position to the input position it reads, both
    /// in normalized coordinates (-1 to 1 across the image, `align_corners = false`).
    ///
    /// The transform is built in pixel units about the centre (x right, y down, so a positive
    /// angle turns clockwise on screen), then carried to the normalized frame, which keeps
    /// rotations rigid on non-square images.
    fn theta(&self, height: i64, width: i64) -> [f64; 6] {
        let (sin, cos) = self.rotate_deg.to_radians().sin_cos();
        let shear = self.shear_deg.to_radians().tan();
        // Forward map in pixels: rotation · shear = [[cos, cos·shear − sin], [sin, sin·shear + cos]].
        let forward = [[cos, cos * shear - sin], [sin, sin * shear + cos]];
        let det = forward[0][0] * forward[1][1] - forward[0][1] * forward[1][0];
        let inverse = [[forward[1][1] / det, -forward[0][1] / det], [-forward[1][0] / det, forward[0][0] / det]];
        // Half the size in pixels: the pixel length of one normalized unit along x and y.
        let half = [width as f64 / 2.0, height as f64 / 2.0];
        let shift = [self.translate_x * width as f64, self.translate_y * height as f64];
        let mut theta = [0.0; 6];
        for row in 0..2 {
            theta[3 * row] = inverse[row][0] * half[0] / half[row];
            theta[3 * row + 1] = inverse[row][1] * half[1] / half[row];
            theta[3 * row + 2] = -(inverse[row][0] * shift[0] + inverse[row][1] * shift[1]) / half[row];
        }
        theta
    }
}

/// Warps each image of `images` (`[N, C, H, W]`) by its `[2, 3]` sampling matrix in `thetas`.
fn warp(images: &Tensor, thetas: &[f64]) -> Tensor {
    let size = images.size();
    let theta = Tensor::from_slice(thetas).view([size[0], 2, 3]).to_kind(images.kind()).to_device(images.device());
    let grid = Tensor::affine_grid_generator(&theta, &size, false);
    images.grid_sampler(&grid, BILINEAR, ZEROS_PADDING, false)
}

/// A randomly rotated, translated and sheared copy of a `[N, 1, H, W]` float batch.
///
/// Each image gets its own transform, drawn uniformly within `ranges` from a [`SplitMix64`]
/// seeded with `seed`, so the same seed gives the same copy. Sampling is bilinear and what comes
/// from outside the image is 0. The copy has the input's shape, kind and device.
///
/// # Panics
///
/// When `images` is not 4-dimensional or not of a floating kind.
pub fn augmented_copy(images: &Tensor, ranges: &AugmentRanges, seed: u64) -> Tensor {
    let size = images.size();
    assert_eq!(size.len(), 4, "augmented_copy wants [N, C, H, W] images, got {size:?}");
    assert!(images.is_floating_point(), "augmented_copy wants float images, got {:?}", images.kind());
    let (count, height, width) = (size[0], size[2], size[3]);
    if count == 0 {
        return images.copy();
    }
    let mut rng = SplitMix64::new(seed);
    let thetas: Vec<f64> = (0..count).flat_map(|_| Transform::draw(&mut rng, ranges).theta(height, width)).collect();
    warp(images, &thetas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    const NO_TRANSFORM: Transform = Transform { rotate_deg: 0.0, translate_x: 0.0, translate_y: 0.0, shear_deg: 0.0 };

    /// A `[count, 1, height, width]` batch of distinct, smoothly varying values.
    fn ramp(count: i64, height: i64, width: i64) -> Tensor {
        (Tensor::arange(count * height * width, (Kind::Float, Device::Cpu)) / 50.0).sin().view([count, 1, height, width])
    }

    /// A `[1, 1, height, width]` image that is 0 but for a 1 at (`y`, `x`).
    fn single_pixel(height: i64, width: i64, y: i64, x: i64) -> Tensor {
        let image = Tensor::zeros([1, 1, height, width], (Kind::Float, Device::Cpu));
        let _ = image.get(0).get(0).get(y).get(x).fill_(1.0);
        image
    }

    #[test]
    fn zero_ranges_give_back_the_input() {
        let images = ramp(3, 7, 9);
        let copy = augmented_copy(&images, &AugmentRanges::default(), 11);
        assert_eq!(copy.size(), images.size());
        assert!(copy.allclose(&images, 1e-5, 1e-5, false));
    }

    #[test]
    fn the_seed_decides_the_copy() {
        let images = ramp(4, 12, 12);
        let ranges = AugmentRanges { rotate_deg: 15.0, translate: 0.1, shear_deg: 10.0 };
        let first = augmented_copy(&images, &ranges, 5);
        assert!(first.equal(&augmented_copy(&images, &ranges, 5)));
        assert!(!first.allclose(&augmented_copy(&images, &ranges, 6), 1e-3, 1e-3, false));
        assert!(!first.allclose(&images, 1e-3, 1e-3, false));
    }

    #[test]
    fn each_image_gets_its_own_transform() {
        let images = ramp(1, 10, 10).repeat([3, 1, 1, 1]);
        let ranges = AugmentRanges { rotate_deg: 20.0, translate: 0.0, shear_deg: 0.0 };
        let copy = augmented_copy(&images, &ranges, 1);
        assert!(!copy.get(0).allclose(&copy.get(1), 1e-3, 1e-3, false));
        assert!(!copy.get(1).allclose(&copy.get(2), 1e-3, 1e-3, false));
    }

    #[test]
    fn draws_stay_within_their_ranges() {
        let ranges = AugmentRanges { rotate_deg: 10.0, translate: 0.2, shear_deg: 5.0 };
        let mut rng = SplitMix64::new(3);
        let draws: Vec<Transform> = (0..1000).map(|_| Transform::draw(&mut rng, &ranges)).collect();
        assert!(draws.iter().all(|t| t.rotate_deg.abs() <= 10.0 && t.shear_deg.abs() <= 5.0));
        assert!(draws.iter().all(|t| t.translate_x.abs() <= 0.2 && t.translate_y.abs() <= 0.2));
        assert!(draws.iter().any(|t| t.rotate_deg > 9.0) && draws.iter().any(|t| t.rotate_deg < -9.0));
        assert!(draws.iter().any(|t| (t.translate_x - t.translate_y).abs() > 0.1), "x and y shifts are independent");
    }

    #[test]
    fn identity_theta_is_the_identity_matrix() {
        assert_eq!(NO_TRANSFORM.theta(6, 8), [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn translation_moves_a_pixel_by_whole_pixels() {
        // 6 high, 8 wide: one pixel right is 1/8 of the width, two pixels up is -2/6 of the height.
        let shift = Transform { translate_x: 1.0 / 8.0, translate_y: -2.0 / 6.0, ..NO_TRANSFORM };
        let moved = warp(&single_pixel(6, 8, 3, 2), &shift.theta(6, 8));
        assert!(moved.allclose(&single_pixel(6, 8, 1, 3), 1e-5, 1e-5, false), "{moved}");
    }

    #[test]
    fn positive_rotation_turns_clockwise_on_screen() {
        // A quarter turn of a 5×5 image takes the middle of the right edge to the middle of the bottom.
        let turn = Transform { rotate_deg: 90.0, ..NO_TRANSFORM };
        let turned = warp(&single_pixel(5, 5, 2, 4), &turn.theta(5, 5));
        assert!(turned.allclose(&single_pixel(5, 5, 4, 2), 1e-5, 1e-5, false), "{turned}");
    }

    #[test]
    fn shear_moves_rows_in_proportion_to_their_height() {
        // tan(45°) = 1: a row 2 pixels below the centre of a 5×5 image slides 2 pixels right.
        let shear = Transform { shear_deg: 45.0, ..NO_TRANSFORM };
        let sheared = warp(&single_pixel(5, 5, 4, 1), &shear.theta(5, 5));
        assert!(sheared.allclose(&single_pixel(5, 5, 4, 3), 1e-5, 1e-5, false), "{sheared}");
    }
}
