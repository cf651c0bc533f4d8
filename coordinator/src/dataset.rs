//! What the coordinator checks of a dataset before planning on it: every file the format needs
//! is present, and how many training samples there are (so batch sizes can be checked).

use std::io::Read;
use std::path::Path;

use crate::sweep::dataset_file_names;

/// Why a dataset was refused.
#[derive(Debug, thiserror::Error)]
#[error("dataset: {0}")]
pub struct DatasetError(pub String);

/// Checks that every dataset file name is a plain relative path (no root, no `..`), so no name
/// can place a file outside the dataset's folder on a worker.
pub fn check_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), DatasetError> {
    let mut count = 0;
    for name in names {
        count += 1;
        let plain = !name.is_empty()
            && name.len() <= 1024
            && !name.starts_with('/')
            && !name.contains('\\')
            && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !plain {
            return Err(DatasetError(format!("file name {name:?} is not a plain relative path")));
        }
    }
    if count == 0 {
        return Err(DatasetError("no files".into()));
    }
    Ok(())
}

/// Checks the file names against the format; returns the file that holds the training labels.
pub fn check_files<'a>(format: &str, names: impl IntoIterator<Item = &'a str> + Clone) -> Result<String, DatasetError> {
    let mut labels = None;
    for (stem, what) in dataset_file_names(format) {
        let found = names.clone().into_iter().find(|name| name.starts_with(stem));
        let Some(found) = found else {
            return Err(DatasetError(format!("no {what} file ({stem} or {stem}.gz)")));
        };
        if stem == "train-labels-idx1-ubyte" {
            labels = Some(found.to_string());
        }
    }
    labels.ok_or_else(|| DatasetError(format!("format {format:?} has no training labels")))
}

/// Reads the sample count from an IDX label file's header (gzip or raw).
pub fn idx_label_count(path: &Path) -> Result<u64, DatasetError> {
    let raw = std::fs::read(path).map_err(|e| DatasetError(format!("{}: {e}", path.display())))?;
    let mut header = [0u8; 8];
    let read = if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(raw.as_slice()).read_exact(&mut header)
    } else {
        raw.as_slice().read_exact(&mut header)
    };
    read.map_err(|e| DatasetError(format!("training labels: truncated or not gzip: {e}")))?;
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if magic != 0x0801 {
        return Err(DatasetError(format!("training labels: wrong magic number 0x{magic:08x}, expected 0x00000801")));
    }
    Ok(u64::from(u32::from_be_bytes([header[4], header[5], header[6], header[7]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_missing_file() {
        let err = check_files("idx", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte"]).unwrap_err();
        assert!(err.to_string().contains("no test labels file (t10k-labels-idx1-ubyte"), "{err}");
        let all = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
        assert_eq!(check_files("idx", all).unwrap(), "train-labels-idx1-ubyte.gz");
    }

    #[test]
    fn names_cannot_escape_the_dataset_folder() {
        check_names(["a", "train/x/y.png"]).unwrap();
        for bad in ["../x", "/abs", "a/../b", "", "a//b"] {
            assert!(check_names([bad]).is_err(), "{bad}");
        }
        assert!(check_names([]).unwrap_err().to_string().contains("no files"));
    }

    #[test]
    fn reads_the_label_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        std::fs::write(&path, [0, 0, 8, 1, 0, 0, 1, 2, 9]).unwrap();
        assert_eq!(idx_label_count(&path).unwrap(), 258);
        std::fs::write(&path, [0, 0, 8, 3, 0, 0, 1, 2]).unwrap();
        assert!(idx_label_count(&path).unwrap_err().to_string().contains("wrong magic"));
    }
}
