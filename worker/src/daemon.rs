//! The worker daemon: registers with the coordinator, leases tasks, runs each on a training
//! thread and relays what it reports. All network I/O lives here, on the tokio runtime; the
//! training itself never does.


use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use tch::Device;
use tokio::sync::mpsc;
use cohort_proto::auth::{BearerToken, ConnectError, ConnectOptions};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use crate::blobs::{BlobCache, MaterializeError};
use crate::metrics::Phase;
use crate::task::{Task, TrialKind};
use crate::collective::{nccl, Backend, GangSettings};
use crate::train::{self, Events, GangInputs, RunInputs, TrainError, TrainEvent};

/// How the daemon is set up; validated by the binary before it gets here.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How to reach the coordinator: URL (e.g. `http://127.0.0.1:50051`), token, TLS.
    pub connect: ConnectOptions,
    /// Name shown in `coordinator workers` and the results.
    pub name: String,
    /// Where tensors live.
    pub device: Device,
    /// Blob cache and scratch space.
    pub cache_dir: PathBuf,
    /// Interface the collective (ring) listener binds to, e.g. 0.0.0.0.
    pub collective_bind: std::net::IpAddr,
    /// Host peers dial for collectives (default: this machine's address on the route to the coordinator).
    pub advertise_host: Option<String>,
    /// A silent peer fails a collective after this long.
    pub collective_timeout: Duration,
    /// A fixed port for the collective listener (0: any free port), for network policies.
    pub collective_port: u16,
    /// On shutdown, how long the running task may take to finish its epoch and checkpoint.
    pub drain_timeout: Duration,
    /// Whether it runs command trials (user code): `--allow-commands`, off by default.
    pub allow_commands: bool,
    /// libtorch's thread count, set by each task's training thread as it starts (`None`: left
    /// as libtorch has it).
    pub threads: Option<Arc<crate::host_threads::ThreadPlan>>,
}

/// A client of the coordinator's worker service, sending the worker's token.
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

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
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A status as a log line says it: its message and its causes, each once (a transport error's
/// message is often just "transport error", its cause says what).
fn status_text(status: &tonic::Status) -> String {
    let line = if status.message().is_empty() { status.code().description() } else { status.message() }.to_string();
    cohort_proto::errors::with_causes(line, std::error::Error::source(status))
}

/// Heartbeat period used until the coordinator names one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long an acquire call waits on the coordinator for work.
const ACQUIRE_WAIT_MS: u32 = 2_000;
/// How long reports are retried while the coordinator is unreachable (e.g. restarting).
const REPORT_RETRY_FOR: Duration = Duration::from_secs(120);
/// How long a gang member waits for the others at the rendezvous.
const RENDEZVOUS_FOR: Duration = Duration::from_secs(120);

/// The task this worker is running, shared with the heartbeat loop.
#[derive(Debug, Clone)]
struct Running {
    task_id: String,
    attempt: u32,
    /// Its rank in the gang (0 for a plain task).
    rank: u32,
    /// Proof of the lease, sent with every call about the task.
    lease_secret: String,
    stop: Arc<AtomicBool>,
    /// Finish the epoch, checkpoint, stop (shutdown).
    drain: Arc<AtomicBool>,
    /// Set when the coordinator no longer wants this run (cancelled or moved): report nothing more.
    abandoned: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Shared {
    client: WorkerClient,
    config: WorkerConfig,
    identity: Arc<Mutex<Identity>>,
    running: Arc<Mutex<Option<Running>>>,
    /// How often to heartbeat, in milliseconds, as the coordinator asked at registration.
    heartbeat_ms: Arc<AtomicU64>,
    /// Held while registering: the work loop and the heartbeat thread both notice a coordinator
    /// that forgot this worker, and two registrations would leave a lease under an id the
    /// heartbeats no longer use.
    registering: Arc<tokio::sync::Mutex<()>>,
}

/// Who this worker is to the coordinator: its id and the session minted with it.
#[derive(Debug, Clone, Default)]
struct Identity {
    worker_id: String,
    session: String,
}

/// Messages from the training thread to the daemon.
enum FromTrainer {
    Event(TrainEvent),
    Done(Result<(), TrainError>),
}

/// True for errors worth retrying: the coordinator is unreachable or restarting.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled)
}

/// Calls `call` with a fresh client handle and the worker's current id until it succeeds:
/// - while the coordinator is unreachable (restarting), with exponential backoff, for at most
///   `REPORT_RETRY_FOR`;
/// - at once when the worker re-registered meanwhile (its id changed under the call);
/// - after registering again when the coordinator no longer knows the worker.
///
/// Any other refusal (a lease lost to another worker, a cancelled task) is returned.
async fn with_retry<T, F, Fut>(shared: &Shared, what: &str, mut call: F) -> Result<T, tonic::Status>
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
        let refused = matches!(status.code(), Code::FailedPrecondition | Code::NotFound);
        if refused && shared.worker_id() != worker_id {
            continue;
        }
        if status.code() == Code::NotFound && status.message().starts_with("unknown worker") {
            shared.reregister(&worker_id).await;
            continue;
        }
        if !is_transient(&status) {
            return Err(status);
        }
        tracing::debug!(what, error = %status.message(), "coordinator unreachable, retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Shared {
    fn worker_id(&self) -> String {
        self.identity.lock().unwrap().worker_id.clone()
    }

    fn identity(&self) -> Identity {
        self.identity.lock().unwrap().clone()
    }

    fn running_tasks(&self) -> Vec<pb::RunningTask> {
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
    async fn register(&self) -> Result<(), DaemonError> {
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
                    let token_file = self.config.connect.token_file.as_ref().map_or_else(|| "none given".to_string(), |path| path.display().to_string());
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
    async fn reregister(&self, seen_id: &str) {
        if let Err(error) = self.register_if_stale(seen_id).await {
            tracing::error!(%error, "registering again failed");
        }
    }

    /// Registers unless the worker's id is no longer `seen_id`: whoever saw the old id fail
    /// registers once, and everyone else who saw it uses the new id.
    async fn register_if_stale(&self, seen_id: &str) -> Result<(), DaemonError> {
        let _registering = self.registering.lock().await;
        if self.worker_id() != seen_id {
            return Ok(());
        }
        self.register().await
    }

    /// Ships the log lines collected for the running task.
    async fn ship_logs(&self) {
        let Some((task_id, attempt, lines)) = crate::logs::buffer().take() else {
            return;
        };
        let lease_secret = self.running.lock().unwrap().as_ref().filter(|r| r.task_id == task_id).map(|r| r.lease_secret.clone()).unwrap_or_default();
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
            let request =
                pb::HeartbeatRequest { worker_id: identity.worker_id, running: self.running_tasks(), session: identity.session, phase_seconds };
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
    async fn log_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.ship_logs().await;
        }
    }
}

/// Runs the heartbeat on its own thread, with its own runtime and connection: nothing else the
/// worker does (training threads taking every core, dataset decoding, uploads on the main
/// runtime) can starve it. Stops when `stop` is set.
fn spawn_heartbeat(shared: &Shared, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>, DaemonError> {
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
    let client = WorkerServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
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
            execute(&shared, spec, &stopping).await;
            just_finished = true;
        }
    }
}

/// Runs one leased task to its end and reports the outcome.
async fn execute(shared: &Shared, spec: pb::TaskSpec, stopping: &AtomicBool) {
    let phases = &crate::metrics::metrics().phases;
    phases.switch(Phase::Coordinator);
    let (task_id, attempt, rank, lease_secret) = (spec.task_id.clone(), spec.attempt, spec.rank, spec.lease_secret.clone());
    let current = Running {
        task_id: task_id.clone(),
        attempt,
        rank,
        lease_secret: lease_secret.clone(),
        stop: Arc::default(),
        drain: Arc::default(),
        abandoned: Arc::default(),
    };
    let task = match Task::try_from(spec) {
        Ok(task) => task,
        Err(error) => {
            report_failure(shared, &current, true, error.to_string()).await;
            return;
        }
    };
    // The coordinator gives command trials only to workers that allow them; should one arrive
    // anyway, it is refused here, and retried elsewhere.
    if task.kind == TrialKind::Command && !shared.config.allow_commands {
        tracing::warn!(task = %task_id, "refusing a command trial: this worker was started without --allow-commands");
        report_failure(shared, &current, false, format!("worker {} does not run command trials (started without --allow-commands)", shared.config.name)).await;
        return;
    }
    *shared.running.lock().unwrap() = Some(current.clone());
    crate::logs::buffer().start(&task_id, attempt);
    tracing::info!(task = %task_id, trial = %task.trial_name, attempt, worker = %shared.config.name, "task started");
    let outcome = run_and_relay(shared, task, &current).await;
    // What is left (uploads the end of training waits for, the report) waits on the coordinator.
    phases.switch(Phase::Coordinator);
    match &outcome {
        Ok(()) => tracing::info!(task = %task_id, "training finished"),
        Err(error) => tracing::warn!(task = %task_id, %error, "training ended"),
    }
    shared.ship_logs().await;
    crate::logs::buffer().stop();
    *shared.running.lock().unwrap() = None;
    if current.abandoned.load(Ordering::SeqCst) {
        return;
    }
    match outcome {
        Ok(()) => {
            let complete = |mut c: WorkerClient, worker_id| {
                let request = pb::CompleteTaskRequest { worker_id, task_id: task_id.clone(), attempt, lease_secret: lease_secret.clone() };
                async move { c.complete_task(request).await }
            };
            match with_retry(shared, "complete", complete).await {
                Ok(_) => tracing::info!(task = %task_id, "task succeeded"),
                Err(status) => tracing::warn!(task = %task_id, error = %status.message(), "completion refused"),
            }
        }
        Err(TrainError::Stopped) if stopping.load(Ordering::SeqCst) => {
            report_failure(shared, &current, false, "worker shutting down".into()).await;
        }
        Err(error) => report_failure(shared, &current, error.is_user_error(), error.to_string()).await,
    }
}

async fn report_failure(shared: &Shared, run: &Running, user_error: bool, error: String) {
    let task_id = run.task_id.as_str();
    tracing::warn!(task = %task_id, user_error, %error, "task failed");
    let kind = if user_error { pb::FailureKind::User } else { pb::FailureKind::Infrastructure };
    let fail = |mut c: WorkerClient, worker_id| {
        let request = pb::FailTaskRequest {
            worker_id,
            task_id: task_id.to_string(),
            attempt: run.attempt,
            kind: kind as i32,
            error: error.clone(),
            lease_secret: run.lease_secret.clone(),
        };
        async move { c.fail_task(request).await }
    };
    if let Err(status) = with_retry(shared, "fail", fail).await {
        tracing::warn!(task = %task_id, error = %status.message(), "failure report refused");
    }
}

/// Fetches the task's inputs, trains on a dedicated thread, and relays its events as they come.
async fn run_and_relay(shared: &Shared, task: Task, current: &Running) -> Result<(), TrainError> {
    let phases = &crate::metrics::metrics().phases;
    let cache = BlobCache::new(&shared.config.cache_dir);
    let mut client = shared.client.clone();
    phases.switch(Phase::Data);
    let mut fetched = Vec::with_capacity(task.dataset.files.len());
    for (name, blob) in &task.dataset.files {
        let path = cache.ensure(&mut client, blob).await.map_err(|e| fetch_error(name, e))?;
        fetched.push((name.clone(), path, blob.sha256.clone()));
    }
    let (dataset_root, dataset_files) = cache.materialize(&fetched).map_err(materialize_error)?;
    phases.switch(Phase::Checkpoint);
    let resume_from = match &task.resume_from {
        Some(blob) => Some(cache.ensure(&mut client, blob).await.map_err(|e| fetch_error("checkpoint", e))?),
        None => None,
    };
    let init_from = match &task.init_from {
        Some(blob) => Some(cache.ensure(&mut client, blob).await.map_err(|e| fetch_error("pretrained checkpoint", e))?),
        None => None,
    };
    phases.switch(Phase::Coordinator);
    let mut gang = if task.world > 1 { Some(join_rendezvous(shared, &task, &current.lease_secret).await?) } else { None };
    let command_inputs = match task.kind {
        TrialKind::Command => Some(crate::command::prepare::inputs(&mut client, &cache, &shared.config, &task, &dataset_root, resume_from.clone(), gang.take()).await?),
        _ => None,
    };
    let scratch_dir = cache.scratch_dir();
    std::fs::create_dir_all(&scratch_dir).map_err(|e| TrainError::Checkpoint(crate::checkpoint::CheckpointError::Mismatch {
        path: scratch_dir.display().to_string(),
        message: e.to_string(),
    }))?;

    let (sender, mut receiver) = mpsc::unbounded_channel();
    let device = shared.config.device;
    let stop = current.stop.clone();
    let drain = current.drain.clone();
    let thread_task = task.clone();
    let threads = shared.config.threads.clone();
    let trainer = std::thread::Builder::new()
        .name(format!("train-{}", task.id))
        .spawn(move || {
            if let Some(threads) = &threads {
                threads.apply();
            }
            let inputs = RunInputs {
                dataset_files: &dataset_files,
                dataset_root: &dataset_root,
                resume_from: resume_from.as_deref(),
                init_from: init_from.as_deref(),
                scratch_dir: &scratch_dir,
                device,
                gang: gang.as_ref(),
            };
            let events_sender = sender.clone();
            let mut emit = move |event| {
                let _ = events_sender.send(FromTrainer::Event(event));
            };
            let mut events = Events { emit: &mut emit, stop: &stop, drain: &drain };
            // The training thread owns the phase clock while it runs; the recipes mark their
            // data and checkpoint work, the rest is training.
            let phases = &crate::metrics::metrics().phases;
            phases.switch(Phase::Train);
            let result = match &command_inputs {
                Some(command_inputs) => crate::command::run(&thread_task, command_inputs, &mut events),
                None => train::run(&thread_task, &inputs, &mut events),
            };
            phases.switch(Phase::Coordinator);
            let _ = sender.send(FromTrainer::Done(result));
        })
        .map_err(|e| TrainError::Infrastructure(format!("cannot start the training thread: {e}")))?;

    let mut outcome = Err(TrainError::Stopped);
    while let Some(message) = receiver.recv().await {
        match message {
            FromTrainer::Event(event) => relay(shared, &task, current, event).await,
            FromTrainer::Done(result) => {
                outcome = result;
                break;
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || trainer.join()).await;
    outcome
}

/// The host peers should dial: the flag's, else this machine's address on the route to the
/// coordinator (found by connecting a UDP socket, which sends nothing).
fn advertise_host(config: &WorkerConfig) -> Result<String, TrainError> {
    if let Some(host) = &config.advertise_host {
        return Ok(host.clone());
    }
    let uri: tonic::codegen::http::Uri = config.connect.url.parse().map_err(|e| TrainError::Collective(format!("coordinator url: {e}")))?;
    let host = uri.host().unwrap_or("127.0.0.1").trim_matches(|c| c == '[' || c == ']');
    let port = uri.port_u16().unwrap_or(50051);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| TrainError::Collective(format!("route lookup: {e}")))?;
    socket.connect((host, port)).map_err(|e| TrainError::Collective(format!("route to the coordinator: {e}")))?;
    Ok(socket.local_addr().map_err(|e| TrainError::Collective(e.to_string()))?.ip().to_string())
}

/// Binds this member's collective listener, announces it, and waits for the whole gang.
async fn join_rendezvous(shared: &Shared, task: &Task, lease_secret: &str) -> Result<GangInputs, TrainError> {
    let collective = |message: String| TrainError::Collective(message);
    let listener = std::net::TcpListener::bind((shared.config.collective_bind, shared.config.collective_port)).map_err(|e| collective(format!("bind: {e}")))?;
    let port = listener.local_addr().map_err(|e| collective(e.to_string()))?.port();
    let address = format!("{}:{port}", advertise_host(&shared.config)?);
    // Rank 0 decides the backend for the whole gang and relays NCCL's id; the others follow.
    let nccl_id = match task.rank {
        0 => match Backend::resolve(&task.collective_backend, shared.config.device)? {
            Backend::Nccl => nccl::unique_id()?,
            Backend::Ring => vec![],
        },
        _ => vec![],
    };
    let started = tokio::time::Instant::now();
    loop {
        let rendezvous = |mut c: WorkerClient, worker_id| {
            let request = pb::RendezvousRequest {
                worker_id,
                task_id: task.id.clone(),
                attempt: task.attempt,
                rank: task.rank,
                address: address.clone(),
                wait_ms: 2_000,
                nccl_id: nccl_id.clone(),
                lease_secret: lease_secret.to_string(),
            };
            async move { c.rendezvous(request).await }
        };
        let response = with_retry(shared, "rendezvous", rendezvous).await.map_err(|s| collective(format!("rendezvous: {}", s.message())))?.into_inner();
        if response.ready {
            tracing::info!(task = %task.id, rank = task.rank, world = task.world, "gang assembled");
            let settings = GangSettings { rank: task.rank as usize, peers: response.peers, secret: response.secret, timeout: shared.config.collective_timeout };
            let backend = if response.nccl_id.is_empty() { Backend::Ring } else { Backend::Nccl };
            return Ok(GangInputs { listener, settings, backend, nccl_id: response.nccl_id });
        }
        if started.elapsed() >= RENDEZVOUS_FOR {
            return Err(collective(format!("the gang did not assemble within {RENDEZVOUS_FOR:?}")));
        }
    }
}

/// A failed fetch of a task's input from the coordinator (a dataset file, a checkpoint): the
/// coordinator or the network failed, not the trial, so it is retried elsewhere.
fn fetch_error(what: &str, error: transfer::TransferError) -> TrainError {
    TrainError::Infrastructure(format!("cannot fetch {what}: {}", cohort_proto::errors::error_chain(&error)))
}

/// A dataset that could not be laid out: a file name that would leave its folder is the
/// dataset's fault; local disk trouble is the worker's.
fn materialize_error(error: MaterializeError) -> TrainError {
    match error {
        MaterializeError::UnsafeName(_) => TrainError::Invalid(error.to_string()),
        MaterializeError::Io { .. } => TrainError::Infrastructure(format!("cannot lay out the dataset: {}", cohort_proto::errors::error_chain(&error))),
    }
}

/// An epoch's figures as a log line says them: `train_mse=0.29012 val_mse=0.30114`.
fn values_line<'a>(values: impl IntoIterator<Item = &'a (String, f64)>) -> String {
    values.into_iter().map(|(name, value)| format!("{name}={value:.5}")).collect::<Vec<_>>().join(" ")
}

/// Sends one training event to the coordinator. A refusal (stale lease) stops the run.
async fn relay(shared: &Shared, task: &Task, current: &Running, event: TrainEvent) {
    if current.abandoned.load(Ordering::SeqCst) {
        return;
    }
    let result = match event {
        TrainEvent::Epoch(report) => {
            tracing::info!(task = %task.id, epoch = report.epoch, "epoch done: {}", values_line(&report.values));
            if let Device::Cuda(ordinal) = shared.config.device {
                crate::metrics::metrics().record_gpu_memory(ordinal);
            }
            let epochs = vec![pb::EpochMetrics {
                epoch: report.epoch,
                values: report.values.into_iter().collect(),
                seconds: report.seconds,
                samples: report.samples,
                attempt: task.attempt,
            }];
            let report_metrics = |mut c: WorkerClient, worker_id| {
                let request = pb::ReportMetricsRequest {
                    worker_id,
                    task_id: task.id.clone(),
                    attempt: task.attempt,
                    epochs: epochs.clone(),
                    lease_secret: current.lease_secret.clone(),
                };
                async move { c.report_metrics(request).await }
            };
            with_retry(shared, "metrics", report_metrics)
            .await
            .map(|_| ())
        }
        TrainEvent::Checkpoint { epoch, path, is_final } => upload_checkpoint(shared, task, current, epoch, &path, is_final).await,
        TrainEvent::Artifact { name, epoch, path } => upload_artifact(shared, task, current, &name, epoch, &path).await,
    };
    if let Err(status) = result {
        tracing::warn!(task = %task.id, error = %status.message(), "coordinator refused a report, stopping the task");
        current.abandoned.store(true, Ordering::SeqCst);
        current.stop.store(true, Ordering::SeqCst);
    }
}

/// Uploads a file as a blob under the running task's lease (retrying while the coordinator is
/// unreachable) and returns its ref. The lease travels in the call's metadata: the coordinator
/// accepts a checkpoint or artifact only from a blob uploaded under the same lease.
async fn upload_file(shared: &Shared, current: &Running, path: &std::path::Path) -> Result<pb::BlobRef, tonic::Status> {
    // Hashed while it is sent (the stream names the hash last): one pass over the file.
    let response = with_retry(shared, "upload", |mut c, worker_id| {
        let chunks = transfer::file_chunks_hash_at_end(path.to_path_buf());
        let lease = cohort_proto::lease::UploadLease { worker_id, task_id: current.task_id.clone(), attempt: current.attempt, secret: current.lease_secret.clone() };
        async move {
            let mut request = tonic::Request::new(chunks);
            lease.attach(request.metadata_mut())?;
            c.upload_blob(request).await
        }
    })
    .await?;
    response.into_inner().blob.ok_or_else(|| tonic::Status::internal("the coordinator answered an upload without its blob"))
}

async fn upload_artifact(shared: &Shared, task: &Task, current: &Running, name: &str, epoch: u32, path: &std::path::Path) -> Result<(), tonic::Status> {
    let blob = upload_file(shared, current, path).await?;
    let attach = |mut c: WorkerClient, worker_id| {
        let request = pb::AttachArtifactRequest {
            worker_id,
            task_id: task.id.clone(),
            attempt: task.attempt,
            name: name.to_string(),
            epoch,
            blob: Some(blob.clone()),
            lease_secret: current.lease_secret.clone(),
        };
        async move { c.attach_artifact(request).await }
    };
    with_retry(shared, "artifact", attach)
    .await?;
    let _ = std::fs::remove_file(path);
    tracing::info!(task = %task.id, artifact = name, "artifact uploaded");
    Ok(())
}

async fn upload_checkpoint(shared: &Shared, task: &Task, current: &Running, epoch: u32, path: &std::path::Path, is_final: bool) -> Result<(), tonic::Status> {
    let blob = upload_file(shared, current, path).await?;
    let attach = |mut c: WorkerClient, worker_id| {
        let request = pb::AttachCheckpointRequest {
            worker_id,
            task_id: task.id.clone(),
            attempt: task.attempt,
            epoch,
            blob: Some(blob.clone()),
            is_final,
            lease_secret: current.lease_secret.clone(),
        };
        async move { c.attach_checkpoint(request).await }
    };
    with_retry(shared, "attach", attach)
    .await?;
    // Keep the newest checkpoint in the cache under its hash: a resumed attempt here needs no download.
    let cached = BlobCache::new(&shared.config.cache_dir).path(&blob.sha256);
    if let Some(folder) = cached.parent() {
        let _ = std::fs::create_dir_all(folder);
    }
    if std::fs::rename(path, &cached).is_err() {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(task = %task.id, epoch, sha256 = %blob.sha256, "checkpoint uploaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the coordinator or the machine caused is retried; only what the dataset itself
    /// caused fails the trial at once.
    #[test]
    fn fetch_and_disk_failures_are_infrastructure_errors() {
        let dropped = transfer::TransferError::Stream(tonic::Status::unavailable("connection reset"));
        assert!(!fetch_error("train-images-idx3-ubyte", dropped).is_user_error());
        let missing = transfer::TransferError::Stream(tonic::Status::not_found("blob abc"));
        assert!(!fetch_error("checkpoint", missing).is_user_error());
        let disk = MaterializeError::Io { path: PathBuf::from("/cache/datasets/x"), source: std::io::Error::from(std::io::ErrorKind::StorageFull) };
        assert!(!materialize_error(disk).is_user_error());
        assert!(materialize_error(MaterializeError::UnsafeName("../etc/passwd".into())).is_user_error());
    }

    #[test]
    fn epoch_values_are_logged_as_name_value_pairs() {
        let values = vec![("train_mse".to_string(), 0.29012345), ("val_mse".to_string(), 0.3)];
        assert_eq!(values_line(&values), "train_mse=0.29012 val_mse=0.30000");
    }

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
}
