//! Losing a broker node of a three-node cluster (issue 12, item 1). Splitter, reducer and two
//! workers are given all three URLs. A job runs; the node the reducer is connected to (where
//! its private heartbeat and RPC queues live) is SIGKILLed mid-job and, after a while, booted
//! again; then, during a second job, another node is SIGKILLed, the splitter's when it is
//! connected to another one. Both jobs must end `succeeded` with every operation counted once
//! and every result right, and `batchctl status` must answer while a node is down: nothing
//! batchq declares may depend on one node. The second node is booted again at the end,
//! before the namespace is deleted.
//!
//! Printed figures: the cluster's start, the spread of quorum-queue leaders, `batchctl status`
//! with a node down, and how long each job ran across its node loss.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use batchq_tests::{RabbitCluster, TestEnv, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, JobStatus, ResultLine};
use serde_json::{Value, json};

/// sha256 operations per job, in fragments of [`FRAGMENT`], 3 rounds each: about 15 s on two
/// workers here, long enough to lose a node in the middle.
const OPS: u64 = 3000;
const FRAGMENT: u64 = 10;
const ROUNDS: u32 = 3;
/// How long the first killed node stays down before it is booted again.
const DOWN_FOR: Duration = Duration::from_secs(5);

fn sha_job(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": ROUNDS},
        "range": {"start": 0, "end": OPS},
        "fragment_size": FRAGMENT,
        "max_concurrent_fragments": 8,
    })
}

/// Submits through `batchctl` (a fresh connection to whichever node answers), as a user
/// would while a node may be down.
async fn submit_with_batchctl(env: &TestEnv, job_id: &str) -> Result<()> {
    let file = env.dir().join(format!("{job_id}.json"));
    std::fs::write(&file, serde_json::to_vec(&sha_job(job_id))?)?;
    let path = file.display().to_string();
    let (code, stdout, stderr) = env.batchctl(&["submit", &path]).await?;
    ensure!(
        code.success() && stdout.trim() == job_id,
        "batchctl submit: {code}, {stdout:?}, {stderr}"
    );
    Ok(())
}

/// The job ended `succeeded`, every operation counted once, every hash right.
async fn check_job(env: &TestEnv, job_id: &str) -> Result<JobStatus> {
    let status = env
        .wait_for_terminal(job_id, Duration::from_secs(90))
        .await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(
        status.fragments_done,
        OPS / FRAGMENT,
        "each fragment counted once: {status:?}"
    );
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, OPS);
    for (i, line) in (0..OPS).zip(&results) {
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

/// Waits until a fifth of the job is done and checks it is far from finished.
async fn wait_in_flight(env: &TestEnv, job_id: &str) -> Result<()> {
    let status = env
        .wait_for_status(job_id, Duration::from_secs(60), |s| {
            s.ops_succeeded >= OPS / 5
        })
        .await?;
    ensure!(
        !status.state.is_terminal() && status.ops_succeeded < OPS * 3 / 4,
        "the job must be in flight when the node goes: {status:?}"
    );
    Ok(())
}

/// Longest a node's loss may keep `batchctl status` from answering: the reducer must notice
/// the loss, reconnect to another node and bind a new RPC queue there.
const RPC_OUTAGE_LIMIT: Duration = Duration::from_secs(20);

/// Runs `batchctl status JOB --json` (timeout 2 s) until it answers with the job, within
/// [`RPC_OUTAGE_LIMIT`] of `since` (the node's kill); returns when it first answered,
/// counted from `since`, and how long that successful call took.
async fn status_answers(
    env: &TestEnv,
    job_id: &str,
    since: Instant,
) -> Result<(Duration, Duration)> {
    loop {
        let asked = Instant::now();
        let (code, stdout, stderr) = env
            .batchctl(&["--timeout", "2", "status", job_id, "--json"])
            .await?;
        let took = asked.elapsed();
        if code.success() {
            let status: JobStatus = serde_json::from_str(&stdout)?;
            ensure!(status.job_id == job_id, "status of another job: {stdout}");
            return Ok((since.elapsed(), took));
        }
        ensure!(
            since.elapsed() < RPC_OUTAGE_LIMIT,
            "batchctl status still fails {RPC_OUTAGE_LIMIT:?} after the node's loss: {code}, {stderr}"
        );
    }
}

/// The one node that the connections named `client` are on.
fn only_node_of(cluster: &RabbitCluster, client: &str) -> Result<usize> {
    let nodes = cluster.nodes_serving(client)?;
    ensure!(
        nodes.len() == 1,
        "{client} should be connected to one node, not {nodes:?}"
    );
    Ok(nodes[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_any_one_broker_node_costs_time_not_operations() -> Result<()> {
    let began = Instant::now();
    // Declared first, dropped last: the processes (in `env`) stop before the cluster goes.
    let (mut cluster, formed_in) = RabbitCluster::start().await?;
    let mut env = TestEnv::with_url("cluster", &cluster.urls()).await?;
    let _spine = env.start_spine(2)?;
    env.wait_for_workers(2, Duration::from_secs(30)).await?;

    // Leaders of the namespace's quorum queues: `x-queue-leader-locator: balanced` must
    // spread them, not put every one on the node that declared it.
    let leaders = cluster.quorum_leaders(env.names.namespace())?;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (_, leader) in &leaders {
        *per_node.entry(leader.clone()).or_default() += 1;
    }
    eprintln!(
        "quorum queue leaders of {} queues per node: {per_node:?}",
        leaders.len()
    );
    ensure!(
        per_node.len() == cluster.len(),
        "every node must lead some of the {} quorum queues: {per_node:?}",
        leaders.len()
    );

    // 1. A node SIGKILLed mid-job, and booted again a little later.
    let reducer_node = only_node_of(&cluster, "batchq-reducer")?;
    let first = env.submit(&sha_job(&env.job_id("first"))).await?;
    wait_in_flight(&env, &first).await?;
    let first_started = Instant::now();
    cluster.kill(reducer_node)?;
    let status_first_down = status_answers(&env, &first, first_started).await?;
    tokio::time::sleep(DOWN_FOR).await;
    let rejoined_in = cluster.restart(reducer_node).await?;
    check_job(&env, &first).await?;
    let first_took = first_started.elapsed();

    // 2. Another node SIGKILLed mid-job; it stays down until the end.
    let splitter_nodes = cluster.nodes_serving("batchq-splitter")?;
    let second_node = splitter_nodes
        .into_iter()
        .find(|&n| n != reducer_node)
        .unwrap_or((reducer_node + 1) % cluster.len());
    let second = env.job_id("second");
    submit_with_batchctl(&env, &second).await?;
    wait_in_flight(&env, &second).await?;
    let second_started = Instant::now();
    cluster.kill(second_node)?;
    let status_second_down = status_answers(&env, &second, second_started).await?;
    check_job(&env, &second).await?;
    let second_took = second_started.elapsed();
    // Back to three before the namespace is deleted: deleting a quorum queue with a member
    // on a node that is down waits about 5 s per queue for that node.
    let second_rejoined_in = cluster.restart(second_node).await?;

    eprintln!(
        "cluster formed in {formed_in:.1?}; reducer's node {reducer_node} killed: batchctl status answers {:.2?} after (in {:.2?}), \
         rejoined in {rejoined_in:.1?}, job finished {first_took:.1?} after the kill; node {second_node} \
         killed: batchctl status answers {:.2?} after (in {:.2?}), job finished {second_took:.1?} \
         after the kill, rejoined in {second_rejoined_in:.1?}; whole test {:.1?}",
        status_first_down.0,
        status_first_down.1,
        status_second_down.0,
        status_second_down.1,
        began.elapsed()
    );
    env.finish().await?;
    cluster.stop();
    Ok(())
}
