//! The autoencoder pipeline's `final` and `finetune` stages data parallel on 2 worker processes
//! (`[distributed] replicas = 2`): each runs as a gang to completion, and reports the figures and
//! produces the latent codes the same sweep does on one replica, uneven last batches included;
//! when a replica is killed mid-training, the gang restarts from the last checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cohort_cluster_tests::{binary, mnist_sample, temp_dir, Cluster};
use serde_json::Value;
use tch::Tensor;

/// 41 training digits: `final`'s batches of 10 end with 1 digit (one replica's share is empty),
/// `finetune`'s batches of 12 end with 5 (3 + 2).
fn sweep(distributed: &str) -> String {
    format!(
        r#"
name = "dae-dp"
seed = 4
[dataset]
format = "idx"
path = "{}"
train_limit = 41
test_limit = 30
[model]
kind = "dae"
latent = 3
[final]
epochs = 3
lr = 3e-3
batch_size = 10
[finetune]
epochs = 2
batch_size = 12
{distributed}
"#,
        mnist_sample()
    )
}

fn run(cluster: &Cluster, name: &str, text: &str) -> Value {
    let sweep_id = cluster.submit(name, text);
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true)
}

fn trial<'a>(results: &'a Value, stage: &str) -> &'a Value {
    results["trials"].as_array().unwrap().iter().find(|t| t["stage"] == stage).unwrap_or_else(|| panic!("no {stage} trial: {results}"))
}

fn latents(cluster: &Cluster, trial: &Value) -> Tensor {
    let sha256 = trial["artifacts"]["latents"].as_str().unwrap();
    let output = cluster.dir.path().join(format!("{sha256}.safetensors"));
    cluster.client_ok(&["download", sha256, "-o", &output.to_string_lossy()]);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(Path::new(&output)).unwrap().into_iter().collect();
    tensors["latents"].shallow_clone()
}

/// Every epoch's figures of `gang` equal `sole`'s within float tolerance.
fn assert_same_epochs(stage: &str, gang: &Value, sole: &Value) {
    let (gang, sole) = (gang["epochs"].as_array().unwrap(), sole["epochs"].as_array().unwrap());
    assert_eq!(gang.len(), sole.len(), "{stage}");
    for (ours, theirs) in gang.iter().zip(sole) {
        let values = theirs["values"].as_object().unwrap();
        assert!(!values.is_empty());
        for (key, expected) in values {
            let (ours, expected) = (ours["values"][key].as_f64().unwrap(), expected.as_f64().unwrap());
            assert!(
                (ours - expected).abs() <= 1e-4 * expected.abs().max(1e-3),
                "{stage} epoch {}: {key} {ours} vs {expected} on one replica",
                theirs["epoch"]
            );
        }
    }
}

#[test]
fn final_and_finetune_run_as_gangs_and_match_one_replica() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let sole = run(&cluster, "sole.toml", &sweep(""));
    let gang = run(&cluster, "gang.toml", &sweep("[distributed]\nreplicas = 2\n"));
    for stage in ["final", "finetune"] {
        let (ours, theirs) = (trial(&gang, stage), trial(&sole, stage));
        let members = ours["worker"].as_str().unwrap();
        assert_eq!(members.split(',').count(), 2, "{stage} ran as a gang of two: {members}");
        assert_eq!(theirs["worker"].as_str().unwrap().split(',').count(), 1);
        assert!(ours["final_checkpoint"].is_string(), "{ours}");
        assert_same_epochs(stage, ours, theirs);
        let difference = (latents(&cluster, ours) - latents(&cluster, theirs)).abs().max().double_value(&[]);
        assert!(difference < 1e-3, "{stage}: latent codes differ from one replica's by {difference}");
    }
}

#[test]
fn a_local_cluster_smaller_than_the_gang_is_refused_up_front() {
    let dir = temp_dir();
    let file = dir.path().join("gang.toml");
    std::fs::write(&file, sweep("[distributed]\nreplicas = 2\n")).unwrap();
    let output = std::process::Command::new(binary("coordinator")).arg("local").arg(&file).args(["--workers", "1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("[distributed] replicas = 2 trains on 2 workers at once: run with --workers 2 or more"), "{stderr}");
}

#[test]
fn a_killed_replica_restarts_the_final_gang_from_its_checkpoint() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "3"]);
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let text = sweep("[distributed]\nreplicas = 2\n")
        .replace("train_limit = 41", "train_limit = 2000")
        .replace("epochs = 3", "epochs = 40")
        .replace("batch_size = 10", "batch_size = 100");
    let sweep_id = cluster.submit("gang.toml", &text);
    let progressed =
        |r: &Value| r["trials"].as_array().unwrap().iter().any(|t| t["stage"] == "final" && t["epochs"].as_array().unwrap().len() >= 2);
    cluster.wait_for(&sweep_id, Duration::from_secs(120), progressed);
    cluster.kill("w1");
    cluster.add_worker("w2");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let final_trial = trial(&results, "final");
    let epochs = final_trial["epochs"].as_array().unwrap();
    let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=40).collect::<Vec<u64>>(), "{final_trial}");
    assert!(final_trial["attempts"].as_u64().unwrap() >= 2, "{final_trial}");
    assert_eq!(epochs[0]["attempt"], 1, "the restart resumed from a checkpoint, not from epoch 1");
    assert_eq!(trial(&results, "finetune")["worker"].as_str().unwrap().split(',').count(), 2);
}
