//! The Grafana dashboard (`docs/grafana/batchq.json`) against a real Prometheus: Prometheus
//! scrapes a running reducer with the scrape settings batchq ships
//! (`deploy/prometheus/prometheus.yml`, every second here), two jobs run on two workers, and
//! every query of every panel is evaluated through Prometheus's HTTP API the way Grafana asks
//! it. Each must return data, and the labels a panel shows must be the ones batchq set: a
//! query that is valid PromQL but wrong (an error once an operation counts two things, a
//! grouping by a label Prometheus overwrote) fails here, not on an operator's screen.
//! `dashboard.rs` checks the same file statically.
//!
//! Needs the `prometheus` program (Debian's package; `.ci/run` installs it). Without it the
//! test says so on stderr and passes, unless `BATCHQ_TEST_REQUIRE_PROMETHEUS` is set.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::prometheus::free_port;
use batchq_tests::prometheus_server::{PrometheusServer, Series, find_prometheus};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts};
use common::contract::JobState;
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// How long Prometheus may take to show a figure the reducer serves: scrapes every second,
/// but the reducer polls the queues only every 5 s.
const CATCH_UP: Duration = Duration::from_secs(20);

/// How long the panels may take to all answer once the figures are in: a rate needs two
/// samples of a counter in its window, and a subquery's steps fall on its resolution.
const EVALUATION_TIMEOUT: Duration = Duration::from_secs(20);

/// The scrape interval of the test's Prometheus, and Grafana's step for its range queries.
const SCRAPE_SECONDS: u64 = 1;

/// The operation of the test's workers (`tests/src/bin/metered_worker.rs`), and the counters
/// of its own it reports.
const OPERATION: &str = "tally";
const USER_COUNTERS: [&str; 2] = ["chars", "words"];

/// Items per job: every tenth is empty, and fails.
const ITEMS: usize = 100;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn metered_worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metered_worker"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// One query of one panel, as the dashboard gives it.
struct Target {
    /// `panel 3 "Live workers" A`, for failure messages.
    name: String,
    expr: String,
    /// Grafana asks an instant query for it (`"instant": true`), else a range query.
    instant: bool,
    /// `{{label}}` placeholders of the legend.
    legend_labels: Vec<String>,
}

fn dashboard_targets() -> Result<Vec<Target>> {
    let path = repo().join("docs/grafana/batchq.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    let mut targets = Vec::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let name = format!(
                "panel {} {:?} {}",
                panel["id"],
                panel["title"].as_str().unwrap_or_default(),
                target["refId"].as_str().unwrap_or("?")
            );
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("{name}: no expr"))?;
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            targets.push(Target {
                expr: grafana_substitutes(expr).with_context(|| format!("{name}: {expr}"))?,
                instant: target["instant"] == true,
                legend_labels: placeholders(legend),
                name,
            });
        }
    }
    ensure!(!targets.is_empty(), "the dashboard has no queries");
    Ok(targets)
}

/// `expr` with Grafana's interval variables set as Grafana sets them for a Prometheus that
/// scrapes every second. Any other variable fails: the test must first learn what Grafana
/// would put there.
fn grafana_substitutes(expr: &str) -> Result<String> {
    // $__rate_interval is max(4 × scrape interval, $__interval + scrape interval).
    let rate_interval = format!("{}s", 4 * SCRAPE_SECONDS);
    let interval = format!("{SCRAPE_SECONDS}s");
    let interval_ms = (SCRAPE_SECONDS * 1000).to_string();
    let mut expr = expr.to_owned();
    for (variable, value) in [
        ("__rate_interval", &rate_interval),
        ("__interval_ms", &interval_ms),
        ("__interval", &interval),
    ] {
        expr = expr
            .replace(&format!("${{{variable}}}"), value)
            .replace(&format!("${variable}"), value);
    }
    // label_replace's replacement `$1` is PromQL's own, not a variable.
    let unknown = expr
        .match_indices('$')
        .any(|(at, _)| !expr[at + 1..].starts_with(|c: char| c.is_ascii_digit()));
    ensure!(
        !unknown,
        "a Grafana variable this test does not know how to set"
    );
    Ok(expr)
}

/// The label names of a legend's `{{label}}` placeholders.
fn placeholders(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}"))
        .map(|(label, _)| label.trim().to_owned())
        .collect()
}

/// `deploy/prometheus/prometheus.yml`'s scrape job of the reducer, aimed at the test's reducer
/// and scraping every second. Its other jobs scrape the broker's own endpoint, which no panel
/// queries.
fn prometheus_config(reducer_port: u16) -> Result<String> {
    let path = repo().join("deploy/prometheus/prometheus.yml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_norway::Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    let every = serde_norway::Value::from(format!("{SCRAPE_SECONDS}s"));
    config["global"]["scrape_interval"] = every.clone();
    config["global"]["evaluation_interval"] = every;
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .context("no scrape_configs")?;
    jobs.retain(|job| job["job_name"].as_str() == Some("batchq-reducer"));
    let reducer = jobs
        .first_mut()
        .with_context(|| format!("{} has no batchq-reducer job", path.display()))?;
    reducer["static_configs"] =
        serde_norway::from_str(&format!("[{{targets: [\"127.0.0.1:{reducer_port}\"]}}]"))?;
    Ok(serde_norway::to_string(&config)?)
}

/// What the test made, to check the labels of the answers against.
struct Made {
    namespace: String,
    job_ids: BTreeSet<String>,
}

impl Made {
    /// Whether `series` carries only label values this test produced, and the labels its
    /// panel's legend shows.
    fn check(&self, series: &Series, legend_labels: &[String]) -> Result<()> {
        for label in legend_labels {
            ensure!(
                series.labels.get(label).is_some_and(|v| !v.is_empty()),
                "the legend shows {{{{{label}}}}}, which the series {:?} lacks",
                series.labels
            );
        }
        for (label, value) in &series.labels {
            let expected = match label.as_str() {
                "job" => bail!(
                    "a series carries Prometheus's own `job` label ({value:?}, the scrape job): \
                     a panel grouping by it shows the whole reducer as one row"
                ),
                "job_id" => self.job_ids.contains(value),
                "operation" => value == OPERATION,
                "outcome" => value == "succeeded" || value == "failed",
                "state" => JobState::ALL.iter().any(|s| s.as_str() == value),
                "queue" => value.starts_with(&format!("{}.", self.namespace)),
                "counter" => USER_COUNTERS.contains(&value.as_str()),
                _ => true,
            };
            ensure!(
                expected,
                "{label}={value:?} is nothing this test made (series {:?})",
                series.labels
            );
        }
        Ok(())
    }
}

/// Items of a `tally` job: a few words each, every tenth empty.
fn items() -> Vec<Value> {
    (0..ITEMS)
        .map(|i| {
            if i % 10 == 0 {
                json!("")
            } else {
                json!(format!("item {i} of the dashboard test"))
            }
        })
        .collect()
}

async fn run_job(env: &TestEnv, name: &str) -> Result<String> {
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id(name),
            "operation": OPERATION,
            "items": items(),
            "fragment_size": 5,
            "max_attempts": 1,
            "tolerated_failure_percent": 20,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 90, 10);
    Ok(job_id)
}

/// Waits until `expr` (one series) is `expected` in Prometheus.
async fn wait_for_value(prometheus: &PrometheusServer, expr: &str, expected: f64) -> Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let answer = prometheus.query(expr).await;
        let value = match &answer {
            Ok(series) => series.first().and_then(|s| s.values.first()).copied(),
            Err(_) => None,
        };
        if value == Some(expected) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "Prometheus never had {expr} = {expected} within {CATCH_UP:?}; last answer: \
             {answer:?}\nits log:\n{}",
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Evaluates `target` as Grafana would (instant now, or a range since `since` at the scrape
/// step) and checks what came back.
async fn evaluate(
    prometheus: &PrometheusServer,
    target: &Target,
    since: f64,
    made: &Made,
) -> Result<usize> {
    let series = if target.instant {
        prometheus.query(&target.expr).await?
    } else {
        let step = SCRAPE_SECONDS as f64;
        prometheus
            .query_range(&target.expr, since, unix_now(), step)
            .await?
    };
    ensure!(!series.is_empty(), "no data");
    ensure!(
        series.iter().flat_map(|s| &s.values).any(|v| v.is_finite()),
        "only NaN or infinite values: {series:?}"
    );
    for one in &series {
        made.check(one, &target.legend_labels)?;
    }
    Ok(series.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() -> Result<()> {
    let Some(program) =
        find_prometheus("every_dashboard_query_returns_data_from_a_real_prometheus")?
    else {
        return Ok(());
    };
    let begun = Instant::now();
    let targets = dashboard_targets()?;
    let mut env = TestEnv::new("dashboard-live").await?;
    env.note_operation(OPERATION);
    let metrics_port = free_port()?;
    env.start_splitter()?;
    env.start_reducer_with(&[
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--metrics-interval-ms",
        "500",
    ])?;
    // Two workers: the live workers and consumers panels show a count, not a presence.
    for _ in 0..2 {
        env.start_worker_program(metered_worker(), WorkerOpts::prefetch(2))?;
    }
    let prometheus = PrometheusServer::start(&program, &prometheus_config(metrics_port)?).await?;
    let since = unix_now();
    wait_for_value(&prometheus, "up{job=\"batchq-reducer\"}", 1.0).await?;

    // Two jobs one after the other: a rate is only above zero when a counter grew between two
    // scrapes, so the first job's totals are in Prometheus before the second adds to them.
    let first = run_job(&env, "first").await?;
    wait_for_value(&prometheus, "sum(batchq_operations_total)", ITEMS as f64).await?;
    let second = run_job(&env, "second").await?;
    let total = 2.0 * ITEMS as f64;
    wait_for_value(&prometheus, "sum(batchq_operations_total)", total).await?;
    wait_for_value(
        &prometheus,
        "sum(batchq_operations_total{outcome=\"failed\"})",
        total / 10.0,
    )
    .await?;
    wait_for_value(
        &prometheus,
        "count(batchq_job_operations{outcome=\"total\"})",
        2.0,
    )
    .await?;
    wait_for_value(&prometheus, "batchq_workers_live", 2.0).await?;
    let work_queue = env.broker().names().work_queue(OPERATION);
    wait_for_value(
        &prometheus,
        &format!("batchq_queue_consumers{{queue=\"{work_queue}\"}}"),
        2.0,
    )
    .await?;

    let made = Made {
        namespace: env.ns.clone(),
        job_ids: BTreeSet::from([first, second]),
    };
    let deadline = Instant::now() + EVALUATION_TIMEOUT;
    let mut rounds = 0;
    let answered = loop {
        rounds += 1;
        let mut failures = Vec::new();
        let mut answered = Vec::new();
        for target in &targets {
            match evaluate(&prometheus, target, since, &made).await {
                Ok(n) => answered.push(format!("{}: {n} series", target.name)),
                Err(e) => failures.push(format!("{}: {}\n    {e:#}", target.name, target.expr)),
            }
        }
        if failures.is_empty() {
            break answered;
        }
        if Instant::now() >= deadline {
            bail!(
                "{} of {} dashboard queries failed against Prometheus after {EVALUATION_TIMEOUT:?}:\n{}",
                failures.len(),
                targets.len(),
                failures.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!(
        "{} dashboard queries returned data (evaluation round {rounds}), {:.1} s after the test \
         began:\n  {}",
        answered.len(),
        begun.elapsed().as_secs_f64(),
        answered.join("\n  ")
    );
    drop(prometheus);
    env.finish().await
}

#[test]
fn grafana_variables_are_set_and_unknown_ones_refused() -> Result<()> {
    assert_eq!(
        grafana_substitutes("rate(x[$__rate_interval]) + rate(y[${__interval}])")?,
        "rate(x[4s]) + rate(y[1s])"
    );
    assert_eq!(
        grafana_substitutes(r#"label_replace(x, "a", "$1", "b", "(.+)")"#)?,
        r#"label_replace(x, "a", "$1", "b", "(.+)")"#
    );
    ensure!(grafana_substitutes("x{job_id=~\"$job\"}").is_err());
    Ok(())
}

#[test]
fn legend_placeholders_are_read() {
    assert_eq!(
        placeholders("p90 {{operation}} {{ counter }}"),
        vec!["operation", "counter"]
    );
    assert!(placeholders("live workers").is_empty());
}
