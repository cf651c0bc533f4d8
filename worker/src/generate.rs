//! Sampling a trained WGAN-GP generator on demand (`coordinator generate`), on the CPU, from a
//! checkpoint file: the generator's shape (its widths, its classes) is read from the
//! checkpoint's tensors, so no sweep file or worker is needed.
//!
//! The generator runs in evaluation mode (BatchNorm's running statistics), so an image depends
//! only on its own noise vector and class: a row of a grid equals the same vectors drawn alone.
//! Conditional grids use the same noise vectors in every class's row. Latent files are text,
//! one vector a line, its 100 numbers separated by spaces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::{self};
use tch::{Device, Kind, Tensor};

use crate::model::wgan::{Generator, NOISE_DIM};

/// Pixels between the cells of a grid (black).
pub const GAP: u32 = 2;

/// Why sampling failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The checkpoint cannot be read or holds no generator.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A latent file cannot be read or parsed.
    #[error("latent file {path}: {message}")]
    Latent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The request does not fit the generator.
    #[error("{0}")]
    Request(String),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: image::ImageError,
    },
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Where the noise vectors come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Latents {
    /// `count` vectors drawn from N(0, 1) with libtorch's generator seeded with `seed`.
    Random {
        /// Vectors.
        count: i64,
        /// Seed.
        seed: u64,
    },
    /// The vectors of a latent file.
    File(PathBuf),
    /// `steps` vectors from the first vector of file A to the first of file B, linearly.
    Interpolate {
        /// Start.
        from: PathBuf,
        /// End.
        to: PathBuf,
        /// Vectors, both ends included (at least 2).
        steps: i64,
    },
}

/// What to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The noise vectors: one column each.
    pub latents: Latents,
    /// Conditional generators: the classes, one row each (empty: every class).
    pub classes: Vec<i64>,
    /// Write the vectors used here.
    pub save_latent: Option<PathBuf>,
}

/// A drawn grid.
#[derive(Debug)]
pub struct Grid {
    /// `[rows·columns, 1, S, S]` images in (−1, 1), row by row.
    pub images: Tensor,
    /// Rows (one per class for a conditional generator, else as many as fill the grid).
    pub rows: i64,
    /// Columns.
    pub columns: i64,
    /// The class of each row (conditional generators).
    pub row_classes: Vec<i64>,
}

/// A generator loaded from a checkpoint.
#[derive(Debug)]
pub struct LoadedGenerator {
    generator: Generator,
    _vars: nn::VarStore,
    /// Hidden widths read from the checkpoint.
    pub widths: Vec<i64>,
    /// Classes (0: unconditional).
    pub classes: i64,
}

/// Loads the generator (`model.generator.*`) of a WGAN-GP checkpoint onto the CPU.
pub fn load_generator(path: &Path) -> Result<LoadedGenerator, GenerateError> {
    let bad = |message: String| GenerateError::Checkpoint { path: path.to_path_buf(), message };
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?.into_iter().collect();
    let mut widths = Vec::new();
    // deconv1 … deconv{L+1}: the widths are the output channels of all but the last.
    while tensors.contains_key(&format!("model.generator.deconv{}.weight", widths.len() + 2)) {
        widths.push(tensors[&format!("model.generator.deconv{}.weight", widths.len() + 1)].size()[1]);
    }
    if widths.is_empty() {
        return Err(bad("holds no WGAN-GP generator (model.generator.deconv*.weight)".into()));
    }
    let classes = tensors.get("model.generator.embedding.weight").map_or(0, |t| t.size()[0]);
    let vars = nn::VarStore::new(Device::Cpu);
    let generator = Generator::new(&(vars.root() / "generator"), &widths, classes);
    tch::no_grad(|| {
        for (name, mut variable) in vars.variables() {
            let saved = tensors.get(&format!("model.{name}")).ok_or_else(|| bad(format!("no weights for {name}")))?;
            if saved.size() != variable.size() {
                return Err(bad(format!("{name} has shape {:?}, the generator {:?}", saved.size(), variable.size())));
            }
            variable.copy_(saved);
        }
        Ok(())
    })?;
    Ok(LoadedGenerator { generator, _vars: vars, widths, classes })
}

/// Reads a latent file: one vector of [`NOISE_DIM`] numbers a line (blank lines and `#` comments skipped).
pub fn read_latents(path: &Path) -> Result<Tensor, GenerateError> {
    let bad = |message: String| GenerateError::Latent { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut values = Vec::new();
    let mut rows = 0i64;
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let row: Vec<f32> = line
            .split_whitespace()
            .map(|v| v.parse::<f32>().map_err(|e| bad(format!("line {}: {v:?}: {e}", number + 1))))
            .collect::<Result<_, _>>()?;
        if row.len() as i64 != NOISE_DIM {
            return Err(bad(format!("line {} holds {} numbers, a vector has {NOISE_DIM}", number + 1, row.len())));
        }
        values.extend(row);
        rows += 1;
    }
    if rows == 0 {
        return Err(bad("holds no vector".into()));
    }
    Ok(Tensor::from_slice(&values).view([rows, NOISE_DIM]))
}

/// Writes `latents` (`[N, NOISE_DIM]`) as a latent file.
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<(), GenerateError> {
    let values = Vec::<f32>::try_from(&latents.to_kind(Kind::Float).contiguous().view([-1]))?;
    let mut text = String::from("# Cohort WGAN-GP latent vectors: one a line\n");
    for row in values.chunks(NOISE_DIM as usize) {
        text.push_str(&row.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(" "));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| GenerateError::Io { path: path.to_path_buf(), source })
}

fn latents(request: &Latents) -> Result<Tensor, GenerateError> {
    match request {
        Latents::Random { count, seed } => {
            if *count < 1 {
                return Err(GenerateError::Request("--count must be at least 1".into()));
            }
            tch::manual_seed(*seed as i64);
            Ok(Tensor::randn([*count, NOISE_DIM], (Kind::Float, Device::Cpu)))
        }
        Latents::File(path) => read_latents(path),
        Latents::Interpolate { from, to, steps } => {
            if *steps < 2 {
                return Err(GenerateError::Request("--steps must be at least 2".into()));
            }
            let (a, b) = (read_latents(from)?.get(0), read_latents(to)?.get(0));
            let t = Tensor::linspace(0.0, 1.0, *steps, (Kind::Float, Device::Cpu)).view([-1, 1]);
            Ok(&a.view([1, -1]) + (b - &a).view([1, -1]) * t)
        }
    }
}

impl LoadedGenerator {
    /// Draws the grid `request` asks for.
    pub fn draw(&self, request: &Request) -> Result<Grid, GenerateError> {
        let noise = latents(&request.latents)?;
        if let Some(path) = &request.save_latent {
            write_latents(path, &noise)?;
        }
        let columns = noise.size()[0];
        if self.classes == 0 {
            if !request.classes.is_empty() {
                return Err(GenerateError::Request("this generator is not conditional: it takes no class".into()));
            }
            let images = tch::no_grad(|| self.generator.generate(&noise, None, false));
            // A file or an interpolation is one row; random samples fill a square-ish grid.
            let per_row = match request.latents {
                Latents::Random { count, .. } => (count as f64).sqrt().ceil() as i64,
                _ => columns,
            };
            let rows = (columns + per_row - 1) / per_row;
            return Ok(Grid { images, rows, columns: per_row, row_classes: Vec::new() });
        }
        let classes: Vec<i64> = if request.classes.is_empty() { (0..self.classes).collect() } else { request.classes.clone() };
        if let Some(bad) = classes.iter().find(|&&c| c < 0 || c >= self.classes) {
            return Err(GenerateError::Request(format!("class {bad} is not among the generator's {} classes", self.classes)));
        }
        let rows: Vec<Tensor> = classes
            .iter()
            .map(|&class| {
                let labels = Tensor::full([columns], class, (Kind::Int64, Device::Cpu));
                tch::no_grad(|| self.generator.generate(&noise, Some(&labels), false))
            })
            .collect();
        Ok(Grid { images: Tensor::cat(&rows, 0), rows: classes.len() as i64, columns, row_classes: classes })
    }
}

/// Writes a grid as a grey PNG: cells of S×S pixels, [`GAP`] black pixels around each.
pub fn write_png(grid: &Grid, path: &Path) -> Result<(), GenerateError> {
    let size = grid.images.size();
    let side = size[2] as u32;
    let count = size[0];
    let width = grid.columns as u32 * (side + GAP) + GAP;
    let height = grid.rows as u32 * (side + GAP) + GAP;
    let levels =
        Vec::<f32>::try_from(&((grid.images.to_kind(Kind::Float).clamp(-1.0, 1.0) + 1.0) * 127.5).round().contiguous().view([-1]))?;
    let mut canvas = image::GrayImage::new(width, height);
    let cell = (side * side) as usize;
    for index in 0..count {
        let (row, column) = ((index / grid.columns) as u32, (index % grid.columns) as u32);
        let (left, top) = (GAP + column * (side + GAP), GAP + row * (side + GAP));
        let pixels = &levels[index as usize * cell..(index as usize + 1) * cell];
        for y in 0..side {
            for x in 0..side {
                canvas.put_pixel(left + x, top + y, image::Luma([pixels[(y * side + x) as usize] as u8]));
            }
        }
    }
    canvas.save_with_format(path, image::ImageFormat::Png).map_err(|source| GenerateError::Image { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;

    fn checkpoint_of(classes: i64, dir: &Path) -> PathBuf {
        tch::manual_seed(3);
        let vars = nn::VarStore::new(Device::Cpu);
        let _generator = Generator::new(&(vars.root() / "generator"), [8i64, 4, 4], classes);
        let path = dir.join("c.safetensors");
        checkpoint::save(&path, &vars, &[], 1).unwrap();
        path
    }

    #[test]
    fn class_rows_equal_single_class_draws_and_latents_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_generator(&checkpoint_of(2, dir.path())).unwrap();
        assert_eq!((loaded.widths.clone(), loaded.classes), (vec![8, 4, 4], 2));
        let saved = dir.path().join("z.txt");
        let all = loaded
            .draw(&Request { latents: Latents::Random { count: 3, seed: 5 }, classes: vec![], save_latent: Some(saved.clone()) })
            .unwrap();
        assert_eq!((all.rows, all.columns), (2, 3));
        assert_eq!(all.images.size(), [6, 1, 32, 32]);
        let one = loaded.draw(&Request { latents: Latents::File(saved), classes: vec![1], save_latent: None }).unwrap();
        assert!(one.images.allclose(&all.images.narrow(0, 3, 3), 1e-5, 1e-5, false), "row 1 is class 1's draw");
        let path = dir.path().join("g.png");
        write_png(&all, &path).unwrap();
        let png = image::open(&path).unwrap();
        assert_eq!((png.width(), png.height()), (3 * 34 + 2, 2 * 34 + 2));
    }
}
