//! Schema versions: stores written by the previous release (kept in `tests/fixtures/`, see
//! its README) are upgraded at start and keep their jobs; a store written by a newer release
//! is refused at start with one line, and the process exits non-zero.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use batchq_tests::{
    Bin, TestEnv, WorkerOpts, amqp_url, assert_counts, assert_one_per_index, bin_path, sha256_hex,
    text_of,
};
use common::contract::{JobState, ResultLine};
use common::wire::{Request, Response};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// The job the fixture stores hold: succeeded, 6 results.
const OLD_JOB: &str = "fixture-old-job";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Copies the fixture stores where the splitter and reducer of `ns` look for theirs.
fn install_fixture_stores(data_dir: &Path, ns: &str) -> Result<()> {
    for component in ["splitter", "reducer"] {
        let dir = data_dir.join(component);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let from = fixture(&format!("{component}-v1.db"));
        std::fs::copy(&from, dir.join(format!("{ns}.db")))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// The schema version the store at `path` records (0: none, as before versions).
fn user_version(path: &Path) -> Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(common::migrate::version(&conn)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_the_previous_schema_are_upgraded_and_keep_their_jobs() -> Result<()> {
    let mut env = TestEnv::new("schema-up").await?;
    install_fixture_stores(&env.data_dir(), &env.ns)?;
    let splitter_db = env
        .data_dir()
        .join("splitter")
        .join(format!("{}.db", env.ns));
    let reducer_db = env
        .data_dir()
        .join("reducer")
        .join(format!("{}.db", env.ns));
    assert_eq!(
        user_version(&splitter_db)?,
        0,
        "the fixture predates versions"
    );
    // Kept for ever: the old job ended on a fixed day, which the default retention would
    // expire a week later.
    env.start_splitter_with(&["--retention", "0"])?;
    env.start_reducer_with(&["--retention", "0"])?;
    env.start_worker(WorkerOpts::default())?;

    // The old job is still there, with its results, as batchctl shows them.
    let old = env.wait_for_terminal(OLD_JOB, JOB_TIMEOUT).await?;
    assert_counts(&old, JobState::Succeeded, 6, 0);
    assert_eq!(old.fragments_done, 3);
    assert_eq!(old.finished_at.as_deref(), Some("2026-12-02T09:22:28.193Z"));
    let (exit, stdout, stderr) = env.batchctl(&["status", OLD_JOB, "--json"]).await?;
    assert_eq!(exit.code(), Some(0), "batchctl status: {stderr}");
    let shown: Value = serde_json::from_str(&stdout)?;
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["ops_succeeded"], 6);
    let spec: Value = serde_json::from_slice(&std::fs::read(fixture("v1-job.json"))?)?;
    let items = spec["items"]
        .as_array()
        .context("the fixture job has items")?;
    let (exit, stdout, stderr) = env.batchctl(&["results", OLD_JOB]).await?;
    assert_eq!(exit.code(), Some(0), "batchctl results: {stderr}");
    let lines: Vec<ResultLine> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_one_per_index(&lines, items.len() as u64);
    for (line, item) in lines.iter().zip(items) {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: line.index(),
                result: Value::String(sha256_hex(&text_of(item), 1)),
            }
        );
    }
    assert_eq!(user_version(&splitter_db)?, 3, "splitter store upgraded");
    assert_eq!(user_version(&reducer_db)?, 4, "reducer store upgraded");
    // Accepted before the reducer kept specs (version 3): the console shows it without one.
    let request = Request::Job {
        job_id: OLD_JOB.to_owned(),
    };
    match env.rpc().call(&env.names, &request).await? {
        Response::Job(detail) => {
            assert_eq!(detail.status, old);
            assert_eq!(detail.spec, None);
        }
        other => anyhow::bail!("unexpected reply to a job request: {other:?}"),
    }

    // Upgraded, it reads as never redriven, and succeeded: batchctl refuses to redrive it.
    // Published anyway, the splitter refuses a job accepted before redrives, and keeps the
    // request on {ns}.dead with the reason.
    assert_eq!(old.redrives, 0);
    let (exit, _, stderr) = env.batchctl(&["redrive", OLD_JOB]).await?;
    assert_eq!(exit.code(), Some(2), "batchctl redrive: {stderr}");
    env.redrive(OLD_JOB).await?;
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    let refused = loop {
        let dead = env.drain_dead().await?;
        if let Some(first) = dead.first() {
            break first.clone();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the redrive of the old job was not refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = refused
        .header(common::dead::REASON_HEADER)
        .unwrap_or_default();
    assert!(
        reason.contains("accepted before this release"),
        "{reason:?}"
    );

    // Its id is still known to the upgraded splitter: submitting it again changes nothing.
    env.submit(&spec).await?;

    // And a new job runs to the end on the upgraded stores.
    let new_id = env.job_id("after-upgrade");
    env.submit(&json!({
        "job_id": new_id,
        "operation": "sha256",
        "params": {"rounds": 3},
        "range": {"start": 0, "end": 50},
        "fragment_size": 7,
    }))
    .await?;
    let status = env.wait_for_terminal(&new_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 50, 0);
    // A job accepted on the upgraded store keeps its spec.
    let request = Request::Job {
        job_id: new_id.clone(),
    };
    match env.rpc().call(&env.names, &request).await? {
        Response::Job(detail) => {
            let spec = detail.spec.context("the new job's spec is kept")?;
            assert_eq!(spec["fragment_size"], 7);
            assert_eq!(spec["range"], json!({"start": 0, "end": 50}));
        }
        other => anyhow::bail!("unexpected reply to a job request: {other:?}"),
    }
    let results = env.results(&new_id).await?;
    assert_one_per_index(&results, 50);
    assert_eq!(
        results[49],
        ResultLine::Ok {
            index: 49,
            result: Value::String(sha256_hex("49", 3)),
        }
    );
    // The re-submission (taken before the new job) left the old job as it was.
    let again = env
        .status(OLD_JOB)
        .await?
        .context("the old job is still there")?;
    assert_eq!(again, old);
    env.finish().await
}

/// Runs `bin` on a store that a newer batchq wrote and returns (exit code, stderr).
async fn run_on_newer_store(bin: Bin, env: &TestEnv) -> Result<(Option<i32>, String)> {
    let mut command = tokio::process::Command::new(bin_path(bin));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url())
        .env("BATCHQ_NAMESPACE", &env.ns)
        .env("BATCHQ_DATA_DIR", env.data_dir())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if bin == Bin::Reducer {
        command.args(["--metrics-addr", "off"]);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .with_context(|| format!("{} did not exit on a newer store", bin.name()))??;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_a_newer_schema_is_refused_at_start() -> Result<()> {
    let env = TestEnv::new("schema-newer").await?;
    install_fixture_stores(&env.data_dir(), &env.ns)?;
    for component in ["splitter", "reducer"] {
        let path = env
            .data_dir()
            .join(component)
            .join(format!("{}.db", env.ns));
        let conn = rusqlite::Connection::open(&path)?;
        common::migrate::stamp(&conn, 7)?;
    }
    // What each binary knows: the splitter's store is at version 3, the reducer's at 4.
    for (bin, supported) in [(Bin::Splitter, 3), (Bin::Reducer, 4)] {
        let (code, stderr) = run_on_newer_store(bin, &env).await?;
        assert!(
            code.is_some_and(|c| c != 0),
            "{} must exit non-zero, got {code:?}: {stderr}",
            bin.name()
        );
        let refusal: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                l.contains(&format!(
                    "schema version 7 is newer than this binary knows ({supported})"
                ))
            })
            .collect();
        assert_eq!(refusal.len(), 1, "one line says why: {stderr}");
        let path = env
            .data_dir()
            .join(bin.name())
            .join(format!("{}.db", env.ns));
        assert_eq!(user_version(&path)?, 7, "the store is left untouched");
    }
    env.finish().await
}

#[test]
fn the_fixture_stores_hold_the_old_job() -> Result<()> {
    // A guard on the fixtures themselves: what the tests above rely on.
    let reducer = rusqlite::Connection::open_with_flags(
        fixture("reducer-v1.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let results: i64 = reducer.query_row(
        "SELECT COUNT(*) FROM results WHERE job_id = ?1",
        [OLD_JOB],
        |r| r.get(0),
    )?;
    assert_eq!(results, 6);
    assert_eq!(user_version(&fixture("splitter-v1.db"))?, 0);
    assert_eq!(user_version(&fixture("reducer-v1.db"))?, 0);
    Ok(())
}
