//! `kill -9` of the coordinator mid-sweep and a restart on the same data dir: the sweep
//! completes, and the trials that were running are re-attached to their workers, not restarted.

use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, Cluster};

#[test]
fn coordinator_crash_loses_nothing_and_running_trials_are_reattached() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let text = format!(
        r#"
name = "restart"
[dataset]
format = "idx"
path = "{}"
train_limit = 4000
[model]
kind = "dae"
[cv]
folds = 2
epochs = 25
batch_size = 64
checkpoint_every = 5
"#,
        mnist_sample()
    );
    let sweep_id = cluster.submit("sweep.toml", &text);
    let both_running = |r: &serde_json::Value| {
        r["trials"].as_array().unwrap().iter().all(|t| t["state"] == "running" && t["epochs"].as_array().unwrap().len() >= 2)
    };
    cluster.wait_for(&sweep_id, Duration::from_secs(120), both_running);

    cluster.restart_coordinator();
    let state = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    assert_eq!(state.trim(), "succeeded");

    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    for trial in results["trials"].as_array().unwrap() {
        assert_eq!(trial["attempts"], 1, "re-attached, not retried: {trial}");
        let epochs = trial["epochs"].as_array().unwrap();
        let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (1..=25).collect::<Vec<u64>>(), "every epoch recorded once");
        assert!(epochs.iter().all(|e| e["attempt"] == 1));
        assert!(trial["final_checkpoint"].is_string());
    }
}
