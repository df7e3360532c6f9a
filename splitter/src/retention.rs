//! Retention of finished jobs' bookkeeping: a job that stopped dispatching (finished,
//! rejected, or cancelled or failed with fragments that never came back) is deleted
//! `BATCHQ_RETENTION` after it ended, with its items and the fragments still out. It leaves a
//! tombstone, so its id stays known and a re-submitted JobSpec stays a no-op.
//!
//! The work runs on a connection of its own in short transactions of at most
//! [`ROWS_PER_TRANSACTION`] rows, pausing between them: a commit of the intake waits
//! (busy_timeout) at most one such transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::retention::Retention;
use common::timefmt::now_ms;
use tokio_util::sync::CancellationToken;

use crate::SplitterError;
use crate::backend::Pruner;
use crate::store::StoreError;

/// How often ended jobs are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most rows deleted in one transaction.
pub const ROWS_PER_TRANSACTION: u32 = 2000;
/// Most jobs deleted in one transaction.
const JOBS_PER_TRANSACTION: u32 = 100;
/// Pause between two transactions, so that a commit of the intake that waited behind one
/// (SQLite's busy handler polls) gets the lock before the next.
const PAUSE_BETWEEN_TRANSACTIONS: Duration = Duration::from_millis(10);

/// The splitter's deleting of ended jobs.
pub struct Pruning {
    pruner: Arc<Mutex<Pruner>>,
    retention: Retention,
}

impl Pruning {
    /// Works through `pruner`, a connection of its own to the store (created and migrated
    /// already).
    pub fn new(pruner: Pruner, retention: Retention) -> Self {
        Self {
            pruner: Arc::new(Mutex::new(pruner)),
            retention,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Pruner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SplitterError> {
        Ok(common::store::blocking_locked(&self.pruner, f).await?)
    }

    /// Every [`SWEEP_EVERY`], deletes what the retention says, until `shutdown`. Nothing to
    /// do when jobs are kept for ever. A failed sweep is logged and tried again.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.retention.period().is_none() {
            return;
        }
        let mut ticker = tokio::time::interval(SWEEP_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.sweep(&shutdown).await {
                Ok((0, 0)) => {}
                Ok((jobs, rows)) => {
                    tracing::info!(jobs, rows, retention = %self.retention, "deleted ended jobs")
                }
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again"),
            }
        }
    }

    /// One sweep: deletes the jobs that ended more than the retention ago, then the rows
    /// they left. Returns (jobs, rows) deleted.
    pub async fn sweep(&self, shutdown: &CancellationToken) -> Result<(u64, u64), SplitterError> {
        let Some(period_ms) = self.retention.period_ms() else {
            return Ok((0, 0));
        };
        let mut jobs = 0;
        while !shutdown.is_cancelled() {
            let now = now_ms();
            let n = self
                .blocking(move |p| {
                    p.expire(now.saturating_sub(period_ms), now, JOBS_PER_TRANSACTION)
                })
                .await?;
            jobs += n;
            if n < u64::from(JOBS_PER_TRANSACTION) {
                break;
            }
            tokio::time::sleep(PAUSE_BETWEEN_TRANSACTIONS).await;
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
            tokio::time::sleep(PAUSE_BETWEEN_TRANSACTIONS).await;
        }
        Ok((jobs, rows))
    }
}
