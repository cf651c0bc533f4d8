//! Collectives among the ranks of a gang that share a host, through one shared mapping instead of
//! loopback TCP: no kernel copies, no socket buffers, only memory bandwidth.
//!
//! The mapping ([`segment`]) holds a header of control words and, for every rank, two buffers of
//! `piece` floats that only that rank writes. Data longer than a buffer is processed in pieces.
//! An all-reduce of one piece: every rank copies the piece into its buffer, then each rank reduces
//! its own 1/n slice by reading every rank's buffer in rank order (so the sum of a slice is
//! computed once, in one order, and every rank ends with bitwise identical values), writes the
//! sum back into its buffer, and finally copies the other ranks' reduced slices. Ranks meet at a
//! barrier between the phases; the two buffers alternate between pieces, so that writing a piece
//! never has to wait for the peers to finish reading the one before.
//!
//! A rank waiting at a barrier sleeps on a futex ([`futex`]) with the gang's timeout: a silent or
//! dead peer fails the collective instead of hanging it, and a rank whose collective fails raises
//! the header's abort word so that its peers fail at once rather than at their timeouts.

// Shared memory and futexes are system calls on raw memory; each unsafe block says why it is sound.
#![allow(unsafe_code)]

mod futex;
mod segment;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::ring::chunk;
use super::CollectiveError;
pub(crate) use segment::{file_name, random_name, sweep_orphans, Segment, NAME_BYTES, SHM_DIR};

/// Floats in one of a rank's two buffers (1 MiB): the piece an all-reduce or broadcast moves per
/// round of barriers. Meant to keep a 4-rank group's buffers in the last-level cache while moving
/// enough bytes per barrier to amortize its futex calls; not tuned beyond the benchmark in
/// docs/performance.md.
pub const PIECE_FLOATS: usize = 256 * 1024;

/// Bytes per control word: one cache line each, so that ranks announcing their arrival do not
/// contend for a line.
const LINE: usize = 64;

/// Control line holding the abort word: 0, or 1 + the local rank that failed.
const ABORT_LINE: usize = 0;

/// The bytes of a segment for `size` ranks with buffers of `piece` floats.
pub(crate) fn segment_len(size: usize, piece: usize) -> usize {
    header_len(size) + size * 2 * piece * std::mem::size_of::<f32>()
}

/// The header: the abort line, then one arrival line per rank, rounded up to a page.
fn header_len(size: usize) -> usize {
    ((1 + size) * LINE).div_ceil(4096) * 4096
}

/// One rank's handle on its host's shared group.
#[derive(Debug)]
pub struct ShmGroup {
    segment: Segment,
    /// This rank's index in the group.
    local_rank: usize,
    /// The gang rank of each member, by local rank (for errors).
    ranks: Vec<usize>,
    /// Floats per buffer.
    piece: usize,
    /// The longest wait on a peer.
    timeout: Duration,
    /// Barriers this rank has entered.
    epoch: u32,
    /// Pieces moved so far: its parity picks the buffer of the next one.
    phase: usize,
    /// A collective failed: the group's state is unknown, so every later call fails.
    failed: bool,
}

impl ShmGroup {
    /// Joins a group over `segment` (created or opened with [`segment_len`]`(ranks.len(), piece)`
    /// bytes, zero-filled by its creator) as local rank `local_rank`.
    pub(crate) fn new(segment: Segment, local_rank: usize, ranks: Vec<usize>, piece: usize, timeout: Duration) -> Self {
        debug_assert_eq!(segment.len(), segment_len(ranks.len(), piece));
        Self { segment, local_rank, ranks, piece, timeout, epoch: 0, phase: 0, failed: false }
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    #[cfg(test)]
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    #[cfg(test)]
    pub(crate) fn segment_path(&self) -> &std::path::Path {
        self.segment.path()
    }

    /// Replaces `data` on every member by the element-wise sum over members; with `everyone`
    /// false only local rank 0 receives the whole sum (the others keep a partial result), for a
    /// hierarchical all-reduce that broadcasts it later.
    pub fn all_reduce_sum(&mut self, data: &mut [f32], everyone: bool) -> Result<(), CollectiveError> {
        let piece = self.piece;
        self.guarded(|group| data.chunks_mut(piece).try_for_each(|part| group.reduce_piece(part, everyone)))
    }

    /// Replaces `data` on every member by local rank `root`'s.
    pub fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let piece = self.piece;
        self.guarded(|group| data.chunks_mut(piece).try_for_each(|part| group.broadcast_piece(part, root)))
    }

    /// Raises the abort word so that the peers' waits end now, and wakes them.
    pub fn abort(&mut self) {
        self.failed = true;
        self.word(ABORT_LINE).store(1 + self.local_rank as u32, Ordering::Release);
        for line in 0..=self.size() {
            futex::wake_all(self.word(line));
        }
    }

    /// Runs one collective; a failure poisons the group and aborts the peers' waits.
    fn guarded(&mut self, run: impl FnOnce(&mut Self) -> Result<(), CollectiveError>) -> Result<(), CollectiveError> {
        if self.failed {
            return Err(CollectiveError::Setup("an earlier collective of this shared-memory group failed".into()));
        }
        let outcome = run(self);
        if outcome.is_err() {
            self.abort();
        }
        outcome
    }

    fn word(&self, line: usize) -> &AtomicU32 {
        // SAFETY: the header holds `1 + size` lines inside the mapping, which lives as long as
        // self; each line starts with a 4-byte-aligned word that is only ever accessed atomically.
        unsafe { &*self.segment.base().add(line * LINE).cast::<AtomicU32>() }
    }

    /// Local rank `rank`'s buffer for piece number `phase`.
    fn buffer(&self, rank: usize, phase: usize) -> *mut f32 {
        let offset = header_len(self.size()) + (rank * 2 + phase % 2) * self.piece * std::mem::size_of::<f32>();
        // SAFETY: inside the mapping (see segment_len), f32-aligned since the header is page-sized.
        unsafe { self.segment.base().add(offset).cast() }
    }

    /// Local rank `rank`'s buffer for `phase`, elements `range`, to read. Sound while the
    /// barriers keep its writer away (see the module's comment).
    fn peer_slice(&self, rank: usize, phase: usize, range: std::ops::Range<usize>) -> &[f32] {
        debug_assert!(range.end <= self.piece);
        // SAFETY: in bounds of the buffer; not written by anyone between the barriers that
        // bracket this read.
        unsafe { std::slice::from_raw_parts(self.buffer(rank, phase).add(range.start), range.len()) }
    }

    /// Announces this rank's arrival and sleeps until every member has arrived; fails when a
    /// member stays away for the timeout or a member aborted.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.epoch = self.epoch.wrapping_add(1);
        let target = self.epoch;
        let own = self.word(1 + self.local_rank);
        own.store(target, Ordering::Release);
        futex::wake_all(own);
        for member in (0..self.size()).filter(|&member| member != self.local_rank) {
            let word = self.word(1 + member);
            let started = Instant::now();
            loop {
                let seen = word.load(Ordering::Acquire);
                // Arrived at this barrier (or, past it, at the next one).
                if seen.wrapping_sub(target) as i32 >= 0 {
                    break;
                }
                let aborted = self.word(ABORT_LINE).load(Ordering::Acquire);
                if aborted != 0 {
                    let peer = self.ranks.get(aborted as usize - 1).copied().unwrap_or(usize::MAX);
                    return Err(CollectiveError::Peer { peer, source: std::io::Error::other("its part of the collective failed") });
                }
                let left = self.timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "silent in the shared-memory group");
                    return Err(CollectiveError::Peer { peer: self.ranks[member], source });
                }
                futex::wait(word, seen, left);
            }
        }
        Ok(())
    }

    /// All-reduces one piece of at most `self.piece` floats (see the module's comment).
    fn reduce_piece(&mut self, part: &mut [f32], everyone: bool) -> Result<(), CollectiveError> {
        let (len, size, me) = (part.len(), self.size(), self.local_rank);
        let phase = self.phase;
        self.phase += 1;
        let own = chunk(len, size, me);
        let mine = self.buffer(me, phase);
        // SAFETY: this rank's own buffer, which no peer reads until the barrier below; `part`
        // is this process's memory and cannot overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(part.as_ptr(), mine, own.start);
            std::ptr::copy_nonoverlapping(part.as_ptr().add(own.end), mine.add(own.end), len - own.end);
        }
        self.barrier()?;
        {
            // SAFETY: this rank's own slice of its buffer: no peer reads it before the next barrier.
            let sum = unsafe { std::slice::from_raw_parts_mut(mine.add(own.start), own.len()) };
            for member in 0..size {
                let term = if member == me { &part[own.clone()] } else { self.peer_slice(member, phase, own.clone()) };
                if member == 0 {
                    sum.copy_from_slice(term);
                } else {
                    sum.iter_mut().zip(term).for_each(|(total, value)| *total += value);
                }
            }
            part[own.clone()].copy_from_slice(sum);
        }
        self.barrier()?;
        if everyone || me == 0 {
            for member in (0..size).filter(|&member| member != me) {
                let range = chunk(len, size, member);
                part[range.clone()].copy_from_slice(self.peer_slice(member, phase, range));
            }
        }
        Ok(())
    }

    /// Broadcasts one piece of at most `self.piece` floats from local rank `root`.
    fn broadcast_piece(&mut self, part: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let phase = self.phase;
        self.phase += 1;
        if self.local_rank == root {
            // SAFETY: this rank's own buffer, which no peer reads until the barrier below.
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), self.buffer(root, phase), part.len()) };
        }
        self.barrier()?;
        if self.local_rank != root {
            part.copy_from_slice(self.peer_slice(root, phase, 0..part.len()));
        }
        Ok(())
    }
}
