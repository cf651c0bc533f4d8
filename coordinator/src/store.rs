//! Durable state in one SQLite file (WAL mode): sweeps, tasks, metrics and checkpoint records.
//!
//! Every call commits before it returns, so whatever the coordinator acknowledged survives a
//! `kill -9`. Trial specs are stored as JSON of the domain types.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::domain::{BlobRef, TaskState, TrialSpec};
use crate::scheduler::TaskEntry;

pub mod pages;
mod records;
mod schema;
pub mod views;

pub use records::{ArtifactRecord, CheckpointRecord, EpochRecord, LogRecord, StoredTask, SweepRecord};

/// Why the store failed. Always an internal error: the database is ours.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value no longer parses.
    #[error("database holds a corrupt {what}: {message}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// The database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

fn corrupt(what: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt { what, message: message.to_string() }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        // One process owns the file: an exclusive lock, taken before WAL mode is entered, spares
        // every transaction the shared-memory and file locks that coordinate other processes
        // (a tenth of a dispatch's CPU), and makes a second coordinator on the same data dir
        // fail at start ("database is locked") instead of scheduling the same tasks twice.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives the process being killed; FULL would also
        // survive power loss at the cost of an fsync per commit.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // 64 MiB of page cache (the default is 2 MiB): a sweep of 100,000 trials is about 60 MiB
        // of rows, and reads of it (status, a page of results, a watch update) then stay in
        // memory instead of copying every page in from the file again (most of their time).
        conn.pragma_update(None, "cache_size", -65536)?;
        schema::create(&conn)?;
        // Room for every statement this file prepares, so none is parsed again per call.
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self { conn })
    }

    /// Folds the write-ahead log into the main database file.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// The next sweep sequence number.
    pub fn next_sweep_seq(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = self.conn.query_row("SELECT MAX(seq) FROM sweeps", [], |r| r.get(0))?;
        Ok(max.map_or(1, |m| m as u64 + 1))
    }

    /// Stores a new sweep and all its tasks in one transaction.
    pub fn insert_sweep(&mut self, sweep: &SweepRecord, tasks: &[StoredTask]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO sweeps (id, seq, name, source, created_ms, cancelled) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            params![sweep.id, sweep.seq as i64, sweep.name, sweep.source, sweep.created_ms],
        )?;
        Self::insert_task_rows(&tx, tasks)?;
        tx.commit()?;
        Ok(())
    }

    /// Stores tasks of an existing sweep (a later stage) in one transaction.
    pub fn insert_tasks(&mut self, tasks: &[StoredTask]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        Self::insert_task_rows(&tx, tasks)?;
        tx.commit()?;
        Ok(())
    }

    fn insert_task_rows(tx: &rusqlite::Transaction<'_>, tasks: &[StoredTask]) -> Result<(), StoreError> {
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO tasks (id, sweep_id, ord, spec, state, attempt, max_attempts, gang_size, members, error, secrets, lapses)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for task in tasks {
                let spec = serde_json::to_string(&task.spec).map_err(|e| corrupt("trial spec", e))?;
                let e = &task.entry;
                insert.execute(params![
                    e.id,
                    e.sweep_id,
                    e.order as i64,
                    spec,
                    e.state.as_str(),
                    e.attempt,
                    e.max_attempts,
                    e.gang_size,
                    members_json(&e.members)?,
                    e.error,
                    members_json(&e.secrets)?,
                    e.lapses
                ])?;
            }
        }
        Ok(())
    }

    /// Saves the scheduling fields of the given tasks in one transaction.
    pub fn save_tasks<'a>(&mut self, entries: impl IntoIterator<Item = &'a TaskEntry>) -> Result<(), StoreError> {
        // A savepoint: its own transaction, or a part of [`Store::in_one_transaction`]'s.
        let tx = self.conn.savepoint()?;
        {
            // The times are stamped from the row's state before the update: an attempt starts
            // when the state turns running (or the attempt changes), a task ends when its state
            // turns terminal, and a task queued again has not ended.
            let mut update = tx.prepare_cached(
                "UPDATE tasks SET state = ?2, attempt = ?3, members = ?4, error = ?5, max_attempts = ?6, secrets = ?7, lapses = ?8,
                 started_ms = CASE WHEN ?2 = 'running' AND (state != 'running' OR attempt != ?3) THEN ?9 ELSE started_ms END,
                 ended_ms = CASE WHEN ?2 IN ('queued', 'running') THEN 0
                                 WHEN state IN ('queued', 'running') THEN ?9 ELSE ended_ms END
                 WHERE id = ?1",
            )?;
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            for e in entries {
                update.execute(params![
                    e.id,
                    e.state.as_str(),
                    e.attempt,
                    members_json(&e.members)?,
                    e.error,
                    e.max_attempts,
                    members_json(&e.secrets)?,
                    e.lapses,
                    now_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `work` as one transaction: what it writes through [`Store::save_tasks`] and
    /// [`Store::record_metrics`] (savepoints inside it) commits together or not at all. Early
    /// stopping commits a report and the decision it triggered this way, so that no restart can
    /// see one without the other.
    pub fn in_one_transaction<T>(&mut self, work: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.conn.execute_batch("SAVEPOINT in_one_transaction")?;
        match work(self) {
            Ok(value) => {
                self.conn.execute_batch("RELEASE in_one_transaction")?;
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = self.conn.execute_batch("ROLLBACK TO in_one_transaction; RELEASE in_one_transaction") {
                    tracing::error!(%rollback, "rolling back a failed transaction failed");
                }
                Err(error)
            }
        }
    }

    /// Marks a sweep cancelled, or (retried) no longer cancelled.
    pub fn set_cancelled(&self, sweep_id: &str, cancelled: bool) -> Result<(), StoreError> {
        self.conn.execute("UPDATE sweeps SET cancelled = ?2 WHERE id = ?1", params![sweep_id, cancelled])?;
        Ok(())
    }

    /// Records epochs; a retried attempt's epoch replaces the earlier one.
    pub fn record_metrics(&mut self, task_id: &str, epochs: &[EpochRecord]) -> Result<(), StoreError> {
        // A savepoint: its own transaction, or a part of [`Store::in_one_transaction`]'s.
        let tx = self.conn.savepoint()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT OR REPLACE INTO metrics (task_id, epoch, attempt, vals, seconds, samples) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in epochs {
                let values = serde_json::to_string(&e.values).map_err(|err| corrupt("metrics", err))?;
                upsert.execute(params![task_id, e.epoch, e.attempt, values, e.seconds, e.samples as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a checkpoint.
    pub fn record_checkpoint(&self, record: &CheckpointRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoints (task_id, epoch, attempt, sha256, size, is_final) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![record.task_id, record.epoch, record.attempt, record.blob.sha256, record.blob.size as i64, record.is_final],
        )?;
        Ok(())
    }

    /// Appends log lines of a task.
    pub fn append_logs(&mut self, lines: &[LogRecord]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO logs (task_id, attempt, unix_ms, level, message) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for line in lines {
                insert.execute(params![line.task_id, line.attempt, line.unix_ms, line.level, line.message])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Log lines of a sweep (or one of its tasks) after `after_id`, oldest first, at most `limit`.
    pub fn logs(&self, sweep_id: &str, task_id: Option<&str>, after_id: i64, limit: usize) -> Result<Vec<LogRecord>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT l.id, l.task_id, l.attempt, l.unix_ms, l.level, l.message FROM logs l JOIN tasks t ON t.id = l.task_id
             WHERE t.sweep_id = ?1 AND (?2 IS NULL OR l.task_id = ?2) AND l.id > ?3 ORDER BY l.id LIMIT ?4",
        )?;
        let rows = query.query_map(params![sweep_id, task_id, after_id, limit as i64], |r| {
            Ok(LogRecord {
                id: r.get(0)?,
                task_id: r.get(1)?,
                attempt: r.get(2)?,
                unix_ms: r.get(3)?,
                level: r.get(4)?,
                message: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records an artifact (a re-attached name replaces the earlier blob).
    pub fn record_artifact(&self, record: &ArtifactRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO artifacts (task_id, name, epoch, sha256, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![record.task_id, record.name, record.epoch, record.blob.sha256, record.blob.size as i64],
        )?;
        Ok(())
    }

    /// A task's artifacts, by epoch then name.
    pub fn artifacts(&self, task_id: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        let mut query =
            self.conn.prepare_cached("SELECT name, epoch, sha256, size FROM artifacts WHERE task_id = ?1 ORDER BY epoch, name")?;
        let rows = query.query_map(params![task_id], |r| {
            Ok(ArtifactRecord {
                task_id: task_id.to_string(),
                name: r.get(0)?,
                epoch: r.get(1)?,
                blob: BlobRef { sha256: r.get(2)?, size: r.get::<_, i64>(3)? as u64 },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The smallest value of metric `name` over each task's epochs, for every task of a sweep
    /// that reported it.
    pub fn min_metric_by_task(&self, sweep_id: &str, name: &str) -> Result<HashMap<String, f64>, StoreError> {
        let mut query =
            self.conn.prepare_cached("SELECT m.task_id, m.vals FROM metrics m JOIN tasks t ON t.id = m.task_id WHERE t.sweep_id = ?1")?;
        let rows = query.query_map(params![sweep_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut minima: HashMap<String, f64> = HashMap::new();
        for row in rows {
            let (task_id, values) = row?;
            let values = parse_values(&task_id, &values);
            let Some(value) = values.into_iter().find(|(key, _)| key == name).map(|(_, value)| value) else {
                continue;
            };
            minima.entry(task_id).and_modify(|least| *least = least.min(value)).or_insert(value);
        }
        Ok(minima)
    }

    /// Each task's final checkpoint (the highest epoch marked final), for every task of a sweep
    /// that has one.
    pub fn final_checkpoints(&self, sweep_id: &str) -> Result<HashMap<String, BlobRef>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT c.task_id, c.sha256, c.size FROM checkpoints c JOIN tasks t ON t.id = c.task_id
             WHERE t.sweep_id = ?1 AND c.is_final ORDER BY c.task_id, c.epoch",
        )?;
        let rows = query.query_map(params![sweep_id], |r| {
            Ok((r.get::<_, String>(0)?, BlobRef { sha256: r.get(1)?, size: r.get::<_, i64>(2)? as u64 }))
        })?;
        // In epoch order, so the last row of each task wins.
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest checkpoint of a task (highest epoch), to resume from.
    pub fn latest_checkpoint(&self, task_id: &str) -> Result<Option<CheckpointRecord>, StoreError> {
        Ok(self.checkpoints(task_id)?.into_iter().last())
    }

    /// A task's checkpoints, oldest first.
    pub fn checkpoints(&self, task_id: &str) -> Result<Vec<CheckpointRecord>, StoreError> {
        let mut query =
            self.conn.prepare_cached("SELECT epoch, attempt, sha256, size, is_final FROM checkpoints WHERE task_id = ?1 ORDER BY epoch")?;
        let rows = query.query_map(params![task_id], |r| {
            Ok(CheckpointRecord {
                task_id: task_id.to_string(),
                epoch: r.get(0)?,
                attempt: r.get(1)?,
                blob: BlobRef { sha256: r.get(2)?, size: r.get::<_, i64>(3)? as u64 },
                is_final: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A task's epochs, in order.
    pub fn metrics(&self, task_id: &str) -> Result<Vec<EpochRecord>, StoreError> {
        let mut query =
            self.conn.prepare_cached("SELECT epoch, attempt, vals, seconds, samples FROM metrics WHERE task_id = ?1 ORDER BY epoch")?;
        let rows = query.query_map(params![task_id], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?, r.get::<_, String>(2)?, r.get::<_, f64>(3)?, r.get::<_, i64>(4)?))
        })?;
        let mut epochs = Vec::new();
        for row in rows {
            let (epoch, attempt, values, seconds, samples) = row?;
            let values = parse_values(task_id, &values);
            epochs.push(EpochRecord { epoch, attempt, values, seconds, samples: samples as u64 });
        }
        Ok(epochs)
    }

    /// Notes that a blob was uploaded under a task's attempt.
    pub fn record_lease_upload(&self, task_id: &str, attempt: u32, sha256: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO lease_uploads (task_id, attempt, sha256) VALUES (?1, ?2, ?3)")?
            .execute(params![task_id, attempt, sha256])?;
        Ok(())
    }

    /// Whether a blob was uploaded under the task's attempt.
    pub fn uploaded_under(&self, task_id: &str, attempt: u32, sha256: &str) -> Result<bool, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT 1 FROM lease_uploads WHERE task_id = ?1 AND attempt = ?2 AND sha256 = ?3")?;
        Ok(query.exists(params![task_id, attempt, sha256])?)
    }

    /// The highest epoch the task has reported (any attempt).
    pub fn last_epoch(&self, task_id: &str) -> Result<Option<u32>, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT MAX(epoch) FROM metrics WHERE task_id = ?1")?;
        Ok(query.query_row(params![task_id], |r| r.get(0))?)
    }

    /// How many log lines the task has stored.
    pub fn log_count(&self, task_id: &str) -> Result<u64, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT COUNT(*) FROM logs WHERE task_id = ?1")?;
        Ok(query.query_row(params![task_id], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Commits a transaction that needs fresh room (a 256 KiB row, written and deleted): it
    /// succeeds only once the database can take real work again, not merely rewrite a page.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let tx = self.conn.transaction()?;
        tx.execute("CREATE TABLE IF NOT EXISTS probe_room (id INTEGER PRIMARY KEY, room BLOB NOT NULL)", [])?;
        tx.execute("INSERT INTO probe_room (room) VALUES (zeroblob(262144))", [])?;
        tx.execute("DELETE FROM probe_room", [])?;
        tx.execute("INSERT OR REPLACE INTO probe (id, unix_ms) VALUES (1, ?1)", params![unix_ms])?;
        tx.commit()?;
        Ok(())
    }

    /// Pages the database file holds now.
    #[cfg(test)]
    pub fn page_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Caps the database file at `pages` pages, so that writes past it fail as on a full disk
    /// (tests of the coordinator's behaviour when its store cannot be written).
    #[cfg(test)]
    pub fn set_max_pages(&self, pages: u64) -> Result<(), StoreError> {
        self.conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        Ok(())
    }

    /// All sweeps, oldest first.
    pub fn sweeps(&self) -> Result<Vec<SweepRecord>, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT id, seq, name, source, created_ms, cancelled FROM sweeps ORDER BY seq")?;
        let rows = query.query_map([], sweep_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One sweep.
    pub fn sweep(&self, sweep_id: &str) -> Result<Option<SweepRecord>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT id, seq, name, source, created_ms, cancelled FROM sweeps WHERE id = ?1", params![sweep_id], sweep_row)
            .optional()?)
    }

    /// Tasks with their specs: all of them, or one sweep's, in scheduling order.
    pub fn tasks(&self, sweep_id: Option<&str>) -> Result<Vec<StoredTask>, StoreError> {
        match sweep_id {
            // Two statements: `?1 IS NULL OR sweep_id = ?1` would keep SQLite off the index and
            // sort the whole table for one sweep.
            Some(sweep_id) => self.select_tasks("sweep_id = ?1 ORDER BY ord", params![sweep_id]),
            None => self.select_tasks("1 ORDER BY ord", []),
        }
    }

    /// One task's spec as stored (JSON), without its scheduling fields: what a dispatch reads,
    /// so that it can be parsed by [`Store::parse_spec`] once the caller released its lock.
    pub fn spec_json(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        let mut query = self.conn.prepare_cached("SELECT spec FROM tasks WHERE id = ?1")?;
        Ok(query.query_row(params![task_id], |r| r.get(0)).optional()?)
    }

    /// Parses a spec read by [`Store::spec_json`].
    pub fn parse_spec(json: &str) -> Result<TrialSpec, StoreError> {
        serde_json::from_str(json).map_err(|e| corrupt("trial spec", e))
    }

    /// Tasks with their specs, selected by `condition` (with its order and limits).
    fn select_tasks(&self, condition: &str, params: impl rusqlite::Params) -> Result<Vec<StoredTask>, StoreError> {
        let mut query = self.conn.prepare_cached(&format!(
            "SELECT id, sweep_id, ord, spec, state, attempt, max_attempts, gang_size, members, error, secrets, lapses FROM tasks WHERE {condition}"
        ))?;
        let rows = query.query_map(params, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, u32>(5)?,
                r.get::<_, u32>(6)?,
                r.get::<_, u32>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, String>(10)?,
                r.get::<_, u32>(11)?,
            ))
        })?;
        let mut tasks = Vec::new();
        for row in rows {
            let (id, sweep_id, order, spec, state, attempt, max_attempts, gang_size, members, error, secrets, lapses) = row?;
            let spec = Self::parse_spec(&spec)?;
            let state = TaskState::parse(&state).ok_or_else(|| corrupt("task state", &state))?;
            let members: Vec<String> = serde_json::from_str(&members).map_err(|e| corrupt("task members", e))?;
            let secrets: Vec<String> = serde_json::from_str(&secrets).map_err(|e| corrupt("lease secrets", e))?;
            let entry = TaskEntry {
                id,
                sweep_id,
                order: order as u64,
                state,
                attempt,
                max_attempts,
                gang_size,
                members,
                leases: vec![],
                error,
                secrets,
                lapses,
                epochs: spec.config.epochs,
                // What it needs of a worker follows from its spec; the core derives it.
                needs: Default::default(),
            };
            tasks.push(StoredTask { entry, spec });
        }
        Ok(tasks)
    }
}

/// An epoch's stored values. A row that does not parse whole (a non-finite value written before
/// they were refused at the edge, stored as `null`) keeps its readable values; the rest are
/// skipped with a warning rather than failing every read of the sweep.
fn parse_values(task_id: &str, json: &str) -> Vec<(String, f64)> {
    if let Ok(values) = serde_json::from_str::<Vec<(String, f64)>>(json) {
        return values;
    }
    let Ok(loose) = serde_json::from_str::<Vec<(String, serde_json::Value)>>(json) else {
        tracing::warn!(task = %task_id, "stored metrics row does not parse; skipped");
        return vec![];
    };
    let mut values = Vec::with_capacity(loose.len());
    for (name, value) in loose {
        match value.as_f64() {
            Some(number) => values.push((name, number)),
            None => tracing::warn!(task = %task_id, metric = %name, stored = %value, "stored metric is not a number; skipped"),
        }
    }
    values
}

fn members_json(members: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(members).map_err(|e| corrupt("task members", e))
}

fn sweep_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SweepRecord> {
    Ok(SweepRecord {
        id: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        name: r.get(2)?,
        source: r.get(3)?,
        created_ms: r.get(4)?,
        cancelled: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DatasetFormat, DatasetSpec, Stage, TrainingConfig, TrialKind};

    pub(super) fn spec() -> TrialSpec {
        let config = TrainingConfig { lr: 1e-3, batch_size: 8, epochs: 2, noise_std: 0.3, latent: 4, seed: 1, ..TrainingConfig::default() };
        let dataset = DatasetSpec { format: DatasetFormat::Idx, ..DatasetSpec::default() };
        TrialSpec {
            config_label: "lr=1e-3".into(),
            max_attempts: 3,
            ..TrialSpec::new(Stage::Cv, "cv/c0/f0", TrialKind::DaeFold, config, dataset)
        }
    }

    /// A row holding a non-finite value (stored as `null` before such values were refused)
    /// keeps its other values and fails no read.
    #[test]
    fn a_bad_metrics_row_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let sweep = SweepRecord { id: "s".into(), seq: 1, name: "n".into(), source: "src".into(), created_ms: 5, cancelled: false };
        store.insert_sweep(&sweep, &[StoredTask { entry: TaskEntry::queued("s.t0".into(), "s".into(), 0, 3, 1), spec: spec() }]).unwrap();
        let epoch = EpochRecord {
            epoch: 1,
            attempt: 1,
            values: vec![("val_mse".into(), f64::NAN), ("train_mse".into(), 0.5)],
            seconds: 1.0,
            samples: 1,
        };
        store.record_metrics("s.t0", &[epoch]).unwrap();
        store.conn.execute("INSERT INTO metrics VALUES ('s.t0', 2, 1, 'not json', 1.0, 1)", []).unwrap();
        let metrics = store.metrics("s.t0").unwrap();
        assert_eq!(metrics[0].values, vec![("train_mse".to_string(), 0.5)]);
        assert!(metrics[1].values.is_empty());
        assert!(store.min_metric_by_task("s", "val_mse").unwrap().is_empty());
    }

    /// A task's latest attempt is stamped when it starts and the task when it ends; queued
    /// again, it has not ended.
    #[test]
    fn tasks_are_stamped_when_they_start_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("state.db")).unwrap();
        let sweep = SweepRecord { id: "s".into(), seq: 1, name: "n".into(), source: "src".into(), created_ms: 5, cancelled: false };
        let mut entry = TaskEntry::queued("s.t0".into(), "s".into(), 0, 3, 1);
        store.insert_sweep(&sweep, &[StoredTask { entry: entry.clone(), spec: spec() }]).unwrap();
        assert_eq!(store.task_page("s", 0, 1).unwrap().times["s.t0"], (0, 0));
        entry.state = TaskState::Running;
        entry.attempt = 1;
        store.save_tasks([&entry]).unwrap();
        let (started, ended) = store.task_page("s", 0, 1).unwrap().times["s.t0"];
        assert!(started > 0 && ended == 0, "{started} {ended}");
        store.save_tasks([&entry]).unwrap();
        assert_eq!(store.task_page("s", 0, 1).unwrap().times["s.t0"].0, started, "a renewal is no new start");
        entry.state = TaskState::Succeeded;
        store.save_tasks([&entry]).unwrap();
        let (_, ended) = store.task_page("s", 0, 1).unwrap().times["s.t0"];
        assert!(ended >= started);
        entry.state = TaskState::Queued;
        store.save_tasks([&entry]).unwrap();
        assert_eq!(store.task_page("s", 0, 1).unwrap().times["s.t0"].1, 0, "queued again, it has not ended");
    }

    #[test]
    fn the_file_is_locked_while_a_store_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::ZERO).unwrap();
        let refused = other.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get::<_, i64>(0));
        assert!(refused.is_err(), "a second connection reads nothing while the store is open");
        drop(store);
        assert_eq!(other.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get::<_, i64>(0)).unwrap(), 0);
    }

    #[test]
    fn state_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut entry = TaskEntry::queued("s.t0".into(), "s".into(), 7, 3, 1).with_epochs(spec().config.epochs);
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.next_sweep_seq().unwrap(), 1);
            let sweep = SweepRecord { id: "s".into(), seq: 1, name: "n".into(), source: "src".into(), created_ms: 5, cancelled: false };
            store.insert_sweep(&sweep, &[StoredTask { entry: entry.clone(), spec: spec() }]).unwrap();
            entry.state = TaskState::Running;
            entry.attempt = 1;
            entry.members = vec!["w".into()];
            store.save_tasks([&entry]).unwrap();
            let epoch = EpochRecord { epoch: 1, attempt: 1, values: vec![("val_mse".into(), 0.5)], seconds: 1.0, samples: 10 };
            store.record_metrics("s.t0", std::slice::from_ref(&epoch)).unwrap();
            store.record_metrics("s.t0", &[EpochRecord { values: vec![("val_mse".into(), 0.25)], ..epoch }]).unwrap();
            let blob = BlobRef { sha256: "ab".repeat(32), size: 3 };
            store.record_checkpoint(&CheckpointRecord { task_id: "s.t0".into(), epoch: 1, attempt: 1, blob, is_final: false }).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.next_sweep_seq().unwrap(), 2);
        let tasks = store.tasks(Some("s")).unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].entry, entry);
        assert_eq!(tasks[0].spec, spec());
        let metrics = store.metrics("s.t0").unwrap();
        assert_eq!(metrics.len(), 1, "a re-reported epoch replaces the earlier one");
        assert_eq!(metrics[0].values, vec![("val_mse".to_string(), 0.25)]);
        assert_eq!(store.latest_checkpoint("s.t0").unwrap().unwrap().epoch, 1);
        assert_eq!(store.min_metric_by_task("s", "val_mse").unwrap(), HashMap::from([("s.t0".to_string(), 0.25)]));
        assert!(store.min_metric_by_task("s", "train_mse").unwrap().is_empty());
        assert!(store.final_checkpoints("s").unwrap().is_empty(), "epoch 1's checkpoint is not final");
        for (epoch, byte) in [(3, "cd"), (2, "ef")] {
            let blob = BlobRef { sha256: byte.repeat(32), size: 3 };
            store.record_checkpoint(&CheckpointRecord { task_id: "s.t0".into(), epoch, attempt: 1, blob, is_final: true }).unwrap();
        }
        assert_eq!(store.final_checkpoints("s").unwrap()["s.t0"].sha256, "cd".repeat(32), "the highest final epoch");
        assert_eq!(store.sweeps().unwrap()[0].source, "src");
    }
}
