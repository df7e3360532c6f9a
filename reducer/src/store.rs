//! The reducer's state: each job's exact status, the outcome of each fragment (recorded once,
//! keyed by job and fragment number), and each operation's result.
//!
//! [`ReducerStore`] is the narrow interface the folding logic uses; [`SqliteStore`] is the
//! embedded implementation. A PostgreSQL store for standby reducers can sit behind it.

use std::path::Path;

use common::contract::{JobState, JobStatus, ResultLine};
use common::retention::format_period_ms;
use common::timefmt::format_ms;
use common::wire::{FailedItem, FailuresPage, Indices, JobDetail, JobsPage, Removal, Tombstone};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use crate::aggregate::Measured;

pub use common::store::StoreError;

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
    /// The JobSpec summary of the accept (JSON text), to store with the job for the console.
    /// Written, never read back: [`ReducerTx::job`] leaves it `None` (the fold has no use for
    /// it, and it may be 16 KiB), and a put with `None` keeps what is stored.
    pub spec: Option<String>,
    /// How often the job was redriven: the round whose reports count.
    pub redrives: u64,
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
            spec: None,
            redrives: 0,
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
            redrives: self.redrives,
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
    /// Whether the job's records were deleted (retention, `batchctl delete`): whatever still
    /// arrives for it is dropped, so it never comes back.
    fn tombstoned(&mut self, job_id: &str) -> Result<bool, StoreError>;
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
    /// Forgets the kept outcomes of the first `done` of `indices` (a redriven round's
    /// fragment ran them again: their latest outcome replaces what earlier rounds kept).
    fn forget_outcomes(
        &mut self,
        job_id: &str,
        indices: &Indices,
        done: u32,
    ) -> Result<(), StoreError>;
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
    /// Indices whose failure was final and counted ([`common::wire::Settled::failed`]).
    pub failed: Vec<u64>,
    /// Whether the fragment was counted ([`common::wire::Settled::counted`]).
    pub counted: bool,
}

/// The lists of a recorded fragment as the `retry` column holds them: the retry list alone,
/// as a JSON array (what every fragment recorded before redrives holds: counted, no final
/// failures), or an object with all three.
#[derive(serde::Serialize, serde::Deserialize)]
struct RecordedLists {
    retry: Vec<u64>,
    failed: Vec<u64>,
    counted: bool,
}

impl RecordedFragment {
    /// The `retry` column's text (see [`RecordedLists`]).
    pub(crate) fn lists_text(&self) -> Result<String, StoreError> {
        if self.counted && self.failed.is_empty() {
            return encode(&self.retry);
        }
        encode(&RecordedLists {
            retry: self.retry.clone(),
            failed: self.failed.clone(),
            counted: self.counted,
        })
    }

    /// A recorded fragment from its `done` and its `retry` column's text.
    pub(crate) fn from_lists_text(done: u32, text: &str) -> Result<Self, StoreError> {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("recorded fragment: {e}"));
        if text.trim_start().starts_with('[') {
            return Ok(Self {
                done,
                retry: serde_json::from_str(text).map_err(corrupt)?,
                failed: Vec::new(),
                counted: true,
            });
        }
        let lists: RecordedLists = serde_json::from_str(text).map_err(corrupt)?;
        Ok(Self {
            done,
            retry: lists.retry,
            failed: lists.failed,
            counted: lists.counted,
        })
    }
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
    /// What is left of a job whose records were deleted.
    fn tombstone(&mut self, job_id: &str) -> Result<Option<Tombstone>, StoreError>;
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
    /// The console's list, in one snapshot: jobs with a state, newest submitted first (then
    /// by id), those in `filter.state` whose id starts with `filter.prefix` (each if given),
    /// `limit` of them from `offset` on; how many match in all; how many jobs are in each
    /// state, whatever the filter.
    fn jobs_page(
        &mut self,
        filter: &JobsFilter,
        offset: u64,
        limit: u32,
    ) -> Result<JobsPage, StoreError>;
    /// A job's failed operations by index, in one snapshot: those whose error contains
    /// `search` ignoring ASCII case (if given), `limit` of them from `offset` on, and how many
    /// match in all.
    fn failures(
        &mut self,
        job_id: &str,
        search: Option<&str>,
        offset: u64,
        limit: u32,
    ) -> Result<FailuresPage, StoreError>;
    /// The job's status and the JobSpec summary kept with it; `None` for a job without a
    /// state (unknown, or its accept has not arrived).
    fn job_detail(&mut self, job_id: &str) -> Result<Option<JobDetail>, StoreError>;
}

/// Which jobs the console lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobsFilter {
    pub state: Option<JobState>,
    /// Taken as it is: `%` and `_` are characters like any other.
    pub prefix: Option<String>,
}

impl JobsFilter {
    /// The prefix, unless it is empty (which every id has).
    pub(crate) fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref().filter(|p| !p.is_empty())
    }
}

/// The search text as the stores compare it: lowercase ASCII, as the errors are compared;
/// `None` for an empty search, which every error matches.
pub(crate) fn search_needle(search: Option<&str>) -> Option<String> {
    search
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// Counts by state as the console gets them.
pub(crate) fn by_state_map(
    counts: Vec<(JobState, u64)>,
) -> std::collections::BTreeMap<String, u64> {
    counts
        .into_iter()
        .map(|(state, n)| (state.as_str().to_owned(), n))
        .collect()
}

/// A kept JobSpec summary, parsed.
pub(crate) fn parse_spec(job_id: &str, spec: Option<&str>) -> Result<Option<Value>, StoreError> {
    spec.map(|text| {
        serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("the spec of job {job_id}: {e}")))
    })
    .transpose()
}

/// Schema version 1: the tables as they were before versions were recorded. Written with
/// `IF NOT EXISTS`, so it applies to an empty database and to a store written then (which has
/// them all, and no recorded version).
const SCHEMA_V1: &str = "
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

/// Schema version 2: retention. Finished jobs are found by when they ended; a deleted job
/// leaves a tombstone (kept, a few dozen bytes) so that asking for it says what happened and
/// late reports do not bring it back. `purged` is 1 once none of its rows are left.
const SCHEMA_V2: &str = "
CREATE INDEX jobs_by_finished ON jobs (finished_at_ms) WHERE finished_at_ms IS NOT NULL;
CREATE TABLE tombstones (
    job_id TEXT PRIMARY KEY,
    how TEXT NOT NULL,
    finished_at_ms INTEGER,
    deleted_at_ms INTEGER NOT NULL,
    retention_ms INTEGER,
    purged INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX tombstones_to_purge ON tombstones (job_id) WHERE purged = 0;
";

/// Schema version 3: the web console. Each job keeps the JobSpec summary it was accepted with
/// (`spec`, JSON text; deleted with the job's row). The console lists jobs newest first, by
/// state or not, a page at a time, deep pages too: indexes in that order replace the plain
/// ones on `state` and `submitted_at_ms` (which served the same queries less well). A job's
/// failures are paged and searched through an index of the failed rows alone, so a job of
/// millions of results and a few failures answers at once.
const SCHEMA_V3: &str = "
ALTER TABLE jobs ADD COLUMN spec TEXT;
DROP INDEX jobs_by_state;
DROP INDEX jobs_by_submitted;
CREATE INDEX jobs_newest ON jobs (submitted_at_ms DESC, job_id);
CREATE INDEX jobs_by_state_newest ON jobs (state, submitted_at_ms DESC, job_id);
CREATE INDEX results_failed ON results (job_id, idx) WHERE ok = 0;
";

/// Schema version 4: redrives. Each job counts its redrives (the round whose reports count).
/// A recorded fragment's `retry` column may also hold an object with its final failures and
/// whether it was counted (see `RecordedFragment::lists_text`); no change of table for that.
const SCHEMA_V4: &str = "
ALTER TABLE jobs ADD COLUMN redrives INTEGER NOT NULL DEFAULT 0;
";

/// The reducer store's migrations, in order; the schema version is their count.
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4];

pub(crate) const JOB_COLUMNS: &str =
    "job_id, state, operation, ops_total, ops_succeeded, ops_failed,
    fragments_done, fragments_in_flight, progress_seq, submitted_at_ms, started_at_ms,
    finished_at_ms, error, collect_results, tolerated_failure_percent, max_attempts, redrives";

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
            spec: None,
            redrives: get_u64(r, 16)?,
        },
        r.get(1)?,
    ))
}

pub(crate) fn with_state(
    (mut job, state): (JobRecord, Option<String>),
) -> Result<JobRecord, StoreError> {
    job.state = match state {
        None => None,
        Some(s) => Some(
            JobState::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("job state {s:?}")))?,
        ),
    };
    Ok(job)
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

use common::store::{get_u64, to_i64};

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Result rows in one `INSERT` statement (4 parameters each, well under SQLite's limit).
const RESULT_ROWS_PER_INSERT: usize = 128;

/// `INSERT OR IGNORE` of [`RESULT_ROWS_PER_INSERT`] result rows.
fn multi_row_result_insert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let rows = vec!["(?, ?, ?, ?)"; RESULT_ROWS_PER_INSERT].join(", ");
        format!("INSERT OR IGNORE INTO results (job_id, idx, ok, value) VALUES {rows}")
    })
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
        let mut conn = open_connection(path, OpenFlags::default())?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        common::migrate::migrate(&mut conn, MIGRATIONS)?;
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

    fn tombstoned(&mut self, job_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM tombstones WHERE job_id = ?1")?
            .query_row([job_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError> {
        // An upsert rather than INSERT OR REPLACE, which would delete the row and with it
        // the spec that only the accept's put carries.
        self.tx
            .prepare_cached(&format!(
                "INSERT INTO jobs ({JOB_COLUMNS}, spec)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18)
                 ON CONFLICT (job_id) DO UPDATE SET
                    state = excluded.state, operation = excluded.operation,
                    ops_total = excluded.ops_total, ops_succeeded = excluded.ops_succeeded,
                    ops_failed = excluded.ops_failed, fragments_done = excluded.fragments_done,
                    fragments_in_flight = excluded.fragments_in_flight,
                    progress_seq = excluded.progress_seq,
                    submitted_at_ms = excluded.submitted_at_ms,
                    started_at_ms = excluded.started_at_ms,
                    finished_at_ms = excluded.finished_at_ms, error = excluded.error,
                    collect_results = excluded.collect_results,
                    tolerated_failure_percent = excluded.tolerated_failure_percent,
                    max_attempts = excluded.max_attempts, redrives = excluded.redrives,
                    spec = COALESCE(excluded.spec, jobs.spec)"
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
                to_i64(job.redrives),
                job.spec,
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
                recorded.lists_text()?
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
        Ok((RecordedFragment::from_lists_text(done, &retry)?, false))
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
        // Many rows per statement: a report holds up to 10,000 results, and one statement per
        // row spent as much in the statement machinery as in the table (the README demo's job
        // keeps 1,000,000).
        let rows: Vec<(common::store::SqlU64, bool, String)> = outcomes
            .iter()
            .map(|outcome| match &outcome.result {
                Ok(value) => (to_i64(outcome.index), true, value.to_string()),
                Err(error) => (to_i64(outcome.index), false, error.clone()),
            })
            .collect();
        let mut chunks = rows.chunks_exact(RESULT_ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut insert = self.tx.prepare_cached(multi_row_result_insert())?;
            let mut values: Vec<&dyn rusqlite::ToSql> =
                Vec::with_capacity(4 * RESULT_ROWS_PER_INSERT);
            for chunk in chunks.by_ref() {
                values.clear();
                for (idx, ok, value) in chunk {
                    values.extend([&job_id as &dyn rusqlite::ToSql, idx, ok, value]);
                }
                insert.execute(rusqlite::params_from_iter(values.iter()))?;
            }
        }
        let mut insert = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO results (job_id, idx, ok, value) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (idx, ok, value) in chunks.remainder() {
            insert.execute(params![job_id, idx, ok, value])?;
        }
        Ok(())
    }

    fn forget_outcomes(
        &mut self,
        job_id: &str,
        indices: &Indices,
        done: u32,
    ) -> Result<(), StoreError> {
        match indices.head(done as usize) {
            Indices::Span(start, end) => {
                self.tx
                    .prepare_cached(
                        "DELETE FROM results WHERE job_id = ?1 AND idx >= ?2 AND idx < ?3",
                    )?
                    .execute(params![job_id, to_i64(start), to_i64(end)])?;
            }
            Indices::List(list) => {
                let mut delete = self
                    .tx
                    .prepare_cached("DELETE FROM results WHERE job_id = ?1 AND idx = ?2")?;
                for idx in list {
                    delete.execute(params![job_id, to_i64(idx)])?;
                }
            }
        }
        Ok(())
    }
}

impl ReducerStore for SqliteStore {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn ReducerTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        // IMMEDIATE: the retention task writes on a connection of its own; a transaction
        // that took the write lock from its start waits for it (busy_timeout) instead of
        // failing when it turns from reading to writing.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
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

    /// Runs `f` in one read transaction, so its statements see one snapshot.
    fn snapshot<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conn.execute_batch("BEGIN")?;
        let result = f(self);
        // Only reads: ending the transaction either way loses nothing.
        let end = self
            .conn
            .execute_batch(if result.is_ok() { "COMMIT" } else { "ROLLBACK" });
        let value = result?;
        end?;
        Ok(value)
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

    fn tombstone(&mut self, job_id: &str) -> Result<Option<Tombstone>, StoreError> {
        tombstone(&self.conn, job_id)
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

    fn jobs_page(
        &mut self,
        filter: &JobsFilter,
        offset: u64,
        limit: u32,
    ) -> Result<JobsPage, StoreError> {
        // Only the filters given are in the statement, so the planner picks the index that
        // serves it (`jobs_by_state_newest` with a state, else `jobs_newest`).
        let mut conditions = String::from("state IS NOT NULL");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(state) = filter.state {
            args.push(Box::new(state.as_str()));
            conditions.push_str(&format!(" AND state = ?{}", args.len()));
        }
        if let Some(prefix) = filter.prefix() {
            // substr counts characters, as chars() does.
            args.push(Box::new(prefix.chars().count() as i64));
            args.push(Box::new(prefix.to_owned()));
            conditions.push_str(&format!(
                " AND substr(job_id, 1, ?{}) = ?{}",
                args.len() - 1,
                args.len()
            ));
        }
        let count_sql = format!("SELECT COUNT(*) FROM jobs WHERE {conditions}");
        let page_sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE {conditions}
             ORDER BY submitted_at_ms DESC, job_id LIMIT ?{} OFFSET ?{}",
            args.len() + 1,
            args.len() + 2
        );
        self.snapshot(|q| {
            let total: i64 = q
                .conn
                .prepare_cached(&count_sql)?
                .query_row(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
            let (limit, offset) = (limit, to_i64(offset));
            let mut page_args: Vec<&dyn rusqlite::ToSql> = args
                .iter()
                .map(|a| a.as_ref() as &dyn rusqlite::ToSql)
                .collect();
            page_args.extend([&limit as &dyn rusqlite::ToSql, &offset]);
            let jobs = q.statuses(&page_sql, rusqlite::params_from_iter(page_args))?;
            Ok(JobsPage {
                jobs,
                total: total as u64,
                by_state: by_state_map(q.jobs_by_state()?),
            })
        })
    }

    fn failures(
        &mut self,
        job_id: &str,
        search: Option<&str>,
        offset: u64,
        limit: u32,
    ) -> Result<FailuresPage, StoreError> {
        // `ok = 0` written as the partial index `results_failed` says it, so that it is used.
        // An error is stored as its plain text; SQLite's lower() folds ASCII only, as
        // search_needle() does.
        const MATCHES: &str =
            "job_id = ?1 AND ok = 0 AND (?2 IS NULL OR instr(lower(value), ?2) > 0)";
        let needle = search_needle(search);
        self.snapshot(|q| {
            let total: i64 = q
                .conn
                .prepare_cached(&format!("SELECT COUNT(*) FROM results WHERE {MATCHES}"))?
                .query_row(params![job_id, needle], |r| r.get(0))?;
            let mut query = q.conn.prepare_cached(&format!(
                "SELECT idx, value FROM results WHERE {MATCHES} ORDER BY idx LIMIT ?3 OFFSET ?4"
            ))?;
            let rows = query.query_map(params![job_id, needle, limit, to_i64(offset)], |r| {
                Ok(FailedItem {
                    index: get_u64(r, 0)?,
                    error: r.get(1)?,
                })
            })?;
            Ok(FailuresPage {
                failures: rows.collect::<Result<_, _>>()?,
                total: total as u64,
            })
        })
    }

    fn job_detail(&mut self, job_id: &str) -> Result<Option<JobDetail>, StoreError> {
        let row = self
            .conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS}, spec FROM jobs WHERE job_id = ?1"
            ))?
            .query_row([job_id], |r| {
                Ok((job_from_row(r)?, r.get::<_, Option<String>>(17)?))
            })
            .optional()?;
        let Some((job, spec)) = row else {
            return Ok(None);
        };
        let Some(status) = with_state(job)?.status() else {
            return Ok(None);
        };
        Ok(Some(JobDetail {
            status,
            spec: parse_spec(job_id, spec.as_deref())?,
        }))
    }
}

fn tombstone(conn: &Connection, job_id: &str) -> Result<Option<Tombstone>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT how, finished_at_ms, deleted_at_ms, retention_ms FROM tombstones
             WHERE job_id = ?1",
        )?
        .query_row([job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .optional()?;
    let Some((how, finished_at_ms, deleted_at_ms, retention_ms)) = row else {
        return Ok(None);
    };
    Ok(Some(Tombstone {
        job_id: job_id.to_owned(),
        how: Removal::parse(&how)
            .ok_or_else(|| StoreError::Corrupt(format!("tombstone of {job_id}: {how:?}")))?,
        finished_at: finished_at_ms.map(format_ms),
        deleted_at: format_ms(deleted_at_ms),
        retention: retention_ms.map(|ms| format_period_ms(ms.max(0) as u128)),
    }))
}

/// Job states that never change again, as stored.
pub(crate) const TERMINAL_STATES: &str = "'succeeded', 'failed', 'cancelled', 'rejected'";

/// What [`SqlitePruner::bury`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Burial {
    /// The job was finished: its tombstone is written and its records are no longer seen;
    /// [`SqlitePruner::purge_some`] deletes its rows.
    Buried,
    /// The job has not ended (or its accept has not arrived): nothing was touched.
    StillRunning,
    /// Deleted before.
    Gone(Tombstone),
    Unknown,
}

/// Deletes finished jobs (retention, `batchctl delete`) on a connection of its own, in short
/// transactions, so a commit of the fold loop never waits long behind it (SQLite has one
/// writer at a time).
pub struct SqlitePruner {
    conn: Connection,
}

impl SqlitePruner {
    /// Opens the database that [`SqliteStore::open`] created and migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_connection(path, OpenFlags::default())?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(Self { conn })
    }

    /// Up to `limit` finished jobs that ended before `ended_before_ms`, oldest first.
    pub fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        let mut query = self.conn.prepare_cached(&format!(
            "SELECT job_id FROM jobs
             WHERE finished_at_ms < ?1 AND state IN ({TERMINAL_STATES})
             ORDER BY finished_at_ms LIMIT ?2"
        ))?;
        let rows = query.query_map(params![ended_before_ms, limit], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a finished job's status in one small transaction and leaves its tombstone;
    /// its results, fragments and pending metrics go in later batches ([`Self::purge_some`]),
    /// unseen meanwhile. A job that has not ended is never touched.
    pub fn bury(
        &mut self,
        job_id: &str,
        how: Removal,
        now_ms: i64,
        retention_ms: Option<i64>,
    ) -> Result<Burial, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job: Option<(Option<String>, Option<i64>)> = tx
            .prepare_cached("SELECT state, finished_at_ms FROM jobs WHERE job_id = ?1")?
            .query_row([job_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((state, finished_at_ms)) = job else {
            return Ok(match tombstone(&tx, job_id)? {
                Some(stone) => Burial::Gone(stone),
                None => Burial::Unknown,
            });
        };
        let terminal = state
            .as_deref()
            .and_then(JobState::parse)
            .is_some_and(JobState::is_terminal);
        if !terminal {
            return Ok(Burial::StillRunning);
        }
        tx.prepare_cached(
            "INSERT INTO tombstones (job_id, how, finished_at_ms, deleted_at_ms, retention_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            job_id,
            how.as_str(),
            finished_at_ms,
            now_ms,
            retention_ms.filter(|_| how == Removal::Expired)
        ])?;
        tx.prepare_cached("DELETE FROM jobs WHERE job_id = ?1")?
            .execute([job_id])?;
        tx.commit()?;
        Ok(Burial::Buried)
    }

    /// Deletes up to `limit` rows (results, then fragments, then unpublished metrics) of one
    /// buried job, in one transaction. `None` when no buried job has rows left.
    pub fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
        common::store::purge_tombstoned(&mut self.conn, PURGE_STATEMENTS, limit)
    }
}

/// What a deleted job leaves, in the order it is purged (see
/// [`common::store::purge_tombstoned`]).
const PURGE_STATEMENTS: &[&str] = &[
    "DELETE FROM results WHERE job_id = ?1 AND idx IN
        (SELECT idx FROM results WHERE job_id = ?1 ORDER BY idx LIMIT ?2)",
    "DELETE FROM fragments WHERE job_id = ?1 AND fragment IN
        (SELECT fragment FROM fragments WHERE job_id = ?1 ORDER BY fragment LIMIT ?2)",
    // Measurements not sealed into a MetricBatch yet; a sealed batch is published
    // as it was sealed (its sequence number must not change).
    "DELETE FROM metrics_pending WHERE id IN
        (SELECT id FROM metrics_pending
         WHERE batch IS NULL AND json_extract(body, '$.job_id') = ?1 LIMIT ?2)",
];

#[cfg(test)]
pub(crate) mod tests {
    //! The store's tests. The bodies in [`cases`] are generic over a [`Fixture`], so they
    //! run against every store: SQLite here, PostgreSQL in `crate::pg_store`'s tests.

    use super::*;
    use crate::fold;
    use common::wire::{FragmentReport, Indices, ReducerInput};

    /// What a test needs of a store beside its traits.
    pub(crate) trait Fixture {
        type Store: ReducerStore;
        type Queries: ReducerQueries;
        type Pruner: Prune;
        fn store(&mut self) -> &mut Self::Store;
        fn queries(&self) -> Self::Queries;
        fn pruner(&self) -> Self::Pruner;
        /// How many rows of `job_id` `table` holds (`metrics_pending`: by the body's job).
        fn rows(&self, table: &str, job_id: &str) -> i64;
    }

    /// The pruners' methods, for tests generic over the store.
    pub(crate) trait Prune {
        fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError>;
        fn bury(
            &mut self,
            job_id: &str,
            how: Removal,
            now_ms: i64,
            retention_ms: Option<i64>,
        ) -> Result<Burial, StoreError>;
        fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError>;
    }

    impl Prune for SqlitePruner {
        fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError> {
            SqlitePruner::expired(self, ended_before_ms, limit)
        }
        fn bury(
            &mut self,
            job_id: &str,
            how: Removal,
            now_ms: i64,
            retention_ms: Option<i64>,
        ) -> Result<Burial, StoreError> {
            SqlitePruner::bury(self, job_id, how, now_ms, retention_ms)
        }
        fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
            SqlitePruner::purge_some(self, limit)
        }
    }

    pub(crate) struct SqliteFixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        store: SqliteStore,
    }

    /// A new SQLite store in a folder of its own.
    pub(crate) fn sqlite() -> SqliteFixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.db");
        let store = SqliteStore::open(&path).expect("store");
        SqliteFixture {
            _dir: dir,
            path,
            store,
        }
    }

    impl Fixture for SqliteFixture {
        type Store = SqliteStore;
        type Queries = SqliteQueries;
        type Pruner = SqlitePruner;
        fn store(&mut self) -> &mut SqliteStore {
            &mut self.store
        }
        fn queries(&self) -> SqliteQueries {
            SqliteQueries::open(&self.path).expect("queries")
        }
        fn pruner(&self) -> SqlitePruner {
            SqlitePruner::open(&self.path).expect("pruner")
        }
        fn rows(&self, table: &str, job_id: &str) -> i64 {
            rows(&self.store.conn, table, job_id)
        }
    }

    pub(crate) fn accepted(job_id: &str, ops_total: u64) -> ReducerInput {
        ReducerInput::Accepted {
            job_id: job_id.into(),
            operation: "op".into(),
            ops_total,
            submitted_at_ms: 1,
            collect_results: true,
            tolerated_failure_percent: 0.0,
            max_attempts: 1,
            spec: None,
        }
    }

    pub(crate) fn report(job_id: &str, fragment: u64, start: u64, end: u64) -> ReducerInput {
        let done = (end - start) as u32;
        ReducerInput::Fragment(FragmentReport {
            job_id: job_id.into(),
            fragment,
            operation: "op".into(),
            attempt: 1,
            worker: "w".into(),
            indices: Indices::Span(start, end),
            done,
            failures: Vec::new(),
            results: (0..done).map(Value::from).collect(),
            cut: None,
            started_at_ms: 2,
            elapsed_us: 10,
            measurements: Default::default(),
            round: 0,
        })
    }

    fn rows(conn: &Connection, table: &str, job_id: &str) -> i64 {
        let sql = match table {
            "metrics_pending" => {
                "SELECT COUNT(*) FROM metrics_pending WHERE json_extract(body, '$.job_id') = ?1"
                    .to_owned()
            }
            _ => format!("SELECT COUNT(*) FROM {table} WHERE job_id = ?1"),
        };
        conn.query_row(&sql, [job_id], |r| r.get(0)).expect("count")
    }

    pub(crate) mod cases {
        use super::*;

        /// Job `done` (25 results in 5 fragments, finished at 5) and job `running` (one
        /// fragment of 10 counted, not finished).
        fn store_with_jobs<F: Fixture>(fx: &mut F) {
            let mut inputs = vec![accepted("done", 25), accepted("running", 100)];
            inputs.extend((0..5).map(|f| report("done", f, f * 5, f * 5 + 5)));
            inputs.push(report("running", 0, 0, 10));
            fx.store()
                .transaction(|tx| fold::apply(tx, inputs, 5))
                .expect("fold");
        }

        pub(crate) fn expiry_deletes_a_finished_job_in_small_batches_and_never_a_running_one<
            F: Fixture,
        >(
            fx: &mut F,
        ) {
            store_with_jobs(fx);
            let mut pruner = fx.pruner();
            assert_eq!(
                pruner.expired(5, 10).expect("expired"),
                Vec::<String>::new()
            );
            assert_eq!(
                pruner.expired(6, 10).expect("expired"),
                vec!["done".to_owned()]
            );
            assert_eq!(
                pruner
                    .bury("running", Removal::Expired, 100, Some(5))
                    .expect("bury"),
                Burial::StillRunning
            );
            assert_eq!(
                pruner
                    .bury("done", Removal::Expired, 100, Some(5))
                    .expect("bury"),
                Burial::Buried
            );
            // 25 results, 5 fragments, 5 pending measurements: 35 rows, 10 at a time.
            let mut batches = Vec::new();
            while let Some(n) = pruner.purge_some(10).expect("purge") {
                batches.push(n);
            }
            assert_eq!(batches, vec![10, 10, 10, 5]);
            for table in ["results", "fragments", "metrics_pending", "jobs"] {
                assert_eq!(fx.rows(table, "done"), 0, "{table} of done");
            }
            assert_eq!(fx.rows("results", "running"), 10);
            assert_eq!(fx.rows("fragments", "running"), 1);
            assert_eq!(fx.rows("metrics_pending", "running"), 1);

            let mut queries = fx.queries();
            assert_eq!(queries.status("done").expect("status"), None);
            let stone = queries.tombstone("done").expect("tombstone").expect("kept");
            assert_eq!(
                (stone.how, stone.retention.as_deref()),
                (Removal::Expired, Some("5ms"))
            );
            assert!(
                stone
                    .describe()
                    .starts_with("job done expired (it ended at "),
                "{}",
                stone.describe()
            );
            assert!(queries.status("running").expect("status").is_some());
            assert_eq!(
                pruner
                    .bury("done", Removal::Deleted, 200, None)
                    .expect("again"),
                Burial::Gone(stone)
            );
            assert_eq!(
                pruner
                    .bury("nope", Removal::Deleted, 200, None)
                    .expect("unknown"),
                Burial::Unknown
            );
        }

        pub(crate) fn counts_are_stored_exactly_or_not_at_all<F: Fixture>(fx: &mut F) {
            use common::jobspec::MAX_OPS_TOTAL;
            let store = fx.store();
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

            // Past the store's integer the write fails; it is never clamped to i64::MAX.
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

        /// The console's queries: pages of jobs, newest first, by state and by id prefix (`%`
        /// and `_` are characters like any other); a job's failures paged and searched
        /// ignoring ASCII case; the spec kept with a job through later writes, and deleted
        /// with it.
        pub(crate) fn console_queries_page_filter_and_search<F: Fixture>(fx: &mut F) {
            let spec = serde_json::json!({"operation": "op", "items": {"count": 3}});
            let accept =
                |job_id: &str, submitted_at_ms: i64, spec: Option<Value>| ReducerInput::Accepted {
                    job_id: job_id.into(),
                    operation: "op".into(),
                    ops_total: 100,
                    submitted_at_ms,
                    collect_results: true,
                    tolerated_failure_percent: 100.0,
                    max_attempts: 1,
                    spec,
                };
            let inputs = vec![
                accept("a%1", 10, Some(spec.clone())),
                accept("a_2", 20, None),
                accept("ab3", 20, None),
                accept("b4", 30, None),
                ReducerInput::Rejected {
                    job_id: "r5".into(),
                    error: "no such operation".into(),
                    submitted_at_ms: 15,
                },
                // Cancelled before its accept arrived: no submission time, so last.
                ReducerInput::Cancelled {
                    job_id: "c6".into(),
                    at_ms: 4,
                },
                report("a_2", 0, 0, 5),
                // No state yet: never listed.
                report("p", 0, 0, 2),
            ];
            fx.store()
                .transaction(|tx| fold::apply(tx, inputs, 5))
                .expect("fold");
            // Failures of a_2 at 5..=25 (its results 0..5 and 26 succeeded); one holds a NUL.
            let mut outcomes: Vec<Outcome> = (5..25)
                .map(|index| Outcome {
                    index,
                    result: Err(if index % 3 == 0 {
                        format!("Timeout at step {index}")
                    } else {
                        format!("bad input {index}")
                    }),
                })
                .collect();
            outcomes.push(Outcome {
                index: 25,
                result: Err("NUL\0byte TIMEOUT".into()),
            });
            outcomes.push(Outcome {
                index: 26,
                result: Ok(Value::from("timeout, but fine")),
            });
            fx.store()
                .transaction(|tx| tx.put_outcomes("a_2", &outcomes))
                .expect("outcomes");

            let mut queries = fx.queries();
            let mut page = |state: Option<JobState>, prefix: Option<&str>, offset, limit| {
                let filter = JobsFilter {
                    state,
                    prefix: prefix.map(str::to_owned),
                };
                let page = queries
                    .jobs_page(&filter, offset, limit)
                    .expect("jobs page");
                let ids: Vec<String> = page.jobs.iter().map(|j| j.job_id.clone()).collect();
                (ids, page.total, page.by_state)
            };
            let ids =
                |list: &[&str]| -> Vec<String> { list.iter().map(|s| (*s).to_owned()).collect() };
            let (all, total, by_state) = page(None, None, 0, 10);
            assert_eq!(all, ids(&["b4", "a_2", "ab3", "r5", "a%1", "c6"]));
            assert_eq!(total, 6);
            let counts: std::collections::BTreeMap<String, u64> = [
                ("accepted", 3),
                ("cancelled", 1),
                ("rejected", 1),
                ("running", 1),
            ]
            .into_iter()
            .map(|(state, n)| (state.to_owned(), n))
            .collect();
            assert_eq!(by_state, counts);
            assert_eq!(
                page(None, None, 2, 2),
                (ids(&["ab3", "r5"]), 6, counts.clone())
            );
            assert_eq!(page(None, None, 6, 10), (ids(&[]), 6, counts.clone()));
            let accepted = Some(JobState::Accepted);
            assert_eq!(
                page(accepted, None, 0, 10),
                (ids(&["b4", "ab3", "a%1"]), 3, counts.clone())
            );
            assert_eq!(
                page(accepted, None, 1, 1),
                (ids(&["ab3"]), 3, counts.clone())
            );
            assert_eq!(
                page(None, Some("a_"), 0, 10),
                (ids(&["a_2"]), 1, counts.clone())
            );
            assert_eq!(
                page(None, Some("a%"), 0, 10),
                (ids(&["a%1"]), 1, counts.clone())
            );
            assert_eq!(
                page(None, Some("a"), 0, 10),
                (ids(&["a_2", "ab3", "a%1"]), 3, counts.clone())
            );
            assert_eq!(
                page(accepted, Some("a"), 0, 10),
                (ids(&["ab3", "a%1"]), 2, counts.clone())
            );
            assert_eq!(
                page(None, Some(""), 0, 1),
                (ids(&["b4"]), 6, counts.clone())
            );
            assert_eq!(page(None, Some("zz"), 0, 10), (ids(&[]), 0, counts.clone()));
            assert_eq!(
                page(Some(JobState::Failed), None, 0, 10),
                (ids(&[]), 0, counts.clone())
            );

            let mut failures = |search: Option<&str>, offset, limit| {
                let page = queries
                    .failures("a_2", search, offset, limit)
                    .expect("failures");
                let indices: Vec<u64> = page.failures.iter().map(|f| f.index).collect();
                (indices, page.total)
            };
            assert_eq!(failures(None, 0, 5), (vec![5, 6, 7, 8, 9], 21));
            assert_eq!(failures(None, 19, 5), (vec![24, 25], 21));
            assert_eq!(failures(None, 21, 5), (vec![], 21));
            let timeouts = vec![6, 9, 12, 15, 18, 21, 24, 25];
            assert_eq!(failures(Some("timeout"), 0, 100), (timeouts.clone(), 8));
            assert_eq!(failures(Some("TimeOUT"), 0, 100), (timeouts, 8));
            assert_eq!(failures(Some("timeout"), 2, 3), (vec![12, 15, 18], 8));
            assert_eq!(failures(Some("step 1"), 0, 100), (vec![12, 15, 18], 3));
            assert_eq!(failures(Some("%"), 0, 100), (vec![], 0));
            assert_eq!(failures(Some(""), 0, 2), (vec![5, 6], 21));
            let first = queries.failures("a_2", None, 0, 2).expect("failures");
            assert_eq!(
                first.failures,
                vec![
                    FailedItem {
                        index: 5,
                        error: "bad input 5".into()
                    },
                    FailedItem {
                        index: 6,
                        error: "Timeout at step 6".into()
                    },
                ]
            );
            let nul = queries.failures("a_2", None, 20, 1).expect("failures");
            assert_eq!(nul.failures[0].error, "NUL\0byte TIMEOUT");
            assert_eq!(
                queries
                    .failures("nope", Some("x"), 0, 10)
                    .expect("failures"),
                FailuresPage {
                    failures: vec![],
                    total: 0
                }
            );

            let detail = queries.job_detail("a%1").expect("detail").expect("known");
            assert_eq!(
                (detail.status.state, detail.spec),
                (JobState::Accepted, Some(spec.clone()))
            );
            let detail = queries.job_detail("a_2").expect("detail").expect("known");
            assert_eq!(
                (detail.status.state, detail.spec),
                (JobState::Running, None)
            );
            assert_eq!(
                queries.job_detail("p").expect("detail"),
                None,
                "no state yet"
            );
            assert_eq!(queries.job_detail("nope").expect("detail"), None);

            // Later writes of the job keep its spec; deleting the job deletes it.
            let cancel = vec![ReducerInput::Cancelled {
                job_id: "a%1".into(),
                at_ms: 6,
            }];
            fx.store()
                .transaction(|tx| fold::apply(tx, cancel, 6))
                .expect("cancel");
            let detail = queries.job_detail("a%1").expect("detail").expect("known");
            assert_eq!(
                (detail.status.state, detail.spec),
                (JobState::Cancelled, Some(spec))
            );
            assert_eq!(
                fx.pruner()
                    .bury("a%1", Removal::Deleted, 7, None)
                    .expect("bury"),
                Burial::Buried
            );
            assert_eq!(queries.job_detail("a%1").expect("detail"), None);
            assert_eq!(fx.rows("jobs", "a%1"), 0);
        }

        /// The queries' answers and their order, jobs of every kind among them.
        pub(crate) fn queries_answer_in_the_same_order<F: Fixture>(fx: &mut F) {
            let accept = |job_id: &str, submitted_at_ms: i64| ReducerInput::Accepted {
                job_id: job_id.into(),
                operation: "op".into(),
                ops_total: 100,
                submitted_at_ms,
                collect_results: true,
                tolerated_failure_percent: 0.0,
                max_attempts: 1,
                spec: None,
            };
            let inputs = vec![
                accept("b", 1),
                accept("a", 3),
                accept("e", 3),
                ReducerInput::Rejected {
                    job_id: "d".into(),
                    error: "no such operation".into(),
                    submitted_at_ms: 2,
                },
                // Cancelled before its accept arrived: no submission time.
                ReducerInput::Cancelled {
                    job_id: "c".into(),
                    at_ms: 4,
                },
                // A report that overtook its accept: no state, not listed.
                report("p", 0, 0, 2),
                report("a", 0, 0, 5),
                report("a", 1, 5, 10),
                ReducerInput::Progress {
                    job_id: "b".into(),
                    in_flight: 2,
                    seq: 1,
                    at_ms: 4,
                },
            ];
            fx.store()
                .transaction(|tx| fold::apply(tx, inputs, 5))
                .expect("fold");
            let mut queries = fx.queries();
            let ids = |statuses: Vec<JobStatus>| -> Vec<(String, JobState)> {
                statuses.into_iter().map(|s| (s.job_id, s.state)).collect()
            };
            let pairs = |list: &[(&str, JobState)]| -> Vec<(String, JobState)> {
                list.iter().map(|(id, s)| ((*id).to_owned(), *s)).collect()
            };
            assert_eq!(
                ids(queries.recent_jobs(10).expect("recent")),
                pairs(&[
                    ("a", JobState::Running),
                    ("e", JobState::Accepted),
                    ("d", JobState::Rejected),
                    ("b", JobState::Running),
                    ("c", JobState::Cancelled),
                ])
            );
            assert_eq!(
                ids(queries.recent_jobs(2).expect("recent")),
                pairs(&[("a", JobState::Running), ("e", JobState::Accepted)])
            );
            let mut active = ids(queries.active_jobs().expect("active"));
            active.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(
                active,
                pairs(&[
                    ("a", JobState::Running),
                    ("b", JobState::Running),
                    ("e", JobState::Accepted),
                ])
            );
            assert_eq!(
                queries.jobs_by_state().expect("counts"),
                vec![
                    (JobState::Accepted, 1),
                    (JobState::Cancelled, 1),
                    (JobState::Rejected, 1),
                    (JobState::Running, 2),
                ]
            );
            let a = queries.status("a").expect("status").expect("a");
            assert_eq!(
                (a.ops_succeeded, a.fragments_done, a.started_at.is_some()),
                (10, 2, true)
            );
            let d = queries.status("d").expect("status").expect("d");
            assert_eq!(d.error.as_deref(), Some("no such operation"));
            assert_eq!(queries.status("p").expect("status"), None, "no state yet");
            assert_eq!(queries.status("nope").expect("status"), None);
            assert_eq!(queries.tombstone("a").expect("tombstone"), None);

            let page = |from, limit| -> Vec<u64> {
                fx.queries()
                    .results("a", from, limit)
                    .expect("results")
                    .iter()
                    .map(|line| match line {
                        ResultLine::Ok { index, .. } | ResultLine::Err { index, .. } => *index,
                    })
                    .collect()
            };
            assert_eq!(page(0, 3), vec![0, 1, 2]);
            assert_eq!(page(3, 4), vec![3, 4, 5, 6]);
            assert_eq!(page(8, 100), vec![8, 9]);
            assert_eq!(page(10, 100), Vec::<u64>::new());
            assert_eq!(
                fx.queries().results("a", 2, 1).expect("results"),
                vec![ResultLine::Ok {
                    index: 2,
                    result: Value::from(2)
                }]
            );
            let past = fx.queries().results("a", u64::MAX, 1);
            assert!(past.is_err(), "{past:?}");
        }

        /// A fragment's first report is what stays, and so is an index's first outcome; an
        /// error keeps its text exactly, whatever it holds.
        pub(crate) fn the_first_record_stays<F: Fixture>(fx: &mut F) {
            let odd = "bad \0 byte, \u{1F600} and 'quotes'".to_owned();
            // The first with everything a redrive needs (kept in the retry column's object).
            let first = RecordedFragment {
                done: 3,
                retry: vec![7, 9],
                failed: vec![8],
                counted: true,
            };
            let again = RecordedFragment {
                done: 1,
                retry: vec![],
                failed: vec![],
                counted: true,
            };
            let (errors, recorded) = fx
                .store()
                .transaction(|tx| {
                    let recorded = [
                        tx.record_fragment("j", 4, &first)?,
                        tx.record_fragment("j", 4, &again)?,
                        tx.record_fragment("j", 5, &again)?,
                    ];
                    let outcome = |index, result| Outcome { index, result };
                    tx.put_outcomes(
                        "j",
                        &[
                            outcome(3, Err(odd.clone())),
                            outcome(1, Ok(Value::from("one"))),
                            outcome(3, Ok(Value::from(3))),
                        ],
                    )?;
                    tx.put_outcomes(
                        "j",
                        &[
                            outcome(1, Err("late".into())),
                            outcome(0, Err("zero".into())),
                            outcome(5, Err("five".into())),
                        ],
                    )?;
                    Ok((tx.first_errors("j", 2)?, recorded))
                })
                .expect("recorded");
            assert_eq!(
                recorded,
                [(first.clone(), true), (first.clone(), false), (again, true)]
            );
            assert_eq!(errors, vec![(0, "zero".to_owned()), (3, odd.clone())]);
            let (later, past) = fx
                .store()
                .transaction(|tx| {
                    let later = tx.record_fragment("j", 4, &RecordedFragment::default())?;
                    let past = tx.record_fragment("j", u64::MAX, &RecordedFragment::default());
                    Ok((later, past.is_err()))
                })
                .expect("read");
            assert_eq!((later, past), ((first, false), true));
            assert_eq!(
                fx.queries().results("j", 0, 10).expect("results"),
                vec![
                    ResultLine::Err {
                        index: 0,
                        error: "zero".into()
                    },
                    ResultLine::Ok {
                        index: 1,
                        result: Value::from("one")
                    },
                    ResultLine::Err {
                        index: 3,
                        error: odd.clone()
                    },
                    ResultLine::Err {
                        index: 5,
                        error: "five".into()
                    },
                ]
            );
            // A job's error keeps its text too.
            let job = JobRecord {
                error: Some(odd.clone()),
                state: Some(JobState::Failed),
                ..JobRecord::placeholder("f")
            };
            fx.store().transaction(|tx| tx.put_job(&job)).expect("put");
            assert_eq!(
                fx.store().transaction(|tx| tx.job("f")).expect("read"),
                Some(job)
            );
        }

        /// Whether a fragment was recorded before, wherever its number falls: far apart,
        /// out of order, twice in one transaction, in a later one.
        pub(crate) fn fragments_are_recorded_once_wherever_they_fall<F: Fixture>(fx: &mut F) {
            let rec = |done: u32| RecordedFragment {
                done,
                retry: vec![u64::from(done) * 10],
                failed: Vec::new(),
                counted: done.is_multiple_of(2),
            };
            let record = |store: &mut F::Store, fragments: &[(u64, u32)]| {
                store
                    .transaction(|tx| {
                        fragments
                            .iter()
                            .map(|&(f, done)| {
                                let (recorded, first) = tx.record_fragment("j", f, &rec(done))?;
                                Ok((f, recorded.done, first))
                            })
                            .collect::<Result<Vec<_>, StoreError>>()
                    })
                    .expect("recorded")
            };
            let store = fx.store();
            let first = record(
                store,
                &[(4095, 1), (0, 2), (1, 3), (4096, 4), (10_000, 5), (0, 6)],
            );
            assert_eq!(
                first,
                vec![
                    (4095, 1, true),
                    (0, 2, true),
                    (1, 3, true),
                    (4096, 4, true),
                    (10_000, 5, true),
                    (0, 2, false),
                ]
            );
            let later = record(
                store,
                &[
                    (10_000, 7),
                    (4096, 7),
                    (2, 7),
                    (1, 7),
                    (2, 8),
                    (4095, 7),
                    (9_999, 7),
                    (1 << 62, 7),
                ],
            );
            assert_eq!(
                later,
                vec![
                    (10_000, 5, false),
                    (4096, 4, false),
                    (2, 7, true),
                    (1, 3, false),
                    (2, 7, false),
                    (4095, 1, false),
                    (9_999, 7, true),
                    (1 << 62, 7, true),
                ]
            );
            let (again, retry) = store
                .transaction(|tx| {
                    let (recorded, first) = tx.record_fragment("j", 2, &rec(9))?;
                    Ok(((recorded.done, first), recorded.retry))
                })
                .expect("again");
            assert_eq!((again, retry), ((7, false), vec![70]));
            assert_eq!(fx.rows("fragments", "j"), 8);
        }

        /// Many outcomes at once (as a fragment of many operations brings): the first of each
        /// index stays, also against one stored before or one put twice in a transaction.
        pub(crate) fn many_outcomes_keep_the_first_of_each_index<F: Fixture>(fx: &mut F) {
            let put = |store: &mut F::Store, outcomes: Vec<Outcome>| {
                store
                    .transaction(|tx| tx.put_outcomes("j", &outcomes))
                    .expect("put");
            };
            let ok = |index: u64| Outcome {
                index,
                result: Ok(Value::from(index)),
            };
            let err = |index: u64| Outcome {
                index,
                result: Err(format!("e{index}")),
            };
            let store = fx.store();
            put(store, (0..1500).map(ok).collect());
            // A third of these are there already.
            put(store, (1000..2500).map(err).collect());
            // One index twice among fresh ones.
            let mut twice: Vec<Outcome> = (3000..4200).map(ok).collect();
            twice.push(err(3000));
            put(store, twice);
            assert_eq!(fx.rows("results", "j"), 3700);
            let lines = fx.queries().results("j", 0, 5000).expect("results");
            let expected: Vec<ResultLine> = (0..1500)
                .map(|index| ResultLine::Ok {
                    index,
                    result: Value::from(index),
                })
                .chain((1500..2500).map(|index| ResultLine::Err {
                    index,
                    error: format!("e{index}"),
                }))
                .chain((3000..4200).map(|index| ResultLine::Ok {
                    index,
                    result: Value::from(index),
                }))
                .collect();
            assert!(lines == expected, "the first outcome of each index stays");
        }

        /// A sealed MetricBatch is published again under its own number until confirmed;
        /// then the next one gets the next number.
        pub(crate) fn metric_batches_keep_their_number_until_published<F: Fixture>(fx: &mut F) {
            let store = fx.store();
            assert_eq!(
                store
                    .transaction(|tx| tx.seal_metric_batch())
                    .expect("seal"),
                None
            );
            let effects = store
                .transaction(|tx| {
                    fold::apply(
                        tx,
                        vec![
                            accepted("m", 100),
                            report("m", 0, 0, 5),
                            report("m", 1, 5, 7),
                        ],
                        5,
                    )
                })
                .expect("fold");
            let (seq, sealed) = store
                .transaction(|tx| tx.seal_metric_batch())
                .expect("seal")
                .expect("pending");
            assert_eq!(sealed, effects.measured, "in the order they were counted");
            assert_eq!(sealed.len(), 2);
            // Counted later, within the same transaction as a seal: not in the sealed batch.
            let (again, late) = store
                .transaction(|tx| {
                    let late = fold::apply(tx, vec![report("m", 2, 7, 8)], 6)?;
                    Ok((tx.seal_metric_batch()?, late))
                })
                .expect("seal again");
            assert_eq!(again, Some((seq, sealed.clone())), "the same batch again");
            store
                .transaction(|tx| tx.metric_batch_published(seq))
                .expect("published");
            let next = store
                .transaction(|tx| tx.seal_metric_batch())
                .expect("seal")
                .expect("the late one");
            assert_eq!(next, (seq + 1, late.measured));
            store
                .transaction(|tx| tx.metric_batch_published(seq + 1))
                .expect("published");
            assert_eq!(
                store
                    .transaction(|tx| tx.seal_metric_batch())
                    .expect("seal"),
                None
            );
            assert_eq!(fx.rows("metrics_pending", "m"), 0);
        }
    }

    #[test]
    fn expiry_deletes_a_finished_job_in_small_batches_and_never_a_running_one() {
        cases::expiry_deletes_a_finished_job_in_small_batches_and_never_a_running_one(&mut sqlite());
    }

    #[test]
    fn counts_are_stored_exactly_or_not_at_all() {
        cases::counts_are_stored_exactly_or_not_at_all(&mut sqlite());
    }

    #[test]
    fn console_queries_page_filter_and_search() {
        cases::console_queries_page_filter_and_search(&mut sqlite());
    }

    /// The console's pages over a job of 100,000 failures among 10,000 jobs: each answers in
    /// well under a second (tens of milliseconds here), deep pages and searches too, through
    /// the indexes of schema version 3.
    #[test]
    fn console_pages_stay_fast_with_100000_failures_and_10000_jobs() {
        let mut fx = sqlite();
        let accepts: Vec<ReducerInput> = (0..10_000)
            .map(|n| ReducerInput::Accepted {
                job_id: format!("job-{n:05}"),
                operation: "op".into(),
                ops_total: 1,
                submitted_at_ms: n,
                collect_results: true,
                tolerated_failure_percent: 100.0,
                max_attempts: 1,
                spec: None,
            })
            .collect();
        fx.store()
            .transaction(|tx| fold::apply(tx, accepts, 1))
            .expect("accepts");
        let outcomes: Vec<Outcome> = (0..100_000)
            .map(|index| Outcome {
                index,
                result: Err(format!(
                    "program \"prog-{index}\" is not allowed on this worker"
                )),
            })
            .collect();
        fx.store()
            .transaction(|tx| tx.put_outcomes("job-00000", &outcomes))
            .expect("failures");
        let mut queries = fx.queries();
        let timed = |what: &str, f: &mut dyn FnMut() -> u64, expected: u64| {
            let started = std::time::Instant::now();
            let n = f();
            let elapsed = started.elapsed();
            println!("{what}: {} ms", elapsed.as_millis());
            assert_eq!(n, expected, "{what}");
            assert!(
                elapsed < std::time::Duration::from_secs(1),
                "{what} took {elapsed:?}"
            );
        };
        let all = JobsFilter::default();
        let accepted = JobsFilter {
            state: Some(JobState::Accepted),
            prefix: Some("job-09".into()),
        };
        timed(
            "first jobs page",
            &mut || queries.jobs_page(&all, 0, 50).expect("page").jobs.len() as u64,
            50,
        );
        timed(
            "deep jobs page",
            &mut || {
                queries
                    .jobs_page(&all, 9_950, 100)
                    .expect("page")
                    .jobs
                    .len() as u64
            },
            50,
        );
        timed(
            "state and prefix",
            &mut || queries.jobs_page(&accepted, 0, 50).expect("page").total,
            1_000,
        );
        timed(
            "first failures page",
            &mut || {
                queries
                    .failures("job-00000", None, 0, 100)
                    .expect("page")
                    .total
            },
            100_000,
        );
        timed(
            "deep failures page",
            &mut || {
                queries
                    .failures("job-00000", None, 99_900, 500)
                    .expect("page")
                    .failures
                    .len() as u64
            },
            100,
        );
        timed(
            "search",
            &mut || {
                queries
                    .failures("job-00000", Some("PROG-4242"), 0, 100)
                    .expect("page")
                    .total
            },
            11,
        );
    }

    #[test]
    fn queries_answer_in_the_same_order() {
        cases::queries_answer_in_the_same_order(&mut sqlite());
    }

    #[test]
    fn the_first_record_stays() {
        cases::the_first_record_stays(&mut sqlite());
    }

    #[test]
    fn fragments_are_recorded_once_wherever_they_fall() {
        cases::fragments_are_recorded_once_wherever_they_fall(&mut sqlite());
    }

    #[test]
    fn many_outcomes_keep_the_first_of_each_index() {
        cases::many_outcomes_keep_the_first_of_each_index(&mut sqlite());
    }

    #[test]
    fn metric_batches_keep_their_number_until_published() {
        cases::metric_batches_keep_their_number_until_published(&mut sqlite());
    }

    #[test]
    fn a_store_written_before_versions_is_upgraded_in_place() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("r.db");
        {
            let conn = Connection::open(&path).expect("old store");
            conn.execute_batch(SCHEMA_V1).expect("v1 tables");
            conn.execute_batch(
                "INSERT INTO results (job_id, idx, ok, value) VALUES ('old', 0, 1, '42')",
            )
            .expect("an old row");
        }
        let store = SqliteStore::open(&path).expect("upgraded");
        assert_eq!(
            common::migrate::version(&store.conn).expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(rows(&store.conn, "results", "old"), 1);
        drop(store);
        let conn = Connection::open(&path).expect("reopen");
        common::migrate::stamp(&conn, 99).expect("from the future");
        drop(conn);
        match SqliteStore::open(&path) {
            Err(StoreError::NewerSchema {
                found: 99,
                supported,
            }) => {
                assert_eq!(supported, MIGRATIONS.len() as i64)
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a newer store was opened"),
        }
    }
}
