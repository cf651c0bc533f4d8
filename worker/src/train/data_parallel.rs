//! What data-parallel training adds to a recipe: each replica's rows of a global batch, the
//! initial broadcast of rank 0's variables, and gradient averaging in flat buckets.

use tch::{nn, Kind, Tensor};

use crate::collective::{host_copy, CollectiveError, Communicator};

/// Gradients are averaged in buckets of at most this many floats (8 MiB). One collective per
/// bucket instead of one per tensor: the seed's WGAN-GP has 24 parameter tensors, many tiny
/// (norm weights of a few hundred floats), whose per-message latency would dominate; 8 MiB is
/// large enough that a ring step's latency is small against its transfer time on any network,
/// and small enough that the two staging copies stay far below the model's own memory.
pub const BUCKET_FLOATS: usize = 2 << 20;

/// This replica's place in the gang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Rank, `0..world`.
    pub rank: usize,
    /// Replicas.
    pub world: usize,
}

impl Shard {
    /// A single replica (no data parallelism).
    pub const SOLE: Shard = Shard { rank: 0, world: 1 };

    /// This replica's rows of a global batch of `global` rows (which `world` divides).
    pub fn rows(&self, global: i64) -> (i64, i64) {
        let per = global / self.world as i64;
        (self.rank as i64 * per, per)
    }

    /// This replica's slice of a global batch tensor.
    pub fn slice(&self, batch: &Tensor) -> Tensor {
        let (start, len) = self.rows(batch.size()[0]);
        batch.narrow(0, start, len)
    }
}

/// Packs `tensors` into one flat float32 tensor on their device.
fn pack(tensors: &[&Tensor]) -> Tensor {
    let flats: Vec<Tensor> = tensors.iter().map(|t| t.detach().flatten(0, -1).to_kind(Kind::Float)).collect();
    Tensor::cat(&flats, 0)
}

/// Copies a packed bucket back into the tensors it was packed from.
fn unpack(flat: &Tensor, tensors: &mut [Tensor]) {
    let mut offset = 0;
    tch::no_grad(|| {
        for tensor in tensors {
            let len = tensor.numel() as i64;
            let part = flat.narrow(0, offset, len).view(tensor.size().as_slice()).to_kind(tensor.kind());
            tensor.copy_(&part);
            offset += len;
        }
    });
}

/// Makes every replica start from rank 0's variables (weights and BatchNorm buffers).
pub fn broadcast_variables(comm: &mut dyn Communicator, vars: &nn::VarStore) -> Result<(), CollectiveError> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    for bucket in buckets(tensors.iter().map(Tensor::numel)) {
        let mut flat = pack(&tensors[bucket.clone()].iter().collect::<Vec<_>>());
        comm.broadcast_tensor(&mut flat, 0)?;
        let mut targets: Vec<Tensor> = tensors[bucket].iter().map(Tensor::shallow_clone).collect();
        unpack(&flat, &mut targets);
    }
    Ok(())
}

/// Replaces every parameter's gradient by its mean over the replicas.
pub fn average_gradients(comm: &mut dyn Communicator, params: &[Tensor]) -> Result<(), CollectiveError> {
    let world = comm.world() as f64;
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    for bucket in buckets(grads.iter().map(Tensor::numel)) {
        let mut flat = pack(&grads[bucket.clone()].iter().collect::<Vec<_>>());
        let metrics = crate::metrics::metrics();
        let timer = metrics.all_reduce_seconds.start_timer();
        comm.all_reduce_sum_tensor(&mut flat)?;
        timer.observe_duration();
        metrics.all_reduce_bytes.inc_by(flat.numel() as u64 * 4);
        let flat = flat / world;
        let mut targets: Vec<Tensor> = grads[bucket].iter().map(Tensor::shallow_clone).collect();
        unpack(&flat, &mut targets);
    }
    Ok(())
}

/// Groups consecutive tensors (by size) into buckets of at most [`BUCKET_FLOATS`] (a larger
/// tensor gets a bucket of its own). Returns index ranges.
fn buckets(sizes: impl Iterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut filled, mut count) = (0, 0, 0);
    for (index, size) in sizes.enumerate() {
        if filled > 0 && filled + size > BUCKET_FLOATS {
            ranges.push(start..index);
            start = index;
            filled = 0;
        }
        filled += size;
        count = index + 1;
    }
    if count > start {
        ranges.push(start..count);
    }
    ranges
}

/// Every replica's value of a scalar, by rank (an all-gather built on the all-reduce).
pub fn gather_scalar(comm: &mut dyn Communicator, value: f32) -> Result<Vec<f32>, CollectiveError> {
    let mut slots = vec![0f32; comm.world()];
    slots[comm.rank()] = value;
    comm.all_reduce_sum(&mut slots)?;
    Ok(slots)
}

/// A checksum of every variable (bitwise identical variables give identical checksums).
pub fn checksum(vars: &nn::VarStore) -> f32 {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.iter().map(|(_, t)| host_copy(t).iter().enumerate().map(|(i, v)| v * (1.0 + (i % 7) as f32)).sum::<f32>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn buckets_group_small_tensors_and_isolate_large_ones() {
        assert_eq!(buckets([10, 20, 30].into_iter()), vec![0..3]);
        assert_eq!(buckets([BUCKET_FLOATS - 5, 10, 3].into_iter()), vec![0..1, 1..3]);
        assert_eq!(buckets([3 * BUCKET_FLOATS, 1].into_iter()), vec![0..1, 1..2]);
        assert!(buckets(std::iter::empty()).is_empty());
    }

    #[test]
    fn shards_split_a_global_batch_evenly() {
        let batch = Tensor::arange(8, (Kind::Float, Device::Cpu));
        let parts: Vec<Vec<f32>> = (0..4).map(|rank| host_copy(&Shard { rank, world: 4 }.slice(&batch))).collect();
        assert_eq!(parts, vec![vec![0., 1.], vec![2., 3.], vec![4., 5.], vec![6., 7.]]);
        assert_eq!(Shard::SOLE.rows(8), (0, 8));
    }
}
