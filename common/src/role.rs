//! One replica of a role (the splitter, the reducer) over its life: active alone on the
//! embedded store; with PostgreSQL, standby until it wins the lease, active while it holds
//! it, and standby again when it loses it (see [`crate::lease`]).

use std::future::Future;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::lease::{Elector, Fence, LEASE_TTL, TermEnd};
use crate::pg::PgDatabase;
use crate::service::ServiceError;
use crate::store::{StoreError, StoreHealth};

/// How long PostgreSQL lets a session of a replica sit idle inside a transaction before it
/// ends it: a safety net for a session abandoned mid-transaction. A takeover does not wait
/// for it (the new holder ends the expired holder's sessions, see [`crate::lease`]), so it is
/// generous: a batch slowed by a starved CPU is not killed between two statements.
const IDLE_TRANSACTION: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects `role`'s replica to PostgreSQL: a pool for its store, its schema brought to
/// `migrations` (waiting while the database cannot be reached, as any store fault is waited
/// out), and its side of the election, on a small pool of its own so a busy store never
/// delays a renewal.
pub async fn postgres(
    url: &str,
    namespace: &str,
    role: &str,
    migrations: &[&str],
    shutdown: &CancellationToken,
) -> Result<(PgDatabase, Elector), ServiceError> {
    // `{host}-{pid}` names the replica for people (`batchctl members`); the suffix keeps two
    // containers of one hostname and pid 1 from each taking the other's lease for its own.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let replica = format!("{}/{}", crate::health::instance(), &nonce[..8]);
    let db = PgDatabase::for_replica(
        url,
        namespace,
        role,
        &replica,
        IDLE_TRANSACTION,
        crate::pg::POOL_SIZE,
    )?;
    let health = StoreHealth::default();
    crate::store::retry(role, "schema", &health, shutdown, || db.migrate(migrations)).await?;
    let lease_db = PgDatabase::for_replica(url, namespace, role, &replica, IDLE_TRANSACTION, 2)?;
    let elector = Elector::new(lease_db, role, &replica, LEASE_TTL);
    Ok((db, elector))
}

/// Sets `batchq_leader{role}`: 1 while this replica is the active one.
pub fn set_leader(role: &str, active: bool) {
    metrics::gauge!("batchq_leader", "role" => role.to_owned()).set(if active { 1.0 } else { 0.0 });
}

/// Runs `term(fence, stop)` each time this replica wins `elector`'s lease, until `shutdown`.
/// While standby it says so in its beats on `broker`, so `batchctl members` lists it.
///
/// A term ends when its work ends (shutdown, or an error), when the lease is lost (another
/// replica took it; it could not be renewed), or when a transaction found its fence stale.
/// The work is stopped through its token and awaited, so its consumers close and what it
/// held goes back to the broker for the next active replica. A lost lease or a stale fence
/// makes this replica a standby again; any other error ends it, after handing the lease back.
pub async fn lead<F, Fut>(
    elector: &Elector,
    broker: &Broker,
    shutdown: &CancellationToken,
    mut term: F,
) -> Result<(), ServiceError>
where
    F: FnMut(Fence, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), ServiceError>>,
{
    let role = elector.role().to_owned();
    loop {
        set_leader(&role, false);
        let waiting_since = Instant::now();
        tracing::info!(role = %role, replica = %elector.holder(), "standby: waiting for the lease");
        let fence = {
            let standby = shutdown.child_token();
            let beats = standby_beats(broker, &role, &standby);
            tokio::pin!(beats);
            let fence = tokio::select! {
                fence = elector.campaign(shutdown) => fence,
                () = &mut beats => elector.campaign(shutdown).await,
            };
            standby.cancel();
            fence
        };
        let Some(fence) = fence else {
            return Ok(());
        };
        if shutdown.is_cancelled() {
            // Won in the moment it was told to stop: hand it straight back.
            let _ = elector.release(&fence).await;
            return Ok(());
        }
        tracing::info!(
            role = %role,
            replica = %elector.holder(),
            token = fence.token,
            waited_ms = waiting_since.elapsed().as_millis() as u64,
            "active: holding the lease"
        );
        set_leader(&role, true);
        let stop = shutdown.child_token();
        // The lease is renewed until the work has ended, a drain after SIGTERM included.
        let renewing = CancellationToken::new();
        let work = term(fence.clone(), stop.clone());
        tokio::pin!(work);
        let holding = elector.hold(&fence, &renewing);
        tokio::pin!(holding);
        let (result, lost) = tokio::select! {
            result = &mut work => (result, None),
            end = &mut holding => {
                // Lost: stop the work; its transactions are fenced meanwhile.
                stop.cancel();
                (work.await, Some(end))
            }
        };
        renewing.cancel();
        stop.cancel();
        set_leader(&role, false);
        let fenced = matches!(&result, Err(ServiceError::Store(StoreError::Fenced { .. })));
        let lost = fenced || matches!(lost, Some(TermEnd::Superseded | TermEnd::Expired));
        if lost && !shutdown.is_cancelled() {
            tracing::warn!(role = %role, token = fence.token, "stepped down: this replica no longer holds the lease");
            continue;
        }
        if lost {
            // Told to stop and superseded meanwhile: nothing of its was committed late.
            return Ok(());
        }
        // Shut down, or failed: hand the lease over so a standby need not wait for it to
        // expire.
        match elector.release(&fence).await {
            Ok(()) => tracing::info!(role = %role, token = fence.token, "handed the lease back"),
            Err(e) => {
                tracing::warn!(role = %role, error = %e, "could not hand the lease back; it expires by itself")
            }
        }
        return result;
    }
}

/// Beats saying this replica is a standby, until `stop` fires. A broker fault is waited out:
/// the beats are for `batchctl members`, and nothing else depends on them.
async fn standby_beats(broker: &Broker, role: &str, stop: &CancellationToken) {
    let health = StoreHealth::default();
    while !stop.is_cancelled() {
        let outcome = async {
            let session = broker.session().await?;
            let publisher = session.publisher().await?;
            crate::health::send_beats(&publisher, broker.names(), role, &health, false, stop).await
        }
        .await;
        if let Err(e) = outcome {
            tracing::debug!(role, error = %e, "standby beats interrupted");
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(crate::health::SERVICE_BEAT_INTERVAL) => {}
            }
        }
    }
}
