//! NIfTI-1 volumes (single-file `.nii`, raw or gzip) cut into axial slices.
//!
//! The 348-byte header is parsed here: its byte order is the one in which `sizeof_hdr` reads
//! 348, and the voxels follow at `vox_offset`, x fastest, then y, then z (voxel (x, y, z) at
//! index `x + X * (y + Y * z)`). Gzip is detected by magic bytes, not by name, and a file is read
//! (inflated) no further than the end of the voxels its header declares. Each volume is
//! scaled to [0, 1] by its own minimum and maximum, near-empty slices are dropped, and the rest
//! are resized to a square and scaled to [-1, 1].

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::{DataError, ImageSet};

/// Size of the NIfTI-1 header, and the value of its first field (`sizeof_hdr`).
const HEADER_LEN: usize = 348;
/// The magic of a single-file NIfTI-1 volume (`.nii`), at byte 344.
const MAGIC_SINGLE_FILE: &[u8; 4] = b"n+1\0";
/// The magic of a header/image pair (`.hdr` + `.img`), which this reader does not follow.
const MAGIC_PAIR: &[u8; 4] = b"ni1\0";
/// Byte offsets of the header fields read here.
const OFFSET_DIM: usize = 40;
const OFFSET_DATATYPE: usize = 70;
const OFFSET_BITPIX: usize = 72;
const OFFSET_VOX_OFFSET: usize = 108;
const OFFSET_SCL_SLOPE: usize = 112;
const OFFSET_SCL_INTER: usize = 116;
const OFFSET_MAGIC: usize = 344;
/// A pixel of a [0, 1]-scaled slice above this level counts as foreground.
const FOREGROUND_LEVEL: f32 = 0.1;

/// The voxel types this reader decodes, by NIfTI-1 datatype code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datatype {
    Uint8,
    Int16,
    Int32,
    Float32,
    Float64,
    Int8,
    Uint16,
}

impl Datatype {
    /// The type with NIfTI-1 code `code`, if supported.
    fn from_code(code: i16) -> Option<Self> {
        match code {
            2 => Some(Self::Uint8),
            4 => Some(Self::Int16),
            8 => Some(Self::Int32),
            16 => Some(Self::Float32),
            64 => Some(Self::Float64),
            256 => Some(Self::Int8),
            512 => Some(Self::Uint16),
            _ => None,
        }
    }

    /// Bytes per voxel.
    fn bytes(self) -> usize {
        match self {
            Self::Uint8 | Self::Int8 => 1,
            Self::Int16 | Self::Uint16 => 2,
            Self::Int32 | Self::Float32 => 4,
            Self::Float64 => 8,
        }
    }

    /// The NIfTI-1 name of the type.
    fn name(self) -> &'static str {
        match self {
            Self::Uint8 => "uint8",
            Self::Int16 => "int16",
            Self::Int32 => "int32",
            Self::Float32 => "float32",
            Self::Float64 => "float64",
            Self::Int8 => "int8",
            Self::Uint16 => "uint16",
        }
    }
}

/// What the header says about the voxels.
#[derive(Debug)]
struct Header {
    little_endian: bool,
    /// The sizes of the used dimensions (`dim[1..=dim[0]]`), at least 3 of them.
    dims: Vec<usize>,
    datatype: Datatype,
    /// Where the voxels start, in bytes from the start of the file.
    vox_offset: usize,
    /// `(scl_slope, scl_inter)` when the slope is set (finite and not 0).
    scaling: Option<(f64, f64)>,
}

impl Header {
    /// Width (X) and height (Y) of a slice.
    fn slice_shape(&self) -> (usize, usize) {
        (self.dims[0], self.dims[1])
    }
}

/// Reads header fields in the byte order of the file. The bytes hold at least a whole header.
#[derive(Debug)]
struct FieldReader<'a> {
    bytes: &'a [u8],
    little_endian: bool,
}

impl FieldReader<'_> {
    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut field = [0; N];
        field.copy_from_slice(&self.bytes[offset..offset + N]);
        field
    }

    fn i16(&self, offset: usize) -> i16 {
        let field = self.array(offset);
        if self.little_endian {
            i16::from_le_bytes(field)
        } else {
            i16::from_be_bytes(field)
        }
    }

    fn i32(&self, offset: usize) -> i32 {
        let field = self.array(offset);
        if self.little_endian {
            i32::from_le_bytes(field)
        } else {
            i32::from_be_bytes(field)
        }
    }

    fn f32(&self, offset: usize) -> f32 {
        let field = self.array(offset);
        if self.little_endian {
            f32::from_le_bytes(field)
        } else {
            f32::from_be_bytes(field)
        }
    }
}

fn format_error(path: &Path, message: String) -> DataError {
    DataError::Format { path: path.to_path_buf(), message }
}

/// Parses the NIfTI-1 header at the start of `bytes`; `path` only names errors.
fn parse_header(bytes: &[u8], path: &Path) -> Result<Header, DataError> {
    if bytes.len() < HEADER_LEN {
        return Err(format_error(path, format!("{} bytes, shorter than the {HEADER_LEN}-byte NIfTI-1 header", bytes.len())));
    }
    let little = FieldReader { bytes, little_endian: true };
    let big = FieldReader { bytes, little_endian: false };
    let fields = match (little.i32(0), big.i32(0)) {
        (348, _) => little,
        (_, 348) => big,
        (found, _) => {
            return Err(format_error(path, format!("sizeof_hdr is {found}, not {HEADER_LEN} in either byte order: not a NIfTI-1 file")))
        }
    };

    let magic = &bytes[OFFSET_MAGIC..OFFSET_MAGIC + 4];
    if magic == MAGIC_PAIR {
        return Err(format_error(path, "magic \"ni1\" marks a .hdr/.img pair; only single-file NIfTI-1 (\"n+1\") is supported".into()));
    }
    if magic != MAGIC_SINGLE_FILE {
        return Err(format_error(path, format!("wrong magic \"{}\", expected \"n+1\\0\"", magic.escape_ascii())));
    }

    let rank = fields.i16(OFFSET_DIM);
    if !(3..=7).contains(&rank) {
        return Err(format_error(path, format!("dim[0] is {rank}: need 3 to 7 dimensions (a volume)")));
    }
    let mut dims = Vec::with_capacity(rank as usize);
    for axis in 1..=rank as usize {
        let extent = fields.i16(OFFSET_DIM + 2 * axis);
        if extent < 1 {
            return Err(format_error(path, format!("dim[{axis}] is {extent}, must be positive")));
        }
        dims.push(extent as usize);
    }

    let code = fields.i16(OFFSET_DATATYPE);
    let Some(datatype) = Datatype::from_code(code) else {
        return Err(format_error(
            path,
            format!(
                "unsupported datatype {code}; supported: uint8 (2), int16 (4), int32 (8), float32 (16), \
                 float64 (64), int8 (256), uint16 (512)"
            ),
        ));
    };
    let bitpix = fields.i16(OFFSET_BITPIX);
    if bitpix as usize != 8 * datatype.bytes() {
        return Err(format_error(
            path,
            format!("bitpix {bitpix} does not match datatype {} ({} bits)", datatype.name(), 8 * datatype.bytes()),
        ));
    }

    let vox_offset = fields.f32(OFFSET_VOX_OFFSET);
    if !vox_offset.is_finite() || vox_offset < HEADER_LEN as f32 {
        return Err(format_error(path, format!("vox_offset {vox_offset} does not lie past the {HEADER_LEN}-byte header")));
    }

    let slope = fields.f32(OFFSET_SCL_SLOPE);
    let inter = fields.f32(OFFSET_SCL_INTER);
    let scaling = (slope.is_finite() && slope != 0.0).then(|| (f64::from(slope), if inter.is_finite() { f64::from(inter) } else { 0.0 }));

    Ok(Header { little_endian: fields.little_endian, dims, datatype, vox_offset: vox_offset as usize, scaling })
}

/// How many bytes of voxels the header promises.
fn voxel_len(header: &Header, path: &Path) -> Result<usize, DataError> {
    header
        .dims
        .iter()
        .try_fold(header.datatype.bytes(), |total, &extent| total.checked_mul(extent))
        .ok_or_else(|| format_error(path, format!("dimensions {:?} overflow", header.dims)))
}

/// The size of the file its header declares: where its voxels end. `header_bytes` is the start
/// of the file (the header, or less when the file is shorter).
fn declared_len(header_bytes: &[u8], path: &Path) -> Result<u64, DataError> {
    let header = parse_header(header_bytes, path)?;
    let end = header.vox_offset.checked_add(voxel_len(&header, path)?).ok_or_else(|| {
        format_error(path, format!("vox_offset {} and the voxels of dimensions {:?} overflow", header.vox_offset, header.dims))
    })?;
    Ok(end as u64)
}

/// The voxel bytes the header promises, checked against what the file holds.
fn voxel_bytes<'a>(bytes: &'a [u8], header: &Header, path: &Path) -> Result<&'a [u8], DataError> {
    let needed = voxel_len(header, path)?;
    let available = bytes.len().saturating_sub(header.vox_offset);
    if available < needed {
        return Err(format_error(
            path,
            format!(
                "truncated data: header promises {needed} bytes of {} voxels at offset {}, file holds {available}",
                header.datatype.name(),
                header.vox_offset
            ),
        ));
    }
    Ok(&bytes[header.vox_offset..header.vox_offset + needed])
}

/// Decodes voxels of `datatype` in the given byte order, applying `scaling` when set.
fn decode_voxels(bytes: &[u8], datatype: Datatype, little_endian: bool, scaling: Option<(f64, f64)>) -> Vec<f32> {
    macro_rules! decode_as {
        ($ty:ty) => {
            bytes
                .chunks_exact(std::mem::size_of::<$ty>())
                .map(|chunk| {
                    let field = chunk.try_into().expect("chunks_exact yields whole voxels");
                    let value = if little_endian { <$ty>::from_le_bytes(field) } else { <$ty>::from_be_bytes(field) };
                    value as f64
                })
                .collect::<Vec<f64>>()
        };
    }
    let values = match datatype {
        Datatype::Uint8 => decode_as!(u8),
        Datatype::Int16 => decode_as!(i16),
        Datatype::Int32 => decode_as!(i32),
        Datatype::Float32 => decode_as!(f32),
        Datatype::Float64 => decode_as!(f64),
        Datatype::Int8 => decode_as!(i8),
        Datatype::Uint16 => decode_as!(u16),
    };
    let (slope, inter) = scaling.unwrap_or((1.0, 0.0));
    values.into_iter().map(|value| (value * slope + inter) as f32).collect()
}

/// Scales `values` to [0, 1] by their finite minimum and maximum; non-finite values become 0,
/// and so does everything when the volume is constant.
fn normalize(values: &mut [f32]) {
    let (min, max) = values
        .iter()
        .filter(|value| value.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(min, max), &value| (min.min(value), max.max(value)));
    let range = max - min;
    for value in values.iter_mut() {
        *value = if value.is_finite() && range > 0.0 { (*value - min) / range } else { 0.0 };
    }
}

/// True when at least `min_foreground` of the slice's pixels lie above [`FOREGROUND_LEVEL`].
fn has_foreground(slice: &[f32], min_foreground: f64) -> bool {
    let bright = slice.iter().filter(|&&value| value > FOREGROUND_LEVEL).count();
    bright as f64 / slice.len() as f64 >= min_foreground
}

/// An empty `[0, 1, size, size]` batch.
fn no_slices(size: i64) -> Tensor {
    Tensor::zeros([0, 1, size, size], (Kind::Float, Device::Cpu))
}

/// The kept slices of one volume file as `[K, 1, size, size]` in [-1, 1].
fn load_volume_slices(path: &Path, size: i64, min_foreground: f64) -> Result<Tensor, DataError> {
    let bytes = super::idx::read_declared(path, HEADER_LEN, |header| declared_len(header, path))?;
    let header = parse_header(&bytes, path)?;
    let mut values = decode_voxels(voxel_bytes(&bytes, &header, path)?, header.datatype, header.little_endian, header.scaling);
    normalize(&mut values);
    let (width, height) = header.slice_shape();
    let mut kept = Vec::new();
    for slice in values.chunks_exact(width * height) {
        if has_foreground(slice, min_foreground) {
            kept.extend_from_slice(slice);
        }
    }
    if kept.is_empty() {
        return Ok(no_slices(size));
    }
    let count = (kept.len() / (width * height)) as i64;
    let slices = Tensor::from_slice(&kept).view([count, 1, height as i64, width as i64]);
    Ok(slices.upsample_bilinear2d([size, size], false, None, None) * 2.0 - 1.0)
}

/// Loads the axial slices of NIfTI-1 volumes as `[K, 1, size, size]` float32 images in [-1, 1].
///
/// Each file (`.nii`, raw or gzip) is scaled to [0, 1] by its own minimum and maximum; a slice
/// (an X×Y plane at one z; every plane of the 4th and further dimensions too, when there are
/// any) is kept when at least `min_foreground` of its pixels lie above 0.1, then resized
/// bilinearly to `size`×`size`. Slices come file by file in `paths` order, then by z. Labels are
/// all 0. No file, or no slice with enough foreground, gives an empty set.
///
/// Errors: a file shorter than the header, with the wrong magic, fewer than 3 dimensions, an
/// unsupported datatype, less data than its header promises, a header declaring more than
/// `cohort_proto::transfer::MAX_DATASET_FILE_BYTES`, or more data than declared (beyond a little
/// slack: a gzip bomb stops there, uninflated) is [`DataError::Format`] naming it.
///
/// # Panics
///
/// When `size` is not positive.
pub fn load_nifti_slices(paths: &[PathBuf], size: i64, min_foreground: f64) -> Result<ImageSet, DataError> {
    assert!(size > 0, "slice size {size} is not positive");
    let mut volumes = Vec::with_capacity(paths.len());
    for path in paths {
        volumes.push(load_volume_slices(path, size, min_foreground)?);
    }
    let images = if volumes.is_empty() { no_slices(size) } else { Tensor::cat(&volumes, 0) };
    let labels = Tensor::zeros([images.size()[0]], (Kind::Int64, Device::Cpu));
    Ok(ImageSet { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A NIfTI-1 file to encode: header fields and voxels given as numbers.
    struct TestVolume {
        dims: Vec<i16>,
        datatype: i16,
        bitpix: i16,
        big_endian: bool,
        slope: f32,
        inter: f32,
        /// Voxel values, x fastest, converted to `datatype` when encoded.
        values: Vec<f64>,
    }

    impl TestVolume {
        /// A little-endian uint8 volume of `dims` (X, Y, Z) whose voxel (x, y, z) is `value(x, y, z)`.
        fn new(dims: [usize; 3], value: impl Fn(usize, usize, usize) -> f64) -> Self {
            let [width, height, depth] = dims;
            let mut values = Vec::with_capacity(width * height * depth);
            for z in 0..depth {
                for y in 0..height {
                    for x in 0..width {
                        values.push(value(x, y, z));
                    }
                }
            }
            let dims = dims.iter().map(|&extent| extent as i16).collect();
            Self { dims, datatype: 2, bitpix: 8, big_endian: false, slope: 0.0, inter: 0.0, values }
        }

        fn with_type(mut self, datatype: i16, bitpix: i16) -> Self {
            self.datatype = datatype;
            self.bitpix = bitpix;
            self
        }

        fn encode_voxels(&self) -> Vec<u8> {
            let big = self.big_endian;
            let mut out = Vec::new();
            for &value in &self.values {
                let bytes = match self.datatype {
                    2 => vec![value as u8],
                    256 => vec![value as i8 as u8],
                    4 if big => (value as i16).to_be_bytes().to_vec(),
                    4 => (value as i16).to_le_bytes().to_vec(),
                    512 if big => (value as u16).to_be_bytes().to_vec(),
                    512 => (value as u16).to_le_bytes().to_vec(),
                    8 if big => (value as i32).to_be_bytes().to_vec(),
                    8 => (value as i32).to_le_bytes().to_vec(),
                    16 if big => (value as f32).to_be_bytes().to_vec(),
                    16 => (value as f32).to_le_bytes().to_vec(),
                    64 if big => value.to_be_bytes().to_vec(),
                    64 => value.to_le_bytes().to_vec(),
                    other => vec![0; usize::from(other.unsigned_abs() / 8).max(1)],
                };
                out.extend(bytes);
            }
            out
        }

        /// The whole `.nii` file: header, 4 bytes of (empty) extension flag, voxels at 352.
        fn encode(&self) -> Vec<u8> {
            let big = self.big_endian;
            let mut out = vec![0u8; 352];
            let mut put = |offset: usize, field: &[u8]| out[offset..offset + field.len()].copy_from_slice(field);
            let i16_bytes = |value: i16| if big { value.to_be_bytes() } else { value.to_le_bytes() };
            let f32_bytes = |value: f32| if big { value.to_be_bytes() } else { value.to_le_bytes() };
            put(0, &(if big { 348i32.to_be_bytes() } else { 348i32.to_le_bytes() }));
            put(OFFSET_DIM, &i16_bytes(self.dims.len() as i16));
            for (axis, &extent) in self.dims.iter().enumerate() {
                put(OFFSET_DIM + 2 * (axis + 1), &i16_bytes(extent));
            }
            put(OFFSET_DATATYPE, &i16_bytes(self.datatype));
            put(OFFSET_BITPIX, &i16_bytes(self.bitpix));
            put(OFFSET_VOX_OFFSET, &f32_bytes(352.0));
            put(OFFSET_SCL_SLOPE, &f32_bytes(self.slope));
            put(OFFSET_SCL_INTER, &f32_bytes(self.inter));
            put(OFFSET_MAGIC, MAGIC_SINGLE_FILE);
            out.extend(self.encode_voxels());
            out
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// 6×5×4: z=0 empty, z=1 a 4×3 block at 200 (40% foreground), z=2 all 100, z=3 one bright voxel.
    fn block_volume() -> TestVolume {
        TestVolume::new([6, 5, 4], |x, y, z| match z {
            1 if (1..5).contains(&x) && (1..4).contains(&y) => 200.0,
            2 => 100.0,
            3 if x == 2 && y == 2 => 200.0,
            _ => 0.0,
        })
    }

    fn format_message(result: Result<ImageSet, DataError>, path: &Path) -> String {
        let err = result.unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        message
    }

    #[test]
    fn keeps_only_slices_with_enough_foreground() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "block.nii", &block_volume().encode());

        let set = load_nifti_slices(std::slice::from_ref(&path), 8, 0.2).unwrap();
        assert_eq!(set.images.size(), [2, 1, 8, 8], "z=1 and z=2 survive");
        assert_eq!(set.images.kind(), Kind::Float);
        assert_eq!(Vec::<i64>::try_from(&set.labels).unwrap(), [0, 0]);
        let block = set.images.get(0);
        assert_eq!(block.double_value(&[0, 0, 0]), -1.0, "the corner lies outside the block");
        assert!(block.max().double_value(&[]) > 0.5);
        let flat = set.images.get(1);
        assert!(flat.abs().max().double_value(&[]) < 1e-6, "100 of 0..200 is the middle grey, 0");
        assert!(set.images.min().double_value(&[]) >= -1.0 && set.images.max().double_value(&[]) <= 1.0);

        assert_eq!(load_nifti_slices(std::slice::from_ref(&path), 8, 0.0).unwrap().len(), 4, "0 keeps every slice");
        assert_eq!(load_nifti_slices(&[path], 8, 1.0).unwrap().len(), 1, "only the full slice");
    }

    #[test]
    fn voxels_are_x_fastest_and_scaling_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        // One raised voxel at (x=3, y=1, z=0); a negative slope makes it the darkest one.
        let mut volume = TestVolume::new([4, 4, 2], |x, y, z| if (x, y, z) == (3, 1, 0) { 10.0 } else { 0.0 }).with_type(4, 16);
        volume.big_endian = true;
        volume.slope = -2.0;
        volume.inter = 7.0;
        let path = write(dir.path(), "scaled.nii.gz", &gzip(&volume.encode()));

        let set = load_nifti_slices(&[path], 4, 0.9).unwrap();
        assert_eq!(set.images.size(), [2, 1, 4, 4]);
        let first = set.images.get(0).get(0);
        assert_eq!(first.double_value(&[1, 3]), -1.0, "row y=1, column x=3");
        assert_eq!(first.min().double_value(&[]), -1.0);
        assert_eq!((first.eq(1.0)).sum(Kind::Int64).int64_value(&[]), 15);
        assert_eq!(set.images.get(1).min().double_value(&[]), 1.0);
    }

    #[test]
    fn gzip_and_raw_files_load_alike() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = block_volume().encode();
        let raw = write(dir.path(), "a.nii", &bytes);
        let packed = write(dir.path(), "b.nii.gz", &gzip(&bytes));

        let set = load_nifti_slices(&[raw, packed], 8, 0.2).unwrap();
        assert_eq!(set.images.size(), [4, 1, 8, 8]);
        assert!(set.images.narrow(0, 0, 2).equal(&set.images.narrow(0, 2, 2)));
        assert_eq!(set.labels.size(), [4]);
        assert!(load_nifti_slices(&[], 8, 0.2).unwrap().is_empty());
    }

    #[test]
    fn every_supported_datatype_decodes_alike() {
        let dir = tempfile::tempdir().unwrap();
        let reference = load_nifti_slices(&[write(dir.path(), "u8.nii", &block_volume().encode())], 8, 0.2).unwrap();
        for (datatype, bitpix) in [(4, 16), (8, 32), (16, 32), (64, 64), (256, 8), (512, 16)] {
            for big_endian in [false, true] {
                let mut volume = block_volume().with_type(datatype, bitpix);
                volume.big_endian = big_endian;
                if datatype == 256 {
                    volume.values.iter_mut().for_each(|value| *value = *value / 2.0 - 20.0);
                }
                let path = write(dir.path(), &format!("t{datatype}-{big_endian}.nii"), &volume.encode());
                let set = load_nifti_slices(&[path], 8, 0.2).unwrap();
                assert!(set.images.allclose(&reference.images, 1e-5, 1e-6, false), "datatype {datatype}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

        /// Hostile input: a valid volume with bytes overwritten anywhere (header included) loads
        /// or fails with an error, and never panics or allocates what the file does not hold.
        #[test]
        fn corrupted_volumes_never_panic(edits in proptest::collection::vec((0usize..700, proptest::prelude::any::<u8>()), 1..12)) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = block_volume().encode();
            for (offset, value) in edits {
                let index = offset % bytes.len();
                bytes[index] = value;
            }
            let path = write(dir.path(), "fuzzed.nii", &bytes);
            let _ = load_nifti_slices(&[path], 8, 0.05);
        }
    }

    #[test]
    fn malformed_files_are_format_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = block_volume().encode();

        let short = write(dir.path(), "short.nii", &good[..100]);
        let message = format_message(load_nifti_slices(std::slice::from_ref(&short), 8, 0.2), &short);
        assert!(message.contains("100 bytes, shorter than the 348-byte NIfTI-1 header"), "{message}");

        let mut bytes = good.clone();
        bytes[0..4].copy_from_slice(&540i32.to_le_bytes());
        let nifti2 = write(dir.path(), "nifti2.nii", &bytes);
        let message = format_message(load_nifti_slices(std::slice::from_ref(&nifti2), 8, 0.2), &nifti2);
        assert!(message.contains("sizeof_hdr is 540"), "{message}");

        let mut bytes = good.clone();
        bytes[OFFSET_MAGIC..OFFSET_MAGIC + 4].copy_from_slice(b"abc\0");
        let magic = write(dir.path(), "magic.nii", &bytes);
        let message = format_message(load_nifti_slices(std::slice::from_ref(&magic), 8, 0.2), &magic);
        assert!(message.contains("wrong magic \"abc\\x00\""), "{message}");

        bytes[OFFSET_MAGIC..OFFSET_MAGIC + 4].copy_from_slice(MAGIC_PAIR);
        let pair = write(dir.path(), "pair.nii", &bytes);
        let message = format_message(load_nifti_slices(std::slice::from_ref(&pair), 8, 0.2), &pair);
        assert!(message.contains(".hdr/.img pair"), "{message}");

        let rgb = write(dir.path(), "rgb.nii", &block_volume().with_type(128, 24).encode());
        let message = format_message(load_nifti_slices(std::slice::from_ref(&rgb), 8, 0.2), &rgb);
        assert!(message.contains("unsupported datatype 128"), "{message}");

        let bitpix = write(dir.path(), "bitpix.nii", &block_volume().with_type(4, 8).encode());
        let message = format_message(load_nifti_slices(std::slice::from_ref(&bitpix), 8, 0.2), &bitpix);
        assert!(message.contains("bitpix 8 does not match datatype int16"), "{message}");

        let mut flat = block_volume();
        flat.dims.truncate(2);
        flat.values.truncate(30);
        let flat = write(dir.path(), "flat.nii", &flat.encode());
        let message = format_message(load_nifti_slices(std::slice::from_ref(&flat), 8, 0.2), &flat);
        assert!(message.contains("dim[0] is 2: need 3 to 7 dimensions"), "{message}");

        let mut bomb = good.clone();
        bomb.resize(good.len() + (4 << 20), 0);
        let bomb = write(dir.path(), "bomb.nii.gz", &gzip(&bomb));
        let message = format_message(load_nifti_slices(std::slice::from_ref(&bomb), 8, 0.2), &bomb);
        assert!(message.contains("inflates past the 472 bytes its header declares (more than 65536 bytes beyond)"), "{message}");

        let mut huge = good.clone();
        huge[OFFSET_DIM..OFFSET_DIM + 2].copy_from_slice(&4i16.to_le_bytes());
        for axis in 1..=4 {
            huge[OFFSET_DIM + 2 * axis..OFFSET_DIM + 2 * axis + 2].copy_from_slice(&i16::MAX.to_le_bytes());
        }
        let huge = write(dir.path(), "huge.nii.gz", &gzip(&huge));
        let message = format_message(load_nifti_slices(std::slice::from_ref(&huge), 8, 0.2), &huge);
        assert!(message.contains("the header declares 1152780773560811873 bytes, more than the limit of 8589934592"), "{message}");

        let truncated = write(dir.path(), "truncated.nii.gz", &gzip(&good[..good.len() - 1]));
        let message = format_message(load_nifti_slices(std::slice::from_ref(&truncated), 8, 0.2), &truncated);
        assert!(message.contains("truncated data: header promises 120 bytes of uint8 voxels at offset 352, file holds 119"), "{message}");
    }
}
