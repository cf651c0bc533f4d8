//! Benchmark: the scheduler's dispatch rate and the latency of acquiring a task, for
//! `tools/bench/scheduler.py` (docs/performance.md, "Scheduler").
//!
//! The real `coordinator serve` binary runs as its own process (so that its memory can be read
//! from `/proc/PID/status`) on a temporary data dir and a loopback port. A sweep whose first stage
//! is `--tasks` cross-validation trials (a random search of `--tasks / --folds` configs × `--folds`
//! folds on a generated 64-image IDX dataset) is submitted through the client service, as
//! `coordinator submit` does. Then `--workers` simulated workers, each with its own gRPC channel
//! (one HTTP/2 connection), register and loop `AcquireTask` → `CompleteTask` (a no-op trial)
//! until every task has completed. Two load shapes are measured, each on its own sweep:
//!
//! - `saturated`: every worker asks again as soon as its last task is complete: the most the
//!   coordinator dispatches per second. With every worker always waiting on a call, the acquire
//!   latency is mostly queueing: by Little's law, workers ÷ rate per acquire–complete round.
//! - `paced`: the workers together ask at `--rate` tasks per second (each worker on its own
//!   ticker): the acquire latency a worker sees when the coordinator runs at that rate.
//!
//! Both calls of every round are timed. The coordinator's resident memory (VmRSS) and peak
//! (VmHWM) are read after the submission and after each run, and the CPU time the coordinator
//! and this client used (`/proc/PID/stat`) is divided by the run's tasks. Two anchors
//! show where the time goes: `core`, the same saturated loop against [`Core`] in this process
//! (the store and the scheduler, no gRPC), and `scheduler`, the pure state machine alone.
//!
//! Prints one JSON object on stdout. The bench client shares the machine's cores with the
//! coordinator; `--threads` sets its runtime's worker threads.
//!
//! ```text
//! bench_scheduler [--tasks 100000] [--workers 256] [--folds 4] [--paced-tasks 50000] [--rate 10000]
//!                 [--threads 2] [--coordinator PATH] [--no-anchors]
//! ```

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use cohort_coordinator::core::{Core, CoreConfig, LeaseProof, Limits};
use cohort_coordinator::domain::BlobRef;
use cohort_coordinator::scheduler::{Scheduler, SecretSource, TaskEntry, Timeouts};
use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use cohort_proto::v1::client_service_client::ClientServiceClient;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use common::{cpu_seconds, CoordinatorProcess};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

/// How long one acquire call may wait for work before answering empty.
const ACQUIRE_WAIT_MS: u32 = 250;

/// The command line.
#[derive(Debug, Parser)]
struct Options {
    /// Tasks of the saturated run (and of the in-process anchors).
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 256)]
    workers: usize,
    /// Folds per config: the sweep is tasks / folds configs × folds.
    #[arg(long, default_value_t = 4)]
    folds: usize,
    /// Tasks of the paced run (0: skip it).
    #[arg(long, default_value_t = 50_000)]
    paced_tasks: usize,
    /// Tasks per second the workers ask for together in the paced run.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Worker threads of the bench client's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The coordinator binary (default: `coordinator` next to this example's folder).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Skip the in-process anchors.
    #[arg(long)]
    no_anchors: bool,
}

/// Latencies, in microseconds, of the acquire calls that returned a task and of the complete
/// calls that followed them.
#[derive(Debug, Default)]
struct Latencies {
    acquire: Vec<u64>,
    complete: Vec<u64>,
}

impl Latencies {
    fn record(&mut self, acquire: Duration, complete: Duration) {
        self.acquire.push(acquire.as_micros() as u64);
        self.complete.push(complete.as_micros() as u64);
    }

    fn extend(&mut self, other: Latencies) {
        self.acquire.extend(other.acquire);
        self.complete.extend(other.complete);
    }
}

/// The nearest-rank percentiles 50, 99 and 100 of `micros`, in milliseconds.
fn percentiles(mut micros: Vec<u64>) -> [f64; 3] {
    micros.sort_unstable();
    [50.0, 99.0, 100.0].map(|p: f64| {
        let Some(last) = micros.len().checked_sub(1) else {
            return 0.0;
        };
        let rank = ((p / 100.0) * micros.len() as f64).ceil() as usize;
        round(micros[rank.saturating_sub(1).min(last)] as f64 / 1000.0, 3)
    })
}

/// One measured run: its tasks, wall time and latencies.
#[derive(Debug, Default)]
struct Run {
    tasks: usize,
    wall: Duration,
    latencies: Latencies,
}

impl Run {
    fn summary(self) -> serde_json::Value {
        let seconds = self.wall.as_secs_f64();
        let [acquire_p50, acquire_p99, acquire_max] = percentiles(self.latencies.acquire);
        let [complete_p50, complete_p99, complete_max] = percentiles(self.latencies.complete);
        json!({
            "tasks": self.tasks,
            "wall_s": round(seconds, 3),
            "tasks_per_s": round(self.tasks as f64 / seconds, 1),
            "acquire_p50_ms": acquire_p50,
            "acquire_p99_ms": acquire_p99,
            "acquire_max_ms": acquire_max,
            "complete_p50_ms": complete_p50,
            "complete_p99_ms": complete_p99,
            "complete_max_ms": complete_max,
        })
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// An IDX file: the big-endian header words (magic, dimensions) and zeroed items.
fn idx_file(magic: u32, dims: &[u32]) -> Vec<u8> {
    let items: u32 = dims.iter().product();
    let mut bytes: Vec<u8> = std::iter::once(magic).chain(dims.iter().copied()).flat_map(u32::to_be_bytes).collect();
    bytes.resize(bytes.len() + items as usize, 0);
    bytes
}

/// Writes a 64-training, 16-test image IDX dataset into `folder`; returns its files by name.
fn write_dataset(folder: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(folder)?;
    let files = [
        ("train-images-idx3-ubyte", idx_file(0x803, &[64, 28, 28])),
        ("train-labels-idx1-ubyte", idx_file(0x801, &[64])),
        ("t10k-images-idx3-ubyte", idx_file(0x803, &[16, 28, 28])),
        ("t10k-labels-idx1-ubyte", idx_file(0x801, &[16])),
    ];
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = folder.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        written.push((name.to_string(), path));
    }
    Ok(written)
}

/// A cross-validation-only sweep of `configs` random-search configs × `folds` folds.
fn sweep_source(name: &str, configs: usize, folds: usize) -> String {
    format!(
        "name = \"{name}\"\nseed = 0\n\n[dataset]\nformat = \"idx\"\npath = \"dataset\"\n\n[model]\nkind = \"dae\"\n\n\
         [cv]\nfolds = {folds}\nepochs = 1\nbatch_size = 16\ncheckpoint_every = 0\n\n\
         [cv.random]\nsamples = {configs}\nlr = {{ min = 1e-4, max = 1e-2, log = true }}\n"
    )
}

fn configs_for(tasks: usize, folds: usize) -> Result<usize> {
    ensure!(folds >= 2 && tasks.is_multiple_of(folds), "--tasks must be a multiple of --folds (at least 2)");
    Ok(tasks / folds)
}

/// Resident and peak memory of a process, in MiB, from `/proc/PID/status`.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the coordinator's /proc status")?;
    let field = |key: &str| -> Result<f64> {
        let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} in /proc status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("malformed /proc status line")?.parse()?;
        Ok(round(kib / 1024.0, 1))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds of the coordinator and of this client, to subtract around a run.
fn cpu_pair(coordinator: u32) -> Result<(f64, f64)> {
    Ok((cpu_seconds(&coordinator.to_string())?, cpu_seconds("self")?))
}

/// Adds the CPU each side spent per task during a run, from readings before and after.
fn add_cpu(summary: &mut serde_json::Value, tasks: usize, before: (f64, f64), after: (f64, f64)) {
    let per_task = |seconds: f64| round(seconds * 1e6 / tasks as f64, 1);
    summary["coordinator_cpu_us_per_task"] = json!(per_task(after.0 - before.0));
    summary["client_cpu_us_per_task"] = json!(per_task(after.1 - before.1));
}

/// A channel to the coordinator process, as a worker opens one.
async fn channel(process: &CoordinatorProcess) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(process.url())?.tcp_nodelay(true);
    Ok(endpoint.connect().await?)
}

/// Starts `coordinator serve` without authentication on `dir/data`, its log in
/// `dir/coordinator.log`, allowing `max_trials` trials in a sweep.
async fn start_coordinator(binary: &Path, dir: &Path, max_trials: usize) -> Result<CoordinatorProcess> {
    let mut args: Vec<OsString> = vec!["--insecure-no-auth".into(), "--data-dir".into(), dir.join("data").into()];
    args.extend(["--max-trials".into(), max_trials.to_string().into()]);
    let (binary, log) = (binary.to_path_buf(), dir.join("coordinator.log"));
    // It waits for the port with blocking sleeps: off the runtime.
    tokio::task::spawn_blocking(move || CoordinatorProcess::start(&binary, &args, &log)).await?
}

/// Uploads the dataset and submits the sweep through the client service; returns the sweep id.
async fn submit_over_grpc(channel: Channel, source: &str, dataset: &[(String, PathBuf)]) -> Result<String> {
    let mut client = ClientServiceClient::new(channel);
    let mut dataset_files = Vec::new();
    for (name, path) in dataset {
        let blob = transfer::hash_file(path).await?;
        client.upload_blob(transfer::file_chunks(path.clone(), blob.clone())).await.with_context(|| format!("uploading {name}"))?;
        dataset_files.push(pb::DatasetFile { name: name.clone(), blob: Some(blob) });
    }
    let request = pb::SubmitSweepRequest {
        source: source.to_string(),
        source_name: "bench.toml".into(),
        dataset_files,
        dry_run: false,
        command_files: vec![],
    };
    let response = client.submit_sweep(request).await.map_err(|status| anyhow::anyhow!("submit: {}", status.message()))?;
    Ok(response.into_inner().sweep_id)
}

/// One simulated worker: its own channel and its registered id.
struct SimulatedWorker {
    client: WorkerServiceClient<Channel>,
    worker_id: String,
    session: String,
}

impl SimulatedWorker {
    async fn register(process: &CoordinatorProcess, index: usize) -> Result<Self> {
        let mut client = WorkerServiceClient::new(channel(process).await?);
        let request = pb::RegisterRequest { name: format!("bench-{index}"), device: "cpu".into(), running: vec![], allow_commands: false };
        let registered = client.register(request).await?.into_inner();
        Ok(Self { client, worker_id: registered.worker_id, session: registered.session })
    }

    /// Acquires and completes tasks until `completed` reaches `target`, waiting for each tick
    /// of `pacing` (if any) before asking; returns its latencies.
    async fn run(
        mut self,
        completed: Arc<AtomicUsize>,
        target: usize,
        pacing: Option<(Duration, Duration)>,
        done: Arc<tokio::sync::Notify>,
    ) -> Result<(Self, Latencies)> {
        let mut latencies = Latencies::default();
        let mut ticker = pacing.map(|(period, offset)| {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        while completed.load(Ordering::Acquire) < target {
            if let Some(ticker) = &mut ticker {
                ticker.tick().await;
            }
            let asked = Instant::now();
            let request =
                pb::AcquireTaskRequest { worker_id: self.worker_id.clone(), wait_ms: ACQUIRE_WAIT_MS, session: self.session.clone() };
            let Some(task) = self.client.acquire_task(request).await?.into_inner().task else {
                continue;
            };
            let acquired = Instant::now();
            let request = pb::CompleteTaskRequest {
                worker_id: self.worker_id.clone(),
                task_id: task.task_id,
                attempt: task.attempt,
                lease_secret: task.lease_secret,
            };
            self.client.complete_task(request).await?;
            latencies.record(acquired - asked, acquired.elapsed());
            if completed.fetch_add(1, Ordering::AcqRel) + 1 == target {
                done.notify_one();
            }
        }
        Ok((self, latencies))
    }
}

/// Runs every worker until `tasks` tasks completed; returns the workers and the run.
async fn run_workers(workers: Vec<SimulatedWorker>, tasks: usize, rate: Option<f64>) -> Result<(Vec<SimulatedWorker>, Run)> {
    let completed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let count = workers.len();
    let period = rate.map(|rate| Duration::from_secs_f64(count as f64 / rate));
    let started = Instant::now();
    let handles: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(index, worker)| {
            // Staggered tickers spread the paced workers' calls evenly over each period.
            let pacing = period.map(|p| (p, p.mul_f64(index as f64 / count as f64)));
            let (completed, done) = (completed.clone(), done.clone());
            tokio::spawn(async move {
                let result = worker.run(completed, tasks, pacing, done.clone()).await;
                // A failed worker wakes the waiter too, so that its error is reported, not a hang.
                if result.is_err() {
                    done.notify_one();
                }
                result
            })
        })
        .collect();
    done.notified().await;
    let wall = started.elapsed();
    let mut run = Run { tasks, wall, latencies: Latencies::default() };
    let mut workers = Vec::with_capacity(count);
    for handle in handles {
        let (worker, latencies) = handle.await??;
        workers.push(worker);
        run.latencies.extend(latencies);
    }
    ensure!(run.latencies.acquire.len() == tasks, "{} tasks dispatched, expected {tasks}", run.latencies.acquire.len());
    Ok((workers, run))
}

/// The measurements over gRPC against the coordinator process.
async fn bench_grpc(options: &Options, binary: &Path, dir: &Path, dataset: &[(String, PathBuf)]) -> Result<serde_json::Value> {
    let largest = options.tasks.max(options.paced_tasks);
    let process = start_coordinator(binary, dir, largest).await?;
    let (idle_rss, _) = memory_mib(process.pid())?;

    let submit_started = Instant::now();
    let source = sweep_source("bench-saturated", configs_for(options.tasks, options.folds)?, options.folds);
    submit_over_grpc(channel(&process).await?, &source, dataset).await?;
    let submit_seconds = submit_started.elapsed().as_secs_f64();
    let (submitted_rss, submitted_hwm) = memory_mib(process.pid())?;

    let mut workers = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        workers.push(SimulatedWorker::register(&process, index).await?);
    }
    eprintln!("saturated: {} tasks on {} workers", options.tasks, options.workers);
    let cpu_before = cpu_pair(process.pid())?;
    let (workers, saturated) = run_workers(workers, options.tasks, None).await?;
    let cpu_after = cpu_pair(process.pid())?;
    let (rss, hwm) = memory_mib(process.pid())?;
    let mut saturated = saturated.summary();
    add_cpu(&mut saturated, options.tasks, cpu_before, cpu_after);
    saturated["coordinator_rss_mib"] = json!(rss);
    saturated["coordinator_hwm_mib"] = json!(hwm);

    let mut result = json!({
        "coordinator_idle_rss_mib": idle_rss,
        "submit_s": round(submit_seconds, 3),
        "coordinator_submitted_rss_mib": submitted_rss,
        "coordinator_submitted_hwm_mib": submitted_hwm,
        "saturated": saturated,
    });
    if options.paced_tasks > 0 {
        let source = sweep_source("bench-paced", configs_for(options.paced_tasks, options.folds)?, options.folds);
        submit_over_grpc(channel(&process).await?, &source, dataset).await?;
        eprintln!("paced: {} tasks at {} tasks/s", options.paced_tasks, options.rate);
        let cpu_before = cpu_pair(process.pid())?;
        let (_, paced) = run_workers(workers, options.paced_tasks, Some(options.rate)).await?;
        let cpu_after = cpu_pair(process.pid())?;
        let (rss, hwm) = memory_mib(process.pid())?;
        let mut paced = paced.summary();
        add_cpu(&mut paced, options.paced_tasks, cpu_before, cpu_after);
        paced["offered_per_s"] = json!(options.rate);
        paced["coordinator_rss_mib"] = json!(rss);
        paced["coordinator_hwm_mib"] = json!(hwm);
        result["paced"] = paced;
    }
    Ok(result)
}

/// The anchor without gRPC: the same saturated loop against [`Core`] in this process.
async fn bench_core(options: &Options, dir: &Path, dataset: &[(String, PathBuf)]) -> Result<serde_json::Value> {
    let limits = Limits { max_trials: options.tasks, ..Limits::default() };
    let core = Arc::new(Core::open(&CoreConfig { data_dir: dir.join("core-data"), timeouts: Timeouts::default(), limits })?);
    let mut files = Vec::new();
    for (name, path) in dataset {
        let blob = transfer::hash_file(path).await?;
        let stored = core.blobs().path(&blob.sha256).context("hash_file gives a sha256")?;
        std::fs::create_dir_all(stored.parent().context("a blob path has a folder")?)?;
        std::fs::copy(path, &stored)?;
        files.push((name.clone(), BlobRef { sha256: blob.sha256, size: blob.size }));
    }
    let source = sweep_source("bench-core", configs_for(options.tasks, options.folds)?, options.folds);
    core.submit(&source, "bench.toml", files, false)?;
    let mut worker_ids = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        let (worker_id, session, _) = core.register(&format!("bench-{index}"), "cpu", Default::default(), &[])?;
        worker_ids.push((worker_id, session));
    }
    eprintln!("core anchor: {} tasks on {} in-process workers", options.tasks, options.workers);
    let completed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let target = options.tasks;
    let cpu_before = cpu_seconds("self")?;
    let started = Instant::now();
    let handles: Vec<_> = worker_ids
        .into_iter()
        .map(|(worker_id, session)| {
            let (core, completed, done) = (core.clone(), completed.clone(), done.clone());
            tokio::spawn(async move {
                let wait = Duration::from_millis(u64::from(ACQUIRE_WAIT_MS));
                let mut latencies = Latencies::default();
                let result: Result<()> = async {
                    while completed.load(Ordering::Acquire) < target {
                        let asked = Instant::now();
                        let Some(dispatch) = core.acquire(&worker_id, &session, wait).await? else {
                            continue;
                        };
                        let acquired = Instant::now();
                        let lease = LeaseProof {
                            worker_id: &worker_id,
                            task_id: &dispatch.task_id,
                            attempt: dispatch.attempt,
                            secret: &dispatch.lease_secret,
                        };
                        core.complete(&lease)?;
                        latencies.record(acquired - asked, acquired.elapsed());
                        if completed.fetch_add(1, Ordering::AcqRel) + 1 == target {
                            done.notify_one();
                        }
                    }
                    Ok(())
                }
                .await;
                if result.is_err() {
                    done.notify_one();
                }
                result.map(|()| latencies)
            })
        })
        .collect();
    done.notified().await;
    let mut run = Run { tasks: target, wall: started.elapsed(), latencies: Latencies::default() };
    for handle in handles {
        run.latencies.extend(handle.await??);
    }
    let cpu = cpu_seconds("self")? - cpu_before;
    let mut summary = run.summary();
    summary["cpu_us_per_task"] = json!(round(cpu * 1e6 / target as f64, 1));
    Ok(summary)
}

/// The anchor of the state machine alone: acquire and complete, round robin over the workers.
fn bench_state_machine(options: &Options) -> Result<serde_json::Value> {
    let mut minted = 0u64;
    let secrets = SecretSource::new(move || {
        minted += 1;
        format!("{minted:032x}")
    });
    let mut scheduler = Scheduler::new(Timeouts::default(), secrets);
    for index in 0..options.tasks {
        scheduler.insert(TaskEntry::queued(format!("s1.t{index}"), "s1".into(), index as u64, 3, 1), 0);
    }
    let workers: Vec<String> = (0..options.workers).map(|index| format!("w-{index}")).collect();
    for worker in &workers {
        scheduler.register(worker, worker, worker, 0, &[]);
    }
    let started = Instant::now();
    for index in 0..options.tasks {
        let worker = &workers[index % workers.len()];
        let now = started.elapsed().as_millis() as u64;
        let Some(lease) = scheduler.acquire(worker, worker, now)? else {
            bail!("the scheduler ran dry after {index} tasks");
        };
        scheduler.complete(worker, &lease.task_id, lease.attempt, &lease.secret, now)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({"tasks": options.tasks, "wall_s": round(seconds, 3), "tasks_per_s": round(options.tasks as f64 / seconds, 1)}))
}

async fn bench(options: Options) -> Result<serde_json::Value> {
    let binary = common::coordinator_binary(options.coordinator.as_deref())?;
    let dir = tempfile::Builder::new().prefix("cohort-bench-scheduler-").tempdir()?;
    let dataset = write_dataset(&dir.path().join("dataset"))?;
    let mut result = json!({
        "workers": options.workers,
        "client_threads": options.threads,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "grpc": bench_grpc(&options, &binary, dir.path(), &dataset).await?,
    });
    if !options.no_anchors {
        result["core"] = bench_core(&options, dir.path(), &dataset).await?;
        result["scheduler"] = bench_state_machine(&options)?;
    }
    Ok(result)
}

fn main() -> Result<()> {
    let options = Options::parse();
    ensure!(options.workers >= 1 && options.tasks >= 1 && options.rate > 0.0, "--workers, --tasks and --rate must be positive");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(options.threads.max(1)).enable_all().build()?;
    let result = runtime.block_on(bench(options))?;
    println!("{result}");
    Ok(())
}
