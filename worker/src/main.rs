//! `worker`: the daemon that runs on each GPU (or CPU) machine of a Cohort cluster.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use cohort_proto::auth::ConnectOptions;
use cohort_worker::daemon::{self, WorkerConfig};
use tch::Device;
use tracing_subscriber::Layer;

/// Runs Cohort trials for a coordinator: registers, leases tasks, trains them with libtorch,
/// streams metrics and uploads checkpoints.
#[derive(Debug, Parser)]
#[command(name = "worker", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Without one: run the daemon.
    #[command(subcommand)]
    command: Option<WorkerCommand>,
    /// Coordinator URL (https:// with --tls-ca).
    #[arg(long, env = "COHORT_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// File holding the worker token.
    #[arg(long, env = "COHORT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the coordinator's certificate (TLS).
    #[arg(long, env = "COHORT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Where to compute: auto (CUDA when libtorch sees a GPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Name shown by the coordinator (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// Folder for the blob cache (datasets, checkpoints) and scratch files.
    #[arg(long, default_value = "cohort-worker-cache")]
    cache_dir: PathBuf,
    /// CPU threads libtorch trains with: a number, or auto (the default) to share the host's
    /// cores with the other workers running on it, found through a host-local registry
    /// (`$COHORT_HOST_REGISTRY`, else `$XDG_RUNTIME_DIR/cohort-workers`, else `/dev/shm/cohort-UID`).
    /// Applied when each task starts.
    #[arg(long, default_value = "auto")]
    threads: cohort_worker::host_threads::ThreadSetting,
    /// Interface the collective (ring all-reduce) listener binds to; its port is picked per task.
    #[arg(long, default_value = "0.0.0.0")]
    collective_bind: std::net::IpAddr,
    /// Host (name or address) the other gang members dial to reach this worker's collective
    /// listener. Default: this machine's address on the route to the coordinator.
    #[arg(long, env = "COHORT_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Seconds a silent peer may take before a collective fails (so no replica hangs forever).
    #[arg(long, default_value_t = 10)]
    collective_timeout_secs: u64,
    /// Fixed port of the collective listener (0: a free port per task). Set it where a network
    /// policy must name the port.
    #[arg(long, default_value_t = 0)]
    collective_port: u16,
    /// Serve Prometheus metrics (step time, throughput, all-reduce) at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, seconds the running task may take to finish its epoch and checkpoint before it
    /// is stopped outright (keep it below the pod's termination grace period).
    #[arg(long, default_value_t = 20)]
    drain_secs: u64,
    /// MiB of host memory for datasets kept decoded and augmented between tasks, so the trials
    /// of a sweep on the same data skip that work (0: decode and augment for every task).
    #[arg(long, default_value_t = cohort_worker::data::cache::DEFAULT_BUDGET_BYTES >> 20)]
    dataset_cache_mib: u64,
    /// Run command trials: the user's own training code, as submitted with a sweep's [command]
    /// section (docs/commands.md). Off by default; the coordinator only gives them to workers
    /// started with this flag.
    #[arg(long)]
    allow_commands: bool,
}

/// What the worker binary does besides running the daemon.
#[derive(Debug, clap::Subcommand)]
enum WorkerCommand {
    /// Sample a WGAN-GP checkpoint file into a PNG grid, with libtorch on the CPU and no
    /// coordinator; prints the grid's shape as JSON. `coordinator generate` runs this after
    /// downloading the checkpoint, so that the coordinator's binary needs no libtorch.
    Generate(GenerateArgs),
}

/// `worker generate`'s arguments (see `cohort_worker::generate`).
#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// The checkpoint (safetensors holding `model.generator.*`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// A conditional generator's rows: these classes, by index (repeatable; default: every class).
    #[arg(long = "class-index")]
    classes: Vec<i64>,
    #[command(flatten)]
    latents: cohort_proto::sampling::LatentArgs,
}

/// Draws the grid and prints its shape (`cohort_proto::sampling::GridShape`) as JSON.
fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use cohort_worker::generate::{self, Latents, Request};
    let options = args.latents;
    let latents = match (options.interpolate, options.latent) {
        (Some(ends), _) => {
            let [from, to]: [PathBuf; 2] = ends.try_into().map_err(|_| anyhow::anyhow!("--interpolate takes two latent files"))?;
            Latents::Interpolate { from, to, steps: options.steps }
        }
        (None, Some(file)) => Latents::File(file),
        (None, None) => Latents::Random { count: options.count, seed: options.seed },
    };
    let request = Request { latents, classes: args.classes, save_latent: options.save_latent };
    let generator = generate::load_generator(&args.checkpoint)?;
    let grid = generator.draw(&request)?;
    generate::write_png(&grid, &args.out)?;
    let shape = cohort_proto::sampling::GridShape { rows: grid.rows, columns: grid.columns, row_classes: grid.row_classes };
    println!("{}", shape.to_json());
    Ok(())
}

fn parse_device(text: &str) -> anyhow::Result<Device> {
    match text {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(index) = text.strip_prefix("cuda:") else {
                bail!("--device must be auto, cpu or cuda:N, not {text:?}");
            };
            let index: usize = index.parse().with_context(|| format!("--device {text:?}: bad GPU index"))?;
            let available = tch::Cuda::device_count() as usize;
            if index >= available {
                bail!("--device {text}: libtorch sees {available} CUDA device(s)");
            }
            Ok(Device::Cuda(index))
        }
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A refused token, a bad flag, an unreadable file: said once, each cause once, on stderr.
        Err(error) => {
            eprintln!("error: {}", cohort_proto::errors::error_chain(error.as_ref()));
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let allocator_tuned = cohort_worker::allocator::tune_for_training();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(cohort_proto::errors::colour_on_stderr())
                .with_filter(filter),
        )
        // Lines about a running trial also go to the coordinator (`coordinator logs`).
        .with(cohort_worker::logs::ForwardLayer)
        .init();
    if !allocator_tuned {
        tracing::warn!("malloc settings for training not applied: training steps may page-fault more");
    }
    let mut args = Args::parse();
    if let Some(WorkerCommand::Generate(generate_args)) = args.command.take() {
        // libtorch on a thread of its own, not the runtime's.
        return tokio::task::spawn_blocking(move || generate(generate_args)).await?;
    }
    // Each task's training thread sets its count from the plan as it starts; inter-op threads
    // (unused by the recipes) stay at one.
    let threads = std::sync::Arc::new(cohort_worker::host_threads::ThreadPlan::new(
        args.threads,
        &cohort_worker::host_threads::default_registry_dir(),
    ));
    tch::set_num_interop_threads(1);
    let device = parse_device(&args.device)?;
    cohort_worker::data::cache::TensorCache::global().set_budget(args.dataset_cache_mib.saturating_mul(1 << 20));
    let config = WorkerConfig {
        connect: ConnectOptions { url: args.coordinator, token_file: args.token_file, tls_ca: args.tls_ca },
        name: args.name.unwrap_or_else(default_name),
        device,
        cache_dir: args.cache_dir,
        collective_bind: args.collective_bind,
        advertise_host: args.advertise_host,
        collective_timeout: std::time::Duration::from_secs(args.collective_timeout_secs.max(1)),
        collective_port: args.collective_port,
        drain_timeout: std::time::Duration::from_secs(args.drain_secs),
        allow_commands: args.allow_commands,
        threads: Some(threads),
    };
    if let Some(address) = args.metrics_listen {
        let bound = cohort_proto::metrics_http::spawn(address, || cohort_worker::metrics::metrics().render()).await?;
        tracing::info!(address = %bound, "metrics at /metrics");
    }
    tracing::info!(name = %config.name, device = %daemon::device_name(device), coordinator = %config.connect.url, "worker starting");
    daemon::run(config, shutdown_signal()).await?;
    Ok(())
}
