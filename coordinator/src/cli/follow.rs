//! Following a sweep as the coordinator streams its progress (`WatchSweep`): what `wait` and
//! `watch` read, instead of the whole sweep every half second. A coordinator that cannot be
//! reached for a while (a restart) is tried again, and the stream opened anew.

use std::time::Duration;

use anyhow::bail;
use cohort_proto::v1 as pb;
use tokio::time::Instant;

use super::results::{sweep_state_name, Reconnect};

/// A sweep's progress messages, one after another, across reconnections.
pub struct Follower {
    sweep_id: String,
    stream: Option<tonic::Streaming<pb::SweepProgress>>,
    reconnect: Reconnect,
    deadline: Option<Instant>,
}

impl Follower {
    /// Follows `sweep_id`, giving up once `timeout` has passed.
    pub fn new(sweep_id: &str, timeout: Option<Duration>) -> Self {
        Self {
            sweep_id: sweep_id.to_string(),
            stream: None,
            reconnect: Reconnect::default(),
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }

    /// The next progress message; an error once the timeout has passed, or for an error that
    /// retrying cannot mend (an unknown sweep, a refused token).
    pub async fn next(&mut self, client: &mut super::Client) -> anyhow::Result<pb::SweepProgress> {
        loop {
            if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                bail!("sweep {} still running after the timeout", self.sweep_id);
            }
            if self.stream.is_none() {
                let request = pb::WatchSweepRequest { sweep_id: self.sweep_id.clone() };
                let opened = client.watch_sweep(request).await.map(tonic::Response::into_inner).map_err(super::rpc_error);
                match self.reconnect.outcome(opened).await? {
                    Some(stream) => self.stream = Some(stream),
                    None => continue,
                }
            }
            let stream = self.stream.as_mut().expect("opened above");
            let message = match self.deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(message) => message,
                    Err(_) => continue,
                },
                None => stream.message().await,
            };
            match message {
                Ok(Some(progress)) => return Ok(progress),
                // The coordinator ended the stream without an end (it stopped): open another.
                Ok(None) => self.stream = None,
                Err(status) => {
                    self.stream = None;
                    self.reconnect.outcome::<()>(Err(super::rpc_error(status))).await?;
                }
            }
        }
    }
}

/// The sweep's state name in a progress message.
pub fn state_of(progress: &pb::SweepProgress) -> &'static str {
    sweep_state_name(progress.summary.as_ref().map_or(0, |s| s.state))
}

/// Waits until the sweep leaves the running state or `timeout` passes; returns its final state.
pub async fn wait(client: &mut super::Client, sweep_id: &str, timeout: Option<Duration>) -> anyhow::Result<String> {
    let mut follower = Follower::new(sweep_id, timeout);
    loop {
        let progress = follower.next(client).await?;
        let state = state_of(&progress);
        if state != "running" {
            return Ok(state.to_string());
        }
    }
}
