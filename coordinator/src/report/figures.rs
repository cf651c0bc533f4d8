//! The figures, drawn with plotters into PNG files (text in the embedded DejaVu Sans).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::ReportError;

/// A grey image: `height × width` values, shown between `low` (black) and `high` (white).
#[derive(Debug, Clone)]
pub struct GreyImage {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Row-major values.
    pub pixels: Vec<f32>,
    /// Value drawn black.
    pub low: f32,
    /// Value drawn white.
    pub high: f32,
}

const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let registered = plotters::style::register_font(FONT, FontStyle::Normal, include_bytes!("../../assets/DejaVuSans.ttf"));
        debug_assert!(registered.is_ok(), "the embedded font parses");
    });
}

fn draw_error(error: impl std::fmt::Display) -> ReportError {
    ReportError::Draw(error.to_string())
}

fn canvas(path: &Path, size: (u32, u32)) -> Result<DrawingArea<BitMapBackend<'_>, Shift>, ReportError> {
    register_font();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    Ok(root)
}

fn bounds(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// Lines of named series, each (epoch, value) pairs.
fn lines_into<'b>(
    area: &DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), ReportError> {
    let points = series.iter().flat_map(|(_, s)| s.iter().copied());
    let (x_lo, x_hi) = bounds(points.clone().map(|p| p.0));
    let (y_lo, y_hi) = bounds(points.map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|epoch| format!("{epoch:.0}"))
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(draw_error)?;
    for (index, (name, points)) in series.iter().enumerate() {
        let (color, triangles) = line_style(index, series.len());
        let width = if color == BLACK { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(width)))
            .map_err(draw_error)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                let marker: DynElement<'static, BitMapBackend<'b>, (i32, i32)> = if triangles {
                    TriangleMarker::new((x + 9, y), 4, color.filled()).into_dyn()
                } else {
                    Circle::new((x + 9, y), 3, color.filled()).into_dyn()
                };
                EmptyElement::at((0, 0)) + PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width)) + marker
            });
        if triangles {
            chart.draw_series(points.iter().map(|&p| TriangleMarker::new(p, 4, color.filled()))).map_err(draw_error)?;
        } else {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(draw_error)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// The colour of line `index` of `count`, and whether its points are triangles (not circles).
/// With more lines than colours, the first (a mean or total) is black and thicker, and the
/// lines past the tenth colour repeat the colours with triangles, so no two lines look alike.
fn line_style(index: usize, count: usize) -> (RGBColor, bool) {
    if count <= COLORS.len() {
        return (COLORS[index], false);
    }
    match index {
        0 => (BLACK, false),
        _ => (COLORS[(index - 1) % COLORS.len()], index > COLORS.len()),
    }
}

/// A line chart of named series.
pub fn line_chart(path: &Path, title: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<(), ReportError> {
    let root = canvas(path, (900, 560))?;
    lines_into(&root, title, y_label, series)?;
    root.present().map_err(draw_error)
}

/// A line chart's named series of (x, y) points.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Side-by-side line charts, one per (title, y label, series).
pub fn panels(path: &Path, panels: &[(String, String, Series)]) -> Result<(), ReportError> {
    let root = canvas(path, (560 * panels.len().max(1) as u32, 480))?;
    for (area, (title, y_label, series)) in root.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
        lines_into(area, title, y_label, series)?;
    }
    root.present().map_err(draw_error)
}

/// A scatter of labelled points (labels 0..9 get the ten colours and a legend).
pub fn scatter(path: &Path, title: &str, points: &[(f64, f64, i64)]) -> Result<(), ReportError> {
    let root = canvas(path, (900, 760))?;
    let (x_lo, x_hi) = bounds(points.iter().map(|p| p.0));
    let (y_lo, y_hi) = bounds(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(60)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("first principal component")
        .y_desc("second principal component")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(draw_error)?;
    let mut labels: Vec<i64> = points.iter().map(|p| p.2).collect();
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        let color = COLORS[label.rem_euclid(COLORS.len() as i64) as usize];
        chart
            .draw_series(points.iter().filter(|p| p.2 == label).map(|p| Circle::new((p.0, p.1), 2, color.mix(0.7).filled())))
            .map_err(draw_error)?
            .label(format!("digit {label}"))
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    root.present().map_err(draw_error)
}

/// Rows of images, each row labelled on its left, drawn `scale` pixels per image pixel.
pub fn image_rows(path: &Path, title: &str, rows: &[(String, Vec<GreyImage>)], scale: u32) -> Result<(), ReportError> {
    let label_width = 170u32;
    let gap = 6u32;
    let cell = rows.iter().flat_map(|(_, images)| images.iter()).map(|i| i.width.max(i.height) as u32 * scale).max().unwrap_or(28);
    let columns = rows.iter().map(|(_, images)| images.len()).max().unwrap_or(1) as u32;
    let width = label_width + columns * (cell + gap) + gap;
    let height = 50 + rows.len() as u32 * (cell + gap) + gap;
    let root = canvas(path, (width, height))?;
    root.draw(&Text::new(title.to_string(), (10, 12), (FONT, 22).into_font())).map_err(draw_error)?;
    for (row_index, (label, images)) in rows.iter().enumerate() {
        let top = 50 + row_index as u32 * (cell + gap);
        root.draw(&Text::new(label.clone(), (10, (top + cell / 2) as i32 - 8), (FONT, 16).into_font())).map_err(draw_error)?;
        for (column, image) in images.iter().enumerate() {
            let left = label_width + column as u32 * (cell + gap);
            let span = (image.high - image.low).max(1e-6);
            for y in 0..image.height {
                for x in 0..image.width {
                    let value = ((image.pixels[y * image.width + x] - image.low) / span).clamp(0.0, 1.0);
                    let level = (value * 255.0).round() as u8;
                    let x0 = (left + x as u32 * scale) as i32;
                    let y0 = (top + y as u32 * scale) as i32;
                    root.draw(&Rectangle::new([(x0, y0), (x0 + scale as i32, y0 + scale as i32)], RGBColor(level, level, level).filled()))
                        .map_err(draw_error)?;
                }
            }
        }
    }
    root.present().map_err(draw_error)
}

/// A bar chart of a vector's components (the generator's input noise).
pub fn bars(path: &Path, title: &str, values: &[f32]) -> Result<(), ReportError> {
    let root = canvas(path, (1000, 420))?;
    let (lo, hi) = bounds(values.iter().map(|&v| f64::from(v)).chain([0.0]));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..values.len() as f64, lo..hi)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("component")
        .y_desc("value")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, &v)| {
            let (a, b) = if v >= 0.0 { (0.0, f64::from(v)) } else { (f64::from(v), 0.0) };
            Rectangle::new([(i as f64 + 0.1, a), (i as f64 + 0.9, b)], COLORS[0].filled())
        }))
        .map_err(draw_error)?;
    root.present().map_err(draw_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fig. 8 draws 13 lines (mean, 2 levels, 10 classes) and fig. 9 eleven (all, 10 digits):
    /// each must look unlike every other, and up to ten keep the plain colours.
    #[test]
    fn no_two_lines_of_a_chart_look_alike() {
        for count in [1, 10, 11, 13, 21] {
            let styles: Vec<((u8, u8, u8), bool)> =
                (0..count).map(|index| line_style(index, count)).map(|(color, triangles)| (color.rgb(), triangles)).collect();
            let distinct: std::collections::BTreeSet<_> = styles.iter().collect();
            assert_eq!(distinct.len(), count, "{count} lines: {styles:?}");
        }
        assert_eq!(line_style(3, 10), (COLORS[3], false));
        assert_eq!(line_style(0, 11).0, BLACK);
    }
}
