//! Benchmark: checkpoint and dataset transfer through the coordinator against a disk copy.
//!
//! Starts the real `coordinator serve` binary as a separate process on a temporary data dir and a
//! loopback port, with bearer tokens on (a client token and a worker token, as a user runs it).
//! Then, for each file of random bytes, after one untimed round, it times in alternation:
//!
//! - the anchors: a read+write copy loop (1 MiB buffer) and `std::fs::copy` (on Linux an in-kernel
//!   `copy_file_range`) of the same file into the same folder, each ending with an fsync;
//! - an upload through the coordinator in each of its three forms, back to back: one pass,
//!   `UploadBlob` of `transfer::file_chunks_checksum_at_end` (the CRC-32 last, the coordinator
//!   naming the blob by the SHA-256 it computes), as the worker sends a checkpoint and
//!   `coordinator submit` a dataset file its hash cache does not know; and, as the two "befores"
//!   beside it, `transfer::file_chunks_hash_at_end` (hashed while sent, the hash last) and a hash
//!   pass (`transfer::hash_file`) then `UploadBlob` of `transfer::file_chunks`. The coordinator
//!   hashes and checks what it receives and fsyncs the blob before it answers;
//! - a download with the same calls as the worker's blob cache and `coordinator download`:
//!   `FetchBlob`/`DownloadBlob` into `transfer::receive_to_file`, which hashes, verifies and fsyncs.
//!
//! The dataset-sized file goes up through the client service (as `coordinator submit` sends a
//! dataset) and down through the worker service (as a worker fetches it); the checkpoint-sized
//! file goes up through the worker service and down through the client service. Every read comes
//! from the page cache (each file was just written) and every write is fsynced, on both sides.
//! Before each timed step that writes a file, an untimed scratch file of the same size is written
//! and deleted ([`recycle_pages`]), so that every step writes into pages the system just freed.
//! Without it the download, the one step that must grow the page cache (the source, the stored
//! blob and the download are resident together), pays alone for bringing fresh pages into use,
//! which on a virtual machine whose host takes freed memory back costs more than the copy itself.
//!
//! Prints one JSON line: per file, the median MB/s (10^6 bytes per second) of each measurement,
//! the hash pass alone, and the CPU seconds per GB that the uploads in their two one-pass forms,
//! the downloads (this process and the coordinator together) and the copy loop took.
//! Each repetition's figures go to stderr as it ends.
//!
//! Run: `make bench-transfer`, or
//! `target/release/examples/bench_transfer [--sizes-mib 64,256] [--repetitions 5]`.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cohort_proto::auth::{BearerToken, ConnectOptions};
use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use cohort_proto::v1::client_service_client::ClientServiceClient;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use common::{cpu_seconds, CoordinatorProcess};
use rand::RngCore;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The message limit the users' commands and the worker set on their clients.
const CLIENT_MESSAGE_LIMIT: usize = 64 << 20;
/// Buffer of the read+write copy anchor (the transfer's chunk size).
const COPY_BUFFER_BYTES: usize = cohort_proto::BLOB_CHUNK_BYTES;

type Client = ClientServiceClient<InterceptedService<Channel, BearerToken>>;
type Worker = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

#[derive(Debug, Parser)]
struct Args {
    /// The coordinator binary (default: `coordinator` beside this example's folder).
    #[arg(long)]
    coordinator_binary: Option<PathBuf>,
    /// File sizes in MiB; the first is the checkpoint-like file, the others dataset-like.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256])]
    sizes_mib: Vec<u64>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Parent of the temporary folder holding the files and the coordinator's data dir.
    #[arg(long)]
    temp_root: Option<PathBuf>,
    /// Do not write and delete a scratch file before each timed step (see the module's notes).
    #[arg(long)]
    no_page_recycling: bool,
}

/// The coordinator under test and its data dir.
struct Coordinator {
    process: CoordinatorProcess,
    data_dir: PathBuf,
}

impl Coordinator {
    /// Starts `binary serve` in `dir` with a client and a worker token, and waits until it listens.
    fn start(binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::write(dir.join("client.token"), "bench-client-token\n")?;
        std::fs::write(dir.join("worker.token"), "bench-worker-token\n")?;
        let data_dir = dir.join("coordinator");
        let args: Vec<OsString> = vec![
            "--data-dir".into(),
            data_dir.clone().into(),
            "--token-file".into(),
            dir.join("client.token").into(),
            "--worker-token-file".into(),
            dir.join("worker.token").into(),
        ];
        let process = CoordinatorProcess::start(binary, &args, &dir.join("coordinator.log"))?;
        Ok(Self { process, data_dir })
    }

    fn connect_options(&self, token_file: PathBuf) -> ConnectOptions {
        ConnectOptions { url: self.process.url(), token_file: Some(token_file), tls_ca: None }
    }

    /// Where the coordinator stores blob `sha256` (`DATA_DIR/blobs/ab/abcdef…`).
    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.data_dir.join("blobs").join(&sha256[..2]).join(sha256)
    }
}

/// A client of the client service, connected as `coordinator`'s commands connect.
async fn client(options: &ConnectOptions) -> anyhow::Result<Client> {
    let channel = options.endpoint()?.connect().await?;
    let token = BearerToken::from_file(options.token_file.as_deref())?;
    Ok(ClientServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
        .max_encoding_message_size(CLIENT_MESSAGE_LIMIT))
}

/// A client of the worker service, connected as the worker daemon connects.
async fn worker(options: &ConnectOptions) -> anyhow::Result<Worker> {
    let channel = options.endpoint()?.connect().await?;
    let token = BearerToken::from_file(options.token_file.as_deref())?;
    Ok(WorkerServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
        .max_encoding_message_size(CLIENT_MESSAGE_LIMIT))
}

/// Which service a file moves through in each direction.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Up as `coordinator submit` sends a dataset, down as a worker fetches it.
    Dataset,
    /// Up as a worker sends a checkpoint, down as `coordinator download` fetches it.
    Checkpoint,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Dataset => "dataset",
            Route::Checkpoint => "checkpoint",
        }
    }
}

/// How an upload names its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// A hash pass over the file, then the stream with the hash in its first chunk: how both
    /// `coordinator submit` and the worker sent files before (timed as the "before").
    HashFirst,
    /// One pass: the file hashed while it is sent, the hash in the stream's last chunk: how both
    /// sent files before checksums.
    HashAtEnd,
    /// One pass ending with the file's CRC-32, the coordinator naming the blob: how the worker
    /// sends checkpoints and artifacts, and `coordinator submit` a file its hash cache does not
    /// know (one it knows and the coordinator holds is not sent at all).
    ChecksumAtEnd,
}

/// Uploads `path` in `form` through the route's service, as the users' commands and the worker
/// do; returns its ref.
async fn upload(route: Route, form: Form, client: &mut Client, worker: &mut Worker, path: &Path) -> anyhow::Result<pb::BlobRef> {
    let chunks: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = pb::BlobChunk> + Send>> = match form {
        Form::HashFirst => {
            let blob = transfer::hash_file(path).await?;
            Box::pin(transfer::file_chunks(path.to_path_buf(), blob))
        }
        Form::HashAtEnd => Box::pin(transfer::file_chunks_hash_at_end(path.to_path_buf())),
        Form::ChecksumAtEnd => Box::pin(transfer::file_chunks_checksum_at_end(path.to_path_buf())),
    };
    let response = match route {
        Route::Dataset => client.upload_blob(chunks).await?.into_inner(),
        Route::Checkpoint => worker.upload_blob(chunks).await?.into_inner(),
    };
    let blob = response.blob.context("an upload answered without its blob")?;
    if response.already_present {
        bail!("the coordinator already held {}: the upload was not timed", blob.sha256);
    }
    Ok(blob)
}

/// Downloads `blob` into `destination`, verified, as the worker's cache and `coordinator download` do.
async fn download(route: Route, client: &mut Client, worker: &mut Worker, blob: &pb::BlobRef, destination: &Path) -> anyhow::Result<()> {
    let request = pb::FetchBlobRequest { sha256: blob.sha256.clone() };
    let received = match route {
        Route::Dataset => {
            let stream = worker.fetch_blob(request).await?.into_inner();
            transfer::receive_to_file(stream, destination, Some(&blob.sha256), blob.size).await?
        }
        Route::Checkpoint => {
            let stream = client.download_blob(request).await?.into_inner();
            transfer::receive_to_file(stream, destination, Some(&blob.sha256), u64::MAX).await?
        }
    };
    if received != *blob {
        bail!("downloaded {received:?}, expected {blob:?}");
    }
    Ok(())
}

/// Copies `source` to `destination` with a read+write loop, then fsyncs it.
fn copy_loop(source: &Path, destination: &Path) -> std::io::Result<()> {
    let mut input = std::fs::File::open(source)?;
    let mut output = std::fs::File::create(destination)?;
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let read = input.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        output.write_all(&buffer[..read])?;
    }
    output.sync_all()
}

/// Copies `source` to `destination` with `std::fs::copy`, then fsyncs it.
fn fs_copy(source: &Path, destination: &Path) -> std::io::Result<()> {
    std::fs::copy(source, destination)?;
    std::fs::File::open(destination)?.sync_all()
}

/// Writes and deletes an untimed scratch file of `bytes` in `folder`, so that the timed step after
/// it writes into page-cache pages the system has just freed, as every other step does (see the
/// module's notes).
fn recycle_pages(folder: &Path, bytes: u64) -> std::io::Result<()> {
    let path = folder.join("recycle.scratch");
    let mut output = std::fs::File::create(&path)?;
    let buffer = vec![0x5au8; COPY_BUFFER_BYTES];
    let mut left = bytes;
    while left > 0 {
        let now = left.min(buffer.len() as u64) as usize;
        output.write_all(&buffer[..now])?;
        left -= now as u64;
    }
    drop(output);
    std::fs::remove_file(&path)
}

/// Writes `bytes` random bytes to `path`, fsynced.
fn write_random_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut output = std::fs::File::create(path)?;
    let mut rng = rand::thread_rng();
    let mut buffer = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let now = left.min(buffer.len() as u64) as usize;
        rng.fill_bytes(&mut buffer[..now]);
        output.write_all(&buffer[..now])?;
        left -= now as u64;
    }
    output.sync_all()
}

/// CPU seconds used by this process and the coordinator together.
fn cpu_both(coordinator: &Coordinator) -> anyhow::Result<f64> {
    Ok(cpu_seconds("self")? + cpu_seconds(&coordinator.process.pid().to_string())?)
}

fn megabytes_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// One round's figures for one file: MB/s of each measurement, CPU seconds of some.
#[derive(Debug, Default)]
struct Round {
    copy_loop: f64,
    fs_copy: f64,
    hash: f64,
    upload: f64,
    upload_hash_first: f64,
    upload_hash_at_end: f64,
    download: f64,
    copy_loop_cpu_seconds: f64,
    upload_cpu_seconds: f64,
    upload_hash_at_end_cpu_seconds: f64,
    download_cpu_seconds: f64,
}

/// Where one file's copies, download and stored blob go, and the clients that move it.
struct Bench<'a> {
    coordinator: &'a Coordinator,
    client: &'a mut Client,
    worker: &'a mut Worker,
    folder: &'a Path,
    recycle: bool,
}

impl Bench<'_> {
    /// [`recycle_pages`] before a timed step writing `bytes`, unless turned off.
    fn before_write(&self, bytes: u64) -> std::io::Result<()> {
        if self.recycle {
            recycle_pages(self.folder, bytes)?;
        }
        Ok(())
    }

    /// Copies, hashes, uploads and downloads `source` once, timing each, and removes what it made.
    /// The upload forms go in a different order in each `repetition`, so that none always comes
    /// first or last after the copies.
    async fn round(&mut self, route: Route, source: &Path, repetition: usize) -> anyhow::Result<Round> {
        let bytes = std::fs::metadata(source)?.len();
        let copy = self.folder.join(format!("{}.copy", route.label()));
        let downloaded = self.folder.join(format!("{}.downloaded", route.label()));
        let mut round = Round::default();

        self.before_write(bytes)?;
        let cpu_before = cpu_seconds("self")?;
        let started = Instant::now();
        copy_loop(source, &copy)?;
        round.copy_loop = megabytes_per_second(bytes, started.elapsed());
        round.copy_loop_cpu_seconds = cpu_seconds("self")? - cpu_before;
        std::fs::remove_file(&copy)?;

        self.before_write(bytes)?;
        let started = Instant::now();
        fs_copy(source, &copy)?;
        round.fs_copy = megabytes_per_second(bytes, started.elapsed());
        std::fs::remove_file(&copy)?;

        let started = Instant::now();
        transfer::hash_file(source).await?;
        round.hash = megabytes_per_second(bytes, started.elapsed());

        // The three forms of the upload, back to back (the stored blob removed in between); the
        // clients' form now, the checksum at the end, is the one reported as `upload`.
        let mut stored: Option<pb::BlobRef> = None;
        let mut forms = [Form::HashFirst, Form::HashAtEnd, Form::ChecksumAtEnd];
        let turns = repetition % forms.len();
        forms.rotate_left(turns);
        for form in forms {
            if let Some(blob) = &stored {
                std::fs::remove_file(self.coordinator.blob_path(&blob.sha256))?;
            }
            self.before_write(bytes)?;
            let cpu_before = cpu_both(self.coordinator)?;
            let started = Instant::now();
            let blob = upload(route, form, self.client, self.worker, source)
                .await
                .with_context(|| format!("uploading the {} file", route.label()))?;
            let rate = megabytes_per_second(bytes, started.elapsed());
            let cpu = cpu_both(self.coordinator)? - cpu_before;
            match form {
                Form::HashFirst => round.upload_hash_first = rate,
                Form::HashAtEnd => (round.upload_hash_at_end, round.upload_hash_at_end_cpu_seconds) = (rate, cpu),
                Form::ChecksumAtEnd => (round.upload, round.upload_cpu_seconds) = (rate, cpu),
            }
            if stored.as_ref().is_some_and(|previous| *previous != blob) {
                bail!("the {} file was stored as {blob:?} in one form, {stored:?} in another", route.label());
            }
            stored = Some(blob);
        }
        let blob = stored.expect("uploaded");

        self.before_write(bytes)?;
        let cpu_before = cpu_both(self.coordinator)?;
        let started = Instant::now();
        download(route, self.client, self.worker, &blob, &downloaded)
            .await
            .with_context(|| format!("downloading the {} file", route.label()))?;
        round.download = megabytes_per_second(bytes, started.elapsed());
        round.download_cpu_seconds = cpu_both(self.coordinator)? - cpu_before;

        std::fs::remove_file(&downloaded)?;
        // The next upload must store the blob again rather than find it present.
        std::fs::remove_file(self.coordinator.blob_path(&blob.sha256))?;
        Ok(round)
    }

    /// Runs one untimed round (it connects the streams, starts the blocking threads and brings
    /// page cache pages into use, for every measurement alike), then `repetitions` timed ones;
    /// returns the timed ones.
    async fn measure(&mut self, route: Route, source: &Path, repetitions: usize) -> anyhow::Result<Vec<Round>> {
        let mut rounds = Vec::with_capacity(repetitions);
        for repetition in 0..=repetitions {
            let round = self.round(route, source, repetition).await?;
            let label = if repetition == 0 { "warm-up".to_string() } else { format!("repetition {repetition}") };
            eprintln!(
                "  {label}: copy {:.0}, std::fs::copy {:.0}, upload {:.0} (hash at end {:.0}, hash first {:.0}), download {:.0} MB/s",
                round.copy_loop, round.fs_copy, round.upload, round.upload_hash_at_end, round.upload_hash_first, round.download
            );
            if repetition > 0 {
                rounds.push(round);
            }
        }
        Ok(rounds)
    }
}

/// The median of `figure` over `rounds`.
fn median_of(rounds: &[Round], figure: impl Fn(&Round) -> f64) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// CPU seconds per GB moved: `figure` summed over `rounds`, over their bytes.
fn cpu_per_gigabyte(rounds: &[Round], bytes: u64, figure: impl Fn(&Round) -> f64) -> f64 {
    rounds.iter().map(figure).sum::<f64>() / (bytes as f64 * rounds.len() as f64 / 1e9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // As the clients it stands for: `coordinator submit` and `download` keep their transfer
    // buffers this way, and the worker keeps more (its training settings).
    if !cohort_proto::transfer::allocator::keep_transfer_buffers() {
        bail!("glibc refused the transfer buffers' malloc settings");
    }
    let args = Args::parse();
    if args.sizes_mib.is_empty() || args.repetitions == 0 {
        bail!("need at least one size and one repetition");
    }
    let binary = common::coordinator_binary(args.coordinator_binary.as_deref())?;
    let temp_root = args.temp_root.unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new().prefix("cohort-bench-transfer-").tempdir_in(&temp_root)?;
    let coordinator = Coordinator::start(&binary, dir.path())?;
    let mut client = client(&coordinator.connect_options(dir.path().join("client.token"))).await?;
    let mut worker = worker(&coordinator.connect_options(dir.path().join("worker.token"))).await?;

    let mut bench =
        Bench { coordinator: &coordinator, client: &mut client, worker: &mut worker, folder: dir.path(), recycle: !args.no_page_recycling };
    let mut files = Vec::new();
    for (index, &mib) in args.sizes_mib.iter().enumerate() {
        let route = if index == 0 { Route::Checkpoint } else { Route::Dataset };
        let bytes = mib << 20;
        let source = dir.path().join(format!("{}-{mib}MiB.bin", route.label()));
        write_random_file(&source, bytes)?;
        eprintln!("{} file, {mib} MiB: {} repetitions", route.label(), args.repetitions);
        let rounds = bench.measure(route, &source, args.repetitions).await?;
        std::fs::remove_file(&source)?;
        files.push(serde_json::json!({
            "kind": route.label(),
            "mib": mib,
            "copy_loop_mb_s": median_of(&rounds, |r| r.copy_loop),
            "fs_copy_mb_s": median_of(&rounds, |r| r.fs_copy),
            "hash_mb_s": median_of(&rounds, |r| r.hash),
            "upload_mb_s": median_of(&rounds, |r| r.upload),
            "upload_hash_first_mb_s": median_of(&rounds, |r| r.upload_hash_first),
            "upload_hash_at_end_mb_s": median_of(&rounds, |r| r.upload_hash_at_end),
            "download_mb_s": median_of(&rounds, |r| r.download),
            "copy_loop_cpu_s_per_gb": cpu_per_gigabyte(&rounds, bytes, |r| r.copy_loop_cpu_seconds),
            "upload_cpu_s_per_gb": cpu_per_gigabyte(&rounds, bytes, |r| r.upload_cpu_seconds),
            "upload_hash_at_end_cpu_s_per_gb": cpu_per_gigabyte(&rounds, bytes, |r| r.upload_hash_at_end_cpu_seconds),
            "download_cpu_s_per_gb": cpu_per_gigabyte(&rounds, bytes, |r| r.download_cpu_seconds),
        }));
    }
    drop(coordinator);
    dir.close()?;
    let summary = serde_json::json!({
        "repetitions": args.repetitions,
        "auth": true,
        "tls": false,
        "page_recycling": !args.no_page_recycling,
        "files": files,
    });
    println!("{summary}");
    Ok(())
}
