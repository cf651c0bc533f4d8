//! How fast the web console answers on a big sweep: a coordinator core (in process, on a temporary
//! data dir) gets one cross-validation sweep of `--tasks` trials; `--finished` of them are run by an
//! in-process worker, each reporting `--epochs` epochs; then the console is served on loopback and
//! the requests a browser makes to open the sweep page are timed over real HTTP: the sweep's
//! summary and stages, its first page of trials, the sweeps list, and (not part of the first
//! screen) the cross-validation table and the per-config curves. Each is asked `--repeat` times;
//! the first (cold) and the median answer are reported, as JSON on stdout.
//!
//! The same sweep is then read as the CLI reads it, over gRPC on loopback: `status` (ListSweeps),
//! `status ID`'s first page (GetSweep), `results ID` (every page of GetSweep), and one update of
//! `watch ID` (what it reads each time the sweep changes).
//!
//! ```text
//! cargo run --release -p cohort-coordinator --example bench_console -- [--tasks 100000] [--finished 2000]
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use cohort_coordinator::auth::Tokens;
use cohort_coordinator::core::{Core, CoreConfig, LeaseProof, Limits};
use cohort_coordinator::domain::BlobRef;
use cohort_coordinator::scheduler::Timeouts;
use cohort_coordinator::store::EpochRecord;
use serde_json::json;

/// The command line.
#[derive(Debug, Parser)]
struct Options {
    /// Trials of the sweep (a multiple of 4: configs × 4 folds).
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Trials run to completion before measuring.
    #[arg(long, default_value_t = 2000)]
    finished: usize,
    /// Epochs each finished trial reports.
    #[arg(long, default_value_t = 5)]
    epochs: u32,
    /// Times each request is asked.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Keep the data dir here (default: a temporary folder, removed at the end).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

fn idx_file(magic: u32, dims: &[u32]) -> Vec<u8> {
    let items: u32 = dims.iter().product();
    let mut bytes: Vec<u8> = std::iter::once(magic).chain(dims.iter().copied()).flat_map(u32::to_be_bytes).collect();
    bytes.resize(bytes.len() + items as usize, 0);
    bytes
}

/// Stores a tiny IDX dataset's files as blobs of `core` (named by SHA-256, as uploads are);
/// returns them by name.
async fn store_dataset(core: &Core, folder: &Path) -> Result<Vec<(String, BlobRef)>> {
    let files = [
        ("train-images-idx3-ubyte", idx_file(0x803, &[64, 28, 28])),
        ("train-labels-idx1-ubyte", idx_file(0x801, &[64])),
        ("t10k-images-idx3-ubyte", idx_file(0x803, &[16, 28, 28])),
        ("t10k-labels-idx1-ubyte", idx_file(0x801, &[16])),
    ];
    let mut stored = Vec::new();
    for (name, bytes) in files {
        let source = folder.join(name);
        std::fs::write(&source, &bytes)?;
        let blob = cohort_proto::transfer::hash_file(&source).await?;
        let path = core.blobs().path(&blob.sha256).context("a sha256 names a blob path")?;
        std::fs::create_dir_all(path.parent().context("a blob path has a folder")?)?;
        std::fs::copy(&source, &path)?;
        stored.push((name.to_string(), BlobRef { sha256: blob.sha256, size: blob.size }));
    }
    Ok(stored)
}

fn sweep_source(configs: usize) -> String {
    format!(
        "name = \"console-bench\"\nseed = 0\n\n[dataset]\nformat = \"idx\"\npath = \"dataset\"\n\n[model]\nkind = \"dae\"\n\n\
         [cv]\nfolds = 4\nepochs = 10\nbatch_size = 16\ncheckpoint_every = 0\n\n\
         [cv.random]\nsamples = {configs}\nlr = {{ min = 1e-4, max = 1e-2, log = true }}\n"
    )
}

/// One HTTP/1.1 GET over a fresh connection; returns the status and the time to the whole answer.
fn get(address: SocketAddr, path: &str) -> Result<(u16, Duration, usize)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let elapsed = started.elapsed();
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("an HTTP status line")?;
    Ok((status, elapsed, answer.len()))
}

/// Times the CLI's reads of the sweep over gRPC on loopback, `repeat` times each: first (cold)
/// and median, with the bytes of the answer.
async fn grpc_reads(core: Arc<Core>, sweep_id: &str, repeat: usize) -> Result<serde_json::Value> {
    use cohort_proto::v1 as pb;
    use cohort_proto::v1::client_service_client::ClientServiceClient;
    use cohort_proto::v1::client_service_server::ClientServiceServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let service = ClientServiceServer::new(cohort_coordinator::service::client::ClientApi::new(core)).max_encoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = ClientServiceClient::connect(format!("http://{address}")).await?.max_decoding_message_size(64 << 20);
    let mut results = serde_json::Map::new();
    let reads = ["status", "status_id_first_page", "results_all_pages", "watch_update"];
    for label in reads {
        let mut timings = Vec::new();
        let mut bytes = 0;
        for _ in 0..repeat {
            let started = Instant::now();
            bytes = match label {
                "status" => prost::Message::encoded_len(&client.list_sweeps(pb::ListSweepsRequest {}).await?.into_inner()),
                "status_id_first_page" => {
                    let request = pb::GetSweepRequest { sweep_id: sweep_id.to_string(), offset: 0, limit: 0 };
                    prost::Message::encoded_len(&client.get_sweep(request).await?.into_inner())
                }
                "results_all_pages" => {
                    let (mut offset, mut total) = (0, 0);
                    loop {
                        let request = pb::GetSweepRequest { sweep_id: sweep_id.to_string(), offset, limit: 0 };
                        let page = client.get_sweep(request).await?.into_inner();
                        total += prost::Message::encoded_len(&page);
                        if page.next_offset == 0 {
                            break total;
                        }
                        offset = page.next_offset;
                    }
                }
                _ => watch_update(&mut client, sweep_id).await?,
            };
            timings.push(started.elapsed());
        }
        let mut sorted = timings.clone();
        sorted.sort();
        results.insert(
            label.to_string(),
            json!({"first_ms": millis(timings[0]), "median_ms": millis(sorted[sorted.len() / 2]), "bytes": bytes}),
        );
    }
    Ok(serde_json::Value::Object(results))
}

/// What `watch` reads on each change of the sweep: one message of its progress stream
/// (`WatchSweep`; before the stream, `watch` read the whole sweep, page by page, every 500 ms).
async fn watch_update(
    client: &mut cohort_proto::v1::client_service_client::ClientServiceClient<tonic::transport::Channel>,
    sweep_id: &str,
) -> Result<usize> {
    use cohort_proto::v1 as pb;
    let mut stream = client.watch_sweep(pb::WatchSweepRequest { sweep_id: sweep_id.to_string() }).await?.into_inner();
    let progress = stream.message().await?.context("a first progress message")?;
    Ok(prost::Message::encoded_len(&progress))
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e4).round() / 10.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let options = Options::parse();
    ensure!(options.tasks.is_multiple_of(4) && options.tasks >= 4, "--tasks must be a positive multiple of 4");
    let dir = tempfile::tempdir()?;
    let limits = Limits { max_trials: options.tasks, ..Limits::default() };
    let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
    let core = Arc::new(Core::open(&CoreConfig { data_dir, timeouts: Timeouts::default(), limits })?);
    let files = store_dataset(&core, dir.path()).await?;
    let submitted = Instant::now();
    let sweep_id =
        core.submit(&sweep_source(options.tasks / 4), "bench.toml", files, false)?.sweep_id.context("a submitted sweep has an id")?;
    eprintln!("submitted {} trials in {:.1} s", options.tasks, submitted.elapsed().as_secs_f64());
    let (worker_id, session, _) = core.register("bench-worker", "cpu", Default::default(), &[])?;
    for index in 0..options.finished.min(options.tasks) {
        let dispatch = core.acquire(&worker_id, &session, Duration::from_millis(100)).await?.context("a queued trial")?;
        let lease =
            LeaseProof { worker_id: &worker_id, task_id: &dispatch.task_id, attempt: dispatch.attempt, secret: &dispatch.lease_secret };
        let epochs: Vec<EpochRecord> = (1..=options.epochs)
            .map(|epoch| EpochRecord {
                epoch,
                attempt: dispatch.attempt,
                values: vec![
                    ("train_loss".into(), 0.1 / f64::from(epoch)),
                    ("val_mse".into(), 0.05 + (index % 7) as f64 * 1e-3 / f64::from(epoch)),
                ],
                seconds: 0.5,
                samples: 48,
            })
            .collect();
        core.report_metrics(&lease, &epochs)?;
        core.complete(&lease)?;
    }
    eprintln!("{} trials finished", options.finished);
    let address = cohort_coordinator::console::spawn("127.0.0.1:0".parse()?, core.clone(), Tokens::default()).await?;
    let requests = [
        ("sweep", format!("/api/sweeps/{sweep_id}")),
        ("trials_first_page", format!("/api/sweeps/{sweep_id}/trials?offset=0&limit=50")),
        ("trials_last_page", format!("/api/sweeps/{sweep_id}/trials?offset={}&limit=50", options.tasks - 50)),
        ("sweeps_list", "/api/sweeps?limit=50".to_string()),
        ("cv_table", format!("/api/sweeps/{sweep_id}/cv")),
        ("config_curves", format!("/api/sweeps/{sweep_id}/curves")),
        ("page", "/".to_string()),
    ];
    let repeat = options.repeat.max(1);
    let mut results = serde_json::Map::new();
    for (label, path) in &requests {
        let path = path.clone();
        let timings = tokio::task::spawn_blocking(move || -> Result<Vec<(u16, Duration, usize)>> {
            (0..repeat).map(|_| get(address, &path)).collect()
        })
        .await??;
        ensure!(
            timings.iter().all(|(status, _, _)| *status == 200),
            "{label}: status {:?}",
            timings.iter().map(|t| t.0).collect::<Vec<_>>()
        );
        let mut sorted: Vec<Duration> = timings.iter().map(|t| t.1).collect();
        sorted.sort();
        results.insert(
            label.to_string(),
            json!({"first_ms": millis(timings[0].1), "median_ms": millis(sorted[sorted.len() / 2]), "all_ms": timings.iter().map(|t| millis(t.1)).collect::<Vec<_>>(), "bytes": timings[0].2}),
        );
    }
    let grpc = grpc_reads(core.clone(), &sweep_id, repeat).await?;
    let summary = json!({"tasks": options.tasks, "finished": options.finished, "epochs_each": options.epochs, "repeat": repeat, "requests": results, "grpc": grpc});
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
