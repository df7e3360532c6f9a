//! The worker: a masterless competing consumer of fragments. It runs each fragment's
//! operations, publishes a confirmed report, and only then acknowledges the fragment, so a
//! worker that dies leaves its fragments to the broker, which hands them to another worker.

pub mod builtin;
pub mod operation;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use common::broker::{
    Broker, BrokerError, Publisher, answered, json_properties, transient_json_properties,
};
use common::config::BrokerArgs;
use common::consume::consume;
use common::lapin::message::Delivery;
use common::lapin::options::{BasicAckOptions, BasicCancelOptions};
use common::supervise::{Retryable, supervise};
use common::topology::{KEY_HEARTBEAT, KEY_REDUCER, Names, declare_work_queue};
use common::wire::{Control, Fragment, Heartbeat};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::operation::{OpError, OpInput, OpMetrics, Operation, Registry};
use crate::runner::{CancelledJobs, run_fragment};

/// Settings of a worker.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Fragments this worker runs at once (and the broker prefetch of each operation queue).
    #[arg(long, env = "BATCHQ_PREFETCH", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Comma-separated operations this worker offers (default: all it has).
    #[arg(long, env = "BATCHQ_OPERATIONS", value_delimiter = ',')]
    pub operations: Option<Vec<String>>,

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

    /// Address of a Prometheus endpoint (`GET /metrics`) for this worker; none unless set
    /// (workers report their measurements through the broker; the reducer serves them).
    #[arg(long = "metrics-addr", env = "BATCHQ_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

impl WorkerConfig {
    pub fn new(broker: BrokerArgs) -> Self {
        Self {
            broker,
            prefetch: 4,
            operations: None,
            heartbeat_ms: 2000,
            max_lifetime: None,
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

/// What every fragment task of a worker shares.
struct WorkerState {
    id: String,
    host: String,
    started_at_ms: i64,
    registry: Registry,
    prefetch: u16,
    heartbeat: Duration,
    cancelled: CancelledJobs,
    /// Fragments delivered and not yet acknowledged, by operation.
    held: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
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

    fn held(&self) -> std::collections::BTreeMap<String, u64> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
    }
    common::init_logging();
    let cli = <Cli as clap::Parser>::parse();
    run(cli.config, registry, common::shutdown::on_signals()).await
}

/// Runs a worker offering the operations of `registry` (restricted by `--operations`) until
/// `shutdown` fires; fragments in hand stop at their next operation boundary and what they did
/// not run is handed back.
pub async fn run(
    config: WorkerConfig,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let registry = match &config.operations {
        Some(names) => registry.restrict(names).map_err(WorkerError::Config)?,
        None => registry,
    };
    if registry.names().is_empty() {
        return Err(WorkerError::Config(
            "this worker offers no operation".into(),
        ));
    }
    common::telemetry::serve_prometheus(config.metrics_addr.as_deref())
        .map_err(WorkerError::Config)?;
    let host = hostname();
    let state = Arc::new(WorkerState {
        id: format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        host,
        started_at_ms: common::timefmt::now_ms(),
        registry,
        prefetch: config.prefetch,
        heartbeat: Duration::from_millis(config.heartbeat_ms.max(100)),
        cancelled: CancelledJobs::default(),
        held: std::sync::Mutex::default(),
    });
    let broker = Broker::new(&config.broker, "batchq-worker")?;
    tracing::info!(worker = %state.id, operations = ?state.registry.names(), prefetch = state.prefetch, max_lifetime_s = config.max_lifetime.map(|l| l.as_secs()), "worker starting");
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
    let outcome = supervise("worker", &retire, || session(&broker, &state, &retire)).await;
    if let Some(timer) = lifetime {
        timer.abort();
    }
    outcome?;
    tracing::info!(worker = %state.id, "worker stopped");
    Ok(())
}

/// `lifetime` plus up to a tenth of it (`draw` in `[0, 1)` picks how much), so that workers
/// started together (a deployment, a scale-up) do not all retire at the same moment.
fn jittered_lifetime(lifetime: Duration, draw: f64) -> Duration {
    lifetime + lifetime.mul_f64(draw.clamp(0.0, 1.0) / 10.0)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

async fn session(
    broker: &Broker,
    state: &Arc<WorkerState>,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    broker.declare_topology().await?;
    let names = broker.names().clone();
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    let channel = session.consumer_channel(state.prefetch).await?;
    // Tasks report broker failures here; one ends the session.
    let (failed_tx, mut failed_rx) = mpsc::channel::<BrokerError>(1);
    let mut streams = Vec::new();
    let mut tags = Vec::new();
    for operation in state.registry.names() {
        answered(
            &format!("the declaration of {}", names.work_queue(&operation)),
            declare_work_queue(&channel, &names, &operation),
        )
        .await?;
        let tag = format!("{}:{operation}", state.id);
        let consumer = consume(&channel, &names.work_queue(&operation), &tag).await?;
        // `select_all` silently drops a stream that ends; an operation whose consumer the
        // broker cancelled would never be served again. Its end ends the session instead.
        streams.push(
            consumer
                .map(|next| next.map_err(BrokerError::from))
                .chain(futures::stream::once(async {
                    Err(BrokerError::ConsumerEnded)
                }))
                .boxed(),
        );
        tags.push(tag);
    }
    let control = listen_to_control(&session, &names, state, failed_tx.clone()).await?;
    let mut deliveries = futures::stream::select_all(streams);
    tracing::info!(worker = %state.id, queues = tags.len(), "consuming");

    let tracker = TaskTracker::new();
    let running = Arc::new(Semaphore::new(usize::from(state.prefetch)));
    // Cancelled on shutdown, and when the session breaks: fragments in hand then stop at
    // their next operation boundary instead of running on for a report that cannot be sent.
    let session_stop = shutdown.child_token();
    let heartbeat = tokio::spawn(heartbeats(
        publisher.clone(),
        names.clone(),
        Arc::clone(state),
        session_stop.clone(),
        failed_tx.clone(),
    ));

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(error) = failed_rx.recv() => break Err(WorkerError::from(error)),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    spawn_fragment(&tracker, delivery, &publisher, &names, state, &running, &session_stop, &failed_tx);
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(BrokerError::ConsumerEnded.into()),
            },
        }
    };

    if result.is_ok() {
        // Graceful stop: take no new work; fragments already delivered to us are handed back
        // (reported with nothing run) rather than requeued, which would count against their
        // delivery limit.
        for tag in &tags {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await
        {
            spawn_fragment(
                &tracker,
                delivery,
                &publisher,
                &names,
                state,
                &running,
                &session_stop,
                &failed_tx,
            );
        }
    } else {
        // What is in hand cannot be acknowledged on a broken session: stop it at once; the
        // broker hands the fragments out again.
        session_stop.cancel();
    }
    tracker.close();
    tracker.wait().await;
    session_stop.cancel();
    heartbeat.abort();
    control.abort();
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = publisher
        .channel()
        .close(200, "worker stopping".into())
        .await;
    result
}

#[allow(clippy::too_many_arguments)]
fn spawn_fragment(
    tracker: &TaskTracker,
    delivery: Delivery,
    publisher: &Publisher,
    names: &Names,
    state: &Arc<WorkerState>,
    running: &Arc<Semaphore>,
    stop: &CancellationToken,
    failed: &mpsc::Sender<BrokerError>,
) {
    let publisher = publisher.clone();
    let names = names.clone();
    let state = Arc::clone(state);
    let running = Arc::clone(running);
    let stop = stop.clone();
    let failed = failed.clone();
    // Fragments are published with their operation as routing key.
    let operation = delivery.routing_key.as_str().to_owned();
    state.hold(&operation, true);
    tracker.spawn(async move {
        let outcome = match running.acquire_owned().await {
            Ok(_permit) => handle_fragment(&delivery, &publisher, &names, &state, &stop).await,
            Err(_) => Ok(()),
        };
        state.hold(&operation, false);
        if let Err(error) = outcome {
            tracing::warn!(error = %error, "fragment not acknowledged; the broker will redeliver it");
            let _ = failed.try_send(error);
        }
    });
}

/// Runs one delivered fragment, publishes its report (confirmed), then acks it. `stop` cuts
/// the fragment at its next operation boundary.
async fn handle_fragment(
    delivery: &Delivery,
    publisher: &Publisher,
    names: &Names,
    state: &WorkerState,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let fragment: Fragment = match serde_json::from_slice(&delivery.data) {
        Ok(fragment) => fragment,
        Err(e) => {
            return dead_letter(delivery, publisher, names, &format!("not a fragment: {e}")).await;
        }
    };
    let Some(operation) = state.registry.get(&fragment.operation) else {
        let reason = format!(
            "operation {:?} is not offered by this worker",
            fragment.operation
        );
        return dead_letter(delivery, publisher, names, &reason).await;
    };
    let report = run_fragment(
        &fragment,
        operation.as_ref(),
        &state.id,
        &state.cancelled,
        stop,
    )
    .await;
    tracing::debug!(job_id = %report.job_id, fragment = report.fragment, done = report.done, cut = ?report.cut, "fragment ended");
    metrics::counter!("batchq_worker_fragments_total", "operation" => fragment.operation.clone())
        .increment(1);
    metrics::counter!("batchq_worker_operations_total", "operation" => fragment.operation.clone())
        .increment(u64::from(report.done));
    let body = serde_json::to_vec(&common::wire::ReducerInput::Fragment(report))?;
    publisher
        .start_with(&names.events(), KEY_REDUCER, &body, json_properties(), true)
        .await?
        .wait()
        .await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Keeps an undecodable message on `{ns}.dead` with the reason, and takes it off the queue.
async fn dead_letter(
    delivery: &Delivery,
    publisher: &Publisher,
    names: &Names,
    reason: &str,
) -> Result<(), BrokerError> {
    tracing::warn!(%reason, "fragment message kept on the dead-letter queue");
    common::dead::keep(publisher, names, delivery, reason, None).await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Binds a private queue to `{ns}.control` and applies what arrives (cancellations). The
/// subscription ending (its channel closed) ends the session through `failed`, so the next
/// session subscribes again instead of the worker going deaf to cancels.
async fn listen_to_control(
    session: &common::broker::Session,
    names: &Names,
    state: &Arc<WorkerState>,
    failed: mpsc::Sender<BrokerError>,
) -> Result<tokio::task::JoinHandle<()>, BrokerError> {
    let channel = session.consumer_channel(16).await?;
    let mut consumer = common::consume::subscribe(
        &channel,
        &names.control(),
        "",
        &format!("{}:control", state.id),
    )
    .await?;
    let state = Arc::clone(state);
    Ok(tokio::spawn(async move {
        // The channel must live as long as its consumer.
        let _channel = channel;
        loop {
            let delivery = match consumer.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    let _ = failed.try_send(e.into());
                    return;
                }
                None => {
                    let _ = failed.try_send(BrokerError::ConsumerEnded);
                    return;
                }
            };
            match serde_json::from_slice::<Control>(&delivery.data) {
                Ok(Control::Cancel { job_id }) => {
                    tracing::info!(%job_id, "job cancelled; its fragments stop at the next operation");
                    state.cancelled.insert(job_id);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
    }))
}

/// Publishes a heartbeat every interval. A publish the channel refuses (it closed) ends the
/// session through `failed`: a worker the reducer cannot hear must reconnect.
async fn heartbeats(
    publisher: Publisher,
    names: Names,
    state: Arc<WorkerState>,
    stop: CancellationToken,
    failed: mpsc::Sender<BrokerError>,
) {
    let mut tick = tokio::time::interval(state.heartbeat);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = state.held();
        let beat = Heartbeat {
            worker: state.id.clone(),
            host: state.host.clone(),
            pid: std::process::id(),
            operations: state.registry.names(),
            prefetch: state.prefetch,
            fragments_in_flight: held.values().sum(),
            held_by_operation: held,
            started_at_ms: state.started_at_ms,
            at_ms: common::timefmt::now_ms(),
            interval_ms: state.heartbeat.as_millis() as u64,
        };
        let Ok(body) = serde_json::to_vec(&beat) else {
            continue;
        };
        // A lost heartbeat is harmless; do not hold anything up waiting for its confirm.
        match publisher
            .start(
                &names.events(),
                KEY_HEARTBEAT,
                &body,
                transient_json_properties(),
            )
            .await
        {
            Ok(pending) => {
                tokio::spawn(async move {
                    let _ = pending.wait().await;
                });
            }
            Err(error) => {
                let _ = failed.try_send(error);
                return;
            }
        }
    }
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
