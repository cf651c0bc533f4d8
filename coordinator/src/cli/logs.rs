//! `coordinator logs`: the worker log lines the coordinator keeps for a sweep's trials.

use std::time::Duration;

use cohort_proto::v1 as pb;

use super::results;
use super::Client;

fn format_time(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let (h, m, s) = ((seconds / 3600) % 24, (seconds / 60) % 60, seconds % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", unix_ms.rem_euclid(1000))
}

/// Each task's trial name, by task id.
fn trial_names(sweep: &results::Results) -> std::collections::BTreeMap<String, String> {
    sweep.trials.iter().map(|t| (t.task_id.clone(), t.trial.clone())).collect()
}

/// Prints the log of a sweep (or of the trial named `trial`: a trial name or a task id); with
/// `follow`, keeps printing new lines until the sweep ends.
pub async fn print(client: &mut Client, sweep_id: &str, trial: Option<&str>, follow: bool) -> anyhow::Result<()> {
    let sweep = results::fetch(client, sweep_id).await?;
    let mut names = trial_names(&sweep);
    let task_id = match trial {
        Some(wanted) => Some(
            sweep
                .trials
                .iter()
                .find(|t| t.trial == wanted || t.task_id == wanted)
                .map(|t| t.task_id.clone())
                .ok_or_else(|| anyhow::anyhow!("sweep {sweep_id} has no trial {wanted}"))?,
        ),
        None => None,
    };
    let mut after_id = 0;
    let mut reconnect = results::Reconnect::default();
    loop {
        let request = pb::GetLogsRequest { sweep_id: sweep_id.to_string(), task_id: task_id.clone().unwrap_or_default(), after_id };
        let fetched = client.get_logs(request).await.map_err(super::rpc_error).map(|reply| reply.into_inner().entries);
        // Only a followed log rides out a coordinator it cannot reach for a while.
        let entries = match follow {
            true => match reconnect.outcome(fetched).await? {
                Some(entries) => entries,
                None => continue,
            },
            false => fetched?,
        };
        // A later stage planned since the names were read: read them again.
        if entries.iter().any(|entry| !names.contains_key(&entry.task_id)) {
            names = trial_names(&results::fetch_following(client, sweep_id, &mut reconnect).await?);
        }
        for entry in &entries {
            let line = entry.line.clone().unwrap_or_default();
            let name = names.get(&entry.task_id).map(String::as_str).unwrap_or(&entry.task_id);
            println!("{} {:<5} {name} (attempt {}) {}", format_time(line.unix_ms), line.level, entry.attempt, line.message);
            after_id = after_id.max(entry.id);
        }
        if !follow {
            return Ok(());
        }
        if entries.is_empty() && results::state_following(client, sweep_id, &mut reconnect).await? != "running" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
