//! Redrive (contract v1.2): a failed or cancelled job runs again every operation that has not
//! succeeded, and ends exact (`ops_succeeded` kept, `ops_failed` counted afresh, `redrives`
//! raised); a redrive of a running, succeeded or unknown job changes nothing; a reducer (and
//! a splitter) killed in the middle of a redrive loses and doubles nothing.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{Signal, TestEnv, WorkerOpts, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, JobStatus, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// `batchctl redrive` with `args`: its exit code, stdout and stderr.
async fn batchctl_redrive(env: &TestEnv, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let mut all = vec!["redrive"];
    all.extend_from_slice(args);
    let (status, out, err) = env.batchctl_within(&all, JOB_TIMEOUT).await?;
    Ok((status.code(), out, err))
}

/// The job's status now (the reducer must know it).
async fn status_of(env: &TestEnv, job_id: &str) -> Result<JobStatus> {
    env.status(job_id)
        .await?
        .with_context(|| format!("the reducer does not know job {job_id}"))
}

/// What a job's status says apart from its timestamps: what must not change.
fn figures(s: &JobStatus) -> (JobState, u64, u64, u64, u64) {
    (
        s.state,
        s.ops_succeeded,
        s.ops_failed,
        s.fragments_done,
        s.redrives,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failed_for_a_missing_program_succeeds_once_redriven() -> Result<()> {
    let mut env = TestEnv::new("redrive-exec").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // The worker allows `sh` (the harness's default), which runs the job's program; the
    // program is not installed yet. (A worker refuses to start with an allow-list entry that
    // names no executable file, so the missing program is run through the allowed `sh`.)
    env.start_worker(WorkerOpts::default())?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;
    let tool = env.dir().join("bin").join("tool");
    std::fs::create_dir_all(tool.parent().context("a folder")?)?;
    let script = format!(
        "if [ \"$0\" -lt 10 ]; then echo early-$0; else exec {} \"$0\"; fi",
        tool.display()
    );
    let items: Vec<Value> = (0..30).map(Value::from).collect();
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("tool"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", script, "{}"]},
            "items": items,
            "fragment_size": 5,
            "max_concurrent_fragments": 2,
            "max_attempts": 1,
        }))
        .await?;
    let failed = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    ensure!(failed.state == JobState::Failed, "{failed:?}");
    assert_eq!(failed.ops_succeeded + failed.ops_failed, 30, "{failed:?}");
    assert_eq!(failed.redrives, 0);
    let before = env.results(&job_id).await?;
    ensure!(
        before
            .iter()
            .any(|l| matches!(l, ResultLine::Err { error, .. } if error.contains("not found"))),
        "the missing program's error is kept: {before:?}"
    );

    // The program is installed; the redrive runs what did not succeed, and succeeds.
    std::fs::write(&tool, "#!/bin/sh\necho tool-$1\n")?;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755))?;
    let (code, out, err) = batchctl_redrive(&env, &[&job_id, "--wait"]).await?;
    assert_eq!(code, Some(0), "stdout {out:?}, stderr {err:?}");
    assert!(
        out.contains(&format!("redrive requested for {job_id}")),
        "{out}"
    );

    let done = status_of(&env, &job_id).await?;
    assert_counts(&done, JobState::Succeeded, 30, 0);
    assert_eq!(done.redrives, 1);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, 30);
    for line in &results {
        let i = line.index();
        let expected = if i < 10 {
            format!("early-{i}")
        } else {
            format!("tool-{i}")
        };
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: json!(expected)
            }
        );
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_of_a_succeeded_or_unknown_job_changes_nothing() -> Result<()> {
    let mut env = TestEnv::new("redrive-refused").await?;
    env.start_spine(1)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("done"),
            "operation": "noop",
            "range": {"start": 0, "end": 50},
            "fragment_size": 10,
        }))
        .await?;
    let succeeded = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&succeeded, JobState::Succeeded, 50, 0);

    let (code, out, err) = batchctl_redrive(&env, &[&job_id]).await?;
    assert_eq!(code, Some(2), "stdout {out:?}");
    assert_eq!(
        err.trim(),
        format!(
            "batchctl: job {job_id} is succeeded; only a failed or cancelled job can be redriven"
        )
    );
    let unknown = env.job_id("nobody");
    let (code, _, err) = batchctl_redrive(&env, &[&unknown]).await?;
    assert_eq!(code, Some(2));
    assert_eq!(err.trim(), format!("batchctl: unknown job {unknown}"));

    // The same requests published straight to {ns}.jobs: the engine refuses them too.
    env.redrive(&job_id).await?;
    env.redrive(&unknown).await?;
    // A job submitted after them is done only once the splitter took both requests.
    let marker = env
        .submit(&json!({"job_id": env.job_id("after"), "operation": "noop", "items": [1]}))
        .await?;
    env.wait_for_terminal(&marker, JOB_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_of(&env, &job_id).await?;
    assert_eq!(figures(&after), figures(&succeeded));
    assert_eq!(after.finished_at, succeeded.finished_at);
    assert_eq!(env.status(&unknown).await?, None, "no job appears");
    env.finish().await
}

/// A `sleep` job of `ops` operations of `ms` each, two at a time.
fn slow_job(env: &TestEnv, name: &str, ops: u64, ms: u64) -> Value {
    json!({
        "job_id": env.job_id(name),
        "operation": "sleep",
        "params": {"ms": ms},
        "range": {"start": 0, "end": ops},
        "fragment_size": 2,
        "max_concurrent_fragments": 2,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_redriven_completes_and_a_redrive_while_it_runs_changes_nothing()
-> Result<()> {
    const OPS: u64 = 80;
    let mut env = TestEnv::new("redrive-cancelled").await?;
    let spine = env.start_spine(1)?;
    let job_id = env.submit(&slow_job(&env, "cancelled", OPS, 100)).await?;
    env.wait_for_status(&job_id, JOB_TIMEOUT, |s| s.ops_succeeded >= 6)
        .await?;
    env.cancel(&job_id).await?;
    let cancelled = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    ensure!(cancelled.state == JobState::Cancelled, "{cancelled:?}");
    ensure!(
        cancelled.ops_succeeded < OPS,
        "the job ended before its cancel; make it longer: {cancelled:?}"
    );
    // Fragments that were running report after the cancel; wait until the counts settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cancelled = status_of(&env, &job_id).await?;

    let (code, out, err) = batchctl_redrive(&env, &[&job_id]).await?;
    assert_eq!(code, Some(0), "stdout {out:?}, stderr {err:?}");
    let running = env
        .wait_for_status(&job_id, JOB_TIMEOUT, |s| s.redrives == 1)
        .await?;
    assert_eq!(
        running.ops_succeeded, cancelled.ops_succeeded,
        "{running:?}"
    );
    assert_eq!(running.ops_failed, 0);

    // While the redrive runs: batchctl refuses, and a request published anyway changes
    // nothing (the reducer says so in its log while the job still runs).
    let (code, _, err) = batchctl_redrive(&env, &[&job_id]).await?;
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim(),
        format!(
            "batchctl: job {job_id} is running; only a failed or cancelled job can be redriven"
        )
    );
    env.redrive(&job_id).await?;
    let refused = "redrive of a job that is neither failed nor cancelled";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !env.log_text(spine.reducer).contains(refused) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the reducer did not refuse the redrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let meanwhile = status_of(&env, &job_id).await?;
    ensure!(
        !meanwhile.state.is_terminal(),
        "the job ended before the second redrive was refused; make it longer: {meanwhile:?}"
    );

    let done = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&done, JobState::Succeeded, OPS, 0);
    assert_eq!(done.redrives, 1, "one redrive, not two");
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, OPS);
    assert!(
        results
            .iter()
            .all(|l| matches!(l, ResultLine::Ok { result, .. } if result.is_null())),
        "{results:?}"
    );
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_and_a_splitter_killed_mid_redrive_still_end_exact() -> Result<()> {
    const OPS: u64 = 4000;
    let mut env = TestEnv::new("redrive-kill").await?;
    let spine = env.start_spine(2)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("killed"),
            "operation": "sha256",
            "params": {"rounds": 2},
            "range": {"start": 0, "end": OPS},
            "fragment_size": 10,
            "max_concurrent_fragments": 4,
        }))
        .await?;
    env.wait_for_status(&job_id, JOB_TIMEOUT, |s| s.ops_succeeded >= 400)
        .await?;
    env.cancel(&job_id).await?;
    let cancelled = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        cancelled.state == JobState::Cancelled && cancelled.ops_succeeded < OPS / 2,
        "{cancelled:?}"
    );

    // The reducer and the splitter killed right after the redrive is published (it may be in
    // either's batch in hand, or its outbox), and the reducer again halfway through what the
    // redrive runs.
    env.redrive(&job_id).await?;
    env.kill(spine.reducer, Signal::Kill)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.kill(spine.splitter, Signal::Kill)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.restart(spine.reducer)?;
    env.restart(spine.splitter)?;
    let running = env
        .wait_for_status(&job_id, JOB_TIMEOUT, |s| {
            s.redrives == 1 && s.ops_succeeded >= OPS / 2
        })
        .await?;
    ensure!(
        !running.state.is_terminal(),
        "the redrive ended before the second kill; make the job longer: {running:?}"
    );
    env.kill(spine.reducer, Signal::Kill)?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    env.restart(spine.reducer)?;

    let done = env
        .wait_for_status(&job_id, JOB_TIMEOUT, |s| {
            s.redrives == 1 && s.state.is_terminal()
        })
        .await?;
    assert_counts(&done, JobState::Succeeded, OPS, 0);
    assert_eq!(done.redrives, 1);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, OPS);
    for line in &results {
        let i = line.index();
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: Value::String(sha256_hex(&i.to_string(), 2))
            }
        );
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_the_topology_again_binds_redrive_on_a_broker_of_the_last_release() -> Result<()>
{
    use common::lapin::types::FieldTable;
    let env = TestEnv::new("redrive-topology").await?;
    // The jobs queue as the last release left it: bound to `submit` and `cancel` only.
    let channel = env.broker().channel().await?;
    let jobs = env.names.jobs();
    channel
        .queue_unbind(
            jobs.as_str().into(),
            jobs.as_str().into(),
            common::topology::KEY_REDRIVE.into(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "unbound".into()).await;
    let unrouted = env.redrive("nobody").await;
    ensure!(unrouted.is_err(), "a redrive routed without its binding");

    // What every binary and batchctl do at start binds it again; a RedriveRequest now waits
    // on the jobs queue for a splitter.
    env.broker().declare_topology().await?;
    env.redrive("nobody").await?;
    assert_eq!(env.queue_depth(&jobs).await?, 1);
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_right_after_a_redrive_cancels_the_redriven_round() -> Result<()> {
    const OPS: u64 = 80;
    let mut env = TestEnv::new("redrive-recancel").await?;
    env.start_spine(1)?;
    let job_id = env.submit(&slow_job(&env, "recancel", OPS, 100)).await?;
    env.wait_for_status(&job_id, JOB_TIMEOUT, |s| s.ops_succeeded >= 4)
        .await?;
    env.cancel(&job_id).await?;
    env.wait_for_status(&job_id, JOB_TIMEOUT, |s| s.state == JobState::Cancelled)
        .await?;

    // Back to back: the cancel reaches the splitter before it has started the new round.
    env.redrive(&job_id).await?;
    env.cancel(&job_id).await?;
    let cancelled = env
        .wait_for_status(&job_id, JOB_TIMEOUT, |s| {
            s.redrives == 1 && s.state.is_terminal()
        })
        .await?;
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    // Its running fragments stop at their next operation; then nothing more runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = status_of(&env, &job_id).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = status_of(&env, &job_id).await?;
    assert_eq!(
        figures(&later),
        figures(&settled),
        "the cancelled round stays stopped"
    );
    ensure!(
        later.ops_succeeded < OPS,
        "the round ran to the end: {later:?}"
    );
    env.finish().await
}
