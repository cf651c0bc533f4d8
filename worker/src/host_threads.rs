//! How many libtorch threads a worker trains with when other workers share its host.
//!
//! libtorch takes every core by default. Two workers on one host then run twice as many busy
//! threads as there are cores, and a data-parallel gang's members, which wait on each other at
//! every step, spend their time descheduled behind each other's spinning thread pools (a 2-replica
//! WGAN-GP gang on 2 cores trained at a fifth of one worker's speed). `--threads auto`, the
//! default, splits the cores between the workers that are alive on the host.
//!
//! Workers learn of each other through a host-local registry: a folder
//! ([`default_registry_dir`]) holding one small lease file per worker process, written at start,
//! removed at exit, and ignored (and cleaned up) once its process is gone, as checked through
//! `/proc` with the process's start time, so a reused pid does not keep a dead worker's lease
//! alive. Each worker counts the live leases when a task starts and sets libtorch's thread count
//! on the training thread ([`ThreadPlan::apply`]). Workers started with `--threads N` register
//! their N: the auto workers split what is left.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

/// Why the thread setting or the registry is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// `--threads` was neither `auto` nor a positive number.
    #[error("--threads must be auto or a number of at least 1, not {0:?}")]
    BadSetting(String),
    /// The registry folder or this worker's lease could not be written.
    #[error("host registry {path}: {source}")]
    Registry {
        /// The folder or file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A worker's `--threads`: split the host's cores between the live workers, or a fixed count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadSetting {
    /// The host's cores, shared out between the workers alive on it.
    Auto,
    /// Exactly this many libtorch threads.
    Fixed(usize),
}

impl FromStr for ThreadSetting {
    type Err = ThreadsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(ThreadSetting::Auto),
            number => match number.parse::<usize>() {
                Ok(count) if count >= 1 => Ok(ThreadSetting::Fixed(count)),
                _ => Err(ThreadsError::BadSetting(text.to_string())),
            },
        }
    }
}

impl std::fmt::Display for ThreadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadSetting::Auto => f.write_str("auto"),
            ThreadSetting::Fixed(count) => write!(f, "{count}"),
        }
    }
}

/// One live worker's lease, as read from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The worker's process id.
    pub pid: u32,
    /// Its `--threads`.
    pub setting: ThreadSetting,
}

/// The registry folder: `$COHORT_HOST_REGISTRY` when set; else `cohort-workers` under
/// `$XDG_RUNTIME_DIR` (a per-user tmpfs); else `/dev/shm/cohort-<uid>`; else the temporary
/// folder's `cohort-<uid>`. Per user, so workers of different users never read each other's files.
pub fn default_registry_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("COHORT_HOST_REGISTRY") {
        return PathBuf::from(dir);
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|dir| dir.is_dir()) {
        return runtime.join("cohort-workers");
    }
    // The owner of /proc/self is this process's user.
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|meta| meta.uid().to_string())
            .unwrap_or_else(|_| std::env::var("USER").unwrap_or_else(|_| "user".into()))
    };
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("cohort-{uid}"))
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`, field 22): with the pid,
/// names the process uniquely. `None` when the process does not exist (or there is no `/proc`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that wrote a lease still runs: same pid and same start time.
fn alive(pid: u32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

fn parse_lease(text: &str) -> Option<(u32, u64, ThreadSetting)> {
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let started = fields.next()?.parse().ok()?;
    let setting = fields.next()?.parse().ok()?;
    Some((pid, started, setting))
}

/// This process's lease in a host registry; removed when dropped.
#[derive(Debug)]
pub struct HostRegistry {
    dir: PathBuf,
    own: PathBuf,
    pid: u32,
}

impl HostRegistry {
    /// Creates `dir` (mode 0700) if needed and writes this process's lease into it.
    pub fn register(dir: &Path, setting: ThreadSetting) -> Result<Self, ThreadsError> {
        let failed = |path: &Path| {
            let path = path.display().to_string();
            move |source| ThreadsError::Registry { path, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed(dir))?;
        }
        let pid = std::process::id();
        let started = start_time(pid).unwrap_or(0);
        let own = dir.join(format!("{pid}.lease"));
        // Written whole, then renamed: a reader never sees half a lease.
        let partial = dir.join(format!(".{pid}.lease.partial"));
        std::fs::write(&partial, format!("{pid} {started} {setting}\n")).map_err(failed(&partial))?;
        std::fs::rename(&partial, &own).map_err(failed(&own))?;
        Ok(Self { dir: dir.to_path_buf(), own, pid })
    }

    /// The live workers' leases, this one's included, by pid. Leases of processes that are gone
    /// are removed on the way (best effort: another worker may remove them first).
    pub fn live(&self) -> Vec<Lease> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut leases = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "lease")
                || path.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let Some((pid, started, setting)) = std::fs::read_to_string(&path).ok().as_deref().and_then(parse_lease) else {
                continue;
            };
            if pid == self.pid || alive(pid, started) {
                leases.push(Lease { pid, setting });
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        leases.sort_by_key(|lease| lease.pid);
        leases
    }
}

impl Drop for HostRegistry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.own);
    }
}

/// The threads worker `pid` with `setting` takes among `leases` (every live worker, itself
/// included) on a host of `cores` cores: a fixed setting is kept; the auto workers share the
/// cores the fixed ones leave (at least one thread each), the first ones by pid taking one more
/// when the cores do not divide evenly.
pub fn split(cores: usize, pid: u32, setting: ThreadSetting, leases: &[Lease]) -> usize {
    if let ThreadSetting::Fixed(count) = setting {
        return count;
    }
    let mut autos: Vec<u32> = leases.iter().filter(|lease| lease.setting == ThreadSetting::Auto).map(|lease| lease.pid).collect();
    if !autos.contains(&pid) {
        autos.push(pid);
    }
    autos.sort_unstable();
    let fixed: usize = leases
        .iter()
        .filter(|lease| lease.pid != pid)
        .map(|lease| match lease.setting {
            ThreadSetting::Fixed(count) => count,
            ThreadSetting::Auto => 0,
        })
        .sum();
    let free = cores.saturating_sub(fixed);
    let (per, extra) = (free / autos.len(), free % autos.len());
    let place = autos.iter().position(|&other| other == pid).unwrap_or(0);
    (per + usize::from(place < extra)).max(1)
}

/// The host's cores as this process may use them (affinity and cgroup quota included).
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map(|count| count.get()).unwrap_or(1)
}

/// A worker's thread setting and its lease: what [`ThreadPlan::apply`] sets at each task start.
#[derive(Debug)]
pub struct ThreadPlan {
    setting: ThreadSetting,
    cores: usize,
    registry: Option<HostRegistry>,
    /// The count applied last, to log only changes.
    applied: Mutex<Option<usize>>,
}

impl ThreadPlan {
    /// Registers this worker in the host registry at `dir` (a worker that cannot register
    /// counts as the host's only auto worker, and says so).
    pub fn new(setting: ThreadSetting, dir: &Path) -> Self {
        let registry = match HostRegistry::register(dir, setting) {
            Ok(registry) => Some(registry),
            Err(error) => {
                tracing::warn!(%error, "workers sharing this host cannot see this one: --threads auto takes every core");
                None
            }
        };
        Self { setting, cores: host_cores(), registry, applied: Mutex::new(None) }
    }

    /// The live workers on the host, this one included (just this one without a registry).
    pub fn workers(&self) -> Vec<Lease> {
        match &self.registry {
            Some(registry) => registry.live(),
            None => vec![Lease { pid: std::process::id(), setting: self.setting }],
        }
    }

    /// The thread count this worker should train with now.
    pub fn threads(&self) -> usize {
        split(self.cores, std::process::id(), self.setting, &self.workers())
    }

    /// Sets libtorch's thread count for the calling (training) thread and for threads started
    /// after it; logs the count the first time and whenever it changes. Returns it.
    pub fn apply(&self) -> usize {
        let workers = self.workers();
        let threads = split(self.cores, std::process::id(), self.setting, &workers);
        tch::set_num_threads(threads as i32);
        let mut applied = self.applied.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *applied != Some(threads) {
            tracing::info!(threads, setting = %self.setting, cores = self.cores, workers_on_host = workers.len(), "libtorch threads");
            *applied = Some(threads);
        }
        threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(pid: u32, setting: ThreadSetting) -> Lease {
        Lease { pid, setting }
    }

    #[test]
    fn settings_parse() {
        assert_eq!("auto".parse::<ThreadSetting>().unwrap(), ThreadSetting::Auto);
        assert_eq!("3".parse::<ThreadSetting>().unwrap(), ThreadSetting::Fixed(3));
        assert!("0".parse::<ThreadSetting>().is_err());
        assert!("many".parse::<ThreadSetting>().is_err());
    }

    #[test]
    fn auto_workers_split_the_cores_left_by_fixed_ones() {
        use ThreadSetting::{Auto, Fixed};
        // Alone: every core.
        assert_eq!(split(8, 10, Auto, &[lease(10, Auto)]), 8);
        // Two on two cores: one each.
        assert_eq!(split(2, 10, Auto, &[lease(10, Auto), lease(11, Auto)]), 1);
        assert_eq!(split(2, 11, Auto, &[lease(10, Auto), lease(11, Auto)]), 1);
        // Uneven: the lower pid takes the extra core, none is left idle.
        let three = [lease(10, Auto), lease(11, Auto), lease(12, Auto)];
        assert_eq!([10, 11, 12].map(|pid| split(8, pid, Auto, &three)), [3, 3, 2]);
        // A fixed worker keeps its count; the auto ones share the rest.
        let mixed = [lease(10, Fixed(4)), lease(11, Auto), lease(12, Auto)];
        assert_eq!(split(8, 10, Fixed(4), &mixed), 4);
        assert_eq!(split(8, 11, Auto, &mixed), 2);
        // More workers than cores: never below one thread.
        assert_eq!(split(2, 12, Auto, &three), 1);
        assert_eq!(split(2, 11, Auto, &[lease(10, Fixed(6)), lease(11, Auto)]), 1);
        // Not yet in the list (its lease unreadable): counted anyway.
        assert_eq!(split(4, 11, Auto, &[lease(10, Auto)]), 2);
    }

    #[test]
    fn the_registry_sees_live_workers_and_forgets_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let registry = HostRegistry::register(dir.path(), ThreadSetting::Auto).unwrap();
        let own = std::process::id();
        assert_eq!(registry.live(), vec![lease(own, ThreadSetting::Auto)]);

        // A live process (a child that sleeps) with a fixed setting is counted.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let started = start_time(child.id()).unwrap();
        std::fs::write(dir.path().join(format!("{}.lease", child.id())), format!("{} {started} 2\n", child.id())).unwrap();
        // A dead pid, and a live pid whose start time says it is another process: both stale.
        std::fs::write(dir.path().join("4194303.lease"), "4194303 1 auto\n").unwrap();
        std::fs::write(dir.path().join("1.lease"), format!("1 {} auto\n", start_time(1).unwrap_or(0) + 1)).unwrap();
        // Garbage and half-written files are ignored.
        std::fs::write(dir.path().join("junk.lease"), "not a lease").unwrap();
        std::fs::write(dir.path().join(".5.lease.partial"), "5 0 auto\n").unwrap();

        let mut expected = vec![lease(own, ThreadSetting::Auto), lease(child.id(), ThreadSetting::Fixed(2))];
        expected.sort_by_key(|lease| lease.pid);
        assert_eq!(registry.live(), expected);
        assert!(!dir.path().join("4194303.lease").exists(), "a dead worker's lease is cleaned up");
        assert!(!dir.path().join("1.lease").exists(), "a reused pid does not keep a lease alive");

        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(registry.live(), vec![lease(own, ThreadSetting::Auto)]);
        drop(registry);
        assert!(!dir.path().join(format!("{own}.lease")).exists(), "the lease goes with the worker");
    }

    #[test]
    fn two_registered_workers_take_half_the_cores_each() {
        let dir = tempfile::tempdir().unwrap();
        let plan = ThreadPlan::new(ThreadSetting::Auto, dir.path());
        assert_eq!(plan.threads(), host_cores());
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let started = start_time(child.id()).unwrap();
        std::fs::write(dir.path().join(format!("{}.lease", child.id())), format!("{} {started} auto\n", child.id())).unwrap();
        let cores = host_cores();
        let expected = if std::process::id() < child.id() { cores.div_ceil(2) } else { (cores / 2).max(1) };
        assert_eq!(plan.threads(), expected);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(plan.threads(), cores);
    }
}
