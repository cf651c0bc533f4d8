//! The coordinator's Prometheus metrics (`serve --metrics-listen`).

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

/// Every metric the coordinator exports.
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    registry: Registry,
    /// Registered workers.
    pub workers_connected: IntGauge,
    /// Tasks waiting for a worker.
    pub tasks_queued: IntGauge,
    /// Tasks running.
    pub tasks_running: IntGauge,
    /// Leases that lapsed (a worker went silent).
    pub leases_expired: IntCounter,
    /// Time to hand a worker its task (lock, schedule, persist, load the spec).
    pub dispatch_latency: Histogram,
    /// Bytes of blobs stored.
    pub blob_bytes: IntGauge,
}

impl CoordinatorMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(gauge.clone())).expect("unique metric");
            gauge
        };
        let workers_connected = gauge("cohort_workers_connected", "Workers registered and heard from recently");
        let tasks_queued = gauge("cohort_tasks_queued", "Tasks waiting for a worker");
        let tasks_running = gauge("cohort_tasks_running", "Tasks running on workers");
        let blob_bytes = gauge("cohort_blob_bytes_stored", "Bytes of blobs (datasets, checkpoints, artifacts) stored");
        let leases_expired =
            IntCounter::new("cohort_leases_expired_total", "Leases that lapsed because their worker went silent").expect("valid metric");
        registry.register(Box::new(leases_expired.clone())).expect("unique metric");
        let buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];
        let dispatch_latency = Histogram::with_opts(
            HistogramOpts::new("cohort_dispatch_latency_seconds", "Time to lease a task to a worker").buckets(buckets),
        )
        .expect("valid metric");
        registry.register(Box::new(dispatch_latency.clone())).expect("unique metric");
        Self { registry, workers_connected, tasks_queued, tasks_running, leases_expired, dispatch_latency, blob_bytes }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).expect("utf-8 exposition")
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
