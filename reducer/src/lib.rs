//! The reducer: folds fragment reports into exact job status, keeps results, publishes
//! JobStatus records, settles fragments for the splitter, and answers `batchctl` over the
//! broker.

pub mod aggregate;
pub mod backend;
pub mod fold;
pub mod monitor;
pub mod pg_store;
pub mod retention;
pub mod rpc;
pub mod store;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use common::broker::{Broker, BrokerError, PendingConfirm, Publisher, json_properties};
use common::config::BrokerArgs;
use common::consume::{ack_batch, consume, next_batch};
use common::contract::JobStatus;
use common::health::{AnyBeat, ServiceBeat};
use common::lapin::message::Delivery;
use common::retention::Retention;
use common::store::StoreHealth;
use common::supervise::supervise;
use common::topology::{KEY_METRICS, KEY_POISON, KEY_SETTLED, Names};
use common::wire::{Fragment, FragmentReport, Heartbeat, ReducerInput, encode_splitter_inputs};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::backend::{Place, Queries, Store};
use crate::store::{ReducerQueries, ReducerStore, StoreError};

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

    /// How long a finished job's status and results are kept after it ended (`90s`, `30m`,
    /// `12h`, `7d`); `0` keeps them for ever.
    #[arg(
        long = "retention",
        env = "BATCHQ_RETENTION",
        default_value = common::retention::DEFAULT_RETENTION,
        value_parser = Retention::parse
    )]
    pub retention: Retention,

    /// `postgres://user@host:port/db`: keep the state in PostgreSQL instead of the embedded
    /// store; then any number of reducer replicas may run, one active at a time.
    #[arg(long = "database-url", env = "BATCHQ_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl ReducerConfig {
    pub fn new(broker: BrokerArgs, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            broker,
            data_dir: data_dir.into(),
            metrics_addr: "off".to_owned(),
            metrics_interval_ms: 10_000,
            finished_job_series_secs: 300,
            retention: Retention::DEFAULT,
            database_url: None,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.data_dir
            .join("reducer")
            .join(format!("{}.db", self.broker.namespace))
    }
}

/// The reducer's errors: the shape both services share.
pub type ReducerError = common::service::ServiceError;

/// Deliveries folded per transaction.
const BATCH: usize = 512;
/// JobStatus of every running job goes out at least this often.
const STATUS_INTERVAL: Duration = Duration::from_millis(1000);

/// Live workers by id, from their heartbeats.
pub type WorkerTable = Arc<Mutex<HashMap<String, (Heartbeat, i64)>>>;
/// Splitters by instance, from their beats, with when each was heard.
pub type ServiceTable = Arc<Mutex<HashMap<String, (ServiceBeat, i64)>>>;

struct Shared {
    store: Arc<Mutex<Store>>,
    /// The read-only connection of the fold loop's status ticks and the queue poller, opened
    /// on first use.
    queries: Mutex<Option<Queries>>,
    /// The store fault being waited out, if any, for `batchctl health`.
    health: StoreHealth,
    place: Place,
    workers: WorkerTable,
    services: ServiceTable,
    started_at_ms: i64,
    pruning: retention::Pruning,
    /// Whether the Prometheus endpoint is served (then queues are polled for its gauges).
    prometheus: bool,
    metrics_interval: Duration,
}

impl Shared {
    /// Runs `f` in one store transaction on the blocking pool. Once: see [`Shared::write`].
    async fn transaction_once<R, F>(self: &Arc<Self>, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn store::ReducerTx) -> Result<R, StoreError> + Send + 'static,
    {
        common::store::blocking_locked(&self.store, move |store: &mut Store| store.transaction(f))
            .await
    }

    /// Runs the transaction `make()` builds, building it afresh and trying again while the
    /// store fails transiently (a full disk, a locked database): the caller holds its
    /// unacknowledged messages meanwhile, and nothing is redelivered or dead-lettered.
    async fn write<R, F>(
        self: &Arc<Self>,
        (stop, task): (&CancellationToken, &'static str),
        mut make: impl FnMut() -> F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn store::ReducerTx) -> Result<R, StoreError> + Send + 'static,
    {
        common::store::retry("reducer", task, &self.health, stop, || {
            self.transaction_once(make())
        })
        .await
    }

    /// Runs `f` on the read-only connection on the blocking pool, waiting out transient
    /// faults as [`Shared::write`] does.
    async fn read<R, F>(
        self: &Arc<Self>,
        (stop, task): (&CancellationToken, &'static str),
        f: F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: Fn(&mut Queries) -> Result<R, StoreError> + Clone + Send + 'static,
    {
        common::store::retry("reducer", task, &self.health, stop, || {
            let shared = Arc::clone(self);
            let f = f.clone();
            common::store::blocking(move || {
                let mut queries = shared.queries.lock().unwrap_or_else(|p| p.into_inner());
                if queries.is_none() {
                    *queries = Some(shared.place.queries()?);
                }
                match queries.as_mut() {
                    Some(q) => f(q),
                    None => Err(StoreError::Corrupt("read connection missing".into())),
                }
            })
        })
        .await
    }
}

/// How often the queue gauges are refreshed.
const QUEUE_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the reducer until `shutdown` fires (or a fault that reconnecting cannot mend): alone
/// on the embedded store, or as one replica of several on PostgreSQL, active while it holds
/// the lease (see [`common::role::lead`]).
pub async fn run(config: ReducerConfig, shutdown: CancellationToken) -> Result<(), ReducerError> {
    let prometheus = config.metrics_addr != "off" && !config.metrics_addr.is_empty();
    if prometheus {
        monitor::install(
            &config.metrics_addr,
            Duration::from_secs(config.finished_job_series_secs),
        )?;
    }
    let broker = Broker::new(&config.broker, "batchq-reducer")?;
    let namespace = &config.broker.namespace;
    let outcome = match &config.database_url {
        None => {
            let place = Place::Sqlite(config.store_path());
            tracing::info!(store = %place.describe(), %namespace, retention = %config.retention, "reducer starting");
            common::role::set_leader("reducer", true);
            run_active(&broker, place, &config, prometheus, &shutdown).await
        }
        Some(url) => {
            let (db, elector) = common::role::postgres(
                url,
                namespace,
                "reducer",
                pg_store::PG_MIGRATIONS,
                &shutdown,
            )
            .await?;
            tracing::info!(schema = db.schema(), %namespace, replica = elector.holder(), retention = %config.retention, "reducer starting");
            common::role::lead(&elector, &broker, &shutdown, |fence, stop| {
                let place = Place::Pg(db.clone(), fence);
                let (broker, config) = (&broker, &config);
                async move { run_active(broker, place, config, prometheus, &stop).await }
            })
            .await
        }
    };
    outcome?;
    tracing::info!("reducer stopped");
    Ok(())
}

/// The reducer's work while it is the active one: until `shutdown` (or, on PostgreSQL, until
/// it loses the lease).
async fn run_active(
    broker: &Broker,
    place: Place,
    config: &ReducerConfig,
    prometheus: bool,
    shutdown: &CancellationToken,
) -> Result<(), ReducerError> {
    let store = place.store()?;
    let pruning = retention::Pruning::new(place.pruner()?, config.retention);
    let shared = Arc::new(Shared {
        store: Arc::new(Mutex::new(store)),
        queries: Mutex::new(None),
        health: StoreHealth::default(),
        place,
        workers: WorkerTable::default(),
        services: ServiceTable::default(),
        started_at_ms: common::timefmt::now_ms(),
        pruning: pruning.clone(),
        prometheus,
        metrics_interval: Duration::from_millis(config.metrics_interval_ms),
    });
    let pruning_task = tokio::spawn(pruning.run(shutdown.clone()));
    let outcome = supervise("reducer", shutdown, || session(broker, &shared, shutdown)).await;
    // The sweep ends with the shutdown; after a fault it is stopped here.
    pruning_task.abort();
    outcome
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
        r = rpc::serve(&session, &names, shared.place.clone(), rpc::Tables { workers: Arc::clone(&shared.workers), services: Arc::clone(&shared.services), health: shared.health.clone(), started_at_ms: shared.started_at_ms, pruning: shared.pruning.clone() }, &stop) => r,
        r = track_heartbeats(&session, &names, shared, &stop) => r,
        r = poll_queues(&session, &names, shared, &stop) => r,
    };
    stop.cancel();
    result
}

/// Decodes a delivery of `{ns}.reducer`: one input, or the reports of several fragments a
/// worker sent together. A fragment dead-lettered as poison becomes a report in which every
/// operation failed. A message with one unusable input is refused whole.
fn decode(delivery: &Delivery) -> Result<Vec<ReducerInput>, String> {
    if delivery.routing_key.as_str() == KEY_POISON {
        let fragment: Fragment = serde_json::from_slice(&delivery.data)
            .map_err(|e| format!("poison message is not a fragment: {e}"))?;
        return Ok(vec![ReducerInput::Fragment(poison_report(fragment))]);
    }
    let inputs = common::wire::decode_reducer_message(&delivery.data)
        .map_err(|e| format!("not a reducer input: {e}"))?;
    // Every id batchq writes was validated at intake; one that is not valid did not come
    // from batchq, and a store may not hold it (PostgreSQL text holds no NUL).
    if let Some(input) = inputs
        .iter()
        .find(|input| !common::jobspec::valid_id(input.job_id()))
    {
        return Err(format!(
            "not a reducer input: job_id {:?} is not a valid job id",
            input.job_id().chars().take(64).collect::<String>()
        ));
    }
    Ok(inputs)
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
                permanent: true,
            })
            .collect(),
        results: Vec::new(),
        cut: None,
        started_at_ms: common::timefmt::now_ms(),
        elapsed_us: 0,
        measurements: Default::default(),
        round: fragment.round,
    }
}

/// The main loop: batches of inputs folded and committed, then their effects published and
/// confirmed, then the batch acked with one multiple-ack. Between batches, once a second, the
/// status of every running job. One task does both, so a job's terminal status is always the
/// last one published for it.
///
/// A store fault that may pass holds the batch, unacknowledged, until it passes (see
/// [`Shared::write`]); only a fault that never passes ends the reducer. A shutdown while a
/// fault lasts leaves the batch to the broker, which hands it to the next reducer.
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
    let stopped = |e: StoreError| {
        if stop.is_cancelled() {
            Ok(())
        } else {
            Err(ReducerError::Store(e))
        }
    };
    loop {
        let batch = tokio::select! {
            _ = ticker.tick() => {
                let prometheus = shared.prometheus;
                let read = shared.read((stop, "status ticks"), move |q| {
                    let active = q.active_jobs()?;
                    let by_state = if prometheus { Some(q.jobs_by_state()?) } else { None };
                    Ok((active, by_state))
                });
                let (active, by_state) = match read.await {
                    Ok(read) => read,
                    Err(e) => return stopped(e),
                };
                if let Some(by_state) = by_state {
                    monitor::record_jobs(&by_state, &active);
                }
                let pending = publish_statuses(publisher, names, &active).await?;
                common::broker::wait_all(pending).await?;
                continue;
            }
            _ = metric_ticker.tick() => {
                interval_start_ms = match publish_metric_batch(publisher, names, shared, interval_start_ms, stop).await {
                    Err(ReducerError::Store(e)) => return stopped(e),
                    other => other?,
                };
                continue;
            }
            batch = next_batch(&mut consumer, BATCH, stop) => batch?,
        };
        let Some(batch) = batch else { return Ok(()) };
        let mut inputs = Vec::with_capacity(batch.len());
        for delivery in &batch {
            match decode(delivery) {
                Ok(decoded) => inputs.extend(decoded),
                Err(reason) => keep_on_dead(publisher, names, delivery, &reason).await?,
            }
        }
        let now = common::timefmt::now_ms();
        // The first attempt folds what was just decoded; a retry after a store fault decodes
        // the held deliveries again (a rolled-back transaction consumed its inputs), so the
        // common case copies nothing.
        let mut decoded = Some(inputs);
        let folded = AssertUnwindSafe(shared.write((stop, "fold"), || {
            let inputs = decoded.take().unwrap_or_else(|| {
                batch
                    .iter()
                    .filter_map(|d| decode(d).ok())
                    .flatten()
                    .collect()
            });
            move |tx: &mut dyn store::ReducerTx| fold::apply(tx, inputs, now)
        }))
        .catch_unwind()
        .await;
        let effects = match folded {
            Ok(Ok(effects)) => effects,
            Ok(Err(e)) => return stopped(e),
            Err(panic) => {
                tracing::error!(
                    panic = common::service::panic_text(&*panic),
                    "folding a batch panicked; folding its messages one by one to set the one at fault aside"
                );
                match fold_one_by_one(&batch, publisher, names, shared, stop, now).await {
                    Err(ReducerError::Store(e)) => return stopped(e),
                    other => other?,
                }
            }
        };
        if shared.prometheus {
            monitor::record(&effects.measured);
            let ended: Vec<JobStatus> = effects
                .status_changes
                .iter()
                .filter(|s| s.state.is_terminal())
                .cloned()
                .collect();
            if !ended.is_empty() {
                match shared.read((stop, "fold"), |q| q.jobs_by_state()).await {
                    Ok(by_state) => monitor::record_jobs(&by_state, &ended),
                    Err(e) => return stopped(e),
                }
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

/// Folds each message of a batch in a transaction of its own, after folding the batch as one
/// panicked (a bug, met by this message or that): a message whose fold panics again goes to
/// `{ns}.dead` with the panic as its reason, the rest are folded as usual. Without this, the
/// message would stop the reducer at every start, since its queue has no delivery limit.
async fn fold_one_by_one(
    batch: &[Delivery],
    publisher: &Publisher,
    names: &Names,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    now: i64,
) -> Result<fold::Effects, ReducerError> {
    let mut effects = fold::Effects::default();
    for delivery in batch {
        if decode(delivery).is_err() {
            continue; // kept on {ns}.dead already
        }
        let folded = AssertUnwindSafe(shared.write((stop, "fold"), || {
            let input = decode(delivery);
            move |tx: &mut dyn store::ReducerTx| match input {
                Ok(inputs) => fold::apply(tx, inputs, now),
                Err(reason) => Err(StoreError::Corrupt(reason)),
            }
        }))
        .catch_unwind()
        .await;
        match folded {
            Ok(one) => effects.extend(one?),
            Err(panic) => {
                let reason = format!(
                    "the reducer panicked folding this message: {}",
                    common::service::panic_text(&*panic)
                );
                keep_on_dead(publisher, names, delivery, &reason).await?;
            }
        }
    }
    Ok(effects)
}

/// Keeps a message the reducer cannot use on `{ns}.dead`, with the reason in its headers, and
/// says so; the caller then acks it with its batch.
async fn keep_on_dead(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ReducerError> {
    tracing::warn!(%reason, "keeping a message the reducer cannot use on the dead-letter queue");
    common::dead::keep(publisher, names, delivery, reason, None).await?;
    Ok(())
}

/// Publishes the pending measurements as one MetricBatch (confirmed), then forgets them.
/// Returns the start of the next interval.
async fn publish_metric_batch(
    publisher: &Publisher,
    names: &Names,
    shared: &Arc<Shared>,
    interval_start_ms: i64,
    stop: &CancellationToken,
) -> Result<i64, ReducerError> {
    let now = common::timefmt::now_ms();
    let sealed = shared
        .write((stop, "metric batches"), || {
            |tx: &mut dyn store::ReducerTx| tx.seal_metric_batch()
        })
        .await?;
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
    shared
        .write((stop, "metric batches"), || {
            move |tx: &mut dyn store::ReducerTx| tx.metric_batch_published(seq)
        })
        .await?;
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
    let mut ticker = tokio::time::interval(QUEUE_POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let (live, held) = monitor::live_workers(&shared.workers, common::timefmt::now_ms());
        metrics::gauge!("batchq_workers_live").set(live as f64);
        let mut operations: std::collections::BTreeSet<String> = held.keys().cloned().collect();
        let active = match shared
            .read((stop, "queue gauges"), |q| q.active_jobs())
            .await
        {
            Ok(active) => active,
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        operations.extend(active.into_iter().filter_map(|j| j.operation));
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

/// Keeps the tables of live workers and splitters from their heartbeats.
async fn track_heartbeats(
    session: &common::broker::Session,
    names: &Names,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<(), ReducerError> {
    let channel = session.consumer_channel(64).await?;
    // A private queue on whichever node this session reached: a lost heartbeat is replaced
    // by the next one, so nothing here is worth a queue that one node's loss could block.
    let queue = common::broker::answered(
        "the declaration of the reducer's heartbeat queue",
        common::topology::declare_private_queue(
            &channel,
            &names.events(),
            common::topology::KEY_HEARTBEAT,
            common::topology::HEARTBEAT_TTL_MS,
        ),
    )
    .await?;
    let mut consumer = consume(&channel, queue.as_str(), "reducer-heartbeats").await?;
    while let Some(batch) = next_batch(&mut consumer, 64, stop).await? {
        let now = common::timefmt::now_ms();
        for delivery in &batch {
            match serde_json::from_slice::<AnyBeat>(&delivery.data) {
                Ok(AnyBeat::Worker(beat)) => {
                    let mut table = shared.workers.lock().unwrap_or_else(|p| p.into_inner());
                    table.insert(beat.worker.clone(), (beat, now));
                }
                Ok(AnyBeat::Service(beat)) => {
                    let mut table = shared.services.lock().unwrap_or_else(|p| p.into_inner());
                    table.insert(beat.instance.clone(), (beat, now));
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed heartbeat"),
            }
        }
        ack_batch(&batch).await?;
    }
    Ok(())
}
