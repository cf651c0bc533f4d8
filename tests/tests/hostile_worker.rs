//! A hostile or buggy worker against the real binaries: a gRPC client holding a valid worker
//! token replays each attack of the trust-boundaries review. Each is refused with a clear error,
//! the honest trials' results are stored exactly once, and the sweep ends as it would have
//! without the attack. (The gzip bomb is in `bad_input.rs`, as a sweep file.)

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_cluster_tests::{mnist_sample, temp_dir, Cluster};
use cohort_proto::auth::{BearerToken, ConnectOptions};
use cohort_proto::lease::UploadLease;
use cohort_proto::v1 as pb;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// A process that holds the worker token and lies.
struct Attacker {
    client: Client,
    worker_id: String,
    session: String,
}

impl Attacker {
    async fn connect(cluster: &Cluster) -> Client {
        let options = ConnectOptions { url: cluster.url(), token_file: Some(cluster.worker_token()), tls_ca: None };
        let (channel, token) = options.lazy_channel().expect("channel");
        WorkerServiceClient::with_interceptor(channel, token)
    }

    async fn register(cluster: &Cluster, running: Vec<pb::RunningTask>) -> (Self, Vec<String>) {
        let mut client = Self::connect(cluster).await;
        let request = pb::RegisterRequest { name: "evil".into(), device: "cpu".into(), running, allow_commands: false };
        let response = client.register(request).await.expect("register").into_inner();
        (Self { client, worker_id: response.worker_id, session: response.session }, response.abandon)
    }

    /// Acquires a real lease of its own.
    async fn acquire(&mut self) -> pb::TaskSpec {
        for _ in 0..50 {
            let request = pb::AcquireTaskRequest { worker_id: self.worker_id.clone(), wait_ms: 2000, session: self.session.clone() };
            if let Some(task) = self.client.acquire_task(request).await.expect("acquire").into_inner().task {
                return task;
            }
        }
        panic!("no task to acquire");
    }
}

fn epochs(range: std::ops::RangeInclusive<u32>, name: &str, value: f64) -> Vec<pb::EpochMetrics> {
    range
        .map(|epoch| pb::EpochMetrics { epoch, values: [(name.to_string(), value)].into(), seconds: 1.0, samples: 10, attempt: 0 })
        .collect()
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{:?} lacks {needle:?}", status.message());
}

fn sweep(name: &str, folds: u32, epochs: u32, train_limit: u32) -> String {
    format!(
        "name = \"{name}\"\nseed = 5\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = {train_limit}\ntest_limit = 100\n\
         [model]\nkind = \"dae\"\n[cv]\nfolds = {folds}\nepochs = {epochs}\nbatch_size = 32\ncheckpoint_every = 1\n",
        mnist_sample()
    )
}

fn results(cluster: &Cluster, sweep_id: &str) -> Value {
    serde_json::from_str(&cluster.client_ok(&["results", sweep_id, "--format", "json"])).unwrap()
}

/// Every trial succeeded with exactly one honest result per planned epoch (no NaN, no forged
/// 1e-6), and the sweep succeeded.
fn assert_honest_and_complete(results: &Value) {
    assert_eq!(results["state"], "succeeded", "{results}");
    for trial in results["trials"].as_array().unwrap() {
        assert_eq!(trial["state"], "succeeded", "{trial}");
        let planned = trial["planned_epochs"].as_u64().unwrap();
        let epochs: Vec<u64> = trial["epochs"].as_array().unwrap().iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
        assert_eq!(epochs, (1..=planned).collect::<Vec<_>>(), "exactly one result per epoch: {trial}");
        for epoch in trial["epochs"].as_array().unwrap() {
            for (name, value) in epoch["values"].as_object().unwrap() {
                let value = value.as_f64().unwrap_or(f64::NAN);
                assert!(value.is_finite() && value != 1e-6, "{name} = {value} was not the honest worker's: {trial}");
            }
        }
    }
}

/// Naming another worker's task (ids are guessable) gives nothing: re-registering with it, and
/// reporting, logging, uploading, attaching, joining, completing or failing under it are all
/// refused, as are heartbeat and acquire under another worker's id; the honest worker keeps
/// its lease and its results are the ones stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_token_cannot_touch_another_workers_trial() {
    let mut cluster = Cluster::start();
    let sweep_id = cluster.submit("hijack.toml", &sweep("hijack", 2, 3, 2000));
    cluster.add_worker("honest");
    let running =
        cluster.wait_for(&sweep_id, Duration::from_secs(120), |r| r["trials"].as_array().unwrap().iter().any(|t| t["state"] == "running"));
    let victim = running["trials"].as_array().unwrap().iter().find(|t| t["state"] == "running").unwrap().clone();
    let task_id = victim["task_id"].as_str().unwrap().to_string();
    let honest_id = victim["worker"].as_str().unwrap().to_string();

    // Hijack by re-registering with the victim's task, guessing its secret.
    let claim = pb::RunningTask { task_id: task_id.clone(), attempt: 1, rank: 0, lease_secret: "0".repeat(32) };
    let (mut attacker, abandon) = Attacker::register(&cluster, vec![claim]).await;
    assert_eq!(abandon, vec![task_id.clone()], "the impostor is told to drop the task it claimed");

    // Everything that acts on the task, under the attacker's id and under the honest one's.
    for worker_id in [attacker.worker_id.clone(), honest_id.clone()] {
        let secret = "f".repeat(32);
        let report = pb::ReportMetricsRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            epochs: epochs(1..=3, "test_mse", 1e-6),
            lease_secret: secret.clone(),
        };
        refused(attacker.client.report_metrics(report).await, Code::PermissionDenied, "lease secret does not match");
        let logs = pb::AppendLogsRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            lines: vec![pb::LogLine { unix_ms: 0, level: "INFO".into(), message: "forged".into() }],
            lease_secret: secret.clone(),
        };
        refused(attacker.client.append_logs(logs).await, Code::PermissionDenied, "lease secret");
        let blob = Some(pb::BlobRef { sha256: "a".repeat(64), size: 1 });
        let attach = pb::AttachCheckpointRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            epoch: 3,
            blob: blob.clone(),
            is_final: true,
            lease_secret: secret.clone(),
        };
        refused(attacker.client.attach_checkpoint(attach).await, Code::PermissionDenied, "lease secret");
        let artifact = pb::AttachArtifactRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            name: "latents".into(),
            epoch: 3,
            blob,
            lease_secret: secret.clone(),
        };
        refused(attacker.client.attach_artifact(artifact).await, Code::PermissionDenied, "lease secret");
        let join = pb::RendezvousRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            rank: 0,
            address: "127.0.0.1:1".into(),
            wait_ms: 0,
            nccl_id: vec![],
            lease_secret: secret.clone(),
        };
        refused(attacker.client.rendezvous(join).await, Code::PermissionDenied, "lease secret");
        let lease = UploadLease { worker_id: worker_id.clone(), task_id: task_id.clone(), attempt: 1, secret: secret.clone() };
        let chunk = pb::BlobChunk { sha256: "b".repeat(64), size: 3, data: b"abc".to_vec().into(), crc32: None };
        let mut upload = tonic::Request::new(tokio_stream::iter(vec![chunk]));
        lease.attach(upload.metadata_mut()).unwrap();
        refused(attacker.client.upload_blob(upload).await, Code::PermissionDenied, "lease secret");
        let complete =
            pb::CompleteTaskRequest { worker_id: worker_id.clone(), task_id: task_id.clone(), attempt: 1, lease_secret: secret.clone() };
        refused(attacker.client.complete_task(complete).await, Code::PermissionDenied, "lease secret");
        let fail = pb::FailTaskRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            kind: pb::FailureKind::User as i32,
            error: "forged".into(),
            lease_secret: secret,
        };
        refused(attacker.client.fail_task(fail).await, Code::PermissionDenied, "lease secret");
    }
    // Acting as the honest worker itself needs its session.
    let heartbeat = pb::HeartbeatRequest {
        worker_id: honest_id.clone(),
        running: vec![],
        session: attacker.session.clone(),
        phase_seconds: Default::default(),
    };
    refused(attacker.client.heartbeat(heartbeat).await, Code::PermissionDenied, "wrong session");
    let acquire = pb::AcquireTaskRequest { worker_id: honest_id.clone(), wait_ms: 0, session: attacker.session.clone() };
    refused(attacker.client.acquire_task(acquire).await, Code::PermissionDenied, "wrong session");

    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = results(&cluster, &sweep_id);
    assert_honest_and_complete(&results);
    let victim = results["trials"].as_array().unwrap().iter().find(|t| t["task_id"] == task_id.as_str()).unwrap();
    assert_eq!(victim["attempts"], 1, "the honest worker never lost its lease: {victim}");
    assert!(!cluster.log("honest").contains("abandoned the task"), "the honest worker was never told to stop");
    cluster.kill("honest");
}

/// A worker holding a real lease still cannot store what the coordinator cannot use or bound:
/// NaN and ±Inf, too many values, epochs outside the plan, a blob it did not upload, log floods,
/// a stalled upload, or a second lease at once. After it gives its lease back, an honest worker
/// runs the sweep to the end as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_cannot_store_bad_or_unbounded_input() {
    let mut cluster = Cluster::start_with(&["--max-log-lines-per-trial", "20", "--upload-idle-secs", "1"]);
    let sweep_id = cluster.submit("bounds.toml", &sweep("bounds", 2, 2, 300));
    let (mut attacker, _) = Attacker::register(&cluster, vec![]).await;
    let task = attacker.acquire().await;
    let (task_id, attempt, secret) = (task.task_id.clone(), task.attempt, task.lease_secret.clone());
    assert_eq!(secret.len(), 32, "a lease secret is 128 random bits in hex");
    let report = |epochs: Vec<pb::EpochMetrics>| pb::ReportMetricsRequest {
        worker_id: attacker.worker_id.clone(),
        task_id: task_id.clone(),
        attempt,
        epochs,
        lease_secret: secret.clone(),
    };

    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        refused(
            attacker.client.report_metrics(report(epochs(1..=1, "val_mse", bad))).await,
            Code::InvalidArgument,
            "metric val_mse of epoch 1",
        );
    }
    let wide: std::collections::HashMap<String, f64> = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
    let wide = vec![pb::EpochMetrics { epoch: 1, values: wide, seconds: 1.0, samples: 1, attempt: 0 }];
    refused(attacker.client.report_metrics(report(wide)).await, Code::ResourceExhausted, "--max-values-per-epoch");
    let long_name = vec![pb::EpochMetrics { epoch: 1, values: [("x".repeat(200_000), 1.0)].into(), seconds: 1.0, samples: 1, attempt: 0 }];
    refused(attacker.client.report_metrics(report(long_name)).await, Code::InvalidArgument, "a metric name has 1 to 256 bytes");
    refused(
        attacker.client.report_metrics(report(epochs(3..=3, "val_mse", 0.5))).await,
        Code::InvalidArgument,
        "outside the trial's plan of epochs 1 to 2",
    );
    refused(attacker.client.report_metrics(report(epochs(0..=0, "val_mse", 0.5))).await, Code::InvalidArgument, "outside the trial's plan");

    // A blob it did not upload (a dataset file, by its hash), and an epoch not yet reported.
    let trial = cohort_proto::task::TrialSpec::from_wire(&task).unwrap();
    let foreign = Some(pb::BlobRef::from(trial.dataset.files[0].1.clone()));
    let attach = |epoch: u32, blob: Option<pb::BlobRef>| pb::AttachCheckpointRequest {
        worker_id: attacker.worker_id.clone(),
        task_id: task_id.clone(),
        attempt,
        epoch,
        blob,
        is_final: false,
        lease_secret: secret.clone(),
    };
    refused(attacker.client.attach_checkpoint(attach(1, foreign.clone())).await, Code::InvalidArgument, "not uploaded under this lease");

    // Log lines: the level is cut, and the trial keeps at most 20 lines.
    let line = |level: &str| pb::LogLine { unix_ms: 0, level: level.into(), message: "spam".into() };
    let logs = |lines: Vec<pb::LogLine>| pb::AppendLogsRequest {
        worker_id: attacker.worker_id.clone(),
        task_id: task_id.clone(),
        attempt,
        lines,
        lease_secret: secret.clone(),
    };
    attacker.client.append_logs(logs(vec![line(&"L".repeat(100_000))])).await.expect("a long level is cut, not refused");
    refused(attacker.client.append_logs(logs(vec![line("INFO"); 20])).await, Code::ResourceExhausted, "--max-log-lines-per-trial");

    // An upload that stalls after its first chunk is dropped.
    let lease = UploadLease { worker_id: attacker.worker_id.clone(), task_id: task_id.clone(), attempt, secret: secret.clone() };
    let first = pb::BlobChunk { sha256: "c".repeat(64), size: 1 << 20, data: vec![0u8; 1024].into(), crc32: None };
    let stalled = tokio_stream::StreamExt::chain(tokio_stream::iter(vec![first]), tokio_stream::pending());
    let mut upload = tonic::Request::new(stalled);
    lease.attach(upload.metadata_mut()).unwrap();
    let started = Instant::now();
    refused(attacker.client.upload_blob(upload).await, Code::DeadlineExceeded, "");
    assert!(started.elapsed() < Duration::from_secs(20), "dropped after the 1 s idle limit, not held open");

    // Hoarding: asking for a second lease gives up the first.
    let second = attacker.acquire().await;
    let stale =
        pb::CompleteTaskRequest { worker_id: attacker.worker_id.clone(), task_id: task_id.clone(), attempt, lease_secret: secret.clone() };
    refused(attacker.client.complete_task(stale).await, Code::FailedPrecondition, "not leased to this worker");
    let give_back = pb::FailTaskRequest {
        worker_id: attacker.worker_id.clone(),
        task_id: second.task_id.clone(),
        attempt: second.attempt,
        kind: pb::FailureKind::Infrastructure as i32,
        error: "giving it back".into(),
        lease_secret: second.lease_secret.clone(),
    };
    attacker.client.fail_task(give_back).await.expect("the holder may give its lease back");

    cluster.add_worker("honest");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    assert_honest_and_complete(&results(&cluster, &sweep_id));
    let logs = cluster.client_ok(&["logs", &sweep_id]);
    assert!(!logs.contains(&"L".repeat(17)), "the level was cut to 16 bytes");
}

/// Fake registrations beyond the rate limit are refused, not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_beyond_the_rate_limit_are_refused() {
    let cluster = Cluster::start_with(&["--registrations-per-minute", "10"]);
    let mut client = Attacker::connect(&cluster).await;
    let mut accepted = 0;
    let mut refusals = Vec::new();
    for _ in 0..30 {
        match client
            .register(pb::RegisterRequest { name: "flood".into(), device: "cpu".into(), running: vec![], allow_commands: false })
            .await
        {
            Ok(_) => accepted += 1,
            Err(status) => refusals.push(status),
        }
    }
    assert!((10..=11).contains(&accepted), "{accepted} of 30 registrations accepted");
    assert!(
        refusals.iter().all(|s| s.code() == Code::ResourceExhausted && s.message().contains("--registrations-per-minute")),
        "{refusals:?}"
    );
    let workers = cluster.client_ok(&["workers"]);
    assert!(workers.lines().filter(|l| l.contains("flood")).count() <= 11, "{workers}");
}

/// A stranger hammering a gang member's collective port while the gang forms (connecting,
/// sending garbage or a wrong secret, or holding connections open) does not keep the gang from
/// forming and training.
#[test]
fn a_gang_forms_while_a_stranger_hammers_its_ports() {
    let mut cluster = Cluster::start();
    let ports = [cohort_cluster_tests::free_address().port(), cohort_cluster_tests::free_address().port()];
    cluster.add_worker_with("g0", &["--collective-port", &ports[0].to_string()]);
    cluster.add_worker_with("g1", &["--collective-port", &ports[1].to_string()]);
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hammer = {
        let (stop, connections) = (stop.clone(), connections.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for port in ports {
                    if let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(50)) {
                        connections.fetch_add(1, Ordering::SeqCst);
                        match round % 3 {
                            0 => drop(stream.write_all(b"GET / HTTP/1.1\r\n\r\n")),
                            1 => drop(stream.write_all(b"COHORT02\x00\x00\x00\x05wrong\x00\x00\x00\x00")),
                            _ if held.len() < 40 => held.push(stream),
                            _ => {}
                        }
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let text = format!(
        "name = \"gang\"\nseed = 4\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 64\ntest_limit = 30\n\
         [model]\nkind = \"dae\"\nlatent = 3\n[final]\nepochs = 2\nlr = 3e-3\nbatch_size = 16\n[distributed]\nreplicas = 2\nbackend = \"ring\"\n",
        mnist_sample()
    );
    let sweep_id = cluster.submit("gang.toml", &text);
    let outcome = cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]);
    stop.store(true, Ordering::SeqCst);
    hammer.join().unwrap();
    assert_eq!(outcome.trim(), "succeeded");
    assert!(connections.load(Ordering::SeqCst) > 20, "the stranger did reach the ports");
    assert_honest_and_complete(&results(&cluster, &sweep_id));
}

/// The coordinator's data dir on a small filesystem that fills up mid-sweep: writes fail, the
/// coordinator refuses work and says why (UNAVAILABLE) instead of serving from a state its
/// database lacks; once space is freed it resumes, and the sweep ends with every result once.
///
/// The filesystem is a tmpfs mounted in a user and mount namespace of the coordinator's own
/// (`unshare`), which needs no root; a control loop inside it fills and frees the disk when the
/// test asks.
#[test]
fn a_full_disk_stops_work_until_space_returns() {
    let dir = temp_dir();
    let control = dir.path().join("control");
    std::fs::create_dir_all(&control).unwrap();
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).unwrap();
    let script = format!(
        r#"mount -t tmpfs -o size=48m tmpfs '{data}' || exit 97
coordinator=$$
(while kill -0 $coordinator 2>/dev/null; do
  if [ -f '{control}/fill' ]; then dd if=/dev/zero of='{data}/filler' bs=64k 2>/dev/null; rm -f '{control}/fill'; touch '{control}/filled'; fi
  if [ -f '{control}/free' ]; then rm -f '{data}/filler'; rm -f '{control}/free'; touch '{control}/freed'; fi
  sleep 0.1
done) &
exec "$@""#,
        data = data.display(),
        control = control.display()
    );
    let launcher = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script.as_str(), "sh"];
    let mut cluster = Cluster::start_launched(dir, &launcher, &["--min-free-mib", "1", "--lease-secs", "5"]);
    let ask = |what: &str, done: &str| {
        std::fs::write(control.join(what), "").unwrap();
        let started = Instant::now();
        while !control.join(done).exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "the control loop did not {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let sweep_text = sweep("full", 2, 4, 1000);
    let sweep_id = cluster.submit("full.toml", &sweep_text);
    cluster.add_worker("honest");
    cluster.wait_for(&sweep_id, Duration::from_secs(120), |r| {
        r["trials"].as_array().unwrap().iter().any(|t| !t["epochs"].as_array().unwrap().is_empty())
    });

    ask("fill", "filled");
    // A submission whose 4 MB source cannot fit is refused whole, and from then on every
    // change is refused, saying why.
    let big = cluster.dir.path().join("big.toml");
    std::fs::write(&big, format!("{sweep_text}# {}\n", "x".repeat(4 << 20))).unwrap();
    let output = cluster.client(&["submit", &big.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success() && stderr.contains("cannot write its database"), "{stderr}");
    let output = cluster.client(&["submit", &cluster.dir.path().join("full.toml").to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success() && stderr.contains("cannot write its database"), "a small change is refused too: {stderr}");
    // Reads still answer, from what the database holds.
    let held = results(&cluster, &sweep_id);
    assert_eq!(held["state"], "running");
    std::thread::sleep(Duration::from_secs(3));

    ask("free", "freed");
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "300"]).trim(), "succeeded");
    let results = results(&cluster, &sweep_id);
    assert_honest_and_complete(&results);
    let log = cluster.log("coordinator");
    assert!(log.contains("database write failed") && log.contains("database writable again"), "{log}");
    let sweeps: Value = serde_json::from_str(&cluster.client_ok(&["status", "--format", "json"])).unwrap();
    assert_eq!(sweeps.as_array().unwrap().len(), 1, "no submission was half-stored while the disk was full: {sweeps}");
}
