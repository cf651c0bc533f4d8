//! Uploads named in the stream's last chunk, against the real coordinator: by the sender's hash
//! (hashed while sent), or by a CRC-32 alone (how the worker and `submit` send now), when the
//! coordinator names the blob by the SHA-256 it computes. Either way the blob appears under its
//! hash only once verified, a wrong or missing hash or checksum is refused and leaves nothing
//! behind, and the coordinator's answer names the blob.

use std::path::{Path, PathBuf};

use cohort_cluster_tests::Cluster;
use cohort_proto::auth::ConnectOptions;
use cohort_proto::transfer;
use cohort_proto::v1 as pb;
use cohort_proto::v1::client_service_client::ClientServiceClient;
use cohort_proto::v1::BlobRef;
use cohort_proto::BLOB_CHUNK_BYTES;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

/// Every file under the coordinator's blob store.
fn stored_files(blobs: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![blobs.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().unwrap().is_dir() {
                folders.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

/// A coordinator, a client of it as `coordinator submit` connects, and its blob store.
struct Coordinator {
    /// Kept for its processes: dropping it stops the coordinator.
    _cluster: Cluster,
    client: ClientServiceClient<InterceptedService<Channel, cohort_proto::auth::BearerToken>>,
    blobs: PathBuf,
}

impl Coordinator {
    fn start() -> Self {
        let cluster = Cluster::start();
        let options = ConnectOptions { url: cluster.url(), token_file: Some(cluster.client_token()), tls_ca: None };
        let (channel, token) = options.lazy_channel().expect("channel");
        let client =
            ClientServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        let blobs = cluster.data_dir().join("blobs");
        Self { _cluster: cluster, client, blobs }
    }

    /// Uploads each stream, which must be refused as invalid and leave nothing stored, not even a
    /// partial file.
    async fn assert_refused(&mut self, streams: Vec<(&str, Vec<pb::BlobChunk>)>) {
        for (what, stream) in streams {
            let status = self.client.upload_blob(tokio_stream::iter(stream)).await.expect_err(what);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(stored_files(&self.blobs).is_empty(), "{what} left {:?}", stored_files(&self.blobs));
        }
    }

    /// Uploads `chunks` twice: stored under `blob`'s hash the first time, named in the answer; the
    /// second time the stored blob is kept and the answer says it was there. Returns its path.
    async fn assert_stored_once(&mut self, chunks: Vec<pb::BlobChunk>, blob: &BlobRef, bytes: &[u8]) -> PathBuf {
        let answer = self.client.upload_blob(tokio_stream::iter(chunks.clone())).await.expect("a true upload").into_inner();
        assert_eq!(answer.blob.as_ref(), Some(blob));
        assert!(!answer.already_present);
        let stored = self.blobs.join(&blob.sha256[..2]).join(&blob.sha256);
        assert_eq!(stored_files(&self.blobs), vec![stored.clone()]);
        assert_eq!(std::fs::read(&stored).unwrap(), bytes);
        let again = self.client.upload_blob(tokio_stream::iter(chunks)).await.expect("a repeated upload").into_inner();
        assert!(again.already_present);
        assert_eq!(again.blob.as_ref(), Some(blob));
        assert_eq!(stored_files(&self.blobs), vec![stored.clone()]);
        stored
    }
}

/// `chunks` with one byte of chunk `index` flipped.
fn corrupted(chunks: &[pb::BlobChunk], index: usize, byte: usize) -> Vec<pb::BlobChunk> {
    let mut corrupted = chunks.to_vec();
    let mut flipped = corrupted[index].data.to_vec();
    flipped[byte] ^= 0x10;
    corrupted[index].data = flipped.into();
    corrupted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_hashed_at_end_are_stored_only_when_their_hash_checks_out() {
    let mut coordinator = Coordinator::start();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("checkpoint.bin");
    let bytes: Vec<u8> = (0..2 * BLOB_CHUNK_BYTES + 123).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    let blob = transfer::hash_file(&source).await.unwrap();
    let chunks: Vec<pb::BlobChunk> = transfer::file_chunks_hash_at_end(source.clone()).collect().await;

    // A wrong hash at the end, a corrupted chunk, and a stream that stops before its hash.
    let mut wrong = chunks.clone();
    wrong.last_mut().unwrap().sha256 = "0".repeat(64);
    let unfinished = chunks[..chunks.len() - 1].to_vec();
    coordinator
        .assert_refused(vec![("a wrong hash", wrong), ("a corrupted chunk", corrupted(&chunks, 1, 0)), ("no hash", unfinished)])
        .await;

    let stored = coordinator.assert_stored_once(chunks, &blob, &bytes).await;
    assert_eq!(stored.file_name().unwrap(), blob.sha256.as_str());

    // And it downloads whole and verified.
    let download = coordinator.client.download_blob(pb::FetchBlobRequest { sha256: blob.sha256.clone() }).await.unwrap().into_inner();
    let copy = dir.path().join("copy.bin");
    assert_eq!(transfer::receive_to_file(download, &copy, Some(&blob.sha256), u64::MAX).await.unwrap(), blob);
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_ending_with_a_checksum_are_named_by_the_coordinator() {
    let mut coordinator = Coordinator::start();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("dataset.bin");
    let bytes: Vec<u8> = (0..3 * BLOB_CHUNK_BYTES + 45).map(|i| (i * 11 % 253) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    let blob = transfer::hash_file(&source).await.unwrap();
    let chunks: Vec<pb::BlobChunk> = transfer::file_chunks_checksum_at_end(source.clone()).collect().await;
    let last = chunks.last().unwrap();
    assert!(last.sha256.is_empty() && last.data.is_empty());
    assert_eq!(last.crc32, Some(crc32fast::hash(&bytes)));

    // A wrong checksum, a corrupted chunk under the true one, a checksum on the first chunk, and
    // a stream that stops before its checksum.
    let mut wrong = chunks.clone();
    wrong.last_mut().unwrap().crc32 = Some(crc32fast::hash(&bytes) ^ 1);
    let mut early = chunks.clone();
    early[0].crc32 = Some(0);
    let unfinished = chunks[..chunks.len() - 1].to_vec();
    coordinator
        .assert_refused(vec![
            ("a wrong checksum", wrong),
            ("a corrupted chunk", corrupted(&chunks, 2, 100)),
            ("a checksum on the first chunk", early),
            ("no checksum", unfinished),
        ])
        .await;

    // The whole stream: stored under the hash of its bytes, which the answer names.
    coordinator.assert_stored_once(chunks, &blob, &bytes).await;
}
