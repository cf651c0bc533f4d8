//! `cancel` stops a running trial on its worker (which goes on to the next sweep), and `retry`
//! queues the cancelled trial again, resuming from its latest checkpoint.

use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, Cluster};

fn sweep(cluster: &Cluster, name: &str, epochs: u32) -> String {
    let text = format!(
        r#"
name = "{name}"
[dataset]
format = "idx"
path = "{}"
train_limit = 4000
[model]
kind = "dae"
[final]
epochs = {epochs}
batch_size = 64
"#,
        mnist_sample()
    );
    cluster.submit(&format!("{name}.toml"), &text)
}

#[test]
fn cancel_stops_the_running_trial_and_retry_resumes_it() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    let long = sweep(&cluster, "long", 500);
    let short = sweep(&cluster, "short", 2);
    let started = |r: &serde_json::Value| r["trials"][0]["epochs"].as_array().unwrap().len() >= 2;
    cluster.wait_for(&long, Duration::from_secs(120), started);

    assert_eq!(cluster.client_ok(&["cancel", &long]).trim(), "1 trials cancelled");
    // The worker drops the cancelled trial and runs the next sweep's.
    assert_eq!(cluster.client_ok(&["wait", &short, "--timeout", "120"]).trim(), "succeeded");
    // An ended sweep keeps its outcome: cancelling or retrying it changes nothing, and says so.
    assert!(cluster.client_ok(&["cancel", &short]).starts_with("nothing to cancel"));
    assert!(cluster.client_ok(&["retry", &short]).starts_with("nothing to retry"));
    assert_eq!(cluster.client_ok(&["wait", &short, "--timeout", "5"]).trim(), "succeeded");
    let cancelled = cluster.wait_for(&long, Duration::from_secs(5), |_| true);
    assert_eq!(cancelled["state"], "cancelled");
    let done_before = cancelled["trials"][0]["epochs"].as_array().unwrap().len();
    assert!(done_before < 500, "stopped early: {done_before} epochs");
    let workers = cluster.client_ok(&["workers", "--format", "json"]);
    let workers: serde_json::Value = serde_json::from_str(&workers).unwrap();
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");

    assert_eq!(cluster.client_ok(&["retry", &long]).trim(), "1 trials queued again");
    let resumed = |r: &serde_json::Value| {
        let epochs = r["trials"][0]["epochs"].as_array().unwrap();
        r["trials"][0]["attempts"].as_u64().unwrap() >= 2 && epochs.iter().any(|e| e["attempt"].as_u64().unwrap() >= 2)
    };
    let results = cluster.wait_for(&long, Duration::from_secs(120), resumed);
    let epochs = results["trials"][0]["epochs"].as_array().unwrap();
    let first_of_retry = epochs.iter().find(|e| e["attempt"].as_u64().unwrap() >= 2).unwrap()["epoch"].as_u64().unwrap();
    assert!(first_of_retry > 1, "the retry resumed from a checkpoint, not from epoch 1");
    cluster.client_ok(&["cancel", &long]);
}
