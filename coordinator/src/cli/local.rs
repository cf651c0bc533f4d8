//! `coordinator local`: a whole cluster on this machine — the coordinator in this process, N
//! worker processes on loopback — that runs one sweep file to completion and prints its results.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use cohort_coordinator::auth::Tokens;
use cohort_coordinator::core::{CoreConfig, Limits};
use cohort_coordinator::scheduler::Timeouts;
use cohort_coordinator::server::{BoundServer, Security, DEFAULT_MAX_MESSAGE_BYTES};
use cohort_coordinator::sweep::SweepFile;
use cohort_proto::auth::ConnectOptions;
use tokio::process::{Child, Command};

use super::{connect, results, submit, Format};

/// What `coordinator local` was asked to do.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The sweep file.
    pub file: PathBuf,
    /// Worker processes to start.
    pub workers: usize,
    /// Data directory to keep (default: a temporary one, removed at the end).
    pub data_dir: Option<PathBuf>,
    /// Output format of the results.
    pub format: Format,
    /// Write the report (figures, index.html) here at the end.
    pub report: Option<PathBuf>,
}

/// The `worker` binary beside this one (both are built and installed together).
pub(crate) fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate this executable")?;
    let worker = me.with_file_name("worker");
    if !worker.is_file() {
        bail!("no worker binary next to {} (build it with `make build`)", me.display());
    }
    Ok(worker)
}

/// Writes a fresh random token to `path`, readable by its owner only.
fn write_token(path: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    let token = hex::encode(bytes);
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    writeln!(file, "{token}")?;
    Ok(token)
}

fn spawn_worker(binary: &Path, url: &str, index: usize, data_dir: &Path, threads: usize, allow_commands: bool) -> anyhow::Result<Child> {
    let log_path = data_dir.join("logs").join(format!("worker-{index}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut command = Command::new(binary);
    // A command sweep run locally is the user's own program on the user's own machine.
    if allow_commands {
        command.arg("--allow-commands");
    }
    let child = command
        .arg("--coordinator")
        .arg(url)
        .arg("--name")
        .arg(format!("local-{index}"))
        .arg("--cache-dir")
        .arg(data_dir.join(format!("worker-{index}")))
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--token-file")
        .arg(data_dir.join("worker.token"))
        .arg("--advertise-host")
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(child)
}

/// Runs the sweep on a local cluster; returns whether it succeeded.
pub async fn run(options: LocalOptions) -> anyhow::Result<bool> {
    if options.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let sweep = submit::read(&options.file)?;
    let replicas = SweepFile::parse(&sweep.source, &sweep.source_name)?.distributed.map_or(1, |d| d.replicas) as usize;
    if replicas > options.workers {
        // The scheduler would wait for enough workers to gather the gang, for ever.
        bail!(
            "{}: [distributed] replicas = {replicas} trains on {replicas} workers at once: run with --workers {replicas} or more",
            sweep.source_name
        );
    }
    let worker_bin = worker_binary()?;
    let temp;
    let data_dir = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("cohort-local-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(data_dir.join("logs"))?;
    // This cluster's own credentials: a client token for this process, a worker token for the workers.
    let client_token = write_token(&data_dir.join("client.token"))?;
    let worker_token = write_token(&data_dir.join("worker.token"))?;
    let security = Security { tokens: Tokens::new(&client_token, &worker_token), tls: None, max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES };
    let config = CoreConfig { data_dir: data_dir.join("coordinator"), timeouts: Timeouts::default(), limits: Limits::default() };
    let server = BoundServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &config, security).await?;
    let url = format!("http://{}", server.local_addr());
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / options.workers).max(1);
    let mut workers = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        workers.push(spawn_worker(&worker_bin, &url, index, &data_dir, threads, sweep.sweep.is_command())?);
    }
    eprintln!(
        "local cluster: coordinator {url}, {} workers ({threads} thread(s) each), logs in {}",
        options.workers,
        data_dir.join("logs").display()
    );

    let outcome = drive(&url, &sweep, &mut workers, &data_dir, options.format, options.report.as_deref()).await;
    for worker in &mut workers {
        let _ = worker.start_kill();
        let _ = worker.wait().await;
    }
    let _ = stop_server.send(());
    let _ = serving.await;
    outcome
}

async fn drive(
    url: &str,
    sweep: &submit::LocalSweep,
    workers: &mut [Child],
    data_dir: &Path,
    format: Format,
    report: Option<&Path>,
) -> anyhow::Result<bool> {
    let options = ConnectOptions { url: url.to_string(), token_file: Some(data_dir.join("client.token")), tls_ca: None };
    let mut client = connect(&options).await?;
    let response = submit::submit(&mut client, sweep, false).await?;
    let sweep_id = response.sweep_id;
    let first_stage_trials = response.stages.first().map_or(response.planned.len(), |stage| stage.trials as usize);
    eprintln!("submitted sweep {sweep_id}: {first_stage_trials} trials");
    let mut last_line = String::new();
    loop {
        let current = results::fetch(&mut client, &sweep_id).await?;
        let done = current.trials.iter().filter(|t| t.state == "succeeded").count();
        let running = current.trials.iter().filter(|t| t.state == "running").count();
        let line = format!("[{done}/{} done, {running} running]", current.trials.len());
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if current.state != "running" {
            match format {
                Format::Table => results::print_table(&current),
                Format::Json => println!("{}", serde_json::to_string_pretty(&current)?),
                Format::Csv => results::print_csv(&current),
            }
            if let Some(out) = report {
                let index = super::report::write(&mut client, &sweep_id, out).await?;
                eprintln!("report: {}", index.display());
            }
            return Ok(current.state == "succeeded");
        }
        let mut alive = 0;
        for worker in workers.iter_mut() {
            if worker.try_wait()?.is_none() {
                alive += 1;
            }
        }
        if alive == 0 {
            let log = std::fs::read_to_string(data_dir.join("logs").join("worker-0.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!("every worker exited; the last lines of worker 0:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
