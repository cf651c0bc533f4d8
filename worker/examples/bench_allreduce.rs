//! Benchmark: all-reduce time of the CPU gang communicator ([`RingCommunicator`]: shared memory
//! between ranks on one host, the TCP ring otherwise), one rank per process, so that
//! `tools/bench/allreduce.py` can compare it with `torch.distributed`'s gloo backend
//! (tools/reference/allreduce_gloo.py) on the same sizes and ranks. `--tcp` forces the TCP ring
//! ([`TcpRing`]) whatever the topology, so that both paths are measured side by side. Two anchors:
//! `--memcpy` times an in-process copy of the same bytes, and `--link` times the ring's traffic
//! alone — every rank streams the bytes a ring all-reduce sends, size × 2(n−1)/n, to its successor
//! while receiving as much from its predecessor over plain TCP, with nothing reduced and no steps —
//! which bounds what any TCP ring can reach on the machine.
//!
//! Every rank is started as its own process with the same peer list; each binds its listener on
//! its own entry of `--peers`. Rank 0 (or the single `--memcpy` process) prints one JSON object on
//! stdout: `{"world": N, "path": P, "results": [{"bytes": B, "seconds": [t, …]}, …]}` with one
//! wall time per timed iteration (P: "shm" or "tcp", the path the gang took; "link", "memcpy").
//! Each size is timed `--iters` times, or more for small sizes, so that every size moves at least
//! `--budget-mib` MiB. Each all-reduce result is checked against the exact sum
//! (the data are integer-valued floats, so every partial sum is exact); a wrong sum ends the
//! process with an error.
//!
//! ```text
//! bench_allreduce --rank R --peers 127.0.0.1:P0,127.0.0.1:P1 [--secret S] [--tcp | --link]
//!                 [--sizes-mib 1,4,64] [--warmup 1] [--iters 5] [--budget-mib 64]
//! bench_allreduce --memcpy [--sizes-mib 1,4,64] [--warmup 1] [--iters 5] [--budget-mib 64]
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cohort_worker::collective::ring::{RingCommunicator, TcpRing};
use cohort_worker::collective::{Communicator, GangSettings};

/// What one invocation measures.
enum Mode {
    /// One rank of a gang: its rank, every member's address, and whether to force the TCP ring.
    Ring { rank: usize, peers: Vec<String>, secret: String, tcp: bool },
    /// One rank of the ring's traffic over plain TCP links, without the all-reduce.
    Link { rank: usize, peers: Vec<String> },
    /// An in-process copy of each size.
    Memcpy,
}

/// The parsed command line.
struct Options {
    mode: Mode,
    sizes_mib: Vec<usize>,
    warmup: usize,
    iters: usize,
    budget_mib: usize,
}

impl Options {
    /// Timed iterations for a size: `iters`, or enough to move `budget_mib` MiB.
    fn iterations(&self, mib: usize) -> usize {
        self.iters.max(self.budget_mib.div_ceil(mib.max(1)))
    }
}

fn parse_options() -> Result<Options> {
    let mut rank = None;
    let mut peers = None;
    let mut secret = "bench".to_string();
    let mut memcpy = false;
    let mut link = false;
    let mut tcp = false;
    let mut sizes_mib = vec![1, 2, 4, 8, 16, 32, 64];
    let mut warmup = 1;
    let mut iters = 5;
    let mut budget_mib = 64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--memcpy" {
            memcpy = true;
            continue;
        }
        if flag == "--link" {
            link = true;
            continue;
        }
        if flag == "--tcp" {
            tcp = true;
            continue;
        }
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rank" => rank = Some(value.parse().context("--rank")?),
            "--peers" => peers = Some(value.split(',').map(str::to_string).collect::<Vec<_>>()),
            "--secret" => secret = value,
            "--sizes-mib" => sizes_mib = value.split(',').map(|s| s.parse()).collect::<Result<_, _>>().context("--sizes-mib")?,
            "--warmup" => warmup = value.parse().context("--warmup")?,
            "--iters" => iters = value.parse().context("--iters")?,
            "--budget-mib" => budget_mib = value.parse().context("--budget-mib")?,
            other => bail!("unknown option {other}"),
        }
    }
    ensure!(iters > 0, "--iters must be at least 1");
    ensure!(sizes_mib.iter().all(|&mib| mib > 0), "sizes must be at least 1 MiB");
    if memcpy {
        return Ok(Options { mode: Mode::Memcpy, sizes_mib, warmup, iters, budget_mib });
    }
    let (Some(rank), Some(peers)) = (rank, peers) else {
        bail!("give --rank and --peers (or --memcpy)");
    };
    ensure!(peers.len() >= 2, "a ring needs at least 2 peers");
    ensure!(rank < peers.len(), "rank {rank} is not below the world size {}", peers.len());
    let mode = if link { Mode::Link { rank, peers } } else { Mode::Ring { rank, peers, secret, tcp } };
    Ok(Options { mode, sizes_mib, warmup, iters, budget_mib })
}

/// Rank `rank`'s input: integer values in −50..=50, so that sums over ranks are exact in float32.
fn rank_input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0).collect()
}

/// The exact element-wise sum of every rank's input.
fn expected_sum(world: usize, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for rank in 0..world {
        for (total, value) in sum.iter_mut().zip(rank_input(rank, len)) {
            *total += value;
        }
    }
    sum
}

/// The path the gang's collectives took, for the output.
type Path = &'static str;

/// For each size in bytes, the seconds of every timed iteration.
type Timings = Vec<(usize, Vec<f64>)>;

/// One rank's all-reduce timings: for each size, `warmup` untimed then [`Options::iterations`]
/// timed all-reduces, each preceded by a one-element all-reduce so that the ranks start together.
fn run_ring(rank: usize, peers: Vec<String>, secret: String, tcp: bool, options: &Options) -> Result<(Path, Timings)> {
    let listener = TcpListener::bind(&peers[rank]).with_context(|| format!("bind {}", peers[rank]))?;
    let world = peers.len();
    let settings = GangSettings { rank, peers, secret, timeout: Duration::from_secs(60) };
    let (path, mut ring): (Path, Box<dyn Communicator>) = if tcp {
        ("tcp", Box::new(TcpRing::connect(&listener, &settings)?))
    } else {
        let gang = RingCommunicator::connect(listener, &settings)?;
        (if gang.uses_shared_memory() { "shm" } else { "tcp" }, Box::new(gang))
    };
    let mut results = Vec::new();
    for &mib in &options.sizes_mib {
        let len = mib * (1 << 20) / std::mem::size_of::<f32>();
        let input = rank_input(rank, len);
        let expected = expected_sum(world, len);
        let mut data = input.clone();
        let mut seconds = Vec::new();
        for iteration in 0..options.warmup + options.iterations(mib) {
            data.copy_from_slice(&input);
            ring.all_reduce_sum(&mut [0.0])?;
            let started = Instant::now();
            ring.all_reduce_sum(&mut data)?;
            let elapsed = started.elapsed().as_secs_f64();
            if data != expected {
                bail!("rank {rank}: the all-reduce of {mib} MiB is not the exact sum");
            }
            if iteration >= options.warmup {
                seconds.push(elapsed);
            }
        }
        results.push((mib << 20, seconds));
    }
    Ok((path, results))
}

/// Times `copy_from_slice` of each size between two buffers (already written, so no page faults).
fn run_memcpy(options: &Options) -> Vec<(usize, Vec<f64>)> {
    let mut results = Vec::new();
    for &mib in &options.sizes_mib {
        let len = mib * (1 << 20) / std::mem::size_of::<f32>();
        let source = rank_input(0, len);
        let mut target = vec![1f32; len];
        let mut seconds = Vec::new();
        for iteration in 0..options.warmup + options.iterations(mib) {
            let started = Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
            let elapsed = started.elapsed().as_secs_f64();
            if iteration >= options.warmup {
                seconds.push(elapsed);
            }
        }
        results.push((mib << 20, seconds));
    }
    results
}

/// Plain TCP links to the successor and from the predecessor (no handshake: a benchmark on
/// loopback ports it just picked).
fn connect_links(rank: usize, peers: &[String]) -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(&peers[rank]).with_context(|| format!("bind {}", peers[rank]))?;
    let successor = &peers[(rank + 1) % peers.len()];
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = loop {
        match TcpStream::connect(successor) {
            Ok(stream) => break stream,
            Err(error) if Instant::now() >= deadline => return Err(error).with_context(|| format!("connect {successor}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let (prev, _) = listener.accept().context("accept the predecessor")?;
    next.set_nodelay(true)?;
    prev.set_nodelay(true)?;
    Ok((next, prev))
}

/// One rank's timings of the ring's traffic alone: for each size, stream size × 2(n−1)/n bytes
/// to the successor while receiving as much from the predecessor, after a one-byte token pass.
fn run_link(rank: usize, peers: &[String], options: &Options) -> Result<Vec<(usize, Vec<f64>)>> {
    let world = peers.len();
    let (mut next, mut prev) = connect_links(rank, peers)?;
    let mut results = Vec::new();
    for &mib in &options.sizes_mib {
        let total = (mib << 20) * 2 * (world - 1) / world;
        let outgoing = vec![1u8; total];
        let mut incoming = vec![0u8; total];
        let mut seconds = Vec::new();
        for iteration in 0..options.warmup + options.iterations(mib) {
            let mut token = [0u8];
            next.write_all(&token)?;
            prev.read_exact(&mut token)?;
            let started = Instant::now();
            std::thread::scope(|scope| -> Result<()> {
                let sending = scope.spawn(|| next.write_all(&outgoing));
                prev.read_exact(&mut incoming)?;
                sending.join().expect("send thread")?;
                Ok(())
            })?;
            let elapsed = started.elapsed().as_secs_f64();
            if iteration >= options.warmup {
                seconds.push(elapsed);
            }
        }
        results.push((mib << 20, seconds));
    }
    Ok(results)
}

/// The result object without a JSON dependency.
fn to_json(world: usize, path: Path, results: &[(usize, Vec<f64>)]) -> String {
    let entries: Vec<String> = results
        .iter()
        .map(|(bytes, seconds)| {
            let times: Vec<String> = seconds.iter().map(|s| format!("{s:.9}")).collect();
            format!("{{\"bytes\": {bytes}, \"seconds\": [{}]}}", times.join(", "))
        })
        .collect();
    format!("{{\"world\": {world}, \"path\": \"{path}\", \"results\": [{}]}}", entries.join(", "))
}

fn main() -> Result<()> {
    let options = parse_options()?;
    match &options.mode {
        Mode::Memcpy => println!("{}", to_json(1, "memcpy", &run_memcpy(&options))),
        Mode::Ring { rank, peers, secret, tcp } => {
            let (path, results) = run_ring(*rank, peers.clone(), secret.clone(), *tcp, &options)?;
            if *rank == 0 {
                println!("{}", to_json(peers.len(), path, &results));
            }
        }
        Mode::Link { rank, peers } => {
            let results = run_link(*rank, peers, &options)?;
            if *rank == 0 {
                println!("{}", to_json(peers.len(), "link", &results));
            }
        }
    }
    Ok(())
}
