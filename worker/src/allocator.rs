//! glibc malloc settings for a training process.
//!
//! libtorch allocates every CPU tensor with `posix_memalign`. With glibc's defaults, blocks above
//! a (dynamic) threshold get their own `mmap` and are unmapped on free, and the main heap's free
//! top is given back to the kernel past a (dynamic) trim threshold, so every training step maps
//! fresh pages for its activations, gradients and optimizer temporaries and takes a page fault
//! per 4 KiB of them: about 2,000 faults per classifier step at batch 256 on the main thread (a
//! third of the step), about 200,000 per step of the seed-width WGAN-GP, whose 32 MiB layers are
//! past any threshold glibc lets one set (docs/performance.md).
//!
//! So: no block gets a mapping of its own (`M_MMAP_MAX` = 0; glibc still maps a block that no heap
//! can hold, e.g. one larger than a thread arena's 64 MiB heaps), and up to 1 GiB of free heap top
//! is kept for the next step. Steps then reuse the same memory, as PyTorch's caching allocator
//! does on a GPU; the cost is that the process keeps its peak heap.

/// Blocks that get a mapping of their own (beyond those no heap can hold): none.
const MMAP_MAX: i32 = 0;
/// Free memory at the top of a heap kept for the next step rather than returned.
const TRIM_THRESHOLD_BYTES: i32 = 1 << 30;

/// Applies the settings above; returns false where they do not apply (not glibc) or glibc
/// refused one. Call it once, first thing in `main`, before tensors exist.
pub fn tune_for_training() -> bool {
    use cohort_proto::malloc::{set, Parameter};
    set(&[(Parameter::MmapMax, MMAP_MAX), (Parameter::TrimThreshold, TRIM_THRESHOLD_BYTES)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc accepts both settings: mallopt's return value is the only place it would say otherwise
    /// (some versions refuse an mmap threshold past half a heap; Debian 12's 2.36 accepts every value).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(tune_for_training());
    }

    /// With no mappings allowed, a block larger than a thread arena's heap (64 MiB) still gets
    /// one: glibc falls back to `mmap` rather than failing the allocation (training runs on its
    /// own thread, whose allocations come from such an arena).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn blocks_larger_than_a_heap_still_allocate() {
        assert!(tune_for_training());
        let total = std::thread::spawn(|| {
            let large = tch::Tensor::ones([64 << 20], (tch::Kind::Float, tch::Device::Cpu));
            large.sum(tch::Kind::Double).double_value(&[])
        });
        assert_eq!(total.join().unwrap(), (64 << 20) as f64);
    }
}
