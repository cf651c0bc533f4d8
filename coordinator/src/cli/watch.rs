//! `coordinator watch ID` and `submit --watch`: live progress of a sweep, a bar per stage and a
//! line per running trial (epoch, loss, samples/s, ETA), redrawn as the coordinator streams the
//! sweep's progress (`WatchSweep`); ends with the results.

use std::io::{IsTerminal, Write};

use cohort_proto::v1 as pb;

use super::follow;
use super::results::{self, TrialRow};

/// Width of a progress bar in characters.
const BAR: usize = 30;

fn bar(done: usize, total: usize) -> String {
    let filled = (done * BAR).checked_div(total).unwrap_or(0);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled))
}

fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// The main loss of a trial's last epoch, by its kind.
fn headline(trial: &TrialRow) -> String {
    let Some(last) = trial.epochs.last() else {
        return "starting".into();
    };
    let key = ["val_mse", "test_mse", "test_accuracy", "critic_loss", "train_mse"].into_iter().find(|k| last.values.contains_key(*k));
    match key {
        Some(key) => format!("{key} {:.5}", last.values[key]),
        None => String::new(),
    }
}

/// Mean epoch time over a trial's epochs.
fn mean_epoch_seconds(trial: &TrialRow) -> Option<f64> {
    if trial.epochs.is_empty() {
        return None;
    }
    Some(trial.epochs.iter().map(|e| e.seconds).sum::<f64>() / trial.epochs.len() as f64)
}

/// The lines describing a sweep's progress now: a bar per stage (with its time left, from the
/// epochs its unfinished trials have still to train at the stage's mean epoch time, spread over
/// its running trials, and why its next trial waits), and a line per running trial.
pub fn render(progress: &pb::SweepProgress) -> Vec<String> {
    let summary = progress.summary.clone().unwrap_or_default();
    let mut lines = vec![format!("sweep {} ({}): {}", summary.sweep_id, summary.name, follow::state_of(progress))];
    // A trial this CLI cannot read (a newer coordinator's) is left out of the live view.
    let running: Vec<TrialRow> = progress.running.iter().cloned().filter_map(|task| results::trial_row(task).ok()).collect();
    for stage in &progress.stages {
        let eta = match stage.mean_epoch_seconds {
            mean if mean > 0.0 && stage.remaining_epochs > 0 => {
                format!("  eta {}", duration(mean * stage.remaining_epochs as f64 / f64::from(stage.running.max(1))))
            }
            _ => String::new(),
        };
        let waiting = if stage.waiting.is_empty() { String::new() } else { format!("  ({})", stage.waiting) };
        lines.push(format!(
            "{:<9} {} {}/{} trials{eta}{waiting}",
            stage.stage,
            bar(stage.ended as usize, stage.total as usize),
            stage.ended,
            stage.total
        ));
        for trial in running.iter().filter(|t| t.stage == stage.stage) {
            let epochs = trial.epochs.len() as u32;
            let speed = trial.epochs.last().filter(|e| e.seconds > 0.0).map(|e| e.samples as f64 / e.seconds).unwrap_or(0.0);
            let eta = mean_epoch_seconds(trial)
                .map(|m| duration(m * f64::from(trial.planned_epochs.saturating_sub(epochs))))
                .unwrap_or_else(|| "?".into());
            let silent = if trial.waiting.is_empty() { String::new() } else { format!("  {}", trial.waiting) };
            lines.push(format!(
                "  {:<12} epoch {epochs}/{} {} {:>8.0} samples/s  eta {eta}  ({}){silent}",
                trial.trial,
                trial.planned_epochs,
                headline(trial),
                speed,
                trial.worker_names
            ));
        }
    }
    let hidden = summary.running as usize - running.len().min(summary.running as usize);
    if hidden > 0 {
        lines.push(format!("  … and {hidden} more running"));
    }
    lines
}

/// Follows the sweep as the coordinator streams its progress until it ends, then prints its
/// results; returns its final state.
pub async fn watch(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<String> {
    let mut stderr = std::io::stderr();
    let redraw = stderr.is_terminal();
    let mut previous: Vec<String> = Vec::new();
    let mut follower = follow::Follower::new(sweep_id, None);
    loop {
        let progress = follower.next(client).await?;
        let lines = render(&progress);
        if lines != previous {
            if redraw && !previous.is_empty() {
                write!(stderr, "\x1b[{}A\x1b[J", previous.len())?;
            }
            for line in &lines {
                writeln!(stderr, "{line}")?;
            }
            previous = lines;
        }
        let state = follow::state_of(&progress);
        if state != "running" {
            let mut reconnect = results::Reconnect::default();
            results::print_table(&results::fetch_following(client, sweep_id, &mut reconnect).await?);
            return Ok(state.to_string());
        }
    }
}
