//! The environment of a command trial's process: built from an allowlist, never inherited
//! whole, so the worker's token, token file, TLS paths and anything else in its environment
//! never reach the user's program.

use std::path::Path;

use crate::task::Task;

/// The variables passed on from the worker's own environment, when set there.
pub const INHERITED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME"];

/// Where a gang's processes meet: rank 0's address and the port its worker picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// `MASTER_ADDR`.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

/// What the environment is made from, besides the task.
#[derive(Debug)]
pub struct EnvInputs<'a> {
    /// `COHORT_DATA`, when the sweep has a dataset.
    pub data_dir: Option<&'a Path>,
    /// `COHORT_CHECKPOINT_DIR`.
    pub checkpoint_dir: &'a Path,
    /// `COHORT_RESUME_DIR`, on a retry that has a stored checkpoint.
    pub resume_dir: Option<&'a Path>,
    /// `TMPDIR`.
    pub tmp_dir: &'a Path,
    /// A gang's meeting point (torchrun's variables are set only for gangs).
    pub rendezvous: Option<&'a Rendezvous>,
    /// `CUDA_VISIBLE_DEVICES`: the worker's GPU, or empty (no GPU) on a CPU worker.
    pub cuda_visible_devices: String,
    /// `OMP_NUM_THREADS`.
    pub threads: usize,
}

/// The full environment of the process, as (name, value) pairs: the allowlisted variables of
/// `inherited` (the worker's environment) and the `COHORT_*` contract.
pub fn build(task: &Task, inputs: &EnvInputs<'_>, inherited: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = inherited.into_iter().filter(|(name, _)| INHERITED.contains(&name.as_str())).collect();
    let mut set = |name: &str, value: String| env.push((name.to_string(), value));
    let path = |p: &Path| p.display().to_string();
    set("COHORT_TRIAL", task.spec.name.clone());
    set("COHORT_TASK", task.id.clone());
    set("COHORT_ATTEMPT", task.attempt.to_string());
    set("COHORT_EPOCHS", task.spec.config.epochs.to_string());
    set("COHORT_SEED", task.spec.config.seed.to_string());
    set("COHORT_INIT_SEED", task.spec.config.weights_seed().to_string());
    set("COHORT_HPARAMS", task.spec.command.as_ref().map_or_else(|| "{}".to_string(), |c| c.hparams_json.clone()));
    if let Some(fold) = task.spec.fold {
        set("COHORT_FOLD", fold.index.to_string());
        set("COHORT_FOLDS", fold.folds.to_string());
    }
    if let Some(data) = inputs.data_dir {
        set("COHORT_DATA", path(data));
    }
    set("COHORT_CHECKPOINT_DIR", path(inputs.checkpoint_dir));
    if let Some(resume) = inputs.resume_dir {
        set("COHORT_RESUME_DIR", path(resume));
    }
    if let Some(meeting) = inputs.rendezvous {
        set("MASTER_ADDR", meeting.master_addr.clone());
        set("MASTER_PORT", meeting.master_port.to_string());
        set("RANK", task.rank.to_string());
        set("WORLD_SIZE", task.world.to_string());
        // One process per worker: each worker is a node of one.
        set("LOCAL_RANK", "0".into());
        set("LOCAL_WORLD_SIZE", "1".into());
        set("GROUP_RANK", task.rank.to_string());
    }
    set("CUDA_VISIBLE_DEVICES", inputs.cuda_visible_devices.clone());
    set("OMP_NUM_THREADS", inputs.threads.max(1).to_string());
    set("TMPDIR", path(inputs.tmp_dir));
    // Python buffers a pipe's output in blocks: each metrics line must arrive when printed.
    set("PYTHONUNBUFFERED", "1".into());
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{CommandSpec, DatasetSpec, FoldSpec, Stage, TrainingConfig, TrialKind, TrialSpec};

    fn task(rank: u32, world: u32) -> Task {
        let config = TrainingConfig { epochs: 4, seed: 7, ..TrainingConfig::default() };
        Task {
            id: "s1.t3".into(),
            attempt: 2,
            resume_from: None,
            rank,
            world,
            spec: TrialSpec {
                fold: Some(FoldSpec { folds: 3, index: 0, shuffle_seed: 7 }),
                command: Some(CommandSpec {
                    run: vec!["python3".into()],
                    files: vec![],
                    metric: "val_loss".into(),
                    timeout_minutes: 0,
                    hparams_json: r#"{"lr":0.1}"#.into(),
                }),
                ..TrialSpec::new(Stage::Cv, "cv/c1/f0", TrialKind::Command, config, DatasetSpec::default())
            },
        }
    }

    #[test]
    fn only_allowlisted_variables_and_the_contract_reach_the_program() {
        let inherited = vec![
            ("PATH".to_string(), "/usr/bin".to_string()),
            ("COHORT_TOKEN_FILE".to_string(), "/secrets/worker.token".to_string()),
            ("COHORT_TLS_CA".to_string(), "/secrets/ca.pem".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "x".to_string()),
            ("LD_PRELOAD".to_string(), "/evil.so".to_string()),
        ];
        let dirs = Path::new("/run/a");
        let meeting = Rendezvous { master_addr: "10.0.0.1".into(), master_port: 29500 };
        let inputs = EnvInputs {
            data_dir: Some(dirs),
            checkpoint_dir: dirs,
            resume_dir: None,
            tmp_dir: dirs,
            rendezvous: Some(&meeting),
            cuda_visible_devices: String::new(),
            threads: 2,
        };
        let env: std::collections::BTreeMap<String, String> = build(&task(1, 2), &inputs, inherited).into_iter().collect();
        assert_eq!(env["PATH"], "/usr/bin");
        for secret in ["COHORT_TOKEN_FILE", "COHORT_TLS_CA", "AWS_SECRET_ACCESS_KEY", "LD_PRELOAD"] {
            assert!(!env.contains_key(secret), "{secret} leaked");
        }
        assert_eq!((env["COHORT_FOLD"].as_str(), env["COHORT_FOLDS"].as_str(), env["COHORT_ATTEMPT"].as_str()), ("0", "3", "2"));
        assert_eq!(env["COHORT_HPARAMS"], r#"{"lr":0.1}"#);
        assert_eq!((env["RANK"].as_str(), env["WORLD_SIZE"].as_str(), env["MASTER_PORT"].as_str()), ("1", "2", "29500"));
        assert!(!env.contains_key("COHORT_RESUME_DIR"));
        assert_eq!(env["OMP_NUM_THREADS"], "2");
        let single = EnvInputs { rendezvous: None, ..inputs };
        let env: std::collections::BTreeMap<String, String> = build(&task(0, 1), &single, vec![]).into_iter().collect();
        assert!(!env.contains_key("RANK") && !env.contains_key("MASTER_ADDR"), "torchrun's variables are for gangs");
    }
}
