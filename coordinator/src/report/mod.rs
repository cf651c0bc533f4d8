//! `coordinator report`: the seed's figures (PNG) and an `index.html` with the results tables,
//! drawn from a finished sweep's metrics and artifacts.
//!
//! - fig. 1: test MSE of the final autoencoder per epoch, and reconstructions of noisy test digits
//!   at the first and last epoch;
//! - figs. 2–3: the test set's latent codes on their first two principal components, by digit,
//!   before and after the classifier fine-tune;
//! - fig. 4: the WGAN-GP's critic and generator losses and the Wasserstein estimate per epoch;
//! - fig. 5: real slices next to generated ones at the first, an early and the last epoch;
//! - figs. 6–7: one generated image, upscaled, and the noise vector it came from.

pub mod figures;
mod html;
pub mod pca;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use figures::GreyImage;

use crate::selection::ConfigSummary;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Drawing failed.
    #[error("drawing: {0}")]
    Draw(String),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An artifact does not hold what its name promises.
    #[error("artifact {name}: {message}")]
    Artifact {
        /// The artifact.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// A tensor read from an artifact: its shape and values (integers widened to f64 as needed).
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f64>,
}

/// Reads the tensors of a safetensors artifact (float32, float64 or int64).
pub fn read_artifact(name: &str, bytes: &[u8]) -> Result<BTreeMap<String, ArtifactTensor>, ReportError> {
    let bad = |message: String| ReportError::Artifact { name: name.to_string(), message };
    let tensors = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (key, view) in tensors.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            safetensors::Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            safetensors::Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect(),
            other => return Err(bad(format!("{key}: unsupported dtype {other:?}"))),
        };
        out.insert(key, ArtifactTensor { shape: view.shape().to_vec(), values });
    }
    Ok(out)
}

impl ArtifactTensor {
    /// Splits an `[N, 1, H, W]` (or `[N, H, W]`) tensor into images shown between `low` and `high`.
    pub fn images(&self, low: f32, high: f32) -> Vec<GreyImage> {
        let (height, width) = match self.shape.as_slice() {
            [_, 1, h, w] | [_, h, w] => (*h, *w),
            _ => return vec![],
        };
        self.values
            .chunks_exact(height * width)
            .map(|chunk| GreyImage { height, width, pixels: chunk.iter().map(|&v| v as f32).collect(), low, high })
            .collect()
    }

    /// The rows of a 2-D tensor.
    pub fn rows(&self) -> Vec<Vec<f32>> {
        let Some(&width) = self.shape.get(1) else {
            return vec![];
        };
        self.values.chunks_exact(width.max(1)).map(|row| row.iter().map(|&v| v as f32).collect()).collect()
    }
}

/// A trial as the report's table shows it.
#[derive(Debug, Clone)]
pub struct TrialRow {
    /// Stage.
    pub stage: String,
    /// Trial name.
    pub trial: String,
    /// Config label.
    pub config: String,
    /// State.
    pub state: String,
    /// Attempts.
    pub attempts: u32,
    /// The last epoch's figures.
    pub last: Vec<(String, f64)>,
    /// Why it ended without succeeding (a pruned trial's reason, a failed one's error); empty
    /// otherwise.
    pub note: String,
}

/// Everything a report shows.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    /// Sweep id.
    pub sweep_id: String,
    /// Sweep name.
    pub name: String,
    /// Sweep state.
    pub state: String,
    /// Cross-validation table.
    pub cv: Vec<ConfigSummary>,
    /// Every trial.
    pub trials: Vec<TrialRow>,
    /// Named per-epoch series: `test_mse`, `test_accuracy`, `critic_loss`, … by stage.
    pub series: BTreeMap<(String, String), Vec<(f64, f64)>>,
    /// Artifacts by (stage, artifact name).
    pub artifacts: BTreeMap<(String, String), BTreeMap<String, ArtifactTensor>>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io { path: path.to_path_buf(), source }
}

/// The generator's sample artifacts of a stage, by epoch.
fn samples_by_epoch<'a>(input: &'a ReportInput, stage: &str) -> Vec<(u32, &'a BTreeMap<String, ArtifactTensor>)> {
    let mut samples: Vec<(u32, &BTreeMap<String, ArtifactTensor>)> = input
        .artifacts
        .iter()
        .filter(|((s, name), _)| s == stage && name.starts_with("samples-e"))
        .filter_map(|((_, name), tensors)| name.trim_start_matches("samples-e").parse().ok().map(|epoch| (epoch, tensors)))
        .collect();
    samples.sort_by_key(|(epoch, _)| *epoch);
    samples
}

/// The rows of a sample grid: one row labelled `label`, or for a conditional generator's grid
/// (with its `labels`) one row per class.
pub fn sample_rows(label: &str, images: &ArtifactTensor, labels: Option<&ArtifactTensor>) -> Vec<(String, Vec<GreyImage>)> {
    let images = images.images(-1.0, 1.0);
    let Some(labels) = labels.filter(|l| l.values.len() == images.len()) else {
        return vec![(label.to_string(), images)];
    };
    let mut rows: BTreeMap<i64, Vec<GreyImage>> = BTreeMap::new();
    for (image, class) in images.into_iter().zip(&labels.values) {
        rows.entry(*class as i64).or_default().push(image);
    }
    rows.into_iter().map(|(class, images)| (format!("{label}, class {class}"), images)).collect()
}

/// A drawn figure: its file name and caption.
pub type Figure = (String, String);

/// A trial's scalars and image artifacts, for TensorBoard.
#[derive(Debug, Clone, Default)]
pub struct TrialRecord {
    /// Run name (the trial's name, with `/` kept: TensorBoard nests runs by folder).
    pub run: String,
    /// (metric, epoch, value).
    pub scalars: Vec<(String, i64, f64)>,
    /// (tag, epoch, tensors) of image artifacts.
    pub images: Vec<(String, i64, Vec<GreyImage>)>,
}

/// Writes TensorBoard event files, one run folder per trial, under `out`.
pub fn export_tensorboard(trials: &[TrialRecord], out: &Path) -> Result<usize, ReportError> {
    let mut written = 0;
    for trial in trials {
        let mut writer = tensorboard::EventWriter::create(&out.join(&trial.run))?;
        for (tag, step, value) in &trial.scalars {
            writer.scalar(tag, *step, *value)?;
        }
        for (tag, step, images) in &trial.images {
            writer.images(tag, *step, images)?;
        }
        writer.finish()?;
        written += 1;
    }
    Ok(written)
}

/// Draws every figure the sweep has data for into `out` and writes `index.html`; returns the figures.
pub fn render(input: &ReportInput, out: &Path) -> Result<Vec<Figure>, ReportError> {
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    let mut drawn: Vec<Figure> = Vec::new();
    let series = |stage: &str, key: &str| input.series.get(&(stage.to_string(), key.to_string())).cloned();
    // A training metric as lines: its overall series (named `overall`), then every `{key}_{part}`
    // series by part (per level, per class): figs. 8 and 9.
    let with_parts = |key: &str, overall: &str| {
        let mut lines = vec![(overall.to_string(), series("train", key)?)];
        let prefix = format!("{key}_");
        for ((stage, name), points) in &input.series {
            if let Some(part) = name.strip_prefix(&prefix).filter(|_| stage == "train") {
                lines.push((part.to_string(), points.clone()));
            }
        }
        Some(lines)
    };

    if let Some(test_mse) = series("final", "test_mse") {
        let file = "fig1-test-mse.png";
        figures::line_chart(&out.join(file), "Fig. 1: test MSE of the final autoencoder", "test MSE", &[("test MSE".into(), test_mse)])?;
        drawn.push((file.into(), "Fig. 1: test MSE per epoch of the autoencoder trained on the whole training set".into()));
    }
    let reconstructions: Vec<(&String, &BTreeMap<String, ArtifactTensor>)> = input
        .artifacts
        .iter()
        .filter(|((stage, name), _)| stage == "final" && name.starts_with("reconstructions-e"))
        .map(|((_, name), tensors)| (name, tensors))
        .collect();
    if !reconstructions.is_empty() {
        let mut rows = Vec::new();
        for (name, tensors) in reconstructions {
            let epoch = name.trim_start_matches("reconstructions-e");
            for part in ["noisy", "output", "clean"] {
                if let Some(tensor) = tensors.get(part) {
                    rows.push((format!("epoch {epoch}: {part}"), tensor.images(0.0, 1.0)));
                }
            }
        }
        let file = "fig1-reconstructions.png";
        figures::image_rows(&out.join(file), "Fig. 1: noisy test digits, the autoencoder's output, the clean digits", &rows, 3)?;
        drawn.push((file.into(), "Fig. 1: reconstructions of noisy test digits at the first and last epoch".into()));
    }
    for (stage, file, title) in [
        ("final", "fig2-latent-pca.png", "Fig. 2: latent space (first two principal components)"),
        ("finetune", "fig3-latent-pca-finetuned.png", "Fig. 3: latent space after the classifier fine-tune"),
    ] {
        let Some(tensors) = input.artifacts.get(&(stage.to_string(), "latents".to_string())) else {
            continue;
        };
        let (Some(latents), Some(labels)) = (tensors.get("latents"), tensors.get("labels")) else {
            continue;
        };
        let projected = pca::project_2d(&latents.rows());
        let points: Vec<(f64, f64, i64)> = projected.into_iter().zip(&labels.values).map(|((x, y), &label)| (x, y, label as i64)).collect();
        figures::scatter(&out.join(file), title, &points)?;
        drawn.push((file.into(), format!("{title}, test set coloured by digit")));
    }
    if let (Some(critic), Some(generator)) = (series("train", "critic_loss"), series("train", "generator_loss")) {
        let wasserstein = series("train", "wasserstein").unwrap_or_default();
        let file = "fig4-losses.png";
        let panels = vec![
            ("Critic loss".to_string(), "loss".to_string(), vec![("critic loss".to_string(), critic)]),
            ("Generator loss".to_string(), "loss".to_string(), vec![("generator loss".to_string(), generator)]),
            (
                "Wasserstein estimate".to_string(),
                "E[D(real)] - E[D(fake)]".to_string(),
                vec![("Wasserstein estimate".to_string(), wasserstein)],
            ),
        ];
        figures::panels(&out.join(file), &panels)?;
        drawn.push((file.into(), "Fig. 4: critic loss and generator loss per epoch; the Wasserstein estimate".into()));
    }
    let samples = samples_by_epoch(input, "train");
    if let (Some(real), false) = (input.artifacts.get(&("train".to_string(), "real".to_string())), samples.is_empty()) {
        let mut rows = Vec::new();
        if let Some(images) = real.get("images") {
            rows.extend(sample_rows("real", images, real.get("labels")));
        }
        let picks: Vec<usize> = match samples.len() {
            1 => vec![0],
            2 => vec![0, 1],
            n => vec![0, 1, n - 1],
        };
        for index in picks {
            let (epoch, tensors) = samples[index];
            if let Some(images) = tensors.get("images") {
                rows.extend(sample_rows(&format!("epoch {epoch}"), images, tensors.get("labels")));
            }
        }
        // Cells of about 128 pixels whatever the image size (32, 64 or 128).
        let side = rows.iter().flat_map(|(_, images)| images.first()).map(|i| i.width).max().unwrap_or(64).max(1);
        let scale = (128 / side as u32).max(1);
        let file = "fig5-samples.png";
        figures::image_rows(&out.join(file), "Fig. 5: real slices and generated ones (first, early, last epoch)", &rows, scale)?;
        drawn.push((file.into(), "Fig. 5: a grid of real slices next to generated ones at the first, an early and the last epoch".into()));

        let (epoch, last) = samples[samples.len() - 1];
        if let (Some(images), Some(noise)) = (last.get("images"), last.get("noise")) {
            if let (Some(image), Some(vector)) = (images.images(-1.0, 1.0).into_iter().next(), noise.rows().into_iter().next()) {
                let file = "fig6-noise.png";
                figures::bars(&out.join(file), &format!("Fig. 6: the generator's input vector (epoch {epoch})"), &vector)?;
                drawn.push((file.into(), "Fig. 6: a random generator input".into()));
                let file = "fig7-generated.png";
                figures::image_rows(&out.join(file), "Fig. 7: the image generated from it", &[(format!("epoch {epoch}"), vec![image])], 6)?;
                drawn.push((file.into(), "Fig. 7: the image generated from the vector of fig. 6, upscaled".into()));
            }
        }
    }
    if let Some(lines) = with_parts("swd", "mean") {
        let file = "fig8-swd.png";
        figures::line_chart(&out.join(file), "Fig. 8: sliced Wasserstein distance to the test set", "SWD", &lines)?;
        drawn.push((file.into(), "Fig. 8: sliced Wasserstein distance between generated and test images, per pyramid level (by resolution), per class (classN) and their mean".into()));
    }
    if let Some(lines) = with_parts("class_accuracy", "all") {
        let file = "fig9-class-accuracy.png";
        figures::line_chart(&out.join(file), "Fig. 9: class accuracy of generated samples under the judge classifier", "accuracy", &lines)?;
        drawn.push((file.into(), "Fig. 9: the fraction of samples generated for a class that the judge classifier ([train] judge) assigns to it, per class (by digit) and over all".into()));
    }
    let page = html::page(input, &drawn);
    let index = out.join("index.html");
    std::fs::write(&index, page).map_err(io_error(&index))?;
    Ok(drawn)
}
