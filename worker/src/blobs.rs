//! The worker's blob cache: dataset files and checkpoints fetched from the coordinator, by hash.

use std::path::{Path, PathBuf};

use cohort_proto::transfer::{self, TransferError};
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use cohort_proto::v1::FetchBlobRequest;
use tonic::transport::Channel;

use crate::task::BlobRef;

/// Blobs on local disk under `DIR/sha256/<hash>`; a file there has been verified.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// A cache rooted at `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where blob `sha256` lives (or will).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256)
    }

    /// A scratch folder for files on their way out (checkpoints before upload).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// Returns the local path of `blob`, downloading and verifying it first if absent.
    pub async fn ensure(&self, client: &mut WorkerServiceClient<Channel>, blob: &BlobRef) -> Result<PathBuf, TransferError> {
        if !transfer::is_sha256_hex(&blob.sha256) {
            return Err(TransferError::Protocol(format!("not a blob name: {:?}", blob.sha256)));
        }
        let path = self.path(&blob.sha256);
        if is_complete(&path, blob.size) {
            return Ok(path);
        }
        let stream = client.fetch_blob(FetchBlobRequest { sha256: blob.sha256.clone() }).await?.into_inner();
        transfer::receive_to_file(stream, &path, Some(&blob.sha256), blob.size).await?;
        Ok(path)
    }
}

fn is_complete(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).map(|m| m.is_file() && m.len() == size).unwrap_or(false)
}
