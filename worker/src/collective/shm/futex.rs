//! Blocking waits on a word of a shared mapping: Linux futexes, so that a rank waiting on a peer
//! sleeps in the kernel instead of spinning on a core its peers need (a gang's ranks on one host
//! often outnumber its cores).
//!
//! The futexes are the shared kind (no `FUTEX_PRIVATE_FLAG`): the kernel keys them by the page of
//! the mapping, so a wake from one process reaches a waiter in another.

// Shared memory and futexes are system calls on raw memory; each unsafe block says why it is sound.
#![allow(unsafe_code)]

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word` holds `expected`, at most `timeout`. Returns early on a wake, a signal, or
/// when `word` no longer holds `expected`; the caller re-reads the word and its clock.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout =
        libc::timespec { tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: `word` is a live, aligned 32-bit atomic and `timeout` outlives the call; FUTEX_WAIT
    // only reads them. Its errors (EAGAIN: the word changed, EINTR, ETIMEDOUT) all mean "look
    // again", which is what the caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every rank sleeping in [`wait`] on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
