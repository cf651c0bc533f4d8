//! What the coordinator's benchmarks share: the `coordinator serve` process they measure, where
//! to find its binary, and the CPU time a process has used.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long `coordinator serve` may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The coordinator binary: `explicit`, else `coordinator` in the folder above this example's
/// (`target/<profile>/`).
pub fn coordinator_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let example = std::env::current_exe()?;
    let profile_dir = example.parent().and_then(Path::parent).context("the example lives in target/<profile>/examples")?;
    let path = profile_dir.join("coordinator");
    if !path.is_file() {
        bail!("{} is missing: build it first (cargo build --release -p cohort-coordinator)", path.display());
    }
    Ok(path)
}

/// CPU seconds (user and system, every thread) process `pid` (a number, or `self`) has used so
/// far, from `/proc/PID/stat`, whose clock ticks Linux fixes at 100 a second.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc stat")?;
    // The fields after the command name (which may hold spaces) close with ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').context("malformed /proc stat")?.1.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> { Ok(fields.get(index).context("short /proc stat")?.parse::<f64>()?) };
    // utime and stime are fields 14 and 15 of the line; `fields` starts at the 3rd.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// `coordinator serve` as its own process, killed when dropped.
pub struct CoordinatorProcess {
    child: Child,
    /// Where it listens (loopback).
    pub address: SocketAddr,
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CoordinatorProcess {
    /// Starts `binary serve --listen <a free loopback port>` followed by `args`, with its output
    /// in `log`, and waits until it listens (failing if it exits first).
    pub fn start(binary: &Path, args: &[OsString], log: &Path) -> Result<Self> {
        let address = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let output = std::fs::File::create(log)?;
        let child = Command::new(binary)
            .args(["serve", "--listen", &address.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut process = Self { child, address };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(address).is_err() {
            if let Some(status) = process.child.try_wait()? {
                bail!("the coordinator exited with {status}; see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not listen on {address} within {} s", START_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its URL for a plain-HTTP client.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}
