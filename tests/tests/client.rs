//! The Rust client (`batchq-client`) against the real binaries: what a user's program gets
//! when it submits, watches, reads results, cancels and deletes, and the errors it is told.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use batchq_client::{Client, ClientError, JobState, JobStatus, ResultLine, StreamExt};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts, sha256_hex};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// `future`, or an error naming `what` after `JOB_TIMEOUT`.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(JOB_TIMEOUT, future)
        .await
        .with_context(|| format!("{what}: no outcome within {} s", JOB_TIMEOUT.as_secs()))
}

fn client(env: &TestEnv) -> Client {
    Client::from_broker(env.broker().clone())
}

/// Every status of `statuses` until the stream ends.
async fn collect_statuses(
    what: &str,
    statuses: impl futures::Stream<Item = Result<JobStatus, ClientError>>,
) -> Result<Vec<JobStatus>> {
    let collected: Vec<_> = within(what, statuses.collect::<Vec<_>>()).await?;
    collected
        .into_iter()
        .map(|s| s.map_err(anyhow::Error::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_streams_statuses_to_the_end_and_results_in_index_order() -> Result<()> {
    let mut env = TestEnv::new("client-submit").await?;
    env.start_spine(2)?;
    let client = client(&env);

    let job_id = env.job_id("sums");
    let submitted = client
        .submit(&json!({
            "job_id": job_id,
            "operation": "sha256",
            "params": {"rounds": 3},
            "range": {"start": 100, "end": 160},
            "fragment_size": 7,
            "max_concurrent_fragments": 2,
        }))
        .await?;
    assert_eq!(submitted, job_id, "the spec's own id is kept");

    let statuses = collect_statuses("the watch", client.watch_submitted(&job_id)).await?;
    let last = statuses.last().context("the watch gave no status")?;
    assert_counts(last, JobState::Succeeded, 60, 0);
    let done: Vec<u64> = statuses
        .iter()
        .map(|s| s.ops_succeeded + s.ops_failed)
        .collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "counts never move back: {done:?}"
    );
    assert!(
        statuses[..statuses.len() - 1]
            .iter()
            .all(|s| !s.state.is_terminal()),
        "only the last status is terminal: {statuses:?}"
    );
    assert_eq!(client.status(&job_id).await?, *last);

    // A results page of 60 lines, in index order, each the sha256 of its item.
    let lines: Vec<ResultLine> = within("the results", client.results(&job_id).collect::<Vec<_>>())
        .await?
        .into_iter()
        .collect::<Result<_, _>>()?;
    let expected: Vec<ResultLine> = (0..60u64)
        .map(|index| ResultLine::Ok {
            index,
            result: Value::String(sha256_hex(&(100 + index).to_string(), 3)),
        })
        .collect();
    assert_eq!(lines, expected);

    // The job is listed by its state and prefix; then deleted, it is gone.
    let listed = client
        .jobs(Some(JobState::Succeeded), Some(&job_id), 10)
        .await?;
    assert_eq!(
        listed.iter().map(|s| s.job_id.as_str()).collect::<Vec<_>>(),
        [job_id.as_str()]
    );
    assert!(
        client
            .jobs(Some(JobState::Failed), Some(&job_id), 10)
            .await?
            .is_empty()
    );
    match client.redrive(&job_id).await {
        Err(ClientError::NotRedrivable { state, .. }) => assert_eq!(state, JobState::Succeeded),
        other => panic!("redrive of a succeeded job: {other:?}"),
    }
    client.delete(&job_id).await?;
    match client.status(&job_id).await {
        Err(ClientError::Gone(tombstone)) => assert_eq!(tombstone.job_id, job_id),
        other => panic!("status of a deleted job: {other:?}"),
    }
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_running_job_and_delete_waits_for_the_end() -> Result<()> {
    let mut env = TestEnv::new("client-cancel").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts::prefetch(1))?;
    let client = client(&env);

    // 200 sleeps of 100 ms, one at a time: 20 s unless cancelled.
    let job_id = client
        .submit(&json!({
            "operation": "sleep",
            "params": {"ms": 100},
            "range": {"start": 0, "end": 200},
            "fragment_size": 1,
            "max_concurrent_fragments": 1,
        }))
        .await?;
    let mut statuses = client.watch_submitted(&job_id);
    let running = within("the job's start", async {
        while let Some(status) = statuses.next().await {
            let status = status?;
            if status.state == JobState::Running && status.ops_succeeded > 0 {
                return Ok::<_, ClientError>(status);
            }
        }
        Err(ClientError::Unexpected(
            "the watch ended before the job ran".into(),
        ))
    })
    .await??;
    assert!(running.ops_succeeded < 200);

    match client.delete(&job_id).await {
        Err(ClientError::StillRunning(id)) => assert_eq!(id, job_id),
        other => panic!("delete of a running job: {other:?}"),
    }
    client.cancel(&job_id).await?;
    let rest = collect_statuses("the cancelled job's end", statuses).await?;
    let last = rest.last().context("no status after the cancel")?;
    assert_eq!(last.state, JobState::Cancelled, "{last:?}");
    assert!(last.ops_succeeded < 200, "{last:?}");

    match client.cancel(&job_id).await {
        Err(ClientError::AlreadyEnded { state, .. }) => assert_eq!(state, JobState::Cancelled),
        other => panic!("cancel of a cancelled job: {other:?}"),
    }
    client.delete(&job_id).await?;
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_spec_names_its_field_and_an_unknown_job_is_an_error() -> Result<()> {
    let mut env = TestEnv::new("client-errors").await?;
    // A reducer to answer, and no splitter: what is published stays on {ns}.jobs.
    env.start_reducer()?;
    let client = client(&env);
    let jobs_queue = env.broker().names().jobs();

    let rejected = client
        .submit(&json!({
            "operation": "noop",
            "range": {"start": 0, "end": 10},
            "fragment_size": 0,
        }))
        .await;
    match rejected {
        Err(ClientError::SpecRejected { field, reason }) => {
            assert_eq!(field, "fragment_size");
            assert!(reason.starts_with("fragment_size: "), "{reason}");
        }
        other => panic!("a spec with fragment_size 0: {other:?}"),
    }
    let unknown_field = client
        .submit_json(br#"{"operation": "noop", "items": [], "colour": "red"}"#)
        .await;
    assert!(
        matches!(&unknown_field, Err(ClientError::SpecRejected { field, .. }) if field == "colour"),
        "{unknown_field:?}"
    );
    assert_eq!(env.queue_depth(&jobs_queue).await?, 0, "nothing published");
    // A valid spec is published (and waits there, as no splitter runs).
    let waiting = client
        .submit(&json!({"operation": "noop", "items": [1, 2]}))
        .await?;
    assert_eq!(env.queue_depth(&jobs_queue).await?, 1);

    let unknown = env.job_id("never-submitted");
    match client.status(&unknown).await {
        Err(ClientError::UnknownJob(id)) => assert_eq!(id, unknown),
        other => panic!("status of an unknown job: {other:?}"),
    }
    let mut watch = client.watch(&unknown);
    match within("a watch of an unknown job", watch.next()).await? {
        Some(Err(ClientError::UnknownJob(id))) => assert_eq!(id, unknown),
        other => panic!("watch of an unknown job: {other:?}"),
    }
    assert!(watch.next().await.is_none(), "an error ends the watch");
    let error = client.cancel(&waiting).await.expect_err("not accepted yet");
    assert_eq!(error.to_string(), format!("unknown job {waiting}"));
    env.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_said_so_promptly() -> Result<()> {
    let started = std::time::Instant::now();
    let outcome = within(
        "connecting to nothing",
        Client::connect_url("amqp://guest:secret@127.0.0.1:1/%2f", "t-client-nowhere"),
    )
    .await?;
    let error = match outcome {
        Err(error) => error,
        Ok(_) => anyhow::bail!("connected to a port nothing listens on"),
    };
    ensure!(
        matches!(error, ClientError::Unreachable(_)),
        "unreachable: {error:?}"
    );
    assert!(error.is_retryable());
    let text = error.to_string();
    assert!(text.contains("127.0.0.1:1"), "names the broker: {text}");
    assert!(!text.contains("secret"), "hides the password: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}
