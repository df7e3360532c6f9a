//! Nothing is a single point of failure (issue 12): on a three-node RabbitMQ cluster and the
//! PostgreSQL store, two splitters, two reducers and three workers run 20 jobs at once while,
//! in turn, a broker node is SIGKILLed and booted again, another node is SIGKILLed, the active
//! splitter is SIGKILLed, the active reducer is SIGKILLed, and the active reducer is SIGSTOPped
//! past its lease and woken. Every job must end `succeeded` with 0 operations lost, 0 counted
//! twice and one correct result per index.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::ha::{active_of, rows_of_token, taken_over};
use batchq_tests::{
    RabbitCluster, Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex,
};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const JOBS: usize = 20;
const OPS: u64 = 6000;
const FRAGMENT: u64 = 5;
const ROUNDS: u32 = 2;

fn job(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": ROUNDS},
        "range": {"start": 0, "end": OPS},
        "fragment_size": FRAGMENT,
        "max_concurrent_fragments": 2,
        "collect_results": true,
    })
}

/// Operations succeeded over all jobs, as the reducer answers; errors while a fault lasts
/// count as no news.
async fn progress(env: &TestEnv, jobs: &[String]) -> u64 {
    let mut done = 0;
    for job in jobs {
        if let Ok(Some(status)) = env.status(job).await {
            done += status.ops_succeeded;
        }
    }
    done
}

/// Waits until `fraction` of all operations succeeded, and checks work is left for the fault.
async fn until(env: &TestEnv, jobs: &[String], fraction: f64) -> Result<()> {
    let total = (JOBS as u64 * OPS) as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = progress(env, jobs).await as f64;
        if done >= total * fraction {
            ensure!(
                done < total * 0.95,
                "the jobs are nearly done ({done} of {total}) before the next fault: make them longer"
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{done} of {total} operations after 120 s, waiting for {fraction}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_survive_every_fault_in_turn() -> Result<()> {
    let began = Instant::now();
    if batchq_tests::postgres::skip_without_postgres("ha-all").await? {
        return Ok(());
    }
    let (mut cluster, formed_in) = RabbitCluster::start().await?;
    let Some(mut env) = TestEnv::postgres_with_url("ha-all", &cluster.urls()).await? else {
        return Ok(());
    };
    let splitters = [env.start_splitter()?, env.start_splitter()?];
    let reducers = [env.start_reducer()?, env.start_reducer()?];
    for _ in 0..3 {
        env.start_worker(WorkerOpts::default())?;
    }
    env.wait_for_workers(3, Duration::from_secs(60)).await?;
    let jobs: Vec<String> = (0..JOBS).map(|i| env.job_id(&format!("j{i}"))).collect();
    for id in &jobs {
        env.submit(&job(id)).await?;
    }
    let mut log = Vec::new();

    // 1. A broker node SIGKILLed, booted again after a while.
    until(&env, &jobs, 0.03).await?;
    cluster.kill(0)?;
    log.push("node 0 killed".to_owned());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rejoined = cluster.restart(0).await?;
    log.push(format!("node 0 rejoined in {rejoined:.1?}"));

    // 2. The active splitter SIGKILLed.
    until(&env, &jobs, 0.12).await?;
    let (splitter, token) = active_of(&env, "splitter", &splitters).await?;
    let killed = Instant::now();
    env.kill(splitter, Signal::Kill)?;
    let took = taken_over(&env, "splitter", token, killed).await?;
    log.push(format!("splitter takeover {took:.2?}"));
    env.restart(splitter)?;

    // 3. The active reducer SIGKILLed.
    until(&env, &jobs, 0.22).await?;
    let (reducer, token) = active_of(&env, "reducer", &reducers).await?;
    let killed = Instant::now();
    env.kill(reducer, Signal::Kill)?;
    let took = taken_over(&env, "reducer", token, killed).await?;
    log.push(format!("reducer takeover {took:.2?}"));
    env.restart(reducer)?;

    // 4. The active reducer SIGSTOPped past its lease, then woken: it commits nothing.
    until(&env, &jobs, 0.32).await?;
    let (paused, token) = active_of(&env, "reducer", &reducers).await?;
    env.kill(paused, Signal::Stop)?;
    let stopped = Instant::now();
    let before = rows_of_token(&env, token).await?;
    ensure!(
        before > 0,
        "the active reducer recorded fragments under its token {token}"
    );
    let took = taken_over(&env, "reducer", token, stopped).await?;
    env.kill(paused, Signal::Cont)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows_of_token(&env, token).await?;
    ensure!(
        after == before,
        "the woken reducer committed {} rows under its stale token",
        after - before
    );
    log.push(format!(
        "reducer takeover after SIGSTOP {took:.2?}; the woken one committed nothing"
    ));

    // 5. Another broker node SIGKILLed; it stays down until the jobs end.
    until(&env, &jobs, 0.42).await?;
    cluster.kill(1)?;
    log.push("node 1 killed".to_owned());

    for id in &jobs {
        let status = env.wait_for_terminal(id, Duration::from_secs(180)).await?;
        assert_counts(&status, JobState::Succeeded, OPS, 0);
        assert_eq!(
            status.fragments_done,
            OPS / FRAGMENT,
            "each fragment counted once: {status:?}"
        );
        let results = env.results(id).await?;
        assert_one_per_index(&results, OPS);
        for (i, line) in (0..OPS).zip(&results) {
            let expected = ResultLine::Ok {
                index: i,
                result: Value::String(sha256_hex(&i.to_string(), ROUNDS)),
            };
            ensure!(line == &expected, "job {id}, result {i}: {line:?}");
        }
    }
    let rejoined = cluster.restart(1).await?;
    log.push(format!("node 1 rejoined in {rejoined:.1?}"));
    eprintln!(
        "cluster formed in {formed_in:.1?}; {}; {JOBS} jobs of {OPS} exact; whole test {:.1?}",
        log.join("; "),
        began.elapsed()
    );
    env.finish().await?;
    cluster.stop();
    Ok(())
}
