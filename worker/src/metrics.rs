//! The worker's Prometheus metrics (`worker --metrics-listen`): training step time and
//! throughput, all-reduce time and bytes, and where the worker's time goes ([`PhaseClock`]).
//! Process-wide, so recipes and collectives record into them from the training thread without
//! plumbing.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use prometheus::{Counter, CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder};

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
    /// Seconds of the worker's life by phase (`cohort_worker_seconds_total{phase}`).
    pub phases: PhaseClock,
}

fn build() -> WorkerMetrics {
    let registry = Registry::new();
    let buckets = prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
    let step_seconds =
        Histogram::with_opts(HistogramOpts::new("cohort_worker_step_seconds", "Seconds per training step").buckets(buckets.clone()))
            .expect("valid metric");
    let all_reduce_seconds =
        Histogram::with_opts(HistogramOpts::new("cohort_worker_all_reduce_seconds", "Seconds per gradient all-reduce").buckets(buckets))
            .expect("valid metric");
    let samples_per_second =
        IntGauge::with_opts(Opts::new("cohort_worker_samples_per_second", "Training samples per second in the last epoch"))
            .expect("valid metric");
    let all_reduce_bytes = IntCounter::new("cohort_worker_all_reduce_bytes_total", "Bytes of gradients all-reduced").expect("valid metric");
    let epochs = IntCounter::new("cohort_worker_epochs_total", "Training epochs finished").expect("valid metric");
    let gpu_memory_used_bytes =
        IntGauge::new("cohort_worker_gpu_memory_used_bytes", "GPU memory in use on the worker's CUDA device (whole device, all processes)")
            .expect("valid metric");
    let phase_seconds = CounterVec::new(
        Opts::new(
            "cohort_worker_seconds_total",
            "Seconds of the worker's life by phase: train, data, checkpoint, coordinator, idle (they sum to its uptime)",
        ),
        &["phase"],
    )
    .expect("valid metric");
    let phases = PhaseClock::new(&phase_seconds);
    for collector in [
        Box::new(phase_seconds) as Box<dyn prometheus::core::Collector>,
        Box::new(step_seconds.clone()),
        Box::new(all_reduce_seconds.clone()),
        Box::new(samples_per_second.clone()),
        Box::new(all_reduce_bytes.clone()),
        Box::new(epochs.clone()),
        Box::new(gpu_memory_used_bytes.clone()),
    ] {
        registry.register(collector).expect("unique metric");
    }
    WorkerMetrics {
        registry,
        step_seconds,
        samples_per_second,
        all_reduce_seconds,
        all_reduce_bytes,
        epochs,
        gpu_memory_used_bytes,
        phases,
    }
}

/// The process's metrics.
pub fn metrics() -> &'static WorkerMetrics {
    static METRICS: OnceLock<WorkerMetrics> = OnceLock::new();
    METRICS.get_or_init(build)
}

impl WorkerMetrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        // The phase in progress is counted up to now, so the phases sum to the uptime.
        self.phases.flush();
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

/// What the worker is doing at a moment; every moment of its life is in exactly one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward and backward passes, optimizer steps, evaluation, model set-up (the training
    /// thread; collectives of data-parallel tasks included).
    Train,
    /// Fetching the dataset's blobs, decoding, splitting and augmenting it.
    Data,
    /// Fetching and reading checkpoints to resume or start from; writing checkpoints and
    /// artifacts before they are handed to the daemon for upload.
    Checkpoint,
    /// Waiting on the coordinator with work in hand: the acquire right after a task (dispatch),
    /// the rendezvous, uploads and reports the task's end waits for, its completion report.
    /// Uploads and reports sent while the training thread runs overlap training and count there.
    Coordinator,
    /// Waiting for work: acquire long-polls while the coordinator has no task for this worker.
    Idle,
}

impl Phase {
    /// Every phase, in the order of [`PhaseClock`]'s counters.
    pub const ALL: [Phase; 5] = [Phase::Train, Phase::Data, Phase::Checkpoint, Phase::Coordinator, Phase::Idle];

    /// The value of the `phase` label.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Train => "train",
            Phase::Data => "data",
            Phase::Checkpoint => "checkpoint",
            Phase::Coordinator => "coordinator",
            Phase::Idle => "idle",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Accounts the worker's wall time (monotonic clock) to its current [`Phase`]: a switch adds the
/// time since the previous switch to the phase that ends. The training thread switches while it
/// runs a task, the daemon before and after, so the phases never overlap and sum to the time
/// since the clock was made. A switch is a lock and an `Instant::now`: a few per epoch, none per
/// batch.
#[derive(Debug)]
pub struct PhaseClock {
    current: Mutex<(Phase, Instant)>,
    seconds: [Counter; 5],
}

/// Returns the clock to the phase it was in when [`PhaseClock::enter`] made it.
#[derive(Debug)]
#[must_use = "the phase ends when the guard is dropped"]
pub struct PhaseGuard<'a> {
    clock: &'a PhaseClock,
    previous: Phase,
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        self.clock.switch(self.previous);
    }
}

impl PhaseClock {
    /// A clock in [`Phase::Idle`] from now on, counting into `seconds`' series (label `phase`).
    pub fn new(seconds: &CounterVec) -> Self {
        Self {
            current: Mutex::new((Phase::Idle, Instant::now())),
            seconds: Phase::ALL.map(|phase| seconds.with_label_values(&[phase.label()])),
        }
    }

    /// Ends the current phase and starts `next`; returns the phase that ended.
    pub fn switch(&self, next: Phase) -> Phase {
        self.switch_at(next, Instant::now())
    }

    /// Starts `phase` until the returned guard is dropped, then returns to the current phase.
    pub fn enter(&self, phase: Phase) -> PhaseGuard<'_> {
        PhaseGuard { clock: self, previous: self.switch(phase) }
    }

    /// The phase in progress.
    pub fn current(&self) -> Phase {
        self.lock().0
    }

    /// Seconds counted to `phase` so far (up to the last switch or flush).
    pub fn seconds(&self, phase: Phase) -> f64 {
        self.seconds[phase.index()].get()
    }

    /// Counts the phase in progress up to now, without ending it.
    pub fn flush(&self) {
        self.account_at(None, Instant::now());
    }

    fn switch_at(&self, next: Phase, now: Instant) -> Phase {
        self.account_at(Some(next), now)
    }

    /// Counts the time since the last switch to the current phase, restarts the interval at
    /// `now` in `next` (the same phase when `None`), and returns the phase counted to. One lock,
    /// so a flush never undoes another thread's switch.
    fn account_at(&self, next: Option<Phase>, now: Instant) -> Phase {
        let mut current = self.lock();
        let (phase, since) = *current;
        self.seconds[phase.index()].inc_by(now.saturating_duration_since(since).as_secs_f64());
        *current = (next.unwrap_or(phase), now);
        phase
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Phase, Instant)> {
        // A panic elsewhere while holding the lock leaves a valid (phase, instant) pair behind.
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn clock() -> PhaseClock {
        PhaseClock::new(&CounterVec::new(Opts::new("seconds_total", "test"), &["phase"]).unwrap())
    }

    #[test]
    fn each_interval_goes_to_the_phase_that_ends() {
        let clock = clock();
        let start = clock.lock().1;
        let at = |millis| start + Duration::from_millis(millis);
        assert_eq!(clock.switch_at(Phase::Data, at(1_000)), Phase::Idle);
        clock.switch_at(Phase::Train, at(1_250));
        clock.switch_at(Phase::Checkpoint, at(4_250));
        clock.switch_at(Phase::Train, at(4_500));
        clock.switch_at(Phase::Coordinator, at(6_500));
        clock.switch_at(Phase::Idle, at(7_000));
        let expected = [(Phase::Train, 5.0), (Phase::Data, 0.25), (Phase::Checkpoint, 0.25), (Phase::Coordinator, 0.5), (Phase::Idle, 1.0)];
        for (phase, seconds) in expected {
            assert!((clock.seconds(phase) - seconds).abs() < 1e-9, "{}: {}", phase.label(), clock.seconds(phase));
        }
        let total: f64 = Phase::ALL.iter().map(|&phase| clock.seconds(phase)).sum();
        assert!((total - 7.0).abs() < 1e-9, "the phases sum to the elapsed time: {total}");
    }

    #[test]
    fn a_guard_returns_to_the_enclosing_phase() {
        let clock = clock();
        clock.switch(Phase::Train);
        {
            let _data = clock.enter(Phase::Data);
            assert_eq!(clock.current(), Phase::Data);
            {
                let _checkpoint = clock.enter(Phase::Checkpoint);
                assert_eq!(clock.current(), Phase::Checkpoint);
            }
            assert_eq!(clock.current(), Phase::Data);
        }
        assert_eq!(clock.current(), Phase::Train);
    }

    #[test]
    fn the_exposition_names_every_phase() {
        let text = metrics().render();
        for phase in Phase::ALL {
            assert!(text.contains(&format!("cohort_worker_seconds_total{{phase=\"{}\"}}", phase.label())), "{text}");
        }
    }
}
