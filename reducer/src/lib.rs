//! The reducer: folds fragment reports into exact job status, keeps results, publishes
//! JobStatus records, settles fragments for the splitter, and answers `batchctl` over the
//! broker.

pub mod aggregate;
pub mod fold;
pub mod monitor;
pub mod rpc;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use common::broker::{Broker, BrokerError, PendingConfirm, Publisher, json_properties};
use common::config::BrokerArgs;
use common::consume::{ack_batch, consume, next_batch};
use common::contract::JobStatus;
use common::lapin::message::Delivery;
use common::supervise::{Retryable, supervise};
use common::topology::{KEY_METRICS, KEY_POISON, KEY_SETTLED, Names};
use common::wire::{Fragment, FragmentReport, Heartbeat, ReducerInput, encode_splitter_inputs};
use tokio_util::sync::CancellationToken;

use crate::store::{ReducerQueries, ReducerStore, SqliteQueries, SqliteStore, StoreError};

/// Settings of the reducer.
#[derive(Debug, Clone, Args)]
pub struct ReducerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Folder of the embedded state store (the reducer uses its `reducer/` subfolder).
    #[arg(long = "data-dir", env = "BATCHQ_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address of the Prometheus endpoint (`GET /metrics`); `off` to serve none.
    #[arg(
        long = "metrics-addr",
        env = "BATCHQ_METRICS_ADDR",
        default_value = "0.0.0.0:9464"
    )]
    pub metrics_addr: String,

    /// Milliseconds between MetricBatch records on `{ns}.metrics` (one per interval in which
    /// anything happened).
    #[arg(
        long = "metrics-interval-ms",
        env = "BATCHQ_METRICS_INTERVAL_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub metrics_interval_ms: u64,

    /// Seconds a finished job's Prometheus series stay before they are dropped.
    #[arg(
        long = "finished-job-series-secs",
        env = "BATCHQ_FINISHED_JOB_SERIES_SECS",
        default_value_t = 300
    )]
    pub finished_job_series_secs: u64,
}

impl ReducerConfig {
    pub fn new(broker: BrokerArgs, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            broker,
            data_dir: data_dir.into(),
            metrics_addr: "off".to_owned(),
            metrics_interval_ms: 10_000,
            finished_job_series_secs: 300,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.data_dir
            .join("reducer")
            .join(format!("{}.db", self.broker.namespace))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReducerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

impl Retryable for ReducerError {
    fn is_retryable(&self) -> bool {
        match self {
            ReducerError::Broker(e) => e.is_retryable(),
            ReducerError::Store(_) | ReducerError::Join(_) | ReducerError::Metrics(_) => false,
        }
    }
}

/// Deliveries folded per transaction.
const BATCH: usize = 512;
/// JobStatus of every running job goes out at least this often.
const STATUS_INTERVAL: Duration = Duration::from_millis(1000);

/// Live workers by id, from their heartbeats.
pub type WorkerTable = Arc<Mutex<HashMap<String, (Heartbeat, i64)>>>;

struct Shared {
    store: Mutex<SqliteStore>,
    path: PathBuf,
    workers: WorkerTable,
    /// Whether the Prometheus endpoint is served (then queues are polled for its gauges).
    prometheus: bool,
    metrics_interval: Duration,
}

/// How often the queue gauges are refreshed.
const QUEUE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the reducer until `shutdown` fires (or a fault that reconnecting cannot mend).
pub async fn run(config: ReducerConfig, shutdown: CancellationToken) -> Result<(), ReducerError> {
    let path = config.store_path();
    let prometheus = config.metrics_addr != "off" && !config.metrics_addr.is_empty();
    if prometheus {
        monitor::install(
            &config.metrics_addr,
            Duration::from_secs(config.finished_job_series_secs),
        )?;
    }
    let shared = Arc::new(Shared {
        store: Mutex::new(SqliteStore::open(&path)?),
        path: path.clone(),
        workers: WorkerTable::default(),
        prometheus,
        metrics_interval: Duration::from_millis(config.metrics_interval_ms),
    });
    let broker = Broker::new(&config.broker, "batchq-reducer")?;
    tracing::info!(store = %path.display(), namespace = %config.broker.namespace, "reducer starting");
    supervise("reducer", &shutdown, || {
        session(&broker, &shared, &shutdown)
    })
    .await?;
    tracing::info!("reducer stopped");
    Ok(())
}

async fn session(
    broker: &Broker,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), ReducerError> {
    broker.declare_topology().await?;
    let names = broker.names().clone();
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    let stop = shutdown.child_token();
    let result = tokio::select! {
        r = fold_events(&session, &names, &publisher, shared, &stop) => r,
        r = rpc::serve(&session, &names, shared.path.clone(), Arc::clone(&shared.workers), &stop) => r,
        r = track_workers(&session, &names, Arc::clone(&shared.workers), &stop) => r,
        r = poll_queues(&session, &names, shared, &stop) => r,
    };
    stop.cancel();
    result
}

/// Decodes a delivery of `{ns}.reducer`. A fragment dead-lettered as poison becomes a report
/// in which every operation failed.
fn decode(delivery: &Delivery) -> Result<ReducerInput, String> {
    if delivery.routing_key.as_str() == KEY_POISON {
        let fragment: Fragment = serde_json::from_slice(&delivery.data)
            .map_err(|e| format!("poison message is not a fragment: {e}"))?;
        return Ok(ReducerInput::Fragment(poison_report(fragment)));
    }
    serde_json::from_slice(&delivery.data).map_err(|e| format!("not a reducer input: {e}"))
}

fn poison_report(fragment: Fragment) -> FragmentReport {
    let n = fragment.indices.len() as u32;
    let error = format!(
        "fragment {} was delivered {} times and never finished: it killed or hung its workers",
        fragment.fragment,
        common::topology::MAX_DELIVERIES
    );
    FragmentReport {
        job_id: fragment.job_id,
        fragment: fragment.fragment,
        operation: fragment.operation,
        // A fragment that killed its workers again and again is not tried again: its
        // failures are final, whatever attempt it was.
        attempt: u32::MAX,
        worker: String::new(),
        indices: fragment.indices,
        done: n,
        failures: (0..n)
            .map(|offset| common::wire::Failure {
                offset,
                error: error.clone(),
            })
            .collect(),
        results: Vec::new(),
        cut: None,
        started_at_ms: common::timefmt::now_ms(),
        elapsed_us: 0,
        measurements: Default::default(),
    }
}

/// The main loop: batches of inputs folded and committed, then their effects published and
/// confirmed, then the batch acked with one multiple-ack. Between batches, once a second, the
/// status of every running job. One task does both, so a job's terminal status is always the
/// last one published for it.
async fn fold_events(
    session: &common::broker::Session,
    names: &Names,
    publisher: &Publisher,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<(), ReducerError> {
    let channel = session.consumer_channel(BATCH as u16).await?;
    let mut consumer = consume(&channel, &names.reducer_queue(), "reducer").await?;
    let mut ticker = tokio::time::interval(STATUS_INTERVAL);
    let mut metric_ticker = tokio::time::interval(shared.metrics_interval);
    metric_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut interval_start_ms = common::timefmt::now_ms();
    let mut queries = SqliteQueries::open(&shared.path)?;
    loop {
        let batch = tokio::select! {
            _ = ticker.tick() => {
                let active = queries.active_jobs()?;
                if shared.prometheus {
                    monitor::record_jobs(&queries.jobs_by_state()?, &active);
                }
                let pending = publish_statuses(publisher, names, &active).await?;
                common::broker::wait_all(pending).await?;
                continue;
            }
            _ = metric_ticker.tick() => {
                interval_start_ms = publish_metric_batch(publisher, names, shared, interval_start_ms).await?;
                continue;
            }
            batch = next_batch(&mut consumer, BATCH, stop) => batch?,
        };
        let Some(batch) = batch else { return Ok(()) };
        let mut inputs = Vec::with_capacity(batch.len());
        for delivery in &batch {
            match decode(delivery) {
                Ok(input) => inputs.push(input),
                Err(reason) => {
                    tracing::warn!(%reason, "keeping an undecodable message on the dead-letter queue");
                    common::dead::keep(publisher, names, delivery, &reason, None).await?;
                }
            }
        }
        let now = common::timefmt::now_ms();
        let worker_shared = Arc::clone(shared);
        let effects = tokio::task::spawn_blocking(move || {
            let mut store = worker_shared
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            store.transaction(|tx| fold::apply(tx, inputs, now))
        })
        .await??;
        if shared.prometheus {
            monitor::record(&effects.measured);
            let ended: Vec<JobStatus> = effects
                .status_changes
                .iter()
                .filter(|s| s.state.is_terminal())
                .cloned()
                .collect();
            if !ended.is_empty() {
                monitor::record_jobs(&queries.jobs_by_state()?, &ended);
            }
        }
        let mut pending = publish_statuses(publisher, names, &effects.status_changes).await?;
        for body in encode_splitter_inputs(&effects.settled).map_err(BrokerError::from)? {
            pending.push(
                publisher
                    .start_with(&names.events(), KEY_SETTLED, &body, json_properties(), true)
                    .await?,
            );
        }
        common::broker::wait_all(pending).await?;
        ack_batch(&batch).await?;
    }
}

/// Publishes the pending measurements as one MetricBatch (confirmed), then forgets them.
/// Returns the start of the next interval.
async fn publish_metric_batch(
    publisher: &Publisher,
    names: &Names,
    shared: &Arc<Shared>,
    interval_start_ms: i64,
) -> Result<i64, ReducerError> {
    let now = common::timefmt::now_ms();
    let store_shared = Arc::clone(shared);
    let sealed = tokio::task::spawn_blocking(move || {
        let mut store = store_shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.transaction(|tx| tx.seal_metric_batch())
    })
    .await??;
    let Some((seq, measured)) = sealed else {
        return Ok(now);
    };
    if let Some(batch) = aggregate::batch(seq, names.namespace(), interval_start_ms, now, &measured)
    {
        let body = serde_json::to_vec(&batch).map_err(BrokerError::from)?;
        publisher
            .start(&names.metrics(), KEY_METRICS, &body, json_properties())
            .await?
            .wait()
            .await?;
    }
    let store_shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        let mut store = store_shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.transaction(|tx| tx.metric_batch_published(seq))
    })
    .await??;
    Ok(now)
}

/// Refreshes the queue and worker gauges of the Prometheus endpoint.
async fn poll_queues(
    session: &common::broker::Session,
    names: &Names,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<(), ReducerError> {
    if !shared.prometheus {
        stop.cancelled().await;
        return Ok(());
    }
    let mut queries = SqliteQueries::open(&shared.path)?;
    let mut ticker = tokio::time::interval(QUEUE_POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let (live, held) = monitor::live_workers(&shared.workers, common::timefmt::now_ms());
        metrics::gauge!("batchq_workers_live").set(live as f64);
        let mut operations: std::collections::BTreeSet<String> = held.keys().cloned().collect();
        operations.extend(
            queries
                .active_jobs()?
                .into_iter()
                .filter_map(|j| j.operation),
        );
        monitor::record_queues(session, names, &operations, &held).await?;
    }
}

async fn publish_statuses(
    publisher: &Publisher,
    names: &Names,
    statuses: &[JobStatus],
) -> Result<Vec<PendingConfirm>, ReducerError> {
    let mut pending = Vec::with_capacity(statuses.len());
    for status in statuses {
        let body = serde_json::to_vec(status).map_err(BrokerError::from)?;
        pending.push(
            publisher
                .start(
                    &names.status(),
                    &status.routing_key(),
                    &body,
                    json_properties(),
                )
                .await?,
        );
    }
    Ok(pending)
}

/// Keeps the table of live workers from their heartbeats.
async fn track_workers(
    session: &common::broker::Session,
    names: &Names,
    workers: WorkerTable,
    stop: &CancellationToken,
) -> Result<(), ReducerError> {
    let channel = session.consumer_channel(64).await?;
    let mut consumer = consume(&channel, &names.heartbeats_queue(), "reducer-heartbeats").await?;
    while let Some(batch) = next_batch(&mut consumer, 64, stop).await? {
        {
            let mut table = workers.lock().unwrap_or_else(|p| p.into_inner());
            for delivery in &batch {
                match serde_json::from_slice::<Heartbeat>(&delivery.data) {
                    Ok(beat) => {
                        table.insert(beat.worker.clone(), (beat, common::timefmt::now_ms()));
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed heartbeat"),
                }
            }
        }
        ack_batch(&batch).await?;
    }
    Ok(())
}
