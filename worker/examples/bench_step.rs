//! Benchmark: training-step throughput (samples/s) of the worker's own code path — the seed's
//! DAE, the classifier and the WGAN-GP step (full and reduced width) — on the CPU. Run by
//! `tools/bench/steps.py` next to the same steps in PyTorch eager; prints one JSON object.
//!
//! cargo run --release -p cohort-worker --example bench_step -- [--threads N] [--only NAME] [--default-malloc]

use std::time::Instant;

use cohort_worker::allocator;
use cohort_worker::model::classifier::Classifier;
use cohort_worker::model::dae::Dae;
use cohort_worker::optim::{Adam, ParamGroup};
use cohort_worker::train::data_parallel::Shard;
use cohort_worker::train::trainable;
use cohort_worker::train::wgan::Gan;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

/// Runs `step` `warmup` times, then `steps` times; returns samples per second.
fn measure(batch: i64, warmup: usize, steps: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        step();
    }
    let started = Instant::now();
    for _ in 0..steps {
        step();
    }
    (batch as f64 * steps as f64) / started.elapsed().as_secs_f64()
}

fn dae(batch: i64) -> f64 {
    let vars = nn::VarStore::new(Device::Cpu);
    let model = Dae::new(&vars.root(), 4);
    let mut adam = Adam::new(vec![ParamGroup { params: trainable(&vars), lr: 1e-3, weight_decay: 1e-6 }], (0.9, 0.999), 1e-8);
    let clean = Tensor::rand([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
    measure(batch, 10, 150, || {
        let noisy = &clean + clean.randn_like() * 0.3;
        let loss = model.forward_t(&noisy, true).mse_loss(&clean, Reduction::Mean);
        adam.zero_grad();
        loss.backward();
        adam.step();
    })
}

fn classifier(batch: i64) -> f64 {
    let vars = nn::VarStore::new(Device::Cpu);
    let model = Classifier::new(&vars.root(), 4);
    let (encoder, head): (Vec<_>, Vec<_>) = trainable(&vars).into_iter().partition(|(n, _)| Classifier::is_encoder_variable(n));
    let groups =
        vec![ParamGroup { params: encoder, lr: 1e-4, weight_decay: 1e-5 }, ParamGroup { params: head, lr: 1e-3, weight_decay: 1e-5 }];
    let mut adam = Adam::new(groups, (0.9, 0.999), 1e-8);
    let images = Tensor::rand([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
    measure(batch, 10, 300, || {
        let noisy = &images + images.randn_like() * 0.3;
        let loss = model.forward_t(&noisy, true).nll_loss(&labels);
        adam.zero_grad();
        loss.backward();
        adam.step();
    })
}

/// One WGAN-GP step as the recipe runs it: a critic update (penalty included), then a generator update.
fn wgan(widths: [i64; 4], batch: i64, steps: usize) -> f64 {
    let mut gan = Gan::new(widths, 1e-4, (0.0, 0.9), Device::Cpu);
    let real = Tensor::rand([batch, 1, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    measure(batch, 1, steps, || {
        let noise = gan.noise(batch);
        let epsilon = Tensor::rand([batch], (Kind::Float, Device::Cpu));
        gan.critic_gradients(&real, &noise, &epsilon, 10.0, Shard::SOLE, None).unwrap();
        gan.step_critic();
        let noise = gan.noise(batch);
        gan.generator_gradients(&noise, Shard::SOLE, None).unwrap();
        gan.step_generator();
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    // As the worker's `main` does, unless `--default-malloc` asks for glibc's defaults (to show
    // what the settings are worth).
    if !args.iter().any(|a| a == "--default-malloc") {
        assert!(allocator::tune_for_training(), "malloc settings refused");
    }
    let threads = value_of("--threads").and_then(|t| t.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    tch::set_num_interop_threads(1);
    tch::manual_seed(0);
    // `--only NAME` runs one step (for profiling it alone).
    let only = value_of("--only");
    type Step = (&'static str, fn() -> f64);
    let steps: [Step; 4] = [
        ("dae_b256", || dae(256)),
        ("classifier_b256", || classifier(256)),
        ("wgan_reduced_b64", || wgan([128, 64, 32, 16], 64, 30)),
        ("wgan_full_b16", || wgan([1024, 512, 256, 128], 16, 6)),
    ];
    let selected: Vec<Step> = steps.into_iter().filter(|(name, _)| only.as_deref().is_none_or(|o| o == *name)).collect();
    // On a dedicated thread, as the worker trains (its own malloc arena, not the main heap).
    let results =
        std::thread::spawn(move || selected.into_iter().map(|(name, run)| (name, run())).collect::<Vec<_>>()).join().expect("bench thread");
    println!("{}", serde_json_like(&results));
}

/// `{"name": value, …}` without a JSON dependency.
fn serde_json_like(values: &[(&str, f64)]) -> String {
    let body: Vec<String> = values.iter().map(|(k, v)| format!("\"{k}\": {v:.3}")).collect();
    format!("{{{}}}", body.join(", "))
}
