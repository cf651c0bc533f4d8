//! The hyperparameter search of a cross-validation stage: a grid (every combination of the
//! listed values) or a random search (`samples` draws from ranges, log-uniform where asked).
//!
//! It reads only the sweep file's schema ([`crate::sweep::schema`]): the axes it expands
//! ([`expand`] takes `[cv.grid]` or `[cv.random]`, the config they start from and the seed), and
//! for the planner, the `[cv]` table and the sweep-wide values a config starts from ([`configs`]).
//! The checks of those tables are the sweep file's ([`crate::sweep`]), which calls in here: a
//! part of the sweep module that depends only on its schema, so no module imports loop.

use rand::{Rng, SeedableRng};

use crate::domain::TrainingConfig;
use crate::sweep::schema::{Axis, CvSection, GridSection, RandomSection, SweepFile};

fn draw_f64(rng: &mut rand::rngs::StdRng, axis: &Axis<f64>) -> f64 {
    match axis {
        Axis::Values { values } => values[rng.gen_range(0..values.len())],
        Axis::Range { min, max, log: true } => (rng.gen_range(0.0..=1.0) * (max.ln() - min.ln()) + min.ln()).exp(),
        Axis::Range { min, max, log: false } => rng.gen_range(0.0..=1.0) * (max - min) + min,
    }
}

fn draw_u32(rng: &mut rand::rngs::StdRng, axis: &Axis<u32>) -> u32 {
    match axis {
        Axis::Values { values } => values[rng.gen_range(0..values.len())],
        Axis::Range { min, max, log: true } => {
            let (lo, hi) = (f64::from(*min).ln(), f64::from(*max).ln());
            ((rng.gen_range(0.0..=1.0) * (hi - lo) + lo).exp().round() as u32).clamp(*min, *max)
        }
        Axis::Range { min, max, log: false } => rng.gen_range(*min..=*max),
    }
}

/// The config every axis starts from: the `[cv]` scalars and epochs on the sweep's
/// [`SweepFile::training_base`].
pub fn base(sweep: &SweepFile, cv: &CvSection) -> TrainingConfig {
    TrainingConfig { lr: cv.lr, weight_decay: cv.weight_decay, batch_size: cv.batch_size, epochs: cv.epochs, ..sweep.training_base() }
}

/// Every config of the stage's search (the hyperparameters it sets, on [`base`]), in a stable
/// order (grid: the axes as written, the first axis outermost; random: draw order).
pub fn configs(sweep: &SweepFile, cv: &CvSection) -> Vec<TrainingConfig> {
    expand(base(sweep, cv), sweep.seed, &cv.grid, cv.random.as_ref())
}

/// Every config of a search from `start`: `random`'s draws (seeded by `seed`) when there is one,
/// else every combination of `grid`'s values (the axes as written, the first outermost).
pub fn expand(start: TrainingConfig, seed: u64, grid: &GridSection, random: Option<&RandomSection>) -> Vec<TrainingConfig> {
    if let Some(random) = random {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        return (0..random.samples)
            .map(|_| {
                let mut h = start.clone();
                if let Some(axis) = &random.lr {
                    h.lr = draw_f64(&mut rng, axis);
                }
                if let Some(axis) = &random.weight_decay {
                    h.weight_decay = draw_f64(&mut rng, axis);
                }
                if let Some(axis) = &random.batch_size {
                    h.batch_size = draw_u32(&mut rng, axis);
                }
                if let Some(axis) = &random.noise_std {
                    h.noise_std = draw_f64(&mut rng, axis);
                }
                if let Some(axis) = &random.latent {
                    h.latent = draw_u32(&mut rng, axis);
                }
                h
            })
            .collect();
    }
    let mut configs = vec![start];
    configs = cross(configs, grid.lr.as_ref(), |h, v| h.lr = v);
    configs = cross(configs, grid.weight_decay.as_ref(), |h, v| h.weight_decay = v);
    configs = cross(configs, grid.batch_size.as_ref(), |h, v| h.batch_size = v);
    configs = cross(configs, grid.noise_std.as_ref(), |h, v| h.noise_std = v);
    configs = cross(configs, grid.latent.as_ref(), |h, v| h.latent = v);
    configs
}

/// Every config of `configs` with every value of one grid axis (`None`: the axis is not searched).
fn cross<T: Copy>(configs: Vec<TrainingConfig>, values: Option<&Vec<T>>, set: fn(&mut TrainingConfig, T)) -> Vec<TrainingConfig> {
    let Some(values) = values else { return configs };
    let with = |config: &TrainingConfig, value: T| {
        let mut config = config.clone();
        set(&mut config, value);
        config
    };
    configs.iter().flat_map(|config| values.iter().map(move |&value| with(config, value))).collect()
}

/// The part of a config's label every config has: `lr=1e-3 wd=1e-6 bs=256`.
pub fn base_label(h: &TrainingConfig) -> String {
    format!("lr={:e} wd={:e} bs={}", h.lr, h.weight_decay, h.batch_size)
}

/// A config's label for tables: learning rate, weight decay and batch size always, noise and
/// latent size when they are searched.
pub fn label(h: &TrainingConfig, cv: &CvSection) -> String {
    searched_label(h, &cv.grid, cv.random.as_ref())
}

/// [`label`] for the search of `grid` or `random`.
pub fn searched_label(h: &TrainingConfig, grid: &GridSection, random: Option<&RandomSection>) -> String {
    let mut text = base_label(h);
    if grid.noise_std.is_some() || random.is_some_and(|r| r.noise_std.is_some()) {
        text.push_str(&format!(" noise={}", h.noise_std));
    }
    if grid.latent.is_some() || random.is_some_and(|r| r.latent.is_some()) {
        text.push_str(&format!(" latent={}", h.latent));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(cv_extra: &str) -> SweepFile {
        let text = format!("name = \"s\"\nseed = 4\n[dataset]\nformat = \"idx\"\npath = \"d\"\n[model]\nkind = \"dae\"\n[cv]\nfolds = 2\nepochs = 1\n{cv_extra}");
        SweepFile::parse(&text, "s").unwrap()
    }

    #[test]
    fn grid_is_the_cartesian_product_first_axis_outermost() {
        let s = sweep("[cv.grid]\nlr = [0.1, 0.2]\nlatent = [2, 4, 8]\n");
        let cv = s.cv.as_ref().unwrap();
        let configs = configs(&s, cv);
        assert_eq!(configs.len(), 6);
        assert_eq!((configs[0].lr, configs[0].latent), (0.1, 2));
        assert_eq!((configs[1].lr, configs[1].latent), (0.1, 4));
        assert_eq!((configs[5].lr, configs[5].latent), (0.2, 8));
        assert_eq!(label(&configs[1], cv), "lr=1e-1 wd=0e0 bs=256 latent=4");
    }

    #[test]
    fn random_search_draws_within_ranges_reproducibly() {
        let s = sweep("[cv.random]\nsamples = 50\nlr = { min = 1e-5, max = 1e-1, log = true }\nbatch_size = { values = [64, 128] }\nlatent = { min = 2, max = 6 }\n");
        let cv = s.cv.as_ref().unwrap();
        let first = configs(&s, cv);
        assert_eq!(first, configs(&s, cv), "same seed, same draws");
        assert_eq!(first.len(), 50);
        assert!(first.iter().all(|h| (1e-5..=1e-1).contains(&h.lr) && [64, 128].contains(&h.batch_size) && (2..=6).contains(&h.latent)));
        // Log-uniform: about half the draws fall below the geometric middle (1e-3).
        let below = first.iter().filter(|h| h.lr < 1e-3).count();
        assert!((10..=40).contains(&below), "{below} of 50 below 1e-3");
        assert!(first.iter().all(|h| h.weight_decay == 0.0), "unsearched values come from [cv]");
    }
}
