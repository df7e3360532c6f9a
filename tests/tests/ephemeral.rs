//! Ephemeral workers (`--max-fragments`): a job run entirely by short-lived workers that the
//! test starts again whenever one exits, as a KEDA `ScaledJob` starts a new Kubernetes Job.
//! Each worker exits 0 on its own having run at most its budget, the job ends exact, and no
//! fragment went back to the broker: every worker took only what it ran.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::{ProcId, Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const OPS: u64 = 200;
const FRAGMENT: u64 = 5;
const FRAGMENTS: u64 = OPS / FRAGMENT;
const MAX_FRAGMENTS: u64 = 5;
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// `fragments_run=N` of every line of `log` that says `what`: "worker stopped" (one per
/// incarnation that stopped cleanly), "max fragments run" (one per incarnation that retired
/// on its own).
fn fragments_run_on(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains(what))
        .filter_map(|line| {
            let at = line.find("fragments_run=")? + "fragments_run=".len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// Operations run, by index, from the operations' own log (one line per execution).
fn runs_by_index(runs: &Path) -> Result<BTreeMap<u64, u32>> {
    let text = std::fs::read_to_string(runs).with_context(|| format!("{}", runs.display()))?;
    let mut by_index = BTreeMap::new();
    for line in text.lines() {
        let index: u64 = line.trim().parse().with_context(|| format!("{line:?}"))?;
        *by_index.entry(index).or_insert(0) += 1;
    }
    Ok(by_index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_workers_run_a_job_exactly_without_handing_anything_back() -> Result<()> {
    let began = Instant::now();
    let mut env = TestEnv::new("ephemeral").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    let runs = env.dir().join("ephemeral.runs");
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("ephemeral"),
            "operation": "exec",
            "params": {
                "command": ["sh", "-c", format!("echo {{}} >> {}; sleep 0.02; echo {{}}", runs.display())],
                "timeout_ms": 30000,
            },
            "range": {"start": 0, "end": OPS},
            "fragment_size": FRAGMENT,
            "max_concurrent_fragments": 16,
        }))
        .await?;
    // Three slots, as a ScaledJob's parallelism: a prefetch below the budget, one above it
    // (the worker must still hold no more than it has left), and a worker consuming every
    // operation queue (four consumers sharing a budget of five).
    let slots = [
        WorkerOpts {
            prefetch: 2,
            operations: Some(vec!["exec".into()]),
            max_fragments: Some(MAX_FRAGMENTS),
            ..WorkerOpts::default()
        },
        WorkerOpts {
            prefetch: 8,
            operations: Some(vec!["exec".into()]),
            max_fragments: Some(MAX_FRAGMENTS),
            ..WorkerOpts::default()
        },
        WorkerOpts {
            prefetch: 2,
            max_fragments: Some(MAX_FRAGMENTS),
            ..WorkerOpts::default()
        },
    ];
    let mut workers: Vec<ProcId> = Vec::new();
    for opts in slots {
        workers.push(env.start_worker(opts)?);
    }

    // Stand in for KEDA: start a slot's worker again whenever it exits; every exit must be 0.
    let deadline = Instant::now() + JOB_TIMEOUT;
    let mut exits = 0usize;
    let status = loop {
        for &worker in &workers {
            if let Ok(exit) = env.wait_exit(worker, Duration::ZERO).await {
                ensure!(
                    exit.success(),
                    "an ephemeral worker exits 0: {exit}\n{}",
                    env.logs_tail()
                );
                exits += 1;
                env.restart(worker)?;
            }
        }
        if let Some(status) = env.status(&job_id).await?
            && status.state.is_terminal()
        {
            break status;
        }
        if Instant::now() >= deadline {
            bail!(
                "job not finished within {JOB_TIMEOUT:?} after {exits} worker exits\n{}",
                env.logs_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(
        status.fragments_done, FRAGMENTS,
        "every fragment ran whole in one go: none was handed back unrun: {status:?}"
    );

    // The workers still running stop; then every incarnation has said what it ran.
    for &worker in &workers {
        if env.is_running(worker) {
            env.kill(worker, Signal::Term)?;
            let exit = env.wait_exit(worker, Duration::from_secs(15)).await?;
            ensure!(exit.success(), "a stopped worker exits 0: {exit}");
        }
    }
    let mut per_worker = Vec::new();
    let mut self_retired = 0;
    for &worker in &workers {
        let log = env.log_text(worker);
        ensure!(
            !log.contains("handed back unrun"),
            "a worker took a fragment past its budget:\n{log}"
        );
        ensure!(
            !log.contains("came back from the broker"),
            "a fragment was returned to the broker and delivered again:\n{log}"
        );
        let retired = fragments_run_on(&log, "max fragments run; retiring gracefully");
        let stops = fragments_run_on(&log, "worker stopped");
        ensure!(
            retired.len() + 1 >= stops.len(),
            "every incarnation but the last retired on its own: {retired:?} of {stops:?}"
        );
        // A worker takes exactly its budget before it retires: when the queue runs dry
        // under it, it waits for the rest rather than leave with less.
        assert!(
            retired.iter().all(|&run| run == MAX_FRAGMENTS),
            "each worker that retired ran exactly {MAX_FRAGMENTS}: {retired:?}"
        );
        self_retired += retired.len();
        per_worker.extend(stops);
    }
    assert!(
        self_retired >= exits,
        "{exits} exits seen, {self_retired} retirements logged"
    );
    assert!(
        per_worker.iter().all(|&run| run <= MAX_FRAGMENTS),
        "no worker ran more than {MAX_FRAGMENTS} fragments: {per_worker:?}"
    );
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        FRAGMENTS,
        "the workers together settled each fragment once: {per_worker:?}"
    );
    assert!(
        exits as u64 >= FRAGMENTS / MAX_FRAGMENTS - workers.len() as u64,
        "workers retired and were replaced: {exits} exits"
    );

    // Each operation ran exactly once, and its result is the item.
    let by_index = runs_by_index(&runs)?;
    assert_eq!(by_index.len() as u64, OPS, "every operation ran");
    let twice: Vec<_> = by_index.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "operations run more than once: {twice:?}");
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, OPS);
    for (i, line) in (0..OPS).zip(&results) {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: Value::String(i.to_string()),
            }
        );
    }
    eprintln!(
        "figures: {OPS} operations in {FRAGMENTS} fragments by workers of --max-fragments \
         {MAX_FRAGMENTS}: {} incarnations ({exits} exits on their own), fragments each \
         {per_worker:?}, 0 handed back, 0 redelivered, {:.1?}",
        per_worker.len(),
        began.elapsed()
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fragments_zero_is_refused_at_start() -> Result<()> {
    let mut env = TestEnv::new("ephemeral-zero").await?;
    let worker = env.start_worker(WorkerOpts {
        max_fragments: Some(0),
        ..WorkerOpts::default()
    })?;
    let exit = env.wait_exit(worker, Duration::from_secs(15)).await?;
    assert!(!exit.success(), "max fragments 0 is refused: {exit}");
    let log = env.log_text(worker);
    assert!(
        log.contains("would exit without running anything"),
        "the refusal says why: {log}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_queue_runs_dry_waits_for_the_rest_of_its_budget() -> Result<()> {
    let mut env = TestEnv::new("ephemeral-dry").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // Prefetch 4 against a budget of 3: the broker gets room for 3 and no acknowledgement
    // may give it more, so both of the first job's acknowledgements wait.
    let worker = env.start_worker(WorkerOpts {
        prefetch: 4,
        operations: Some(vec!["noop".into()]),
        max_fragments: Some(3),
        ..WorkerOpts::default()
    })?;
    let job = |name: &str, ops: u64| {
        json!({
            "job_id": env.job_id(name),
            "operation": "noop",
            "range": {"start": 0, "end": ops},
            "fragment_size": 10,
        })
    };
    let (first_spec, second_spec) = (job("dry-first", 20), job("dry-second", 10));
    let first = env.submit(&first_spec).await?;
    let status = env.wait_for_terminal(&first, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 20, 0);
    assert_eq!(status.fragments_done, 2, "{status:?}");
    // Two of three run: it waits for the third rather than leave with less.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.is_running(worker),
        "a worker with fragments left waits for them\n{}",
        env.log_text(worker)
    );

    let second = env.submit(&second_spec).await?;
    let exit = env.wait_exit(worker, Duration::from_secs(30)).await?;
    assert!(exit.success(), "the worker retires with exit 0: {exit}");
    let status = env.wait_for_terminal(&second, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 10, 0);
    let log = env.log_text(worker);
    assert_eq!(
        fragments_run_on(&log, "max fragments run; retiring gracefully"),
        [3],
        "it retired on its own after its third fragment:\n{log}"
    );
    // The acknowledgements it held went before it left: the work queue holds nothing, ready
    // or unacknowledged, to be delivered again.
    let queue = env.broker().names().work_queue("noop");
    assert_eq!(env.queue_depth(&queue).await?, 0, "{queue} is empty");
    ensure!(
        !log.contains("came back from the broker") && !log.contains("handed back unrun"),
        "nothing went back:\n{log}"
    );
    env.finish().await
}
