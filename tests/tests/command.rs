//! Command trials (issue 20), end to end against the real binaries and the venv's Python:
//! the user's own program cross-validated over any hyperparameters, its winner retrained as a
//! torch.distributed gang, retried from its own checkpoint after a `kill -9`, stopped with its
//! whole process group, kept off workers that do not allow it, never shown a token, and refused
//! cleanly when it reports NaN or a 10 MB metrics line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cohort_cluster_tests::{mnist_sample, repo_root, Cluster};
use cohort_worker::command::process::live_group_members;
use serde_json::Value;

/// The venv's Python (which has torch), else `python3` from PATH.
fn python() -> String {
    let venv = repo_root().join(".venv/bin/python3");
    if venv.is_file() {
        return venv.display().to_string();
    }
    "python3".to_string()
}

/// Writes `script` as `folder/train.py` under the cluster's folder; returns the folder.
fn program(cluster: &Cluster, folder: &str, script: &str) -> PathBuf {
    let dir = cluster.dir.path().join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train.py"), script).unwrap();
    dir
}

/// A command sweep running `files/train.py`, with `extra` sections appended.
fn sweep(name: &str, files: &Path, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[model]\nkind = \"command\"\n[command]\nrun = [\"{}\", \"train.py\"]\nfiles = \"{}\"\nmetric = \"loss\"\n{extra}",
        python(),
        files.display()
    )
}

fn trial<'a>(results: &'a Value, name: &str) -> &'a Value {
    results["trials"].as_array().unwrap().iter().find(|t| t["trial"] == name).unwrap_or_else(|| panic!("no trial {name}: {results}"))
}

fn state_of(results: &Value, name: &str) -> String {
    trial(results, name)["state"].as_str().unwrap_or_default().to_string()
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A number after `key=` in `text` (the last occurrence).
fn number_after(text: &str, key: &str) -> Option<u32> {
    let at = text.rfind(key)? + key.len();
    text[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

const ENV_DUMP: &str = r#"
import os, json
for name, value in sorted(os.environ.items()):
    print(f"env {name}={value}")
print("cohort-metrics " + json.dumps({"epoch": 1, "loss": 0.5}))
"#;

const NAN: &str = r#"
import json, time
print("cohort-metrics " + json.dumps({"epoch": 1, "loss": float("nan")}), flush=True)
time.sleep(60)
"#;

const HUGE: &str = r#"
import sys, time
sys.stdout.write('cohort-metrics {"epoch": 1, "loss": 1, "pad": "' + "x" * (10 << 20) + '"}\n')
sys.stdout.flush()
time.sleep(60)
"#;

/// A worker without --allow-commands never gets a command trial (it waits, saying why); the
/// program's environment holds the contract and no token; NaN and a 10 MB metrics line fail
/// the trial as the user's error, at once, naming the reason.
#[test]
fn command_trials_are_confined_and_their_reports_checked() {
    let mut cluster = Cluster::start();
    cluster.add_worker("plain");
    let env_files = program(&cluster, "env-dump", ENV_DUMP);
    let sweep_id = cluster.submit("env.toml", &sweep("env", &env_files, "[final]\nepochs = 1\n"));
    std::thread::sleep(Duration::from_secs(4));
    let waiting = cluster.wait_for(&sweep_id, Duration::from_secs(10), |r| !trial(r, "final")["waiting"].as_str().unwrap_or("").is_empty());
    let reason = trial(&waiting, "final")["waiting"].as_str().unwrap().to_string();
    assert_eq!(state_of(&waiting, "final"), "queued", "{waiting}");
    assert!(reason.contains("--allow-commands"), "{reason}");
    assert!(!cluster.log("plain").contains("task started"), "the plain worker received a command trial");

    cluster.add_worker_with("trusted", &["--allow-commands"]);
    let done = cluster.wait_for(&sweep_id, Duration::from_secs(60), |r| r["state"] != "running");
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(trial(&done, "final")["worker_names"], "trusted", "{done}");
    assert!(!cluster.log("plain").contains("task started"), "the plain worker received a command trial");

    let logs = cluster.client_ok(&["logs", &sweep_id]);
    let env: Vec<&str> = logs.lines().filter_map(|line| line.split_once("env ").map(|(_, rest)| rest)).collect();
    assert!(env.iter().any(|v| v.starts_with("COHORT_TRIAL=final")), "{logs}");
    assert!(env.iter().any(|v| v.starts_with("COHORT_CHECKPOINT_DIR=")), "{logs}");
    assert!(env.iter().any(|v| v.starts_with("COHORT_HPARAMS={}")), "{logs}");
    assert!(!env.iter().any(|v| v.starts_with("COHORT_FOLD=")), "final has no fold: {logs}");
    for secret in ["worker-token-for-tests", "client-token-for-tests", "worker.token", "client.token", "COHORT_TOKEN", "RUST_LOG"] {
        assert!(!logs.contains(secret), "{secret} reached the program:\n{logs}");
    }

    for (name, script, expected) in [("nan", NAN, "loss is NaN: only finite numbers"), ("huge", HUGE, "more than the limit of 65536 bytes")]
    {
        let files = program(&cluster, name, script);
        let started = Instant::now();
        let sweep_id = cluster.submit(&format!("{name}.toml"), &sweep(name, &files, "[final]\nepochs = 1\nmax_attempts = 3\n"));
        let done = cluster.wait_for(&sweep_id, Duration::from_secs(60), |r| r["state"] != "running");
        let final_trial = trial(&done, "final");
        assert_eq!(final_trial["state"], "failed", "{done}");
        assert_eq!(final_trial["attempts"], 1, "a user error is not retried: {done}");
        assert!(final_trial["error"].as_str().unwrap().contains(expected), "{done}");
        assert!(final_trial["epochs"].as_array().unwrap().is_empty(), "nothing recorded: {done}");
        assert!(started.elapsed() < Duration::from_secs(40), "refused at once, not after the program's sleep");
    }
}

/// A 2 x 2 grid over the example's own hyperparameters x 2 folds ends with the per-fold table and a winner; the winner's
/// final training runs as a gang of 2, both ranks see WORLD_SIZE=2 and end with the same weights.
#[test]
fn a_command_sweep_cross_validates_and_trains_the_winner_as_a_gang() {
    let mut cluster = Cluster::start();
    cluster.add_worker_with("w1", &["--allow-commands"]);
    cluster.add_worker_with("w2", &["--allow-commands"]);
    let files = repo_root().join("examples/command");
    let text = format!(
        "name = \"grid\"\nseed = 1\n[dataset]\nformat = \"idx\"\npath = \"{}\"\n[model]\nkind = \"command\"\n[command]\nrun = [\"{}\", \"train.py\"]\nfiles = \"{}\"\n\
         metric = \"val_loss\"\n[cv]\nfolds = 2\nepochs = 2\n[cv.grid]\nlr = [0.1, 0.01]\nhidden = [16, 64]\nlimit = [900]\n[final]\nepochs = 2\n[distributed]\nreplicas = 2\n",
        mnist_sample(),
        python(),
        files.display()
    );
    let sweep_id = cluster.submit("grid.toml", &text);
    let done = cluster.wait_for(&sweep_id, Duration::from_secs(300), |r| r["state"] != "running");
    assert_eq!(done["state"], "succeeded", "{done}");
    let cv: Vec<&Value> = done["trials"].as_array().unwrap().iter().filter(|t| t["stage"] == "cv").collect();
    assert_eq!(cv.len(), 8);
    assert!(cv.iter().all(|t| t["epochs"].as_array().unwrap().len() == 2 && t["min_val_mse"].as_f64().is_some()), "{done}");
    let configs = done["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 4, "{done}");
    let winners: Vec<&Value> = configs.iter().filter(|c| c["winner"] == true).collect();
    assert_eq!(winners.len(), 1, "{done}");
    let winner = winners[0]["config"].as_str().unwrap();
    let best_mean = configs.iter().filter_map(|c| c["mean"].as_f64()).fold(f64::INFINITY, f64::min);
    assert_eq!(winners[0]["mean"].as_f64(), Some(best_mean));
    assert!(configs.iter().all(|c| c["folds"].as_array().unwrap().len() == 2 && c["status"] == "complete"), "{done}");

    let table = cluster.client_ok(&["results", &sweep_id]);
    assert!(table.contains("cross-validation: minimum val_loss per fold"), "{table}");
    assert!(table.lines().any(|line| line.starts_with('*') && line.contains(winner)), "{table}");

    let final_trial = trial(&done, "final");
    assert_eq!(final_trial["config"], winner, "{done}");
    assert_eq!(final_trial["epochs"].as_array().unwrap().len(), 2, "{done}");
    let members: std::collections::BTreeSet<&str> = final_trial["worker_names"].as_str().unwrap().split(',').collect();
    assert_eq!(members, ["w1", "w2"].into_iter().collect(), "{done}");
    let logs = cluster.client_ok(&["logs", &sweep_id, "--trial", "final"]);
    let checksums: Vec<&str> =
        logs.lines().filter_map(|line| line.split_once("world_size=2 checksum=").map(|(_, sum)| sum.trim())).collect();
    assert!(logs.contains("result rank=0 world_size=2") && logs.contains("result rank=1 world_size=2"), "{logs}");
    assert_eq!(checksums.len(), 2, "{logs}");
    assert_eq!(checksums[0], checksums[1], "the ranks ended with different weights:\n{logs}");
}

const SLOW: &str = r#"
import json, os, time
resume = os.environ.get("COHORT_RESUME_DIR")
start = 1
if resume:
    with open(os.path.join(resume, "state.json")) as f:
        start = json.load(f)["epoch"] + 1
print(f"pid={os.getpid()} pgid={os.getpgid(0)} start={start}", flush=True)
for epoch in range(start, int(os.environ["COHORT_EPOCHS"]) + 1):
    time.sleep(1.0)
    path = os.path.join(os.environ["COHORT_CHECKPOINT_DIR"], "state.json")
    with open(path + ".partial", "w") as f:
        json.dump({"epoch": epoch}, f)
    os.replace(path + ".partial", path)
    print("cohort-metrics " + json.dumps({"epoch": epoch, "loss": 1.0 / epoch}), flush=True)
"#;

const FOREVER: &str = r#"
import os, subprocess, time
child = subprocess.Popen(["sleep", "600"])
print(f"pid={os.getpid()} pgid={os.getpgid(0)} child={child.pid}", flush=True)
time.sleep(600)
"#;

/// `kill -9` of the worker mid-trial: the orphaned program dies with it, the retry resumes from
/// COHORT_RESUME_DIR (the latest stored checkpoint) and each epoch is recorded once. Cancel
/// stops the program and every process it started.
#[test]
fn a_killed_worker_resumes_from_the_checkpoint_and_cancel_leaves_no_process() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "2"]);
    cluster.add_worker_with("w1", &["--allow-commands"]);
    let files = program(&cluster, "slow", SLOW);
    let sweep_id = cluster.submit("slow.toml", &sweep("slow", &files, "[final]\nepochs = 6\n"));
    cluster.wait_for(&sweep_id, Duration::from_secs(60), |r| trial(r, "final")["epochs"].as_array().is_some_and(|e| e.len() >= 2));
    let first_logs = cluster.client_ok(&["logs", &sweep_id]);
    let first_group = number_after(&first_logs, "pgid=").expect("the program's process group");
    cluster.kill("w1");
    wait_until(Duration::from_secs(10), "the orphaned program died with its worker", || live_group_members(first_group).is_empty());

    cluster.add_worker_with("w2", &["--allow-commands"]);
    let done = cluster.wait_for(&sweep_id, Duration::from_secs(90), |r| r["state"] != "running");
    assert_eq!(done["state"], "succeeded", "{done}");
    let final_trial = trial(&done, "final");
    assert!(final_trial["attempts"].as_u64().unwrap() >= 2, "{done}");
    let epochs: Vec<u64> = final_trial["epochs"].as_array().unwrap().iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, vec![1, 2, 3, 4, 5, 6], "each epoch once: {done}");
    let attempts: std::collections::BTreeSet<u64> =
        final_trial["epochs"].as_array().unwrap().iter().map(|e| e["attempt"].as_u64().unwrap()).collect();
    assert!(attempts.len() >= 2, "epochs from both attempts are kept: {done}");
    let logs = cluster.client_ok(&["logs", &sweep_id]);
    let resumed_at = number_after(&logs, "start=").expect("the retry's start");
    assert!(resumed_at >= 2, "the retry resumed from the stored checkpoint, not epoch 1:\n{logs}");

    let files = program(&cluster, "forever", FOREVER);
    let sweep_id = cluster.submit("forever.toml", &sweep("forever", &files, "[final]\nepochs = 1\n"));
    wait_until(Duration::from_secs(60), "the program started", || cluster.client_ok(&["logs", &sweep_id]).contains("child="));
    let logs = cluster.client_ok(&["logs", &sweep_id]);
    let group = number_after(&logs, "pgid=").unwrap();
    let child = number_after(&logs, "child=").unwrap();
    assert!(live_group_members(group).contains(&child), "the program's child runs in its group");
    cluster.client_ok(&["cancel", &sweep_id]);
    wait_until(Duration::from_secs(20), "cancel stopped every process of the trial", || live_group_members(group).is_empty());
    let done = cluster.wait_for(&sweep_id, Duration::from_secs(10), |r| r["state"] != "running");
    assert_eq!(state_of(&done, "final"), "cancelled", "{done}");
    // The worker is free for the next trial, its run folder removed.
    let runs = cluster.dir.path().join("cache-w2/runs");
    wait_until(Duration::from_secs(10), "the run folders were removed", || std::fs::read_dir(&runs).map_or(true, |d| d.count() == 0));
}
