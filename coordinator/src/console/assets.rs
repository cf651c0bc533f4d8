//! The console's page, scripts and style, embedded in the binary (no build step, nothing fetched
//! at run time), and the headers every response carries: a strict Content-Security-Policy (no
//! inline script, nothing from elsewhere), no sniffing, no framing, no referrer.

use axum::extract::{Path, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The page: a shell the scripts fill in.
const INDEX: &str = include_str!("../../assets/console/index.html");

/// The embedded files under `/assets/`: (name, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../assets/console/app.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_str!("../../assets/console/dom.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_str!("../../assets/console/chart.js")),
    ("pages.js", "text/javascript; charset=utf-8", include_str!("../../assets/console/pages.js")),
    ("sweep.js", "text/javascript; charset=utf-8", include_str!("../../assets/console/sweep.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../assets/console/style.css")),
];

/// The Content-Security-Policy: scripts, styles, images and connections from this origin only;
/// no inline script or style, no plugins, no framing, forms post nowhere else.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `GET /`: the page.
pub async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX).into_response()
}

/// `GET /assets/{file}`: an embedded script or style.
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, body) =
        ASSETS.iter().find(|(name, _, _)| *name == file).ok_or_else(|| ApiError::NotFound(format!("asset {file}")))?;
    Ok(([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body).into_response())
}

/// Adds the security headers to every response.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
