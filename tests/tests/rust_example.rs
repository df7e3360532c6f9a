//! `examples/rust-worker`, a project outside the workspace that depends on `batchq-worker`
//! and `batchq-client` as a user's does: built here with its own manifest, its worker
//! (`sum`, a typed function reading its context and using `?`) and its submitter run end to
//! end against the workspace's splitter and reducer.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts};
use common::contract::{JobState, ResultLine};
use serde_json::json;

/// The first build compiles every dependency of the example (a few minutes on a busy
/// machine); later ones only check it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the example as a user would (`cargo build --manifest-path …`), into a target folder
/// of its own that later runs reuse; returns the folder holding its programs.
async fn build_example() -> Result<PathBuf> {
    let root = repo_root();
    let target = root.join("target").join("rust-example");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = tokio::process::Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--manifest-path",
            "examples/rust-worker/Cargo.toml",
        ])
        .arg("--target-dir")
        .arg(&target)
        // The programs' debug information is of no use here, and the largest part of a build.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BUILD_TIMEOUT, build)
        .await
        .context("building examples/rust-worker timed out")?
        .context("running cargo")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "cargo build --manifest-path examples/rust-worker/Cargo.toml failed: {stderr}"
    );
    Ok(target.join("debug"))
}

/// What the example's `sum` gives for `line` at `index`, computed here: the sum times 10
/// (the submitter's `scale`), on attempt 2 for every fifth index (its first attempt fails
/// as if a service were away).
fn expected(index: u64, line: &str) -> ResultLine {
    let numbers: Result<Vec<i64>, _> = line.split_whitespace().map(str::parse).collect();
    match numbers {
        Ok(numbers) => ResultLine::Ok {
            index,
            result: json!({
                "sum": numbers.iter().sum::<i64>() * 10,
                "attempt": if index % 5 == 4 { 2 } else { 1 },
            }),
        },
        Err(e) => {
            let word = line
                .split_whitespace()
                .find(|w| w.parse::<i64>().is_err())
                .unwrap_or_default();
            ResultLine::Err {
                index,
                // Attempt 1: a permanent failure is not tried again, though the job allows 3.
                error: format!("{word:?} is not a number (attempt 1): {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_project_builds_outside_the_workspace_and_runs_a_job() -> Result<()> {
    let programs = build_example().await?;
    let mut env = TestEnv::new("rust-example").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker_program(
        programs.join("sum-worker"),
        WorkerOpts {
            operations: Some(vec!["sum".into()]),
            ..WorkerOpts::default()
        },
    )?;

    let lines = [
        "1 2 3", "10 20", "7", "", "5 5 5 5", "x 1", "-4 4", "100", "2 2", "9 1",
    ];
    let job_id = env.job_id("sums");
    let submit = tokio::process::Command::new(programs.join("sum-submit"))
        .args(lines)
        .env("AMQP_URL", env.broker_url())
        .env("BATCHQ_NAMESPACE", env.broker().names().namespace())
        .env("BATCHQ_JOB_ID", &job_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_TIMEOUT, submit)
        .await
        .context("sum-submit did not finish")?
        .context("running sum-submit")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "the job succeeded; stderr {stderr}"
    );
    assert_eq!(
        stderr.trim_end(),
        format!("job {job_id} succeeded: 9 succeeded, 1 failed of 10"),
    );

    let printed: Vec<ResultLine> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("sum-submit's results are JSON Lines: {stdout}"))?;
    let wanted: Vec<ResultLine> = lines
        .iter()
        .enumerate()
        .map(|(index, line)| expected(index as u64, line))
        .collect();
    assert_eq!(printed, wanted);

    let status = env
        .status(&job_id)
        .await?
        .context("the reducer knows the job")?;
    assert_counts(&status, JobState::Succeeded, 9, 1);
    env.finish().await
}
