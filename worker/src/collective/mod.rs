//! Collective communication between the replicas of a data-parallel gang.
//!
//! [`Communicator`] is what training code sees; [`ring::RingCommunicator`] implements it over
//! TCP (the default on CPU workers).

pub mod ring;

use std::time::Duration;

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

    /// Bytes sent so far (for metrics).
    fn bytes_sent(&self) -> u64;
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
