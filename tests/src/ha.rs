//! Looking at the standby replicas' election from the test's side: who holds a role's lease
//! (by the database, as the replicas see it), when it changes hands, and what a fencing token
//! committed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::{ProcId, TestEnv};

/// Who holds `role`'s lease, by the database: (holder, token).
pub async fn lease(env: &TestEnv, role: &str) -> Result<Option<(String, i64)>> {
    let db = env.database().context("a PostgreSQL test")?;
    let client = db.connect().await?;
    let schema = common::pg::schema_name(env.names.namespace(), role);
    let row = client
        .query_opt(
            &format!("SELECT holder, token FROM {schema}.batchq_lease WHERE role = $1"),
            &[&role],
        )
        .await;
    Ok(match row {
        // The table appears with the first replica's migration.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e.into()),
        Ok(row) => row.and_then(|r| {
            let holder: Option<String> = r.get(0);
            holder.map(|h| (h, r.get(1)))
        }),
    })
}

/// Which of `replicas` holds `role`'s lease, once one does: (replica, token).
pub async fn active_of(env: &TestEnv, role: &str, replicas: &[ProcId]) -> Result<(ProcId, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((holder, token)) = lease(env, role).await? {
            let found = replicas.iter().copied().find(|&id| {
                env.pid(id)
                    .is_some_and(|pid| holder.contains(&format!("-{pid}/")))
            });
            if let Some(id) = found {
                return Ok((id, token));
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no {role} replica took the lease within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long after `since` the lease of `role` passed to a token above `old`.
pub async fn taken_over(env: &TestEnv, role: &str, old: i64, since: Instant) -> Result<Duration> {
    loop {
        if let Some((_, token)) = lease(env, role).await?
            && token > old
        {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() < Duration::from_secs(30),
            "no standby {role} took the lease within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fragment rows the reducer committed under fencing token `token`.
pub async fn rows_of_token(env: &TestEnv, token: i64) -> Result<i64> {
    let db = env.database().context("a PostgreSQL test")?;
    let client = db.connect().await?;
    let schema = common::pg::schema_name(env.names.namespace(), "reducer");
    let row = client
        .query_one(
            &format!("SELECT COUNT(*) FROM {schema}.fragments WHERE fence_token = $1"),
            &[&token],
        )
        .await?;
    Ok(row.get(0))
}

/// The replica of two that is not `active`.
pub fn other(replicas: [ProcId; 2], active: ProcId) -> ProcId {
    if replicas[0] == active {
        replicas[1]
    } else {
        replicas[0]
    }
}
