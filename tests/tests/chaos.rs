//! A worker whose heartbeats stop without it dying (SIGSTOP): its lease lapses, the trial moves
//! to another worker and resumes from its checkpoint; when the paused worker wakes (SIGCONT), its
//! late reports are refused and change nothing: every epoch is recorded once, by the new attempt.

use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, Cluster};
use serde_json::Value;

#[test]
fn a_paused_worker_loses_its_trial_and_its_late_reports_are_refused() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "2"]);
    cluster.add_worker("sleepy");
    let text = format!(
        "name = \"chaos\"\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 4000\n[model]\nkind = \"dae\"\n[final]\nepochs = 30\nbatch_size = 64\ncheckpoint_every = 1\n",
        mnist_sample()
    );
    let sweep_id = cluster.submit("chaos.toml", &text);
    let progressed = |r: &Value| r["trials"][0]["epochs"].as_array().unwrap().len() >= 2;
    cluster.wait_for(&sweep_id, Duration::from_secs(120), progressed);

    cluster.signal("sleepy", "STOP");
    cluster.add_worker("awake");
    let moved = |r: &Value| r["trials"][0]["epochs"].as_array().unwrap().iter().any(|e| e["attempt"] == 2);
    cluster.wait_for(&sweep_id, Duration::from_secs(120), moved);
    cluster.signal("sleepy", "CONT");

    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let trial = &results["trials"][0];
    // At least the one move; a loaded machine may delay a heartbeat into one more.
    assert!(trial["attempts"].as_u64().unwrap() >= 2, "{trial}");
    let epochs = trial["epochs"].as_array().unwrap();
    let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=30).collect::<Vec<u64>>(), "one record per epoch");
    let first_of_retry = epochs.iter().position(|e| e["attempt"] != 1).unwrap();
    assert!(first_of_retry > 0, "the new attempt resumed from a checkpoint");
    assert!(epochs[first_of_retry..].iter().all(|e| e["attempt"] != 1), "no late report of the paused worker was recorded: {epochs:?}");
    assert!(trial["worker"].as_str().unwrap() != "", "{trial}");

    // The woken worker was told its work is no longer wanted.
    std::thread::sleep(Duration::from_secs(2));
    let log = std::fs::read_to_string(&cluster.processes.iter().find(|p| p.label == "sleepy").unwrap().log).unwrap();
    assert!(log.contains("abandoned") || log.contains("refused"), "sleepy's log:\n{log}");
}

/// SIGTERM (a pod being stopped): the worker finishes its epoch, checkpoints it, hands the trial
/// back and exits cleanly; the next attempt resumes from that checkpoint, losing no epoch even
/// though the periodic checkpoints are far apart.
#[test]
fn a_terminated_worker_checkpoints_and_releases_its_trial() {
    let mut cluster = Cluster::start();
    cluster.add_worker("leaving");
    let text = format!(
        "name = \"drain\"\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 4000\n[model]\nkind = \"dae\"\n[final]\nepochs = 30\nbatch_size = 64\ncheckpoint_every = 100\n",
        mnist_sample()
    );
    let sweep_id = cluster.submit("drain.toml", &text);
    let progressed = |r: &Value| r["trials"][0]["epochs"].as_array().unwrap().len() >= 2;
    cluster.wait_for(&sweep_id, Duration::from_secs(120), progressed);
    cluster.signal("leaving", "TERM");
    let leaving = cluster.processes.iter_mut().find(|p| p.label == "leaving").unwrap();
    let status = leaving.child.wait().unwrap();
    assert!(status.success(), "the worker exits cleanly: {status}");
    let requeued = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    assert_eq!(requeued["trials"][0]["state"], "queued", "released at once, not after a lease lapse");
    let done_before = requeued["trials"][0]["epochs"].as_array().unwrap().len();

    cluster.add_worker("arriving");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let epochs = results["trials"][0]["epochs"].as_array().unwrap();
    let first_of_retry = epochs.iter().find(|e| e["attempt"] == 2).unwrap()["epoch"].as_u64().unwrap();
    assert_eq!(first_of_retry as usize, done_before + 1, "resumed from the drain checkpoint: no epoch lost or redone");
}
