//! The program's process: started without a shell in a process group of its own, its output
//! read line by line (each line bounded) on reader threads, and the whole group stopped with
//! SIGTERM, then SIGKILL after a grace period.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest line kept whole; longer lines arrive as [`Output::TooLong`].
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// What the reader threads send.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A line (without its newline; invalid UTF-8 replaced).
    Line(Stream, String),
    /// A line longer than [`MAX_LINE_BYTES`]: its first bytes and its whole length.
    TooLong(Stream, String, usize),
    /// The stream ended.
    Closed(Stream),
}

/// A running program in its own process group.
#[derive(Debug)]
pub struct Program {
    child: Child,
    /// The group's id (the child's pid).
    group: i32,
    done: Option<ExitStatus>,
}

/// Starts `argv` in `cwd` with exactly `env`, in a new process group, its output read by two
/// threads that send to `sender`.
pub fn spawn(argv: &[String], cwd: &Path, env: &[(String, String)], sender: mpsc::Sender<Output>) -> std::io::Result<Program> {
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process. It asks the
    // kernel to SIGKILL the program if the thread that started it dies (the worker killed with
    // -9), so no trial trains on as an orphan of a dead worker.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let group = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    for (stream, reader) in [(Stream::Stdout, Box::new(stdout) as Box<dyn Read + Send>), (Stream::Stderr, Box::new(stderr))] {
        let sender = sender.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("command-{stream:?}").to_lowercase())
            .spawn(move || read_lines(stream, reader, &sender));
        if let Err(error) = spawned {
            let mut program = Program { child, group, done: None };
            program.stop(Duration::ZERO);
            return Err(error);
        }
    }
    Ok(Program { child, group, done: None })
}

/// Reads `reader` line by line until it ends, keeping at most [`MAX_LINE_BYTES`] of a line.
fn read_lines(stream: Stream, reader: Box<dyn Read + Send>, sender: &mpsc::Sender<Output>) {
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut length = 0usize;
    loop {
        let buffer = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buffer) => buffer,
        };
        let (chunk, ends_line) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (&buffer[..end], true),
            None => (buffer, false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        length += chunk.len();
        let consumed = chunk.len() + usize::from(ends_line);
        reader.consume(consumed);
        if ends_line && sender.send(finish(stream, &mut line, &mut length)).is_err() {
            return;
        }
    }
    if length > 0 {
        let _ = sender.send(finish(stream, &mut line, &mut length));
    }
    let _ = sender.send(Output::Closed(stream));
}

fn finish(stream: Stream, line: &mut Vec<u8>, length: &mut usize) -> Output {
    if line.last() == Some(&b'\r') && *length <= MAX_LINE_BYTES {
        line.pop();
    }
    let text = String::from_utf8_lossy(line).into_owned();
    let output = if *length > MAX_LINE_BYTES { Output::TooLong(stream, text, *length) } else { Output::Line(stream, text) };
    line.clear();
    *length = 0;
    output
}

fn signal_group(group: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
    unsafe {
        libc::kill(-group, signal);
    }
}

impl Program {
    /// The program's pid (its process group's id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
        }
        self.done
    }

    /// Waits for it to exit, at most `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the whole group: SIGTERM, then SIGKILL once `grace` has passed. Returns the
    /// program's exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            signal_group(self.group, libc::SIGTERM);
            self.wait_for(grace);
        }
        self.kill_group();
        self.wait_for(Duration::from_secs(5))
    }

    /// SIGKILLs whatever is left of the group (children the program left behind, even after it
    /// exited on its own).
    pub fn kill_group(&mut self) {
        signal_group(self.group, libc::SIGKILL);
        if self.done.is_none() {
            let _ = self.child.kill();
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.wait_for(Duration::from_secs(5));
    }
}

/// How the program ended, as a failure message: `None` for exit 0.
pub fn describe(status: ExitStatus) -> Option<(bool, String)> {
    if status.success() {
        return None;
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => Some((true, format!("exited with status {code}"))),
        (None, Some(signal)) => Some((false, format!("killed by signal {signal}"))),
        _ => Some((false, format!("ended with {status}"))),
    }
}

/// The pids of the live processes (not zombies waiting for a reaper) in process group `group`:
/// what a stopped program must leave none of (the tests of stopping and cancelling check it).
pub fn live_group_members(group: u32) -> Vec<u32> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group) && fields.first() != Some(&"Z") {
            live.push(pid);
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str) -> (Program, mpsc::Receiver<Output>) {
        let (sender, receiver) = mpsc::channel();
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let program = spawn(&argv, Path::new("/tmp"), &[("PATH".into(), "/usr/bin:/bin".into())], sender).unwrap();
        (program, receiver)
    }

    fn collect(receiver: &mpsc::Receiver<Output>) -> Vec<Output> {
        let mut seen = Vec::new();
        let mut closed = 0;
        while closed < 2 {
            let output = receiver.recv_timeout(Duration::from_secs(10)).expect("output");
            if matches!(output, Output::Closed(_)) {
                closed += 1;
            }
            seen.push(output);
        }
        seen
    }

    #[test]
    fn lines_arrive_bounded_and_the_environment_is_exactly_the_one_given() {
        let (mut program, receiver) = run("echo one; echo two >&2; head -c 100000 /dev/zero | tr '\\0' x; echo; env");
        let seen = collect(&receiver);
        assert!(seen.contains(&Output::Line(Stream::Stdout, "one".into())));
        assert!(seen.contains(&Output::Line(Stream::Stderr, "two".into())));
        assert!(seen.iter().any(|o| matches!(o, Output::TooLong(Stream::Stdout, head, 100_000) if head.len() == MAX_LINE_BYTES)));
        let env: Vec<&Output> = seen.iter().filter(|o| matches!(o, Output::Line(Stream::Stdout, l) if l.contains('='))).collect();
        assert!(env.iter().all(|o| matches!(o, Output::Line(_, l) if l.starts_with("PATH=") || l.starts_with("PWD=") || l.starts_with("SHLVL=") || l.starts_with("_="))), "{env:?}");
        assert!(program.wait_for(Duration::from_secs(10)).unwrap().success());
    }

    #[test]
    fn stopping_ends_the_whole_group_even_a_child_that_ignores_sigterm() {
        let (mut program, _receiver) = run("trap '' TERM; sleep 300 & sleep 300");
        std::thread::sleep(Duration::from_millis(300));
        let group = program.pid();
        let status = program.stop(Duration::from_millis(300)).expect("stopped");
        assert_eq!(describe(status).map(|(user, _)| user), Some(false), "a killed program is not the user's failure");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(live_group_members(group), Vec::<u32>::new(), "a process of the group survived");
    }

    #[test]
    fn exit_codes_are_the_users_and_signals_are_not() {
        assert_eq!(describe(ExitStatus::from_raw(0)), None);
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), Some((true, "exited with status 3".into())));
        assert_eq!(describe(ExitStatus::from_raw(9)), Some((false, "killed by signal 9".into())));
    }
}
