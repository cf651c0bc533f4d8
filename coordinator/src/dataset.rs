//! What the coordinator checks of a dataset before planning on it, so that a dataset that cannot
//! be read is refused at submission (naming the file) rather than failing every trial: every
//! file the format needs is present and its header parses, and how many training samples there
//! are (so batch sizes can be checked). Decoding every image stays with the workers.

use std::io::Read;
use std::path::{Path, PathBuf};

use cohort_proto::transfer::is_plain_relative_name;

/// Why a dataset was refused.
#[derive(Debug, thiserror::Error)]
#[error("dataset: {0}")]
pub struct DatasetError(pub String);

/// Checks that every dataset file name is a plain relative path (no root, no `..`), so no name
/// can place a file outside the dataset's folder on a worker.
pub fn check_names<'a>(names: impl IntoIterator<Item = &'a str>, max_bytes: usize) -> Result<(), DatasetError> {
    let mut count = 0;
    for name in names {
        count += 1;
        if name.len() > max_bytes || !is_plain_relative_name(name) {
            return Err(DatasetError(format!("file name {name:?} is not a plain relative path of at most {max_bytes} bytes")));
        }
    }
    if count == 0 {
        return Err(DatasetError("no files".into()));
    }
    Ok(())
}

/// Reads a whole file, un-gzipping it when it starts with the gzip magic; `name` names errors.
fn read_maybe_gzip(path: &Path, name: &str) -> Result<Vec<u8>, DatasetError> {
    let raw = std::fs::read(path).map_err(|e| DatasetError(format!("{name}: {e}")))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut decoded)
        .map_err(|e| DatasetError(format!("{name}: not valid gzip: {e}")))?;
    Ok(decoded)
}

fn be_u32(bytes: &[u8], index: usize) -> Option<u32> {
    bytes.get(index * 4..index * 4 + 4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// Checks an IDX file's header and length; returns its item count. `images` selects magic
/// 0x803 (N×rows×cols bytes) over 0x801 (N bytes).
pub fn idx_count(path: &Path, name: &str, images: bool) -> Result<u64, DatasetError> {
    let bytes = read_maybe_gzip(path, name)?;
    let (expected_magic, header_words) = if images { (0x0803, 4) } else { (0x0801, 2) };
    let header: Option<Vec<u32>> = (0..header_words).map(|i| be_u32(&bytes, i)).collect();
    let header = header.ok_or_else(|| DatasetError(format!("{name}: truncated header ({} bytes)", bytes.len())))?;
    if header[0] != expected_magic {
        return Err(DatasetError(format!("{name}: wrong magic number 0x{:08x}, expected 0x{expected_magic:08x}", header[0])));
    }
    let items: u64 = header[1..].iter().map(|&d| u64::from(d)).product();
    let available = bytes.len() as u64 - header_words as u64 * 4;
    if available < items {
        return Err(DatasetError(format!("{name}: truncated data: the header promises {items} bytes, the file holds {available}")));
    }
    Ok(u64::from(header[1]))
}

/// Checks an IDX dataset (all four files, matching counts); returns the training sample count.
pub fn check_idx(files: &[(String, PathBuf)]) -> Result<u64, DatasetError> {
    let find = |stem: &str| -> Result<&(String, PathBuf), DatasetError> {
        files.iter().find(|(name, _)| name.starts_with(stem)).ok_or_else(|| DatasetError(format!("no {stem} file ({stem} or {stem}.gz)")))
    };
    let mut train = 0;
    for prefix in ["train", "t10k"] {
        let (images_name, images_path) = find(&format!("{prefix}-images-idx3-ubyte"))?;
        let (labels_name, labels_path) = find(&format!("{prefix}-labels-idx1-ubyte"))?;
        let images = idx_count(images_path, images_name, true)?;
        let labels = idx_count(labels_path, labels_name, false)?;
        if images != labels {
            return Err(DatasetError(format!("{images_name} holds {images} images but {labels_name} holds {labels} labels")));
        }
        if prefix == "train" {
            train = images;
        }
    }
    Ok(train)
}

/// Checks that the dataset holds NIfTI-1 volumes whose headers parse.
pub fn check_nifti(files: &[(String, PathBuf)]) -> Result<(), DatasetError> {
    let volumes: Vec<&(String, PathBuf)> = files.iter().filter(|(name, _)| name.ends_with(".nii") || name.ends_with(".nii.gz")).collect();
    if volumes.is_empty() {
        return Err(DatasetError("no .nii or .nii.gz volume".into()));
    }
    for (name, path) in volumes {
        let bytes = read_maybe_gzip(path, name)?;
        let Some(header) = bytes.get(..348) else {
            return Err(DatasetError(format!("{name}: {} bytes, shorter than the 348-byte NIfTI-1 header", bytes.len())));
        };
        let little = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let big = i32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if little != 348 && big != 348 {
            return Err(DatasetError(format!("{name}: not a NIfTI-1 file (sizeof_hdr is not 348)")));
        }
        if &header[344..348] != b"n+1\0" {
            return Err(DatasetError(format!("{name}: not a single-file NIfTI-1 volume (magic is not \"n+1\")")));
        }
    }
    Ok(())
}

/// Checks an image-folder layout: class folders (under `train/` when there is one) holding
/// .png/.jpg/.jpeg files.
pub fn check_image_folder(files: &[(String, PathBuf)]) -> Result<(), DatasetError> {
    let is_image = |name: &str| {
        let lower = name.to_ascii_lowercase();
        lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
    };
    let has_train = files.iter().any(|(name, _)| name.starts_with("train/"));
    let depth = if has_train { 3 } else { 2 };
    let classed = files
        .iter()
        .filter(|(name, _)| is_image(name) && name.split('/').count() == depth && (!has_train || name.starts_with("train/")))
        .count();
    if classed == 0 {
        let layout = if has_train { "train/{class}/*.png|jpg" } else { "{class}/*.png|jpg (or train/{class}/...)" };
        return Err(DatasetError(format!("no training image in the layout {layout}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_dataset_folder() {
        check_names(["a", "train/x/y.png"], 64).unwrap();
        for bad in ["../x", "/abs", "a/../b", "", "a//b"] {
            assert!(check_names([bad], 64).is_err(), "{bad}");
        }
        assert!(check_names(["x".repeat(65).as_str()], 64).is_err(), "too long");
        assert!(check_names([], 64).unwrap_err().to_string().contains("no files"));
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> (String, PathBuf) {
        let path = dir.join(name.replace('/', "_"));
        std::fs::write(&path, bytes).unwrap();
        (name.to_string(), path)
    }

    fn idx_images(count: u32) -> Vec<u8> {
        let mut bytes = [0x0803u32, count, 2, 2].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        bytes.extend(vec![7u8; count as usize * 4]);
        bytes
    }

    fn idx_labels(count: u32) -> Vec<u8> {
        let mut bytes = [0x0801u32, count].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        bytes.extend(vec![1u8; count as usize]);
        bytes
    }

    #[test]
    fn idx_datasets_are_checked_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut files = vec![
            write(d, "train-images-idx3-ubyte", &idx_images(5)),
            write(d, "train-labels-idx1-ubyte", &idx_labels(5)),
            write(d, "t10k-images-idx3-ubyte", &idx_images(2)),
            write(d, "t10k-labels-idx1-ubyte", &idx_labels(2)),
        ];
        assert_eq!(check_idx(&files).unwrap(), 5);
        let err = check_idx(&files[..3]).unwrap_err().to_string();
        assert!(err.contains("no t10k-labels-idx1-ubyte file"), "{err}");
        files[3] = write(d, "t10k-labels-idx1-ubyte", &idx_labels(3));
        assert!(check_idx(&files).unwrap_err().to_string().contains("holds 2 images but t10k-labels-idx1-ubyte holds 3 labels"));
        let mut truncated = idx_images(5);
        truncated.truncate(20);
        files[0] = write(d, "train-images-idx3-ubyte", &truncated);
        assert!(check_idx(&files).unwrap_err().to_string().contains("train-images-idx3-ubyte: truncated data"));
        files[0] = write(d, "train-images-idx3-ubyte", &idx_labels(20));
        assert!(check_idx(&files).unwrap_err().to_string().contains("train-images-idx3-ubyte: wrong magic number 0x00000801"));
        files[0] = write(d, "train-images-idx3-ubyte.gz", &[0x1f, 0x8b, 1, 2, 3]);
        assert!(check_idx(&files).unwrap_err().to_string().contains("not valid gzip"));
    }

    #[test]
    fn nifti_and_image_folders_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut header = vec![0u8; 352];
        header[..4].copy_from_slice(&348i32.to_le_bytes());
        header[344..348].copy_from_slice(b"n+1\0");
        check_nifti(&[write(d, "brain.nii", &header)]).unwrap();
        header[344] = b'x';
        assert!(check_nifti(&[write(d, "brain.nii", &header)]).unwrap_err().to_string().contains("brain.nii: not a single-file"));
        assert!(check_nifti(&[write(d, "brain.nii", &[1, 2, 3])]).unwrap_err().to_string().contains("shorter than the 348-byte"));
        assert!(check_nifti(&[write(d, "notes.txt", b"x")]).unwrap_err().to_string().contains("no .nii"));

        check_image_folder(&[write(d, "train/NonDemented/a.JPG", b"x")]).unwrap();
        check_image_folder(&[write(d, "cats/a.png", b"x")]).unwrap();
        assert!(check_image_folder(&[write(d, "a.png", b"x")]).is_err(), "images need a class folder");
        assert!(check_image_folder(&[write(d, "train/a.png", b"x")]).unwrap_err().to_string().contains("train/{class}"));
    }
}
