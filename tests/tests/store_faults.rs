//! A store that fails for a while costs no message: the splitter's and the reducer's data
//! folders on a tiny tmpfs fill up mid-job; each process holds its unacknowledged messages and
//! retries in place (saying so once per change of cause) instead of exiting; once the
//! filesystem is grown the job ends exact, with nothing on `{ns}.dead`. The test stands in
//! for a supervisor all along: a process that exits is started again.
//!
//! Also: queues declared by an older batchq (with a delivery limit) are used as they are.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_tests::{ProcId, TestEnv, assert_counts, assert_one_per_index, sha256_hex};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long the disk stays full once a process has noticed it.
const FULL_FOR: Duration = Duration::from_secs(20);
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// The WARN line a store fault starts with (common::store).
const FAULT_LINE: &str = "store fault:";

/// A tmpfs mounted over a folder for the life of the value (tests run as root).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        )?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn grow(&self, size: &str) -> Result<()> {
        run(
            "mount",
            &[
                "-o",
                &format!("remount,size={size}"),
                &self.dir.display().to_string(),
            ],
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    ensure!(status.success(), "{program} {args:?} failed: {status}");
    Ok(())
}

/// Restarts whichever of `procs` has exited, until `until`; returns how many restarts.
async fn supervise_until(env: &mut TestEnv, procs: &[ProcId], until: Instant) -> Result<usize> {
    let mut restarts = 0;
    while Instant::now() < until {
        for &id in procs {
            if !env.is_running(id) {
                env.restart(id)?;
                restarts += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(restarts)
}

/// Waits (supervising) until `id` has logged a store fault.
async fn wait_for_fault(env: &mut TestEnv, id: ProcId, procs: &[ProcId]) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut restarts = 0;
    while !env.log_text(id).contains(FAULT_LINE) {
        ensure!(
            Instant::now() < deadline,
            "no store fault within 60 s:\n{}",
            env.logs_tail()
        );
        restarts +=
            supervise_until(env, procs, Instant::now() + Duration::from_millis(200)).await?;
    }
    Ok(restarts)
}

/// Every fault line names its cause, and while a fault lasts (until its "passed" line) the
/// same cause is never logged again: the log says a fault once per change, not per attempt.
fn assert_fault_lines_change(log: &str) {
    let mut lasting: Option<&str> = None;
    let mut faults = 0;
    for line in log.lines() {
        if line.contains(FAULT_LINE) {
            let cause = line
                .split("cause=")
                .nth(1)
                .and_then(|rest| rest.split(" error=").next())
                .unwrap_or("");
            assert!(!cause.is_empty(), "a fault line without its cause: {line}");
            assert_ne!(
                lasting,
                Some(cause),
                "the same lasting fault logged twice:\n{log}"
            );
            lasting = Some(cause);
            faults += 1;
        } else if line.contains("store fault passed") {
            lasting = None;
        }
    }
    assert!(faults > 0, "a fault line was logged");
}

/// `batchctl health` names `role`'s fault while it lasts (exit 1), and all is well after.
async fn assert_health(env: &TestEnv, role: &str, faulty: bool) -> Result<()> {
    let (status, out, err) = env.batchctl(&["health"]).await?;
    let line = out
        .lines()
        .find(|l| l.starts_with(role))
        .with_context(|| format!("no {role} row in batchctl health:\n{out}{err}"))?;
    if faulty {
        assert_eq!(
            status.code(),
            Some(1),
            "health exits 1 while a store fails:\n{out}{err}"
        );
        assert!(
            line.contains("store fault") && line.contains("disk full"),
            "the {role} row names the fault: {line}"
        );
    } else {
        assert_eq!(
            status.code(),
            Some(0),
            "health exits 0 once all is well:\n{out}{err}"
        );
        assert!(line.contains(" ok "), "the {role} row says ok: {line}");
    }
    Ok(())
}

async fn assert_sha_results(env: &TestEnv, job_id: &str, ops: u64) -> Result<()> {
    let results = env.results(job_id).await?;
    assert_one_per_index(&results, ops);
    for (i, line) in results.iter().enumerate() {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i as u64,
                result: Value::String(sha256_hex(&i.to_string(), 1)),
            }
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reducer_disk_is_waited_out_and_costs_nothing() -> Result<()> {
    let mut env = TestEnv::new("reducer-disk-full").await?;
    let disk = Tmpfs::mount(&env.data_dir().join("reducer"), "3m")?;
    let spine = env.start_spine(2)?;
    // About 60 bytes of result per operation, several times what 3 MiB holds.
    let ops = 100_000;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("results"),
            "operation": "sha256",
            "range": {"start": 0, "end": ops},
            "max_concurrent_fragments": 8,
        }))
        .await?;
    let procs = [spine.splitter, spine.reducer];
    let mut restarts = wait_for_fault(&mut env, spine.reducer, &procs).await?;
    restarts += supervise_until(&mut env, &procs, Instant::now() + FULL_FOR).await?;
    let stalled = env
        .status(&job_id)
        .await?
        .context("status while the disk is full")?;
    assert!(
        !stalled.state.is_terminal(),
        "the job cannot end while its reports cannot be kept: {stalled:?}"
    );
    assert_eq!(
        restarts,
        0,
        "the reducer waited the fault out instead of exiting:\n{}",
        env.logs_tail()
    );
    assert_health(&env, "reducer", true).await?;
    disk.grow("256m")?;
    let (status, _) = env.wait_restarting(&job_id, &procs, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, ops, 0);
    assert_sha_results(&env, &job_id, ops).await?;
    assert_eq!(
        env.queue_depth(&env.names.dead()).await?,
        0,
        "nothing dead-lettered"
    );
    let log = env.log_text(spine.reducer);
    assert_fault_lines_change(&log);
    assert!(
        log.contains("store fault passed"),
        "the reducer said the fault passed"
    );
    assert_health(&env, "reducer", false).await?;
    env.finish().await?;
    drop(disk);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_splitter_disk_is_waited_out_and_costs_nothing() -> Result<()> {
    let mut env = TestEnv::new("splitter-disk-full").await?;
    let disk = Tmpfs::mount(&env.data_dir().join("splitter"), "3m")?;
    let spine = env.start_spine(2)?;
    let small = env
        .submit(&json!({
            "job_id": env.job_id("small"),
            "operation": "sha256",
            "range": {"start": 0, "end": 2000},
            "fragment_size": 20,
            "max_concurrent_fragments": 2,
        }))
        .await?;
    // An item job whose items (kept by the splitter until the job ends) need more than the
    // whole filesystem.
    let items: Vec<Value> = (0..20_000)
        .map(|i| Value::String(format!("{i:0>200}")))
        .collect();
    let large = env
        .submit(&json!({
            "job_id": env.job_id("large"),
            "operation": "noop",
            "items": items,
        }))
        .await?;
    let procs = [spine.splitter, spine.reducer];
    let mut restarts = wait_for_fault(&mut env, spine.splitter, &procs).await?;
    restarts += supervise_until(&mut env, &procs, Instant::now() + FULL_FOR).await?;
    assert_eq!(
        restarts,
        0,
        "the splitter waited the fault out instead of exiting:\n{}",
        env.logs_tail()
    );
    assert_health(&env, "splitter", true).await?;
    disk.grow("256m")?;
    let (status, _) = env.wait_restarting(&large, &procs, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 20_000, 0);
    let (status, _) = env.wait_restarting(&small, &procs, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2000, 0);
    assert_sha_results(&env, &small, 2000).await?;
    assert_eq!(
        env.queue_depth(&env.names.dead()).await?,
        0,
        "nothing dead-lettered"
    );
    let log = env.log_text(spine.splitter);
    assert_fault_lines_change(&log);
    assert!(
        log.contains("store fault passed"),
        "the splitter said the fault passed"
    );
    // The splitter's next beat (every 2 s) carries the recovery.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_health(&env, "splitter", false).await?;
    env.finish().await?;
    drop(disk);
    Ok(())
}

/// A deployment upgraded from batchq 0.1 has its internal queues with a delivery limit: the
/// processes use them as they are (saying how to re-create them) and jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_of_an_older_batchq_are_used_as_they_are() -> Result<()> {
    use common::lapin::options::QueueDeclareOptions;
    use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    let env_broker = TestEnv::new("old-queues").await?;
    // Re-create the reducer's queue as 0.1 declared it.
    let names = env_broker.names.clone();
    let channel = env_broker.broker().channel().await?;
    channel
        .queue_delete(names.reducer_queue().into(), Default::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongLongInt(5),
    );
    channel
        .queue_declare(
            names.reducer_queue().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await?;
    channel
        .queue_bind(
            names.reducer_queue().into(),
            names.events().into(),
            common::topology::KEY_REDUCER.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            names.reducer_queue().into(),
            names.events().into(),
            common::topology::KEY_POISON.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "old queue made".into()).await;

    let mut env = env_broker;
    let spine = env.start_spine(1)?;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("on-old-queues"),
            "operation": "sha256",
            "range": {"start": 0, "end": 500},
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 500, 0);
    let log = env.log_text(spine.reducer);
    assert!(
        log.contains("declared by an older batchq"),
        "the reducer said the queue is an old one:\n{log}"
    );
    env.finish().await?;
    Ok(())
}

/// A message whose fold panics (a bug) is set aside on `{ns}.dead` with the panic as its
/// reason; the messages folded with it, and every other job, carry on; the reducer never
/// exits. (The internal queues have no delivery limit, so without this the message would
/// stop the reducer at every start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_panics_the_fold_is_set_aside() -> Result<()> {
    let mut env = TestEnv::new("fold-panic").await?;
    let poison = env.job_id("poison");
    let splitter = env.start_splitter()?;
    let reducer = env.start_reducer_env(&[("BATCHQ_FAILPOINT_FOLD_PANIC", &poison)])?;
    env.start_worker(batchq_tests::WorkerOpts::default())?;
    let good = env
        .submit(&json!({
            "job_id": env.job_id("good"),
            "operation": "sha256",
            "range": {"start": 0, "end": 3000},
            "fragment_size": 100,
        }))
        .await?;
    env.submit(&json!({"job_id": poison, "operation": "noop", "range": {"start": 0, "end": 10}}))
        .await?;
    let status = env.wait_for_terminal(&good, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3000, 0);
    assert_sha_results(&env, &good, 3000).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = env.drain_dead().await?;
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        dead.len(),
        1,
        "the poison accept, and only it, is on {{ns}}.dead"
    );
    let reason = dead[0].header("x-batchq-error").unwrap_or_default();
    assert!(
        reason.contains("panicked") && reason.contains(&poison),
        "the reason names the panic: {reason}"
    );
    assert!(
        env.is_running(reducer),
        "the reducer never exited:\n{}",
        env.logs_tail()
    );
    assert!(env.is_running(splitter));
    env.finish().await?;
    Ok(())
}

/// The same in the splitter: a JobSpec whose handling panics goes to `{ns}.dead` with the
/// panic as its reason, the JobSpecs taken with it are handled, the splitter stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_panics_the_splitter_is_set_aside() -> Result<()> {
    let mut env = TestEnv::new("split-panic").await?;
    let poison = env.job_id("poison");
    let splitter = env.start_splitter_env(&[("BATCHQ_FAILPOINT_SPLIT_PANIC", &poison)])?;
    env.start_reducer()?;
    env.start_worker(batchq_tests::WorkerOpts::default())?;
    env.submit(&json!({"job_id": poison, "operation": "noop", "range": {"start": 0, "end": 10}}))
        .await?;
    let good = env
        .submit(&json!({
            "job_id": env.job_id("good"),
            "operation": "sha256",
            "range": {"start": 0, "end": 3000},
            "fragment_size": 100,
        }))
        .await?;
    let status = env.wait_for_terminal(&good, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3000, 0);
    let dead = env.drain_dead().await?;
    assert_eq!(
        dead.len(),
        1,
        "the poison JobSpec, and only it, is on {{ns}}.dead"
    );
    let reason = dead[0].header("x-batchq-error").unwrap_or_default();
    assert!(
        reason.contains("panicked") && reason.contains(&poison),
        "the reason names the panic: {reason}"
    );
    assert!(
        env.is_running(splitter),
        "the splitter never exited:\n{}",
        env.logs_tail()
    );
    env.finish().await?;
    Ok(())
}
