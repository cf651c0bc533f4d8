//! The database's tables and indexes, and the columns added to them since the first release
//! (added to older files when they are opened).

use rusqlite::{params, Connection};

/// The tables and indexes, created where missing.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    ord INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    gang_size INTEGER NOT NULL,
    members TEXT NOT NULL,
    error TEXT
);
-- A sweep's tasks in plan order, with their state: counting a sweep's (or a stage's) tasks by
-- state reads this index alone, never the rows with their specs.
CREATE INDEX IF NOT EXISTS tasks_by_sweep_order_state ON tasks(sweep_id, ord, state);
DROP INDEX IF EXISTS tasks_by_sweep;
CREATE TABLE IF NOT EXISTS metrics (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    epoch INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    vals TEXT NOT NULL,
    seconds REAL NOT NULL,
    samples INTEGER NOT NULL,
    PRIMARY KEY (task_id, epoch)
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    attempt INTEGER NOT NULL,
    unix_ms INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_task ON logs(task_id, id);
CREATE TABLE IF NOT EXISTS artifacts (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    name TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (task_id, name)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    epoch INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    is_final INTEGER NOT NULL,
    PRIMARY KEY (task_id, epoch)
);
CREATE TABLE IF NOT EXISTS lease_uploads (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    attempt INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt, sha256)
);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    unix_ms INTEGER NOT NULL
);
"#;

/// Columns added after the first release, with their definitions: added to older files at open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tasks", "secrets", "TEXT NOT NULL DEFAULT '[]'"),
    ("tasks", "lapses", "INTEGER NOT NULL DEFAULT 0"),
    // When the latest attempt started and when the task ended (Unix ms; 0: not yet).
    ("tasks", "started_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("tasks", "ended_ms", "INTEGER NOT NULL DEFAULT 0"),
];

/// Creates what is missing: the tables and indexes, and the columns older files lack.
pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    for (table, column, definition) in ADDED_COLUMNS {
        let exists: bool =
            conn.query_row(&format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"), params![column], |r| {
                r.get(0)
            })?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))?;
        }
    }
    Ok(())
}
