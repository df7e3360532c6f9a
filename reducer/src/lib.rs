//! The reducer: folds fragment reports into exact job status, keeps results, publishes
//! JobStatus records, settles fragments for the splitter, and answers `batchctl` over the
//! broker.

pub mod fold;
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
use common::topology::{KEY_POISON, KEY_SETTLED, Names};
use common::wire::{Fragment, FragmentReport, Heartbeat, ReducerInput};
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
}

impl ReducerConfig {
    pub fn new(broker: BrokerArgs, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            broker,
            data_dir: data_dir.into(),
            metrics_addr: "off".to_owned(),
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
}

/// Runs the reducer until `shutdown` fires (or a fault that reconnecting cannot mend).
pub async fn run(config: ReducerConfig, shutdown: CancellationToken) -> Result<(), ReducerError> {
    let path = config.store_path();
    let shared = Arc::new(Shared {
        store: Mutex::new(SqliteStore::open(&path)?),
        path: path.clone(),
        workers: WorkerTable::default(),
    });
    if config.metrics_addr != "off" && !config.metrics_addr.is_empty() {
        install_metrics(&config.metrics_addr)?;
    }
    let broker = Broker::new(&config.broker, "batchq-reducer")?;
    tracing::info!(store = %path.display(), namespace = %config.broker.namespace, "reducer starting");
    supervise("reducer", &shutdown, || {
        session(&broker, &shared, &shutdown)
    })
    .await?;
    tracing::info!("reducer stopped");
    Ok(())
}

fn install_metrics(addr: &str) -> Result<(), ReducerError> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| ReducerError::Metrics(format!("{addr:?} is not an address: {e}")))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| ReducerError::Metrics(format!("cannot serve on {addr}: {e}")))
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
        common::topology::DELIVERY_LIMIT
    );
    FragmentReport {
        job_id: fragment.job_id,
        fragment: fragment.fragment,
        operation: fragment.operation,
        attempt: fragment.attempt,
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
    let mut queries = SqliteQueries::open(&shared.path)?;
    loop {
        let batch = tokio::select! {
            _ = ticker.tick() => {
                let active = queries.active_jobs()?;
                let pending = publish_statuses(publisher, names, &active).await?;
                common::broker::wait_all(pending).await?;
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
                    publisher
                        .start_with(
                            &names.dead(),
                            delivery.routing_key.as_str(),
                            &delivery.data,
                            delivery.properties.clone(),
                            true,
                        )
                        .await?
                        .wait()
                        .await?;
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
        for (operation, succeeded, failed) in &effects.recorded {
            metrics::counter!("batchq_operations_total", "operation" => operation.clone(), "outcome" => "succeeded").increment(*succeeded);
            metrics::counter!("batchq_operations_total", "operation" => operation.clone(), "outcome" => "failed").increment(*failed);
            metrics::counter!("batchq_fragments_total", "operation" => operation.clone())
                .increment(1);
        }
        let mut pending = publish_statuses(publisher, names, &effects.status_changes).await?;
        for settled in &effects.settled {
            let body = serde_json::to_vec(settled).map_err(BrokerError::from)?;
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
