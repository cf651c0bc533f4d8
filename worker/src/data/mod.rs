//! Datasets as the worker sees them: files fetched from the coordinator, decoded into tensors.

pub mod augment;
pub mod cache;
pub mod idx;
pub mod image_folder;
pub mod nifti;
pub mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

/// Why a dataset could not be loaded. These are user errors: retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's content does not follow its format.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The dataset lacks a file its format needs, or its parts disagree.
    #[error("dataset: {0}")]
    Layout(String),
}

/// Labelled grey images as float tensors: `images` is `[N, 1, H, W]` (IDX digits in [0, 1],
/// image-folder and NIfTI slices in [-1, 1]), `labels` `[N]` i64.
#[derive(Debug)]
pub struct ImageSet {
    /// `[N, 1, H, W]`, float32 grey levels.
    pub images: Tensor,
    /// `[N]`, int64 class labels.
    pub labels: Tensor,
}

impl ImageSet {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    /// True when the set holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &Tensor) -> ImageSet {
        ImageSet { images: self.images.index_select(0, indices), labels: self.labels.index_select(0, indices) }
    }

    /// The first `limit` samples (all of them when `limit` is 0 or larger than the set).
    pub fn truncate(self, limit: usize) -> ImageSet {
        if limit == 0 || limit >= self.len() {
            return self;
        }
        ImageSet { images: self.images.narrow(0, 0, limit as i64), labels: self.labels.narrow(0, 0, limit as i64) }
    }
}

/// The training and test parts of a dataset.
#[derive(Debug)]
pub struct TrainTest {
    /// Training samples.
    pub train: ImageSet,
    /// Held-out test samples.
    pub test: ImageSet,
}

/// Finds the file whose name starts with `stem` (so `train-images-idx3-ubyte` matches its `.gz`).
fn find_file<'a>(files: &'a BTreeMap<String, PathBuf>, stem: &str) -> Result<&'a Path, DataError> {
    files
        .iter()
        .find(|(name, _)| name.starts_with(stem))
        .map(|(_, path)| path.as_path())
        .ok_or_else(|| DataError::Layout(format!("no file named {stem}[.gz] among {:?}", files.keys().collect::<Vec<_>>())))
}

fn load_idx_pair(files: &BTreeMap<String, PathBuf>, prefix: &str) -> Result<ImageSet, DataError> {
    let images_path = find_file(files, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_file(files, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = idx::read_images(images_path)?;
    let labels = idx::read_labels(labels_path)?;
    if images.count != labels.len() {
        return Err(DataError::Layout(format!(
            "{} holds {} images but {} holds {} labels",
            images_path.display(),
            images.count,
            labels_path.display(),
            labels.len()
        )));
    }
    let shape = [images.count as i64, 1, images.rows as i64, images.cols as i64];
    let images = Tensor::from_slice(&images.pixels).view(shape).to_kind(Kind::Float) / 255.0;
    let labels = Tensor::from_slice(&labels).to_kind(Kind::Int64);
    Ok(ImageSet { images, labels })
}

/// Loads an IDX dataset (MNIST layout) from its files, keyed by file name.
pub fn load_idx(files: &BTreeMap<String, PathBuf>) -> Result<TrainTest, DataError> {
    Ok(TrainTest { train: load_idx_pair(files, "train")?, test: load_idx_pair(files, "t10k")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_set(dir: &Path, prefix: &str, count: usize, labels: usize) -> BTreeMap<String, PathBuf> {
        let images = idx::IdxImages { count, rows: 4, cols: 4, pixels: (0..count * 16).map(|i| (i % 256) as u8).collect() };
        let label_bytes: Vec<u8> = (0..labels).map(|i| (i % 10) as u8).collect();
        let mut files = BTreeMap::new();
        for (name, bytes) in [
            (format!("{prefix}-images-idx3-ubyte"), idx::encode_images(&images)),
            (format!("{prefix}-labels-idx1-ubyte"), idx::encode_labels(&label_bytes)),
        ] {
            let path = dir.join(&name);
            std::fs::write(&path, bytes).unwrap();
            files.insert(name, path);
        }
        files
    }

    #[test]
    fn loads_scaled_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = write_set(dir.path(), "train", 5, 5);
        files.extend(write_set(dir.path(), "t10k", 2, 2));
        let data = load_idx(&files).unwrap();
        assert_eq!(data.train.images.size(), [5, 1, 4, 4]);
        assert_eq!(data.test.labels.size(), [2]);
        assert_eq!(data.train.images.double_value(&[0, 0, 0, 1]), f64::from(1.0f32 / 255.0));
        assert_eq!(data.train.labels.int64_value(&[3]), 3);
        assert_eq!(data.train.truncate(3).len(), 3);
    }

    #[test]
    fn mismatched_counts_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = write_set(dir.path(), "train", 5, 4);
        files.extend(write_set(dir.path(), "t10k", 2, 2));
        let err = load_idx(&files).unwrap_err().to_string();
        assert!(err.contains("holds 5 images but") && err.contains("holds 4 labels"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_set(dir.path(), "train", 5, 5);
        let err = load_idx(&files).unwrap_err().to_string();
        assert!(err.contains("no file named t10k-images-idx3-ubyte"), "{err}");
    }
}
