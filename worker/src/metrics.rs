//! The worker's Prometheus metrics (`worker --metrics-listen`): training step time and
//! throughput, all-reduce time and bytes. Process-wide, so recipes and collectives record into
//! them from the training thread without plumbing.

use std::sync::OnceLock;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the worker exports.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    /// Seconds per optimizer step (forward, backward, collectives, update).
    pub step_seconds: Histogram,
    /// Training samples per second over the last epoch.
    pub samples_per_second: IntGauge,
    /// Seconds per all-reduce.
    pub all_reduce_seconds: Histogram,
    /// Bytes all-reduced.
    pub all_reduce_bytes: IntCounter,
    /// Epochs finished.
    pub epochs: IntCounter,
}

fn build() -> WorkerMetrics {
    let registry = Registry::new();
    let buckets = prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
    let step_seconds = Histogram::with_opts(HistogramOpts::new("cohort_worker_step_seconds", "Seconds per training step").buckets(buckets.clone())).expect("valid metric");
    let all_reduce_seconds =
        Histogram::with_opts(HistogramOpts::new("cohort_worker_all_reduce_seconds", "Seconds per gradient all-reduce").buckets(buckets)).expect("valid metric");
    let samples_per_second = IntGauge::with_opts(Opts::new("cohort_worker_samples_per_second", "Training samples per second in the last epoch")).expect("valid metric");
    let all_reduce_bytes = IntCounter::new("cohort_worker_all_reduce_bytes_total", "Bytes of gradients all-reduced").expect("valid metric");
    let epochs = IntCounter::new("cohort_worker_epochs_total", "Training epochs finished").expect("valid metric");
    for collector in [
        Box::new(step_seconds.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(all_reduce_seconds.clone()),
        Box::new(samples_per_second.clone()),
        Box::new(all_reduce_bytes.clone()),
        Box::new(epochs.clone()),
    ] {
        registry.register(collector).expect("unique metric");
    }
    WorkerMetrics { registry, step_seconds, samples_per_second, all_reduce_seconds, all_reduce_bytes, epochs }
}

/// The process's metrics.
pub fn metrics() -> &'static WorkerMetrics {
    static METRICS: OnceLock<WorkerMetrics> = OnceLock::new();
    METRICS.get_or_init(build)
}

impl WorkerMetrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).expect("utf-8 exposition")
    }

    /// Records a finished epoch.
    pub fn epoch_done(&self, samples: u64, seconds: f64) {
        self.epochs.inc();
        if seconds > 0.0 {
            self.samples_per_second.set((samples as f64 / seconds) as i64);
        }
    }
}
