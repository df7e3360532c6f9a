//! batchq's benchmark: how close the pipeline comes to the limits measured in the same run on
//! the same machine (issue 5).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p batchq-tests --bin bench -- [--quick] [--json PATH] [--only PARTS]
//! ```
//!
//! Each part starts the real `splitter`, `reducer` and `worker` binaries of the bench's own
//! profile folder in a namespace of its own (`bench-{part}-{8 hex}`) on `AMQP_URL`, and deletes
//! that namespace at its end, whatever happened. A job that does not succeed with exact counts
//! fails the run; the figures themselves are only reported (printed as a table, written as JSON
//! to `target/bench/pipeline.json` by default), never asserted: they move with the machine.
//!
//! The parts, in the order they run and print: `ceiling` (the broker's two-hop relay, the
//! limit of the per-fragment figures), then `stock`, the settings a user keeps (issue 13:
//! workers started without a prefetch, so at their default, and JobSpecs without
//! `max_concurrent_fragments`, so in the default window of 16), so the table opens with the
//! default rows: the per-fragment job, a sha256 job of fragment_size 100, how much of a
//! window of workers × the default prefetch is in use, and the README demo's job on a fresh
//! deployment (a first run). Then the parts at settings tuned to their question (`fragment`,
//! `noop`, `compute`, `scaling`), `latency` (a stock worker) and `console` (the web console's
//! queries on a store of many jobs and a job of many failures).
//!
//! The splitter and reducer keep their state in SQLite. The tuned per-fragment part and the noop
//! part's job with results run a second time on a deployment whose splitter and reducer keep it
//! in a fresh PostgreSQL database (`BATCHQ_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432`; dropped after): figures "… on PostgreSQL", held
//! against the SQLite figure of the same run (issue 12: a ratio of at least 0.5). Where
//! PostgreSQL does not answer those rows are skipped, saying so, unless
//! `BATCHQ_TEST_REQUIRE_POSTGRES` is set: then the run fails.

#[path = "../bench/compute.rs"]
mod compute;
#[path = "../bench/deployment.rs"]
mod deployment;
#[path = "../bench/procfs.rs"]
mod procfs;
#[path = "../bench/relay.rs"]
mod relay;
#[path = "../bench/report.rs"]
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::broker::Broker;
use common::config::BrokerArgs;
use common::contract::ResultLine;
use common::wire::{Request, Response};
use serde_json::json;

use crate::deployment::{Deployment, JobRun, Programs, Store};
use crate::procfs::{CpuSample, CpuUsage};
use crate::relay::RelaySettings;
use crate::report::{CpuRow, Figure, Machine, PartInfo, Report, Target};

/// In the order they run (and their figures print): the stock part right after the ceiling
/// it is held against, before every part of tuned settings.
const PARTS: [&str; 8] = [
    "ceiling", "stock", "fragment", "noop", "compute", "scaling", "latency", "console",
];

const USAGE: &str = "\
usage: bench [--quick] [--json PATH] [--only PART,PART...]

  --quick        every part at a small size (well under a minute)
  --json PATH    where to write the figures (default target/bench/pipeline.json)
  --only PARTS   run only these parts: ceiling, stock, fragment, noop, compute, scaling,
                 latency, console (they run in this order; a ratio to the broker ceiling
                 needs ceiling)

Build the binaries of the same profile first: cargo build [--release] --workspace --bins";

#[derive(Debug)]
struct Options {
    quick: bool,
    json: PathBuf,
    parts: Vec<String>,
}

fn parse_args() -> Result<Option<Options>> {
    let mut options = Options {
        quick: false,
        json: default_json_path(),
        parts: PARTS.iter().map(|p| (*p).to_owned()).collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => options.json = args.next().context("--json needs a path")?.into(),
            "--only" => {
                let parts: Vec<String> = args
                    .next()
                    .context("--only needs a list of parts")?
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect();
                for part in &parts {
                    ensure!(PARTS.contains(&part.as_str()), "unknown part {part:?}");
                }
                options.parts = parts;
            }
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(options))
}

/// `target/bench/pipeline.json` of the workspace.
fn default_json_path() -> PathBuf {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .unwrap_or(tests)
        .join("target")
        .join("bench")
        .join("pipeline.json")
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    relay_messages: u64,
    /// The per-fragment jobs' operations (the stock part's and the tuned part's).
    fragment_ops: u64,
    /// The stock part's sha256 job of fragment_size 100.
    stock_sha_ops: u64,
    /// The stock part's window-use job holds this many seconds of ideal work.
    window_seconds: f64,
    /// The README demo's job, in the stock part.
    demo_ops: u64,
    noop_ops: u64,
    sha_ops: u64,
    /// Each scaling job holds this many seconds of ideal work.
    scaling_seconds: f64,
    latency_jobs: usize,
    /// The console part's store: this many jobs, and one job of `console_failures` failed
    /// operations.
    console_jobs: u64,
    console_failures: u64,
    /// Runs of each sub-second job (the 1,000,000-operation ones and their limits); the
    /// figure is their median, which one busy moment on a shared machine does not move.
    repeats: usize,
}

impl Sizes {
    fn full() -> Self {
        Self {
            relay_messages: 20_000,
            fragment_ops: 20_000,
            stock_sha_ops: 200_000,
            window_seconds: 4.0,
            demo_ops: 1_000_000,
            noop_ops: 1_000_000,
            sha_ops: 1_000_000,
            scaling_seconds: 4.0,
            latency_jobs: 100,
            console_jobs: 10_000,
            console_failures: 100_000,
            repeats: 3,
        }
    }

    fn quick() -> Self {
        Self {
            relay_messages: 2_000,
            fragment_ops: 2_000,
            stock_sha_ops: 20_000,
            window_seconds: 1.0,
            demo_ops: 50_000,
            noop_ops: 50_000,
            sha_ops: 50_000,
            scaling_seconds: 1.0,
            latency_jobs: 20,
            console_jobs: 2_000,
            console_failures: 20_000,
            repeats: 1,
        }
    }
}

/// What every part shares.
struct Bench {
    sizes: Sizes,
    url: String,
    programs: Programs,
    broker_pid: Option<u32>,
    ticks_per_second: f64,
    report: Report,
    /// Messages per second of the two-hop relay, once measured.
    broker_ceiling: Option<f64>,
    /// Whether PostgreSQL answers (and so the PostgreSQL column runs), once asked.
    postgres: Option<bool>,
}

/// The worker's default prefetch: the contract's default, what a worker started without
/// `BATCHQ_PREFETCH` / `--prefetch` runs at once.
const DEFAULT_PREFETCH: u64 = 4;
/// The stock part's deployments: this many workers, each started without a prefetch.
const STOCK_WORKERS: usize = 2;
/// The per-fragment part's deployment and job (tuned): workers, prefetch,
/// max_concurrent_fragments.
const FRAGMENT_SETUP: (usize, u16, u64) = (1, 64, 256);
/// The noop part's: workers, prefetch, max_concurrent_fragments, fragment_size.
const NOOP_SETUP: (usize, u16, u64, u64) = (1, 16, 64, 1000);
/// Issue 12: PostgreSQL at least half as fast as SQLite on the same run.
const POSTGRES_TARGET: Target = Target::RatioAtLeast(0.5);

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Ctrl-C drops the run, whose deployments then kill their processes and delete their
    // namespaces.
    let outcome = tokio::select! {
        outcome = run(&options) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let programs = Programs::locate()?;
    let url = batchq_tests::amqp_url();
    let broker_pid = procfs::broker_pid(&url);
    let machine = Machine {
        cores: procfs::available_cores(),
        cpu: cpu_model(),
        profile: programs.profile(),
        broker_pid,
    };
    let mode = if options.quick { "quick" } else { "full" };
    println!(
        "batchq bench ({mode}, {} profile) on {} cores ({}); broker {} (pid {}). Other \
         processes of the machine share the cores: figures are noisy.",
        machine.profile,
        machine.cores,
        machine.cpu,
        common::config::redact_url(&url),
        broker_pid.map_or("not found".to_owned(), |p| p.to_string()),
    );
    let mut bench = Bench {
        sizes: if options.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        },
        url,
        programs,
        broker_pid,
        ticks_per_second: procfs::clock_ticks_per_second(),
        report: Report {
            mode: mode.to_owned(),
            started_at: common::timefmt::format_ms(common::timefmt::now_ms()),
            machine,
            parts: Vec::new(),
            figures: Vec::new(),
            cpu: Vec::new(),
            seconds: 0.0,
        },
        broker_ceiling: None,
        postgres: None,
    };
    for part in PARTS {
        if !options.parts.iter().any(|p| p == part) {
            continue;
        }
        let part_started = Instant::now();
        let settings = match part {
            "ceiling" => bench.ceiling().await,
            "stock" => bench.stock().await,
            "fragment" => bench.per_fragment().await,
            "noop" => bench.per_operation().await,
            "compute" => bench.compute().await,
            "scaling" => bench.scaling().await,
            "latency" => bench.latency().await,
            _ => bench.console().await,
        }
        .with_context(|| format!("part {part}"))?;
        let seconds = part_started.elapsed().as_secs_f64();
        println!("   ({part}: {seconds:.1} s)");
        bench.report.parts.push(PartInfo {
            part: part.to_owned(),
            settings,
            seconds,
        });
    }
    bench.report.seconds = started.elapsed().as_secs_f64();
    println!("\n{}", bench.report.table());
    println!("CPU while each measured job ran (100% = one core; machine = every process):");
    println!("{}", bench.report.cpu_table());
    bench.report.write_json(&options.json)?;
    println!(
        "figures written to {}; whole run {:.1} s",
        options.json.display(),
        bench.report.seconds
    );
    Ok(())
}

impl Bench {
    fn figure(&mut self, figure: Figure) {
        println!(
            "   {}: {} {}{}",
            figure.name,
            report::number(figure.value),
            figure.unit,
            figure
                .ratio
                .map_or(String::new(), |r| format!(" (ratio {r:.2})"))
        );
        self.report.figures.push(figure);
    }

    fn announce(part: &str, settings: &str) {
        println!("== {part}: {settings}");
    }

    /// Processes whose CPU is watched: the deployment's (with its PostgreSQL backends), the
    /// bench itself and the broker.
    fn watched(&self, deployment: Option<&Deployment>) -> Vec<(String, u32)> {
        let mut watched = deployment.map(Deployment::watched_pids).unwrap_or_default();
        watched.push(("bench".to_owned(), std::process::id()));
        if let Some(pid) = self.broker_pid {
            watched.push(("broker".to_owned(), pid));
        }
        watched
    }

    fn record_cpu(&mut self, part: &str, job: &str, before: &CpuSample, after: &CpuSample) {
        self.report.cpu.push(CpuRow {
            part: part.to_owned(),
            job: job.to_owned(),
            usage: CpuUsage::between(before, after, self.ticks_per_second),
        });
    }

    /// Runs one measured job with its CPU watched.
    async fn measured_job(
        &mut self,
        deployment: &mut Deployment,
        job: &str,
        spec: &serde_json::Value,
    ) -> Result<JobRun> {
        let ops = spec["range"]["end"].as_u64().unwrap_or(0);
        let watched = self.watched(Some(deployment));
        let before = CpuSample::take(&watched);
        let run = deployment.run_job(spec, job_timeout(ops)).await?;
        let after = CpuSample::take(&watched);
        self.record_cpu(&deployment.part.clone(), job, &before, &after);
        Ok(run)
    }

    /// Whether the PostgreSQL figures run: PostgreSQL answers. When it does not, prints that
    /// `what` is skipped, or fails when `BATCHQ_TEST_REQUIRE_POSTGRES` is set. The server is
    /// asked once per run.
    async fn postgres_answers(&mut self, what: &str) -> Result<bool> {
        let answers = match self.postgres {
            Some(answers) => answers,
            None => {
                let skip = batchq_tests::postgres::skip_without_postgres("bench").await?;
                self.postgres = Some(!skip);
                !skip
            }
        };
        if !answers {
            println!(
                "   {what} on PostgreSQL: SKIPPED (PostgreSQL {} does not answer)",
                common::config::redact_url(&batchq_tests::postgres::test_postgres_url())
            );
        }
        Ok(answers)
    }

    /// A figure measured on PostgreSQL, held against the same figure on SQLite.
    fn postgres_figure(&mut self, sqlite: &Figure, value: f64) {
        self.figure(
            Figure::new(
                &sqlite.part,
                format!("{} on PostgreSQL", sqlite.name),
                value,
                &sqlite.unit,
            )
            .against(Some(sqlite.value), "SQLite, same run", POSTGRES_TARGET),
        );
    }

    // --- parts --------------------------------------------------------------------------------

    async fn ceiling(&mut self) -> Result<String> {
        let settings = RelaySettings {
            messages: self.sizes.relay_messages,
            body_bytes: 256,
            confirm_window: 256,
            prefetch: 64,
        };
        let text = format!(
            "two-hop lapin relay, {} persistent messages of {} bytes, quorum queues, confirms \
             in a window of {}, prefetch {}, multiple-acks",
            settings.messages, settings.body_bytes, settings.confirm_window, settings.prefetch
        );
        Self::announce("broker ceiling", &text);
        let mut deployment = Deployment::new("ceiling", &self.url, &self.programs).await?;
        let ns = deployment.names.namespace().to_owned();
        for hop in ["a", "b"] {
            deployment.delete_also(relay::relay_queue(&ns, hop));
        }
        let watched = self.watched(None);
        let before = CpuSample::take(&watched);
        let outcome = async {
            // A session of its own: the relay takes every connection of its pool.
            let broker = Broker::new(
                &BrokerArgs::new(deployment.url(), ns.as_str()),
                "batchq-bench-relay",
            )?;
            relay::run(&broker, &settings, Duration::from_secs(300)).await
        }
        .await;
        let after = CpuSample::take(&watched);
        let per_second = deployment.conclude(outcome).await?;
        self.record_cpu("ceiling", "relay", &before, &after);
        self.broker_ceiling = Some(per_second);
        self.figure(Figure::new(
            "ceiling",
            "broker ceiling (two-hop relay)",
            per_second,
            "msg/s",
        ));
        Ok(text)
    }

    /// The settings a user keeps (issue 13): workers started without a prefetch, JobSpecs
    /// without `max_concurrent_fragments` (the contract's default window, 16). The per-fragment
    /// job, a sha256 job of fragment_size 100 and a job measuring how much of a window of
    /// workers × the default prefetch is in use, on one deployment; then the README demo's job
    /// on a fresh one, so the splitter sizes it without a learned cost, as on a first run.
    async fn stock(&mut self) -> Result<String> {
        let workers = STOCK_WORKERS;
        let rounds = 10u32;
        let fragment_ops = self.sizes.fragment_ops;
        let (sha_ops, sha_fragment) = (self.sizes.stock_sha_ops, 100u64);
        // Fragments of 50 ms in a window as wide as the workers' default prefetch: every
        // fragment the workers take at once.
        let (sleep_ms, sleep_fragment) = (5u64, 10u64);
        let window = workers as u64 * DEFAULT_PREFETCH;
        let fragment_seconds = (sleep_ms * sleep_fragment) as f64 / 1000.0;
        let ideal = (window * sleep_fragment) as f64 / fragment_seconds;
        let sleep_ops = (ideal * self.sizes.window_seconds).round() as u64;
        let demo_ops = self.sizes.demo_ops;
        let default_window = common::jobspec::DEFAULT_MAX_CONCURRENT_FRAGMENTS;
        let text = format!(
            "{workers} workers started without a prefetch (their default, \
             {DEFAULT_PREFETCH}), JobSpecs without max_concurrent_fragments unless said (the \
             default, {default_window}); {fragment_ops} noop, fragment_size 1, collect_results false; \
             {sha_ops} sha256 rounds {rounds}, fragment_size {sha_fragment}, collect_results \
             false; {sleep_ops} sleep {sleep_ms} ms, fragment_size {sleep_fragment}, \
             max_concurrent_fragments {window} (workers × default prefetch), collect_results \
             false; then on a fresh deployment (no learned cost: a first run) the README demo's \
             job: {demo_ops} sha256 rounds {rounds}, default fragment sizing, \
             max_concurrent_fragments 16, collect_results true, its last 3 results checked"
        );
        Self::announce("stock settings", &text);
        let mut deployment = Deployment::new("stock", &self.url, &self.programs).await?;
        let outcome = async {
            deployment.start_spine(workers, None).await?;
            let spec = json!({
                "job_id": deployment.job_id("stock-fragments"),
                "operation": "noop",
                "range": {"start": 0, "end": fragment_ops},
                "fragment_size": 1,
                "collect_results": false,
            });
            let fragments = self
                .measured_job(&mut deployment, "noop fs=1", &spec)
                .await?;
            let spec = json!({
                "job_id": deployment.job_id("stock-sha256"),
                "operation": "sha256",
                "params": {"rounds": rounds},
                "range": {"start": 0, "end": sha_ops},
                "fragment_size": sha_fragment,
                "collect_results": false,
            });
            let sha = self
                .measured_job(&mut deployment, "sha256 fs=100", &spec)
                .await?;
            let spec = json!({
                "job_id": deployment.job_id("stock-window"),
                "operation": "sleep",
                "params": {"ms": sleep_ms},
                "range": {"start": 0, "end": sleep_ops},
                "fragment_size": sleep_fragment,
                "max_concurrent_fragments": window,
                "collect_results": false,
            });
            let sleep = self
                .measured_job(&mut deployment, "window use (sleep)", &spec)
                .await?;
            Ok((fragments, sha, sleep))
        }
        .await;
        let (fragments, sha, sleep) = deployment.conclude(outcome).await?;
        // The window is fully used when `window` fragments run at every instant, each taking
        // as long as its sleeps really take: a tokio sleep of 5 ms wakes on the timer's next
        // millisecond tick or later (5.5-6.5 ms here), which is the operation's own time, not
        // a gap the pipeline leaves. Measured in this process's runtime, as the worker's.
        let measured_fragment = sleep_fragment_seconds(sleep_ms, sleep_fragment).await;
        let used_ideal = (window * sleep_fragment) as f64 / measured_fragment;
        self.figure(
            Figure::new(
                "stock",
                "stock: per-fragment (noop, fragment_size 1, default window)",
                fragments.status.fragments_done as f64 / fragments.seconds,
                "fragments/s",
            )
            .against_in(
                self.broker_ceiling,
                "msg/s",
                "broker ceiling",
                Target::RatioAtLeast(0.6),
            ),
        );
        let sha_name = format!("stock: sha256 rounds {rounds}, fragment_size {sha_fragment}");
        self.figure(
            Figure::new(
                "stock",
                sha_name.clone(),
                sha.status.fragments_done as f64 / sha.seconds,
                "fragments/s",
            )
            .against_in(
                self.broker_ceiling,
                "msg/s",
                "broker ceiling",
                Target::RatioAtLeast(0.6),
            ),
        );
        self.figure(Figure::new(
            "stock",
            format!("{sha_name} (operations)"),
            sha.status.ops_succeeded as f64 / sha.seconds,
            "ops/s",
        ));
        self.figure(
            Figure::new(
                "stock",
                format!(
                    "stock: window use (sleep {sleep_ms} ms × {sleep_fragment}, window {window}: \
                     against {window} fragments always running, each {:.1} ms as measured)",
                    measured_fragment * 1000.0
                ),
                sleep.status.ops_succeeded as f64 / sleep.seconds,
                "ops/s",
            )
            .against(
                Some(used_ideal),
                "window always full",
                Target::RatioAtLeast(0.9),
            ),
        );
        self.figure(
            Figure::new(
                "stock",
                format!(
                    "stock: window use against the nominal {} ms fragments",
                    sleep_ms * sleep_fragment
                ),
                sleep.status.ops_succeeded as f64 / sleep.seconds,
                "ops/s",
            )
            .against(Some(ideal), "nominal ideal", Target::None),
        );
        let demo = self.stock_demo(demo_ops, rounds).await?;
        self.figure(
            Figure::new(
                "stock",
                format!(
                    "stock: README demo job ({} sha256 rounds {rounds}, with results, first run: \
                     {} fragments)",
                    report::number(demo_ops as f64),
                    demo.status.fragments_done
                ),
                demo.status.ops_succeeded as f64 / demo.seconds,
                "ops/s",
            )
            .target(Target::AtLeast(1_000_000.0)),
        );
        Ok(text)
    }

    /// The README demo's job (`batchctl demo`'s JobSpec) on a fresh deployment of stock
    /// workers, its last 3 results checked against the compute ceiling's hashes.
    async fn stock_demo(&mut self, ops: u64, rounds: u32) -> Result<JobRun> {
        let mut deployment = Deployment::new("stock", &self.url, &self.programs).await?;
        let outcome = async {
            deployment.start_spine(STOCK_WORKERS, None).await?;
            let job_id = deployment.job_id("stock-demo");
            let spec = json!({
                "job_id": job_id,
                "operation": "sha256",
                "params": {"rounds": rounds},
                "range": {"start": 0, "end": ops},
                "max_concurrent_fragments": 16,
                "collect_results": true,
            });
            let run = self
                .measured_job(&mut deployment, "README demo job", &spec)
                .await?;
            let first = ops.saturating_sub(3);
            let tail = deployment.results(&job_id, first, 10).await?;
            ensure!(
                tail.len() as u64 == ops - first,
                "the last results of {job_id} are {tail:?}"
            );
            for (item, line) in (first..).zip(&tail) {
                let expected = compute::expected_hex(item, rounds);
                match line {
                    ResultLine::Ok { index, result }
                        if *index == item && result.as_str() == Some(expected.as_str()) => {}
                    other => {
                        bail!("result of item {item} of {job_id}: {other:?}, expected {expected}")
                    }
                }
            }
            Ok(run)
        }
        .await;
        deployment.conclude(outcome).await
    }

    async fn per_fragment(&mut self) -> Result<String> {
        let (workers, prefetch, window) = FRAGMENT_SETUP;
        let ops = self.sizes.fragment_ops;
        let mut text = format!(
            "{ops} noop, fragment_size 1, max_concurrent_fragments {window}, \
             collect_results false; {workers} worker of prefetch {prefetch} (tuned settings); on \
             SQLite, then on PostgreSQL"
        );
        Self::announce("per-fragment overhead, tuned", &text);
        let sqlite = Figure::new(
            "fragment",
            "per-fragment, tuned (noop, fragment_size 1)",
            self.per_fragment_on(Store::Sqlite).await?,
            "fragments/s",
        )
        .against_in(
            self.broker_ceiling,
            "msg/s",
            "broker ceiling",
            Target::RatioAtLeast(0.9),
        );
        self.figure(sqlite.clone());
        if self.postgres_answers(&sqlite.name).await? {
            let value = self.per_fragment_on(Store::Postgres).await?;
            self.postgres_figure(&sqlite, value);
        } else {
            text.push_str(" (PostgreSQL skipped: it did not answer)");
        }
        Ok(text)
    }

    /// The per-fragment job on a deployment of its own on `store`: fragments per second.
    async fn per_fragment_on(&mut self, store: Store) -> Result<f64> {
        let (workers, prefetch, window) = FRAGMENT_SETUP;
        let ops = self.sizes.fragment_ops;
        let mut deployment =
            Deployment::with_store("fragment", &self.url, &self.programs, store).await?;
        let outcome = async {
            deployment.start_spine(workers, Some(prefetch)).await?;
            let spec = json!({
                "job_id": deployment.job_id("fragments"),
                "operation": "noop",
                "range": {"start": 0, "end": ops},
                "fragment_size": 1,
                "max_concurrent_fragments": window,
                "collect_results": false,
            });
            let label = job_label("noop fs=1", store);
            self.measured_job(&mut deployment, &label, &spec).await
        }
        .await;
        let run = deployment.conclude(outcome).await?;
        Ok(run.status.fragments_done as f64 / run.seconds)
    }

    async fn per_operation(&mut self) -> Result<String> {
        let (workers, prefetch, window, fragment_size) = NOOP_SETUP;
        let ops = self.sizes.noop_ops;
        let repeats = self.sizes.repeats;
        let mut text = format!(
            "{ops} noop, fragment_size {fragment_size}, max_concurrent_fragments {window}, \
             without then with collect_results, {repeats} time(s) (figures: the medians); \
             {workers} worker of prefetch {prefetch}; peak RSS read after every job; on SQLite, \
             then the job with results on PostgreSQL"
        );
        Self::announce("per-operation overhead and memory", &text);
        let (runs, memory) = self.per_operation_on(Store::Sqlite, &[false, true]).await?;
        let mut with_results = None;
        for (runs, (name, target)) in runs.iter().zip([
            ("noop, no results (fragment_size 1000)", 2_000_000.0),
            ("noop, with results (fragment_size 1000)", 500_000.0),
        ]) {
            let value = median(runs);
            let figure = Figure::new("noop", name, value, "ops/s").target(Target::AtLeast(target));
            self.figure(figure.clone());
            with_results = Some(figure);
        }
        for (label, kib) in memory {
            let Some(kib) = kib else {
                bail!("could not read the peak RSS of {label}");
            };
            let limit = match label.as_str() {
                "splitter" => 32.0,
                "reducer" => 64.0,
                _ => 20.0,
            };
            self.figure(
                Figure::new(
                    "memory",
                    format!("peak RSS {label}"),
                    kib as f64 / 1024.0,
                    "MiB",
                )
                .target(Target::AtMost(limit)),
            );
        }
        let sqlite = with_results.context("the noop part measured no job with results")?;
        if self.postgres_answers(&sqlite.name).await? {
            // Only the job with results: without them the reducer's store sees one small write
            // per fragment, and the per-fragment part measures that already.
            let (runs, _memory) = self.per_operation_on(Store::Postgres, &[true]).await?;
            self.postgres_figure(&sqlite, median(&runs[1]));
        } else {
            text.push_str(" (PostgreSQL skipped: it did not answer)");
        }
        Ok(text)
    }

    /// The noop part's jobs on a deployment of its own on `store`, those with
    /// `collect_results` among `collects`, each `repeats` times: operations per second of the
    /// runs without results (`[0]`) and with them (`[1]`), and the peak RSS of each process
    /// after the last job.
    async fn per_operation_on(
        &mut self,
        store: Store,
        collects: &[bool],
    ) -> Result<([Vec<f64>; 2], Vec<(String, Option<u64>)>)> {
        let (workers, prefetch, window, fragment_size) = NOOP_SETUP;
        let ops = self.sizes.noop_ops;
        let repeats = self.sizes.repeats;
        let mut deployment =
            Deployment::with_store("noop", &self.url, &self.programs, store).await?;
        let outcome = async {
            deployment.start_spine(workers, Some(prefetch)).await?;
            let mut runs: [Vec<f64>; 2] = Default::default();
            let jobs = (0..repeats).flat_map(|r| collects.iter().map(move |c| (*c, r)));
            for (collect_results, repeat) in jobs {
                let job_id = deployment.job_id(&if collect_results {
                    format!("noop-results-{repeat}")
                } else {
                    format!("noop-{repeat}")
                });
                let spec = json!({
                    "job_id": job_id,
                    "operation": "noop",
                    "range": {"start": 0, "end": ops},
                    "fragment_size": fragment_size,
                    "max_concurrent_fragments": window,
                    "collect_results": collect_results,
                });
                let label = job_label(
                    if collect_results {
                        "noop with results"
                    } else {
                        "noop"
                    },
                    store,
                );
                let run = self.measured_job(&mut deployment, &label, &spec).await?;
                if collect_results {
                    // The results are really there: the last page holds the last indices.
                    let tail = deployment.results(&job_id, ops - 3, 10).await?;
                    let indices: Vec<u64> = tail.iter().map(ResultLine::index).collect();
                    ensure!(
                        indices == vec![ops - 3, ops - 2, ops - 1]
                            && tail.iter().all(
                                |l| matches!(l, ResultLine::Ok { result, .. } if result.is_null())
                            ),
                        "the last results of {job_id} are {tail:?}"
                    );
                }
                runs[usize::from(collect_results)]
                    .push(run.status.ops_succeeded as f64 / run.seconds);
            }
            let memory: Vec<(String, Option<u64>)> = deployment
                .pids()
                .into_iter()
                .map(|(label, pid)| (label, procfs::peak_rss_kib(pid)))
                .collect();
            Ok((runs, memory))
        }
        .await;
        deployment.conclude(outcome).await
    }

    async fn compute(&mut self) -> Result<String> {
        let rounds = 10;
        let threads = procfs::available_cores();
        // One worker holding two fragments per core (the README's advice for CPU-bound
        // operations: a core has work while another fragment's report travels).
        let (workers, prefetch) = (1, (2 * threads).min(64) as u16);
        let ops = self.sizes.sha_ops;
        // Submitted the way a user submits it: no fragment_size (the job is sized from the
        // observed cost of an operation; the issue fixes no size for this part) and the
        // default window. Results are not collected: with them this measures the reducer's
        // store (the noop part does that), not how close the pipeline gets to the hashing.
        let text = format!(
            "{ops} sha256 rounds {rounds}, default fragment sizing and window, \
             collect_results false; {workers} worker of prefetch {prefetch}; ceiling: the same \
             hashes on {threads} threads in the bench, then the worker's runner on them, then \
             the job, {} time(s) (figures: the medians); results of a 100-operation job checked \
             against the ceiling's hashes first (that job also shows the splitter what the \
             operation costs, so the measured jobs start at full width, without probes, as a \
             repeated job does)",
            self.sizes.repeats
        );
        Self::announce("compute-bound", &text);
        let repeats = self.sizes.repeats;
        let mut deployment = Deployment::new("compute", &self.url, &self.programs).await?;
        let outcome = async {
            deployment.start_spine(workers, Some(prefetch)).await?;
            check_sha256_results(&mut deployment, rounds).await?;
            let mut runs = Vec::new();
            // The limits are measured beside each job, so a busy moment weighs on both.
            for repeat in 0..repeats {
                let watched = self.watched(None);
                let before = CpuSample::take(&watched);
                let ceiling =
                    tokio::task::spawn_blocking(move || compute::ceiling(ops, rounds, threads))
                        .await
                        .context("the compute ceiling's threads")?;
                let after = CpuSample::take(&watched);
                self.record_cpu("compute", "ceiling", &before, &after);
                let runner =
                    tokio::task::spawn_blocking(move || compute::runner(ops, rounds, threads))
                        .await
                        .context("the runner's threads")?
                        .map_err(anyhow::Error::msg)?;
                let spec = json!({
                    "job_id": deployment.job_id(&format!("sha256-{repeat}")),
                    "operation": "sha256",
                    "params": {"rounds": rounds},
                    "range": {"start": 0, "end": ops},
                    "collect_results": false,
                });
                let run = self.measured_job(&mut deployment, "sha256", &spec).await?;
                runs.push((ceiling, runner, run));
            }
            Ok(runs)
        }
        .await;
        let runs = deployment.conclude(outcome).await?;
        let ceiling = median(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let runner = median(&runs.iter().map(|r| r.1).collect::<Vec<_>>());
        let job = median(
            &runs
                .iter()
                .map(|r| r.2.status.ops_succeeded as f64 / r.2.seconds)
                .collect::<Vec<_>>(),
        );
        let fragments: Vec<String> = runs
            .iter()
            .map(|r| r.2.status.fragments_done.to_string())
            .collect();
        let fragments = fragments.join("/");
        self.figure(Figure::new(
            "compute",
            format!("compute ceiling ({threads} threads, tight loop)"),
            ceiling,
            "ops/s",
        ));
        self.figure(
            Figure::new(
                "compute",
                format!("worker's fragment runner, no broker ({threads} threads)"),
                runner,
                "ops/s",
            )
            .against(Some(ceiling), "compute ceiling", Target::None),
        );
        self.figure(
            Figure::new(
                "compute",
                format!("sha256 rounds 10 (default sizing: {fragments} fragments)"),
                job,
                "ops/s",
            )
            .against(Some(ceiling), "compute ceiling", Target::RatioAtLeast(0.7)),
        );
        Ok(text)
    }

    async fn scaling(&mut self) -> Result<String> {
        let (prefetch, sleep_ms) = (16u16, 100u64);
        let text = format!(
            "sleep {sleep_ms} ms, fragment_size 1, max_concurrent_fragments 2 × workers × \
             prefetch, collect_results false; 1, 2, 4 workers of prefetch {prefetch}; each job \
             {} s of ideal work",
            self.sizes.scaling_seconds
        );
        Self::announce("scaling", &text);
        for workers in [1usize, 2, 4] {
            let ideal = workers as f64 * f64::from(prefetch) / (sleep_ms as f64 / 1000.0);
            let ops = (ideal * self.sizes.scaling_seconds).round() as u64;
            let window = 2 * workers * usize::from(prefetch);
            let mut deployment =
                Deployment::new(&format!("scaling{workers}"), &self.url, &self.programs).await?;
            let outcome = async {
                deployment.start_spine(workers, Some(prefetch)).await?;
                let spec = json!({
                    "job_id": deployment.job_id("sleep"),
                    "operation": "sleep",
                    "params": {"ms": sleep_ms},
                    "range": {"start": 0, "end": ops},
                    "fragment_size": 1,
                    "max_concurrent_fragments": window,
                    "collect_results": false,
                });
                self.measured_job(&mut deployment, &format!("sleep ×{workers} workers"), &spec)
                    .await
            }
            .await;
            let run = deployment.conclude(outcome).await?;
            let value = run.status.ops_succeeded as f64 / run.seconds;
            self.figure(
                Figure::new(
                    "scaling",
                    format!("scaling, {workers} worker(s) × prefetch {prefetch}"),
                    value,
                    "ops/s",
                )
                .against(Some(ideal), "ideal", Target::RatioAtLeast(0.9)),
            );
        }
        Ok(text)
    }

    async fn latency(&mut self) -> Result<String> {
        let workers = 1;
        let jobs = self.sizes.latency_jobs;
        let text = format!(
            "{jobs} one-operation noop jobs in sequence, default settings; {workers} worker at \
             stock settings (its default prefetch); from the JobSpec's publish confirm to the \
             arrival of its succeeded JobStatus (private queue on job.*.succeeded)"
        );
        Self::announce("latency", &text);
        let mut deployment = Deployment::new("latency", &self.url, &self.programs).await?;
        let outcome = async {
            deployment.start_spine(workers, None).await?;
            let watched = self.watched(Some(&deployment));
            let before = CpuSample::take(&watched);
            let mut samples = Vec::with_capacity(jobs);
            for _ in 0..jobs {
                let job_id = deployment.job_id("latency");
                let spec = json!({
                    "job_id": job_id,
                    "operation": "noop",
                    "range": {"start": 0, "end": 1},
                });
                let confirmed = deployment.submit(&spec).await?;
                let (arrived, status) = deployment
                    .wait_terminal(&job_id, Duration::from_secs(30))
                    .await?;
                ensure!(
                    status.state == common::contract::JobState::Succeeded
                        && (status.ops_total, status.ops_succeeded, status.ops_failed) == (1, 1, 0),
                    "latency job ended {status:?}"
                );
                samples.push(arrived.saturating_duration_since(confirmed).as_secs_f64() * 1000.0);
            }
            let after = CpuSample::take(&watched);
            Ok((samples, before, after))
        }
        .await;
        let (mut samples, before, after) = deployment.conclude(outcome).await?;
        self.record_cpu(
            "latency",
            &format!("{jobs} jobs in sequence"),
            &before,
            &after,
        );
        samples.sort_by(f64::total_cmp);
        for (name, quantile, limit) in [("latency p50", 0.50, 10.0), ("latency p99", 0.99, 100.0)] {
            self.figure(
                Figure::new("latency", name, percentile(&samples, quantile), "ms")
                    .target(Target::AtMost(limit)),
            );
        }
        Ok(text)
    }
}

/// Round trips of each console query; the figure is their median.
const CONSOLE_ROUND_TRIPS: usize = 5;
/// Issue 14: each console query answers within this at the full size.
const CONSOLE_TARGET_MS: f64 = 250.0;

impl Bench {
    /// The web console's queries (issue 14) on a store of `console_jobs` jobs, filled through
    /// the pipeline (one-operation noop jobs, every tenth a rejected one, submitted as a
    /// batch), and one exec job of `console_failures` operations, each refused by the worker
    /// (its program is not allowed) with an error naming it. Each query's RPC round trip, the
    /// median of [`CONSOLE_ROUND_TRIPS`], against [`CONSOLE_TARGET_MS`].
    async fn console(&mut self) -> Result<String> {
        let (jobs, failures) = (self.sizes.console_jobs, self.sizes.console_failures);
        let rejected = jobs / 10;
        let mut text = format!(
            "{jobs} jobs submitted as a batch ({} noop of one operation, {rejected} rejected) \
             and one exec job of {failures} operations, each refused with an error naming its \
             program; 1 worker of prefetch 16; each query's RPC round trip, then each page of \
             `batchctl ui` over HTTP, the median of {CONSOLE_ROUND_TRIPS}, against \
             {CONSOLE_TARGET_MS} ms",
            jobs - rejected
        );
        if self.sizes.console_jobs < Sizes::full().console_jobs {
            text.push_str(&format!(
                " (quick sizes; the target is for {} jobs and {} failures)",
                Sizes::full().console_jobs,
                Sizes::full().console_failures
            ));
        }
        Self::announce("console queries", &text);
        let mut deployment = Deployment::new("console", &self.url, &self.programs).await?;
        let outcome = async {
            deployment.start_splitter()?;
            deployment.start_reducer()?;
            deployment.start_worker_with(Some(16), &[("BATCHQ_EXEC_ALLOW", "echo".to_owned())])?;
            deployment
                .wait_for_workers(1, Duration::from_secs(60))
                .await?;
            let filled = Instant::now();
            let specs: Vec<serde_json::Value> = (0..jobs)
                .map(|n| {
                    let job_id = format!("console-{n:06}");
                    if n % 10 == 9 {
                        // No input: rejected.
                        json!({"job_id": job_id, "operation": "noop"})
                    } else {
                        json!({
                            "job_id": job_id,
                            "operation": "noop",
                            "range": {"start": 0, "end": 1},
                            "collect_results": false,
                        })
                    }
                })
                .collect();
            deployment.submit_all(&specs).await?;
            let failing = deployment.job_id("console-failures");
            deployment
                .submit(&json!({
                    "job_id": failing,
                    "operation": "exec",
                    "params": {"command": ["prog-{}"]},
                    "range": {"start": 0, "end": failures},
                    "fragment_size": 1000,
                    "max_attempts": 1,
                    "tolerated_failure_percent": 100,
                    "collect_results": false,
                }))
                .await?;
            let all = jobs + 1;
            wait_for_ended(&mut deployment, all, job_timeout(jobs * 10 + failures)).await?;
            let fill_seconds = filled.elapsed().as_secs_f64();
            let hits = (0..failures)
                .filter(|i| i.to_string().starts_with("4242"))
                .count() as u64;
            let page = |state, offset| Request::JobsPage {
                state,
                prefix: None,
                offset,
                limit: 50,
            };
            let failures_page = |search: Option<&str>, offset| Request::Failures {
                job_id: failing.clone(),
                search: search.map(str::to_owned),
                offset,
                limit: 100,
            };
            // Each query, and the page it must answer: (items, total).
            let queries = [
                ("first jobs page (50)", page(None, 0), (50, all)),
                (
                    "deep jobs page (the last 50)",
                    page(None, all - 50),
                    (50, all),
                ),
                (
                    "rejected jobs, first page (50)",
                    page(Some(common::contract::JobState::Rejected), 0),
                    (50, rejected),
                ),
                (
                    "first failures page (100)",
                    failures_page(None, 0),
                    (100, failures),
                ),
                (
                    "failures searched for \"PROG-4242\"",
                    failures_page(Some("PROG-4242"), 0),
                    (hits, hits),
                ),
                (
                    "deep failures page (the last 100)",
                    failures_page(None, failures - 100),
                    (100, failures),
                ),
            ];
            let mut timings = Vec::new();
            for (name, request, expected) in queries {
                let mut samples = Vec::with_capacity(CONSOLE_ROUND_TRIPS);
                for _ in 0..CONSOLE_ROUND_TRIPS {
                    let started = Instant::now();
                    let response = deployment.call(&request).await?;
                    samples.push(started.elapsed().as_secs_f64() * 1000.0);
                    let answered = match &response {
                        Response::JobsPage(page) => (page.jobs.len() as u64, page.total),
                        Response::Failures(page) => (page.failures.len() as u64, page.total),
                        other => bail!("unexpected reply to {request:?}: {other:?}"),
                    };
                    ensure!(
                        answered == expected,
                        "{name}: {answered:?} (items, total), expected {expected:?}"
                    );
                }
                timings.push((name, median(&samples)));
            }
            // What a person gets: the console's pages over HTTP, each one or two of the
            // requests above plus the rendering.
            let console = deployment
                .start_console(batchq_tests::prometheus::free_port()?)
                .await?;
            let last_jobs_page = all.div_ceil(50);
            let last_failures_page = failures.div_ceil(50);
            let pages = [
                (
                    "jobs page (the first 50)",
                    "/jobs".to_owned(),
                    "class=\"job\"",
                    50,
                ),
                (
                    "jobs page (the last)",
                    format!("/jobs?page={last_jobs_page}"),
                    "class=\"job\"",
                    all - (last_jobs_page - 1) * 50,
                ),
                (
                    "rejected jobs page",
                    "/jobs?state=rejected".to_owned(),
                    "class=\"job\"",
                    50,
                ),
                (
                    "job page with its first 50 failures",
                    format!("/jobs/{failing}"),
                    "class=\"failure\"",
                    50,
                ),
                (
                    "job page, failures searched for \"PROG-4242\"",
                    format!("/jobs/{failing}?fq=PROG-4242"),
                    "class=\"failure\"",
                    hits.min(50),
                ),
                (
                    "job page, the last failures page",
                    format!("/jobs/{failing}?fpage={last_failures_page}"),
                    "class=\"failure\"",
                    failures - (last_failures_page - 1) * 50,
                ),
            ];
            for (name, path, row, rows) in pages {
                let mut samples = Vec::with_capacity(CONSOLE_ROUND_TRIPS);
                for _ in 0..CONSOLE_ROUND_TRIPS {
                    let started = Instant::now();
                    let page =
                        batchq_tests::browser::http(&console, "GET", &path, &[], None).await?;
                    samples.push(started.elapsed().as_secs_f64() * 1000.0);
                    ensure!(page.status == 200, "GET {path}: {}", page.status);
                    let shown = page.body.matches(row).count() as u64;
                    ensure!(shown == rows, "GET {path}: {shown} rows, expected {rows}");
                }
                timings.push((name, median(&samples)));
            }
            Ok((fill_seconds, timings))
        }
        .await;
        let (fill_seconds, timings) = deployment.conclude(outcome).await?;
        self.figure(Figure::new(
            "console",
            format!(
                "console: filling the store through the pipeline ({} jobs, then {} failures)",
                report::number(jobs as f64),
                report::number(failures as f64)
            ),
            fill_seconds,
            "s",
        ));
        for (name, ms) in timings {
            self.figure(
                Figure::new("console", format!("console: {name}"), ms, "ms")
                    .target(Target::AtMost(CONSOLE_TARGET_MS)),
            );
        }
        Ok(text)
    }
}

/// Waits until `jobs` jobs have ended, as the console's own counts by state say.
async fn wait_for_ended(deployment: &mut Deployment, jobs: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let request = Request::JobsPage {
        state: None,
        prefix: None,
        offset: 0,
        limit: 1,
    };
    loop {
        let ended = match deployment.call(&request).await? {
            Response::JobsPage(page) => page
                .by_state
                .iter()
                .filter(|(state, _)| {
                    common::contract::JobState::parse(state).is_some_and(|s| s.is_terminal())
                })
                .map(|(_, n)| n)
                .sum::<u64>(),
            other => bail!("unexpected reply to a jobs page: {other:?}"),
        };
        if ended >= jobs {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ended} of {jobs} jobs ended within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The label of a measured job in the CPU table: `job`, or `job on PostgreSQL`.
fn job_label(job: &str, store: Store) -> String {
    match store {
        Store::Sqlite => job.to_owned(),
        Store::Postgres => format!("{job} on {}", store.name()),
    }
}

/// How long `per_fragment` tokio sleeps of `ms` take one after another (as the worker runs a
/// `sleep` fragment), in seconds: the mean of 20 such fragments.
async fn sleep_fragment_seconds(ms: u64, per_fragment: u64) -> f64 {
    const FRAGMENTS: u32 = 20;
    let started = Instant::now();
    for _ in 0..FRAGMENTS * per_fragment as u32 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    started.elapsed().as_secs_f64() / f64::from(FRAGMENTS)
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A 100-operation sha256 job with its results collected: each result is the hash the
/// compute ceiling computes for its item.
async fn check_sha256_results(deployment: &mut Deployment, rounds: u32) -> Result<()> {
    let job_id = deployment.job_id("sha256-check");
    let spec = json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": rounds},
        "range": {"start": 0, "end": 100},
        "fragment_size": 10,
        "collect_results": true,
    });
    deployment.run_job(&spec, Duration::from_secs(60)).await?;
    let lines = deployment.results(&job_id, 0, 100).await?;
    ensure!(lines.len() == 100, "{} results of 100", lines.len());
    for (item, line) in (0u64..).zip(&lines) {
        let expected = compute::expected_hex(item, rounds);
        match line {
            ResultLine::Ok { index, result }
                if *index == item && result.as_str() == Some(expected.as_str()) => {}
            other => bail!("result of item {item}: {other:?}, expected {expected}"),
        }
    }
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Generous: a job that takes this long is broken, not slow.
fn job_timeout(ops: u64) -> Duration {
    Duration::from_secs(120 + ops / 2_000)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}
