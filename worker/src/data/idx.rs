//! The IDX format of MNIST and its kin (Fashion-MNIST, KMNIST): big-endian header, raw bytes.
//!
//! Files may be gzip-compressed (detected by magic bytes, not by name); either way a file is read
//! no further than the size its header declares (see `read_declared`).

use std::io::{BufReader, Read};
use std::path::Path;

use cohort_proto::transfer::{DATASET_FILE_SLACK_BYTES, MAX_DATASET_FILE_BYTES};
use flate2::read::GzDecoder;

use super::DataError;

/// IDX magic for unsigned-byte data with 1 (labels) or 3 (images) dimensions.
const MAGIC_U8_1D: u32 = 0x0000_0801;
const MAGIC_U8_3D: u32 = 0x0000_0803;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A decoded IDX image file: `count` images of `rows`×`cols` grey bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `count * rows * cols` grey levels, 0..=255.
    pub pixels: Vec<u8>,
}

/// Reads a file, un-gzipping it when it starts with the gzip magic, but no further than the end
/// its header declares: the first `header_len` bytes go to `declared_len`, which checks them and
/// returns the whole file's declared size (header included). That size must not pass
/// [`MAX_DATASET_FILE_BYTES`], and a file that goes on more than [`DATASET_FILE_SLACK_BYTES`] past
/// it is refused, so a gzip bomb is cut off a few bytes past its header's size instead of
/// filling memory. A file shorter than declared comes back short, for the parser to name what
/// is missing.
pub(super) fn read_declared(
    path: &Path,
    header_len: usize,
    declared_len: impl FnOnce(&[u8]) -> Result<u64, DataError>,
) -> Result<Vec<u8>, DataError> {
    let io_error = |source| DataError::Io { path: path.to_path_buf(), source };
    let format_error = |message| DataError::Format { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let mut magic = Vec::with_capacity(GZIP_MAGIC.len());
    Read::take(&mut file, GZIP_MAGIC.len() as u64).read_to_end(&mut magic).map_err(io_error)?;
    let gzip = magic == GZIP_MAGIC;
    let raw = std::io::Cursor::new(magic).chain(BufReader::new(file));
    let mut reader: Box<dyn Read> = if gzip { Box::new(GzDecoder::new(raw)) } else { Box::new(raw) };

    let mut bytes = Vec::with_capacity(header_len);
    Read::take(&mut reader, header_len as u64).read_to_end(&mut bytes).map_err(io_error)?;
    let declared = declared_len(&bytes)?;
    if declared > MAX_DATASET_FILE_BYTES {
        return Err(format_error(format!("the header declares {declared} bytes, more than the limit of {MAX_DATASET_FILE_BYTES}")));
    }
    let rest = declared.saturating_sub(bytes.len() as u64);
    // Grown as bytes arrive (not reserved up front), so a header that lies costs nothing.
    bytes.reserve(rest.min(FIRST_RESERVE_BYTES) as usize);
    Read::take(&mut reader, rest).read_to_end(&mut bytes).map_err(io_error)?;
    if (bytes.len() as u64) < declared {
        return Ok(bytes);
    }
    let beyond = std::io::copy(&mut Read::take(&mut reader, DATASET_FILE_SLACK_BYTES + 1), &mut std::io::sink()).map_err(io_error)?;
    if beyond > DATASET_FILE_SLACK_BYTES {
        let how = if gzip { "inflates past" } else { "holds more than" };
        return Err(format_error(format!(
            "{how} the {declared} bytes its header declares (more than {DATASET_FILE_SLACK_BYTES} bytes beyond)"
        )));
    }
    Ok(bytes)
}

/// The most [`read_declared`] reserves before the bytes arrive.
const FIRST_RESERVE_BYTES: u64 = 64 << 20;

fn header_u32(bytes: &[u8], index: usize, path: &Path) -> Result<u32, DataError> {
    let start = index * 4;
    let word = bytes.get(start..start + 4).ok_or_else(|| DataError::Format {
        path: path.to_path_buf(),
        message: format!("truncated header: {} bytes, need at least {}", bytes.len(), start + 4),
    })?;
    Ok(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

fn check_magic(found: u32, expected: u32, path: &Path) -> Result<(), DataError> {
    if found == expected {
        return Ok(());
    }
    Err(DataError::Format { path: path.to_path_buf(), message: format!("wrong magic number 0x{found:08x}, expected 0x{expected:08x}") })
}

fn payload<'a>(bytes: &'a [u8], offset: usize, len: usize, path: &Path) -> Result<&'a [u8], DataError> {
    let available = bytes.len().saturating_sub(offset);
    if available < len {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!("truncated data: header promises {len} bytes, file holds {available}"),
        });
    }
    Ok(&bytes[offset..offset + len])
}

/// Parses an IDX image file (magic 0x803) from bytes; `path` only names errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages, DataError> {
    check_magic(header_u32(bytes, 0, path)?, MAGIC_U8_3D, path)?;
    let count = header_u32(bytes, 1, path)? as usize;
    let rows = header_u32(bytes, 2, path)? as usize;
    let cols = header_u32(bytes, 3, path)? as usize;
    let len = count
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or_else(|| DataError::Format { path: path.to_path_buf(), message: "image dimensions overflow".into() })?;
    let pixels = payload(bytes, 16, len, path)?.to_vec();
    Ok(IdxImages { count, rows, cols, pixels })
}

/// Parses an IDX label file (magic 0x801) from bytes; `path` only names errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    check_magic(header_u32(bytes, 0, path)?, MAGIC_U8_1D, path)?;
    let count = header_u32(bytes, 1, path)? as usize;
    Ok(payload(bytes, 8, count, path)?.to_vec())
}

/// The size an IDX file's header declares, header included: `header_words` big-endian words
/// (the magic, then the dimensions), then one byte per element.
fn declared_len(header: &[u8], magic: u32, header_words: usize, path: &Path) -> Result<u64, DataError> {
    check_magic(header_u32(header, 0, path)?, magic, path)?;
    let mut len = 1u64;
    for index in 1..header_words {
        len = len
            .checked_mul(u64::from(header_u32(header, index, path)?))
            .ok_or_else(|| DataError::Format { path: path.to_path_buf(), message: "dimensions overflow".into() })?;
    }
    len.checked_add(4 * header_words as u64)
        .ok_or_else(|| DataError::Format { path: path.to_path_buf(), message: "dimensions overflow".into() })
}

/// Reads an IDX image file, gzip or raw, no further than its header declares (see
/// `read_declared`): a gzip bomb is refused, not inflated.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    let bytes = read_declared(path, 16, |header| declared_len(header, MAGIC_U8_3D, 4, path))?;
    parse_images(&bytes, path)
}

/// Reads an IDX label file, gzip or raw, no further than its header declares (see
/// `read_declared`): a gzip bomb is refused, not inflated.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_declared(path, 8, |header| declared_len(header, MAGIC_U8_1D, 2, path))?;
    parse_labels(&bytes, path)
}

/// Encodes images as IDX bytes (used by tests and tools that make small datasets).
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    for word in [MAGIC_U8_3D, images.count as u32, images.rows as u32, images.cols as u32] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Encodes labels as IDX bytes.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&MAGIC_U8_1D.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> IdxImages {
        IdxImages { count: 3, rows: 2, cols: 2, pixels: (0..12).collect() }
    }

    proptest::proptest! {
        /// Hostile input: arbitrary bytes, and valid files with arbitrary edits, parse or fail
        /// cleanly; a header promising more than the file holds is an error before any allocation.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_images(&bytes, Path::new("fuzz"));
            let _ = parse_labels(&bytes, Path::new("fuzz"));
        }

        #[test]
        fn edited_headers_never_panic(edits in proptest::collection::vec((0usize..28, proptest::prelude::any::<u8>()), 1..8)) {
            let mut bytes = encode_images(&sample());
            for (offset, value) in edits {
                let index = offset % bytes.len();
                bytes[index] = value;
            }
            let _ = parse_images(&bytes, Path::new("fuzz"));
        }
    }

    #[test]
    fn images_round_trip_raw_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = encode_images(&sample());
        let raw = dir.path().join("raw-idx3-ubyte");
        std::fs::write(&raw, &bytes).unwrap();
        assert_eq!(read_images(&raw).unwrap(), sample());

        let gz = dir.path().join("images.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&bytes).unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        assert_eq!(read_images(&gz).unwrap(), sample());
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_bombs_are_cut_off_at_the_size_their_header_declares() {
        let dir = tempfile::tempdir().unwrap();
        // 3 labels declared (11 bytes in all), then 8 MiB of zeros: about 8 KiB of gzip.
        let mut bomb = encode_labels(&[1, 2, 3]);
        bomb.resize(bomb.len() + (8 << 20), 0);
        let packed = dir.path().join("labels.gz");
        std::fs::write(&packed, gzip(&bomb)).unwrap();
        let err = read_labels(&packed).unwrap_err().to_string();
        assert!(err.contains("labels.gz: inflates past the 11 bytes its header declares (more than 65536 bytes beyond)"), "{err}");
        let raw = dir.path().join("labels");
        std::fs::write(&raw, &bomb).unwrap();
        let err = read_labels(&raw).unwrap_err().to_string();
        assert!(err.contains("holds more than the 11 bytes its header declares"), "{err}");

        // A little padding past the declared end is tolerated, and not returned.
        let mut padded = encode_images(&sample());
        padded.extend([9u8; 100]);
        std::fs::write(&packed, gzip(&padded)).unwrap();
        assert_eq!(read_images(&packed).unwrap(), sample());
    }

    #[test]
    fn headers_declaring_too_much_are_refused_before_reading_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.gz");
        // 2^30 images of 4×4: 16 GiB declared, none of it present.
        let header: Vec<u8> = [MAGIC_U8_3D, 1 << 30, 4, 4].iter().flat_map(|w| w.to_be_bytes()).collect();
        std::fs::write(&path, gzip(&header)).unwrap();
        let err = read_images(&path).unwrap_err().to_string();
        assert!(err.contains("the header declares 17179869200 bytes, more than the limit of 8589934592"), "{err}");
        let truncated: Vec<u8> = [MAGIC_U8_3D, 2, 4, 4].iter().flat_map(|w| w.to_be_bytes()).collect();
        std::fs::write(&path, gzip(&truncated)).unwrap();
        let err = read_images(&path).unwrap_err().to_string();
        assert!(err.contains("truncated data: header promises 32 bytes, file holds 0"), "{err}");
        std::fs::write(&path, gzip(&truncated[..6])).unwrap();
        let err = read_images(&path).unwrap_err().to_string();
        assert!(err.contains("truncated header: 6 bytes, need at least 8"), "{err}");
    }

    #[test]
    fn labels_round_trip() {
        let bytes = encode_labels(&[1, 2, 9]);
        assert_eq!(parse_labels(&bytes, Path::new("l")).unwrap(), vec![1, 2, 9]);
    }

    #[test]
    fn wrong_magic_is_named() {
        let bytes = encode_labels(&[1, 2]);
        let err = parse_images(&bytes, Path::new("x.idx")).unwrap_err().to_string();
        assert!(err.contains("wrong magic number 0x00000801"), "{err}");
        assert!(err.contains("x.idx"), "{err}");
    }

    #[test]
    fn truncated_payload_is_named() {
        let mut bytes = encode_images(&sample());
        bytes.truncate(bytes.len() - 1);
        let err = parse_images(&bytes, Path::new("t")).unwrap_err().to_string();
        assert!(err.contains("truncated data: header promises 12 bytes, file holds 11"), "{err}");
        let err = parse_images(&bytes[..6], Path::new("t")).unwrap_err().to_string();
        assert!(err.contains("truncated header"), "{err}");
    }
}
