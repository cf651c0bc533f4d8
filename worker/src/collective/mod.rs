//! Collective communication between the replicas of a data-parallel gang.
//!
//! [`Communicator`] is what training code sees. On CPU workers [`ring::RingCommunicator`]
//! implements it: through shared memory between ranks on one host ([`shm`]), over a TCP ring
//! ([`ring`]) between hosts, hierarchically when both occur ([`hierarchical`]); it picks its path
//! from the gang's addresses ([`topology`]). [`nccl`] reduces on GPUs.

pub mod hierarchical;
pub mod nccl;
pub mod ring;
pub mod shm;
pub mod topology;

use std::time::Duration;

use crate::task::CollectiveBackend;
use tch::Tensor;

/// Why a collective failed. A failed collective ends the gang's attempt (infrastructure error).
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Network trouble with a peer: refused, reset, closed, or silent past the timeout.
    #[error("collective with rank {peer}: {source}")]
    Peer {
        /// The peer's rank.
        peer: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A connection that did not present the gang's secret, or the expected rank.
    #[error("rejected a connection: {0}")]
    Handshake(String),
    /// The gang cannot be set up as described.
    #[error("bad gang: {0}")]
    Setup(String),
    /// The caller's stop flag was set before the gang formed (cancel, lease lost, shutdown).
    #[error("stopped on request")]
    Stopped,
}

/// How replicas exchange tensors. Every rank calls the same collectives in the same order.
pub trait Communicator: Send {
    /// This replica's rank, `0..world()`.
    fn rank(&self) -> usize;

    /// The number of replicas.
    fn world(&self) -> usize;

    /// Replaces `data` on every rank by the element-wise sum over ranks; every rank ends with
    /// bitwise identical values.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// [`Communicator::all_reduce_sum`] on a contiguous float32 tensor, in place. The default
    /// goes through host memory; a device backend (NCCL) reduces on the device.
    fn all_reduce_sum_tensor(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let mut host = host_copy(tensor);
        self.all_reduce_sum(&mut host)?;
        write_back(tensor, &host);
        Ok(())
    }

    /// [`Communicator::broadcast`] on a contiguous float32 tensor, in place.
    fn broadcast_tensor(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let mut host = host_copy(tensor);
        self.broadcast(&mut host, root)?;
        write_back(tensor, &host);
        Ok(())
    }
}

/// A tensor's values as host float32, flattened.
pub(crate) fn host_copy(tensor: &Tensor) -> Vec<f32> {
    let flat = tensor.detach().flatten(0, -1).to_device(tch::Device::Cpu).to_kind(tch::Kind::Float);
    Vec::<f32>::try_from(&flat).expect("float tensor to host")
}

fn write_back(tensor: &mut Tensor, values: &[f32]) {
    let source = Tensor::from_slice(values).view(tensor.size().as_slice()).to_device(tensor.device()).to_kind(tensor.kind());
    tch::no_grad(|| tensor.copy_(&source));
}

/// Which collective backend a gang uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Host memory: shared memory within a host, a TCP ring across hosts ([`ring::RingCommunicator`]).
    Ring,
    /// NCCL on the GPUs.
    Nccl,
}

impl Backend {
    /// Resolves the configured backend: `auto` is NCCL on CUDA workers whose NCCL library
    /// loads, the ring otherwise.
    pub fn resolve(configured: CollectiveBackend, device: tch::Device) -> Backend {
        match configured {
            CollectiveBackend::Ring => Backend::Ring,
            CollectiveBackend::Nccl => Backend::Nccl,
            CollectiveBackend::Auto if matches!(device, tch::Device::Cuda(_)) && nccl::available() => Backend::Nccl,
            CollectiveBackend::Auto => Backend::Ring,
        }
    }
}

/// Settings shared by every collective backend.
#[derive(Debug, Clone)]
pub struct GangSettings {
    /// This replica's rank.
    pub rank: usize,
    /// Every member's collective address, by rank.
    pub peers: Vec<String>,
    /// Proves membership on connect: a connection that does not present it is refused.
    pub secret: String,
    /// A peer silent for this long fails the collective (so no member hangs forever).
    pub timeout: Duration,
}
