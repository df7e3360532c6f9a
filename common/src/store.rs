//! What the splitter's and the reducer's stores share: one error shape that says whether a
//! failed store operation may pass by itself (a full disk, an I/O error, a locked or
//! unreachable database) or never will (a malformed record, a schema from a newer batchq).
//!
//! A service holds the unacknowledged batch and retries a transient fault in the process
//! (see [`retry`]): redelivering the batch by restarting would count against
//! the broker's patience and gain nothing.

use rusqlite::ErrorCode;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("malformed record: {0}")]
    Corrupt(String),
    #[error("cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the store's schema version {found} is newer than this binary knows ({supported}): \
         it was written by a newer batchq; run that version or restore a backup"
    )]
    NewerSchema { found: i64, supported: i64 },
    #[error("schema upgrade failed: {0}")]
    Migration(String),
    /// PostgreSQL (`BATCHQ_DATABASE_URL`) answered with an error, or the connection failed.
    #[error("postgresql: {}", crate::pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No pooled PostgreSQL connection could be had (the server is down or unreachable).
    #[error("postgresql connection: {0}")]
    Pool(String),
    /// This replica no longer holds its role's lease: another replica took over, and nothing
    /// this one was about to commit was committed. It steps down.
    #[error("lost the {role} lease (fencing token {token} is no longer current)")]
    Fenced { role: String, token: i64 },
}

impl StoreError {
    /// Whether trying the same operation again later may succeed without anyone changing the
    /// program: the disk may get space, the lock may be released, the volume may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => sqlite_is_transient(e),
            // A data directory that cannot be created now (a volume not mounted yet, a
            // permission being fixed) may be creatable later.
            StoreError::Io { .. } => true,
            StoreError::Postgres(e) => crate::pg::is_transient(e),
            StoreError::Pool(_) => true,
            StoreError::Corrupt(_)
            | StoreError::NewerSchema { .. }
            | StoreError::Migration(_)
            | StoreError::Fenced { .. } => false,
        }
    }

    /// A short name of the cause, for a log line, a metric label and `batchctl health`.
    pub fn cause(&self) -> &'static str {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                ErrorCode::DiskFull => "disk full",
                ErrorCode::SystemIoFailure => "I/O error",
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => "database locked",
                ErrorCode::CannotOpen => "cannot open the database",
                ErrorCode::ReadOnly => "database read-only",
                ErrorCode::OutOfMemory => "out of memory",
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => "database corrupt",
                _ => "database error",
            },
            StoreError::Sqlite(_) => "database error",
            StoreError::Io { .. } => "cannot create the data directory",
            StoreError::Corrupt(_) => "malformed record",
            StoreError::NewerSchema { .. } => "newer schema",
            StoreError::Migration(_) => "schema upgrade failed",
            StoreError::Postgres(e) => crate::pg::cause(e),
            StoreError::Pool(_) => "database unreachable",
            StoreError::Fenced { .. } => "lost the lease",
        }
    }
}

fn sqlite_is_transient(error: &rusqlite::Error) -> bool {
    match error {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
        ),
        _ => false,
    }
}

/// A u64 bound as an SQLite INTEGER, which is an i64. A value past `i64::MAX` fails the
/// statement instead of being stored as another number: a count never changes silently on
/// its way into the store. (Jobs hold at most 2^53 − 1 operations, so no count gets there.)
pub struct SqlU64(u64);

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

pub fn to_i64(v: u64) -> SqlU64 {
    SqlU64(v)
}

/// Reads an INTEGER column written through [`to_i64`]. batchq never writes a negative one
/// there, so one is an error, not a count near 2^64.
pub fn get_u64(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(column)?;
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Integer, e.into())
    })
}

/// Deletes up to `limit` rows of one deleted job (one whose tombstone is not yet marked
/// `purged`) in one transaction: `statements` in order, each `DELETE ... WHERE job_id = ?1
/// ... LIMIT ?2` given what is left of the budget. A statement that deletes less than its
/// budget has emptied its table of the job; when all have, the tombstone is marked purged.
/// `None` when no deleted job has rows left. Short transactions: a writer waiting behind one
/// (busy_timeout) never waits long.
pub fn purge_tombstoned(
    conn: &mut rusqlite::Connection,
    statements: &[&str],
    limit: u32,
) -> Result<Option<u64>, StoreError> {
    use rusqlite::OptionalExtension;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let job_id: Option<String> = tx
        .prepare_cached("SELECT job_id FROM tombstones WHERE purged = 0 LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let Some(job_id) = job_id else {
        return Ok(None);
    };
    let limit = u64::from(limit.max(1));
    let mut deleted = 0u64;
    for sql in statements {
        let budget = limit - deleted;
        deleted += tx
            .prepare_cached(sql)?
            .execute(rusqlite::params![job_id, to_i64(budget)])? as u64;
        if deleted >= limit {
            break;
        }
    }
    if deleted < limit {
        tx.prepare_cached("UPDATE tombstones SET purged = 1 WHERE job_id = ?1")?
            .execute([&job_id])?;
    }
    tx.commit()?;
    Ok(Some(deleted))
}

/// The state of one component's store, shared with whoever reports health: the faults its
/// tasks (an intake loop, an outbox pump) are waiting out.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth {
    faults: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, StoreFault>>>,
}

/// A transient fault a task is waiting out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreFault {
    /// Short cause (`disk full`, `database locked`, ...).
    pub cause: String,
    /// The last error in full.
    pub error: String,
    /// When the fault began (ms since the epoch).
    pub since_ms: i64,
    /// Failed attempts so far.
    pub attempts: u64,
}

impl StoreHealth {
    /// The longest-lasting fault being waited out, if any.
    pub fn fault(&self) -> Option<StoreFault> {
        self.lock().values().min_by_key(|f| f.since_ms).cloned()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<&'static str, StoreFault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a failed attempt of `task`; says so in a WARN line when its fault begins or its
    /// cause changes, not at every attempt.
    fn failed(&self, component: &str, task: &'static str, error: &StoreError) {
        metrics::counter!("batchq_store_errors_total", "component" => component.to_owned(), "cause" => error.cause())
            .increment(1);
        let mut faults = self.lock();
        match faults.get_mut(task) {
            Some(f) if f.cause == error.cause() => {
                f.attempts += 1;
                f.error = error.to_string();
            }
            _ => {
                tracing::warn!(
                    %component,
                    %task,
                    cause = error.cause(),
                    error = %error,
                    "store fault: holding the unacknowledged messages and retrying until it passes"
                );
                faults.insert(
                    task,
                    StoreFault {
                        cause: error.cause().to_owned(),
                        error: error.to_string(),
                        since_ms: crate::timefmt::now_ms(),
                        attempts: 1,
                    },
                );
            }
        }
    }

    fn succeeded(&self, component: &str, task: &'static str) {
        let mut faults = self.lock();
        if let Some(f) = faults.remove(task) {
            tracing::warn!(
                %component,
                %task,
                cause = %f.cause,
                attempts = f.attempts,
                lasted_ms = crate::timefmt::now_ms() - f.since_ms,
                "store fault passed; carrying on"
            );
        }
    }
}

/// Runs `f` on tokio's blocking pool, where store work belongs (SQLite blocks). A panic in it
/// goes on unwinding in the caller, which may set the message at fault aside.
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(StoreError::Corrupt("the store task was cancelled".into())),
        },
    }
}

/// Runs `f` on `shared`, locked, on the blocking pool (see [`blocking`]). A lock poisoned by
/// an earlier panic is taken over: SQLite rolled that transaction back.
pub async fn blocking_locked<S: Send + 'static, R: Send + 'static>(
    shared: &std::sync::Arc<std::sync::Mutex<S>>,
    f: impl FnOnce(&mut S) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let shared = std::sync::Arc::clone(shared);
    blocking(move || {
        let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    })
    .await
}

const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest pause between two attempts at a store operation that failed transiently.
pub const MAX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `attempt` until it succeeds, fails for good, or `shutdown` fires (then the last
/// error is returned). Transient faults are retried with a doubling pause (100 ms to 5 s),
/// noted in `health` under `task`, in `batchq_store_errors_total` and, once per change, in
/// the log.
pub async fn retry<T, F, Fut>(
    component: &str,
    task: &'static str,
    health: &StoreHealth,
    shutdown: &tokio_util::sync::CancellationToken,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = FIRST_RETRY;
    loop {
        match attempt().await {
            Ok(value) => {
                health.succeeded(component, task);
                return Ok(value);
            }
            Err(e) if e.is_transient() => {
                health.failed(component, task, &e);
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(e),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(MAX_RETRY);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::os::raw::c_int) -> StoreError {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn a_full_disk_and_a_locked_database_may_pass() {
        assert!(failure(rusqlite::ffi::SQLITE_FULL).is_transient());
        assert_eq!(failure(rusqlite::ffi::SQLITE_FULL).cause(), "disk full");
        assert!(failure(rusqlite::ffi::SQLITE_IOERR).is_transient());
        assert!(failure(rusqlite::ffi::SQLITE_BUSY).is_transient());
        assert!(failure(rusqlite::ffi::SQLITE_CANTOPEN).is_transient());
    }

    #[test]
    fn corruption_and_a_newer_schema_never_pass() {
        assert!(!failure(rusqlite::ffi::SQLITE_CORRUPT).is_transient());
        assert!(!failure(rusqlite::ffi::SQLITE_CONSTRAINT).is_transient());
        assert!(!StoreError::Corrupt("x".into()).is_transient());
        assert!(
            !StoreError::NewerSchema {
                found: 9,
                supported: 2
            }
            .is_transient()
        );
    }

    #[tokio::test]
    async fn retry_waits_out_a_full_disk_and_reports_it_while_it_lasts() {
        let health = StoreHealth::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut failures_left = 2;
        let seen = health.clone();
        let value = retry("test", "task", &health, &shutdown, || {
            let outcome = if failures_left > 0 {
                failures_left -= 1;
                if failures_left == 0 {
                    // The second failure is still the same fault, seen by a reader meanwhile.
                    let fault = seen.fault().expect("a fault is reported while it lasts");
                    assert_eq!((fault.cause.as_str(), fault.attempts), ("disk full", 1));
                }
                Err(failure(rusqlite::ffi::SQLITE_FULL))
            } else {
                Ok(42)
            };
            async move { outcome }
        })
        .await
        .expect("the fault passes");
        assert_eq!(value, 42);
        assert_eq!(health.fault(), None, "a passed fault is no longer reported");
    }

    #[tokio::test]
    async fn retry_gives_a_lasting_error_back_at_once() {
        let health = StoreHealth::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut attempts = 0;
        let outcome: Result<(), _> = retry("test", "task", &health, &shutdown, || {
            attempts += 1;
            async { Err(StoreError::Corrupt("bad row".into())) }
        })
        .await;
        assert!(matches!(outcome, Err(StoreError::Corrupt(_))));
        assert_eq!(attempts, 1);
        assert_eq!(health.fault(), None);
    }
}
