//! glibc's malloc parameters, set from safe code: the one place that calls `mallopt`.
//!
//! The policies live with the processes they serve: `transfer::allocator` for the coordinator's
//! blob transfers, `cohort_worker::allocator` for training.

/// A malloc parameter a process may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parameter {
    /// How many blocks may get a mapping of their own (`M_MMAP_MAX`).
    MmapMax,
    /// Blocks at least this large get a mapping of their own (`M_MMAP_THRESHOLD`).
    MmapThreshold,
    /// Free memory at a heap's top past which it goes back to the kernel (`M_TRIM_THRESHOLD`).
    TrimThreshold,
}

/// Sets each parameter in turn. Returns false where they do not apply (not glibc) or glibc
/// refused one (it keeps its value for a setting it rejects and says so only here; the 2.36 of
/// Debian 12 accepts every value). Setting any of them turns glibc's dynamic mmap threshold off.
pub fn set(settings: &[(Parameter, i32)]) -> bool {
    settings.iter().fold(true, |all_accepted, &(parameter, value)| set_one(parameter, value) && all_accepted)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_one(parameter: Parameter, value: i32) -> bool {
    let parameter = match parameter {
        Parameter::MmapMax => libc::M_MMAP_MAX,
        Parameter::MmapThreshold => libc::M_MMAP_THRESHOLD,
        Parameter::TrimThreshold => libc::M_TRIM_THRESHOLD,
    };
    // SAFETY: mallopt only changes allocator parameters; glibc serialises it with allocation.
    unsafe { libc::mallopt(parameter, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_one(_parameter: Parameter, _value: i32) -> bool {
    false
}
