//! Ring all-reduce over TCP: reduce-scatter, then all-gather, each in `world − 1` steps where
//! every rank sends one chunk to its successor while it receives one from its predecessor (the
//! send runs on a scoped thread, so both directions of the link are busy at once).
//!
//! Each rank accepts exactly one connection, from its predecessor, and opens one to its
//! successor. A connection starts with a handshake (the gang's secret and the sender's rank);
//! anything else is dropped, so the port serves only members of the current gang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{CollectiveError, Communicator, GangSettings};

const MAGIC: &[u8; 8] = b"COHORT01";

/// A rank's two ring links.
#[derive(Debug)]
pub struct RingCommunicator {
    rank: usize,
    world: usize,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank − 1.
    prev: Option<TcpStream>,
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
            return Ok(Self { rank, world, next: None, prev: None });
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
        Ok(Self { rank, world, next: Some(next), prev: Some(prev) })
    }

    /// Sends `outgoing` to the successor while receiving `incoming.len()` floats from the predecessor.
    fn exchange(&mut self, outgoing: &[f32], incoming: &mut [f32]) -> Result<(), CollectiveError> {
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let successor = (self.rank + 1) % self.world;
        let predecessor = (self.rank + self.world - 1) % self.world;
        let send_bytes = as_bytes(outgoing);
        std::thread::scope(|scope| {
            let sending = scope.spawn(move || next.write_all(send_bytes).map_err(peer_error(successor)));
            let received = prev.read_exact(as_bytes_mut(incoming)).map_err(peer_error(predecessor));
            let sent = sending.join().expect("send thread");
            sent.and(received)
        })
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
        let len = data.len();
        let largest = chunk(len, world, 0).len();
        let mut incoming = vec![0f32; largest];
        // Reduce-scatter: after step s, chunk (rank − s − 1) holds the sum over s + 2 ranks.
        for step in 0..world - 1 {
            let send = chunk(len, world, (self.rank + world - step) % world);
            let receive = chunk(len, world, (self.rank + world - step - 1) % world);
            let outgoing = data[send].to_vec();
            self.exchange(&outgoing, &mut incoming[..receive.len()])?;
            for (value, add) in data[receive.clone()].iter_mut().zip(&incoming[..receive.len()]) {
                *value += add;
            }
        }
        // All-gather: each rank now owns the full sum of chunk (rank + 1); pass the sums around.
        for step in 0..world - 1 {
            let send = chunk(len, world, (self.rank + 1 + world - step) % world);
            let receive = chunk(len, world, (self.rank + world - step) % world);
            let outgoing = data[send].to_vec();
            self.exchange(&outgoing, &mut incoming[..receive.len()])?;
            data[receive.clone()].copy_from_slice(&incoming[..receive.len()]);
        }
        Ok(())
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
