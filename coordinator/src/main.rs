//! `coordinator`: the Cohort coordinator server and the user's commands.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cli::{connect, local, report, results, submit, watch, Format};
use cohort_coordinator::auth::Tokens;
use cohort_coordinator::core::{CoreConfig, Limits};
use cohort_coordinator::scheduler::Timeouts;
use cohort_coordinator::server::{BoundServer, Security};
use cohort_proto::auth::ConnectOptions;
use cohort_proto::v1 as pb;

/// Cohort: distributed training sweeps. `serve` runs the coordinator; the other commands talk to it.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Args {
    /// Coordinator URL for client commands (https:// with --tls-ca).
    #[arg(long, global = true, env = "COHORT_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// File holding the bearer token: the client token for client commands; for `serve`, the
    /// client token it accepts (full rights).
    #[arg(long, global = true, env = "COHORT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the coordinator's certificate (client commands, over TLS).
    #[arg(long, global = true, env = "COHORT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator server.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: SocketAddr,
        /// Where state (state.db) and blobs live.
        #[arg(long, default_value = "cohort-data")]
        data_dir: PathBuf,
        /// Seconds a task lease lasts without a heartbeat.
        #[arg(long, default_value_t = 10)]
        lease_secs: u64,
        /// File holding the worker token: it opens the worker service only.
        #[arg(long)]
        worker_token_file: Option<PathBuf>,
        /// PEM certificate chain: serve over TLS (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Run without bearer tokens: anyone who reaches the port may submit and run work.
        #[arg(long, conflicts_with_all = ["worker_token_file"])]
        insecure_no_auth: bool,
        /// Largest gRPC message accepted, in MiB (blobs move in 1 MiB chunks).
        #[arg(long, default_value_t = 16)]
        max_message_mib: usize,
        /// Largest blob (dataset file, checkpoint, artifact) accepted, in MiB.
        #[arg(long, default_value_t = 4096)]
        max_blob_mib: u64,
        /// Most trials one sweep's first stage may expand to.
        #[arg(long, default_value_t = cohort_coordinator::sweep::DEFAULT_MAX_TRIALS)]
        max_trials: usize,
        /// Longest name (sweep, dataset file, artifact, worker) accepted, in bytes.
        #[arg(long, default_value_t = 256)]
        max_name_bytes: usize,
        /// Longest forwarded log line kept, in bytes (longer ones are cut).
        #[arg(long, default_value_t = 4096)]
        max_log_line_bytes: usize,
        /// Longest log level kept, in bytes (longer ones are cut).
        #[arg(long, default_value_t = 16)]
        max_log_level_bytes: usize,
        /// Log lines kept per trial; a worker's further lines are refused.
        #[arg(long, default_value_t = 100_000)]
        max_log_lines_per_trial: u64,
        /// Named values one reported epoch may hold.
        #[arg(long, default_value_t = 64)]
        max_values_per_epoch: usize,
        /// Worker registrations accepted per minute (a burst of this many, refilled evenly).
        #[arg(long, default_value_t = 600)]
        registrations_per_minute: u32,
        /// Times a trial's lease may lapse (its worker went silent) before it fails for good;
        /// counted apart from the sweep's max_attempts, which count failed attempts.
        #[arg(long, default_value_t = 10)]
        max_lapses: u32,
        /// Seconds an upload may wait for its next chunk before it is dropped.
        #[arg(long, default_value_t = 30)]
        upload_idle_secs: u64,
        /// Minutes one upload may take in all.
        #[arg(long, default_value_t = 60)]
        upload_max_minutes: u64,
        /// Most GiB the blob store may hold (0: no quota).
        #[arg(long, default_value_t = 0)]
        blob_quota_gib: u64,
        /// MiB of free disk an upload must leave on the data dir's filesystem.
        #[arg(long, default_value_t = 1024)]
        min_free_mib: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (--http-listen serves them too).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Serve the web console, its JSON API (/api/) and the metrics (/metrics) at http://ADDR/.
        #[arg(long)]
        http_listen: Option<SocketAddr>,
        /// File holding the viewer token: it opens the console and the client service's queries,
        /// read only.
        #[arg(long, conflicts_with = "insecure_no_auth")]
        viewer_token_file: Option<PathBuf>,
    },
    /// Upload a sweep file's dataset and submit it; prints the new sweep's id.
    Submit {
        /// The sweep file (TOML).
        file: PathBuf,
        /// Check the file and its dataset and print the plan (every stage, the first stage's
        /// trials) on this machine: no coordinator, nothing uploaded or submitted.
        #[arg(long)]
        dry_run: bool,
        /// Follow the sweep's progress until it ends, then print its results.
        #[arg(long, conflicts_with = "dry_run")]
        watch: bool,
        /// Output format of the plan.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List sweeps, or show one sweep's progress.
    Status {
        /// A sweep id (default: all sweeps).
        id: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show a sweep's results: every trial's metrics and the cross-validation table.
    Results {
        /// The sweep id.
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Only the winning config and the trial that trained it (`final`, or a sweep's only
        /// later-stage trial).
        #[arg(long)]
        best: bool,
    },
    /// Wait until a sweep ends; exits 0 when it succeeded.
    Wait {
        /// The sweep id.
        id: String,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Follow a sweep's progress (a bar per stage, a line per running trial) until it ends.
    Watch {
        /// The sweep id.
        id: String,
    },
    /// Cancel a sweep's unfinished trials (running ones are stopped on their workers).
    Cancel {
        /// The sweep id.
        id: String,
    },
    /// Run a sweep's failed and cancelled trials again; finished ones are kept.
    Retry {
        /// The sweep id.
        id: String,
    },
    /// List the workers the coordinator knows, and what each runs.
    Workers {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List a sweep's checkpoints.
    Checkpoints {
        /// The sweep id.
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Export every trial's scalars and sample images as TensorBoard event files.
    Export {
        /// The sweep id.
        id: String,
        /// Folder for the event files (one run per trial).
        #[arg(long)]
        tensorboard: PathBuf,
    },
    /// Print the worker log lines kept for a sweep's trials.
    Logs {
        /// The sweep id.
        id: String,
        /// Only this trial (its name, e.g. cv/c0/f1, or its task id).
        #[arg(long)]
        trial: Option<String>,
        /// Keep printing new lines until the sweep ends.
        #[arg(long)]
        follow: bool,
    },
    /// Draw the seed's figures (PNG) and an index.html with the results tables.
    Report {
        /// The sweep id.
        id: String,
        /// Output folder (default: report/ID).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Download a checkpoint: a blob hash, a task id (its final checkpoint), or a sweep id with
    /// a trial name (`download ID final`) or `--best`.
    Download {
        /// Blob SHA-256, task id, or sweep id (with TRIAL or --best).
        checkpoint: String,
        /// A trial of the sweep, by name (e.g. final, cv/c0/f1): its final checkpoint.
        trial: Option<String>,
        /// The sweep's best trial (as `results ID --best` names it): its final checkpoint.
        #[arg(long, conflicts_with = "trial")]
        best: bool,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Sample a trained WGAN-GP's generator into a PNG grid (libtorch on this machine's CPU,
    /// through the `worker` binary beside this one; no worker daemon): the final checkpoint of a
    /// sweep's `train` trial or of a task, or --checkpoint. Conditional generators draw one row
    /// per class, or only --class's row.
    Generate {
        /// A sweep id (its WGAN-GP trial) or a task id.
        target: String,
        /// Only this class's row (its image-folder name, or its index).
        #[arg(long)]
        class: Option<String>,
        #[command(flatten)]
        latents: cohort_proto::sampling::LatentArgs,
        /// A checkpoint blob (SHA-256, see `checkpoints ID`) instead of the final checkpoint.
        #[arg(long)]
        checkpoint: Option<String>,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a sweep file on a local cluster (this coordinator plus N worker processes) and print its results.
    Local {
        /// The sweep file.
        file: PathBuf,
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Keep state, logs and checkpoints here (default: a temporary folder, removed at the end).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Output format of the results.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Also write the report (figures and index.html) into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

/// A worker's time by phase, largest share first: "train 81% data 9%".
fn phase_shares(phases: &std::collections::HashMap<String, f64>) -> String {
    let total: f64 = phases.values().sum();
    if total <= 0.0 {
        return "-".into();
    }
    let mut shares: Vec<(&String, f64)> = phases.iter().map(|(phase, seconds)| (phase, seconds / total)).collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
        .iter()
        .filter(|(_, share)| *share >= 0.005)
        .map(|(phase, share)| format!("{phase} {:.0}%", share * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_workers(workers: Vec<pb::WorkerInfo>, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        let rows: Vec<serde_json::Value> = workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.worker_id,
                    "name": w.name,
                    "device": w.device,
                    "allow_commands": w.allow_commands,
                    "last_seen_secs": w.last_seen_secs,
                    "task_id": w.task_id,
                    "sweep_id": w.sweep_id,
                    "trial": w.trial_name,
                    "phase_seconds": w.phase_seconds,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let trial = |w: &pb::WorkerInfo| if w.task_id.is_empty() { String::new() } else { format!("{} {}", w.sweep_id, w.trial_name) };
    let device = |w: &pb::WorkerInfo| if w.allow_commands { format!("{} +commands", w.device) } else { w.device.clone() };
    if format == Format::Csv {
        let header = ["worker", "name", "device", "allow_commands", "last_seen_secs", "sweep", "trial", "task"];
        let rows: Vec<Vec<String>> = workers
            .iter()
            .map(|w| {
                let fields = [
                    &w.worker_id,
                    &w.name,
                    &w.device,
                    &w.allow_commands.to_string(),
                    &format!("{:.1}", w.last_seen_secs),
                    &w.sweep_id,
                    &w.trial_name,
                    &w.task_id,
                ];
                fields.map(|field| field.to_string()).to_vec()
            })
            .collect();
        cli::print_csv_rows(&header, &rows);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let trial = trial(w);
            let trial = if trial.is_empty() { "idle".to_string() } else { trial };
            vec![w.name.clone(), w.worker_id.clone(), device(w), format!("{:.1}s", w.last_seen_secs), trial, phase_shares(&w.phase_seconds)]
        })
        .collect();
    cli::print_columns(
        &["name", "worker", "device", "last seen", "trial", "time by phase"],
        &rows,
        &[false, false, false, true, false, false],
    );
    Ok(())
}

fn print_sweeps(sweeps: Vec<pb::SweepSummary>, format: Format) -> anyhow::Result<()> {
    let header = ["sweep", "name", "state", "total", "queued", "running", "succeeded", "failed"];
    let rows: Vec<Vec<String>> = sweeps
        .iter()
        .map(|s| {
            let state = results::sweep_state_name(s.state).to_string();
            let counts = [s.total, s.queued, s.running, s.succeeded, s.failed].map(|count| count.to_string());
            [s.sweep_id.clone(), s.name.clone(), state].into_iter().chain(counts).collect()
        })
        .collect();
    match format {
        Format::Csv => {
            cli::print_csv_rows(&header, &rows);
            return Ok(());
        }
        Format::Table => {
            cli::print_columns(&header, &rows, &[false, false, false, true, true, true, true, true]);
            return Ok(());
        }
        Format::Json => {}
    }
    let rows: Vec<serde_json::Value> = sweeps
        .iter()
        .map(|s| {
            serde_json::json!({
                "sweep_id": s.sweep_id, "name": s.name, "state": results::sweep_state_name(s.state),
                "total": s.total, "queued": s.queued, "running": s.running, "succeeded": s.succeeded, "failed": s.failed,
                "created_unix_ms": s.created_unix_ms,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}

fn read_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let remote = ConnectOptions { url: args.coordinator.clone(), token_file: args.token_file.clone(), tls_ca: args.tls_ca.clone() };
    match args.command {
        Command::Serve {
            listen,
            data_dir,
            lease_secs,
            worker_token_file,
            tls_cert,
            tls_key,
            insecure_no_auth,
            max_message_mib,
            max_blob_mib,
            max_trials,
            max_name_bytes,
            max_log_line_bytes,
            max_log_level_bytes,
            max_log_lines_per_trial,
            max_values_per_epoch,
            registrations_per_minute,
            max_lapses,
            upload_idle_secs,
            upload_max_minutes,
            blob_quota_gib,
            min_free_mib,
            metrics_listen,
            http_listen,
            viewer_token_file,
        } => {
            if args.token_file.is_none() && !insecure_no_auth {
                anyhow::bail!("serve needs --token-file (and usually --worker-token-file), or --insecure-no-auth to run open");
            }
            let mut tokens = Tokens::load(args.token_file.as_deref(), worker_token_file.as_deref())?;
            if let Some(path) = &viewer_token_file {
                tokens = tokens.with_viewer_file(path)?;
            }
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some((read_file(&cert)?, read_file(&key)?)),
                _ => None,
            };
            let security = Security { tokens, tls, max_message_bytes: max_message_mib.max(2) << 20 };
            let timeouts = Timeouts { lease_ms: lease_secs.max(1) * 1000, max_lapses, ..Timeouts::default() };
            let limits = Limits {
                max_trials: max_trials.max(1),
                max_blob_bytes: max_blob_mib.max(1) << 20,
                max_name_bytes: max_name_bytes.max(16),
                max_log_line_bytes: max_log_line_bytes.max(80),
                max_log_level_bytes: max_log_level_bytes.max(5),
                max_log_lines_per_trial: max_log_lines_per_trial.max(1),
                max_values_per_epoch: max_values_per_epoch.max(1),
                registrations_per_minute: registrations_per_minute.max(1),
                upload_idle: std::time::Duration::from_secs(upload_idle_secs.max(1)),
                upload_total: std::time::Duration::from_secs(upload_max_minutes.max(1) * 60),
                blob_quota_bytes: (blob_quota_gib > 0).then_some(blob_quota_gib << 30),
                blob_reserve_bytes: min_free_mib << 20,
            };
            let server = BoundServer::bind(listen, &CoreConfig { data_dir, timeouts, limits }, security).await?;
            if let Some(address) = metrics_listen {
                let bound = server.serve_metrics(address).await?;
                tracing::info!(address = %bound, "metrics at /metrics");
            }
            if let Some(address) = http_listen {
                server.serve_console(address).await?;
            }
            server.serve(shutdown_signal()).await?;
        }
        Command::Submit { file, dry_run, watch, format } => {
            let sweep = submit::read(&file)?;
            if dry_run && format == Format::Csv {
                anyhow::bail!("submit --dry-run prints a table or json, not csv");
            }
            if dry_run {
                let response = submit::plan_offline(&sweep)?;
                submit::print_dry_run(&response, format == Format::Json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut client = connect(&remote).await?;
            let response = submit::submit(&mut client, &sweep, false).await?;
            submit::warn_if_unrunnable(&mut client, &sweep).await?;
            match format {
                Format::Table => println!("{}", response.sweep_id),
                Format::Json => println!("{}", serde_json::json!({"sweep_id": response.sweep_id})),
                Format::Csv => cli::print_csv_rows(&["sweep_id"], &[vec![response.sweep_id.clone()]]),
            }
            if watch {
                let state = watch::watch(&mut client, &response.sweep_id).await?;
                if state != "succeeded" {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Watch { id } => {
            let mut client = connect(&remote).await?;
            let state = watch::watch(&mut client, &id).await?;
            if state != "succeeded" {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Retry { id } => {
            let mut client = connect(&remote).await?;
            let response = client.retry_sweep(pb::RetrySweepRequest { sweep_id: id.clone() }).await.map_err(cli::rpc_error)?;
            match response.into_inner().requeued {
                0 => println!("nothing to retry: sweep {id} has no failed or cancelled trials"),
                requeued => println!("{requeued} trials queued again"),
            }
        }
        Command::Workers { format } => {
            let mut client = connect(&remote).await?;
            let workers = client.list_workers(pb::ListWorkersRequest {}).await.map_err(cli::rpc_error)?.into_inner().workers;
            print_workers(workers, format)?;
        }
        Command::Checkpoints { id, format } => {
            let mut client = connect(&remote).await?;
            results::print_checkpoints(&mut client, &id, format).await?;
        }
        Command::Status { id: None, format } => {
            let mut client = connect(&remote).await?;
            let sweeps = client.list_sweeps(pb::ListSweepsRequest {}).await.map_err(cli::rpc_error)?.into_inner().sweeps;
            print_sweeps(sweeps, format)?;
        }
        Command::Results { id, format, best: true } => {
            let mut client = connect(&remote).await?;
            let results = results::fetch(&mut client, &id).await?;
            results::print_best(&results, format)?;
        }
        Command::Status { id: Some(id), format } | Command::Results { id, format, best: false } => {
            let mut client = connect(&remote).await?;
            let results = results::fetch(&mut client, &id).await?;
            match format {
                Format::Table => results::print_table(&results),
                Format::Json => println!("{}", serde_json::to_string_pretty(&results)?),
                Format::Csv => results::print_csv(&results),
            }
        }
        Command::Wait { id, timeout } => {
            let mut client = connect(&remote).await?;
            let state = cli::follow::wait(&mut client, &id, timeout.map(Duration::from_secs)).await?;
            println!("{state}");
            if state != "succeeded" {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Cancel { id } => {
            let mut client = connect(&remote).await?;
            let response = client.cancel_sweep(pb::CancelSweepRequest { sweep_id: id.clone() }).await.map_err(cli::rpc_error)?;
            match response.into_inner().cancelled {
                0 => println!("nothing to cancel: sweep {id} has no queued or running trials (its outcome stays)"),
                cancelled => println!("{cancelled} trials cancelled"),
            }
        }
        Command::Export { id, tensorboard } => {
            let mut client = connect(&remote).await?;
            let runs = report::export_tensorboard(&mut client, &id, &tensorboard).await?;
            println!("{runs} runs written to {}", tensorboard.display());
        }
        Command::Logs { id, trial, follow } => {
            let mut client = connect(&remote).await?;
            cli::logs::print(&mut client, &id, trial.as_deref(), follow).await?;
        }
        Command::Report { id, out } => {
            let mut client = connect(&remote).await?;
            let out = out.unwrap_or_else(|| PathBuf::from("report").join(&id));
            let index = report::write(&mut client, &id, &out).await?;
            println!("{}", index.display());
        }
        Command::Download { checkpoint, trial, best, output } => {
            let mut client = connect(&remote).await?;
            let what = match (trial, best) {
                (Some(trial), _) => results::Download::Trial { sweep_id: checkpoint.clone(), trial },
                (None, true) => results::Download::Best { sweep_id: checkpoint.clone() },
                (None, false) => results::Download::Named(checkpoint.clone()),
            };
            results::download(&mut client, &what, &output).await.with_context(|| format!("downloading {checkpoint}"))?;
            eprintln!("wrote {}", output.display());
        }
        Command::Generate { target, class, latents, checkpoint, out } => {
            let mut client = connect(&remote).await?;
            let options = cli::generate::GenerateOptions { target, checkpoint, class, latents, out };
            println!("{}", cli::generate::run(&mut client, options).await?);
        }
        Command::Local { file, workers, data_dir, format, report } => {
            let succeeded = local::run(local::LocalOptions { file, workers, data_dir, format, report }).await?;
            if !succeeded {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    // Blobs move through `serve`, `submit` and `download`: their buffers are reused, not faulted in anew.
    let transfer_buffers_kept = cohort_proto::transfer::allocator::keep_transfer_buffers();
    // `coordinator logs … | head`: the reader going away ends the command quietly.
    cohort_proto::errors::exit_quietly_on_broken_pipe();
    let args = Args::parse();
    // The server logs what it does; client commands only what goes wrong.
    let serving = matches!(args.command, Command::Serve { .. });
    let default_level = if serving { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(cohort_proto::errors::colour_on_stderr())
        .init();
    if serving && !transfer_buffers_kept {
        tracing::warn!("malloc settings for transfers not applied: blob transfers may page-fault more");
    }
    match run(args).await {
        Ok(code) => code,
        Err(error) if cohort_proto::errors::is_broken_pipe(error.as_ref()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cohort_proto::errors::error_chain(error.as_ref()));
            if let Some(hint) = cli::credentials_hint(&error) {
                eprintln!("{hint}");
            }
            ExitCode::from(2)
        }
    }
}
