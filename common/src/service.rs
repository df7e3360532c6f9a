//! The error shape the splitter and the reducer share: what ends a session (the supervisor
//! reconnects) and what ends the process.

use crate::broker::BrokerError;
use crate::store::StoreError;
use crate::supervise::Retryable;

/// Why a service's session or the service itself stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The broker failed; another session may succeed (see [`BrokerError::is_retryable`]).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The state store failed in a way that waiting did not mend (transient faults are
    /// waited out where they happen, see [`crate::store::retry`]), or the service was told to
    /// stop while it waited.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// The Prometheus endpoint could not be served.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

impl Retryable for ServiceError {
    fn is_retryable(&self) -> bool {
        match self {
            ServiceError::Broker(e) => e.is_retryable(),
            ServiceError::Store(_) | ServiceError::Metrics(_) => false,
        }
    }
}

/// What a panic said, as far as it said anything: for the reason a message is set aside.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
