//! The sweep file: one TOML document describing one experiment (see docs/sweep.md).
//!
//! Parsing is strict: unknown keys and wrong types are errors that name the file, line, column
//! and key. [`SweepFile::parse`] is the only way in, so everything past it is valid.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a sweep file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The TOML does not parse or does not fit the schema (the message carries line and column).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// toml's message, with line, column and key.
        message: String,
    },
    /// A value is out of range or the parts of the file disagree.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The offending key, dotted (`cv.grid.lr`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// `[dataset]`: where the data is and how to read it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// `"idx"` (MNIST layout).
    pub format: String,
    /// Folder of the dataset, relative to the sweep file.
    pub path: String,
    /// Use at most this many training samples (0: all).
    #[serde(default)]
    pub train_limit: u64,
    /// Use at most this many test samples (0: all).
    #[serde(default)]
    pub test_limit: u64,
}

/// `[noise]`: the corruption of the denoising autoencoder's inputs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoiseSection {
    /// Standard deviation of the additive white Gaussian noise.
    #[serde(default = "default_noise_std")]
    pub std: f64,
}

fn default_noise_std() -> f64 {
    0.3
}

impl Default for NoiseSection {
    fn default() -> Self {
        Self { std: default_noise_std() }
    }
}

/// `[model]`: which network.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `"dae"`.
    pub kind: String,
    /// Latent code size.
    #[serde(default = "default_latent")]
    pub latent: u32,
}

fn default_latent() -> u32 {
    4
}

/// The values one hyperparameter takes in a grid.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct GridSection {
    /// Learning rates.
    pub lr: Option<Vec<f64>>,
    /// L2 weight decays.
    pub weight_decay: Option<Vec<f64>>,
    /// Mini-batch sizes.
    pub batch_size: Option<Vec<u32>>,
}

/// `[cv]`: k-fold cross-validation over a grid of hyperparameters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CvSection {
    /// k.
    pub folds: u32,
    /// Epochs per trial.
    pub epochs: u32,
    /// Learning rate when not gridded.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Weight decay when not gridded.
    #[serde(default)]
    pub weight_decay: f64,
    /// Batch size when not gridded.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Seeds the fold permutation and every trial's initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every this many epochs (0: only at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u32,
    /// Attempts per trial before it fails for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Hyperparameter axes; every combination is a config, and each config runs `folds` trials.
    #[serde(default)]
    pub grid: GridSection,
}

fn default_lr() -> f64 {
    1e-3
}
fn default_batch_size() -> u32 {
    256
}
fn default_checkpoint_every() -> u32 {
    1
}
fn default_max_attempts() -> u32 {
    3
}

/// A whole sweep file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The experiment's name.
    pub name: String,
    /// The data.
    pub dataset: DatasetSection,
    /// Input corruption.
    #[serde(default)]
    pub noise: NoiseSection,
    /// The network.
    pub model: ModelSection,
    /// Cross-validation stage.
    pub cv: CvSection,
}

/// Largest number of trials one sweep may expand to.
pub const MAX_TRIALS: usize = 10_000;

impl SweepFile {
    /// Parses and validates a sweep file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SweepError> {
        let sweep: SweepFile =
            toml::from_str(text).map_err(|e| SweepError::Syntax { file: file.to_string(), message: e.to_string().trim_end().to_string() })?;
        sweep.validate(file)?;
        Ok(sweep)
    }

    fn validate(&self, file: &str) -> Result<(), SweepError> {
        let invalid = |key: &str, message: String| Err(SweepError::Invalid { file: file.to_string(), key: key.to_string(), message });
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return invalid("name", "must be 1 to 200 characters".into());
        }
        if self.dataset.format != "idx" {
            return invalid("dataset.format", format!("{:?} is not supported (supported: \"idx\")", self.dataset.format));
        }
        if self.model.kind != "dae" {
            return invalid("model.kind", format!("{:?} is not supported (supported: \"dae\")", self.model.kind));
        }
        if self.model.latent == 0 {
            return invalid("model.latent", "must be at least 1".into());
        }
        if !(self.noise.std >= 0.0 && self.noise.std.is_finite()) {
            return invalid("noise.std", format!("{} must be a finite number >= 0", self.noise.std));
        }
        let cv = &self.cv;
        if cv.folds < 2 {
            return invalid("cv.folds", format!("{} must be at least 2", cv.folds));
        }
        if cv.epochs == 0 {
            return invalid("cv.epochs", "must be at least 1".into());
        }
        if cv.max_attempts == 0 {
            return invalid("cv.max_attempts", "must be at least 1".into());
        }
        for (key, values) in [("cv.grid.lr", cv.grid.lr.as_deref()), ("cv.grid.weight_decay", cv.grid.weight_decay.as_deref())] {
            if values.is_some_and(|v| v.is_empty()) {
                return invalid(key, "an empty grid axis leaves nothing to train".into());
            }
        }
        if cv.grid.batch_size.as_deref().is_some_and(|v| v.is_empty()) {
            return invalid("cv.grid.batch_size", "an empty grid axis leaves nothing to train".into());
        }
        for lr in self.lrs() {
            if !(lr > 0.0 && lr.is_finite()) {
                return invalid("cv.grid.lr", format!("{lr} must be a finite number > 0"));
            }
        }
        for wd in self.weight_decays() {
            if !(wd >= 0.0 && wd.is_finite()) {
                return invalid("cv.grid.weight_decay", format!("{wd} must be a finite number >= 0"));
            }
        }
        if self.batch_sizes().contains(&0) {
            return invalid("cv.grid.batch_size", "must be at least 1".into());
        }
        let trials = self.lrs().len() * self.weight_decays().len() * self.batch_sizes().len() * cv.folds as usize;
        if trials > MAX_TRIALS {
            return invalid("cv.grid", format!("expands to {trials} trials, more than the limit of {MAX_TRIALS}"));
        }
        Ok(())
    }

    /// The learning rates to try.
    pub fn lrs(&self) -> Vec<f64> {
        self.cv.grid.lr.clone().unwrap_or_else(|| vec![self.cv.lr])
    }

    /// The weight decays to try.
    pub fn weight_decays(&self) -> Vec<f64> {
        self.cv.grid.weight_decay.clone().unwrap_or_else(|| vec![self.cv.weight_decay])
    }

    /// The batch sizes to try.
    pub fn batch_sizes(&self) -> Vec<u32> {
        self.cv.grid.batch_size.clone().unwrap_or_else(|| vec![self.cv.batch_size])
    }

    /// Checks what only the dataset can tell: a batch must fit in the training part of a fold.
    pub fn check_against_dataset(&self, file: &str, train_samples: u64) -> Result<(), SweepError> {
        let usable = match self.dataset.train_limit {
            0 => train_samples,
            limit => limit.min(train_samples),
        };
        let folds = u64::from(self.cv.folds);
        let fold_train = usable - usable.div_ceil(folds);
        if let Some(&largest) = self.batch_sizes().iter().max() {
            if u64::from(largest) > fold_train {
                return Err(SweepError::Invalid {
                    file: file.to_string(),
                    key: "cv.grid.batch_size".into(),
                    message: format!("batch size {largest} is larger than a fold's {fold_train} training samples"),
                });
            }
        }
        Ok(())
    }
}

/// Dataset file names a sweep may reference, by format (the loader finds them by these stems).
pub fn dataset_file_names(format: &str) -> BTreeMap<&'static str, &'static str> {
    match format {
        "idx" => BTreeMap::from([
            ("train-images-idx3-ubyte", "training images"),
            ("train-labels-idx1-ubyte", "training labels"),
            ("t10k-images-idx3-ubyte", "test images"),
            ("t10k-labels-idx1-ubyte", "test labels"),
        ]),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The seed's grid over 4 folds (shared with the planner's tests).
    pub(crate) const GOOD: &str = r#"
name = "t"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 4
epochs = 2
[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [256, 512]
"#;

    fn error_of(text: &str) -> String {
        SweepFile::parse(text, "s.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_seed_grid() {
        let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
        assert_eq!(sweep.lrs(), vec![1e-3, 1e-4]);
        assert_eq!(sweep.batch_sizes(), vec![256, 512]);
        assert_eq!(sweep.noise.std, 0.3);
        assert_eq!(sweep.model.latent, 4);
    }

    #[test]
    fn unknown_key_names_line_column_and_key() {
        let err = error_of(&GOOD.replace("epochs = 2", "epochs = 2\nepoch = 3"));
        assert!(err.starts_with("s.toml: "), "{err}");
        assert!(err.contains("line 11, column 1"), "{err}");
        assert!(err.contains("unknown field `epoch`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = error_of(&GOOD.replace("folds = 4", "folds = \"four\""));
        assert!(err.contains("line 9") && err.contains("folds"), "{err}");
    }

    #[test]
    fn range_errors_name_the_key() {
        assert!(error_of(&GOOD.replace("folds = 4", "folds = 1")).contains("cv.folds: 1 must be at least 2"));
        assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = []")).contains("cv.grid.lr: an empty grid axis"));
        assert!(error_of(&GOOD.replace("lr = [1e-3, 1e-4]", "lr = [-1.0]")).contains("cv.grid.lr: -1 must be"));
        assert!(error_of(&GOOD.replace("kind = \"dae\"", "kind = \"vae\"")).contains("model.kind"));
        assert!(error_of(&GOOD.replace("folds = 4", "folds = 4000")).contains("more than the limit"));
    }

    #[test]
    fn batch_larger_than_a_fold_is_refused() {
        let sweep = SweepFile::parse(GOOD, "s.toml").unwrap();
        let err = sweep.check_against_dataset("s.toml", 600).unwrap_err().to_string();
        assert!(err.contains("batch size 512 is larger than a fold's 450 training samples"), "{err}");
        sweep.check_against_dataset("s.toml", 8000).unwrap();
    }
}
