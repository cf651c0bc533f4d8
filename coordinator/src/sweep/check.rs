//! The checks [`SweepFile::parse`] runs once the file fits the schema: ranges, and the parts of
//! the file agreeing with each other and with the model. Each failure names its key.

use super::schema::default_batch_size;
use super::{cut_long_lines, Axis, SweepError, SweepFile, HARD_MAX_TRIALS, MAX_AUGMENT_COPIES, MAX_LATENT};
use crate::domain::{CollectiveBackend, DatasetFormat};

/// Reports the first failed check as an error naming the key.
pub(super) struct Checker<'a> {
    /// The file, for the errors.
    pub(super) file: &'a str,
}

impl Checker<'_> {
    /// Fails with `message` at `key` unless `ok`.
    pub(super) fn require(&self, ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), SweepError> {
        if ok {
            return Ok(());
        }
        Err(SweepError::Invalid { file: self.file.to_string(), key: key.to_string(), message: cut_long_lines(&message()) })
    }

    fn at_most(&self, value: u32, max: u32, key: &str) -> Result<(), SweepError> {
        self.require(value <= max, key, || format!("{value} must be at most {max}"))
    }

    fn positive(&self, value: f64, key: &str) -> Result<(), SweepError> {
        self.require(value > 0.0 && value.is_finite(), key, || format!("{value} must be a finite number > 0"))
    }

    fn non_negative(&self, value: f64, key: &str) -> Result<(), SweepError> {
        self.require(value >= 0.0 && value.is_finite(), key, || format!("{value} must be a finite number >= 0"))
    }

    fn at_least_one(&self, value: u32, key: &str) -> Result<(), SweepError> {
        self.require(value >= 1, key, || format!("{value} must be at least 1"))
    }
}

impl SweepFile {
    pub(super) fn validate(&self, file: &str) -> Result<(), SweepError> {
        let check = Checker { file };
        check.require(!self.name.trim().is_empty(), "name", || "must not be empty".into())?;
        check.require(matches!(self.model.kind.as_str(), "dae" | "wgan-gp" | "command"), "model.kind", || {
            format!("{:?} is not supported (supported: \"dae\", \"wgan-gp\", \"command\")", self.model.kind)
        })?;
        if self.is_command() {
            return match crate::command::problem(self) {
                Some((key, message)) => check.require(false, &key, || message),
                None => Ok(()),
            };
        }
        check.require(self.command.is_none(), "command", || "[command] belongs to model.kind = \"command\"".into())?;
        check.require(self.has_dataset(), "dataset", || "a [dataset] section with format and path is required".into())?;
        if let Some(cv) = &self.cv {
            let named = cv
                .grid
                .named
                .keys()
                .map(|name| ("cv.grid", name))
                .chain(cv.random.iter().flat_map(|r| r.named.keys().map(|name| ("cv.random", name))));
            for (section, name) in named {
                check.require(false, section, || {
                    format!("unknown field `{name}`, expected one of `lr`, `weight_decay`, `batch_size`, `noise_std`, `latent` (any name is a hyperparameter only for model.kind = \"command\")")
                })?;
            }
        }
        let format = DatasetFormat::parse(&self.dataset.format_name);
        check.require(
            matches!(format, Some(DatasetFormat::Idx | DatasetFormat::ImageFolder | DatasetFormat::Nifti)),
            "dataset.format",
            || format!("{:?} is not supported (supported: \"idx\", \"image-folder\", \"nifti\")", self.dataset.format_name),
        )?;
        if let Some(augment) = &self.augment {
            check.non_negative(augment.rotate_deg, "augment.rotate_deg")?;
            check.require((0.0..=0.5).contains(&augment.translate), "augment.translate", || {
                format!("{} must be within [0, 0.5]", augment.translate)
            })?;
            check.non_negative(augment.shear_deg, "augment.shear_deg")?;
            check.at_most(augment.copies, MAX_AUGMENT_COPIES, "augment.copies")?;
        }
        if self.is_gan() {
            self.validate_gan(&check)
        } else {
            self.validate_dae(&check)
        }
    }

    fn validate_dae(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        check.require(self.dataset.format() == DatasetFormat::Idx, "dataset.format", || {
            "the autoencoder trains on \"idx\" (28×28) data".into()
        })?;
        check.at_least_one(self.model.latent, "model.latent")?;
        check.at_most(self.model.latent, MAX_LATENT, "model.latent")?;
        check.non_negative(self.noise.std, "noise.std")?;
        check.require(self.train.is_none(), "train", || {
            "[train] belongs to model.kind = \"wgan-gp\"; the autoencoder uses [cv] and [final]".into()
        })?;
        check
            .require(self.cv.is_some() || self.final_stage.is_some(), "cv", || "an autoencoder sweep needs [cv], [final] or both".into())?;
        check.require(self.finetune.is_none() || self.final_stage.is_some(), "finetune", || {
            "[finetune] starts from [final]'s autoencoder: add [final]".into()
        })?;
        if let Some(cv) = &self.cv {
            check.require(cv.folds >= 2, "cv.folds", || format!("{} must be at least 2", cv.folds))?;
            check.at_least_one(cv.epochs, "cv.epochs")?;
            check.at_least_one(cv.max_attempts, "cv.max_attempts")?;
            if let Some((key, message)) = cv.prune.as_ref().and_then(|prune| prune.problem(cv.folds, cv.epochs)) {
                check.require(false, key, || message)?;
            }
            let grid = &cv.grid;
            let gridded = grid.lr.is_some()
                || grid.weight_decay.is_some()
                || grid.batch_size.is_some()
                || grid.noise_std.is_some()
                || grid.latent.is_some();
            check.require(!(gridded && cv.random.is_some()), "cv.random", || "use either [cv.grid] or [cv.random], not both".into())?;
            for (key, axis) in [
                ("cv.grid.lr", grid.lr.as_ref().map(Vec::len)),
                ("cv.grid.weight_decay", grid.weight_decay.as_ref().map(Vec::len)),
                ("cv.grid.batch_size", grid.batch_size.as_ref().map(Vec::len)),
                ("cv.grid.noise_std", grid.noise_std.as_ref().map(Vec::len)),
                ("cv.grid.latent", grid.latent.as_ref().map(Vec::len)),
            ] {
                check.require(axis != Some(0), key, || "an empty grid axis leaves nothing to train".into())?;
            }
            if let Some(random) = &cv.random {
                check.require(random.samples >= 1, "cv.random.samples", || "must be at least 1".into())?;
                for (key, result) in [
                    ("cv.random.lr", random.lr.as_ref().map(check_axis)),
                    ("cv.random.weight_decay", random.weight_decay.as_ref().map(check_axis)),
                    ("cv.random.batch_size", random.batch_size.as_ref().map(check_axis)),
                    ("cv.random.noise_std", random.noise_std.as_ref().map(check_axis)),
                    ("cv.random.latent", random.latent.as_ref().map(check_axis)),
                ] {
                    if let Some(Err(message)) = result {
                        check.require(false, key, || message)?;
                    }
                }
            }
            // Bound the work of planning before expanding anything (the limit proper is checked by
            // `check_trial_limit`, with the coordinator's configured value).
            let axes = [
                grid.lr.as_ref().map(Vec::len),
                grid.weight_decay.as_ref().map(Vec::len),
                grid.batch_size.as_ref().map(Vec::len),
                grid.noise_std.as_ref().map(Vec::len),
                grid.latent.as_ref().map(Vec::len),
            ];
            let grid_size = axes.iter().map(|a| a.unwrap_or(1) as u128).product::<u128>();
            let planned = cv.random.as_ref().map_or(grid_size, |r| u128::from(r.samples)) * u128::from(cv.folds);
            check.require(planned <= HARD_MAX_TRIALS as u128, "cv.grid", || {
                format!("expands to {planned} trials, more than the limit of {HARD_MAX_TRIALS}")
            })?;
            let configs = self.cv_configs();
            let axis = if cv.random.is_some() { "cv.random" } else { "cv.grid" };
            for h in &configs {
                check.positive(h.lr, &format!("{axis}.lr"))?;
                check.non_negative(h.weight_decay, &format!("{axis}.weight_decay"))?;
                check.non_negative(h.noise_std, &format!("{axis}.noise_std"))?;
                check.at_least_one(h.batch_size, &format!("{axis}.batch_size"))?;
                check.at_least_one(h.latent, &format!("{axis}.latent"))?;
                check.at_most(h.latent, MAX_LATENT, &format!("{axis}.latent"))?;
            }
        }
        if let Some(stage) = &self.final_stage {
            check.at_least_one(stage.epochs, "final.epochs")?;
            check.at_least_one(stage.max_attempts, "final.max_attempts")?;
            let given = stage.lr.is_some() || stage.weight_decay.is_some() || stage.batch_size.is_some();
            check.require(!(given && self.cv.is_some()), "final", || {
                "lr, weight_decay and batch_size come from the cross-validation winner; set them in [final] only without [cv]".into()
            })?;
            if let Some(lr) = stage.lr {
                check.positive(lr, "final.lr")?;
            }
            if let Some(wd) = stage.weight_decay {
                check.non_negative(wd, "final.weight_decay")?;
            }
            check.require(stage.batch_size != Some(0), "final.batch_size", || "must be at least 1".into())?;
        }
        if let Some(finetune) = &self.finetune {
            check.at_least_one(finetune.epochs, "finetune.epochs")?;
            check.positive(finetune.lr_head, "finetune.lr_head")?;
            check.positive(finetune.lr_encoder, "finetune.lr_encoder")?;
            check.non_negative(finetune.weight_decay, "finetune.weight_decay")?;
            check.at_least_one(finetune.batch_size, "finetune.batch_size")?;
            check.at_least_one(finetune.max_attempts, "finetune.max_attempts")?;
        }
        self.validate_dae_distributed(check)
    }

    /// `[distributed]` of an autoencoder sweep: it applies to `final` and `finetune` (the
    /// cross-validation trials run side by side already), so it needs `[final]`, and every batch
    /// size those stages can get must split evenly over the replicas.
    fn validate_dae_distributed(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        let Some(replicas) = self.validate_distributed(check)? else {
            return Ok(());
        };
        check.require(self.final_stage.is_some(), "distributed", || {
            "data-parallel training applies to [final] and [finetune]: add [final]".into()
        })?;
        // The final training gets the cross-validation winner's batch size: any config's.
        let (key, final_batches): (&str, Vec<u32>) = match &self.cv {
            Some(cv) if cv.random.is_some() => ("cv.random.batch_size", self.cv_configs().iter().map(|h| h.batch_size).collect()),
            Some(_) => ("cv.grid.batch_size", self.cv_configs().iter().map(|h| h.batch_size).collect()),
            None => ("final.batch_size", vec![self.final_stage.as_ref().and_then(|f| f.batch_size).unwrap_or_else(default_batch_size)]),
        };
        for batch in final_batches {
            check.require(batch % replicas == 0, key, || {
                format!("batch size {batch} of the final training must split evenly over {replicas} replicas")
            })?;
        }
        if let Some(finetune) = &self.finetune {
            check.require(finetune.batch_size % replicas == 0, "finetune.batch_size", || {
                format!("{} must split evenly over {replicas} replicas", finetune.batch_size)
            })?;
        }
        Ok(())
    }

    /// Checks `[distributed]` when present; returns its replica count.
    fn validate_distributed(&self, check: &Checker<'_>) -> Result<Option<u32>, SweepError> {
        let Some(distributed) = &self.distributed else {
            return Ok(None);
        };
        let replicas = distributed.replicas;
        check.require((1..=64).contains(&replicas), "distributed.replicas", || format!("{replicas} must be 1 to 64"))?;
        check.require(CollectiveBackend::parse(&distributed.backend).is_some(), "distributed.backend", || {
            format!("{:?} is not a backend (auto, ring, nccl)", distributed.backend)
        })?;
        Ok(Some(replicas))
    }

    fn validate_gan(&self, check: &Checker<'_>) -> Result<(), SweepError> {
        check.require(self.dataset.format() != DatasetFormat::Idx, "dataset.format", || {
            "the WGAN-GP trains on \"image-folder\" or \"nifti\" data".into()
        })?;
        let size = self.dataset.image_size;
        check.require(matches!(size, 32 | 64 | 128), "dataset.image_size", || format!("{size} must be 32, 64 or 128"))?;
        let stages = match size {
            32 => 3,
            64 => 4,
            _ => 5,
        };
        check.require(self.model.widths.len() == stages, "model.widths", || {
            format!(
                "{} widths make {}×{} images; image_size {size} needs {stages} (one per stride-2 stage)",
                self.model.widths.len(),
                4 << self.model.widths.len(),
                4 << self.model.widths.len()
            )
        })?;
        check.require(!self.model.conditional || self.dataset.format() == DatasetFormat::ImageFolder, "model.conditional", || {
            "a conditional WGAN-GP takes its classes from an \"image-folder\" dataset's class folders".into()
        })?;
        check.require((0.0..1.0).contains(&self.dataset.min_foreground), "dataset.min_foreground", || "must be within [0, 1)".into())?;
        for (present, key) in [(self.cv.is_some(), "cv"), (self.final_stage.is_some(), "final"), (self.finetune.is_some(), "finetune")] {
            check.require(!present, key, || format!("[{key}] belongs to model.kind = \"dae\"; the WGAN-GP uses [train]"))?;
        }
        for (index, &width) in self.model.widths.iter().enumerate() {
            check.require((1..=4096).contains(&width), "model.widths", || format!("width {index} is {width}, must be 1 to 4096"))?;
        }
        let Some(train) = &self.train else {
            return check.require(false, "train", || "a WGAN-GP sweep needs [train]".into());
        };
        check.at_least_one(train.epochs, "train.epochs")?;
        check.positive(train.lr, "train.lr")?;
        check.require((0.0..1.0).contains(&train.beta1), "train.beta1", || format!("{} must be within [0, 1)", train.beta1))?;
        check.require((0.0..1.0).contains(&train.beta2), "train.beta2", || format!("{} must be within [0, 1)", train.beta2))?;
        check.require(train.batch_size >= 2, "train.batch_size", || format!("{} must be at least 2", train.batch_size))?;
        check.at_least_one(train.critic_steps, "train.critic_steps")?;
        check.non_negative(train.gp_lambda, "train.gp_lambda")?;
        check.at_least_one(train.sample_count, "train.sample_count")?;
        check.at_least_one(train.max_attempts, "train.max_attempts")?;
        if let Some(judge) = &train.judge {
            check.require(self.model.conditional, "train.judge", || {
                "the judge classifies the samples generated for each class: it needs [model] conditional = true".into()
            })?;
            check.require(train.eval_every > 0, "train.judge", || {
                "the judge reports at every evaluation: it needs train.eval_every > 0".into()
            })?;
            check.require(judge.len() == 64 && judge.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "train.judge", || {
                format!("{judge:?} is not a SHA-256 (64 lowercase hex digits; `coordinator checkpoints ID` lists a classifier's)")
            })?;
        }
        let replicas = self.validate_distributed(check)?.unwrap_or(1);
        check.require(train.batch_size % replicas == 0, "train.batch_size", || {
            format!("{} must split evenly over {replicas} replicas", train.batch_size)
        })
    }
}

/// Checks one axis; returns a message naming what is wrong.
pub(super) fn check_axis<T: Copy + PartialOrd + Into<f64>>(axis: &Axis<T>) -> Result<(), String> {
    match axis {
        Axis::Values { values } if values.is_empty() => Err("an empty list of values leaves nothing to draw".into()),
        Axis::Values { .. } => Ok(()),
        Axis::Range { min, max, log } => {
            let (lo, hi): (f64, f64) = ((*min).into(), (*max).into());
            if !(lo <= hi) || !lo.is_finite() || !hi.is_finite() {
                return Err(format!("min {lo} must not exceed max {hi}"));
            }
            if *log && lo <= 0.0 {
                return Err(format!("a log range needs min > 0, not {lo}"));
            }
            Ok(())
        }
    }
}
