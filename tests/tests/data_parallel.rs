//! A 2-replica WGAN-GP sweep on real MRI slices across worker processes: the gang assembles,
//! trains with averaged gradients, and ends with bitwise identical parameters on both replicas;
//! when one replica is killed mid-training, the gang restarts from its checkpoint and completes.

use std::time::Duration;

use cohort_cluster_tests::{repo_root, Cluster};
use serde_json::Value;

fn gan_sweep(epochs: u32) -> String {
    format!(
        r#"
name = "gan-dp"
seed = 5
[dataset]
format = "nifti"
path = "{}"
train_limit = 32
[model]
kind = "wgan-gp"
widths = [32, 16, 8, 4]
[train]
epochs = {epochs}
batch_size = 8
critic_steps = 2
sample_every = 0
sample_count = 4
checkpoint_every = 1
[distributed]
replicas = 2
"#,
        repo_root().join("data/mri-sample").display()
    )
}

fn checksums(trial: &Value) -> (f64, f64) {
    let last = trial["epochs"].as_array().unwrap().last().unwrap().clone();
    (last["values"]["param_checksum_rank0"].as_f64().unwrap(), last["values"]["param_checksum_rank1"].as_f64().unwrap())
}

#[test]
fn two_replicas_train_one_gan_and_end_identical() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let sweep_id = cluster.submit("gan.toml", &gan_sweep(3));
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let trial = &results["trials"][0];
    assert_eq!(trial["epochs"].as_array().unwrap().len(), 3, "{trial}");
    let workers = trial["worker"].as_str().unwrap();
    assert_eq!(workers.split(',').count(), 2, "two members: {workers}");
    let (rank0, rank1) = checksums(trial);
    assert_eq!(rank0.to_bits(), rank1.to_bits(), "the replicas' parameters are identical");
    assert!(trial["final_checkpoint"].is_string());
}

#[test]
fn a_killed_replica_restarts_the_gang_from_its_checkpoint() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "3"]);
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let sweep_id = cluster.submit("gan.toml", &gan_sweep(40));
    let progressed = |r: &Value| r["trials"][0]["epochs"].as_array().unwrap().len() >= 2;
    cluster.wait_for(&sweep_id, Duration::from_secs(120), progressed);
    cluster.kill("w1");
    cluster.add_worker("w2");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let trial = &results["trials"][0];
    assert!(trial["attempts"].as_u64().unwrap() >= 2, "{trial}");
    let epochs = trial["epochs"].as_array().unwrap();
    let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=40).collect::<Vec<u64>>());
    assert_eq!(epochs[0]["attempt"], 1, "the restart resumed from a checkpoint, not from epoch 1");
    let (rank0, rank1) = checksums(trial);
    assert_eq!(rank0.to_bits(), rank1.to_bits());
}
