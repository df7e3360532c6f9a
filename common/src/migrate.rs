//! Schema versions of the stores, kept by `refinery`.
//!
//! Each store lists its migrations in order (migration `n` is `migrations[n - 1]`); refinery
//! records what it applied in the table `refinery_schema_history` (version, name, time,
//! checksum). At start the pending migrations run grouped in one transaction, so a crash or a
//! failed migration leaves the store as it was. A store without the table is one written
//! before versions existed (batchq 0.1): it holds migration 1's tables already, which is why
//! migration 1 only creates what is missing. A store that records a version above what this
//! binary knows was written by a newer batchq and is refused, untouched. refinery also refuses
//! a store whose applied migration differs from the binary's (another name or checksum): the
//! SQL of a released migration never changes; a change is a new migration.
//!
//! The same runner drives a PostgreSQL store through refinery's `tokio-postgres` driver.

use refinery::{Migration, Runner};
use rusqlite::{Connection, OptionalExtension};

use crate::store::StoreError;

/// Where refinery keeps the applied versions.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

/// Brings the store on `conn` to `migrations.len()`. Returns the version it had before.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<i64, StoreError> {
    let supported = migrations.len() as i64;
    let found = version(conn)?;
    if found > supported {
        return Err(StoreError::NewerSchema { found, supported });
    }
    let migrations = migrations
        .iter()
        .enumerate()
        .map(|(i, sql)| Migration::unapplied(&format!("V{}__batchq_schema", i + 1), sql))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    Runner::new(&migrations)
        .set_grouped(true)
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run(conn)
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    if found < supported {
        tracing::info!(from = found, to = supported, "store schema upgraded");
    }
    Ok(found)
}

/// The schema version a store holds: 0 for a new store or one written before versions.
pub fn version(conn: &Connection) -> Result<i64, StoreError> {
    let recorded: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [HISTORY_TABLE],
            |r| r.get(0),
        )
        .optional()?;
    if recorded.is_none() {
        return Ok(0);
    }
    let version: Option<i64> = conn.query_row(
        &format!("SELECT MAX(version) FROM {HISTORY_TABLE}"),
        [],
        |r| r.get(0),
    )?;
    Ok(version.unwrap_or(0))
}

/// Records `version` as applied without running anything: what a newer batchq leaves in a
/// store. For tests and for tools that stand in for one.
pub fn stamp(conn: &Connection, version: i64) -> Result<(), StoreError> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {HISTORY_TABLE}(
             version INTEGER PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));"
    ))?;
    conn.execute(
        &format!(
            "INSERT INTO {HISTORY_TABLE} (version, name, applied_on, checksum)
             VALUES (?1, ?2, '', '0')"
        ),
        rusqlite::params![version, format!("V{version}__batchq_schema")],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "CREATE TABLE IF NOT EXISTS t (a INTEGER);";
    const V2: &str = "ALTER TABLE t ADD COLUMN b INTEGER;";

    #[test]
    fn upgrades_a_store_without_a_version_and_keeps_its_rows() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        conn.execute_batch("CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (7);")
            .expect("an old store");
        assert_eq!(migrate(&mut conn, &[V1, V2]).expect("upgraded"), 0);
        assert_eq!(version(&conn).expect("version"), 2);
        let row: (i64, Option<i64>) = conn
            .query_row("SELECT a, b FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("the old row");
        assert_eq!(row, (7, None));
        // Opening again changes nothing.
        assert_eq!(migrate(&mut conn, &[V1, V2]).expect("no-op"), 2);
    }

    #[test]
    fn a_failed_migration_leaves_the_store_as_it_was() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&mut conn, &[V1]).expect("version 1");
        let error = migrate(&mut conn, &[V1, V2, "ALTER TABLE nope ADD COLUMN c;"])
            .expect_err("migration 3 fails");
        assert!(matches!(&error, StoreError::Migration(_)), "{error}");
        assert_eq!(version(&conn).expect("version"), 1, "rolled back");
        let columns: i64 = conn
            .query_row("SELECT COUNT(*) FROM pragma_table_info('t')", [], |r| {
                r.get(0)
            })
            .expect("columns");
        assert_eq!(columns, 1, "migration 2 rolled back with it");
    }

    #[test]
    fn a_newer_store_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&mut conn, &[V1, V2]).expect("version 2");
        stamp(&conn, 9).expect("a newer batchq's version");
        let error = migrate(&mut conn, &[V1, V2]).expect_err("refused");
        assert!(matches!(
            error,
            StoreError::NewerSchema {
                found: 9,
                supported: 2
            }
        ));
        assert!(!error.is_transient());
        assert_eq!(version(&conn).expect("version"), 9);
    }

    #[test]
    fn a_changed_migration_is_refused() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&mut conn, &[V1]).expect("version 1");
        let error = migrate(&mut conn, &["CREATE TABLE IF NOT EXISTS u (a INTEGER);"])
            .expect_err("a released migration never changes");
        assert!(matches!(error, StoreError::Migration(_)), "{error}");
    }
}
