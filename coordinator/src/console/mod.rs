//! The web console: one HTTP listener (`coordinator serve --http-listen ADDR`) serving the
//! console's pages (embedded assets, no build step), its JSON API under `/api/`, live changes as
//! server-sent events at `/api/events`, and the Prometheus metrics at `/metrics`.
//!
//! - [`auth`]: tokens, session cookies and CSRF tokens; who may read and who may act.
//! - [`api`]: the JSON views, each bounded by what one screen shows.
//! - [`files`]: checkpoint downloads, artifact images and the report's figures.
//! - [`live`]: server-sent events from the core's change notices.
//! - [`assets`]: the embedded page, script and style, and the security headers.

pub mod api;
pub mod assets;
pub mod auth;
pub mod files;
pub mod live;
mod query;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::auth::Tokens;
use crate::core::{Core, CoreError};

/// Why an API request failed; each maps to one HTTP status and a JSON `{"error": …}` body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No valid session or bearer token.
    #[error("sign in first: {0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The core refused or failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Drawing or reading a file failed.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::Core(CoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) | ApiError::Core(CoreError::BadRequest(_)) => StatusCode::BAD_REQUEST,
            ApiError::Core(CoreError::Unwritable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Core(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "console request failed");
        }
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// A JSON response.
pub fn json(value: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], value.to_string()).into_response()
}

/// What every handler shares.
#[derive(Debug)]
pub struct Console {
    /// The coordinator's state.
    pub core: Arc<Core>,
    /// Sessions and tokens.
    pub auth: auth::Sessions,
    /// Drawn images, by what they were drawn from.
    pub figures: files::FigureCache,
    /// Views of sweeps whose counts have not changed.
    pub memo: api::Memo,
}

/// The console's routes over `core`, admitting callers by `tokens` (none: open).
pub fn router(core: Arc<Core>, tokens: Tokens) -> Router {
    let console =
        Arc::new(Console { core, auth: auth::Sessions::new(tokens), figures: files::FigureCache::default(), memo: api::Memo::default() });
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/session", get(auth::session))
        .route("/api/login", post(auth::login))
        .route("/api/logout", post(auth::logout))
        .route("/api/sweeps", get(api::sweeps))
        .route("/api/sweeps/{id}", get(api::sweep))
        .route("/api/sweeps/{id}/trials", get(api::trials))
        .route("/api/sweeps/{id}/cv", get(api::cross_validation))
        .route("/api/sweeps/{id}/curves", get(api::config_curves))
        .route("/api/sweeps/{id}/figures", get(files::figures))
        .route("/api/sweeps/{id}/figures/{file}", get(files::figure))
        .route("/api/sweeps/{id}/cancel", post(api::cancel))
        .route("/api/sweeps/{id}/retry", post(api::retry))
        .route("/api/trials/{id}", get(api::trial))
        .route("/api/trials/{id}/logs", get(api::logs))
        .route("/api/trials/{id}/artifacts/{name}", get(files::artifact_image))
        .route("/api/blobs/{sha256}", get(files::download))
        .route("/api/workers", get(api::workers))
        .route("/api/events", get(live::events))
        .fallback(|| async { ApiError::NotFound("page".into()) })
        .layer(axum::middleware::from_fn(assets::security_headers))
        .with_state(console)
}

/// `GET /metrics`: the Prometheus exposition, open like `--metrics-listen` (scrapers send no token).
async fn metrics(axum::extract::State(console): axum::extract::State<Arc<Console>>) -> Response {
    // The gauges are read under the core's lock: off the runtime, like every core call.
    match api::off_runtime(&console.core, |core| core.metrics().render()).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(error) => error.into_response(),
    }
}

/// Binds `address` and serves the console in the background; returns the bound address.
pub async fn spawn(address: SocketAddr, core: Arc<Core>, tokens: Tokens) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = router(core, tokens);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "console server stopped");
        }
    });
    tracing::info!(address = %bound, "console at http://{bound}/ (api at /api/, metrics at /metrics)");
    Ok(bound)
}
