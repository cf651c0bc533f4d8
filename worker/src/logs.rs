//! Forwarding the worker's log lines about a trial to the coordinator, which keeps them for
//! `coordinator logs`. A tracing layer copies every INFO-or-more-severe event emitted while a
//! task runs into a bounded buffer; the daemon ships the buffer with its heartbeats.

use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use cohort_proto::v1::LogLine;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Lines kept between two shipments at most (older ones are dropped, and the drop is said).
const MAX_BUFFERED: usize = 5_000;

#[derive(Debug, Default)]
struct State {
    task: Option<(String, u32)>,
    lines: Vec<LogLine>,
    dropped: usize,
}

/// The process's buffer of lines for the running task.
#[derive(Debug, Default)]
pub struct LogBuffer {
    state: Mutex<State>,
}

/// The process's log buffer.
pub fn buffer() -> &'static LogBuffer {
    static BUFFER: OnceLock<LogBuffer> = OnceLock::new();
    BUFFER.get_or_init(LogBuffer::default)
}

impl LogBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts collecting lines for a task.
    pub fn start(&self, task_id: &str, attempt: u32) {
        let mut state = self.lock();
        *state = State { task: Some((task_id.to_string(), attempt)), ..State::default() };
    }

    /// Stops collecting (what was not taken is discarded).
    pub fn stop(&self) {
        *self.lock() = State::default();
    }

    /// Takes the lines collected so far, with their task and attempt.
    pub fn take(&self) -> Option<(String, u32, Vec<LogLine>)> {
        let mut state = self.lock();
        let (task_id, attempt) = state.task.clone()?;
        let mut lines = std::mem::take(&mut state.lines);
        if state.dropped > 0 {
            lines.insert(
                0,
                LogLine { unix_ms: now_ms(), level: "WARN".into(), message: format!("{} log lines dropped (buffer full)", state.dropped) },
            );
            state.dropped = 0;
        }
        (!lines.is_empty()).then_some((task_id, attempt, lines))
    }

    /// Adds a line of the running task's own output (a command trial's stdout and stderr); a
    /// no-op when no task runs.
    pub fn append(&self, level: &str, message: String) {
        self.push(LogLine { unix_ms: now_ms(), level: level.to_string(), message });
    }

    fn push(&self, line: LogLine) {
        let mut state = self.lock();
        if state.task.is_none() {
            return;
        }
        if state.lines.len() >= MAX_BUFFERED {
            state.lines.remove(0);
            state.dropped += 1;
        }
        state.lines.push(line);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Collects an event's message and fields as `message key=value …`.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// The tracing layer that copies events into [`buffer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardLayer;

impl<S: Subscriber> Layer<S> for ForwardLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::INFO {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        buffer().push(LogLine { unix_ms: now_ms(), level: level.to_string(), message: format!("{}{}", line.message, line.fields) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_only_while_a_task_runs_and_bounded() {
        let buffer = LogBuffer::default();
        buffer.push(LogLine { unix_ms: 1, level: "INFO".into(), message: "before".into() });
        assert!(buffer.take().is_none());
        buffer.start("t1", 2);
        for i in 0..MAX_BUFFERED + 3 {
            buffer.push(LogLine { unix_ms: 1, level: "INFO".into(), message: format!("line {i}") });
        }
        let (task, attempt, lines) = buffer.take().unwrap();
        assert_eq!((task.as_str(), attempt), ("t1", 2));
        assert_eq!(lines.len(), MAX_BUFFERED + 1);
        assert!(lines[0].message.contains("3 log lines dropped"));
        assert_eq!(lines.last().unwrap().message, format!("line {}", MAX_BUFFERED + 2));
        assert!(buffer.take().is_none(), "taken");
        buffer.stop();
        buffer.push(LogLine { unix_ms: 1, level: "INFO".into(), message: "after".into() });
        assert!(buffer.take().is_none());
    }
}
