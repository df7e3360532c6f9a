//! The client examples a user copies, run against a real stack in the test's own namespace:
//! `examples/python/submit_and_watch.py` (pika, then the console's HTTP API for the results)
//! and `examples/node/submit_and_watch.js` (amqplib). Each submits a JobSpec, watches its
//! statuses to the end, and prints what the test checks: the results, byte for byte those of
//! `batchctl results`, and the final JobStatus.
//!
//! Without python3 and pika, or node and the example's `npm ci`, the test of that client
//! skips, saying why, unless `BATCHQ_TEST_REQUIRE_CLIENTS` is set (`.ci/run` sets it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{TestEnv, WorkerOpts, sha256_hex};
use serde_json::{Value, json};

/// How long an example may take to submit, watch and fetch a small job.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("examples"))
        .unwrap_or_else(|| PathBuf::from("examples"))
}

/// `Ok(true)` when the test skips for want of `what` (saying so), an error when
/// `BATCHQ_TEST_REQUIRE_CLIENTS` asks for every client.
fn skip(test: &str, what: &str, install: &str) -> Result<bool> {
    let required = std::env::var("BATCHQ_TEST_REQUIRE_CLIENTS")
        .is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0");
    ensure!(
        !required,
        "{what} not found, and BATCHQ_TEST_REQUIRE_CLIENTS is set ({install})"
    );
    eprintln!(
        "SKIPPED: test {test}: {what} not found ({install}). BATCHQ_TEST_REQUIRE_CLIENTS=1 \
         fails instead."
    );
    Ok(true)
}

/// Whether `program args…` runs and exits 0.
async fn runs(program: &str, args: &[&str]) -> bool {
    let status = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(
        tokio::time::timeout(Duration::from_secs(20), status).await,
        Ok(Ok(s)) if s.success()
    )
}

/// The first Python 3 that imports pika: `BATCHQ_PYTHON`, `python3` on the `PATH`, then
/// Debian's own (where `apt-get install python3-pika` puts it, whatever the `PATH` prefers).
async fn python_with_pika() -> Option<String> {
    let candidates = std::env::var("BATCHQ_PYTHON")
        .ok()
        .into_iter()
        .chain(["python3".to_owned(), "/usr/bin/python3".to_owned()]);
    for python in candidates {
        if runs(&python, &["-c", "import pika"]).await {
            return Some(python);
        }
    }
    None
}

/// A splitter, a reducer and two workers in a fresh namespace.
async fn stack(test: &str) -> Result<TestEnv> {
    let mut env = TestEnv::new(test).await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts::default())?;
    env.start_worker(WorkerOpts::default())?;
    Ok(env)
}

/// Writes `spec` into the test's folder and runs `program args… SPEC` there with the
/// namespace's settings and `extra`: (exit code, stdout, stderr).
async fn run_client(
    env: &TestEnv,
    spec: &Value,
    program: &str,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Result<(Option<i32>, String, String)> {
    let spec_path = env.dir().join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(spec)?)?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .arg(&spec_path)
        .env("AMQP_URL", env.broker_url())
        .env("BATCHQ_NAMESPACE", env.broker().names().namespace())
        .env("WATCH_TIMEOUT_S", CLIENT_TIMEOUT.as_secs().to_string())
        .env_remove("BATCHQ_UI_TOKEN")
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CLIENT_TIMEOUT + Duration::from_secs(10), command.output())
        .await
        .with_context(|| format!("{program} {args:?} did not finish within {CLIENT_TIMEOUT:?}"))?
        .with_context(|| format!("running {program}"))?;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_python_example_submits_watches_and_fetches_results() -> Result<()> {
    const TEST: &str = "the_python_example_submits_watches_and_fetches_results";
    let Some(python) = python_with_pika().await else {
        skip(TEST, "python3 with pika", "apt-get install python3-pika")?;
        return Ok(());
    };
    let mut env = stack("clients-python").await?;
    // The console serves the results over its API, behind a token as a deployment would.
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let console = env
        .start_console(&[("BATCHQ_UI_TOKEN", token.as_str())])
        .await?;
    let job_id = env.job_id("python");
    let spec = json!({
        "job_id": job_id, "operation": "sha256", "params": {"rounds": 2},
        "range": {"start": 0, "end": 40}, "fragment_size": 6,
    });
    let script = examples().join("python/submit_and_watch.py");
    let script = script.to_string_lossy();
    let (code, stdout, stderr) = run_client(
        &env,
        &spec,
        &python,
        &[&script],
        &[
            ("BATCHQ_UI_URL", &console.base),
            ("BATCHQ_UI_TOKEN", &token),
        ],
    )
    .await?;
    assert_eq!(code, Some(0), "the Python example failed: {stderr}");
    ensure!(
        stderr.contains(&format!(
            "{job_id}: succeeded, 40 succeeded and 0 failed of 40"
        )),
        "no final line in its progress: {stderr}"
    );
    let (exit, printed, batchctl_err) = env.batchctl(&["results", &job_id]).await?;
    ensure!(exit.success(), "batchctl results: {batchctl_err}");
    assert_eq!(stdout.lines().count(), 40, "{stdout}");
    assert_eq!(stdout, printed, "its results differ from batchctl results");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    assert_eq!(last, json!({"index": 39, "result": sha256_hex("39", 2)}));
    env.finish().await
}

#[tokio::test]
async fn the_node_example_submits_and_watches() -> Result<()> {
    const TEST: &str = "the_node_example_submits_and_watches";
    let node_dir = examples().join("node");
    if !runs("node", &["--version"]).await {
        skip(TEST, "node", "apt-get install nodejs")?;
        return Ok(());
    }
    if !node_dir.join("node_modules/amqplib").is_dir() {
        skip(
            TEST,
            "amqplib in examples/node/node_modules",
            "npm ci in examples/node",
        )?;
        return Ok(());
    }
    let env = stack("clients-node").await?;
    let job_id = env.job_id("node");
    let items: Vec<Value> = (0..25).map(|i| json!(format!("item-{i}"))).collect();
    let spec = json!({
        "job_id": job_id, "operation": "sha256", "items": items, "fragment_size": 4,
    });
    let script = node_dir.join("submit_and_watch.js");
    let script = script.to_string_lossy();
    let (code, stdout, stderr) = run_client(&env, &spec, "node", &[&script], &[]).await?;
    assert_eq!(code, Some(0), "the Node example failed: {stderr}");
    let status: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("its output is no JobStatus: {stdout:?}"))?;
    assert_eq!(
        (
            &status["job_id"],
            &status["state"],
            &status["ops_succeeded"],
            &status["ops_failed"],
            &status["ops_total"]
        ),
        (
            &json!(job_id),
            &json!("succeeded"),
            &json!(25),
            &json!(0),
            &json!(25)
        ),
        "{status}"
    );
    ensure!(
        stderr.contains(&format!("submitted {job_id}"))
            && stderr.contains("succeeded: 25/25 done, 0 failed"),
        "no progress lines: {stderr}"
    );
    // What it submitted is the job batchq ran: its results are those of its items.
    let results = env.results(&job_id).await?;
    assert_eq!(results.len(), 25);
    let (exit, printed, _) = env.batchctl(&["results", &job_id]).await?;
    ensure!(exit.success());
    let first: Value = serde_json::from_str(printed.lines().next().unwrap_or_default())?;
    assert_eq!(
        first,
        json!({"index": 0, "result": sha256_hex("item-0", 1)})
    );
    env.finish().await
}
