//! The walking skeleton end to end: real coordinator and worker processes on loopback train a
//! 2-trial sweep on real MNIST digits; the results hold both trials' metrics and each trial's
//! checkpoint downloads and loads back into the model.

use cohort_cluster_tests::{mnist_sample, Cluster};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

fn write_sweep(dir: &std::path::Path) -> std::path::PathBuf {
    let data = mnist_sample();
    let text = format!(
        r#"
name = "cluster-test"
[dataset]
format = "idx"
path = "{}"
train_limit = 300
[noise]
std = 0.3
[model]
kind = "dae"
latent = 4
[cv]
folds = 2
epochs = 2
lr = 1e-3
weight_decay = 1e-6
batch_size = 32
"#,
        data
    );
    let path = dir.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Fetches `http://address/metrics`.
fn scrape(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn two_trial_sweep_runs_end_to_end() {
    let coordinator_metrics = cohort_cluster_tests::free_address();
    let metrics_arg = coordinator_metrics.to_string();
    let mut cluster = Cluster::start_with(&["--metrics-listen", &metrics_arg]);
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let sweep = write_sweep(cluster.dir.path());
    let sweep = sweep.to_string_lossy().into_owned();

    let sweep_id = cluster.client_ok(&["submit", &sweep]).trim().to_string();
    assert!(sweep_id.starts_with('s') && !sweep_id.contains(char::is_whitespace), "stdout is only the id: {sweep_id:?}");
    let state = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    assert_eq!(state.trim(), "succeeded");

    let results: serde_json::Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
    let trials = results["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    let mut workers = std::collections::BTreeSet::new();
    for trial in trials {
        assert_eq!(trial["state"], "succeeded", "{trial}");
        let epochs = trial["epochs"].as_array().unwrap();
        assert_eq!(epochs.len(), 2, "{trial}");
        for epoch in epochs {
            let val = epoch["values"]["val_mse"].as_f64().unwrap();
            let train = epoch["values"]["train_mse"].as_f64().unwrap();
            assert!(val > 0.0 && val < 1.0 && train > 0.0 && train < 1.0, "{epoch}");
        }
        workers.insert(trial["worker"].as_str().unwrap().to_string());

        let task_id = trial["task_id"].as_str().unwrap();
        let output = cluster.dir.path().join(format!("{task_id}.safetensors"));
        cluster.client_ok(&["download", task_id, "-o", &output.to_string_lossy()]);
        let (_vars, model) = cohort_worker::train::dae::load_model(&output, 4, Device::Cpu).unwrap();
        let batch = Tensor::rand([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        let reconstruction = model.forward_t(&batch, false);
        assert_eq!(reconstruction.size(), [3, 1, 28, 28]);
    }
    assert_eq!(results["configs"].as_array().unwrap().len(), 1);
    assert_eq!(results["configs"][0]["winner"], true);

    // The CV table in text form names the winner.
    let table = cluster.client_ok(&["results", &sweep_id]);
    assert!(table.contains("* lr=1e-3 wd=1e-6 bs=32"), "{table}");
    let status = cluster.client_ok(&["status"]);
    assert!(status.contains(&sweep_id) && status.contains("succeeded"), "{status}");

    // The workers' log lines for each trial were forwarded to the coordinator.
    let logs = cluster.client_ok(&["logs", &sweep_id]);
    for needle in ["task started", "dataset loaded", "epoch done", "checkpoint uploaded", "cv/c0/f0 (attempt 1)", "cv/c0/f1 (attempt 1)"] {
        assert!(logs.contains(needle), "{needle} missing from the logs:\n{logs}");
    }
    let one = cluster.client_ok(&["logs", &sweep_id, "--trial", "cv/c0/f1"]);
    assert!(one.contains("cv/c0/f1") && !one.contains("cv/c0/f0"), "{one}");

    // The coordinator's Prometheus endpoint, scraped.
    let text = scrape(coordinator_metrics);
    assert_eq!(metric(&text, "cohort_workers_connected"), 2.0, "{text}");
    assert_eq!(metric(&text, "cohort_tasks_queued"), 0.0);
    assert_eq!(metric(&text, "cohort_dispatch_latency_seconds_count"), 2.0, "two tasks dispatched");
    assert!(metric(&text, "cohort_blob_bytes_stored") > 1_000_000.0, "the dataset and checkpoints are stored");
}

#[test]
fn a_worker_exports_its_training_metrics() {
    let mut cluster = Cluster::start();
    let worker_metrics = cohort_cluster_tests::free_address();
    cluster.add_worker_with("w0", &["--metrics-listen", &worker_metrics.to_string()]);
    let sweep = write_sweep(cluster.dir.path());
    let sweep_id = cluster.client_ok(&["submit", &sweep.to_string_lossy()]).trim().to_string();
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let text = scrape(worker_metrics);
    assert_eq!(metric(&text, "cohort_worker_epochs_total"), 4.0, "2 trials x 2 epochs: {text}");
    assert!(metric(&text, "cohort_worker_step_seconds_count") >= 4.0);
    assert!(metric(&text, "cohort_worker_samples_per_second") > 0.0);
    // Where its time went: every phase is exported; training and loading data took some.
    let phase = |name: &str| metric(&text, &format!("cohort_worker_seconds_total{{phase=\"{name}\"}}"));
    for name in ["checkpoint", "coordinator", "idle"] {
        assert!(phase(name) >= 0.0, "{name}: {text}");
    }
    assert!(phase("train") > 0.0 && phase("data") > 0.0, "{text}");
}

#[test]
fn invalid_sweep_is_refused_and_nothing_is_submitted() {
    let cluster = Cluster::start();
    let sweep = write_sweep(cluster.dir.path());
    let text = std::fs::read_to_string(&sweep).unwrap().replace("folds = 2", "folds = 1");
    std::fs::write(&sweep, text).unwrap();
    let output = cluster.client(&["submit", &sweep.to_string_lossy()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cv.folds: 1 must be at least 2"), "{stderr}");
    let status = cluster.client_ok(&["status", "--format", "json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&status).unwrap(), serde_json::json!([]));
}
