//! The supervisor loop around every long-lived broker session: on a broken channel or
//! connection, back off with jitter, reconnect and start the session again. A broker that
//! refuses the process (login, vhost, permission, TLS) is logged once per cause, as an
//! ERROR, and retried at the longest pause until it lets the process in.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::Refusal;

/// An error that knows whether another session may succeed.
pub trait Retryable: std::error::Error + 'static {
    fn is_retryable(&self) -> bool;

    /// The broker's refusal behind this error, if that is what it is. Found down the chain
    /// of sources, so an error type that wraps [`crate::broker::BrokerError`] needs nothing.
    fn refusal(&self) -> Option<Refusal>
    where
        Self: Sized,
    {
        crate::broker::refusal_in(self)
    }
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
/// A session that has run this long after a refusal got past every step the broker can
/// refuse (login, vhost, declarations, consumers take milliseconds): the refusal is over.
const PAST_REFUSAL: Duration = Duration::from_secs(2);

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
    // The refusal last logged, so each cause is logged once and not on every attempt.
    let mut refused: Option<Refusal> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let started = Instant::now();
        let mut running = std::pin::pin!(session());
        let outcome = match refused {
            Some(cause) => match tokio::time::timeout(PAST_REFUSAL, &mut running).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::info!(%component, %cause, "the broker lets this process in again");
                    refused = None;
                    delay = FIRST_DELAY;
                    running.await
                }
            },
            None => running.await,
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => {
                tracing::error!(%component, error = %e, "giving up");
                return Err(e);
            }
            Err(e) => {
                let pause = match e.refusal() {
                    Some(cause) => {
                        if refused != Some(cause) {
                            tracing::error!(%component, %cause, error = %e, retry_every_s = MAX_DELAY.as_secs(), "the broker refuses this process; retrying until it lets it in");
                            refused = Some(cause);
                        }
                        delay = MAX_DELAY;
                        jitter(MAX_DELAY)
                    }
                    None => {
                        refused = None;
                        if started.elapsed() >= HEALTHY_SESSION {
                            delay = FIRST_DELAY;
                        }
                        let jittered = jitter(delay);
                        tracing::warn!(%component, error = %e, retry_in_ms = jittered.as_millis() as u64, "session ended; reconnecting");
                        delay = (delay * 2).min(MAX_DELAY);
                        jittered
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
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
        refusal: Option<Refusal>,
    }

    impl Failure {
        fn retryable() -> Self {
            Failure {
                retryable: true,
                refusal: None,
            }
        }

        fn refused() -> Self {
            Failure {
                retryable: true,
                refusal: Some(Refusal::LoginRefused),
            }
        }
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure (retryable: {})", self.retryable)
        }
    }

    // The refusal as a source, as BrokerError::Refused carries it.
    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.refusal
                .as_ref()
                .map(|r| r as &(dyn std::error::Error + 'static))
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
                    Err(Failure::retryable())
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
            async {
                Err::<(), _>(Failure {
                    retryable: false,
                    refusal: None,
                })
            }
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
            async { Err::<(), _>(Failure::retryable()) }
        })
        .await;
        assert!(outcome.is_ok());
        assert!(started.elapsed() < FIRST_DELAY / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_session_is_retried_at_the_longest_pause_until_let_in() {
        let attempts = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let counted = Arc::clone(&attempts);
        let outcome = supervise("test", &CancellationToken::new(), move || {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if attempt <= 3 {
                    Err(Failure::refused())
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(outcome.is_ok());
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
        // Three pauses of at least half of MAX_DELAY each, where a plain failure would have
        // waited 0.1 + 0.2 + 0.4 s at least.
        assert!(
            started.elapsed() >= MAX_DELAY * 3 / 2,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_starts_afresh_once_a_session_gets_past_a_refusal() {
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = Arc::clone(&starts);
        let outcome = supervise("test", &CancellationToken::new(), move || {
            let attempt = {
                let mut starts = recorded.lock().unwrap_or_else(|p| p.into_inner());
                starts.push(Instant::now());
                starts.len()
            };
            async move {
                match attempt {
                    1 => Err(Failure::refused()),
                    // Let in: runs past PAST_REFUSAL, then the broker goes away.
                    2 => {
                        tokio::time::sleep(PAST_REFUSAL * 2).await;
                        Err(Failure::retryable())
                    }
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert!(outcome.is_ok());
        let starts = starts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(starts.len(), 3);
        assert!(starts[1] - starts[0] >= MAX_DELAY / 2);
        let second_pause = starts[2] - starts[1] - PAST_REFUSAL * 2;
        assert!(second_pause <= FIRST_DELAY, "{second_pause:?}");
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        for _ in 0..1000 {
            let pause = jitter(MAX_DELAY);
            assert!(pause >= MAX_DELAY / 2 && pause <= MAX_DELAY, "{pause:?}");
        }
    }
}
