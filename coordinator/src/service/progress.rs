//! `WatchSweep`: a sweep's progress as a server stream. The first message goes out at once; the
//! next whenever the sweep changes (change notices from [`crate::events`], coalesced over a short
//! pause so that a burst of epochs makes one message), or every few seconds regardless, so that
//! a worker going silent or a wait that changed shows; the last once the sweep has ended. A
//! message equal to the one before is not sent again. The pause grows with the cost of a read
//! (four times its duration at least), so that a watcher of a huge, busy sweep takes at most a
//! fifth of a core and never starves the scheduler of the core's lock.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tonic::Status;

use super::blocking;
use crate::core::Core;

/// A stream of progress messages.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::SweepProgress, Status>> + Send>>;

/// How long changes are gathered before the next message.
const COALESCE: Duration = Duration::from_millis(200);
/// The longest pause between two reads of the progress.
const REFRESH: Duration = Duration::from_secs(5);
/// The pause after a read is at least this many times what the read took.
const READ_COST_FACTOR: u32 = 4;

/// Reads the sweep's progress off the runtime (it queries the store).
async fn read(core: &Arc<Core>, sweep_id: &str) -> Result<pb::SweepProgress, Status> {
    let sweep_id = sweep_id.to_string();
    Ok(blocking(core, move |core| core.progress(&sweep_id)).await?.into())
}

/// Starts following `sweep_id`: fails at once for an unknown sweep.
pub async fn watch(core: Arc<Core>, sweep_id: String) -> Result<ProgressStream, Status> {
    // Subscribed before the first read, so that no change after it is missed.
    let changes = core.changes().subscribe();
    let first = read(&core, &sweep_id).await?;
    let (sender, receiver) = mpsc::channel(2);
    tokio::spawn(follow(core, sweep_id, first, changes, sender));
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
}

fn ended(progress: &pb::SweepProgress) -> bool {
    progress.summary.as_ref().is_none_or(|s| s.state != pb::SweepState::Running as i32)
}

async fn follow(
    core: Arc<Core>,
    sweep_id: String,
    mut progress: pb::SweepProgress,
    mut changes: broadcast::Receiver<crate::events::Change>,
    sender: mpsc::Sender<Result<pb::SweepProgress, Status>>,
) {
    let mut version = 0;
    let mut sent: Option<pb::SweepProgress> = None;
    let mut read_took = Duration::ZERO;
    loop {
        if sent.as_ref() != Some(&progress) {
            version += 1;
            let message = pb::SweepProgress { version, ..progress.clone() };
            if sender.send(Ok(message)).await.is_err() {
                return;
            }
            sent = Some(progress);
        }
        if sent.as_ref().is_some_and(ended) {
            return;
        }
        let refresh = tokio::time::sleep(REFRESH);
        tokio::pin!(refresh);
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) if change.sweep_id == sweep_id => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = &mut refresh => break,
                () = sender.closed() => return,
            }
        }
        tokio::time::sleep(COALESCE.max(read_took * READ_COST_FACTOR)).await;
        let started = tokio::time::Instant::now();
        progress = match read(&core, &sweep_id).await {
            Ok(progress) => progress,
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
        };
        read_took = started.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;
    use crate::core::tests::{open_with_dataset, proof, register, run_one};
    use crate::store::EpochRecord;

    const SWEEP: &str = "name = \"followed\"\n[dataset]\nformat = \"idx\"\npath = \"data\"\n[model]\nkind = \"dae\"\n\
                         [cv]\nfolds = 2\nepochs = 3\nbatch_size = 16\n[cv.grid]\nlr = [1e-3]\n";

    async fn next(stream: &mut ProgressStream) -> pb::SweepProgress {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a message in time")
            .expect("the stream goes on")
            .expect("no error")
    }

    /// The stream answers at once with the stage and why its trials wait, follows a running
    /// trial's epochs, and ends with the sweep; an unknown sweep is refused at once.
    #[tokio::test]
    async fn the_stream_follows_a_sweep_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (core, files) = open_with_dataset(dir.path());
        let core = Arc::new(core);
        let refused = watch(core.clone(), "nope".into()).await.err().expect("an unknown sweep is refused");
        assert_eq!(refused.code(), tonic::Code::NotFound);
        let sweep_id = core.submit(SWEEP, "s.toml", files, false).unwrap().sweep_id.unwrap();
        let mut stream = watch(core.clone(), sweep_id.clone()).await.unwrap();

        let first = next(&mut stream).await;
        assert_eq!(first.version, 1);
        assert_eq!(first.stages.len(), 1, "{first:?}");
        let stage = &first.stages[0];
        assert_eq!((stage.stage.as_str(), stage.total, stage.ended, stage.remaining_epochs), ("cv", 2, 0, 6));
        assert_eq!(stage.waiting, "waiting: no worker connected");

        // A running trial with an epoch: shown with its epochs, the stage's time per epoch known.
        let worker = register(&core, "w1");
        let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
        let epoch = EpochRecord { epoch: 1, attempt: 1, values: vec![("val_mse".into(), 0.5)], seconds: 2.0, samples: 8 };
        core.report_metrics(&proof(&worker, &dispatch), &[epoch]).unwrap();
        let running = loop {
            let progress = next(&mut stream).await;
            if progress.running.first().is_some_and(|t| t.epochs.len() == 1) {
                break progress;
            }
        };
        assert!(running.version > first.version);
        assert_eq!(running.running[0].worker_names, "w1");
        assert_eq!((running.stages[0].running, running.stages[0].remaining_epochs, running.stages[0].mean_epoch_seconds), (1, 5, 2.0));

        core.complete(&proof(&worker, &dispatch)).unwrap();
        run_one(&core, &worker, 0.4).await;
        let last = loop {
            let progress = next(&mut stream).await;
            if progress.summary.as_ref().unwrap().state != pb::SweepState::Running as i32 {
                break progress;
            }
        };
        assert_eq!(last.summary.unwrap().state, pb::SweepState::Succeeded as i32);
        assert_eq!(last.stages[0].ended, 2);
        assert!(tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().is_none(), "the stream ends with the sweep");
    }
}
