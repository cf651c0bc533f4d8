//! Moving content-addressed blobs over gRPC streams, shared by every side that sends or stores one.
//!
//! A stream of [`BLOB_CHUNK_BYTES`] chunks carries a blob in one of three forms. Named up front
//! ([`file_chunks`]): the sender knows the hash before sending, and the first chunk names the
//! hash and size (what a stored blob's download does). Named at the end: the first chunk names
//! only the size (its `sha256` left empty) and a last chunk without data names what the sender
//! computed while it sent ([`StreamEnd`]): the SHA-256 ([`file_chunks_hash_at_end`]), or only
//! the CRC-32 of the bytes ([`file_chunks_checksum_at_end`], how the worker and `submit` upload),
//! in which case the receiver names the blob by the SHA-256 it computes itself.
//!
//! The receiver hashes every byte it takes, whatever the form, because a sender may lie about a
//! blob's name. A sender's SHA-256 therefore only guards the way between the two against
//! accidental damage, which a CRC-32 does for an eighth of the CPU; on a host that runs both
//! ends, that CPU is what limits an upload.
//!
//! A receiver writes into a hidden temporary file, hashing as it goes, and the blob becomes
//! visible only once the hash, checksum and size check out: renamed into place by
//! [`receive_to_file`], or by [`VerifiedBlob::persist`] once the hash, and with it the blob's
//! name, is known ([`receive_verified_within`]). An interrupted or corrupted transfer never
//! leaves a partial blob visible, and a stream whose bytes do not match what it names is
//! refused. A sender that stalls between chunks, or takes too long overall, is cut off (see
//! [`ReceiveTimeouts`]); a temporary file that a killed process left behind is found by
//! [`is_partial_file_name`] and removed by [`remove_partial_files`].
//!
//! SHA-256 is the costliest step on either side, so it runs on a thread of its own, beside the
//! thread that reads the file (sending) or writes it (receiving): the two overlap instead of
//! taking turns on each chunk, and they share each chunk's buffer rather than copying it. A
//! receiver starts the disk's writeback every [`WRITEBACK_BYTES`] as it writes, so that the
//! fsync before the blob is renamed into place waits for the last few megabytes, not all of them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};

use crate::v1::{BlobChunk, BlobRef};
use crate::BLOB_CHUNK_BYTES;

pub mod allocator;

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
    /// The bytes received do not match the CRC-32 the stream ended with: damaged on the way.
    #[error("blob content has CRC-32 {actual:08x}, the sender sent {expected:08x}")]
    ChecksumMismatch {
        /// The sender's CRC-32.
        expected: u32,
        /// CRC-32 of what arrived.
        actual: u32,
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

/// How many bytes a receiver writes between two starts of the disk's writeback (Linux's
/// `sync_file_range`; elsewhere the final fsync does it all).
pub const WRITEBACK_BYTES: u64 = 8 << 20;

/// What a reading or receiving task hands the threads that hash and write a blob's bytes.
enum Piece {
    /// The next bytes (shared, not copied, between the hashing and the writing thread).
    Data(prost::bytes::Bytes),
    /// Every byte arrived: hash it all, or sync the file.
    End,
}

/// What a hashing thread computed over every byte it was handed.
struct Digests {
    /// SHA-256, lowercase hex.
    sha256: String,
    /// CRC-32, when it was asked for.
    crc32: Option<u32>,
}

/// Starts a thread hashing every [`Piece::Data`] it is handed (and, `with_crc32`, taking its
/// CRC-32 in the same pass); it returns the digests after [`Piece::End`], or `None` when its
/// sender goes away first.
fn start_hasher(with_crc32: bool) -> (tokio::sync::mpsc::Sender<Piece>, tokio::task::JoinHandle<Option<Digests>>) {
    let (sender, mut pieces) = tokio::sync::mpsc::channel::<Piece>(CHUNKS_IN_FLIGHT);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut checksum = with_crc32.then(crc32fast::Hasher::new);
        while let Some(piece) = pieces.blocking_recv() {
            match piece {
                Piece::Data(data) => {
                    if let Some(checksum) = checksum.as_mut() {
                        checksum.update(&data);
                    }
                    hasher.update(&data);
                }
                Piece::End => return Some(Digests { sha256: hex::encode(hasher.finalize()), crc32: checksum.map(|c| c.finalize()) }),
            }
        }
        None
    });
    (sender, hasher)
}

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
                Some(blob) => BlobChunk { sha256: blob.sha256, size: blob.size, data: data.into(), crc32: None },
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

/// What the last chunk of a stream named at the end names (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The SHA-256 of the bytes, hashed while they were read: the sender names the blob.
    Hash,
    /// The CRC-32 of the bytes alone: the receiver names the blob by the SHA-256 it computes
    /// once the bytes match the checksum.
    Checksum,
}

/// What a stream named at the end sent, once its last chunk is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    /// Bytes sent, the size the first chunk named.
    pub size: u64,
    /// The SHA-256 the last chunk named ([`StreamEnd::Hash`]).
    pub sha256: Option<String>,
    /// The CRC-32 the last chunk named ([`StreamEnd::Checksum`]).
    pub crc32: Option<u32>,
}

/// Streams a file whose hash is not known yet, hashing it as it is read: the first chunk names
/// the file's size and leaves `sha256` empty, and after the data a last chunk without data names
/// the hash (lowercase hex). One pass over the file instead of a hash pass and then the stream.
/// See [`file_chunks_ending`] for what ends such a stream early.
pub fn file_chunks_hash_at_end(path: PathBuf) -> impl Stream<Item = BlobChunk> + Send + 'static {
    file_chunks_ending(path, StreamEnd::Hash).0
}

/// Streams a file as [`file_chunks_hash_at_end`] does, but ends with its CRC-32 alone, for the
/// receiver to name the blob (how the worker and `coordinator submit` upload).
pub fn file_chunks_checksum_at_end(path: PathBuf) -> impl Stream<Item = BlobChunk> + Send + 'static {
    file_chunks_ending(path, StreamEnd::Checksum).0
}

/// Streams a file named at the end (the first chunk names its size, a last chunk without data
/// names what `end` says), also handing back what the last chunk named: the receiver resolves
/// once that chunk is queued, and fails when the stream ended without one.
///
/// A read error, or a file shorter than its size at the start, ends the stream without its last
/// chunk: the receiver then refuses the blob. A file that grows while it is read is refused too
/// (more bytes than the first chunk named).
pub fn file_chunks_ending(
    path: PathBuf,
    end: StreamEnd,
) -> (impl Stream<Item = BlobChunk> + Send + 'static, tokio::sync::oneshot::Receiver<SentFile>) {
    let (sender, receiver) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let (report, reported) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let Some(sent) = send_data_chunks(&path, end, &sender) else {
            return;
        };
        let last =
            BlobChunk { sha256: sent.sha256.clone().unwrap_or_default(), size: sent.size, crc32: sent.crc32, ..BlobChunk::default() };
        if sender.blocking_send(last).is_ok() {
            let _ = report.send(sent);
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(receiver), reported)
}

/// Sends the data chunks of a stream named at the end (the first naming the file's size);
/// returns what its last chunk must name, or `None` when the stream must end without one (the
/// file could not be read whole, or the receiver went away).
fn send_data_chunks(path: &Path, end: StreamEnd, sender: &tokio::sync::mpsc::Sender<BlobChunk>) -> Option<SentFile> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    // SHA-256 runs beside this thread, which reads the next chunk meanwhile; dropping its
    // sender without `Piece::End` (any early return) stops it. The CRC-32 (over ten times
    // faster) runs inline.
    let hashing = (end == StreamEnd::Hash).then(|| start_hasher(false));
    let mut checksum = (end == StreamEnd::Checksum).then(crc32fast::Hasher::new);
    let mut first = true;
    let mut sent = 0u64;
    loop {
        let data = read_chunk(&mut file).ok()?;
        let last = data.len() < BLOB_CHUNK_BYTES;
        sent += data.len() as u64;
        let data = prost::bytes::Bytes::from(data);
        if let Some(checksum) = checksum.as_mut() {
            checksum.update(&data);
        }
        if let Some((to_hasher, _)) = &hashing {
            if !data.is_empty() {
                to_hasher.blocking_send(Piece::Data(data.clone())).ok()?;
            }
        }
        let chunk = match first {
            true => BlobChunk { size, data, ..BlobChunk::default() },
            false if data.is_empty() => break,
            false => BlobChunk { data, ..BlobChunk::default() },
        };
        first = false;
        sender.blocking_send(chunk).ok()?;
        if last {
            break;
        }
    }
    // A file cut short while it was read: no last chunk, so the receiver refuses it rather
    // than waiting for bytes that will not come.
    if sent != size {
        return None;
    }
    let sha256 = match hashing {
        Some((to_hasher, hasher)) => {
            to_hasher.blocking_send(Piece::End).ok()?;
            Some(tokio::runtime::Handle::current().block_on(hasher).ok()??.sha256)
        }
        None => None,
    };
    Some(SentFile { size, sha256, crc32: checksum.map(|c| c.finalize()) })
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
/// `expected` pins the hash the caller wants (a download); otherwise the hash the stream names,
/// first or last, is verified, or its checksum when it names no hash. At most `max_size` bytes
/// are accepted. The temporary file lives in `destination`'s folder and is removed on any
/// failure.
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
    let folder = destination.parent().unwrap_or(Path::new("."));
    let temp = tempfile_path(destination);
    let verified = receive_into(&mut stream, folder, temp, expected, max_size, timeouts).await?;
    verified.persist(destination).await
}

/// A received blob whose content matched its hash and size, still in its hidden temporary file:
/// nothing is visible under the blob's name until [`VerifiedBlob::persist`]. Dropped unpersisted,
/// it removes the file.
#[derive(Debug)]
pub struct VerifiedBlob {
    /// The blob's hash and size, as verified.
    pub blob: BlobRef,
    /// The temporary file, until it is persisted or removed.
    temp: Option<PathBuf>,
}

impl VerifiedBlob {
    /// Renames the verified file to `destination` (creating its folder; in the same file system
    /// as the temporary file), where it appears whole or not at all.
    pub async fn persist(mut self, destination: &Path) -> Result<BlobRef, TransferError> {
        let temp = self.temp.take().expect("a verified blob holds its file until persisted");
        if let Some(folder) = destination.parent() {
            if let Err(error) = tokio::fs::create_dir_all(folder).await {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(io_error(folder)(error));
            }
        }
        if let Err(error) = tokio::fs::rename(&temp, destination).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(io_error(destination)(error));
        }
        Ok(self.blob.clone())
    }
}

impl Drop for VerifiedBlob {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Receives a chunk stream whose name may come last, or not at all ([`StreamEnd`]), into a
/// hidden temporary file in `folder` (a [`is_partial_file_name`] file, created with the folder),
/// under `timeouts`; returns it once its bytes match what the stream names, for the caller to
/// [`VerifiedBlob::persist`] under the blob's name: the hash the stream named, or the one this
/// side computed when the stream named only a checksum. `expected` and `max_size` as for
/// [`receive_to_file`]. On any failure the temporary file is gone.
pub async fn receive_verified_within<S>(
    mut stream: S,
    folder: &Path,
    expected: Option<&str>,
    max_size: u64,
    timeouts: ReceiveTimeouts,
) -> Result<VerifiedBlob, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let temp = tempfile_path(&folder.join("incoming"));
    receive_into(&mut stream, folder, temp, expected, max_size, timeouts).await
}

async fn receive_into<S>(
    stream: &mut S,
    folder: &Path,
    temp: PathBuf,
    expected: Option<&str>,
    max_size: u64,
    timeouts: ReceiveTimeouts,
) -> Result<VerifiedBlob, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let mut paced = Paced { stream, timeouts, deadline: Instant::now().checked_add(timeouts.total) };
    tokio::fs::create_dir_all(folder).await.map_err(io_error(folder))?;
    match receive_inner(&mut paced, &temp, expected, max_size).await {
        Ok(blob) => Ok(VerifiedBlob { blob, temp: Some(temp) }),
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
    // Two transfers into one folder within the same clock tick still get files of their own.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    destination.with_file_name(format!(".{name}.{}.{unique}{count}{PARTIAL_SUFFIX}", std::process::id()))
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
    // An empty name: the stream names its hash or checksum in its last chunk.
    let named_at_end = first.sha256.is_empty();
    let mut announced = BlobRef { sha256: first.sha256.clone(), size: first.size };
    if !named_at_end {
        check_name(&announced.sha256, expected, "first")?;
    }
    if announced.size > max_size {
        return Err(TransferError::Protocol(format!("blob of {} bytes exceeds the limit of {max_size}", announced.size)));
    }
    // Hashing and writing run on two blocking threads, side by side, while this task takes in
    // the next chunks.
    let (to_writer, receiver) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let writer_path = temp.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_file(&writer_path, receiver));
    let (to_hasher, hasher) = start_hasher(named_at_end);
    let received = forward_chunks(stream, first, announced.size, named_at_end, [&to_hasher, &to_writer]).await;
    if matches!(&received, Ok((size, last)) if *size == announced.size && (last.is_some() || !named_at_end)) {
        // Either thread may have stopped on an error of its own; the writer's is reported below.
        let _ = to_hasher.send(Piece::End).await;
        let _ = to_writer.send(Piece::End).await;
    }
    drop((to_hasher, to_writer));
    // The writer is always awaited, so the file is closed before the caller may remove it.
    let written = writer.await.unwrap_or_else(|join| Err(io_error(temp)(std::io::Error::other(join))));
    let hashed = hasher.await.ok().flatten();
    // A disk error comes first: it is why the writer stopped taking chunks.
    let written = written?;
    let (received, last) = received?;
    if received != announced.size {
        return Err(TransferError::Protocol(format!("received {received} of {} announced bytes", announced.size)));
    }
    let last = match named_at_end {
        true => Some(last.ok_or_else(|| TransferError::Protocol("the stream ended without naming its hash or checksum".into()))?),
        false => None,
    };
    let actual = hashed.filter(|_| written).ok_or_else(|| TransferError::Protocol("the blob writer stopped early".into()))?;
    if let Some(last) = last {
        if let Some(named) = &last.sha256 {
            check_name(named, expected, "last")?;
        }
        // Damage on the way is the likelier cause of a mismatch, so the checksum speaks first.
        if let Some(sent) = last.crc32 {
            let arrived = actual.crc32.unwrap_or_default();
            if arrived != sent {
                return Err(TransferError::ChecksumMismatch { expected: sent, actual: arrived });
            }
        }
        announced.sha256 = last.sha256.unwrap_or_else(|| actual.sha256.clone());
    }
    if let Some(expected) = expected.filter(|expected| *expected != actual.sha256) {
        return Err(TransferError::HashMismatch { expected: expected.to_string(), actual: actual.sha256 });
    }
    if actual.sha256 != announced.sha256 {
        return Err(TransferError::HashMismatch { expected: announced.sha256, actual: actual.sha256 });
    }
    Ok(announced)
}

/// Checks a hash a stream names (in its `which` chunk): a SHA-256, and the one `expected`.
fn check_name(named: &str, expected: Option<&str>, which: &str) -> Result<(), TransferError> {
    if !is_sha256_hex(named) {
        return Err(TransferError::Protocol(format!("{which} chunk names no valid sha256: {named:?}")));
    }
    match expected {
        Some(expected) if named != expected => {
            Err(TransferError::HashMismatch { expected: expected.to_string(), actual: named.to_string() })
        }
        _ => Ok(()),
    }
}

/// What the last chunk of a stream named at the end named: a hash, a checksum, or both.
struct LastChunk {
    sha256: Option<String>,
    crc32: Option<u32>,
}

/// Hands each chunk's bytes to the hashing and the writing thread until the stream ends; returns
/// the bytes received and, when `named_at_end`, what the last chunk named. Stops at the first
/// stream error, at more bytes than `announced_size`, at anything after the last chunk, at a
/// checksum anywhere else, or when a thread has stopped (the caller then reports the writer's
/// own error).
async fn forward_chunks<S>(
    stream: &mut Paced<'_, S>,
    first: BlobChunk,
    announced_size: u64,
    named_at_end: bool,
    threads: [&tokio::sync::mpsc::Sender<Piece>; 2],
) -> Result<(u64, Option<LastChunk>), TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let mut received = 0u64;
    let mut chunk = Some(first);
    let mut is_first = true;
    while let Some(current) = chunk {
        let names_something = !current.sha256.is_empty() || current.crc32.is_some();
        if named_at_end && !is_first && names_something {
            if !current.data.is_empty() {
                return Err(TransferError::Protocol("the chunk naming the hash or checksum carries data".into()));
            }
            if stream.next().await?.is_some() {
                return Err(TransferError::Protocol("chunks after the one naming the hash or checksum".into()));
            }
            let sha256 = Some(current.sha256).filter(|named| !named.is_empty());
            return Ok((received, Some(LastChunk { sha256, crc32: current.crc32 })));
        }
        if current.crc32.is_some() {
            return Err(TransferError::Protocol("a crc32 in a chunk other than the last of a stream named at the end".into()));
        }
        is_first = false;
        received += current.data.len() as u64;
        if received > announced_size {
            return Err(TransferError::Protocol(format!("more than the announced {announced_size} bytes")));
        }
        if !current.data.is_empty() {
            for thread in threads {
                if thread.send(Piece::Data(current.data.clone())).await.is_err() {
                    return Ok((received, None));
                }
            }
        }
        chunk = stream.next().await?;
    }
    Ok((received, None))
}

/// Creates `path` and writes every buffer it is handed, starting the disk's writeback every
/// [`WRITEBACK_BYTES`]; on [`Piece::End`] it fsyncs the file and returns `true`. Returns `false`,
/// without syncing, when the receiving task gives up first.
fn write_file(path: &Path, mut pieces: tokio::sync::mpsc::Receiver<Piece>) -> Result<bool, TransferError> {
    let mut file = std::fs::File::create(path).map_err(io_error(path))?;
    let mut written = 0u64;
    let mut flushed = 0u64;
    while let Some(piece) = pieces.blocking_recv() {
        match piece {
            Piece::Data(data) => {
                file.write_all(&data).map_err(io_error(path))?;
                written += data.len() as u64;
                if written - flushed >= WRITEBACK_BYTES {
                    start_writeback(&file, flushed, written - flushed);
                    flushed = written;
                }
            }
            Piece::End => {
                file.sync_all().map_err(io_error(path))?;
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to disk without waiting
/// for them, so that the final fsync finds most of the file already written. Advice only: a file
/// system that refuses it leaves the work to the fsync.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the call's duration (borrowed from `file`), and
    // sync_file_range reads no memory of this process.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests;
