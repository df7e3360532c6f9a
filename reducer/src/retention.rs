//! Retention of finished jobs: their status, results, fragments and unpublished metrics are
//! deleted `BATCHQ_RETENTION` after they ended, and at once by `batchctl delete`. Each
//! deleted job leaves a small tombstone, so asking for it says it expired or was deleted.
//!
//! The work runs on a connection of its own (not the fold loop's) in short transactions of
//! at most [`ROWS_PER_TRANSACTION`] rows, yielding between them: SQLite has one writer, and
//! a commit of the fold loop waits (busy_timeout) at most one such transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::retention::Retention;
use common::timefmt::now_ms;
use common::wire::Removal;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ReducerError;
use crate::backend::Pruner;
use crate::store::Burial;

/// How often finished jobs are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most rows deleted in one transaction.
pub const ROWS_PER_TRANSACTION: u32 = 2000;
/// Pause between two purge transactions.
const PAUSE_BETWEEN_TRANSACTIONS: Duration = Duration::from_millis(10);
/// Most jobs looked up per query for expiry.
const JOBS_PER_ROUND: u32 = 100;

/// The reducer's deleting of finished jobs, shared by its sweep task and the RPC's `delete`.
#[derive(Clone)]
pub struct Pruning {
    pruner: Arc<Mutex<Pruner>>,
    /// Wakes the sweep task to purge a job `batchctl delete` just buried.
    wake: Arc<Notify>,
    retention: Retention,
}

impl Pruning {
    /// Works through `pruner`, a connection of its own to the store (created and migrated
    /// already).
    pub fn new(pruner: Pruner, retention: Retention) -> Self {
        Self {
            pruner: Arc::new(Mutex::new(pruner)),
            wake: Arc::new(Notify::new()),
            retention,
        }
    }

    /// Runs `f` on the pruner's connection on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Pruner) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, ReducerError> {
        Ok(common::store::blocking_locked(&self.pruner, f).await?)
    }

    /// `batchctl delete`: buries a finished job now (the caller is on the blocking pool);
    /// its rows are purged by the sweep task, woken for it.
    pub fn delete_now(&self, job_id: &str) -> Result<Burial, crate::store::StoreError> {
        let burial = self.pruner.lock().unwrap_or_else(|p| p.into_inner()).bury(
            job_id,
            Removal::Deleted,
            now_ms(),
            None,
        )?;
        if burial == Burial::Buried {
            tracing::info!(%job_id, "job deleted on request");
            self.wake.notify_one();
        }
        Ok(burial)
    }

    /// Every [`SWEEP_EVERY`] (or when woken), expires what the retention says and purges
    /// what was buried, until `shutdown`. A failed sweep is logged and tried again.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(SWEEP_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
            }
            match self.sweep(&shutdown).await {
                Ok((0, 0)) => {}
                Ok((jobs, rows)) => {
                    tracing::info!(jobs, rows, retention = %self.retention, "deleted finished jobs")
                }
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again"),
            }
        }
    }

    /// One sweep: buries the jobs that ended more than the retention ago, then deletes the
    /// rows of buried jobs. Returns (jobs expired, rows deleted).
    pub async fn sweep(&self, shutdown: &CancellationToken) -> Result<(u64, u64), ReducerError> {
        let mut expired = 0;
        if let Some(period_ms) = self.retention.period_ms() {
            loop {
                let cutoff = now_ms().saturating_sub(period_ms);
                let jobs = self
                    .blocking(move |p| p.expired(cutoff, JOBS_PER_ROUND))
                    .await?;
                for job_id in &jobs {
                    let job_id = job_id.clone();
                    let burial = self
                        .blocking(move |p| {
                            p.bury(&job_id, Removal::Expired, now_ms(), Some(period_ms))
                        })
                        .await?;
                    expired += u64::from(burial == Burial::Buried);
                }
                if jobs.len() < JOBS_PER_ROUND as usize || shutdown.is_cancelled() {
                    break;
                }
            }
        }
        let mut rows = 0;
        while !shutdown.is_cancelled() {
            match self
                .blocking(|p| p.purge_some(ROWS_PER_TRANSACTION))
                .await?
            {
                None => break,
                Some(n) => rows += n,
            }
            // A pause, so that a commit of the fold loop that waited behind this transaction
            // (SQLite's busy handler polls) gets the lock before the next one.
            tokio::time::sleep(PAUSE_BETWEEN_TRANSACTIONS).await;
        }
        Ok((expired, rows))
    }
}
