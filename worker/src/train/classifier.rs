//! The classifier fine-tune (report §1.5): the final autoencoder's encoder plus a new head,
//! trained on noisy inputs with a smaller learning rate for the encoder.
//!
//! Data parallel when the task comes with a gang, as `dae-final` is (see [`super::dae`]): the
//! same order and noise on every replica, each training on its rows of the global batch with
//! share-scaled losses and averaged gradients, evaluation split by rows and summed, rank 0 alone
//! reporting, checkpointing and emitting.

use std::time::Instant;

use tch::nn::{self, ModuleT};
use tch::{Kind, Reduction, Tensor};

use super::dae::{corrupt, fixed_noisy, for_each_batch, latent_codes, BETAS, EPS};
use super::data_parallel;
use super::{finite, trainable, EpochReport, Events, Run, RunInputs, TrainError};
use crate::checkpoint::Loaded;
use crate::data::ImageSet;
use crate::metrics::Phase;
use crate::model::classifier::Classifier;
use crate::optim::{Adam, ParamGroup};
use crate::task::Task;

/// Test loss and accuracy of the classifier on `noisy` inputs; with a gang, each replica
/// evaluates its shard's rows and the sums are taken over the gang.
fn evaluate(model: &Classifier, noisy: &Tensor, labels: &Tensor, run: &mut Run<'_, '_>) -> Result<(f64, f64), TrainError> {
    let n = noisy.size()[0];
    let (start, rows) = run.shard.rows(n);
    let (loss_sum, correct) = if rows == 0 {
        (0.0, 0.0)
    } else {
        let (noisy, labels) = (noisy.narrow(0, start, rows), labels.narrow(0, start, rows));
        tch::no_grad(|| {
            let log_probs = Tensor::cat(&noisy.split(1024, 0).iter().map(|c| model.forward_t(c, false)).collect::<Vec<_>>(), 0);
            let loss_sum = log_probs.nll_loss_nd(&labels, None::<Tensor>, Reduction::Sum, -100).double_value(&[]);
            let correct = log_probs.argmax(-1, false).eq_tensor(&labels).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
            (loss_sum, correct)
        })
    };
    let totals = data_parallel::sum_over_gang(run.comm(), &[loss_sum, correct])?;
    Ok((totals[0] / n as f64, totals[1] / n as f64))
}

/// `classifier`: fine-tune from the `init_from` autoencoder checkpoint, alone or as one replica
/// of a gang; reports (rank 0) `train_loss`, `test_loss` and `test_accuracy` (noisy test inputs)
/// per epoch, and exports the fine-tuned encoder's `latents` of the clean test set at the end.
pub fn run(task: &Task, inputs: &RunInputs<'_>, events: &mut Events<'_>) -> Result<(), TrainError> {
    let config = &task.spec.config;
    let data_phase = super::phase(Phase::Data);
    let data = super::load_dataset(task, inputs)?;
    if data.test.is_empty() {
        return Err(TrainError::Invalid("the classifier needs a test set".into()));
    }
    let train: ImageSet = super::augment(task, inputs, data.train, None);
    drop(data_phase);
    if config.batch_size == 0 || config.batch_size as usize > train.len() {
        return Err(TrainError::Invalid(format!("batch size {} with {} training samples", config.batch_size, train.len())));
    }
    tch::manual_seed(config.weights_seed() as i64);
    let mut vars = nn::VarStore::new(inputs.device);
    let model = Classifier::new(&vars.root(), i64::from(config.latent));
    let (encoder, head): (Vec<_>, Vec<_>) = trainable(&vars).into_iter().partition(|(name, _)| Classifier::is_encoder_variable(name));
    let groups = vec![
        ParamGroup { params: encoder, lr: config.lr_encoder, weight_decay: config.weight_decay },
        ParamGroup { params: head, lr: config.lr, weight_decay: config.weight_decay },
    ];
    let params: Vec<Tensor> = groups.iter().flat_map(|g| g.params.iter().map(|(_, t)| t.shallow_clone())).collect();
    let mut optimizer = Adam::new(groups, BETAS, EPS);
    if inputs.resume_from.is_none() {
        let _checkpoint = super::phase(Phase::Checkpoint);
        let pretrained = inputs.init_from.ok_or_else(|| TrainError::Invalid("no pretrained autoencoder".into()))?;
        Loaded::read(pretrained)?.restore_matching(&mut vars, Classifier::is_encoder_variable)?;
    }
    let mut run = Run::join(task, inputs, events)?;
    let epochs = run.resume(&mut vars, &mut [&mut optimizer])?;

    let test_noisy = fixed_noisy(&data.test.images, config);
    for epoch in epochs {
        let started = Instant::now();
        let mut weighted_loss = 0.0;
        for_each_batch(train.len(), config, epoch, train.images.device(), run.events, |batch| {
            let global = batch.size()[0];
            // The whole global batch, so that every replica draws the same noise for every row.
            let noisy = corrupt(&train.images.index_select(0, batch), config.noise_std);
            let (start, rows) = run.shard.rows(global);
            let output = model.forward_t(&noisy.narrow(0, start, rows), true);
            let mean = output.nll_loss(&train.labels.index_select(0, &batch.narrow(0, start, rows)));
            optimizer.zero_grad();
            run.shard.share_of_loss(&mean, &output, rows, global).backward();
            if let Some(comm) = run.comm.as_deref_mut() {
                data_parallel::average_gradients(comm, &params)?;
            }
            optimizer.step();
            if rows > 0 {
                weighted_loss += mean.double_value(&[]) * rows as f64;
            }
            Ok(())
        })?;
        let weighted_loss = data_parallel::sum_over_gang(run.comm(), &[weighted_loss])?[0];
        let train_loss = finite(weighted_loss / train.len() as f64, epoch, "train_loss")?;
        let (test_loss, test_accuracy) = evaluate(&model, &test_noisy, &data.test.labels, &mut run)?;
        let test_loss = finite(test_loss, epoch, "test_loss")?;
        let report = EpochReport {
            epoch,
            values: vec![("train_loss".into(), train_loss), ("test_loss".into(), test_loss), ("test_accuracy".into(), test_accuracy)],
            seconds: started.elapsed().as_secs_f64(),
            samples: train.len() as u64,
        };
        run.end_epoch(report, &vars, &[&optimizer], |_| Ok(()))?;
    }
    if !run.finish(&vars, &[&optimizer])? {
        return Ok(());
    }
    let latents = latent_codes(&model.encoder, &data.test.images);
    run.emit_artifact("latents", config.epochs, &[("latents", latents), ("labels", data.test.labels.shallow_clone())])
}
