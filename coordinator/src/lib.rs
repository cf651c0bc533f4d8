//! Cohort's coordinator: plans sweeps, schedules their trials onto workers, keeps state in
//! SQLite and blobs on disk, and serves users and workers over gRPC.
//!
//! - [`sweep`], [`plan`]: the sweep file and what it expands to.
//! - [`scheduler`]: the pure scheduling state machine.
//! - [`store`], [`blobs`]: durable state.
//! - [`core`]: the two behind one lock; [`service`]: thin gRPC handlers over it.

pub mod auth;
pub mod blobs;
pub mod command;
pub mod console;
pub mod convert;
pub mod core;
pub mod dataset;
pub mod domain;
pub mod events;
pub mod grpc_gate;
pub mod metrics;
pub mod plan;
pub mod prune;
pub mod report;
pub mod scheduler;
pub mod selection;
pub mod server;
pub mod service;
pub mod store;
pub mod sweep;
