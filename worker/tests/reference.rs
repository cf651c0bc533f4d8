//! The DAE, the classifier and Adam against PyTorch: loss, every gradient and one Adam step (L2
//! weight decay, per-group learning rates) from the same weights and inputs as
//! tools/reference/dae_reference.py, to ‖a−b‖/‖b‖ < 1e-5 in float32 on CPU; and the WGAN-GP's
//! critic loss (gradient penalty included, through the double backward) and generator loss with
//! all their gradients, from tools/reference/wgan_reference.py.

use std::collections::BTreeMap;
use std::path::Path;

use cohort_worker::model::classifier::Classifier;
use cohort_worker::model::dae::Dae;
use cohort_worker::model::wgan::{self, Critic, Generator};
use cohort_worker::optim::{Adam, ParamGroup};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

const TOLERANCE: f64 = 1e-5;

fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
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

/// Loads the fixture's weights into `vars`, then checks the loss, every gradient and one Adam
/// step (parameter groups by `lr_of(name)`, weight decay `weight_decay`) against it.
fn check_against_reference(
    reference: &BTreeMap<String, Tensor>,
    vars: &nn::VarStore,
    lr_of: impl Fn(&str) -> f64,
    weight_decay: f64,
    loss: impl Fn() -> Tensor,
) {
    tch::no_grad(|| {
        for (name, mut variable) in vars.variables() {
            variable.copy_(&reference[&format!("model.{name}")]);
        }
    });
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(named.len(), reference.keys().filter(|k| k.starts_with("grad.")).count(), "same parameters as PyTorch");
    let groups = named
        .iter()
        .map(|(name, t)| ParamGroup { params: vec![(name.clone(), t.shallow_clone())], lr: lr_of(name), weight_decay })
        .collect();
    let mut adam = Adam::new(groups, (0.9, 0.999), 1e-8);

    adam.zero_grad();
    let loss = loss();
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

#[test]
fn dae_loss_gradients_and_adam_step_match_pytorch() {
    let reference = fixture("dae_reference.safetensors");
    let vars = nn::VarStore::new(Device::Cpu);
    let model = Dae::new(&vars.root(), 4);
    check_against_reference(
        &reference,
        &vars,
        |_| 1e-3,
        1e-5,
        || model.forward_t(&reference["input.noisy"], true).mse_loss(&reference["input.clean"], Reduction::Mean),
    );
}

#[test]
fn classifier_loss_gradients_and_two_rate_adam_step_match_pytorch() {
    let reference = fixture("classifier_reference.safetensors");
    let vars = nn::VarStore::new(Device::Cpu);
    let model = Classifier::new(&vars.root(), 4);
    let lr_of = |name: &str| if Classifier::is_encoder_variable(name) { 1e-4 } else { 1e-3 };
    check_against_reference(&reference, &vars, lr_of, 1e-5, || {
        model.forward_t(&reference["input.noisy"], true).nll_loss(&reference["input.labels"])
    });
}

/// Copies every variable (weights and BatchNorm buffers) of `vars` from `reference[prefix + name]`.
fn load_variables(vars: &nn::VarStore, reference: &BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        for (name, mut variable) in vars.variables() {
            let saved = reference.get(&name).unwrap_or_else(|| panic!("fixture lacks {name}"));
            variable.copy_(saved);
        }
    });
}

fn assert_gradients(vars: &nn::VarStore, reference: &BTreeMap<String, Tensor>, prefix: &str) {
    let expected: Vec<&String> = reference.keys().filter(|k| k.starts_with(&format!("grad.{prefix}."))).collect();
    assert!(!expected.is_empty());
    let variables = vars.variables();
    for key in expected {
        let name = key.trim_start_matches("grad.");
        assert_close(&format!("gradient of {name}"), &variables[name].grad(), &reference[key]);
    }
}

#[test]
fn wgan_gp_losses_and_gradients_match_pytorch() {
    let reference = fixture("wgan_reference.safetensors");
    let widths = [16, 8, 8, 4];
    let vars = nn::VarStore::new(Device::Cpu);
    let generator = Generator::new(&(vars.root() / "generator"), widths, 0);
    let critic = Critic::new(&(vars.root() / "critic"), widths, 0);
    load_variables(&vars, &reference);

    let (real, fake, epsilon) = (&reference["input.real"], &reference["input.fake"], &reference["input.epsilon"]);
    let ours_fake = tch::no_grad(|| generator.forward_t(&reference["input.noise"], true));
    assert_close("generated batch", &ours_fake, fake);
    load_variables(&vars, &reference); // undo the BatchNorm running-stat update of that forward pass

    let (loss, _wasserstein, penalty) = wgan::critic_loss(&critic, real, fake, epsilon, 10.0);
    assert_close("gradient penalty", &penalty, &reference["critic.penalty"]);
    assert_close("critic loss", &loss, &reference["critic.loss"]);
    loss.backward();
    assert_gradients(&vars, &reference, "critic");

    for (_, mut variable) in vars.variables() {
        variable.zero_grad();
    }
    let loss = wgan::generator_loss(&critic, &generator.forward_t(&reference["input.noise"], true));
    assert_close("generator loss", &loss, &reference["generator.loss"]);
    loss.backward();
    assert_gradients(&vars, &reference, "generator");
}

/// The class-conditional WGAN-GP (class embedding concatenated to the noise, projection critic)
/// at widths 16/8/4, so 32×32 images (one stride-2 stage fewer than the seed's), 3 classes:
/// both losses, the gradient penalty and every gradient, from the same fixture script.
#[test]
fn conditional_wgan_gp_losses_and_gradients_match_pytorch() {
    let reference = fixture("cwgan_reference.safetensors");
    let widths = [16, 8, 4];
    let vars = nn::VarStore::new(Device::Cpu);
    let generator = Generator::new(&(vars.root() / "generator"), widths, 3);
    let critic = Critic::new(&(vars.root() / "critic"), widths, 3);
    load_variables(&vars, &reference);
    let losses = ["generator.loss", "critic.loss", "critic.penalty"];
    let saved =
        reference.keys().filter(|k| (k.starts_with("generator.") || k.starts_with("critic.")) && !losses.contains(&k.as_str())).count();
    assert_eq!(vars.variables().len(), saved, "the same variables as PyTorch");

    let (real, fake, epsilon, labels) =
        (&reference["input.real"], &reference["input.fake"], &reference["input.epsilon"], &reference["input.labels"]);
    let ours_fake = tch::no_grad(|| generator.generate(&reference["input.noise"], Some(labels), true));
    assert_eq!(ours_fake.size(), [6, 1, 32, 32]);
    assert_close("generated batch", &ours_fake, fake);
    load_variables(&vars, &reference);

    let (loss, _wasserstein, penalty) = wgan::critic_loss_given(&critic, real, fake, Some(labels), epsilon, 10.0);
    assert_close("gradient penalty", &penalty, &reference["critic.penalty"]);
    assert_close("critic loss", &loss, &reference["critic.loss"]);
    loss.backward();
    assert_gradients(&vars, &reference, "critic");
    assert!(reference.contains_key("grad.critic.projection.weight"));

    for (_, mut variable) in vars.variables() {
        variable.zero_grad();
    }
    let loss = wgan::generator_loss_given(&critic, &generator.generate(&reference["input.noise"], Some(labels), true), Some(labels));
    assert_close("generator loss", &loss, &reference["generator.loss"]);
    loss.backward();
    assert_gradients(&vars, &reference, "generator");
    assert!(reference.contains_key("grad.generator.embedding.weight"));
}
