//! The communicator a CPU gang uses ([`RingCommunicator`]): it picks its path from the gang's
//! topology by itself.
//!
//! - Every rank on its own host: the TCP ring ([`TcpRing`]).
//! - Ranks sharing a host: they reduce through shared memory ([`ShmGroup`]). With several hosts
//!   the all-reduce is hierarchical: reduce within each host onto its leader (its lowest rank),
//!   all-reduce across hosts over a TCP ring of the leaders, broadcast within each host.
//!
//! Setup always forms the gang's full TCP ring first, with its authenticated handshake; that ring
//! then carries the names of the shared segments (random, so only members learn them) and every
//! rank's verdict on mapping its host's segment. Only when every rank mapped its segment does the
//! gang move to shared memory; otherwise it stays on the full TCP ring (logged once per rank).

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::ring::TcpRing;
use super::shm::{self, file_name, random_name, Segment, ShmGroup, NAME_BYTES, PIECE_FLOATS, SHM_DIR};
use super::topology::Topology;
use super::{CollectiveError, Communicator, GangSettings};

#[cfg(test)]
mod tests;

/// Floats a hierarchical collective moves per round (8 MiB, a gradient bucket): within a round,
/// a host's members wait for their leader's TCP ring, so rounds bound that wait by the time the
/// ring takes for 8 MiB, far below any gang timeout, whatever the size of the data.
pub const ROUND_FLOATS: usize = 2 << 20;

/// A gang member's communicator for host memory (`Backend::Ring`); see the module's comment.
#[derive(Debug)]
pub struct RingCommunicator {
    rank: usize,
    world: usize,
    path: CollectivePath,
}

/// How this gang's collectives travel.
#[derive(Debug)]
enum CollectivePath {
    /// Every rank over one TCP ring.
    Tcp(TcpRing),
    /// Shared memory within hosts, a TCP ring of leaders across them.
    Hosts(Hosts),
}

/// One rank's part in the shared-memory paths.
#[derive(Debug)]
struct Hosts {
    topology: Topology,
    /// This rank's host.
    host: usize,
    /// The group of this rank's host; `None` when the rank is alone on its host.
    local: Option<ShmGroup>,
    /// The TCP ring of the hosts' leaders; only on leaders, and only with several hosts.
    across: Option<TcpRing>,
}

impl RingCommunicator {
    /// Joins the gang (see the module's comment): accepts and opens TCP links on `listener`,
    /// already bound to this rank's advertised address, until the settings' timeout. Cannot be
    /// interrupted; training code should use [`RingCommunicator::connect_with_stop`].
    pub fn connect(listener: TcpListener, settings: &GangSettings) -> Result<Self, CollectiveError> {
        Self::connect_with_stop(listener, settings, &AtomicBool::new(false))
    }

    /// [`RingCommunicator::connect`] that gives up with [`CollectiveError::Stopped`] soon after
    /// `stop` is set.
    pub fn connect_with_stop(listener: TcpListener, settings: &GangSettings, stop: &AtomicBool) -> Result<Self, CollectiveError> {
        Self::connect_in(listener, settings, stop, Path::new(SHM_DIR), PIECE_FLOATS)
    }

    /// [`RingCommunicator::connect_with_stop`] with the directory for shared segments and the
    /// floats per shared buffer (tests use a missing directory and small buffers).
    pub(crate) fn connect_in(
        listener: TcpListener,
        settings: &GangSettings,
        stop: &AtomicBool,
        dir: &Path,
        piece: usize,
    ) -> Result<Self, CollectiveError> {
        let mut ring = TcpRing::connect_with_stop(&listener, settings, stop)?;
        let (rank, world) = (ring.rank(), ring.world());
        let tcp = |ring| Ok(Self { rank, world, path: CollectivePath::Tcp(ring) });
        let topology = Topology::from_peers(&settings.peers);
        if topology.all_apart() {
            return tcp(ring);
        }
        let local = match share_memory(&mut ring, &topology, settings.timeout, dir, piece)? {
            Ok(local) => local,
            Err(reason) => {
                tracing::warn!(rank, %reason, "no shared memory between the ranks of this host: all-reducing over the tcp ring");
                return tcp(ring);
            }
        };
        drop(ring);
        let host = topology.host_of[rank];
        let across = if topology.hosts.len() > 1 && topology.local_rank(rank) == 0 {
            let leaders = GangSettings {
                rank: host,
                peers: topology.hosts.iter().map(|ranks| settings.peers[ranks[0]].clone()).collect(),
                // Distinct from the full ring's, so that no stray connection of that ring's setup
                // can pass for a leader.
                secret: format!("{}/leaders", settings.secret),
                timeout: settings.timeout,
            };
            Some(TcpRing::connect_with_stop(&listener, &leaders, stop)?)
        } else {
            None
        };
        tracing::debug!(
            rank,
            hosts = topology.hosts.len(),
            local = local.as_ref().map_or(1, ShmGroup::size),
            "collective over shared memory"
        );
        Ok(Self { rank, world, path: CollectivePath::Hosts(Hosts { topology, host, local, across }) })
    }

    /// Whether this rank's collectives go through shared memory (tests and benchmarks).
    pub fn uses_shared_memory(&self) -> bool {
        matches!(self.path, CollectivePath::Hosts(_))
    }
}

/// Floats per rank in the segment-name exchange: a flag (the leader created its segment), then
/// the name's random bytes, one per float (exact in any sum).
const NAME_ENTRY: usize = 1 + NAME_BYTES;

/// Sets up this rank's shared group over the gang's full ring (every rank calls it, in step):
/// each host's leader creates its segment and the ring all-gathers the names; the members map
/// their leader's; the ring all-gathers every rank's verdict; the leaders unlink their segments.
/// `Ok(Err(reason))` when some rank could not map its segment, so the gang stays on TCP.
fn share_memory(
    ring: &mut TcpRing,
    topology: &Topology,
    timeout: Duration,
    dir: &Path,
    piece: usize,
) -> Result<Result<Option<ShmGroup>, String>, CollectiveError> {
    let (rank, world) = (ring.rank(), ring.world());
    let members = &topology.hosts[topology.host_of[rank]];
    let local_rank = topology.local_rank(rank);
    let len = shm::segment_len(members.len(), piece);
    // All-gathers by all-reducing integers that only one rank sets.
    let mut names = vec![0f32; world * NAME_ENTRY];
    let mut mapped: Result<Option<Segment>, String> = Ok(None);
    if members.len() > 1 && local_rank == 0 {
        shm::sweep_orphans(dir);
        mapped = random_name()
            .and_then(|random| Ok((random, Segment::create(dir, &file_name(&random), len)?)))
            .map(|(random, segment)| {
                let entry = &mut names[rank * NAME_ENTRY..][..NAME_ENTRY];
                entry[0] = 1.0;
                entry[1..].iter_mut().zip(random).for_each(|(slot, byte)| *slot = f32::from(byte));
                Some(segment)
            })
            .map_err(|e| format!("cannot create a segment in {}: {e}", dir.display()));
    }
    ring.all_reduce_sum(&mut names)?;
    if members.len() > 1 && local_rank != 0 {
        let entry = &names[members[0] * NAME_ENTRY..][..NAME_ENTRY];
        mapped = if entry[0] == 1.0 {
            let mut random = [0u8; NAME_BYTES];
            random.iter_mut().zip(&entry[1..]).for_each(|(byte, &value)| *byte = value as u8);
            Segment::open(dir, &file_name(&random), len).map(Some).map_err(|e| format!("cannot map the host's segment: {e}"))
        } else {
            Err(format!("the host's leader, rank {}, could not create a segment", members[0]))
        };
    }
    let mut ready = vec![0f32; world];
    ready[rank] = if mapped.is_ok() { 1.0 } else { 0.0 };
    ring.all_reduce_sum(&mut ready)?;
    // Every member has mapped it or given up: nothing is left behind when a rank dies from here.
    if let Ok(Some(segment)) = &mut mapped {
        segment.unlink();
    }
    let unready: Vec<usize> = (0..world).filter(|&other| ready[other] != 1.0).collect();
    Ok(match mapped {
        Err(reason) => Err(reason),
        Ok(_) if !unready.is_empty() => Err(format!("ranks {unready:?} could not map their host's segment")),
        Ok(segment) => Ok(segment.map(|segment| ShmGroup::new(segment, local_rank, members.clone(), piece, timeout))),
    })
}

impl Hosts {
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if self.topology.hosts.len() == 1 {
            return self.local.as_mut().map_or(Ok(()), |local| local.all_reduce_sum(data, true));
        }
        for round in data.chunks_mut(ROUND_FLOATS) {
            if let Some(local) = self.local.as_mut() {
                local.all_reduce_sum(round, false)?;
            }
            if let Some(across) = self.across.as_mut() {
                let summed = across.all_reduce_sum(round);
                self.abort_on_error(summed)?;
            }
            if let Some(local) = self.local.as_mut() {
                local.broadcast(round, 0)?;
            }
        }
        Ok(())
    }

    /// Root's host broadcasts within itself, its leader across the leaders' ring, and the other
    /// hosts' leaders within theirs.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let root_host = self.topology.host_of[root];
        let root_local = self.topology.local_rank(root);
        for round in data.chunks_mut(ROUND_FLOATS) {
            if let (Some(local), true) = (self.local.as_mut(), self.host == root_host) {
                local.broadcast(round, root_local)?;
            }
            if let Some(across) = self.across.as_mut() {
                let sent = across.broadcast(round, root_host);
                self.abort_on_error(sent)?;
            }
            if let (Some(local), false) = (self.local.as_mut(), self.host == root_host) {
                local.broadcast(round, 0)?;
            }
        }
        Ok(())
    }

    /// A leader whose ring failed ends its host's waits at once.
    fn abort_on_error(&mut self, outcome: Result<(), CollectiveError>) -> Result<(), CollectiveError> {
        if outcome.is_err() {
            if let Some(local) = self.local.as_mut() {
                local.abort();
            }
        }
        outcome
    }
}

impl Communicator for RingCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        match &mut self.path {
            CollectivePath::Tcp(ring) => ring.all_reduce_sum(data),
            CollectivePath::Hosts(hosts) => hosts.all_reduce_sum(data),
        }
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Setup(format!("broadcast from rank {root} of {}", self.world)));
        }
        match &mut self.path {
            CollectivePath::Tcp(ring) => ring.broadcast(data, root),
            CollectivePath::Hosts(hosts) => hosts.broadcast(data, root),
        }
    }
}
