//! The reducer's state in PostgreSQL (`BATCHQ_DATABASE_URL`), for standby reducers sharing
//! one database: the same traits as the SQLite store ([`crate::store`], the specification),
//! with the same rows, the same order of results and the same errors.
//!
//! - [`PgStore`] is the fold loop's [`ReducerStore`]. Every transaction is fenced
//!   ([`PgDatabase::transaction`]): a replica that lost the lease commits nothing.
//! - [`PgQueries`] answers `batchctl` ([`ReducerQueries`]) in read-only snapshots, unfenced.
//! - [`PgPruner`] deletes finished jobs (retention, `batchctl delete`), fenced.
//!
//! Before any of them is used, `db.migrate(PG_MIGRATIONS).await` brings the schema up to
//! date ([`PgDatabase::migrate`]). Their methods block: call them on the blocking pool, as
//! the SQLite store's (see [`common::store::blocking`]).
//!
//! One round trip per statement is the cost unit, so a transaction writes what it can in
//! few statements: outcomes, measurements, first records of fragments and job rows are kept
//! in the transaction (`Pending`) and written together in ONE statement (`INSERT .. SELECT
//! .. FROM UNNEST` of arrays) before anything reads them back and before the commit. Whether
//! a fragment was recorded before is looked up for a window of its job's fragment numbers at
//! once (`Known`). So a batch of reports costs a few round trips per job, not per report.
//!
//! Concurrency: unlike SQLite, PostgreSQL lets the pruner write while the fold loop does.
//! A job row read by the fold loop is locked (`FOR UPDATE`) until it commits, and
//! [`PgPruner::bury`] locks the row it deletes: a job is never buried between the fold
//! loop's reading it and writing it back (which would bring it back without its rows).

use std::collections::{BTreeMap, HashMap};

use common::contract::{JobState, JobStatus, ResultLine};
use common::lease::Fence;
use common::pg::{Params, PgDatabase, PgTx, big, get_u64};
use common::retention::format_period_ms;
use common::timefmt::format_ms;
use common::wire::{FailedItem, FailuresPage, Indices, JobDetail, JobsPage, Removal, Tombstone};
use tokio_postgres::Row;

use crate::aggregate::Measured;
use crate::store::{
    Burial, JOB_COLUMNS, JobRecord, JobsFilter, Outcome, RecordedFragment, ReducerQueries,
    ReducerStore, ReducerTx, StoreError, TERMINAL_STATES, by_state_map, encode, parse_spec,
    search_needle, with_state,
};

/// Schema version 1: the SQLite store's tables after all its migrations (see
/// [`crate::store::MIGRATIONS`]), in PostgreSQL's types. Integers are BIGINT, flags BOOLEAN;
/// text that comes from outside batchq and may hold any character (a job's `error`, an
/// operation's error in `results.value`) is BYTEA holding its UTF-8 bytes, since a TEXT
/// cannot hold a NUL, which SQLite keeps; a result's JSON is stored as the same text
/// (`results.value`, `fragments.retry`, `metrics_pending.body`), never re-encoded. Ids
/// compare byte by byte (`COLLATE "C"`), as SQLite's BINARY does.
const PG_SCHEMA_V1: &str = r#"
CREATE TABLE jobs (
    job_id TEXT COLLATE "C" PRIMARY KEY,
    state TEXT COLLATE "C",
    operation TEXT,
    ops_total BIGINT NOT NULL,
    ops_succeeded BIGINT NOT NULL,
    ops_failed BIGINT NOT NULL,
    fragments_done BIGINT NOT NULL,
    fragments_in_flight BIGINT NOT NULL,
    progress_seq BIGINT NOT NULL,
    submitted_at_ms BIGINT,
    started_at_ms BIGINT,
    finished_at_ms BIGINT,
    error BYTEA,
    collect_results BOOLEAN NOT NULL,
    tolerated_failure_percent DOUBLE PRECISION NOT NULL,
    max_attempts BIGINT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_by_submitted ON jobs (submitted_at_ms);
CREATE INDEX jobs_by_finished ON jobs (finished_at_ms) WHERE finished_at_ms IS NOT NULL;
CREATE TABLE fragments (
    job_id TEXT COLLATE "C" NOT NULL,
    fragment BIGINT NOT NULL,
    done BIGINT NOT NULL,
    retry TEXT NOT NULL,
    -- The fencing token of the term that recorded it (0: unfenced): which active replica
    -- wrote what, for an audit after a takeover.
    fence_token BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, fragment)
);
CREATE TABLE metrics_pending (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch BIGINT,
    body TEXT NOT NULL
);
CREATE INDEX metrics_pending_by_batch ON metrics_pending (batch);
CREATE TABLE meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE results (
    job_id TEXT COLLATE "C" NOT NULL,
    idx BIGINT NOT NULL,
    ok BOOLEAN NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE tombstones (
    job_id TEXT COLLATE "C" PRIMARY KEY,
    how TEXT NOT NULL,
    finished_at_ms BIGINT,
    deleted_at_ms BIGINT NOT NULL,
    retention_ms BIGINT,
    purged BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX tombstones_to_purge ON tombstones (job_id) WHERE NOT purged;
"#;

/// Schema version 2: the web console, as the SQLite store's version 3
/// ([`crate::store::MIGRATIONS`]): the JobSpec summary kept with each job (`spec`, JSON text,
/// which never holds a NUL), indexes in the console's order (newest submitted first, NULLs
/// last as SQLite orders them) in place of the plain ones, and an index of the failed rows.
const PG_SCHEMA_V2: &str = r#"
ALTER TABLE jobs ADD COLUMN spec TEXT;
DROP INDEX jobs_by_state;
DROP INDEX jobs_by_submitted;
CREATE INDEX jobs_newest ON jobs (submitted_at_ms DESC NULLS LAST, job_id);
CREATE INDEX jobs_by_state_newest ON jobs (state, submitted_at_ms DESC NULLS LAST, job_id);
CREATE INDEX results_failed ON results (job_id, idx) WHERE NOT ok;
"#;

/// Schema version 3: redrives, as the SQLite store's version 4: each job counts its
/// redrives; a recorded fragment's `retry` may hold an object (see
/// `RecordedFragment::lists_text`).
const PG_SCHEMA_V3: &str = r#"
ALTER TABLE jobs ADD COLUMN redrives BIGINT NOT NULL DEFAULT 0;
"#;

/// The PostgreSQL reducer store's migrations, in order (for [`PgDatabase::migrate`]).
pub const PG_MIGRATIONS: &[&str] = &[PG_SCHEMA_V1, PG_SCHEMA_V2, PG_SCHEMA_V3];

/// Text stored as its UTF-8 bytes (see [`PG_SCHEMA_V1`]).
fn text(bytes: Vec<u8>, what: &str) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn get_u32(row: &Row, column: usize) -> Result<u32, StoreError> {
    let v = get_u64(row, column)?;
    u32::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("column {column} holds {v}, past a u32")))
}

/// A u32 bound as a LIMIT.
fn limit(n: u32) -> i64 {
    i64::from(n)
}

fn job_from_row(r: &Row) -> Result<JobRecord, StoreError> {
    let state: Option<String> = r.try_get(1)?;
    let error: Option<Vec<u8>> = r.try_get(12)?;
    let job = JobRecord {
        job_id: r.try_get(0)?,
        state: None,
        operation: r.try_get(2)?,
        ops_total: get_u64(r, 3)?,
        ops_succeeded: get_u64(r, 4)?,
        ops_failed: get_u64(r, 5)?,
        fragments_done: get_u64(r, 6)?,
        fragments_in_flight: get_u64(r, 7)?,
        progress_seq: get_u64(r, 8)?,
        submitted_at_ms: r.try_get(9)?,
        started_at_ms: r.try_get(10)?,
        finished_at_ms: r.try_get(11)?,
        error: error.map(|e| text(e, "job error")).transpose()?,
        collect_results: r.try_get(13)?,
        tolerated_failure_percent: r.try_get(14)?,
        max_attempts: get_u32(r, 15)?,
        spec: None,
        redrives: get_u64(r, 16)?,
    };
    with_state((job, state))
}

/// A job row as it is written: its counts checked into BIGINTs when it is put, so an
/// out-of-range count fails the call that writes it, as in SQLite.
struct JobRow {
    state: Option<&'static str>,
    operation: Option<String>,
    counts: [i64; 7],
    submitted_at_ms: Option<i64>,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    error: Option<String>,
    collect_results: bool,
    tolerated_failure_percent: f64,
    max_attempts: i64,
    spec: Option<String>,
}

impl JobRow {
    fn new(job: &JobRecord) -> Result<Self, StoreError> {
        Ok(Self {
            state: job.state.map(JobState::as_str),
            operation: job.operation.clone(),
            counts: [
                big(job.ops_total)?,
                big(job.ops_succeeded)?,
                big(job.ops_failed)?,
                big(job.fragments_done)?,
                big(job.fragments_in_flight)?,
                big(job.progress_seq)?,
                big(job.redrives)?,
            ],
            submitted_at_ms: job.submitted_at_ms,
            started_at_ms: job.started_at_ms,
            finished_at_ms: job.finished_at_ms,
            error: job.error.clone(),
            collect_results: job.collect_results,
            tolerated_failure_percent: job.tolerated_failure_percent,
            max_attempts: i64::from(job.max_attempts),
            spec: job.spec.clone(),
        })
    }
}

/// What a transaction wrote but has not sent yet: sent in one statement ([`FLUSH`]) before
/// a statement reads the tables it goes to, and before the commit.
#[derive(Default)]
struct Pending {
    /// The last row put of each job (a later put replaces an earlier one, as in SQLite).
    jobs: BTreeMap<String, JobRow>,
    result_jobs: Vec<String>,
    result_idx: Vec<i64>,
    result_ok: Vec<bool>,
    result_values: Vec<Vec<u8>>,
    /// Measurements, in the order they were put (their ids keep it).
    metrics: Vec<String>,
    /// Fragments recorded for the first time (see [`Known`]).
    fragment_jobs: Vec<String>,
    fragment_numbers: Vec<i64>,
    fragment_done: Vec<i64>,
    fragment_retry: Vec<String>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.result_jobs.is_empty()
            && self.metrics.is_empty()
            && self.fragment_jobs.is_empty()
    }
}

/// From how many pending outcomes on they are written with `COPY` (see
/// [`PgReducerTx::copy_results`]).
const COPY_RESULTS_FROM: usize = 1000;

/// How many fragment numbers [`ReducerTx::record_fragment`] looks up at once: the
/// recorded fragments of a job from the number asked for on. A batch's reports of a job are
/// of fragments dispatched about together, so one look-up answers most of them.
const FRAGMENT_WINDOW: i64 = 4096;

/// What a transaction knows of one job's recorded fragments: within `ranges` (inclusive),
/// every recorded one is in `recorded` (`done`, `retry` as stored), those of the database
/// and those this transaction recorded. Nothing else writes a job's fragments meanwhile:
/// only the replica holding the lease writes, and its fence holds off a takeover until
/// it commits. (Were one written anyway, the pending insert would fail on the primary key,
/// and the transaction with it.)
#[derive(Default)]
struct Known {
    ranges: Vec<(i64, i64)>,
    recorded: HashMap<i64, (i64, String)>,
}

impl Known {
    fn covers(&self, fragment: i64) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| lo <= fragment && fragment <= hi)
    }
}

/// Writes every pending job row (`INSERT OR REPLACE`), outcome (`INSERT OR IGNORE`: the first
/// outcome of an index stays, also within one statement), first record of a fragment and
/// measurement, in one statement.
const FLUSH: &str = "
WITH put_jobs AS (
    INSERT INTO jobs (job_id, state, operation, ops_total, ops_succeeded, ops_failed,
        fragments_done, fragments_in_flight, progress_seq, submitted_at_ms, started_at_ms,
        finished_at_ms, error, collect_results, tolerated_failure_percent, max_attempts, spec,
        redrives)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
        $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
        $12::bigint[], $13::bytea[], $14::boolean[], $15::float8[], $16::bigint[], $27::text[],
        $28::bigint[])
    ON CONFLICT (job_id) DO UPDATE SET
        state = excluded.state, operation = excluded.operation,
        ops_total = excluded.ops_total, ops_succeeded = excluded.ops_succeeded,
        ops_failed = excluded.ops_failed, fragments_done = excluded.fragments_done,
        fragments_in_flight = excluded.fragments_in_flight,
        progress_seq = excluded.progress_seq, submitted_at_ms = excluded.submitted_at_ms,
        started_at_ms = excluded.started_at_ms, finished_at_ms = excluded.finished_at_ms,
        error = excluded.error, collect_results = excluded.collect_results,
        tolerated_failure_percent = excluded.tolerated_failure_percent,
        max_attempts = excluded.max_attempts, redrives = excluded.redrives,
        -- Only the accept's put carries the spec; later puts keep it.
        spec = COALESCE(excluded.spec, jobs.spec)
), put_results AS (
    INSERT INTO results (job_id, idx, ok, value)
    SELECT * FROM UNNEST($17::text[], $18::bigint[], $19::boolean[], $20::bytea[])
    ON CONFLICT (job_id, idx) DO NOTHING
), put_fragments AS (
    INSERT INTO fragments (job_id, fragment, done, retry, fence_token)
    SELECT f.*, $26::bigint FROM UNNEST($22::text[], $23::bigint[], $24::bigint[], $25::text[]) AS f
)
INSERT INTO metrics_pending (batch, body)
SELECT NULL, body FROM UNNEST($21::text[]) WITH ORDINALITY AS m (body, n) ORDER BY n";

/// The fold loop's PostgreSQL store.
pub struct PgStore {
    db: PgDatabase,
    fence: Option<Fence>,
}

impl PgStore {
    /// A store on `db` (migrated with [`PG_MIGRATIONS`]) whose every transaction checks
    /// `fence` first (`None`: unfenced, for a single reducer or a test).
    pub fn new(db: PgDatabase, fence: Option<Fence>) -> Self {
        Self { db, fence }
    }

    pub fn database(&self) -> &PgDatabase {
        &self.db
    }

    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// The fence of a new term as the active replica.
    pub fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }
}

impl ReducerStore for PgStore {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn ReducerTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.db.transaction(self.fence.as_ref(), |pg| {
            let mut tx = PgReducerTx {
                pg,
                pending: Pending::default(),
                known: HashMap::new(),
                fence_token: fence_token(self.fence.as_ref()),
            };
            let value = f(&mut tx)?;
            tx.flush()?;
            Ok(value)
        })
    }
}

struct PgReducerTx<'t, 'c> {
    pg: &'t mut PgTx<'c>,
    pending: Pending,
    /// Per job.
    known: HashMap<String, Known>,
    /// Recorded with each fragment row.
    fence_token: i64,
}

fn fence_token(fence: Option<&Fence>) -> i64 {
    fence.map_or(0, |f| f.token)
}

impl PgReducerTx<'_, '_> {
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        if pending.result_jobs.len() >= COPY_RESULTS_FROM && self.copy_results(&pending)? {
            pending.result_jobs.clear();
            pending.result_idx.clear();
            pending.result_ok.clear();
            pending.result_values.clear();
        }
        let jobs = &pending.jobs;
        let job_ids: Vec<&str> = jobs.keys().map(String::as_str).collect();
        let states: Vec<Option<&str>> = jobs.values().map(|j| j.state).collect();
        let operations: Vec<Option<&str>> = jobs.values().map(|j| j.operation.as_deref()).collect();
        let count = |i: usize| -> Vec<i64> { jobs.values().map(|j| j.counts[i]).collect() };
        let (c0, c1, c2, c3, c4, c5) = (count(0), count(1), count(2), count(3), count(4), count(5));
        let redrives = count(6);
        let submitted: Vec<Option<i64>> = jobs.values().map(|j| j.submitted_at_ms).collect();
        let started: Vec<Option<i64>> = jobs.values().map(|j| j.started_at_ms).collect();
        let finished: Vec<Option<i64>> = jobs.values().map(|j| j.finished_at_ms).collect();
        let errors: Vec<Option<&[u8]>> = jobs
            .values()
            .map(|j| j.error.as_deref().map(str::as_bytes))
            .collect();
        let collect: Vec<bool> = jobs.values().map(|j| j.collect_results).collect();
        let tolerated: Vec<f64> = jobs.values().map(|j| j.tolerated_failure_percent).collect();
        let attempts: Vec<i64> = jobs.values().map(|j| j.max_attempts).collect();
        let specs: Vec<Option<&str>> = jobs.values().map(|j| j.spec.as_deref()).collect();
        let values: Vec<&[u8]> = pending.result_values.iter().map(Vec::as_slice).collect();
        self.pg.execute(
            FLUSH,
            &[
                &job_ids,
                &states,
                &operations,
                &c0,
                &c1,
                &c2,
                &c3,
                &c4,
                &c5,
                &submitted,
                &started,
                &finished,
                &errors,
                &collect,
                &tolerated,
                &attempts,
                &pending.result_jobs,
                &pending.result_idx,
                &pending.result_ok,
                &values,
                &pending.metrics,
                &pending.fragment_jobs,
                &pending.fragment_numbers,
                &pending.fragment_done,
                &pending.fragment_retry,
                &self.fence_token,
                &specs,
                &redrives,
            ],
        )?;
        Ok(())
    }
}

impl PgReducerTx<'_, '_> {
    /// Writes many pending outcomes with `COPY`, much faster than an INSERT; `false` when
    /// one of them was there already (or twice among them), for `COPY` knows no `ON
    /// CONFLICT`: then nothing of it stays (a savepoint) and [`FLUSH`] writes them.
    fn copy_results(&mut self, pending: &Pending) -> Result<bool, StoreError> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        self.pg.batch("SAVEPOINT copy_results")?;
        let copied = self.pg.with(async |tx| {
            let sink = tx
                .copy_in("COPY results (job_id, idx, ok, value) FROM STDIN BINARY")
                .await?;
            let writer =
                BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::INT8, Type::BOOL, Type::BYTEA]);
            let mut writer = std::pin::pin!(writer);
            for i in 0..pending.result_jobs.len() {
                writer
                    .as_mut()
                    .write(&[
                        &pending.result_jobs[i],
                        &pending.result_idx[i],
                        &pending.result_ok[i],
                        &pending.result_values[i],
                    ])
                    .await?;
            }
            writer.finish().await?;
            Ok(())
        });
        match copied {
            Ok(()) => {
                self.pg.batch("RELEASE SAVEPOINT copy_results")?;
                Ok(true)
            }
            Err(StoreError::Postgres(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                self.pg.batch("ROLLBACK TO SAVEPOINT copy_results")?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl ReducerTx for PgReducerTx<'_, '_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        if !self.pending.jobs.is_empty() {
            self.flush()?;
        }
        // Locked until the commit: the pruner does not bury it meanwhile (see the module).
        let row = self.pg.query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1 FOR UPDATE"),
            &[&job_id],
        )?;
        row.as_ref().map(job_from_row).transpose()
    }

    fn tombstoned(&mut self, job_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .pg
            .query_opt("SELECT 1 FROM tombstones WHERE job_id = $1", &[&job_id])?
            .is_some())
    }

    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError> {
        let row = JobRow::new(job)?;
        self.pending.jobs.insert(job.job_id.clone(), row);
        Ok(())
    }

    fn record_fragment(
        &mut self,
        job_id: &str,
        fragment: u64,
        recorded: &RecordedFragment,
    ) -> Result<(RecordedFragment, bool), StoreError> {
        let fragment = big(fragment)?;
        let covered = self
            .known
            .get(job_id)
            .is_some_and(|known| known.covers(fragment));
        if !covered {
            let last = fragment.saturating_add(FRAGMENT_WINDOW - 1);
            let rows = self.pg.query(
                "SELECT fragment, done, retry FROM fragments
                 WHERE job_id = $1 AND fragment >= $2 AND fragment <= $3",
                &[&job_id, &fragment, &last],
            )?;
            let known = self.known.entry(job_id.to_owned()).or_default();
            for row in &rows {
                let number: i64 = row.try_get(0)?;
                let stored = (row.try_get(1)?, row.try_get(2)?);
                known.recorded.entry(number).or_insert(stored);
            }
            known.ranges.push((fragment, last));
        }
        let known = self
            .known
            .get_mut(job_id)
            .ok_or_else(|| StoreError::Corrupt(format!("fragments of {job_id} vanished")))?;
        if let Some((done, retry)) = known.recorded.get(&fragment) {
            let done = u32::try_from(*done).map_err(|_| {
                StoreError::Corrupt(format!("fragment {fragment} of {job_id}: done {done}"))
            })?;
            return Ok((RecordedFragment::from_lists_text(done, retry)?, false));
        }
        let done = i64::from(recorded.done);
        let retry = recorded.lists_text()?;
        known.recorded.insert(fragment, (done, retry.clone()));
        let pending = &mut self.pending;
        pending.fragment_jobs.push(job_id.to_owned());
        pending.fragment_numbers.push(fragment);
        pending.fragment_done.push(done);
        pending.fragment_retry.push(retry);
        Ok((recorded.clone(), true))
    }

    fn put_outcomes(&mut self, job_id: &str, outcomes: &[Outcome]) -> Result<(), StoreError> {
        let pending = &mut self.pending;
        for outcome in outcomes {
            let (ok, value) = match &outcome.result {
                Ok(value) => (true, value.to_string()),
                Err(error) => (false, error.clone()),
            };
            pending.result_idx.push(big(outcome.index)?);
            pending.result_jobs.push(job_id.to_owned());
            pending.result_ok.push(ok);
            pending.result_values.push(value.into_bytes());
        }
        Ok(())
    }

    fn forget_outcomes(
        &mut self,
        job_id: &str,
        indices: &Indices,
        done: u32,
    ) -> Result<(), StoreError> {
        // Outcomes put earlier in this transaction go first, so the delete sees them.
        self.flush()?;
        match indices.head(done as usize) {
            Indices::Span(start, end) => self.pg.execute(
                "DELETE FROM results WHERE job_id = $1 AND idx >= $2 AND idx < $3",
                &[&job_id, &big(start)?, &big(end)?],
            )?,
            Indices::List(list) => {
                let list = list.into_iter().map(big).collect::<Result<Vec<i64>, _>>()?;
                self.pg.execute(
                    "DELETE FROM results WHERE job_id = $1 AND idx = ANY($2)",
                    &[&job_id, &list],
                )?
            }
        };
        Ok(())
    }

    fn first_errors(&mut self, job_id: &str, limit: u32) -> Result<Vec<(u64, String)>, StoreError> {
        self.flush()?;
        let rows = self.pg.query(
            "SELECT idx, value FROM results WHERE job_id = $1 AND NOT ok ORDER BY idx LIMIT $2",
            &[&job_id, &self::limit(limit)],
        )?;
        rows.iter()
            .map(|r| {
                let index = get_u64(r, 0)?;
                Ok((index, text(r.try_get(1)?, "an error")?))
            })
            .collect()
    }

    fn put_measured(&mut self, measured: &Measured) -> Result<(), StoreError> {
        self.pending.metrics.push(encode(measured)?);
        Ok(())
    }

    fn seal_metric_batch(&mut self) -> Result<Option<(u64, Vec<Measured>)>, StoreError> {
        self.flush()?;
        let sealed: Option<i64> = self
            .pg
            .query_one(
                "SELECT MIN(batch) FROM metrics_pending WHERE batch IS NOT NULL",
                &[],
            )?
            .try_get(0)?;
        let seq = match sealed {
            Some(seq) => seq,
            None => {
                let pending: bool = self
                    .pg
                    .query_one("SELECT EXISTS (SELECT 1 FROM metrics_pending)", &[])?
                    .try_get(0)?;
                if !pending {
                    return Ok(None);
                }
                // The next sequence number, and every pending measurement sealed under it.
                self.pg
                    .query_one(
                        "WITH seq AS (
                            INSERT INTO meta (key, value) VALUES ('metric_seq', 1)
                            ON CONFLICT (key) DO UPDATE SET value = meta.value + 1
                            RETURNING value
                         ), sealed AS (
                            UPDATE metrics_pending SET batch = (SELECT value FROM seq)
                            WHERE batch IS NULL
                         )
                         SELECT value FROM seq",
                        &[],
                    )?
                    .try_get(0)?
            }
        };
        let rows = self.pg.query(
            "SELECT body FROM metrics_pending WHERE batch = $1 ORDER BY id",
            &[&seq],
        )?;
        let mut measured = Vec::with_capacity(rows.len());
        for row in &rows {
            let body: &str = row.try_get(0)?;
            measured
                .push(serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        let seq =
            u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("metric batch {seq}")))?;
        Ok(Some((seq, measured)))
    }

    fn metric_batch_published(&mut self, seq: u64) -> Result<(), StoreError> {
        // What is pending in this transaction has no batch yet: nothing to send first.
        self.pg.execute(
            "DELETE FROM metrics_pending WHERE batch = $1",
            &[&big(seq)?],
        )?;
        Ok(())
    }
}

/// `batchctl`'s queries, each in a read-only snapshot on a pooled connection; unfenced (a
/// standby answers too).
#[derive(Clone)]
pub struct PgQueries {
    db: PgDatabase,
}

impl PgQueries {
    pub fn new(db: PgDatabase) -> Self {
        Self { db }
    }

    fn statuses(&self, sql: &str, params: &Params<'_>) -> Result<Vec<JobStatus>, StoreError> {
        self.db.read(|tx| {
            let rows = tx.query(sql, params)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                if let Some(status) = job_from_row(row)?.status() {
                    out.push(status);
                }
            }
            Ok(out)
        })
    }
}

impl ReducerQueries for PgQueries {
    fn status(&mut self, job_id: &str) -> Result<Option<JobStatus>, StoreError> {
        Ok(self
            .statuses(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"),
                &[&job_id],
            )?
            .pop())
    }

    fn tombstone(&mut self, job_id: &str) -> Result<Option<Tombstone>, StoreError> {
        self.db.read(|tx| tombstone(tx, job_id))
    }

    fn recent_jobs(&mut self, limit: u32) -> Result<Vec<JobStatus>, StoreError> {
        // SQLite orders NULL first, so last when descending.
        self.statuses(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state IS NOT NULL
                 ORDER BY submitted_at_ms DESC NULLS LAST, job_id LIMIT $1"
            ),
            &[&self::limit(limit)],
        )
    }

    fn results(
        &mut self,
        job_id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<ResultLine>, StoreError> {
        let from = big(from)?;
        self.db.read(|tx| {
            let rows = tx.query(
                "SELECT idx, ok, value FROM results WHERE job_id = $1 AND idx >= $2
                 ORDER BY idx LIMIT $3",
                &[&job_id, &from, &self::limit(limit)],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let index = get_u64(row, 0)?;
                let ok: bool = row.try_get(1)?;
                let value: &[u8] = row.try_get(2)?;
                out.push(if ok {
                    ResultLine::Ok {
                        index,
                        result: serde_json::from_slice(value)
                            .map_err(|e| StoreError::Corrupt(format!("result {index}: {e}")))?,
                    }
                } else {
                    ResultLine::Err {
                        index,
                        error: text(value.to_vec(), "an error")?,
                    }
                });
            }
            Ok(out)
        })
    }

    fn active_jobs(&mut self) -> Result<Vec<JobStatus>, StoreError> {
        self.statuses(
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('accepted', 'running')
                 ORDER BY state, job_id"
            ),
            &[],
        )
    }

    fn jobs_by_state(&mut self) -> Result<Vec<(JobState, u64)>, StoreError> {
        self.db.read(counts_by_state)
    }

    fn jobs_page(
        &mut self,
        filter: &JobsFilter,
        offset: u64,
        limit: u32,
    ) -> Result<JobsPage, StoreError> {
        let state = filter.state.map(JobState::as_str);
        let prefix = filter.prefix();
        // substr counts characters, as chars() does; no id is 2^31 characters long.
        let prefix_chars = prefix.map(|p| i32::try_from(p.chars().count()).unwrap_or(i32::MAX));
        // Only the filters given are in the statement, so the planner picks the index that
        // serves it (`jobs_by_state_newest` with a state, else `jobs_newest`).
        let mut conditions = String::from("state IS NOT NULL");
        let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        if let Some(state) = &state {
            args.push(state);
            conditions.push_str(&format!(" AND state = ${}", args.len()));
        }
        if let (Some(prefix), Some(chars)) = (&prefix, &prefix_chars) {
            args.push(chars);
            args.push(prefix);
            conditions.push_str(&format!(
                " AND substr(job_id, 1, ${}) = ${}",
                args.len() - 1,
                args.len()
            ));
        }
        let count_sql = format!("SELECT COUNT(*) FROM jobs WHERE {conditions}");
        // SQLite orders NULL first, so last when descending.
        let page_sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE {conditions}
             ORDER BY submitted_at_ms DESC NULLS LAST, job_id LIMIT ${} OFFSET ${}",
            args.len() + 1,
            args.len() + 2
        );
        let (limit, offset) = (self::limit(limit), big(offset)?);
        self.db.read(|tx| {
            let total = get_u64(&tx.query_one(&count_sql, &args)?, 0)?;
            let mut page_args = args.clone();
            page_args.extend([
                &limit as &(dyn tokio_postgres::types::ToSql + Sync),
                &offset,
            ]);
            let rows = tx.query(&page_sql, &page_args)?;
            let mut jobs = Vec::with_capacity(rows.len());
            for row in &rows {
                if let Some(status) = job_from_row(row)?.status() {
                    jobs.push(status);
                }
            }
            Ok(JobsPage {
                jobs,
                total,
                by_state: by_state_map(counts_by_state(tx)?),
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
        let needle = search_needle(search);
        let (limit, offset) = (self::limit(limit), big(offset)?);
        self.db.read(|tx| {
            let total = get_u64(
                &tx.query_one(
                    &format!("SELECT COUNT(*) FROM results WHERE {PG_FAILURE_MATCHES}"),
                    &[&job_id, &needle],
                )?,
                0,
            )?;
            let rows = tx.query(
                &format!(
                    "SELECT idx, value FROM results WHERE {PG_FAILURE_MATCHES}
                     ORDER BY idx LIMIT $3 OFFSET $4"
                ),
                &[&job_id, &needle, &limit, &offset],
            )?;
            let mut failures = Vec::with_capacity(rows.len());
            for row in &rows {
                failures.push(FailedItem {
                    index: get_u64(row, 0)?,
                    error: text(row.try_get(1)?, "an error")?,
                });
            }
            Ok(FailuresPage { failures, total })
        })
    }

    fn job_detail(&mut self, job_id: &str) -> Result<Option<JobDetail>, StoreError> {
        let row = self.db.read(|tx| {
            tx.query_opt(
                &format!("SELECT {JOB_COLUMNS}, spec FROM jobs WHERE job_id = $1"),
                &[&job_id],
            )
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let Some(status) = job_from_row(&row)?.status() else {
            return Ok(None);
        };
        let spec: Option<&str> = row.try_get(17)?;
        Ok(Some(JobDetail {
            status,
            spec: parse_spec(job_id, spec)?,
        }))
    }
}

/// A job's failed rows whose error contains `$2` ignoring ASCII case (every one when `$2` is
/// NULL), as the SQLite store finds them: `NOT ok` as the partial index `results_failed` says
/// it, and lower() in the "C" collation, which folds ASCII only, as SQLite's does. An error is
/// its UTF-8 bytes in a BYTEA; one holding a NUL (which no TEXT can) is searched with its NULs
/// passed over (the escape encoding's `\000` dropped, an escaped backslash `\\` kept).
const PG_FAILURE_MATCHES: &str = r#"job_id = $1 AND NOT ok AND ($2::text IS NULL OR strpos(
    lower((CASE WHEN position('\x00'::bytea IN value) = 0 THEN convert_from(value, 'UTF8')
        ELSE convert_from(decode(regexp_replace(encode(value, 'escape'), '(\\\\)|\\000',
            '\1', 'g'), 'escape'), 'UTF8') END) COLLATE "C"),
    $2) > 0)"#;

/// How many jobs are in each state (states with none are left out).
fn counts_by_state(tx: &mut PgTx<'_>) -> Result<Vec<(JobState, u64)>, StoreError> {
    let rows = tx.query(
        "SELECT state, COUNT(*) FROM jobs WHERE state IS NOT NULL
         GROUP BY state ORDER BY state",
        &[],
    )?;
    let mut counts = Vec::with_capacity(rows.len());
    for row in &rows {
        let state: &str = row.try_get(0)?;
        let state = JobState::parse(state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown job state {state:?}")))?;
        counts.push((state, get_u64(row, 1)?));
    }
    Ok(counts)
}

fn tombstone(tx: &mut PgTx<'_>, job_id: &str) -> Result<Option<Tombstone>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT how, finished_at_ms, deleted_at_ms, retention_ms FROM tombstones
         WHERE job_id = $1",
        &[&job_id],
    )?
    else {
        return Ok(None);
    };
    let how: String = row.try_get(0)?;
    let finished_at_ms: Option<i64> = row.try_get(1)?;
    let deleted_at_ms: i64 = row.try_get(2)?;
    let retention_ms: Option<i64> = row.try_get(3)?;
    Ok(Some(Tombstone {
        job_id: job_id.to_owned(),
        how: Removal::parse(&how)
            .ok_or_else(|| StoreError::Corrupt(format!("tombstone of {job_id}: {how:?}")))?,
        finished_at: finished_at_ms.map(format_ms),
        deleted_at: format_ms(deleted_at_ms),
        retention: retention_ms.map(|ms| format_period_ms(ms.max(0) as u128)),
    }))
}

/// Deletes finished jobs (retention, `batchctl delete`) in short fenced transactions, as
/// [`crate::store::SqlitePruner`] does.
pub struct PgPruner {
    db: PgDatabase,
    fence: Option<Fence>,
}

impl PgPruner {
    pub fn new(db: PgDatabase, fence: Option<Fence>) -> Self {
        Self { db, fence }
    }

    pub fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }

    /// Up to `limit` finished jobs that ended before `ended_before_ms`, oldest first.
    pub fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows = self.db.read(|tx| {
            tx.query(
                &format!(
                    "SELECT job_id FROM jobs
                     WHERE finished_at_ms < $1 AND state IN ({TERMINAL_STATES})
                     ORDER BY finished_at_ms, job_id LIMIT $2"
                ),
                &[&ended_before_ms, &self::limit(limit)],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
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
        self.db.transaction(self.fence.as_ref(), |tx| {
            // Locked: the fold loop, which locks a job it reads, does not write it back
            // after this deletes it.
            let job = tx.query_opt(
                "SELECT state, finished_at_ms FROM jobs WHERE job_id = $1 FOR UPDATE",
                &[&job_id],
            )?;
            let Some(job) = job else {
                return Ok(match tombstone(tx, job_id)? {
                    Some(stone) => Burial::Gone(stone),
                    None => Burial::Unknown,
                });
            };
            let state: Option<&str> = job.try_get(0)?;
            let finished_at_ms: Option<i64> = job.try_get(1)?;
            let terminal = state
                .and_then(JobState::parse)
                .is_some_and(JobState::is_terminal);
            if !terminal {
                return Ok(Burial::StillRunning);
            }
            tx.execute(
                "INSERT INTO tombstones (job_id, how, finished_at_ms, deleted_at_ms, retention_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &job_id,
                    &how.as_str(),
                    &finished_at_ms,
                    &now_ms,
                    &retention_ms.filter(|_| how == Removal::Expired),
                ],
            )?;
            tx.execute("DELETE FROM jobs WHERE job_id = $1", &[&job_id])?;
            Ok(Burial::Buried)
        })
    }

    /// Deletes up to `limit` rows (results, then fragments, then unpublished metrics) of one
    /// buried job, in one transaction. `None` when no buried job has rows left. (The same
    /// steps as [`common::store::purge_tombstoned`].)
    pub fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
        common::pg::purge_tombstoned(&self.db, self.fence.as_ref(), PG_PURGE_STATEMENTS, limit)
    }
}

/// What a deleted job leaves, in the order it is purged (see [`PgPruner::purge_some`]).
const PG_PURGE_STATEMENTS: &[&str] = &[
    "DELETE FROM results WHERE job_id = $1 AND idx IN
        (SELECT idx FROM results WHERE job_id = $1 ORDER BY idx LIMIT $2)",
    "DELETE FROM fragments WHERE job_id = $1 AND fragment IN
        (SELECT fragment FROM fragments WHERE job_id = $1 ORDER BY fragment LIMIT $2)",
    // Measurements not sealed into a MetricBatch yet; a sealed batch is published as it was
    // sealed (its sequence number must not change). `batch IS NULL` is checked again on the
    // row deleted: a seal committed meanwhile keeps it.
    "DELETE FROM metrics_pending WHERE batch IS NULL AND id IN
        (SELECT id FROM metrics_pending
         WHERE batch IS NULL AND (body::json ->> 'job_id') = $1 LIMIT $2)",
];

#[cfg(test)]
mod tests {
    //! The store's and the fold's tests (`crate::store::tests::cases`,
    //! `crate::fold::tests::cases`) against PostgreSQL on 127.0.0.1:5432 (or
    //! `BATCHQ_TEST_POSTGRES_URL`), each in a database of its own, dropped after; and what
    //! only PostgreSQL has: a fence.

    use std::time::Duration;

    use common::lease::Elector;
    use common::wire::ReducerInput;

    use super::*;
    use crate::fold;
    use crate::store::tests::{Fixture, Prune, accepted, report};

    fn server_url() -> String {
        std::env::var("BATCHQ_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    /// A database of its own, dropped when the test ends.
    pub(super) struct Scratch {
        name: String,
    }

    impl Scratch {
        pub(super) async fn new() -> Self {
            let name = format!("bq_reducer_{}", uuid::Uuid::new_v4().simple());
            admin(&format!("CREATE DATABASE {name}")).await;
            Self { name }
        }

        fn url(&self) -> String {
            let base = server_url();
            let (server, _) = base.rsplit_once('/').expect("a database in the URL");
            format!("{server}/{}", self.name)
        }

        pub(super) async fn drop_now(self) {
            admin(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
        }
    }

    async fn admin(sql: &str) {
        let (client, connection) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL answers on 127.0.0.1:5432");
        let task = tokio::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = task.await;
    }

    /// A migrated reducer schema in a new database.
    pub(super) async fn database(scratch: &Scratch) -> PgDatabase {
        let db = PgDatabase::new(&scratch.url(), "t.ns", "reducer", Duration::from_secs(5), 4)
            .expect("pool");
        assert_eq!(db.migrate(PG_MIGRATIONS).await.expect("migrated"), 0);
        db
    }

    pub(super) struct PgFixture {
        db: PgDatabase,
        store: PgStore,
    }

    impl PgFixture {
        pub(super) fn new(db: PgDatabase) -> Self {
            Self {
                store: PgStore::new(db.clone(), None),
                db,
            }
        }
    }

    impl Prune for PgPruner {
        fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError> {
            PgPruner::expired(self, ended_before_ms, limit)
        }
        fn bury(
            &mut self,
            job_id: &str,
            how: Removal,
            now_ms: i64,
            retention_ms: Option<i64>,
        ) -> Result<Burial, StoreError> {
            PgPruner::bury(self, job_id, how, now_ms, retention_ms)
        }
        fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
            PgPruner::purge_some(self, limit)
        }
    }

    impl Fixture for PgFixture {
        type Store = PgStore;
        type Queries = PgQueries;
        type Pruner = PgPruner;
        fn store(&mut self) -> &mut PgStore {
            &mut self.store
        }
        fn queries(&self) -> PgQueries {
            PgQueries::new(self.db.clone())
        }
        fn pruner(&self) -> PgPruner {
            PgPruner::new(self.db.clone(), None)
        }
        fn rows(&self, table: &str, job_id: &str) -> i64 {
            let sql = match table {
                "metrics_pending" => {
                    "SELECT COUNT(*) FROM metrics_pending WHERE body::json ->> 'job_id' = $1"
                        .to_owned()
                }
                _ => format!("SELECT COUNT(*) FROM {table} WHERE job_id = $1"),
            };
            self.db
                .read(|tx| Ok(tx.query_one(&sql, &[&job_id])?.get(0)))
                .expect("count")
        }
    }

    /// Runs `case` against a new PostgreSQL store, on the blocking pool (where the stores
    /// run), then drops its database, whatever the outcome.
    async fn on_postgres(case: fn(&mut PgFixture)) {
        let scratch = Scratch::new().await;
        let mut fixture = PgFixture::new(database(&scratch).await);
        let outcome = tokio::task::spawn_blocking(move || case(&mut fixture)).await;
        scratch.drop_now().await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    macro_rules! cases_on_postgres {
        ($($case:path => $name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                on_postgres($case).await;
            }
        )*};
    }

    cases_on_postgres! {
        crate::store::tests::cases::expiry_deletes_a_finished_job_in_small_batches_and_never_a_running_one
            => expiry_deletes_a_finished_job_in_small_batches_and_never_a_running_one,
        crate::store::tests::cases::counts_are_stored_exactly_or_not_at_all
            => counts_are_stored_exactly_or_not_at_all,
        crate::store::tests::cases::queries_answer_in_the_same_order
            => queries_answer_in_the_same_order,
        crate::store::tests::cases::console_queries_page_filter_and_search
            => console_queries_page_filter_and_search,
        crate::store::tests::cases::the_first_record_stays => the_first_record_stays,
        crate::store::tests::cases::many_outcomes_keep_the_first_of_each_index
            => many_outcomes_keep_the_first_of_each_index,
        crate::store::tests::cases::fragments_are_recorded_once_wherever_they_fall
            => fragments_are_recorded_once_wherever_they_fall,
        crate::store::tests::cases::metric_batches_keep_their_number_until_published
            => metric_batches_keep_their_number_until_published,
        crate::fold::tests::cases::a_redelivered_report_counts_once_and_settles_the_same
            => a_redelivered_report_counts_once_and_settles_the_same,
        crate::fold::tests::cases::a_late_report_of_a_deleted_job_records_and_settles_nothing
            => a_late_report_of_a_deleted_job_records_and_settles_nothing,
        crate::fold::tests::cases::only_the_last_attempt_counts_a_failure
            => only_the_last_attempt_counts_a_failure,
        crate::fold::tests::cases::a_permanent_failure_is_final_on_any_attempt
            => a_permanent_failure_is_final_on_any_attempt,
        crate::fold::tests::cases::exceeding_the_tolerated_share_fails_at_once_and_halts_dispatch
            => exceeding_the_tolerated_share_fails_at_once_and_halts_dispatch,
        crate::fold::tests::cases::a_redrive_counts_its_own_round_once_and_replaces_errors
            => a_redrive_counts_its_own_round_once_and_replaces_errors,
        crate::fold::tests::cases::a_cancel_before_the_splitter_redrives_cancels_the_round
            => a_cancel_before_the_splitter_redrives_cancels_the_round,
    }

    /// Every table's rows, as text, in order: what a transaction changed.
    fn tables(db: &PgDatabase) -> Vec<String> {
        db.read(|tx| {
            let mut out = Vec::new();
            for table in [
                "jobs",
                "fragments",
                "results",
                "metrics_pending",
                "meta",
                "tombstones",
            ] {
                let rows = tx.query(
                    &format!("SELECT t::text FROM {table} t ORDER BY t::text COLLATE \"C\""),
                    &[],
                )?;
                out.push(format!("{table}: {}", rows.len()));
                out.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            }
            Ok(out)
        })
        .expect("tables")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_transaction_under_a_stale_fence_commits_nothing() {
        let scratch = Scratch::new().await;
        let db = database(&scratch).await;
        let ttl = Duration::from_millis(600);
        let a = Elector::new(db.clone(), "reducer", "host-a", ttl);
        let b = Elector::new(db.clone(), "reducer", "host-b", ttl);
        let fence_a = a.try_acquire().await.expect("lease").expect("free");

        // a folds a finished job and a running one under its fence, and seals a batch.
        let mut store = PgStore::new(db.clone(), Some(fence_a.clone()));
        let pruner = PgPruner::new(db.clone(), Some(fence_a.clone()));
        let (mut store, mut pruner) = tokio::task::spawn_blocking(move || {
            let mut inputs = vec![accepted("done", 5), accepted("running", 100)];
            inputs.push(report("done", 0, 0, 5));
            inputs.push(report("running", 0, 0, 10));
            store
                .transaction(|tx| fold::apply(tx, inputs, 5))
                .expect("a commits");
            store
                .transaction(|tx| tx.seal_metric_batch())
                .expect("sealed");
            (store, pruner)
        })
        .await
        .expect("join");
        let ops_succeeded = |job_id: &'static str| {
            let mut queries = PgQueries::new(db.clone());
            tokio::task::spawn_blocking(move || {
                let status = queries.status(job_id).expect("an unfenced read");
                status.expect("known").ops_succeeded
            })
        };

        // a stops renewing; after the ttl, b takes over.
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let fence_b = b.try_acquire().await.expect("lease").expect("expired");
        let before = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || tables(&db))
                .await
                .expect("join")
        };

        let (store_back, pruner_back, after) = tokio::task::spawn_blocking(move || {
            let fenced = |outcome: Result<(), StoreError>| {
                assert!(
                    matches!(&outcome, Err(StoreError::Fenced { token, .. }) if *token == fence_a.token),
                    "{outcome:?}"
                );
            };
            // Every kind of write: new reports (results, fragments, measurements, a job's
            // end), a new job, a seal and a publication, an expiry and a purge.
            let more = vec![
                report("running", 1, 10, 20),
                report("running", 0, 0, 10),
                accepted("new", 1),
                ReducerInput::Cancelled {
                    job_id: "running".into(),
                    at_ms: 7,
                },
            ];
            fenced(store.transaction(|tx| fold::apply(tx, more, 6).map(drop)));
            fenced(store.transaction(|tx| tx.seal_metric_batch().map(drop)));
            fenced(store.transaction(|tx| tx.metric_batch_published(1)));
            fenced(
                pruner
                    .bury("done", Removal::Deleted, 9, None)
                    .map(drop),
            );
            fenced(pruner.purge_some(10).map(drop));
            let after = tables(store.database());
            (store, pruner, after)
        })
        .await
        .expect("join");
        assert_eq!(after, before, "the fenced transactions left nothing");
        assert_eq!(ops_succeeded("running").await.expect("join"), 10);

        // Under b's fence, the same writes commit.
        let (mut store, mut pruner) = (store_back, pruner_back);
        store.set_fence(Some(fence_b.clone()));
        pruner.set_fence(Some(fence_b));
        tokio::task::spawn_blocking(move || {
            store
                .transaction(|tx| fold::apply(tx, vec![report("running", 1, 10, 20)], 6))
                .expect("b commits");
            assert_eq!(
                pruner
                    .bury("done", Removal::Deleted, 9, None)
                    .expect("b buries"),
                Burial::Buried
            );
        })
        .await
        .expect("join");
        assert_eq!(ops_succeeded("running").await.expect("join"), 20);
        drop((a, b, db));
        scratch.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn migrating_again_changes_nothing_and_a_newer_schema_is_refused() {
        let scratch = Scratch::new().await;
        let db = database(&scratch).await;
        assert_eq!(
            db.migrate(PG_MIGRATIONS).await.expect("again"),
            PG_MIGRATIONS.len() as i64
        );
        let mut newer = PG_MIGRATIONS.to_vec();
        newer.push("ALTER TABLE jobs ADD COLUMN later BIGINT");
        db.migrate(&newer).await.expect("a newer batchq");
        let error = db.migrate(PG_MIGRATIONS).await.expect_err("refused");
        let supported = PG_MIGRATIONS.len() as i64;
        assert!(
            matches!(
                error,
                StoreError::NewerSchema { found, supported: s }
                    if found == supported + 1 && s == supported
            ),
            "{error}"
        );
        drop(db);
        scratch.drop_now().await;
    }
}

#[cfg(test)]
mod bench {
    //! The fold loop's throughput on each store, as the reducer runs it: batches of 512
    //! reports, one transaction each. `cargo test --release -p reducer --lib -- --ignored
    //! --nocapture store_throughput`.

    use std::time::Instant;

    use common::wire::{FragmentReport, Indices, ReducerInput};
    use serde_json::Value;

    use super::tests::{PgFixture, Scratch, database};
    use crate::fold;
    use crate::store::ReducerStore;
    use crate::store::tests::{Fixture, sqlite};

    const BATCH: u64 = 512;

    fn report(job_id: &str, fragment: u64, ops: u64) -> ReducerInput {
        let start = fragment * ops;
        ReducerInput::Fragment(FragmentReport {
            job_id: job_id.into(),
            fragment,
            operation: "noop".into(),
            attempt: 1,
            worker: "w".into(),
            indices: Indices::Span(start, start + ops),
            done: ops as u32,
            failures: Vec::new(),
            results: (0..ops)
                .map(|i| Value::from(format!("r{}", start + i)))
                .collect(),
            cut: None,
            started_at_ms: 2,
            elapsed_us: 10,
            measurements: Default::default(),
            round: 0,
        })
    }

    /// Fragments folded per second: `fragments` reports of `ops` operations of 4 jobs.
    fn fold_rate<F: Fixture>(fx: &mut F, fragments: u64, ops: u64) -> f64 {
        let jobs = ["a", "b", "c", "d"];
        let accepts = jobs
            .iter()
            .map(|j| ReducerInput::Accepted {
                job_id: (*j).into(),
                operation: "noop".into(),
                ops_total: fragments * ops,
                submitted_at_ms: 1,
                collect_results: true,
                tolerated_failure_percent: 0.0,
                max_attempts: 1,
                spec: None,
            })
            .collect();
        let store = fx.store();
        store
            .transaction(|tx| fold::apply(tx, accepts, 1))
            .expect("accepts");
        let started = Instant::now();
        let mut next = 0;
        while next < fragments {
            let end = (next + BATCH).min(fragments);
            let inputs = (next..end)
                .map(|f| report(jobs[(f % 4) as usize], f / 4, ops))
                .collect();
            store
                .transaction(|tx| fold::apply(tx, inputs, 5))
                .expect("fold");
            next = end;
        }
        fragments as f64 / started.elapsed().as_secs_f64()
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a benchmark: run it in release mode"]
    async fn store_throughput() {
        for (fragments, ops) in [(20_000, 1), (4_000, 100)] {
            let sqlite_rate =
                tokio::task::spawn_blocking(move || fold_rate(&mut sqlite(), fragments, ops))
                    .await
                    .expect("join");
            let scratch = Scratch::new().await;
            let mut fixture = PgFixture::new(database(&scratch).await);
            let pg_rate =
                tokio::task::spawn_blocking(move || fold_rate(&mut fixture, fragments, ops))
                    .await
                    .expect("join");
            scratch.drop_now().await;
            println!(
                "{ops} op(s) per fragment: SQLite {sqlite_rate:.0} fragments/s, \
                 PostgreSQL {pg_rate:.0} fragments/s ({:.2}x)",
                pg_rate / sqlite_rate
            );
        }
    }
}
