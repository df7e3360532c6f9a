//! A broker that stops taking a process's frames without closing its connection (issue 21:
//! the splitter that stopped for good when a broker node died).
//!
//! Seen in the cluster test: after a node's loss the splitter's publish to `{ns}.work` was
//! refused, it logged "session ended; reconnecting … retry_in_ms=288" and then nothing, for
//! good: the next session's publish waited for ever for lapin to write its frame, on a
//! connection the broker had stopped reading, and nothing bounded that wait. A connection in
//! that state is open as far as its status goes, so it also went back to the pool and would
//! have been handed to the next session.
//!
//! Here the splitter reaches the broker through [`AmqpProxy`], which mid-job tells the
//! splitter's publishing connection `connection.blocked` and never `unblocked` (what RabbitMQ
//! does to a publisher under a resource alarm): from then on lapin writes nothing on it, its
//! heartbeats included, and the proxy beats for it so the broker keeps it open (RabbitMQ does
//! not time out a connection it holds itself): only the splitter can notice. It must end the
//! session, leave that connection behind, reconnect and finish the job exactly.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::amqp_proxy::AmqpProxy;
use batchq_tests::{TestEnv, WorkerOpts, assert_counts, assert_one_per_index};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

/// `noop` operations, one per fragment, four out at once: a steady stream of dispatches from
/// the splitter, so one is under way when its connections are blocked.
const OPS: u64 = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splitter_whose_connections_the_broker_stops_reading_reconnects_and_finishes_exactly()
-> Result<()> {
    let mut env = TestEnv::new("blocked-connection").await?;
    let proxy = AmqpProxy::start("127.0.0.1:5672").await?;
    let splitter = env.start_splitter_env(&[("AMQP_URL", &proxy.url())])?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts::default())?;
    env.wait_for_workers(1, Duration::from_secs(30)).await?;

    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("blocked"),
            "operation": "sleep",
            "params": {"ms": 5},
            "range": {"start": 0, "end": OPS},
            "fragment_size": 1,
            "max_concurrent_fragments": 4,
        }))
        .await?;
    let before = env
        .wait_for_status(&job_id, Duration::from_secs(60), |s| {
            s.ops_succeeded >= OPS / 10
        })
        .await?;
    ensure!(
        !before.state.is_terminal() && before.ops_succeeded < OPS / 2,
        "the job must be in flight when the connections are blocked: {before:?}"
    );
    let blocked_at = Instant::now();
    let blocked = proxy.block_publishing_connections();
    ensure!(
        blocked == 1,
        "the splitter publishes on one connection, through the proxy: {blocked}"
    );

    // The splitter's wait for a frame to leave is bounded (30 s); then a new session on new
    // connections. Without that bound it waits for ever (the proxy keeps the connection
    // open as long as the test runs), and this times out.
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(120))
        .await?;
    let took = blocked_at.elapsed();
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(status.fragments_done, OPS, "each fragment counted once");
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, OPS);
    ensure!(
        results.iter().all(|line| matches!(
            line,
            ResultLine::Ok {
                result: Value::Null,
                ..
            }
        )),
        "every sleep's result is null"
    );
    let log = env.log_text(splitter);
    ensure!(
        log.contains("not written: the broker stopped reading this connection"),
        "the splitter says why its session ended:\n{log}"
    );
    eprintln!(
        "{blocked} connections blocked at {} of {OPS} operations; the job finished {took:.1?} later",
        before.ops_succeeded
    );
    env.finish().await?;
    Ok(())
}
