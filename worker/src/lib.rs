//! Cohort's worker: runs the seed's models with tch on whatever device it has, for the
//! coordinator that leases it tasks.
//!
//! - [`daemon`]: the network side (register, lease, relay), on tokio.
//!   [`config`] is how it is set up; [`client`] the coordinator client it shares with [`blobs`].
//! - [`train`]: the recipes, run on a dedicated thread.
//! - [`model`], [`optim`], [`data`], [`checkpoint`]: what the recipes are built from.

pub mod allocator;
pub mod blobs;
pub mod checkpoint;
pub mod client;
pub mod collective;
pub mod command;
pub mod config;
pub mod daemon;
pub mod data;
pub mod generate;
pub mod host_threads;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod swd;
pub mod task;
pub mod train;
