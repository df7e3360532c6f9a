//! Where the splitter keeps its state: the embedded SQLite file (the default), or PostgreSQL
//! (`BATCHQ_DATABASE_URL`), where every write is fenced by this replica's lease.

use crate::pg_store::{PgPruner, PgStore};
use crate::store::{
    OutboxMessage, SplitterStore, SplitterTx, SqlitePruner, SqliteStore, StoreError,
};

/// The splitter's store, whichever it is.
pub enum Store {
    Sqlite(SqliteStore),
    Pg(PgStore),
}

impl SplitterStore for Store {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn SplitterTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match self {
            Store::Sqlite(s) => s.transaction(f),
            Store::Pg(s) => s.transaction(f),
        }
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<OutboxMessage>, StoreError> {
        match self {
            Store::Sqlite(s) => s.outbox(limit),
            Store::Pg(s) => s.outbox(limit),
        }
    }

    fn outbox_confirmed(&mut self, seq: i64) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.outbox_confirmed(seq),
            Store::Pg(s) => s.outbox_confirmed(seq),
        }
    }
}

/// The retention's connection to the store, whichever it is.
pub enum Pruner {
    Sqlite(SqlitePruner),
    Pg(PgPruner),
}

impl Pruner {
    /// See [`SqlitePruner::expire`].
    pub fn expire(
        &mut self,
        ended_before_ms: i64,
        now_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        match self {
            Pruner::Sqlite(p) => p.expire(ended_before_ms, now_ms, limit),
            Pruner::Pg(p) => p.expire(ended_before_ms, now_ms, limit),
        }
    }

    /// See [`SqlitePruner::purge_some`].
    pub fn purge_some(&mut self, limit: u32) -> Result<Option<u64>, StoreError> {
        match self {
            Pruner::Sqlite(p) => p.purge_some(limit),
            Pruner::Pg(p) => p.purge_some(limit),
        }
    }
}
