//! glibc malloc settings for a training process.
//!
//! libtorch allocates every CPU tensor with `posix_memalign`. With glibc's defaults, blocks above
//! a (dynamic) threshold are `mmap`ed and returned on free, and the main heap's free top is given
//! back to the kernel past a (dynamic) trim threshold, so a training step on the main thread maps
//! fresh pages for its activations and gradients and takes a page fault per 4 KiB of them: about
//! 2,000 faults per classifier step at batch 256, a third of the step's time (docs/performance.md).
//! Threads' arenas fare better, but not the main one. Serving blocks up to 32 MiB from the heap and
//! keeping up to 1 GiB of its free top makes every step reuse the same memory, the way PyTorch's
//! caching allocator does on a GPU; the cost is that the process keeps its peak heap.

/// Blocks at least this large still get their own mapping (glibc's maximum for the setting).
const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;
/// Free memory at the top of the heap kept for the next step rather than returned.
const TRIM_THRESHOLD_BYTES: i32 = 1 << 30;

/// Applies the settings above; returns false where they do not apply (not glibc) or glibc
/// refused one. Call it once, first thing in `main`, before tensors exist.
pub fn tune_for_training() -> bool {
    tune()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune() -> bool {
    // SAFETY: mallopt only changes allocator parameters; glibc serialises it with allocation.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    // SAFETY: as above.
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) };
    mmap == 1 && trim == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc accepts both settings: it keeps its defaults for a value it rejects (a threshold
    /// above its maximum, for one) and says so only through mallopt's return value.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(tune_for_training());
    }
}
