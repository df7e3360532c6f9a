//! `exec` is allowed, not open: a worker runs only the programs of its `BATCHQ_EXEC_ALLOW`,
//! refuses any other `argv[0]` without starting it, gives the programs a clean environment,
//! and without the setting does not offer `exec` at all.

use std::time::Duration;

use anyhow::{Result, ensure};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts};
use common::contract::{JobState, ResultLine};
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A worker whose `exec` may run `echo` and `env`, and nothing else.
fn echo_and_env() -> WorkerOpts {
    WorkerOpts {
        exec_allow: Some("echo,env".into()),
        ..WorkerOpts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_allowed_programs_and_refuses_the_others_unstarted() -> Result<()> {
    let mut env = TestEnv::new("exec-allow").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(echo_and_env())?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;

    let allowed = env
        .submit(&json!({
            "job_id": env.job_id("echo"),
            "operation": "exec",
            "params": {"command": ["echo", "item-{}"]},
            "range": {"start": 0, "end": 4},
        }))
        .await?;
    // Refused twice over: `touch` is not allowed, and neither is `sh`, through which the
    // same file could be touched.
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers)?;
    let marker = |name: &str| markers.join(name).display().to_string();
    let refused = env
        .submit(&json!({
            "job_id": env.job_id("touch"),
            "operation": "exec",
            "params": {"command": ["{}", marker("ran")]},
            "items": ["touch", "/usr/bin/touch", "sh", "./echo"],
            "fragment_size": 4,
            "max_attempts": 1,
        }))
        .await?;

    let status = env.wait_for_terminal(&allowed, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 4, 0);
    let results = env.results(&allowed).await?;
    let expected: Vec<ResultLine> = (0..4)
        .map(|i| ResultLine::Ok {
            index: i,
            result: json!(format!("item-{i}")),
        })
        .collect();
    assert_eq!(results, expected);

    let status = env.wait_for_terminal(&refused, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Failed, 0, 4);
    let results = env.results(&refused).await?;
    let expected: Vec<ResultLine> = ["touch", "/usr/bin/touch", "sh", "./echo"]
        .iter()
        .zip(0..)
        .map(|(program, index)| ResultLine::Err {
            index,
            error: format!(
                "program {program:?} is not allowed on this worker (BATCHQ_EXEC_ALLOW: echo,env)"
            ),
        })
        .collect();
    assert_eq!(results, expected);
    let left: Vec<_> = std::fs::read_dir(&markers)?.collect();
    ensure!(
        left.is_empty(),
        "a refused program ran: {} file(s) in {}",
        left.len(),
        markers.display()
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_programs_see_only_the_passed_variables() -> Result<()> {
    let mut env = TestEnv::new("exec-env").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // The worker itself has AMQP_URL, BATCHQ_NAMESPACE, RUST_LOG and the rest of the test's
    // environment; the program must see none of that.
    env.start_worker(echo_and_env())?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("env"),
            "operation": "exec",
            "params": {"command": ["env"]},
            "items": [0],
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 1, 0);
    let results = env.results(&job_id).await?;
    let [ResultLine::Ok { result, .. }] = results.as_slice() else {
        anyhow::bail!("one result expected: {results:?}");
    };
    let printed = result.as_str().unwrap_or_default();
    let mut names: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    names.sort_unstable();
    // The test process (and so the worker) has PATH and HOME; LANG, LC_ALL, TZ and TMPDIR
    // pass when set.
    let allowed = ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR", "TZ"];
    ensure!(
        names.iter().all(|name| allowed.contains(name)),
        "the program saw more than the passed variables: {names:?}"
    );
    for needed in ["PATH", "HOME"] {
        ensure!(
            names.contains(&needed),
            "{needed} was not passed: {names:?}"
        );
    }
    ensure!(
        !printed.contains("AMQP_URL") && !printed.contains("guest"),
        "the broker URL reached the program: {printed}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_an_allow_list_does_not_offer_exec() -> Result<()> {
    let mut env = TestEnv::new("exec-off").await?;
    env.start_reducer()?;
    let worker = env.start_worker(WorkerOpts {
        exec_allow: None,
        ..WorkerOpts::default()
    })?;
    let workers = env.wait_for_workers(1, Duration::from_secs(20)).await?;
    assert_eq!(workers[0].operations, ["noop", "sha256", "sleep"]);
    // `batchctl workers` says the same.
    let (status, out, err) = env.batchctl(&["workers", "--json"]).await?;
    ensure!(status.success(), "batchctl workers: {err}");
    ensure!(
        out.contains("sha256") && !out.contains("exec"),
        "batchctl workers lists exec: {out}"
    );
    ensure!(
        env.is_running(worker),
        "the worker runs without exec: {}",
        env.logs_tail()
    );
    let logs = env.logs_tail();
    ensure!(
        logs.contains("exec is not offered: BATCHQ_EXEC_ALLOW (--exec-allow) is not set"),
        "the worker says at start that it does not offer exec: {logs}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_ask_for_what_exec_will_not_do_stop_the_worker_at_start() -> Result<()> {
    let mut env = TestEnv::new("exec-bad").await?;
    let cases = [
        (
            Some(vec!["exec".to_owned(), "noop".to_owned()]),
            None,
            "BATCHQ_OPERATIONS names exec, which a worker offers only with BATCHQ_EXEC_ALLOW",
        ),
        (
            None,
            Some("echo,./echo"),
            "BATCHQ_EXEC_ALLOW entry \"./echo\" is a relative path",
        ),
        (
            None,
            Some("no-such-program-batchq"),
            "BATCHQ_EXEC_ALLOW entry \"no-such-program-batchq\": no such program on PATH",
        ),
    ];
    for (n, (operations, allow, line)) in (1..).zip(cases) {
        let worker = env.start_worker(WorkerOpts {
            operations,
            exec_allow: allow.map(str::to_owned),
            ..WorkerOpts::default()
        })?;
        let exit = env.wait_exit(worker, Duration::from_secs(15)).await?;
        ensure!(!exit.success(), "{line}: the worker started anyway");
        // The whole log: a backtrace may follow the line.
        let log = std::fs::read_to_string(env.dir().join(format!("worker-{n}.1.log")))?;
        ensure!(log.contains(line), "no {line:?} in the log: {log}");
    }
    env.finish().await
}
