//! What data-parallel training adds to a recipe: joining the gang, each replica's rows of a
//! global batch, the initial broadcast of rank 0's variables, gradient averaging in flat buckets,
//! and sums of epoch figures over the gang.

use tch::{nn, Kind, Tensor};

use super::{RunInputs, TrainError};
use crate::collective::nccl::NcclCommunicator;
use crate::collective::ring::RingCommunicator;
use crate::collective::{host_copy, Backend, CollectiveError, Communicator};

impl From<CollectiveError> for TrainError {
    fn from(error: CollectiveError) -> Self {
        match error {
            CollectiveError::Stopped => TrainError::Stopped,
            error => TrainError::Collective(error.to_string()),
        }
    }
}

/// This replica's place in the gang and the gang's communicator, when the task runs on several
/// replicas (`inputs.gang`); [`Shard::SOLE`] and no communicator otherwise.
/// Setting `stop` while the ring forms (the task was cancelled or its lease lost) ends the wait.
pub fn join_gang(
    inputs: &RunInputs<'_>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(Shard, Option<Box<dyn Communicator>>), TrainError> {
    let Some(gang) = inputs.gang else {
        return Ok((Shard::SOLE, None));
    };
    let settings = &gang.settings;
    let comm: Box<dyn Communicator> = match gang.backend {
        Backend::Ring => {
            let listener = gang.listener.try_clone().map_err(|e| TrainError::Collective(format!("listener: {e}")))?;
            Box::new(RingCommunicator::connect_with_stop(listener, settings, stop)?)
        }
        Backend::Nccl => Box::new(NcclCommunicator::new(settings.rank, settings.peers.len(), &gang.nccl_id, inputs.device)?),
    };
    Ok((Shard { rank: comm.rank(), world: comm.world() }, Some(comm)))
}

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

    /// This replica's rows of a global batch of `global` rows: (first row, count). The shares
    /// are as equal as possible: the first `global % world` replicas take one row more (a
    /// replica gets none when the batch has fewer rows than the gang has replicas).
    pub fn rows(&self, global: i64) -> (i64, i64) {
        let (world, rank) = (self.world as i64, self.rank as i64);
        let (per, extra) = (global / world, global % world);
        (rank * per + rank.min(extra), per + i64::from(rank < extra))
    }

    /// The factor on this replica's mean loss over its `rows` of a global batch of `global` rows
    /// that makes the gang's averaged gradient the gradient of the global batch's mean loss:
    /// `rows × world / global` (1 for equal shares; 0 for an empty share).
    pub fn loss_scale(&self, rows: i64, global: i64) -> f64 {
        (rows * self.world as i64) as f64 / global as f64
    }

    /// The loss this replica back-propagates for its `rows` of a global batch of `global` rows,
    /// given `mean`, its mean loss over those rows, and `output`, the model's output on them:
    /// `mean` × [`Shard::loss_scale`], so that the gang's averaged gradients are the gradients of
    /// the global batch's mean loss, uneven shares included. An empty share back-propagates zero
    /// through `output` (its mean is NaN), so its gradients exist and match the others' buckets.
    /// A sole replica back-propagates `mean` itself.
    pub fn share_of_loss(&self, mean: &Tensor, output: &Tensor, rows: i64, global: i64) -> Tensor {
        if self.world == 1 {
            return mean.shallow_clone();
        }
        if rows == 0 {
            return output.sum(Kind::Float) * 0.0;
        }
        mean * self.loss_scale(rows, global)
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

/// Sums figures over the gang, element-wise, in float64: every replica gets the same sums, in
/// rank order, within float64 rounding of the exact ones (each value crosses the float32
/// collective as a high and a low float32 part, in slots of its own, so nothing is rounded to
/// float32 on the way). Without a gang, the values themselves.
pub fn sum_over_gang(comm: Option<&mut (dyn Communicator + 'static)>, values: &[f64]) -> Result<Vec<f64>, CollectiveError> {
    let Some(comm) = comm else {
        return Ok(values.to_vec());
    };
    let width = 2 * values.len();
    let mut slots = vec![0f32; width * comm.world()];
    for (index, &value) in values.iter().enumerate() {
        let high = value as f32;
        let low = (value - f64::from(high)) as f32;
        slots[comm.rank() * width + 2 * index] = high;
        slots[comm.rank() * width + 2 * index + 1] = low;
    }
    // Every slot but one per rank is zero, so the float32 sums are exact.
    comm.all_reduce_sum(&mut slots)?;
    let sums = (0..values.len())
        .map(|index| slots.chunks(width).map(|part| f64::from(part[2 * index]) + f64::from(part[2 * index + 1])).sum())
        .collect();
    Ok(sums)
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

    #[test]
    fn uneven_batches_split_as_equally_as_possible() {
        let shares = |global, world| (0..world).map(|rank| Shard { rank, world }.rows(global)).collect::<Vec<_>>();
        assert_eq!(shares(5, 2), vec![(0, 3), (3, 2)]);
        assert_eq!(shares(7, 3), vec![(0, 3), (3, 2), (5, 2)]);
        assert_eq!(shares(1, 2), vec![(0, 1), (1, 0)]);
        let scales: Vec<f64> =
            shares(5, 2).iter().enumerate().map(|(rank, &(_, rows))| Shard { rank, world: 2 }.loss_scale(rows, 5)).collect();
        assert_eq!(scales, vec![1.2, 0.8]);
        assert_eq!(Shard { rank: 1, world: 2 }.loss_scale(0, 1), 0.0);
        assert_eq!(Shard::SOLE.loss_scale(9, 9), 1.0);
    }

    #[test]
    fn sums_over_the_gang_keep_float64_precision() {
        let values = [[1.0 + 1e-12, 1e9 + 0.25], [2.0 + 3e-12, -0.125]];
        let ring = crate::collective::ring::local_ring(2, "sums", std::time::Duration::from_secs(10)).unwrap();
        let sums: Vec<Vec<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ring
                .into_iter()
                .zip(values)
                .map(|(mut member, mine)| scope.spawn(move || sum_over_gang(Some(&mut member), &mine).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums[0], sums[1], "every replica gets the same sums");
        assert!((sums[0][0] - (3.0 + 4e-12)).abs() < 1e-15, "{}", sums[0][0]);
        assert!((sums[0][1] - (1e9 + 0.125)).abs() < 1e-6, "{}", sums[0][1]);
        assert_eq!(sum_over_gang(None, &[0.1, 0.2]).unwrap(), vec![0.1, 0.2]);
    }
}
