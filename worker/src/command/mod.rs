//! Command trials: the user's own training program, run as a child process with Cohort's
//! contract (docs/commands.md).
//!
//! Like a built-in recipe, a command trial runs on the daemon's dedicated training thread and
//! reports through [`Events`]: each `cohort-metrics` line becomes an epoch report, each changed
//! checkpoint folder (rank 0, after a metrics line) a checkpoint, and the daemon relays them
//! through the same lease-checked calls. The process itself is started and stopped by
//! [`process`], its environment comes from [`env`], its folders and checkpoint bundles from
//! [`files`], and its metrics lines are parsed by [`report`].
//!
//! Failures are classified as the coordinator expects: a non-zero exit, a refused metrics line
//! or a broken limit is the program's (user) error; a signal the worker did not send, the
//! timeout, or local disk trouble is the machine's (infrastructure) error, retried elsewhere.

pub mod env;
pub mod files;
pub mod prepare;
pub mod process;
pub mod report;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::task::Task;
use crate::train::{self, EpochReport, Events, TrainError, TrainEvent};

use files::{FilesError, RunDirs};
use process::{Output, Program, Stream};

pub use env::Rendezvous;

/// Between SIGTERM and SIGKILL when the worker stops a program.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The most bytes of output one attempt may log; past it, lines are counted but not shipped.
pub const MAX_LOG_BYTES: usize = 32 << 20;

/// The longest output line shipped to the trial's log (longer ones are cut and marked).
pub const MAX_LOG_LINE_CHARS: usize = 4000;

/// How many of the last stderr lines a failure message quotes.
const QUOTED_STDERR_LINES: usize = 8;

/// What a command trial needs besides the task, prepared by the daemon.
#[derive(Debug, Clone)]
pub struct CommandInputs {
    /// The `[command] files`: relative name → local (cached) path.
    pub files: Vec<(String, PathBuf)>,
    /// The unpacked dataset (`COHORT_DATA`), when the sweep has one.
    pub data_dir: Option<PathBuf>,
    /// The latest stored checkpoint bundle, on a retry.
    pub resume_from: Option<PathBuf>,
    /// The attempt's own folder (created fresh, removed at the end).
    pub run_root: PathBuf,
    /// Where checkpoint bundles are written before upload.
    pub scratch_dir: PathBuf,
    /// A gang's meeting point.
    pub rendezvous: Option<Rendezvous>,
    /// `CUDA_VISIBLE_DEVICES`.
    pub cuda_visible_devices: String,
    /// `OMP_NUM_THREADS`.
    pub threads: usize,
}

fn files_error(error: FilesError) -> TrainError {
    match error {
        FilesError::Refused(message) => TrainError::Program(message),
        FilesError::Io { .. } => TrainError::Infrastructure(cohort_proto::errors::error_chain(&error)),
    }
}

/// Removes the attempt's folders however the run ends.
struct Cleanup(RunDirs);

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Ships output lines to the trial's log, within [`MAX_LOG_BYTES`].
#[derive(Default)]
struct LogVolume {
    shipped: usize,
    dropped: usize,
}

impl LogVolume {
    fn ship(&mut self, stream: Stream, mut line: String) {
        if self.shipped >= MAX_LOG_BYTES {
            self.dropped += 1;
            return;
        }
        if let Some((cut, _)) = line.char_indices().nth(MAX_LOG_LINE_CHARS) {
            line.truncate(cut);
            line.push_str(" … (line cut)");
        }
        self.shipped += line.len();
        let level = if stream == Stream::Stderr { "STDERR" } else { "STDOUT" };
        crate::logs::buffer().append(level, line);
        if self.shipped >= MAX_LOG_BYTES {
            crate::logs::buffer()
                .append("WARN", format!("the program logged {MAX_LOG_BYTES} bytes, the limit of one attempt: further output is not kept"));
        }
    }
}

/// The program's argv with a relative path to a program (`./train.sh`) made relative to the
/// working directory, as the user means it.
fn argv(run: &[String], work: &Path) -> Vec<String> {
    let mut argv = run.to_vec();
    if let Some(first) = argv.first_mut() {
        if first.contains('/') && Path::new(first.as_str()).is_relative() {
            *first = work.join(&*first).display().to_string();
        }
    }
    argv
}

/// Runs the task's program to its end, reporting through `events`.
pub fn run(task: &Task, inputs: &CommandInputs, events: &mut Events<'_>) -> Result<(), TrainError> {
    let command = task.spec.command.as_ref().ok_or_else(|| TrainError::Invalid("a command trial without its program".into()))?;
    let dirs = RunDirs::create(inputs.run_root.clone()).map_err(files_error)?;
    let cleanup = Cleanup(dirs.clone());
    files::copy_files(&inputs.files, &dirs.work).map_err(files_error)?;
    let resume_dir = match &inputs.resume_from {
        Some(bundle) => {
            files::unpack(bundle, &dirs.resume).map_err(files_error)?;
            tracing::info!(task = %task.id, "resuming from the latest stored checkpoint");
            Some(dirs.resume.as_path())
        }
        None => None,
    };
    let env_inputs = env::EnvInputs {
        data_dir: inputs.data_dir.as_deref(),
        checkpoint_dir: &dirs.checkpoint,
        resume_dir,
        tmp_dir: &dirs.tmp,
        rendezvous: inputs.rendezvous.as_ref(),
        cuda_visible_devices: inputs.cuda_visible_devices.clone(),
        threads: inputs.threads,
    };
    // vars_os: a variable that is not UTF-8 is skipped, not a panic.
    let inherited = std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    let environment = env::build(task, &env_inputs, inherited);
    let argv = argv(&command.run, &dirs.work);
    let (sender, receiver) = mpsc::channel();
    let started = Instant::now();
    let mut program = process::spawn(&argv, &dirs.work, &environment, sender)
        .map_err(|error| TrainError::Program(format!("cannot start {:?}: {error}", argv[0])))?;
    tracing::info!(task = %task.id, pid = program.pid(), program = %argv.join(" "), "command started");
    let mut supervisor = Supervisor {
        task,
        inputs,
        dirs: &dirs,
        events,
        program: &mut program,
        started,
        timeout: command.timeout(),
        state: State::default(),
    };
    let result = supervisor.supervise(&receiver);
    drop(supervisor);
    // Whatever the program left behind in its group goes with it.
    program.kill_group();
    drop(cleanup);
    result
}

/// What a run has seen so far.
#[derive(Default)]
struct State {
    last_epoch: u32,
    last_epoch_at: Option<Instant>,
    last_checkpoint: Option<String>,
    logs: LogVolume,
    stderr_tail: VecDeque<String>,
    closed: usize,
}

struct Supervisor<'r, 'e, 'a> {
    task: &'r Task,
    inputs: &'r CommandInputs,
    dirs: &'r RunDirs,
    events: &'r mut Events<'e>,
    program: &'a mut Program,
    started: Instant,
    timeout: Option<Duration>,
    state: State,
}

impl Supervisor<'_, '_, '_> {
    /// Reads the program's output until it ends or must be stopped.
    fn supervise(&mut self, receiver: &mpsc::Receiver<Output>) -> Result<(), TrainError> {
        loop {
            if let Some(outcome) = self.check_stop() {
                return outcome;
            }
            match receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(output) => {
                    if let Err(error) = self.handle(output) {
                        self.program.stop(STOP_GRACE);
                        return Err(error);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.state.closed == 2 {
                break;
            }
        }
        // Both streams ended: the program is exiting (or closed them and runs on).
        let status = loop {
            if let Some(outcome) = self.check_stop() {
                return outcome;
            }
            if let Some(status) = self.program.wait_for(Duration::from_millis(100)) {
                break status;
            }
        };
        match process::describe(status) {
            None => self.finish(),
            Some((user, how)) => {
                let mut message = format!("{:?} {how}", self.task.spec.command.as_ref().map_or("", |c| c.run[0].as_str()));
                if !self.state.stderr_tail.is_empty() {
                    message.push_str(&format!("; last lines of stderr:\n{}", Vec::from(self.state.stderr_tail.clone()).join("\n")));
                }
                Err(if user { TrainError::Program(message) } else { TrainError::Infrastructure(message) })
            }
        }
    }

    /// Stops the program when the daemon asks (cancel, lease lost, drain) or the timeout passes.
    fn check_stop(&mut self) -> Option<Result<(), TrainError>> {
        let stop = self.events.stop.load(Ordering::Relaxed);
        let drain = self.events.drain.load(Ordering::Relaxed);
        let timed_out = self.timeout.is_some_and(|limit| self.started.elapsed() >= limit);
        if !(stop || drain || timed_out) {
            return None;
        }
        tracing::info!(task = %self.task.id, stop, drain, timed_out, "stopping the command's process group");
        self.program.stop(STOP_GRACE);
        if timed_out && !stop && !drain {
            let minutes = self.timeout.map_or(0, |t| t.as_secs() / 60);
            return Some(Err(TrainError::Infrastructure(format!(
                "the attempt passed its timeout of {minutes} minutes ([command] timeout_minutes)"
            ))));
        }
        Some(Err(TrainError::Stopped))
    }

    fn handle(&mut self, output: Output) -> Result<(), TrainError> {
        match output {
            Output::Closed(_) => self.state.closed += 1,
            Output::TooLong(stream, head, length) => {
                if stream == Stream::Stdout && head.starts_with(report::PREFIX) {
                    return Err(TrainError::Program(format!(
                        "a cohort-metrics line of {length} bytes, more than the limit of {} bytes: report a few scalars per epoch",
                        report::MAX_METRICS_LINE_BYTES
                    )));
                }
                self.state.logs.ship(stream, format!("{head} … ({length} bytes, cut)"));
            }
            Output::Line(Stream::Stdout, line) => match report::parse_line(&line) {
                Some(parsed) => {
                    let parsed = parsed.map_err(|error| TrainError::Program(error.to_string()))?;
                    if self.task.rank == 0 {
                        self.record(parsed)?;
                    } else {
                        // A gang's epochs are rank 0's; the others' lines stay in the log.
                        self.state.last_epoch = parsed.epoch;
                        self.state.logs.ship(Stream::Stdout, line);
                    }
                }
                None => self.state.logs.ship(Stream::Stdout, line),
            },
            Output::Line(Stream::Stderr, line) => {
                if self.state.stderr_tail.len() == QUOTED_STDERR_LINES {
                    self.state.stderr_tail.pop_front();
                }
                self.state.stderr_tail.push_back(line.chars().take(300).collect());
                self.state.logs.ship(Stream::Stderr, line);
            }
        }
        Ok(())
    }

    /// Records an epoch (rank 0), then uploads the checkpoint folder if it changed.
    fn record(&mut self, parsed: report::Report) -> Result<(), TrainError> {
        let planned = self.task.spec.config.epochs;
        if parsed.epoch > planned {
            return Err(TrainError::Program(format!(
                "cohort-metrics epoch {} is past the trial's {planned} epochs (COHORT_EPOCHS)",
                parsed.epoch
            )));
        }
        let now = Instant::now();
        let seconds = now.duration_since(self.state.last_epoch_at.unwrap_or(self.started)).as_secs_f64();
        self.state.last_epoch_at = Some(now);
        self.state.last_epoch = parsed.epoch;
        let samples = parsed.values.iter().find(|(name, _)| name == "samples").map_or(0, |&(_, v)| v.max(0.0) as u64);
        train::report_epoch(self.events, EpochReport { epoch: parsed.epoch, values: parsed.values, seconds, samples });
        self.checkpoint(parsed.epoch, false)
    }

    /// Packs the checkpoint folder and announces it, unless it is empty or unchanged since the
    /// last one (a final checkpoint is announced even unchanged).
    fn checkpoint(&mut self, epoch: u32, is_final: bool) -> Result<(), TrainError> {
        let _phase = train::phase(crate::metrics::Phase::Checkpoint);
        std::fs::create_dir_all(&self.inputs.scratch_dir).map_err(|e| TrainError::Infrastructure(format!("scratch folder: {e}")))?;
        let suffix = if is_final { "final" } else { "e" };
        let path = self.inputs.scratch_dir.join(format!("{}-a{}-{suffix}{epoch}.bundle", self.task.id, self.task.attempt));
        let Some(hash) = files::pack(&self.dirs.checkpoint, &path).map_err(files_error)? else {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        };
        if !is_final && self.state.last_checkpoint.as_deref() == Some(hash.as_str()) {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        self.state.last_checkpoint = Some(hash);
        (self.events.emit)(TrainEvent::Checkpoint { epoch, path, is_final });
        Ok(())
    }

    /// After exit 0: the final checkpoint (rank 0).
    fn finish(&mut self) -> Result<(), TrainError> {
        if self.state.last_epoch == 0 {
            tracing::warn!(task = %self.task.id, "the program exited without a cohort-metrics line: the trial has no figures");
        }
        if self.task.rank == 0 && self.state.last_epoch > 0 {
            self.checkpoint(self.state.last_epoch, true)?;
        }
        tracing::info!(task = %self.task.id, epochs = self.state.last_epoch, seconds = self.started.elapsed().as_secs_f64(), "command finished");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_program_path_is_the_working_directorys() {
        let work = Path::new("/run/work");
        assert_eq!(argv(&["./train.sh".into(), "x".into()], work), vec!["/run/work/./train.sh".to_string(), "x".to_string()]);
        assert_eq!(argv(&["python3".into(), "train.py".into()], work)[0], "python3");
        assert_eq!(argv(&["/usr/bin/python3".into()], work)[0], "/usr/bin/python3");
    }
}
