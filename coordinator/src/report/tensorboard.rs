//! `coordinator export --tensorboard`: TensorBoard event files (one run folder per trial) with
//! every epoch's scalars and the sample images, written in TensorBoard's own record format
//! (length, masked CRC-32C, `tensorflow.Event` protobuf, masked CRC-32C).

use std::io::Write;
use std::path::Path;

use super::{GreyImage, ReportError};

/// `tensorflow.Summary.Image`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryImage {
    #[prost(int32, tag = "1")]
    height: i32,
    #[prost(int32, tag = "2")]
    width: i32,
    #[prost(int32, tag = "3")]
    colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    encoded_image_string: Vec<u8>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    image: Option<SummaryImage>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut crc = i as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
        *slot = crc;
    }
    table
}

/// CRC-32C (Castagnoli), as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(crc32c_table);
    !data.iter().fold(!0u32, |crc, &byte| table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8))
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An event file being written.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    wall_time: f64,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<time>.cohort` in `folder`.
    pub fn create(folder: &Path) -> Result<Self, ReportError> {
        std::fs::create_dir_all(folder).map_err(|source| ReportError::Io { path: folder.to_path_buf(), source })?;
        let wall_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let path = folder.join(format!("events.out.tfevents.{}.cohort", wall_time as u64));
        let file = std::fs::File::create(&path).map_err(|source| ReportError::Io { path: path.clone(), source })?;
        let mut writer = Self { file: std::io::BufWriter::new(file), wall_time };
        writer.write(Event { wall_time, step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(writer)
    }

    fn write(&mut self, event: Event) -> Result<(), ReportError> {
        let data = prost::Message::encode_to_vec(&event);
        let length = (data.len() as u64).to_le_bytes();
        let io = |source| ReportError::Io { path: "event file".into(), source };
        self.file.write_all(&length).map_err(io)?;
        self.file.write_all(&masked_crc(&length).to_le_bytes()).map_err(io)?;
        self.file.write_all(&data).map_err(io)?;
        self.file.write_all(&masked_crc(&data).to_le_bytes()).map_err(io)?;
        Ok(())
    }

    /// Adds a scalar.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<(), ReportError> {
        let value = SummaryValue { tag: tag.into(), simple_value: Some(value as f32), image: None };
        self.write(Event { wall_time: self.wall_time, step, file_version: None, summary: Some(Summary { value: vec![value] }) })
    }

    /// Adds a grid of grey images as one PNG image.
    pub fn images(&mut self, tag: &str, step: i64, images: &[GreyImage]) -> Result<(), ReportError> {
        let Some(first) = images.first() else {
            return Ok(());
        };
        let (h, w, gap) = (first.height, first.width, 2usize);
        let columns = images.len().min(8);
        let rows = images.len().div_ceil(columns);
        let (width, height) = (columns * (w + gap) + gap, rows * (h + gap) + gap);
        let mut canvas = image::GrayImage::from_pixel(width as u32, height as u32, image::Luma([255]));
        for (index, img) in images.iter().enumerate() {
            let (left, top) = (gap + (index % columns) * (w + gap), gap + (index / columns) * (h + gap));
            let span = (img.high - img.low).max(1e-6);
            for y in 0..img.height.min(h) {
                for x in 0..img.width.min(w) {
                    let value = ((img.pixels[y * img.width + x] - img.low) / span).clamp(0.0, 1.0);
                    canvas.put_pixel((left + x) as u32, (top + y) as u32, image::Luma([(value * 255.0).round() as u8]));
                }
            }
        }
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(canvas)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| ReportError::Draw(e.to_string()))?;
        let image = SummaryImage { height: height as i32, width: width as i32, colorspace: 1, encoded_image_string: png };
        let value = SummaryValue { tag: tag.into(), simple_value: None, image: Some(image) };
        self.write(Event { wall_time: self.wall_time, step, file_version: None, summary: Some(Summary { value: vec![value] }) })
    }

    /// Flushes the file.
    pub fn finish(mut self) -> Result<(), ReportError> {
        self.file.flush().map_err(|source| ReportError::Io { path: "event file".into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
