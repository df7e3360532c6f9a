//! Leadership of a role (the splitter, the reducer) among replicas sharing one PostgreSQL
//! database: a lease row with a fencing token.
//!
//! The row `batchq_lease(role, holder, token, expires_at)` in the component's schema says who
//! is active and until when, by the database's clock (replicas' clocks never matter):
//!
//! - **Acquire**: a standby looks at the row every [`CAMPAIGN_EVERY`], without a lock; when
//!   the lease has expired (or was handed back), it locks the row (`FOR UPDATE`), checks
//!   again, writes itself as holder, bumps `token` and sets `expires_at = now() + ttl`. The
//!   new token is its **fence**.
//! - **Renew**: the holder moves `expires_at` on every [`RENEW_EVERY`], only where holder and
//!   token are still its own. A renewal that finds neither means another replica took over:
//!   it steps down at once. A holder that cannot renew (the database unreachable) steps down
//!   when its lease would have expired, by its own clock measured from the last renewal it
//!   sent.
//! - **Fence**: every state transaction of the active replica starts by reading the row
//!   `FOR KEY SHARE` and comparing the token with its fence ([`Fence::check`]). The share lock
//!   conflicts with the standby's `FOR UPDATE`, so a takeover cannot slip in between the check
//!   and the commit: either the transaction commits under the old token before the takeover
//!   reads the row, or it sees the new token and commits nothing. Renewal takes a weaker lock
//!   (`FOR NO KEY UPDATE`, a plain UPDATE) that does not conflict with the share lock, so a long
//!   transaction does not delay renewal. A process paused inside a transaction (SIGSTOP, a
//!   long GC, a partition) holds its share lock until its session ends; so a standby that
//!   finds the lease expired first ends the expired holder's sessions
//!   (`pg_terminate_backend`, found by their `application_name`, which names the replica),
//!   then takes the row lock with a `lock_timeout` of 1 s. When the paused process wakes,
//!   its connection is gone and its next check sees the new token.
//! - **Hand over**: on SIGTERM, the active replica stops its work, then clears `holder` and
//!   sets `expires_at = now()`: a standby takes over at its next try, within
//!   [`CAMPAIGN_EVERY`].

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::pg::PgDatabase;
use crate::store::StoreError;

/// How long a lease lasts without renewal: the longest a dead active replica holds up its role.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the holder renews: a third of the ttl, so two renewals may fail in a row.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often a standby tries to take the lease.
pub const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);

/// The proof that this replica holds `role`'s lease: a state transaction checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub role: String,
    pub holder: String,
    pub token: i64,
}

impl Fence {
    /// Checks, inside `tx`, that this replica still holds the lease, and keeps the row share-
    /// locked until `tx` ends, so no takeover commits in between.
    pub async fn check(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
        let row = tx
            .query_opt(
                "SELECT holder, token FROM batchq_lease WHERE role = $1 FOR KEY SHARE",
                &[&self.role],
            )
            .await?;
        let current = row.map(|r| (r.get::<_, Option<String>>(0), r.get::<_, i64>(1)));
        match current {
            Some((Some(holder), token)) if holder == self.holder && token == self.token => Ok(()),
            _ => Err(StoreError::Fenced {
                role: self.role.clone(),
                token: self.token,
            }),
        }
    }
}

/// How a term as the active replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// Asked to stop (SIGTERM, or the work ended).
    Stopped,
    /// Another replica holds the lease now.
    Superseded,
    /// The lease could not be renewed before it expired (the database unreachable).
    Expired,
}

/// One replica's side of `role`'s election.
#[derive(Debug, Clone)]
pub struct Elector {
    db: PgDatabase,
    role: String,
    holder: String,
    ttl: Duration,
}

impl Elector {
    /// `holder` names this replica (`{host}-{pid}`); `db` should be a pool of its own, so a
    /// busy store never delays a renewal.
    pub fn new(db: PgDatabase, role: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            db,
            role: role.to_owned(),
            holder: holder.to_owned(),
            ttl,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    /// Waits until this replica holds the lease (its fence), or `stop` fires (`None`).
    /// Database faults are logged once per change of cause and waited out.
    pub async fn campaign(&self, stop: &CancellationToken) -> Option<Fence> {
        let mut last_cause: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.try_acquire().await {
                Ok(Some(fence)) => return Some(fence),
                Ok(None) => last_cause = None,
                Err(e) => {
                    let cause = e.to_string();
                    if last_cause.as_deref() != Some(&cause) {
                        tracing::warn!(role = %self.role, error = %cause, "cannot reach the lease; trying again");
                        last_cause = Some(cause);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
            }
        }
    }

    /// Takes the lease if it is free or expired. One short transaction.
    pub async fn try_acquire(&self) -> Result<Option<Fence>, StoreError> {
        let mut client = self.db.client().await?;
        // A look without a lock first: while the lease is held, a standby's try must not
        // queue a `FOR UPDATE` before the active replica's share locks every 250 ms.
        let looked = client
            .query_opt(
                "SELECT holder, expires_at > clock_timestamp() FROM batchq_lease WHERE role = $1",
                &[&self.role],
            )
            .await?;
        if let Some(row) = looked {
            let holder: Option<String> = row.get(0);
            let current: bool = row.get(1);
            match holder {
                Some(h) if h != self.holder && current => return Ok(None),
                Some(h) if h != self.holder => self.end_sessions_of(&client, &h).await,
                _ => {}
            }
        }
        let tx = client.transaction().await?;
        // Never wait long for the row: a lock still held is tried again at the next round.
        tx.batch_execute("SET LOCAL lock_timeout = '1s'").await?;
        tx.execute(
            "INSERT INTO batchq_lease (role) VALUES ($1) ON CONFLICT (role) DO NOTHING",
            &[&self.role],
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT holder IS NULL OR expires_at <= clock_timestamp() OR holder = $2
                 FROM batchq_lease WHERE role = $1 FOR UPDATE",
                &[&self.role, &self.holder],
            )
            .await?;
        let free: bool = row.get(0);
        if !free {
            return Ok(None);
        }
        let ttl_ms = self.ttl.as_millis() as i64;
        let token: i64 = tx
            .query_one(
                "UPDATE batchq_lease
                 SET holder = $2, token = token + 1, acquired_at = clock_timestamp(),
                     expires_at = clock_timestamp() + $3 * interval '1 millisecond'
                 WHERE role = $1 RETURNING token",
                &[&self.role, &self.holder, &(ttl_ms as f64)],
            )
            .await?
            .get(0);
        tx.commit().await?;
        Ok(Some(Fence {
            role: self.role.clone(),
            holder: self.holder.clone(),
            token,
        }))
    }

    /// Ends the PostgreSQL sessions of `expired`, the replica whose lease ran out: one paused
    /// inside a transaction (SIGSTOP, a partition; even in the middle of a `COPY`, where
    /// PostgreSQL's idle timeout does not run) still holds its share lock on the lease row,
    /// and the takeover would wait for it. Its sessions are named after it
    /// ([`crate::pg::application_name`]). Whatever it had not committed is rolled back: it
    /// no longer holds the lease, and could not have committed it anyway. Best effort.
    async fn end_sessions_of(&self, client: &tokio_postgres::Client, expired: &str) {
        let name = crate::pg::application_name(&self.role, expired);
        let ended = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1
                   AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await;
        match ended {
            Ok(rows) if !rows.is_empty() => tracing::warn!(
                role = %self.role,
                replica = expired,
                sessions = rows.len(),
                "ended the database sessions of the replica whose lease expired"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(role = %self.role, replica = expired, error = %e, "could not end the expired replica's database sessions")
            }
        }
    }

    /// Renews once: `Ok(false)` when another replica holds the lease now.
    pub async fn renew(&self, fence: &Fence) -> Result<bool, StoreError> {
        let client = self.db.client().await?;
        let ttl_ms = self.ttl.as_millis() as f64;
        let renewed = client
            .execute(
                "UPDATE batchq_lease SET expires_at = clock_timestamp() + $4 * interval '1 millisecond'
                 WHERE role = $1 AND holder = $2 AND token = $3",
                &[&self.role, &self.holder, &fence.token, &ttl_ms],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Keeps the lease until `stop` fires, or until it is lost; says which.
    pub async fn hold(&self, fence: &Fence, stop: &CancellationToken) -> TermEnd {
        // The lease is good until at least `sent + ttl` of the last renewal that succeeded:
        // the database set its expiry after this process sent it.
        let mut valid_until = Instant::now() + self.ttl;
        let every = self.ttl / 3;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            // Leave a margin for the time a renewal takes to arrive.
            let give_up = valid_until.checked_sub(every / 2).unwrap_or(valid_until);
            tokio::select! {
                _ = stop.cancelled() => return TermEnd::Stopped,
                _ = tokio::time::sleep_until(give_up.into()) => {
                    tracing::warn!(role = %self.role, token = fence.token, "could not renew the lease before it expired; stepping down");
                    return TermEnd::Expired;
                }
                _ = ticker.tick() => {}
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout(every, self.renew(fence)).await;
            match attempt {
                Ok(Ok(true)) => valid_until = sent + self.ttl,
                Ok(Ok(false)) => {
                    tracing::warn!(role = %self.role, token = fence.token, "another replica holds the lease now; stepping down");
                    return TermEnd::Superseded;
                }
                Ok(Err(e)) => {
                    tracing::warn!(role = %self.role, error = %e, "could not renew the lease")
                }
                Err(_) => tracing::warn!(role = %self.role, "renewing the lease timed out"),
            }
        }
    }

    /// Hands the lease back, so a standby takes over at its next try rather than after the
    /// ttl. Nothing happens if another replica holds it already.
    pub async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        let client = self.db.client().await?;
        client
            .execute(
                "UPDATE batchq_lease SET holder = NULL, expires_at = clock_timestamp()
                 WHERE role = $1 AND holder = $2 AND token = $3",
                &[&self.role, &self.holder, &fence.token],
            )
            .await?;
        Ok(())
    }
}
