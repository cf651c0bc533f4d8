//! What the daemon gathers for a command trial before it starts: its files fetched by hash,
//! the gang's meeting point, the device and thread share it passes on.

use std::path::{Path, PathBuf};

use tch::Device;

use super::{CommandInputs, Rendezvous};
use crate::blobs::BlobCache;
use crate::client::WorkerClient;
use crate::config::WorkerConfig;
use crate::task::Task;
use crate::train::{GangInputs, TrainError};

/// Fetches the task's `[command] files` into the blob cache and describes its run: the dataset
/// folder (when it has files), the checkpoint to resume from, and, for a gang, rank 0's address
/// and port (its collective listener, closed here so the program's own store can bind it).
pub async fn inputs(
    client: &mut WorkerClient,
    cache: &BlobCache,
    config: &WorkerConfig,
    task: &Task,
    dataset_root: &Path,
    resume_from: Option<PathBuf>,
    gang: Option<GangInputs>,
) -> Result<CommandInputs, TrainError> {
    let command = task.spec.command.as_ref().ok_or_else(|| TrainError::Invalid("a command trial without its program".into()))?;
    let mut files = Vec::with_capacity(command.files.len());
    for (name, blob) in &command.files {
        let path = cache.ensure(client, blob).await.map_err(|error| {
            TrainError::Infrastructure(format!("cannot fetch command file {name}: {}", cohort_proto::errors::error_chain(&error)))
        })?;
        files.push((name.clone(), path));
    }
    let rendezvous = match gang {
        Some(gang) => Some(meeting_point(&gang.settings.peers)?),
        None => None,
    };
    let cuda_visible_devices = match config.device {
        Device::Cuda(index) => index.to_string(),
        _ => String::new(),
    };
    Ok(CommandInputs {
        files,
        data_dir: (!task.spec.dataset.files.is_empty()).then(|| dataset_root.to_path_buf()),
        resume_from,
        run_root: config.cache_dir.join("runs").join(format!("{}-a{}-r{}", task.id, task.attempt, task.rank)),
        scratch_dir: cache.scratch_dir(),
        rendezvous,
        cuda_visible_devices,
        // The worker's share of the host's cores (`--threads`, auto by default), as libtorch's own
        // training would take it.
        threads: config.threads.as_ref().map_or_else(|| usize::try_from(tch::get_num_threads()).unwrap_or(1), |plan| plan.threads()).max(1),
    })
}

/// `MASTER_ADDR` and `MASTER_PORT` from the gang's addresses: rank 0's.
fn meeting_point(peers: &[String]) -> Result<Rendezvous, TrainError> {
    let first = peers.first().ok_or_else(|| TrainError::Collective("the rendezvous named no rank 0".into()))?;
    let (host, port) = first.rsplit_once(':').ok_or_else(|| TrainError::Collective(format!("rank 0's address {first:?} has no port")))?;
    let master_port = port.parse().map_err(|_| TrainError::Collective(format!("rank 0's address {first:?} has no port")))?;
    Ok(Rendezvous { master_addr: host.trim_matches(|c| c == '[' || c == ']').to_string(), master_port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zeros_address_is_the_meeting_point() {
        assert_eq!(
            meeting_point(&["10.1.2.3:4567".into(), "10.1.2.4:1".into()]).unwrap(),
            Rendezvous { master_addr: "10.1.2.3".into(), master_port: 4567 }
        );
        assert_eq!(meeting_point(&["[::1]:80".into()]).unwrap().master_addr, "::1");
        assert!(meeting_point(&[]).is_err());
    }
}
