//! NCCL through cudarc's bindings, loaded at run time (so the worker builds and runs on
//! machines without CUDA; the library comes with the torch wheel). The default backend on CUDA
//! workers: collectives run on the GPU, in place on libtorch's device buffers, on the default
//! stream libtorch's kernels use, so they are ordered with the backward pass that produced them.
//!
//! Every call into the library is `unsafe` FFI; each states why it is sound. A missing library
//! or a CPU-only worker is a clear [`CollectiveError::Setup`], never a crash.
#![allow(unsafe_code)]

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{CollectiveError, Communicator};

/// Length of an NCCL unique id, as relayed through the coordinator.
pub const UNIQUE_ID_BYTES: usize = 128;

fn nccl_error(what: &str, error: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Setup(format!("nccl {what}: {error:?}"))
}

/// True when the NCCL library can be loaded.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library under its candidate names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

fn require_library() -> Result<(), CollectiveError> {
    if available() {
        return Ok(());
    }
    Err(CollectiveError::Setup("the NCCL library (libnccl.so from the torch wheel's nvidia/nccl/lib) cannot be loaded".into()))
}

/// The loaded library's version, e.g. 22907 for 2.29.7.
pub fn version() -> Result<i32, CollectiveError> {
    require_library()?;
    result::get_nccl_version().map_err(|e| nccl_error("version", e))
}

/// A fresh unique id (rank 0 makes it; the coordinator relays it to the others).
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    require_library()?;
    let id = result::get_uniqueid().map_err(|e| nccl_error("unique id", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank of an NCCL communicator.
#[derive(Debug)]
pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: Device,
}

// SAFETY: the communicator handle is used by one thread at a time (the training thread that owns
// this value); NCCL communicators may be used from any host thread, one call at a time.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Joins the communicator of `world` ranks identified by rank 0's `unique_id`, on `device`
    /// (which must be the process's current CUDA device, cuda:0 for a one-GPU worker).
    pub fn new(rank: usize, world: usize, unique_id: &[u8], device: Device) -> Result<Self, CollectiveError> {
        if !matches!(device, Device::Cuda(_)) {
            return Err(CollectiveError::Setup("NCCL needs a CUDA device; this worker computes on the CPU (use the ring backend)".into()));
        }
        require_library()?;
        if unique_id.len() != UNIQUE_ID_BYTES || rank >= world {
            return Err(CollectiveError::Setup(format!("bad NCCL rendezvous: id of {} bytes, rank {rank} of {world}", unique_id.len())));
        }
        let mut id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (slot, &byte) in id.internal.iter_mut().zip(unique_id) {
            *slot = byte as ::core::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; `id` is a complete unique id; rank < world.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(|e| nccl_error("init", e))?;
        Ok(Self { comm, rank, world, device })
    }

    fn check_tensor(&self, tensor: &Tensor) -> Result<(), CollectiveError> {
        if tensor.device() != self.device || tensor.kind() != Kind::Float || !tensor.is_contiguous() {
            return Err(CollectiveError::Setup(format!(
                "NCCL collectives take contiguous float32 tensors on {:?}, got {:?} {:?}",
                self.device,
                tensor.kind(),
                tensor.device()
            )));
        }
        Ok(())
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // SAFETY: `comm` came from a successful init and is destroyed exactly once, here.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let mut tensor = Tensor::from_slice(data).to_device(self.device);
        self.all_reduce_sum_tensor(&mut tensor)?;
        let host = Vec::<f32>::try_from(&tensor.to_device(Device::Cpu)).map_err(|e| nccl_error("copy back", e))?;
        data.copy_from_slice(&host);
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let mut tensor = Tensor::from_slice(data).to_device(self.device);
        self.broadcast_tensor(&mut tensor, root)?;
        let host = Vec::<f32>::try_from(&tensor.to_device(Device::Cpu)).map_err(|e| nccl_error("copy back", e))?;
        data.copy_from_slice(&host);
        Ok(())
    }

    fn all_reduce_sum_tensor(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.check_tensor(tensor)?;
        let count = tensor.numel();
        let pointer = tensor.data_ptr();
        // SAFETY: `pointer` addresses `count` contiguous float32 values on this communicator's
        // device, alive for the call (we hold `tensor`); in-place (send == receive) is allowed;
        // the null stream is libtorch's default stream, so the reduction is ordered after the
        // kernels that wrote the buffer and before any that read it.
        unsafe {
            result::all_reduce(
                pointer,
                pointer,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_error("all-reduce", e))?;
        Ok(())
    }

    fn broadcast_tensor(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.check_tensor(tensor)?;
        let count = tensor.numel();
        let pointer = tensor.data_ptr();
        // SAFETY: as for the all-reduce; root < world is checked by NCCL.
        unsafe {
            result::broadcast(pointer, pointer, count, sys::ncclDataType_t::ncclFloat32, root as i32, self.comm, std::ptr::null_mut())
        }
        .map_err(|e| nccl_error("broadcast", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this CPU machine the library still loads (it ships with the wheel): the NCCL path is
    /// verified up to loading it and reading its version; a communicator on the CPU is refused.
    #[test]
    fn the_library_loads_and_a_cpu_device_is_refused_cleanly() {
        if available() {
            let version = version().unwrap();
            println!("NCCL {version} loaded");
            assert!(version >= 20000, "NCCL 2.x, got {version}");
        } else {
            assert!(version().unwrap_err().to_string().contains("cannot be loaded"));
        }
        let error = NcclCommunicator::new(0, 1, &[0; UNIQUE_ID_BYTES], Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("NCCL needs a CUDA device"), "{error}");
    }
}
