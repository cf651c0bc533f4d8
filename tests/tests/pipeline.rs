//! The seed's two experiments end to end on a real cluster, at test scale:
//! - the autoencoder pipeline: cross-validation, the winner retrained (`final`), a classifier
//!   fine-tuned from it (`finetune`), with their artifacts;
//! - the WGAN-GP on real MRI slices (one replica).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, repo_root, small_wgan_sweep, Cluster};
use serde_json::Value;
use tch::Tensor;

fn download_tensors(cluster: &Cluster, sha256: &str) -> BTreeMap<String, Tensor> {
    let output = cluster.dir.path().join(format!("{sha256}.safetensors"));
    cluster.client_ok(&["download", sha256, "-o", &output.to_string_lossy()]);
    Tensor::read_safetensors(Path::new(&output)).unwrap().into_iter().collect()
}

/// Width and height of a PNG file, from its IHDR chunk (and proof it is a PNG).
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is a PNG", path.display());
    let word = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (word(16), word(20))
}

/// Reads TensorBoard event files back with TensorBoard itself (the .venv's `tensorboard`).
fn read_tensorboard(dir: &Path) -> Value {
    let python = repo_root().join(".venv/bin/python");
    let script = repo_root().join("tools/tests/read_tensorboard.py");
    let output = std::process::Command::new(python).arg(script).arg(dir).output().expect("run the .venv's python (make test installs it)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn trials_of<'a>(results: &'a Value, stage: &str) -> Vec<&'a Value> {
    results["trials"].as_array().unwrap().iter().filter(|t| t["stage"] == stage).collect()
}

#[test]
fn autoencoder_pipeline_runs_cv_then_final_then_finetune() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let text = format!(
        r#"
name = "pipeline"
seed = 3
[dataset]
format = "idx"
path = "{}"
train_limit = 400
test_limit = 200
[augment]
copies = 1
[model]
kind = "dae"
[cv]
folds = 2
epochs = 2
batch_size = 32
[cv.grid]
lr = [1e-3, 1e-5]
[final]
epochs = 2
[finetune]
epochs = 2
batch_size = 32
"#,
        mnist_sample()
    );
    let sweep_id = cluster.submit("pipeline.toml", &text);
    let state = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    assert_eq!(state.trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);

    assert_eq!(trials_of(&results, "cv").len(), 4);
    let winner = results["configs"].as_array().unwrap().iter().find(|c| c["winner"] == true).unwrap();
    let finals = trials_of(&results, "final");
    assert_eq!(finals.len(), 1);
    let final_trial = finals[0];
    assert_eq!(final_trial["config"], winner["config"], "final trains the cross-validation winner");
    assert_eq!(final_trial["kind"], "dae-final");
    for epoch in final_trial["epochs"].as_array().unwrap() {
        assert!(epoch["values"]["test_mse"].as_f64().unwrap() > 0.0, "{epoch}");
    }
    let artifacts = final_trial["artifacts"].as_object().unwrap();
    for name in ["latents", "reconstructions-e1", "reconstructions-e2"] {
        assert!(artifacts.contains_key(name), "final lacks {name}: {artifacts:?}");
    }
    let latents = download_tensors(&cluster, artifacts["latents"].as_str().unwrap());
    assert_eq!(latents["latents"].size(), [200, 4]);
    assert_eq!(latents["labels"].size(), [200]);
    let reconstructions = download_tensors(&cluster, artifacts["reconstructions-e2"].as_str().unwrap());
    assert_eq!(reconstructions["output"].size(), [8, 1, 28, 28]);

    let finetune = trials_of(&results, "finetune");
    assert_eq!(finetune.len(), 1);
    assert_eq!(finetune[0]["kind"], "classifier");
    let epochs = finetune[0]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    let accuracy = epochs[1]["values"]["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");
    assert!(finetune[0]["artifacts"]["latents"].is_string());

    let table = cluster.client_ok(&["results", &sweep_id]);
    for needle in ["stage cv: 4 trial(s)", "stage final: 1 trial(s)", "stage finetune: 1 trial(s)", "test_accuracy per epoch"] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }

    // The report: figs. 1-3 and the page.
    let out = cluster.dir.path().join("report");
    let index = cluster.client_ok(&["report", &sweep_id, "--out", &out.to_string_lossy()]);
    assert!(index.trim().ends_with("index.html"));
    assert_eq!(png_size(&out.join("fig1-test-mse.png")), (900, 560));
    assert_eq!(png_size(&out.join("fig2-latent-pca.png")), (900, 760));
    assert_eq!(png_size(&out.join("fig3-latent-pca-finetuned.png")), (900, 760));
    let (width, height) = png_size(&out.join("fig1-reconstructions.png"));
    assert!(width > 8 * 84 && height > 6 * 84, "8 digits x 6 rows at 3x: {width}x{height}");
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    for needle in ["Cross-validation", "winner", "fig1-test-mse.png", "fig3-latent-pca-finetuned.png", "finetune"] {
        assert!(page.contains(needle), "{needle} missing from index.html");
    }

    // TensorBoard reads back every trial's scalars and the reconstructions.
    let tensorboard = cluster.dir.path().join("tb");
    cluster.client_ok(&["export", &sweep_id, "--tensorboard", &tensorboard.to_string_lossy()]);
    let found = read_tensorboard(&tensorboard);
    assert_eq!(found.as_object().unwrap().len(), 6, "one run per trial: {found}");
    assert_eq!(found["final"]["scalars"]["test_mse"], serde_json::json!([1, 2]), "{found}");
    assert_eq!(found["finetune"]["scalars"]["test_accuracy"], serde_json::json!([1, 2]));
    assert_eq!(found["cv/c0/f1"]["scalars"]["val_mse"], serde_json::json!([1, 2]));
    assert_eq!(found["final"]["images"]["reconstructions/output"].as_array().unwrap().len(), 2);
}

#[test]
fn wgan_trains_on_real_mri_slices() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    let text = small_wgan_sweep("gan");
    let sweep_id = cluster.submit("gan.toml", &text);
    let state = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    assert_eq!(state.trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let train = trials_of(&results, "train");
    assert_eq!(train.len(), 1);
    let epochs = train[0]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    for epoch in epochs {
        for key in ["critic_loss", "generator_loss", "wasserstein", "gradient_penalty"] {
            assert!(epoch["values"][key].as_f64().unwrap().is_finite(), "{key}: {epoch}");
        }
    }
    let artifacts = train[0]["artifacts"].as_object().unwrap();
    let real = download_tensors(&cluster, artifacts["real"].as_str().unwrap());
    assert_eq!(real["images"].size(), [4, 1, 64, 64]);
    let samples = download_tensors(&cluster, artifacts["samples-e2"].as_str().unwrap());
    assert_eq!(samples["images"].size(), [4, 1, 64, 64]);
    let max = samples["images"].abs().max().double_value(&[]);
    assert!(max <= 1.0, "tanh output: {max}");
    assert!(train[0]["final_checkpoint"].is_string());

    // The report: figs. 4-7.
    let out = cluster.dir.path().join("report");
    cluster.client_ok(&["report", &sweep_id, "--out", &out.to_string_lossy()]);
    assert_eq!(png_size(&out.join("fig4-losses.png")), (1680, 480));
    let (width, height) = png_size(&out.join("fig5-samples.png"));
    assert!(width > 4 * 128 && height > 3 * 128, "real + 2 epochs of 4 slices at 2x: {width}x{height}");
    assert_eq!(png_size(&out.join("fig6-noise.png")), (1000, 420));
    let (width, height) = png_size(&out.join("fig7-generated.png"));
    assert!(width >= 64 * 6 && height >= 64 * 6, "upscaled 6x: {width}x{height}");

    // TensorBoard reads back the losses and the sample grids.
    let tensorboard = cluster.dir.path().join("tb");
    cluster.client_ok(&["export", &sweep_id, "--tensorboard", &tensorboard.to_string_lossy()]);
    let found = read_tensorboard(&tensorboard);
    assert_eq!(found["train"]["scalars"]["critic_loss"], serde_json::json!([1, 2]), "{found}");
    let samples = found["train"]["images"]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2, "{found}");
    assert_eq!(found["train"]["images"]["real"].as_array().unwrap().len(), 1);
}
