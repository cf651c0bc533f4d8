//! The sweep file: one TOML document describing one experiment (see docs/sweep.md).
//!
//! Parsing is strict: unknown keys and wrong types are errors that name the file, line, column
//! and key. [`SweepFile::parse`] is the only way in, so everything past it is valid.
//!
//! Layout: [`schema`] holds the tables as serde reads them, `check.rs` the checks of their
//! values, [`search`] the expansion of `[cv.grid]` and `[cv.random]` into configs (it reads
//! only the schema), this file the entry point, the limits and the error messages.

mod check;
pub mod schema;
pub mod search;
#[cfg(test)]
pub(crate) mod tests;

use crate::domain::TrainingConfig;
use check::Checker;
pub use schema::*;

/// Why a sweep file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The TOML does not parse or does not fit the schema (the message carries line and column).
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// toml's message, with line, column and key.
        message: String,
    },
    /// A value is out of range or the parts of the file disagree.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The offending key, dotted (`cv.grid.lr`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The most augmented copies `[augment] copies` may append: each is a whole training set more
/// for every trial's worker to hold.
pub const MAX_AUGMENT_COPIES: u32 = 16;

/// The largest latent code (`[model] latent`, and `latent` in `[cv.grid]` or `[cv.random]`).
pub const MAX_LATENT: u32 = 4096;

/// The most characters of one line of the sweep file (or of one line of a message) that an
/// error echoes; past it the line is cut, around the error's column, and the cut marked "…".
/// Errors travel back in a gRPC status, whose header one long line would overflow.
pub const MAX_ECHOED_LINE_CHARS: usize = 200;

/// The default largest number of trials one sweep may expand to (`serve --max-trials`).
pub const DEFAULT_MAX_TRIALS: usize = 10_000;
/// No configuration lets a sweep expand past this.
pub const HARD_MAX_TRIALS: usize = 1_000_000;

impl SweepFile {
    /// Parses and validates a sweep file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SweepError> {
        let sweep: SweepFile =
            toml::from_str(text).map_err(|e| SweepError::Syntax { file: file.to_string(), message: syntax_message(&e, text) })?;
        sweep.validate(file)?;
        Ok(sweep)
    }

    /// True for the WGAN-GP experiment, false for the autoencoder one.
    pub fn is_gan(&self) -> bool {
        self.model.kind == "wgan-gp"
    }

    /// True for a command sweep (the user's own program, `[command]`).
    pub fn is_command(&self) -> bool {
        self.model.kind == "command"
    }

    /// Whether the file has a `[dataset]` (only a command sweep may go without).
    pub fn has_dataset(&self) -> bool {
        !self.dataset.path.is_empty()
    }

    /// The metric cross-validation minimises: `[command] metric`, else the recipes' `val_mse`.
    pub fn selection_metric(&self) -> &str {
        self.command.as_ref().filter(|_| self.is_command()).map_or("val_mse", |c| c.metric.as_str())
    }

    /// The cross-validation configs (empty without `[cv]`): [`crate::sweep::search`] over `[cv.grid]`
    /// or `[cv.random]`.
    pub fn cv_configs(&self) -> Vec<TrainingConfig> {
        self.cv.as_ref().map(|cv| search::configs(self, cv)).unwrap_or_default()
    }

    /// Checks the sweep's name against the coordinator's limit on names.
    pub fn check_name_limit(&self, file: &str, max_name_bytes: usize) -> Result<(), SweepError> {
        Checker { file }.require(self.name.len() <= max_name_bytes, "name", || {
            format!("{} bytes, more than the limit of {max_name_bytes}", self.name.len())
        })
    }

    /// Checks the number of trials the sweep's first stage expands to against `max_trials`.
    pub fn check_trial_limit(&self, file: &str, max_trials: usize) -> Result<(), SweepError> {
        let trials = if self.is_command() {
            crate::command::first_stage_trials(self)
        } else {
            self.cv.as_ref().map_or(1, |cv| self.cv_configs().len() * cv.folds as usize)
        };
        Checker { file }.require(trials <= max_trials, "cv", || format!("expands to {trials} trials, more than the limit of {max_trials}"))
    }

    /// Checks what only the dataset can tell: a batch must fit in the training part of a fold.
    pub fn check_against_dataset(&self, file: &str, train_samples: u64) -> Result<(), SweepError> {
        let usable = match self.dataset.train_limit {
            0 => train_samples,
            limit => limit.min(train_samples),
        };
        let check = Checker { file };
        if let Some(cv) = &self.cv {
            let folds = u64::from(cv.folds);
            let fold_train = usable - usable.div_ceil(folds);
            if let Some(largest) = self.cv_configs().iter().map(|h| h.batch_size).max() {
                check.require(u64::from(largest) <= fold_train, "cv.grid.batch_size", || {
                    format!("batch size {largest} is larger than a fold's {fold_train} training samples")
                })?;
            }
        }
        if let Some(batch) = self.final_stage.as_ref().and_then(|f| f.batch_size) {
            check.require(u64::from(batch) <= usable, "final.batch_size", || {
                format!("batch size {batch} is larger than the {usable} training samples")
            })?;
        }
        if let Some(finetune) = &self.finetune {
            check.require(u64::from(finetune.batch_size) <= usable, "finetune.batch_size", || {
                format!("batch size {} is larger than the {usable} training samples", finetune.batch_size)
            })?;
        }
        Ok(())
    }
}

/// toml's message for a parse error, with the offending line of `text` and every line of the
/// message cut to [`MAX_ECHOED_LINE_CHARS`]. The line keeps the part around the error's column,
/// so the caret still points at it.
fn syntax_message(error: &toml::de::Error, text: &str) -> String {
    let full = error.to_string();
    if full.lines().all(|line| line.chars().count() <= MAX_ECHOED_LINE_CHARS) {
        return full.trim_end().to_string();
    }
    let Some(start) = error.span().map(|span| span.start.min(text.len())).filter(|&start| text.is_char_boundary(start)) else {
        return cut_long_lines(full.trim_end());
    };
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |newline| start + newline);
    let line_number = text[..line_start].matches('\n').count() + 1;
    let content: Vec<char> = text[line_start..line_end].trim_end_matches('\r').chars().collect();
    let column = text[line_start..start].chars().count();

    // A window of the line around the column, marked "…" where it was cut.
    let window_start = column.saturating_sub(MAX_ECHOED_LINE_CHARS / 2).min(content.len().saturating_sub(MAX_ECHOED_LINE_CHARS));
    let window_end = (window_start + MAX_ECHOED_LINE_CHARS).min(content.len());
    let mut shown = String::new();
    if window_start > 0 {
        shown.push('…');
    }
    shown.extend(&content[window_start..window_end]);
    if window_end < content.len() {
        shown.push('…');
    }
    let caret = column - window_start + usize::from(window_start > 0);

    let gutter = " ".repeat(line_number.to_string().len() + 1);
    let mut message = format!(
        "TOML parse error at line {line_number}, column {}\n{gutter}|\n{line_number} | {shown}\n{gutter}|{}^\n",
        column + 1,
        " ".repeat(caret + 1)
    );
    message.push_str(&cut_long_lines(error.message().trim_end()));
    message
}

/// `text` with every line longer than [`MAX_ECHOED_LINE_CHARS`] cut there and marked "…".
pub(super) fn cut_long_lines(text: &str) -> String {
    if text.lines().all(|line| line.chars().count() <= MAX_ECHOED_LINE_CHARS) {
        return text.to_string();
    }
    let cut: Vec<String> = text
        .lines()
        .map(|line| match line.char_indices().nth(MAX_ECHOED_LINE_CHARS) {
            Some((end, _)) => format!("{}…", &line[..end]),
            None => line.to_string(),
        })
        .collect();
    cut.join("\n")
}
