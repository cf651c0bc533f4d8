//! The coordinator's types for what it plans, stores and schedules. A trial is described once,
//! in the shared crate ([`cohort_proto::task`], re-exported here); what only the coordinator
//! knows about a task (its state, the class of a failure) is defined below.

use serde::{Deserialize, Serialize};

pub use cohort_proto::task::{
    AugmentSpec, BlobRef, CollectiveBackend, CommandSpec, DatasetFormat, DatasetSpec, FoldSpec, InitPolicy, JudgeSpec, Stage,
    TrainingConfig, TrialKind, TrialSpec, WganSpec,
};

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for a worker.
    Queued,
    /// Leased to a worker.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled by the user.
    Cancelled,
    /// Stopped early by `[cv.prune]`: its config cannot win (see [`crate::prune`]).
    Pruned,
}

impl TaskState {
    /// The name stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Pruned => "pruned",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [TaskState::Queued, TaskState::Running, TaskState::Succeeded, TaskState::Failed, TaskState::Cancelled, TaskState::Pruned]
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// True once the task will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Pruned)
    }
}

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The trial itself is wrong: fail at once.
    User,
    /// The machine or process failed: retry.
    Infrastructure,
}
