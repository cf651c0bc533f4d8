//! Ring all-reduce over TCP: reduce-scatter, then all-gather, each in `world − 1` steps where
//! every rank passes one chunk to its successor while it receives one from its predecessor.
//!
//! The steps are pipelined segment by segment ([`SEGMENT_FLOATS`] floats): a send thread, one per
//! call, streams this rank's own chunk and then forwards every segment the calling thread has
//! received and reduced, as soon as it is ready, so the link never waits for a whole step to end
//! and receiving, adding and sending overlap. Segments go out straight from the caller's buffer,
//! and the all-gather receives straight into it; the reduce-scatter receives each segment into a
//! scratch buffer kept across calls (small enough to stay in cache) and adds it in place.
//!
//! Each rank accepts exactly one connection, from its predecessor, and opens one to its
//! successor. A connection starts with a handshake (the gang's secret and the sender's rank);
//! anything else is dropped, so the port serves only members of the current gang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::{CollectiveError, Communicator, GangSettings};

const MAGIC: &[u8; 8] = b"COHORT01";

/// Floats per pipelined segment (256 KiB): the unit the send thread forwards, and the scratch
/// buffer the reduce-scatter receives into (small enough to stay in cache).
pub const SEGMENT_FLOATS: usize = 64 * 1024;

/// A rank's two ring links.
#[derive(Debug)]
pub struct RingCommunicator {
    rank: usize,
    world: usize,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank − 1.
    prev: Option<TcpStream>,
    /// Where reduce-scatter segments land before they are added; reused by every call.
    scratch: Vec<f32>,
}

fn peer_error(peer: usize) -> impl FnOnce(std::io::Error) -> CollectiveError {
    move |source| CollectiveError::Peer { peer, source }
}

fn handshake_bytes(secret: &str, rank: usize) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes.extend_from_slice(&(secret.len() as u32).to_le_bytes());
    bytes.extend_from_slice(secret.as_bytes());
    bytes
}

fn read_handshake(stream: &mut TcpStream, secret: &str) -> Result<usize, CollectiveError> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).map_err(|e| CollectiveError::Handshake(format!("short handshake: {e}")))?;
    if &header[..8] != MAGIC {
        return Err(CollectiveError::Handshake("not a cohort ring connection".into()));
    }
    let rank = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let length = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if length != secret.len() {
        return Err(CollectiveError::Handshake("wrong gang secret".into()));
    }
    let mut presented = vec![0u8; length];
    stream.read_exact(&mut presented).map_err(|e| CollectiveError::Handshake(format!("short handshake: {e}")))?;
    // Constant-time comparison: the secret's bytes do not leak through timing.
    let differences = presented.iter().zip(secret.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if differences != 0 {
        return Err(CollectiveError::Handshake("wrong gang secret".into()));
    }
    Ok(rank)
}

fn resolve(address: &str) -> Result<SocketAddr, CollectiveError> {
    address
        .to_socket_addrs()
        .map_err(|e| CollectiveError::Setup(format!("cannot resolve {address}: {e}")))?
        .next()
        .ok_or_else(|| CollectiveError::Setup(format!("{address} resolves to nothing")))
}

impl RingCommunicator {
    /// Joins the ring: accepts the predecessor's connection on `listener` (already bound to this
    /// rank's advertised address) while connecting to the successor, retrying until `timeout`.
    pub fn connect(listener: TcpListener, settings: &GangSettings) -> Result<Self, CollectiveError> {
        let world = settings.peers.len();
        let rank = settings.rank;
        if world == 0 || rank >= world {
            return Err(CollectiveError::Setup(format!("rank {rank} of {world}")));
        }
        if world == 1 {
            return Ok(Self { rank, world, next: None, prev: None, scratch: Vec::new() });
        }
        let successor = (rank + 1) % world;
        let predecessor = (rank + world - 1) % world;
        let deadline = Instant::now() + settings.timeout;
        let next_address = resolve(&settings.peers[successor])?;
        let secret = settings.secret.clone();
        let timeout = settings.timeout;

        let (next, prev) = std::thread::scope(|scope| {
            let connecting = scope.spawn(|| -> Result<TcpStream, CollectiveError> {
                loop {
                    match TcpStream::connect_timeout(&next_address, Duration::from_secs(1)) {
                        Ok(mut stream) => {
                            stream.set_nodelay(true).map_err(peer_error(successor))?;
                            stream.write_all(&handshake_bytes(&secret, rank)).map_err(peer_error(successor))?;
                            return Ok(stream);
                        }
                        Err(error) if Instant::now() >= deadline => return Err(peer_error(successor)(error)),
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            });
            let accepted = accept_predecessor(&listener, &settings.secret, predecessor, deadline);
            (connecting.join().expect("connect thread"), accepted)
        });
        let (next, prev) = (next?, prev?);
        for (stream, peer) in [(&next, successor), (&prev, predecessor)] {
            stream.set_read_timeout(Some(timeout)).map_err(peer_error(peer))?;
            stream.set_write_timeout(Some(timeout)).map_err(peer_error(peer))?;
        }
        Ok(Self { rank, world, next: Some(next), prev: Some(prev), scratch: Vec::new() })
    }
}

/// A segment of the caller's buffer on its way to the send thread and back: (chunk, segment
/// within the chunk, the floats).
type Segment<'a> = (usize, usize, &'a mut [f32]);

/// The caller's buffer cut into `world` chunks ([`chunk`]) and each chunk into segments of at
/// most [`SEGMENT_FLOATS`]; a slot is empty while its segment is with the send thread.
fn segments(data: &mut [f32], world: usize) -> Vec<Vec<Option<&mut [f32]>>> {
    let len = data.len();
    let mut rest = data;
    (0..world)
        .map(|index| {
            let (this, tail) = std::mem::take(&mut rest).split_at_mut(chunk(len, world, index).len());
            rest = tail;
            this.chunks_mut(SEGMENT_FLOATS).map(Some).collect()
        })
        .collect()
}

/// Takes segment `index` of chunk `chunk_index` back into the caller's hands, waiting for the send
/// thread to return it if it is still out. `None` when the send thread has stopped (it failed).
fn reclaim<'a>(slots: &mut [Vec<Option<&'a mut [f32]>>], chunk_index: usize, index: usize, returned: &Receiver<Segment<'a>>) -> Option<&'a mut [f32]> {
    loop {
        if let Some(segment) = slots[chunk_index][index].take() {
            return Some(segment);
        }
        let (back_chunk, back_index, segment) = returned.recv().ok()?;
        slots[back_chunk][back_index] = Some(segment);
    }
}

fn accept_predecessor(listener: &TcpListener, secret: &str, predecessor: usize, deadline: Instant) -> Result<TcpStream, CollectiveError> {
    listener.set_nonblocking(true).map_err(peer_error(predecessor))?;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(peer_error(predecessor))?;
                stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))).map_err(peer_error(predecessor))?;
                stream.set_nodelay(true).map_err(peer_error(predecessor))?;
                match read_handshake(&mut stream, secret) {
                    Ok(rank) if rank == predecessor => return Ok(stream),
                    // A stranger, or a member of an older attempt: drop it and keep listening.
                    Ok(_) | Err(_) => continue,
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Peer {
                        peer: predecessor,
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "the predecessor never connected"),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(peer_error(predecessor)(error)),
        }
    }
}

fn as_bytes(data: &[f32]) -> &[u8] {
    bytemuck::cast_slice(data)
}

fn as_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(data)
}

/// The bounds of chunk `index` when `len` elements are cut into `parts` chunks differing by at most one.
fn chunk(len: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

impl Communicator for RingCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.world;
        if world == 1 || data.is_empty() {
            return Ok(());
        }
        let (rank, successor, predecessor) = (self.rank, (self.rank + 1) % world, (self.rank + world - 1) % world);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let scratch = &mut self.scratch;
        let wanted = data.len().div_ceil(world).min(SEGMENT_FLOATS);
        if scratch.len() < wanted {
            scratch.resize(wanted, 0.0);
        }
        let mut slots = segments(data, world);
        let (to_send, outbox) = mpsc::channel::<Segment>();
        let (give_back, returned) = mpsc::channel::<Segment>();
        std::thread::scope(|scope| {
            let sending = scope.spawn(move || -> Result<(), CollectiveError> {
                for (chunk_index, index, segment) in outbox {
                    next.write_all(as_bytes(segment)).map_err(peer_error(successor))?;
                    // The caller may have finished with its buffer already (the last step's segments).
                    let _ = give_back.send((chunk_index, index, segment));
                }
                Ok(())
            });
            let receiving = (|| -> Result<(), CollectiveError> {
                let stopped = || CollectiveError::Peer { peer: successor, source: std::io::Error::other("the send thread stopped") };
                // Reduce-scatter step 0 sends this rank's own chunk as it is.
                for (index, slot) in slots[rank].iter_mut().enumerate() {
                    to_send.send((rank, index, slot.take().expect("own segment"))).map_err(|_| stopped())?;
                }
                // Reduce-scatter: step s receives chunk (rank − s − 1), adds this rank's values and
                // forwards the partial sum; the last step's chunk (rank + 1) is then the full sum,
                // and forwarding it starts the all-gather.
                for step in 0..world - 1 {
                    let chunk_index = (rank + world - step - 1) % world;
                    for index in 0..slots[chunk_index].len() {
                        let segment = slots[chunk_index][index].take().expect("not yet sent");
                        let incoming = &mut scratch[..segment.len()];
                        prev.read_exact(as_bytes_mut(incoming)).map_err(peer_error(predecessor))?;
                        for (value, add) in segment.iter_mut().zip(incoming.iter()) {
                            *value += add;
                        }
                        to_send.send((chunk_index, index, segment)).map_err(|_| stopped())?;
                    }
                }
                // All-gather: step t receives the full sum of chunk (rank − t) in place, once the
                // send thread is done with that chunk's partial sum, and forwards it except at the
                // last step. The wait is short and cannot deadlock: a segment's full sum reaches
                // this rank only after its partial sum from this rank went on round the ring, so
                // the send thread has written it by then.
                for step in 0..world - 1 {
                    let chunk_index = (rank + world - step) % world;
                    for index in 0..slots[chunk_index].len() {
                        let segment = reclaim(&mut slots, chunk_index, index, &returned).ok_or_else(stopped)?;
                        prev.read_exact(as_bytes_mut(segment)).map_err(peer_error(predecessor))?;
                        if step < world - 2 {
                            to_send.send((chunk_index, index, segment)).map_err(|_| stopped())?;
                        }
                    }
                }
                Ok(())
            })();
            drop(to_send);
            let sent = sending.join().expect("send thread");
            sent.and(receiving)
        })
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 || data.is_empty() {
            return Ok(());
        }
        // Pass the buffer along the ring from the root; the root's predecessor does not forward.
        let distance = (self.rank + self.world - root) % self.world;
        let mut received = vec![0f32; data.len()];
        if distance != 0 {
            let predecessor = (self.rank + self.world - 1) % self.world;
            let prev = self.prev.as_mut().expect("world > 1");
            prev.read_exact(as_bytes_mut(&mut received)).map_err(peer_error(predecessor))?;
            data.copy_from_slice(&received);
        }
        if distance != self.world - 1 {
            let successor = (self.rank + 1) % self.world;
            let next = self.next.as_mut().expect("world > 1");
            next.write_all(as_bytes(data)).map_err(peer_error(successor))?;
        }
        Ok(())
    }
}

/// Starts a ring of `world` ranks in this process on loopback (tests and benchmarks).
pub fn local_ring(world: usize, secret: &str, timeout: Duration) -> Result<Vec<RingCommunicator>, CollectiveError> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| CollectiveError::Setup(format!("bind: {e}")))?;
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>().map_err(|e| CollectiveError::Setup(e.to_string()))?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let settings = GangSettings { rank, peers: peers.clone(), secret: secret.to_string(), timeout };
                scope.spawn(move || RingCommunicator::connect(listener, &settings))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ring member")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_all_reduce(world: usize, len: usize) {
        let ring = local_ring(world, "s3cret", Duration::from_secs(10)).unwrap();
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
        let ring = local_ring(world, "again", Duration::from_secs(10)).unwrap();
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
            let ring = local_ring(world, "k", Duration::from_secs(10)).unwrap();
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
        let mut stranger = TcpStream::connect(address).unwrap();
        stranger.write_all(&handshake_bytes("wrong", 1)).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert!(read_handshake(&mut accepted, "right").unwrap_err().to_string().contains("wrong gang secret"));
        let mut garbage = TcpStream::connect(address).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert!(read_handshake(&mut accepted, "right").is_err());
    }

    #[test]
    fn a_silent_peer_fails_the_collective_instead_of_hanging() {
        let mut ring = local_ring(2, "t", Duration::from_millis(300)).unwrap();
        let _silent = ring.pop().unwrap();
        let mut member = ring.pop().unwrap();
        let started = Instant::now();
        let mut data = vec![1.0f32; 10];
        let error = member.all_reduce_sum(&mut data).unwrap_err();
        assert!(matches!(error, CollectiveError::Peer { peer: 1, .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
