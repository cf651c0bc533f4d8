//! The transfer tests: round trips, refused corruptions, timeouts and partial files.

use super::*;

async fn chunks_of(path: &Path) -> (BlobRef, Vec<Result<BlobChunk, tonic::Status>>) {
    let blob = hash_file(path).await.unwrap();
    let chunks: Vec<_> = file_chunks(path.to_path_buf(), blob.clone()).map(Ok).collect().await;
    (blob, chunks)
}

/// Writes `bytes` to `dir/name`; returns its path and the blob it holds.
async fn source_file(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, BlobRef) {
    let source = dir.join(name);
    std::fs::write(&source, bytes).unwrap();
    let blob = hash_file(&source).await.unwrap();
    (source, blob)
}

/// `chunks` with byte `byte` of chunk `index` flipped by `mask`.
fn flipped(chunks: &[BlobChunk], index: usize, byte: usize, mask: u8) -> Vec<BlobChunk> {
    let mut damaged = chunks.to_vec();
    let mut data = damaged[index].data.to_vec();
    data[byte] ^= mask;
    damaged[index].data = data.into();
    damaged
}

/// Receives `chunks` into `incoming` as the coordinator receives an upload (no size limit, the
/// default timeouts), checked against `expected` when given.
async fn receive_into(incoming: &Path, chunks: Vec<BlobChunk>, expected: Option<&str>) -> Result<VerifiedBlob, TransferError> {
    let stream = tokio_stream::iter(chunks.into_iter().map(Ok));
    receive_verified_within(stream, incoming, expected, u64::MAX, ReceiveTimeouts::default()).await
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

    let corrupted = flipped(&chunks.iter().map(|c| c.as_ref().unwrap().clone()).collect::<Vec<_>>(), 0, 10, 1);
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

async fn chunks_hashed_at_end(path: &Path) -> Vec<BlobChunk> {
    file_chunks_hash_at_end(path.to_path_buf()).collect().await
}

#[tokio::test]
async fn streams_hashed_at_end_round_trip_and_appear_only_when_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    for size in [0usize, 1, BLOB_CHUNK_BYTES, BLOB_CHUNK_BYTES * 2 + 17] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 37 % 253) as u8).collect();
        let (source, blob) = source_file(dir.path(), &format!("src-{size}"), &bytes).await;
        let chunks = chunks_hashed_at_end(&source).await;
        // Data chunks (at least one, naming the size), then one naming the hash.
        assert_eq!(chunks.len(), size.div_ceil(BLOB_CHUNK_BYTES).max(1) + 1, "{size}");
        let head = &chunks[0];
        assert!(head.sha256.is_empty());
        assert_eq!(head.size, size as u64);
        let tail = chunks.last().unwrap();
        assert_eq!(tail.sha256, blob.sha256);
        assert!(tail.data.is_empty());

        let verified = receive_into(&incoming, chunks.clone(), None).await.unwrap();
        assert_eq!(verified.blob, blob);
        // Verified but not persisted: only a hidden partial file exists.
        assert!(names_in(&incoming).iter().all(|name| is_partial_file_name(name)), "{:?}", names_in(&incoming));
        let dest = dir.path().join("store").join(&blob.sha256);
        assert_eq!(verified.persist(&dest).await.unwrap(), blob);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(names_in(&incoming).is_empty());

        // receive_to_file takes both forms.
        let dest = dir.path().join(format!("dst-{size}"));
        assert_eq!(
            receive_to_file(tokio_stream::iter(chunks.into_iter().map(Ok)), &dest, Some(&blob.sha256), u64::MAX).await.unwrap(),
            blob
        );
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    }
    // Dropped without persisting: the file goes.
    let chunks = chunks_hashed_at_end(&dir.path().join("src-1")).await;
    let verified = receive_into(&incoming, chunks, None).await.unwrap();
    assert_eq!(names_in(&incoming).len(), 1);
    drop(verified);
    assert!(names_in(&incoming).is_empty());
}

#[tokio::test]
async fn streams_hashed_at_end_are_refused_unless_whole_and_true() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    let (source, _) = source_file(dir.path(), "src", &vec![9u8; BLOB_CHUNK_BYTES + 5000]).await;
    let chunks = chunks_hashed_at_end(&source).await;
    assert_eq!(chunks.len(), 3);
    let receive = |chunks: Vec<BlobChunk>, expected: Option<&'static str>| receive_into(&incoming, chunks, expected);

    // No hash at the end (the sender stopped after its last data).
    let err = receive(chunks[..2].to_vec(), None).await.unwrap_err();
    assert!(err.to_string().contains("ended without naming its hash"), "{err}");
    // A wrong hash at the end, and corrupted data under the true one.
    let mut wrong = chunks.clone();
    wrong[2].sha256 = "0".repeat(64);
    assert!(matches!(receive(wrong, None).await.unwrap_err(), TransferError::HashMismatch { .. }));
    assert!(matches!(receive(flipped(&chunks, 1, 7, 1), None).await.unwrap_err(), TransferError::HashMismatch { .. }));
    // A hash that is not one, data in the hash chunk, and chunks after it.
    let mut garbage = chunks.clone();
    garbage[2].sha256 = "not a hash".into();
    assert!(receive(garbage, None).await.unwrap_err().to_string().contains("last chunk names no valid sha256"));
    let mut loaded = chunks.clone();
    loaded[2].data = vec![1u8].into();
    assert!(receive(loaded, None).await.unwrap_err().to_string().contains("carries data"));
    let mut extra = chunks.clone();
    extra.push(BlobChunk { data: vec![1u8].into(), ..BlobChunk::default() });
    assert!(receive(extra, None).await.unwrap_err().to_string().contains("after the one naming the hash"));
    // Short of the size named first, and past it.
    let mut short = chunks.clone();
    short[1].data.truncate(10);
    assert!(receive(short, None).await.unwrap_err().to_string().contains("received"));
    let mut long = chunks.clone();
    long[0].size -= 1;
    assert!(receive(long, None).await.unwrap_err().to_string().contains("more than the announced"));
    // The right stream, but not the blob the caller asked for.
    let other = "1".repeat(64);
    let err = receive_into(&incoming, chunks.clone(), Some(&other)).await.unwrap_err();
    assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");
    // A stream cut off mid-way.
    let failing = vec![Ok(chunks[0].clone()), Err(tonic::Status::aborted("cut"))];
    let err =
        receive_verified_within(tokio_stream::iter(failing), &incoming, None, u64::MAX, ReceiveTimeouts::default()).await.unwrap_err();
    assert!(matches!(err, TransferError::Stream(_)), "{err}");
    assert!(names_in(&incoming).is_empty(), "nothing left behind: {:?}", names_in(&incoming));
    // And the whole, true stream passes.
    receive(chunks, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_learns_what_it_streamed_and_nothing_when_the_stream_ends_short() {
    let dir = tempfile::tempdir().unwrap();
    // Past WRITEBACK_BYTES, so the receiver starts the writeback mid-way, and not a whole number
    // of chunks.
    let size = WRITEBACK_BYTES as usize + BLOB_CHUNK_BYTES + 99;
    let bytes: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
    let (source, blob) = source_file(dir.path(), "src", &bytes).await;
    for (end, named) in [
        (StreamEnd::Hash, SentFile { size: size as u64, sha256: Some(blob.sha256.clone()), crc32: None }),
        (StreamEnd::Checksum, SentFile { size: size as u64, sha256: None, crc32: Some(crc32fast::hash(&bytes)) }),
    ] {
        let (chunks, reported) = file_chunks_ending(source.clone(), end);
        let dest = dir.path().join("dst");
        let received = receive_to_file(chunks.map(Ok), &dest, None, u64::MAX).await.unwrap();
        assert_eq!(received, blob, "{end:?}");
        assert_eq!(reported.await.unwrap(), named, "{end:?}");
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);

        // A stream whose receiver gives up after the first chunk never names anything.
        let (chunks, reported) = file_chunks_ending(source.clone(), end);
        let first: Vec<BlobChunk> = chunks.take(1).collect().await;
        assert_eq!(first.len(), 1);
        assert!(reported.await.is_err(), "nothing was named, so nothing is reported");
        // Nor does a file that cannot be read.
        let (chunks, reported) = file_chunks_ending(dir.path().join("missing"), end);
        assert_eq!(chunks.collect::<Vec<_>>().await.len(), 0);
        assert!(reported.await.is_err());
    }
}

async fn chunks_with_checksum_at_end(path: &Path) -> Vec<BlobChunk> {
    file_chunks_checksum_at_end(path.to_path_buf()).collect().await
}

#[tokio::test]
async fn streams_ending_with_a_checksum_are_named_by_the_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    for size in [0usize, 1, BLOB_CHUNK_BYTES, BLOB_CHUNK_BYTES * 2 + 17] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 41 % 251) as u8).collect();
        let (source, blob) = source_file(dir.path(), &format!("src-{size}"), &bytes).await;
        let chunks = chunks_with_checksum_at_end(&source).await;
        // Data chunks (at least one, naming the size), then one naming the CRC-32 alone.
        assert_eq!(chunks.len(), size.div_ceil(BLOB_CHUNK_BYTES).max(1) + 1, "{size}");
        assert!(chunks[0].sha256.is_empty() && chunks[0].crc32.is_none());
        assert_eq!(chunks[0].size, size as u64);
        let tail = chunks.last().unwrap();
        assert_eq!((tail.sha256.as_str(), tail.crc32, tail.data.len()), ("", Some(crc32fast::hash(&bytes)), 0));

        let stream = || tokio_stream::iter(chunks.clone().into_iter().map(Ok));
        let verified = receive_into(&incoming, chunks.clone(), None).await.unwrap();
        assert_eq!(verified.blob, blob, "named by the hash the receiver computed");
        assert!(names_in(&incoming).iter().all(|name| is_partial_file_name(name)));
        let dest = dir.path().join("store").join(&blob.sha256);
        assert_eq!(verified.persist(&dest).await.unwrap(), blob);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        // A caller that pins the hash gets it checked against the bytes.
        let dest = dir.path().join(format!("dst-{size}"));
        assert_eq!(receive_to_file(stream(), &dest, Some(&blob.sha256), u64::MAX).await.unwrap(), blob);
        let err = receive_to_file(stream(), &dest, Some(&"2".repeat(64)), u64::MAX).await.unwrap_err();
        assert!(matches!(err, TransferError::HashMismatch { .. }), "{err}");
    }
    assert!(names_in(&incoming).is_empty());
}

#[tokio::test]
async fn streams_ending_with_a_checksum_are_refused_unless_whole_and_true() {
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    let bytes: Vec<u8> = (0..BLOB_CHUNK_BYTES + 5000).map(|i| (i % 7) as u8).collect();
    let (source, blob) = source_file(dir.path(), "src", &bytes).await;
    let chunks = chunks_with_checksum_at_end(&source).await;
    assert_eq!(chunks.len(), 3);
    let receive = |chunks: Vec<BlobChunk>| receive_into(&incoming, chunks, None);

    // Damaged on the way: a wrong checksum, or a flipped bit under the true one.
    let mut wrong = chunks.clone();
    wrong[2].crc32 = wrong[2].crc32.map(|crc| crc ^ 0x8000_0000);
    assert!(matches!(receive(wrong).await.unwrap_err(), TransferError::ChecksumMismatch { .. }));
    let corrupted = flipped(&chunks, 1, 4000, 4);
    assert!(matches!(receive(corrupted.clone()).await.unwrap_err(), TransferError::ChecksumMismatch { .. }));
    // The sender's hash beside its checksum is checked too: a true checksum does not excuse a
    // false name, nor a true name damaged bytes.
    let mut false_name = chunks.clone();
    false_name[2].sha256 = "3".repeat(64);
    assert!(matches!(receive(false_name).await.unwrap_err(), TransferError::HashMismatch { .. }));
    let mut both = corrupted;
    both[2].sha256 = blob.sha256.clone();
    assert!(matches!(receive(both).await.unwrap_err(), TransferError::ChecksumMismatch { .. }));
    // No checksum at the end, a checksum on the first chunk, and one in a stream named up front.
    let err = receive(chunks[..2].to_vec()).await.unwrap_err();
    assert!(err.to_string().contains("ended without naming its hash or checksum"), "{err}");
    let mut early = chunks.clone();
    early[0].crc32 = Some(0);
    assert!(receive(early).await.unwrap_err().to_string().contains("a crc32 in a chunk other than the last"));
    let (_, named_first) = chunks_of(&source).await;
    let mut named_first: Vec<BlobChunk> = named_first.into_iter().map(Result::unwrap).collect();
    named_first[1].crc32 = Some(crc32fast::hash(&bytes));
    assert!(receive(named_first).await.unwrap_err().to_string().contains("a crc32 in a chunk other than the last"));
    // Data in the checksum's chunk, and chunks after it.
    let mut loaded = chunks.clone();
    loaded[2].data = vec![1u8].into();
    assert!(receive(loaded).await.unwrap_err().to_string().contains("carries data"));
    let mut extra = chunks.clone();
    extra.push(BlobChunk { data: vec![1u8].into(), ..BlobChunk::default() });
    assert!(receive(extra).await.unwrap_err().to_string().contains("after the one naming the hash or checksum"));
    assert!(names_in(&incoming).is_empty(), "nothing left behind: {:?}", names_in(&incoming));
    // And the whole, true stream passes, with or without the sender's hash beside the checksum.
    assert_eq!(receive(chunks.clone()).await.unwrap().blob, blob);
    let mut with_hash = chunks;
    with_hash[2].sha256 = blob.sha256.clone();
    assert_eq!(receive(with_hash).await.unwrap().blob, blob);
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
