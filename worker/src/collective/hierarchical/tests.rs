//! The gang communicator's tests: every topology, simulated with loopback addresses as hosts
//! (127.0.0.1 and 127.0.0.2), gives exact and bitwise identical sums and broadcasts; segments are
//! unlinked after setup; a missing shared-memory directory falls back to the TCP ring; and a
//! silent peer fails the collective instead of hanging it.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::*;
use crate::collective::ring::local_gang;

const A: &str = "127.0.0.1";
const B: &str = "127.0.0.2";

/// Floats per shared buffer in these tests: small, so that data spans many pieces.
const SMALL_PIECE: usize = 1000;

/// A gang with one rank per entry of `hosts`, shared segments in `dir`.
fn gang_in(hosts: &[&str], dir: &Path) -> Vec<RingCommunicator> {
    let never = AtomicBool::new(false);
    local_gang(hosts, "gang-secret", Duration::from_secs(30), |listener, settings| {
        RingCommunicator::connect_in(listener, settings, &never, dir, SMALL_PIECE)
    })
    .unwrap()
}

fn gang(hosts: &[&str]) -> Vec<RingCommunicator> {
    gang_in(hosts, Path::new(SHM_DIR))
}

fn input(rank: usize, len: usize, call: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 13 + call) % 101) as f32 - 50.0).collect()
}

/// The sum over `world` ranks of [`input`] (exact: integer values).
fn exact_sum(world: usize, len: usize, call: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for rank in 0..world {
        sum.iter_mut().zip(input(rank, len, call)).for_each(|(total, value)| *total += value);
    }
    sum
}

/// Runs `work` on every member on its own thread and returns their results, by rank.
fn on_every_rank<T: Send>(members: Vec<RingCommunicator>, work: impl Fn(&mut RingCommunicator) -> T + Sync) -> Vec<T> {
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = members.into_iter().map(|mut member| scope.spawn(move || work(&mut member))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// All-reduces each length in turn on one gang and checks every rank's result, bit for bit.
fn assert_exact_sums(hosts: &[&str], lengths: &[usize]) {
    let members = gang(hosts);
    let world = hosts.len();
    assert!(members.iter().all(RingCommunicator::uses_shared_memory), "{hosts:?} shares memory");
    let outputs = on_every_rank(members, |member| {
        let rank = member.rank();
        let sums: Vec<Vec<f32>> = lengths
            .iter()
            .enumerate()
            .map(|(call, &len)| {
                let mut data = input(rank, len, call);
                member.all_reduce_sum(&mut data).unwrap();
                data
            })
            .collect();
        // Broadcasts from every root, interleaved with the sums, keep the gang in step.
        let roots: Vec<Vec<f32>> = (0..world)
            .map(|root| {
                let mut data = input(rank, 2 * SMALL_PIECE + 3, 50 + root);
                member.broadcast(&mut data, root).unwrap();
                data
            })
            .collect();
        (sums, roots)
    });
    for (call, &len) in lengths.iter().enumerate() {
        let expected = exact_sum(world, len, call);
        for (rank, (sums, _)) in outputs.iter().enumerate() {
            assert_eq!(sums[call], expected, "{hosts:?}, len {len}, rank {rank}");
            assert_eq!(bytemuck::cast_slice::<f32, u8>(&sums[call]), bytemuck::cast_slice::<f32, u8>(&outputs[0].0[call]));
        }
    }
    for root in 0..world {
        for (rank, (_, roots)) in outputs.iter().enumerate() {
            assert_eq!(roots[root], input(root, 2 * SMALL_PIECE + 3, 50 + root), "{hosts:?}, broadcast from {root} on rank {rank}");
        }
    }
}

const LENGTHS: [usize; 7] = [0, 1, 7, 999, SMALL_PIECE, 3 * SMALL_PIECE + 1, 10_007];

#[test]
fn one_host_sums_exactly_through_shared_memory() {
    for world in 2..=4 {
        assert_exact_sums(&vec![A; world], &LENGTHS);
    }
}

#[test]
fn two_hosts_of_two_sum_exactly() {
    assert_exact_sums(&[A, A, B, B], &LENGTHS);
    // Ranks of a host need not be consecutive.
    assert_exact_sums(&[A, B, A, B], &LENGTHS);
}

#[test]
fn one_rank_alone_and_three_together_sum_exactly() {
    assert_exact_sums(&[A, B, B, B], &LENGTHS);
    assert_exact_sums(&[B, B, A, B], &LENGTHS);
}

#[test]
fn data_longer_than_a_hierarchical_round_sums_exactly() {
    assert_exact_sums(&[A, B, B], &[ROUND_FLOATS + SMALL_PIECE + 5]);
}

#[test]
fn ranks_all_apart_stay_on_the_tcp_ring() {
    let members = gang(&[A, B]);
    assert!(members.iter().all(|member| !member.uses_shared_memory()));
    let sums = on_every_rank(members, |member| {
        let mut data = input(member.rank(), 5, 0);
        member.all_reduce_sum(&mut data).unwrap();
        data
    });
    assert!(sums.iter().all(|sum| *sum == exact_sum(2, 5, 0)));
}

#[test]
fn the_segments_are_unlinked_once_the_gang_is_set_up() {
    for hosts in [vec![A, A, A], vec![A, A, B, B]] {
        for member in gang(&hosts) {
            let CollectivePath::Hosts(Hosts { local: Some(local), .. }) = &member.path else {
                panic!("{hosts:?}: rank {} has a shared group", member.rank());
            };
            assert!(!local.segment_path().exists(), "{}", local.segment_path().display());
            assert!(local.segment_path().starts_with(SHM_DIR));
        }
    }
}

#[test]
fn without_shared_memory_the_gang_falls_back_to_the_tcp_ring() {
    let members = gang_in(&[A, A, B], Path::new("/nonexistent/cohort-shm"));
    assert!(members.iter().all(|member| !member.uses_shared_memory()));
    let sums = on_every_rank(members, |member| {
        let mut data = input(member.rank(), 3 * SMALL_PIECE, 0);
        member.all_reduce_sum(&mut data).unwrap();
        data
    });
    assert!(sums.iter().all(|sum| *sum == exact_sum(3, 3 * SMALL_PIECE, 0)));
}

/// Gives every wait of `member` on a peer a short timeout.
fn shorten_timeouts(member: &mut RingCommunicator, timeout: Duration) {
    match &mut member.path {
        CollectivePath::Tcp(ring) => ring.set_timeout(timeout),
        CollectivePath::Hosts(hosts) => {
            if let Some(local) = hosts.local.as_mut() {
                local.set_timeout(timeout);
            }
            if let Some(across) = hosts.across.as_mut() {
                across.set_timeout(timeout);
            }
        }
    }
}

#[test]
fn a_silent_peer_fails_every_collective_within_the_timeout() {
    // One host, and two hosts where the silent rank is not its host's leader.
    for hosts in [vec![A, A, A], vec![A, A, B, B]] {
        let mut members = gang(&hosts);
        let _silent = members.pop().unwrap();
        let started = Instant::now();
        let errors = on_every_rank(members, |member| {
            shorten_timeouts(member, Duration::from_millis(300));
            member.all_reduce_sum(&mut [1.0; 10]).unwrap_err()
        });
        for error in errors {
            assert!(matches!(error, CollectiveError::Peer { .. }), "{hosts:?}: {error}");
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{hosts:?} took {:?}", started.elapsed());
    }
}
