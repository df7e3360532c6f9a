//! The splitter's state: jobs, the fragments that are out, the items of item jobs, and the
//! outbox of messages committed but not yet confirmed by the broker.
//!
//! The interface is narrow on purpose ([`SplitterStore`], [`SplitterTx`]): the windowing
//! logic in `window.rs` only sees these methods, so another store (PostgreSQL, for standby
//! splitters) can be put behind them.

use std::path::Path;

use common::wire::Indices;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

pub use common::store::StoreError;

/// Where a job is, as far as dispatching goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchState {
    /// Fragments are being released.
    Active,
    /// Cancel requested: nothing new is released; waiting for fragments out to come back.
    Cancelling,
    /// Nothing left to dispatch and nothing out.
    Finished,
    /// The message was not a valid job; the id is known so a re-send is ignored.
    Rejected,
}

impl DispatchState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DispatchState::Active => "active",
            DispatchState::Cancelling => "cancelling",
            DispatchState::Finished => "finished",
            DispatchState::Rejected => "rejected",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => DispatchState::Active,
            "cancelling" => DispatchState::Cancelling,
            "finished" => DispatchState::Finished,
            "rejected" => DispatchState::Rejected,
            other => return Err(StoreError::Corrupt(format!("job state {other:?}"))),
        })
    }
}

/// One job as the splitter keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub job_id: String,
    pub state: DispatchState,
    pub operation: String,
    /// `params` as JSON text, copied into every fragment.
    pub params: String,
    /// `Some(start)` for range jobs; item jobs keep their items in the store.
    pub range_base: Option<i64>,
    pub ops_total: u64,
    pub fragment_size: u32,
    pub max_concurrent: u32,
    pub lifespan_ms: u64,
    pub max_attempts: u32,
    pub collect_results: bool,
    /// First index not yet put in any fragment.
    pub cursor: u64,
    pub next_fragment: u64,
    pub in_flight: u64,
    /// Orders the progress notes sent to the reducer.
    pub progress_seq: u64,
    /// Whether batchq sizes the fragments (the JobSpec gave no `fragment_size`).
    pub adaptive: bool,
    /// Observed cost of one operation, in nanoseconds (a moving average over fragments).
    pub op_cost_ns: Option<u64>,
    /// The redrive round the job is in (0 until its first redrive): stamped on every
    /// fragment released, so that a report of an earlier round is known to be stale.
    pub round: u64,
    /// Whether a redrive can run the job again: false for a job accepted before redrives
    /// existed, whose settlements did not say which operations failed for good (and whose
    /// items may be gone).
    pub redrivable: bool,
}

impl JobRow {
    /// A job of `state` with nothing to dispatch and nothing known about it but its id: a
    /// rejected JobSpec's record, or what a deleted job's tombstone stands for.
    pub fn inert(job_id: &str, state: DispatchState) -> Self {
        JobRow {
            job_id: job_id.to_owned(),
            state,
            operation: String::new(),
            params: "{}".to_owned(),
            range_base: None,
            ops_total: 0,
            fragment_size: 1,
            max_concurrent: 1,
            lifespan_ms: 0,
            max_attempts: 1,
            collect_results: false,
            cursor: 0,
            next_fragment: 0,
            in_flight: 0,
            progress_seq: 0,
            adaptive: false,
            op_cost_ns: None,
            round: 0,
            redrivable: true,
        }
    }

    /// The size of this job's next fragments from its observed cost, when it has no
    /// `fragment_size` of its own and a cost is known.
    pub fn sized_fragment(&self) -> Option<u32> {
        let cost = self.op_cost_ns.filter(|_| self.adaptive)?;
        Some(crate::window::fragment_size_for_cost(
            cost,
            self.lifespan_ms,
            self.ops_total,
            self.max_concurrent,
            crate::window::largest_default_size(self.range_base.is_some(), self.collect_results),
        ))
    }
}

/// A fragment that is out: released and not yet settled.
#[derive(Debug, Clone, PartialEq)]
pub struct FragmentRow {
    pub job_id: String,
    pub fragment: u64,
    pub indices: Indices,
    pub attempt: u32,
}

/// A message to publish once the transaction that wrote it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub seq: i64,
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// AMQP properties as JSON (lapin's `BasicProperties` serialisation).
    pub properties: String,
    /// Unroutable is an error (the message must reach a queue), not a silent drop.
    pub mandatory: bool,
}

/// What the windowing logic may do inside one transaction.
pub trait SplitterTx {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>, StoreError>;
    fn insert_job(&mut self, job: &JobRow) -> Result<(), StoreError>;
    fn update_job(&mut self, job: &JobRow) -> Result<(), StoreError>;
    fn insert_items(&mut self, job_id: &str, items: &[Value]) -> Result<(), StoreError>;
    /// The items at `indices`, in order.
    fn items(&mut self, job_id: &str, indices: &Indices) -> Result<Vec<Value>, StoreError>;
    fn drop_items(&mut self, job_id: &str) -> Result<(), StoreError>;
    fn insert_fragment(&mut self, fragment: &FragmentRow) -> Result<(), StoreError>;
    /// Removes and returns a fragment that is out; `None` if it was settled already.
    fn take_fragment(
        &mut self,
        job_id: &str,
        fragment: u64,
    ) -> Result<Option<FragmentRow>, StoreError>;
    /// Removes and returns every fragment of the job that is out (a redrive: none of them
    /// will count).
    fn take_fragments(&mut self, job_id: &str) -> Result<Vec<FragmentRow>, StoreError>;
    /// Keeps `indices` of the job, which did not succeed in redrive round `round` and will
    /// not run again in it, for the job's next redrive.
    fn park(&mut self, job_id: &str, round: u64, indices: &Indices) -> Result<(), StoreError>;
    /// The oldest indices parked in a round before `before_round` (its id and the indices),
    /// if any: what a redrive into a later round still has to release.
    fn next_parked(
        &mut self,
        job_id: &str,
        before_round: u64,
    ) -> Result<Option<(i64, Indices)>, StoreError>;
    /// Replaces parked row `id` with what is left of it (`None`: all of it was released).
    fn replace_parked(&mut self, id: i64, rest: Option<&Indices>) -> Result<(), StoreError>;
    fn push_outbox(&mut self, message: OutboxMessage) -> Result<(), StoreError>;
    /// Whether the job's bookkeeping was deleted (retention): its id stays known (a
    /// re-submitted JobSpec is ignored), and late settlements and halts of it change nothing.
    fn job_expired(&mut self, job_id: &str) -> Result<bool, StoreError>;
    /// The cost per operation last observed for `operation` with these `params` (their JSON
    /// text), by any job.
    fn operation_cost(&mut self, operation: &str, params: &str) -> Result<Option<u64>, StoreError>;
    /// Remembers an observed cost per operation, and forgets costs not observed for
    /// [`COST_MEMORY_MS`].
    fn remember_operation_cost(
        &mut self,
        operation: &str,
        params: &str,
        cost_ns: u64,
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// How long an operation's observed cost is remembered for the jobs that follow.
pub const COST_MEMORY_MS: i64 = 30 * 24 * 3600 * 1000;

/// A store the splitter can run transactions and drain its outbox on.
pub trait SplitterStore: Send + 'static {
    /// Runs `f` in one transaction: all of it is committed, or none.
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn SplitterTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError>;
    /// The oldest `limit` outbox messages.
    fn outbox(&mut self, limit: usize) -> Result<Vec<OutboxMessage>, StoreError>;
    /// Forgets outbox messages up to and including `seq`: the broker confirmed them.
    fn outbox_confirmed(&mut self, seq: i64) -> Result<(), StoreError>;
}

/// The embedded SQLite store (WAL, synchronous=FULL: a commit survives a power cut, and
/// every message is acked only after its commit).
pub struct SqliteStore {
    conn: Connection,
}

/// Schema version 1: the tables as they were before versions were recorded. Written with
/// `IF NOT EXISTS`, so it applies to an empty database and to a store written then (which has
/// them all, and no recorded version).
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    operation TEXT NOT NULL,
    params TEXT NOT NULL,
    range_base INTEGER,
    ops_total INTEGER NOT NULL,
    fragment_size INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    lifespan_ms INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    collect_results INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    next_fragment INTEGER NOT NULL,
    in_flight INTEGER NOT NULL,
    progress_seq INTEGER NOT NULL,
    adaptive INTEGER NOT NULL,
    op_cost_ns INTEGER
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fragments (
    job_id TEXT NOT NULL,
    fragment INTEGER NOT NULL,
    indices TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    PRIMARY KEY (job_id, fragment)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS operation_costs (
    operation TEXT NOT NULL,
    params TEXT NOT NULL,
    cost_ns INTEGER NOT NULL,
    observed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (operation, params)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT NOT NULL,
    mandatory INTEGER NOT NULL
);
";

/// Schema version 2: retention. `ended_at_ms` is when a job stopped dispatching (finished,
/// rejected, or cancel/failure requested); jobs that had ended before the upgrade count from
/// the upgrade. A deleted job leaves a tombstone, so its id stays known; `purged` is 1 once
/// none of its rows are left.
const SCHEMA_V2: &str = "
ALTER TABLE jobs ADD COLUMN ended_at_ms INTEGER;
UPDATE jobs SET ended_at_ms = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    WHERE state IN ('finished', 'rejected', 'cancelling');
CREATE INDEX jobs_by_ended ON jobs (ended_at_ms) WHERE ended_at_ms IS NOT NULL;
CREATE TABLE tombstones (
    job_id TEXT PRIMARY KEY,
    ended_at_ms INTEGER,
    deleted_at_ms INTEGER NOT NULL,
    purged INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX tombstones_to_purge ON tombstones (job_id) WHERE purged = 0;
";

/// Schema version 3: redrives. A job has a redrive `round`; what did not succeed in a round
/// and will not run again in it (final failures, the unfinished part of fragments of a
/// cancelled or failed job) is kept in `leftovers` for the next redrive, which also runs the
/// job's fragments still out and its undispatched indices. A job accepted before this
/// version kept no leftovers (and an item job dropped its items when it ended): it cannot be
/// redriven (`redrivable` 0; jobs accepted since write 1).
const SCHEMA_V3: &str = "
ALTER TABLE jobs ADD COLUMN round INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN redrivable INTEGER NOT NULL DEFAULT 0;
CREATE TABLE leftovers (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    indices TEXT NOT NULL
);
CREATE INDEX leftovers_by_job ON leftovers (job_id, round, id);
";

/// The splitter store's migrations, in order; the schema version is their count.
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        common::migrate::migrate(&mut conn, MIGRATIONS)?;
        Ok(Self { conn })
    }
}

struct SqliteTx<'a> {
    tx: rusqlite::Transaction<'a>,
}

/// When a job in `state` stopped dispatching, if it has: now, which `update_job` keeps only
/// when the job had no end yet (a cancelled job is cleared counting from its cancel).
pub(crate) fn ended_at(state: DispatchState) -> Option<i64> {
    (state != DispatchState::Active).then(common::timefmt::now_ms)
}

/// What a lookup of a deleted job finds: a job with nothing left to dispatch, so that a
/// re-submitted JobSpec, a cancel, a late settlement or a halt of it changes nothing.
pub(crate) fn expired_job(job_id: &str) -> JobRow {
    JobRow::inert(job_id, DispatchState::Finished)
}

use common::store::{get_u64, to_i64};

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl SplitterTx for SqliteTx<'_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT state, operation, params, range_base, ops_total, fragment_size,
                        max_concurrent, lifespan_ms, max_attempts, collect_results, cursor,
                        next_fragment, in_flight, progress_seq, adaptive, op_cost_ns, round,
                        redrivable
                 FROM jobs WHERE job_id = ?1",
            )?
            .query_row([job_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    JobRow {
                        job_id: job_id.to_owned(),
                        state: DispatchState::Active,
                        operation: r.get(1)?,
                        params: r.get(2)?,
                        range_base: r.get(3)?,
                        ops_total: get_u64(r, 4)?,
                        fragment_size: r.get(5)?,
                        max_concurrent: r.get(6)?,
                        lifespan_ms: get_u64(r, 7)?,
                        max_attempts: r.get(8)?,
                        collect_results: r.get(9)?,
                        cursor: get_u64(r, 10)?,
                        next_fragment: get_u64(r, 11)?,
                        in_flight: get_u64(r, 12)?,
                        progress_seq: get_u64(r, 13)?,
                        adaptive: r.get(14)?,
                        op_cost_ns: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
                        round: get_u64(r, 16)?,
                        redrivable: r.get(17)?,
                    },
                ))
            })
            .optional()?;
        match row {
            None if self.job_expired(job_id)? => Ok(Some(expired_job(job_id))),
            None => Ok(None),
            Some((state, mut job)) => {
                job.state = DispatchState::parse(&state)?;
                Ok(Some(job))
            }
        }
    }

    fn insert_job(&mut self, job: &JobRow) -> Result<(), StoreError> {
        if self.job_expired(&job.job_id)? {
            // As inserting a known id fails on the primary key: a deleted id stays known.
            return Err(StoreError::Corrupt(format!(
                "job {} was deleted; its id stays known",
                job.job_id
            )));
        }
        self.tx
            .prepare_cached(
                "INSERT INTO jobs (job_id, state, operation, params, range_base, ops_total,
                    fragment_size, max_concurrent, lifespan_ms, max_attempts, collect_results,
                    cursor, next_fragment, in_flight, progress_seq, adaptive, op_cost_ns,
                    ended_at_ms, round, redrivable)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17, ?18, ?19, ?20)",
            )?
            .execute(params![
                job.job_id,
                job.state.as_str(),
                job.operation,
                job.params,
                job.range_base,
                to_i64(job.ops_total),
                job.fragment_size,
                job.max_concurrent,
                to_i64(job.lifespan_ms),
                job.max_attempts,
                job.collect_results,
                to_i64(job.cursor),
                to_i64(job.next_fragment),
                to_i64(job.in_flight),
                to_i64(job.progress_seq),
                job.adaptive,
                job.op_cost_ns.map(to_i64),
                ended_at(job.state),
                to_i64(job.round),
                job.redrivable,
            ])?;
        Ok(())
    }

    fn update_job(&mut self, job: &JobRow) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "UPDATE jobs SET state = ?2, cursor = ?3, next_fragment = ?4, in_flight = ?5,
                    progress_seq = ?6, fragment_size = ?7, op_cost_ns = ?8,
                    ended_at_ms = CASE WHEN ?9 IS NULL THEN NULL
                                       ELSE COALESCE(ended_at_ms, ?9) END,
                    round = ?10
                 WHERE job_id = ?1",
            )?
            .execute(params![
                job.job_id,
                job.state.as_str(),
                to_i64(job.cursor),
                to_i64(job.next_fragment),
                to_i64(job.in_flight),
                to_i64(job.progress_seq),
                job.fragment_size,
                job.op_cost_ns.map(to_i64),
                ended_at(job.state),
                to_i64(job.round),
            ])?;
        Ok(())
    }

    fn operation_cost(&mut self, operation: &str, params: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT cost_ns FROM operation_costs WHERE operation = ?1 AND params = ?2",
            )?
            .query_row([operation, params], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|cost| cost.max(0) as u64))
    }

    fn remember_operation_cost(
        &mut self,
        operation: &str,
        params: &str,
        cost_ns: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO operation_costs (operation, params, cost_ns, observed_at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (operation, params)
                 DO UPDATE SET cost_ns = ?3, observed_at_ms = ?4",
            )?
            .execute(params![operation, params, to_i64(cost_ns), now_ms])?;
        self.tx
            .prepare_cached("DELETE FROM operation_costs WHERE observed_at_ms < ?1")?
            .execute([now_ms.saturating_sub(COST_MEMORY_MS)])?;
        Ok(())
    }

    fn insert_items(&mut self, job_id: &str, items: &[Value]) -> Result<(), StoreError> {
        let mut insert = self
            .tx
            .prepare_cached("INSERT INTO items (job_id, idx, value) VALUES (?1, ?2, ?3)")?;
        for (idx, item) in items.iter().enumerate() {
            insert.execute(params![job_id, idx as i64, encode(item)?])?;
        }
        Ok(())
    }

    fn items(&mut self, job_id: &str, indices: &Indices) -> Result<Vec<Value>, StoreError> {
        let decode = |text: String| {
            serde_json::from_str::<Value>(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        let mut out = Vec::with_capacity(indices.len());
        match indices {
            Indices::Span(start, end) => {
                let mut query = self.tx.prepare_cached(
                    "SELECT value FROM items WHERE job_id = ?1 AND idx >= ?2 AND idx < ?3
                     ORDER BY idx",
                )?;
                let rows = query.query_map(params![job_id, to_i64(*start), to_i64(*end)], |r| {
                    r.get::<_, String>(0)
                })?;
                for row in rows {
                    out.push(decode(row?)?);
                }
            }
            Indices::List(list) => {
                let mut query = self
                    .tx
                    .prepare_cached("SELECT value FROM items WHERE job_id = ?1 AND idx = ?2")?;
                for idx in list {
                    let text: String =
                        query.query_row(params![job_id, to_i64(*idx)], |r| r.get(0))?;
                    out.push(decode(text)?);
                }
            }
        }
        if out.len() != indices.len() {
            return Err(StoreError::Corrupt(format!(
                "job {job_id}: {} items found for {} indices",
                out.len(),
                indices.len()
            )));
        }
        Ok(out)
    }

    fn drop_items(&mut self, job_id: &str) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("DELETE FROM items WHERE job_id = ?1")?
            .execute([job_id])?;
        Ok(())
    }

    fn insert_fragment(&mut self, fragment: &FragmentRow) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO fragments (job_id, fragment, indices, attempt) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                fragment.job_id,
                to_i64(fragment.fragment),
                encode(&fragment.indices)?,
                fragment.attempt,
            ])?;
        Ok(())
    }

    fn take_fragment(
        &mut self,
        job_id: &str,
        fragment: u64,
    ) -> Result<Option<FragmentRow>, StoreError> {
        let found = self
            .tx
            .prepare_cached(
                "DELETE FROM fragments WHERE job_id = ?1 AND fragment = ?2
                 RETURNING indices, attempt",
            )?
            .query_row(params![job_id, to_i64(fragment)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
            })
            .optional()?;
        match found {
            None => Ok(None),
            Some((indices, attempt)) => Ok(Some(FragmentRow {
                job_id: job_id.to_owned(),
                fragment,
                indices: serde_json::from_str(&indices)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                attempt,
            })),
        }
    }

    fn take_fragments(&mut self, job_id: &str) -> Result<Vec<FragmentRow>, StoreError> {
        let mut query = self.tx.prepare_cached(
            "DELETE FROM fragments WHERE job_id = ?1 RETURNING fragment, indices, attempt",
        )?;
        let rows = query.query_map([job_id], |r| {
            Ok((get_u64(r, 0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?))
        })?;
        let mut taken = Vec::new();
        for row in rows {
            let (fragment, indices, attempt) = row?;
            taken.push(FragmentRow {
                job_id: job_id.to_owned(),
                fragment,
                indices: serde_json::from_str(&indices)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                attempt,
            });
        }
        Ok(taken)
    }

    fn park(&mut self, job_id: &str, round: u64, indices: &Indices) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("INSERT INTO leftovers (job_id, round, indices) VALUES (?1, ?2, ?3)")?
            .execute(params![job_id, to_i64(round), encode(indices)?])?;
        Ok(())
    }

    fn next_parked(
        &mut self,
        job_id: &str,
        before_round: u64,
    ) -> Result<Option<(i64, Indices)>, StoreError> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT id, indices FROM leftovers WHERE job_id = ?1 AND round < ?2
                 ORDER BY round, id LIMIT 1",
            )?
            .query_row(params![job_id, to_i64(before_round)], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .optional()?;
        row.map(|(id, indices)| {
            let indices =
                serde_json::from_str(&indices).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((id, indices))
        })
        .transpose()
    }

    fn replace_parked(&mut self, id: i64, rest: Option<&Indices>) -> Result<(), StoreError> {
        match rest {
            None => self
                .tx
                .prepare_cached("DELETE FROM leftovers WHERE id = ?1")?
                .execute([id])?,
            Some(rest) => self
                .tx
                .prepare_cached("UPDATE leftovers SET indices = ?2 WHERE id = ?1")?
                .execute(params![id, encode(rest)?])?,
        };
        Ok(())
    }

    fn job_expired(&mut self, job_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM tombstones WHERE job_id = ?1")?
            .query_row([job_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn push_outbox(&mut self, message: OutboxMessage) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO outbox (exchange, routing_key, body, properties, mandatory)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                message.exchange,
                message.routing_key,
                message.body,
                message.properties,
                message.mandatory,
            ])?;
        Ok(())
    }
}

impl SplitterStore for SqliteStore {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn SplitterTx) -> Result<R, StoreError>,
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

    fn outbox(&mut self, limit: usize) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT seq, exchange, routing_key, body, properties, mandatory
             FROM outbox ORDER BY seq LIMIT ?1",
        )?;
        let rows = query.query_map([limit as i64], |r| {
            Ok(OutboxMessage {
                seq: r.get(0)?,
                exchange: r.get(1)?,
                routing_key: r.get(2)?,
                body: r.get(3)?,
                properties: r.get(4)?,
                mandatory: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn outbox_confirmed(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
            .execute([seq])?;
        Ok(())
    }
}

/// Deletes the bookkeeping of jobs that ended (finished, rejected, or cancel/failure requested)
/// more than the retention ago, on a connection of its own, in short transactions so the
/// intake's commits never wait long behind it.
pub struct SqlitePruner {
    conn: Connection,
}

impl SqlitePruner {
    /// Opens the database that [`SqliteStore::open`] created and migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Deletes up to `limit` jobs that ended before `ended_before_ms`, each leaving a
    /// tombstone, in one transaction; their items and fragments go in later batches
    /// ([`Self::purge_some`]). Returns how many were deleted. An active job is never touched.
    pub fn expire(
        &mut self,
        ended_before_ms: i64,
        now_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let jobs: Vec<(String, i64)> = {
            let mut query = tx.prepare_cached(
                "SELECT job_id, ended_at_ms FROM jobs
                 WHERE ended_at_ms < ?1 AND state != 'active'
                 ORDER BY ended_at_ms LIMIT ?2",
            )?;
            let rows = query.query_map(params![ended_before_ms, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (job_id, ended_at_ms) in &jobs {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO tombstones (job_id, ended_at_ms, deleted_at_ms)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![job_id, ended_at_ms, now_ms])?;
            tx.prepare_cached("DELETE FROM jobs WHERE job_id = ?1")?
                .execute([job_id])?;
        }
        tx.commit()?;
        Ok(jobs.len() as u64)
    }

    /// Deletes up to `limit` rows (items, then fragments still out) of one deleted job, in
    /// one transaction. `None` when no deleted job has rows left.
    pub fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
        common::store::purge_tombstoned(&mut self.conn, PURGE_STATEMENTS, limit)
    }
}

/// What a deleted job leaves, in the order it is purged (see
/// [`common::store::purge_tombstoned`]).
const PURGE_STATEMENTS: &[&str] = &[
    "DELETE FROM items WHERE job_id = ?1 AND idx IN
        (SELECT idx FROM items WHERE job_id = ?1 ORDER BY idx LIMIT ?2)",
    "DELETE FROM fragments WHERE job_id = ?1 AND fragment IN
        (SELECT fragment FROM fragments WHERE job_id = ?1 ORDER BY fragment LIMIT ?2)",
    "DELETE FROM leftovers WHERE id IN
        (SELECT id FROM leftovers WHERE job_id = ?1 ORDER BY id LIMIT ?2)",
];

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn job(job_id: &str, state: DispatchState) -> JobRow {
        JobRow {
            job_id: job_id.to_owned(),
            state,
            operation: "noop".into(),
            ..expired_job(job_id)
        }
    }

    fn count(conn: &Connection, table: &str, job_id: &str) -> i64 {
        conn.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE job_id = ?1"),
            [job_id],
            |r| r.get(0),
        )
        .expect("count")
    }

    /// A store with its pruner and a look into its tables: what the tests below run on, for
    /// each kind of store (the PostgreSQL one's is in `pg_store.rs`).
    pub(crate) trait Backend {
        type Store: SplitterStore;
        fn store(&mut self) -> &mut Self::Store;
        fn expire(
            &mut self,
            ended_before_ms: i64,
            now_ms: i64,
            limit: u32,
        ) -> Result<u64, StoreError>;
        fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError>;
        /// Rows of `table` (with a `job_id` column) that are `job_id`'s.
        fn count(&mut self, table: &str, job_id: &str) -> i64;
        fn ended_at(&mut self, job_id: &str) -> Option<i64>;
    }

    pub(crate) struct SqliteBackend {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        pruner: SqlitePruner,
    }

    impl SqliteBackend {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("s.db");
            let store = SqliteStore::open(&path).expect("store");
            let pruner = SqlitePruner::open(&path).expect("pruner");
            Self {
                _dir: dir,
                store,
                pruner,
            }
        }
    }

    impl Backend for SqliteBackend {
        type Store = SqliteStore;
        fn store(&mut self) -> &mut SqliteStore {
            &mut self.store
        }
        fn expire(
            &mut self,
            ended_before_ms: i64,
            now_ms: i64,
            limit: u32,
        ) -> Result<u64, StoreError> {
            self.pruner.expire(ended_before_ms, now_ms, limit)
        }
        fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
            self.pruner.purge_some(limit)
        }
        fn count(&mut self, table: &str, job_id: &str) -> i64 {
            count(&self.store.conn, table, job_id)
        }
        fn ended_at(&mut self, job_id: &str) -> Option<i64> {
            self.store
                .conn
                .query_row(
                    "SELECT ended_at_ms FROM jobs WHERE job_id = ?1",
                    [job_id],
                    |r| r.get(0),
                )
                .expect("ended_at_ms")
        }
    }

    #[test]
    fn ended_jobs_are_deleted_in_small_batches_and_stay_known() {
        ended_jobs_are_deleted_in_small_batches_and_stay_known_on(&mut SqliteBackend::new());
    }

    pub(crate) fn ended_jobs_are_deleted_in_small_batches_and_stay_known_on(b: &mut impl Backend) {
        b.store()
            .transaction(|tx| {
                // A cancelled job whose 3 fragments never came back, with 5 items.
                tx.insert_job(&job("cancelled", DispatchState::Active))?;
                let items: Vec<Value> = (0..5).map(Value::from).collect();
                tx.insert_items("cancelled", &items)?;
                for fragment in 0..3 {
                    tx.insert_fragment(&FragmentRow {
                        job_id: "cancelled".into(),
                        fragment,
                        indices: Indices::Span(fragment, fragment + 1),
                        attempt: 1,
                    })?;
                }
                tx.update_job(&job("cancelled", DispatchState::Cancelling))?;
                tx.insert_job(&job("running", DispatchState::Active))?;
                tx.insert_items("running", &items)?;
                Ok(())
            })
            .expect("jobs");
        let ended: i64 = b.ended_at("cancelled").expect("the cancel time is kept");
        assert_eq!(b.expire(ended, ended, 10).expect("expire"), 0, "not yet");
        assert_eq!(b.expire(ended + 1, ended + 1, 10).expect("expire"), 1);
        let mut batches = Vec::new();
        while let Some(n) = b.purge_some(3).expect("purge") {
            batches.push(n);
        }
        // 5 items and 3 fragments, 3 rows at a time.
        assert_eq!(batches, vec![3, 3, 2]);
        for table in ["jobs", "items", "fragments"] {
            assert_eq!(b.count(table, "cancelled"), 0, "{table}");
        }
        assert_eq!(b.count("items", "running"), 5, "an active job is kept");
        assert_eq!(b.count("jobs", "running"), 1);

        b.store()
            .transaction(|tx| {
                assert!(tx.job_expired("cancelled")?);
                assert!(!tx.job_expired("running")?);
                let known = tx.job("cancelled")?.expect("a deleted id stays known");
                assert_eq!(known.state, DispatchState::Finished);
                assert!(
                    tx.insert_job(&job("cancelled", DispatchState::Active))
                        .is_err()
                );
                // A late settlement of a purged fragment finds nothing to settle.
                assert_eq!(tx.take_fragment("cancelled", 1)?, None);
                Ok(())
            })
            .expect("lookups");
    }

    #[test]
    fn a_store_written_before_versions_is_upgraded_in_place() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.db");
        {
            let conn = Connection::open(&path).expect("old store");
            conn.execute_batch(SCHEMA_V1).expect("v1 tables");
            conn.execute_batch(
                "INSERT INTO jobs VALUES ('old', 'finished', 'noop', '{}', 0, 1, 1, 1, 1000, 1,
                    1, 1, 1, 0, 1, 0, NULL);
                 INSERT INTO jobs VALUES ('old-items', 'finished', 'noop', '{}', NULL, 1, 1, 1,
                    1000, 1, 1, 1, 1, 0, 1, 0, NULL);",
            )
            .expect("old jobs");
        }
        let mut store = SqliteStore::open(&path).expect("upgraded");
        assert_eq!(
            common::migrate::version(&store.conn).expect("version"),
            MIGRATIONS.len() as i64
        );
        let ended: Option<i64> = store
            .conn
            .query_row(
                "SELECT ended_at_ms FROM jobs WHERE job_id = 'old'",
                [],
                |r| r.get(0),
            )
            .expect("old job");
        assert!(
            ended.is_some(),
            "a job ended before the upgrade counts from it"
        );
        let old = store.transaction(|tx| tx.job("old")).expect("read");
        let old = old.expect("the old job");
        // Accepted before redrives: its settlements said nothing of its final failures, and
        // an item job's items are gone; neither can be redriven.
        assert_eq!(
            (old.state, old.round, old.redrivable),
            (DispatchState::Finished, 0, false)
        );
        let items = store.transaction(|tx| tx.job("old-items")).expect("read");
        assert_eq!(items.map(|j| j.redrivable), Some(false));
        drop(store);
        let conn = Connection::open(&path).expect("reopen");
        let future = MIGRATIONS.len() as i64 + 1;
        common::migrate::stamp(&conn, future).expect("from the future");
        drop(conn);
        let refused = SqliteStore::open(&path);
        assert!(
            matches!(refused, Err(StoreError::NewerSchema { found, supported })
                if found == future && supported == future - 1),
            "{:?}",
            refused.err()
        );
    }
}
