//! How a worker is set up: what the binary's flags make of it, for the daemon and for the
//! command trials it prepares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::auth::ConnectOptions;
use tch::Device;

/// How the daemon is set up; validated by the binary before it gets here.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How to reach the coordinator: URL (e.g. `http://127.0.0.1:50051`), token, TLS.
    pub connect: ConnectOptions,
    /// Name shown in `coordinator workers` and the results.
    pub name: String,
    /// Where tensors live.
    pub device: Device,
    /// Blob cache and scratch space.
    pub cache_dir: PathBuf,
    /// Interface the collective (ring) listener binds to, e.g. 0.0.0.0.
    pub collective_bind: std::net::IpAddr,
    /// Host peers dial for collectives (default: this machine's address on the route to the coordinator).
    pub advertise_host: Option<String>,
    /// A silent peer fails a collective after this long.
    pub collective_timeout: Duration,
    /// A fixed port for the collective listener (0: any free port), for network policies.
    pub collective_port: u16,
    /// On shutdown, how long the running task may take to finish its epoch and checkpoint.
    pub drain_timeout: Duration,
    /// Whether it runs command trials (user code): `--allow-commands`, off by default.
    pub allow_commands: bool,
    /// libtorch's thread count, set by each task's training thread as it starts (`None`: left
    /// as libtorch has it).
    pub threads: Option<Arc<crate::host_threads::ThreadPlan>>,
}
