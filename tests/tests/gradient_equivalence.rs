//! Data-parallel WGAN-GP: for the same global batch, the gradients averaged over 2 and 4
//! replicas (real processes' code path: ring all-reduce over loopback, one thread per replica)
//! equal the single-process full-batch gradients, for the critic (penalty included) and the
//! generator; and so for the class-conditional GAN (projection critic), each replica taking
//! its rows' labels. The generator's BatchNorm running statistics (moved by both steps, the
//! critic step's from each replica's own rows with the gang's statistics) match one process's
//! too, bitwise alike on every replica. Its own test binary, so nothing else touches libtorch's global generator.

use std::collections::BTreeMap;
use std::time::Duration;

use cohort_worker::collective::ring::local_ring;
use cohort_worker::collective::Communicator;
use cohort_worker::train::data_parallel::Shard;
use cohort_worker::train::wgan::Gan;
use tch::{Device, Kind, Tensor};

const WIDTHS: [i64; 4] = [16, 8, 8, 4];
const BATCH: i64 = 8;

/// A tensor as plain data, so that it can cross threads (tch tensors are not `Sync`).
#[derive(Clone, PartialEq, Debug)]
struct Plain(Vec<i64>, Vec<f32>);

impl Plain {
    fn of(t: &Tensor) -> Self {
        Plain(t.size(), Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap())
    }

    fn tensor(&self) -> Tensor {
        Tensor::from_slice(&self.1).view(self.0.as_slice())
    }
}

struct Inputs {
    weights: BTreeMap<String, Plain>,
    real: Tensor,
    critic_noise: Tensor,
    epsilon: Tensor,
    generator_noise: Tensor,
    /// The global batch's classes (conditional GANs).
    labels: Option<Tensor>,
}

#[derive(Clone)]
struct PlainInputs {
    weights: BTreeMap<String, Plain>,
    batch: [Plain; 4],
    labels: Option<Vec<i64>>,
}

impl PlainInputs {
    fn of(inputs: &Inputs) -> Self {
        let batch =
            [Plain::of(&inputs.real), Plain::of(&inputs.critic_noise), Plain::of(&inputs.epsilon), Plain::of(&inputs.generator_noise)];
        let labels = inputs.labels.as_ref().map(|l| Vec::<i64>::try_from(l).unwrap());
        Self { weights: inputs.weights.clone(), batch, labels }
    }

    fn inputs(&self) -> Inputs {
        let [real, critic_noise, epsilon, generator_noise] = &self.batch;
        Inputs {
            weights: self.weights.clone(),
            real: real.tensor(),
            critic_noise: critic_noise.tensor(),
            epsilon: epsilon.tensor(),
            generator_noise: generator_noise.tensor(),
            labels: self.labels.as_ref().map(|l| Tensor::from_slice(l)),
        }
    }

    fn classes(&self) -> i64 {
        self.labels.as_ref().map_or(0, |l| l.iter().max().unwrap() + 1)
    }
}

fn gan_with(weights: &BTreeMap<String, Plain>, classes: i64) -> Gan {
    let gan = Gan::conditional(WIDTHS, classes, 1e-4, (0.0, 0.9), Device::Cpu);
    tch::no_grad(|| {
        for (name, mut variable) in gan.vars.variables() {
            variable.copy_(&weights[&name].tensor());
        }
    });
    gan
}

/// (critic gradients, generator gradients) by parameter name, for one replica or the whole batch.
fn gradients(
    gan: &mut Gan,
    inputs: &Inputs,
    shard: Shard,
    mut comm: Option<&mut (dyn Communicator + 'static)>,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let labels = inputs.labels.as_ref();
    gan.critic_gradients_given(&inputs.real, labels, &inputs.critic_noise, &inputs.epsilon, 10.0, shard, comm.as_deref_mut()).unwrap();
    let critic = gan.gradients("critic.").into_iter().map(|(n, g)| (n, g.copy())).collect();
    gan.generator_gradients_given(&inputs.generator_noise, labels, shard, comm).unwrap();
    let generator = gan.gradients("generator.").into_iter().map(|(n, g)| (n, g.copy())).collect();
    (critic, generator)
}

/// The generator's BatchNorm running statistics, by name.
fn running_statistics(gan: &Gan) -> BTreeMap<String, Plain> {
    gan.vars.variables().into_iter().filter(|(name, _)| name.contains("running")).map(|(name, t)| (name, Plain::of(&t))).collect()
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).to_kind(Kind::Double).norm().double_value(&[]);
    diff / b.to_kind(Kind::Double).norm().double_value(&[]).max(1e-30)
}

#[test]
fn averaged_replica_gradients_equal_the_full_batch_gradient() {
    check_equivalence(0);
}

#[test]
fn conditional_replica_gradients_equal_the_full_batch_gradient() {
    check_equivalence(3);
}

/// Compares 2 and 4 replicas with one process on one global batch; `classes` > 0: conditional.
fn check_equivalence(classes: i64) {
    tch::manual_seed(11);
    let reference = Gan::conditional(WIDTHS, classes, 1e-4, (0.0, 0.9), Device::Cpu);
    let inputs = Inputs {
        weights: reference.vars.variables().into_iter().map(|(n, t)| (n, Plain::of(&t))).collect(),
        real: Tensor::rand([BATCH, 1, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
        critic_noise: Tensor::randn([BATCH, 100], (Kind::Float, Device::Cpu)),
        epsilon: Tensor::rand([BATCH], (Kind::Float, Device::Cpu)),
        generator_noise: Tensor::randn([BATCH, 100], (Kind::Float, Device::Cpu)),
        labels: (classes > 0).then(|| Tensor::arange(BATCH, (Kind::Int64, Device::Cpu)).remainder(classes)),
    };
    assert!(classes == 0 || reference.vars.variables().contains_key("critic.projection.weight"));
    let mut whole = gan_with(&inputs.weights, classes);
    let (full_critic, full_generator) = gradients(&mut whole, &inputs, Shard::SOLE, None);
    let full_running = running_statistics(&whole);
    assert!(!full_running.is_empty());

    let plain_inputs = PlainInputs::of(&inputs);
    for world in [2usize, 4] {
        let ring = local_ring(world, "equivalence", Duration::from_secs(30)).unwrap();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = ring
                .into_iter()
                .map(|mut member| {
                    let plain_inputs = plain_inputs.clone();
                    scope.spawn(move || {
                        let inputs = plain_inputs.inputs();
                        let mut gan = gan_with(&inputs.weights, plain_inputs.classes());
                        let shard = Shard { rank: member.rank(), world };
                        let (critic, generator) = gradients(&mut gan, &inputs, shard, Some(&mut member));
                        let plain = |m: BTreeMap<String, Tensor>| -> Vec<(String, Plain)> {
                            m.into_iter().map(|(n, t)| (n, Plain::of(&t))).collect()
                        };
                        (plain(critic), plain(generator), running_statistics(&gan))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (critic, generator, running)) in results.iter().enumerate() {
            for (name, plain) in running {
                let error = relative_error(&plain.tensor(), &full_running[name].tensor());
                assert!(error < 1e-6, "world {world} rank {rank}: {name} relative error {error:e}");
            }
            assert_eq!(running, &results[0].2, "every replica holds the same running statistics");
            for (name, plain) in critic.iter().chain(generator.iter()) {
                let ours = plain.tensor();
                let expected = full_critic.get(name).or_else(|| full_generator.get(name)).unwrap();
                let error = relative_error(&ours, expected);
                assert!(error < 1e-5, "world {world} rank {rank}: {name} relative error {error:e}");
            }
            assert_eq!(critic.len() + generator.len(), full_critic.len() + full_generator.len());
            if rank > 0 {
                assert_eq!(&results[0].0, critic, "every replica holds the same averaged critic gradient");
            }
        }
    }
}
