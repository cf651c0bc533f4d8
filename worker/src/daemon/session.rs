//! The worker's standing with the coordinator: its identity and session, registering (again
//! when the coordinator forgot it), the heartbeat and log-shipping loops, and [`with_retry`],
//! which every call about a task goes through.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;

use super::{device_name, DaemonError, WorkerConfig, MAX_BACKOFF};
use crate::client::WorkerClient;
use crate::metrics::Phase;

/// Heartbeat period used until the coordinator names one.
pub(super) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long reports are retried while the coordinator is unreachable (e.g. restarting).
const REPORT_RETRY_FOR: Duration = Duration::from_secs(120);

/// The task this worker is running, shared with the heartbeat loop.
#[derive(Debug, Clone)]
pub(super) struct Running {
    pub(super) task_id: String,
    pub(super) attempt: u32,
    /// Its rank in the gang (0 for a plain task).
    pub(super) rank: u32,
    /// Proof of the lease, sent with every call about the task.
    pub(super) lease_secret: String,
    pub(super) stop: Arc<AtomicBool>,
    /// Finish the epoch, checkpoint, stop (shutdown).
    pub(super) drain: Arc<AtomicBool>,
    /// Set when the coordinator no longer wants this run (cancelled or moved): report nothing more.
    pub(super) abandoned: Arc<AtomicBool>,
}

/// What the daemon's loops share: the client, the configuration, who the worker is and what it runs.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) client: WorkerClient,
    pub(super) config: WorkerConfig,
    pub(super) identity: Arc<Mutex<Identity>>,
    pub(super) running: Arc<Mutex<Option<Running>>>,
    /// How often to heartbeat, in milliseconds, as the coordinator asked at registration.
    pub(super) heartbeat_ms: Arc<AtomicU64>,
    /// Held while registering: the work loop and the heartbeat thread both notice a coordinator
    /// that forgot this worker, and two registrations would leave a lease under an id the
    /// heartbeats no longer use.
    pub(super) registering: Arc<tokio::sync::Mutex<()>>,
}

/// Who this worker is to the coordinator: its id and the session minted with it.
#[derive(Debug, Clone, Default)]
pub(super) struct Identity {
    pub(super) worker_id: String,
    pub(super) session: String,
}

/// A status as a log line says it: its message and its causes, each once (a transport error's
/// message is often just "transport error", its cause says what).
pub(super) fn status_text(status: &tonic::Status) -> String {
    let line = if status.message().is_empty() { status.code().description() } else { status.message() }.to_string();
    cohort_proto::errors::with_causes(line, std::error::Error::source(status))
}

/// True for errors worth retrying: the coordinator is unreachable or restarting.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled)
}

/// What [`with_retry`] does after a failed call (before its time is up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Call again at once: the worker re-registered meanwhile (its id changed under the call).
    Now,
    /// Register again first: the coordinator no longer knows the worker.
    Register,
    /// Call again after a pause: the coordinator is unreachable or restarting.
    Backoff,
    /// Give up and return the refusal.
    GiveUp,
}

impl Retry {
    /// Decides after `status`; `id_changed` when the worker's id is no longer the one the call sent.
    fn after(status: &tonic::Status, id_changed: bool) -> Self {
        let refused = matches!(status.code(), Code::FailedPrecondition | Code::NotFound);
        if refused && id_changed {
            Retry::Now
        } else if cohort_proto::errors::is_unknown_worker(status) {
            Retry::Register
        } else if is_transient(status) {
            Retry::Backoff
        } else {
            Retry::GiveUp
        }
    }
}

/// Calls `call` with a fresh client handle and the worker's current id until it succeeds:
/// - while the coordinator is unreachable (restarting), with exponential backoff, for at most
///   `REPORT_RETRY_FOR`;
/// - at once when the worker re-registered meanwhile (its id changed under the call);
/// - after registering again when the coordinator no longer knows the worker (the status's
///   [`cohort_proto::errors::UNKNOWN_WORKER`] reason).
///
/// Any other refusal (a lease lost to another worker, a cancelled task) is returned.
pub(super) async fn with_retry<T, F, Fut>(shared: &Shared, what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut(WorkerClient, String) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let worker_id = shared.worker_id();
        let status = match call(shared.client.clone(), worker_id.clone()).await {
            Ok(value) => return Ok(value),
            Err(status) => status,
        };
        if started.elapsed() >= REPORT_RETRY_FOR {
            return Err(status);
        }
        match Retry::after(&status, shared.worker_id() != worker_id) {
            Retry::Now => continue,
            Retry::Register => {
                shared.reregister(&worker_id).await;
                continue;
            }
            Retry::Backoff => {}
            Retry::GiveUp => return Err(status),
        }
        tracing::debug!(what, error = %status.message(), "coordinator unreachable, retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Shared {
    pub(super) fn worker_id(&self) -> String {
        self.identity.lock().unwrap().worker_id.clone()
    }

    pub(super) fn identity(&self) -> Identity {
        self.identity.lock().unwrap().clone()
    }

    pub(super) fn running_tasks(&self) -> Vec<pb::RunningTask> {
        let running = self.running.lock().unwrap();
        running
            .iter()
            .map(|r| pb::RunningTask { task_id: r.task_id.clone(), attempt: r.attempt, rank: r.rank, lease_secret: r.lease_secret.clone() })
            .collect()
    }

    fn abandon(&self, task_ids: &[String]) {
        let running = self.running.lock().unwrap();
        if let Some(current) = running.as_ref().filter(|r| task_ids.contains(&r.task_id)) {
            tracing::warn!(task = %current.task_id, "coordinator abandoned the task, stopping it");
            current.abandoned.store(true, Ordering::SeqCst);
            current.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Registers (again), announcing any running task (with its lease secret) so the
    /// coordinator can re-attach it. Retries while the coordinator is unreachable, saying so
    /// once per retry interval; a refused token ends the worker: retrying cannot fix it.
    pub(super) async fn register(&self) -> Result<(), DaemonError> {
        let request = pb::RegisterRequest {
            name: self.config.name.clone(),
            device: device_name(self.config.device),
            running: self.running_tasks(),
            allow_commands: self.config.allow_commands,
        };
        let mut backoff = Duration::from_millis(100);
        let mut last_warning: Option<tokio::time::Instant> = None;
        loop {
            match self.client.clone().register(request.clone()).await {
                Ok(response) => {
                    let response = response.into_inner();
                    tracing::info!(worker_id = %response.worker_id, "registered with the coordinator");
                    if response.heartbeat_interval_ms > 0 {
                        self.heartbeat_ms.store(u64::from(response.heartbeat_interval_ms), Ordering::Relaxed);
                    }
                    *self.identity.lock().unwrap() = Identity { worker_id: response.worker_id, session: response.session };
                    self.abandon(&response.abandon);
                    return Ok(());
                }
                Err(status) if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    let token_file =
                        self.config.connect.token_file.as_ref().map_or_else(|| "none given".to_string(), |path| path.display().to_string());
                    return Err(DaemonError::Refused { message: status.message().to_string(), token_file });
                }
                Err(status) => {
                    // Once per capped backoff interval, not on every try.
                    if last_warning.is_none_or(|at| at.elapsed() >= MAX_BACKOFF) {
                        last_warning = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %status_text(&status), "cannot register with the coordinator, retrying with backoff up to {} s", MAX_BACKOFF.as_secs());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Registers again after the coordinator forgot the worker known as `seen_id`, unless
    /// another caller already did (the id changed meanwhile). A refused token is logged (the
    /// work loop ends the worker on it).
    pub(super) async fn reregister(&self, seen_id: &str) {
        if let Err(error) = self.register_if_stale(seen_id).await {
            tracing::error!(%error, "registering again failed");
        }
    }

    /// Registers unless the worker's id is no longer `seen_id`: whoever saw the old id fail
    /// registers once, and everyone else who saw it uses the new id.
    pub(super) async fn register_if_stale(&self, seen_id: &str) -> Result<(), DaemonError> {
        let _registering = self.registering.lock().await;
        if self.worker_id() != seen_id {
            return Ok(());
        }
        self.register().await
    }

    /// Ships the log lines collected for the running task.
    pub(super) async fn ship_logs(&self) {
        let Some((task_id, attempt, lines)) = crate::logs::buffer().take() else {
            return;
        };
        let lease_secret =
            self.running.lock().unwrap().as_ref().filter(|r| r.task_id == task_id).map(|r| r.lease_secret.clone()).unwrap_or_default();
        let request = pb::AppendLogsRequest { worker_id: self.worker_id(), task_id, attempt, lines, lease_secret };
        if let Err(status) = self.client.clone().append_logs(request).await {
            tracing::debug!(error = %status.message(), "log lines not shipped");
        }
    }

    fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed).max(50))
    }

    /// Renews this worker's leases every heartbeat interval until `stop`. Each beat waits at
    /// most two intervals for its answer, so one slow answer delays no later beat for long.
    async fn heartbeat_loop(self, stop: Arc<AtomicBool>) {
        let mut last_warning: Option<tokio::time::Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            let interval = self.heartbeat_interval();
            let identity = self.identity();
            let identity_id = identity.worker_id.clone();
            let phases = &crate::metrics::metrics().phases;
            let phase_seconds = Phase::ALL.iter().map(|&phase| (phase.label().to_string(), phases.seconds(phase))).collect();
            let request = pb::HeartbeatRequest {
                worker_id: identity.worker_id,
                running: self.running_tasks(),
                session: identity.session,
                phase_seconds,
            };
            let sent = tokio::time::Instant::now();
            let outcome = match tokio::time::timeout(interval * 2, self.client.clone().heartbeat(request)).await {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(status.message().to_string()),
                Err(_) => Err(format!("no answer within {} ms", (interval * 2).as_millis())),
            };
            match outcome {
                Ok(response) => {
                    self.abandon(&response.abandon);
                    if response.reregister {
                        self.reregister(&identity_id).await;
                    }
                }
                // Once per lease-ish period, not on every beat: a restarting coordinator would
                // otherwise fill the log.
                Err(error) if last_warning.is_none_or(|at| at.elapsed() >= interval * 8) => {
                    last_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(%error, "heartbeat failed, retrying");
                }
                Err(_) => {}
            }
            tokio::time::sleep_until(sent + interval).await;
        }
    }

    /// Ships the running task's log lines about once a second, apart from the heartbeat so that
    /// a slow log write never delays a lease renewal.
    pub(super) async fn log_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.ship_logs().await;
        }
    }
}

/// Runs the heartbeat on its own thread, with its own runtime and connection: nothing else the
/// worker does (training threads taking every core, dataset decoding, uploads on the main
/// runtime) can starve it. Stops when `stop` is set.
pub(super) fn spawn_heartbeat(shared: &Shared, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>, DaemonError> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "heartbeat runtime failed to start");
                    return;
                }
            };
            runtime.block_on(async move {
                let client = match shared.config.connect.lazy_channel() {
                    Ok((channel, token)) => WorkerServiceClient::with_interceptor(channel, token),
                    Err(error) => {
                        tracing::error!(%error, "heartbeat connection failed");
                        return;
                    }
                };
                Shared { client, ..shared }.heartbeat_loop(stop).await;
            });
        })
        .map_err(DaemonError::Heartbeat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct ConnectFailed(#[source] std::io::Error);

    #[test]
    fn a_transport_failure_names_its_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let expected = format!("tcp connect error: {refused}");
        let status = tonic::Status::from_error(Box::new(ConnectFailed(refused)));
        assert_eq!(status_text(&status), expected);
        assert_eq!(status_text(&tonic::Status::unavailable("")), tonic::Code::Unavailable.description());
    }

    #[test]
    fn the_worker_registers_again_on_the_coordinators_marker_not_its_wording() {
        let forgot =
            cohort_proto::errors::with_reason(tonic::Status::not_found("unknown worker w-1"), cohort_proto::errors::UNKNOWN_WORKER);
        assert_eq!(Retry::after(&forgot, false), Retry::Register);
        assert_eq!(Retry::after(&forgot, true), Retry::Now, "registered meanwhile: the new id is used at once");
        assert_eq!(Retry::after(&tonic::Status::not_found("unknown worker w-1"), false), Retry::GiveUp, "the text alone is not the signal");
        assert_eq!(Retry::after(&tonic::Status::failed_precondition("stale lease"), false), Retry::GiveUp);
        assert_eq!(Retry::after(&tonic::Status::unavailable("restarting"), false), Retry::Backoff);
    }
}
