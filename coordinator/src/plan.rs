//! Turns a validated sweep file into trials, stage by stage.
//!
//! The first stage is planned at submission: every cross-validation config × fold (or the final
//! training when there is no `[cv]`, or the WGAN-GP's training). Each later stage is planned by
//! [`next_stage`] from the outcomes of the earlier ones, when the coordinator sees a stage end:
//! `final` trains the cross-validation winner, `finetune` starts from `final`'s checkpoint.

use crate::domain::{
    BlobRef, CollectiveBackend, DatasetSpec, FoldSpec, InitPolicy, Stage, TaskState, TrainingConfig, TrialKind, TrialSpec, WganSpec,
};
use crate::selection::{self, FoldResult};
use crate::sweep::search;
use crate::sweep::SweepFile;

/// The trials of the first stage, in scheduling order.
pub fn initial(sweep: &SweepFile, dataset: DatasetSpec) -> Vec<TrialSpec> {
    if sweep.is_command() {
        // Without its files: core plans command sweeps with them (crate::command::initial).
        return crate::command::initial(sweep, dataset, &[]);
    }
    if sweep.is_gan() {
        return vec![gan_trial(sweep, dataset)];
    }
    let Some(cv) = &sweep.cv else {
        let stage = sweep.final_stage.as_ref().expect("validated: cv or final");
        let config = TrainingConfig {
            lr: stage.lr.unwrap_or(1e-3),
            weight_decay: stage.weight_decay.unwrap_or(0.0),
            batch_size: stage.batch_size.unwrap_or(256),
            ..sweep.training_base()
        };
        let label = search::base_label(&config);
        return vec![final_trial(sweep, dataset, &config, label)];
    };
    let mut trials = Vec::new();
    let mut labels = std::collections::BTreeSet::new();
    for (config_index, cv_config) in search::configs(sweep, cv).iter().enumerate() {
        let mut label = search::label(cv_config, cv);
        if !labels.insert(label.clone()) {
            // A random search may draw the same config twice: keep the configs apart in the tables.
            label = format!("{label} #{config_index}");
            labels.insert(label.clone());
        }
        for fold in 0..cv.folds {
            let mut config = cv_config.clone();
            if cv.init == InitPolicy::PerTrial {
                config.init_seed = Some(trial_seed(sweep.seed, config_index as u64, u64::from(fold)));
            }
            trials.push(TrialSpec {
                config_label: label.clone(),
                fold: Some(FoldSpec { folds: cv.folds, index: fold, shuffle_seed: sweep.seed }),
                checkpoint_every: cv.checkpoint_every,
                max_attempts: cv.max_attempts,
                ..TrialSpec::new(Stage::Cv, format!("cv/c{config_index}/f{fold}"), TrialKind::DaeFold, config, dataset.clone())
            });
        }
    }
    if cv.prune.is_some() {
        // Fold-first: fold 0 of every config before fold 1 of any, so that configs can be
        // compared on a shared fold as early as possible (the sort is stable: plan order within
        // a fold).
        trials.sort_by_key(|trial| trial.fold.map(|fold| fold.index));
    }
    trials
}

/// The initialisation seed of cross-validation trial (`config`, `fold`) under
/// `init = "per-trial"`: a SplitMix64 mix, so that neighbouring trials get unrelated seeds.
pub fn trial_seed(seed: u64, config: u64, fold: u64) -> u64 {
    let mut z = seed ^ config.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ fold.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The gang of the stages `[distributed]` applies to (the WGAN-GP's training, the autoencoder's
/// `final` and `finetune`): replicas and collective backend; one replica without it.
fn gang(sweep: &SweepFile) -> (u32, CollectiveBackend) {
    sweep.distributed.as_ref().map_or((1, CollectiveBackend::Auto), |distributed| (distributed.replicas, distributed.backend()))
}

/// The final training: `config`'s hyperparameters (the cross-validation winner's, or the ones
/// `[final]` gives) for `[final]`'s epochs, from the sweep's shared initialisation.
fn final_trial(sweep: &SweepFile, dataset: DatasetSpec, config: &TrainingConfig, label: String) -> TrialSpec {
    let stage = sweep.final_stage.as_ref().expect("caller checked");
    let (replicas, collective_backend) = gang(sweep);
    let config = TrainingConfig { epochs: stage.epochs, init_seed: None, ..config.clone() };
    TrialSpec {
        config_label: label,
        checkpoint_every: stage.checkpoint_every,
        max_attempts: stage.max_attempts,
        replicas,
        collective_backend,
        ..TrialSpec::new(Stage::Final, "final", TrialKind::DaeFinal, config, dataset)
    }
}

fn finetune_trial(sweep: &SweepFile, dataset: DatasetSpec, pretrained_from: &TrialSpec, pretrained: BlobRef) -> TrialSpec {
    let stage = sweep.finetune.as_ref().expect("caller checked");
    // The encoder's shape (latent size) and the input noise come from the autoencoder it starts from.
    let pretrained_config = &pretrained_from.config;
    let config = TrainingConfig {
        lr: stage.lr_head,
        lr_encoder: stage.lr_encoder,
        weight_decay: stage.weight_decay,
        batch_size: stage.batch_size,
        epochs: stage.epochs,
        noise_std: pretrained_config.noise_std,
        latent: pretrained_config.latent,
        ..sweep.training_base()
    };
    let (replicas, collective_backend) = gang(sweep);
    TrialSpec {
        config_label: format!(
            "lr_head={:e} lr_encoder={:e} wd={:e} bs={}",
            stage.lr_head, stage.lr_encoder, stage.weight_decay, stage.batch_size
        ),
        checkpoint_every: stage.checkpoint_every,
        max_attempts: stage.max_attempts,
        init_from: Some(pretrained),
        replicas,
        collective_backend,
        ..TrialSpec::new(Stage::Finetune, "finetune", TrialKind::Classifier, config, dataset)
    }
}

fn gan_trial(sweep: &SweepFile, dataset: DatasetSpec) -> TrialSpec {
    let train = sweep.train.as_ref().expect("validated: a gan has [train]");
    let wgan = WganSpec {
        widths: sweep.model.widths.clone(),
        critic_steps: train.critic_steps,
        gp_lambda: train.gp_lambda,
        beta1: train.beta1,
        beta2: train.beta2,
        sample_every: train.sample_every,
        sample_count: train.sample_count,
        conditional: sweep.model.conditional,
        eval_every: train.eval_every,
        // The judge's blob and digits come from the blob store and the dataset: `check_and_plan`.
        judge: None,
    };
    let config = TrainingConfig {
        lr: train.lr,
        batch_size: train.batch_size,
        epochs: train.epochs,
        noise_std: 0.0,
        latent: 0,
        wgan: Some(wgan),
        ..sweep.training_base()
    };
    let (replicas, collective_backend) = gang(sweep);
    TrialSpec {
        config_label: format!("lr={:e} bs={} betas=({}, {})", train.lr, train.batch_size, train.beta1, train.beta2),
        checkpoint_every: train.checkpoint_every,
        max_attempts: train.max_attempts,
        replicas,
        collective_backend,
        ..TrialSpec::new(Stage::Train, "train", TrialKind::Wgan, config, dataset)
    }
}

/// A stage as `submit --dry-run` describes it: name, trial count, what it does.
pub fn describe_stages(sweep: &SweepFile) -> Vec<(String, u32, String)> {
    if sweep.is_command() {
        return crate::command::describe_stages(sweep);
    }
    let (replicas, _) = gang(sweep);
    if let Some(train) = &sweep.train {
        let what =
            format!("WGAN-GP, {} epochs, {} critic steps per generator step, {replicas} replica(s)", train.epochs, train.critic_steps);
        return vec![(Stage::Train.to_string(), 1, what)];
    }
    let mut described = Vec::new();
    if let Some(cv) = &sweep.cv {
        let configs = sweep.cv_configs().len();
        let search = if cv.random.is_some() { "random-search" } else { "grid" };
        let mut what = format!(
            "{configs} {search} configs x {} folds, {} epochs each; winner: lowest mean of per-fold minimum validation MSE",
            cv.folds, cv.epochs
        );
        if let Some(prune) = &cv.prune {
            what.push_str(&format!("; {}", prune.describe(cv.epochs)));
        }
        described.push((Stage::Cv.to_string(), (configs as u32) * cv.folds, what));
    }
    if let Some(stage) = &sweep.final_stage {
        let source = if sweep.cv.is_some() { "the cross-validation winner" } else { "the given hyperparameters" };
        described.push((
            Stage::Final.to_string(),
            1,
            format!("autoencoder on the whole training set with {source}, {} epochs, {replicas} replica(s)", stage.epochs),
        ));
    }
    if let Some(stage) = &sweep.finetune {
        described.push((
            Stage::Finetune.to_string(),
            1,
            format!("classifier from the final autoencoder's encoder, {} epochs, {replicas} replica(s)", stage.epochs),
        ));
    }
    described
}

/// What can be known, before any training, of how many samples an epoch draws from: the dataset's
/// training samples (before `dataset.train_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainSamples {
    /// Exactly this many (an IDX file's count, an image folder's training images).
    Exact(u64),
    /// At most this many (NIfTI volumes' axial slices: the workers drop the near-empty ones).
    AtMost(u64),
}

impl TrainSamples {
    /// The same bound with `dataset.train_limit` (0: none) applied.
    fn limited(self, train_limit: u64) -> Self {
        if train_limit == 0 {
            return self;
        }
        match self {
            Self::Exact(count) => Self::Exact(count.min(train_limit)),
            Self::AtMost(count) => Self::AtMost(count.min(train_limit)),
        }
    }

    fn count(self) -> u64 {
        match self {
            Self::Exact(count) | Self::AtMost(count) => count,
        }
    }

    /// "" for an exact count, "at most " for a bound: the prefix of every figure derived from it.
    fn qualifier(self) -> &'static str {
        match self {
            Self::Exact(_) => "",
            Self::AtMost(_) => "at most ",
        }
    }
}

fn greatest_common_divisor(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn plural(count: u64, one: &str, many: &str) -> String {
    if count == 1 {
        format!("{count} {one}")
    } else {
        format!("{count} {many}")
    }
}

/// Warnings about a sweep that is valid but will not train as its author most likely expects,
/// for `coordinator submit` (and its dry run) to print; `train_samples` is what the dataset's
/// files tell of its training-sample count, `None` when they tell nothing (then nothing is
/// warned).
///
/// A WGAN-GP's generator steps once every `train.critic_steps` critic steps, and the critic
/// steps once per full batch. When an epoch has fewer full batches than that, the generator
/// steps in only some epochs (the others report no `generator_loss`), or, with no full batch at
/// all, the trial fails. A bound on the sample count (NIfTI) warns only when even the bound is
/// too small.
pub fn schedule_warnings(sweep: &SweepFile, train_samples: Option<TrainSamples>) -> Vec<String> {
    let (Some(train), Some(samples)) = (sweep.train.as_ref().filter(|_| sweep.is_gan()), train_samples) else {
        return Vec::new();
    };
    let samples = samples.limited(sweep.dataset.train_limit);
    let at_most = samples.qualifier();
    let batch = u64::from(train.batch_size);
    let critic_steps = u64::from(train.critic_steps);
    // Full batches only: the worker drops an epoch's last, partial batch.
    let batches = samples.count() / batch.max(1);
    if batches >= critic_steps {
        return Vec::new();
    }
    let split = format!("{at_most}{} / batch {batch}", plural(samples.count(), "training sample", "training samples"));
    if batches == 0 {
        return vec![format!("train.batch_size: an epoch has no full batch ({split}): the trial will fail")];
    }
    // Counted over the trial, the generator steps in `batches` of every `critic_steps` epochs.
    let common = greatest_common_divisor(batches, critic_steps);
    let (stepping, period) = (batches / common, critic_steps / common);
    let remedy = match samples {
        TrainSamples::Exact(count) => {
            // The largest batch size that still gives `critic_steps` batches, splits over the
            // replicas and is at least 2 (the worker's minimum).
            let replicas = u64::from(sweep.distributed.as_ref().map_or(1, |d| d.replicas.max(1)));
            let largest_batch = count / critic_steps / replicas * replicas;
            let mut remedies = Vec::new();
            if largest_batch >= 2 {
                remedies.push(format!("train.batch_size to {largest_batch} or less"));
            }
            remedies.push(format!("train.critic_steps to {batches} or less"));
            format!("for a generator step every epoch, lower {}", remedies.join(" or "))
        }
        TrainSamples::AtMost(_) => "for a generator step every epoch, lower train.batch_size or train.critic_steps until an epoch has at least train.critic_steps batches".to_string(),
    };
    vec![format!(
        "train.batch_size: an epoch has {at_most}{} ({split}), fewer than the {critic_steps} critic steps per generator step (train.critic_steps): \
         the generator steps in {at_most}{stepping} of every {}, and the other epochs report no generator_loss; {remedy}",
        plural(batches, "batch", "batches"),
        plural(period, "epoch", "epochs"),
    )]
}

/// What the coordinator knows of a trial when deciding on the next stage.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// Its spec.
    pub spec: &'a TrialSpec,
    /// Its state.
    pub state: TaskState,
    /// Minimum over its epochs of the metric cross-validation minimises (`val_mse`, or a command's `metric`).
    pub min_val_mse: Option<f64>,
    /// Its final checkpoint.
    pub final_checkpoint: Option<BlobRef>,
}

/// What to do after a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The current stage still has unfinished trials.
    Wait,
    /// Start these trials (the next stage).
    Start(Vec<TrialSpec>),
    /// Nothing more to run: the sweep is over.
    Done,
}

/// Whether `stage` is followed by another stage in this sweep (`final` after `cv`, `finetune`
/// after `final`). When it is not, the sweep ends with it whatever its trials' outcomes.
pub fn has_next_stage(sweep: &SweepFile, stage: Stage) -> bool {
    match stage {
        Stage::Cv => sweep.final_stage.is_some(),
        Stage::Final => sweep.finetune.is_some(),
        Stage::Finetune | Stage::Train => false,
    }
}

/// Decides the next stage from the sweep's trials so far (in plan order).
pub fn next_stage(sweep: &SweepFile, outcomes: &[Outcome<'_>]) -> Next {
    let Some(last) = outcomes.last() else {
        return Next::Done;
    };
    let current = last.spec.stage;
    let in_stage: Vec<&Outcome<'_>> = outcomes.iter().filter(|o| o.spec.stage == current).collect();
    if in_stage.iter().any(|o| !o.state.is_terminal()) {
        return Next::Wait;
    }
    if !has_next_stage(sweep, current) {
        return Next::Done;
    }
    let dataset = last.spec.dataset.clone();
    match current {
        Stage::Cv => {
            // One spec per config, in the order the summaries list configs (first appearance):
            // the winner's row index is its spec, whose hyperparameters the final trial takes.
            let mut configs: Vec<&TrialSpec> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut folds = Vec::with_capacity(in_stage.len());
            for outcome in &in_stage {
                let Some(fold) = outcome.spec.fold else { continue };
                if seen.insert(outcome.spec.config_label.as_str()) {
                    configs.push(outcome.spec);
                }
                let min_val_mse = outcome.min_val_mse.filter(|_| outcome.state == TaskState::Succeeded);
                folds.push(FoldResult { config: outcome.spec.config_label.clone(), fold: fold.index, min_val_mse });
            }
            let Some(winner) = selection::summarize(&folds).iter().position(|s| s.winner).map(|index| configs[index]) else {
                return Next::Done;
            };
            if sweep.is_command() {
                return Next::Start(vec![crate::command::final_for_winner(sweep, winner)]);
            }
            Next::Start(vec![final_trial(sweep, dataset, &winner.config, winner.config_label.clone())])
        }
        Stage::Final => match (&last.state, &last.final_checkpoint) {
            (TaskState::Succeeded, Some(checkpoint)) => Next::Start(vec![finetune_trial(sweep, dataset, last.spec, checkpoint.clone())]),
            _ => Next::Done,
        },
        Stage::Finetune | Stage::Train => Next::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::{GAN, GOOD, SEED};

    fn dataset() -> DatasetSpec {
        DatasetSpec { format: crate::domain::DatasetFormat::Idx, image_size: 64, min_foreground: 0.05, ..DatasetSpec::default() }
    }

    #[test]
    fn seed_grid_is_32_trials_in_config_then_fold_order() {
        let sweep = SweepFile::parse(GOOD, "s").unwrap();
        let trials = initial(&sweep, dataset());
        assert_eq!(trials.len(), 32);
        assert_eq!(trials[0].name, "cv/c0/f0");
        assert_eq!(trials[5].name, "cv/c1/f1");
        assert_eq!(trials[5].config.batch_size, 512);
        let labels: std::collections::BTreeSet<_> = trials.iter().map(|t| t.config_label.clone()).collect();
        assert_eq!(labels.len(), 8);
        assert!(trials.iter().all(|t| t.fold.unwrap().folds == 4 && t.config.epochs == 2));
    }

    fn outcome<'a>(spec: &'a TrialSpec, state: TaskState, min: Option<f64>, checkpoint: Option<BlobRef>) -> Outcome<'a> {
        Outcome { spec, state, min_val_mse: min, final_checkpoint: checkpoint }
    }

    #[test]
    fn the_pipeline_goes_cv_then_final_with_the_winner_then_finetune() {
        let sweep = SweepFile::parse(SEED, "s").unwrap();
        let cv = initial(&sweep, dataset());
        assert_eq!(cv.len(), 32);
        assert!(cv.iter().all(|t| t.config.augment.as_ref().is_some_and(|a| a.copies == 1 && a.seed == 7)));
        // Config 3 (lr 1e-3, wd 1e-6, bs 512) has the lowest fold minima; config 1 would be better but lost a fold.
        let score = |t: &TrialSpec| {
            if t.name.starts_with("cv/c3/") {
                0.01
            } else if t.name.starts_with("cv/c1/") {
                0.001
            } else {
                0.05
            }
        };
        let mut outcomes: Vec<Outcome<'_>> = cv.iter().map(|t| outcome(t, TaskState::Succeeded, Some(score(t)), None)).collect();
        outcomes[4].state = TaskState::Failed;
        outcomes[31].state = TaskState::Running;
        assert_eq!(next_stage(&sweep, &outcomes), Next::Wait);
        outcomes[31].state = TaskState::Succeeded;
        let Next::Start(finals) = next_stage(&sweep, &outcomes) else { panic!("final expected") };
        assert_eq!(finals.len(), 1);
        let final_spec = &finals[0];
        assert_eq!((final_spec.kind, final_spec.config.epochs), (TrialKind::DaeFinal, 40));
        assert_eq!((final_spec.config.lr, final_spec.config.weight_decay, final_spec.config.batch_size), (1e-3, 1e-6, 512));

        let blob = BlobRef { sha256: "ab".repeat(32), size: 10 };
        outcomes.push(outcome(final_spec, TaskState::Running, None, None));
        assert_eq!(next_stage(&sweep, &outcomes), Next::Wait);
        outcomes.pop();
        outcomes.push(outcome(final_spec, TaskState::Succeeded, None, Some(blob.clone())));
        let Next::Start(finetune) = next_stage(&sweep, &outcomes) else { panic!("finetune expected") };
        assert_eq!(finetune[0].kind, TrialKind::Classifier);
        assert_eq!(finetune[0].init_from.as_ref(), Some(&blob));
        assert_eq!((finetune[0].config.lr, finetune[0].config.lr_encoder, finetune[0].config.weight_decay), (1e-3, 1e-4, 1e-5));
        outcomes.push(outcome(&finetune[0], TaskState::Succeeded, None, None));
        assert_eq!(next_stage(&sweep, &outcomes), Next::Done);
    }

    #[test]
    fn distributed_makes_final_and_finetune_gangs_and_leaves_cv_alone() {
        let sweep = SweepFile::parse(&format!("{SEED}[distributed]\nreplicas = 2\nbackend = \"ring\"\n"), "s").unwrap();
        let cv = initial(&sweep, dataset());
        assert!(cv.iter().all(|t| t.replicas == 1), "cross-validation trials stay single-replica");
        let outcomes: Vec<Outcome<'_>> = cv.iter().map(|t| outcome(t, TaskState::Succeeded, Some(0.01), None)).collect();
        let Next::Start(finals) = next_stage(&sweep, &outcomes) else { panic!("final expected") };
        assert_eq!((finals[0].replicas, finals[0].collective_backend.as_str()), (2, "ring"));
        let blob = BlobRef { sha256: "cd".repeat(32), size: 10 };
        let finetune = finetune_trial(&sweep, dataset(), &finals[0], blob);
        assert_eq!((finetune.replicas, finetune.collective_backend.as_str()), (2, "ring"));
        let described = describe_stages(&sweep);
        assert!(described[0].2.ends_with("epochs each; winner: lowest mean of per-fold minimum validation MSE"), "{described:?}");
        assert!(
            described[1].2.ends_with("40 epochs, 2 replica(s)") && described[2].2.ends_with("10 epochs, 2 replica(s)"),
            "{described:?}"
        );

        let plain = SweepFile::parse(SEED, "s").unwrap();
        let final_spec = final_trial(&plain, dataset(), &finals[0].config, "x".into());
        assert_eq!((final_spec.replicas, final_spec.collective_backend.as_str()), (1, "auto"));
        assert!(describe_stages(&plain)[1].2.ends_with("40 epochs, 1 replica(s)"));
    }

    /// `[cv] init = "per-trial"`: each cv trial starts from its own initialisation, the configs
    /// stay the same configs, and the final trial starts from the sweep's shared one.
    #[test]
    fn per_trial_init_gives_each_cv_trial_its_own_weights_seed() {
        let shared = initial(&SweepFile::parse(SEED, "s").unwrap(), dataset());
        assert!(shared.iter().all(|t| t.config.init_seed.is_none() && t.config.weights_seed() == 7));
        let sweep = SweepFile::parse(&SEED.replace("[cv]\n", "[cv]\ninit = \"per-trial\"\n"), "s").unwrap();
        let own = initial(&sweep, dataset());
        let seeds: std::collections::HashSet<u64> = own.iter().map(|t| t.config.weights_seed()).collect();
        assert_eq!(seeds.len(), 32, "32 trials, 32 initialisations");
        assert_eq!(own, initial(&sweep, dataset()), "a rerun draws the same ones");
        for (a, b) in shared.iter().zip(&own) {
            assert!(a.config.same_hyperparameters(&b.config) && a.config_label == b.config_label, "{} keeps its config", b.name);
        }
        let outcomes: Vec<Outcome<'_>> = own.iter().map(|t| outcome(t, TaskState::Succeeded, Some(t.config.lr), None)).collect();
        let Next::Start(finals) = next_stage(&sweep, &outcomes) else { panic!("final follows cv") };
        assert_eq!(
            (finals[0].config.lr, finals[0].config.init_seed, finals[0].config.epochs),
            (1e-4, None, 40),
            "the winner's hyperparameters, shared init"
        );
        let err = SweepFile::parse(&SEED.replace("[cv]\n", "[cv]\ninit = \"random\"\n"), "s").unwrap_err().to_string();
        assert!(err.contains("init") && err.contains("per-trial"), "{err}");
    }

    #[test]
    fn only_a_configured_stage_follows_another() {
        let seed = SweepFile::parse(SEED, "s").unwrap();
        assert!(has_next_stage(&seed, Stage::Cv) && has_next_stage(&seed, Stage::Final));
        assert!(!has_next_stage(&seed, Stage::Finetune));
        let cv_only = SweepFile::parse(GOOD, "g").unwrap();
        assert!(cv_only.final_stage.is_none(), "GOOD has [cv] alone");
        assert!(!has_next_stage(&cv_only, Stage::Cv));
        assert!(!has_next_stage(&SweepFile::parse(GAN, "w").unwrap(), Stage::Train));
    }

    #[test]
    fn a_failed_final_ends_the_sweep_and_no_winner_means_no_final() {
        let sweep = SweepFile::parse(SEED, "s").unwrap();
        let cv = initial(&sweep, dataset());
        let failed: Vec<Outcome<'_>> = cv.iter().map(|t| outcome(t, TaskState::Failed, None, None)).collect();
        assert_eq!(next_stage(&sweep, &failed), Next::Done);
        let config = TrainingConfig { lr: 1e-3, batch_size: 256, noise_std: 0.3, latent: 4, epochs: 40, ..sweep.training_base() };
        let final_spec = final_trial(&sweep, dataset(), &config, "x".into());
        assert_eq!(next_stage(&sweep, &[outcome(&final_spec, TaskState::Failed, None, None)]), Next::Done);
    }

    /// A WGAN-GP sweep on NIfTI data with the given `[train]` batch size and critic steps, and
    /// `extra` appended (e.g. `[distributed]`); `train_limit` 0 means all.
    fn gan_sweep(batch_size: u32, critic_steps: u32, train_limit: u64, extra: &str) -> SweepFile {
        let text = format!(
            "name = \"g\"\n[dataset]\nformat = \"nifti\"\npath = \"mri\"\ntrain_limit = {train_limit}\n[model]\nkind = \"wgan-gp\"\n\
             [train]\nepochs = 80\nbatch_size = {batch_size}\ncritic_steps = {critic_steps}\n{extra}"
        );
        SweepFile::parse(&text, "g.toml").unwrap()
    }

    #[test]
    fn an_epoch_shorter_than_the_critic_steps_is_warned_with_its_figures_and_a_remedy() {
        // The committed volume's 134 slices at the seed's batch 64: 2 batches against 5 critic steps.
        let warnings = schedule_warnings(&gan_sweep(64, 5, 0, ""), Some(TrainSamples::Exact(134)));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let warning = &warnings[0];
        for expected in [
            "an epoch has 2 batches (134 training samples / batch 64)",
            "fewer than the 5 critic steps per generator step",
            "the generator steps in 2 of every 5 epochs",
            "report no generator_loss",
            "lower train.batch_size to 26 or less or train.critic_steps to 2 or less",
        ] {
            assert!(warning.contains(expected), "{expected:?} in {warning:?}");
        }
        // 3 batches against 6 critic steps: every other epoch.
        let warning = &schedule_warnings(&gan_sweep(8, 6, 0, ""), Some(TrainSamples::Exact(24)))[0];
        assert!(warning.contains("an epoch has 3 batches") && warning.contains("in 1 of every 2 epochs"), "{warning}");
    }

    #[test]
    fn the_remedy_batch_splits_over_the_replicas_and_is_left_out_below_two() {
        let replicated = &schedule_warnings(&gan_sweep(64, 5, 0, "[distributed]\nreplicas = 4\n"), Some(TrainSamples::Exact(134)))[0];
        assert!(replicated.contains("train.batch_size to 24 or less"), "26 does not split over 4 replicas: {replicated}");
        let tiny = &schedule_warnings(&gan_sweep(4, 5, 0, ""), Some(TrainSamples::Exact(9)))[0];
        assert!(tiny.contains("an epoch has 2 batches") && tiny.ends_with("lower train.critic_steps to 2 or less"), "{tiny}");
    }

    #[test]
    fn enough_batches_or_an_unknown_dataset_size_warn_nothing() {
        // The shipped example: batch 16 on the committed volume is 8 batches an epoch.
        assert_eq!(schedule_warnings(&gan_sweep(16, 5, 0, ""), Some(TrainSamples::Exact(134))), Vec::<String>::new());
        assert!(schedule_warnings(&gan_sweep(16, 5, 0, ""), Some(TrainSamples::AtMost(181))).is_empty());
        assert!(schedule_warnings(&gan_sweep(26, 5, 0, ""), Some(TrainSamples::Exact(134))).is_empty(), "exactly 5 batches");
        assert!(schedule_warnings(&gan_sweep(64, 5, 0, ""), None).is_empty(), "nothing known, nothing warned");
        // An upper bound that leaves enough batches says nothing of the real count.
        assert!(schedule_warnings(&gan_sweep(32, 5, 0, ""), Some(TrainSamples::AtMost(181))).is_empty());
        // Not a GAN: no critic.
        assert!(schedule_warnings(&SweepFile::parse(GOOD, "s").unwrap(), Some(TrainSamples::Exact(10))).is_empty());
    }

    #[test]
    fn a_bound_on_the_samples_warns_when_even_the_bound_is_short_and_the_limit_applies() {
        // The committed volume's header: 181 axial slices, before near-empty ones are dropped.
        let warning = &schedule_warnings(&gan_sweep(64, 5, 0, ""), Some(TrainSamples::AtMost(181)))[0];
        assert!(warning.contains("an epoch has at most 2 batches (at most 181 training samples / batch 64)"), "{warning}");
        assert!(warning.contains("in at most 2 of every 5 epochs"), "{warning}");
        assert!(warning.contains("until an epoch has at least train.critic_steps batches"), "{warning}");
        // dataset.train_limit cuts the samples: 40 of them at batch 16 is 2 batches.
        let limited = &schedule_warnings(&gan_sweep(16, 5, 40, ""), Some(TrainSamples::Exact(134)))[0];
        assert!(limited.contains("an epoch has 2 batches (40 training samples / batch 16)"), "{limited}");
        let no_batch = schedule_warnings(&gan_sweep(64, 5, 0, ""), Some(TrainSamples::Exact(50)));
        assert_eq!(
            no_batch,
            vec!["train.batch_size: an epoch has no full batch (50 training samples / batch 64): the trial will fail".to_string()]
        );
    }

    #[test]
    fn without_cv_the_final_stage_comes_first_and_a_gan_is_one_trial() {
        let sweep = SweepFile::parse(&SEED.replace("[cv]", "[unused]").replace("[cv.grid]", "[unused.grid]"), "s");
        assert!(sweep.is_err(), "unknown sections are refused");
        let text = r#"
name = "f"
[dataset]
format = "idx"
path = "d"
[model]
kind = "dae"
[final]
epochs = 3
lr = 0.01
batch_size = 32
"#;
        let sweep = SweepFile::parse(text, "f").unwrap();
        let trials = initial(&sweep, dataset());
        assert_eq!(trials.len(), 1);
        assert_eq!((trials[0].kind, trials[0].config.lr, trials[0].config.batch_size), (TrialKind::DaeFinal, 0.01, 32));
        let gan = SweepFile::parse(GAN, "g").unwrap();
        let trials = initial(&gan, dataset());
        assert_eq!(trials[0].kind, TrialKind::Wgan);
        assert_eq!(trials[0].config.wgan.as_ref().unwrap().critic_steps, 5);
    }
}
