//! The supervisor loop around every long-lived broker session: on a broken channel or
//! connection, back off with jitter, reconnect and start the session again.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An error that knows whether another session may succeed.
pub trait Retryable: std::fmt::Display {
    fn is_retryable(&self) -> bool;
}

impl Retryable for crate::broker::BrokerError {
    fn is_retryable(&self) -> bool {
        crate::broker::BrokerError::is_retryable(self)
    }
}

const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// A session that lasted this long was healthy: the next failure starts backing off afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Runs `session` until it returns `Ok` (a clean stop), a non-retryable error, or `shutdown`.
pub async fn supervise<F, Fut, E>(
    component: &str,
    shutdown: &CancellationToken,
    mut session: F,
) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Retryable,
{
    let mut delay = FIRST_DELAY;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let started = Instant::now();
        match session().await {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => {
                tracing::error!(%component, error = %e, "giving up");
                return Err(e);
            }
            Err(e) => {
                if started.elapsed() >= HEALTHY_SESSION {
                    delay = FIRST_DELAY;
                }
                let jittered = jitter(delay);
                tracing::warn!(%component, error = %e, retry_in_ms = jittered.as_millis() as u64, "session ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(jittered) => {}
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}

/// Between half and all of `delay`, so restarted replicas do not reconnect in lock step.
fn jitter(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(0.5..=1.0);
    delay.mul_f64(factor)
}
