//! The gRPC edge: thin handlers that convert messages and call [`crate::core::Core`].

mod blocking;
pub mod client;
pub mod progress;
pub mod worker;

pub use blocking::{blocking, off_runtime};

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use cohort_proto::transfer::{self, TransferError};
use cohort_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use cohort_proto::lease::UploadLease;
use tonic::metadata::MetadataMap;

use crate::core::{Core, CoreError, LeaseProof};
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
        CoreError::Refused(Refusal::NotLeaseHolder { .. } | Refusal::WrongSession(_)) => Code::PermissionDenied,
        CoreError::LimitExceeded(_) => Code::ResourceExhausted,
        CoreError::Unwritable(_) => Code::Unavailable,
        CoreError::Store(_) | CoreError::Io(_) => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(%error, "internal error");
    }
    let unknown_worker = matches!(error, CoreError::Refused(Refusal::UnknownWorker(_)));
    let status = Status::new(code, error.to_string());
    // Said for programs too: a worker registers again on it, whatever the message's wording.
    if unknown_worker {
        return cohort_proto::errors::with_reason(status, cohort_proto::errors::UNKNOWN_WORKER);
    }
    status
}

fn transfer_status(error: TransferError) -> Status {
    match error {
        TransferError::Stream(status) => status,
        TransferError::Io { .. } => {
            tracing::error!(%error, "blob i/o failed");
            Status::internal(error.to_string())
        }
        TransferError::HashMismatch { .. } | TransferError::ChecksumMismatch { .. } | TransferError::Protocol(_) => {
            Status::invalid_argument(error.to_string())
        }
    }
}

/// Receives an uploaded blob into the store (shared by both services).
///
/// A worker uploads under a lease (named in the call's metadata, see
/// [`cohort_proto::lease`]): the lease is checked before any byte is taken, and the blob is
/// recorded as uploaded under it once received whole, so that only it can become that trial's
/// checkpoint or artifact. Such an upload is received in full even when the blob is already
/// stored: naming a hash proves nothing, sending the bytes does.
pub async fn receive_blob(
    core: &Arc<Core>,
    metadata: &MetadataMap,
    stream: tonic::Streaming<pb::BlobChunk>,
) -> Result<pb::UploadBlobResponse, Status> {
    let lease = UploadLease::read(metadata)?;
    if let Some(lease) = lease.clone() {
        blocking(core, move |core| core.check_upload_lease(&proof_of(&lease))).await?;
    }
    let limits = core.limits();
    let timeouts = transfer::ReceiveTimeouts { idle: limits.upload_idle, total: limits.upload_total };
    let mut stream = stream;
    let first = tokio::time::timeout(limits.upload_idle, stream.next())
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no data within {} s of the upload's start", limits.upload_idle.as_secs())))?
        .ok_or_else(|| Status::invalid_argument("empty upload"))??;
    if first.sha256.is_empty() {
        return receive_hashed_at_end(core, lease, first, stream).await;
    }
    let destination: PathBuf =
        core.blobs().path(&first.sha256).ok_or_else(|| Status::invalid_argument(format!("not a sha256: {:?}", first.sha256)))?;
    let blob = pb::BlobRef { sha256: first.sha256.clone(), size: first.size };
    let present = core.blobs().size(&first.sha256) == Some(first.size);
    if present && lease.is_none() {
        return Ok(pb::UploadBlobResponse { blob: Some(blob), already_present: true });
    }
    if !present {
        core.blobs()
            .check_room(first.size, limits.blob_quota_bytes, limits.blob_reserve_bytes)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
    }
    let chunks = tokio_stream::once(Ok(first)).chain(stream);
    if present {
        // Verify the uploader holds the bytes without replacing the stored blob.
        let folder = destination.parent().unwrap_or(std::path::Path::new("."));
        let scratch = tempfile::NamedTempFile::new_in(folder).map_err(|e| Status::internal(format!("scratch file: {e}")))?;
        transfer::receive_to_file_within(chunks, scratch.path(), None, limits.max_blob_bytes, timeouts).await.map_err(transfer_status)?;
    } else {
        transfer::receive_to_file_within(chunks, &destination, None, limits.max_blob_bytes, timeouts).await.map_err(transfer_status)?;
    }
    record_upload(core, lease, &blob).await?;
    Ok(pb::UploadBlobResponse { blob: Some(blob), already_present: present })
}

/// The lease proof an upload's metadata presents.
fn proof_of(lease: &UploadLease) -> LeaseProof<'_> {
    LeaseProof { worker_id: &lease.worker_id, task_id: &lease.task_id, attempt: lease.attempt, secret: &lease.secret }
}

/// Records a blob received under `lease` (none: a client's upload, nothing to record).
async fn record_upload(core: &Arc<Core>, lease: Option<UploadLease>, blob: &pb::BlobRef) -> Result<(), Status> {
    let Some(lease) = lease else {
        return Ok(());
    };
    let stored = crate::domain::BlobRef { sha256: blob.sha256.clone(), size: blob.size };
    blocking(core, move |core| core.record_lease_upload(&proof_of(&lease), &stored)).await
}

/// [`receive_blob`] of a stream named in its last chunk ([`transfer::StreamEnd`]): by the
/// sender's hash, or by its checksum alone, when the hash computed here names the blob. Received
/// into a hidden file in the store's folder, verified against what the stream ends with, and
/// only then renamed to the blob's path. A blob already stored stays as it is (the verified
/// copy is dropped), and the answer says so.
async fn receive_hashed_at_end(
    core: &Arc<Core>,
    lease: Option<UploadLease>,
    first: pb::BlobChunk,
    stream: tonic::Streaming<pb::BlobChunk>,
) -> Result<pb::UploadBlobResponse, Status> {
    let limits = core.limits();
    let timeouts = transfer::ReceiveTimeouts { idle: limits.upload_idle, total: limits.upload_total };
    core.blobs()
        .check_room(first.size, limits.blob_quota_bytes, limits.blob_reserve_bytes)
        .map_err(|e| Status::resource_exhausted(e.to_string()))?;
    let chunks = tokio_stream::once(Ok(first)).chain(stream);
    let verified = transfer::receive_verified_within(chunks, core.blobs().incoming_folder(), None, limits.max_blob_bytes, timeouts)
        .await
        .map_err(transfer_status)?;
    let blob = pb::BlobRef { sha256: verified.blob.sha256.clone(), size: verified.blob.size };
    let destination = core.blobs().path(&blob.sha256).ok_or_else(|| Status::internal("a verified blob without a sha256 name"))?;
    let present = core.blobs().size(&blob.sha256) == Some(blob.size);
    if present {
        drop(verified);
    } else {
        verified.persist(&destination).await.map_err(transfer_status)?;
    }
    record_upload(core, lease, &blob).await?;
    Ok(pb::UploadBlobResponse { blob: Some(blob), already_present: present })
}

/// Streams a stored blob (shared by both services).
pub fn send_blob(core: &Core, sha256: &str) -> Result<BlobStream, Status> {
    let path = core.blobs().path(sha256).ok_or_else(|| Status::invalid_argument(format!("not a sha256: {sha256:?}")))?;
    let size = core.blobs().size(sha256).ok_or_else(|| Status::not_found(format!("blob {sha256} not found")))?;
    let blob = pb::BlobRef { sha256: sha256.to_string(), size };
    Ok(Box::pin(transfer::file_chunks(path, blob).map(Ok)))
}

#[cfg(test)]
mod tests {
    use cohort_proto::errors::is_unknown_worker;

    use super::*;

    #[test]
    fn an_unknown_worker_is_marked_for_the_worker_to_register_again() {
        let refused = status(CoreError::Refused(Refusal::UnknownWorker("w-1".into())));
        assert_eq!(refused.code(), Code::NotFound);
        assert!(is_unknown_worker(&refused));
        assert!(refused.message().contains("unknown worker w-1"), "the message for people stays: {}", refused.message());
        for other in [CoreError::Refused(Refusal::UnknownTask("t-1".into())), CoreError::NotFound("task t-1".into())] {
            assert!(!is_unknown_worker(&status(other)), "only an unknown worker is marked so");
        }
    }
}
