//! Choosing a cross-validation winner: per config, the mean over folds of each trial's minimum
//! validation MSE; the lowest mean wins. Ties go to the config listed first in the grid.

/// One finished fold of one config.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldResult {
    /// The config's label.
    pub config: String,
    /// Fold index.
    pub fold: u32,
    /// Minimum validation MSE over the trial's epochs; `None` when the trial has no result.
    pub min_val_mse: Option<f64>,
}

/// A config's cross-validation figures (also a row of `results --format json` and the report).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConfigSummary {
    /// The config's label.
    pub config: String,
    /// Minimum validation MSE per fold, in fold order (`None`: no result).
    pub folds: Vec<Option<f64>>,
    /// Mean over folds (only when every fold has a result).
    pub mean: Option<f64>,
    /// Sample standard deviation over folds (n−1; 0 for a single fold).
    pub std: Option<f64>,
    /// The lowest mean among complete configs.
    pub winner: bool,
}

/// Summarizes folds by config, keeping the order in which configs first appear.
pub fn summarize(results: &[FoldResult]) -> Vec<ConfigSummary> {
    let mut summaries: Vec<ConfigSummary> = Vec::new();
    // Each config's row by label: a sweep may hold 25,000 configs, too many to search linearly.
    let mut rows: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for result in results {
        let index = *rows.entry(result.config.as_str()).or_insert_with(|| {
            summaries.push(ConfigSummary { config: result.config.clone(), folds: vec![], mean: None, std: None, winner: false });
            summaries.len() - 1
        });
        let folds = &mut summaries[index].folds;
        let slot = result.fold as usize;
        if folds.len() <= slot {
            folds.resize(slot + 1, None);
        }
        folds[slot] = result.min_val_mse;
    }
    for summary in &mut summaries {
        let values: Option<Vec<f64>> = summary.folds.iter().copied().collect();
        let Some(values) = values.filter(|v| !v.is_empty()) else {
            continue;
        };
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        summary.mean = Some(mean);
        summary.std = Some(variance.sqrt());
    }
    let best =
        summaries.iter().enumerate().filter_map(|(i, s)| s.mean.map(|m| (i, m))).fold(
            None,
            |best: Option<(usize, f64)>, (i, m)| match best {
                Some((_, best_mean)) if best_mean <= m => best,
                _ => Some((i, m)),
            },
        );
    if let Some((index, _)) = best {
        summaries[index].winner = true;
    }
    summaries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(config: &str, fold: u32, v: Option<f64>) -> FoldResult {
        FoldResult { config: config.into(), fold, min_val_mse: v }
    }

    #[test]
    fn lowest_complete_mean_wins_and_ties_go_first() {
        let summaries = summarize(&[
            r("a", 0, Some(0.3)),
            r("a", 1, Some(0.1)),
            r("b", 1, Some(0.1)),
            r("b", 0, Some(0.3)),
            r("c", 0, Some(0.01)),
            r("c", 1, None),
        ]);
        assert_eq!(summaries.len(), 3);
        assert_eq!(summaries[0].mean, Some(0.2));
        assert!((summaries[0].std.unwrap() - 0.1414213562).abs() < 1e-9);
        assert!(summaries[0].winner, "a and b tie; a is listed first");
        assert!(!summaries[1].winner);
        assert_eq!(summaries[1].folds, vec![Some(0.3), Some(0.1)]);
        assert_eq!(summaries[2].mean, None, "an incomplete config has no mean and cannot win");
    }
}
