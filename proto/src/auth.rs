//! Bearer tokens and TLS on the client side of every connection to the coordinator: the worker's
//! and the user's commands build their channel here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::transfer::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_MAX_FRAME_BYTES, HTTP2_STREAM_WINDOW_BYTES};

/// The metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A token or certificate file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no usable token.
    #[error("{0}: the token file is empty or holds characters a header cannot carry")]
    BadToken(PathBuf),
    /// The URL or TLS settings are unusable.
    #[error("coordinator url {url}: {message}")]
    Endpoint {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

/// Reads a token file: its first line, trimmed.
pub fn read_token_file(path: &Path) -> Result<String, ConnectError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConnectError::File { path: path.to_path_buf(), source })?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() || MetadataValue::<Ascii>::try_from(format!("Bearer {token}")).is_err() {
        return Err(ConnectError::BadToken(path.to_path_buf()));
    }
    Ok(token)
}

/// True when `presented` is the token `expected`.
///
/// Both are hashed with SHA-256 first and the digests compared in constant time, so neither
/// how much of a guess matched nor whether its length was right shows in the time taken (a
/// plain compare of the tokens themselves has to stop at a length mismatch).
pub fn tokens_match(expected: &str, presented: &str) -> bool {
    let expected = Sha256::digest(expected.as_bytes());
    let presented = Sha256::digest(presented.as_bytes());
    expected.as_slice().ct_eq(presented.as_slice()).into()
}

/// Adds `authorization: Bearer <token>` to every request (nothing when there is no token).
#[derive(Clone, Default)]
pub struct BearerToken {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("BearerToken").field("set", &self.header.is_some()).finish()
    }
}

impl BearerToken {
    /// The token from `file`, or none.
    pub fn from_file(file: Option<&Path>) -> Result<Self, ConnectError> {
        let Some(file) = file else {
            return Ok(Self::default());
        };
        let token = read_token_file(file)?;
        let header = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| ConnectError::BadToken(file.to_path_buf()))?;
        Ok(Self { header: Some(header) })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, header.clone());
        }
        Ok(request)
    }
}

/// How to reach the coordinator: URL, token, CA certificate for TLS.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `http://host:port`, or `https://host:port` with TLS.
    pub url: String,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// A PEM file with the CA that signed the coordinator's certificate (turns TLS on).
    pub tls_ca: Option<PathBuf>,
}

impl ConnectOptions {
    /// The endpoint for these options (TLS configured when a CA is given).
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let endpoint_error = |message: String| ConnectError::Endpoint { url: self.url.clone(), message };
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
            .max_frame_size(HTTP2_MAX_FRAME_BYTES);
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).map_err(|source| ConnectError::File { path: ca.clone(), source })?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls).map_err(|e| endpoint_error(e.to_string()))?;
        }
        Ok(endpoint)
    }

    /// A lazily connecting channel and the token interceptor for it.
    pub fn lazy_channel(&self) -> Result<(Channel, BearerToken), ConnectError> {
        Ok((self.endpoint()?.connect_lazy(), BearerToken::from_file(self.token_file.as_deref())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("t");
        std::fs::write(&good, "abc123\n").unwrap();
        assert_eq!(read_token_file(&good).unwrap(), "abc123");
        let mut token = BearerToken::from_file(Some(&good)).unwrap();
        let request = token.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get(AUTHORIZATION).unwrap(), "Bearer abc123");
        assert!(!format!("{token:?}").contains("abc123"), "the token never shows in debug output");
        let empty = dir.path().join("e");
        std::fs::write(&empty, "\n").unwrap();
        assert!(matches!(read_token_file(&empty), Err(ConnectError::BadToken(_))));
        let missing = read_token_file(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("none"), "{missing}");
    }

    #[test]
    fn tokens_match_only_the_same_token_whatever_the_lengths() {
        assert!(tokens_match("worker-secret", "worker-secret"));
        assert!(tokens_match("", ""));
        for guess in ["", "w", "worker-secre", "worker-secret ", "worker-secreT", "worker-secret-and-more", "x".repeat(4096).as_str()] {
            assert!(!tokens_match("worker-secret", guess), "{guess:?}");
            assert!(!tokens_match(guess, "worker-secret"), "{guess:?}");
        }
    }
}
