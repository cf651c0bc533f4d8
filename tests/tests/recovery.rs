//! A worker killed with SIGKILL mid-trial: its lease lapses, another worker resumes the trial
//! from its latest checkpoint (not from epoch 1), and the trial has exactly one result.

use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, Cluster};

#[test]
fn killed_worker_trial_resumes_from_its_checkpoint_elsewhere() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "2"]);
    let text = format!(
        r#"
name = "recovery"
[dataset]
format = "idx"
path = "{}"
train_limit = 4000
[model]
kind = "dae"
[cv]
folds = 2
epochs = 12
batch_size = 64
checkpoint_every = 1
[cv.grid]
lr = [1e-3]
"#,
        mnist_sample()
    );
    cluster.add_worker("doomed");
    let sweep_id = cluster.submit("sweep.toml", &text);

    // Let the doomed worker get a few epochs (and checkpoints) into its first trial, then kill it.
    let progressed = |r: &serde_json::Value| {
        r["trials"].as_array().unwrap().iter().any(|t| t["epochs"].as_array().unwrap().len() >= 3 && t["state"] == "running")
    };
    let before = cluster.wait_for(&sweep_id, Duration::from_secs(120), progressed);
    cluster.kill("doomed");
    let victim = before["trials"].as_array().unwrap().iter().find(|t| t["state"] == "running").unwrap()["task_id"].clone();
    cluster.add_worker("rescuer");

    let state = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    assert_eq!(state.trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let trial = results["trials"].as_array().unwrap().iter().find(|t| t["task_id"] == victim).unwrap().clone();
    // At least the one move; a loaded machine may delay a heartbeat into one more.
    assert!(trial["attempts"].as_u64().unwrap() >= 2, "{trial}");
    assert!(!trial["worker"].as_str().unwrap().is_empty());
    let epochs = trial["epochs"].as_array().unwrap();
    let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=12).collect::<Vec<u64>>(), "one record per epoch");
    assert_eq!(epochs[0]["attempt"], 1, "epoch 1 was not redone: the second attempt resumed from a checkpoint");
    assert!(epochs[11]["attempt"].as_u64().unwrap() >= 2);
    assert!(trial["final_checkpoint"].is_string(), "{trial}");
}
