//! The GPU check (`tools/gpu-check.sh`): on a machine with a CUDA GPU, exercises the NCCL
//! backend and the WGAN-GP step on CUDA and prints PASS/FAIL lines with figures. On a machine
//! without one it says so and checks only that NCCL loads.

use std::time::{Duration, Instant};

use cohort_worker::collective::nccl::{self, NcclCommunicator};
use cohort_worker::collective::ring::local_ring;
use cohort_worker::collective::Communicator;
use cohort_worker::train::data_parallel::Shard;
use cohort_worker::train::wgan::Gan;
use tch::{Device, Kind, Tensor};

fn report(name: &str, outcome: Result<String, String>) -> bool {
    match outcome {
        Ok(figures) => {
            println!("PASS {name}: {figures}");
            true
        }
        Err(why) => {
            println!("FAIL {name}: {why}");
            false
        }
    }
}

/// `ranks` NCCL communicators on cuda:0, one thread each, all-reducing `floats` values.
fn nccl_all_reduce(ranks: usize, floats: i64) -> Result<String, String> {
    let id = nccl::unique_id().map_err(|e| e.to_string())?;
    let results: Vec<Result<(f64, f64), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let id = id.clone();
                scope.spawn(move || -> Result<(f64, f64), String> {
                    let device = Device::Cuda(0);
                    let mut comm = NcclCommunicator::new(rank, ranks, &id, device).map_err(|e| e.to_string())?;
                    let mut data = Tensor::full([floats], (rank + 1) as f64, (Kind::Float, device));
                    comm.all_reduce_sum_tensor(&mut data).map_err(|e| e.to_string())?;
                    let _ = data.sum(Kind::Double).double_value(&[]); // synchronizes
                    let started = Instant::now();
                    let rounds = 10;
                    for _ in 0..rounds {
                        comm.all_reduce_sum_tensor(&mut data).map_err(|e| e.to_string())?;
                    }
                    let _ = data.sum(Kind::Double).double_value(&[]);
                    let seconds = started.elapsed().as_secs_f64() / f64::from(rounds);
                    let mut check = Tensor::full([floats], (rank + 1) as f64, (Kind::Float, device));
                    comm.all_reduce_sum_tensor(&mut check).map_err(|e| e.to_string())?;
                    let expected = (ranks * (ranks + 1) / 2) as f64;
                    let max_error = (check - expected).abs().max().double_value(&[]);
                    Ok((seconds, max_error))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into()))).collect()
    });
    let mut figures = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        let (seconds, max_error) = result?;
        if max_error != 0.0 {
            return Err(format!("rank {rank}: wrong sum (max error {max_error})"));
        }
        let bytes = floats as f64 * 4.0;
        let bus = bytes / seconds * 2.0 * (ranks as f64 - 1.0).max(1.0) / ranks as f64 / 1e9;
        figures.push(format!("rank {rank} {:.3} ms, bus {bus:.1} GB/s", seconds * 1e3));
    }
    Ok(format!("{ranks} rank(s), {} MiB: {}", (floats * 4) >> 20, figures.join("; ")))
}

fn wgan_step_on_cuda() -> Result<String, String> {
    tch::manual_seed(0);
    let device = Device::Cuda(0);
    let mut gan = Gan::new([1024, 512, 256, 128], 1e-4, (0.0, 0.9), device);
    let batch = 64;
    let real = Tensor::rand([batch, 1, 64, 64], (Kind::Float, device)) * 2.0 - 1.0;
    let mut critic_ms = Vec::new();
    let mut generator_ms = Vec::new();
    for _ in 0..6 {
        let noise = gan.noise(batch);
        let epsilon = Tensor::rand([batch], (Kind::Float, device));
        let started = Instant::now();
        let (loss, _, penalty) = gan.critic_gradients(&real, &noise, &epsilon, 10.0, Shard::SOLE, None).map_err(|e| e.to_string())?;
        critic_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if !loss.is_finite() || !penalty.is_finite() {
            return Err(format!("critic loss {loss}, penalty {penalty}"));
        }
        let started = Instant::now();
        let g = gan.generator_gradients(&gan.noise(batch), Shard::SOLE, None).map_err(|e| e.to_string())?;
        generator_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if !g.is_finite() {
            return Err(format!("generator loss {g}"));
        }
    }
    // The first iterations include CUDA/cuDNN warm-up: report the last.
    Ok(format!(
        "seed widths, batch {batch}: critic step (with double backward) {:.1} ms, generator step {:.1} ms ({:.0} images/s through the critic)",
        critic_ms[5],
        generator_ms[5],
        batch as f64 / (critic_ms[5] / 1e3)
    ))
}

fn main() {
    let mut ok = true;
    ok &= report("nccl library", nccl::version().map(|v| format!("NCCL {v} loaded from the torch wheel")).map_err(|e| e.to_string()));
    ok &= report("ring all-reduce (4 ranks, loopback)", ring_check());
    if !tch::Cuda::is_available() {
        println!("SKIP cuda: libtorch sees no CUDA device; the NCCL path is verified only up to loading the library");
        std::process::exit(if ok { 0 } else { 1 });
    }
    println!("cuda: {} device(s), cudnn {}", tch::Cuda::device_count(), tch::Cuda::cudnn_is_available());
    ok &= report("nccl all-reduce, 1 rank on cuda:0", nccl_all_reduce(1, 16 << 20));
    // NCCL refuses two ranks of one communicator on the same GPU on recent versions: report
    // which, without failing the check for it.
    match nccl_all_reduce(2, 16 << 20) {
        Ok(figures) => println!("PASS nccl all-reduce, 2 ranks on cuda:0: {figures}"),
        Err(why) => println!("NOTE nccl all-reduce, 2 ranks on cuda:0 refused by NCCL (one GPU per rank is required): {why}"),
    }
    ok &= report("wgan-gp step on cuda:0", wgan_step_on_cuda());
    println!("{}", if ok { "gpu-check: PASS" } else { "gpu-check: FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}

fn ring_check() -> Result<String, String> {
    let ring = local_ring(4, "gpu-check", Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let sums: Vec<f32> = std::thread::scope(|scope| {
        let handles: Vec<_> = ring
            .into_iter()
            .map(|mut member| {
                scope.spawn(move || {
                    let mut data = vec![member.rank() as f32 + 1.0; 1 << 20];
                    member.all_reduce_sum(&mut data).map(|_| data[12345]).unwrap_or(f32::NAN)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(f32::NAN)).collect()
    });
    if sums.iter().all(|&s| s == 10.0) {
        Ok("4 MiB summed exactly on every rank".into())
    } else {
        Err(format!("sums {sums:?}"))
    }
}
