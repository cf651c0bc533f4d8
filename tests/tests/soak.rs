//! The soak benchmark (`make soak`, not part of `make test`): 320 short trials on 4 workers while
//! a chaos loop kills a random worker every few seconds (and starts a replacement) and kills the
//! coordinator twice; at the end every trial has exactly one result. Prints its figures.

use std::time::{Duration, Instant};

use cohort_cluster_tests::{mnist_sample, Cluster};
use serde_json::Value;

const WORKERS: usize = 4;
const KILL_EVERY: Duration = Duration::from_secs(3);

#[test]
#[ignore = "a benchmark: run with `make soak`"]
fn soak_under_chaos_every_trial_has_exactly_one_result() {
    let mut cluster = Cluster::start_with(&["--lease-secs", "2"]);
    let mut next_worker = 0;
    let mut live: Vec<String> = Vec::new();
    for _ in 0..WORKERS {
        let name = format!("w{next_worker}");
        next_worker += 1;
        cluster.add_worker(&name);
        live.push(name);
    }
    let text = format!(
        "name = \"soak\"\nseed = 3\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 1024\n[model]\nkind = \"dae\"\n[cv]\nfolds = 2\nepochs = 3\nbatch_size = 32\ncheckpoint_every = 1\n[cv.random]\nsamples = 160\nlr = {{ min = 1e-4, max = 1e-2, log = true }}\n",
        mnist_sample()
    );
    let sweep_id = cluster.submit("soak.toml", &text);
    let started = Instant::now();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut worker_kills = 0;
    let mut coordinator_restarts = 0;
    let mut last_kill = Instant::now();
    loop {
        let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
        if results["state"] != "running" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "the soak did not finish in 30 minutes");
        if last_kill.elapsed() >= KILL_EVERY {
            last_kill = Instant::now();
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let victim = live.remove((rng >> 33) as usize % live.len());
            cluster.kill(&victim);
            worker_kills += 1;
            let name = format!("w{next_worker}");
            next_worker += 1;
            cluster.add_worker(&name);
            live.push(name);
            let done = results["trials"].as_array().unwrap().iter().filter(|t| t["state"] == "succeeded").count();
            let due = match coordinator_restarts {
                0 => done >= 80,
                1 => done >= 200,
                _ => false,
            };
            if due {
                cluster.restart_coordinator();
                coordinator_restarts += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = started.elapsed();
    let results: Value = serde_json::from_str(&cluster.client_ok(&["results", &sweep_id, "--format", "json"])).unwrap();
    let trials = results["trials"].as_array().unwrap();
    assert_eq!(results["state"], "succeeded");
    assert_eq!(trials.len(), 320);
    let mut attempts = 0;
    let mut retried = 0;
    for trial in trials {
        assert_eq!(trial["state"], "succeeded", "{trial}");
        let epochs: Vec<u64> = trial["epochs"].as_array().unwrap().iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
        assert_eq!(epochs, vec![1, 2, 3], "exactly one result per epoch: {trial}");
        assert!(trial["final_checkpoint"].is_string(), "{trial}");
        let tries = trial["attempts"].as_u64().unwrap();
        attempts += tries;
        retried += u64::from(tries > 1);
    }
    println!(
        "soak: {} trials on {WORKERS} workers in {:.1} s; {worker_kills} worker kills (kill -9 every {}s, each replaced), \
         {coordinator_restarts} coordinator kill -9 + restarts; {attempts} attempts in all, {retried} trials retried; \
         every trial succeeded with exactly one result per epoch",
        trials.len(),
        wall.as_secs_f64(),
        KILL_EVERY.as_secs()
    );
    assert_eq!(coordinator_restarts, 2, "the coordinator was restarted twice");
}
