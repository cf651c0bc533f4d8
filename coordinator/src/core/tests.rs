//! The core's own tests, and the helpers the other modules' tests share: a core over a small
//! IDX dataset, registered workers, lease proofs, and running a trial to its end.

use std::path::PathBuf;
use std::time::Duration;

use super::{check_and_plan, dry_run_plan, Core, CoreConfig, CoreError, Dispatch, LeaseProof, Limits, SweepState};
use crate::domain::{BlobRef, TaskState};
use crate::scheduler::{Abilities, Lease, Refusal, Timeouts};
use crate::store::{CheckpointRecord, EpochRecord};
use crate::sweep::SweepFile;

pub(crate) const SWEEP: &str = r#"
name = "stages"
[dataset]
format = "idx"
path = "data"
[model]
kind = "dae"
[cv]
folds = 2
epochs = 1
batch_size = 16
[cv.grid]
lr = [1e-3, 1e-4]
[final]
epochs = 1
"#;

pub(crate) fn idx_file(magic: u32, dims: &[u32]) -> Vec<u8> {
    let items: u32 = dims.iter().product();
    let mut bytes: Vec<u8> = std::iter::once(magic).chain(dims.iter().copied()).flat_map(u32::to_be_bytes).collect();
    bytes.resize(bytes.len() + items as usize, 0);
    bytes
}

/// Opens a core on `dir`, storing a 64-image IDX dataset in its blob store.
pub(crate) fn open_with_dataset(dir: &std::path::Path) -> (Core, Vec<(String, BlobRef)>) {
    let config = CoreConfig { data_dir: dir.to_path_buf(), timeouts: Timeouts::default(), limits: Limits::default() };
    let core = Core::open(&config).unwrap();
    let mut files = Vec::new();
    for (name, bytes) in [
        ("train-images-idx3-ubyte", idx_file(0x803, &[64, 28, 28])),
        ("train-labels-idx1-ubyte", idx_file(0x801, &[64])),
        ("t10k-images-idx3-ubyte", idx_file(0x803, &[16, 28, 28])),
        ("t10k-labels-idx1-ubyte", idx_file(0x801, &[16])),
    ] {
        let sha256 = format!("{:064x}", files.len() + 1);
        let path = core.blobs().path(&sha256).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        files.push((name.to_string(), BlobRef { sha256, size: bytes.len() as u64 }));
    }
    (core, files)
}

/// A registered worker: its id and session.
#[derive(Debug, Clone)]
pub(crate) struct TestWorker {
    pub(crate) id: String,
    pub(crate) session: String,
}

pub(crate) fn register(core: &Core, name: &str) -> TestWorker {
    let (id, session, _) = core.register(name, "cpu", Abilities::default(), &[]).unwrap();
    TestWorker { id, session }
}

pub(crate) fn proof<'a>(worker: &'a TestWorker, dispatch: &'a Dispatch) -> LeaseProof<'a> {
    LeaseProof { worker_id: &worker.id, task_id: &dispatch.task_id, attempt: dispatch.attempt, secret: &dispatch.lease_secret }
}

fn epoch(number: u32, values: &[(&str, f64)]) -> EpochRecord {
    EpochRecord { epoch: number, attempt: 1, values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(), seconds: 0.1, samples: 48 }
}

/// Leases the next task to `worker`, reports a validation error, and completes it.
pub(crate) async fn run_one(core: &Core, worker: &TestWorker, val_mse: f64) -> String {
    let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().expect("a task is queued");
    let epoch = EpochRecord { epoch: 1, attempt: dispatch.attempt, values: vec![("val_mse".into(), val_mse)], seconds: 0.1, samples: 48 };
    core.report_metrics(&proof(worker, &dispatch), &[epoch]).unwrap();
    core.complete(&proof(worker, &dispatch)).unwrap();
    dispatch.trial().name
}

/// A sweep's view says why its queued trials wait, names the workers by the names they
/// gave, and stamps when a trial started and ended.
#[tokio::test]
async fn the_sweep_view_says_why_trials_wait_and_names_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let sweep_id = core.submit(SWEEP, "view.toml", files, false).unwrap().sweep_id.unwrap();
    let view = core.sweep(&sweep_id).unwrap();
    assert!(view.tasks.iter().all(|t| t.waiting.as_deref() == Some("waiting: no worker connected")), "{:?}", view.tasks[0].waiting);
    let worker = register(&core, "alpha");
    run_one(&core, &worker, 0.5).await;
    let view = core.sweep(&sweep_id).unwrap();
    let done = &view.tasks[0];
    assert_eq!(done.worker_names, vec!["alpha".to_string()]);
    assert!(done.waiting.is_none());
    assert!(done.started_ms > 0 && done.ended_ms >= done.started_ms, "{} {}", done.started_ms, done.ended_ms);
    assert_eq!(view.tasks[1].waiting.as_deref(), Some("waiting: next to start"));
    assert_eq!(view.tasks[2].waiting.as_deref(), Some("waiting: 1 earlier trial queued"));
}

/// The dry run's planning is the submission's, with nothing stored.
#[test]
fn a_dry_run_plans_without_storing() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let local: Vec<(String, PathBuf)> = files.iter().map(|(name, blob)| (name.clone(), core.blobs().path(&blob.sha256).unwrap())).collect();
    let sweep = SweepFile::parse(SWEEP, "dry.toml").unwrap();
    let (trials, stages) = check_and_plan(&sweep, "dry.toml", files, &local, &Limits::default()).unwrap();
    let planned = dry_run_plan(trials, stages);
    assert_eq!(planned.planned.len(), 4);
    assert_eq!(planned.stages.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), vec!["cv", "final"]);
    assert!(core.sweeps().unwrap().is_empty());
}

/// Non-finite values and epochs outside the plan are refused, naming the problem, and
/// change nothing; a report under a wrong secret is refused as not the lease holder's.
#[tokio::test]
async fn reports_are_checked_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let sweep_id = core.submit(SWEEP, "edge.toml", files, false).unwrap().sweep_id.unwrap();
    let worker = register(&core, "w");
    let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
    let lease = proof(&worker, &dispatch);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let error = core.report_metrics(&lease, &[epoch(1, &[("val_mse", bad)])]).unwrap_err();
        assert!(matches!(error, CoreError::BadRequest(_)) && error.to_string().contains("val_mse"), "{error}");
    }
    let error = core.report_metrics(&lease, &[epoch(2, &[("val_mse", 0.5)])]).unwrap_err();
    assert!(error.to_string().contains("outside the trial's plan of epochs 1 to 1"), "{error}");
    let many: Vec<(String, f64)> = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
    let wide = EpochRecord { values: many, ..epoch(1, &[]) };
    assert!(matches!(core.report_metrics(&lease, &[wide]), Err(CoreError::LimitExceeded(_))));
    let forged = LeaseProof { secret: "guessed", ..lease };
    assert!(matches!(
        core.report_metrics(&forged, &[epoch(1, &[("val_mse", 1e-6)])]),
        Err(CoreError::Refused(Refusal::NotLeaseHolder { .. }))
    ));
    assert!(matches!(core.complete(&forged), Err(CoreError::Refused(Refusal::NotLeaseHolder { .. }))));
    let view = core.sweep(&sweep_id).unwrap();
    assert!(view.tasks.iter().all(|t| t.epochs.is_empty()), "nothing refused was stored");
    core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
    core.complete(&lease).unwrap();
}

/// A checkpoint is attached only from a blob uploaded under the same lease, for an epoch the
/// trial has reported.
#[tokio::test]
async fn checkpoints_come_only_from_the_lease_holders_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let foreign = files[0].1.clone();
    core.submit(SWEEP, "attach.toml", files, false).unwrap();
    let worker = register(&core, "w");
    let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
    let lease = proof(&worker, &dispatch);
    let record = |blob: &BlobRef, epoch: u32| CheckpointRecord {
        task_id: dispatch.task_id.clone(),
        epoch,
        attempt: 1,
        blob: blob.clone(),
        is_final: true,
    };
    let error = core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap_err();
    assert!(error.to_string().contains("not uploaded under this lease"), "{error}");
    core.record_lease_upload(&lease, &foreign).unwrap();
    let error = core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap_err();
    assert!(error.to_string().contains("before that epoch was reported"), "{error}");
    core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
    core.attach_checkpoint(&lease, record(&foreign, 1)).unwrap();
}

/// When the database cannot be written, the failed change leaves memory as the database
/// has it, every further change is refused as UNAVAILABLE, and once writes work again the
/// coordinator resumes, its leases intact.
#[tokio::test]
async fn a_full_store_changes_nothing_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let sweep_id = core.submit(SWEEP, "full.toml", files, false).unwrap().sweep_id.unwrap();
    let worker = register(&core, "w");
    let dispatch = core.acquire(&worker.id, &worker.session, Duration::ZERO).await.unwrap().unwrap();
    let lease = proof(&worker, &dispatch);
    core.report_metrics(&lease, &[epoch(1, &[("val_mse", 0.5)])]).unwrap();
    let pages: u64 = core.lock().store.page_count().unwrap();
    core.lock().store.set_max_pages(pages).unwrap();
    // Filling the last pages: log lines until the database is full.
    let line = "x".repeat(4000);
    let mut refused = None;
    for _ in 0..1000 {
        if let Err(error) = core.append_logs(&lease, vec![(0, "INFO".into(), line.clone()); 50]) {
            refused = Some(error);
            break;
        }
    }
    assert!(matches!(refused, Some(CoreError::Unwritable(_))), "{refused:?}");
    assert!(!core.writable());
    assert!(matches!(core.complete(&lease), Err(CoreError::Unwritable(_))), "no change while unwritable");
    assert!(matches!(core.acquire(&worker.id, &worker.session, Duration::ZERO).await, Err(CoreError::Unwritable(_))));
    assert_eq!(
        core.sweep(&sweep_id).unwrap().tasks.iter().filter(|t| t.task.entry.state == TaskState::Running).count(),
        1,
        "reads still work"
    );
    core.expire_leases().unwrap();
    assert!(!core.writable(), "the probe fails while the store is full");

    core.lock().store.set_max_pages(1 << 30).unwrap();
    core.expire_leases().unwrap();
    assert!(core.writable(), "the probe succeeded");
    // Memory was rebuilt from the database: the worker registers again and re-attaches.
    let (id, session, abandon) = core
        .register(
            "w",
            "cpu",
            Abilities::default(),
            &[Lease { task_id: dispatch.task_id.clone(), attempt: 1, rank: 0, world: 1, secret: dispatch.lease_secret.clone() }],
        )
        .unwrap();
    assert!(abandon.is_empty(), "the lease survived the failure");
    let worker = TestWorker { id, session };
    core.complete(&proof(&worker, &dispatch)).unwrap();
    assert_eq!(core.sweep(&sweep_id).unwrap().tasks[0].task.entry.state, TaskState::Succeeded);
}

fn stages_of(core: &Core, sweep_id: &str) -> Vec<String> {
    core.sweep(sweep_id).unwrap().tasks.into_iter().map(|t| t.task.spec.stage.to_string()).collect()
}

/// A member reserved for a gang while it long-polls gets its lease as soon as the last
/// member's acquire completes the gang, not when its own wait runs out. (Time is paused: a
/// member left waiting would sleep through to its deadline and come back empty.)
#[tokio::test(start_paused = true)]
async fn a_waiting_gang_member_wakes_when_the_gang_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let source = format!("{SWEEP}[distributed]\nreplicas = 2\n");
    let sweep_id = core.submit(&source, "gang.toml", files, false).unwrap().sweep_id.unwrap();
    let core = std::sync::Arc::new(core);
    let first = register(&core, "w1");
    let second = register(&core, "w2");
    for val_mse in [0.5, 0.4, 0.3, 0.2] {
        run_one(&core, &first, val_mse).await;
    }
    assert_eq!(stages_of(&core, &sweep_id).last().map(String::as_str), Some("final"));
    let waiting = tokio::spawn({
        let core = core.clone();
        async move { core.acquire(&first.id, &first.session, Duration::from_secs(30)).await }
    });
    // Let the first member reserve its place and start waiting.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let completing = core.acquire(&second.id, &second.session, Duration::ZERO).await.unwrap().expect("the gang is complete");
    let waited = waiting.await.unwrap().unwrap().expect("the waiting member gets its lease");
    assert_eq!((completing.world, waited.world), (2, 2));
    assert_eq!(completing.task_id, waited.task_id);
}

/// The next stage is planned once, when the last trial of the current one ends, also when
/// the coordinator restarted in the middle of the stage.
#[tokio::test]
async fn the_next_stage_starts_once_after_the_last_trial_of_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (core, files) = open_with_dataset(dir.path());
    let sweep_id = core.submit(SWEEP, "stages.toml", files, false).unwrap().sweep_id.unwrap();
    let worker = register(&core, "w");
    for val_mse in [0.5, 0.4, 0.3] {
        run_one(&core, &worker, val_mse).await;
        assert_eq!(stages_of(&core, &sweep_id), ["cv"; 4], "final waits for every cv trial");
    }
    drop(core);

    let (core, _) = open_with_dataset(dir.path());
    let worker = register(&core, "w");
    assert_eq!(run_one(&core, &worker, 0.2).await, "cv/c1/f1");
    assert_eq!(stages_of(&core, &sweep_id), ["cv", "cv", "cv", "cv", "final"]);
    let view = core.sweep(&sweep_id).unwrap();
    assert_eq!(view.tasks[4].task.spec.config.lr, 1e-4, "the config with the lower mean wins");
    assert_eq!(run_one(&core, &worker, 0.1).await, "final");
    let view = core.sweep(&sweep_id).unwrap();
    assert_eq!(view.tasks.len(), 5, "no stage after final");
    assert_eq!(view.summary.state, SweepState::Succeeded);
}

/// Stores `bytes` in the core's blob store under a made-up hash.
fn store_blob(core: &Core, index: usize, bytes: &[u8]) -> BlobRef {
    let sha256 = format!("{:064x}", 0xb10b_0000 + index);
    let path = core.blobs().path(&sha256).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    BlobRef { sha256, size: bytes.len() as u64 }
}

/// `[train] judge` names a classifier checkpoint the coordinator holds, and the image folder's
/// classes must be digits: the planned trial carries the blob and each class's digit.
#[test]
fn a_judge_is_a_stored_blob_and_the_classes_digits() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoreConfig { data_dir: dir.path().to_path_buf(), timeouts: Timeouts::default(), limits: Limits::default() };
    let core = Core::open(&config).unwrap();
    let folder = |classes: [&str; 2]| -> Vec<(String, BlobRef)> {
        ["train/{0}/a.png", "train/{1}/b.png", "test/{0}/c.png", "test/{1}/d.png"]
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let name = name.replace("{0}", classes[0]).replace("{1}", classes[1]);
                (name, store_blob(&core, index, b"png"))
            })
            .collect()
    };
    let judge = "c".repeat(64);
    let sweep = format!(
        "name = \"judged\"\n[dataset]\nformat = \"image-folder\"\npath = \"digits\"\nimage_size = 32\n[model]\nkind = \"wgan-gp\"\nwidths = [16, 8, 4]\nconditional = true\n[train]\nepochs = 2\nbatch_size = 2\neval_every = 1\njudge = \"{judge}\"\n"
    );
    let error = core.submit(&sweep, "judged.toml", folder(["1", "7"]), true).unwrap_err();
    assert!(matches!(error, CoreError::BadRequest(_)), "{error:?}");
    assert!(error.to_string().contains(&format!("train.judge: no checkpoint {judge} on this coordinator")), "{error}");

    let path = core.blobs().path(&judge).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"classifier").unwrap();
    let error = core.submit(&sweep, "judged.toml", folder(["1", "7"]), true).unwrap_err().to_string();
    assert!(error.contains("train.judge: the blob is not a classifier checkpoint (no safetensors header)"), "{error}");
    // What checkpoint::save writes for the classifier (the header is all that is read).
    let safetensors = |names: &[(&str, [u32; 2])]| {
        let entries: Vec<String> = names
            .iter()
            .map(|(name, shape)| {
                format!("\"model.{name}\":{{\"dtype\":\"F32\",\"shape\":[{},{}],\"data_offsets\":[0,0]}}", shape[0], shape[1])
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes
    };
    std::fs::write(&path, safetensors(&[("encoder.fc2.weight", [4, 64])])).unwrap();
    let error = core.submit(&sweep, "judged.toml", folder(["1", "7"]), true).unwrap_err().to_string();
    assert!(error.contains("not a classifier checkpoint (no model.head.fc2.weight)"), "an autoencoder's checkpoint: {error}");
    let classifier = safetensors(&[("encoder.fc2.weight", [4, 64]), ("head.fc2.weight", [10, 256])]);
    std::fs::write(&path, &classifier).unwrap();
    let planned = core.submit(&sweep, "judged.toml", folder(["1", "7"]), true).unwrap().planned;
    let spec = planned[0].1.config.wgan.as_ref().and_then(|w| w.judge.clone()).expect("the judge is planned");
    assert_eq!(spec.checkpoint, BlobRef { sha256: judge.clone(), size: classifier.len() as u64 });
    assert_eq!(spec.digits, [1, 7], "labels are the class folders in name order, judged as their digits");

    let error = core.submit(&sweep, "judged.toml", folder(["cats", "dogs"]), true).unwrap_err().to_string();
    assert!(error.contains("train.judge: class folder \"cats\" is not a digit"), "{error}");
}
