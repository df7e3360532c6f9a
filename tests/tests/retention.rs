//! Retention (`--retention`) and `batchctl delete`: a finished job's status, results and
//! bookkeeping are deleted, a tombstone says so, its id stays known, and a job that has not
//! ended is never touched.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use batchq_tests::{
    Bin, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, bin_path, sha256_hex,
};
use common::contract::{JobState, ResultLine};
use common::wire::{Removal, Request, Response, Tombstone};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// Retention 5 s, sweeps every 2 s: a finished job is gone well within this.
const EXPIRY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_EVERY: Duration = Duration::from_millis(200);

fn store_path(env: &TestEnv, component: &str) -> PathBuf {
    env.data_dir()
        .join(component)
        .join(format!("{}.db", env.ns))
}

/// Rows of `job_id` in `table` of a store, read on a read-only connection.
fn rows(path: &Path, table: &str, job_id: &str) -> Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn.query_row(
        &format!("SELECT COUNT(*) FROM {table} WHERE job_id = ?1"),
        [job_id],
        |r| r.get(0),
    )?)
}

/// Polls the reducer until the job's status query answers with its tombstone.
async fn wait_for_tombstone(env: &TestEnv, job_id: &str, timeout: Duration) -> Result<Tombstone> {
    let deadline = Instant::now() + timeout;
    loop {
        let request = Request::Status {
            job_id: job_id.to_owned(),
        };
        match env.rpc().call(&env.names, &request).await? {
            Response::Gone(tombstone) => return Ok(tombstone),
            Response::Status(_) => {}
            other => bail!("unexpected reply about {job_id}: {other:?}"),
        }
        if Instant::now() >= deadline {
            bail!("job {job_id} was not deleted within {timeout:?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls until `check` holds.
async fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check()? {
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(())
}

/// Asserts batchctl failed with exit code 2 and one stderr line that contains `needle`.
fn assert_refused(outcome: &(std::process::ExitStatus, String, String), needle: &str) {
    let (status, stdout, stderr) = outcome;
    assert_eq!(status.code(), Some(2), "exit code; stderr {stderr:?}");
    assert_eq!(stdout, "", "nothing on stdout");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains(needle), "{stderr:?} says {needle:?}");
}

fn quick_spec(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": 2},
        "items": ["a", "b", "c", "d", "e", "f", "g", "h"],
        "fragment_size": 3,
    })
}

/// 30 sleeps of 500 ms, one fragment of 2 at a time: about 15 s of work, ending well after a
/// job submitted with it has been expired (5 s after it ended, swept every 2 s).
fn long_spec(job_id: &str) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sleep",
        "params": {"ms": 500},
        "range": {"start": 0, "end": 30},
        "fragment_size": 2,
        "max_concurrent_fragments": 1,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_expires_and_a_running_one_is_kept() -> Result<()> {
    let mut env = TestEnv::new("retention").await?;
    env.start_splitter_with(&["--retention", "5s"])?;
    env.start_reducer_with(&["--retention", "5s"])?;
    env.start_worker(WorkerOpts::prefetch(4))?;

    let quick = env.job_id("quick");
    let long = env.job_id("long");
    env.submit(&quick_spec(&quick)).await?;
    env.submit(&long_spec(&long)).await?;
    let ended = env.wait_for_terminal(&quick, JOB_TIMEOUT).await?;
    assert_counts(&ended, JobState::Succeeded, 8, 0);
    let results = env.results(&quick).await?;
    assert_one_per_index(&results, 8);
    assert_eq!(
        results[0],
        ResultLine::Ok {
            index: 0,
            result: Value::String(sha256_hex("a", 2)),
        }
    );
    let reducer_db = store_path(&env, "reducer");
    let splitter_db = store_path(&env, "splitter");
    assert_eq!(rows(&reducer_db, "results", &quick)?, 8);

    // Within a bounded wait the job is gone, and asking for it says it expired.
    let tombstone = wait_for_tombstone(&env, &quick, EXPIRY_TIMEOUT).await?;
    assert_eq!(tombstone.how, Removal::Expired);
    assert_eq!(tombstone.retention.as_deref(), Some("5s"));
    assert_eq!(tombstone.finished_at, ended.finished_at);
    let expired = format!(
        "job {quick} expired (it ended at {}, retention 5s)",
        ended.finished_at.as_deref().unwrap_or("?")
    );
    assert_refused(&env.batchctl(&["status", &quick]).await?, &expired);
    assert_refused(&env.batchctl(&["results", &quick]).await?, &expired);
    wait_until("the reducer's rows are purged", EXPIRY_TIMEOUT, || {
        Ok(rows(&reducer_db, "results", &quick)? == 0
            && rows(&reducer_db, "fragments", &quick)? == 0)
    })
    .await?;
    assert_eq!(rows(&reducer_db, "jobs", &quick)?, 0);
    assert_eq!(rows(&reducer_db, "tombstones", &quick)?, 1);
    wait_until("the splitter's rows are deleted", EXPIRY_TIMEOUT, || {
        Ok(rows(&splitter_db, "jobs", &quick)? == 0)
    })
    .await?;
    assert_eq!(rows(&splitter_db, "tombstones", &quick)?, 1);
    assert_eq!(rows(&splitter_db, "items", &quick)?, 0);
    assert_eq!(rows(&splitter_db, "fragments", &quick)?, 0);

    // The long job outlived the retention since the quick one ended: it is still there.
    let running = env.status(&long).await?.context("the long job is kept")?;
    assert!(!running.state.is_terminal(), "still running: {running:?}");

    // Re-submitting the expired JobSpec stays a no-op: its id is still known.
    env.submit(&quick_spec(&quick)).await?;
    // A job submitted after it is taken after it, so once this one ends the re-submission
    // has been handled.
    let marker = env.job_id("marker");
    env.submit(&quick_spec(&marker)).await?;
    env.wait_for_terminal(&marker, JOB_TIMEOUT).await?;
    assert_eq!(
        wait_for_tombstone(&env, &quick, Duration::ZERO).await?,
        tombstone
    );
    assert_eq!(rows(&splitter_db, "jobs", &quick)?, 0, "not recorded again");

    // The long job ends exact, its results all there.
    let finished = env.wait_for_terminal(&long, JOB_TIMEOUT).await?;
    assert_counts(&finished, JobState::Succeeded, 30, 0);
    assert_eq!(finished.fragments_done, 15);
    assert_one_per_index(&env.results(&long).await?, 30);
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchctl_delete_removes_a_finished_job_and_refuses_a_running_one() -> Result<()> {
    let mut env = TestEnv::new("delete").await?;
    env.start_spine(1)?;
    let done = env.job_id("done");
    let long = env.job_id("long");
    env.submit(&quick_spec(&done)).await?;
    env.submit(&long_spec(&long)).await?;
    let ended = env.wait_for_terminal(&done, JOB_TIMEOUT).await?;
    assert_counts(&ended, JobState::Succeeded, 8, 0);

    let (status, stdout, stderr) = env.batchctl(&["delete", &done]).await?;
    assert_eq!(status.code(), Some(0), "delete: {stderr}");
    assert_eq!(stdout, format!("deleted job {done}\n"));
    let deleted = format!("job {done} was deleted at ");
    assert_refused(&env.batchctl(&["status", &done]).await?, &deleted);
    assert_refused(&env.batchctl(&["results", &done]).await?, &deleted);
    assert_refused(&env.batchctl(&["delete", &done]).await?, &deleted);
    let reducer_db = store_path(&env, "reducer");
    wait_until("the deleted job's rows are purged", EXPIRY_TIMEOUT, || {
        Ok(rows(&reducer_db, "results", &done)? == 0 && rows(&reducer_db, "jobs", &done)? == 0)
    })
    .await?;

    // A job still running is refused, and deletable once it has ended.
    env.wait_for_status(&long, JOB_TIMEOUT, |s| s.state == JobState::Running)
        .await?;
    assert_refused(
        &env.batchctl(&["delete", &long]).await?,
        &format!("job {long} is still running; cancel it first"),
    );
    assert!(env.status(&long).await?.is_some(), "not touched");
    env.cancel(&long).await?;
    let cancelled = env.wait_for_terminal(&long, JOB_TIMEOUT).await?;
    assert_eq!(cancelled.state, JobState::Cancelled);
    let (status, _, stderr) = env.batchctl(&["delete", &long]).await?;
    assert_eq!(status.code(), Some(0), "delete after cancel: {stderr}");

    assert_refused(
        &env.batchctl(&["delete", "no-such-job"]).await?,
        "unknown job no-such-job",
    );
    // The splitter's bookkeeping of a deleted job follows its own retention (7 d here), so
    // the id stays known to it meanwhile.
    let splitter_db = store_path(&env, "splitter");
    assert_eq!(rows(&splitter_db, "jobs", &done)?, 1);
    assert_eq!(rows(&splitter_db, "tombstones", &done)?, 0);
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_retention_is_refused_at_start_naming_the_setting() -> Result<()> {
    for bin in [Bin::Splitter, Bin::Reducer] {
        let dir = tempfile::tempdir()?;
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(bin_path(bin))
                .args(["--retention", "7x", "--data-dir"])
                .arg(dir.path())
                .env_remove("BATCHQ_RETENTION")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{} did not exit", bin.name()))??;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}: {stderr}", bin.name());
        assert!(
            stderr.contains("--retention") && stderr.contains("\"7x\" is not a duration"),
            "{}: {stderr}",
            bin.name()
        );
        assert!(
            !dir.path().join(bin.name()).exists(),
            "{} refused before opening a store",
            bin.name()
        );
    }
    Ok(())
}
