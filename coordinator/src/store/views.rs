//! Read-only queries for the web console: the parts of a sweep a page shows, each bounded by what
//! it shows (a page of trials, one trial's curves, counts grouped in SQL), so that a sweep of
//! 100,000 trials is never read whole to draw one screen.

use std::collections::HashMap;

use rusqlite::params;

use super::{parse_values, Store, StoreError};

/// SQL for a task's stage, read off the front of its spec: specs are stored as serde's JSON of
/// [`crate::domain::TrialSpec`], whose first field is the stage (`{"stage":"cv",…`), so no JSON
/// is parsed (on 100,000 tasks, parsing each spec takes most of a second); anything else falls
/// back to `json_extract`.
macro_rules! stage_of {
    ($spec:literal) => {
        concat!(
            "(CASE WHEN substr(",
            $spec,
            ", 1, 10) = '{\"stage\":\"' THEN substr(",
            $spec,
            ", 11, instr(substr(",
            $spec,
            ", 11), '\"') - 1) ",
            "ELSE json_extract(",
            $spec,
            ", '$.stage') END)"
        )
    };
}

/// A sweep's row without its source text, with its tasks counted by state.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    /// Sweep id.
    pub id: String,
    /// Submission order.
    pub seq: u64,
    /// Name from the file.
    pub name: String,
    /// Submission time, Unix milliseconds.
    pub created_ms: i64,
    /// Cancelled by the user.
    pub cancelled: bool,
    /// Tasks by state name (`queued`, `running`, …).
    pub counts: HashMap<String, u32>,
}

/// A stage's tasks by state, and where the stage's tasks lie in the sweep's order.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRow {
    /// Stage name.
    pub stage: String,
    /// Lowest task order in it (stages are planned one after another).
    pub first_order: i64,
    /// Tasks by state name.
    pub counts: HashMap<String, u32>,
    /// Seconds of training its finished trials took in all, and how many trials that is.
    pub finished_seconds: (f64, u32),
}

/// Where a stage's tasks lie in the sweep's plan order (a stage's tasks are planned together
/// and numbered on contiguously).
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpan {
    /// Stage name.
    pub stage: String,
    /// Its first task's order.
    pub first: i64,
    /// Its last task's order.
    pub last: i64,
}

/// A trial as a list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRow {
    /// Task id.
    pub id: String,
    /// The trial's spec (JSON).
    pub spec: String,
    /// State name.
    pub state: String,
    /// Current attempt.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Workers holding it (a gang has several).
    pub members: Vec<String>,
    /// Why it last failed.
    pub error: Option<String>,
    /// Epochs reported.
    pub epochs: u32,
    /// The last reported epoch's values.
    pub last_values: Vec<(String, f64)>,
}

/// One epoch of one trial of a stage, with the trial's config and fold.
#[derive(Debug, Clone, PartialEq)]
pub struct StageEpoch {
    /// Task id.
    pub task_id: String,
    /// Config label.
    pub config: String,
    /// Fold index (none outside cross-validation).
    pub fold: Option<u32>,
    /// Epoch number.
    pub epoch: u32,
    /// Values.
    pub values: Vec<(String, f64)>,
}

/// A stage's task with its config and fold, for the cross-validation table.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldTask {
    /// Task id.
    pub task_id: String,
    /// Config label.
    pub config: String,
    /// Fold index.
    pub fold: Option<u32>,
    /// State name.
    pub state: String,
}

/// Counts by state, keyed by the states' names (as the console's JSON shows them).
fn by_name(states: &[(crate::domain::TaskState, u32)]) -> HashMap<String, u32> {
    states.iter().map(|(state, count)| (state.as_str().to_string(), *count)).collect()
}

impl Store {
    /// Every sweep, oldest first, with its tasks counted by state: two queries.
    pub fn sweep_rows(&self) -> Result<Vec<SweepRow>, StoreError> {
        let mut counts: HashMap<String, HashMap<String, u32>> =
            self.state_counts()?.into_iter().map(|(sweep_id, states)| (sweep_id, by_name(&states))).collect();
        let mut query = self.conn.prepare_cached("SELECT id, seq, name, created_ms, cancelled FROM sweeps ORDER BY seq")?;
        let rows = query.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?, r.get::<_, bool>(4)?))
        })?;
        let mut sweeps = Vec::new();
        for row in rows {
            let (id, seq, name, created_ms, cancelled) = row?;
            let counts = counts.remove(&id).unwrap_or_default();
            sweeps.push(SweepRow { id, seq: seq as u64, name, created_ms, cancelled, counts });
        }
        Ok(sweeps)
    }

    /// The first task of the sweep at order `at_least` or after (`descending`: at `at_least`
    /// or before), with its stage.
    fn task_near(&self, sweep_id: &str, at: i64, descending: bool) -> Result<Option<(i64, String)>, StoreError> {
        let sql = if descending {
            concat!("SELECT ord, ", stage_of!("spec"), " FROM tasks WHERE sweep_id = ?1 AND ord <= ?2 ORDER BY ord DESC LIMIT 1")
        } else {
            concat!("SELECT ord, ", stage_of!("spec"), " FROM tasks WHERE sweep_id = ?1 AND ord >= ?2 ORDER BY ord LIMIT 1")
        };
        let mut query = self.conn.prepare_cached(sql)?;
        let mut rows = query.query(params![sweep_id, at])?;
        Ok(match rows.next()? {
            Some(row) => Some((row.get(0)?, row.get::<_, Option<String>>(1)?.unwrap_or_default())),
            None => None,
        })
    }

    /// A sweep's stages in plan order with their spans of task orders, found by bisection: a few
    /// dozen indexed reads of one spec each, however many tasks the sweep has.
    pub fn stage_spans(&self, sweep_id: &str) -> Result<Vec<StageSpan>, StoreError> {
        let mut spans = Vec::new();
        let Some((last, _)) = self.task_near(sweep_id, i64::MAX, true)? else {
            return Ok(spans);
        };
        let mut next = self.task_near(sweep_id, i64::MIN, false)?;
        while let Some((first, stage)) = next {
            // The last task of `stage`: every task after it belongs to a later stage.
            let (mut low, mut high) = (first, last);
            while low < high {
                let middle = low + (high - low + 1) / 2;
                match self.task_near(sweep_id, middle, false)? {
                    Some((order, found)) if found == stage => low = order,
                    _ => high = middle - 1,
                }
            }
            spans.push(StageSpan { stage, first, last: low });
            next = if low >= last { None } else { self.task_near(sweep_id, low + 1, false)? };
        }
        Ok(spans)
    }

    /// A sweep's stages in plan order, their tasks counted by state.
    pub fn stage_rows(&self, sweep_id: &str) -> Result<Vec<StageRow>, StoreError> {
        let mut stages = Vec::new();
        for span in self.stage_spans(sweep_id)? {
            let counts = by_name(&self.span_state_counts(sweep_id, span.first, span.last)?);
            let finished_seconds = self.conn.query_row(
                "SELECT COALESCE(SUM(m.seconds), 0.0), COUNT(DISTINCT t.id) FROM tasks t JOIN metrics m ON m.task_id = t.id
                 WHERE t.sweep_id = ?1 AND t.ord BETWEEN ?2 AND ?3 AND t.state = 'succeeded'",
                params![sweep_id, span.first, span.last],
                |r| Ok((r.get::<_, f64>(0)?, r.get::<_, u32>(1)?)),
            )?;
            stages.push(StageRow { stage: span.stage, first_order: span.first, counts, finished_seconds });
        }
        Ok(stages)
    }

    /// The span of task orders of a sweep's stage (none: no such stage).
    pub fn stage_span(&self, sweep_id: &str, stage: &str) -> Result<Option<(i64, i64)>, StoreError> {
        Ok(self.stage_spans(sweep_id)?.into_iter().find(|s| s.stage == stage).map(|s| (s.first, s.last)))
    }

    /// A page of a sweep's trials in plan order, optionally of one stage (its span of orders) and
    /// one state.
    pub fn trial_rows(
        &self,
        sweep_id: &str,
        span: Option<(i64, i64)>,
        state: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<TrialRow>, u64), StoreError> {
        let (first, last) = span.unwrap_or((i64::MIN, i64::MAX));
        let total: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM tasks WHERE sweep_id = ?1 AND ord BETWEEN ?2 AND ?3 AND (?4 IS NULL OR state = ?4)",
            params![sweep_id, first, last, state],
            |r| r.get(0),
        )?;
        let mut query = self.conn.prepare_cached(
            "SELECT t.id, t.spec, t.state, t.attempt, t.max_attempts, t.members, t.error,
                    (SELECT COUNT(*) FROM metrics m WHERE m.task_id = t.id),
                    (SELECT m.vals FROM metrics m WHERE m.task_id = t.id ORDER BY m.epoch DESC LIMIT 1)
             FROM tasks t WHERE t.sweep_id = ?1 AND t.ord BETWEEN ?2 AND ?3 AND (?4 IS NULL OR t.state = ?4)
             ORDER BY t.ord LIMIT ?5 OFFSET ?6",
        )?;
        let rows = query.query_map(params![sweep_id, first, last, state, limit as i64, offset as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, u32>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?;
        let mut trials = Vec::new();
        for row in rows {
            let (id, spec, state, attempt, max_attempts, members, error, epochs, latest) = row?;
            let members = serde_json::from_str(&members).unwrap_or_default();
            let last_values = latest.map(|values| parse_values(&id, &values)).unwrap_or_default();
            trials.push(TrialRow { id, spec, state, attempt, max_attempts, members, error, epochs, last_values });
        }
        Ok((trials, total as u64))
    }

    /// One trial's row (none when no such task exists).
    pub fn trial_row(&self, task_id: &str) -> Result<Option<TrialRow>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT t.id, t.spec, t.state, t.attempt, t.max_attempts, t.members, t.error,
                    (SELECT COUNT(*) FROM metrics m WHERE m.task_id = t.id),
                    (SELECT m.vals FROM metrics m WHERE m.task_id = t.id ORDER BY m.epoch DESC LIMIT 1)
             FROM tasks t WHERE t.id = ?1",
        )?;
        let mut rows = query.query(params![task_id])?;
        let Some(r) = rows.next()? else {
            return Ok(None);
        };
        let id: String = r.get(0)?;
        let members: String = r.get(5)?;
        let last: Option<String> = r.get(8)?;
        let last_values = last.map(|values| parse_values(&id, &values)).unwrap_or_default();
        Ok(Some(TrialRow {
            spec: r.get(1)?,
            state: r.get(2)?,
            attempt: r.get(3)?,
            max_attempts: r.get(4)?,
            members: serde_json::from_str(&members).unwrap_or_default(),
            error: r.get(6)?,
            epochs: r.get(7)?,
            last_values,
            id,
        }))
    }

    /// When a sweep's newest kept log line was written, Unix milliseconds (its last activity).
    pub fn last_log_ms(&self, sweep_id: &str) -> Result<Option<i64>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT unix_ms FROM logs WHERE id = (SELECT MAX(id) FROM logs WHERE task_id >= ?1 || '.t' AND task_id < ?1 || '.u')",
        )?;
        let mut rows = query.query(params![sweep_id])?;
        Ok(match rows.next()? {
            Some(row) => row.get(0)?,
            None => None,
        })
    }

    /// A stage's tasks with config and fold, in plan order (the cross-validation table's rows).
    pub fn fold_tasks(&self, sweep_id: &str, stage: &str) -> Result<Vec<FoldTask>, StoreError> {
        let Some((first, last)) = self.stage_span(sweep_id, stage)? else {
            return Ok(Vec::new());
        };
        let mut query = self.conn.prepare_cached(
            "SELECT id, json_extract(spec, '$.config_label'), json_extract(spec, '$.fold.index'), state FROM tasks
             WHERE sweep_id = ?1 AND ord BETWEEN ?2 AND ?3 ORDER BY ord",
        )?;
        let rows = query.query_map(params![sweep_id, first, last], |r| {
            Ok(FoldTask {
                task_id: r.get(0)?,
                config: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                fold: r.get(2)?,
                state: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every reported epoch of a stage's trials, with each trial's config and fold.
    pub fn stage_epochs(&self, sweep_id: &str, stage: &str) -> Result<Vec<StageEpoch>, StoreError> {
        let Some((first, last)) = self.stage_span(sweep_id, stage)? else {
            return Ok(Vec::new());
        };
        let mut query = self.conn.prepare_cached(
            "SELECT t.id, json_extract(t.spec, '$.config_label'), json_extract(t.spec, '$.fold.index'), m.epoch, m.vals
             FROM tasks t JOIN metrics m ON m.task_id = t.id
             WHERE t.sweep_id = ?1 AND t.ord BETWEEN ?2 AND ?3 ORDER BY t.ord, m.epoch",
        )?;
        let rows = query.query_map(params![sweep_id, first, last], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut epochs = Vec::new();
        for row in rows {
            let (task_id, config, fold, epoch, values) = row?;
            let values = parse_values(&task_id, &values);
            epochs.push(StageEpoch { task_id, config: config.unwrap_or_default(), fold, epoch, values });
        }
        Ok(epochs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskState;
    use crate::scheduler::TaskEntry;
    use crate::store::{EpochRecord, StoredTask, SweepRecord};

    fn spec(stage: &str, config: &str, fold: u32) -> crate::domain::TrialSpec {
        let json = format!(
            r#"{{"stage":"{stage}","name":"{stage}/{config}/f{fold}","config_label":"{config}","kind":"dae-fold",
            "config":{{"lr":0.001,"weight_decay":0.0,"batch_size":8,"epochs":2,"noise_std":0.1,"latent":8,"seed":1,"lr_encoder":0.0,"augment":null,"wgan":null}},
            "dataset":{{"format":"idx","files":[],"train_limit":0,"test_limit":0,"image_size":28,"min_foreground":0.0}},
            "fold":{{"folds":2,"index":{fold},"shuffle_seed":1}},"checkpoint_every":0,"max_attempts":1}}"#
        );
        Store::parse_spec(&json).unwrap()
    }

    #[test]
    fn views_count_page_and_group_without_reading_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let sweep =
            SweepRecord { id: "s1-aa".into(), seq: 1, name: "<b>x</b>".into(), source: String::new(), created_ms: 5, cancelled: false };
        let tasks: Vec<StoredTask> = (0..4)
            .map(|i| StoredTask {
                entry: TaskEntry::queued(format!("s1-aa.t{i}"), "s1-aa".into(), i, 1, 1),
                spec: spec("cv", &format!("c{}", i / 2), (i % 2) as u32),
            })
            .collect();
        store.insert_sweep(&sweep, &tasks).unwrap();
        let mut done = tasks[0].entry.clone();
        done.state = TaskState::Succeeded;
        store.save_tasks([&done]).unwrap();
        store
            .record_metrics(
                "s1-aa.t0",
                &[EpochRecord { epoch: 1, attempt: 1, values: vec![("val_mse".into(), 0.5)], seconds: 2.0, samples: 8 }],
            )
            .unwrap();

        let sweeps = store.sweep_rows().unwrap();
        assert_eq!(sweeps.len(), 1);
        assert_eq!(sweeps[0].counts.get("queued"), Some(&3));
        assert_eq!(sweeps[0].counts.get("succeeded"), Some(&1));
        let stages = store.stage_rows("s1-aa").unwrap();
        assert_eq!(stages.len(), 1);
        assert_eq!(stages[0].stage, "cv");
        assert_eq!(stages[0].finished_seconds, (2.0, 1));
        let span = store.stage_span("s1-aa", "cv").unwrap();
        assert_eq!(span, Some((0, 3)));
        let (page, total) = store.trial_rows("s1-aa", span, None, 1, 2).unwrap();
        assert_eq!(total, 4);
        assert_eq!(page.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["s1-aa.t1", "s1-aa.t2"]);
        let (queued, total) = store.trial_rows("s1-aa", None, Some("queued"), 0, 10).unwrap();
        assert_eq!((queued.len(), total), (3, 3));
        let first = store.trial_row("s1-aa.t0").unwrap().unwrap();
        assert_eq!((first.epochs, first.last_values.clone()), (1, vec![("val_mse".to_string(), 0.5)]));
        assert!(store.trial_row("s1-aa.t9").unwrap().is_none());
        let folds = store.fold_tasks("s1-aa", "cv").unwrap();
        assert_eq!(folds[3].config, "c1");
        assert_eq!(folds[3].fold, Some(1));
        let epochs = store.stage_epochs("s1-aa", "cv").unwrap();
        assert_eq!(epochs.len(), 1);
        assert_eq!(epochs[0].config, "c0");

        let finals: Vec<StoredTask> = (4..6)
            .map(|i| StoredTask { entry: TaskEntry::queued(format!("s1-aa.t{i}"), "s1-aa".into(), i, 1, 1), spec: spec("final", "c0", 0) })
            .collect();
        store.insert_tasks(&finals).unwrap();
        let spans: Vec<(String, i64, i64)> = store.stage_spans("s1-aa").unwrap().into_iter().map(|s| (s.stage, s.first, s.last)).collect();
        assert_eq!(spans, [("cv".to_string(), 0, 3), ("final".to_string(), 4, 5)]);
        assert_eq!(store.stage_rows("s1-aa").unwrap()[1].counts.get("queued"), Some(&2));
        assert!(store.stage_spans("nope").unwrap().is_empty());
    }
}
