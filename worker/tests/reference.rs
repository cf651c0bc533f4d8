//! The DAE and Adam against PyTorch: loss, every gradient and one Adam step (L2 weight decay)
//! from the same weights and inputs as tools/reference/dae_reference.py, to ‖a−b‖/‖b‖ < 1e-5.

use std::collections::BTreeMap;
use std::path::Path;

use cohort_worker::model::dae::Dae;
use cohort_worker::optim::{Adam, ParamGroup};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

const TOLERANCE: f64 = 1e-5;

fn fixture() -> BTreeMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dae_reference.safetensors");
    Tensor::read_safetensors(path).expect("fixture (regenerate with tools/reference/dae_reference.py)").into_iter().collect()
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let diff = (actual - expected).to_kind(Kind::Double).norm().double_value(&[]);
    let scale = expected.to_kind(Kind::Double).norm().double_value(&[]);
    if scale == 0.0 {
        return diff;
    }
    diff / scale
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let error = relative_error(actual, expected);
    assert!(error < TOLERANCE, "{what}: relative error {error:e}");
}

#[test]
fn dae_loss_gradients_and_adam_step_match_pytorch() {
    let reference = fixture();
    let mut vars = nn::VarStore::new(Device::Cpu);
    let model = Dae::new(&vars.root(), 4);
    tch::no_grad(|| {
        for (name, mut variable) in vars.variables() {
            variable.copy_(&reference[&format!("model.{name}")]);
        }
    });
    vars.set_kind(Kind::Float);
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(named.len(), reference.keys().filter(|k| k.starts_with("grad.")).count(), "same parameters as PyTorch");
    let mut adam = Adam::new(vec![ParamGroup { params: named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), lr: 1e-3, weight_decay: 1e-5 }], (0.9, 0.999), 1e-8);

    adam.zero_grad();
    let loss = model.forward_t(&reference["input.noisy"], true).mse_loss(&reference["input.clean"], Reduction::Mean);
    assert_close("loss", &loss, &reference["loss"]);
    loss.backward();
    for (name, param) in &named {
        assert_close(&format!("gradient of {name}"), &param.grad(), &reference[&format!("grad.{name}")]);
    }
    adam.step();
    for (name, param) in &named {
        assert_close(&format!("{name} after one Adam step"), param, &reference[&format!("after.{name}")]);
    }
}
