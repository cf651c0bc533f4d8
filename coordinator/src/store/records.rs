//! The rows the store reads and writes, as the rest of the coordinator sees them.

use crate::domain::{BlobRef, TrialSpec};
use crate::scheduler::TaskEntry;

/// A sweep's row.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRecord {
    /// Sweep id.
    pub id: String,
    /// Submission order.
    pub seq: u64,
    /// Name from the file.
    pub name: String,
    /// The sweep file's text.
    pub source: String,
    /// Submission time, Unix milliseconds.
    pub created_ms: i64,
    /// Cancelled by the user.
    pub cancelled: bool,
}

/// One epoch's stored figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// Epoch number.
    pub epoch: u32,
    /// Attempt that produced it.
    pub attempt: u32,
    /// Named values.
    pub values: Vec<(String, f64)>,
    /// Wall time.
    pub seconds: f64,
    /// Samples processed.
    pub samples: u64,
}

/// One stored checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    /// Task.
    pub task_id: String,
    /// Last epoch in it.
    pub epoch: u32,
    /// Attempt that wrote it.
    pub attempt: u32,
    /// Its blob.
    pub blob: BlobRef,
    /// The trial's final weights.
    pub is_final: bool,
}

/// One stored artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRecord {
    /// Task.
    pub task_id: String,
    /// Name, unique within the task.
    pub name: String,
    /// Epoch it belongs to.
    pub epoch: u32,
    /// Its blob.
    pub blob: BlobRef,
}

/// A forwarded log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Increasing id.
    pub id: i64,
    /// Task.
    pub task_id: String,
    /// Attempt.
    pub attempt: u32,
    /// When, Unix milliseconds.
    pub unix_ms: i64,
    /// Level (`INFO`, `WARN`, …).
    pub level: String,
    /// The line.
    pub message: String,
}

/// A task row with its spec.
#[derive(Debug, Clone)]
pub struct StoredTask {
    /// Scheduling state.
    pub entry: TaskEntry,
    /// What it runs.
    pub spec: TrialSpec,
}
