//! Promises of the wire contract beyond the happy path: publishing before anything runs,
//! lifespans, retries, the failure threshold, status cadence, `collect_results`, and fragments
//! that kill their workers.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_published_before_any_process_runs_are_kept() -> Result<()> {
    // TestEnv::new declares the topology, as batchctl or a user's program would.
    let mut env = TestEnv::new("early").await?;
    let first = env
        .submit(&json!({"job_id": env.job_id("first"), "operation": "sha256", "items": ["a", "b"]}))
        .await?;
    let second = env
        .submit(&json!({"job_id": env.job_id("second"), "operation": "noop", "range": {"start": 0, "end": 3}}))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.start_spine(1)?;
    let status = env.wait_for_terminal(&first, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2, 0);
    let results = env.results(&first).await?;
    assert_eq!(
        results,
        vec![
            ResultLine::Ok {
                index: 0,
                result: Value::String(sha256_hex("a", 1))
            },
            ResultLine::Ok {
                index: 1,
                result: Value::String(sha256_hex("b", 1))
            },
        ]
    );
    let status = env.wait_for_terminal(&second, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3, 0);
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_stop_at_their_lifespan_and_continue() -> Result<()> {
    let mut env = TestEnv::new("lifespan").await?;
    let log = env.subscribe_status().await?;
    env.start_spine(2)?;
    // Each fragment of 20 sleeps of 50 ms stops after at most 5 of them (lifespan 200 ms).
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("lifespan"),
            "operation": "sleep",
            "params": {"ms": 50},
            "range": {"start": 0, "end": 80},
            "fragment_size": 20,
            "max_concurrent_fragments": 2,
            "lifespan_ms": 200,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 80, 0);
    assert!(
        status.fragments_done >= 16,
        "80 operations, at most 5 per fragment run: {status:?}"
    );
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 80);
    assert!(results.iter().all(|l| matches!(
        l,
        ResultLine::Ok {
            result: Value::Null,
            ..
        }
    )));

    // "At least once a second while a job runs": no long silence between statuses.
    log.wait_for(&job_id, Duration::from_secs(5), |s| s.state.is_terminal())
        .await?;
    let arrivals: Vec<Instant> = log
        .all()
        .into_iter()
        .filter(|e| e.status.as_ref().is_ok_and(|s| s.job_id == job_id))
        .map(|e| e.received)
        .collect();
    let longest = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!("{} statuses, longest silence {longest:?}", arrivals.len());
    assert!(
        longest <= Duration::from_millis(1500),
        "status silent for {longest:?}"
    );
    env.finish().await
}

/// Without `fragment_size`, the first fragments are small and later ones fill about half a
/// lifespan at the operation cost the splitter observes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_are_sized_from_observed_cost() -> Result<()> {
    let mut env = TestEnv::new("sizing").await?;
    env.start_spine(1)?;
    // 5 ms operations and a 400 ms lifespan: fragments converge on about 200 / 5 = 40
    // operations, after a first one of 8.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("sizing"),
            "operation": "sleep",
            "params": {"ms": 5},
            "range": {"start": 0, "end": 400},
            "max_concurrent_fragments": 1,
            "lifespan_ms": 400,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 400, 0);
    eprintln!("{} fragments for 400 operations", status.fragments_done);
    // Fixed at the first size it would take 50 fragments; at the ideal size, 1 + 392 / 40 ≈ 11.
    // Operations take a little longer than 5 ms, so allow some fragments more.
    assert!(
        (10..=20).contains(&status.fragments_done),
        "fragments sized from cost: {status:?}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_not_kept_unless_collected() -> Result<()> {
    let mut env = TestEnv::new("no-collect").await?;
    env.start_spine(1)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("no-collect"),
            "operation": "sha256",
            "range": {"start": 0, "end": 100},
            "collect_results": false,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 100, 0);
    let results = env.results(&job_id).await?;
    assert!(
        results.is_empty(),
        "no result kept: {:?}",
        &results[..results.len().min(3)]
    );
    env.finish().await
}

/// An `exec` job over `0..n` in which item `i` fails its first `i % 3` attempts; every attempt
/// appends a line to `{dir}/{i}`.
fn flaky_job(job_id: &str, dir: &Path, n: u64, max_attempts: u32) -> Value {
    json!({
        "job_id": job_id,
        "operation": "exec",
        "params": {"command": [
            "sh", "-c",
            "f=\"$1/{}\"; r=$(cat \"$f\" 2>/dev/null | wc -l); echo x >> \"$f\"; \
             if [ \"$r\" -lt $(( {} % 3 )) ]; then echo \"fail {} attempt $r\" >&2; exit 1; fi; echo ok-{}",
            "sh", dir.display().to_string(),
        ]},
        "range": {"start": 0, "end": n},
        "fragment_size": 2,
        "max_attempts": max_attempts,
        "tolerated_failure_percent": 100,
    })
}

fn attempts(dir: &Path, item: u64) -> usize {
    std::fs::read_to_string(dir.join(item.to_string()))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_operations_are_retried_up_to_max_attempts() -> Result<()> {
    let mut env = TestEnv::new("retry").await?;
    env.start_spine(2)?;
    let (twice, once) = (env.dir().join("twice"), env.dir().join("once"));
    std::fs::create_dir_all(&twice)?;
    std::fs::create_dir_all(&once)?;
    let two = env
        .submit(&flaky_job(&env.job_id("two"), &twice, 9, 2))
        .await?;
    let one = env
        .submit(&flaky_job(&env.job_id("one"), &once, 9, 1))
        .await?;

    // max_attempts 2: items 2, 5, 8 fail twice and count as failed; 1, 4, 7 succeed on retry.
    let status = env.wait_for_terminal(&two, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 6, 3);
    for line in env.results(&two).await? {
        let i = line.index();
        match (i % 3, &line) {
            (2, ResultLine::Err { error, .. }) => {
                assert!(error.contains(&format!("fail {i}")), "{error}")
            }
            (_, ResultLine::Ok { result, .. }) if i % 3 != 2 => {
                assert_eq!(result, &Value::String(format!("ok-{i}")));
            }
            _ => panic!("unexpected outcome {line:?}"),
        }
        let expected_attempts = [1, 2, 2][(i % 3) as usize];
        assert_eq!(
            attempts(&twice, i),
            expected_attempts,
            "attempts of item {i}"
        );
    }
    // max_attempts 1: every item that fails once is failed.
    let status = env.wait_for_terminal(&one, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3, 6);
    for i in 0..9 {
        assert_eq!(attempts(&once, i), 1, "attempts of item {i}");
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_fails_as_soon_as_failures_exceed_the_tolerated_share() -> Result<()> {
    let mut env = TestEnv::new("fail-fast").await?;
    env.start_spine(1)?;
    let runs = env.dir().join("runs");
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("fail-fast"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", "echo {} >> \"$1\"; echo nope >&2; exit 3", "sh", runs.display().to_string()]},
            "range": {"start": 0, "end": 200},
            "fragment_size": 1,
            "max_concurrent_fragments": 2,
            "max_attempts": 1,
            "tolerated_failure_percent": 10,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran = std::fs::read_to_string(&runs)?.lines().count();
    eprintln!("{ran} of 200 operations ran; {status:?}");
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    // 21 failures exceed 10% of 200; the window of 2 and the reducer's reaction add a few.
    assert!(
        ran <= 60,
        "undispatched work is cancelled once the job fails: {ran} ran"
    );
    assert_eq!(
        status.ops_succeeded + status.ops_failed,
        status.ops_total,
        "{status:?}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_that_kills_its_workers_counts_as_failed() -> Result<()> {
    let mut env = TestEnv::new("poison").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // One fragment per worker at a time, so only the poison fragment dies with its worker.
    let workers = [
        env.start_worker(WorkerOpts::prefetch(1))?,
        env.start_worker(WorkerOpts::prefetch(1))?,
    ];
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // Item 2 SIGKILLs the worker running it (`exec` runs sh straight from the worker).
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("poison"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", "if [ {} -eq 2 ]; then kill -9 $PPID; sleep 1; fi; echo ok-{}"]},
            "range": {"start": 0, "end": 5},
            "fragment_size": 1,
            "tolerated_failure_percent": 50,
        }))
        .await?;
    // Stand in for a process supervisor: bring back every worker that died.
    let (status, restarts) = env.wait_restarting(&job_id, &workers, JOB_TIMEOUT).await?;
    eprintln!("{restarts} worker restarts; {status:?}");
    assert_counts(&status, JobState::Succeeded, 4, 1);
    assert!(
        restarts >= 2,
        "the poison fragment was retried: {restarts} restarts"
    );
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 5);
    for line in &results {
        match line {
            ResultLine::Err { index: 2, error } => assert!(!error.is_empty()),
            ResultLine::Ok { index, result } if *index != 2 => {
                assert_eq!(result, &Value::String(format!("ok-{index}")));
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_take_only_the_operations_they_offer() -> Result<()> {
    let mut env = TestEnv::new("offers").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts {
        operations: Some(vec!["noop".into()]),
        ..WorkerOpts::default()
    })?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("sha"),
            "operation": "sha256",
            "range": {"start": 0, "end": 30},
            "fragment_size": 5,
            "max_concurrent_fragments": 3,
        }))
        .await?;
    let noop = env
        .submit(&json!({"job_id": env.job_id("noop"), "operation": "noop", "items": [1, 2]}))
        .await?;
    let status = env.wait_for_terminal(&noop, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2, 0);

    // Nobody offers sha256 yet: its window waits, visibly, in its work queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = env.status(&job_id).await?.expect("job known");
    assert!(
        !waiting.state.is_terminal() && waiting.ops_succeeded == 0,
        "{waiting:?}"
    );
    assert_eq!(
        env.queue_depth(&env.names.work_queue("sha256")).await?,
        3,
        "one window"
    );

    env.start_worker(WorkerOpts::default())?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 30, 0);
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_running_fragments_at_an_operation_boundary() -> Result<()> {
    let mut env = TestEnv::new("cancel").await?;
    env.start_spine(1)?;
    // The worker hears cancellations only once it is connected: let it be, first.
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let runs = env.dir().join("runs");
    // Two fragments of 10 operations of 200 ms each are out at a time.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("cancel"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", "echo {} >> \"$1\"; sleep 0.2; echo {}", "sh", runs.display().to_string()]},
            "range": {"start": 0, "end": 100},
            "fragment_size": 10,
            "max_concurrent_fragments": 2,
        }))
        .await?;
    // Cancel once both fragments are under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&runs).map_or(0, |s| s.lines().count()) < 2 {
        ensure!(
            Instant::now() < deadline,
            "the job's operations never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.cancel(&job_id).await?;
    let cancelled_at = Instant::now();
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(20))
        .await?;
    let took = cancelled_at.elapsed();
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    let ran = std::fs::read_to_string(&runs)?.lines().count();
    eprintln!("cancelled after {took:?}; {ran} operations ran; {status:?}");
    assert!(
        ran <= 20,
        "no fragment beyond the first window was dispatched: {ran} ran"
    );
    assert!(
        took < Duration::from_millis(1500),
        "running fragments stop at their next operation boundary, not at their end: {took:?}"
    );
    assert_eq!(status.ops_failed, 0);
    assert!(status.ops_succeeded <= ran as u64, "{status:?}");

    // The job ended at once; the fragments that were running report the operations they
    // finished, and the cancelled job's counts come to exactly what ran.
    let status = env
        .wait_for_status(&job_id, Duration::from_secs(10), |s| {
            s.ops_succeeded == ran as u64
        })
        .await?;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    let results = env.results(&job_id).await?;
    assert_eq!(
        results.len() as u64,
        status.ops_succeeded,
        "one result per counted operation"
    );

    // Nothing runs, and nothing changes, after that.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(std::fs::read_to_string(&runs)?.lines().count(), ran);
    assert_eq!(env.status(&job_id).await?.as_ref(), Some(&status));
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_job_whose_fragments_nobody_runs() -> Result<()> {
    let mut env = TestEnv::new("cancel-idle").await?;
    env.note_operation("nobody-offers-this");
    env.start_spine(1)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("idle"),
            "operation": "nobody-offers-this",
            "range": {"start": 0, "end": 10},
            "fragment_size": 1,
            "max_concurrent_fragments": 2,
        }))
        .await?;
    env.wait_for_status(&job_id, Duration::from_secs(20), |s| {
        s.state == JobState::Running
    })
    .await?;
    env.cancel(&job_id).await?;
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(5))
        .await?;
    assert_eq!(
        (status.state, status.ops_succeeded, status.ops_failed),
        (JobState::Cancelled, 0, 0),
        "{status:?}"
    );
    env.finish().await
}
