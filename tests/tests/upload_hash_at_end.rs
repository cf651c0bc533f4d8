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
use cohort_proto::BLOB_CHUNK_BYTES;
use tokio_stream::StreamExt;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_hashed_at_end_are_stored_only_when_their_hash_checks_out() {
    let cluster = Cluster::start();
    let options = ConnectOptions { url: cluster.url(), token_file: Some(cluster.client_token()), tls_ca: None };
    let (channel, token) = options.lazy_channel().expect("channel");
    let mut client =
        ClientServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let blobs = cluster.data_dir().join("blobs");

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("checkpoint.bin");
    let bytes: Vec<u8> = (0..2 * BLOB_CHUNK_BYTES + 123).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    let blob = transfer::hash_file(&source).await.unwrap();
    let chunks: Vec<pb::BlobChunk> = transfer::file_chunks_hash_at_end(source.clone()).collect().await;

    // A wrong hash at the end, a corrupted chunk, and a stream that stops before its hash: each
    // refused, and nothing is stored, not even a partial file.
    let mut wrong = chunks.clone();
    wrong.last_mut().unwrap().sha256 = "0".repeat(64);
    let mut corrupted = chunks.clone();
    let mut flipped = corrupted[1].data.to_vec();
    flipped[0] ^= 0xff;
    corrupted[1].data = flipped.into();
    let unfinished = chunks[..chunks.len() - 1].to_vec();
    for (what, stream) in [("a wrong hash", wrong), ("a corrupted chunk", corrupted), ("no hash", unfinished)] {
        let status = client.upload_blob(tokio_stream::iter(stream)).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(stored_files(&blobs).is_empty(), "{what} left {:?}", stored_files(&blobs));
    }

    // The whole stream: stored under its hash, named in the answer.
    let answer = client.upload_blob(tokio_stream::iter(chunks.clone())).await.expect("a true upload").into_inner();
    assert_eq!(answer.blob, Some(blob.clone()));
    assert!(!answer.already_present);
    let stored = blobs.join(&blob.sha256[..2]).join(&blob.sha256);
    assert_eq!(stored_files(&blobs), vec![stored.clone()]);
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);

    // The same bytes again: the stored blob is kept, the answer says it was there.
    let again = client.upload_blob(tokio_stream::iter(chunks)).await.expect("a repeated upload").into_inner();
    assert!(again.already_present);
    assert_eq!(stored_files(&blobs), vec![stored.clone()]);

    // And it downloads whole and verified.
    let download = client.download_blob(pb::FetchBlobRequest { sha256: blob.sha256.clone() }).await.unwrap().into_inner();
    let copy = dir.path().join("copy.bin");
    assert_eq!(transfer::receive_to_file(download, &copy, Some(&blob.sha256), u64::MAX).await.unwrap(), blob);
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_ending_with_a_checksum_are_named_by_the_coordinator() {
    let cluster = Cluster::start();
    let options = ConnectOptions { url: cluster.url(), token_file: Some(cluster.client_token()), tls_ca: None };
    let (channel, token) = options.lazy_channel().expect("channel");
    let mut client =
        ClientServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let blobs = cluster.data_dir().join("blobs");

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
    // a stream that stops before its checksum: each refused, and nothing is stored.
    let mut wrong = chunks.clone();
    wrong.last_mut().unwrap().crc32 = Some(crc32fast::hash(&bytes) ^ 1);
    let mut corrupted = chunks.clone();
    let mut flipped = corrupted[2].data.to_vec();
    flipped[100] ^= 0x10;
    corrupted[2].data = flipped.into();
    let mut early = chunks.clone();
    early[0].crc32 = Some(0);
    let unfinished = chunks[..chunks.len() - 1].to_vec();
    for (what, stream) in [
        ("a wrong checksum", wrong),
        ("a corrupted chunk", corrupted),
        ("a checksum on the first chunk", early),
        ("no checksum", unfinished),
    ] {
        let status = client.upload_blob(tokio_stream::iter(stream)).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(stored_files(&blobs).is_empty(), "{what} left {:?}", stored_files(&blobs));
    }

    // The whole stream: stored under the hash of its bytes, which the answer names.
    let answer = client.upload_blob(tokio_stream::iter(chunks.clone())).await.expect("a true upload").into_inner();
    assert_eq!(answer.blob, Some(blob.clone()));
    assert!(!answer.already_present);
    let stored = blobs.join(&blob.sha256[..2]).join(&blob.sha256);
    assert_eq!(stored_files(&blobs), vec![stored.clone()]);
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);
    let again = client.upload_blob(tokio_stream::iter(chunks)).await.expect("a repeated upload").into_inner();
    assert!(again.already_present);
    assert_eq!(again.blob, Some(blob));
    assert_eq!(stored_files(&blobs), vec![stored]);
}
