//! Moving content-addressed blobs over gRPC streams, shared by every side that sends or stores one.
//!
//! A sender hashes the file first, then streams it in [`BLOB_CHUNK_BYTES`] chunks whose first one
//! names the hash and size. A receiver writes into a temporary file beside the destination,
//! hashing as it goes, and renames it into place only once the hash and size check out, so an
//! interrupted or corrupted transfer never leaves a partial blob visible.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
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
    /// The stream itself failed.
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

/// Receives a chunk stream into `destination`, verifying hash and size before it appears there.
///
/// `expected` pins the hash the caller wants (a download); otherwise the first chunk's announced
/// hash is verified (an upload). At most `max_size` bytes are accepted. The temporary file lives in
/// `destination`'s folder and is removed on any failure.
pub async fn receive_to_file<S>(
    mut stream: S,
    destination: &Path,
    expected: Option<&str>,
    max_size: u64,
) -> Result<BlobRef, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let folder = destination.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(folder).await.map_err(io_error(folder))?;
    let temp = tempfile_path(destination);
    let result = receive_inner(&mut stream, &temp, expected, max_size).await;
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

fn tempfile_path(destination: &Path) -> PathBuf {
    let name = destination.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    destination.with_file_name(format!(".{name}.{}.{unique}.partial", std::process::id()))
}

async fn receive_inner<S>(stream: &mut S, temp: &Path, expected: Option<&str>, max_size: u64) -> Result<BlobRef, TransferError>
where
    S: Stream<Item = Result<BlobChunk, tonic::Status>> + Unpin,
{
    let first = stream.next().await.ok_or_else(|| TransferError::Protocol("empty stream".into()))??;
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
    stream: &mut S,
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
        chunk = stream.next().await.transpose()?;
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
}
