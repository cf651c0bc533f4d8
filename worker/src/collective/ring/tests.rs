//! The TCP ring's tests: exact sums and broadcasts, and a setup that strangers cannot stall.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use super::setup::{accept_predecessor, connect_successor, handshake_bytes, read_handshake, secret_digest, MAGIC};
use super::*;

fn run_all_reduce(world: usize, len: usize) {
    let ring = local_tcp_ring(world, "s3cret", Duration::from_secs(10)).unwrap();
    // Integer-valued floats: every partial sum is exact, so the result must equal the exact sum.
    let inputs: Vec<Vec<f32>> = (0..world).map(|rank| (0..len).map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0).collect()).collect();
    let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
    let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ring
            .into_iter()
            .zip(inputs.clone())
            .map(|(mut member, mut data)| {
                scope.spawn(move || {
                    member.all_reduce_sum(&mut data).unwrap();
                    data
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, output) in outputs.iter().enumerate() {
        assert_eq!(output, &expected, "world {world}, len {len}, rank {rank}");
        assert_eq!(bytemuck::cast_slice::<f32, u8>(output), bytemuck::cast_slice::<f32, u8>(&outputs[0]), "bitwise identical");
    }
}

#[test]
fn all_reduce_is_the_exact_sum_for_every_world_and_size() {
    for world in 1..=8 {
        for len in [0, 1, 2, 7, 97, world * 3 + 1] {
            run_all_reduce(world, len);
        }
    }
    run_all_reduce(4, (3 << 20) + 5); // several MiB, not divisible by the world
}

#[test]
fn one_ring_stays_exact_across_calls_of_changing_size() {
    // Chunks of several segments with a partial last one, then smaller and larger again: the
    // scratch buffer kept between calls must never leak values from an earlier call.
    let world = 3;
    let lengths = [world * SEGMENT_FLOATS * 2 + 5, 4, SEGMENT_FLOATS + 1, 1, world * SEGMENT_FLOATS * 3 - 1];
    let ring = local_tcp_ring(world, "again", Duration::from_secs(10)).unwrap();
    std::thread::scope(|scope| {
        let handles: Vec<_> = ring
            .into_iter()
            .map(|mut member| {
                scope.spawn(move || {
                    for (call, &len) in lengths.iter().enumerate() {
                        let value = |rank: usize, i: usize| ((i * 3 + rank * 5 + call) % 61) as f32 - 30.0;
                        let mut data: Vec<f32> = (0..len).map(|i| value(member.rank(), i)).collect();
                        member.all_reduce_sum(&mut data).unwrap();
                        let expected: Vec<f32> = (0..len).map(|i| (0..world).map(|rank| value(rank, i)).sum()).collect();
                        assert_eq!(data, expected, "call {call}, len {len}, rank {}", member.rank());
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    });
}

#[test]
fn segments_cut_every_chunk_the_same_way_on_every_rank() {
    let world = 3;
    let len = world * 2 * SEGMENT_FLOATS + 7; // three segments per chunk, the last one short
    let mut data: Vec<f32> = (0..len).map(|v| v as f32).collect();
    let slots = segments(&mut data, world);
    for (index, chunk_slots) in slots.iter().enumerate() {
        let range = chunk(len, world, index);
        let lengths: Vec<usize> = chunk_slots.iter().map(|s| s.as_ref().unwrap().len()).collect();
        assert_eq!(lengths.len(), 3, "chunk {index}");
        assert_eq!(lengths.iter().sum::<usize>(), range.len(), "chunk {index}");
        assert!(lengths.iter().rev().skip(1).all(|&l| l == SEGMENT_FLOATS), "only the last segment is short: {lengths:?}");
        assert_eq!(chunk_slots[0].as_ref().unwrap()[0], range.start as f32, "chunk {index} starts at its range");
    }
    // Fewer elements than ranks: the empty chunks have no segments.
    let mut small = vec![1.0f32; 2];
    let counts: Vec<usize> = segments(&mut small, 4).iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 1, 0, 0]);
}

#[test]
fn broadcast_copies_the_roots_buffer_everywhere() {
    for (world, root) in [(2, 0), (3, 2), (5, 1)] {
        let ring = local_tcp_ring(world, "k", Duration::from_secs(10)).unwrap();
        let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ring
                .into_iter()
                .map(|mut member| {
                    scope.spawn(move || {
                        let mut data = vec![member.rank() as f32; 1001];
                        member.broadcast(&mut data, root).unwrap();
                        data
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(outputs.iter().all(|o| o.iter().all(|&v| v == root as f32)), "world {world} root {root}");
    }
}

#[test]
fn strangers_and_wrong_secrets_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let expected = secret_digest(b"right");
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut stranger = TcpStream::connect(address).unwrap();
    stranger.write_all(&handshake_bytes("wrong", 1)).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    assert!(read_handshake(&mut accepted, &expected, deadline()).unwrap_err().to_string().contains("wrong gang secret"));
    // A prefix of the secret, and the secret with a byte more: refused like any other.
    for presented in ["righ", "right!"] {
        let mut stranger = TcpStream::connect(address).unwrap();
        stranger.write_all(&handshake_bytes(presented, 1)).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert!(read_handshake(&mut accepted, &expected, deadline()).is_err(), "{presented}");
    }
    let mut garbage = TcpStream::connect(address).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    assert!(read_handshake(&mut accepted, &expected, deadline()).is_err());
    // A claimed secret of 4 GiB is refused from the header alone: no allocation, no waiting
    // for bytes that never come.
    let mut greedy = TcpStream::connect(address).unwrap();
    greedy.write_all(&[&MAGIC[..], &1u32.to_le_bytes(), &u32::MAX.to_le_bytes()].concat()).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    assert!(read_handshake(&mut accepted, &expected, deadline()).unwrap_err().to_string().contains("wrong gang secret"));
    let mut member = TcpStream::connect(address).unwrap();
    member.write_all(&handshake_bytes("right", 3)).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    assert_eq!(read_handshake(&mut accepted, &expected, deadline()).unwrap(), 3);
}

#[test]
fn a_handshake_dribbled_byte_by_byte_is_cut_off_at_its_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut dribbler = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    let bytes = handshake_bytes("right", 0);
    let started = Instant::now();
    let reading =
        std::thread::spawn(move || read_handshake(&mut accepted, &secret_digest(b"right"), Instant::now() + Duration::from_millis(200)));
    // One byte at a time, each well within a per-read timeout: the deadline covers the whole.
    for byte in &bytes {
        if reading.is_finished() || dribbler.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reading.join().unwrap().is_err(), "a handshake of {} bytes at 20 bytes/s fits no 200 ms deadline", bytes.len());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Binds `world` loopback listeners: the ports are known before any rank starts its setup.
fn loopback_listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (listeners, peers)
}

/// Every rank's [`TcpRing::connect_with_stop`], each on its own thread.
fn form_ring(listeners: Vec<TcpListener>, peers: &[String], timeout: Duration, stop: &AtomicBool) -> Vec<TcpRing> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let settings = GangSettings { rank, peers: peers.to_vec(), secret: "gang-secret".into(), timeout };
                scope.spawn(move || TcpRing::connect_with_stop(&listener, &settings, stop))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

/// Checks that `ring` all-reduces a small buffer to its exact sum on every rank.
fn assert_ring_sums(ring: Vec<TcpRing>) {
    let world = ring.len();
    let expected: Vec<f32> = (0..100).map(|i| (0..world).map(|rank| (i * (rank + 1)) as f32).sum()).collect();
    std::thread::scope(|scope| {
        for mut member in ring {
            let expected = &expected;
            scope.spawn(move || {
                let mut data: Vec<f32> = (0..100).map(|i| (i * (member.rank() + 1)) as f32).collect();
                member.all_reduce_sum(&mut data).unwrap();
                assert_eq!(&data, expected, "rank {}", member.rank());
            });
        }
    });
}

/// Accepts one connection, failing the test rather than hanging when none comes.
fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(error) => panic!("no connection within {limit:?}: {error}"),
        }
    }
}

/// Hammers `address` until `done`: connections closed at once, garbage, wrong secrets, the
/// right secret with a wrong rank, absurd secret lengths, and silent connections it keeps
/// open (up to 3 × [`MAX_PENDING_HANDSHAKES`], the oldest closed first). Signals `warmed_up`
/// once it has tried everything once and holds a full set of silent connections. Returns
/// the connections it opened.
fn hammer(address: SocketAddr, predecessor: usize, done: &AtomicBool, warmed_up: Sender<()>) -> usize {
    let most_silent = 3 * MAX_PENDING_HANDSHAKES;
    let mut silent = VecDeque::new();
    let mut opened = 0;
    let mut warmed_up = Some(warmed_up);
    while !done.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
            // Refused once the member has formed its ring and closed the port.
            std::thread::yield_now();
            continue;
        };
        let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
        opened += 1;
        let _ = match opened % 6 {
            0 => Ok(()),
            1 => stream.write_all(b"GET / HTTP/1.1\r\nHost: cohort\r\n\r\n"),
            2 => stream.write_all(&handshake_bytes("not-the-secret", predecessor)),
            3 => stream.write_all(&handshake_bytes("gang-secret", predecessor + 17)),
            4 => stream.write_all(&[&MAGIC[..], &(predecessor as u32).to_le_bytes(), &u32::MAX.to_le_bytes()].concat()),
            _ => {
                silent.push_back(stream);
                if silent.len() > most_silent {
                    silent.pop_front();
                }
                Ok(())
            }
        };
        if silent.len() >= MAX_PENDING_HANDSHAKES && opened >= 6 {
            if let Some(signal) = warmed_up.take() {
                let _ = signal.send(());
            }
        }
    }
    opened
}

#[test]
fn a_gang_forms_while_strangers_hammer_every_port() {
    let world = 3;
    let (listeners, peers) = loopback_listeners(world);
    let addresses: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let done = AtomicBool::new(false);
    let never = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (warmed_up, warm) = mpsc::channel();
        let strangers: Vec<_> = addresses
            .iter()
            .enumerate()
            .map(|(rank, &address)| {
                let (done, warmed_up) = (&done, warmed_up.clone());
                scope.spawn(move || hammer(address, (rank + world - 1) % world, done, warmed_up))
            })
            .collect();
        // Every port already holds more silent strangers than there are handshake slots.
        for _ in 0..world {
            warm.recv_timeout(Duration::from_secs(30)).expect("a stranger warmed up");
        }
        let ring = form_ring(listeners, &peers, Duration::from_secs(30), &never);
        done.store(true, Ordering::Relaxed);
        let opened: Vec<usize> = strangers.into_iter().map(|s| s.join().unwrap()).collect();
        assert!(opened.iter().all(|&count| count >= MAX_PENDING_HANDSHAKES * 6), "strangers opened {opened:?}");
        assert_ring_sums(ring);
    });
}

#[test]
fn silent_strangers_do_not_delay_the_predecessor() {
    let (listeners, peers) = loopback_listeners(2);
    // Queued before any member connects: more than the handshake slots, and the hard bound
    // on handshake threads, on each port.
    let silent: Vec<TcpStream> = listeners
        .iter()
        .flat_map(|l| (0..3 * MAX_PENDING_HANDSHAKES).map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap()))
        .collect();
    let started = Instant::now();
    let ring = form_ring(listeners, &peers, Duration::from_secs(30), &AtomicBool::new(false));
    let took = started.elapsed();
    // Reading the strangers one after the other would take a handshake timeout each.
    assert!(took < HANDSHAKE_READ_TIMEOUT / 2, "setup took {took:?} behind {} silent strangers", silent.len());
    assert_ring_sums(ring);
}

#[test]
fn setup_stops_soon_after_the_stop_flag_is_set() {
    // Rank 0 of two; "rank 1" is this test: it takes rank 0's connection but never answers,
    // and never connects to rank 0.
    let (mut listeners, peers) = loopback_listeners(2);
    let successor = listeners.pop().unwrap();
    let own = listeners.pop().unwrap();
    let stop = AtomicBool::new(false);
    let settings = GangSettings { rank: 0, peers, secret: "gang-secret".into(), timeout: Duration::from_secs(60) };
    std::thread::scope(|scope| {
        let setup = scope.spawn(|| TcpRing::connect_with_stop(&own, &settings, &stop));
        // Rank 0's handshake has arrived: it now waits for the answer and for its predecessor.
        let mut link = accept_within(&successor, Duration::from_secs(30));
        assert_eq!(read_handshake(&mut link, &secret_digest(b"gang-secret"), Instant::now() + Duration::from_secs(30)).unwrap(), 0);
        let stopped_at = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let error = setup.join().unwrap().unwrap_err();
        assert!(matches!(error, CollectiveError::Stopped), "{error}");
        assert!(stopped_at.elapsed() < Duration::from_secs(2), "took {:?} to notice the stop", stopped_at.elapsed());
    });
}

#[test]
fn setup_fails_at_its_deadline_when_the_ring_never_closes() {
    let (mut listeners, peers) = loopback_listeners(2);
    let _unanswering_successor = listeners.pop().unwrap();
    let own = listeners.pop().unwrap();
    let timeout = Duration::from_millis(300);
    let settings = GangSettings { rank: 0, peers, secret: "gang-secret".into(), timeout };
    let started = Instant::now();
    let error = TcpRing::connect_with_stop(&own, &settings, &AtomicBool::new(false)).unwrap_err();
    assert!(matches!(error, CollectiveError::Peer { peer: 1, .. }), "{error}");
    assert!(started.elapsed() >= timeout);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn the_accept_deadline_holds_under_a_flood_of_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let flooding = scope.spawn(|| {
            // Always a connection waiting: the loop must not rely on a quiet moment to look at
            // the clock.
            let mut opened = 0usize;
            while !done.load(Ordering::Relaxed) {
                if let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                    let _ = stream.write_all(b"0123456789abcdef0123");
                    opened += 1;
                }
            }
            opened
        });
        let started = Instant::now();
        let never = || false;
        let error = accept_predecessor(&listener, &secret_digest(b"s"), 1, started + Duration::from_millis(300), &never).unwrap_err();
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        assert!(matches!(error, CollectiveError::Peer { peer: 1, .. }), "{error}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(flooding.join().unwrap() > 0);
    });
}

#[test]
fn a_connection_dropped_unanswered_is_retried_until_accepted() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let digest = secret_digest(b"gang-secret");
    let deadline = Instant::now() + Duration::from_secs(30);
    let never = || false;
    std::thread::scope(|scope| {
        let connecting = scope.spawn(|| connect_successor(address, &handshake_bytes("gang-secret", 0), 1, deadline, &never));
        // The successor drops the first connection after its handshake arrived (as it does when
        // its handshake threads are all busy): without the answer, rank 0 would take this dead
        // connection for its link.
        let mut first = accept_within(&listener, Duration::from_secs(30));
        assert_eq!(read_handshake(&mut first, &digest, deadline).unwrap(), 0);
        drop(first);
        let mut accepted = accept_predecessor(&listener, &digest, 0, deadline, &never).unwrap();
        let mut next = connecting.join().unwrap().unwrap();
        next.write_all(b"link").unwrap();
        let mut received = [0u8; 4];
        accepted.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"link");
    });
}

#[test]
fn a_silent_peer_fails_the_collective_instead_of_hanging() {
    // Set up with room to spare (a loaded machine may take longer than the collective's timeout
    // to connect), then give the links the short timeout the test is about.
    let mut ring = local_tcp_ring(2, "t", Duration::from_secs(30)).unwrap();
    let _silent = ring.pop().unwrap();
    let mut member = ring.pop().unwrap();
    for stream in [&member.next, &member.prev].into_iter().flatten() {
        stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        stream.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    let started = Instant::now();
    let mut data = vec![1.0f32; 10];
    let error = member.all_reduce_sum(&mut data).unwrap_err();
    assert!(matches!(error, CollectiveError::Peer { peer: 1, .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
