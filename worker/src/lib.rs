//! The worker: a masterless competing consumer of fragments. It runs each fragment's
//! operations, publishes a confirmed report, and only then acknowledges the fragment, so a
//! worker that dies leaves its fragments to the broker, which hands them to another worker.

mod adaptive;
mod budget;
pub mod builtin;
mod control;
pub mod exec;
mod heartbeat;
pub mod operation;
mod reporter;
pub mod runner;
mod session;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use common::broker::{Broker, BrokerError};
use common::config::BrokerArgs;
use common::supervise::{Retryable, supervise};
use tokio_util::sync::CancellationToken;

pub use crate::exec::{Exec, ExecAllowList};
pub use crate::operation::{
    EXEC, OpContext, OpError, OpInput, OpMetrics, Operation, PermanentExt, Registry,
};
use crate::runner::CancelledJobs;
/// What a program with operations of its own needs beside these, so that it depends on
/// `worker` alone: the trait's attribute, JSON values, and the text of an item as the
/// built-ins read it.
pub use async_trait::async_trait;
pub use common::jobspec::item_text;
pub use serde_json::{Map, Value, json};

/// Settings of a worker.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Fragments this worker holds (delivered, not yet acknowledged) and runs at once.
    /// Given: fixed, the broker prefetch of each operation queue it consumes (so a worker
    /// offering k operations may hold k × N), and N run at once. Unset: adaptive; 4 run at
    /// once, each queue starts at a prefetch of 4, and a queue whose fragments finish much
    /// faster than their reports are confirmed is given more, up to 32 held over all the
    /// worker's queues. With `--max-fragments`, unset means a fixed 4.
    #[arg(long, env = "BATCHQ_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

    /// Comma-separated operations this worker offers (default: all it has).
    #[arg(long, env = "BATCHQ_OPERATIONS", value_delimiter = ',')]
    pub operations: Option<Vec<String>>,

    /// Comma-separated programs `exec` may run: names looked up on `PATH` at start, or
    /// absolute paths. Unset: this worker does not offer `exec`.
    #[arg(long = "exec-allow", env = "BATCHQ_EXEC_ALLOW", value_delimiter = ',')]
    pub exec_allow: Option<Vec<String>>,

    /// Milliseconds between heartbeats.
    #[arg(
        long = "heartbeat-ms",
        env = "BATCHQ_HEARTBEAT_MS",
        default_value_t = 2000
    )]
    pub heartbeat_ms: u64,

    /// Retire after this long, as on SIGTERM: stop taking fragments, finish the operation in
    /// hand, report what ran, hand the rest back, exit 0. For short-lived compute instances.
    /// An integer with a unit, `s`, `m` or `h` (`90s`, `30m`, `12h`); a bare integer is
    /// seconds. Unset: no limit.
    #[arg(long = "max-lifetime", env = "BATCHQ_MAX_LIFETIME", value_parser = parse_lifetime)]
    pub max_lifetime: Option<Duration>,

    /// Retire after this many fragments, as on SIGTERM: take no more once the last ones are
    /// in hand, run those to their end, exit 0. For short-lived instances (a Kubernetes Job
    /// of a KEDA ScaledJob, a batch VM). Unset: no limit.
    #[arg(long = "max-fragments", env = "BATCHQ_MAX_FRAGMENTS", value_parser = parse_max_fragments)]
    pub max_fragments: Option<u64>,

    /// Address of a Prometheus endpoint (`GET /metrics`) for this worker; none unless set
    /// (workers report their measurements through the broker; the reducer serves them).
    #[arg(long = "metrics-addr", env = "BATCHQ_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

impl WorkerConfig {
    pub fn new(broker: BrokerArgs) -> Self {
        Self {
            broker,
            prefetch: None,
            operations: None,
            exec_allow: None,
            heartbeat_ms: 2000,
            max_lifetime: None,
            max_fragments: None,
            metrics_addr: None,
        }
    }
}

/// Parses `--max-lifetime`: an integer followed by `s`, `m` or `h`, or a bare integer of
/// seconds. Zero is refused: a worker that retires at once is a mistake, not a setting.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit_secs) = match text.char_indices().last() {
        Some((at, 's')) => (&text[..at], 1),
        Some((at, 'm')) => (&text[..at], 60),
        Some((at, 'h')) => (&text[..at], 3600),
        _ => (text, 1),
    };
    let amount: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a lifetime: write an integer with s, m or h (90s, 30m, 12h)")
    })?;
    if amount == 0 {
        return Err("a max lifetime must be longer than zero".into());
    }
    amount
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long a lifetime"))
}

/// Parses `--max-fragments`: a positive integer. Zero is refused: a worker that may run no
/// fragment would start, connect and exit having done nothing.
pub fn parse_max_fragments(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err(
            "a worker with max fragments 0 would exit without running anything: \
             give at least 1, or leave BATCHQ_MAX_FRAGMENTS (--max-fragments) unset for no limit"
                .into(),
        ),
        Ok(count) => Ok(count),
        Err(_) => Err(format!(
            "{text:?} is not a number of fragments: give a positive integer"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Config(String),
}

impl Retryable for WorkerError {
    fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Broker(e) => e.is_retryable(),
            WorkerError::Config(_) => false,
        }
    }
}

/// Who this worker is and what it holds: what its session, its heartbeats and its control
/// subscription share.
struct WorkerState {
    id: String,
    host: String,
    started_at_ms: i64,
    registry: Registry,
    /// `--prefetch`; `None`: adaptive (unless `--max-fragments` is set).
    fixed_prefetch: Option<u16>,
    /// What the worker may hold now, as its heartbeats report it: `--prefetch` when fixed, the
    /// adaptive budget over all its operation queues otherwise.
    budget_now: AtomicU16,
    heartbeat: Duration,
    cancelled: CancelledJobs,
    /// Fragments delivered and not yet acknowledged, by operation.
    held: Mutex<BTreeMap<String, u64>>,
    /// `--max-fragments`.
    max_fragments: Option<u64>,
    /// Fragments taken within `max_fragments` and settled (reported and acknowledged), over
    /// every session.
    fragments_run: AtomicU64,
}

impl WorkerState {
    fn hold(&self, operation: &str, taken: bool) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(operation.to_owned()).or_insert(0);
        if taken {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
    }

    fn held(&self) -> BTreeMap<String, u64> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fragments this worker may still take; `None` without `--max-fragments`.
    fn fragments_left(&self) -> Option<u64> {
        self.max_fragments
            .map(|max| max.saturating_sub(self.fragments_run()))
    }

    /// Fragments run at once: `--prefetch` when given, else the default prefetch.
    fn run_slots(&self) -> u16 {
        self.fixed_prefetch.unwrap_or(adaptive::DEFAULT_PREFETCH)
    }

    /// Whether the worker's prefetch adapts: no `--prefetch`, no `--max-fragments`.
    fn adapts(&self) -> bool {
        self.fixed_prefetch.is_none() && self.max_fragments.is_none()
    }

    fn budget_now(&self) -> u16 {
        self.budget_now.load(Ordering::Relaxed)
    }

    fn set_budget_now(&self, budget: u16) {
        self.budget_now.store(budget, Ordering::Relaxed);
    }

    fn fragments_run(&self) -> u64 {
        self.fragments_run.load(Ordering::Acquire)
    }

    /// A fragment taken within `--max-fragments` was acknowledged.
    fn fragment_settled(&self) {
        self.fragments_run.fetch_add(1, Ordering::AcqRel);
    }
}

/// The whole `main` of a worker program: reads the worker's flags and environment (the same
/// as the stock `worker` binary's), logs to stderr, stops gracefully on SIGTERM or SIGINT, and
/// runs the operations of `registry` until then.
pub async fn main_with(registry: Registry) -> Result<(), WorkerError> {
    /// batchq worker: runs fragments of the operations it offers.
    #[derive(clap::Parser)]
    #[command(version)]
    struct Cli {
        #[command(flatten)]
        config: WorkerConfig,

        #[command(flatten)]
        log: common::config::LogArgs,
    }
    let cli = <Cli as clap::Parser>::parse();
    common::init_logging(cli.log.log_format);
    run(cli.config, registry, common::shutdown::on_signals()).await
}

/// Runs a worker offering the operations of `registry` (with the built-in `exec` when
/// `registry` has the built-ins and `--exec-allow` is set; restricted by `--operations`) until
/// `shutdown` fires; fragments in hand stop at their next operation boundary and what they did
/// not run is handed back.
pub async fn run(
    config: WorkerConfig,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let registry = offered_operations(&config, registry)?;
    common::telemetry::serve_prometheus(config.metrics_addr.as_deref())
        .map_err(WorkerError::Config)?;
    let host = common::health::hostname();
    let state = Arc::new(WorkerState {
        id: format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        host,
        started_at_ms: common::timefmt::now_ms(),
        registry,
        fixed_prefetch: config.prefetch,
        budget_now: AtomicU16::new(config.prefetch.unwrap_or(adaptive::DEFAULT_PREFETCH)),
        heartbeat: Duration::from_millis(config.heartbeat_ms.max(100)),
        cancelled: CancelledJobs::default(),
        held: Mutex::default(),
        max_fragments: config.max_fragments,
        fragments_run: AtomicU64::new(0),
    });
    let broker = Broker::new(&config.broker, "batchq-worker")?;
    tracing::info!(worker = %state.id, operations = ?state.registry.names(), prefetch = ?state.fixed_prefetch, adaptive = state.adapts(), max_lifetime_s = config.max_lifetime.map(|l| l.as_secs()), max_fragments = config.max_fragments, "worker starting");
    // Reaching the max lifetime is a shutdown like SIGTERM, from the inside.
    let retire = shutdown.child_token();
    let lifetime = config.max_lifetime.map(|lifetime| {
        let retire = retire.clone();
        let lifetime = jittered_lifetime(lifetime, rand::random::<f64>());
        tokio::spawn(async move {
            tokio::select! {
                _ = retire.cancelled() => {}
                _ = tokio::time::sleep(lifetime) => {
                    tracing::info!(max_lifetime_s = lifetime.as_secs(), "max lifetime reached; retiring gracefully");
                    retire.cancel();
                }
            }
        })
    });
    let outcome = supervise("worker", &retire, || session::run(&broker, &state, &retire)).await;
    if let Some(timer) = lifetime {
        timer.abort();
    }
    outcome?;
    if let Some(max) = state.max_fragments {
        // The session ends cleanly on its own only once the budget is spent.
        if !retire.is_cancelled() {
            tracing::info!(
                fragments_run = state.fragments_run(),
                max_fragments = max,
                "max fragments run; retiring gracefully"
            );
        }
    }
    tracing::info!(worker = %state.id, fragments_run = state.fragments_run(), "worker stopped");
    Ok(())
}

/// The operations this worker offers: `registry` with the built-in `exec` when an allow-list
/// is set, restricted to `--operations`. Asking for `exec` without an allow-list is an error:
/// the worker would not offer what its settings name.
fn offered_operations(
    config: &WorkerConfig,
    mut registry: Registry,
) -> Result<Registry, WorkerError> {
    let allowed = config
        .exec_allow
        .as_deref()
        .map(ExecAllowList::resolve)
        .transpose()
        .map_err(WorkerError::Config)?;
    let wants_exec = registry.wants_builtin_exec();
    match &allowed {
        Some(allowed) if wants_exec => {
            tracing::info!(allowed = %allowed.describe(), "exec runs only these programs");
        }
        Some(_) => tracing::warn!(
            "BATCHQ_EXEC_ALLOW is set, but this worker program has no built-in exec; ignored"
        ),
        None if wants_exec => {
            tracing::info!("exec is not offered: BATCHQ_EXEC_ALLOW (--exec-allow) is not set");
        }
        None => {}
    }
    let offers_exec = registry.allow_exec(allowed);
    let registry = match &config.operations {
        Some(names) => {
            if wants_exec && !offers_exec && names.iter().any(|name| name == EXEC) {
                return Err(WorkerError::Config(
                    "BATCHQ_OPERATIONS names exec, which a worker offers only with \
                     BATCHQ_EXEC_ALLOW (--exec-allow): name the programs exec may run, or \
                     drop exec from the operations"
                        .into(),
                ));
            }
            registry.restrict(names).map_err(WorkerError::Config)?
        }
        None => registry,
    };
    if registry.names().is_empty() {
        return Err(WorkerError::Config(
            "this worker offers no operation".into(),
        ));
    }
    Ok(registry)
}

/// `lifetime` plus up to a tenth of it (`draw` in `[0, 1)` picks how much), so that workers
/// started together (a deployment, a scale-up) do not all retire at the same moment.
fn jittered_lifetime(lifetime: Duration, draw: f64) -> Duration {
    lifetime + lifetime.mul_f64(draw.clamp(0.0, 1.0) / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_take_a_unit_or_mean_seconds() {
        assert_eq!(parse_lifetime("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_lifetime("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_lifetime("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_lifetime("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_lifetime(" 2m "), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn bad_lifetimes_are_refused_with_the_format() {
        for text in ["", "m", "1.5h", "10d", "-5s", "5 s", "1h30m"] {
            let error = parse_lifetime(text).expect_err(text);
            assert!(error.contains("90s, 30m, 12h"), "{text:?}: {error}");
        }
        assert_eq!(
            parse_lifetime("0s"),
            Err("a max lifetime must be longer than zero".to_owned())
        );
        assert!(parse_lifetime("99999999999999999h").is_err());
    }

    fn config(args: &[&str]) -> WorkerConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: WorkerConfig,
        }
        let argv = std::iter::once("worker").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.config,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn offered(args: &[&str]) -> Result<Vec<String>, String> {
        offered_operations(&config(args), Registry::with_builtins())
            .map(|registry| registry.names())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn exec_is_offered_only_with_an_allow_list() {
        assert_eq!(
            offered(&[]),
            Ok(vec!["noop".into(), "sha256".into(), "sleep".into()])
        );
        assert_eq!(
            offered(&["--exec-allow", "sh,echo"]),
            Ok(vec![
                "exec".into(),
                "noop".into(),
                "sha256".into(),
                "sleep".into()
            ])
        );
        assert_eq!(
            offered(&["--exec-allow", "sh", "--operations", "exec"]),
            Ok(vec!["exec".into()])
        );
        // An allow-list for a worker told not to offer exec is harmless.
        assert_eq!(
            offered(&["--exec-allow", "sh", "--operations", "noop"]),
            Ok(vec!["noop".into()])
        );
    }

    #[test]
    fn settings_asking_for_an_exec_that_will_not_be_offered_are_refused() {
        let error = offered(&["--operations", "noop,exec"]).expect_err("no allow-list");
        assert!(
            error.starts_with(
                "BATCHQ_OPERATIONS names exec, which a worker offers only with BATCHQ_EXEC_ALLOW"
            ),
            "{error}"
        );
        let error = offered(&["--exec-allow", "sh,./run"]).expect_err("a relative entry");
        assert!(error.contains("\"./run\" is a relative path"), "{error}");
    }

    #[test]
    fn the_prefetch_is_fixed_only_when_given() {
        assert_eq!(config(&[]).prefetch, None);
        assert_eq!(WorkerConfig::new(config(&[]).broker).prefetch, None);
        assert_eq!(config(&["--prefetch", "8"]).prefetch, Some(8));
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: WorkerConfig,
        }
        assert!(Cli::try_parse_from(["worker", "--prefetch", "0"]).is_err());
    }

    #[test]
    fn max_fragments_is_a_positive_count() {
        assert_eq!(config(&["--max-fragments", "5"]).max_fragments, Some(5));
        assert_eq!(config(&[]).max_fragments, None);
        let zero = parse_max_fragments("0").expect_err("zero");
        assert!(zero.contains("exit without running anything"), "{zero}");
        assert!(parse_max_fragments("-1").is_err());
        assert!(parse_max_fragments("five").is_err());
    }

    #[test]
    fn the_flag_and_the_variable_set_the_lifetime() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: WorkerConfig,
        }
        let cli = Cli::try_parse_from(["worker", "--max-lifetime", "30m"]).expect("valid flags");
        assert_eq!(cli.config.max_lifetime, Some(Duration::from_secs(1800)));
        let lifetime = Duration::from_secs(1800);
        assert_eq!(jittered_lifetime(lifetime, 0.0), lifetime);
        assert_eq!(
            jittered_lifetime(lifetime, 0.5),
            Duration::from_secs(1890),
            "half of the tenth"
        );
        assert!(jittered_lifetime(lifetime, 0.999_999) < Duration::from_secs(1980));
        assert!(Cli::try_parse_from(["worker", "--max-lifetime", "soon"]).is_err());
    }
}
