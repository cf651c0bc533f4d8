//! What the core is set up with and how it refuses: [`CoreConfig`], the [`Limits`] on hostile
//! or mistaken input, and [`CoreError`], mapped to gRPC codes once, in the service.

use std::path::PathBuf;
use std::time::Duration;

use crate::dataset::DatasetError;
use crate::scheduler::{Refusal, Timeouts};
use crate::store::StoreError;
use crate::sweep::SweepError;

/// Why the core refused or failed a request. Mapped to gRPC codes once, in the service.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The sweep file is invalid.
    #[error(transparent)]
    Sweep(#[from] SweepError),
    /// The dataset is unusable.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// A worker's call no longer applies (stale lease, unknown worker).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Local I/O failed.
    #[error("{0}")]
    Io(String),
    /// A bound on what a caller may send or store was exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// The database cannot be written: the coordinator accepts no changes until it can.
    #[error("the coordinator cannot write its database ({0}); it accepts no work until it can (free disk space on its data dir)")]
    Unwritable(String),
}

/// How the core is set up.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Data directory: `state.db` and `blobs/` live here.
    pub data_dir: PathBuf,
    /// Lease and worker timeouts.
    pub timeouts: Timeouts,
    /// Bounds on what clients may ask for.
    pub limits: Limits,
}

/// Bounds on hostile or mistaken input, each configurable on `coordinator serve`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Trials one sweep's first stage may expand to.
    pub max_trials: usize,
    /// Largest blob (dataset file, checkpoint, artifact) accepted, in bytes.
    pub max_blob_bytes: u64,
    /// Longest name (sweep, dataset file, artifact, worker) accepted, in bytes.
    pub max_name_bytes: usize,
    /// Longest forwarded log line kept, in bytes (longer ones are cut).
    pub max_log_line_bytes: usize,
    /// Longest log level kept, in bytes (longer ones are cut).
    pub max_log_level_bytes: usize,
    /// Log lines kept per trial (all attempts); later ones are refused.
    pub max_log_lines_per_trial: u64,
    /// Named values one reported epoch may hold.
    pub max_values_per_epoch: usize,
    /// Worker registrations accepted per minute (a token bucket of this size, refilled evenly).
    pub registrations_per_minute: u32,
    /// An upload waiting longer than this for its next chunk is dropped.
    pub upload_idle: Duration,
    /// An upload taking longer than this in all is dropped.
    pub upload_total: Duration,
    /// Most bytes the blob store may hold (none: no quota).
    pub blob_quota_bytes: Option<u64>,
    /// Free disk space an upload must leave on the data dir's filesystem.
    pub blob_reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_trials: crate::sweep::DEFAULT_MAX_TRIALS,
            max_blob_bytes: 4 << 30,
            max_name_bytes: 256,
            max_log_line_bytes: 4096,
            max_log_level_bytes: 16,
            max_log_lines_per_trial: 100_000,
            max_values_per_epoch: 64,
            registrations_per_minute: 600,
            upload_idle: cohort_proto::transfer::DEFAULT_IDLE_TIMEOUT,
            upload_total: cohort_proto::transfer::DEFAULT_TOTAL_TIMEOUT,
            blob_quota_bytes: None,
            blob_reserve_bytes: 1 << 30,
        }
    }
}
