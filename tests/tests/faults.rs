//! The fault suite: processes killed and stopped in the middle of jobs, again and again, and
//! every job still ends in the right state with exact counts (`ops_succeeded + ops_failed ==
//! ops_total`, each fragment counted once), one result per index and the right values.
//!
//! `crash.rs` kills the reducer and the splitter twice each during a job of medium fragments,
//! kills one worker of two, and stops each process with SIGTERM. This suite goes further: five
//! worker kills in one job, a job left with no worker at all, the splitter killed in the middle
//! of releasing one-operation fragments of two jobs (one of them an `items` job), the reducer
//! killed in the middle of the burst of reports that piled up while it was down, and graceful
//! stops (SIGTERM, `--max-lifetime`) shown to hand work back without running any operation
//! twice. Operations that write a line to a log each time they run let the tests count
//! executions, not only what the reducer counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use batchq_tests::{
    ProcId, Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex, text_of,
};
use common::contract::{JobState, JobStatus, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// Jobs whose operations leave a trace

/// An `exec` job over `0..ops` whose operation appends the item to `runs` (one line per
/// execution), sleeps `sleep` seconds, and prints the item: its result.
fn logged_echo_job(
    job_id: &str,
    runs: &Path,
    ops: u64,
    sleep: &str,
    fragment_size: u64,
    window: u64,
) -> Value {
    json!({
        "job_id": job_id,
        "operation": "exec",
        "params": {
            "command": ["sh", "-c", format!("echo {{}} >> {}; sleep {sleep}; echo {{}}", runs.display())],
            "timeout_ms": 30000,
        },
        "range": {"start": 0, "end": ops},
        "fragment_size": fragment_size,
        "max_concurrent_fragments": window,
    })
}

/// Each result is the item itself, one per index.
async fn check_echo_results(env: &TestEnv, job_id: &str, ops: u64) -> Result<()> {
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, ops);
    for (i, line) in (0..ops).zip(&results) {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: Value::String(i.to_string()),
            }
        );
    }
    Ok(())
}

/// How many times each index ran, from the operations' own log.
fn executions(runs: &Path) -> Result<BTreeMap<u64, u64>> {
    let text =
        std::fs::read_to_string(runs).with_context(|| format!("reading {}", runs.display()))?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let index: u64 = line
            .trim()
            .parse()
            .with_context(|| format!("a line of {}: {line:?}", runs.display()))?;
        *counts.entry(index).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Every index of `0..ops` ran at least once (and no other index ran); returns how many
/// executions there were beyond one per index.
fn assert_each_ran(runs: &Path, ops: u64) -> Result<u64> {
    let counts = executions(runs)?;
    let missing: Vec<u64> = (0..ops).filter(|i| !counts.contains_key(i)).collect();
    assert!(missing.is_empty(), "operations never run: {missing:?}");
    assert_eq!(counts.len() as u64, ops, "only the job's indices ran");
    Ok(counts.values().map(|n| n - 1).sum())
}

/// The runs log of a test, in its folder.
fn runs_log(env: &TestEnv, name: &str) -> PathBuf {
    env.dir().join(format!("{name}.runs"))
}

/// Waits until the job has `at_least` successes and checks it is still running.
async fn wait_in_flight(env: &TestEnv, job_id: &str, at_least: u64) -> Result<JobStatus> {
    let status = env
        .wait_for_status(job_id, Duration::from_secs(60), |s| {
            s.ops_succeeded >= at_least
        })
        .await?;
    ensure!(
        !status.state.is_terminal(),
        "the job ended before the fault at {at_least}; make it longer: {status:?}"
    );
    Ok(status)
}

// ---------------------------------------------------------------------------------------------
// Workers

const FIVE_KILLS_OPS: u64 = 1200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_worker_kills_in_one_job_lose_and_double_count_nothing() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("five-kills").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let mut live: Vec<ProcId> = vec![
        env.start_worker(WorkerOpts::prefetch(4))?,
        env.start_worker(WorkerOpts::prefetch(4))?,
    ];
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    let runs = runs_log(&env, "five-kills");
    // 240 fragments of 5 operations of ~60 ms, 8 out at once: ~0.3 s per fragment, so a
    // worker always has fragments half done.
    let job_id = env
        .submit(&logged_echo_job(
            &env.job_id("five-kills"),
            &runs,
            FIVE_KILLS_OPS,
            "0.05",
            5,
            8,
        ))
        .await?;
    let mut held_at_kills = Vec::new();
    for threshold in [100, 300, 500, 700, 900] {
        wait_in_flight(&env, &job_id, threshold).await?;
        // The oldest worker goes: it is the one most surely holding fragments.
        let victim = live.remove(0);
        let held = env
            .wait_until_holding(victim, Duration::from_secs(10))
            .await?;
        let status = env.status(&job_id).await?.context("job known")?;
        env.kill(victim, Signal::Kill)?;
        eprintln!(
            "killed a worker holding {held} fragments at {} of {FIVE_KILLS_OPS} operations",
            status.ops_succeeded
        );
        held_at_kills.push(held);
        live.push(env.start_worker(WorkerOpts::prefetch(4))?);
    }
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, FIVE_KILLS_OPS, 0);
    assert_eq!(
        status.fragments_done,
        FIVE_KILLS_OPS / 5,
        "each fragment counted once, none cut: {status:?}"
    );
    check_echo_results(&env, &job_id, FIVE_KILLS_OPS).await?;
    let rerun = assert_each_ran(&runs, FIVE_KILLS_OPS)?;
    // The dead workers' half-done fragments ran again elsewhere (at least once execution);
    // the reducer still counted each operation once.
    assert!(
        rerun > 0,
        "the kills hit fragments mid-way, whose operations ran again"
    );
    eprintln!(
        "figures: 5 worker kills (fragments held {held_at_kills:?}), {FIVE_KILLS_OPS} ops \
         counted once each, {rerun} executions repeated, {:.1?}",
        began.elapsed()
    );
    env.finish().await
}

const LONE_OPS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_only_worker_dies_resumes_when_it_restarts() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("lone-worker").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let only = env.start_worker(WorkerOpts::prefetch(4))?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let runs = runs_log(&env, "lone-worker");
    let job_id = env
        .submit(&logged_echo_job(
            &env.job_id("lone-worker"),
            &runs,
            LONE_OPS,
            "0.05",
            5,
            4,
        ))
        .await?;
    for threshold in [80, 240] {
        wait_in_flight(&env, &job_id, threshold).await?;
        env.wait_until_holding(only, Duration::from_secs(10))
            .await?;
        env.kill(only, Signal::Kill)?;
        // With no worker left the job stands still (reports already sent may still land).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled = env.status(&job_id).await?.context("job known")?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let still = env.status(&job_id).await?.context("job known")?;
        assert_eq!(
            (still.ops_succeeded, still.state),
            (stalled.ops_succeeded, JobState::Running),
            "nothing runs while the job has no worker"
        );
        eprintln!(
            "killed the only worker; job stalled at {} of {LONE_OPS}",
            stalled.ops_succeeded
        );
        env.restart(only)?;
    }
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, LONE_OPS, 0);
    assert_eq!(status.fragments_done, LONE_OPS / 5, "each fragment once");
    check_echo_results(&env, &job_id, LONE_OPS).await?;
    let rerun = assert_each_ran(&runs, LONE_OPS)?;
    eprintln!(
        "figures: only worker killed twice and restarted, {LONE_OPS} ops counted once each, \
         {rerun} executions repeated, {:.1?}",
        began.elapsed()
    );
    env.finish().await
}

// ---------------------------------------------------------------------------------------------
// Splitter and reducer

/// Restarts `process`, which consumes `queue`, and SIGKILLs it again the moment it has taken
/// the messages that piled up there while it was down: in the middle of applying them,
/// before it could commit and acknowledge them. Returns (messages that were waiting, how long
/// the new incarnation lived, messages ready again a moment after the kill).
async fn kill_while_catching_up(
    env: &mut TestEnv,
    process: ProcId,
    queue: &str,
) -> Result<(u32, Duration, u32)> {
    let waiting = env.queue_depth(queue).await?;
    ensure!(waiting > 0, "nothing piled up on {queue} to catch up on");
    let restarted = Instant::now();
    env.restart(process)?;
    let deadline = restarted + Duration::from_secs(15);
    while env.queue_depth(queue).await? >= waiting {
        ensure!(
            Instant::now() < deadline,
            "the restarted process never took its backlog from {queue}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    env.kill(process, Signal::Kill)?;
    let lived = restarted.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = env.queue_depth(queue).await?;
    Ok((waiting, lived, back))
}

const RELEASE_RANGE_OPS: u64 = 2500;
const RELEASE_ITEMS: usize = 1200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitter_killed_while_releasing_small_fragments_of_two_jobs() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("kill-release").await?;
    let spine = env.start_spine(2)?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // One operation per fragment: every settlement makes the splitter release another, so it
    // is always in the middle of a release. An `items` job keeps its items in the splitter's
    // store, a range job only a cursor; both must survive.
    let range_job = env
        .submit(&json!({
            "job_id": env.job_id("release-range"),
            "operation": "sha256",
            "range": {"start": 0, "end": RELEASE_RANGE_OPS},
            "fragment_size": 1,
            "max_concurrent_fragments": 32,
        }))
        .await?;
    let items: Vec<Value> = (0..RELEASE_ITEMS)
        .map(|i| match i % 3 {
            0 => json!(format!("item-{i}")),
            1 => json!({"n": i, "tag": "x"}),
            _ => json!([i, "y"]),
        })
        .collect();
    let items_job = env
        .submit(&json!({
            "job_id": env.job_id("release-items"),
            "operation": "sha256",
            "params": {"rounds": 2},
            "items": items,
            "fragment_size": 1,
            "max_concurrent_fragments": 32,
        }))
        .await?;
    let mut kills = 0;
    let settled_queue = env.names.splitter_queue();
    for threshold in [300, 1200] {
        wait_in_flight(&env, &range_job, threshold).await?;
        // Killed in full flow, then again right after the restart, while it applies the
        // settlements that piled up meanwhile and releases their successors in a burst.
        env.kill(spine.splitter, Signal::Kill)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (waiting, lived, back) =
            kill_while_catching_up(&mut env, spine.splitter, &settled_queue).await?;
        eprintln!(
            "splitter killed again {lived:.1?} after its restart, in the middle of {waiting} \
             settlements ({back} ready again after the kill)"
        );
        env.restart(spine.splitter)?;
        kills += 2;
    }
    let range_status = env.wait_for_terminal(&range_job, JOB_TIMEOUT).await?;
    let items_status = env.wait_for_terminal(&items_job, JOB_TIMEOUT).await?;
    assert_counts(&range_status, JobState::Succeeded, RELEASE_RANGE_OPS, 0);
    assert_eq!(range_status.fragments_done, RELEASE_RANGE_OPS);
    assert_counts(&items_status, JobState::Succeeded, RELEASE_ITEMS as u64, 0);
    assert_eq!(items_status.fragments_done, RELEASE_ITEMS as u64);

    let results = env.results(&range_job).await?;
    assert_one_per_index(&results, RELEASE_RANGE_OPS);
    for (i, line) in (0..RELEASE_RANGE_OPS).zip(&results) {
        let expected = Value::String(sha256_hex(&i.to_string(), 1));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: expected
            }
        );
    }
    let results = env.results(&items_job).await?;
    assert_one_per_index(&results, RELEASE_ITEMS as u64);
    for ((i, item), line) in (0_u64..).zip(&items).zip(&results) {
        let expected = Value::String(sha256_hex(&text_of(item), 2));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: expected
            }
        );
    }
    eprintln!(
        "figures: splitter killed {kills} times during release; {} + {} one-operation \
         fragments counted once each, {:.1?}",
        RELEASE_RANGE_OPS,
        RELEASE_ITEMS,
        began.elapsed()
    );
    env.finish().await
}

const BURST_OPS: u64 = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reducer_killed_during_commit_bursts_keeps_counts_exact() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("kill-burst").await?;
    let statuses = env.subscribe_status().await?;
    let spine = env.start_spine(2)?;
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // 2000 fragments of 2 with 100 out at once: while the reducer is down the workers finish
    // the whole window, and its reports wait for the restarted reducer as one burst.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("burst"),
            "operation": "sha256",
            "params": {"rounds": 3},
            "range": {"start": 0, "end": BURST_OPS},
            "fragment_size": 2,
            "max_concurrent_fragments": 100,
        }))
        .await?;
    let mut kills = 0;
    let reports_queue = env.names.reducer_queue();
    for threshold in [600, 2000] {
        wait_in_flight(&env, &job_id, threshold).await?;
        env.kill(spine.reducer, Signal::Kill)?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Again, while it folds and commits the burst (and publishes its settlements).
        let (waiting, lived, back) =
            kill_while_catching_up(&mut env, spine.reducer, &reports_queue).await?;
        eprintln!(
            "reducer killed again {lived:.1?} after its restart, in the middle of a burst of \
             {waiting} inputs ({back} ready again after the kill)"
        );
        env.restart(spine.reducer)?;
        kills += 2;
    }
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, BURST_OPS, 0);
    assert_eq!(status.fragments_done, BURST_OPS / 2, "each fragment once");
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, BURST_OPS);
    for (i, line) in (0..BURST_OPS).zip(&results) {
        let expected = Value::String(sha256_hex(&i.to_string(), 3));
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: expected
            }
        );
    }
    // What the reducers published, across all their incarnations: counts never went back.
    statuses
        .wait_for(&job_id, Duration::from_secs(10), |s| s.state.is_terminal())
        .await?;
    let seen = statuses.of(&job_id);
    for pair in seen.windows(2) {
        let (a, b) = (&pair[0].1, &pair[1].1);
        assert!(
            b.ops_succeeded >= a.ops_succeeded
                && b.ops_failed >= a.ops_failed
                && b.fragments_done >= a.fragments_done,
            "published counts only grow: {a:?} then {b:?}"
        );
    }
    eprintln!(
        "figures: reducer killed {kills} times (twice during a burst), {} statuses published, \
         {BURST_OPS} ops in {} fragments counted once each, {:.1?}",
        seen.len(),
        status.fragments_done,
        began.elapsed()
    );
    env.finish().await
}

// ---------------------------------------------------------------------------------------------
// Graceful stops

const HANDBACK_OPS: u64 = 120;
const HANDBACK_FRAGMENT: u64 = 30;

/// 4 fragments of 30 operations of ~0.1 s (~3 s each): a worker with prefetch 2 is in the
/// middle of two of them for most of the job.
fn handback_job(env: &TestEnv, name: &str, runs: &Path) -> Value {
    logged_echo_job(
        &env.job_id(name),
        runs,
        HANDBACK_OPS,
        "0.1",
        HANDBACK_FRAGMENT,
        4,
    )
}

/// Waits until the operations' log has `lines` lines (operations started).
async fn wait_for_runs(runs: &Path, lines: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = std::fs::read_to_string(runs)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if started >= lines {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {started} operations started within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a graceful stop in the middle of `cut` fragments: the job ends exact; each of those
/// fragments was reported as far as it ran and its rest came back as a new fragment; and
/// every operation ran exactly once: the operation in hand finished and was reported, nothing
/// was redelivered and run again.
async fn check_handed_back(
    env: &TestEnv,
    job_id: &str,
    runs: &Path,
    cut: u64,
) -> Result<JobStatus> {
    let status = env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, HANDBACK_OPS, 0);
    assert!(
        status.fragments_done >= HANDBACK_OPS / HANDBACK_FRAGMENT + cut,
        "the stopped worker reported {cut} partial fragments, whose rest ran as new ones: \
         {status:?}"
    );
    check_echo_results(env, job_id, HANDBACK_OPS).await?;
    let rerun = assert_each_ran(runs, HANDBACK_OPS)?;
    assert_eq!(rerun, 0, "a graceful stop runs no operation twice");
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_fragment_finishes_the_operation_and_hands_back_the_rest() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("term-handback").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let leaving = env.start_worker(WorkerOpts::prefetch(2))?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let runs = runs_log(&env, "term");
    let job_id = env.submit(&handback_job(&env, "term", &runs)).await?;
    // Both of its fragments are a few operations in (of 30).
    wait_for_runs(&runs, 8).await?;
    let asked = Instant::now();
    env.kill(leaving, Signal::Term)?;
    let exit = env.wait_exit(leaving, Duration::from_secs(10)).await?;
    let took = asked.elapsed();
    assert!(exit.success(), "a worker exits 0 on SIGTERM: {exit}");
    // The operation in hand (~0.1 s) finishes, the reports go out, and that is all.
    assert!(
        took < Duration::from_secs(3),
        "a worker stops within a few seconds, took {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handed_back = env.status(&job_id).await?.context("job known")?;
    assert_eq!(handed_back.state, JobState::Running, "{handed_back:?}");
    assert_eq!(
        handed_back.fragments_done, 2,
        "both fragments in hand were reported: {handed_back:?}"
    );
    // Someone else takes over what it handed back.
    env.start_worker(WorkerOpts::prefetch(2))?;
    let status = check_handed_back(&env, &job_id, &runs, 2).await?;
    eprintln!(
        "figures: SIGTERM to a worker mid-way through 2 fragments: exit 0 after {took:.1?}, \
         {} of {HANDBACK_OPS} ops reported; {} fragments for {} nominal, 0 operations run \
         twice, {:.1?}",
        handed_back.ops_succeeded,
        status.fragments_done,
        HANDBACK_OPS / HANDBACK_FRAGMENT,
        began.elapsed()
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_retires_a_worker_like_sigterm() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("max-lifetime").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let runs = runs_log(&env, "lifetime");
    let job_id = env.submit(&handback_job(&env, "lifetime", &runs)).await?;
    // Alone, two fragments of ~3 s at a time: at 2 s it is half-way through both.
    let started = Instant::now();
    let mortal = env.start_worker(WorkerOpts {
        prefetch: 2,
        max_lifetime: Some("2s".into()),
        ..WorkerOpts::default()
    })?;
    let exit = env.wait_exit(mortal, Duration::from_secs(15)).await?;
    let lived = started.elapsed();
    assert!(exit.success(), "a retiring worker exits 0: {exit}");
    assert!(
        lived >= Duration::from_secs(2) && lived < Duration::from_secs(5),
        "the worker retires at its max lifetime (2 s), within a few seconds: {lived:?}"
    );
    // Its last reports land; then, with no worker, the job waits, neither lost nor done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let halfway = env.status(&job_id).await?.context("job known")?;
    assert_eq!(halfway.state, JobState::Running, "{halfway:?}");
    assert_eq!(
        halfway.fragments_done, 2,
        "both fragments in hand were reported: {halfway:?}"
    );
    assert!(
        halfway.ops_succeeded > 0 && halfway.ops_succeeded < 2 * HANDBACK_FRAGMENT,
        "the retired worker ran part of each fragment: {halfway:?}"
    );
    env.start_worker(WorkerOpts::prefetch(2))?;
    let status = check_handed_back(&env, &job_id, &runs, 2).await?;
    eprintln!(
        "figures: worker with max lifetime 2s exited 0 after {lived:.1?} having run {} of \
         {HANDBACK_OPS}; {} fragments for {} nominal, 0 operations run twice, {:.1?}",
        halfway.ops_succeeded,
        status.fragments_done,
        HANDBACK_OPS / HANDBACK_FRAGMENT,
        began.elapsed()
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_a_worker_at_once() -> Result<()> {
    let mut env = TestEnv::new("term-twice").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let worker = env.start_worker(WorkerOpts::prefetch(1))?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("term-twice"),
            "operation": "sleep",
            "params": {"ms": 2500},
            "range": {"start": 0, "end": 2},
            "fragment_size": 2,
        }))
        .await?;
    env.wait_until_holding(worker, Duration::from_secs(10))
        .await?;
    env.kill(worker, Signal::Term)?;
    // The first signal waits for the operation in hand (a 2.5 s sleep) ...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.is_running(worker),
        "after one SIGTERM the worker finishes its operation first"
    );
    // ... a second one does not wait.
    let asked = Instant::now();
    env.kill(worker, Signal::Term)?;
    let exit = env.wait_exit(worker, Duration::from_secs(5)).await?;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "a second signal exits at once, took {:?}",
        asked.elapsed()
    );
    assert_eq!(exit.code(), Some(130), "forced exit: {exit}");
    // The fragment it dropped goes to the next worker; nothing is lost.
    env.start_worker(WorkerOpts::prefetch(1))?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2, 0);
    assert_eq!(status.fragments_done, 1);
    env.finish().await
}

// ---------------------------------------------------------------------------------------------
// Poison fragments and many jobs at once

/// The fault suite's own worker, with an operation that aborts the process on one item.
fn poison_worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_poison_worker"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_that_aborts_its_workers_is_failed_and_the_job_carries_on() -> Result<()> {
    let mut env = TestEnv::new("abort-on").await?;
    env.note_operation("abort_on");
    env.start_splitter()?;
    env.start_reducer()?;
    // One fragment per worker at a time, so only the poison fragment dies with its worker.
    let opts = WorkerOpts {
        operations: Some(vec!["abort_on".into()]),
        ..WorkerOpts::prefetch(1)
    };
    let workers = [
        env.start_worker_program(poison_worker(), opts.clone())?,
        env.start_worker_program(poison_worker(), opts)?,
    ];
    env.wait_for_workers(2, Duration::from_secs(20)).await?;
    // Fragments of 3: item 7 (in fragment 6..9) aborts every worker that runs it.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("abort-on"),
            "operation": "abort_on",
            "params": {"item": 7},
            "range": {"start": 0, "end": 30},
            "fragment_size": 3,
            "max_concurrent_fragments": 4,
            "tolerated_failure_percent": 20,
        }))
        .await?;
    // Stand in for a process supervisor: bring back every worker that died.
    let (status, restarts) = env.wait_restarting(&job_id, &workers, JOB_TIMEOUT).await?;
    // The whole fragment 6..9 is failed, the other 27 operations succeeded.
    assert_counts(&status, JobState::Succeeded, 27, 3);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 30);
    for line in &results {
        match (line.index(), line) {
            (6..=8, ResultLine::Err { error, .. }) => assert!(
                error.contains("delivered 6 times and never finished"),
                "{error}"
            ),
            (i, ResultLine::Ok { result, .. }) => assert_eq!(result, &json!(i)),
            (_, other) => panic!("unexpected outcome {other:?}"),
        }
    }
    // The delivery limit (5 returns) bounds the damage: the fragment killed a worker on each
    // of its 6 deliveries, never more (its failures are final, not retried).
    assert_eq!(restarts, 6, "workers killed by the poison fragment");
    env.finish().await
}

/// A deterministic stream of numbers for the test's choices (sizes, victims), so a failing
/// run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

const CONCURRENT_JOBS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_jobs_with_random_worker_kills_are_all_exact() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("hundred").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let mut live: Vec<ProcId> = Vec::new();
    for _ in 0..3 {
        live.push(env.start_worker(WorkerOpts::prefetch(4))?);
    }
    env.wait_for_workers(3, Duration::from_secs(20)).await?;
    let mut rng = Lcg(0x5eed_f00d);
    // Mixed sizes (1 to 200 operations), fragment sizes (given or sized by batchq), windows;
    // even jobs hash items (results checked), odd ones sleep a little (to be in flight).
    let mut jobs = Vec::new();
    for i in 0..CONCURRENT_JOBS {
        let ops = 1 + rng.next(200);
        let mut spec = if i % 2 == 0 {
            json!({
                "job_id": env.job_id(&format!("hash-{i}")),
                "operation": "sha256",
                "params": {"rounds": 2},
                "items": (0..ops).map(|k| json!(format!("job{i}-item{k}"))).collect::<Vec<_>>(),
            })
        } else {
            json!({
                "job_id": env.job_id(&format!("sleep-{i}")),
                "operation": "sleep",
                "params": {"ms": 5},
                "range": {"start": 0, "end": ops},
            })
        };
        if rng.next(3) > 0 {
            spec["fragment_size"] = json!(1 + rng.next(20));
        }
        spec["max_concurrent_fragments"] = json!(1 + rng.next(8));
        let job_id = env.submit(&spec).await?;
        jobs.push((job_id, ops, spec));
    }
    // Kill a random worker every 400 ms while the jobs run, six times, starting a replacement.
    for kill in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let victim = live.remove(rng.next(live.len() as u64) as usize);
        env.kill(victim, Signal::Kill)?;
        live.push(env.start_worker(WorkerOpts::prefetch(4))?);
        eprintln!("kill {kill} at {:.1?}", began.elapsed());
    }
    let mut total_ops = 0;
    for (job_id, ops, spec) in &jobs {
        let status = env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
        assert_counts(&status, JobState::Succeeded, *ops, 0);
        let results = env.results(job_id).await?;
        assert_one_per_index(&results, *ops);
        if let Some(items) = spec["items"].as_array() {
            for (line, item) in results.iter().zip(items) {
                assert_eq!(
                    line,
                    &ResultLine::Ok {
                        index: line.index(),
                        result: Value::String(sha256_hex(&text_of(item), 2)),
                    },
                    "{job_id}"
                );
            }
        }
        total_ops += ops;
    }
    eprintln!(
        "figures: {CONCURRENT_JOBS} jobs, {total_ops} operations, 6 worker kills, all exact, {:.1?}",
        began.elapsed()
    );
    env.finish().await
}
