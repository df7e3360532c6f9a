//! Harness for batchq's integration tests: the real `splitter`, `worker` and `reducer` binaries
//! as child processes against the real RabbitMQ, each test in a namespace of its own.
//!
//! A test builds a [`TestEnv`], starts the processes it needs, publishes JobSpecs the way a
//! user would (confirmed, persistent, on `{ns}.jobs`), watches outcomes through the reducer's
//! RPC queue and the `{ns}.status` exchange, and ends with [`TestEnv::finish`], which stops
//! every process and deletes every queue and exchange of the namespace. A test that ends any
//! other way (a panic, an early `?`) still has its processes killed and its namespace deleted
//! on drop, the tail of every process log printed beside the failure, and its folder (data
//! and full logs) kept; `BATCHQ_TEST_KEEP=1` keeps the folder of passing tests too.
//!
//! The programs under test are the workspace's binaries, found next to the test executable:
//! `cargo build --workspace --bins && cargo test -p batchq-tests`. RabbitMQ is `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! The splitters and reducers keep their state in SQLite files under the test's folder, or,
//! in the PostgreSQL suites (`tests/tests/*_pg.rs`, or any test with
//! `BATCHQ_TEST_STORE=postgres`), in a database of the test's own ([`postgres`]), given to
//! every splitter and reducer as `BATCHQ_DATABASE_URL` and dropped at the end.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::broker::{Broker, Publisher};
use common::config::BrokerArgs;
use common::contract::{JobState, JobStatus, ResultLine};
use common::lapin::BasicProperties;
use common::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use common::lapin::types::{AMQPValue, FieldTable, ShortString};
use common::topology::{BUILTIN_OPERATIONS, KEY_CANCEL, KEY_SUBMIT, Names};
use common::wire::{Request, Response, WorkerInfo};
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

pub mod amqp_proxy;
pub mod browser;
pub mod cluster;
pub mod ha;
pub mod ports;
pub mod postgres;
pub mod prometheus;
pub mod prometheus_server;
pub mod rabbit_node;
pub use cluster::RabbitCluster;
pub use postgres::{StoreMode, TestDatabase};
pub use rabbit_node::{RabbitNode, TestCerts};

/// Broker of the tests: `AMQP_URL`, or the contract's default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| common::config::DEFAULT_AMQP_URL.to_owned())
}

/// How long one RPC round trip may take before it counts as lost.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two status polls.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Lines of each process log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

// ---------------------------------------------------------------------------------------------
// Binaries

/// The binaries the tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    Splitter,
    Worker,
    Reducer,
    Batchctl,
}

impl Bin {
    pub fn name(self) -> &'static str {
        match self {
            Bin::Splitter => "splitter",
            Bin::Worker => "worker",
            Bin::Reducer => "reducer",
            Bin::Batchctl => "batchctl",
        }
    }
}

/// Folder holding the workspace's binaries: `BATCHQ_BIN_DIR`, or the profile folder the test
/// executable was built into (`target/debug/deps/spine-…` → `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BATCHQ_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe
        .parent()
        .expect("the test executable sits in a folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a binary; panics with how to build it when it is missing.
pub fn bin_path(bin: Bin) -> PathBuf {
    checked_program(
        &bin_dir().join(bin.name()),
        "cargo build --workspace --bins",
    )
}

/// Path of an example program of the workspace (`target/debug/examples/{name}`), such as a
/// worker with operations of its own.
pub fn example_path(package: &str, name: &str) -> PathBuf {
    checked_program(
        &bin_dir().join("examples").join(name),
        &format!("cargo build -p {package} --examples"),
    )
}

fn checked_program(path: &Path, build: &str) -> PathBuf {
    // `cargo test` builds only the binaries of the package under test, never those of the
    // other packages, so the tests cannot rely on it.
    assert!(
        path.is_file(),
        "{} not found: the integration tests run the workspace's programs. Build them first: \
         `{build} && cargo test -p batchq-tests` (or set BATCHQ_BIN_DIR to the folder that \
         holds them).",
        path.display()
    );
    warn_if_stale(path);
    path.to_path_buf()
}

/// Warns (once per program) when some source of the workspace is newer than the program: the
/// test would run yesterday's code.
fn warn_if_stale(program: &Path) {
    static WARNED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.insert(program.to_path_buf()) {
        return;
    }
    let Ok(built) = std::fs::metadata(program).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newer = [
        "common", "splitter", "worker", "reducer", "client", "batchctl",
    ]
    .iter()
    .filter_map(|krate| newest_source(&root.join(krate).join("src")))
    .filter(|(modified, _)| *modified > built)
    .map(|(_, path)| path)
    .next();
    if let Some(source) = newer {
        eprintln!(
            "warning: {} is newer than {}; run `cargo build --workspace --bins`",
            source.display(),
            program.display()
        );
    }
}

/// The newest `.rs` file below `dir`, with its modification time.
pub fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Handle of a process started by a [`TestEnv`]; valid across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(usize);

/// Signals the tests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: the process dies at once, holding whatever it held.
    Kill,
    /// SIGTERM: the process is asked to stop gracefully.
    Term,
    /// SIGSTOP: the process is frozen where it stands (a GC pause, a stalled VM), holding
    /// everything it holds; SIGKILL still kills it.
    Stop,
    /// SIGCONT: a process frozen by [`Signal::Stop`] carries on.
    Cont,
}

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub prefetch: u16,
    /// Start the worker without `BATCHQ_PREFETCH` (its adaptive default) instead of
    /// `prefetch`.
    pub adaptive: bool,
    /// `None`: every built-in.
    pub operations: Option<Vec<String>>,
    pub heartbeat_ms: u64,
    /// `BATCHQ_MAX_LIFETIME` (`"3s"`, `"30m"`); `None`: the worker runs until stopped.
    pub max_lifetime: Option<String>,
    /// `BATCHQ_MAX_FRAGMENTS`; `None`: no limit.
    pub max_fragments: Option<u64>,
    /// `BATCHQ_METRICS_ADDR`; `None`: no Prometheus endpoint.
    pub metrics_addr: Option<String>,
    /// `BATCHQ_EXEC_ALLOW`: [`TEST_EXEC_ALLOW`] by default; `None`: the worker offers no `exec`.
    pub exec_allow: Option<String>,
}

/// The programs the tests' workers let `exec` run: the tests' commands are `sh -c` scripts.
pub const TEST_EXEC_ALLOW: &str = "sh";

impl Default for WorkerOpts {
    fn default() -> Self {
        Self {
            prefetch: 4,
            adaptive: false,
            operations: None,
            heartbeat_ms: 500,
            max_lifetime: None,
            max_fragments: None,
            metrics_addr: None,
            exec_allow: Some(TEST_EXEC_ALLOW.to_owned()),
        }
    }
}

impl WorkerOpts {
    pub fn prefetch(prefetch: u16) -> Self {
        Self {
            prefetch,
            ..Self::default()
        }
    }
}

struct Proc {
    bin: Bin,
    /// The program run: the binary of `bin`, or a program of the test's choosing.
    program: PathBuf,
    /// Label in log file names: `worker-2`.
    label: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    /// One log per incarnation (stdout and stderr together).
    logs: Vec<PathBuf>,
}

impl Proc {
    fn spawn(&mut self, log_dir: &Path) -> Result<()> {
        let log = log_dir.join(format!("{}.{}.log", self.label, self.logs.len() + 1));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // Settings a developer's shell may carry must not leak into the processes under test.
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
            "BATCHQ_RETENTION",
            "BATCHQ_TLS_CA_FILE",
            "BATCHQ_EXEC_ALLOW",
            "BATCHQ_UI_TOKEN",
            "BATCHQ_UI_READ_TOKEN",
        ] {
            command.env_remove(var);
        }
        // Logs go to files: no terminal colour codes in them.
        command.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command.envs(self.envs.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.label))?;
        self.child = Some(child);
        self.logs.push(log);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap; a process that already exited is only reaped.
    fn kill_now(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    // `unsafe_code` is forbidden in the workspace, so no `libc::kill`: the `kill` utility does it.
    let name = match signal {
        Signal::Kill => "KILL",
        Signal::Term => "TERM",
        Signal::Stop => "STOP",
        Signal::Cont => "CONT",
    };
    let status = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -s {name} {pid} failed: {status}");
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

// ---------------------------------------------------------------------------------------------
// The environment of one test

/// Properties of a raw JobSpec publish.
#[derive(Debug, Clone, Default)]
pub struct RawProps {
    /// `None` leaves the property unset.
    pub content_type: Option<String>,
    pub message_id: Option<String>,
}

impl RawProps {
    pub fn json() -> Self {
        Self {
            content_type: Some("application/json".into()),
            message_id: None,
        }
    }

    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }
}

/// One test's namespace, data folder, broker connections and processes.
pub struct TestEnv {
    pub ns: String,
    pub names: Names,
    /// The broker of this test: [`amqp_url`], or the one given to [`TestEnv::with_url`].
    url: String,
    /// `BATCHQ_TLS_CA_FILE` of the test's connections and processes ([`TestEnv::with_tls`]).
    tls_ca_file: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    /// The database of the splitters and reducers in [`StoreMode::Postgres`].
    database: Option<TestDatabase>,
    broker: Broker,
    publisher: Publisher,
    rpc: RpcClient,
    procs: Vec<Proc>,
    /// Operations whose work queues exist in the namespace besides the built-ins.
    operations: BTreeSet<String>,
    subscribers: Vec<JoinHandle<()>>,
    finished: bool,
}

impl TestEnv {
    /// A fresh namespace `t-{test}-{8 hex}` with its topology declared (as a user's program may
    /// publish before any batchq process has run) and an empty data folder.
    pub async fn new(test: &str) -> Result<Self> {
        Self::with_url(test, &amqp_url()).await
    }

    /// [`TestEnv::new`] on another broker than the shared one (a private node, a cluster's
    /// comma-separated URLs): the test's own connections and every process it starts use `url`.
    pub async fn with_url(test: &str, url: &str) -> Result<Self> {
        Self::with_tls(test, url, None).await
    }

    /// [`TestEnv::with_url`] trusting the CA certificates of `tls_ca_file` for `amqps://`:
    /// the test's connections and every process and `batchctl` it starts.
    pub async fn with_tls(test: &str, url: &str, tls_ca_file: Option<&Path>) -> Result<Self> {
        Self::with_store(test, url, tls_ca_file, StoreMode::detect()?).await
    }

    /// [`TestEnv::new`] whose splitters and reducers keep their state in a PostgreSQL database
    /// of the test's own, whatever the test executable: for tests of standby replicas, which
    /// only PostgreSQL allows.
    ///
    /// `None` (the test is skipped, and says so on stderr) when PostgreSQL does not answer and
    /// the run does not require it (see [`postgres::skip_without_postgres`]); `.ci/run`
    /// requires it.
    pub async fn postgres(test: &str) -> Result<Option<Self>> {
        Self::postgres_with_url(test, &amqp_url()).await
    }

    /// [`TestEnv::postgres`] on another broker (a private node, a cluster's URLs).
    pub async fn postgres_with_url(test: &str, url: &str) -> Result<Option<Self>> {
        if postgres::skip_without_postgres(test).await? {
            return Ok(None);
        }
        Ok(Some(
            Self::with_store(test, url, None, StoreMode::Postgres).await?,
        ))
    }

    /// [`TestEnv::with_tls`] with the store chosen by the test rather than by
    /// [`StoreMode::detect`]. In [`StoreMode::Postgres`] a fresh database is created
    /// ([`TestDatabase`]); every splitter and reducer gets it as `BATCHQ_DATABASE_URL` (and a
    /// `BATCHQ_DATA_DIR` as in SQLite mode), and it is dropped with the namespace.
    pub async fn with_store(
        test: &str,
        url: &str,
        tls_ca_file: Option<&Path>,
        store: StoreMode,
    ) -> Result<Self> {
        // A PostgreSQL suite (`*_pg.rs`) on a machine without PostgreSQL, not required: the
        // same tests on SQLite, said loudly, rather than a failure of the whole suite.
        let store = match store {
            StoreMode::Postgres if postgres::skip_without_postgres(test).await? => {
                StoreMode::Sqlite
            }
            other => other,
        };
        let database = match store {
            StoreMode::Sqlite => None,
            StoreMode::Postgres => Some(
                TestDatabase::create()
                    .await
                    .context("creating the test's PostgreSQL database")?,
            ),
        };
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("t-{test}-{}", &suffix[..8]);
        let dir = tempfile::Builder::new()
            .prefix(&format!("batchq-{test}-"))
            .tempdir()
            .context("creating the test's data folder")?;
        let mut args = BrokerArgs::new(url, ns.clone());
        args.tls_ca_file = tls_ca_file.map(Path::to_path_buf);
        let broker = Broker::new(&args, "batchq-tests")?;
        tokio::time::timeout(Duration::from_secs(15), broker.declare_topology())
            .await
            .context("declaring the topology timed out")?
            .context("declaring the topology")?;
        let publisher = broker.publisher().await?;
        let rpc = RpcClient::open(&broker).await?;
        Ok(Self {
            names: Names::new(ns.clone()),
            ns,
            url: url.to_owned(),
            tls_ca_file: args.tls_ca_file,
            dir: Some(dir),
            database,
            broker,
            publisher,
            rpc,
            procs: Vec::new(),
            operations: BTreeSet::new(),
            subscribers: Vec::new(),
            finished: false,
        })
    }

    /// The test's temporary folder (data and logs of the processes).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    /// `BATCHQ_DATA_DIR` of the first splitter and the first reducer (each binary keeps its
    /// store in a subfolder of its own). Further replicas get folders of their own
    /// ([`TestEnv::data_dir_of`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// `BATCHQ_DATA_DIR` of the `n`-th (from 1) splitter or reducer this test starts: the
    /// first of each shares [`TestEnv::data_dir`] (in subfolders of their own), the second of
    /// each `data-2`, and so on, so two replicas never share a SQLite store; in PostgreSQL
    /// mode they share the test's database, which is the point of replicas.
    fn replica_data_dir(&self, n: usize) -> PathBuf {
        if n <= 1 {
            self.data_dir()
        } else {
            self.dir().join(format!("data-{n}"))
        }
    }

    /// The `BATCHQ_DATA_DIR` a process was started with (`None` for workers).
    pub fn data_dir_of(&self, id: ProcId) -> Option<PathBuf> {
        self.procs[id.0]
            .envs
            .iter()
            .rev()
            .find(|(k, _)| k == "BATCHQ_DATA_DIR")
            .map(|(_, v)| PathBuf::from(v))
    }

    /// Where the test's splitters and reducers keep their state.
    pub fn store_mode(&self) -> StoreMode {
        if self.database.is_some() {
            StoreMode::Postgres
        } else {
            StoreMode::Sqlite
        }
    }

    /// `BATCHQ_DATABASE_URL` of the test's splitters and reducers: `Some` in PostgreSQL mode.
    pub fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(TestDatabase::url)
    }

    /// The test's PostgreSQL database, in PostgreSQL mode (to look at what the stores wrote).
    pub fn database(&self) -> Option<&TestDatabase> {
        self.database.as_ref()
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The `AMQP_URL` of this test's processes.
    pub fn broker_url(&self) -> &str {
        &self.url
    }

    pub fn rpc(&self) -> &RpcClient {
        &self.rpc
    }

    /// Notes an operation beyond the built-ins, so its work queue is deleted at the end.
    pub fn note_operation(&mut self, operation: &str) {
        self.operations.insert(operation.to_owned());
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("AMQP_URL".into(), self.url.clone()),
            ("BATCHQ_NAMESPACE".into(), self.ns.clone()),
        ];
        if let Some(ca) = &self.tls_ca_file {
            env.push(("BATCHQ_TLS_CA_FILE".into(), ca.display().to_string()));
        }
        env
    }

    fn start(
        &mut self,
        bin: Bin,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<ProcId> {
        self.start_program(bin, bin_path(bin), args, envs)
    }

    /// The environment of the next splitter or reducer: broker, namespace, its own
    /// `BATCHQ_DATA_DIR`, the test's `BATCHQ_DATABASE_URL` in PostgreSQL mode, then `extra`
    /// (which may override any of them).
    fn stateful_env(&self, bin: Bin, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let n = self.procs.iter().filter(|p| p.bin == bin).count() + 1;
        let mut envs = self.base_env();
        envs.push((
            "BATCHQ_DATA_DIR".into(),
            self.replica_data_dir(n).display().to_string(),
        ));
        if let Some(url) = self.database_url() {
            envs.push(("BATCHQ_DATABASE_URL".into(), url.to_owned()));
        }
        envs.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        envs
    }

    fn start_program(
        &mut self,
        bin: Bin,
        program: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<ProcId> {
        let n = self.procs.iter().filter(|p| p.bin == bin).count() + 1;
        let mut proc = Proc {
            bin,
            program,
            label: format!("{}-{n}", bin.name()),
            args,
            envs,
            child: None,
            logs: Vec::new(),
        };
        let log_dir = self.dir().to_path_buf();
        proc.spawn(&log_dir)?;
        self.procs.push(proc);
        Ok(ProcId(self.procs.len() - 1))
    }

    pub fn start_splitter(&mut self) -> Result<ProcId> {
        self.start_splitter_with(&[])
    }

    /// The splitter with extra flags.
    pub fn start_splitter_with(&mut self, args: &[&str]) -> Result<ProcId> {
        self.start_splitter_full(args, &[])
    }

    /// The splitter with extra environment variables (a failpoint).
    pub fn start_splitter_env(&mut self, extra: &[(&str, &str)]) -> Result<ProcId> {
        self.start_splitter_full(&[], extra)
    }

    /// A splitter with extra flags and environment variables. Every splitter of a test is a
    /// replica of one deployment: the same namespace (and, in PostgreSQL mode, database), a
    /// log and a data folder of its own.
    pub fn start_splitter_full(&mut self, args: &[&str], extra: &[(&str, &str)]) -> Result<ProcId> {
        let envs = self.stateful_env(Bin::Splitter, extra);
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        self.start(Bin::Splitter, args, envs)
    }

    /// The reducer, with no Prometheus port (tests run side by side).
    pub fn start_reducer(&mut self) -> Result<ProcId> {
        self.start_reducer_full(&[], &[])
    }

    /// The reducer with extra flags; without a `--metrics-addr` among them it serves no
    /// Prometheus port, as [`TestEnv::start_reducer`].
    pub fn start_reducer_with(&mut self, args: &[&str]) -> Result<ProcId> {
        self.start_reducer_full(args, &[])
    }

    /// The reducer with extra environment variables (a failpoint), serving no Prometheus port.
    pub fn start_reducer_env(&mut self, extra: &[(&str, &str)]) -> Result<ProcId> {
        self.start_reducer_full(&[], extra)
    }

    /// A reducer with extra flags and environment variables; without a `--metrics-addr` among
    /// the flags it serves no Prometheus port. Every reducer of a test is a replica of one
    /// deployment, as for [`TestEnv::start_splitter_full`].
    pub fn start_reducer_full(&mut self, args: &[&str], extra: &[(&str, &str)]) -> Result<ProcId> {
        let envs = self.stateful_env(Bin::Reducer, extra);
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if !args
            .iter()
            .any(|a| *a == "--metrics-addr" || a.starts_with("--metrics-addr="))
        {
            all.extend(["--metrics-addr".to_owned(), "off".to_owned()]);
        }
        self.start(Bin::Reducer, all, envs)
    }

    /// Another replica of a splitter or reducer: the same program, flags and settings as
    /// `like`, with a log and a data folder of its own (the same database in PostgreSQL
    /// mode). A standby, once the store elects one replica of each role.
    pub fn start_replica(&mut self, like: ProcId) -> Result<ProcId> {
        let source = &self.procs[like.0];
        let bin = source.bin;
        ensure!(
            matches!(bin, Bin::Splitter | Bin::Reducer),
            "{} is no splitter or reducer: only those have replicas",
            source.label
        );
        let program = source.program.clone();
        let args = source.args.clone();
        let n = self.procs.iter().filter(|p| p.bin == bin).count() + 1;
        let data_dir = self.replica_data_dir(n).display().to_string();
        let envs = source
            .envs
            .iter()
            .map(|(k, v)| {
                if k == "BATCHQ_DATA_DIR" {
                    (k.clone(), data_dir.clone())
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        self.start_program(bin, program, args, envs)
    }

    /// The label of a process, as in its log file names: `reducer-2`.
    pub fn label(&self, id: ProcId) -> &str {
        &self.procs[id.0].label
    }

    /// The log files of a process, one per incarnation, oldest first.
    pub fn log_paths(&self, id: ProcId) -> &[PathBuf] {
        &self.procs[id.0].logs
    }

    pub fn start_worker(&mut self, opts: WorkerOpts) -> Result<ProcId> {
        self.start_worker_program(bin_path(Bin::Worker), opts)
    }

    /// A worker built from another program with the worker's settings, such as an example
    /// that registers operations of its own (see [`example_path`]). Name its extra operations
    /// in `opts.operations` (or call [`TestEnv::note_operation`]) so their work queues are
    /// deleted at the end.
    pub fn start_worker_program(&mut self, program: PathBuf, opts: WorkerOpts) -> Result<ProcId> {
        let mut envs = self.base_env();
        if !opts.adaptive {
            envs.push(("BATCHQ_PREFETCH".into(), opts.prefetch.to_string()));
        }
        envs.push(("BATCHQ_HEARTBEAT_MS".into(), opts.heartbeat_ms.to_string()));
        if let Some(lifetime) = &opts.max_lifetime {
            envs.push(("BATCHQ_MAX_LIFETIME".into(), lifetime.clone()));
        }
        if let Some(max) = opts.max_fragments {
            envs.push(("BATCHQ_MAX_FRAGMENTS".into(), max.to_string()));
        }
        if let Some(addr) = &opts.metrics_addr {
            envs.push(("BATCHQ_METRICS_ADDR".into(), addr.clone()));
        }
        if let Some(allow) = &opts.exec_allow {
            envs.push(("BATCHQ_EXEC_ALLOW".into(), allow.clone()));
        }
        if let Some(operations) = &opts.operations {
            for op in operations {
                if !BUILTIN_OPERATIONS.contains(&op.as_str()) {
                    self.note_operation(op);
                }
            }
            envs.push(("BATCHQ_OPERATIONS".into(), operations.join(",")));
        }
        self.start_program(Bin::Worker, program, Vec::new(), envs)
    }

    /// Splitter, reducer and `workers` workers of default settings.
    pub fn start_spine(&mut self, workers: usize) -> Result<Spine> {
        let splitter = self.start_splitter()?;
        let reducer = self.start_reducer()?;
        let workers = (0..workers)
            .map(|_| self.start_worker(WorkerOpts::default()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Spine {
            splitter,
            reducer,
            workers,
        })
    }

    fn proc_mut(&mut self, id: ProcId) -> &mut Proc {
        &mut self.procs[id.0]
    }

    pub fn pid(&self, id: ProcId) -> Option<u32> {
        self.procs[id.0].pid()
    }

    /// Sends `signal` to a running process. SIGKILL also reaps it.
    pub fn kill(&mut self, id: ProcId, signal: Signal) -> Result<()> {
        let proc = self.proc_mut(id);
        let pid = proc
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", proc.label))?;
        match signal {
            Signal::Kill => {
                proc.kill_now();
            }
            other => send_signal(pid, other)?,
        }
        Ok(())
    }

    /// Waits until a process exits on its own and returns its status.
    pub async fn wait_exit(&mut self, id: ProcId, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let proc = self.proc_mut(id);
        let label = proc.label.clone();
        loop {
            let child = proc
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("{label} is not running"))?;
            if let Some(status) = child.try_wait()? {
                proc.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{label} did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a process started by this test is still running (reaping it if it exited).
    pub fn is_running(&mut self, id: ProcId) -> bool {
        let proc = self.proc_mut(id);
        match proc.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                proc.child = None;
                false
            }
            None => false,
        }
    }

    /// Starts a process again with the same settings (and data folder); SIGKILLs it first if it
    /// still runs.
    pub fn restart(&mut self, id: ProcId) -> Result<()> {
        let log_dir = self.dir().to_path_buf();
        let proc = self.proc_mut(id);
        proc.kill_now();
        proc.spawn(&log_dir)
    }

    /// Waits for `job_id` to end while standing in for a process supervisor: each process of
    /// `procs` found dead is started again. Returns the final status and the restarts made.
    pub async fn wait_restarting(
        &mut self,
        job_id: &str,
        procs: &[ProcId],
        timeout: Duration,
    ) -> Result<(JobStatus, usize)> {
        let deadline = Instant::now() + timeout;
        let mut restarts = 0;
        loop {
            for &id in procs {
                if !self.is_running(id) {
                    self.restart(id)?;
                    restarts += 1;
                }
            }
            if let Some(status) = self.status(job_id).await?
                && status.state.is_terminal()
            {
                return Ok((status, restarts));
            }
            ensure!(
                Instant::now() < deadline,
                "job {job_id} not finished after {restarts} restarts"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Pids of every live worker process started by this test.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| p.bin == Bin::Worker)
            .filter_map(Proc::pid)
            .collect()
    }

    /// Fragments a worker process of this test holds (delivered, not yet acknowledged), as its
    /// latest heartbeat told the reducer; `None` while the reducer has not heard of it.
    pub async fn fragments_held(&self, id: ProcId) -> Result<Option<u64>> {
        let pid = self
            .pid(id)
            .ok_or_else(|| anyhow!("process {id:?} is not running"))?;
        let workers = self.rpc.workers(&self.names).await?;
        Ok(workers
            .iter()
            .find(|w| w.pid == pid)
            .map(|w| w.fragments_in_flight))
    }

    /// Waits until a worker process holds at least one fragment (by its heartbeats).
    pub async fn wait_until_holding(&self, id: ProcId, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(held)) = self.fragments_held(id).await
                && held > 0
            {
                return Ok(held);
            }
            if Instant::now() >= deadline {
                bail!("worker {id:?} held no fragment within {timeout:?}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Runs `batchctl` in this namespace and returns (exit status, stdout, stderr).
    pub async fn batchctl(&self, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        self.batchctl_within(args, Duration::from_secs(30)).await
    }

    /// [`TestEnv::batchctl`] for a command that may take up to `limit`.
    pub async fn batchctl_within(
        &self,
        args: &[&str],
        limit: Duration,
    ) -> Result<(ExitStatus, String, String)> {
        let mut command = tokio::process::Command::new(bin_path(Bin::Batchctl));
        command
            .args(args)
            .envs(self.base_env())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(limit, command.output())
            .await
            .with_context(|| format!("batchctl did not finish within {limit:?}"))??;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    // --- publishing ---------------------------------------------------------------------------

    /// Publishes raw bytes to `{ns}.jobs` with routing key `submit`: persistent, confirmed, and
    /// mandatory (so a missing binding is an error, not a silent loss).
    pub async fn submit_raw(&self, body: &[u8], props: RawProps) -> Result<()> {
        self.publish_jobs(KEY_SUBMIT, body, props).await
    }

    async fn publish_jobs(&self, key: &str, body: &[u8], props: RawProps) -> Result<()> {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = props.content_type {
            properties = properties.with_content_type(ShortString::from(ct));
        }
        if let Some(id) = props.message_id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        let confirm = async {
            // After a broker restart the test's publishing channel is gone: publish on a new one.
            let fresh;
            let publisher = if self.publisher.channel().status().connected() {
                &self.publisher
            } else {
                fresh = self.broker.publisher().await?;
                &fresh
            };
            publisher
                .start_with(&self.names.jobs(), key, body, properties, true)
                .await?
                .wait()
                .await
        };
        tokio::time::timeout(Duration::from_secs(10), confirm)
            .await
            .context("publishing to {ns}.jobs timed out")?
            .context("publishing to {ns}.jobs")?;
        Ok(())
    }

    /// Publishes a JobSpec as JSON and returns its `job_id` (the spec must carry one).
    pub async fn submit(&self, spec: &Value) -> Result<String> {
        let job_id = spec
            .get("job_id")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the tests always give a job_id: {spec}"))?
            .to_owned();
        let body = serde_json::to_vec(spec)?;
        self.submit_raw(&body, RawProps::json()).await?;
        Ok(job_id)
    }

    /// Publishes a CancelRequest.
    pub async fn cancel(&self, job_id: &str) -> Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "job_id": job_id }))?;
        self.publish_jobs(KEY_CANCEL, &body, RawProps::json()).await
    }

    /// Publishes a RedriveRequest (as a user's program would, without `batchctl`'s check of
    /// the job's state).
    pub async fn redrive(&self, job_id: &str) -> Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "job_id": job_id }))?;
        self.publish_jobs(common::topology::KEY_REDRIVE, &body, RawProps::json())
            .await
    }

    /// A job id unique to this test: `{name}-{8 hex}`.
    pub fn job_id(&self, name: &str) -> String {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{name}-{}", &suffix[..8])
    }

    // --- observing ----------------------------------------------------------------------------

    pub async fn status(&self, job_id: &str) -> Result<Option<JobStatus>> {
        self.rpc.status(&self.names, job_id).await
    }

    /// Every result of a job, all pages, in the order the reducer gives them.
    pub async fn results(&self, job_id: &str) -> Result<Vec<ResultLine>> {
        self.rpc.results(&self.names, job_id, 1000).await
    }

    /// Polls the job's status until it is terminal.
    pub async fn wait_for_terminal(&self, job_id: &str, timeout: Duration) -> Result<JobStatus> {
        self.wait_for_status(job_id, timeout, |s| s.state.is_terminal())
            .await
    }

    /// Polls the job's status (RPC) until `done` holds. A lost reply or an absent reducer is
    /// only a reason to poll again; the overall `timeout` is what fails the test.
    pub async fn wait_for_status(
        &self,
        job_id: &str,
        timeout: Duration,
        mut done: impl FnMut(&JobStatus) -> bool,
    ) -> Result<JobStatus> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<JobStatus> = None;
        let mut last_error: Option<anyhow::Error> = None;
        loop {
            match self.status(job_id).await {
                Ok(Some(status)) => {
                    if done(&status) {
                        return Ok(status);
                    }
                    last = Some(status);
                }
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                bail!(
                    "job {job_id}: condition not reached within {timeout:?}; last status {last:?}; \
                     last RPC error {last_error:?}"
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Waits until the reducer knows at least `n` live workers.
    pub async fn wait_for_workers(&self, n: usize, timeout: Duration) -> Result<Vec<WorkerInfo>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(workers) = self.rpc.workers(&self.names).await
                && workers.len() >= n
            {
                return Ok(workers);
            }
            if Instant::now() >= deadline {
                bail!("fewer than {n} workers heard of within {timeout:?}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Starts collecting every JobStatus published on `{ns}.status` (`job.#`).
    pub async fn subscribe_status(&mut self) -> Result<StatusLog> {
        let channel = self.broker.channel().await?;
        let mut consumer = common::consume::subscribe(
            &channel,
            &self.names.status(),
            "job.#",
            "batchq-tests-status",
        )
        .await?;
        let log = StatusLog::default();
        let entries = Arc::clone(&log.entries);
        let task = tokio::spawn(async move {
            // The channel lives as long as the task, which the env aborts at its end.
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let parsed = serde_json::from_slice::<JobStatus>(&delivery.data)
                    .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&delivery.data)));
                let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
                entries.push(StatusEntry {
                    received: Instant::now(),
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    content_type: delivery
                        .properties
                        .content_type()
                        .as_ref()
                        .map(|s| s.as_str().to_owned()),
                    status: parsed,
                });
            }
        });
        self.subscribers.push(task);
        Ok(log)
    }

    /// Takes every message on `{ns}.dead` (acking each).
    pub async fn drain_dead(&self) -> Result<Vec<DeadMessage>> {
        let channel = self.broker.channel().await?;
        let mut out = Vec::new();
        loop {
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                channel.basic_get(self.names.dead().into(), BasicGetOptions { no_ack: true }),
            )
            .await
            .context("basic_get on {ns}.dead timed out")??;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let mut headers = Vec::new();
            if let Some(table) = delivery.properties.headers() {
                for (key, value) in table {
                    headers.push((key.as_str().to_owned(), amqp_text(value)));
                }
            }
            out.push(DeadMessage {
                routing_key: delivery.routing_key.as_str().to_owned(),
                body: delivery.data,
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned()),
                headers,
            });
        }
        let _ = channel.close(200, "drained".into()).await;
        Ok(out)
    }

    /// Messages ready on a queue of the namespace.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        let channel = self.broker.channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "peeked".into()).await;
        Ok(declared.message_count())
    }

    // --- the end ------------------------------------------------------------------------------

    /// Stops every process (SIGKILL) and deletes the namespace's queues and exchanges. Every
    /// test that passes ends with this; a test that does not reach it is cleaned up on drop.
    pub async fn finish(mut self) -> Result<()> {
        self.finished = true;
        self.stop_all();
        for task in self.subscribers.drain(..) {
            task.abort();
        }
        self.rpc.close().await;
        let channel = self.broker.channel().await?;
        let ops = self.all_operations();
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        tokio::time::timeout(
            Duration::from_secs(30),
            common::topology::delete(&channel, &self.names, &ops),
        )
        .await
        .context("deleting the namespace timed out")?
        .context("deleting the namespace")?;
        let _ = channel.close(200, "namespace deleted".into()).await;
        let _ = self
            .publisher
            .channel()
            .close(200, "test over".into())
            .await;
        if let Some(database) = self.database.take() {
            let used = self.check_database_used(&database).await;
            database.drop_now().await?;
            used?;
        }
        if std::env::var_os("BATCHQ_TEST_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("BATCHQ_TEST_KEEP: keeping {}", dir.keep().display());
        }
        Ok(())
    }

    /// The schemas of the test's database (lower-cased), `information_schema` and the like
    /// included; empty in SQLite mode.
    pub async fn database_schemas(&self) -> Result<Vec<String>> {
        match &self.database {
            Some(database) => database_schemas(database).await,
            None => Ok(Vec::new()),
        }
    }

    /// In PostgreSQL mode, that the splitters and reducers kept their state in the test's
    /// database: a schema `…_splitter` when a splitter ran, `…_reducer` when a reducer ran.
    /// Without this a binary that ignored `BATCHQ_DATABASE_URL` would pass the PostgreSQL
    /// suites on SQLite.
    async fn check_database_used(&self, database: &TestDatabase) -> Result<()> {
        let schemas = database_schemas(database).await?;
        for (bin, suffix) in [(Bin::Splitter, "_splitter"), (Bin::Reducer, "_reducer")] {
            if !self.procs.iter().any(|p| p.bin == bin) {
                continue;
            }
            ensure!(
                schemas.iter().any(|s| s.ends_with(suffix)),
                "the test ran a {} in PostgreSQL mode, but its database {} holds no schema \
                 `{{namespace}}{suffix}`: the {} did not keep its state there (does it read \
                 BATCHQ_DATABASE_URL?); schemas: {schemas:?}",
                bin.name(),
                database.name(),
                bin.name()
            );
        }
        Ok(())
    }

    fn all_operations(&self) -> Vec<String> {
        BUILTIN_OPERATIONS
            .iter()
            .map(|s| (*s).to_owned())
            .chain(self.operations.iter().cloned())
            .collect()
    }

    fn stop_all(&mut self) {
        for proc in &mut self.procs {
            proc.kill_now();
        }
    }

    /// Everything a process has logged, over all its incarnations, in order.
    pub fn log_text(&self, id: ProcId) -> String {
        self.procs[id.0]
            .logs
            .iter()
            .map(|log| {
                String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
            })
            .collect()
    }

    /// The last lines of every process log, for a failure report.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for proc in &self.procs {
            for log in &proc.logs {
                out.push_str(&format!(
                    "----- {} (last {LOG_TAIL_LINES} lines) -----\n{}\n",
                    log.display(),
                    tail(log, LOG_TAIL_LINES)
                ));
            }
        }
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stop_all();
        for task in self.subscribers.drain(..) {
            task.abort();
        }
        let store = match self.database_url() {
            Some(url) => format!(" (store: PostgreSQL {url}, dropped now)"),
            None => String::new(),
        };
        eprintln!(
            "test in namespace {}{store} ended without finish(); process logs follow\n{}",
            self.ns,
            self.logs_tail()
        );
        if let Some(dir) = self.dir.take() {
            eprintln!("keeping the test folder {}", dir.keep().display());
        }
        // Drop cannot await, and may run inside the test's runtime: delete the namespace from a
        // thread of its own, with a runtime and connection of its own.
        let ns = self.ns.clone();
        let mut args = BrokerArgs::new(self.url.clone(), ns);
        args.tls_ca_file = self.tls_ca_file.clone();
        let ops = self.all_operations();
        let cleanup = std::thread::spawn(move || delete_namespace_blocking(&args, &ops));
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete namespace: {e:#}"),
            Err(_) => eprintln!("the namespace cleanup thread panicked"),
        }
    }
}

async fn database_schemas(database: &TestDatabase) -> Result<Vec<String>> {
    let client = database.connect().await?;
    Ok(client
        .query(
            "SELECT schema_name::text FROM information_schema.schemata",
            &[],
        )
        .await
        .context("listing the schemas of the test's database")?
        .iter()
        .map(|row| row.get::<_, String>(0).to_lowercase())
        .collect())
}

fn delete_namespace_blocking(args: &BrokerArgs, ops: &[String]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = Broker::new(args, "batchq-tests-cleanup")?;
        let channel = broker.channel().await?;
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        tokio::time::timeout(
            Duration::from_secs(30),
            common::topology::delete(&channel, broker.names(), &ops),
        )
        .await
        .context("timed out")??;
        let _ = channel.close(200, "namespace deleted".into()).await;
        Ok(())
    })
}

/// The three kinds of process of one deployment.
#[derive(Debug, Clone)]
pub struct Spine {
    pub splitter: ProcId,
    pub reducer: ProcId,
    pub workers: Vec<ProcId>,
}

/// A message found on `{ns}.dead`.
#[derive(Debug, Clone)]
pub struct DeadMessage {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// Header names and their values as text.
    pub headers: Vec<(String, String)>,
}

impl DeadMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn amqp_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Status subscription

/// One message seen on `{ns}.status`.
#[derive(Debug, Clone)]
pub struct StatusEntry {
    pub received: Instant,
    pub routing_key: String,
    pub content_type: Option<String>,
    /// The body, or why it is not a JobStatus.
    pub status: Result<JobStatus, String>,
}

/// JobStatus messages collected by [`TestEnv::subscribe_status`].
#[derive(Clone, Default)]
pub struct StatusLog {
    entries: Arc<Mutex<Vec<StatusEntry>>>,
}

impl StatusLog {
    pub fn all(&self) -> Vec<StatusEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Statuses of one job, in arrival order, with their routing keys.
    pub fn of(&self, job_id: &str) -> Vec<(String, JobStatus)> {
        self.all()
            .into_iter()
            .filter_map(|e| match e.status {
                Ok(s) if s.job_id == job_id => Some((e.routing_key, s)),
                _ => None,
            })
            .collect()
    }

    /// Waits until a status of `job_id` satisfying `pred` has arrived.
    pub async fn wait_for(
        &self,
        job_id: &str,
        timeout: Duration,
        pred: impl Fn(&JobStatus) -> bool,
    ) -> Result<JobStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, s)) = self.of(job_id).into_iter().find(|(_, s)| pred(s)) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no matching status of {job_id} on the status exchange within {timeout:?}; \
                     seen: {:?}",
                    self.of(job_id)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RPC

/// The reducer's RPC (`common::rpc::RpcClient`) for tests: one request at a time, and a
/// channel that broke (the broker restarted) is replaced by a new one at the next call.
pub struct RpcClient {
    broker: Broker,
    inner: tokio::sync::Mutex<common::rpc::RpcClient>,
}

impl RpcClient {
    pub async fn open(broker: &Broker) -> Result<Self> {
        Ok(Self {
            broker: broker.clone(),
            inner: tokio::sync::Mutex::new(
                common::rpc::RpcClient::connect(broker, RPC_TIMEOUT).await?,
            ),
        })
    }

    async fn close(&self) {
        self.inner.lock().await.close().await;
    }

    /// One request and its reply, within [`RPC_TIMEOUT`]. `names` must be the namespace of
    /// the broker the client was opened on.
    pub async fn call(&self, names: &Names, request: &Request) -> Result<Response> {
        ensure!(
            names == self.broker.names(),
            "an RPC client of {} asked about {}",
            self.broker.names().namespace(),
            names.namespace()
        );
        let mut inner = self.inner.lock().await;
        if !inner.is_open() {
            *inner = tokio::time::timeout(
                RPC_TIMEOUT,
                common::rpc::RpcClient::connect(&self.broker, RPC_TIMEOUT),
            )
            .await
            .context("reopening the RPC channel timed out")?
            .context("reopening the RPC channel")?;
        }
        inner
            .call(request)
            .await
            .with_context(|| format!("no reply to {request:?}"))
    }

    pub async fn status(&self, names: &Names, job_id: &str) -> Result<Option<JobStatus>> {
        let request = Request::Status {
            job_id: job_id.to_owned(),
        };
        match self.call(names, &request).await? {
            Response::Status(status) => Ok(Some(status)),
            Response::NotFound { .. } => Ok(None),
            other => bail!("unexpected reply to a status request: {other:?}"),
        }
    }

    /// Every result line, page by page (`limit` per page) following `next`.
    pub async fn results(
        &self,
        names: &Names,
        job_id: &str,
        limit: u32,
    ) -> Result<Vec<ResultLine>> {
        let mut lines = Vec::new();
        let mut from = 0;
        loop {
            let request = Request::Results {
                job_id: job_id.to_owned(),
                from,
                limit,
            };
            match self.call(names, &request).await? {
                Response::Results(page) => {
                    lines.extend(page.lines);
                    match page.next {
                        Some(next) => {
                            ensure!(
                                next > from,
                                "results paging went backwards: {from} → {next}"
                            );
                            from = next;
                        }
                        None => return Ok(lines),
                    }
                }
                Response::NotFound { .. } => bail!("results of unknown job {job_id}"),
                other => bail!("unexpected reply to a results request: {other:?}"),
            }
        }
    }

    pub async fn jobs(&self, names: &Names, limit: u32) -> Result<Vec<JobStatus>> {
        match self.call(names, &Request::Jobs { limit }).await? {
            Response::Jobs { jobs } => Ok(jobs),
            other => bail!("unexpected reply to a jobs request: {other:?}"),
        }
    }

    pub async fn workers(&self, names: &Names) -> Result<Vec<WorkerInfo>> {
        match self.call(names, &Request::Workers).await? {
            Response::Workers { workers } => Ok(workers),
            other => bail!("unexpected reply to a workers request: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Expected figures, computed independently of batchq's code

/// `text(item)` of the contract: a string as itself, anything else as compact JSON in the
/// order its keys were given (serde_json's `preserve_order` keeps it).
pub fn text_of(item: &Value) -> String {
    match item {
        Value::String(s) => s.clone(),
        other => serde_json::to_string(other).expect("a JSON value always serialises"),
    }
}

/// Lowercase hex of `h_rounds`, `h_1 = SHA-256(text)`, `h_k = SHA-256(h_{k-1})` (raw bytes).
pub fn sha256_hex(text: &str, rounds: u32) -> String {
    let mut digest = Sha256::digest(text.as_bytes());
    for _ in 1..rounds {
        digest = Sha256::digest(digest);
    }
    hex::encode(digest)
}

/// Checks that `lines` holds exactly one line per index `0..n`, in index order.
pub fn assert_one_per_index(lines: &[ResultLine], n: u64) {
    assert_eq!(lines.len() as u64, n, "one result line per operation");
    for (expected, line) in (0..n).zip(lines) {
        assert_eq!(line.index(), expected, "results in index order, no gaps");
    }
}

/// Asserts the figures of a finished job: its state and exact counts.
pub fn assert_counts(status: &JobStatus, state: JobState, succeeded: u64, failed: u64) {
    assert_eq!(
        (status.state, status.ops_succeeded, status.ops_failed),
        (state, succeeded, failed),
        "state and counts of {status:?}"
    );
    assert_eq!(
        status.ops_total,
        succeeded + failed,
        "ops_total of {status:?}"
    );
    assert_eq!(
        status.fragments_in_flight, 0,
        "nothing in flight at the end: {status:?}"
    );
    assert!(
        status.finished_at.is_some(),
        "a terminal job has finished_at: {status:?}"
    );
}
