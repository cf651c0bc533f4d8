//! Fold-aware early stopping (`[cv.prune]`) on a real cluster: a config that is far behind is
//! stopped mid-fold at its first rung (its worker abandons it and goes on), or dropped by the
//! race with its queued fold; the pruned trials keep their partial figures and the reason; the
//! sweep succeeds and the winner trains `final`.
//!
//! One worker, so that trials run in the queue's (fold-first) order and nothing depends on
//! timing; the configs differ by a learning rate of 1e-3 against 1e-7 (which barely trains), so
//! the decisions do not depend on the figures' last digits either.

use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, Cluster};
use serde_json::Value;

fn sweep(name: &str, prune: &str) -> String {
    format!(
        r#"
name = "{name}"
seed = 2
[dataset]
format = "idx"
path = "{}"
train_limit = 2000
test_limit = 200
[model]
kind = "dae"
[cv]
folds = 3
epochs = 3
batch_size = 64
[cv.grid]
lr = [1e-3, 1e-7]
[cv.prune]
{prune}
[final]
epochs = 1
"#,
        mnist_sample()
    )
}

fn trial<'a>(results: &'a Value, name: &str) -> &'a Value {
    results["trials"].as_array().unwrap().iter().find(|t| t["trial"] == name).unwrap_or_else(|| panic!("no trial {name}: {results}"))
}

fn epochs_of(trial: &Value) -> usize {
    trial["epochs"].as_array().unwrap().len()
}

#[test]
fn losing_configs_are_pruned_and_the_sweep_succeeds() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    let rungs = cluster.submit("rungs.toml", &sweep("rungs", "rule = \"asha\"\ngrace_epochs = 1\nreduction = 2"));
    let race = cluster.submit("race.toml", &sweep("race", "rule = \"racing\"\nmin_folds = 2\nconfidence = 0.8"));
    assert_eq!(cluster.client_ok(&["wait", &rungs, "--timeout", "600"]).trim(), "succeeded");
    assert_eq!(cluster.client_ok(&["wait", &race, "--timeout", "600"]).trim(), "succeeded");

    // Rungs: config 1 ranks last of 2 at epoch 1 of fold 0, where only the best 1 goes on; it was
    // running, and stopped there; its queued folds never ran.
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &rungs, "--format", "json"])).unwrap();
    let stopped = trial(&results, "cv/c1/f0");
    assert_eq!(stopped["state"], "pruned", "{stopped}");
    assert_eq!(epochs_of(stopped), 1, "its partial figures are kept, and nothing after the rung: {stopped}");
    assert!(stopped["error"].as_str().unwrap().starts_with("asha: fold 0 rung 0 (epoch 1)"), "{stopped}");
    for name in ["cv/c1/f1", "cv/c1/f2"] {
        assert_eq!(trial(&results, name)["state"], "pruned");
        assert_eq!(epochs_of(trial(&results, name)), 0);
    }
    for name in ["cv/c0/f0", "cv/c0/f1", "cv/c0/f2"] {
        assert_eq!(trial(&results, name)["state"], "succeeded");
        assert_eq!(epochs_of(trial(&results, name)), 3);
    }
    let final_trial = trial(&results, "final");
    assert_eq!(final_trial["state"], "succeeded");
    assert!(final_trial["config"].as_str().unwrap().starts_with("lr=1e-3"), "{final_trial}");
    let configs = results["configs"].as_array().unwrap();
    assert_eq!(configs[0]["winner"], true);
    assert_eq!(configs[0]["folds"].as_array().unwrap().len(), 3, "the winner's figures are over all its folds");
    assert_eq!(configs[1]["status"], "pruned");
    let table = cluster.client_ok(&["results", &rungs]);
    assert!(table.contains("pruned: asha: fold 0 rung 0 (epoch 1)") && table.contains("pruned: excluded"), "{table}");

    // The race: after 2 fold rounds config 1 is worse on both folds; its third fold never runs.
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &race, "--format", "json"])).unwrap();
    for name in ["cv/c0/f0", "cv/c1/f0", "cv/c0/f1", "cv/c1/f1", "cv/c0/f2"] {
        assert_eq!(trial(&results, name)["state"], "succeeded", "{results}");
    }
    let dropped = trial(&results, "cv/c1/f2");
    assert_eq!(dropped["state"], "pruned");
    assert_eq!(epochs_of(dropped), 0);
    let reason = dropped["error"].as_str().unwrap();
    assert!(reason.starts_with("racing: fold round 2: worse than the leader lr=1e-3") && reason.contains("paired t = "), "{reason}");
    assert!(trial(&results, "final")["config"].as_str().unwrap().starts_with("lr=1e-3"));

    // The worker went on after abandoning the pruned trial, and stayed connected.
    let workers: Value = serde_json::from_str(&cluster.client_ok(&["workers", "--format", "json"])).unwrap();
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");
    let summary = cluster.wait_for(&rungs, Duration::from_secs(5), |_| true);
    assert_eq!(summary["state"], "succeeded");
}
