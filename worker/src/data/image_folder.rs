//! Image-folder datasets (the seed's MRI scans): one sub-folder per class of JPEG or PNG files.
//!
//! The layout is `ROOT/train/{class}/*.jpg|*.jpeg|*.png`, with an optional `ROOT/test/{class}/…`
//! beside it; when ROOT has no `train` folder, ROOT itself holds the class folders and the test
//! set is empty. Classes are the training class folders sorted by name, and a label is a class's
//! index in that order. Files are decoded by content (not by extension), turned grey, resized to
//! a square and scaled to [-1, 1].

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use tch::{Kind, Tensor};

use super::{DataError, ImageSet, TrainTest};

/// File extensions (compared case-insensitively) that count as images.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A class folder: its name (the class) and where it is.
#[derive(Debug)]
struct ClassFolder {
    name: String,
    path: PathBuf,
}

/// The entries of `dir`, sorted by path so that loading does not depend on the file system's order.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io_error = |source| DataError::Io { path: dir.to_path_buf(), source };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        entries.push(entry.map_err(io_error)?.path());
    }
    entries.sort();
    Ok(entries)
}

/// The sub-folders of `dir`, sorted by name.
fn class_folders(dir: &Path) -> Result<Vec<ClassFolder>, DataError> {
    let mut folders = Vec::new();
    for path in sorted_entries(dir)? {
        if !path.is_dir() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            return Err(DataError::Layout(format!("class folder {} has a name that is not UTF-8", path.display())));
        };
        folders.push(ClassFolder { name: name.to_owned(), path: path.clone() });
    }
    Ok(folders)
}

/// True when `path` names a file with one of the image extensions.
fn is_image_file(path: &Path) -> bool {
    let Some(extension) = path.extension().and_then(|extension| extension.to_str()) else {
        return false;
    };
    path.is_file() && IMAGE_EXTENSIONS.iter().any(|known| extension.eq_ignore_ascii_case(known))
}

/// The image files of a class folder, sorted by name.
fn image_files(folder: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_entries(folder)?.into_iter().filter(|path| is_image_file(path)).collect())
}

/// Decodes one image file into `size * size` grey levels scaled to [-1, 1], row-major.
fn decode_grey(path: &Path, size: u32) -> Result<Vec<f32>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let decoded = image::load_from_memory(&bytes)
        .map_err(|error| DataError::Format { path: path.to_path_buf(), message: format!("cannot decode image: {error}") })?;
    let resized = image::imageops::resize(&decoded.to_luma8(), size, size, FilterType::Triangle);
    Ok(resized.into_raw().into_iter().map(|level| f32::from(level) / 127.5 - 1.0).collect())
}

/// Loads the images of `folders`, labelling each folder by the index of its name in `classes`.
///
/// With `require_images`, a folder holding no image file is an error (a training class with no
/// sample cannot be learned and is most likely a mistake).
fn load_set(folders: &[ClassFolder], classes: &[String], size: u32, require_images: bool) -> Result<ImageSet, DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for folder in folders {
        let Some(label) = classes.iter().position(|class| *class == folder.name) else {
            return Err(DataError::Layout(format!("class folder {} is not among the training classes {classes:?}", folder.path.display())));
        };
        let files = image_files(&folder.path)?;
        if require_images && files.is_empty() {
            return Err(DataError::Layout(format!("class folder {} holds no .jpg, .jpeg or .png file", folder.path.display())));
        }
        for file in files {
            pixels.extend(decode_grey(&file, size)?);
            labels.push(label as i64);
        }
    }
    let side = i64::from(size);
    let images = Tensor::from_slice(&pixels).view([labels.len() as i64, 1, side, side]);
    Ok(ImageSet { images, labels: Tensor::from_slice(&labels).to_kind(Kind::Int64) })
}

/// Loads an image-folder dataset from `root`, every image resized to `size`×`size`.
///
/// Images are `[N, 1, size, size]` float32 grey levels scaled to [-1, 1]; labels are the indices
/// of the class folders in name order. Samples come class by class, files in name order.
///
/// Errors: a tree without class folders or a training class without images is
/// [`DataError::Layout`], as is a test class that training lacks; a file that is not a JPEG or
/// PNG image is [`DataError::Format`] naming it.
///
/// # Panics
///
/// When `size` is not in `1..=u32::MAX`.
pub fn load_image_folder(root: &Path, size: i64) -> Result<TrainTest, DataError> {
    assert!(size > 0 && size <= i64::from(u32::MAX), "image size {size} is out of range");
    let side = size as u32;
    let train_root = root.join("train");
    let test_root = root.join("test");
    let has_train_folder = train_root.is_dir();
    if !has_train_folder && test_root.is_dir() {
        return Err(DataError::Layout(format!("{} has a test folder but no train folder", root.display())));
    }
    let train_root = if has_train_folder { train_root } else { root.to_path_buf() };
    let train_folders = class_folders(&train_root)?;
    if train_folders.is_empty() {
        return Err(DataError::Layout(format!(
            "{} holds no class folder (expected {}/CLASS/*.png|*.jpg)",
            train_root.display(),
            train_root.display()
        )));
    }
    let classes: Vec<String> = train_folders.iter().map(|folder| folder.name.clone()).collect();
    let train = load_set(&train_folders, &classes, side, true)?;
    let test_folders = if has_train_folder && test_root.is_dir() { class_folders(&test_root)? } else { Vec::new() };
    let test = load_set(&test_folders, &classes, side, false)?;
    Ok(TrainTest { train, test })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    /// Writes a `width`×`height` grey image of one `level`; the format follows the extension.
    fn write_grey(path: &Path, width: u32, height: u32, level: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(width, height, Luma([level])).save(path).unwrap();
    }

    /// Writes a `width`×`height` colour image of one `colour`; the format follows the extension.
    fn write_rgb(path: &Path, width: u32, height: u32, colour: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(width, height, Rgb(colour)).save(path).unwrap();
    }

    fn labels(set: &ImageSet) -> Vec<i64> {
        Vec::<i64>::try_from(&set.labels).unwrap()
    }

    #[test]
    fn train_and_test_folders_get_sorted_class_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_grey(&root.join("train/tumor/b.png"), 10, 12, 255);
        write_grey(&root.join("train/healthy/2.png"), 5, 7, 0);
        write_rgb(&root.join("train/healthy/1.jpg"), 16, 16, [128, 128, 128]);
        write_grey(&root.join("test/tumor/x.jpeg"), 9, 9, 255);
        std::fs::write(root.join("train/healthy/notes.txt"), "not an image").unwrap();

        let data = load_image_folder(root, 8).unwrap();
        assert_eq!(data.train.images.size(), [3, 1, 8, 8]);
        assert_eq!(data.train.images.kind(), Kind::Float);
        assert_eq!(data.train.labels.kind(), Kind::Int64);
        assert_eq!(labels(&data.train), [0, 0, 1], "healthy < tumor, files in name order");
        assert_eq!(data.test.images.size(), [1, 1, 8, 8]);
        assert_eq!(labels(&data.test), [1], "the test set uses the training class indices");
    }

    #[test]
    fn grey_levels_are_scaled_to_minus_one_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_grey(&root.join("a/1.png"), 6, 4, 255);
        write_grey(&root.join("a/2.png"), 3, 3, 0);
        write_rgb(&root.join("b/1.jpg"), 20, 11, [200, 40, 90]);
        write_grey(&root.join("b/2.png"), 7, 7, 51);

        let data = load_image_folder(root, 5).unwrap();
        let images = &data.train.images;
        assert_eq!(images.size(), [4, 1, 5, 5]);
        assert_eq!(images.get(0).min().double_value(&[]), 1.0, "white is 1");
        assert_eq!(images.get(1).max().double_value(&[]), -1.0, "black is -1");
        assert!((images.get(3).mean(Kind::Float).double_value(&[]) - (51.0 / 127.5 - 1.0)).abs() < 1e-6);
        let colour = images.get(2);
        assert!(colour.min().double_value(&[]) > -1.0 && colour.max().double_value(&[]) < 1.0);
        assert!(images.min().double_value(&[]) >= -1.0 && images.max().double_value(&[]) <= 1.0);
    }

    #[test]
    fn class_folders_at_the_root_give_an_empty_test_set() {
        let dir = tempfile::tempdir().unwrap();
        write_grey(&dir.path().join("dog/1.png"), 4, 4, 10);
        write_grey(&dir.path().join("cat/1.png"), 4, 4, 20);
        write_grey(&dir.path().join("cat/2.png"), 4, 4, 30);

        let data = load_image_folder(dir.path(), 3).unwrap();
        assert_eq!(labels(&data.train), [0, 0, 1]);
        assert_eq!(data.test.images.size(), [0, 1, 3, 3]);
        assert!(data.test.is_empty());
    }

    #[test]
    fn corrupt_file_error_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        write_grey(&dir.path().join("a/good.png"), 4, 4, 10);
        let bad = dir.path().join("a/zz-bad.png");
        std::fs::write(&bad, b"\x89PNG but not really").unwrap();

        let err = load_image_folder(dir.path(), 4).unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&bad.display().to_string()) && message.contains("cannot decode"), "{message}");
    }

    #[test]
    fn empty_trees_are_layout_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_image_folder(dir.path(), 4).unwrap_err();
        assert!(matches!(err, DataError::Layout(_)), "{err:?}");
        assert!(err.to_string().contains("holds no class folder"), "{err}");

        std::fs::create_dir_all(dir.path().join("train/empty")).unwrap();
        let err = load_image_folder(dir.path(), 4).unwrap_err().to_string();
        assert!(err.contains("holds no .jpg, .jpeg or .png file") && err.contains("empty"), "{err}");

        let only_test = tempfile::tempdir().unwrap();
        write_grey(&only_test.path().join("test/a/1.png"), 4, 4, 10);
        let err = load_image_folder(only_test.path(), 4).unwrap_err().to_string();
        assert!(err.contains("has a test folder but no train folder"), "{err}");
    }

    #[test]
    fn test_class_unknown_to_training_is_a_layout_error() {
        let dir = tempfile::tempdir().unwrap();
        write_grey(&dir.path().join("train/a/1.png"), 4, 4, 10);
        write_grey(&dir.path().join("test/b/1.png"), 4, 4, 10);

        let err = load_image_folder(dir.path(), 4).unwrap_err();
        assert!(matches!(err, DataError::Layout(_)), "{err:?}");
        assert!(err.to_string().contains("not among the training classes"), "{err}");
    }
}
