//! Who may use the console: with tokens configured, a browser signs in once with the client or
//! the viewer token and keeps an HttpOnly, SameSite=Strict session cookie; scripts may send
//! `Authorization: Bearer TOKEN` instead. Reading needs either token; cancel and retry need the
//! client token and, from a cookie session, the session's CSRF token in the `x-csrf-token`
//! header (a cross-site form cannot set a header, and a cross-site script cannot read the token).
//! With `--insecure-no-auth` every caller may act, and a session only carries the CSRF token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::{json, ApiError, Console};
use crate::auth::{Role, Tokens};

/// The session cookie's name.
pub const COOKIE: &str = "cohort_session";
/// The header a cookie session's actions carry its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most live sessions kept; signing in beyond it drops expired ones, then refuses.
const MAX_SESSIONS: usize = 10_000;

/// A signed-in browser.
#[derive(Debug, Clone)]
struct Session {
    role: Role,
    csrf: String,
    expires: Instant,
}

/// Who is calling, and how they proved it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What they may do.
    pub role: Role,
    /// Their session's CSRF token (none for bearer callers).
    pub csrf: Option<String>,
}

/// The tokens and the live sessions.
#[derive(Debug)]
pub struct Sessions {
    tokens: Tokens,
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    hex::encode(bytes)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

impl Sessions {
    /// Sessions admitted by `tokens` (none configured: open).
    pub fn new(tokens: Tokens) -> Self {
        Self { tokens, sessions: Mutex::new(HashMap::new()) }
    }

    /// Whether callers must sign in.
    pub fn required(&self) -> bool {
        self.tokens.enabled()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a session for `role`; returns (session id, CSRF token).
    fn start(&self, role: Role) -> Result<(String, String), ApiError> {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            let now = Instant::now();
            sessions.retain(|_, session| session.expires > now);
            if sessions.len() >= MAX_SESSIONS {
                return Err(ApiError::Forbidden(format!("{MAX_SESSIONS} sessions are open; try again later")));
            }
        }
        let (id, csrf) = (random_token(), random_token());
        sessions.insert(id.clone(), Session { role, csrf: csrf.clone(), expires: Instant::now() + SESSION_TTL });
        Ok((id, csrf))
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.lock();
        let session = sessions.get(id)?.clone();
        if session.expires <= Instant::now() {
            sessions.remove(id);
            return None;
        }
        Some(session)
    }

    /// The caller of a request: a bearer token, else a session cookie; with no tokens configured,
    /// anyone (as a client).
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if let Some(token) = bearer(headers) {
            return match self.tokens.role_of(token) {
                Some(Role::Worker) => Err(ApiError::Forbidden("a worker token cannot use the console".into())),
                Some(role) => Ok(Caller { role, csrf: None }),
                None => Err(ApiError::Unauthenticated("invalid bearer token".into())),
            };
        }
        if let Some(session) = self.session(headers) {
            return Ok(Caller { role: session.role, csrf: Some(session.csrf) });
        }
        if !self.required() {
            return Ok(Caller { role: Role::Client, csrf: None });
        }
        Err(ApiError::Unauthenticated("no session".into()))
    }

    /// A caller who may read.
    pub fn reader(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        self.caller(headers)
    }

    /// A caller who may act (cancel, retry): the client token, and from a cookie session the
    /// session's CSRF token in [`CSRF_HEADER`].
    pub fn actor(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = self.caller(headers)?;
        if caller.role != Role::Client {
            return Err(ApiError::Forbidden("a viewer token only reads: sign in with the client token to act".into()));
        }
        if bearer(headers).is_some() {
            return Ok(caller);
        }
        let presented = headers.get(CSRF_HEADER).and_then(|value| value.to_str().ok());
        match (&caller.csrf, presented) {
            (Some(expected), Some(presented)) if cohort_proto::auth::tokens_match(expected, presented) => Ok(caller),
            _ => Err(ApiError::Forbidden("missing or wrong CSRF token".into())),
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Worker => "worker",
        Role::Viewer => "viewer",
    }
}

fn session_cookie(id: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")).expect("hex cookie value")
}

/// `GET /api/session`: whether sign-in is needed, and the caller's role and CSRF token. With
/// tokens off it starts a session, so that actions carry a CSRF token all the same.
pub async fn session(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let required = console.auth.required();
    match console.auth.caller(&headers) {
        Ok(Caller { role, csrf: Some(csrf) }) => json(&serde_json::json!({"required": required, "role": role_name(role), "csrf": csrf})),
        Ok(Caller { role, csrf: None }) if !required => match console.auth.start(role) {
            Ok((id, csrf)) => {
                let mut response = json(&serde_json::json!({"required": false, "role": role_name(role), "csrf": csrf}));
                response.headers_mut().insert(header::SET_COOKIE, session_cookie(&id, SESSION_TTL.as_secs()));
                response
            }
            Err(error) => error.into_response(),
        },
        Ok(Caller { role, csrf: None }) => json(&serde_json::json!({"required": required, "role": role_name(role), "csrf": null})),
        Err(_) => json(&serde_json::json!({"required": required, "role": null, "csrf": null})),
    }
}

/// `POST /api/login` with `{"token": "…"}`: the client or viewer token starts a session.
pub async fn login(State(console): State<Arc<Console>>, body: axum::body::Bytes) -> Response {
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value.get("token").and_then(|t| t.as_str()).map(|t| t.trim().to_string()))
        .unwrap_or_default();
    let role = match console.auth.tokens.role_of(&token) {
        Some(Role::Worker) => return ApiError::Forbidden("a worker token cannot use the console".into()).into_response(),
        Some(role) if console.auth.required() => role,
        Some(_) => return ApiError::BadRequest("this coordinator runs without tokens: no sign-in needed".into()).into_response(),
        None => {
            tracing::warn!("console sign-in refused: wrong token");
            return ApiError::Unauthenticated("wrong token".into()).into_response();
        }
    };
    match console.auth.start(role) {
        Ok((id, csrf)) => {
            tracing::info!(role = role_name(role), "console session started");
            let mut response = json(&serde_json::json!({"required": true, "role": role_name(role), "csrf": csrf}));
            response.headers_mut().insert(header::SET_COOKIE, session_cookie(&id, SESSION_TTL.as_secs()));
            response
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /api/logout`: ends the cookie's session.
pub async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        console.auth.lock().remove(id);
    }
    let mut response = json(&serde_json::json!({"ok": true}));
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn sessions_roles_and_csrf() {
        let sessions = Sessions::new(Tokens::new("client-t", "worker-t").with_viewer("viewer-t"));
        assert!(matches!(sessions.reader(&HeaderMap::new()), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(sessions.reader(&headers(&[(header::AUTHORIZATION, "Bearer nope")])), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(sessions.reader(&headers(&[(header::AUTHORIZATION, "Bearer worker-t")])), Err(ApiError::Forbidden(_))));
        assert!(sessions.actor(&headers(&[(header::AUTHORIZATION, "Bearer client-t")])).is_ok());
        assert!(matches!(sessions.actor(&headers(&[(header::AUTHORIZATION, "Bearer viewer-t")])), Err(ApiError::Forbidden(_))));

        let (id, csrf) = sessions.start(Role::Client).unwrap();
        let with_cookie = format!("other=1; {COOKIE}={id}");
        assert!(sessions.reader(&headers(&[(header::COOKIE, &with_cookie)])).is_ok());
        assert!(matches!(sessions.actor(&headers(&[(header::COOKIE, &with_cookie)])), Err(ApiError::Forbidden(_))), "no CSRF header");
        let csrf_header = header::HeaderName::from_static(CSRF_HEADER);
        assert!(matches!(
            sessions.actor(&headers(&[(header::COOKIE, &with_cookie), (csrf_header.clone(), "wrong")])),
            Err(ApiError::Forbidden(_))
        ));
        assert!(sessions.actor(&headers(&[(header::COOKIE, &with_cookie), (csrf_header.clone(), &csrf)])).is_ok());

        let (viewer, viewer_csrf) = sessions.start(Role::Viewer).unwrap();
        let viewer_cookie = format!("{COOKIE}={viewer}");
        assert!(matches!(
            sessions.actor(&headers(&[(header::COOKIE, &viewer_cookie), (csrf_header, &viewer_csrf)])),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn without_tokens_everyone_reads_but_acting_needs_a_session() {
        let sessions = Sessions::new(Tokens::default());
        assert!(sessions.reader(&HeaderMap::new()).is_ok());
        assert!(matches!(sessions.actor(&HeaderMap::new()), Err(ApiError::Forbidden(_))));
    }
}
