//! The IDX format of MNIST and its kin (Fashion-MNIST, KMNIST): big-endian header, raw bytes.
//!
//! Files may be gzip-compressed (detected by magic bytes, not by name).

use std::io::Read;
use std::path::Path;

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

/// Reads a whole file, un-gzipping it when it starts with the gzip magic.
pub(super) fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut decoded = Vec::with_capacity(raw.len() * 4);
    GzDecoder::new(raw.as_slice())
        .read_to_end(&mut decoded)
        .map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    Ok(decoded)
}

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
    Err(DataError::Format {
        path: path.to_path_buf(),
        message: format!("wrong magic number 0x{found:08x}, expected 0x{expected:08x}"),
    })
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

/// Reads an IDX image file, gzip or raw.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    parse_images(&read_maybe_gzip(path)?, path)
}

/// Reads an IDX label file, gzip or raw.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    parse_labels(&read_maybe_gzip(path)?, path)
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
