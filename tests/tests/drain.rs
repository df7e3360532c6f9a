//! A worker stopped with SIGTERM hands back every fragment the broker sent it, whichever of
//! its operations' queues it came from: nothing it received is left to be requeued (which
//! would count against the fragment's delivery limit), and the job stays exact. (The drain's
//! own logic, one consumer ending while others still hold deliveries, is unit-tested
//! deterministically in `worker/src/session.rs`; this is the whole worker against RabbitMQ.)

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index};
use common::contract::JobState;
use common::lapin::options::BasicGetOptions;
use serde_json::json;

const OPS: u64 = 1500;
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// How many messages are ready on `queue`, and the fragment numbers of those the broker marks
/// redelivered (handed out before and returned). Each is taken unacknowledged and returned
/// when the peeking channel closes.
async fn redelivered_on(env: &TestEnv, queue: &str) -> Result<(u32, Vec<u64>)> {
    let channel = env.broker().channel().await?;
    let (mut ready, mut redelivered) = (0, Vec::new());
    loop {
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
        )
        .await
        .with_context(|| format!("basic_get on {queue} timed out"))??;
        let Some(message) = got else { break };
        ready += 1;
        if message.delivery.redelivered {
            let fragment: serde_json::Value = serde_json::from_slice(&message.delivery.data)?;
            redelivered.push(fragment["fragment"].as_u64().unwrap_or(u64::MAX));
        }
    }
    let _ = channel.close(200, "peeked".into()).await;
    Ok((ready, redelivered))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_every_fragment_of_a_worker_with_several_operations() -> Result<()> {
    let mut env = TestEnv::new("drain").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // Every built-in, `exec` included: four consumers on one channel. `sleep` is the last
    // of them cancelled, so its fragments keep arriving while the others' cancellations are
    // confirmed.
    let leaving = env.start_worker(WorkerOpts::prefetch(4))?;
    let workers = env.wait_for_workers(1, Duration::from_secs(20)).await?;
    assert_eq!(workers[0].operations, ["exec", "noop", "sha256", "sleep"]);

    // One-operation fragments of 1 ms each: the worker finishes (and so is sent) fragments
    // every few milliseconds, up to the moment it is stopped, from a backlog of 60.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("sleep"),
            "operation": "sleep",
            "params": {"ms": 1},
            "range": {"start": 0, "end": OPS},
            "fragment_size": 1,
            "max_concurrent_fragments": 64,
        }))
        .await?;
    env.wait_for_status(&job_id, Duration::from_secs(30), |s| s.ops_succeeded >= 100)
        .await?;
    env.kill(leaving, Signal::Term)?;
    let exit = env.wait_exit(leaving, Duration::from_secs(15)).await?;
    ensure!(exit.success(), "a worker exits 0 on SIGTERM: {exit}");

    // No worker runs now: what waits on the queue is what the splitter published, and what
    // the stopped worker returned unhandled, marked redelivered.
    let queue = env.broker().names().work_queue("sleep");
    let (ready, redelivered) = redelivered_on(&env, &queue).await?;
    eprintln!(
        "{ready} fragments ready after the stop, {} of them returned",
        redelivered.len()
    );
    ensure!(ready > 0, "the job still had fragments waiting");
    assert_eq!(
        redelivered,
        Vec::<u64>::new(),
        "fragments the stopped worker received and left to the broker to requeue"
    );

    env.start_worker(WorkerOpts::prefetch(4))?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_one_per_index(&env.results(&job_id).await?, OPS);
    env.finish().await
}
