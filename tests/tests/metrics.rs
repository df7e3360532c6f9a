//! Monitoring: MetricBatch records on `{ns}.metrics`, the Prometheus endpoint, and the worker
//! table, checked against figures the test knows.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use batchq_tests::prometheus::{free_port, scrape};
use batchq_tests::{Signal, TestEnv, WorkerOpts, assert_counts, example_path, text_of};
use common::contract::JobState;
use common::measure::MetricBatch;
use common::topology::KEY_METRICS;
use futures::StreamExt;
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Items for the example worker's `reverse`: every tenth is empty, and fails.
fn reverse_items(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            if i % 10 == 0 {
                json!("")
            } else {
                json!(format!("item-{i}"))
            }
        })
        .collect()
}

/// Collects MetricBatch records from `{ns}.metrics` on a private queue.
struct BatchLog {
    batches: std::sync::Arc<std::sync::Mutex<BTreeMap<u64, MetricBatch>>>,
    copies: std::sync::Arc<std::sync::Mutex<u64>>,
    _task: tokio::task::JoinHandle<()>,
}

impl BatchLog {
    async fn open(env: &TestEnv) -> Result<Self> {
        let channel = env.broker().channel().await?;
        let mut consumer = common::consume::subscribe(
            &channel,
            &env.broker().names().metrics(),
            KEY_METRICS,
            "test-metrics",
        )
        .await?;
        let batches = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let copies = std::sync::Arc::new(std::sync::Mutex::new(0));
        let (b, c) = (batches.clone(), copies.clone());
        let task = tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Ok(batch) = serde_json::from_slice::<MetricBatch>(&delivery.data) {
                    let mut batches = b.lock().unwrap_or_else(|p| p.into_inner());
                    if batches.insert(batch.seq, batch).is_some() {
                        *c.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                }
            }
        });
        Ok(Self {
            batches,
            copies,
            _task: task,
        })
    }

    /// Sums of one job's figures over every distinct batch: (succeeded, failed, fragments,
    /// operations timed, user counter `reversed_chars`).
    fn job_sums(&self, job_id: &str) -> (u64, u64, u64, u64, u64) {
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let mut sums = (0, 0, 0, 0, 0);
        for batch in batches.values() {
            for job in batch.jobs.iter().filter(|j| j.job_id == job_id) {
                let f = &job.figures;
                sums.0 += f.ops_succeeded;
                sums.1 += f.ops_failed;
                sums.2 += f.fragments;
                sums.3 += f.operation_seconds.count;
                sums.4 += f.user_counters.get("reversed_chars").copied().unwrap_or(0);
            }
        }
        sums
    }

    fn worker_ops(&self) -> u64 {
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        batches
            .values()
            .flat_map(|b| &b.workers)
            .map(|w| w.figures.ops_succeeded + w.figures.ops_failed)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_batches_sum_to_the_exact_totals_across_redelivery() -> Result<()> {
    let mut env = TestEnv::new("metric-batches").await?;
    note_example_operations(&mut env);
    let log = BatchLog::open(&env).await?;
    env.start_splitter()?;
    let reducer = env.start_reducer_with(&["--metrics-interval-ms", "300"])?;
    env.start_worker_program(
        example_path("batchq-worker", "custom_operation"),
        WorkerOpts::prefetch(2),
    )?;
    let items = reverse_items(600);
    let chars: u64 = items
        .iter()
        .map(|i| text_of(i).chars().count() as u64)
        .sum();
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("reverse"),
            "operation": "reverse",
            "items": items,
            "fragment_size": 5,
            "max_concurrent_fragments": 8,
            "max_attempts": 1,
            "tolerated_failure_percent": 20,
        }))
        .await?;
    // Kill the reducer while reports stream in: the ones it took but had not committed are
    // redelivered to its replacement, and must not be measured twice.
    env.wait_for_status(&job_id, JOB_TIMEOUT, |s| s.ops_succeeded >= 100)
        .await?;
    env.kill(reducer, Signal::Kill)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.restart(reducer)?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 540, 60);

    let expected = (540, 60, 120, 600, chars);
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.job_sums(&job_id) != expected {
        ensure!(
            Instant::now() < deadline,
            "MetricBatch sums {:?}, expected {expected:?}",
            log.job_sums(&job_id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing more arrives for the job afterwards.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(log.job_sums(&job_id), expected);
    assert_eq!(log.worker_ops(), 600, "per-worker figures add up too");
    eprintln!(
        "{} distinct batches, {} re-published copies",
        log.batches.lock().map(|b| b.len()).unwrap_or(0),
        log.copies.lock().map(|c| *c).unwrap_or(0)
    );
    env.finish().await
}

async fn scrape_until(
    port: u16,
    timeout: Duration,
    mut done: impl FnMut(&HashMap<String, f64>) -> bool,
) -> Result<HashMap<String, f64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = scrape(port).await;
        if let Ok(series) = &last
            && done(series)
        {
            return last;
        }
        if Instant::now() >= deadline {
            bail!("/metrics never showed what was expected; last scrape: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operations the example worker offers: their work queues are deleted at the end.
fn note_example_operations(env: &mut TestEnv) {
    for operation in ["reverse", "scale"] {
        env.note_operation(operation);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_endpoint_serves_the_series_and_drops_finished_jobs() -> Result<()> {
    let mut env = TestEnv::new("prometheus").await?;
    note_example_operations(&mut env);
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    env.start_splitter()?;
    env.start_reducer_with(&["--metrics-addr", &addr, "--finished-job-series-secs", "5"])?;
    env.start_worker_program(
        example_path("batchq-worker", "custom_operation"),
        WorkerOpts::prefetch(2),
    )?;
    let items = reverse_items(50);
    let chars: u64 = items
        .iter()
        .map(|i| text_of(i).chars().count() as u64)
        .sum();
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("scraped"),
            "operation": "reverse",
            "items": items,
            "fragment_size": 10,
            "max_attempts": 1,
            "tolerated_failure_percent": 20,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 45, 5);

    let job_series = format!("batchq_job_operations{{job_id=\"{job_id}\",outcome=\"succeeded\"}}");
    let queue_series = format!(
        "batchq_queue_consumers{{queue=\"{}\"}}",
        env.broker().names().work_queue("reverse")
    );
    // The job's series are set when it ends and kept for 5 s: read them first.
    let series = scrape_until(port, Duration::from_secs(4), |s| {
        s.contains_key(&job_series)
    })
    .await?;
    let value = |name: &str| series.get(name).copied();
    assert_eq!(
        value("batchq_operations_total{operation=\"reverse\",outcome=\"succeeded\"}"),
        Some(45.0)
    );
    assert_eq!(
        value("batchq_operations_total{operation=\"reverse\",outcome=\"failed\"}"),
        Some(5.0)
    );
    assert_eq!(
        value("batchq_fragments_total{operation=\"reverse\"}"),
        Some(5.0)
    );
    assert_eq!(
        value("batchq_operation_duration_seconds_count{operation=\"reverse\"}"),
        Some(50.0)
    );
    assert_eq!(
        value("batchq_operation_duration_seconds_bucket{operation=\"reverse\",le=\"+Inf\"}"),
        Some(50.0)
    );
    assert_eq!(
        value("batchq_user_reversed_chars_total{operation=\"reverse\"}"),
        Some(chars as f64)
    );
    assert_eq!(
        value("batchq_user_text_bytes_count{operation=\"reverse\"}"),
        Some(45.0)
    );
    assert_eq!(value("batchq_jobs{state=\"succeeded\"}"), Some(1.0));
    assert_eq!(value(&job_series), Some(45.0));

    // Queue figures come every 5 s, from passive declares.
    let series = scrape_until(port, Duration::from_secs(15), |s| {
        s.contains_key(&queue_series)
    })
    .await?;
    assert_eq!(series.get(&queue_series).copied(), Some(1.0));
    assert_eq!(series.get("batchq_workers_live").copied(), Some(1.0));

    // The finished job's series go away after the configured 5 s; the others stay.
    let series = scrape_until(port, Duration::from_secs(15), |s| {
        !s.keys().any(|k| k.contains(&job_id))
    })
    .await?;
    assert_eq!(
        series.get("batchq_jobs{state=\"succeeded\"}").copied(),
        Some(1.0)
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_leaves_the_worker_table() -> Result<()> {
    let mut env = TestEnv::new("worker-table").await?;
    env.start_reducer()?;
    let opts = WorkerOpts {
        heartbeat_ms: 300,
        ..WorkerOpts::prefetch(3)
    };
    let first = env.start_worker(opts.clone())?;
    env.start_worker(opts)?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    let (code, out, err) = env.batchctl(&["workers", "--json"]).await?;
    ensure!(code.success(), "batchctl workers failed: {err}");
    let workers: Vec<Value> = serde_json::from_str(&out)?;
    assert_eq!(workers.len(), 2, "{out}");
    assert!(workers.iter().all(|w| w["prefetch"] == 3), "{out}");

    // SIGKILL: no goodbye, only silence. Gone within three heartbeat intervals (0.9 s), plus
    // the time to ask.
    env.kill(first, Signal::Kill)?;
    let killed_at = Instant::now();
    loop {
        let (_, out, _) = env.batchctl(&["workers", "--json"]).await?;
        let workers: Vec<Value> = serde_json::from_str(&out)?;
        if workers.len() == 1 {
            break;
        }
        ensure!(
            killed_at.elapsed() < Duration::from_secs(3),
            "a killed worker still listed after {:?}: {out}",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "killed worker left the table after {:?}",
        killed_at.elapsed()
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_own_endpoint_when_asked() -> Result<()> {
    let mut env = TestEnv::new("worker-endpoint").await?;
    let port = free_port()?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts {
        metrics_addr: Some(format!("127.0.0.1:{port}")),
        ..WorkerOpts::prefetch(2)
    })?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("counted"),
            "operation": "noop",
            "range": {"start": 0, "end": 30},
            "fragment_size": 10,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 30, 0);
    let series = scrape_until(port, Duration::from_secs(10), |s| {
        s.contains_key("batchq_worker_operations_total{operation=\"noop\"}")
    })
    .await?;
    assert_eq!(
        series
            .get("batchq_worker_operations_total{operation=\"noop\"}")
            .copied(),
        Some(30.0)
    );
    assert_eq!(
        series
            .get("batchq_worker_fragments_total{operation=\"noop\"}")
            .copied(),
        Some(3.0)
    );
    env.finish().await
}
