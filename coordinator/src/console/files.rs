//! Files the console shows or offers: checkpoint and artifact downloads (streamed from the blob
//! store), an artifact drawn as a PNG (a WGAN sample grid, reconstructions, latent PCA), and the
//! static report's figures for a sweep, drawn by [`crate::report::render`] itself. Drawings are
//! kept in memory by what they were drawn from, so each is drawn once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::{json as json_response, query, ApiError, Console};
use crate::report::{self, figures, ArtifactTensor, ReportInput};

/// Drawings kept at most (each a PNG of tens of KiB).
const MAX_DRAWINGS: usize = 512;
/// The stages whose single trial's curves and artifacts the report's figures use.
const FIGURE_STAGES: [&str; 3] = ["final", "finetune", "train"];

/// A report's figures: (file, caption, PNG bytes).
type Figures = Vec<(String, String, Vec<u8>)>;

/// Drawn PNGs by the blob (artifact) or the sweep state (report) they were drawn from.
#[derive(Debug, Default)]
pub struct FigureCache {
    artifacts: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    reports: Mutex<HashMap<String, (String, Arc<Figures>)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn png(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], bytes).into_response()
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(error.to_string())
}

/// Reads a blob's tensors.
fn read_tensors(console: &Console, name: &str, sha256: &str) -> Result<BTreeMap<String, ArtifactTensor>, ApiError> {
    let path = console.core.blobs().path(sha256).ok_or_else(|| ApiError::NotFound(format!("blob {sha256}")))?;
    let bytes = std::fs::read(&path).map_err(internal)?;
    Ok(report::read_artifact(name, &bytes)?)
}

/// Draws into a temporary file with `draw` and returns the PNG's bytes.
fn draw(draw: impl FnOnce(&std::path::Path) -> Result<(), report::ReportError>) -> Result<Vec<u8>, ApiError> {
    let dir = tempfile::tempdir().map_err(internal)?;
    let path = dir.path().join("figure.png");
    draw(&path)?;
    std::fs::read(&path).map_err(internal)
}

impl From<report::ReportError> for ApiError {
    fn from(error: report::ReportError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

/// Draws one artifact: image tensors as rows of images, latent codes as their PCA scatter.
fn draw_artifact(name: &str, tensors: &BTreeMap<String, ArtifactTensor>) -> Result<Vec<u8>, ApiError> {
    if let (Some(latents), Some(labels)) = (tensors.get("latents"), tensors.get("labels")) {
        let projected = report::pca::project_2d(&latents.rows());
        let points: Vec<(f64, f64, i64)> = projected.into_iter().zip(&labels.values).map(|((x, y), &label)| (x, y, label as i64)).collect();
        return draw(|path| figures::scatter(path, "latent codes (first two principal components)", &points));
    }
    // A conditional generator's samples (and its real batch): one row per class, as in the report.
    if let (Some(images), Some(labels)) = (tensors.get("images"), tensors.get("labels")) {
        let rows = report::sample_rows(name, images, Some(labels));
        return draw(|path| figures::image_rows(path, name, &rows, 2));
    }
    // Digits lie in [0, 1]; generated and real slices in [-1, 1].
    let (low, high) = if name.starts_with("reconstructions") { (0.0, 1.0) } else { (-1.0, 1.0) };
    let rows: Vec<(String, Vec<report::GreyImage>)> = ["noisy", "output", "clean", "images"]
        .iter()
        .filter_map(|part| tensors.get(*part).map(|t| (part.to_string(), t.images(low, high))))
        .filter(|(_, images)| !images.is_empty())
        .collect();
    if rows.is_empty() {
        return Err(ApiError::NotFound(format!("artifact {name} holds no images")));
    }
    draw(|path| figures::image_rows(path, name, &rows, 2))
}

/// `GET /api/trials/{id}/artifacts/{name}`: the trial's artifact drawn as a PNG.
pub async fn artifact_image(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let name = name.trim_end_matches(".png").to_string();
    let task_id = id.clone();
    let artifacts = super::api::read(&console.core, move |store| store.artifacts(&task_id)).await?;
    let artifact =
        artifacts.into_iter().find(|a| a.name == name).ok_or_else(|| ApiError::NotFound(format!("artifact {name} of trial {id}")))?;
    let sha256 = artifact.blob.sha256.clone();
    if let Some(bytes) = lock(&console.figures.artifacts).get(&sha256).cloned() {
        return Ok(png(bytes.as_ref().clone()));
    }
    let worker_console = console.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let tensors = read_tensors(&worker_console, &name, &artifact.blob.sha256)?;
        draw_artifact(&name, &tensors)
    })
    .await
    .map_err(internal)??;
    let mut cache = lock(&console.figures.artifacts);
    if cache.len() >= MAX_DRAWINGS {
        cache.clear();
    }
    cache.insert(sha256, Arc::new(bytes.clone()));
    Ok(png(bytes))
}

/// The figure stages' single trials: (stage, epochs, artifact records), and a key that changes
/// whenever any of them changes.
type FigureRecords = Vec<(&'static str, Vec<crate::store::EpochRecord>, Vec<crate::store::ArtifactRecord>)>;

fn figure_records(console: &Console, sweep_id: &str) -> Result<(FigureRecords, String), ApiError> {
    let id = sweep_id.to_string();
    Ok(console.core.read(move |store| {
        let mut records = Vec::new();
        let mut key = String::new();
        let spans = store.stage_spans(&id)?;
        for stage in FIGURE_STAGES {
            let Some(span) = spans.iter().find(|s| s.stage == stage) else { continue };
            let (trials, _) = store.trial_rows(&id, Some((span.first, span.last)), None, 0, 1)?;
            for trial in trials {
                let (epochs, artifacts) = (store.metrics(&trial.id)?, store.artifacts(&trial.id)?);
                key.push_str(&format!("{}:{}:{}:{};", trial.id, trial.state, epochs.len(), artifacts.len()));
                records.push((stage, epochs, artifacts));
            }
        }
        Ok((records, key))
    })?)
}

/// The report's figures for a sweep, drawn once per state of its figure stages.
fn report_figures(console: &Console, sweep_id: &str) -> Result<Arc<Figures>, ApiError> {
    let (records, key) = figure_records(console, sweep_id)?;
    if let Some((kept_key, figures)) = lock(&console.figures.reports).get(sweep_id) {
        if *kept_key == key {
            return Ok(figures.clone());
        }
    }
    let mut input = ReportInput { sweep_id: sweep_id.to_string(), ..ReportInput::default() };
    for (stage, epochs, artifacts) in records {
        for epoch in &epochs {
            for (name, value) in &epoch.values {
                input.series.entry((stage.to_string(), name.clone())).or_default().push((f64::from(epoch.epoch), *value));
            }
        }
        for artifact in artifacts {
            let tensors = read_tensors(console, &artifact.name, &artifact.blob.sha256)?;
            input.artifacts.insert((stage.to_string(), artifact.name), tensors);
        }
    }
    let dir = tempfile::tempdir().map_err(internal)?;
    let drawn = report::render(&input, dir.path())?;
    let mut figures = Vec::new();
    for (file, caption) in drawn {
        let bytes = std::fs::read(dir.path().join(&file)).map_err(internal)?;
        figures.push((file, caption, bytes));
    }
    let figures = Arc::new(figures);
    let mut reports = lock(&console.figures.reports);
    if reports.len() >= MAX_DRAWINGS {
        reports.clear();
    }
    reports.insert(sweep_id.to_string(), (key, figures.clone()));
    Ok(figures)
}

/// `GET /api/sweeps/{id}/figures`: the report's figures the sweep has data for (file, caption).
pub async fn figures(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let worker_console = console.clone();
    let figures = tokio::task::spawn_blocking(move || report_figures(&worker_console, &id)).await.map_err(internal)??;
    let list: Vec<serde_json::Value> = figures.iter().map(|(file, caption, _)| json!({"file": file, "caption": caption})).collect();
    Ok(json_response(&json!({"figures": list})))
}

/// `GET /api/sweeps/{id}/figures/{file}`: one of the report's figures.
pub async fn figure(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    let worker_console = console.clone();
    let sweep_id = id.clone();
    let figures = tokio::task::spawn_blocking(move || report_figures(&worker_console, &sweep_id)).await.map_err(internal)??;
    let (_, _, bytes) =
        figures.iter().find(|(name, _, _)| *name == file).ok_or_else(|| ApiError::NotFound(format!("figure {file} of sweep {id}")))?;
    Ok(png(bytes.clone()))
}

/// `GET /api/blobs/{sha256}?name=FILE`: a checkpoint or artifact, streamed as a download.
pub async fn download(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(sha256): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    console.auth.reader(&headers)?;
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest("a blob is named by its 64 hex digit SHA-256".into()));
    }
    let params = query::parse(raw.as_deref());
    let name: String = query::text(&params, "name")
        .unwrap_or(&sha256)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' })
        .collect();
    let path = console.core.blobs().path(&sha256).ok_or_else(|| ApiError::NotFound(format!("blob {sha256}")))?;
    let file = tokio::fs::File::open(&path).await.map_err(internal)?;
    let size = file.metadata().await.map_err(internal)?.len();
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        let mut buffer = vec![0u8; 256 << 10];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    let disposition = format!("attachment; filename=\"{name}\"");
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).map_err(internal)?);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid_height(tensors: &BTreeMap<String, ArtifactTensor>) -> u32 {
        let png = draw_artifact("samples-e1", tensors).unwrap();
        image::load_from_memory(&png).unwrap().height()
    }

    /// A conditional generator's samples are drawn one row per class, like the report's fig. 5.
    #[test]
    fn class_labelled_samples_draw_a_row_per_class() {
        let images = ArtifactTensor { shape: vec![6, 1, 8, 8], values: vec![0.0; 6 * 64] };
        let mut tensors = BTreeMap::from([("images".to_string(), images)]);
        let one_row = grid_height(&tensors);
        tensors.insert("labels".to_string(), ArtifactTensor { shape: vec![6], values: vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0] });
        let three_rows = grid_height(&tensors);
        // Two more rows of 8-pixel images drawn at twice their size.
        assert!(three_rows >= one_row + 2 * 16, "{one_row} px for one row, {three_rows} px for three classes");
    }
}
