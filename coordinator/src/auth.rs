//! Who may call what: every RPC carries a bearer token. The client token has every right (it is
//! also accepted on the worker service, for operators' tools); the worker token opens only the
//! worker service, so a worker's credentials cannot submit or cancel sweeps; the viewer token
//! opens only the client service's queries ([`READ_ONLY_METHODS`]) and the web console.

use std::path::Path;
use std::sync::Arc;

use cohort_proto::auth::{read_token_file, ConnectError, AUTHORIZATION};
use tonic::{Request, Status};

/// Which service a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Users' commands.
    Client,
    /// Worker daemons.
    Worker,
}

/// The client service's methods a viewer token may call: queries that change nothing.
pub const READ_ONLY_METHODS: &[&str] = &["ListSweeps", "GetSweep", "WatchSweep", "GetLogs", "ListWorkers", "DownloadBlob", "HasBlobs"];

/// What a presented token entitles its holder to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every right (the client token, or authentication off).
    Client,
    /// The worker service only.
    Worker,
    /// The client service's queries and the console, read only.
    Viewer,
}

/// The tokens the coordinator accepts; none configured means authentication is off.
#[derive(Clone, Default)]
pub struct Tokens {
    client: Option<Arc<str>>,
    worker: Option<Arc<str>>,
    viewer: Option<Arc<str>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("client", &self.client.is_some())
            .field("worker", &self.worker.is_some())
            .field("viewer", &self.viewer.is_some())
            .finish()
    }
}

impl Tokens {
    /// Loads the client (full rights) and worker (worker service only) token files.
    pub fn load(client: Option<&Path>, worker: Option<&Path>) -> Result<Self, ConnectError> {
        let read = |path: Option<&Path>| path.map(read_token_file).transpose().map(|t| t.map(Arc::from));
        Ok(Self { client: read(client)?, worker: read(worker)?, viewer: None })
    }

    /// Also accepts the read-only viewer token in `path`.
    pub fn with_viewer_file(mut self, path: &Path) -> Result<Self, ConnectError> {
        self.viewer = Some(Arc::from(read_token_file(path)?));
        Ok(self)
    }

    /// Also accepts `token` as the read-only viewer token (tests).
    pub fn with_viewer(mut self, token: &str) -> Self {
        self.viewer = Some(Arc::from(token));
        self
    }

    /// Two fixed tokens (for `coordinator local` and tests).
    pub fn new(client: &str, worker: &str) -> Self {
        Self { client: Some(Arc::from(client)), worker: Some(Arc::from(worker)), viewer: None }
    }

    /// The role `presented` grants: `None` for a token that matches none (compared in constant
    /// time). With authentication off every caller is a client.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        if !self.enabled() {
            return Some(Role::Client);
        }
        let matches = |token: &Option<Arc<str>>| token.as_deref().is_some_and(|t| cohort_proto::auth::tokens_match(t, presented));
        if matches(&self.client) {
            return Some(Role::Client);
        }
        if matches(&self.worker) {
            return Some(Role::Worker);
        }
        if matches(&self.viewer) {
            return Some(Role::Viewer);
        }
        None
    }

    /// Admits or refuses a call of `method` (the last segment of the gRPC path, e.g.
    /// `ListSweeps`) on `service`: like [`Tokens::check`], and a viewer token only for the
    /// client service's [`READ_ONLY_METHODS`].
    pub fn check_method<T>(&self, request: &Request<T>, service: Service, method: &str) -> Result<(), Status> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = bearer(request)?;
        if self.viewer.is_some() && self.role_of(presented) == Some(Role::Viewer) {
            return match service {
                Service::Client if READ_ONLY_METHODS.contains(&method) => Ok(()),
                Service::Client => Err(Status::permission_denied(format!("a viewer token cannot call {method}: it only reads"))),
                Service::Worker => Err(Status::permission_denied("a viewer token cannot use the worker service")),
            };
        }
        self.check(request, service)
    }

    /// True when requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.client.is_some() || self.worker.is_some() || self.viewer.is_some()
    }

    /// Admits or refuses a request for `service`.
    pub fn check<T>(&self, request: &Request<T>, service: Service) -> Result<(), Status> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = bearer(request)?;
        let matches = |token: &Option<Arc<str>>| token.as_deref().is_some_and(|t| cohort_proto::auth::tokens_match(t, presented));
        if matches(&self.client) {
            return Ok(());
        }
        if matches(&self.worker) {
            return match service {
                Service::Worker => Ok(()),
                Service::Client => Err(Status::permission_denied("a worker token cannot use the client service")),
            };
        }
        if matches(&self.viewer) {
            return Err(Status::permission_denied("a viewer token only reads: use the client token"));
        }
        Err(Status::unauthenticated("invalid bearer token"))
    }
}

/// The bearer token a request carries.
fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    request
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn request(token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(token) = token {
            request.metadata_mut().insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        }
        request
    }

    #[test]
    fn roles_are_enforced() {
        let tokens = Tokens::new("admin-secret", "worker-secret");
        assert!(tokens.check(&request(Some("admin-secret")), Service::Client).is_ok());
        assert!(tokens.check(&request(Some("admin-secret")), Service::Worker).is_ok());
        assert!(tokens.check(&request(Some("worker-secret")), Service::Worker).is_ok());
        assert_eq!(tokens.check(&request(Some("worker-secret")), Service::Client).unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(tokens.check(&request(Some("guess")), Service::Worker).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(tokens.check(&request(None), Service::Client).unwrap_err().code(), Code::Unauthenticated);
        assert!(!format!("{tokens:?}").contains("secret"));
        assert!(Tokens::default().check(&request(None), Service::Client).is_ok(), "no tokens: open");
    }

    #[test]
    fn a_viewer_only_reads() {
        let tokens = Tokens::new("admin-secret", "worker-secret").with_viewer("viewer-secret");
        let viewer = request(Some("viewer-secret"));
        for method in READ_ONLY_METHODS {
            assert!(tokens.check_method(&viewer, Service::Client, method).is_ok(), "{method}");
        }
        for method in ["SubmitSweep", "CancelSweep", "RetrySweep", "UploadBlob"] {
            assert_eq!(tokens.check_method(&viewer, Service::Client, method).unwrap_err().code(), Code::PermissionDenied, "{method}");
        }
        assert_eq!(tokens.check_method(&viewer, Service::Worker, "Register").unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(tokens.check(&viewer, Service::Client).unwrap_err().code(), Code::PermissionDenied, "plain check never admits a viewer");
        assert!(tokens.check_method(&request(Some("admin-secret")), Service::Client, "CancelSweep").is_ok());
        assert_eq!(tokens.role_of("viewer-secret"), Some(Role::Viewer));
        assert_eq!(tokens.role_of("admin-secret"), Some(Role::Client));
        assert_eq!(tokens.role_of("viewer-secreT"), None);
        assert!(!format!("{tokens:?}").contains("secret"));
    }
}
