//! The worker daemon: registers with the coordinator, leases tasks, runs each on a training
//! thread and relays what it reports. All network I/O lives here, on the tokio runtime; the
//! training itself never does.
//!
//! - [`run`] and the work loop (this module): start, lease, drain on shutdown.
//! - `session`: the worker's identity, (re-)registration, heartbeats, retried calls.
//! - `trial`: one leased task, from fetching its inputs to reporting its outcome.
//! - `relay`: a running task's reports, checkpoints and artifacts, sent on.
//! - `gang`: the collective listener and the rendezvous of a gang member.

mod gang;
mod relay;
mod session;
mod trial;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::auth::ConnectError;
use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use tch::Device;
use tonic::Code;

pub use crate::config::WorkerConfig;
use crate::metrics::Phase;
use session::{spawn_heartbeat, status_text, Shared, DEFAULT_HEARTBEAT};

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The coordinator URL, token or TLS settings are unusable.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The coordinator refused the worker's credentials: retrying cannot help.
    #[error("the coordinator refused this worker's token ({message}; token file: {token_file}); give the worker token's file with --token-file or COHORT_TOKEN_FILE")]
    Refused {
        /// What the coordinator said.
        message: String,
        /// The token file the worker used ("none given" without one).
        token_file: String,
    },
    /// The heartbeat thread could not start.
    #[error("cannot start the heartbeat thread: {0}")]
    Heartbeat(std::io::Error),
}

/// The longest wait between tries while the coordinator cannot be reached.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long an acquire call waits on the coordinator for work.
const ACQUIRE_WAIT_MS: u32 = 2_000;

/// Renders a device the way the protocol names it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_string(),
    }
}

/// Runs the daemon until `shutdown` resolves; a running task is stopped and handed back.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let (channel, token) = config.connect.lazy_channel()?;
    let client =
        WorkerServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let heartbeat_ms = Arc::new(AtomicU64::new(DEFAULT_HEARTBEAT.as_millis() as u64));
    let shared = Shared { client, config, identity: Arc::default(), running: Arc::default(), heartbeat_ms, registering: Arc::default() };
    // Starts the phase clock (if serving metrics has not already): the worker's uptime from here.
    crate::metrics::metrics().phases.switch(Phase::Idle);
    shared.register().await?;
    let heartbeat_stop = Arc::new(AtomicBool::new(false));
    let heartbeat = spawn_heartbeat(&shared, heartbeat_stop.clone())?;
    let logs = tokio::spawn(shared.clone().log_loop());
    let stopping = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(Mutex::new(None));
    let work = work_loop(shared.clone(), stopping.clone(), refused.clone());
    tokio::pin!(work);
    tokio::select! {
        () = &mut work => {}
        () = shutdown => {
            // Drain: the running task finishes its epoch, checkpoints it and is handed back, so
            // its next attempt resumes there; past the drain deadline it stops at once.
            let drain_for = shared.config.drain_timeout;
            tracing::info!(seconds = drain_for.as_secs(), "shutting down: checkpointing and releasing the running task");
            stopping.store(true, Ordering::SeqCst);
            let current = shared.running.lock().unwrap().clone();
            if let Some(current) = &current {
                current.drain.store(true, Ordering::SeqCst);
            }
            let hard_stop = async {
                tokio::time::sleep(drain_for).await;
                if let Some(current) = &current {
                    tracing::warn!("drain deadline reached: stopping the task now");
                    current.stop.store(true, Ordering::SeqCst);
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = &mut work => {}
                () = hard_stop => {}
            }
        }
    }
    logs.abort();
    heartbeat_stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || heartbeat.join()).await;
    let refusal = refused.lock().unwrap().take();
    match refusal {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

async fn work_loop(shared: Shared, stopping: Arc<AtomicBool>, refused: Arc<Mutex<Option<DaemonError>>>) {
    let phases = &crate::metrics::metrics().phases;
    let mut backoff = Duration::from_millis(100);
    let mut last_warning: Option<tokio::time::Instant> = None;
    // Right after a task more work is usually queued: one immediate acquire (the coordinator's
    // dispatch, counted as such) before long-polls, whose waits are the worker's idle time.
    let mut just_finished = false;
    while !stopping.load(Ordering::SeqCst) {
        let (phase, wait_ms) = if just_finished { (Phase::Coordinator, 0) } else { (Phase::Idle, ACQUIRE_WAIT_MS) };
        phases.switch(phase);
        just_finished = false;
        let identity = shared.identity();
        let seen_id = identity.worker_id.clone();
        let request = pb::AcquireTaskRequest { worker_id: identity.worker_id, wait_ms, session: identity.session };
        let response = match shared.client.clone().acquire_task(request).await {
            Ok(response) => response.into_inner(),
            // Unknown here (the coordinator restarted or forgot us), or our session no longer
            // matches: register again.
            Err(status) if matches!(status.code(), Code::NotFound | Code::PermissionDenied) => {
                if let Err(error) = shared.register_if_stale(&seen_id).await {
                    *refused.lock().unwrap() = Some(error);
                    return;
                }
                continue;
            }
            Err(status) => {
                // Once per capped backoff interval, not on every try.
                if last_warning.is_none_or(|at| at.elapsed() >= MAX_BACKOFF) {
                    last_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(error = %status_text(&status), "cannot get work from the coordinator, retrying with backoff up to {} s", MAX_BACKOFF.as_secs());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if let Some(spec) = response.task {
            trial::execute(&shared, spec, &stopping).await;
            just_finished = true;
        }
    }
}
