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
/// Longest pause between two attempts: a broker back after a restart is found within it.
const MAX_DELAY: Duration = Duration::from_secs(5);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Failure {
        retryable: bool,
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure (retryable: {})", self.retryable)
        }
    }

    impl Retryable for Failure {
        fn is_retryable(&self) -> bool {
            self.retryable
        }
    }

    #[tokio::test]
    async fn retries_broken_sessions_with_growing_pauses_until_one_ends_cleanly() {
        let attempts = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let counted = Arc::clone(&attempts);
        let outcome = supervise("test", &CancellationToken::new(), move || {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if attempt < 3 {
                    Err(Failure { retryable: true })
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(outcome.is_ok());
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        // Two pauses: at least half of 200 ms, then of 400 ms.
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn gives_up_on_an_error_that_reconnecting_cannot_mend() {
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let outcome = supervise("test", &CancellationToken::new(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure { retryable: false }) }
        })
        .await;
        assert!(outcome.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn shutdown_ends_the_pause_between_attempts() {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let started = Instant::now();
        let outcome = supervise("test", &shutdown, move || {
            stop.cancel();
            async { Err::<(), _>(Failure { retryable: true }) }
        })
        .await;
        assert!(outcome.is_ok());
        assert!(started.elapsed() < FIRST_DELAY / 2);
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        for _ in 0..1000 {
            let pause = jitter(MAX_DELAY);
            assert!(pause >= MAX_DELAY / 2 && pause <= MAX_DELAY, "{pause:?}");
        }
    }
}
