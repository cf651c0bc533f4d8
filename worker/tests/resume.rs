//! Checkpoint round trip: 2 epochs straight and 1 epoch + checkpoint + resume + 1 epoch give
//! bitwise identical weights on CPU (the optimizer state and every seed are part of the resume).
//! Its own test binary, so no other test touches libtorch's global generator meanwhile.

mod common;

use std::collections::BTreeMap;

use tch::Tensor;

#[test]
fn resumed_training_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let files = common::write_dataset(dir.path());
    let task = |epochs| common::fold_task(1, epochs, 1, None);
    let straight = common::run(&task(2), &files, None, &dir.path().join("straight"));
    let first_half = common::run(&task(1), &files, None, &dir.path().join("first"));
    let resumed = common::run(&task(2), &files, Some(&first_half.checkpoints[&1]), &dir.path().join("resumed"));
    assert_eq!(resumed.checkpoints.keys().copied().collect::<Vec<_>>(), vec![2], "the resumed run starts at epoch 2");
    assert_eq!(resumed.val_mse.len(), 1);
    assert_eq!(resumed.val_mse[0], straight.val_mse[1], "same validation MSE at epoch 2");

    let a: BTreeMap<String, Tensor> = Tensor::read_safetensors(&straight.checkpoints[&2]).unwrap().into_iter().collect();
    let b: BTreeMap<String, Tensor> = Tensor::read_safetensors(&resumed.checkpoints[&2]).unwrap().into_iter().collect();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|k| k.starts_with("optim.")) && a.keys().any(|k| k.starts_with("model.")));
    for (name, tensor) in &a {
        assert!(tensor.equal(&b[name]), "{name} differs after resuming");
    }
    // And the checkpoint really moved: epoch 1's weights differ from epoch 2's.
    let one: BTreeMap<String, Tensor> = Tensor::read_safetensors(&straight.checkpoints[&1]).unwrap().into_iter().collect();
    assert!(!one["model.encoder.fc2.weight"].equal(&a["model.encoder.fc2.weight"]));
}
