//! The worker: a masterless competing consumer of fragments. It runs each fragment's
//! operations, publishes a confirmed report, and only then acknowledges the fragment, so a
//! worker that dies leaves its fragments to the broker, which hands them to another worker.

pub mod builtin;
pub mod operation;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use common::broker::{Broker, BrokerError, Publisher, json_properties, transient_json_properties};
use common::config::BrokerArgs;
use common::consume::consume;
use common::lapin::message::Delivery;
use common::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
};
use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use common::supervise::{Retryable, supervise};
use common::topology::{KEY_HEARTBEAT, KEY_REDUCER, Names, declare_work_queue};
use common::wire::{Control, Fragment, Heartbeat};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::operation::{OpError, OpInput, Operation, Registry};
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
}

impl WorkerConfig {
    pub fn new(broker: BrokerArgs) -> Self {
        Self {
            broker,
            prefetch: 4,
            operations: None,
            heartbeat_ms: 2000,
        }
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
    tracing::info!(worker = %state.id, operations = ?state.registry.names(), prefetch = state.prefetch, "worker starting");
    supervise("worker", &shutdown, || session(&broker, &state, &shutdown)).await?;
    tracing::info!(worker = %state.id, "worker stopped");
    Ok(())
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
    let mut streams = Vec::new();
    let mut tags = Vec::new();
    for operation in state.registry.names() {
        declare_work_queue(&channel, &names, &operation)
            .await
            .map_err(BrokerError::from)?;
        let tag = format!("{}:{operation}", state.id);
        streams.push(consume(&channel, &names.work_queue(&operation), &tag).await?);
        tags.push(tag);
    }
    let control = listen_to_control(&session, &names, state).await?;
    let mut deliveries = futures::stream::select_all(streams);

    // Tasks report broker failures here; one ends the session.
    let (failed_tx, mut failed_rx) = mpsc::channel::<BrokerError>(1);
    let tracker = TaskTracker::new();
    let running = Arc::new(Semaphore::new(usize::from(state.prefetch)));
    let session_stop = shutdown.child_token();
    let heartbeat = tokio::spawn(heartbeats(
        publisher.clone(),
        names.clone(),
        Arc::clone(state),
        session_stop.clone(),
    ));

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(error) = failed_rx.recv() => break Err(WorkerError::from(error)),
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    spawn_fragment(&tracker, delivery, &publisher, &names, state, &running, shutdown, &failed_tx);
                }
                Some(Err(e)) => break Err(BrokerError::from(e).into()),
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
                &tracker, delivery, &publisher, &names, state, &running, shutdown, &failed_tx,
            );
        }
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
    shutdown: &CancellationToken,
    failed: &mpsc::Sender<BrokerError>,
) {
    let publisher = publisher.clone();
    let names = names.clone();
    let state = Arc::clone(state);
    let running = Arc::clone(running);
    let shutdown = shutdown.clone();
    let failed = failed.clone();
    // Fragments are published with their operation as routing key.
    let operation = delivery.routing_key.as_str().to_owned();
    state.hold(&operation, true);
    tracker.spawn(async move {
        let outcome = match running.acquire_owned().await {
            Ok(_permit) => handle_fragment(&delivery, &publisher, &names, &state, &shutdown).await,
            Err(_) => Ok(()),
        };
        state.hold(&operation, false);
        if let Err(error) = outcome {
            tracing::warn!(error = %error, "fragment not acknowledged; the broker will redeliver it");
            let _ = failed.try_send(error);
        }
    });
}

/// Runs one delivered fragment, publishes its report (confirmed), then acks it.
async fn handle_fragment(
    delivery: &Delivery,
    publisher: &Publisher,
    names: &Names,
    state: &WorkerState,
    shutdown: &CancellationToken,
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
        shutdown,
    )
    .await;
    tracing::debug!(job_id = %report.job_id, fragment = report.fragment, done = report.done, cut = ?report.cut, "fragment ended");
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
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from("x-batchq-error"),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    publisher
        .start_with(
            &names.dead(),
            delivery.routing_key.as_str(),
            &delivery.data,
            properties,
            true,
        )
        .await?
        .wait()
        .await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Binds a private queue to `{ns}.control` and applies what arrives (cancellations).
async fn listen_to_control(
    session: &common::broker::Session,
    names: &Names,
    state: &Arc<WorkerState>,
) -> Result<tokio::task::JoinHandle<()>, BrokerError> {
    let channel = session.consumer_channel(16).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            names.control().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            format!("{}:control", state.id).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let state = Arc::clone(state);
    Ok(tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
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

async fn heartbeats(
    publisher: Publisher,
    names: Names,
    state: Arc<WorkerState>,
    stop: CancellationToken,
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
        if let Ok(pending) = publisher
            .start(
                &names.events(),
                KEY_HEARTBEAT,
                &body,
                transient_json_properties(),
            )
            .await
        {
            tokio::spawn(async move {
                let _ = pending.wait().await;
            });
        }
    }
}
