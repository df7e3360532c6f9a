//! The broker itself goes away in the middle of a job. The shared RabbitMQ must not be
//! touched, so the test boots a private node ([`RabbitNode`]) and runs splitter, reducer and
//! workers against it. Mid-job the node is first restarted the orderly way (SIGTERM), then,
//! during a second job, its Erlang VM is SIGKILLed and booted again on the same data. Every
//! process must ride both out on its own (reconnect, re-declare, resume consuming) and each job
//! must end `succeeded` with exact counts and complete, correct results: a broker restart
//! costs time, never operations. Meanwhile `batchctl status` retries briefly and then fails
//! in one line, and a `batchctl watch` started before the orderly restart rides it out.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::{RabbitNode, TestEnv, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, JobStatus, ResultLine};
use serde_json::{Value, json};

const OPS: u64 = 4000;
const FRAGMENT: u64 = 10;
const ROUNDS: u32 = 3;
/// `sleep` 100 ms operations, four at a time: ~10 s, long enough to span the orderly restart.
const WATCHED_OPS: u64 = 400;

/// A sha256 job over `0..ops` in fragments of [`FRAGMENT`], 8 out at once.
fn sha_job(env: &TestEnv, name: &str, ops: u64) -> Value {
    json!({
        "job_id": env.job_id(name),
        "operation": "sha256",
        "params": {"rounds": ROUNDS},
        "range": {"start": 0, "end": ops},
        "fragment_size": FRAGMENT,
        "max_concurrent_fragments": 8,
    })
}

/// The job ended `succeeded` with every operation counted once and the right hashes.
async fn check_job(env: &TestEnv, job_id: &str, ops: u64) -> Result<JobStatus> {
    let status = env
        .wait_for_terminal(job_id, Duration::from_secs(60))
        .await?;
    assert_counts(&status, JobState::Succeeded, ops, 0);
    assert_eq!(
        status.fragments_done,
        ops / FRAGMENT,
        "each fragment counted once: {status:?}"
    );
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, ops);
    for (i, line) in (0..ops).zip(&results) {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: Value::String(sha256_hex(&i.to_string(), ROUNDS)),
            }
        );
    }
    Ok(status)
}

/// Waits until the job has a fifth of its operations and checks it is far from done.
async fn wait_well_in_flight(env: &TestEnv, job_id: &str, ops: u64) -> Result<JobStatus> {
    let status = env
        .wait_for_status(job_id, Duration::from_secs(30), |s| {
            s.ops_succeeded >= ops / 5
        })
        .await?;
    ensure!(
        !status.state.is_terminal() && status.ops_succeeded < ops / 2,
        "the job must be well in flight when the broker goes: {status:?}"
    );
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_mid_job_cost_time_not_operations() -> Result<()> {
    let began = Instant::now();
    // Declared first, dropped last: the processes (in `env`) stop before the node goes.
    let mut node = RabbitNode::start().await?;
    let first_boot = began.elapsed();
    let mut env = TestEnv::with_url("broker-restart", &node.url()).await?;
    let spine = env.start_spine(2)?;
    // By now every queue of the namespace exists (the workers declare their work queues).
    env.wait_for_workers(2, Duration::from_secs(20)).await?;

    // 1. An orderly broker restart (a rolling upgrade, say) in the middle of a job, while
    //    `batchctl watch` follows a slower job: the watch rides the restart out.
    let watched = env
        .submit(&json!({
            "job_id": env.job_id("watched"),
            "operation": "sleep",
            "params": {"ms": 100},
            "range": {"start": 0, "end": WATCHED_OPS},
            "fragment_size": 1,
            "max_concurrent_fragments": 4,
            "collect_results": false,
        }))
        .await?;
    let watch_args = ["watch", watched.as_str()];
    let watch = env.batchctl_within(&watch_args, Duration::from_secs(180));
    let orderly_restart = async {
        // The watch has subscribed well before the broker goes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let orderly = env.submit(&sha_job(&env, "orderly", OPS / 2)).await?;
        let before_orderly = wait_well_in_flight(&env, &orderly, OPS / 2).await?;
        let stopped_at = Instant::now();
        let (stop_took, reboot_orderly) = node.restart_gracefully().await?;
        let orderly_status = check_job(&env, &orderly, OPS / 2).await?;
        anyhow::Ok((
            before_orderly,
            stopped_at,
            stop_took,
            reboot_orderly,
            orderly_status,
        ))
    };
    let (watch, orderly_restart) = tokio::join!(watch, orderly_restart);
    let (before_orderly, stopped_at, stop_took, reboot_orderly, orderly_status) = orderly_restart?;
    let orderly_done = stopped_at.elapsed();
    let (code, _, stderr) = watch?;
    assert_eq!(
        code.code(),
        Some(0),
        "the watch exits 0 for a succeeded job: {stderr}"
    );
    assert!(
        stderr.contains("batchctl: lost the broker") && stderr.contains("batchctl: reconnected"),
        "the watch says it lost the broker and got it back: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "job {watched} succeeded: {WATCHED_OPS} succeeded, 0 failed"
        )),
        "{stderr}"
    );
    eprintln!(
        "orderly restart at {} of {} operations: stop {stop_took:.1?}, boot \
         {reboot_orderly:.1?}, job done {orderly_done:.1?} after the stop",
        before_orderly.ops_succeeded,
        OPS / 2
    );

    // 2. The broker SIGKILLed in the middle of a job.
    let job_id = env.submit(&sha_job(&env, "crash", OPS)).await?;
    let before = wait_well_in_flight(&env, &job_id, OPS).await?;
    node.kill()?;
    let killed_at = Instant::now();
    eprintln!(
        "broker killed at {} of {OPS} operations ({} fragments in flight)",
        before.ops_succeeded, before.fragments_in_flight
    );

    // batchctl, meanwhile, retries for a few seconds and then says in one line what is wrong.
    let (code, stdout, stderr) = env.batchctl(&["status", &job_id]).await?;
    let batchctl_took = killed_at.elapsed();
    assert_eq!(code.code(), Some(2), "stderr: {stderr:?}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    let expected_start = format!(
        "batchctl: cannot reach the broker (amqp://guest:***@127.0.0.1:{}/%2f)",
        node.port
    );
    assert!(stderr.starts_with(&expected_start), "{stderr:?}");
    assert!(
        batchctl_took >= Duration::from_secs(2) && batchctl_took < Duration::from_secs(10),
        "batchctl retries for a few seconds, then gives up: took {batchctl_took:?}"
    );

    let reboot = node.restart().await?;
    let down_for = killed_at.elapsed();
    let status = check_job(&env, &job_id, OPS).await?;
    let recovered_in = killed_at.elapsed();
    assert!(
        status.ops_succeeded > before.ops_succeeded,
        "the job went on after the restart"
    );

    // Nobody restarted the processes: each reconnected by itself, twice.
    for (name, id) in [("splitter", spine.splitter), ("reducer", spine.reducer)]
        .into_iter()
        .chain(spine.workers.iter().map(|w| ("worker", *w)))
    {
        assert!(
            env.is_running(id),
            "the {name} outlived the broker restarts"
        );
    }
    // batchctl works again.
    let (code, stdout, stderr) = env.batchctl(&["status", &job_id, "--json"]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr:?}");
    let shown: JobStatus = serde_json::from_str(&stdout)?;
    assert_eq!(shown, status);

    eprintln!(
        "figures: first boot {first_boot:.1?}; orderly restart: {} + {} ops exact; crash: \
         broker down {down_for:.1?} (reboot {reboot:.1?}, batchctl gave up after \
         {batchctl_took:.1?}), job done {recovered_in:.1?} after the kill, {} ops in {} \
         fragments exact; test {:.1?} in all",
        orderly_status.ops_succeeded,
        orderly_status.ops_failed,
        status.ops_succeeded,
        status.fragments_done,
        began.elapsed(),
    );
    env.finish().await?;
    node.stop();
    Ok(())
}
