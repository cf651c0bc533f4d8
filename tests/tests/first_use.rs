//! What a new user trips over (issue 14), end to end against the real binaries: a sweep that
//! waits says why, refused credentials say how to fix them, output suits scripts, the dry run
//! needs no coordinator, results read back by name and as data, and a dataset download the
//! coordinator could not serve is retried rather than failed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cohort_cluster_tests::{binary, mnist_sample, Cluster};
use serde_json::Value;

/// A small autoencoder sweep: one config × 2 folds, then `final`, each one epoch.
fn small_sweep(name: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 200\ntest_limit = 100\n[model]\nkind = \"dae\"\n\
         [cv]\nfolds = 2\nepochs = 1\nbatch_size = 32\n[cv.grid]\nlr = [1e-3]\n[final]\nepochs = 1\n{extra}",
        mnist_sample()
    )
}

/// A `final`-only sweep of `epochs` epochs.
fn final_sweep(name: &str, epochs: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 2000\n[model]\nkind = \"dae\"\n[final]\nepochs = {epochs}\nbatch_size = 64\n{extra}",
        mnist_sample()
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for a child to exit within `limit`, killing it (and failing) if it does not.
fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(cluster: &Cluster, name: &str, contents: &str) -> String {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}

/// Without workers a sweep says what it waits for; refused credentials and unreadable files say
/// how to fix them once; a closed pipe ends a command quietly; every listing has CSV; the dry
/// run plans with no coordinator at all; a worker with a wrong token exits at once naming it.
#[test]
fn a_new_user_is_told_why_nothing_runs_and_how_to_fix_it() {
    let cluster = Cluster::start();
    let path = write(&cluster, "small.toml", &small_sweep("small", ""));

    // The dry run needs no coordinator (nothing listens on port 1) and no token.
    let dry = Command::new(binary("coordinator"))
        .args(["--coordinator", "http://127.0.0.1:1", "submit", &path, "--dry-run"])
        .env_remove("COHORT_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let plan = text(&dry.stdout);
    assert!(plan.contains("stage cv") && plan.contains("stage final") && plan.contains("cv/c0/f1"), "{plan}");
    // ... and still checks the dataset, locally.
    let broken = cluster.dir.path().join("broken-data");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("train-images-idx3-ubyte.gz"), b"not a dataset").unwrap();
    let broken_path = write(&cluster, "broken.toml", &small_sweep("broken", "").replace(&mnist_sample(), &broken.to_string_lossy()));
    let dry = Command::new(binary("coordinator"))
        .args(["--coordinator", "http://127.0.0.1:1", "submit", &broken_path, "--dry-run"])
        .output()
        .unwrap();
    assert!(!dry.status.success());
    assert!(text(&dry.stderr).contains("train-labels") || text(&dry.stderr).contains("train-images"), "{}", text(&dry.stderr));
    assert!(
        !cluster.data_dir().join("blobs").exists() || std::fs::read_dir(cluster.data_dir().join("blobs")).unwrap().count() == 0,
        "a dry run uploads nothing"
    );

    // Submitted with no worker: a warning, and the reason on every view.
    let submitted = cluster.client(&["submit", &path]);
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    assert!(text(&submitted.stderr).contains("warning: no worker is connected"), "{}", text(&submitted.stderr));
    let sweep_id = text(&submitted.stdout).trim().to_string();
    let status = cluster.client_ok(&["status", &sweep_id]);
    assert!(status.contains("waiting: no worker connected"), "{status}");
    assert!(status.contains("pending") && !status.contains("excluded"), "a config that has not run is pending:\n{status}");
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
    assert_eq!(results["trials"][0]["waiting"], "waiting: no worker connected", "{results}");
    assert_eq!(results["configs"][0]["status"], "pending", "{results}");

    // A worker's token on a client command: refused, with the fix.
    let refused = cluster.client_with_token(&cluster.worker_token(), &["status"]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("--token-file") && stderr.contains("COHORT_TOKEN_FILE"), "{stderr}");
    // A missing token file: each cause once.
    let missing = cluster.client_with_token(Path::new("/nonexistent/cohort.token"), &["status"]);
    let stderr = text(&missing.stderr);
    assert!(!missing.status.success());
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/cohort.token"), "{stderr}");

    // The reader of the output goes away before anything is printed: quiet, status 0.
    let mut child = Command::new(binary("coordinator"))
        .args(["--coordinator", &cluster.url(), "--token-file", &cluster.client_token().to_string_lossy(), "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let closed = wait_exit(&mut child, Duration::from_secs(30), "status into a closed pipe");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(closed.success(), "{closed}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Every listing has CSV.
    assert!(cluster.client_ok(&["status", "--format", "csv"]).starts_with("sweep,name,state,total,queued,running,succeeded,failed\n"));
    assert!(cluster
        .client_ok(&["workers", "--format", "csv"])
        .starts_with("worker,name,device,allow_commands,last_seen_secs,sweep,trial,task\n"));
    assert!(cluster.client_ok(&["checkpoints", &sweep_id, "--format", "csv"]).starts_with("task_id,trial,epoch,size,final,sha256\n"));

    // A worker with a wrong token stops at once, naming the file and how to give another.
    let wrong = cluster.dir.path().join("wrong.token");
    std::fs::write(&wrong, "guessed\n").unwrap();
    let mut worker = Command::new(binary("worker"))
        .args(["--coordinator", &cluster.url(), "--device", "cpu", "--cache-dir"])
        .arg(cluster.dir.path().join("cache-wrong"))
        .arg("--token-file")
        .arg(&wrong)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_exit(&mut worker, Duration::from_secs(60), "a worker with a wrong token");
    let mut stderr = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!exited.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: the coordinator refused this worker's token"), "{stderr}");
    assert!(last.contains(&*wrong.to_string_lossy()) && last.contains("--token-file") && last.contains("COHORT_TOKEN_FILE"), "{stderr}");
}

/// A finished sweep reads back by name and as data: later-stage trials by name in a followed
/// log, hyperparameters and times as JSON fields, the best config and its trial, its final
/// checkpoint downloaded by trial name, aligned tables; a gang larger than the cluster says so.
#[test]
fn a_finished_sweep_reads_back_by_name_and_as_data() {
    let mut cluster = Cluster::start();
    let sweep_id = cluster.submit("small.toml", &small_sweep("small", ""));
    // Followed from before `final` is planned.
    let follow_log = cluster.dir.path().join("follow.log");
    let mut follow = Command::new(binary("coordinator"))
        .args(["--coordinator", &cluster.url(), "--token-file", &cluster.client_token().to_string_lossy(), "logs", &sweep_id, "--follow"])
        .stdout(std::fs::File::create(&follow_log).unwrap())
        .spawn()
        .unwrap();
    // Watched from before any worker: the coordinator streams its progress (WatchSweep).
    let watch_err = cluster.dir.path().join("watch.err");
    let watch_out = cluster.dir.path().join("watch.out");
    let mut watch = Command::new(binary("coordinator"))
        .args(["--coordinator", &cluster.url(), "--token-file", &cluster.client_token().to_string_lossy(), "watch", &sweep_id])
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .stderr(std::fs::File::create(&watch_err).unwrap())
        .spawn()
        .unwrap();
    // Its first message says why nothing runs yet; only then does a worker come.
    let started = Instant::now();
    while !std::fs::read_to_string(&watch_err).unwrap_or_default().contains("(waiting: no worker connected)") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "watch drew no waiting stage: {}",
            std::fs::read_to_string(&watch_err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.add_worker("alpha");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    assert!(wait_exit(&mut follow, Duration::from_secs(60), "logs --follow").success());
    assert!(wait_exit(&mut watch, Duration::from_secs(60), "watch").success());
    let watched = std::fs::read_to_string(&watch_err).unwrap();
    assert!(watched.contains("(waiting: no worker connected)"), "{watched}");
    assert!(watched.contains(&format!("sweep {sweep_id} (small): succeeded")), "{watched}");
    assert!(watched.lines().any(|line| line.starts_with("final ") && line.contains("1/1 trials")), "{watched}");
    let table = std::fs::read_to_string(&watch_out).unwrap();
    assert!(table.contains("final"), "watch ends with the results:\n{table}");
    let followed = std::fs::read_to_string(&follow_log).unwrap();
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
    let trials = results["trials"].as_array().unwrap();
    let final_trial = trials.iter().find(|t| t["trial"] == "final").unwrap();
    let final_task = final_trial["task_id"].as_str().unwrap();
    assert!(followed.contains(" final (attempt 1) "), "{followed}");
    assert!(!followed.contains(&format!(" {final_task} (attempt")), "the later stage's trial is named, not numbered:\n{followed}");
    let epoch_line = followed.lines().find(|line| line.contains("epoch done: ")).unwrap_or_else(|| panic!("no epoch line:\n{followed}"));
    assert!(epoch_line.contains("train_mse=0."), "{epoch_line}");
    assert!(!followed.contains("values=["), "{followed}");

    // Hyperparameters and times as fields.
    for trial in trials {
        assert_eq!(trial["hyperparameters"]["lr"].as_f64(), Some(1e-3), "{trial}");
        assert_eq!(trial["hyperparameters"]["batch_size"].as_f64(), Some(32.0), "{trial}");
        let (started, ended) = (trial["started_unix_ms"].as_i64().unwrap(), trial["ended_unix_ms"].as_i64().unwrap());
        assert!(started > 0 && ended >= started, "{trial}");
        assert!(trial["duration_secs"].as_f64().unwrap() >= 0.0, "{trial}");
        assert_eq!(trial["worker_names"], "alpha", "{trial}");
    }
    assert!(results["duration_secs"].as_f64().unwrap() > 0.0, "{results}");
    assert_eq!(results["configs"][0]["hyperparameters"]["lr"].as_f64(), Some(1e-3), "{results}");
    assert_eq!(results["configs"][0]["status"], "complete");

    // The best config and its trial; its checkpoint by name.
    let best: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--best", "--format", "json"])).unwrap();
    assert_eq!(best["trial"], "final", "{best}");
    assert_eq!(best["final_checkpoint"], final_trial["final_checkpoint"], "{best}");
    assert!(cluster.client_ok(&["results", &sweep_id, "--best"]).contains("trial: final"));
    let by_name = cluster.dir.path().join("final.safetensors");
    let by_best = cluster.dir.path().join("best.safetensors");
    cluster.client_ok(&["download", &sweep_id, "final", "-o", &by_name.to_string_lossy()]);
    cluster.client_ok(&["download", &sweep_id, "--best", "-o", &by_best.to_string_lossy()]);
    assert_eq!(std::fs::read(&by_name).unwrap(), std::fs::read(&by_best).unwrap());

    // Tables align: every row's hash starts where the header's column does.
    let table = cluster.client_ok(&["checkpoints", &sweep_id]);
    let mut lines = table.lines();
    let column = lines.next().unwrap().find("sha256").unwrap();
    for line in lines {
        assert!(line[column..].chars().take(64).all(|c| c.is_ascii_hexdigit()), "misaligned:\n{table}");
    }

    // A gang of 2 on a cluster of 1: a warning at submission, and the reason while it waits.
    let path = write(&cluster, "gang.toml", &final_sweep("gang", 1, "[distributed]\nreplicas = 2\n"));
    let submitted = cluster.client(&["submit", &path]);
    assert!(text(&submitted.stderr).contains("need 2 workers at once and 1 connected"), "{}", text(&submitted.stderr));
    let gang_id = text(&submitted.stdout).trim().to_string();
    let status = cluster.client_ok(&["status", &gang_id]);
    assert!(status.contains("waiting: a gang of 2 needs 2 workers, 1 connected"), "{status}");
    cluster.client_ok(&["cancel", &gang_id]);

    // An NCCL gang on a cluster without a GPU: it needs a device no connected worker has.
    let path = write(&cluster, "nccl.toml", &final_sweep("nccl", 1, "[distributed]\nreplicas = 2\nbackend = \"nccl\"\n"));
    let submitted = cluster.client(&["submit", &path]);
    assert!(text(&submitted.stderr).contains("none of the 1 connected workers has a CUDA device"), "{}", text(&submitted.stderr));
    let nccl_id = text(&submitted.stdout).trim().to_string();
    let status = cluster.client_ok(&["status", &nccl_id]);
    assert!(status.contains("has the device it needs (it runs on workers with a CUDA device)"), "{status}");
    cluster.client_ok(&["cancel", &nccl_id]);

    // The worker listing: its device and where its time went, as data. The time by phase comes
    // with the worker's heartbeats (one a second), so the training above may not be in it yet:
    // the CLI answers in milliseconds since it stopped loading libtorch.
    let deadline = Instant::now() + Duration::from_secs(30);
    let workers = loop {
        let workers: Value = serde_json::from_str(&cluster.client_ok(&["workers", "--format", "json"])).unwrap();
        if workers[0]["phase_seconds"]["train"].as_f64().unwrap() > 0.0 || Instant::now() > deadline {
            break workers;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(workers[0]["name"], "alpha", "{workers}");
    assert_eq!(workers[0]["device"], "cpu", "{workers}");
    assert_eq!(workers[0]["allow_commands"], false, "{workers}");
    assert!(workers[0]["phase_seconds"]["train"].as_f64().unwrap() > 0.0, "{workers}");
}

/// A worker that stops heartbeating is shown as silent, by name, before its lease lapses.
#[test]
fn a_silent_worker_is_shown_before_its_lease_lapses() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "20"]);
    cluster.add_worker("sleepy");
    let sweep_id = cluster.submit("long.toml", &final_sweep("long", 500, ""));
    cluster.wait_for(&sweep_id, Duration::from_secs(120), |r| !r["trials"][0]["epochs"].as_array().unwrap().is_empty());
    cluster.signal("sleepy", "STOP");
    // Silent after half a lease (10 s), lapsed after 20 s.
    let silent = |r: &Value| r["trials"][0]["waiting"].as_str().unwrap_or_default().starts_with("worker sleepy silent for ");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(19), silent);
    assert_eq!(results["trials"][0]["state"], "running", "{results}");
    // The listing names the trial the worker holds, not its task id.
    let workers: Value = serde_json::from_str(&cluster.client_ok(&["workers", "--format", "json"])).unwrap();
    assert_eq!((workers[0]["trial"].as_str(), workers[0]["sweep_id"].as_str()), (Some("final"), Some(sweep_id.as_str())), "{workers}");
    let table = cluster.client_ok(&["workers"]);
    assert!(table.contains(&format!("{sweep_id} final")), "{table}");
    cluster.signal("sleepy", "CONT");
    cluster.client_ok(&["cancel", &sweep_id]);
}

/// The coordinator cannot serve a dataset file (here: its blob is gone from the data dir): the
/// worker reports an infrastructure error, and the trial is tried again up to max_attempts
/// instead of failing at the first try as a user error.
#[test]
fn a_dataset_the_coordinator_cannot_serve_is_retried_not_failed() {
    let mut cluster = Cluster::start();
    let sweep_id = cluster.submit("lost.toml", &final_sweep("lost", 1, "max_attempts = 2\n"));
    let blobs = cluster.data_dir().join("blobs");
    let mut removed = 0;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            std::fs::remove_file(blob.unwrap().path()).unwrap();
            removed += 1;
        }
    }
    assert!(removed >= 4, "the MNIST files and the sample's README: {removed}");
    cluster.add_worker("w0");
    let waited = cluster.client(&["wait", &sweep_id, "--timeout", "120"]);
    assert_eq!(text(&waited.stdout).trim(), "failed", "{}", text(&waited.stderr));
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
    let trial = &results["trials"][0];
    assert_eq!(trial["attempts"], 2, "retried as an infrastructure error: {trial}");
    assert!(trial["error"].as_str().unwrap().contains("cannot fetch"), "{trial}");
}

/// `wait` (like `watch` and `logs --follow`) rides out a coordinator that cannot be reached for
/// a while, saying so once per interval, and ends with the sweep.
#[test]
fn wait_rides_out_a_coordinator_restart() {
    let mut cluster = Cluster::start();
    let sweep_id = cluster.submit("short.toml", &final_sweep("short", 1, ""));
    let mut wait = Command::new(binary("coordinator"))
        .args([
            "--coordinator",
            &cluster.url(),
            "--token-file",
            &cluster.client_token().to_string_lossy(),
            "wait",
            &sweep_id,
            "--timeout",
            "300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Down for longer than `wait` polls (every 500 ms), then back on the same data dir.
    cluster.signal("coordinator", "KILL");
    std::thread::sleep(Duration::from_secs(2));
    cluster.restart_coordinator();
    cluster.add_worker("w0");
    let status = wait_exit(&mut wait, Duration::from_secs(300), "wait");
    let output = wait.wait_with_output().unwrap();
    assert!(status.success(), "{status}: {}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "succeeded");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("retrying with backoff"), "{stderr}");
    assert!(stderr.lines().count() <= 2, "said once per interval:\n{stderr}");
}
