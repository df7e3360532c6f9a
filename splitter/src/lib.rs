//! The splitter: validates JobSpecs, records jobs, and releases each job's fragments within
//! its `max_concurrent_fragments` window, releasing the next fragment when the reducer
//! settles one.

pub mod intake;
pub mod retention;
pub mod store;
pub mod window;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use common::broker::{Broker, BrokerError, Publisher, Session};
use common::config::BrokerArgs;
use common::consume::{ack_batch, consume, next_batch};
use common::jobspec::ParseLimits;
use common::lapin::BasicProperties;
use common::retention::Retention;
use common::supervise::{Retryable, supervise};
use common::topology::{Names, declare_work_queue};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{SplitterStore, SqliteStore, StoreError};
use crate::window::{Command, apply};

/// Settings of the splitter.
#[derive(Debug, Clone, Args)]
pub struct SplitterConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Folder of the embedded state store (the splitter uses its `splitter/` subfolder).
    #[arg(long = "data-dir", env = "BATCHQ_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Largest JobSpec message accepted, in bytes.
    #[arg(long = "max-message-bytes", env = "BATCHQ_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Address of a Prometheus endpoint (`GET /metrics`) for this splitter; none unless set.
    #[arg(long = "metrics-addr", env = "BATCHQ_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// The broker's consumer_timeout in milliseconds; 0 if disabled on the broker. A JobSpec
    /// whose lifespan_ms exceeds a third of it is rejected.
    #[arg(long = "consumer-timeout-ms", env = "BATCHQ_CONSUMER_TIMEOUT_MS", default_value_t = common::jobspec::DEFAULT_CONSUMER_TIMEOUT_MS)]
    pub consumer_timeout_ms: u64,

    /// How long a finished job's bookkeeping is kept after it ended (`90s`, `30m`, `12h`,
    /// `7d`); `0` keeps it for ever.
    #[arg(
        long = "retention",
        env = "BATCHQ_RETENTION",
        default_value = common::retention::DEFAULT_RETENTION,
        value_parser = Retention::parse
    )]
    pub retention: Retention,
}

impl SplitterConfig {
    pub fn new(broker: BrokerArgs, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            broker,
            data_dir: data_dir.into(),
            max_message_bytes: ParseLimits::default().max_message_bytes,
            metrics_addr: None,
            consumer_timeout_ms: ParseLimits::default().consumer_timeout_ms,
            retention: Retention::DEFAULT,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.data_dir
            .join("splitter")
            .join(format!("{}.db", self.broker.namespace))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SplitterError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("splitter store: {0}")]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

impl Retryable for SplitterError {
    fn is_retryable(&self) -> bool {
        match self {
            SplitterError::Broker(e) => e.is_retryable(),
            // A store that fails (disk full, corrupt file) will not heal by reconnecting.
            SplitterError::Store(_) | SplitterError::Join(_) | SplitterError::Metrics(_) => false,
        }
    }
}

type SharedStore = Arc<Mutex<SqliteStore>>;

/// Deliveries taken per transaction.
const BATCH: usize = 256;
/// Outbox messages published per round of confirms.
const OUTBOX_ROUND: usize = 512;
/// Most settlements applied in one transaction.
const COMMANDS_PER_COMMIT: usize = 1024;

/// Runs the splitter until `shutdown` fires (or a fault that reconnecting cannot mend).
pub async fn run(config: SplitterConfig, shutdown: CancellationToken) -> Result<(), SplitterError> {
    let path = config.store_path();
    let store: SharedStore = Arc::new(Mutex::new(SqliteStore::open(&path)?));
    let pruning = retention::Pruning::open(&path, config.retention)?;
    common::telemetry::serve_prometheus(config.metrics_addr.as_deref())
        .map_err(SplitterError::Metrics)?;
    let broker = Broker::new(&config.broker, "batchq-splitter")?;
    let limits = ParseLimits {
        max_message_bytes: config.max_message_bytes,
        consumer_timeout_ms: config.consumer_timeout_ms,
    };
    tracing::info!(store = %path.display(), namespace = %config.broker.namespace, "splitter starting");
    let outbox_ready = Arc::new(Notify::new());
    let pruning_task = tokio::spawn(pruning.run(shutdown.clone()));
    let outcome = supervise("splitter", &shutdown, || {
        session(&broker, &store, &outbox_ready, limits, &shutdown)
    })
    .await;
    // The sweep ends with the shutdown; after a fault it is stopped here.
    pruning_task.abort();
    outcome?;
    tracing::info!("splitter stopped");
    Ok(())
}

async fn session(
    broker: &Broker,
    store: &SharedStore,
    outbox_ready: &Arc<Notify>,
    limits: ParseLimits,
    shutdown: &CancellationToken,
) -> Result<(), SplitterError> {
    broker.declare_topology().await?;
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    // Whatever an earlier session committed and did not get confirmed goes out first.
    outbox_ready.notify_one();
    let stop = shutdown.child_token();
    let result = tokio::select! {
        r = intake_jobs(&session, broker.names(), store, outbox_ready, limits, &stop) => r,
        r = intake_settled(&session, broker.names(), store, outbox_ready, &stop) => r,
        r = pump_outbox(broker, &publisher, store, outbox_ready, &stop) => r,
    };
    stop.cancel();
    result
}

/// Applies `commands` in one transaction on the blocking pool and wakes the outbox pump.
async fn commit(
    store: &SharedStore,
    names: Names,
    commands: Vec<Command>,
    outbox_ready: &Notify,
) -> Result<(), SplitterError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let mut store = store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        store.transaction(|tx| apply(tx, &names, commands))
    })
    .await??;
    outbox_ready.notify_one();
    Ok(())
}

async fn intake_jobs(
    session: &Session,
    names: &Names,
    store: &SharedStore,
    outbox_ready: &Notify,
    limits: ParseLimits,
    stop: &CancellationToken,
) -> Result<(), SplitterError> {
    let channel = session.consumer_channel(BATCH as u16).await?;
    let mut consumer = consume(&channel, &names.jobs(), "splitter-jobs").await?;
    while let Some(batch) = next_batch(&mut consumer, BATCH, stop).await? {
        let at_ms = common::timefmt::now_ms();
        let commands = batch
            .iter()
            .map(|d| intake::job_command(d, limits, at_ms))
            .collect();
        commit(store, names.clone(), commands, outbox_ready).await?;
        ack_batch(&batch).await?;
    }
    Ok(())
}

async fn intake_settled(
    session: &Session,
    names: &Names,
    store: &SharedStore,
    outbox_ready: &Notify,
    stop: &CancellationToken,
) -> Result<(), SplitterError> {
    let channel = session.consumer_channel(BATCH as u16).await?;
    let mut consumer = consume(&channel, &names.splitter_queue(), "splitter-settled").await?;
    while let Some(batch) = next_batch(&mut consumer, BATCH, stop).await? {
        // A message holds up to 256 settlements: commit them in bounded transactions, so a
        // burst does not hold the store (and the intake of jobs) for long. Applying one again
        // after a crash between commits changes nothing.
        let mut commands: Vec<Command> = batch.iter().flat_map(intake::settled).collect();
        while !commands.is_empty() {
            let rest = commands.split_off(commands.len().min(COMMANDS_PER_COMMIT));
            commit(store, names.clone(), commands, outbox_ready).await?;
            commands = rest;
        }
        ack_batch(&batch).await?;
    }
    Ok(())
}

/// Publishes committed outbox messages in rounds: publish a round, await all its confirms,
/// then forget it. A crash in between re-publishes the round: duplicates, never losses.
async fn pump_outbox(
    broker: &Broker,
    publisher: &Publisher,
    store: &SharedStore,
    outbox_ready: &Notify,
    stop: &CancellationToken,
) -> Result<(), SplitterError> {
    let names = broker.names().clone();
    let mut declared_work_queues = std::collections::HashSet::new();
    loop {
        let round = {
            let store = Arc::clone(store);
            tokio::task::spawn_blocking(move || {
                let mut store = store
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                store.outbox(OUTBOX_ROUND)
            })
            .await??
        };
        let Some(last_seq) = round.last().map(|m| m.seq) else {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = outbox_ready.notified() => continue,
            }
        };
        let batch_len = round.len() as u64;
        let mut pending = Vec::with_capacity(round.len());
        for message in round {
            if message.exchange == names.work()
                && !declared_work_queues.contains(&message.routing_key)
            {
                // A fragment for an operation nobody offers yet waits, visibly, in its queue.
                common::broker::answered(
                    &format!(
                        "the declaration of {}",
                        names.work_queue(&message.routing_key)
                    ),
                    declare_work_queue(publisher.channel(), &names, &message.routing_key),
                )
                .await?;
                declared_work_queues.insert(message.routing_key.clone());
            }
            let properties: BasicProperties = serde_json::from_str(&message.properties)
                .map_err(|e| StoreError::Corrupt(format!("outbox properties: {e}")))?;
            pending.push(
                publisher
                    .start_with(
                        &message.exchange,
                        &message.routing_key,
                        &message.body,
                        properties,
                        message.mandatory,
                    )
                    .await?,
            );
        }
        common::broker::wait_all(pending).await?;
        metrics::counter!("batchq_splitter_messages_published_total").increment(batch_len);
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || {
            let mut store = store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            store.outbox_confirmed(last_seq)
        })
        .await??;
    }
}
