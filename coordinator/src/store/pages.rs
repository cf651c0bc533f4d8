//! The gRPC read path: a sweep's counts and one page of its tasks with their figures, each in a
//! constant number of queries however many tasks the sweep has (`status`, `results`, `watch`).
//! A page is a contiguous span of the sweep's plan order, so every per-task table is read for
//! the page's tasks alone, and counts by state read the `tasks_by_sweep_order_state` index alone.

use std::collections::HashMap;

use rusqlite::params;

use super::{parse_values, ArtifactRecord, CheckpointRecord, EpochRecord, Store, StoreError, StoredTask};
use crate::domain::{BlobRef, TaskState};

/// One page of a sweep's tasks with everything `GetSweep` shows of them, by task id.
#[derive(Debug, Default)]
pub struct TaskPage {
    /// The tasks, in plan order.
    pub tasks: Vec<StoredTask>,
    /// Their epochs, in order.
    pub epochs: HashMap<String, Vec<EpochRecord>>,
    /// Their checkpoints, oldest first.
    pub checkpoints: HashMap<String, Vec<CheckpointRecord>>,
    /// Their artifacts, by epoch then name.
    pub artifacts: HashMap<String, Vec<ArtifactRecord>>,
    /// When each started its latest attempt and ended, Unix ms (0: not yet).
    pub times: HashMap<String, (i64, i64)>,
}

/// Tasks of a sweep whose order lies in `?1`'s span `?2..=?3` (a page).
const PAGE_TASKS: &str = "SELECT id FROM tasks WHERE sweep_id = ?1 AND ord BETWEEN ?2 AND ?3";

/// A state name as stored.
fn parse_state(name: &str) -> Result<TaskState, StoreError> {
    TaskState::parse(name).ok_or_else(|| super::corrupt("task state", name))
}

impl Store {
    /// Tasks counted by state, for every sweep: one grouped query.
    pub fn state_counts(&self) -> Result<HashMap<String, Vec<(TaskState, u32)>>, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT sweep_id, state, COUNT(*) FROM tasks GROUP BY sweep_id, state")?;
        let rows = query.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?)))?;
        let mut counts: HashMap<String, Vec<(TaskState, u32)>> = HashMap::new();
        for row in rows {
            let (sweep_id, state, count) = row?;
            counts.entry(sweep_id).or_default().push((parse_state(&state)?, count));
        }
        Ok(counts)
    }

    /// One sweep's tasks counted by state: one grouped query over its index range.
    pub fn sweep_state_counts(&self, sweep_id: &str) -> Result<Vec<(TaskState, u32)>, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT state, COUNT(*) FROM tasks WHERE sweep_id = ?1 GROUP BY state")?;
        let rows = query.query_map(params![sweep_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
        let mut counts = Vec::new();
        for row in rows {
            let (state, count) = row?;
            counts.push((parse_state(&state)?, count));
        }
        Ok(counts)
    }

    /// The tasks of a span of a sweep's plan order (a stage), counted by state: one grouped
    /// query over the index.
    pub fn span_state_counts(&self, sweep_id: &str, first: i64, last: i64) -> Result<Vec<(TaskState, u32)>, StoreError> {
        let mut query =
            self.conn.prepare_cached("SELECT state, COUNT(*) FROM tasks WHERE sweep_id = ?1 AND ord BETWEEN ?2 AND ?3 GROUP BY state")?;
        let rows = query.query_map(params![sweep_id, first, last], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
        let mut counts = Vec::new();
        for row in rows {
            let (state, count) = row?;
            counts.push((parse_state(&state)?, count));
        }
        Ok(counts)
    }

    /// The sweep's tasks `offset..offset + limit` in plan order, with their epochs, checkpoints,
    /// artifacts and times: five queries.
    pub fn task_page(&self, sweep_id: &str, offset: usize, limit: usize) -> Result<TaskPage, StoreError> {
        let (offset, limit) = (offset.min(i64::MAX as usize) as i64, limit.min(i64::MAX as usize) as i64);
        // The page's first order is found in the index alone; OFFSET on the rows themselves would
        // read every row before the page.
        let tasks = self.select_tasks(
            "sweep_id = ?1 AND ord >= COALESCE((SELECT ord FROM tasks WHERE sweep_id = ?1 ORDER BY ord LIMIT 1 OFFSET ?3), 9223372036854775807)
             ORDER BY ord LIMIT ?2",
            params![sweep_id, limit, offset],
        )?;
        let (Some(first), Some(last)) = (tasks.first(), tasks.last()) else {
            return Ok(TaskPage::default());
        };
        let span = params![sweep_id, first.entry.order as i64, last.entry.order as i64];
        let mut page = TaskPage { tasks: vec![], ..TaskPage::default() };

        let mut query = self.conn.prepare_cached(&format!(
            "SELECT task_id, epoch, attempt, vals, seconds, samples FROM metrics WHERE task_id IN ({PAGE_TASKS}) ORDER BY task_id, epoch"
        ))?;
        let rows = query.query_map(span, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, f64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        for row in rows {
            let (task_id, epoch, attempt, values, seconds, samples) = row?;
            let values = parse_values(&task_id, &values);
            page.epochs.entry(task_id).or_default().push(EpochRecord { epoch, attempt, values, seconds, samples: samples as u64 });
        }

        let mut query = self.conn.prepare_cached(&format!(
            "SELECT task_id, epoch, attempt, sha256, size, is_final FROM checkpoints WHERE task_id IN ({PAGE_TASKS}) ORDER BY task_id, epoch"
        ))?;
        let rows = query.query_map(span, |r| {
            Ok(CheckpointRecord {
                task_id: r.get(0)?,
                epoch: r.get(1)?,
                attempt: r.get(2)?,
                blob: BlobRef { sha256: r.get(3)?, size: r.get::<_, i64>(4)? as u64 },
                is_final: r.get(5)?,
            })
        })?;
        for row in rows {
            let record = row?;
            page.checkpoints.entry(record.task_id.clone()).or_default().push(record);
        }

        let mut query = self.conn.prepare_cached(&format!(
            "SELECT task_id, name, epoch, sha256, size FROM artifacts WHERE task_id IN ({PAGE_TASKS}) ORDER BY task_id, epoch, name"
        ))?;
        let rows = query.query_map(span, |r| {
            Ok(ArtifactRecord {
                task_id: r.get(0)?,
                name: r.get(1)?,
                epoch: r.get(2)?,
                blob: BlobRef { sha256: r.get(3)?, size: r.get::<_, i64>(4)? as u64 },
            })
        })?;
        for row in rows {
            let record = row?;
            page.artifacts.entry(record.task_id.clone()).or_default().push(record);
        }

        let mut query =
            self.conn.prepare_cached("SELECT id, started_ms, ended_ms FROM tasks WHERE sweep_id = ?1 AND ord BETWEEN ?2 AND ?3")?;
        let rows = query.query_map(span, |r| Ok((r.get::<_, String>(0)?, (r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))))?;
        page.times = rows.collect::<Result<_, _>>()?;
        page.tasks = tasks;
        Ok(page)
    }
}

/// A span of a sweep's plan order (a stage) as `watch` draws it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanProgress {
    /// Its tasks counted by state.
    pub states: Vec<(TaskState, u32)>,
    /// Seconds of the epochs reported in it, and how many epochs that is.
    pub epoch_seconds: (f64, u64),
}

impl Store {
    /// A span of a sweep's plan order (a stage): its tasks counted by state and its reported
    /// epochs' total time, in two grouped queries.
    pub fn span_progress(&self, sweep_id: &str, first: i64, last: i64) -> Result<SpanProgress, StoreError> {
        let states = self.span_state_counts(sweep_id, first, last)?;
        // A join, not `IN (…)`: the span may hold 100,000 tasks of which few reported anything.
        let epoch_seconds = self.conn.query_row(
            "SELECT COALESCE(SUM(m.seconds), 0.0), COUNT(*) FROM metrics m JOIN tasks t ON t.id = m.task_id
             WHERE t.sweep_id = ?1 AND t.ord BETWEEN ?2 AND ?3",
            params![sweep_id, first, last],
            |r| Ok((r.get::<_, f64>(0)?, r.get::<_, i64>(1)? as u64)),
        )?;
        Ok(SpanProgress { states, epoch_seconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::TaskEntry;
    use crate::store::SweepRecord;

    /// A page holds its own tasks' figures and no other task's, in order, whatever the page.
    #[test]
    fn a_page_reads_its_tasks_figures_and_the_counts_cover_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        for (seq, sweep) in [(1, "a"), (2, "b")] {
            let record = SweepRecord { id: sweep.into(), seq, name: "n".into(), source: "src".into(), created_ms: 5, cancelled: false };
            let tasks: Vec<StoredTask> = (0..5)
                .map(|i| StoredTask {
                    entry: TaskEntry::queued(format!("{sweep}.t{i}"), sweep.into(), i, 3, 1),
                    spec: crate::store::tests::spec(),
                })
                .collect();
            store.insert_sweep(&record, &tasks).unwrap();
            for i in [1u32, 2, 4] {
                let epochs: Vec<EpochRecord> = (1..=i)
                    .map(|epoch| EpochRecord {
                        epoch,
                        attempt: 1,
                        values: vec![("val_mse".into(), f64::from(i))],
                        seconds: 1.0,
                        samples: 8,
                    })
                    .collect();
                store.record_metrics(&format!("{sweep}.t{i}"), &epochs).unwrap();
                let blob = BlobRef { sha256: format!("{sweep}{i}"), size: 1 };
                store
                    .record_checkpoint(&CheckpointRecord {
                        task_id: format!("{sweep}.t{i}"),
                        epoch: i,
                        attempt: 1,
                        blob: blob.clone(),
                        is_final: true,
                    })
                    .unwrap();
                store
                    .record_artifact(&ArtifactRecord { task_id: format!("{sweep}.t{i}"), name: "samples".into(), epoch: i, blob })
                    .unwrap();
            }
        }
        let page = store.task_page("b", 1, 3).unwrap();
        let ids: Vec<&str> = page.tasks.iter().map(|t| t.entry.id.as_str()).collect();
        assert_eq!(ids, ["b.t1", "b.t2", "b.t3"]);
        let mut reported: Vec<&str> = page.epochs.keys().map(String::as_str).collect();
        reported.sort();
        assert_eq!(reported, ["b.t1", "b.t2"], "b.t3 reported nothing; b.t4 is on no page of these");
        assert_eq!(page.epochs["b.t2"].iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(page.epochs["b.t2"][0].values, vec![("val_mse".to_string(), 2.0)]);
        assert_eq!(page.checkpoints["b.t1"][0].blob.sha256, "b1");
        assert_eq!(page.artifacts["b.t2"][0].blob.sha256, "b2");
        assert_eq!(page.times.len(), 3);
        assert!(store.task_page("b", 5, 3).unwrap().tasks.is_empty());
        assert_eq!(store.task_page("b", 0, usize::MAX).unwrap().tasks.len(), 5);
        assert_eq!(store.sweep_state_counts("a").unwrap(), vec![(TaskState::Queued, 5)]);
        assert_eq!(store.state_counts().unwrap()["b"], vec![(TaskState::Queued, 5)]);
    }
}
