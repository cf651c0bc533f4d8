//! The allocator settings of `cohort_proto::transfer::allocator`, in a process of their own (they
//! are process-wide): a transfer's pattern of buffers, 1 MiB blocks a window at a time allocated,
//! filled and freed, faults its pages in once with them, and on every window without them.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use cohort_proto::transfer::allocator::keep_transfer_buffers;
use cohort_proto::BLOB_CHUNK_BYTES;

/// Buffers alive at once: a stream window's worth (`HTTP2_STREAM_WINDOW_BYTES`).
const BUFFERS_PER_WINDOW: usize = 8;
const WINDOWS: usize = 8;
const PAGE_BYTES: usize = 4096;

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
fn thread_minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // The fields after the command name (which may hold spaces) close with ')'; minflt is the
    // 10th field of the line, the 8th after it.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[7].parse().unwrap()
}

/// Faults taken by `WINDOWS` windows of buffers after a first one, on a fresh thread.
fn faults_after_the_first_window() -> u64 {
    std::thread::spawn(|| {
        let mut faults = 0;
        for window in 0..=WINDOWS {
            let before = thread_minor_faults();
            let buffers: Vec<Vec<u8>> = (0..BUFFERS_PER_WINDOW).map(|_| vec![1u8; BLOB_CHUNK_BYTES]).collect();
            let total: u64 = buffers.iter().map(|buffer| buffer[buffer.len() / 2] as u64).sum();
            assert_eq!(total, BUFFERS_PER_WINDOW as u64);
            drop(buffers);
            if window > 0 {
                faults += thread_minor_faults() - before;
            }
        }
        faults
    })
    .join()
    .unwrap()
}

#[test]
fn kept_buffers_fault_their_pages_in_once() {
    let pages_per_window = (BUFFERS_PER_WINDOW * BLOB_CHUNK_BYTES / PAGE_BYTES) as u64;
    let by_default = faults_after_the_first_window();
    assert!(keep_transfer_buffers(), "glibc refused the settings");
    let kept = faults_after_the_first_window();
    eprintln!("faults over {WINDOWS} windows of {pages_per_window} pages: default {by_default}, kept {kept}");
    // Without the settings each window's pages come back from the kernel (what the settings are
    // for; should glibc stop doing that, this test says so rather than pass for nothing).
    assert!(by_default >= pages_per_window * WINDOWS as u64 / 2, "default glibc kept the buffers: {by_default} faults");
    // With them, a window reuses the last one's pages.
    assert!(kept < pages_per_window / 4, "{kept} faults with the buffers kept");
}
