//! `coordinator watch ID` and `submit --watch`: live progress of a sweep, a bar per stage and a
//! line per running trial (epoch, loss, samples/s, ETA), redrawn as metrics stream in; ends
//! with the results.

use std::io::{IsTerminal, Write};
use std::time::Duration;


use super::results::{self, Results, TrialRow};

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

/// The lines describing a sweep's progress now.
pub fn render(results: &Results) -> Vec<String> {
    let mut lines = vec![format!("sweep {} ({}): {}", results.sweep_id, results.name, results.state)];
    for stage in results.stages() {
        let trials = results.stage_trials(stage);
        let done = trials.iter().filter(|t| matches!(t.state.as_str(), "succeeded" | "failed" | "cancelled")).count();
        let running: Vec<&&TrialRow> = trials.iter().filter(|t| t.state == "running").collect();
        // Stage ETA: remaining epochs of all unfinished trials at the observed mean epoch time,
        // spread over the trials running in parallel.
        let epoch_seconds: Vec<f64> = trials.iter().filter_map(|t| mean_epoch_seconds(t)).collect();
        let mean = (!epoch_seconds.is_empty()).then(|| epoch_seconds.iter().sum::<f64>() / epoch_seconds.len() as f64);
        let remaining_epochs: usize =
            trials.iter().filter(|t| matches!(t.state.as_str(), "queued" | "running")).map(|t| t.planned_epochs.saturating_sub(t.epochs.len() as u32) as usize).sum();
        let eta = match mean {
            Some(mean) if remaining_epochs > 0 => format!("  eta {}", duration(mean * remaining_epochs as f64 / running.len().max(1) as f64)),
            _ => String::new(),
        };
        // Why the stage's next trial has not started (the first queued trial's reason).
        let waiting = trials.iter().find(|t| t.state == "queued" && !t.waiting.is_empty()).map(|t| format!("  ({})", t.waiting)).unwrap_or_default();
        lines.push(format!("{stage:<9} {} {done}/{} trials{eta}{waiting}", bar(done, trials.len()), trials.len()));
        for trial in running {
            let epochs = trial.epochs.len() as u32;
            let speed = trial.epochs.last().filter(|e| e.seconds > 0.0).map(|e| e.samples as f64 / e.seconds).unwrap_or(0.0);
            let eta = mean_epoch_seconds(trial).map(|m| duration(m * f64::from(trial.planned_epochs.saturating_sub(epochs)))).unwrap_or_else(|| "?".into());
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
    lines
}

/// Follows the sweep until it ends, then prints its results; returns its final state.
pub async fn watch(client: &mut super::Client, sweep_id: &str) -> anyhow::Result<String> {
    let mut stderr = std::io::stderr();
    let redraw = stderr.is_terminal();
    let mut previous: Vec<String> = Vec::new();
    let mut reconnect = results::Reconnect::default();
    loop {
        let current = results::fetch_following(client, sweep_id, &mut reconnect).await?;
        let lines = render(&current);
        if lines != previous {
            if redraw && !previous.is_empty() {
                write!(stderr, "\x1b[{}A\x1b[J", previous.len())?;
            }
            for line in &lines {
                writeln!(stderr, "{line}")?;
            }
            previous = lines;
        }
        if current.state != "running" {
            results::print_table(&current);
            return Ok(current.state);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
