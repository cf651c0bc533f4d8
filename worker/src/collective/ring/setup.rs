//! Setting up a ring: each rank accepts exactly one connection, from its predecessor, and opens
//! one to its successor. A connection starts with a handshake (the gang's secret and the sender's rank);
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
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{peer_error, TcpRing};
use crate::collective::{CollectiveError, GangSettings};

/// Opens every handshake. Version 02 added the [`ACCEPTED`] answer: a rank of an older build is
/// refused at once rather than left waiting for an answer it does not know to expect.
pub(super) const MAGIC: &[u8; 8] = b"COHORT02";

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

fn timed_out(peer: usize, what: &str) -> CollectiveError {
    CollectiveError::Peer { peer, source: std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string()) }
}

/// Whether ring setup should give up now: the caller's stop flag, or the other half of the setup
/// (connecting or accepting) failed, so finishing this half is pointless.
pub(super) type ShouldStop<'a> = &'a (dyn Fn() -> bool + Sync);

pub(super) fn handshake_bytes(secret: &str, rank: usize) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes.extend_from_slice(&(secret.len() as u32).to_le_bytes());
    bytes.extend_from_slice(secret.as_bytes());
    bytes
}

/// The SHA-256 of a gang secret: handshakes are checked against the digest, so the comparison
/// takes the same time whatever the secret's length or content.
pub(super) type SecretDigest = [u8; 32];

pub(super) fn secret_digest(secret: &[u8]) -> SecretDigest {
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
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads a handshake before `deadline` and returns the rank it claims, or why it is refused.
pub(super) fn read_handshake(stream: &mut TcpStream, expected: &SecretDigest, deadline: Instant) -> Result<usize, CollectiveError> {
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

impl TcpRing {
    /// Joins the ring: accepts the predecessor's connection on `listener` (already bound to this
    /// rank's advertised address) while connecting to the successor, retrying until `timeout`.
    /// Cannot be interrupted; training code should use [`TcpRing::connect_with_stop`].
    pub fn connect(listener: &TcpListener, settings: &GangSettings) -> Result<Self, CollectiveError> {
        Self::connect_with_stop(listener, settings, &AtomicBool::new(false))
    }

    /// [`TcpRing::connect`] that gives up with [`CollectiveError::Stopped`] soon after
    /// `stop` is set (within [`POLL_INTERVAL`], or [`CONNECT_ATTEMPT_TIMEOUT`] while a connection
    /// attempt to an unresponsive successor host is under way).
    pub fn connect_with_stop(listener: &TcpListener, settings: &GangSettings, stop: &AtomicBool) -> Result<Self, CollectiveError> {
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
            let accepted = accept_predecessor(listener, &expected, predecessor, deadline, &should_stop);
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
pub(super) fn connect_successor(
    address: SocketAddr,
    handshake: &[u8],
    successor: usize,
    deadline: Instant,
    should_stop: ShouldStop<'_>,
) -> Result<TcpStream, CollectiveError> {
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
fn try_successor(
    address: SocketAddr,
    handshake: &[u8],
    connect_timeout: Duration,
    deadline: Instant,
    should_stop: ShouldStop<'_>,
) -> std::io::Result<TcpStream> {
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
pub(super) fn accept_predecessor(
    listener: &TcpListener,
    expected: &SecretDigest,
    predecessor: usize,
    deadline: Instant,
    should_stop: ShouldStop<'_>,
) -> Result<TcpStream, CollectiveError> {
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
fn admit(
    stream: TcpStream,
    expected: &SecretDigest,
    predecessor: usize,
    verified: &Sender<TcpStream>,
    live_threads: &Arc<AtomicUsize>,
    pending: &mut VecDeque<PendingHandshake>,
) {
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
        let claimed =
            prepared.map_err(|e| CollectiveError::Handshake(e.to_string())).and_then(|()| read_handshake(&mut stream, &expected, deadline));
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
