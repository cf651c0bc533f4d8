//! Command sweeps (`[model] kind = "command"`, see docs/commands.md): the user's own program,
//! searched over hyperparameters of any name, planned with the same k-fold, final and gang
//! stages as the built-in recipes.
//!
//! A built-in recipe's hyperparameters are typed (`lr`, `weight_decay`, …); a command's are a
//! name → value map, handed to the program as the JSON of `COHORT_HPARAMS`. `[cv.grid]` lists
//! each name's values (numbers, strings or booleans); `[cv.random]` draws each from
//! `{ values = [...] }` or `{ min, max, log }`.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::domain::{BlobRef, CommandSpec, DatasetSpec, FoldSpec, TrainingConfig, TrialKind, TrialSpec};
use crate::domain::{CollectiveBackend, DatasetFormat, InitPolicy, Stage};
use crate::sweep::{CvSection, GridSection, RandomSection, SweepFile};

/// One config of a command sweep: hyperparameter name → value, in name order.
pub type Hparams = BTreeMap<String, Value>;

/// A problem of a command sweep: the offending key (`cv.grid.lr`) and what is wrong.
pub type Problem = (String, String);

/// Named value lists: a grid's axes.
pub type Axes = Vec<(String, Vec<Value>)>;

/// The longest hyperparameter name.
pub const MAX_HPARAM_NAME_BYTES: usize = 64;

/// The most files `[command] files` may hold.
pub const MAX_COMMAND_FILES: usize = 10_000;

/// The most bytes `[command] files` may hold in all (each file is also bounded by the blob limit).
pub const MAX_COMMAND_FILES_BYTES: u64 = 512 << 20;

/// The most arguments of `[command] run`, and the longest one.
pub const MAX_RUN_ARGS: usize = 256;
/// The longest argument of `[command] run`, in bytes.
pub const MAX_RUN_ARG_BYTES: usize = 4096;

/// A toml scalar as JSON; `None` for tables, arrays, dates and non-finite floats.
fn scalar(value: &toml::Value) -> Option<Value> {
    match value {
        toml::Value::String(text) => Some(Value::String(text.clone())),
        toml::Value::Integer(number) => Some(Value::from(*number)),
        toml::Value::Float(number) => serde_json::Number::from_f64(*number).map(Value::Number),
        toml::Value::Boolean(flag) => Some(Value::Bool(*flag)),
        _ => None,
    }
}

fn json_f64(values: &[f64]) -> Vec<Value> {
    values.iter().filter_map(|v| serde_json::Number::from_f64(*v).map(Value::Number)).collect()
}

fn json_u32(values: &[u32]) -> Vec<Value> {
    values.iter().map(|v| Value::from(*v)).collect()
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_HPARAM_NAME_BYTES
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// `[cv.grid]`'s axes as named value lists (the typed built-in names included), or the key and
/// message of the first problem.
pub fn grid_axes(grid: &GridSection) -> Result<Axes, Problem> {
    let mut axes = Vec::new();
    let typed_f64 = [("lr", &grid.lr), ("weight_decay", &grid.weight_decay), ("noise_std", &grid.noise_std)];
    for (name, values) in typed_f64 {
        if let Some(values) = values {
            axes.push((name.to_string(), json_f64(values)));
        }
    }
    for (name, values) in [("batch_size", &grid.batch_size), ("latent", &grid.latent)] {
        if let Some(values) = values {
            axes.push((name.to_string(), json_u32(values)));
        }
    }
    for (name, value) in &grid.named {
        let key = format!("cv.grid.{name}");
        if !valid_name(name) {
            return Err((
                key,
                format!("a hyperparameter name is a letter or _ then letters, digits, _, - or ., at most {MAX_HPARAM_NAME_BYTES} bytes"),
            ));
        }
        let toml::Value::Array(items) = value else {
            return Err((key, "must be a list of values".into()));
        };
        let values: Option<Vec<Value>> = items.iter().map(scalar).collect();
        let Some(values) = values else {
            return Err((key, "values are numbers, strings or booleans".into()));
        };
        axes.push((name.clone(), values));
    }
    axes.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((name, _)) = axes.iter().find(|(_, values)| values.is_empty()) {
        return Err((format!("cv.grid.{name}"), "an empty grid axis leaves nothing to train".into()));
    }
    Ok(axes)
}

/// How a random search draws one named hyperparameter.
#[derive(Debug, Clone, PartialEq)]
enum Draw {
    /// Uniformly among these values.
    Values(Vec<Value>),
    /// Uniformly (or log-uniformly) in [min, max]; integers when both bounds are.
    Range { min: f64, max: f64, log: bool, integer: bool },
}

fn random_axes(random: &RandomSection) -> Result<Vec<(String, Draw)>, Problem> {
    let mut axes = Vec::new();
    let typed: Vec<(&str, Option<toml::Value>)> = vec![
        ("lr", random.lr.as_ref().and_then(|a| toml::Value::try_from(a).ok())),
        ("weight_decay", random.weight_decay.as_ref().and_then(|a| toml::Value::try_from(a).ok())),
        ("batch_size", random.batch_size.as_ref().and_then(|a| toml::Value::try_from(a).ok())),
        ("noise_std", random.noise_std.as_ref().and_then(|a| toml::Value::try_from(a).ok())),
        ("latent", random.latent.as_ref().and_then(|a| toml::Value::try_from(a).ok())),
    ];
    let named = random.named.iter().map(|(name, value)| (name.as_str(), Some(value.clone())));
    for (name, value) in typed.into_iter().chain(named) {
        let Some(value) = value else { continue };
        let key = format!("cv.random.{name}");
        if !valid_name(name) {
            return Err((
                key,
                format!("a hyperparameter name is a letter or _ then letters, digits, _, - or ., at most {MAX_HPARAM_NAME_BYTES} bytes"),
            ));
        }
        let toml::Value::Table(table) = &value else {
            return Err((key, "must be { values = [...] } or { min = .., max = .., log = true|false }".into()));
        };
        if let Some(values) = table.get("values") {
            let list: Option<Vec<Value>> = values.as_array().and_then(|items| items.iter().map(scalar).collect());
            match list {
                Some(list) if !list.is_empty() && table.len() == 1 => axes.push((name.to_string(), Draw::Values(list))),
                _ => return Err((key, "values must be a non-empty list of numbers, strings or booleans, alone".into())),
            }
            continue;
        }
        let bound = |what: &str| table.get(what).and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)));
        let (Some(min), Some(max)) = (bound("min"), bound("max")) else {
            return Err((key, "needs values = [...], or min and max".into()));
        };
        let log = table.get("log").and_then(toml::Value::as_bool).unwrap_or(false);
        if table.keys().any(|k| !matches!(k.as_str(), "min" | "max" | "log")) {
            return Err((key, "only min, max and log go with a range".into()));
        }
        if !(min <= max) || !min.is_finite() || !max.is_finite() {
            return Err((key, format!("min {min} must not exceed max {max}")));
        }
        if log && min <= 0.0 {
            return Err((key, format!("a log range needs min > 0, not {min}")));
        }
        let integer = table.get("min").is_some_and(toml::Value::is_integer) && table.get("max").is_some_and(toml::Value::is_integer);
        axes.push((name.to_string(), Draw::Range { min, max, log, integer }));
    }
    axes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(axes)
}

fn draw(rng: &mut rand::rngs::StdRng, how: &Draw) -> Value {
    match how {
        Draw::Values(values) => values[rng.gen_range(0..values.len())].clone(),
        Draw::Range { min, max, log, integer } => {
            let unit: f64 = rng.gen_range(0.0..=1.0);
            let value = if *log { (unit * (max.ln() - min.ln()) + min.ln()).exp() } else { unit * (max - min) + min };
            if *integer {
                Value::from(value.round().clamp(*min, *max) as i64)
            } else {
                serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
            }
        }
    }
}

/// Every config of a command sweep's cross-validation, in a stable order (grid: names in
/// alphabetical order, the first outermost; random: draw order, seeded by the sweep's seed).
pub fn configs(sweep: &SweepFile, cv: &CvSection) -> Result<Vec<Hparams>, Problem> {
    if let Some(random) = &cv.random {
        let axes = random_axes(random)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(sweep.seed);
        return Ok((0..random.samples).map(|_| axes.iter().map(|(name, how)| (name.clone(), draw(&mut rng, how))).collect()).collect());
    }
    let mut configs = vec![Hparams::new()];
    for (name, values) in grid_axes(&cv.grid)? {
        let (name, values) = (&name, &values);
        configs = configs
            .into_iter()
            .flat_map(|config| {
                values.iter().map(move |value| {
                    let mut config = config.clone();
                    config.insert(name.clone(), value.clone());
                    config
                })
            })
            .collect();
    }
    Ok(configs)
}

/// The size of the search before expanding it (grid: the product of the axes; random: samples).
pub fn search_size(cv: &CvSection) -> u128 {
    if let Some(random) = &cv.random {
        return u128::from(random.samples);
    }
    grid_axes(&cv.grid).map_or(1, |axes| axes.iter().map(|(_, values)| values.len().max(1) as u128).product())
}

/// A config's label: `name=value` pairs in name order (`(defaults)` for none).
pub fn label(hparams: &Hparams) -> String {
    if hparams.is_empty() {
        return "(defaults)".into();
    }
    hparams
        .iter()
        .map(|(name, value)| format!("{name}={}", value.as_str().map_or_else(|| value.to_string(), str::to_string)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first problem of a command sweep, as (key, message); `None` when it is valid.
pub fn problem(sweep: &SweepFile) -> Option<Problem> {
    let fail = |key: &str, message: &str| Some((key.to_string(), message.to_string()));
    let Some(command) = &sweep.command else {
        return fail("command", "a command sweep needs [command] with run and metric");
    };
    if command.run.is_empty() || command.run[0].trim().is_empty() {
        return fail("command.run", "names the program and its arguments, e.g. [\"python3\", \"train.py\"]");
    }
    if command.run.len() > MAX_RUN_ARGS || command.run.iter().any(|arg| arg.len() > MAX_RUN_ARG_BYTES || arg.contains('\0')) {
        return Some(("command.run".into(), format!("at most {MAX_RUN_ARGS} arguments of at most {MAX_RUN_ARG_BYTES} bytes, without NUL")));
    }
    if command.metric.trim().is_empty() {
        return fail("command.metric", "names the metric cross-validation minimises, e.g. \"val_loss\"");
    }
    if command.metric == "epoch" {
        return fail("command.metric", "\"epoch\" numbers the report; name a metric the program reports");
    }
    if command.timeout_minutes == Some(0) {
        return fail("command.timeout_minutes", "must be at least 1 (leave it out for no limit)");
    }
    if command.files.trim().is_empty() {
        return fail("command.files", "names a folder (\".\" for the sweep file's)");
    }
    for (present, key) in [(sweep.train.is_some(), "train"), (sweep.finetune.is_some(), "finetune"), (sweep.augment.is_some(), "augment")] {
        if present {
            return Some((key.into(), format!("[{key}] belongs to the built-in recipes; a command sweep uses [cv] and [final]")));
        }
    }
    if sweep.has_dataset() && matches!(DatasetFormat::parse(&sweep.dataset.format_name), None | Some(DatasetFormat::None)) {
        return Some((
            "dataset.format".into(),
            format!("{:?} is not supported (supported: \"files\", \"idx\", \"image-folder\", \"nifti\")", sweep.dataset.format_name),
        ));
    }
    if sweep.cv.is_none() && sweep.final_stage.is_none() {
        return fail("cv", "a command sweep needs [cv], [final] or both");
    }
    if let Some(cv) = &sweep.cv {
        if cv.folds < 2 {
            return Some(("cv.folds".into(), format!("{} must be at least 2", cv.folds)));
        }
        if cv.epochs < 1 || cv.max_attempts < 1 {
            return fail("cv.epochs", "epochs and max_attempts must be at least 1");
        }
        if let Some((key, message)) = cv.prune.as_ref().and_then(|prune| prune.problem(cv.folds, cv.epochs)) {
            return Some((key.to_string(), message));
        }
        let gridded = !cv.grid.named.is_empty() || cv.grid.lr.is_some() || cv.grid.weight_decay.is_some() || cv.grid.batch_size.is_some();
        if gridded && cv.random.is_some() {
            return fail("cv.random", "use either [cv.grid] or [cv.random], not both");
        }
        if let Some(random) = &cv.random {
            if random.samples < 1 {
                return fail("cv.random.samples", "must be at least 1");
            }
        }
        let planned = search_size(cv) * u128::from(cv.folds);
        if planned > crate::sweep::HARD_MAX_TRIALS as u128 {
            return Some((
                "cv.grid".into(),
                format!("expands to {planned} trials, more than the limit of {}", crate::sweep::HARD_MAX_TRIALS),
            ));
        }
        if let Err(problem) = configs(sweep, cv) {
            return Some(problem);
        }
    }
    if let Some(stage) = &sweep.final_stage {
        if stage.epochs < 1 || stage.max_attempts < 1 {
            return fail("final.epochs", "epochs and max_attempts must be at least 1");
        }
        if stage.lr.is_some() || stage.weight_decay.is_some() || stage.batch_size.is_some() {
            return fail("final", "a command's hyperparameters come from [cv]'s winner (or the program's defaults); lr, weight_decay and batch_size do not go in [final]");
        }
    }
    if let Some(distributed) = &sweep.distributed {
        if !(1..=64).contains(&distributed.replicas) {
            return Some(("distributed.replicas".into(), format!("{} must be 1 to 64", distributed.replicas)));
        }
        if sweep.final_stage.is_none() {
            return fail("distributed", "replicas apply to [final] (cross-validation trials run side by side): add [final]");
        }
    }
    None
}

/// The trials a command sweep's first stage plans to, or `None` when it has no `[cv]` (the
/// count is then one).
pub fn first_stage_trials(sweep: &SweepFile) -> usize {
    sweep.cv.as_ref().map_or(1, |cv| configs(sweep, cv).map_or(0, |c| c.len()) * cv.folds as usize)
}

fn command_spec(sweep: &SweepFile, files: &[(String, BlobRef)], hparams: &Hparams) -> CommandSpec {
    let section = sweep.command.as_ref().expect("validated: a command sweep has [command]");
    CommandSpec {
        run: section.run.clone(),
        files: files.to_vec(),
        metric: section.metric.clone(),
        timeout_minutes: section.timeout_minutes.unwrap_or(0),
        hparams_json: Value::Object(hparams.clone().into_iter().collect()).to_string(),
    }
}

fn config(sweep: &SweepFile, epochs: u32) -> TrainingConfig {
    // The program's hyperparameters travel in COHORT_HPARAMS; the recipes' fields stay zero.
    TrainingConfig { epochs, seed: sweep.seed, ..TrainingConfig::default() }
}

/// The first stage of a command sweep: every config × fold of `[cv]`, or `[final]` alone.
pub fn initial(sweep: &SweepFile, dataset: DatasetSpec, files: &[(String, BlobRef)]) -> Vec<TrialSpec> {
    let Some(cv) = &sweep.cv else {
        return vec![final_trial(sweep, dataset, files, &Hparams::new(), label(&Hparams::new()))];
    };
    let mut trials = Vec::new();
    let mut labels = std::collections::BTreeSet::new();
    for (index, hparams) in configs(sweep, cv).unwrap_or_default().iter().enumerate() {
        let mut config_label = label(hparams);
        if !labels.insert(config_label.clone()) {
            config_label = format!("{config_label} #{index}");
            labels.insert(config_label.clone());
        }
        for fold in 0..cv.folds {
            let mut config = config(sweep, cv.epochs);
            if cv.init == InitPolicy::PerTrial {
                config.init_seed = Some(crate::plan::trial_seed(sweep.seed, index as u64, u64::from(fold)));
            }
            trials.push(TrialSpec {
                config_label: config_label.clone(),
                fold: Some(FoldSpec { folds: cv.folds, index: fold, shuffle_seed: sweep.seed }),
                max_attempts: cv.max_attempts,
                command: Some(command_spec(sweep, files, hparams)),
                ..TrialSpec::new(Stage::Cv, format!("cv/c{index}/f{fold}"), TrialKind::Command, config, dataset.clone())
            });
        }
    }
    if cv.prune.is_some() {
        trials.sort_by_key(|trial| trial.fold.map(|fold| fold.index));
    }
    trials
}

/// `[final]` of a command sweep with `hparams` (the cross-validation winner's), as a gang of
/// `[distributed] replicas`.
pub fn final_trial(
    sweep: &SweepFile,
    dataset: DatasetSpec,
    files: &[(String, BlobRef)],
    hparams: &Hparams,
    config_label: String,
) -> TrialSpec {
    let stage = sweep.final_stage.as_ref().expect("caller checked");
    let replicas = sweep.distributed.as_ref().map_or(1, |d| d.replicas.max(1));
    TrialSpec {
        config_label,
        max_attempts: stage.max_attempts,
        replicas,
        collective_backend: CollectiveBackend::Ring,
        command: Some(command_spec(sweep, files, hparams)),
        ..TrialSpec::new(Stage::Final, "final", TrialKind::Command, config(sweep, stage.epochs), dataset)
    }
}

/// The final trial for a cross-validation winner, from one of the winner's cv trials.
pub fn final_for_winner(sweep: &SweepFile, winner: &TrialSpec) -> TrialSpec {
    let command = winner.command.as_ref();
    let files = command.map(|c| c.files.clone()).unwrap_or_default();
    let hparams: Hparams = command.and_then(|c| serde_json::from_str(&c.hparams_json).ok()).unwrap_or_default();
    final_trial(sweep, winner.dataset.clone(), &files, &hparams, winner.config_label.clone())
}

/// The stages of a command sweep as `submit --dry-run` describes them.
pub fn describe_stages(sweep: &SweepFile) -> Vec<(String, u32, String)> {
    let metric = sweep.command.as_ref().map_or("", |c| c.metric.as_str());
    let program = sweep.command.as_ref().map(|c| c.run.join(" ")).unwrap_or_default();
    let mut described = Vec::new();
    if let Some(cv) = &sweep.cv {
        let configs = configs(sweep, cv).map_or(0, |c| c.len());
        let search = if cv.random.is_some() { "random-search" } else { "grid" };
        let mut what = format!(
            "`{program}`: {configs} {search} configs x {} folds, up to {} epochs each; winner: lowest mean of per-fold minimum {metric}",
            cv.folds, cv.epochs
        );
        if let Some(prune) = &cv.prune {
            what.push_str(&format!("; {}", prune.describe(cv.epochs)));
        }
        described.push((Stage::Cv.to_string(), (configs as u32) * cv.folds, what));
    }
    if let Some(stage) = &sweep.final_stage {
        let replicas = sweep.distributed.as_ref().map_or(1, |d| d.replicas.max(1));
        let source = if sweep.cv.is_some() { "the cross-validation winner" } else { "the program's defaults" };
        described.push((
            Stage::Final.to_string(),
            1,
            format!("`{program}` on the whole training set with {source}, up to {} epochs, {replicas} replica(s)", stage.epochs),
        ));
    }
    described
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const COMMAND: &str = r#"
name = "cmd"
seed = 3
[model]
kind = "command"
[command]
run = ["python3", "train.py"]
metric = "val_loss"
[cv]
folds = 3
epochs = 2
[cv.grid]
lr = [0.1, 0.01]
hidden = [32, 64]
[final]
epochs = 2
[distributed]
replicas = 2
"#;

    #[test]
    fn a_grid_over_any_names_is_planned_by_fold_and_config() {
        let sweep = SweepFile::parse(COMMAND, "c.toml").unwrap();
        assert!(sweep.is_command() && !sweep.has_dataset());
        let trials = initial(&sweep, DatasetSpec::default(), &[]);
        assert_eq!(trials.len(), 12);
        assert_eq!(trials[0].config_label, "hidden=32 lr=0.1");
        assert_eq!(trials[0].command.as_ref().unwrap().hparams_json, r#"{"hidden":32,"lr":0.1}"#);
        assert_eq!(trials[11].config_label, "hidden=64 lr=0.01");
        assert!(trials.iter().all(|t| t.kind == TrialKind::Command && t.config.epochs == 2 && t.replicas == 1));
        let final_spec = final_for_winner(&sweep, &trials[4]);
        assert_eq!((final_spec.replicas, final_spec.fold, final_spec.config_label.as_str()), (2, None, "hidden=32 lr=0.01"));
        assert_eq!(final_spec.command.unwrap().hparams_json, r#"{"hidden":32,"lr":0.01}"#);
        assert_eq!(first_stage_trials(&sweep), 12);
    }

    #[test]
    fn random_search_draws_named_values_and_ranges() {
        let text = COMMAND.replace("[cv.grid]\nlr = [0.1, 0.01]\nhidden = [32, 64]", "[cv.random]\nsamples = 20\nlr = { min = 1e-4, max = 1e-1, log = true }\nopt = { values = [\"adam\", \"sgd\"] }\nlayers = { min = 1, max = 4 }");
        let sweep = SweepFile::parse(&text, "c.toml").unwrap();
        let configs = configs(&sweep, sweep.cv.as_ref().unwrap()).unwrap();
        assert_eq!(configs.len(), 20);
        for config in &configs {
            let lr = config["lr"].as_f64().unwrap();
            assert!((1e-4..=1e-1).contains(&lr));
            assert!(["adam", "sgd"].contains(&config["opt"].as_str().unwrap()));
            assert!((1..=4).contains(&config["layers"].as_i64().unwrap()), "integer bounds draw integers");
        }
    }

    #[test]
    fn problems_name_the_key() {
        let error = |text: &str| SweepFile::parse(text, "c").unwrap_err().to_string();
        assert!(error(&COMMAND.replace("run = [\"python3\", \"train.py\"]", "run = []")).contains("command.run"));
        assert!(error(&COMMAND.replace("metric = \"val_loss\"", "metric = \"\"")).contains("command.metric"));
        assert!(error(&COMMAND.replace("hidden = [32, 64]", "hidden = []")).contains("cv.grid.hidden: an empty grid axis"));
        assert!(error(&COMMAND.replace("hidden = [32, 64]", "hidden = [[1]]")).contains("cv.grid.hidden: values are numbers"));
        assert!(error(&COMMAND.replace("[command]", "[command]\ntimeout_minutes = 0")).contains("command.timeout_minutes"));
        assert!(error(&COMMAND.replace("[final]\nepochs = 2\n", "")).contains("distributed: replicas apply to [final]"));
        assert!(error(
            &COMMAND
                .replace("kind = \"command\"\n[command]\nrun = [\"python3\", \"train.py\"]\nmetric = \"val_loss\"", "kind = \"command\"")
        )
        .contains("needs [command]"));
        // A built-in recipe still refuses names it does not know.
        let dae = "name = \"d\"\n[dataset]\nformat = \"idx\"\npath = \"d\"\n[model]\nkind = \"dae\"\n[cv]\nfolds = 2\nepochs = 1\n[cv.grid]\nhidden = [1]\n";
        assert!(error(dae).contains("unknown field `hidden`"), "{}", error(dae));
        let without_dataset = "name = \"d\"\n[model]\nkind = \"dae\"\n[cv]\nfolds = 2\nepochs = 1\n";
        assert!(error(without_dataset).contains("[dataset]"), "{}", error(without_dataset));
    }

    #[test]
    fn labels_read_as_assignments() {
        let mut hparams = Hparams::new();
        assert_eq!(label(&hparams), "(defaults)");
        hparams.insert("opt".into(), Value::String("adam".into()));
        hparams.insert("lr".into(), Value::from(0.5));
        assert_eq!(label(&hparams), "lr=0.5 opt=adam");
    }
}
