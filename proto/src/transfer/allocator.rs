//! glibc malloc settings for a process that moves blobs: the coordinator and its commands.
//!
//! A transfer allocates and frees its 1 MiB buffers (a sender's file reads, tonic's receive
//! buffer) within milliseconds, with up to a stream window's worth (8 MiB) alive at once. With
//! glibc's defaults the trim threshold follows the dynamic mmap threshold at twice its value
//! (about 2 MiB once 1 MiB blocks have been freed), so each time a window's buffers are freed the
//! heap's top goes back to the kernel, and the next buffers fault their pages in again, each
//! zeroed by the kernel: 280,000–305,000 minor faults for three 256 MiB uploads and downloads
//! with their copies, against 35,000 with these settings (docs/performance.md).
//!
//! So a heap keeps up to [`TRIM_THRESHOLD_BYTES`] free at its top, enough for two windows' buffers
//! (8 MiB kept too little: 240,000–390,000 faults), and blocks below [`MMAP_THRESHOLD_BYTES`], a
//! chunk's buffers among them, always come from a heap. Setting either value turns glibc's
//! dynamic threshold off, so the second is set too: larger blocks (a 100,000-trial submission's
//! plan, for one) keep mappings of their own and go back to the kernel whole when freed. Fixed at
//! the dynamic threshold's own ceiling (32 MiB) instead, they came from the heaps and stayed: the
//! scheduler benchmark ended with 383 MiB resident against 333 by default; at 4 MiB, 312.
//!
//! The worker does not call this: its training settings (`cohort_worker::allocator`) keep far
//! more (no mappings at all, 1 GiB of free top), which covers its transfers too.

/// Free memory at the top of a heap kept for the next buffers rather than returned.
pub const TRIM_THRESHOLD_BYTES: i32 = 32 << 20;
/// Blocks below this come from a heap, above it from mappings of their own: four chunks.
pub const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// Applies the settings above; returns false where they do not apply (not glibc) or glibc
/// refused one. Call it first thing in `main`, before transfers start.
pub fn keep_transfer_buffers() -> bool {
    use crate::malloc::{set, Parameter};
    set(&[(Parameter::MmapThreshold, MMAP_THRESHOLD_BYTES), (Parameter::TrimThreshold, TRIM_THRESHOLD_BYTES)])
}
