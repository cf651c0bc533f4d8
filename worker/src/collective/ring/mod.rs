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
//! Setting up the ring's links, and keeping strangers out of them, is the `setup` module's part;
//! the links then carry only the collectives.
//!
//! [`TcpRing`] is the ring alone. Gangs use [`RingCommunicator`] (the `hierarchical` module),
//! which sets up a [`TcpRing`] first and then, where ranks share a host, moves their traffic to
//! shared memory.

mod setup;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use super::{CollectiveError, Communicator, GangSettings};
pub use crate::collective::hierarchical::RingCommunicator;
pub use setup::{HANDSHAKE_READ_TIMEOUT, MAX_PENDING_HANDSHAKES};

/// Floats per pipelined segment (256 KiB): the unit the send thread forwards, and the scratch
/// buffer the reduce-scatter receives into (small enough to stay in cache).
pub const SEGMENT_FLOATS: usize = 64 * 1024;

/// A rank's two ring links: the ring all-reduce over TCP, whatever the topology.
#[derive(Debug)]
pub struct TcpRing {
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
fn reclaim<'a>(
    slots: &mut [Vec<Option<&'a mut [f32]>>],
    chunk_index: usize,
    index: usize,
    returned: &Receiver<Segment<'a>>,
) -> Option<&'a mut [f32]> {
    loop {
        if let Some(segment) = slots[chunk_index][index].take() {
            return Some(segment);
        }
        let (back_chunk, back_index, segment) = returned.recv().ok()?;
        slots[back_chunk][back_index] = Some(segment);
    }
}

fn as_bytes(data: &[f32]) -> &[u8] {
    bytemuck::cast_slice(data)
}

fn as_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(data)
}

/// The bounds of chunk `index` when `len` elements are cut into `parts` chunks differing by at most one.
pub(crate) fn chunk(len: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

impl TcpRing {
    /// Gives both links a new read and write timeout (tests of silent peers).
    #[cfg(test)]
    pub(crate) fn set_timeout(&self, timeout: Duration) {
        for stream in [&self.next, &self.prev].into_iter().flatten() {
            stream.set_read_timeout(Some(timeout)).unwrap();
            stream.set_write_timeout(Some(timeout)).unwrap();
        }
    }
}

impl Communicator for TcpRing {
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

/// Starts a gang of `world` ranks in this process on loopback, each with the communicator a gang
/// gets ([`RingCommunicator`]: shared memory, as they share a host); tests and benchmarks.
pub fn local_ring(world: usize, secret: &str, timeout: Duration) -> Result<Vec<RingCommunicator>, CollectiveError> {
    local_gang(&vec!["127.0.0.1"; world], secret, timeout, RingCommunicator::connect)
}

/// Starts a [`TcpRing`] of `world` ranks in this process on loopback (tests and benchmarks).
pub fn local_tcp_ring(world: usize, secret: &str, timeout: Duration) -> Result<Vec<TcpRing>, CollectiveError> {
    local_gang(&vec!["127.0.0.1"; world], secret, timeout, |listener, settings| TcpRing::connect(&listener, settings))
}

/// Starts one rank per entry of `hosts` (a loopback IP each: 127.0.0.1, 127.0.0.2, … act as
/// separate hosts) in this process, each on its own thread, through `connect`.
pub fn local_gang<C: Send>(
    hosts: &[&str],
    secret: &str,
    timeout: Duration,
    connect: impl Fn(TcpListener, &GangSettings) -> Result<C, CollectiveError> + Sync,
) -> Result<Vec<C>, CollectiveError> {
    let listeners: Vec<TcpListener> = hosts
        .iter()
        .map(|host| TcpListener::bind((*host, 0)))
        .collect::<Result<_, _>>()
        .map_err(|e| CollectiveError::Setup(format!("bind: {e}")))?;
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| CollectiveError::Setup(e.to_string()))?;
    let connect = &connect;
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let settings = GangSettings { rank, peers: peers.clone(), secret: secret.to_string(), timeout };
                scope.spawn(move || connect(listener, &settings))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("gang member")).collect()
    })
}
