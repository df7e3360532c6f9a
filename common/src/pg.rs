//! The PostgreSQL store's plumbing (`BATCHQ_DATABASE_URL`): a pool of tokio-postgres
//! connections, one schema per namespace and component, versioned migrations, and a
//! synchronous transaction API for the stores' traits.
//!
//! The splitter's and reducer's store traits are synchronous (SQLite is) and run on the
//! blocking pool (see [`crate::store::blocking`]). The PostgreSQL stores implement the same
//! traits: a [`PgTx`] drives the async driver from that blocking thread, one statement at a
//! time, with the runtime's handle. Nothing is nested: a blocking-pool thread is not inside
//! the runtime's executor, so `Handle::block_on` is allowed there.
//!
//! Each component keeps its tables in a schema of its own, `{namespace}_{component}`
//! (lower-cased, anything but `[a-z0-9_]` turned into `_`, with a hash of the namespace
//! appended when that changed it), so two namespaces share a database without sharing a row,
//! and the splitter's `jobs` is not the reducer's.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::runtime::Handle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::lease::Fence;
use crate::store::StoreError;

/// Connections one pool holds at most: a component's writer, its readers (status ticks,
/// `batchctl` answers) and its pruner.
pub const POOL_SIZE: usize = 8;
/// How long getting a connection may take before the attempt counts as failed (and is retried
/// by whoever asked, see [`crate::store::retry`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The tables of the leases, one row per role (see [`crate::lease`]). Every component's
/// schema holds one; created at start, beside the component's own migrations.
const LEASE_TABLE: &str = "CREATE TABLE IF NOT EXISTS batchq_lease (
    role TEXT PRIMARY KEY,
    holder TEXT,
    token BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    acquired_at TIMESTAMPTZ
)";

/// One component's PostgreSQL database: its pool and its schema.
#[derive(Clone)]
pub struct PgDatabase {
    pool: Pool,
    schema: String,
    handle: Handle,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// The schema of `component`'s tables in `namespace`.
pub fn schema_name(namespace: &str, component: &str) -> String {
    let clean: String = namespace
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    let mut name = if clean == namespace {
        clean
    } else {
        // `a.b` and `a_b` must not share a schema.
        format!("{clean}_{:08x}", fnv1a(namespace.as_bytes()) as u32)
    };
    // PostgreSQL truncates identifiers at 63 bytes; keep the component suffix whole.
    let suffix = format!("_{component}");
    if name.len() + suffix.len() > 63 {
        let hash = format!("_{:08x}", fnv1a(namespace.as_bytes()) as u32);
        name.truncate(63 - suffix.len() - hash.len());
        name.push_str(&hash);
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, 'n');
        name.truncate(63 - suffix.len());
    }
    name + &suffix
}

/// The name of the PostgreSQL sessions of `replica` of `component`, as the server keeps it
/// (`application_name`, cut to its 63 bytes).
pub fn application_name(component: &str, replica: &str) -> String {
    let mut name = if replica.is_empty() {
        format!("batchq-{component}")
    } else {
        format!("batchq-{component} {replica}")
    };
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl PgDatabase {
    /// A pool of connections to `url` whose every session works in `component`'s schema of
    /// `namespace`, and that ends a transaction left idle longer than `idle_transaction` (a
    /// paused process must not hold its locks for ever: see [`crate::lease`]). Connects
    /// lazily: this fails only on a malformed URL.
    pub fn new(
        url: &str,
        namespace: &str,
        component: &str,
        idle_transaction: Duration,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        Self::for_replica(url, namespace, component, "", idle_transaction, pool_size)
    }

    /// [`PgDatabase::new`] for one replica of `component`: its sessions are named
    /// [`application_name`]`(component, replica)` (whatever the URL says), so that a replica
    /// taking over the lease can end the sessions of the one whose lease expired (see
    /// [`crate::lease`]).
    pub fn for_replica(
        url: &str,
        namespace: &str,
        component: &str,
        replica: &str,
        idle_transaction: Duration,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Pool(format!("BATCHQ_DATABASE_URL is not a postgres:// URL: {e}"))
        })?;
        let schema = schema_name(namespace, component);
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(&format!(
            " -c search_path={schema} -c idle_in_transaction_session_timeout={}",
            idle_transaction.as_millis().max(1)
        ));
        config.options(options.trim());
        if !replica.is_empty() || config.get_application_name().is_none() {
            config.application_name(application_name(component, replica));
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Self {
            pool,
            schema,
            handle: Handle::current(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Creates the schema, brings it to `migrations.len()` and creates the lease table, under
    /// an advisory lock so replicas starting together do not race. Returns the version the
    /// schema had before. A schema recording a newer version is refused, untouched.
    pub async fn migrate(&self, migrations: &[&str]) -> Result<i64, StoreError> {
        let mut client = self.client().await?;
        let lock = fnv1a(self.schema.as_bytes()) as i64;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&lock])
            .await?;
        let outcome = self.migrate_locked(&mut client, migrations).await;
        // Session locks end with the session too; unlock now, the connection goes back.
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&lock])
            .await;
        let found = outcome?;
        unlocked?;
        Ok(found)
    }

    async fn migrate_locked(
        &self,
        client: &mut deadpool_postgres::Object,
        migrations: &[&str],
    ) -> Result<i64, StoreError> {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
            .await?;
        let supported = migrations.len() as i64;
        let found = self.version(client).await?;
        if found > supported {
            return Err(StoreError::NewerSchema { found, supported });
        }
        let migrations = migrations
            .iter()
            .enumerate()
            .map(|(i, sql)| {
                refinery::Migration::unapplied(&format!("V{}__batchq_schema", i + 1), sql)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        let plain: &mut tokio_postgres::Client = client.as_mut();
        refinery::Runner::new(&migrations)
            .set_grouped(true)
            .set_abort_divergent(true)
            .set_abort_missing(true)
            .run_async(plain)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        client.batch_execute(LEASE_TABLE).await?;
        if found < supported {
            tracing::info!(schema = %self.schema, from = found, to = supported, "store schema upgraded");
        }
        Ok(found)
    }

    /// The schema version recorded: 0 for a new schema.
    pub async fn version(&self, client: &tokio_postgres::Client) -> Result<i64, StoreError> {
        let table = format!("{}.{}", self.schema, crate::migrate::HISTORY_TABLE);
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await?
            .get(0);
        if exists.is_none() {
            return Ok(0);
        }
        let version: Option<i32> = client
            .query_one(&format!("SELECT MAX(version) FROM {table}"), &[])
            .await?
            .get(0);
        Ok(i64::from(version.unwrap_or(0)))
    }

    /// Runs `f` in one transaction on this (blocking-pool) thread, and commits it. With a
    /// `fence`, the transaction first checks that this replica still holds its role's lease,
    /// and holds the check until it commits (see [`Fence::check`]): a replica that lost the
    /// lease commits nothing and gets [`StoreError::Fenced`].
    pub fn transaction<R>(
        &self,
        fence: Option<&Fence>,
        f: impl FnOnce(&mut PgTx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let handle = &self.handle;
        let mut client = handle.block_on(self.client())?;
        let tx = handle.block_on(client.transaction())?;
        if let Some(fence) = fence {
            handle.block_on(fence.check(&tx))?;
        }
        let mut pg = PgTx { tx, handle };
        let value = f(&mut pg)?;
        handle.block_on(pg.tx.commit())?;
        Ok(value)
    }

    /// Runs `f` in one read-only transaction on this (blocking-pool) thread: what a query
    /// reads is one consistent snapshot. Unfenced: a standby may read too.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&mut PgTx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let handle = &self.handle;
        let mut client = handle.block_on(self.client())?;
        let tx = handle.block_on(
            client
                .build_transaction()
                .read_only(true)
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .start(),
        )?;
        let mut pg = PgTx { tx, handle };
        let value = f(&mut pg)?;
        handle.block_on(pg.tx.commit())?;
        Ok(value)
    }
}

/// One open transaction, driven from a blocking-pool thread. Statements are prepared once per
/// connection and cached.
pub struct PgTx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    handle: &'a Handle,
}

/// Parameters of a statement.
pub type Params<'p> = [&'p (dyn ToSql + Sync)];

impl<'a> PgTx<'a> {
    async fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        Ok(self.tx.prepare_cached(sql).await?)
    }

    /// Runs one statement; the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
        self.handle.block_on(async {
            let statement = self.statement(sql).await?;
            Ok(self.tx.execute(&statement, params).await?)
        })
    }

    pub fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        self.handle.block_on(async {
            let statement = self.statement(sql).await?;
            Ok(self.tx.query(&statement, params).await?)
        })
    }

    pub fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, StoreError> {
        self.handle.block_on(async {
            let statement = self.statement(sql).await?;
            Ok(self.tx.query_opt(&statement, params).await?)
        })
    }

    pub fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<Row, StoreError> {
        self.handle.block_on(async {
            let statement = self.statement(sql).await?;
            Ok(self.tx.query_one(&statement, params).await?)
        })
    }

    /// Runs statements without parameters (several, `;`-separated, allowed).
    pub fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.handle
            .block_on(async { Ok(self.tx.batch_execute(sql).await?) })
    }

    /// Runs `f` with the transaction itself, for what the helpers above do not cover (`COPY`,
    /// pipelined statements): `f`'s future is driven to its end on this thread.
    pub fn with<R>(
        &mut self,
        f: impl AsyncFnOnce(&tokio_postgres::Transaction<'a>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx: &tokio_postgres::Transaction<'a> = &self.tx;
        self.handle.block_on(f(tx))
    }
}

/// A u64 as a BIGINT. A value past `i64::MAX` is an error, not another number (see
/// [`crate::store::to_i64`]).
pub fn big(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} is past the largest BIGINT")))
}

/// A BIGINT column batchq only writes non-negative values into, as a u64.
pub fn get_u64(row: &Row, column: usize) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(column)?;
    u64::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("column {column} holds {v}, a negative count")))
}

/// Deletes up to `limit` rows of one deleted job (a tombstone not yet marked `purged`) in one
/// fenced transaction: `statements` in order, each `DELETE … WHERE job_id = $1 … LIMIT $2`
/// given what is left of the budget; when all have deleted less than their budget, the
/// tombstone is marked purged. `None` when no deleted job has rows left. What
/// [`crate::store::purge_tombstoned`] does for SQLite.
pub fn purge_tombstoned(
    db: &PgDatabase,
    fence: Option<&Fence>,
    statements: &[&str],
    limit: u32,
) -> Result<Option<u64>, StoreError> {
    db.transaction(fence, |tx| {
        let Some(row) = tx.query_opt(
            "SELECT job_id FROM tombstones WHERE NOT purged ORDER BY job_id LIMIT 1",
            &[],
        )?
        else {
            return Ok(None);
        };
        let job_id: String = row.try_get(0)?;
        let limit = u64::from(limit.max(1));
        let mut deleted = 0u64;
        for sql in statements {
            let budget = big(limit - deleted)?;
            deleted += tx.execute(sql, &[&job_id, &budget])?;
            if deleted >= limit {
                break;
            }
        }
        if deleted < limit {
            tx.execute(
                "UPDATE tombstones SET purged = true WHERE job_id = $1",
                &[&job_id],
            )?;
        }
        Ok(Some(deleted))
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    }
}

/// Whether a PostgreSQL error may pass by itself: the connection (the server restarting, a
/// failover, a network fault), a full disk, too many connections, a serialization failure or
/// deadlock (the transaction is run again), a lock or idle timeout. A constraint or syntax
/// error never passes.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed.
        return true;
    };
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "40" | "58")
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
}

/// A short name of a PostgreSQL error's cause.
pub fn cause(e: &tokio_postgres::Error) -> &'static str {
    let Some(code) = e.code() else {
        return "database unreachable";
    };
    match &code.code()[..2] {
        "08" => "database unreachable",
        "53" if *code == SqlState::DISK_FULL => "disk full",
        "53" => "database out of resources",
        "57" => "database shutting down",
        "40" => "transaction conflict",
        "58" => "I/O error",
        _ if *code == SqlState::READ_ONLY_SQL_TRANSACTION => "database read-only",
        _ => "database error",
    }
}

/// The error with what the server said, which tokio-postgres's own Display leaves out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers_and_distinct() {
        assert_eq!(schema_name("batchq", "splitter"), "batchq_splitter");
        let dotted = schema_name("a.b", "reducer");
        let underscored = schema_name("a_b", "reducer");
        assert_ne!(dotted, underscored);
        assert!(
            dotted.starts_with("a_b_") && dotted.ends_with("_reducer"),
            "{dotted}"
        );
        let long = schema_name(&"x".repeat(100), "splitter");
        assert!(long.len() <= 63 && long.ends_with("_splitter"), "{long}");
        assert_ne!(long, schema_name(&"x".repeat(101), "splitter"));
        let digit = schema_name("9lives", "reducer");
        assert!(digit.starts_with('n'), "{digit}");
        for name in [dotted, long, digit] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            );
        }
    }
}
