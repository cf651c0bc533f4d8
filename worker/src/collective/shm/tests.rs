//! The shared-memory group's tests: exact, bitwise identical sums and broadcasts for every group
//! size and for data shorter, longer and not a multiple of a buffer; silent, dead and failing
//! peers; and the checks on a segment before it is mapped.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

/// A group of `size` ranks in this process with buffers of `piece` floats; the segment is
/// unlinked, as after a gang's setup.
fn group(size: usize, piece: usize) -> Vec<ShmGroup> {
    let dir = Path::new(SHM_DIR);
    let name = file_name(&random_name().unwrap());
    let len = segment_len(size, piece);
    let mut segments = vec![Segment::create(dir, &name, len).unwrap()];
    segments.extend((1..size).map(|_| Segment::open(dir, &name, len).unwrap()));
    segments[0].unlink();
    assert!(!dir.join(&name).exists(), "unlinked once every member has mapped it");
    let ranks: Vec<usize> = (0..size).map(|local| 10 + local).collect();
    segments.into_iter().enumerate().map(|(local, s)| ShmGroup::new(s, local, ranks.clone(), piece, Duration::from_secs(30))).collect()
}

fn input(rank: usize, len: usize, call: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 13 + call) % 101) as f32 - 50.0).collect()
}

/// Runs `work` on every member of `members` on its own thread and returns their results.
fn on_every_member<T: Send>(members: Vec<ShmGroup>, work: impl Fn(&mut ShmGroup) -> T + Sync) -> Vec<T> {
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = members.into_iter().map(|mut member| scope.spawn(move || work(&mut member))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_is_the_exact_sum_on_every_member() {
    let piece = 10;
    let lengths = [0, 1, 3, 7, piece - 1, piece, piece + 1, 4 * piece + 3, 97];
    for size in 1..=4 {
        // One group for every call in turn: the alternating buffers must never leak values.
        let outputs = on_every_member(group(size, piece), |member| {
            lengths
                .iter()
                .enumerate()
                .map(|(call, &len)| {
                    let mut data = input(member.local_rank, len, call);
                    member.all_reduce_sum(&mut data, true).unwrap();
                    data
                })
                .collect::<Vec<_>>()
        });
        for (call, &len) in lengths.iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..size).map(|rank| input(rank, len, call)).collect();
            let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|values| values[i]).sum()).collect();
            for (rank, output) in outputs.iter().enumerate() {
                assert_eq!(output[call], expected, "size {size}, len {len}, rank {rank}");
                assert_eq!(bytemuck::cast_slice::<f32, u8>(&output[call]), bytemuck::cast_slice::<f32, u8>(&outputs[0][call]));
            }
        }
    }
}

#[test]
fn sums_are_bitwise_identical_with_inexact_values() {
    // Values whose sums round: every member must still end with the same bits.
    let (size, len) = (3, 1001);
    let outputs = on_every_member(group(size, 64), |member| {
        let mut data: Vec<f32> = (0..len).map(|i| ((i + 1) as f32).sqrt() * (member.local_rank as f32 + 0.1).ln()).collect();
        member.all_reduce_sum(&mut data, true).unwrap();
        data
    });
    for output in &outputs {
        assert_eq!(bytemuck::cast_slice::<f32, u8>(output), bytemuck::cast_slice::<f32, u8>(&outputs[0]));
    }
}

#[test]
fn a_reduce_for_the_leader_alone_gives_it_the_sum() {
    let (size, len) = (3, 25);
    let outputs = on_every_member(group(size, 8), |member| {
        let mut data = input(member.local_rank, len, 0);
        member.all_reduce_sum(&mut data, false).unwrap();
        // And the group stays in step for a broadcast after it.
        member.broadcast(&mut data, 0).unwrap();
        data
    });
    let inputs: Vec<Vec<f32>> = (0..size).map(|rank| input(rank, len, 0)).collect();
    let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|values| values[i]).sum()).collect();
    assert!(outputs.iter().all(|output| *output == expected));
}

#[test]
fn broadcast_copies_the_roots_data_everywhere() {
    for (size, root, len) in [(2, 1, 5), (3, 0, 31), (4, 2, 0), (4, 3, 17)] {
        let outputs = on_every_member(group(size, 8), |member| {
            let mut data = input(member.local_rank, len, 1);
            member.broadcast(&mut data, root).unwrap();
            data
        });
        assert!(outputs.iter().all(|output| *output == input(root, len, 1)), "size {size}, root {root}");
    }
}

#[test]
fn a_silent_member_fails_the_collective_within_the_timeout() {
    let mut members = group(3, 8);
    let _silent = members.pop().unwrap();
    let started = Instant::now();
    let errors = on_every_member(members, |member| {
        member.set_timeout(Duration::from_millis(300));
        member.all_reduce_sum(&mut [1.0; 20], true).unwrap_err()
    });
    for error in errors {
        // The silent member's gang rank (local 2), or a member that failed on it first.
        assert!(matches!(error, CollectiveError::Peer { peer: 10..=12, .. }), "{error}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn a_dead_member_fails_the_collective_and_poisons_the_group() {
    let mut members = group(2, 8);
    drop(members.pop()); // Unmapped, as when its process dies.
    let mut member = members.pop().unwrap();
    member.set_timeout(Duration::from_millis(200));
    let error = member.broadcast(&mut [1.0; 3], 0).unwrap_err();
    assert!(matches!(error, CollectiveError::Peer { peer: 11, .. }), "{error}");
    // Its state is unknown now: later calls fail at once.
    let started = Instant::now();
    assert!(member.all_reduce_sum(&mut [1.0; 3], true).is_err());
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_failing_member_ends_its_peers_waits_at_once() {
    let mut members = group(2, 8);
    let mut failing = members.pop().unwrap();
    let mut waiting = members.pop().unwrap();
    std::thread::scope(|scope| {
        let started = Instant::now();
        let wait = scope.spawn(move || waiting.all_reduce_sum(&mut [1.0; 4], true).unwrap_err());
        std::thread::sleep(Duration::from_millis(50));
        failing.abort();
        let error = wait.join().unwrap();
        assert!(matches!(error, CollectiveError::Peer { peer: 11, .. }), "{error}");
        // The timeout is 30 s: the abort, not the timeout, ended the wait.
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    });
}

#[test]
fn a_segment_is_private_and_opened_only_as_created() {
    let dir = tempfile::tempdir().unwrap();
    let len = segment_len(2, 4);
    let segment = Segment::create(dir.path(), "s", len).unwrap();
    let mode = std::fs::metadata(dir.path().join("s")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never created twice under one name, never opened at another size.
    assert!(Segment::create(dir.path(), "s", len).is_err());
    assert!(Segment::open(dir.path(), "s", len + 4096).is_err());
    // Readable by others: refused.
    std::fs::set_permissions(dir.path().join("s"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Segment::open(dir.path(), "s", len).is_err());
    // A link to it: refused (O_NOFOLLOW).
    std::fs::set_permissions(dir.path().join("s"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(dir.path().join("s"), dir.path().join("link")).unwrap();
    assert!(Segment::open(dir.path(), "link", len).is_err());
    assert!(Segment::open(dir.path(), "s", len).is_ok());
    drop(segment);
    assert!(!dir.path().join("s").exists(), "the creator unlinks it at the latest when it drops it");
}

#[test]
fn names_are_fresh_random_bytes() {
    let (a, b) = (random_name().unwrap(), random_name().unwrap());
    assert_ne!(a, b);
    assert_eq!(file_name(&a).len(), "cohort-collective-".len() + 2 * NAME_BYTES);
}

/// A leader killed during a gang's setup leaves its segment behind, unlocked (the kernel drops a
/// dead process's locks); the next leader's sweep removes it, and nothing else: not a live
/// leader's segment (locked), not a file just created (young), not a file named otherwise.
#[test]
fn a_dead_leaders_segment_is_swept_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let aged = |name: &str| {
        let file = std::fs::File::options().write(true).open(dir.path().join(name)).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
    };
    let orphan = file_name(&random_name().unwrap());
    std::fs::write(dir.path().join(&orphan), vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(dir.path().join(&orphan), std::fs::Permissions::from_mode(0o600)).unwrap();
    aged(&orphan);
    let live_name = file_name(&random_name().unwrap());
    let live = Segment::create(dir.path(), &live_name, 4096).unwrap();
    aged(&live_name);
    let young = file_name(&random_name().unwrap());
    std::fs::write(dir.path().join(&young), b"").unwrap();
    std::fs::write(dir.path().join("unrelated"), b"").unwrap();
    aged("unrelated");

    assert_eq!(sweep_orphans(dir.path()), 1);
    assert!(!dir.path().join(&orphan).exists(), "the dead leader's segment is gone");
    assert!(dir.path().join(&live_name).exists(), "a live leader's segment stays");
    assert!(dir.path().join(&young).exists() && dir.path().join("unrelated").exists());
    assert!(Segment::open(dir.path(), &live_name, 4096).is_ok(), "and still maps");
    drop(live);
    assert!(!dir.path().join(&live_name).exists());
    assert_eq!(sweep_orphans(Path::new("/nonexistent-cohort-dir")), 0);
}

/// The lock really is the process's: a child that creates a segment and is killed before it can
/// unlink leaves a file whose lock is free, which the sweep then removes.
#[test]
fn a_killed_creator_leaves_its_segment_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let name = file_name(&random_name().unwrap());
    let path = dir.path().join(&name);
    // A shell holding an exclusive flock on the file, as a leader does, then killed.
    let script = format!("exec 9>'{}'; flock -x 9; echo locked; exec sleep 60", path.display());
    let mut child = std::process::Command::new("sh").args(["-c", &script]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    assert_eq!(sweep_orphans(dir.path()), 0, "held by a live process");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(sweep_orphans(dir.path()), 1, "free once it died");
    assert!(!path.exists());
}
