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
//! anything else is dropped, so the port serves only members of the current gang. The accepting
//! rank answers the one handshake it keeps with [`ACCEPTED`], and the connecting rank retries
//! until it reads that answer: a connection the successor dropped (a stranger filled its
//! handshake slots, or it belonged to an older attempt) is never mistaken for a ring link.
//!
//! Strangers cannot stall the setup ([`accept_predecessor`]): handshakes are read off the accept
//! thread, each within [`HANDSHAKE_READ_TIMEOUT`], at most [`MAX_PENDING_HANDSHAKES`] at a time,
//! and the accept loop checks its deadline and the caller's stop flag on every iteration.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{CollectiveError, Communicator, GangSettings};

/// Opens every handshake. Version 02 added the [`ACCEPTED`] answer: a rank of an older build is
/// refused at once rather than left waiting for an answer it does not know to expect.
const MAGIC: &[u8; 8] = b"COHORT02";

/// The accepting rank's answer to the one handshake it keeps as its predecessor link.
const ACCEPTED: &[u8; 8] = b"COHORTOK";

/// Longest secret a handshake may present. The coordinator's secrets are 32 hex characters; the
/// bound keeps a stranger's claimed length from making a handshake thread allocate or wait for
/// gigabytes.
const MAX_SECRET_BYTES: usize = 1024;

/// How long an accepted connection has to deliver its whole handshake. A member writes its
/// handshake right after connecting, so on any network it arrives within a round trip or two; a
/// connection silent or dribbling for longer is a stranger. Fixed, not the gang's timeout, so a
/// stranger holds a handshake slot for at most this long.
pub const HANDSHAKE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Handshakes read at the same time, one short-lived thread each. A further connection evicts the
/// oldest one still being read (its thread ends at once): a member's handshake is read within
/// microseconds of its arrival, so a stranger who wants to evict it must open this many
/// connections in that instant, while a stranger holding this many silent connections only
/// evicts its own.
pub const MAX_PENDING_HANDSHAKES: usize = 16;

/// Hard bound on live handshake threads, evicted ones still winding down included: past it, new
/// connections are dropped at once (the predecessor reconnects, see [`ACCEPTED`]), so a flood of
/// connections cannot spawn threads without bound.
const MAX_HANDSHAKE_THREADS: usize = 2 * MAX_PENDING_HANDSHAKES;

/// How long the accept loop waits for a connection or a verified handshake before it checks its
/// deadline and stop flag again; also the longest a connecting rank waits for the answer between
/// two such checks. Bounds how late setup notices a stop.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The longest a single connection attempt to the successor may take (a successor host that
/// drops packets); clamped to the time left before the deadline.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two attempts to reach the successor (refused: it has not bound its port yet; or
/// it dropped the connection without answering).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

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

fn timed_out(peer: usize, what: &str) -> CollectiveError {
    CollectiveError::Peer { peer, source: std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string()) }
}

/// Whether ring setup should give up now: the caller's stop flag, or the other half of the setup
/// (connecting or accepting) failed, so finishing this half is pointless.
type ShouldStop<'a> = &'a (dyn Fn() -> bool + Sync);

fn handshake_bytes(secret: &str, rank: usize) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes.extend_from_slice(&(secret.len() as u32).to_le_bytes());
    bytes.extend_from_slice(secret.as_bytes());
    bytes
}

/// The SHA-256 of a gang secret: handshakes are checked against the digest, so the comparison
/// takes the same time whatever the secret's length or content.
type SecretDigest = [u8; 32];

fn secret_digest(secret: &[u8]) -> SecretDigest {
    Sha256::digest(secret).into()
}

/// Compares two digests in time independent of where they differ.
fn same_digest(presented: &SecretDigest, expected: &SecretDigest) -> bool {
    let differences = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    // Keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(differences) == 0
}

/// Fills `buffer` from `stream` before `deadline`, giving up early when `should_stop` says so.
/// Reads in slices of at most [`POLL_INTERVAL`] so the stop check runs while the peer is silent,
/// and so a peer dribbling bytes cannot stretch the deadline (unlike a per-read timeout).
fn read_before(stream: &mut TcpStream, buffer: &mut [u8], deadline: Instant, should_stop: ShouldStop<'_>) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        if should_stop() {
            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "stopped on request"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no data before the deadline"));
        }
        stream.set_read_timeout(Some(left.min(POLL_INTERVAL)))?;
        match stream.read(&mut buffer[filled..]) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")),
            Ok(count) => filled += count,
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads a handshake before `deadline` and returns the rank it claims, or why it is refused.
fn read_handshake(stream: &mut TcpStream, expected: &SecretDigest, deadline: Instant) -> Result<usize, CollectiveError> {
    let never = || false;
    let short = |e: std::io::Error| CollectiveError::Handshake(format!("short handshake: {e}"));
    let mut header = [0u8; 16];
    read_before(stream, &mut header, deadline, &never).map_err(short)?;
    if &header[..8] != MAGIC {
        return Err(CollectiveError::Handshake("not a cohort ring connection".into()));
    }
    let rank = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let length = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if length > MAX_SECRET_BYTES {
        return Err(CollectiveError::Handshake("wrong gang secret".into()));
    }
    let mut presented = vec![0u8; length];
    read_before(stream, &mut presented, deadline, &never).map_err(short)?;
    if !same_digest(&secret_digest(&presented), expected) {
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
    /// Cannot be interrupted; training code should use [`RingCommunicator::connect_with_stop`].
    pub fn connect(listener: TcpListener, settings: &GangSettings) -> Result<Self, CollectiveError> {
        Self::connect_with_stop(listener, settings, &AtomicBool::new(false))
    }

    /// [`RingCommunicator::connect`] that gives up with [`CollectiveError::Stopped`] soon after
    /// `stop` is set (within [`POLL_INTERVAL`], or [`CONNECT_ATTEMPT_TIMEOUT`] while a connection
    /// attempt to an unresponsive successor host is under way).
    pub fn connect_with_stop(listener: TcpListener, settings: &GangSettings, stop: &AtomicBool) -> Result<Self, CollectiveError> {
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
        let handshake = handshake_bytes(&settings.secret, rank);
        let expected = secret_digest(settings.secret.as_bytes());
        let timeout = settings.timeout;

        // Either half failing ends the other at once instead of at the deadline.
        let half_failed = AtomicBool::new(false);
        let should_stop = || stop.load(Ordering::Relaxed) || half_failed.load(Ordering::Relaxed);
        let (next, prev) = std::thread::scope(|scope| {
            let connecting = scope.spawn(|| {
                let connected = connect_successor(next_address, &handshake, successor, deadline, &should_stop);
                if connected.is_err() {
                    half_failed.store(true, Ordering::Relaxed);
                }
                connected
            });
            let accepted = accept_predecessor(&listener, &expected, predecessor, deadline, &should_stop);
            if accepted.is_err() {
                half_failed.store(true, Ordering::Relaxed);
            }
            (connecting.join().expect("connect thread"), accepted)
        });
        let (next, prev) = match (next, prev) {
            (Ok(next), Ok(prev)) => (next, prev),
            (Err(error), Ok(_)) | (Ok(_), Err(error)) => return Err(error),
            // Report the failure that ended the setup, not the other half's giving up because of it.
            (Err(CollectiveError::Stopped), Err(error)) if !stop.load(Ordering::Relaxed) => return Err(error),
            (Err(error), Err(_)) => return Err(error),
        };
        for (stream, peer) in [(&next, successor), (&prev, predecessor)] {
            stream.set_read_timeout(Some(timeout)).map_err(peer_error(peer))?;
            stream.set_write_timeout(Some(timeout)).map_err(peer_error(peer))?;
        }
        Ok(Self { rank, world, next: Some(next), prev: Some(prev), scratch: Vec::new() })
    }
}

/// Opens the link to the successor: connects, sends `handshake`, and waits for [`ACCEPTED`];
/// reconnects whenever the successor drops the connection unanswered, until `deadline`.
fn connect_successor(address: SocketAddr, handshake: &[u8], successor: usize, deadline: Instant, should_stop: ShouldStop<'_>) -> Result<TcpStream, CollectiveError> {
    let mut last_error = None;
    loop {
        if should_stop() {
            return Err(CollectiveError::Stopped);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let error = last_error.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the successor"));
            return Err(peer_error(successor)(error));
        }
        match try_successor(address, handshake, left.min(CONNECT_ATTEMPT_TIMEOUT), deadline, should_stop) {
            Ok(stream) => return Ok(stream),
            // A stop that interrupted the wait for the answer is reported at the top of the loop.
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(RECONNECT_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// One attempt of [`connect_successor`].
fn try_successor(address: SocketAddr, handshake: &[u8], connect_timeout: Duration, deadline: Instant, should_stop: ShouldStop<'_>) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&address, connect_timeout)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(connect_timeout))?;
    stream.write_all(handshake)?;
    // The successor may still be busy before it starts accepting: wait for its answer as long as
    // the setup may take.
    let mut answer = [0u8; ACCEPTED.len()];
    read_before(&mut stream, &mut answer, deadline, should_stop)?;
    if &answer != ACCEPTED {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the successor answered the handshake with something else"));
    }
    Ok(stream)
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

/// A handshake being read on its own thread, as the accept loop sees it.
struct PendingHandshake {
    /// A handle on the connection, to shut it down when the handshake is evicted or the setup
    /// ends (which ends the reading thread at once).
    stream: TcpStream,
    /// Set by the thread once it no longer reads (before it hands over a verified connection).
    finished: Arc<AtomicBool>,
}

/// Held by a handshake thread for its whole life, dropped with it (or with its closure, if the
/// thread could not start): keeps the live-thread count and the finished flag right.
struct HandshakeSlot {
    live_threads: Arc<AtomicUsize>,
    finished: Arc<AtomicBool>,
}

impl HandshakeSlot {
    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.finish();
        self.live_threads.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts the predecessor's link: the first connection whose handshake presents the gang's
/// secret and the predecessor's rank, answered with [`ACCEPTED`]. Every other connection is
/// dropped. The deadline and `should_stop` are checked on every iteration, so neither a flood of
/// connections nor a silent one delays giving up; handshakes are read on short-lived threads
/// (see [`MAX_PENDING_HANDSHAKES`]) so a stranger never delays the predecessor.
fn accept_predecessor(listener: &TcpListener, expected: &SecretDigest, predecessor: usize, deadline: Instant, should_stop: ShouldStop<'_>) -> Result<TcpStream, CollectiveError> {
    listener.set_nonblocking(true).map_err(peer_error(predecessor))?;
    let (verified_sender, verified) = mpsc::channel::<TcpStream>();
    let live_threads = Arc::new(AtomicUsize::new(0));
    let mut pending = VecDeque::new();
    let mut ready: Option<TcpStream> = None;
    let mut last_accept_error = None;
    let outcome = loop {
        if should_stop() {
            break Err(CollectiveError::Stopped);
        }
        if Instant::now() >= deadline {
            break Err(match last_accept_error.take() {
                Some(error) => peer_error(predecessor)(error),
                None => timed_out(predecessor, "the predecessor never connected"),
            });
        }
        if let Some(mut stream) = ready.take().or_else(|| verified.try_recv().ok()) {
            // A failed answer means the predecessor gave up on this connection: keep listening.
            if stream.write_all(ACCEPTED).is_ok() {
                break Ok(stream);
            }
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => admit(stream, expected, predecessor, &verified_sender, &live_threads, &mut pending),
            Err(error) => {
                // Anything but "nothing waiting" (a connection reset before it was accepted, out
                // of file descriptors while strangers hold many) may pass: retry until the deadline.
                if error.kind() != std::io::ErrorKind::WouldBlock {
                    last_accept_error = Some(error);
                }
                ready = verified.recv_timeout(POLL_INTERVAL).ok();
            }
        }
    };
    // End the handshakes still being read; the kept connection's own thread has finished.
    for handshake in pending {
        if !handshake.finished.load(Ordering::Acquire) {
            let _ = handshake.stream.shutdown(Shutdown::Both);
        }
    }
    outcome
}

/// Starts reading an accepted connection's handshake on its own thread, which sends the
/// connection to `verified` if it comes from the predecessor and shuts it down otherwise.
fn admit(stream: TcpStream, expected: &SecretDigest, predecessor: usize, verified: &Sender<TcpStream>, live_threads: &Arc<AtomicUsize>, pending: &mut VecDeque<PendingHandshake>) {
    pending.retain(|handshake| !handshake.finished.load(Ordering::Acquire));
    if live_threads.load(Ordering::Acquire) >= MAX_HANDSHAKE_THREADS {
        return; // Dropped at once.
    }
    if pending.len() >= MAX_PENDING_HANDSHAKES {
        if let Some(oldest) = pending.pop_front() {
            let _ = oldest.stream.shutdown(Shutdown::Both);
        }
    }
    // A handle for eviction; without one (out of file descriptors) the connection is dropped.
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let finished = Arc::new(AtomicBool::new(false));
    live_threads.fetch_add(1, Ordering::AcqRel);
    let slot = HandshakeSlot { live_threads: Arc::clone(live_threads), finished: Arc::clone(&finished) };
    let (expected, verified) = (*expected, verified.clone());
    let spawned = std::thread::Builder::new().name("ring-handshake".into()).spawn(move || {
        let mut stream = stream;
        let deadline = Instant::now() + HANDSHAKE_READ_TIMEOUT;
        let prepared = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true));
        let claimed = prepared.map_err(|e| CollectiveError::Handshake(e.to_string())).and_then(|()| read_handshake(&mut stream, &expected, deadline));
        // Marked before the hand-over, so that the accept loop never shuts the kept link down.
        slot.finish();
        match claimed {
            // When the accept loop has already ended, the send fails and the connection drops.
            Ok(rank) if rank == predecessor => drop(verified.send(stream)),
            // A stranger, or a member of an older attempt.
            Ok(_) | Err(_) => drop(stream.shutdown(Shutdown::Both)),
        }
    });
    // A thread that cannot start drops its closure, the connection and slot with it.
    if spawned.is_ok() {
        pending.push_back(PendingHandshake { stream: handle, finished });
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
        let reading = std::thread::spawn(move || read_handshake(&mut accepted, &secret_digest(b"right"), Instant::now() + Duration::from_millis(200)));
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

    /// Every rank's [`RingCommunicator::connect_with_stop`], each on its own thread.
    fn form_ring(listeners: Vec<TcpListener>, peers: &[String], timeout: Duration, stop: &AtomicBool) -> Vec<RingCommunicator> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let settings = GangSettings { rank, peers: peers.to_vec(), secret: "gang-secret".into(), timeout };
                    scope.spawn(move || RingCommunicator::connect_with_stop(listener, &settings, stop))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        })
    }

    /// Checks that `ring` all-reduces a small buffer to its exact sum on every rank.
    fn assert_ring_sums(ring: Vec<RingCommunicator>) {
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
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
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
            let setup = scope.spawn(|| RingCommunicator::connect_with_stop(own, &settings, &stop));
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
        let error = RingCommunicator::connect_with_stop(own, &settings, &AtomicBool::new(false)).unwrap_err();
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
