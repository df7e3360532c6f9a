//! The splitter's state: jobs, the fragments that are out, the items of item jobs, and the
//! outbox of messages committed but not yet confirmed by the broker.
//!
//! The interface is narrow on purpose ([`SplitterStore`], [`SplitterTx`]): the windowing
//! logic in `window.rs` only sees these methods, so another store (PostgreSQL, for standby
//! splitters) can be put behind them.

use std::path::Path;

use common::wire::Indices;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("splitter store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("splitter store holds a malformed record: {0}")]
    Corrupt(String),
    #[error("splitter store: cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

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
    fn as_str(self) -> &'static str {
        match self {
            DispatchState::Active => "active",
            DispatchState::Cancelling => "cancelling",
            DispatchState::Finished => "finished",
            DispatchState::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
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
}

impl JobRow {
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
    fn push_outbox(&mut self, message: OutboxMessage) -> Result<(), StoreError>;
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

const SCHEMA: &str = "
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

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }
}

struct SqliteTx<'a> {
    tx: rusqlite::Transaction<'a>,
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

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl SplitterTx for SqliteTx<'_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = self
            .tx
            .prepare_cached(
                "SELECT state, operation, params, range_base, ops_total, fragment_size,
                        max_concurrent, lifespan_ms, max_attempts, collect_results, cursor,
                        next_fragment, in_flight, progress_seq, adaptive, op_cost_ns
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
                    },
                ))
            })
            .optional()?;
        match row {
            None => Ok(None),
            Some((state, mut job)) => {
                job.state = DispatchState::parse(&state)?;
                Ok(Some(job))
            }
        }
    }

    fn insert_job(&mut self, job: &JobRow) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO jobs (job_id, state, operation, params, range_base, ops_total,
                    fragment_size, max_concurrent, lifespan_ms, max_attempts, collect_results,
                    cursor, next_fragment, in_flight, progress_seq, adaptive, op_cost_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17)",
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
            ])?;
        Ok(())
    }

    fn update_job(&mut self, job: &JobRow) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "UPDATE jobs SET state = ?2, cursor = ?3, next_fragment = ?4, in_flight = ?5,
                    progress_seq = ?6, fragment_size = ?7, op_cost_ns = ?8
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
        let tx = self.conn.transaction()?;
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
