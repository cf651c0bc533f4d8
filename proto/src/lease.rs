//! The lease an upload is made under, carried in the upload call's metadata.
//!
//! `UploadBlob` is a stream of chunks with no room for a request header, so a worker names the
//! lease it uploads for in gRPC metadata. The coordinator accepts a checkpoint or artifact
//! attach only for a blob uploaded under the same lease: a worker cannot attach a blob that
//! someone else uploaded (a dataset file, another trial's checkpoint).

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::Status;

const WORKER: &str = "x-cohort-worker";
const TASK: &str = "x-cohort-task";
const ATTEMPT: &str = "x-cohort-attempt";
const SECRET: &str = "x-cohort-lease";

/// A lease as named in an upload's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLease {
    /// The uploading worker's id.
    pub worker_id: String,
    /// The task the blob belongs to.
    pub task_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The lease's secret.
    pub secret: String,
}

fn value(text: &str) -> Result<AsciiMetadataValue, Status> {
    text.parse().map_err(|_| Status::invalid_argument("a lease field is not printable ASCII"))
}

impl UploadLease {
    /// Writes the lease into a request's metadata.
    pub fn attach(&self, metadata: &mut MetadataMap) -> Result<(), Status> {
        metadata.insert(WORKER, value(&self.worker_id)?);
        metadata.insert(TASK, value(&self.task_id)?);
        metadata.insert(ATTEMPT, value(&self.attempt.to_string())?);
        metadata.insert(SECRET, value(&self.secret)?);
        Ok(())
    }

    /// Reads the lease from a request's metadata: `None` when the upload names no lease (a
    /// client's dataset upload), an error when it names one badly.
    pub fn read(metadata: &MetadataMap) -> Result<Option<Self>, Status> {
        let Some(task_id) = metadata.get(TASK) else {
            return Ok(None);
        };
        let text = |name: &str| -> Result<String, Status> {
            let field = metadata.get(name).ok_or_else(|| Status::invalid_argument(format!("an upload's lease lacks {name}")))?;
            field.to_str().map(str::to_string).map_err(|_| Status::invalid_argument(format!("{name} is not printable ASCII")))
        };
        let task_id = task_id.to_str().map_err(|_| Status::invalid_argument(format!("{TASK} is not printable ASCII")))?.to_string();
        let attempt = text(ATTEMPT)?.parse().map_err(|_| Status::invalid_argument(format!("{ATTEMPT} is not a number")))?;
        Ok(Some(Self { worker_id: text(WORKER)?, task_id, attempt, secret: text(SECRET)? }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_through_metadata() {
        let lease = UploadLease { worker_id: "w-1".into(), task_id: "s1.t0".into(), attempt: 2, secret: "ab12".into() };
        let mut metadata = MetadataMap::new();
        lease.attach(&mut metadata).unwrap();
        assert_eq!(UploadLease::read(&metadata).unwrap(), Some(lease));
        assert_eq!(UploadLease::read(&MetadataMap::new()).unwrap(), None, "a plain upload names no lease");
        let mut partial = MetadataMap::new();
        partial.insert(TASK, "s1.t0".parse().unwrap());
        assert!(UploadLease::read(&partial).is_err());
    }
}
