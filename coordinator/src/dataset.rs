//! What the coordinator checks of a dataset before planning on it, so that a dataset that cannot
//! be read is refused at submission (naming the file) rather than failing every trial: every
//! file the format needs is present and its header parses, and how many training samples there
//! are (so batch sizes can be checked). Decoding every image stays with the workers.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use cohort_proto::transfer::{is_plain_relative_name, DATASET_FILE_SLACK_BYTES, MAX_DATASET_FILE_BYTES};
use flate2::read::GzDecoder;

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

/// The first bytes of a gzip file.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A dataset file opened for a bounded read: raw, or inflated as it is read (gzip is told by
/// its magic bytes, not by its name). Nothing past the end its header declares, plus
/// [`DATASET_FILE_SLACK_BYTES`], is ever inflated, so a small gzip bomb cannot make the check
/// inflate gigabytes; and nothing but the header is kept in memory.
struct DatasetFile<'a> {
    reader: Box<dyn Read>,
    gzip: bool,
    /// Names the file in errors.
    name: &'a str,
}

impl<'a> DatasetFile<'a> {
    /// Opens `path`, inflating it when it starts with the gzip magic.
    fn open(path: &Path, name: &'a str) -> Result<Self, DatasetError> {
        let io_error = |error: std::io::Error| DatasetError(format!("{name}: {error}"));
        let mut file = std::fs::File::open(path).map_err(io_error)?;
        let mut magic = Vec::with_capacity(GZIP_MAGIC.len());
        Read::take(&mut file, GZIP_MAGIC.len() as u64).read_to_end(&mut magic).map_err(io_error)?;
        let gzip = magic == GZIP_MAGIC;
        let raw = std::io::Cursor::new(magic).chain(BufReader::new(file));
        let reader: Box<dyn Read> = if gzip { Box::new(GzDecoder::new(raw)) } else { Box::new(raw) };
        Ok(Self { reader, gzip, name })
    }

    fn read_error(&self, error: std::io::Error) -> DatasetError {
        if self.gzip {
            return DatasetError(format!("{}: not valid gzip: {error}", self.name));
        }
        DatasetError(format!("{}: {error}", self.name))
    }

    /// The first `len` bytes (fewer only when the file ends before).
    fn read_header(&mut self, len: usize) -> Result<Vec<u8>, DatasetError> {
        let mut header = Vec::with_capacity(len);
        let read = Read::take(&mut self.reader, len as u64).read_to_end(&mut header);
        read.map_err(|error| self.read_error(error))?;
        Ok(header)
    }

    /// Reads on from the end of the header (`header_len` bytes, already read) to the end the
    /// header declares (`declared` bytes from the start of the file), keeping nothing; returns
    /// the bytes found past the header, fewer than `declared - header_len` only when the file
    /// is truncated. Refuses a declared size over [`MAX_DATASET_FILE_BYTES`], and a file that
    /// goes on more than [`DATASET_FILE_SLACK_BYTES`] past its declared end.
    fn skim_to_declared_end(&mut self, header_len: u64, declared: u64) -> Result<u64, DatasetError> {
        if declared > MAX_DATASET_FILE_BYTES {
            return Err(DatasetError(format!(
                "{}: the header declares {declared} bytes, more than the limit of {MAX_DATASET_FILE_BYTES}",
                self.name
            )));
        }
        let body = declared.saturating_sub(header_len);
        let found = std::io::copy(&mut Read::take(&mut self.reader, body), &mut std::io::sink());
        let found = found.map_err(|error| self.read_error(error))?;
        if found < body {
            return Ok(found);
        }
        let beyond = std::io::copy(&mut Read::take(&mut self.reader, DATASET_FILE_SLACK_BYTES + 1), &mut std::io::sink());
        let beyond = beyond.map_err(|error| self.read_error(error))?;
        if beyond > DATASET_FILE_SLACK_BYTES {
            let how = if self.gzip { "inflates past" } else { "holds more than" };
            return Err(DatasetError(format!(
                "{}: {how} the {declared} bytes its header declares (more than {DATASET_FILE_SLACK_BYTES} bytes beyond)",
                self.name
            )));
        }
        Ok(found)
    }
}

fn be_u32(bytes: &[u8], index: usize) -> Option<u32> {
    bytes.get(index * 4..index * 4 + 4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// Checks an IDX file's header and length; returns its item count. `images` selects magic
/// 0x803 (N×rows×cols bytes) over 0x801 (N bytes).
///
/// The file is streamed, never held whole: it is read (inflated) up to the end its header
/// declares, and refused when it holds less, when it goes on past that end (see
/// [`DATASET_FILE_SLACK_BYTES`]), or when the header declares more than
/// [`MAX_DATASET_FILE_BYTES`] or dimensions whose product overflows.
pub fn idx_count(path: &Path, name: &str, images: bool) -> Result<u64, DatasetError> {
    let (expected_magic, header_words) = if images { (0x0803, 4) } else { (0x0801, 2) };
    let header_len = header_words * 4;
    let mut file = DatasetFile::open(path, name)?;
    let bytes = file.read_header(header_len)?;
    let header: Option<Vec<u32>> = (0..header_words).map(|i| be_u32(&bytes, i)).collect();
    let header = header.ok_or_else(|| DatasetError(format!("{name}: truncated header ({} bytes)", bytes.len())))?;
    if header[0] != expected_magic {
        return Err(DatasetError(format!("{name}: wrong magic number 0x{:08x}, expected 0x{expected_magic:08x}", header[0])));
    }
    let dims = &header[1..];
    let items = dims
        .iter()
        .try_fold(1u64, |product, &extent| product.checked_mul(u64::from(extent)))
        .and_then(|items| items.checked_add(header_len as u64).map(|declared| (items, declared)));
    let Some((items, declared)) = items else {
        return Err(DatasetError(format!("{name}: dimensions {dims:?} overflow")));
    };
    let available = file.skim_to_declared_end(header_len as u64, declared)?;
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

/// Size of the NIfTI-1 header, and the value of its first field (`sizeof_hdr`).
const NIFTI_HEADER_LEN: usize = 348;

/// Bytes per voxel of the NIfTI-1 datatypes the workers decode, by datatype code.
fn nifti_voxel_bytes(code: i16) -> Option<u64> {
    match code {
        2 | 256 => Some(1),
        4 | 512 => Some(2),
        8 | 16 => Some(4),
        64 => Some(8),
        _ => None,
    }
}

/// Checks that the dataset holds NIfTI-1 volumes whose headers parse and whose voxels are all
/// there (as the workers will read them: 3 to 7 dimensions, a supported datatype).
///
/// Each file is streamed, never held whole, and read (inflated) no further than the end of
/// the voxels its header declares, plus [`DATASET_FILE_SLACK_BYTES`]: a file that goes on
/// past that is refused, as is one whose header declares more than [`MAX_DATASET_FILE_BYTES`].
pub fn check_nifti(files: &[(String, PathBuf)]) -> Result<(), DatasetError> {
    let volumes: Vec<&(String, PathBuf)> = files.iter().filter(|(name, _)| name.ends_with(".nii") || name.ends_with(".nii.gz")).collect();
    if volumes.is_empty() {
        return Err(DatasetError("no .nii or .nii.gz volume".into()));
    }
    for (name, path) in volumes {
        check_nifti_volume(path, name)?;
    }
    Ok(())
}

/// Checks one NIfTI-1 volume (see [`check_nifti`]).
fn check_nifti_volume(path: &Path, name: &str) -> Result<(), DatasetError> {
    let mut file = DatasetFile::open(path, name)?;
    let header = file.read_header(NIFTI_HEADER_LEN)?;
    if header.len() < NIFTI_HEADER_LEN {
        return Err(DatasetError(format!("{name}: {} bytes, shorter than the 348-byte NIfTI-1 header", header.len())));
    }
    let word = |offset: usize| [header[offset], header[offset + 1], header[offset + 2], header[offset + 3]];
    let little = if i32::from_le_bytes(word(0)) == 348 {
        true
    } else if i32::from_be_bytes(word(0)) == 348 {
        false
    } else {
        return Err(DatasetError(format!("{name}: not a NIfTI-1 file (sizeof_hdr is not 348)")));
    };
    if &header[344..348] != b"n+1\0" {
        return Err(DatasetError(format!("{name}: not a single-file NIfTI-1 volume (magic is not \"n+1\")")));
    }
    let i16_at = |offset: usize| {
        let field = [header[offset], header[offset + 1]];
        if little {
            i16::from_le_bytes(field)
        } else {
            i16::from_be_bytes(field)
        }
    };
    let rank = i16_at(40);
    if !(3..=7).contains(&rank) {
        return Err(DatasetError(format!("{name}: dim[0] is {rank}: need 3 to 7 dimensions (a volume)")));
    }
    let code = i16_at(70);
    let voxel_bytes = nifti_voxel_bytes(code)
        .ok_or_else(|| DatasetError(format!("{name}: unsupported datatype {code}; supported: 2, 4, 8, 16, 64, 256, 512")))?;
    let bitpix = i16_at(72);
    if i64::from(bitpix) != 8 * voxel_bytes as i64 {
        return Err(DatasetError(format!("{name}: bitpix {bitpix} does not match datatype {code} ({} bits)", 8 * voxel_bytes)));
    }
    let mut voxels = voxel_bytes;
    for axis in 1..=rank as usize {
        let extent = i16_at(40 + 2 * axis);
        if extent < 1 {
            return Err(DatasetError(format!("{name}: dim[{axis}] is {extent}, must be positive")));
        }
        voxels = voxels
            .checked_mul(extent as u64)
            .ok_or_else(|| DatasetError(format!("{name}: {rank} dimensions up to dim[{axis}] = {extent} overflow")))?;
    }
    let vox_offset = if little { f32::from_le_bytes(word(108)) } else { f32::from_be_bytes(word(108)) };
    if !vox_offset.is_finite() || vox_offset < NIFTI_HEADER_LEN as f32 {
        return Err(DatasetError(format!("{name}: vox_offset {vox_offset} does not lie past the 348-byte header")));
    }
    // The workers read the voxels from the integer part of `vox_offset`.
    let vox_offset = vox_offset as u64;
    let declared = vox_offset
        .checked_add(voxels)
        .ok_or_else(|| DatasetError(format!("{name}: vox_offset {vox_offset} and {voxels} bytes of voxels overflow")))?;
    let available = file.skim_to_declared_end(NIFTI_HEADER_LEN as u64, declared)?;
    let needed = declared - NIFTI_HEADER_LEN as u64;
    if available < needed {
        return Err(DatasetError(format!(
            "{name}: truncated data: the header promises {voxels} bytes of voxels at offset {vox_offset}, the file holds {}",
            (NIFTI_HEADER_LEN as u64 + available).saturating_sub(vox_offset)
        )));
    }
    Ok(())
}

/// Checks an image-folder layout: class folders (under `train/` when there is one) holding
/// .png/.jpg/.jpeg files.
pub fn check_image_folder(files: &[(String, PathBuf)]) -> Result<(), DatasetError> {
    if training_images(files.iter().map(|(name, _)| name.as_str())).next().is_none() {
        let has_train = files.iter().any(|(name, _)| name.starts_with("train/"));
        let layout = if has_train { "train/{class}/*.png|jpg" } else { "{class}/*.png|jpg (or train/{class}/...)" };
        return Err(DatasetError(format!("no training image in the layout {layout}")));
    }
    Ok(())
}

/// The training images of an image folder as (class, file name): `train/{class}/*.png|jpg`, or
/// `{class}/*.png|jpg` when no name starts with `train/`.
fn training_images<'a>(names: impl Iterator<Item = &'a str> + Clone) -> impl Iterator<Item = (&'a str, &'a str)> {
    let is_image = |name: &str| {
        let lower = name.to_ascii_lowercase();
        lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
    };
    let has_train = names.clone().any(|name| name.starts_with("train/"));
    let depth = if has_train { 3 } else { 2 };
    names.filter(move |name| is_image(name) && name.split('/').count() == depth && (!has_train || name.starts_with("train/"))).map(
        move |name| {
            let class = name.split('/').nth(depth - 2).unwrap_or_default();
            (class, name)
        },
    )
}

/// An image folder's classes as the worker's loader numbers them: the training class folders
/// holding images, in name order (a class's label is its index here).
pub fn image_folder_classes<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Vec<String> {
    let classes: std::collections::BTreeSet<&str> = training_images(names).map(|(class, _)| class).collect();
    classes.into_iter().map(str::to_string).collect()
}

/// The digit each class of an image folder stands for, by label, for a judge classifier trained
/// on MNIST's digits: every class folder must be named by one digit, `0` to `9`.
pub fn digit_classes(classes: &[String]) -> Result<Vec<u32>, DatasetError> {
    classes
        .iter()
        .map(|class| match class.as_bytes() {
            [digit @ b'0'..=b'9'] => Ok(u32::from(digit - b'0')),
            _ => Err(DatasetError(format!(
                "class folder {class:?} is not a digit: a judge classifier labels MNIST digits, so each class folder must be named by its digit (0 to 9), as tools/data/stand_in_classes.py writes them"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folder_classes_are_the_training_class_folders_in_name_order() {
        let names = ["train/7/a.png", "train/1/b.PNG", "train/1/c.jpg", "test/4/d.png", "train/notes.txt", "train/9/sub/e.png"];
        let classes = image_folder_classes(names.iter().copied());
        assert_eq!(classes, ["1", "7"]);
        assert_eq!(digit_classes(&classes).unwrap(), [1, 7]);
        assert_eq!(image_folder_classes(["b/x.png", "a/y.png"].iter().copied()), ["a", "b"], "class folders at the root");
        let error = digit_classes(&["0".into(), "tumor".into()]).unwrap_err().to_string();
        assert!(error.contains("\"tumor\" is not a digit"), "{error}");
        assert!(digit_classes(&["10".into()]).is_err(), "one digit per class");
    }

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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_bombs_are_cut_off_at_the_size_their_header_declares() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // 5 labels declared (13 bytes in all), then 8 MiB of zeros: about 8 KiB of gzip.
        let mut bomb = idx_labels(5);
        bomb.resize(bomb.len() + (8 << 20), 0);
        let packed = gzip(&bomb);
        assert!(packed.len() < 64 << 10, "{} bytes", packed.len());
        let err = idx_count(&write(d, "labels.gz", &packed).1, "labels.gz", false).unwrap_err().to_string();
        assert!(err.contains("labels.gz: inflates past the 13 bytes its header declares (more than 65536 bytes beyond)"), "{err}");
        let err = idx_count(&write(d, "labels", &bomb).1, "labels", false).unwrap_err().to_string();
        assert!(err.contains("labels: holds more than the 13 bytes its header declares"), "{err}");

        // A little padding past the declared end is tolerated, raw or packed.
        let mut padded = idx_labels(5);
        padded.extend([0u8; 100]);
        assert_eq!(idx_count(&write(d, "padded", &padded).1, "padded", false).unwrap(), 5);
        assert_eq!(idx_count(&write(d, "padded.gz", &gzip(&padded)).1, "padded.gz", false).unwrap(), 5);
        assert_eq!(idx_count(&write(d, "images.gz", &gzip(&idx_images(3))).1, "images.gz", true).unwrap(), 3);
    }

    #[test]
    fn headers_declaring_too_much_or_overflowing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let header = |words: [u32; 4]| words.iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        // 2^30 images of 4×4: 16 GiB declared.
        let huge = write(d, "huge", &gzip(&header([0x0803, 1 << 30, 4, 4])));
        let err = idx_count(&huge.1, "huge", true).unwrap_err().to_string();
        assert!(err.contains("huge: the header declares 17179869200 bytes, more than the limit of 8589934592"), "{err}");
        // 4 × 2^31 × 2^31 is 2^64: a wrapping product would promise 0 bytes and pass.
        let wrapping = write(d, "wrapping", &header([0x0803, 4, 1 << 31, 1 << 31]));
        let err = idx_count(&wrapping.1, "wrapping", true).unwrap_err().to_string();
        assert!(err.contains("wrapping: dimensions [4, 2147483648, 2147483648] overflow"), "{err}");
    }

    /// A little-endian uint8 NIfTI-1 volume of 2×2×`depth`, voxels at 352.
    fn nifti_volume(depth: i16) -> Vec<u8> {
        let mut bytes = vec![0u8; 352];
        bytes[..4].copy_from_slice(&348i32.to_le_bytes());
        for (index, value) in [3i16, 2, 2, depth].into_iter().enumerate() {
            bytes[40 + 2 * index..42 + 2 * index].copy_from_slice(&value.to_le_bytes());
        }
        bytes[70..72].copy_from_slice(&2i16.to_le_bytes());
        bytes[72..74].copy_from_slice(&8i16.to_le_bytes());
        bytes[108..112].copy_from_slice(&352f32.to_le_bytes());
        bytes[344..348].copy_from_slice(b"n+1\0");
        bytes.extend((0..4 * depth.max(0) as usize).map(|i| i as u8));
        bytes
    }

    #[test]
    fn nifti_volumes_are_read_no_further_than_their_voxels() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        check_nifti(&[write(d, "brain.nii.gz", &gzip(&nifti_volume(3)))]).unwrap();
        let mut bomb = nifti_volume(3);
        bomb.resize(bomb.len() + (4 << 20), 0);
        let err = check_nifti(&[write(d, "bomb.nii.gz", &gzip(&bomb))]).unwrap_err().to_string();
        assert!(err.contains("bomb.nii.gz: inflates past the 364 bytes its header declares"), "{err}");
        let mut truncated = nifti_volume(3);
        truncated.pop();
        let err = check_nifti(&[write(d, "short.nii.gz", &gzip(&truncated))]).unwrap_err().to_string();
        assert!(
            err.contains("short.nii.gz: truncated data: the header promises 12 bytes of voxels at offset 352, the file holds 11"),
            "{err}"
        );
        let mut huge = nifti_volume(3);
        for axis in 1..=7 {
            huge[40 + 2 * axis..42 + 2 * axis].copy_from_slice(&i16::MAX.to_le_bytes());
        }
        huge[40..42].copy_from_slice(&4i16.to_le_bytes());
        let err = check_nifti(&[write(d, "huge.nii", &huge)]).unwrap_err().to_string();
        assert!(err.contains("huge.nii: the header declares 1152780773560811873 bytes, more than the limit of 8589934592"), "{err}");
        huge[40..42].copy_from_slice(&7i16.to_le_bytes());
        let err = check_nifti(&[write(d, "huge.nii", &huge)]).unwrap_err().to_string();
        assert!(err.contains("huge.nii: 7 dimensions up to dim[5] = 32767 overflow"), "{err}");
        let mut flat = nifti_volume(3);
        flat[40..42].copy_from_slice(&2i16.to_le_bytes());
        let err = check_nifti(&[write(d, "flat.nii", &flat)]).unwrap_err().to_string();
        assert!(err.contains("flat.nii: dim[0] is 2: need 3 to 7 dimensions"), "{err}");
        let mut rgb = nifti_volume(3);
        rgb[70..72].copy_from_slice(&128i16.to_le_bytes());
        let err = check_nifti(&[write(d, "rgb.nii", &rgb)]).unwrap_err().to_string();
        assert!(err.contains("rgb.nii: unsupported datatype 128"), "{err}");
    }

    #[test]
    fn nifti_and_image_folders_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut header = nifti_volume(1);
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
