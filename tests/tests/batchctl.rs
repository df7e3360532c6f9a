//! `batchctl` as a user runs it: the real binary against the real broker, in the test's
//! namespace. Exit codes are 0 done (for `--wait`, the job succeeded), 1 the job ended
//! otherwise, 2 an error, which is one line on stderr.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use batchq_tests::{
    Bin, TestEnv, WorkerOpts, amqp_url, assert_counts, assert_one_per_index, bin_path, sha256_hex,
};
use common::contract::{JobState, JobStatus, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A broker address nothing listens on: connecting is refused at once.
const UNREACHABLE_URL: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// Writes `spec` as a JobSpec file in the test's folder.
fn write_spec(env: &TestEnv, name: &str, spec: &Value) -> Result<PathBuf> {
    let path = env.dir().join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(spec)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Asserts that batchctl failed with exit code 2 and exactly `reason` as its one stderr line.
fn assert_error(outcome: &(ExitStatus, String, String), reason: &str) {
    let (status, stdout, stderr) = outcome;
    assert_eq!(
        status.code(),
        Some(2),
        "exit code of an error; stderr {stderr:?}"
    );
    assert_eq!(stdout, "", "nothing on stdout on error");
    assert_eq!(stderr, &format!("batchctl: {reason}\n"), "one-line reason");
}

/// Items 0..n through `exec`; those in `failing` exit 3 with "boom {i}" as stderr's last line,
/// the others print "ok {i}".
fn exec_spec(job_id: &str, n: i64, failing: &[i64], tolerated: f64) -> Value {
    let test = failing
        .iter()
        .map(|i| format!("[ {{}} -eq {i} ]"))
        .collect::<Vec<_>>()
        .join(" || ");
    let script = if failing.is_empty() {
        "echo ok {}".to_owned()
    } else {
        format!("if {test}; then echo noise >&2; echo boom {{}} >&2; exit 3; fi; echo ok {{}}")
    };
    json!({
        "job_id": job_id,
        "operation": "exec",
        "params": {"command": ["sh", "-c", script], "timeout_ms": 10000},
        "range": {"start": 0, "end": n},
        // One fragment: every operation runs before the job can end, so the counts are exact.
        "fragment_size": n.max(1),
        "max_attempts": 1,
        "tolerated_failure_percent": tolerated,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_exits_0_for_a_succeeded_job_and_1_for_a_failed_one() -> Result<()> {
    let mut env = TestEnv::new("ctl-submit").await?;
    env.start_spine(1)?;

    let good_id = env.job_id("good");
    let good = write_spec(
        &env,
        "good",
        &json!({
            "job_id": good_id,
            "operation": "sha256",
            "params": {"rounds": 2},
            "range": {"start": 10, "end": 40},
            "fragment_size": 7,
        }),
    )?;
    let (status, stdout, stderr) = env
        .batchctl(&["submit", "--wait", good.to_str().context("path")?])
        .await?;
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout, format!("{good_id}\n"), "stdout is the job id alone");
    assert_eq!(
        stderr.lines().last(),
        Some(format!("job {good_id} succeeded: 30 succeeded, 0 failed of 30 operations").as_str()),
        "the last progress line sums the job up: {stderr}"
    );
    let final_status = env
        .status(&good_id)
        .await?
        .context("the reducer knows the job")?;
    assert_counts(&final_status, JobState::Succeeded, 30, 0);
    assert_eq!(
        final_status.fragments_done, 5,
        "30 operations in fragments of 7"
    );

    // 1 of 4 failed, more than the 0% tolerated.
    let bad_id = env.job_id("bad");
    let bad = write_spec(&env, "bad", &exec_spec(&bad_id, 4, &[2], 0.0))?;
    let (status, stdout, stderr) = env
        .batchctl(&["submit", "--wait", bad.to_str().context("path")?])
        .await?;
    assert_eq!(
        status.code(),
        Some(1),
        "a job that did not succeed: {stderr}"
    );
    assert_eq!(stdout, format!("{bad_id}\n"));
    let summary = stderr.lines().last().context("a summary line")?;
    assert!(
        summary.starts_with(&format!(
            "job {bad_id} failed: 3 succeeded, 1 failed of 4 operations ("
        )),
        "the summary names the state, the counts and the reason: {summary:?}"
    );
    let final_status = env
        .status(&bad_id)
        .await?
        .context("the reducer knows the job")?;
    assert_counts(&final_status, JobState::Failed, 3, 1);
    assert!(final_status.error.is_some(), "{final_status:?}");

    // `watch` of an ended job reports it at once, with the same exit code.
    let (status, stdout, stderr) = env.batchctl(&["watch", &bad_id]).await?;
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().last(), Some(summary));

    // A JobSpec the splitter would reject is refused before anything is published.
    let invalid_id = env.job_id("invalid");
    let invalid = write_spec(
        &env,
        "invalid",
        &json!({"job_id": invalid_id, "operation": "noop", "items": [1], "range": {"start": 0, "end": 1}}),
    )?;
    let (status, stdout, stderr) = env
        .batchctl(&["submit", invalid.to_str().context("path")?])
        .await?;
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("batchctl: invalid JobSpec: ") && stderr.lines().count() == 1,
        "one line saying why: {stderr:?}"
    );
    // Published, it would be rejected within milliseconds and kept on `{ns}.dead`.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.status(&invalid_id).await?, None, "nothing published");
    assert_eq!(env.drain_dead().await?.len(), 0, "nothing dead-lettered");
    env.finish().await
}

/// `submit --wait` of a job no splitter takes yet says so, rather than a bar of "0/0 ops" that
/// reads as a job done; once a splitter starts, the job runs and the watch ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_without_a_splitter_says_the_job_waits_to_be_accepted() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut env = TestEnv::new("ctl-unaccepted").await?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts::default())?;
    let job_id = env.job_id("waits");
    let spec = write_spec(
        &env,
        "waits",
        &json!({"job_id": job_id, "operation": "noop", "range": {"start": 0, "end": 5}}),
    )?;
    let mut child = tokio::process::Command::new(bin_path(Bin::Batchctl))
        .args(["submit", "--wait", spec.to_str().context("path")?])
        .envs([
            ("AMQP_URL", amqp_url()),
            ("BATCHQ_NAMESPACE", env.names.namespace().to_owned()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .context("no line within 15 s")??
        .context("batchctl ended without a line")?;
    let queue = env.names.jobs();
    assert!(
        first.ends_with(&format!(
            "waiting to be accepted: no splitter consumes {queue} (1 job(s) wait there); start one"
        )),
        "the first line says what the job waits for: {first:?}"
    );
    env.start_splitter()?;
    let status = tokio::time::timeout(JOB_TIMEOUT, child.wait())
        .await
        .context("the watch did not end")??;
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await? {
        rest.push(line);
    }
    assert_eq!(status.code(), Some(0), "stderr: {rest:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some(format!("job {job_id} succeeded: 5 succeeded, 0 failed of 5 operations").as_str()),
        "{rest:?}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_an_unknown_job_is_a_one_line_error() -> Result<()> {
    let mut env = TestEnv::new("ctl-unknown").await?;
    env.start_reducer()?;
    let job_id = env.job_id("never-submitted");
    // The reducer may still be starting: the first query waits for its answer.
    let outcome = env
        .batchctl(&["--timeout", "20", "status", &job_id])
        .await?;
    assert_error(&outcome, &format!("unknown job {job_id}"));
    let outcome = env.batchctl(&["status", "--json", &job_id]).await?;
    assert_error(&outcome, &format!("unknown job {job_id}"));
    let outcome = env.batchctl(&["results", &job_id]).await?;
    assert_error(&outcome, &format!("unknown job {job_id}"));
    let outcome = env.batchctl(&["watch", &job_id]).await?;
    assert_error(&outcome, &format!("unknown job {job_id}"));
    let outcome = env.batchctl(&["cancel", &job_id]).await?;
    assert_error(&outcome, &format!("unknown job {job_id}"));
    env.finish().await
}

/// Runs batchctl with exactly `envs` as its batchq settings, within `limit`.
async fn batchctl_with_env(
    envs: &[(&str, &str)],
    args: &[&str],
    limit: Duration,
) -> Result<(ExitStatus, String, String, Duration)> {
    let mut command = tokio::process::Command::new(bin_path(Bin::Batchctl));
    command
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("BATCHQ_NAMESPACE")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("batchctl {args:?} did not finish within {limit:?}"))??;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_prompt_one_line_error() -> Result<()> {
    // Nothing is declared anywhere: the broker is never reached.
    let ns = format!(
        "t-ctl-unreachable-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let spec = tempfile::NamedTempFile::new()?;
    std::fs::write(spec.path(), br#"{"operation": "noop", "items": [1]}"#)?;
    let spec_path = spec.path().to_str().context("temp path")?;
    let good_url = amqp_url();
    // (AMQP_URL in the environment, arguments)
    let cases: [(&str, &[&str]); 3] = [
        (UNREACHABLE_URL, &["jobs"]),
        // The flag wins over a good environment.
        (
            &good_url,
            &["--amqp-url", UNREACHABLE_URL, "jobs", "--json"],
        ),
        // Publishing needs the broker too.
        (UNREACHABLE_URL, &["submit", spec_path]),
    ];
    for (env_url, args) in cases {
        let envs = [("AMQP_URL", env_url), ("BATCHQ_NAMESPACE", ns.as_str())];
        let (status, stdout, stderr, took) =
            batchctl_with_env(&envs, args, Duration::from_secs(20)).await?;
        assert_eq!(status.code(), Some(2), "{args:?}: stderr {stderr:?}");
        assert_eq!(stdout, "", "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr:?}");
        assert!(
            stderr.starts_with(
                "batchctl: cannot reach the broker (amqp://guest:***@127.0.0.1:1/%2f)"
            ),
            "{args:?}: names the broker, password redacted: {stderr:?}"
        );
        assert!(
            !stderr.contains("guest:guest"),
            "password redacted: {stderr:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{args:?}: a refused connection is reported at once, took {took:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_contract_json_lines_one_per_index() -> Result<()> {
    let mut env = TestEnv::new("ctl-results").await?;
    env.start_spine(2)?;

    // exec: 1 and 4 fail, tolerated; the others print "ok {i}".
    let mixed = env
        .submit(&exec_spec(&env.job_id("mixed"), 6, &[1, 4], 50.0))
        .await?;
    let status = env.wait_for_terminal(&mixed, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 4, 2);
    let (code, stdout, stderr) = env.batchctl(&["results", &mixed]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("every line is JSON: {stdout}"))?;
    assert_eq!(lines.len(), 6, "one line per operation: {stdout}");
    for (i, line) in (0_u64..).zip(&lines) {
        let expected = if i == 1 || i == 4 {
            json!({"index": i, "error": format!("exited with status 3: boom {i}")})
        } else {
            json!({"index": i, "result": format!("ok {i}")})
        };
        assert_eq!(line, &expected, "line {i}");
    }

    // More lines than one page of the reducer's answers (5000): null results, in order.
    let n = 12_001;
    let big = env
        .submit(&json!({
            "job_id": env.job_id("big"),
            "operation": "noop",
            "range": {"start": 0, "end": n},
            "fragment_size": 1000,
        }))
        .await?;
    let status = env.wait_for_terminal(&big, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, n, 0);
    let (code, stdout, stderr) = env.batchctl(&["results", &big]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr}");
    let lines: Vec<ResultLine> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_one_per_index(&lines, n);
    assert!(
        lines.iter().all(|l| matches!(
            l,
            ResultLine::Ok {
                result: Value::Null,
                ..
            }
        )),
        "noop results are null"
    );
    assert_eq!(
        stdout.lines().nth(7_777),
        Some(r#"{"index":7777,"result":null}"#)
    );
    env.finish().await
}

/// The fields of a JobStatus, as CONTRACT.md lists them.
const JOB_STATUS_FIELDS: [&str; 13] = [
    "job_id",
    "state",
    "operation",
    "ops_total",
    "ops_succeeded",
    "ops_failed",
    "fragments_done",
    "fragments_in_flight",
    "submitted_at",
    "started_at",
    "finished_at",
    "error",
    "redrives",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_the_contract_job_status_and_cancel_refuses_a_finished_job() -> Result<()> {
    let mut env = TestEnv::new("ctl-status").await?;
    env.start_spine(1)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("done"),
            "operation": "sha256",
            "items": ["a", "b", "c"],
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3, 0);

    let (code, stdout, stderr) = env.batchctl(&["status", "--json", &job_id]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr}");
    let value: Value = serde_json::from_str(&stdout).context("status --json is JSON")?;
    let fields: BTreeSet<&str> = value
        .as_object()
        .context("a JobStatus is an object")?
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(JOB_STATUS_FIELDS),
        "exactly the contract's fields"
    );
    assert_eq!(value["state"], "succeeded");
    assert_eq!(value["operation"], "sha256");
    assert_eq!(value["error"], Value::Null);
    assert_eq!(value["redrives"], 0, "never redriven");
    for stamp in ["submitted_at", "started_at", "finished_at"] {
        let text = value[stamp].as_str().context("a timestamp is a string")?;
        assert!(
            text.ends_with('Z') && text.len() == "2026-11-26T17:00:00.123Z".len(),
            "{stamp} is an RFC 3339 UTC time with milliseconds: {text:?}"
        );
    }
    let parsed: JobStatus = serde_json::from_value(value)?;
    assert_eq!(parsed, status, "the same status the reducer gives");

    // The text form shows the same figures.
    let (code, stdout, _) = env.batchctl(&["status", &job_id]).await?;
    assert_eq!(code.code(), Some(0));
    assert!(
        stdout.contains(&format!("job        {job_id}\n")),
        "{stdout}"
    );
    assert!(stdout.contains("state      succeeded\n"), "{stdout}");
    assert!(
        stdout.contains("progress   3/3 (100.0%), 0 failed\n"),
        "{stdout}"
    );

    // `jobs --json` lists it with the same status.
    let (code, stdout, stderr) = env.batchctl(&["jobs", "--json"]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr}");
    let jobs: Vec<JobStatus> = serde_json::from_str(&stdout)?;
    assert_eq!(jobs, vec![status.clone()]);

    // A finished job cannot be cancelled, and stays as it was.
    let outcome = env.batchctl(&["cancel", &job_id]).await?;
    assert_error(
        &outcome,
        &format!("job {job_id} has already ended (succeeded)"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.status(&job_id).await?, Some(status));
    env.finish().await
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueRow {
    queue: String,
    ready: u64,
    unacknowledged: Option<u64>,
    consumers: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_json_lists_the_namespace_queues() -> Result<()> {
    let mut env = TestEnv::new("ctl-queues").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // A worker offering only sha256.
    env.start_worker(WorkerOpts {
        operations: Some(vec!["sha256".into()]),
        ..WorkerOpts::default()
    })?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    // No worker offers `upper`: its first fragments wait on its work queue, as many as the
    // job's window lets out.
    env.note_operation("upper");
    let waiting = env
        .submit(&json!({
            "job_id": env.job_id("waiting"),
            "operation": "upper",
            "items": ["a", "b", "c", "d", "e"],
            "fragment_size": 1,
            "max_concurrent_fragments": 2,
        }))
        .await?;
    let upper = env.names.work_queue("upper");
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.queue_depth(&upper).await.unwrap_or(0) < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the window of {waiting} never reached {upper}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job_id = env
        .submit(&json!({"job_id": env.job_id("q"), "operation": "sha256", "items": ["x"]}))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 1, 0);
    assert_eq!(
        env.results(&job_id).await?,
        vec![ResultLine::Ok {
            index: 0,
            result: json!(sha256_hex("x", 1))
        }]
    );

    let (code, stdout, stderr) = env.batchctl(&["queues", "--json"]).await?;
    assert_eq!(code.code(), Some(0), "stderr: {stderr}");
    let rows: Vec<QueueRow> = serde_json::from_str(&stdout).context("queues --json")?;
    let ns = &env.names;
    let mut expected = ns.fixed_queues();
    expected.push(ns.work_queue("sha256"));
    expected.push(upper.clone());
    let names: Vec<&str> = rows.iter().map(|r| r.queue.as_str()).collect();
    assert_eq!(
        names.iter().copied().collect::<BTreeSet<_>>(),
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "the namespace's queues, custom operations of recent jobs included, and no other: \
         {stdout}"
    );
    assert_eq!(names.len(), expected.len(), "each queue once: {stdout}");
    let row = |queue: &str| {
        rows.iter()
            .find(|r| r.queue == queue)
            .with_context(|| format!("{queue} listed: {stdout}"))
    };
    // (ready, unacknowledged, consumers); unacknowledged is known for work queues only.
    let figures = |r: &QueueRow| (r.ready, r.unacknowledged, r.consumers);
    assert_eq!(
        figures(row(&upper)?),
        (2, Some(0), 0),
        "the window waits, nobody takes it"
    );
    assert_eq!(
        figures(row(&ns.work_queue("sha256"))?),
        (0, Some(0), 1),
        "drained, the one worker consumes it"
    );
    assert_eq!(
        figures(row(&ns.jobs())?),
        (0, None, 1),
        "the splitter takes jobs"
    );
    assert_eq!(figures(row(&ns.dead())?), (0, None, 0), "nothing rejected");
    for r in &rows {
        if r.queue != upper {
            assert_eq!(r.ready, 0, "nothing else waits: {r:?}");
        }
    }
    env.finish().await
}
