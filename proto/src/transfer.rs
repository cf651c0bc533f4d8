//! Moving content-addressed blobs over gRPC streams, shared by every side that sends or stores one.
//!
//! A sender hashes the file first, then streams it in [`BLOB_CHUNK_BYTES`] chunks whose first one
//! names the hash and size. A receiver writes into a temporary file beside the destination,
//! hashing as it goes, and renames it into place only once the hash and size check out, so an
//! interrupted or corrupted transfer never leaves a partial blob visible. A sender that stalls
//! between chunks, or takes too long overall, is cut off (see [`ReceiveTimeouts`]); a temporary
//! file that a killed process left behind is found by [`is_partial_file_name`] and removed by
//! [`remove_partial_files`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};

use crate::v1::{BlobChunk, BlobRef};
use crate::BLOB_CHUNK_BYTES;

/// HTTP/2 flow-control window of one stream, set on both ends of every connection to the
/// coordinator. The defaults (1 MiB on a server, 2 MiB on a client) hold at most one
/// [`BLOB_CHUNK_BYTES`] message, so a sender stalls while the receiver hashes and writes each
/// chunk; 8 MiB keeps several chunks in flight. It also bounds what one stream may buffer.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 flow-control window of one connection (all its streams), twice a stream's so a blob
/// transfer leaves room for the connection's other calls.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 * HTTP2_STREAM_WINDOW_BYTES;

/// Largest HTTP/2 frame either end accepts. The default, 16 KiB, splits every chunk into 64
/// frames and the receiver reads the socket 8 KiB at a time; 1 MiB frames cut those system calls.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1 << 20;

/// The most bytes a dataset file's header may declare (header included, raw or once inflated),
/// so no header can make a reader expect petabytes. The coordinator's dataset check and the
/// worker's readers share it, so what one accepts the other reads.
pub const MAX_DATASET_FILE_BYTES: u64 = 8 << 30;

/// Bytes a dataset file may hold past the size its header declares (padding some writers
/// leave). A file with more, raw or once inflated, is refused: this is what stops a gzip bomb a
/// few bytes past its header's size instead of at the end of memory.
pub const DATASET_FILE_SLACK_BYTES: u64 = 64 << 10;

/// How long a receiver waits for the next chunk by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one transfer may take by default.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Time limits on receiving one blob, so that a sender that stalls mid-stream, or trickles
/// bytes, cannot hold a transfer (and its temporary file) open for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveTimeouts {
    /// The longest wait for the next chunk, the first one included.
    pub idle: Duration,
    /// The longest the whole transfer may take, from the call that receives it.
    pub total: Duration,
}

impl Default for ReceiveTimeouts {
    /// [`DEFAULT_IDLE_TIMEOUT`] between chunks, [`DEFAULT_TOTAL_TIMEOUT`] in all.
    fn default() -> Self {
        Self { idle: DEFAULT_IDLE_TIMEOUT, total: DEFAULT_TOTAL_TIMEOUT }
    }
}

/// Why a blob could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Local file trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes received do not hash to what the sender announced.
    #[error("blob content hashes to {actual}, expected {expected}")]
    HashMismatch {
        /// Announced hash.
        expected: String,
        /// Hash of what arrived.
        actual: String,
    },
    /// The sender broke the stream's rules (no header, wrong size, too large).
    #[error("bad blob stream: {0}")]
    Protocol(String),
    /// The stream itself failed, or went past a [`ReceiveTimeouts`] limit (then the status is
    /// `DEADLINE_EXCEEDED`).
    #[error("blob stream failed: {0}")]
    Stream(#[from] tonic::Status),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io { path: path.to_path_buf(), source }
}

/// True when `text` is a lowercase hex SHA-256 (64 characters), the only form a blob name takes.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for a dataset file name that is a relative path of plain components (no root, no `..`,
/// no `.`, no empty part, no backslash), so it cannot place a file outside its dataset's folder.
/// The coordinator checks it at submission and the worker again before laying a dataset out.
pub fn is_plain_relative_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Hashes a file: its SHA-256 (lowercase hex) and size.
///
/// The file is read with blocking calls on tokio's blocking pool, not through `tokio::fs` (which
/// copies every read through a buffer of its own and hops threads once per read).
pub async fn hash_file(path: &Path) -> Result<BlobRef, TransferError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || hash_file_blocking(&owned)).await;
    hashed.unwrap_or_else(|join| Err(TransferError::Io { path: path.to_path_buf(), source: std::io::Error::other(join) }))
}

fn hash_file_blocking(path: &Path) -> Result<BlobRef, TransferError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BLOB_CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(io_error(path)(error)),
        };
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok(BlobRef { sha256: hex::encode(hasher.finalize()), size })
}

/// Chunks read ahead of the gRPC stream that sends them, and chunks received ahead of the disk.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Streams a file whose hash is already known as chunks; the first chunk carries `blob`.
///
/// A blocking task reads the file ahead of the consumer (each chunk into a buffer of its own that
/// the message then owns), so the stream can be handed straight to a gRPC call. A read error ends
/// the stream early; the receiver then sees fewer bytes than announced and rejects the blob.
pub fn file_chunks(path: PathBuf, blob: BlobRef) -> impl Stream<Item = BlobChunk> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let Ok(mut file) = std::fs::File::open(&path) else {
            return;
        };
        let mut header = Some(blob);
        loop {
            let Ok(data) = read_chunk(&mut file) else {
                return;
            };
            let last = data.len() < BLOB_CHUNK_BYTES;
            let chunk = match header.take() {
                Some(blob) => BlobChunk { sha256: blob.sha256, size: blob.size, data: data.into() },
                None if data.is_empty() => return,
                None => BlobChunk { data: data.into(), ..BlobChunk::default() },
            };
            if sender.blocking_send(chunk).is_err() || last {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// Reads up to [`BLOB_CHUNK_BYTES`] (fewer only at the end of the file) into a new buffer.
fn read_chunk(file: &mut std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(BLOB_CHUNK_BYTES);
    file.take(BLOB_CHUNK_BYTES as u64).read_to_end(&mut data)?;
    Ok(data)
}

/// Receives a chunk stream into `destination`, verifying hash and size before it appears there,
/// within the [`ReceiveTimeouts::default`] limits (see [`receive_to_file_within`]).
///
/// `expected` pins the hash the caller wants (a download); otherwise the first chunk's announced
/// hash is verified (an upload). At most `max_size` bytes are accepted. The temporary file lives in
/// `destination`'s folder and is removed on any failure.
pub async fn receive_to_file<S>(stream: S, destination: &Path, expected: Option<&str>, max_size: u64) -> Result<BlobRef, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    receive_to_file_within(stream, destination, expected, max_size, ReceiveTimeouts::default()).await
}

/// [`receive_to_file`] with explicit time limits: the transfer fails with
/// [`TransferError::Stream`] (status `DEADLINE_EXCEEDED`) when no chunk arrives for
/// `timeouts.idle`, or when it is still going `timeouts.total` after this call, and its
/// temporary file is removed as on any other failure.
pub async fn receive_to_file_within<S>(
    mut stream: S,
    destination: &Path,
    expected: Option<&str>,
    max_size: u64,
    timeouts: ReceiveTimeouts,
) -> Result<BlobRef, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let mut paced = Paced { stream: &mut stream, timeouts, deadline: Instant::now().checked_add(timeouts.total) };
    let folder = destination.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(folder).await.map_err(io_error(folder))?;
    let temp = tempfile_path(destination);
    let result = receive_inner(&mut paced, &temp, expected, max_size).await;
    match result {
        Ok(blob) => {
            tokio::fs::rename(&temp, destination).await.map_err(io_error(destination))?;
            Ok(blob)
        }
        Err(error) => {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(error)
        }
    }
}

/// A chunk stream read under [`ReceiveTimeouts`].
struct Paced<'a, S> {
    stream: &'a mut S,
    timeouts: ReceiveTimeouts,
    /// When the whole transfer must be done; `None` when that lies past what `Instant` holds.
    deadline: Option<Instant>,
}

impl<S> Paced<'_, S>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    /// The next chunk, `None` at the end of the stream, or a `DEADLINE_EXCEEDED` stream error
    /// when the idle or the total limit runs out first.
    async fn next(&mut self) -> Result<Option<BlobChunk>, TransferError> {
        let idle_end = Instant::now().checked_add(self.timeouts.idle);
        let (end, total_first) = match (idle_end, self.deadline) {
            (Some(idle_end), Some(deadline)) if deadline <= idle_end => (deadline, true),
            (None, Some(deadline)) => (deadline, true),
            (Some(idle_end), _) => (idle_end, false),
            // Both limits lie past what `Instant` holds: there is nothing to wait for.
            (None, None) => return Ok(self.stream.next().await.transpose()?),
        };
        match tokio::time::timeout_at(end, self.stream.next()).await {
            Ok(chunk) => Ok(chunk.transpose()?),
            Err(_) if total_first => Err(TransferError::Stream(tonic::Status::deadline_exceeded(format!(
                "the transfer took longer than its limit of {:?}",
                self.timeouts.total
            )))),
            Err(_) => Err(TransferError::Stream(tonic::Status::deadline_exceeded(format!(
                "no data for {:?}, the limit between chunks",
                self.timeouts.idle
            )))),
        }
    }
}

/// The suffix of every temporary file a receiver writes.
const PARTIAL_SUFFIX: &str = ".partial";

fn tempfile_path(destination: &Path) -> PathBuf {
    let name = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    destination.with_file_name(format!(".{name}.{}.{unique}{PARTIAL_SUFFIX}", std::process::id()))
}

/// True for the name of a receiver's temporary file (`.NAME.PID.NANOS.partial`), which only a
/// transfer in progress, or one killed mid-way, leaves in a folder.
pub fn is_partial_file_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX) && name.len() > 1 + PARTIAL_SUFFIX.len()
}

/// Removes the temporary files ([`is_partial_file_name`]) directly in `folder` that a killed
/// receiver left behind; returns how many it removed. A missing folder holds none.
///
/// Call it only while no transfer into `folder` runs (at start-up): it cannot tell a live
/// transfer's file from a dead one's.
pub fn remove_partial_files(folder: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let is_partial = entry.file_name().to_str().is_some_and(is_partial_file_name);
        if !is_partial || !entry.file_type()?.is_file() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(removed)
}

async fn receive_inner<S>(stream: &mut Paced<'_, S>, temp: &Path, expected: Option<&str>, max_size: u64) -> Result<BlobRef, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let first = stream.next().await?.ok_or_else(|| TransferError::Protocol("empty stream".into()))?;
    let announced = BlobRef { sha256: first.sha256.clone(), size: first.size };
    if !is_sha256_hex(&announced.sha256) {
        return Err(TransferError::Protocol(format!("first chunk names no valid sha256: {:?}", announced.sha256)));
    }
    if let Some(expected) = expected {
        if announced.sha256 != expected {
            return Err(TransferError::HashMismatch { expected: expected.to_string(), actual: announced.sha256 });
        }
    }
    if announced.size > max_size {
        return Err(TransferError::Protocol(format!("blob of {} bytes exceeds the limit of {max_size}", announced.size)));
    }
    // Hashing and writing run on a blocking thread while this task takes in the next chunks.
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let writer_path = temp.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || hash_and_write(&writer_path, receiver));
    let received = forward_chunks(stream, first, announced.size, &sender).await;
    if matches!(received, Ok(size) if size == announced.size) {
        // The writer may have stopped on an error of its own; that error is reported below.
        let _ = sender.send(ToWriter::Finish).await;
    }
    drop(sender);
    // The writer is always awaited, so the file is closed before the caller may remove it.
    let written = writer.await.unwrap_or_else(|join| Err(io_error(temp)(std::io::Error::other(join))));
    // A disk error comes first: it is why the writer stopped taking chunks.
    let written = written?;
    let received = received?;
    if received != announced.size {
        return Err(TransferError::Protocol(format!("received {received} of {} announced bytes", announced.size)));
    }
    let actual = written.ok_or_else(|| TransferError::Protocol("the blob writer stopped early".into()))?;
    if actual != announced.sha256 {
        return Err(TransferError::HashMismatch { expected: announced.sha256, actual });
    }
    Ok(announced)
}

/// What the receiving task hands the blocking writer.
enum ToWriter {
    /// The next bytes of the blob.
    Data(prost::bytes::Bytes),
    /// Every byte arrived: sync the file and report its hash.
    Finish,
}

/// Hands each chunk's bytes to the writer until the stream ends; returns the bytes received.
/// Stops at the first stream error, at more bytes than `announced_size`, or when the writer
/// has stopped (the caller then reports the writer's own error).
async fn forward_chunks<S>(
    stream: &mut Paced<'_, S>,
    first: BlobChunk,
    announced_size: u64,
    writer: &tokio::sync::mpsc::Sender<ToWriter>,
) -> Result<u64, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let mut received = 0u64;
    let mut chunk = Some(first);
    while let Some(current) = chunk {
        received += current.data.len() as u64;
        if received > announced_size {
            return Err(TransferError::Protocol(format!("more than the announced {announced_size} bytes")));
        }
        if !current.data.is_empty() && writer.send(ToWriter::Data(current.data)).await.is_err() {
            return Ok(received);
        }
        chunk = stream.next().await?;
    }
    Ok(received)
}

/// Creates `path`, then hashes and writes every buffer received until told to finish, when it
/// fsyncs the file and returns the hash (lowercase hex). Returns `None`, without syncing, when
/// the receiving task gives up first.
fn hash_and_write(path: &Path, mut chunks: tokio::sync::mpsc::Receiver<ToWriter>) -> Result<Option<String>, TransferError> {
    let mut file = std::fs::File::create(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    while let Some(message) = chunks.blocking_recv() {
        match message {
            ToWriter::Data(data) => {
                hasher.update(&data);
                file.write_all(&data).map_err(io_error(path))?;
            }
            ToWriter::Finish => {
                file.sync_all().map_err(io_error(path))?;
                return Ok(Some(hex::encode(hasher.finalize())));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn chunks_of(path: &Path) -> (BlobRef, Vec<Result<BlobChunk, tonic::Status>>) {
        let blob = hash_file(path).await.unwrap();
        let chunks: Vec<_> = file_chunks(path.to_path_buf(), blob.clone()).map(Ok).collect().await;
        (blob, chunks)
    }

    #[tokio::test]
    async fn round_trips_empty_small_and_multi_chunk_files() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0usize, 1, BLOB_CHUNK_BYTES, BLOB_CHUNK_BYTES * 2 + 17] {
            let source = dir.path().join(format!("src-{size}"));
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&source, &bytes).unwrap();
            let (blob, chunks) = chunks_of(&source).await;
            assert_eq!(blob.size, size as u64);
            assert!(chunks.len() <= size / BLOB_CHUNK_BYTES + 1, "{size}: {} chunks", chunks.len());
            let dest = dir.path().join(format!("dst-{size}"));
            let got = receive_to_file(tokio_stream::iter(chunks), &dest, Some(&blob.sha256), u64::MAX).await.unwrap();
            assert_eq!(got, blob);
            assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        }
    }

    #[tokio::test]
    async fn corrupted_or_truncated_streams_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, vec![7u8; 5000]).unwrap();
        let (blob, chunks) = chunks_of(&source).await;

        let mut corrupted = chunks.iter().map(|c| c.as_ref().unwrap().clone()).collect::<Vec<_>>();
        let mut flipped = corrupted[0].data.to_vec();
        flipped[10] ^= 1;
        corrupted[0].data = flipped.into();
        let dest = dir.path().join("dst");
        let err = receive_to_file(tokio_stream::iter(corrupted.into_iter().map(Ok)), &dest, None, u64::MAX).await.unwrap_err();
        assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");

        let mut truncated = chunks.iter().map(|c| c.as_ref().unwrap().clone()).collect::<Vec<_>>();
        truncated[0].data.truncate(100);
        let err = receive_to_file(tokio_stream::iter(truncated.into_iter().map(Ok)), &dest, None, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("received 100 of 5000"), "{err}");

        let failing = vec![Ok(chunks[0].as_ref().unwrap().clone()), Err(tonic::Status::aborted("cut"))];
        let err = receive_to_file(tokio_stream::iter(failing), &dest, None, u64::MAX).await.unwrap_err();
        assert!(matches!(err, TransferError::Stream(_)), "{err}");

        let err = receive_to_file(tokio_stream::iter(chunks.clone()), &dest, None, 10).await.unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");

        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "only the source remains: {leftovers:?}");
        assert!(!dest.exists());
        let other = "0".repeat(64);
        let err = receive_to_file(tokio_stream::iter(chunks), &dest, Some(&other), u64::MAX).await.unwrap_err();
        assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");
        let _ = blob;
    }

    /// The names of the entries of `folder`, sorted.
    fn names_in(folder: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_stream_that_stalls_mid_way_is_cut_off_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, vec![3u8; BLOB_CHUNK_BYTES + 10]).unwrap();
        let (_, chunks) = chunks_of(&source).await;
        assert_eq!(chunks.len(), 2);
        // The first chunk arrives, then the sender goes silent without closing the stream.
        let stalled = tokio_stream::iter(chunks[..1].to_vec()).chain(tokio_stream::pending());
        let dest = dir.path().join("dst");
        let timeouts = ReceiveTimeouts { idle: Duration::from_millis(50), total: Duration::from_secs(60) };
        let started = std::time::Instant::now();
        let err = receive_to_file_within(stalled, &dest, None, u64::MAX, timeouts).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "cut off by the idle limit, not the total one");
        let TransferError::Stream(status) = &err else { panic!("{err}") };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(err.to_string().contains("no data for 50ms, the limit between chunks"), "{err}");
        assert_eq!(names_in(dir.path()), ["src"], "no partial file is left");

        // A sender that never sends its first chunk is cut off alike.
        let silent = tokio_stream::pending::<Result<BlobChunk, tonic::Status>>();
        let err = receive_to_file_within(silent, &dest, None, u64::MAX, timeouts).await.unwrap_err();
        assert!(err.to_string().contains("no data for 50ms"), "{err}");
    }

    #[tokio::test]
    async fn a_trickling_stream_is_cut_off_at_the_total_limit() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, vec![5u8; 3000]).unwrap();
        let (blob, chunks) = chunks_of(&source).await;
        let mut chunk = chunks[0].as_ref().unwrap().clone();
        let data = chunk.data.clone();
        chunk.data = data.slice(..1);
        // One byte every 20 ms: never idle for 1 s, but 3000 bytes would take a minute.
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let trickle = tokio::spawn(async move {
            let _ = sender.send(Ok(chunk)).await;
            for index in 1..data.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if sender.send(Ok(BlobChunk { data: data.slice(index..index + 1), ..BlobChunk::default() })).await.is_err() {
                    return;
                }
            }
        });
        let dest = dir.path().join("dst");
        let timeouts = ReceiveTimeouts { idle: Duration::from_secs(1), total: Duration::from_millis(200) };
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let err = receive_to_file_within(stream, &dest, Some(&blob.sha256), u64::MAX, timeouts).await.unwrap_err();
        let TransferError::Stream(status) = &err else { panic!("{err}") };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(err.to_string().contains("the transfer took longer than its limit of 200ms"), "{err}");
        assert_eq!(names_in(dir.path()), ["src"], "no partial file is left");
        trickle.await.unwrap();
    }

    #[test]
    fn default_timeouts_are_30_seconds_idle_and_an_hour_in_all() {
        assert_eq!(ReceiveTimeouts::default(), ReceiveTimeouts { idle: Duration::from_secs(30), total: Duration::from_secs(3600) });
    }

    #[test]
    fn partial_files_left_by_a_killed_receiver_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let hash = "ab".repeat(32);
        let partial = tempfile_path(&dir.path().join(&hash));
        assert!(is_partial_file_name(&partial.file_name().unwrap().to_string_lossy()));
        std::fs::write(&partial, b"half a blob").unwrap();
        std::fs::write(dir.path().join(&hash), b"a whole blob").unwrap();
        std::fs::write(dir.path().join("notes.partial"), b"not hidden: not ours").unwrap();
        std::fs::create_dir(dir.path().join(".folder.partial")).unwrap();
        assert_eq!(remove_partial_files(dir.path()).unwrap(), 1);
        assert_eq!(names_in(dir.path()), [".folder.partial".to_string(), hash, "notes.partial".to_string()]);
        assert_eq!(remove_partial_files(dir.path()).unwrap(), 0);
        assert_eq!(remove_partial_files(&dir.path().join("missing")).unwrap(), 0);
        for name in [".partial", "x.partial", ".x.part", ""] {
            assert!(!is_partial_file_name(name), "{name:?}");
        }
    }
}
