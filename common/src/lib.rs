//! Pieces every batchq binary shares: settings, names and topology, the wire messages
//! (public contract and internal), broker connections with publisher confirms, the supervisor
//! loop and shutdown handling.

pub mod broker;
pub mod config;
pub mod consume;
pub mod contract;
pub mod dead;
pub mod health;
pub mod jobspec;
pub mod measure;
pub mod migrate;
pub mod retention;
pub mod rpc;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod timefmt;
pub mod topology;
pub mod wire;

pub use deadpool_lapin::lapin;

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
