//! The reducer's state: each job's exact status, the outcome of each fragment (recorded once,
//! keyed by job and fragment number), and each operation's result.
//!
//! [`ReducerStore`] is the narrow interface the folding logic uses; [`SqliteStore`] is the
//! embedded implementation. A PostgreSQL store for standby reducers can sit behind it.

use std::path::Path;

use common::contract::{JobState, JobStatus, ResultLine};
use common::timefmt::format_ms;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;

use crate::aggregate::Measured;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reducer store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("reducer store holds a malformed record: {0}")]
    Corrupt(String),
    #[error("reducer store: cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A job as the reducer keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    /// `None` until the splitter's accept (or reject) arrives: reports may overtake it after a
    /// redelivery, and are kept meanwhile.
    pub state: Option<JobState>,
    pub operation: Option<String>,
    pub ops_total: u64,
    pub ops_succeeded: u64,
    pub ops_failed: u64,
    pub fragments_done: u64,
    pub fragments_in_flight: u64,
    pub progress_seq: u64,
    pub submitted_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
    pub collect_results: bool,
    pub tolerated_failure_percent: f64,
    /// Attempts per operation before a failure is final (1 until the accept arrives).
    pub max_attempts: u32,
}

impl JobRecord {
    pub fn placeholder(job_id: &str) -> Self {
        Self {
            job_id: job_id.to_owned(),
            state: None,
            operation: None,
            ops_total: 0,
            ops_succeeded: 0,
            ops_failed: 0,
            fragments_done: 0,
            fragments_in_flight: 0,
            progress_seq: 0,
            submitted_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            collect_results: true,
            tolerated_failure_percent: 0.0,
            max_attempts: 1,
        }
    }

    /// The contract's JobStatus, once the job's state is known.
    pub fn status(&self) -> Option<JobStatus> {
        let state = self.state?;
        Some(JobStatus {
            job_id: self.job_id.clone(),
            state,
            operation: self.operation.clone(),
            ops_total: self.ops_total,
            ops_succeeded: self.ops_succeeded,
            ops_failed: self.ops_failed,
            fragments_done: self.fragments_done,
            fragments_in_flight: if state.is_terminal() {
                0
            } else {
                self.fragments_in_flight
            },
            submitted_at: self.submitted_at_ms.map(format_ms),
            started_at: self.started_at_ms.map(format_ms),
            finished_at: self.finished_at_ms.map(format_ms),
            error: self.error.clone(),
        })
    }
}

/// One operation's outcome, to keep for `batchctl results`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub index: u64,
    pub result: Result<Value, String>,
}

/// What the folding logic may do inside one transaction.
pub trait ReducerTx {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRecord>, StoreError>;
    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError>;
    /// Records a fragment's outcome the first time; returns what was recorded for it (which
    /// is `recorded` itself when this call was the first), and whether this call was the first.
    fn record_fragment(
        &mut self,
        job_id: &str,
        fragment: u64,
        recorded: &RecordedFragment,
    ) -> Result<(RecordedFragment, bool), StoreError>;
    fn put_outcomes(&mut self, job_id: &str, outcomes: &[Outcome]) -> Result<(), StoreError>;
    /// The first `limit` failed operations of a job, by index.
    fn first_errors(&mut self, job_id: &str, limit: u32) -> Result<Vec<(u64, String)>, StoreError>;
    /// Keeps a counted fragment's measurements until they are published in a MetricBatch.
    fn put_measured(&mut self, measured: &Measured) -> Result<(), StoreError>;
    /// The next MetricBatch to publish: a batch sealed before (and not confirmed published,
    /// after a crash) with its own sequence number again, or else every pending measurement
    /// under a new sequence number. `None` when nothing is pending.
    fn seal_metric_batch(&mut self) -> Result<Option<(u64, Vec<Measured>)>, StoreError>;
    /// Forgets the measurements of batch `seq`: the broker confirmed it.
    fn metric_batch_published(&mut self, seq: u64) -> Result<(), StoreError>;
}

/// What the reducer keeps of a fragment's first report: enough to settle it again, the same
/// way, when the report is redelivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordedFragment {
    pub done: u32,
    /// Indices to run again (failed on a non-final attempt).
    pub retry: Vec<u64>,
}

pub trait ReducerStore: Send + 'static {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn ReducerTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError>;
}

/// Queries for `batchctl`, on their own connection so they never wait behind a commit.
pub trait ReducerQueries: Send + 'static {
    fn status(&mut self, job_id: &str) -> Result<Option<JobStatus>, StoreError>;
    fn recent_jobs(&mut self, limit: u32) -> Result<Vec<JobStatus>, StoreError>;
    /// Outcomes with index ≥ `from`, ordered, at most `limit`.
    fn results(
        &mut self,
        job_id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<ResultLine>, StoreError>;
    /// Jobs not yet terminal, for the once-a-second status.
    fn active_jobs(&mut self) -> Result<Vec<JobStatus>, StoreError>;
    /// How many jobs are in each state (states with none are left out).
    fn jobs_by_state(&mut self) -> Result<Vec<(JobState, u64)>, StoreError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT,
    operation TEXT,
    ops_total INTEGER NOT NULL,
    ops_succeeded INTEGER NOT NULL,
    ops_failed INTEGER NOT NULL,
    fragments_done INTEGER NOT NULL,
    fragments_in_flight INTEGER NOT NULL,
    progress_seq INTEGER NOT NULL,
    submitted_at_ms INTEGER,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    error TEXT,
    collect_results INTEGER NOT NULL,
    tolerated_failure_percent REAL NOT NULL,
    max_attempts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs (submitted_at_ms);
CREATE TABLE IF NOT EXISTS fragments (
    job_id TEXT NOT NULL,
    fragment INTEGER NOT NULL,
    done INTEGER NOT NULL,
    retry TEXT NOT NULL,
    PRIMARY KEY (job_id, fragment)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metrics_pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch INTEGER,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_pending_by_batch ON metrics_pending (batch);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
";

const JOB_COLUMNS: &str = "job_id, state, operation, ops_total, ops_succeeded, ops_failed,
    fragments_done, fragments_in_flight, progress_seq, submitted_at_ms, started_at_ms,
    finished_at_ms, error, collect_results, tolerated_failure_percent, max_attempts";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(JobRecord, Option<String>)> {
    Ok((
        JobRecord {
            job_id: r.get(0)?,
            state: None,
            operation: r.get(2)?,
            ops_total: get_u64(r, 3)?,
            ops_succeeded: get_u64(r, 4)?,
            ops_failed: get_u64(r, 5)?,
            fragments_done: get_u64(r, 6)?,
            fragments_in_flight: get_u64(r, 7)?,
            progress_seq: get_u64(r, 8)?,
            submitted_at_ms: r.get(9)?,
            started_at_ms: r.get(10)?,
            finished_at_ms: r.get(11)?,
            error: r.get(12)?,
            collect_results: r.get(13)?,
            tolerated_failure_percent: r.get(14)?,
            max_attempts: r.get(15)?,
        },
        r.get(1)?,
    ))
}

fn with_state((mut job, state): (JobRecord, Option<String>)) -> Result<JobRecord, StoreError> {
    job.state = match state {
        None => None,
        Some(s) => Some(
            JobState::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("job state {s:?}")))?,
        ),
    };
    Ok(job)
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A u64 bound as an SQLite INTEGER, which is an i64. A value past `i64::MAX` fails the
/// statement instead of being stored as another number: a count never changes silently on
/// its way into the store. (Jobs hold at most 2^53 − 1 operations, so no count gets there.)
struct SqlU64(u64);

impl rusqlite::ToSql for SqlU64 {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        let v = i64::try_from(self.0).map_err(|_| {
            rusqlite::Error::ToSqlConversionFailure(
                format!(
                    "{} is past the largest SQLite integer, {}",
                    self.0,
                    i64::MAX
                )
                .into(),
            )
        })?;
        Ok(v.into())
    }
}

fn to_i64(v: u64) -> SqlU64 {
    SqlU64(v)
}

/// Reads an INTEGER column written through [`to_i64`]. batchq never writes a negative one
/// there, so one is an error, not a count near 2^64.
fn get_u64(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(column)?;
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Integer, e.into())
    })
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The embedded SQLite store (WAL, synchronous=FULL).
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = open_connection(path, OpenFlags::default())?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }
}

/// A read-only connection to the same database, for queries.
pub struct SqliteQueries {
    conn: Connection,
}

impl SqliteQueries {
    /// Opens the database that [`SqliteStore::open`] created.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(Self { conn })
    }
}

struct SqliteTx<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl ReducerTx for SqliteTx<'_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = self
            .tx
            .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"))?
            .query_row([job_id], job_from_row)
            .optional()?;
        row.map(with_state).transpose()
    }

    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO jobs ({JOB_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ))?
            .execute(params![
                job.job_id,
                job.state.map(JobState::as_str),
                job.operation,
                to_i64(job.ops_total),
                to_i64(job.ops_succeeded),
                to_i64(job.ops_failed),
                to_i64(job.fragments_done),
                to_i64(job.fragments_in_flight),
                to_i64(job.progress_seq),
                job.submitted_at_ms,
                job.started_at_ms,
                job.finished_at_ms,
                job.error,
                job.collect_results,
                job.tolerated_failure_percent,
                job.max_attempts,
            ])?;
        Ok(())
    }

    fn record_fragment(
        &mut self,
        job_id: &str,
        fragment: u64,
        recorded: &RecordedFragment,
    ) -> Result<(RecordedFragment, bool), StoreError> {
        let inserted = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO fragments (job_id, fragment, done, retry)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                job_id,
                to_i64(fragment),
                recorded.done,
                encode(&recorded.retry)?
            ])?;
        if inserted == 1 {
            return Ok((recorded.clone(), true));
        }
        let (done, retry): (u32, String) = self
            .tx
            .prepare_cached(
                "SELECT done, retry FROM fragments WHERE job_id = ?1 AND fragment = ?2",
            )?
            .query_row(params![job_id, to_i64(fragment)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let retry = serde_json::from_str(&retry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((RecordedFragment { done, retry }, false))
    }

    fn put_measured(&mut self, measured: &Measured) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("INSERT INTO metrics_pending (batch, body) VALUES (NULL, ?1)")?
            .execute([encode(measured)?])?;
        Ok(())
    }

    fn seal_metric_batch(&mut self) -> Result<Option<(u64, Vec<Measured>)>, StoreError> {
        let sealed: Option<i64> = self
            .tx
            .prepare_cached("SELECT MIN(batch) FROM metrics_pending WHERE batch IS NOT NULL")?
            .query_row([], |r| r.get(0))?;
        let seq = match sealed {
            Some(seq) => seq,
            None => {
                let pending: i64 = self
                    .tx
                    .prepare_cached("SELECT COUNT(*) FROM metrics_pending")?
                    .query_row([], |r| r.get(0))?;
                if pending == 0 {
                    return Ok(None);
                }
                let seq: i64 = self
                    .tx
                    .prepare_cached(
                        "INSERT INTO meta (key, value) VALUES ('metric_seq', 1)
                         ON CONFLICT (key) DO UPDATE SET value = value + 1
                         RETURNING value",
                    )?
                    .query_row([], |r| r.get(0))?;
                self.tx
                    .prepare_cached("UPDATE metrics_pending SET batch = ?1 WHERE batch IS NULL")?
                    .execute([seq])?;
                seq
            }
        };
        let mut query = self
            .tx
            .prepare_cached("SELECT body FROM metrics_pending WHERE batch = ?1 ORDER BY id")?;
        let bodies = query.query_map([seq], |r| r.get::<_, String>(0))?;
        let mut measured = Vec::new();
        for body in bodies {
            measured.push(
                serde_json::from_str(&body?).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(Some((seq as u64, measured)))
    }

    fn metric_batch_published(&mut self, seq: u64) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("DELETE FROM metrics_pending WHERE batch = ?1")?
            .execute([to_i64(seq)])?;
        Ok(())
    }

    fn first_errors(&mut self, job_id: &str, limit: u32) -> Result<Vec<(u64, String)>, StoreError> {
        let mut query = self.tx.prepare_cached(
            "SELECT idx, value FROM results WHERE job_id = ?1 AND ok = 0 ORDER BY idx LIMIT ?2",
        )?;
        let rows = query.query_map(params![job_id, limit], |r| {
            Ok((get_u64(r, 0)?, r.get::<_, String>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_outcomes(&mut self, job_id: &str, outcomes: &[Outcome]) -> Result<(), StoreError> {
        let mut insert = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO results (job_id, idx, ok, value) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for outcome in outcomes {
            let (ok, value) = match &outcome.result {
                Ok(value) => (true, value.to_string()),
                Err(error) => (false, error.clone()),
            };
            insert.execute(params![job_id, to_i64(outcome.index), ok, value])?;
        }
        Ok(())
    }
}

impl ReducerStore for SqliteStore {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn ReducerTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.conn.transaction()?;
        let mut wrapped = SqliteTx { tx };
        let result = f(&mut wrapped)?;
        wrapped.tx.commit()?;
        Ok(result)
    }
}

impl SqliteQueries {
    fn statuses(
        &mut self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<JobStatus>, StoreError> {
        let mut query = self.conn.prepare_cached(sql)?;
        let rows = query.query_map(args, job_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(status) = with_state(row?)?.status() {
                out.push(status);
            }
        }
        Ok(out)
    }
}

impl ReducerQueries for SqliteQueries {
    fn status(&mut self, job_id: &str) -> Result<Option<JobStatus>, StoreError> {
        Ok(self
            .statuses(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"),
                [job_id],
            )?
            .pop())
    }

    fn recent_jobs(&mut self, limit: u32) -> Result<Vec<JobStatus>, StoreError> {
        self.statuses(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state IS NOT NULL
                 ORDER BY submitted_at_ms DESC, job_id LIMIT ?1"
            ),
            [limit],
        )
    }

    fn results(
        &mut self,
        job_id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<ResultLine>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT idx, ok, value FROM results WHERE job_id = ?1 AND idx >= ?2
             ORDER BY idx LIMIT ?3",
        )?;
        let rows = query.query_map(params![job_id, to_i64(from), limit], |r| {
            Ok((get_u64(r, 0)?, r.get::<_, bool>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (index, ok, value) = row?;
            out.push(if ok {
                ResultLine::Ok {
                    index,
                    result: serde_json::from_str(&value)
                        .map_err(|e| StoreError::Corrupt(format!("result {index}: {e}")))?,
                }
            } else {
                ResultLine::Err {
                    index,
                    error: value,
                }
            });
        }
        Ok(out)
    }

    fn active_jobs(&mut self) -> Result<Vec<JobStatus>, StoreError> {
        self.statuses(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('accepted', 'running')"),
            [],
        )
    }

    fn jobs_by_state(&mut self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT state, COUNT(*) FROM jobs WHERE state IS NOT NULL GROUP BY state",
        )?;
        let rows = query.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut counts = Vec::new();
        for row in rows {
            let (state, n) = row?;
            let state = JobState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown job state {state:?}")))?;
            counts.push((state, n as u64));
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::jobspec::MAX_OPS_TOTAL;

    #[test]
    fn counts_are_stored_exactly_or_not_at_all() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = SqliteStore::open(&dir.path().join("r.db")).expect("store");
        let largest = JobRecord {
            ops_total: MAX_OPS_TOTAL,
            ops_succeeded: MAX_OPS_TOTAL - 1,
            ..JobRecord::placeholder("largest")
        };
        store
            .transaction(|tx| tx.put_job(&largest))
            .expect("stored");
        let read = store.transaction(|tx| tx.job("largest")).expect("read");
        assert_eq!(read, Some(largest));

        // Past SQLite's integer the write fails; it is never clamped to i64::MAX.
        let past = JobRecord {
            ops_total: u64::MAX,
            ..JobRecord::placeholder("past")
        };
        let error = store
            .transaction(|tx| tx.put_job(&past))
            .expect_err("refused");
        assert!(
            error.to_string().contains("18446744073709551615"),
            "{error}"
        );
        let read = store.transaction(|tx| tx.job("past")).expect("read");
        assert_eq!(read, None, "nothing stored");
    }
}
