//! The dataset cache keeps behaviour: a cross-validation fold trained on data decoded and
//! augmented afresh, on data made and kept, and on the kept data (a hit) reports the same
//! figures and ends with the same weights; another fold of the same dataset gets its own rows.
//! Its own test binary: the cache, the phase clock and libtorch's generator are process-wide.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cohort_worker::data::cache::{TensorCache, DEFAULT_BUDGET_BYTES};
use cohort_worker::metrics::{metrics, Phase};
use cohort_worker::task::{AugmentSpec, Task};
use tch::Tensor;

/// A fold of the cross-validation, augmented, with only a final checkpoint.
fn fold_task(index: usize) -> Task {
    let augment = AugmentSpec { copies: 1, rotate_deg: 15.0, translate: 0.1, shear_deg: 10.0, seed: 5 };
    common::fold_task(index, 2, 0, Some(augment))
}

/// Runs a task; returns its validation MSEs and its final checkpoint's tensors.
fn run(task: &Task, files: &BTreeMap<String, PathBuf>, scratch: &Path) -> (Vec<f64>, BTreeMap<String, Tensor>) {
    let output = common::run(task, files, None, scratch);
    let (_, last) = output.checkpoints.last_key_value().expect("a final checkpoint");
    let weights = Tensor::read_safetensors(last).unwrap().into_iter().collect();
    (output.val_mse, weights)
}

fn assert_same_run(a: &(Vec<f64>, BTreeMap<String, Tensor>), b: &(Vec<f64>, BTreeMap<String, Tensor>), what: &str) {
    assert_eq!(a.0, b.0, "{what}: validation MSEs");
    assert_eq!(a.1.keys().collect::<Vec<_>>(), b.1.keys().collect::<Vec<_>>());
    for (name, tensor) in &a.1 {
        assert!(tensor.equal(&b.1[name]), "{what}: {name} differs");
    }
}

#[test]
fn cached_data_trains_exactly_like_fresh_data() {
    let dir = tempfile::tempdir().unwrap();
    let files = common::write_dataset(dir.path());
    let cache = TensorCache::global();
    // As the daemon's training thread does: what the recipe does not mark is training.
    metrics().phases.switch(Phase::Train);

    cache.set_budget(0);
    let fresh = run(&fold_task(1), &files, &dir.path().join("fresh"));
    let fresh_other_fold = run(&fold_task(2), &files, &dir.path().join("fresh2"));
    assert_eq!(cache.bytes(), 0, "a zero budget keeps nothing");

    cache.set_budget(DEFAULT_BUDGET_BYTES);
    let made = run(&fold_task(1), &files, &dir.path().join("made"));
    let kept_bytes = cache.bytes();
    assert!(kept_bytes > 0, "the decoded dataset and the augmented fold are kept");
    let kept = run(&fold_task(1), &files, &dir.path().join("kept"));
    assert_eq!(cache.bytes(), kept_bytes, "the second run hit the cache");
    let other_fold = run(&fold_task(2), &files, &dir.path().join("other"));
    assert!(cache.bytes() > kept_bytes, "another fold's augmented rows are an entry of their own");

    assert_same_run(&fresh, &made, "made while caching");
    assert_same_run(&fresh, &kept, "from the cache");
    assert_same_run(&fresh_other_fold, &other_fold, "another fold, dataset from the cache");
    assert_ne!(fresh.0, fresh_other_fold.0, "the folds differ");

    let phases = &metrics().phases;
    for phase in [Phase::Train, Phase::Data, Phase::Checkpoint] {
        assert!(phases.seconds(phase) > 0.0, "{} was counted", phase.label());
    }
}
