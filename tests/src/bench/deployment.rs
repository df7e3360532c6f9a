//! One deployment of batchq for one part of the benchmark: a namespace of its own on the
//! broker (`bench-{part}-{8 hex}`, `bench-{part}-pg-{8 hex}` on PostgreSQL), a temporary data
//! folder, and the real `splitter`, `reducer` and `worker` binaries of the bench's own profile
//! folder as child processes. The splitter and reducer keep their state in SQLite in that
//! folder, or ([`Store::Postgres`]) in a fresh PostgreSQL database of the deployment's own
//! ([`TestDatabase`], given to them as `BATCHQ_DATABASE_URL`).
//!
//! A part ends with [`Deployment::conclude`], which kills the processes and deletes every queue
//! and exchange of the namespace (and drops the database) whatever the part's outcome (keeping
//! the folder and printing the process logs when it failed). A deployment dropped any other way
//! (Ctrl-C, a panic) does the same from a thread of its own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use batchq_tests::TestDatabase;
use common::broker::{Broker, Publisher, json_properties};
use common::config::BrokerArgs;
use common::contract::{JobState, JobStatus, ResultLine};
use common::lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use common::lapin::types::FieldTable;
use common::rpc::RpcClient;
use common::topology::{BUILTIN_OPERATIONS, KEY_SUBMIT, Names};
use common::wire::{Request, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Lines of each process log printed when a part fails.
const LOG_TAIL_LINES: usize = 40;
/// How long the reducer may take to answer one RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// The folder holding the batchq binaries: the bench's own profile folder (`target/release`
/// for `cargo run --release`, `target/debug` otherwise).
#[derive(Debug, Clone)]
pub struct Programs {
    dir: PathBuf,
}

const PROGRAMS: [&str; 4] = ["splitter", "reducer", "worker", "batchctl"];

impl Programs {
    pub fn locate() -> Result<Self> {
        let exe = std::env::current_exe().context("finding the bench's own executable")?;
        let mut dir = exe
            .parent()
            .context("the bench's executable sits in no folder")?
            .to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let programs = Self { dir };
        let build = format!(
            "cargo build {}--workspace --bins",
            if programs.profile() == "release" {
                "--release "
            } else {
                ""
            }
        );
        for name in PROGRAMS {
            let path = programs.path(name);
            ensure!(
                path.is_file(),
                "{} not found: the bench runs the workspace's binaries of its own profile; \
                 build them first with `{build}`",
                path.display()
            );
        }
        programs.warn_if_stale(&build);
        Ok(programs)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `release`, `debug`, or whatever the profile folder is called.
    pub fn profile(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `cargo run --bin bench` builds the bench, not the binaries it runs: say so when a
    /// source of a binary (its crate or `common`) is newer than the binary, or the figures
    /// would be yesterday's code.
    fn warn_if_stale(&self, build: &str) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for name in PROGRAMS {
            let Ok(built) = std::fs::metadata(self.path(name)).and_then(|m| m.modified()) else {
                continue;
            };
            let newer = ["common", name]
                .iter()
                .filter_map(|krate| batchq_tests::newest_source(&root.join(krate).join("src")))
                .find(|(modified, _)| *modified > built);
            if let Some((_, source)) = newer {
                eprintln!(
                    "WARNING: {} is newer than {}: the bench would measure a stale binary; \
                     run `{build}` first",
                    source.display(),
                    self.path(name).display()
                );
            }
        }
    }
}

/// One child process.
struct Proc {
    /// `splitter`, `reducer`, `worker-2`.
    label: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where a deployment's splitter and reducer keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The embedded SQLite stores in the deployment's data folder (the binaries' default).
    Sqlite,
    /// A fresh database on the tests' PostgreSQL server (`BATCHQ_TEST_POSTGRES_URL`).
    Postgres,
}

impl Store {
    /// `SQLite`, `PostgreSQL`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }
}

/// A finished job, as the bench measured it.
#[derive(Debug, Clone)]
pub struct JobRun {
    /// From just before the JobSpec was published to the arrival of its terminal status.
    pub seconds: f64,
    pub status: JobStatus,
}

pub struct Deployment {
    pub part: String,
    pub names: Names,
    url: String,
    dir: Option<tempfile::TempDir>,
    /// The splitter's and reducer's database ([`Store::Postgres`]), dropped at the end.
    database: Option<TestDatabase>,
    /// The server processes serving that database's connections, once the spine runs.
    database_pids: Vec<u32>,
    programs: Programs,
    broker: Broker,
    publisher: Publisher,
    rpc: RpcClient,
    /// Terminal statuses of this namespace's jobs, stamped on arrival.
    terminal: mpsc::UnboundedReceiver<(Instant, JobStatus)>,
    watch: JoinHandle<()>,
    procs: Vec<Proc>,
    /// Queues of the namespace beyond batchq's topology (the relay's).
    extra_queues: Vec<String>,
    finished: bool,
}

impl Deployment {
    /// A fresh namespace with batchq's topology declared, subscribed to the terminal statuses
    /// of its jobs, and an empty data folder; state in SQLite. No process runs yet.
    pub async fn new(part: &str, url: &str, programs: &Programs) -> Result<Self> {
        Self::with_store(part, url, programs, Store::Sqlite).await
    }

    /// [`Deployment::new`] with the splitter's and reducer's state in `store`: for
    /// [`Store::Postgres`] a fresh database is created (the caller checked that the server
    /// answers), dropped by [`Deployment::conclude`].
    pub async fn with_store(
        part: &str,
        url: &str,
        programs: &Programs,
        store: Store,
    ) -> Result<Self> {
        let database = match store {
            Store::Sqlite => None,
            Store::Postgres => Some(
                TestDatabase::create()
                    .await
                    .context("creating the deployment's PostgreSQL database")?,
            ),
        };
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = match store {
            Store::Sqlite => format!("bench-{part}-{}", &suffix[..8]),
            Store::Postgres => format!("bench-{part}-pg-{}", &suffix[..8]),
        };
        let names = Names::new(ns.clone());
        let dir = tempfile::Builder::new()
            .prefix(&format!("batchq-bench-{part}-"))
            .tempdir()
            .context("creating the data folder")?;
        let broker = Broker::new(&BrokerArgs::new(url, ns.clone()), "batchq-bench")?;
        let connect = async {
            tokio::time::timeout(Duration::from_secs(15), broker.declare_topology())
                .await
                .context("declaring the topology timed out")?
                .context("declaring the topology")?;
            let publisher = broker.publisher().await?;
            let rpc = RpcClient::connect(&broker, RPC_TIMEOUT).await?;
            let (terminal, watch) = watch_terminal(&broker, &names).await?;
            Ok::<_, anyhow::Error>((publisher, rpc, terminal, watch))
        };
        let (publisher, rpc, terminal, watch) = match connect.await {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(cleanup) = delete_namespace(&broker, &names, &[]).await {
                    eprintln!("could not delete namespace {ns}: {cleanup:#}");
                }
                return Err(e.context(format!("setting up namespace {ns}")));
            }
        };
        Ok(Self {
            part: part.to_owned(),
            names,
            url: url.to_owned(),
            dir: Some(dir),
            database,
            database_pids: Vec::new(),
            programs: programs.clone(),
            broker,
            publisher,
            rpc,
            terminal,
            watch,
            procs: Vec::new(),
            extra_queues: Vec::new(),
            finished: false,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    /// A queue of the namespace that batchq's topology does not know, deleted at the end.
    pub fn delete_also(&mut self, queue: String) {
        self.extra_queues.push(queue);
    }

    // --- processes ----------------------------------------------------------------------------

    fn spawn(
        &mut self,
        program: &str,
        label: String,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> Result<()> {
        let log = self.dir().join(format!("{label}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new(self.programs.path(program));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // Settings a developer's shell may carry must not change what is measured.
        for var in [
            "BATCHQ_PREFETCH",
            "BATCHQ_OPERATIONS",
            "BATCHQ_HEARTBEAT_MS",
            "BATCHQ_METRICS_ADDR",
            "BATCHQ_DATA_DIR",
            "BATCHQ_DATABASE_URL",
            "BATCHQ_MAX_MESSAGE_BYTES",
            "BATCHQ_MAX_LIFETIME",
            "BATCHQ_MAX_FRAGMENTS",
        ] {
            command.env_remove(var);
        }
        command
            .env("NO_COLOR", "1")
            .env("AMQP_URL", &self.url)
            .env("BATCHQ_NAMESPACE", self.names.namespace());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command.envs(envs.iter().map(|(k, v)| (*k, v)));
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.programs.path(program).display()))?;
        self.procs.push(Proc {
            label,
            child: Some(child),
            log,
        });
        Ok(())
    }

    /// The settings of a splitter or reducer: its data folder and, on PostgreSQL, the
    /// database.
    fn store_env(&self) -> Vec<(&'static str, String)> {
        let mut envs = vec![(
            "BATCHQ_DATA_DIR",
            self.dir().join("data").display().to_string(),
        )];
        if let Some(database) = &self.database {
            envs.push(("BATCHQ_DATABASE_URL", database.url().to_owned()));
        }
        envs
    }

    pub fn start_splitter(&mut self) -> Result<()> {
        let envs = self.store_env();
        self.spawn("splitter", "splitter".into(), &[], &envs)
    }

    /// The reducer, without its Prometheus endpoint (parts run side by side with tests).
    pub fn start_reducer(&mut self) -> Result<()> {
        let envs = self.store_env();
        self.spawn(
            "reducer",
            "reducer".into(),
            &["--metrics-addr", "off"],
            &envs,
        )
    }

    /// The web console (`batchctl ui`) on `127.0.0.1:port`, answering once `/healthz` does.
    pub async fn start_console(&mut self, port: u16) -> Result<String> {
        let listen = format!("127.0.0.1:{port}");
        self.spawn(
            "batchctl",
            "console".into(),
            &["ui", "--listen", &listen],
            &[],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match batchq_tests::browser::http(&listen, "GET", "/healthz", &[], None).await {
                Ok(response) if response.status == 200 => return Ok(listen),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(response) => bail!("the console answers /healthz with {}", response.status),
                Err(e) => return Err(e.context("the console did not answer within 30 s")),
            }
        }
    }

    /// A worker offering every built-in, heartbeating twice a second (so it is known soon),
    /// of `prefetch`, or of the worker's own default when `None` (no `BATCHQ_PREFETCH` given,
    /// as a user who keeps the defaults starts it).
    pub fn start_worker(&mut self, prefetch: Option<u16>) -> Result<()> {
        self.start_worker_with(prefetch, &[])
    }

    /// [`Deployment::start_worker`] with settings of its own (`BATCHQ_EXEC_ALLOW`, say).
    pub fn start_worker_with(
        &mut self,
        prefetch: Option<u16>,
        settings: &[(&'static str, String)],
    ) -> Result<()> {
        let n = self
            .procs
            .iter()
            .filter(|p| p.label.starts_with("worker"))
            .count()
            + 1;
        let mut envs = vec![("BATCHQ_HEARTBEAT_MS", "500".to_owned())];
        if let Some(prefetch) = prefetch {
            envs.push(("BATCHQ_PREFETCH", prefetch.to_string()));
        }
        envs.extend(settings.iter().cloned());
        self.spawn("worker", format!("worker-{n}"), &[], &envs)
    }

    /// Splitter, reducer and `workers` workers of `prefetch` (`None`: the worker's default),
    /// ready: every worker known to the reducer and a one-operation `noop` job through the
    /// whole pipeline.
    pub async fn start_spine(&mut self, workers: usize, prefetch: Option<u16>) -> Result<()> {
        self.start_splitter()?;
        self.start_reducer()?;
        for _ in 0..workers {
            self.start_worker(prefetch)?;
        }
        self.wait_for_workers(workers, Duration::from_secs(60))
            .await?;
        let job_id = self.job_id("warmup");
        let spec = serde_json::json!({
            "job_id": job_id,
            "operation": "noop",
            "range": {"start": 0, "end": 1},
        });
        self.run_job(&spec, Duration::from_secs(60)).await?;
        self.database_pids = self.find_database_pids().await?;
        Ok(())
    }

    /// Labels and pids of the running processes.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter_map(|p| Some((p.label.clone(), p.pid()?)))
            .collect()
    }

    /// [`Deployment::pids`] and, on PostgreSQL, the server processes of the database's
    /// connections (`postgres-{pid}`, when the server runs on this machine): whose CPU a
    /// measured job is charged.
    pub fn watched_pids(&self) -> Vec<(String, u32)> {
        let mut pids = self.pids();
        pids.extend(
            self.database_pids
                .iter()
                .map(|pid| (format!("postgres-{pid}"), *pid)),
        );
        pids
    }

    /// The server processes (backends) of the connections to this deployment's database,
    /// other than the query's own; none on SQLite or when the server is on another machine.
    async fn find_database_pids(&self) -> Result<Vec<u32>> {
        let Some(database) = &self.database else {
            return Ok(Vec::new());
        };
        let client = database.connect().await?;
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .context("listing the database's connections")?;
        Ok(rows
            .iter()
            .filter_map(|row| u32::try_from(row.get::<_, i32>(0)).ok())
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect())
    }

    /// Fails, naming it, when a process exited: a crashed process would only show as a
    /// timeout otherwise.
    fn check_alive(&mut self) -> Result<()> {
        for proc in &mut self.procs {
            if let Some(child) = proc.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                proc.child = None;
                bail!(
                    "{} exited ({status}); see {}",
                    proc.label,
                    proc.log.display()
                );
            }
        }
        Ok(())
    }

    // --- jobs ---------------------------------------------------------------------------------

    /// A job id unique to this run, without dots (status bindings match one word).
    pub fn job_id(&self, name: &str) -> String {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{name}-{}", &suffix[..8])
    }

    /// Publishes a JobSpec (persistent, confirmed, mandatory) and returns when the broker
    /// confirmed it.
    pub async fn submit(&self, spec: &Value) -> Result<Instant> {
        self.submit_all(std::slice::from_ref(spec)).await?;
        Ok(Instant::now())
    }

    /// Publishes JobSpecs (persistent, confirmed, mandatory), up to 256 awaiting their
    /// confirms at once, as a program submitting a batch of jobs would.
    pub async fn submit_all(&self, specs: &[Value]) -> Result<()> {
        for chunk in specs.chunks(256) {
            let publish = async {
                let mut pending = Vec::with_capacity(chunk.len());
                for spec in chunk {
                    let body = serde_json::to_vec(spec)?;
                    pending.push(
                        self.publisher
                            .start_with(
                                &self.names.jobs(),
                                KEY_SUBMIT,
                                &body,
                                json_properties(),
                                true,
                            )
                            .await?,
                    );
                }
                common::broker::wait_all(pending).await?;
                Ok::<_, anyhow::Error>(())
            };
            tokio::time::timeout(Duration::from_secs(30), publish)
                .await
                .context("publishing JobSpecs timed out")?
                .context("publishing JobSpecs")?;
        }
        Ok(())
    }

    /// Waits for the terminal status of `job_id`; returns it with the instant it arrived.
    pub async fn wait_terminal(
        &mut self,
        job_id: &str,
        timeout: Duration,
    ) -> Result<(Instant, JobStatus)> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let last = self.rpc_status(job_id).await.ok().flatten();
                bail!("job {job_id} did not end within {timeout:?}; last status {last:?}");
            }
            match tokio::time::timeout(left.min(Duration::from_secs(1)), self.terminal.recv()).await
            {
                Ok(Some((at, status))) if status.job_id == job_id => return Ok((at, status)),
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => bail!("the status subscription ended"),
            }
        }
    }

    /// Submits `spec` (a `range` job), waits for its end and checks it succeeded with every
    /// operation counted exactly once.
    pub async fn run_job(&mut self, spec: &Value, timeout: Duration) -> Result<JobRun> {
        let job_id = spec
            .get("job_id")
            .and_then(Value::as_str)
            .context("the bench always gives a job_id")?
            .to_owned();
        let ops = range_len(spec)?;
        let started = Instant::now();
        self.submit(spec).await?;
        let (ended, status) = self.wait_terminal(&job_id, timeout).await?;
        check_succeeded(
            &status,
            ops,
            spec.get("fragment_size").and_then(Value::as_u64),
        )?;
        Ok(JobRun {
            seconds: ended.duration_since(started).as_secs_f64(),
            status,
        })
    }

    async fn rpc_status(&mut self, job_id: &str) -> Result<Option<JobStatus>> {
        let request = Request::Status {
            job_id: job_id.to_owned(),
        };
        match self.rpc.call(&request).await? {
            Response::Status(status) => Ok(Some(status)),
            Response::NotFound { .. } => Ok(None),
            other => bail!("unexpected reply to a status request: {other:?}"),
        }
    }

    /// One request to the reducer and its reply.
    pub async fn call(&mut self, request: &Request) -> Result<Response> {
        Ok(self.rpc.call(request).await?)
    }

    /// One page of a job's results.
    pub async fn results(
        &mut self,
        job_id: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<ResultLine>> {
        let request = Request::Results {
            job_id: job_id.to_owned(),
            from,
            limit,
        };
        match self.rpc.call(&request).await? {
            Response::Results(page) => Ok(page.lines),
            other => bail!("unexpected reply to a results request: {other:?}"),
        }
    }

    /// Waits until the reducer has heard the heartbeats of at least `n` workers.
    pub async fn wait_for_workers(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(Response::Workers { workers }) = self.rpc.call(&Request::Workers).await
                && workers.len() >= n
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("fewer than {n} workers known to the reducer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // --- the end ------------------------------------------------------------------------------

    /// Ends the part: on failure prints the process logs and keeps the folder; in every case
    /// kills the processes and deletes the namespace. The part's own error wins over a cleanup
    /// error.
    pub async fn conclude<T>(mut self, outcome: Result<T>) -> Result<T> {
        self.finished = true;
        if outcome.is_err() {
            eprintln!("{}", self.logs_tail());
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "keeping the folder of part {}: {}",
                    self.part,
                    dir.keep().display()
                );
            }
        }
        for proc in &mut self.procs {
            proc.kill();
        }
        self.watch.abort();
        let mut cleanup = delete_namespace(&self.broker, &self.names, &self.extra_queues).await;
        if let Some(database) = self.database.take() {
            let name = database.name().to_owned();
            let dropped = database
                .drop_now()
                .await
                .with_context(|| format!("dropping database {name}"));
            cleanup = cleanup.and(dropped);
        }
        let _ = self
            .publisher
            .channel()
            .close(200, "bench over".into())
            .await;
        match (outcome, cleanup) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => {
                Err(e.context(format!("cleaning up namespace {}", self.names.namespace())))
            }
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(cleanup)) => {
                eprintln!(
                    "could not delete namespace {}: {cleanup:#}",
                    self.names.namespace()
                );
                Err(e)
            }
        }
    }

    fn logs_tail(&self) -> String {
        let mut out = String::new();
        for proc in &self.procs {
            out.push_str(&format!(
                "----- {} (last {LOG_TAIL_LINES} lines) -----\n{}\n",
                proc.log.display(),
                tail(&proc.log, LOG_TAIL_LINES)
            ));
        }
        out
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for proc in &mut self.procs {
            proc.kill();
        }
        self.watch.abort();
        // Drop cannot await and may run inside the runtime: delete the namespace from a thread
        // with a runtime and a connection of its own.
        let url = self.url.clone();
        let names = self.names.clone();
        let extra = self.extra_queues.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let broker = Broker::new(
                    &BrokerArgs::new(url, names.namespace()),
                    "batchq-bench-cleanup",
                )?;
                delete_namespace(&broker, &names, &extra).await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => eprintln!("deleted namespace {}", self.names.namespace()),
            Ok(Err(e)) => eprintln!(
                "could not delete namespace {}: {e:#}",
                self.names.namespace()
            ),
            Err(_) => eprintln!(
                "the cleanup of namespace {} panicked",
                self.names.namespace()
            ),
        }
    }
}

/// Deletes every queue and exchange batchq declares in the namespace, and `extra` queues.
async fn delete_namespace(broker: &Broker, names: &Names, extra: &[String]) -> Result<()> {
    let channel = broker.channel().await?;
    tokio::time::timeout(Duration::from_secs(30), async {
        common::topology::delete(&channel, names, &BUILTIN_OPERATIONS).await?;
        for queue in extra {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok::<_, common::lapin::Error>(())
    })
    .await
    .context("timed out")??;
    let _ = channel.close(200, "namespace deleted".into()).await;
    Ok(())
}

/// Binds a private queue to `{ns}.status` for the terminal states (`job.*.succeeded` and the
/// others), and forwards what arrives, stamped with its arrival, to the returned receiver.
async fn watch_terminal(
    broker: &Broker,
    names: &Names,
) -> Result<(
    mpsc::UnboundedReceiver<(Instant, JobStatus)>,
    JoinHandle<()>,
)> {
    let channel = broker.channel().await?;
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
    for state in [
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Rejected,
    ] {
        channel
            .queue_bind(
                queue.name().clone(),
                names.status().into(),
                format!("job.*.{state}").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "batchq-bench-status".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        // The channel lives as long as the task.
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let arrived = Instant::now();
            if let Ok(status) = serde_json::from_slice::<JobStatus>(&delivery.data)
                && tx.send((arrived, status)).is_err()
            {
                break;
            }
        }
    });
    Ok((rx, task))
}

/// Operations of a `range` JobSpec.
fn range_len(spec: &Value) -> Result<u64> {
    let range = spec.get("range").context("the bench submits range jobs")?;
    let start = range.get("start").and_then(Value::as_u64);
    let end = range.get("end").and_then(Value::as_u64);
    match (start, end) {
        (Some(start), Some(end)) if end >= start => Ok(end - start),
        _ => Err(anyhow!("bad range in {spec}")),
    }
}

/// The job succeeded, every operation counted once and none failed; nothing is in flight; at
/// least one fragment per `fragment_size` operations settled, exactly one per operation when
/// fragments hold one (they cannot be split further).
fn check_succeeded(status: &JobStatus, ops: u64, fragment_size: Option<u64>) -> Result<()> {
    ensure!(
        status.state == JobState::Succeeded
            && status.ops_total == ops
            && status.ops_succeeded == ops
            && status.ops_failed == 0
            && status.fragments_in_flight == 0,
        "job {} ended {} with {} of {} operations succeeded ({} failed, total {}, {} fragments \
         in flight; error {:?}), expected {ops} succeeded",
        status.job_id,
        status.state,
        status.ops_succeeded,
        ops,
        status.ops_failed,
        status.ops_total,
        status.fragments_in_flight,
        status.error,
    );
    if let Some(size) = fragment_size.filter(|s| *s > 0) {
        let least = ops.div_ceil(size);
        if size == 1 {
            ensure!(
                status.fragments_done == ops,
                "job {}: {} fragments done, expected exactly {ops}",
                status.job_id,
                status.fragments_done
            );
        } else {
            ensure!(
                status.fragments_done >= least,
                "job {}: {} fragments done, expected at least {least}",
                status.job_id,
                status.fragments_done
            );
        }
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}
