//! Schema versions of the embedded SQLite stores.
//!
//! A store records its version in SQLite's `user_version` (0 on a store written before
//! versions existed: those hold migration 1's tables already, which is why migration 1 only
//! creates what is missing). At start the pending migrations run in one transaction, each
//! followed by its version, so a crash half-way leaves the store as it was; a store of a
//! version above what the binary knows is refused, never touched.
//!
//! `rusqlite_migration` and `refinery` do exactly this, but no release of either builds with
//! rusqlite 0.43 (they pin 0.40 and ≤ 0.41), so these few lines stand in until one does.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// Brings the store on `conn` to `migrations.len()`: migration `n` (1-based) is
/// `migrations[n - 1]`, SQL run as one batch. Returns the version the store had before.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<i64, StoreError> {
    let supported = migrations.len() as i64;
    // IMMEDIATE: a second process opening the same store waits here instead of upgrading it
    // at the same time.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(StoreError::NewerSchema { found, supported });
    }
    if found < 0 {
        return Err(StoreError::Migration(format!(
            "the store's schema version {found} is not one batchq writes"
        )));
    }
    for (version, sql) in migrations.iter().enumerate().skip(found as usize) {
        let version = version as i64 + 1;
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Migration(format!("migration {version}: {e}")))?;
        // PRAGMA takes no parameters; `version` is an integer we computed.
        tx.execute_batch(&format!("PRAGMA user_version = {version}"))
            .map_err(|e| StoreError::Migration(format!("recording version {version}: {e}")))?;
    }
    tx.commit()
        .map_err(|e| StoreError::Migration(format!("commit: {e}")))?;
    if found < supported {
        tracing::info!(from = found, to = supported, "store schema upgraded");
    }
    Ok(found)
}

/// The schema version a store holds (0 for a new or pre-version store).
pub fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
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
        assert!(
            matches!(&error, StoreError::Migration(m) if m.starts_with("migration 3: ")),
            "{error}"
        );
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
        conn.execute_batch("PRAGMA user_version = 9")
            .expect("newer");
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
}
