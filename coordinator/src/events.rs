//! Change notices for live views: the core publishes one whenever a sweep's state, a trial's
//! epochs or its log changes, and the web console forwards them to open pages as server-sent
//! events. Publishing never blocks and never fails: with no page open the notice is dropped, and
//! a page that falls behind is told to reload what it shows.

use tokio::sync::broadcast;

/// Notices kept for a slow subscriber before it is told it lagged.
const BACKLOG: usize = 4096;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A sweep was submitted.
    Submitted,
    /// A trial's state changed (leased, succeeded, failed, lapsed, cancelled, requeued).
    State,
    /// A trial reported epochs (carried in the notice).
    Epochs,
    /// A trial forwarded log lines.
    Logs,
    /// A trial recorded a checkpoint or an artifact.
    Files,
}

/// One reported epoch, as a notice carries it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochNotice {
    /// Epoch number.
    pub epoch: u32,
    /// Named values.
    pub values: Vec<(String, f64)>,
    /// Wall time of the epoch.
    pub seconds: f64,
}

/// A change to one sweep (and, when it concerns one, one trial).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    /// The sweep.
    pub sweep_id: String,
    /// The trial, if the change concerns one.
    pub task_id: Option<String>,
    /// What changed.
    pub kind: ChangeKind,
    /// The epochs reported (for [`ChangeKind::Epochs`]).
    pub epochs: Vec<EpochNotice>,
}

impl Change {
    /// A change of `kind` to a whole sweep.
    pub fn sweep(sweep_id: &str, kind: ChangeKind) -> Self {
        Self { sweep_id: sweep_id.to_string(), task_id: None, kind, epochs: Vec::new() }
    }

    /// A change of `kind` to one trial (its sweep is named in its id, `SWEEP.tN`).
    pub fn task(task_id: &str, kind: ChangeKind) -> Self {
        Self { sweep_id: sweep_of(task_id).to_string(), task_id: Some(task_id.to_string()), kind, epochs: Vec::new() }
    }
}

/// The sweep a task id belongs to: task ids are `SWEEP.tN`.
pub fn sweep_of(task_id: &str) -> &str {
    task_id.rsplit_once(".t").map_or(task_id, |(sweep, _)| sweep)
}

/// The channel changes are published on.
#[derive(Debug)]
pub struct Changes {
    sender: broadcast::Sender<Change>,
}

impl Default for Changes {
    fn default() -> Self {
        Self { sender: broadcast::channel(BACKLOG).0 }
    }
}

impl Changes {
    /// Publishes a change to every subscriber (none: dropped).
    pub fn publish(&self, change: Change) {
        let _ = self.sender.send(change);
    }

    /// A new subscription, receiving changes published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_name_their_sweep() {
        assert_eq!(sweep_of("s-1a2b.t17"), "s-1a2b");
        assert_eq!(Change::task("a.tb.t3", ChangeKind::State).sweep_id, "a.tb");
    }

    #[tokio::test]
    async fn subscribers_receive_what_is_published_after_they_subscribe() {
        let changes = Changes::default();
        changes.publish(Change::sweep("before", ChangeKind::Submitted));
        let mut receiver = changes.subscribe();
        changes.publish(Change::sweep("after", ChangeKind::State));
        assert_eq!(receiver.recv().await.unwrap().sweep_id, "after");
    }
}
