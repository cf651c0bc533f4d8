//! The class accuracy of a conditional WGAN-GP's samples (`[train] judge`): at every evaluation,
//! [`PER_CLASS`] images generated for each class are classified by a classifier Cohort trained
//! in another sweep (the fine-tuned classifier of an autoencoder sweep, `model/classifier.rs`,
//! named by its checkpoint), and the trial reports the fraction whose predicted digit is the
//! digit of the class they were generated for.
//!
//! The classifier trained on 28×28 IDX digits scaled to [0, 1]; the generator makes S×S images
//! in tanh's [-1, 1]. Each image is mapped back, `(x + 1) / 2`, and shrunk to 28×28 by area
//! averaging (adaptive average pooling), which is what the image-folder loader undid: it
//! resized the digits' PNGs to S×S and scaled them to [-1, 1]. GAN labels are the class folders
//! in name order; the coordinator planned which digit each is (`JudgeSpec::digits`: every class
//! folder is named by its digit), so `--digits 1,7` folders are judged as ones and sevens.
//!
//! Deterministic for a trial's seed: the noise comes from its own seed stream
//! (`streams::JUDGE`), the same at every evaluation, and the generator runs as for the SWD
//! (`wgan_eval::generate`: batch statistics in fixed chunks, BatchNorm's running statistics put
//! back afterwards, so judging changes nothing the training sees).

use std::path::Path;

use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::wgan::Gan;
use super::{streams, wgan_eval, TrainError};
use crate::checkpoint::Loaded;
use crate::data::split::derive_seed;
use crate::model::classifier::Classifier;
use crate::model::wgan::NOISE_DIM;

/// Images generated and classified per class at every evaluation.
pub const PER_CLASS: i64 = 100;

/// The side of the digits the classifier trained on.
const SIDE: i64 = 28;

/// Images per classifier forward pass.
const CHUNK: i64 = 1024;

/// A classifier checkpoint loaded to judge generated samples.
#[derive(Debug)]
pub struct Judge {
    /// Keeps the classifier's weights alive.
    _vars: nn::VarStore,
    model: Classifier,
    /// The classifier's label (digit) of each GAN class, by GAN label.
    digits: Tensor,
    /// The same, as numbers (for the per-class keys).
    names: Vec<u32>,
}

impl Judge {
    /// Loads the classifier checkpoint at `path` (its latent size read from the checkpoint) to
    /// judge classes whose digits are `digits`, by GAN label. A file that is not a classifier
    /// checkpoint is a user error naming what to give instead.
    pub fn load(path: &Path, digits: &[u32], device: Device) -> Result<Self, TrainError> {
        let invalid = |message: String| {
            TrainError::Invalid(format!("judge classifier: {message} (name the final checkpoint of an autoencoder sweep's finetune trial)"))
        };
        let loaded = Loaded::read(path).map_err(|e| invalid(e.to_string()))?;
        let latent = match loaded.model_shape("encoder.fc2.weight").as_deref() {
            Some(&[latent, _]) if latent > 0 => latent,
            _ => return Err(invalid(format!("{} is not a classifier checkpoint: it has no encoder", path.display()))),
        };
        let mut vars = nn::VarStore::new(device);
        let model = Classifier::new(&vars.root(), latent);
        loaded.restore_model(&mut vars).map_err(|e| invalid(e.to_string()))?;
        vars.freeze();
        let labels: Vec<i64> = digits.iter().map(|&digit| i64::from(digit)).collect();
        let digits_tensor = Tensor::from_slice(&labels).to_device(device);
        Ok(Self { _vars: vars, model, digits: digits_tensor, names: digits.to_vec() })
    }

    /// How many GAN classes the judge knows the digit of.
    pub fn classes(&self) -> i64 {
        self.names.len() as i64
    }

    /// Generated images (`[N, 1, S, S]`, tanh's [-1, 1]) as the classifier's inputs:
    /// `[N, 1, 28, 28]` in [0, 1], shrunk by area averaging.
    pub fn inputs(images: &Tensor) -> Tensor {
        let unit = ((images + 1.0) / 2.0).clamp(0.0, 1.0);
        let size = images.size();
        if size[2] == SIDE && size[3] == SIDE {
            return unit;
        }
        unit.adaptive_avg_pool2d([SIDE, SIDE])
    }

    /// The classifier's digit for each generated image (`[N]`, int64).
    pub fn classify(&self, images: &Tensor) -> Tensor {
        let inputs = Self::inputs(images);
        tch::no_grad(|| {
            let chunks: Vec<Tensor> =
                inputs.split(CHUNK, 0).iter().map(|chunk| self.model.forward_t(chunk, false).argmax(-1, false)).collect();
            Tensor::cat(&chunks, 0)
        })
    }

    /// `class_accuracy` (the fraction of `images` whose digit is that of the class in `labels`
    /// they were generated for) and `class_accuracy_{digit}` per class present.
    pub fn score(&self, images: &Tensor, labels: &Tensor) -> Vec<(String, f64)> {
        let expected = self.digits.index_select(0, labels);
        let correct = self.classify(images).eq_tensor(&expected).to_kind(Kind::Float);
        let mut values = vec![("class_accuracy".to_string(), correct.mean(Kind::Float).double_value(&[]))];
        for (class, digit) in self.names.iter().enumerate() {
            let rows = labels.eq(class as i64).nonzero().squeeze_dim(1);
            if rows.size()[0] == 0 {
                continue;
            }
            let accuracy = correct.index_select(0, &rows).mean(Kind::Float).double_value(&[]);
            values.push((format!("class_accuracy_{digit}"), accuracy));
        }
        values
    }

    /// Generates [`PER_CLASS`] images for each of the GAN's classes from the noise of `seed`'s
    /// judge stream and scores them ([`Judge::score`]).
    pub fn evaluate(&self, gan: &Gan, seed: u64) -> Vec<(String, f64)> {
        let classes = gan.classes().min(self.classes());
        let device = gan.vars.device();
        tch::manual_seed(derive_seed(seed, streams::JUDGE) as i64);
        let labels = Tensor::arange(classes, (Kind::Int64, device)).repeat_interleave_self_int(PER_CLASS, Some(0), None::<i64>);
        let noise = Tensor::randn([classes * PER_CLASS, NOISE_DIM], (Kind::Float, device));
        let images = wgan_eval::generate(gan, &noise, Some(&labels));
        self.score(&images, &labels.to_device(self.digits.device()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;

    /// A classifier checkpoint (latent 4) whose random weights come from `seed`; with `always`,
    /// its head answers that digit whatever the image.
    fn classifier_checkpoint(dir: &Path, seed: i64, always: Option<i64>) -> std::path::PathBuf {
        tch::manual_seed(seed);
        let vars = nn::VarStore::new(Device::Cpu);
        let _model = Classifier::new(&vars.root(), 4);
        if let Some(digit) = always {
            tch::no_grad(|| {
                for (name, mut tensor) in vars.variables() {
                    if name == "head.fc2.weight" {
                        let _ = tensor.zero_();
                    }
                    if name == "head.fc2.bias" {
                        let _ = tensor.zero_();
                        let _ = tensor.get(digit).fill_(10.0);
                    }
                }
            });
        }
        let path = dir.join(format!("classifier-{seed}.safetensors"));
        checkpoint::save(&path, &vars, &[], 3).unwrap();
        path
    }

    fn gan(classes: i64) -> Gan {
        tch::manual_seed(5);
        Gan::conditional([16, 8, 4], classes, 1e-4, (0.0, 0.9), Device::Cpu)
    }

    #[test]
    fn inputs_are_the_classifiers_range_and_size() {
        let images = Tensor::cat(
            &[Tensor::full([1, 1, 32, 32], -1.0, (Kind::Float, Device::Cpu)), Tensor::ones([1, 1, 32, 32], (Kind::Float, Device::Cpu))],
            0,
        );
        let inputs = Judge::inputs(&images);
        assert_eq!(inputs.size(), [2, 1, 28, 28]);
        assert_eq!((inputs.get(0).max().double_value(&[]), inputs.get(1).min().double_value(&[])), (0.0, 1.0));
        // Area averaging: a left half of ones is a left half of ones (up to the one mixed column).
        let half = Tensor::cat(
            &[Tensor::ones([1, 1, 32, 16], (Kind::Float, Device::Cpu)), -Tensor::ones([1, 1, 32, 16], (Kind::Float, Device::Cpu))],
            3,
        );
        let row: Vec<f64> = Vec::try_from(Judge::inputs(&half).get(0).get(0).get(0).to_kind(Kind::Double)).unwrap();
        assert!(row[..13].iter().all(|&v| v == 1.0) && row[15..].iter().all(|&v| v == 0.0), "{row:?}");
        assert_eq!(Judge::inputs(&Tensor::zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu))).double_value(&[0, 0, 5, 5]), 0.5);
    }

    #[test]
    fn accuracy_counts_the_samples_whose_digit_is_their_classs() {
        let dir = tempfile::tempdir().unwrap();
        // Always 3: the class named "3" is always right, the class named "5" never.
        let judge = Judge::load(&classifier_checkpoint(dir.path(), 1, Some(3)), &[3, 5], Device::Cpu).unwrap();
        let values = judge.evaluate(&gan(2), 0);
        assert_eq!(values, [("class_accuracy".into(), 0.5), ("class_accuracy_3".into(), 1.0), ("class_accuracy_5".into(), 0.0)]);
        // Known images: the labels, not the images, say which digit is right.
        let images = Tensor::zeros([4, 1, 32, 32], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[1i64, 1, 1, 0]);
        assert_eq!(judge.score(&images, &labels)[..2], [("class_accuracy".into(), 0.25), ("class_accuracy_3".into(), 1.0)]);
    }

    #[test]
    fn accuracy_is_deterministic_for_a_seed_and_leaves_the_generator_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let judge = Judge::load(&classifier_checkpoint(dir.path(), 2, None), &[0, 1, 2], Device::Cpu).unwrap();
        let gan = gan(3);
        let before: Vec<(String, Tensor)> = gan.vars.variables().into_iter().map(|(name, t)| (name, t.copy())).collect();
        let first = judge.evaluate(&gan, 11);
        tch::manual_seed(99); // whatever the global generator did since
        assert_eq!(judge.evaluate(&gan, 11), first, "the same seed gives the same figures");
        assert_eq!(first.len(), 4);
        assert!(first.iter().all(|(_, v)| (0.0..=1.0).contains(v)), "{first:?}");
        let classes = judge.classify(&wgan_eval::generate(
            &gan,
            &Tensor::randn([8, NOISE_DIM], (Kind::Float, Device::Cpu)),
            Some(&Tensor::zeros([8], (Kind::Int64, Device::Cpu))),
        ));
        assert_eq!(classes.size(), [8]);
        for (name, saved) in before {
            assert!(gan.vars.variables()[&name].equal(&saved), "{name} changed");
        }
    }

    #[test]
    fn a_checkpoint_that_is_not_a_classifier_is_a_user_error() {
        let dir = tempfile::tempdir().unwrap();
        let vars = nn::VarStore::new(Device::Cpu);
        let _autoencoder = crate::model::dae::Encoder::new(&(vars.root() / "encoder"), 4);
        let path = dir.path().join("dae.safetensors");
        checkpoint::save(&path, &vars, &[], 1).unwrap();
        let error = Judge::load(&path, &[0, 1], Device::Cpu).unwrap_err();
        assert!(error.is_user_error() && error.to_string().contains("no weights for head."), "{error}");
        let gan_checkpoint = dir.path().join("gan.safetensors");
        checkpoint::save(&gan_checkpoint, &gan(2).vars, &[], 1).unwrap();
        let error = Judge::load(&gan_checkpoint, &[0, 1], Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("not a classifier checkpoint"), "{error}");
    }
}
