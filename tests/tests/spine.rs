//! The pipeline end to end: jobs of every built-in operation reach their terminal state with
//! exact counts and exactly the results an independent computation gives; windows bound each
//! job's concurrency, let a small job overtake a huge one, and spread fragments over workers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use batchq_tests::{
    StatusLog, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex, text_of,
};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// What the contract promises about a job's statuses on `{ns}.status`: the routing key is
/// `job.{id}.{state}`, bodies are JSON, counts only grow, and the terminal status is the last.
async fn check_status_stream(log: &StatusLog, job_id: &str, terminal: JobState) -> Result<()> {
    log.wait_for(job_id, Duration::from_secs(10), |s| s.state == terminal)
        .await?;
    // Anything published after the terminal status would arrive within this pause.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = log.of(job_id);
    for entry in log.all() {
        assert_eq!(entry.content_type.as_deref(), Some("application/json"));
        assert!(
            entry.status.is_ok(),
            "status body is a JobStatus: {:?}",
            entry.status
        );
    }
    let mut previous: Option<&common::contract::JobStatus> = None;
    for (key, status) in &seen {
        assert_eq!(
            key,
            &format!("job.{job_id}.{}", status.state),
            "routing key"
        );
        if let Some(p) = previous {
            assert!(
                status.ops_succeeded >= p.ops_succeeded
                    && status.ops_failed >= p.ops_failed
                    && status.fragments_done >= p.fragments_done,
                "counts only grow: {p:?} then {status:?}"
            );
        }
        previous = Some(status);
    }
    let (last_key, last) = seen.last().context("no status seen")?;
    assert_eq!(
        last.state, terminal,
        "the terminal status is the last one: {last_key}"
    );
    assert_eq!(
        seen.iter().filter(|(_, s)| s.state.is_terminal()).count(),
        1,
        "one terminal status: {seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_sha256_job_has_exact_counts_and_results() -> Result<()> {
    let mut env = TestEnv::new("range-sha").await?;
    let log = env.subscribe_status().await?;
    env.start_spine(2)?;
    // A negative start checks that the item is `start + index`, not the index.
    let (start, end) = (-7_i64, 1993_i64);
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("range"),
            "operation": "sha256",
            "params": {"rounds": 3},
            "range": {"start": start, "end": end},
            "fragment_size": 50,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2000, 0);
    assert_eq!(
        status.fragments_done, 40,
        "2000 operations in fragments of 50"
    );
    assert_eq!(status.operation.as_deref(), Some("sha256"));
    assert!(status.submitted_at.is_some() && status.started_at.is_some());
    assert_eq!(status.error, None);

    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 2000);
    for (value, line) in (start..end).zip(&results) {
        let expected = Value::String(sha256_hex(&value.to_string(), 3));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: line.index(),
                result: expected
            }
        );
    }
    check_status_stream(&log, &job_id, JobState::Succeeded).await?;
    env.finish().await
}

/// Items of every JSON kind; objects keep the key order they were written in.
fn mixed_items(n: usize) -> Vec<Value> {
    let raw = (0..n)
        .map(|i| match i % 8 {
            0 => format!("\"item-{i}\""),
            1 => format!("{i}"),
            2 => format!("{{\"b\":{i},\"a\":1}}"),
            3 => format!("[\"x\",{i},{{\"z\":null,\"y\":true}}]"),
            4 => format!("-{i}.5"),
            5 => "\"ünïcødé ✓ \\\"quoted\\\"\"".to_owned(),
            6 => {
                if i % 16 == 6 {
                    "null".to_owned()
                } else {
                    "false".to_owned()
                }
            }
            _ => format!("{{\"outer\":{{\"k2\":[2,1],\"k1\":\"{i}\"}},\"empty\":{{}}}}"),
        })
        .collect::<Vec<_>>()
        .join(",");
    // Parse the text the way the JobSpec will be written, keeping key order.
    serde_json::from_str(&format!("[{raw}]")).expect("valid items")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_sha256_job_hashes_text_of_each_item() -> Result<()> {
    let mut env = TestEnv::new("items-sha").await?;
    env.start_spine(2)?;
    let items = mixed_items(203);
    assert_eq!(
        text_of(&items[2]),
        r#"{"b":2,"a":1}"#,
        "the test keeps key order itself"
    );
    let job_id = env.job_id("items");
    // Written by hand, not re-serialised from a map, so the key order on the wire is the
    // order above whatever serde_json's map does.
    let body = format!(
        r#"{{"job_id":"{job_id}","operation":"sha256","items":{},"fragment_size":7,"max_concurrent_fragments":5}}"#,
        serde_json::to_string(&items)?
    );
    env.submit_raw(body.as_bytes(), batchq_tests::RawProps::json())
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 203, 0);
    assert_eq!(
        status.fragments_done, 29,
        "203 operations in fragments of 7"
    );

    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 203);
    for (item, line) in items.iter().zip(&results) {
        // No params: one round.
        let expected = Value::String(sha256_hex(&text_of(item), 1));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: line.index(),
                result: expected
            },
            "item {item}"
        );
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_jobs_succeed_at_once() -> Result<()> {
    let mut env = TestEnv::new("empty").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // No worker at all: an empty job needs none.
    let items = env
        .submit(&json!({"job_id": env.job_id("no-items"), "operation": "noop", "items": []}))
        .await?;
    let range = env
        .submit(&json!({
            "job_id": env.job_id("no-range"),
            "operation": "sleep",
            "range": {"start": 5, "end": 5}
        }))
        .await?;
    for job_id in [items, range] {
        let status = env
            .wait_for_terminal(&job_id, Duration::from_secs(20))
            .await?;
        assert_counts(&status, JobState::Succeeded, 0, 0);
        assert!(env.results(&job_id).await?.is_empty());
    }
    env.finish().await
}

/// Items that are multiples of 3 fail with "bad {i}" on stderr; the others print "ok-{i}".
fn exec_spec(job_id: &str, tolerated: f64) -> Value {
    json!({
        "job_id": job_id,
        "operation": "exec",
        "params": {
            "command": ["sh", "-c", "test $(( {} % 3 )) -ne 0 || { echo noise >&2; echo bad {} >&2; exit 1; }; echo ok-{}"],
            "timeout_ms": 10000,
        },
        "range": {"start": 0, "end": 12},
        "fragment_size": 2,
        "max_concurrent_fragments": 6,
        "max_attempts": 1,
        "tolerated_failure_percent": tolerated,
    })
}

fn check_exec_results(results: &[ResultLine]) {
    assert_one_per_index(results, 12);
    for line in results {
        let i = line.index();
        match line {
            ResultLine::Ok { result, .. } => {
                assert!(i % 3 != 0, "item {i} must fail");
                assert_eq!(result, &Value::String(format!("ok-{i}")));
            }
            ResultLine::Err { error, .. } => {
                assert!(i % 3 == 0, "item {i} must succeed, got {error:?}");
                assert!(
                    error.ends_with(&format!("bad {i}")),
                    "the error ends with stderr's last line: {error:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_failures_fail_the_job_unless_tolerated() -> Result<()> {
    let mut env = TestEnv::new("exec").await?;
    env.start_spine(2)?;
    let strict = env.submit(&exec_spec(&env.job_id("strict"), 0.0)).await?;
    let lenient = env.submit(&exec_spec(&env.job_id("lenient"), 50.0)).await?;

    // 0, 3, 6 and 9 fail: 4 of 12, a third. Tolerating none, the job fails at its first
    // failure; what did not run by then counts as failed too.
    let status = env.wait_for_terminal(&strict, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    assert_eq!(status.ops_succeeded + status.ops_failed, 12, "{status:?}");
    assert!(status.ops_succeeded <= 8, "{status:?}");
    let error = status.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("more than the 0% tolerated") && error.contains("exited with status 1"),
        "a failed job says why: {error}"
    );
    let results = env.results(&strict).await?;
    assert!(
        results.iter().any(|l| matches!(l, ResultLine::Err { .. })),
        "{results:?}"
    );
    for line in &results {
        if let ResultLine::Err { error, .. } = line {
            assert!(error.ends_with(&format!("bad {}", line.index())), "{error}");
        }
    }

    let status = env.wait_for_terminal(&lenient, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 8, 4);
    check_exec_results(&env.results(&lenient).await?);
    env.finish().await
}

/// `exec` command that logs `start`/`end` lines with nanosecond times to `log`.
fn timed_exec_spec(job_id: &str, log: &Path, window: u32) -> Value {
    json!({
        "job_id": job_id,
        "operation": "exec",
        "params": {"command": [
            "sh", "-c",
            "echo \"start $1 $(date +%s%N)\" >> \"$2\"; sleep 0.15; echo \"end $1 $(date +%s%N)\" >> \"$2\"",
            "sh", "{}", log.display().to_string(),
        ]},
        "range": {"start": 0, "end": 12},
        "fragment_size": 1,
        "max_concurrent_fragments": window,
    })
}

/// Most operations running at the same instant, from a log of `start`/`end` lines.
fn max_overlap(log: &Path) -> Result<usize> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut events = Vec::new();
    let mut per_item: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [kind, item, at] = parts[..] else {
            bail!("malformed line {line:?}");
        };
        let at: u128 = at.parse()?;
        let counts = per_item.entry(item.to_owned()).or_default();
        match kind {
            // At equal times an end comes first: touching intervals do not overlap.
            "start" => {
                events.push((at, 1, 1i64));
                counts.0 += 1;
            }
            "end" => {
                events.push((at, 0, -1i64));
                counts.1 += 1;
            }
            _ => bail!("malformed line {line:?}"),
        }
    }
    assert_eq!(per_item.len(), 12, "every item ran: {per_item:?}");
    assert!(
        per_item.values().all(|&(s, e)| s == 1 && e == 1),
        "every item ran exactly once: {per_item:?}"
    );
    events.sort();
    let (mut now, mut max) = (0i64, 0i64);
    for (_, _, delta) in events {
        now += delta;
        max = max.max(now);
    }
    Ok(max as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_stays_within_its_window() -> Result<()> {
    let mut env = TestEnv::new("window").await?;
    let log = env.subscribe_status().await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // Eight fragment slots in all: only the windows can hold the jobs back.
    env.start_worker(WorkerOpts::prefetch(4))?;
    env.start_worker(WorkerOpts::prefetch(4))?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    let log_a = env.dir().join("a.times");
    let log_b = env.dir().join("b.times");
    let a = env
        .submit(&timed_exec_spec(&env.job_id("two"), &log_a, 2))
        .await?;
    let b = env
        .submit(&timed_exec_spec(&env.job_id("three"), &log_b, 3))
        .await?;
    for job_id in [&a, &b] {
        let status = env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
        assert_counts(&status, JobState::Succeeded, 12, 0);
        assert_eq!(status.fragments_done, 12);
    }
    let (overlap_a, overlap_b) = (max_overlap(&log_a)?, max_overlap(&log_b)?);
    eprintln!("max overlap: window 2 → {overlap_a}, window 3 → {overlap_b}");
    assert_eq!(overlap_a, 2, "window 2 is used in full and never exceeded");
    assert!(
        (2..=3).contains(&overlap_b),
        "window 3 is never exceeded: {overlap_b}"
    );
    for (job_id, window) in [(&a, 2), (&b, 3)] {
        for (_, status) in log.of(job_id) {
            assert!(
                status.fragments_in_flight <= window,
                "status reports more fragments in flight than the window: {status:?}"
            );
        }
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_job_overtakes_a_huge_one() -> Result<()> {
    let mut env = TestEnv::new("overtake").await?;
    env.start_spine(2)?;
    let big = env
        .submit(&json!({
            "job_id": env.job_id("big"),
            "operation": "noop",
            "range": {"start": 0, "end": 10000},
            "fragment_size": 1,
            "max_concurrent_fragments": 4,
        }))
        .await?;
    // The big job is under way before the small one exists.
    env.wait_for_status(&big, Duration::from_secs(20), |s| s.ops_succeeded >= 20)
        .await?;
    let started = Instant::now();
    let small = env
        .submit(&json!({
            "job_id": env.job_id("small"),
            "operation": "noop",
            "items": [1, 2, 3, 4, 5],
            "fragment_size": 1,
        }))
        .await?;
    let status = env
        .wait_for_terminal(&small, Duration::from_secs(20))
        .await?;
    assert_counts(&status, JobState::Succeeded, 5, 0);
    let small_took = started.elapsed();
    let big_now = env.status(&big).await?.context("big job known")?;
    eprintln!("small job took {small_took:?}; big job then at {big_now:?}");
    assert!(
        !big_now.state.is_terminal() && big_now.ops_succeeded < 10000,
        "the small job finished while the big one still runs: {big_now:?}"
    );

    // Cancelling ends the big job early; its counts then stay as they are.
    env.cancel(&big).await?;
    let cancelled = env.wait_for_terminal(&big, Duration::from_secs(30)).await?;
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    assert!(
        cancelled.ops_succeeded + cancelled.ops_failed < 10000,
        "{cancelled:?}"
    );
    assert!(
        cancelled.ops_succeeded >= big_now.ops_succeeded,
        "{cancelled:?}"
    );
    // The state is final; fragments that were running at the cancel may still add what they
    // ran (the contract: counts only grow), but nothing beyond the window of 4 one-operation
    // fragments that were out: queued work is never run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = env.status(&big).await?.context("big job known")?;
    assert_eq!(
        later.state,
        JobState::Cancelled,
        "a terminal state never changes: {later:?}"
    );
    assert!(
        later.ops_succeeded >= cancelled.ops_succeeded
            && later.ops_succeeded + later.ops_failed
                <= cancelled.ops_succeeded + cancelled.ops_failed + 4,
        "after the cancel only the 4 fragments out may add their operation: {cancelled:?} then {later:?}"
    );
    env.finish().await
}

/// Workers started without a prefetch (the stock setting) hold more of a queue whose fragments
/// finish much faster than their reports are confirmed, within their bound of 32, and every
/// operation is still counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_workers_hold_more_of_short_fragments_within_their_bound() -> Result<()> {
    const MAX_HELD: u16 = 32;
    let mut env = TestEnv::new("adaptive").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    for _ in 0..2 {
        env.start_worker(WorkerOpts {
            adaptive: true,
            ..WorkerOpts::default()
        })?;
    }
    let workers = env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // Every queue a worker consumes starts with a share of 4.
    let start: Vec<u16> = workers.iter().map(|w| w.prefetch).collect();
    let queues = workers[0].operations.len() as u16;
    assert!(
        start.iter().all(|p| *p == 4 * queues),
        "{queues} queues of 4 each to start with: {start:?}"
    );
    let n = 8_000;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("short"),
            "operation": "noop",
            "range": {"start": 0, "end": n},
            "fragment_size": 1,
            "max_concurrent_fragments": 64,
            "collect_results": true,
        }))
        .await?;
    let (mut most_prefetch, mut most_held) = (0u16, 0u64);
    let status = loop {
        for worker in env.rpc().workers(&env.names).await? {
            most_prefetch = most_prefetch.max(worker.prefetch);
            most_held = most_held.max(worker.fragments_in_flight);
        }
        match env.status(&job_id).await? {
            Some(status) if status.state.is_terminal() => break status,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_counts(&status, JobState::Succeeded, n, 0);
    assert_one_per_index(&env.results(&job_id).await?, n);
    assert!(
        most_prefetch > 4 * queues,
        "a worker raised its prefetch above its start ({}) for fragments of no work: {most_prefetch}",
        4 * queues
    );
    assert!(
        most_prefetch <= MAX_HELD && most_held <= u64::from(MAX_HELD),
        "within the bound: prefetch {most_prefetch}, held {most_held}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_fragments_of_one_job() -> Result<()> {
    let mut env = TestEnv::new("share").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    for _ in 0..3 {
        env.start_worker(WorkerOpts::prefetch(2))?;
    }
    let workers = env.wait_for_workers(3, Duration::from_secs(20)).await?;
    assert_eq!(workers.len(), 3, "{workers:?}");
    let worker_pids: BTreeSet<u32> = env.worker_pids().into_iter().collect();
    let reported: BTreeSet<u32> = workers.iter().map(|w| w.pid).collect();
    assert_eq!(
        reported, worker_pids,
        "`workers` lists our worker processes"
    );

    // `exec` runs `sh` straight from the worker, so `$PPID` is the worker's pid.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("share"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", "sleep 0.05; echo $PPID"]},
            "range": {"start": 0, "end": 48},
            "fragment_size": 1,
            "max_concurrent_fragments": 6,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 48, 0);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 48);
    let mut ran_on: BTreeMap<u32, usize> = BTreeMap::new();
    for line in &results {
        let ResultLine::Ok {
            result: Value::String(pid),
            ..
        } = line
        else {
            bail!("unexpected result {line:?}");
        };
        *ran_on.entry(pid.parse()?).or_default() += 1;
    }
    eprintln!("operations per worker pid: {ran_on:?}");
    assert!(
        ran_on.len() >= 2,
        "at least two workers took part: {ran_on:?}"
    );
    assert!(
        ran_on.keys().all(|pid| worker_pids.contains(pid)),
        "only our workers ran the job: {ran_on:?} vs {worker_pids:?}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_a_known_job_id_changes_nothing() -> Result<()> {
    let mut env = TestEnv::new("resubmit").await?;
    env.start_spine(1)?;
    let job_id = env
        .submit(&json!({"job_id": env.job_id("once"), "operation": "noop", "items": [1, 2, 3]}))
        .await?;
    let first = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&first, JobState::Succeeded, 3, 0);

    // Same id, another operation and size: acknowledged and ignored.
    env.submit(&json!({
        "job_id": job_id,
        "operation": "sha256",
        "range": {"start": 0, "end": 50},
    }))
    .await?;
    // Jobs are taken in order: once the marker is done, the resubmission has been handled.
    let marker = env
        .submit(&json!({"job_id": env.job_id("marker"), "operation": "noop", "items": [0]}))
        .await?;
    let status = env.wait_for_terminal(&marker, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 1, 0);

    let after = env.status(&job_id).await?.context("job still known")?;
    assert_eq!(after, first, "the status is unchanged");
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 3);
    assert!(
        results.iter().all(|l| matches!(
            l,
            ResultLine::Ok {
                result: Value::Null,
                ..
            }
        )),
        "noop results stay: {results:?}"
    );
    assert_eq!(
        env.queue_depth(&env.names.dead()).await?,
        0,
        "a duplicate is not dead"
    );
    assert_eq!(
        env.queue_depth(&env.names.work_queue("sha256"))
            .await
            .unwrap_or(0),
        0,
        "no fragment of the ignored spec"
    );
    env.finish().await
}
