//! The worker's view of a task: the one model of a trial shared with the coordinator
//! ([`cohort_proto::task`]), checked once at the edge by `Task::try_from`.

pub use cohort_proto::task::{
    AugmentSpec, BlobRef, CollectiveBackend, CommandSpec, DatasetFormat, DatasetSpec, FoldSpec, JudgeSpec, MalformedTask, Stage, Task,
    TrainingConfig, TrialKind, TrialSpec, WganSpec,
};
