//! Who may call what: every RPC carries a bearer token. The client token has every right (it is
//! also accepted on the worker service, for operators' tools); the worker token opens only the
//! worker service, so a worker's credentials cannot submit or cancel sweeps.

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

/// The tokens the coordinator accepts; none configured means authentication is off.
#[derive(Clone, Default)]
pub struct Tokens {
    client: Option<Arc<str>>,
    worker: Option<Arc<str>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("client", &self.client.is_some()).field("worker", &self.worker.is_some()).finish()
    }
}

impl Tokens {
    /// Loads the client (full rights) and worker (worker service only) token files.
    pub fn load(client: Option<&Path>, worker: Option<&Path>) -> Result<Self, ConnectError> {
        let read = |path: Option<&Path>| path.map(read_token_file).transpose().map(|t| t.map(Arc::from));
        Ok(Self { client: read(client)?, worker: read(worker)? })
    }

    /// Two fixed tokens (for `coordinator local` and tests).
    pub fn new(client: &str, worker: &str) -> Self {
        Self { client: Some(Arc::from(client)), worker: Some(Arc::from(worker)) }
    }

    /// True when requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.client.is_some() || self.worker.is_some()
    }

    /// Admits or refuses a request for `service`.
    pub fn check<T>(&self, request: &Request<T>, service: Service) -> Result<(), Status> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
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
        Err(Status::unauthenticated("invalid bearer token"))
    }
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
}
