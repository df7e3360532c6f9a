//! Where the reducer keeps its state: the embedded SQLite file (the default), or PostgreSQL
//! (`BATCHQ_DATABASE_URL`), where every write is fenced by this replica's lease.

use std::path::PathBuf;

use common::contract::{JobState, JobStatus, ResultLine};
use common::lease::Fence;
use common::pg::PgDatabase;
use common::wire::{FailuresPage, JobDetail, JobsPage, Removal, Tombstone};

use crate::pg_store::{PgPruner, PgQueries, PgStore};
use crate::store::{
    Burial, JobsFilter, ReducerQueries, ReducerStore, ReducerTx, SqlitePruner, SqliteQueries,
    SqliteStore, StoreError,
};

/// Where the store is: what the reducer opens its connections to.
#[derive(Debug, Clone)]
pub enum Place {
    Sqlite(PathBuf),
    /// The database, and the fence of this replica's term as the active one.
    Pg(PgDatabase, Fence),
}

impl Place {
    pub fn store(&self) -> Result<Store, StoreError> {
        Ok(match self {
            Place::Sqlite(path) => Store::Sqlite(SqliteStore::open(path)?),
            Place::Pg(db, fence) => Store::Pg(PgStore::new(db.clone(), Some(fence.clone()))),
        })
    }

    /// A connection for reads (status ticks, `batchctl`), which never waits behind a commit.
    pub fn queries(&self) -> Result<Queries, StoreError> {
        Ok(match self {
            Place::Sqlite(path) => Queries::Sqlite(SqliteQueries::open(path)?),
            Place::Pg(db, _) => Queries::Pg(PgQueries::new(db.clone())),
        })
    }

    pub fn pruner(&self) -> Result<Pruner, StoreError> {
        Ok(match self {
            Place::Sqlite(path) => Pruner::Sqlite(SqlitePruner::open(path)?),
            Place::Pg(db, fence) => Pruner::Pg(PgPruner::new(db.clone(), Some(fence.clone()))),
        })
    }

    /// For the log line at start.
    pub fn describe(&self) -> String {
        match self {
            Place::Sqlite(path) => path.display().to_string(),
            Place::Pg(db, _) => format!("postgresql schema {}", db.schema()),
        }
    }
}

/// The reducer's store, whichever it is.
pub enum Store {
    Sqlite(SqliteStore),
    Pg(PgStore),
}

impl ReducerStore for Store {
    fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut dyn ReducerTx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match self {
            Store::Sqlite(s) => s.transaction(f),
            Store::Pg(s) => s.transaction(f),
        }
    }
}

/// The read connection, whichever store it reads.
pub enum Queries {
    Sqlite(SqliteQueries),
    Pg(PgQueries),
}

impl Queries {
    fn get(&mut self) -> &mut dyn ReducerQueries {
        match self {
            Queries::Sqlite(q) => q,
            Queries::Pg(q) => q,
        }
    }
}

impl ReducerQueries for Queries {
    fn status(&mut self, job_id: &str) -> Result<Option<JobStatus>, StoreError> {
        self.get().status(job_id)
    }

    fn tombstone(&mut self, job_id: &str) -> Result<Option<Tombstone>, StoreError> {
        self.get().tombstone(job_id)
    }

    fn recent_jobs(&mut self, limit: u32) -> Result<Vec<JobStatus>, StoreError> {
        self.get().recent_jobs(limit)
    }

    fn results(
        &mut self,
        job_id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<ResultLine>, StoreError> {
        self.get().results(job_id, from, limit)
    }

    fn active_jobs(&mut self) -> Result<Vec<JobStatus>, StoreError> {
        self.get().active_jobs()
    }

    fn jobs_by_state(&mut self) -> Result<Vec<(JobState, u64)>, StoreError> {
        self.get().jobs_by_state()
    }

    fn jobs_page(
        &mut self,
        filter: &JobsFilter,
        offset: u64,
        limit: u32,
    ) -> Result<JobsPage, StoreError> {
        self.get().jobs_page(filter, offset, limit)
    }

    fn failures(
        &mut self,
        job_id: &str,
        search: Option<&str>,
        offset: u64,
        limit: u32,
    ) -> Result<FailuresPage, StoreError> {
        self.get().failures(job_id, search, offset, limit)
    }

    fn job_detail(&mut self, job_id: &str) -> Result<Option<JobDetail>, StoreError> {
        self.get().job_detail(job_id)
    }
}

/// The retention's connection, whichever store it prunes.
pub enum Pruner {
    Sqlite(SqlitePruner),
    Pg(PgPruner),
}

impl Pruner {
    /// See [`SqlitePruner::expired`].
    pub fn expired(&mut self, ended_before_ms: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        match self {
            Pruner::Sqlite(p) => p.expired(ended_before_ms, limit),
            Pruner::Pg(p) => p.expired(ended_before_ms, limit),
        }
    }

    /// See [`SqlitePruner::bury`].
    pub fn bury(
        &mut self,
        job_id: &str,
        how: Removal,
        now_ms: i64,
        retention_ms: Option<i64>,
    ) -> Result<Burial, StoreError> {
        match self {
            Pruner::Sqlite(p) => p.bury(job_id, how, now_ms, retention_ms),
            Pruner::Pg(p) => p.bury(job_id, how, now_ms, retention_ms),
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
