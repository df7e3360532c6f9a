//! The splitter: validates JobSpecs, records jobs, and releases each job's fragments within
//! its `max_concurrent_fragments` window, releasing the next fragment when the reducer
//! settles one.

pub mod backend;
pub mod intake;
pub mod outbox;
pub mod pg_store;
pub mod retention;
pub mod store;
pub mod window;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use common::broker::{Broker, Session};
use common::config::BrokerArgs;
use common::consume::{ack_batch, consume, next_batch};
use common::jobspec::ParseLimits;
use common::retention::Retention;
use common::store::StoreHealth;
use common::supervise::supervise;
use common::topology::Names;
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{Pruner, Store};
use crate::store::{SplitterStore, SqlitePruner, SqliteStore, StoreError};
use crate::window::{Command, DeadCopy, apply};

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

    /// `postgres://user@host:port/db`: keep the state in PostgreSQL instead of the embedded
    /// store; then any number of splitter replicas may run, one active at a time.
    #[arg(long = "database-url", env = "BATCHQ_DATABASE_URL")]
    pub database_url: Option<String>,
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
            database_url: None,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.data_dir
            .join("splitter")
            .join(format!("{}.db", self.broker.namespace))
    }
}

/// The splitter's errors: the shape both services share.
pub type SplitterError = common::service::ServiceError;

/// The splitter's store, shared by its intake loops and its outbox pump, with the fault
/// they are waiting out.
#[derive(Clone)]
pub(crate) struct SharedStore {
    store: Arc<Mutex<Store>>,
    pub(crate) health: StoreHealth,
}

impl SharedStore {
    fn new(store: Store) -> Self {
        Self {
            store: Arc::new(Mutex::new(store)),
            health: StoreHealth::default(),
        }
    }

    /// Runs `f` on the store on the blocking pool, once. A panic in it goes on unwinding in
    /// the caller.
    async fn once<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    {
        common::store::blocking_locked(&self.store, f).await
    }

    /// Runs what `make()` builds on the store, building it afresh and trying again while the
    /// store fails transiently (a full disk, a locked database). The caller holds its
    /// unacknowledged messages meanwhile: nothing is redelivered or dead-lettered.
    pub(crate) async fn run<R, F>(
        &self,
        stop: &CancellationToken,
        task: &'static str,
        mut make: impl FnMut() -> F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    {
        common::store::retry("splitter", task, &self.health, stop, || self.once(make())).await
    }
}

/// Deliveries taken per transaction.
const BATCH: usize = 256;
/// Most settlements applied in one transaction.
const COMMANDS_PER_COMMIT: usize = 1024;

/// Runs the splitter until `shutdown` fires (or a fault that reconnecting cannot mend): alone
/// on the embedded store, or as one replica of several on PostgreSQL, active while it holds
/// the lease (see [`common::role::lead`]).
pub async fn run(config: SplitterConfig, shutdown: CancellationToken) -> Result<(), SplitterError> {
    common::telemetry::serve_prometheus(config.metrics_addr.as_deref())
        .map_err(SplitterError::Metrics)?;
    let broker = Broker::new(&config.broker, "batchq-splitter")?;
    let limits = ParseLimits {
        max_message_bytes: config.max_message_bytes,
        consumer_timeout_ms: config.consumer_timeout_ms,
    };
    let namespace = &config.broker.namespace;
    let outcome = match &config.database_url {
        None => {
            let path = config.store_path();
            let store = Store::Sqlite(SqliteStore::open(&path)?);
            let pruner = Pruner::Sqlite(SqlitePruner::open(&path)?);
            tracing::info!(store = %path.display(), %namespace, "splitter starting");
            common::role::set_leader("splitter", true);
            run_active(&broker, store, pruner, &config, limits, &shutdown).await
        }
        Some(url) => {
            let (db, elector) = common::role::postgres(
                url,
                namespace,
                "splitter",
                pg_store::PG_MIGRATIONS,
                &shutdown,
            )
            .await?;
            tracing::info!(schema = db.schema(), %namespace, replica = elector.holder(), "splitter starting");
            common::role::lead(&elector, &broker, &shutdown, |fence, stop| {
                let store = Store::Pg(pg_store::PgStore::new(db.clone(), Some(fence.clone())));
                let pruner = Pruner::Pg(pg_store::PgPruner::new(db.clone(), Some(fence)));
                let (broker, config) = (&broker, &config);
                async move { run_active(broker, store, pruner, config, limits, &stop).await }
            })
            .await
        }
    };
    outcome?;
    tracing::info!("splitter stopped");
    Ok(())
}

/// The splitter's work while it is the active one: until `shutdown` (or, on PostgreSQL, until
/// it loses the lease).
async fn run_active(
    broker: &Broker,
    store: Store,
    pruner: Pruner,
    config: &SplitterConfig,
    limits: ParseLimits,
    shutdown: &CancellationToken,
) -> Result<(), SplitterError> {
    let store = SharedStore::new(store);
    let pruning = retention::Pruning::new(pruner, config.retention);
    let outbox_ready = Arc::new(Notify::new());
    let pruning_task = tokio::spawn(pruning.run(shutdown.clone()));
    let outcome = supervise("splitter", shutdown, || {
        session(broker, &store, &outbox_ready, limits, shutdown)
    })
    .await;
    // The sweep ends with the shutdown; after a fault it is stopped here.
    pruning_task.abort();
    outcome
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
        r = outbox::pump(broker, &publisher, store, outbox_ready, &stop) => r,
        r = common::health::send_beats(&publisher, broker.names(), "splitter", &store.health, true, &stop) => r.map_err(SplitterError::from),
    };
    stop.cancel();
    // A store fault still being waited out when the splitter was told to stop: its messages
    // go back to the broker unacknowledged, for the next splitter.
    match result {
        Err(SplitterError::Store(e)) if stop.is_cancelled() && shutdown.is_cancelled() => {
            tracing::info!(error = %e, "stopped while the store was failing");
            Ok(())
        }
        other => other,
    }
}

/// Applies the commands `make()` decodes in one transaction on the blocking pool (trying
/// again while the store fails transiently), then wakes the outbox pump.
async fn commit(
    store: &SharedStore,
    names: &Names,
    outbox_ready: &Notify,
    (stop, task): (&CancellationToken, &'static str),
    mut make: impl FnMut() -> Vec<Command>,
) -> Result<(), SplitterError> {
    store
        .run(stop, task, || {
            let names = names.clone();
            let commands = make();
            move |store: &mut Store| store.transaction(|tx| apply(tx, &names, commands))
        })
        .await?;
    outbox_ready.notify_one();
    Ok(())
}

/// Commits the commands of `units` (each unit one command) in one transaction. When that
/// panics (a bug met by one of them), commits each unit alone and keeps a unit whose commit
/// panics again on `{ns}.dead`, with the panic as the reason: the splitter's queues have no
/// delivery limit, so such a message would otherwise stop the splitter at every start.
async fn commit_units(
    store: &SharedStore,
    names: &Names,
    outbox_ready: &Notify,
    ctx: (&CancellationToken, &'static str),
    units: usize,
    mut unit: impl FnMut(usize) -> Command,
    dead: impl Fn(usize, &str) -> DeadCopy,
) -> Result<(), SplitterError> {
    let all = AssertUnwindSafe(commit(store, names, outbox_ready, ctx, || {
        (0..units).map(&mut unit).collect()
    }))
    .catch_unwind()
    .await;
    let panic = match all {
        Ok(result) => return result,
        Err(panic) => panic,
    };
    tracing::error!(
        panic = common::service::panic_text(&*panic),
        task = ctx.1,
        "a batch panicked; committing its messages one by one to set the one at fault aside"
    );
    for i in 0..units {
        let one = AssertUnwindSafe(commit(store, names, outbox_ready, ctx, || vec![unit(i)]))
            .catch_unwind()
            .await;
        match one {
            Ok(result) => result?,
            Err(panic) => {
                let reason = format!(
                    "the splitter panicked applying this message: {}",
                    common::service::panic_text(&*panic)
                );
                tracing::error!(%reason, "keeping the message on the dead-letter queue");
                commit(store, names, outbox_ready, ctx, || {
                    vec![Command::Dead(dead(i, &reason))]
                })
                .await?;
            }
        }
    }
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
        // Decoded again for each attempt: a JobSpec can be large, and a retry is rare.
        commit_units(
            store,
            names,
            outbox_ready,
            (stop, "job intake"),
            batch.len(),
            |i| intake::job_command(&batch[i], limits, at_ms),
            |i, reason| intake::dead_copy(&batch[i], reason),
        )
        .await?;
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
        let commands: Vec<Command> = batch.iter().flat_map(intake::settled).collect();
        for chunk in commands.chunks(COMMANDS_PER_COMMIT) {
            commit_units(
                store,
                names,
                outbox_ready,
                (stop, "settlements"),
                chunk.len(),
                |i| chunk[i].clone(),
                |i, reason| intake::command_dead_copy(&names.events(), &chunk[i], reason),
            )
            .await?;
        }
        ack_batch(&batch).await?;
    }
    Ok(())
}
