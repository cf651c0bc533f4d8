//! Moving content-addressed blobs over gRPC streams, shared by every side that sends or stores one.
//!
//! A sender hashes the file first, then streams it in [`BLOB_CHUNK_BYTES`] chunks whose first one
//! names the hash and size. A receiver writes into a temporary file beside the destination,
//! hashing as it goes, and renames it into place only once the hash and size check out, so an
//! interrupted or corrupted transfer never leaves a partial blob visible.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::{Stream, StreamExt};

use crate::v1::{BlobChunk, BlobRef};
use crate::BLOB_CHUNK_BYTES;

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
pub async fn hash_file(path: &Path) -> Result<BlobRef, TransferError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BLOB_CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).await.map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok(BlobRef { sha256: hex::encode(hasher.finalize()), size })
}

/// Streams a file whose hash is already known as chunks; the first chunk carries `blob`.
///
/// Reading happens on a spawned task, so the stream can be handed straight to a gRPC call.
pub fn file_chunks(path: PathBuf, blob: BlobRef) -> impl Stream<Item = BlobChunk> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let Ok(mut file) = tokio::fs::File::open(&path).await else {
            return;
        };
        let mut first = true;
        loop {
            let mut data = vec![0u8; BLOB_CHUNK_BYTES];
            let mut filled = 0;
            while filled < data.len() {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(read) => filled += read,
                    Err(_) => return,
                }
            }
            data.truncate(filled);
            let last = filled < BLOB_CHUNK_BYTES;
            if filled == 0 && !first {
                return;
            }
            let header = if first { blob.clone() } else { BlobRef::default() };
            first = false;
            let chunk = BlobChunk { sha256: header.sha256, size: header.size, data };
            if sender.send(chunk).await.is_err() || last {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
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
    let mut file = tokio::fs::File::create(temp).await.map_err(io_error(temp))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut chunk = Some(first);
    while let Some(current) = chunk {
        received += current.data.len() as u64;
        if received > announced.size {
            return Err(TransferError::Protocol(format!("more than the announced {} bytes", announced.size)));
        }
        hasher.update(&current.data);
        file.write_all(&current.data).await.map_err(io_error(temp))?;
        chunk = stream.next().await.transpose()?;
    }
    if received != announced.size {
        return Err(TransferError::Protocol(format!("received {received} of {} announced bytes", announced.size)));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != announced.sha256 {
        return Err(TransferError::HashMismatch { expected: announced.sha256, actual });
    }
    file.sync_all().await.map_err(io_error(temp))?;
    Ok(announced)
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
        corrupted[0].data[10] ^= 1;
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
