//! Processes that die in the middle of a job: SIGKILL of the reducer, the splitter or a worker
//! (and restart, with the same data folder) leaves every job with exact counts and complete
//! results; SIGTERM stops a process gracefully, with exit status 0.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{
    ProcId, Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex,
};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);
const OPS: u64 = 6000;

/// A sha256 job of 600 fragments, slow enough (window 4) to be killed into several times.
fn long_sha_job(env: &TestEnv, name: &str) -> Value {
    json!({
        "job_id": env.job_id(name),
        "operation": "sha256",
        "params": {"rounds": 2},
        "range": {"start": 0, "end": OPS},
        "fragment_size": 10,
        "max_concurrent_fragments": 4,
    })
}

async fn check_sha_results(env: &TestEnv, job_id: &str) -> Result<()> {
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, OPS);
    for (i, line) in results.iter().enumerate() {
        let expected = Value::String(sha256_hex(&i.to_string(), 2));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i as u64,
                result: expected
            }
        );
    }
    Ok(())
}

/// SIGKILLs `victim` each time the job passes one of `at` successes, restarting it after a
/// pause; checks the job was still running at each kill.
async fn kill_and_restart_during(
    env: &mut TestEnv,
    job_id: &str,
    victim: ProcId,
    at: &[u64],
) -> Result<()> {
    for &threshold in at {
        // Polled over RPC, so the reducer must be up; after a reducer restart it may take a
        // moment to answer again.
        let status = env
            .wait_for_status(job_id, Duration::from_secs(60), |s| {
                s.ops_succeeded >= threshold
            })
            .await?;
        ensure!(
            !status.state.is_terminal(),
            "the job ended before the kill at {threshold}; make it longer: {status:?}"
        );
        env.kill(victim, Signal::Kill)?;
        eprintln!("killed at {} of {OPS} operations", status.ops_succeeded);
        tokio::time::sleep(Duration::from_millis(700)).await;
        env.restart(victim)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reducer_killed_mid_job_loses_nothing() -> Result<()> {
    let mut env = TestEnv::new("kill-reducer").await?;
    let spine = env.start_spine(2)?;
    let job_id = env.submit(&long_sha_job(&env, "reducer-crash")).await?;
    kill_and_restart_during(&mut env, &job_id, spine.reducer, &[800, 2500]).await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(
        status.fragments_done,
        OPS / 10,
        "each fragment counted once"
    );
    check_sha_results(&env, &job_id).await?;
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitter_killed_mid_job_loses_nothing() -> Result<()> {
    let mut env = TestEnv::new("kill-splitter").await?;
    let spine = env.start_spine(2)?;
    let job_id = env.submit(&long_sha_job(&env, "splitter-crash")).await?;
    kill_and_restart_during(&mut env, &job_id, spine.splitter, &[800, 2500]).await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(
        status.fragments_done,
        OPS / 10,
        "each fragment counted once"
    );
    check_sha_results(&env, &job_id).await?;
    env.finish().await
}

/// `exec` job whose result is the item itself, each operation taking ~100 ms.
fn slow_echo_job(env: &TestEnv, name: &str, ops: u64, fragment_size: u64, window: u64) -> Value {
    json!({
        "job_id": env.job_id(name),
        "operation": "exec",
        "params": {"command": ["sh", "-c", "sleep 0.1; echo {}"]},
        "range": {"start": 0, "end": ops},
        "fragment_size": fragment_size,
        "max_concurrent_fragments": window,
    })
}

async fn check_echo_results(env: &TestEnv, job_id: &str, ops: u64) -> Result<()> {
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, ops);
    for line in &results {
        let expected = Value::String(line.index().to_string());
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: line.index(),
                result: expected
            }
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_fragment_is_replaced_by_another() -> Result<()> {
    let mut env = TestEnv::new("kill-worker").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let victim = env.start_worker(WorkerOpts::prefetch(4))?;
    env.start_worker(WorkerOpts::prefetch(4))?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    let job_id = env
        .submit(&slow_echo_job(&env, "worker-crash", 40, 2, 8))
        .await?;
    let status = env
        .wait_for_status(&job_id, Duration::from_secs(30), |s| s.ops_succeeded >= 8)
        .await?;
    ensure!(
        !status.state.is_terminal(),
        "the job ended before the kill: {status:?}"
    );
    // What the dead worker held goes back to the queue and on to the other worker.
    env.kill(victim, Signal::Kill)?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 40, 0);
    assert_eq!(status.fragments_done, 20, "each fragment counted once");
    check_echo_results(&env, &job_id, 40).await?;
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_each_process_gracefully() -> Result<()> {
    let mut env = TestEnv::new("sigterm").await?;
    let splitter = env.start_splitter()?;
    let reducer = env.start_reducer()?;
    let leaving = env.start_worker(WorkerOpts::prefetch(2))?;
    let staying = env.start_worker(WorkerOpts::prefetch(2))?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // Fragments of 10 operations (~1 s each): a worker asked to stop holds some half done.
    let job_id = env
        .submit(&slow_echo_job(&env, "handback", 40, 10, 4))
        .await?;
    env.wait_for_status(&job_id, Duration::from_secs(30), |s| {
        s.state == JobState::Running
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    env.kill(leaving, Signal::Term)?;
    let exit = env.wait_exit(leaving, Duration::from_secs(10)).await?;
    assert!(exit.success(), "a worker exits 0 on SIGTERM: {exit}");

    // What it handed back runs on the other worker; nothing is lost or counted twice.
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 40, 0);
    check_echo_results(&env, &job_id, 40).await?;

    for (name, id) in [
        ("worker", staying),
        ("splitter", splitter),
        ("reducer", reducer),
    ] {
        env.kill(id, Signal::Term)?;
        let exit = env
            .wait_exit(id, Duration::from_secs(10))
            .await
            .with_context(|| format!("{name} after SIGTERM"))?;
        assert!(exit.success(), "the {name} exits 0 on SIGTERM: {exit}");
    }
    env.finish().await
}
