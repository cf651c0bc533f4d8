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
    /// GPU memory in use on the worker's device (CUDA workers).
    pub gpu_memory_used_bytes: IntGauge,
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
    let gpu_memory_used_bytes =
        IntGauge::new("cohort_worker_gpu_memory_used_bytes", "GPU memory in use on the worker's CUDA device (whole device, all processes)").expect("valid metric");
    for collector in [
        Box::new(step_seconds.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(all_reduce_seconds.clone()),
        Box::new(samples_per_second.clone()),
        Box::new(all_reduce_bytes.clone()),
        Box::new(epochs.clone()),
        Box::new(gpu_memory_used_bytes.clone()),
    ] {
        registry.register(collector).expect("unique metric");
    }
    WorkerMetrics { registry, step_seconds, samples_per_second, all_reduce_seconds, all_reduce_bytes, epochs, gpu_memory_used_bytes }
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

    /// Reads the CUDA device's memory in use (through the driver, loaded at run time); does
    /// nothing when the driver cannot be loaded.
    pub fn record_gpu_memory(&self, ordinal: usize) {
        #[allow(unsafe_code)]
        // SAFETY: only tries to dlopen the driver library under its candidate names.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            return;
        }
        if let Ok((free, total)) = cudarc::driver::CudaContext::new(ordinal).and_then(|context| context.mem_get_info()) {
            self.gpu_memory_used_bytes.set(total.saturating_sub(free) as i64);
        }
    }

    /// Records a finished epoch.
    pub fn epoch_done(&self, samples: u64, seconds: f64) {
        self.epochs.inc();
        if seconds > 0.0 {
            self.samples_per_second.set((samples as f64 / seconds) as i64);
        }
    }
}
