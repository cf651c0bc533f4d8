//! Turns a validated sweep file into trials: every grid config × every fold.

use crate::domain::{DatasetSpec, FoldSpec, TrainingConfig, TrialKind, TrialSpec};
use crate::sweep::SweepFile;

/// A config's label as shown in tables: `lr=0.001 wd=1e-6 bs=256`.
pub fn config_label(lr: f64, weight_decay: f64, batch_size: u32) -> String {
    format!("lr={lr:e} wd={weight_decay:e} bs={batch_size}")
}

/// Plans the sweep's trials in scheduling order: configs in grid order, folds within each.
pub fn plan(sweep: &SweepFile, dataset: DatasetSpec) -> Vec<TrialSpec> {
    let cv = &sweep.cv;
    let mut trials = Vec::new();
    let mut config_index = 0;
    for lr in sweep.lrs() {
        for weight_decay in sweep.weight_decays() {
            for batch_size in sweep.batch_sizes() {
                let label = config_label(lr, weight_decay, batch_size);
                for fold in 0..cv.folds {
                    trials.push(TrialSpec {
                        stage: "cv".into(),
                        name: format!("cv/c{config_index}/f{fold}"),
                        config_label: label.clone(),
                        kind: TrialKind::DaeFold,
                        config: TrainingConfig {
                            lr,
                            weight_decay,
                            batch_size,
                            epochs: cv.epochs,
                            noise_std: sweep.noise.std,
                            latent: sweep.model.latent,
                            // Every config starts from the same initialisation: configs differ only in hyperparameters.
                            seed: cv.seed,
                        },
                        dataset: dataset.clone(),
                        fold: Some(FoldSpec { folds: cv.folds, index: fold, shuffle_seed: cv.seed }),
                        checkpoint_every: cv.checkpoint_every,
                        max_attempts: cv.max_attempts,
                    });
                }
                config_index += 1;
            }
        }
    }
    trials
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_grid_is_32_trials_in_config_then_fold_order() {
        let sweep = SweepFile::parse(crate::sweep::tests::GOOD, "s").unwrap();
        let dataset = DatasetSpec { format: "idx".into(), files: vec![], train_limit: 0, test_limit: 0 };
        let trials = plan(&sweep, dataset);
        assert_eq!(trials.len(), 32);
        assert_eq!(trials[0].name, "cv/c0/f0");
        assert_eq!(trials[5].name, "cv/c1/f1");
        assert_eq!(trials[5].config.batch_size, 512);
        let labels: std::collections::BTreeSet<_> = trials.iter().map(|t| t.config_label.clone()).collect();
        assert_eq!(labels.len(), 8);
        assert!(trials.iter().all(|t| t.fold.unwrap().folds == 4 && t.config.epochs == 2));
    }
}
