//! Standby splitters and reducers (issue 12, item 3), on the PostgreSQL store: two replicas of
//! each, one active through a lease with a fencing token.
//!
//! - The active splitter SIGKILLed, then the active reducer: the standby takes over, the jobs
//!   end exact with every result right; the takeover (kill → the standby holds the lease) is
//!   measured, printed and held to the goal, 5 s.
//! - The active reducer SIGTERMed: it hands the lease over; the standby holds it within 1 s.
//! - The active reducer SIGSTOPped past its lease: the standby takes over; on SIGCONT the
//!   woken one commits nothing — no fragment row carries its fencing token after the pause —
//!   and steps down.
//! - `batchq_leader{role="reducer"}` is 1 on the active reducer's endpoint, 0 on the standby's.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::ha::{active_of, other, rows_of_token, taken_over};
use batchq_tests::prometheus::{free_port, scrape};
use batchq_tests::{Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const OPS: u64 = 4000;
const ROUNDS: u32 = 2;
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// The goals of issue 12: takeover after a SIGKILL or a pause, and after a SIGTERM.
const TAKEOVER_GOAL: Duration = Duration::from_secs(5);
const HANDOVER_GOAL: Duration = Duration::from_secs(1);

fn sha_job(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": ROUNDS},
        "range": {"start": 0, "end": OPS},
        "fragment_size": 10,
        "max_concurrent_fragments": 4,
        "collect_results": true,
    })
}

async fn check_job(env: &TestEnv, job_id: &str) -> Result<()> {
    let status = env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, OPS);
    for (i, line) in results.iter().enumerate() {
        let expected = ResultLine::Ok {
            index: i as u64,
            result: Value::String(sha256_hex(&i.to_string(), ROUNDS)),
        };
        ensure!(line == &expected, "result {i}: {line:?}");
    }
    Ok(())
}

/// Waits until the job has made progress past `ops` succeeded.
async fn past(env: &TestEnv, job_id: &str, ops: u64) -> Result<()> {
    env.wait_for_status(job_id, Duration::from_secs(60), |s| {
        s.ops_succeeded >= ops || s.state.is_terminal()
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_or_stopped_active_replica() -> Result<()> {
    let Some(mut env) = TestEnv::postgres("ha-takeover").await? else {
        return Ok(());
    };
    let splitters = [env.start_splitter()?, env.start_splitter()?];
    let ports = [free_port()?, free_port()?];
    let reducers = [
        env.start_reducer_with(&["--metrics-addr", &format!("127.0.0.1:{}", ports[0])])?,
        env.start_reducer_with(&["--metrics-addr", &format!("127.0.0.1:{}", ports[1])])?,
    ];
    for _ in 0..2 {
        env.start_worker(WorkerOpts::default())?;
    }
    env.wait_for_workers(2, Duration::from_secs(30)).await?;
    let jobs: Vec<String> = (0..3).map(|i| env.job_id(&format!("job{i}"))).collect();
    for job in &jobs {
        env.submit(&sha_job(job)).await?;
    }

    // Prometheus tells the active replica from the standby.
    let (active, _) = active_of(&env, "reducer", &reducers).await?;
    let standby = other(reducers, active);
    for (id, port) in reducers.iter().zip(ports) {
        let expected = if *id == active { 1.0 } else { 0.0 };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = scrape(port)
                .await
                .ok()
                .and_then(|series| series.get("batchq_leader{role=\"reducer\"}").copied());
            if leader == Some(expected) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "batchq_leader of the {} reducer: {leader:?}, not {expected}",
                if *id == standby { "standby" } else { "active" }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // 1. The active splitter SIGKILLed mid-job.
    let (splitter, token) = active_of(&env, "splitter", &splitters).await?;
    past(&env, &jobs[0], 500).await?;
    let killed = Instant::now();
    env.kill(splitter, Signal::Kill)?;
    let splitter_takeover = taken_over(&env, "splitter", token, killed).await?;

    // 2. The active reducer SIGKILLed mid-job.
    let (reducer, token) = active_of(&env, "reducer", &reducers).await?;
    past(&env, &jobs[0], 1500).await?;
    let killed = Instant::now();
    env.kill(reducer, Signal::Kill)?;
    let reducer_takeover = taken_over(&env, "reducer", token, killed).await?;
    let survivor = other(reducers, reducer);

    // 3. The killed reducer comes back as a standby; the active one is SIGTERMed and hands
    //    the lease over.
    env.restart(reducer)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (active, token) = active_of(&env, "reducer", &reducers).await?;
    ensure!(
        active == survivor,
        "a restarted replica must not take a held lease"
    );
    past(&env, &jobs[1], 1000).await?;
    let asked = Instant::now();
    env.kill(active, Signal::Term)?;
    let handover = taken_over(&env, "reducer", token, asked).await?;
    let status = env.wait_exit(active, Duration::from_secs(30)).await?;
    ensure!(status.success(), "SIGTERM exits 0: {status}");

    // 4. The active reducer (the restarted one) SIGSTOPped past its lease, then SIGCONT.
    env.restart(active)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (paused, token) = active_of(&env, "reducer", &reducers).await?;
    // Work of its own for the replica about to be paused: the first jobs may be done by now
    // (the pipeline is fast), and the pause is only telling if it committed rows before.
    let late = env.job_id("job3");
    env.submit(&sha_job(&late)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_of_token(&env, token).await? == 0 {
        ensure!(
            Instant::now() < deadline,
            "the active reducer (token {token}) recorded no fragment within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.kill(paused, Signal::Stop)?;
    let stopped = Instant::now();
    // Rows the paused one committed, counted while it cannot commit more.
    let before = rows_of_token(&env, token).await?;
    ensure!(
        before > 0,
        "the active reducer recorded fragments under its token {token}"
    );
    let pause_takeover = taken_over(&env, "reducer", token, stopped).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.kill(paused, Signal::Cont)?;
    // It wakes with a batch in hand and a lease it lost: whatever it tries is fenced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows_of_token(&env, token).await?;
    ensure!(
        after == before,
        "the woken reducer committed {} fragment rows under its stale token {token}",
        after - before
    );
    ensure!(
        env.is_running(paused),
        "the woken reducer steps down; it does not exit"
    );
    let log = env.log_text(paused);
    ensure!(
        log.contains("stepped down"),
        "the woken reducer says it stepped down:\n{}",
        env.logs_tail()
    );
    let (now_active, _) = active_of(&env, "reducer", &reducers).await?;
    ensure!(now_active != paused, "the woken reducer is a standby");

    for job in jobs.iter().chain([&late]) {
        check_job(&env, job).await?;
    }
    eprintln!(
        "takeover after SIGKILL: splitter {splitter_takeover:.2?}, reducer {reducer_takeover:.2?}; \
         after SIGSTOP: reducer {pause_takeover:.2?}; handover on SIGTERM: {handover:.2?}; \
         rows of the paused reducer's token: {before} before, {after} after its wake"
    );
    for (what, took, goal) in [
        (
            "splitter takeover after SIGKILL",
            splitter_takeover,
            TAKEOVER_GOAL,
        ),
        (
            "reducer takeover after SIGKILL",
            reducer_takeover,
            TAKEOVER_GOAL,
        ),
        (
            "reducer takeover after SIGSTOP",
            pause_takeover,
            TAKEOVER_GOAL,
        ),
        ("reducer handover on SIGTERM", handover, HANDOVER_GOAL),
    ] {
        ensure!(took <= goal, "{what} took {took:.2?}, the goal is {goal:?}");
    }
    env.finish().await
}
