//! The class-conditional WGAN-GP across processes: a 2-class run at small widths on an image
//! folder this test writes (32×32 discs and rings) reports the sliced Wasserstein distance to
//! the test set every `eval_every` epochs (per level, per class, and their mean), and
//! `coordinator generate --class` samples the trained generator in the CLI process into a PNG
//! holding only the requested class's row, the same row the all-classes grid shows for it.
//! And a run killed with SIGKILL mid-training resumes from its checkpoint to the same figures
//! as an uninterrupted run. And a conditional run on digits written by the stand-in script,
//! judged by the classifier an autoencoder sweep fine-tuned, reports the class accuracy of its
//! samples at every evaluation, per class by the class folders' digits.

use std::path::Path;
use std::time::Duration;

use cohort_cluster_tests::{mnist_sample, repo_root, Cluster};
use cohort_worker::train::wgan_judge::Judge;
use serde_json::Value;
use tch::{Kind, Tensor};

const SIDE: i64 = 32;

/// A 32×32 grey image: a filled disc (class `disc`) or a ring (class `ring`) of random centre
/// and radius, from a small linear congruential stream.
fn shape(ring: bool, state: &mut u64) -> Tensor {
    let mut next = || {
        *state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (*state >> 33) as f64 / (1u64 << 31) as f64
    };
    let (cx, cy, radius) = (12.0 + 8.0 * next(), 12.0 + 8.0 * next(), 6.0 + 4.0 * next());
    let mut pixels = vec![0u8; (SIDE * SIDE) as usize];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            let inside = if ring { (d - radius).abs() < 2.0 } else { d < radius };
            pixels[(y * SIDE + x) as usize] = if inside { 230 } else { 20 };
        }
    }
    Tensor::from_slice(&pixels).view([1, SIDE, SIDE])
}

/// Writes ROOT/{train,test}/{disc,ring}/NNN.png: `train` and `test` images per class.
fn write_folder(root: &Path, train: usize, test: usize) {
    let mut state = 19;
    for (part, count) in [("train", train), ("test", test)] {
        for class in ["disc", "ring"] {
            let dir = root.join(part).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..count {
                tch::vision::image::save(&shape(class == "ring", &mut state), dir.join(format!("{i:03}.png"))).unwrap();
            }
        }
    }
}

fn sweep(root: &Path, epochs: u32, eval_every: u32) -> String {
    format!(
        r#"
name = "cgan"
seed = 3
[dataset]
format = "image-folder"
path = "{}"
image_size = 32
[model]
kind = "wgan-gp"
widths = [16, 8, 8]
conditional = true
[train]
epochs = {epochs}
batch_size = 8
critic_steps = 2
sample_every = 0
sample_count = 4
eval_every = {eval_every}
checkpoint_every = 1
"#,
        root.display()
    )
}

fn epochs(results: &Value) -> Vec<Value> {
    results["trials"][0]["epochs"].as_array().cloned().unwrap_or_default()
}

/// Loads a PNG as `[H, W]` grey levels.
fn png(path: &Path) -> Tensor {
    let image = tch::vision::image::load(path).unwrap();
    image.get(0).to_kind(Kind::Int64)
}

#[test]
fn a_conditional_run_reports_swd_and_generate_draws_the_requested_class() {
    let mut cluster = Cluster::start();
    let root = cluster.dir.path().join("shapes");
    write_folder(&root, 16, 8);
    cluster.add_worker("w0");
    let sweep_id = cluster.submit("cgan.toml", &sweep(&root, 4, 2));
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let epochs = epochs(&results);
    assert_eq!(epochs.len(), 4);
    for epoch in &epochs {
        let values = &epoch["values"];
        let number = epoch["epoch"].as_u64().unwrap();
        if number % 2 == 0 {
            for key in ["swd", "swd_32", "swd_16", "swd_class0", "swd_class1"] {
                let value = values[key].as_f64().unwrap_or_else(|| panic!("epoch {number} lacks {key}: {values}"));
                assert!(value.is_finite() && value > 0.0, "{key} = {value}");
            }
            let mean = (values["swd_32"].as_f64().unwrap() + values["swd_16"].as_f64().unwrap()) / 2.0;
            assert!((values["swd"].as_f64().unwrap() - mean).abs() < 1e-9, "swd is the levels' mean");
        } else {
            assert!(values.get("swd").is_none(), "epoch {number} is not an evaluation epoch: {values}");
        }
    }

    let out = cluster.dir.path();
    let (ring, all) = (out.join("ring.png"), out.join("all.png"));
    let printed =
        cluster.client_ok(&["generate", &sweep_id, "--class", "ring", "--count", "5", "--seed", "7", "--out", &ring.to_string_lossy()]);
    assert!(printed.contains("rows: ring") && printed.contains("5 columns"), "{printed}");
    let printed = cluster.client_ok(&["generate", &sweep_id, "--count", "5", "--seed", "7", "--out", &all.to_string_lossy()]);
    assert!(printed.contains("rows: disc, ring"), "{printed}");
    let (ring, all) = (png(&ring), png(&all));
    let cell = SIDE + 2;
    assert_eq!(ring.size(), [cell + 2, 5 * cell + 2], "one row of 5 images of 32×32 with 2-pixel gaps");
    assert_eq!(all.size(), [2 * cell + 2, 5 * cell + 2], "one row per class");
    assert!(all.narrow(0, cell, cell + 2).equal(&ring), "the ring row of the full grid is the --class ring grid");
    assert!(!all.narrow(0, 0, cell + 2).equal(&ring), "the disc row differs");
    // The sampling runs in the worker binary: its errors reach the user once, as the command's.
    let missing = out.join("no-such-latents.txt");
    let failed =
        cluster.client(&["generate", &sweep_id, "--latent", &missing.to_string_lossy(), "--out", &out.join("x.png").to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(stderr.contains("no-such-latents.txt") && stderr.matches("error:").count() == 1, "{stderr}");
}

#[test]
fn a_run_killed_mid_training_resumes_to_the_same_figures() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "3"]);
    let root = cluster.dir.path().join("shapes");
    write_folder(&root, 48, 8);
    let text = sweep(&root, 40, 10);
    cluster.add_worker("w0");
    let straight = cluster.submit("straight.toml", &text);
    assert_eq!(cluster.client_ok(&["wait", &straight, "--timeout", "600"]).trim(), "succeeded");
    let straight = cluster.wait_for(&straight, Duration::from_secs(5), |_| true);

    let interrupted = cluster.submit("interrupted.toml", &text);
    cluster.wait_for(&interrupted, Duration::from_secs(300), |r| epochs(r).len() >= 12);
    cluster.kill("w0");
    cluster.add_worker("w1");
    assert_eq!(cluster.client_ok(&["wait", &interrupted, "--timeout", "600"]).trim(), "succeeded");
    let resumed = cluster.wait_for(&interrupted, Duration::from_secs(5), |_| true);
    assert!(resumed["trials"][0]["attempts"].as_u64().unwrap() >= 2, "the kill interrupted the run: {}", resumed["trials"][0]);

    let (a, b) = (epochs(&straight), epochs(&resumed));
    assert_eq!(a.len(), 40);
    assert_eq!(b.iter().map(|e| e["epoch"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=40).collect::<Vec<u64>>());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["values"], y["values"], "epoch {}: the resumed run's figures equal the uninterrupted run's", x["epoch"]);
    }
    assert!(b[39]["values"]["swd"].is_f64() && b[39]["values"]["param_checksum_rank0"].is_f64());
}

#[test]
fn two_replicas_train_one_conditional_gan_and_evaluate_alike() {
    let mut cluster = Cluster::start();
    let root = cluster.dir.path().join("shapes");
    write_folder(&root, 16, 8);
    cluster.add_worker("w0");
    cluster.add_worker("w1");
    let text = format!("{}[distributed]\nreplicas = 2\n", sweep(&root, 2, 1));
    let sweep_id = cluster.submit("cgan-dp.toml", &text);
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let epochs = epochs(&results);
    assert_eq!(epochs.len(), 2);
    let last = &epochs[1]["values"];
    assert!(last["swd"].as_f64().unwrap() > 0.0 && last["swd_class1"].is_f64(), "{last}");
    let (rank0, rank1) = (last["param_checksum_rank0"].as_f64().unwrap(), last["param_checksum_rank1"].as_f64().unwrap());
    assert_eq!(rank0.to_bits(), rank1.to_bits(), "the replicas' parameters are identical after evaluating");
}

#[test]
fn a_judged_digit_run_reports_the_class_accuracy_of_its_samples() {
    let mut cluster = Cluster::start();
    cluster.add_worker("w0");
    // The judge: the classifier of a small autoencoder sweep, named by its final checkpoint.
    let pipeline = format!(
        "name = \"judge\"\nseed = 1\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntest_limit = 500\n[model]\nkind = \"dae\"\nlatent = 16\n[final]\nepochs = 2\nbatch_size = 64\n[finetune]\nepochs = 6\nlr_encoder = 1e-3\nbatch_size = 64\n",
        mnist_sample()
    );
    let classifier_sweep = cluster.submit("judge.toml", &pipeline);
    assert_eq!(cluster.client_ok(&["wait", &classifier_sweep, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&classifier_sweep, Duration::from_secs(5), |_| true);
    let finetune = results["trials"].as_array().unwrap().iter().find(|t| t["stage"] == "finetune").expect("a finetune trial");
    let judge = finetune["final_checkpoint"].as_str().expect("the classifier's final checkpoint").to_string();

    // Digits 1 and 7 as PNG class folders "1" and "7": labels 0 and 1, judged as ones and sevens.
    let digits = cluster.dir.path().join("digits");
    let output = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tools/data/stand_in_classes.py"))
        .args(["mnist", &digits.to_string_lossy(), "--source", &mnist_sample(), "--digits", "1,7", "--per-class", "16"])
        .output()
        .expect("run the .venv's python (make test installs it)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The judge's mapping on real digits (the PNGs as the workers load them): it knows them.
    let checkpoint = cluster.dir.path().join("judge.safetensors");
    cluster.client_ok(&["download", &judge, "-o", &checkpoint.to_string_lossy()]);
    let real = cohort_worker::data::image_folder::load_image_folder(&digits, SIDE).unwrap().train;
    let scored = Judge::load(&checkpoint, &[1, 7], tch::Device::Cpu).unwrap().score(&real.images, &real.labels);
    assert!(scored[0].1 >= 0.75, "the classifier tells real ones from sevens through the judge's input mapping: {scored:?}");
    let text = sweep(&digits, 2, 1).replace("eval_every = 1", &format!("eval_every = 1\njudge = \"{judge}\""));
    let sweep_id = cluster.submit("judged.toml", &text);
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = cluster.wait_for(&sweep_id, Duration::from_secs(5), |_| true);
    let epochs = epochs(&results);
    assert_eq!(epochs.len(), 2);
    for epoch in &epochs {
        let values = &epoch["values"];
        let accuracy = |key: &str| values[key].as_f64().unwrap_or_else(|| panic!("epoch {} lacks {key}: {values}", epoch["epoch"]));
        let (all, ones, sevens) = (accuracy("class_accuracy"), accuracy("class_accuracy_1"), accuracy("class_accuracy_7"));
        assert!([all, ones, sevens].iter().all(|v| (0.0..=1.0).contains(v)), "{values}");
        assert!((all - (ones + sevens) / 2.0).abs() < 1e-6, "as many samples of each class: {values}");
        assert!(values.get("class_accuracy_0").is_none(), "keys name the class folders' digits, not labels: {values}");
        assert!(values["swd"].is_f64(), "{values}");
    }
    let report = cluster.dir.path().join("report");
    cluster.client_ok(&["report", &sweep_id, "--out", &report.to_string_lossy()]);
    let figure = std::fs::read(report.join("fig9-class-accuracy.png")).expect("the report draws the class accuracy");
    assert_eq!(&figure[..8], b"\x89PNG\r\n\x1a\n");
    // Deterministic for the seed: the same sweep again reports the same accuracies.
    let again = cluster.submit("judged-again.toml", &text);
    assert_eq!(cluster.client_ok(&["wait", &again, "--timeout", "300"]).trim(), "succeeded");
    let again = self::epochs(&cluster.wait_for(&again, Duration::from_secs(5), |_| true));
    for (first, second) in epochs.iter().zip(&again) {
        for key in ["class_accuracy", "class_accuracy_1", "class_accuracy_7"] {
            assert_eq!(first["values"][key], second["values"][key], "epoch {}: {key}", first["epoch"]);
        }
    }

    // A judge the coordinator does not hold is refused at submission, naming the key.
    let path = cluster.dir.path().join("unknown.toml");
    std::fs::write(&path, text.replace(&judge, &"0".repeat(64))).unwrap();
    let refused = cluster.client(&["submit", &path.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("train.judge: no checkpoint"), "{stderr}");
}
