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
pub mod lease;
pub mod measure;
pub mod migrate;
pub mod pg;
pub mod retention;
pub mod role;
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

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`). lapin's own
/// lines are off unless `RUST_LOG` names lapin: it logs an ERROR for every failed attempt,
/// where the supervisor reports each cause once, with the URL. refinery's and
/// tokio-postgres's are at WARN unless named.
///
/// Text lines carry colour codes only when stderr is a terminal: `docker logs`, `kubectl logs`
/// and log shippers get plain text, or JSON with [`config::LogFormat::Json`].
pub fn init_logging(format: config::LogFormat) {
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// [`init_logging`]'s filter, with the lines written to `file` instead of stderr (no colours):
/// for `batchctl demo`, whose terminal shows the job's progress.
pub fn init_logging_to(file: std::fs::File) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

/// `RUST_LOG` (default `info`), with the libraries batchq speaks through kept quiet unless
/// `RUST_LOG` names them.
fn log_filter() -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let mut directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    if !directives.contains("lapin") {
        directives.push_str(",lapin=off");
    }
    // The PostgreSQL store's libraries: their INFO lines (each migration batch, every server
    // NOTICE) say nothing batchq does not say itself.
    for library in ["refinery_core", "tokio_postgres"] {
        if !directives.contains(library) {
            directives.push_str(&format!(",{library}=warn"));
        }
    }
    EnvFilter::new(directives)
}
