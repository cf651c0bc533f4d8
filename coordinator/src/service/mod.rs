//! The gRPC edge: thin handlers that convert messages and call [`crate::core::Core`].

pub mod client;
pub mod worker;

use std::path::PathBuf;
use std::pin::Pin;

use cohort_proto::transfer::{self, TransferError};
use cohort_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::core::{Core, CoreError};
use crate::scheduler::Refusal;

/// A stream of blob chunks sent to a client.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;


/// Maps a core error to its gRPC status: the one place this mapping is made.
pub fn status(error: CoreError) -> Status {
    let code = match &error {
        CoreError::Sweep(_) | CoreError::Dataset(_) | CoreError::BadRequest(_) => Code::InvalidArgument,
        CoreError::Refused(Refusal::UnknownWorker(_)) | CoreError::NotFound(_) => Code::NotFound,
        CoreError::Refused(Refusal::UnknownTask(_)) => Code::NotFound,
        CoreError::Refused(Refusal::StaleLease { .. }) => Code::FailedPrecondition,
        CoreError::Store(_) | CoreError::Io(_) => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(%error, "internal error");
    }
    Status::new(code, error.to_string())
}

fn transfer_status(error: TransferError) -> Status {
    match error {
        TransferError::Stream(status) => status,
        TransferError::Io { .. } => {
            tracing::error!(%error, "blob i/o failed");
            Status::internal(error.to_string())
        }
        TransferError::HashMismatch { .. } | TransferError::Protocol(_) => Status::invalid_argument(error.to_string()),
    }
}

/// Receives an uploaded blob into the store (shared by both services).
pub async fn receive_blob(core: &Core, stream: tonic::Streaming<pb::BlobChunk>) -> Result<pb::UploadBlobResponse, Status> {
    let mut stream = stream;
    let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty upload"))??;
    let destination: PathBuf =
        core.blobs().path(&first.sha256).ok_or_else(|| Status::invalid_argument(format!("not a sha256: {:?}", first.sha256)))?;
    let blob = pb::BlobRef { sha256: first.sha256.clone(), size: first.size };
    if core.blobs().size(&first.sha256) == Some(first.size) {
        return Ok(pb::UploadBlobResponse { blob: Some(blob), already_present: true });
    }
    let chunks = tokio_stream::once(Ok(first)).chain(stream);
    transfer::receive_to_file(chunks, &destination, None, core.limits().max_blob_bytes).await.map_err(transfer_status)?;
    Ok(pb::UploadBlobResponse { blob: Some(blob), already_present: false })
}

/// Streams a stored blob (shared by both services).
pub fn send_blob(core: &Core, sha256: &str) -> Result<BlobStream, Status> {
    let path = core.blobs().path(sha256).ok_or_else(|| Status::invalid_argument(format!("not a sha256: {sha256:?}")))?;
    let size = core.blobs().size(sha256).ok_or_else(|| Status::not_found(format!("blob {sha256} not found")))?;
    let blob = pb::BlobRef { sha256: sha256.to_string(), size };
    Ok(Box::pin(transfer::file_chunks(path, blob).map(Ok)))
}
