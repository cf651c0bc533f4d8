//! Helpers for the multi-process cluster tests: spawn the real `coordinator` and `worker`
//! binaries on free loopback ports with temporary folders, kill them when the test ends, and
//! print their log tails when it fails.

pub mod webdriver;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the repo").to_path_buf()
}

/// A WGAN-GP sweep named `name` small enough to train in seconds on the committed MRI volume:
/// 24 slices, widths /8, 2 epochs of batch 4 (a generator step every 2 critic steps), samples
/// and a checkpoint every epoch.
pub fn small_wgan_sweep(name: &str) -> String {
    format!(
        r#"
name = "{name}"
[dataset]
format = "nifti"
path = "{}"
train_limit = 24
[model]
kind = "wgan-gp"
widths = [32, 16, 8, 4]
[train]
epochs = 2
batch_size = 4
critic_steps = 2
sample_every = 1
sample_count = 4
checkpoint_every = 1
"#,
        repo_root().join("data/mri-sample").to_string_lossy().replace('\\', "/")
    )
}

/// The committed MNIST sample (8,000 training and 2,000 test digits).
pub fn mnist_sample() -> String {
    repo_root().join("data/mnist-sample").display().to_string()
}

/// The folder holding the built binaries (this test's executable lives in `<profile>/deps`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(path.is_file(), "{} is missing: build the binaries first (`make build` or `cargo build --release`)", path.display());
    path
}

/// A fresh temporary folder for a cluster.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("cohort-cluster-").tempdir().expect("temp dir")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr")
}

/// A process the cluster started, with its log file.
#[derive(Debug)]
pub struct Process {
    /// What it is, for messages.
    pub label: String,
    /// The child.
    pub child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// A local cluster: a coordinator and workers, killed on drop; logs printed if the test panicked.
#[derive(Debug)]
pub struct Cluster {
    /// Temporary folder holding data dirs, caches and logs.
    pub dir: tempfile::TempDir,
    /// The coordinator's address.
    pub address: SocketAddr,
    /// Running processes.
    pub processes: Vec<Process>,
    /// The coordinator's `serve` arguments, to restart it alike.
    coordinator_args: Vec<String>,
    /// `http`, or `https` when the coordinator serves TLS.
    scheme: &'static str,
    /// A command the coordinator runs under (e.g. `unshare … sh -c SCRIPT sh`), empty for none.
    launcher: Vec<String>,
}

impl Cluster {
    /// Starts a coordinator on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`Cluster::start`], with extra `coordinator serve` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_in(temp_dir(), extra_args)
    }

    /// Like [`Cluster::start_with`], in a folder the caller prepared (e.g. with certificates).
    pub fn start_in(dir: tempfile::TempDir, extra_args: &[&str]) -> Self {
        Self::start_launched(dir, &[], extra_args)
    }

    /// Like [`Cluster::start_in`], with the coordinator run as `launcher… coordinator serve …`
    /// (the launcher ends in a program that executes its remaining arguments).
    pub fn start_launched(dir: tempfile::TempDir, launcher: &[&str], extra_args: &[&str]) -> Self {
        let address = free_address();
        let launcher = launcher.iter().map(|a| a.to_string()).collect();
        let mut cluster = Cluster { dir, address, processes: Vec::new(), coordinator_args: Vec::new(), scheme: "http", launcher };
        std::fs::write(cluster.client_token(), "client-token-for-tests\n").expect("token file");
        std::fs::write(cluster.worker_token(), "worker-token-for-tests\n").expect("token file");
        let data_dir = cluster.dir.path().join("coordinator");
        let listen = address.to_string();
        let data_dir = data_dir.to_string_lossy().into_owned();
        let client_token = cluster.client_token().to_string_lossy().into_owned();
        let worker_token = cluster.worker_token().to_string_lossy().into_owned();
        if extra_args.contains(&"--tls-cert") {
            cluster.scheme = "https";
        }
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            &data_dir,
            "--token-file",
            &client_token,
            "--worker-token-file",
            &worker_token,
        ];
        args.extend_from_slice(extra_args);
        cluster.coordinator_args = args.iter().map(|a| a.to_string()).collect();
        cluster.spawn_coordinator("coordinator");
        cluster.wait_until_listening(Duration::from_secs(20));
        cluster
    }

    /// The coordinator's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    fn spawn_coordinator(&mut self, label: &str) {
        let program = binary("coordinator");
        let args = self.coordinator_args.clone();
        let launcher = self.launcher.clone();
        match launcher.split_first() {
            None => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.spawn(label, &program, &args);
            }
            Some((launcher, launcher_args)) => {
                let program = program.to_string_lossy().into_owned();
                let all: Vec<&str> = launcher_args
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::once(program.as_str()))
                    .chain(args.iter().map(String::as_str))
                    .collect();
                let launcher = PathBuf::from(launcher);
                self.spawn(label, &launcher, &all);
            }
        }
    }

    /// Kills the coordinator with SIGKILL and starts it again on the same address and data dir.
    pub fn restart_coordinator(&mut self) {
        self.kill("coordinator");
        let generation = self.processes.iter().filter(|p| p.label.starts_with("coordinator")).count();
        self.spawn_coordinator(&format!("coordinator-{generation}"));
        self.wait_until_listening(Duration::from_secs(20));
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        match self.scheme {
            // The test certificate is issued for "localhost".
            "https" => format!("https://localhost:{}", self.address.port()),
            _ => format!("http://{}", self.address),
        }
    }

    /// The client (full rights) token file.
    pub fn client_token(&self) -> PathBuf {
        self.dir.path().join("client.token")
    }

    /// The worker token file.
    pub fn worker_token(&self) -> PathBuf {
        self.dir.path().join("worker.token")
    }

    /// Extra arguments every client and worker passes (the CA certificate over TLS).
    fn tls_args(&self) -> Vec<String> {
        let ca = self.dir.path().join("ca.pem");
        if self.scheme == "https" {
            vec!["--tls-ca".into(), ca.to_string_lossy().into_owned()]
        } else {
            vec![]
        }
    }

    fn spawn(&mut self, label: &str, program: &Path, args: &[&str]) {
        let log = self.dir.path().join(format!("{label}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log clone"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.processes.push(Process { label: label.to_string(), child, log });
    }

    fn wait_until_listening(&self, limit: Duration) {
        let started = Instant::now();
        while TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_err() {
            assert!(started.elapsed() < limit, "the coordinator did not listen on {} within {limit:?}", self.address);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a worker with one libtorch thread.
    pub fn add_worker(&mut self, name: &str) {
        self.add_worker_with(name, &[]);
    }

    /// Starts a worker with one libtorch thread and extra arguments.
    pub fn add_worker_with(&mut self, name: &str, extra_args: &[&str]) {
        let cache = self.dir.path().join(format!("cache-{name}")).to_string_lossy().into_owned();
        let url = self.url();
        let token = self.worker_token().to_string_lossy().into_owned();
        let mut args: Vec<String> = ["--coordinator", &url, "--name", name, "--device", "cpu", "--threads", "1", "--cache-dir", &cache]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--token-file".to_string(), token, "--advertise-host".to_string(), "127.0.0.1".to_string()]);
        args.extend(self.tls_args());
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(name, &binary("worker"), &args);
    }

    /// Kills the newest process labelled `label` (or `label-N`, a restarted generation) with
    /// SIGKILL (a machine dying), and waits for it.
    pub fn kill(&mut self, label: &str) {
        let process =
            self.processes.iter_mut().rev().find(|p| is_labelled(&p.label, label)).unwrap_or_else(|| panic!("no process {label}"));
        process.child.kill().expect("kill");
        process.child.wait().expect("wait");
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the newest process labelled `label` (or `label-N`).
    pub fn signal(&self, label: &str, signal: &str) {
        let process = self.processes.iter().rev().find(|p| is_labelled(&p.label, label)).unwrap_or_else(|| panic!("no process {label}"));
        let status = Command::new("kill").arg(format!("-{signal}")).arg(process.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{signal} {label}");
    }

    /// Polls `results ID --format json` until `done` holds for it, failing after `limit`.
    pub fn wait_for(&self, sweep_id: &str, limit: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let results: serde_json::Value =
                serde_json::from_str(&self.client_ok(&["results", sweep_id, "--format", "json"])).expect("results json");
            if done(&results) {
                return results;
            }
            assert!(started.elapsed() < limit, "condition not reached within {limit:?}: {results}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a client command of the coordinator binary against this cluster, with the client token.
    pub fn client(&self, args: &[&str]) -> Output {
        self.client_with_token(&self.client_token(), args)
    }

    /// Runs a client command with the token in `token_file`.
    pub fn client_with_token(&self, token_file: &Path, args: &[&str]) -> Output {
        Command::new(binary("coordinator"))
            .arg("--coordinator")
            .arg(self.url())
            .arg("--token-file")
            .arg(token_file)
            .args(self.tls_args())
            .args(args)
            // The client's per-user cache (`submit`'s file hashes) lives in the cluster's folder,
            // not in the user's home.
            .env("XDG_CACHE_HOME", self.dir.path().join("client-cache"))
            .output()
            .expect("run the coordinator client")
    }

    /// Writes a sweep file into the cluster's folder, submits it, and returns the sweep id.
    pub fn submit(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write the sweep file");
        self.client_ok(&["submit", &path.to_string_lossy()]).trim().to_string()
    }

    /// Runs a client command and returns its stdout, failing the test (with stderr) if it failed.
    pub fn client_ok(&self, args: &[&str]) -> String {
        let output = self.client(args);
        assert!(output.status.success(), "coordinator {args:?} failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// The logs of every process labelled `label` (restarts, `label-N`, included), in order.
    pub fn logs_of(&self, label: &str) -> String {
        self.processes
            .iter()
            .filter(|p| is_labelled(&p.label, label))
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect()
    }

    /// The log of the newest process labelled `label` (or `label-N`).
    pub fn log(&self, label: &str) -> String {
        let process = self.processes.iter().rev().find(|p| is_labelled(&p.label, label)).unwrap_or_else(|| panic!("no process {label}"));
        std::fs::read_to_string(&process.log).unwrap_or_default()
    }

    fn print_logs(&self) {
        for process in &self.processes {
            let text = std::fs::read_to_string(&process.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("----- last {} lines of {} ({}) -----\n{}", tail.len(), process.label, process.log.display(), tail.join("\n"));
        }
    }
}

/// Whether a process labelled `actual` is `label` or a later generation of it (`label-N`):
/// `w1` is not `w11`.
fn is_labelled(actual: &str, label: &str) -> bool {
    actual == label
        || actual.strip_prefix(label).and_then(|rest| rest.strip_prefix('-')).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_labelled;

    /// Killing `w1` must not kill `w11` (it did: the soak's chaos loop then "killed" one worker
    /// and left the real one running, and a dead worker's lapse looked like a live one's).
    #[test]
    fn a_label_names_one_process_and_its_restarts() {
        assert!(is_labelled("w1", "w1"));
        assert!(!is_labelled("w11", "w1"));
        assert!(is_labelled("coordinator-2", "coordinator"));
        assert!(!is_labelled("coordinator-x", "coordinator"));
    }
}
