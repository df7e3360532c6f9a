//! The web console's queries over the reducer's RPC (`jobs_page`, `failures`, `job`), on jobs
//! the real binaries ran: a page of jobs newest first, by state and by literal id prefix, with
//! exact totals and counts by state; a job's failed operations paged and searched ignoring
//! case, as `batchctl results` shows them; and the JobSpec the job was accepted with.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use batchq_tests::{TestEnv, WorkerOpts, assert_counts};
use common::contract::{JobState, ResultLine};
use common::wire::{FailedItem, FailuresPage, JobDetail, JobsPage, Removal, Request, Response};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Items of the job whose operations fail: program names for `exec`, of which only `echo`
/// is allowed; the others are refused, each with an error naming it.
fn programs() -> Vec<String> {
    (0..1200)
        .map(|i| {
            if i % 10 == 0 {
                "echo".to_owned()
            } else if i % 3 == 0 {
                format!("Alpha-{i}")
            } else {
                format!("beta-{i}")
            }
        })
        .collect()
}

/// The failures of that job as the worker words them, by index.
fn expected_failures() -> Vec<FailedItem> {
    (0u64..)
        .zip(programs())
        .filter(|(_, program)| program != "echo")
        .map(|(index, program)| FailedItem {
            index,
            error: format!(
                "program {program:?} is not allowed on this worker (BATCHQ_EXEC_ALLOW: echo)"
            ),
        })
        .collect()
}

/// Those of `all` whose error contains `search`, ignoring ASCII case.
fn matching(all: &[FailedItem], search: &str) -> Vec<FailedItem> {
    let needle = search.to_ascii_lowercase();
    all.iter()
        .filter(|f| f.error.to_ascii_lowercase().contains(&needle))
        .cloned()
        .collect()
}

async fn ask(env: &TestEnv, request: Request) -> Result<Response> {
    env.rpc().call(&env.names, &request).await
}

async fn jobs_page(
    env: &TestEnv,
    state: Option<JobState>,
    prefix: Option<&str>,
    offset: u64,
    limit: u32,
) -> Result<JobsPage> {
    let request = Request::JobsPage {
        state,
        prefix: prefix.map(str::to_owned),
        offset,
        limit,
    };
    match ask(env, request).await? {
        Response::JobsPage(page) => Ok(page),
        other => bail!("unexpected reply to a jobs page: {other:?}"),
    }
}

async fn failures(
    env: &TestEnv,
    job_id: &str,
    search: Option<&str>,
    offset: u64,
    limit: u32,
) -> Result<FailuresPage> {
    let request = Request::Failures {
        job_id: job_id.to_owned(),
        search: search.map(str::to_owned),
        offset,
        limit,
    };
    match ask(env, request).await? {
        Response::Failures(page) => Ok(page),
        other => bail!("unexpected reply to a failures page: {other:?}"),
    }
}

async fn job(env: &TestEnv, job_id: &str) -> Result<JobDetail> {
    match ask(
        env,
        Request::Job {
            job_id: job_id.to_owned(),
        },
    )
    .await?
    {
        Response::Job(detail) => Ok(detail),
        other => bail!("unexpected reply to a job request: {other:?}"),
    }
}

/// Submits `spec` and waits until the reducer knows the job (accepted or rejected), so that
/// the jobs are submitted one after another, each later than the one before.
async fn submit_in_turn(env: &TestEnv, spec: Value) -> Result<String> {
    let job_id = env.submit(&spec).await?;
    env.wait_for_status(&job_id, JOB_TIMEOUT, |_| true).await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(job_id)
}

fn ids(page: &JobsPage) -> Vec<String> {
    page.jobs.iter().map(|j| j.job_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_filters_searches_and_shows_the_spec() -> Result<()> {
    let mut env = TestEnv::new("console").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker(WorkerOpts {
        exec_allow: Some("echo".into()),
        ..WorkerOpts::default()
    })?;
    env.wait_for_workers(1, Duration::from_secs(20)).await?;

    // Submitted in this order, so listed in the reverse one.
    let mixed = submit_in_turn(
        &env,
        json!({
            "job_id": env.job_id("mixed"),
            "operation": "exec",
            "params": {"command": ["{}", "x"]},
            "items": programs(),
            "fragment_size": 50,
            "max_concurrent_fragments": 3,
            "max_attempts": 1,
            "tolerated_failure_percent": 100,
        }),
    )
    .await?;
    let failed = submit_in_turn(
        &env,
        json!({
            "job_id": env.job_id("failed"),
            "operation": "sleep",
            "range": {"start": 0, "end": 4},
            "fragment_size": 4,
            "max_attempts": 1,
        }),
    )
    .await?;
    let rejected = submit_in_turn(
        &env,
        json!({"job_id": env.job_id("rejected"), "operation": "noop"}),
    )
    .await?;
    let cancelled = submit_in_turn(
        &env,
        json!({
            "job_id": env.job_id("cancelled"),
            "operation": "sleep",
            "params": {"ms": 60_000},
            "range": {"start": 0, "end": 1},
        }),
    )
    .await?;
    env.cancel(&cancelled).await?;
    // `pg_` and `pga`: a prefix `pg_` taken as a LIKE pattern would match both.
    let mut listed = Vec::new();
    for name in ["pg_0", "pga", "pg_1", "pg_2", "pg_3"] {
        listed.push(
            submit_in_turn(
                &env,
                json!({
                    "job_id": env.job_id(name),
                    "operation": "noop",
                    "range": {"start": 0, "end": 2},
                }),
            )
            .await?,
        );
    }
    let status = env.wait_for_terminal(&mixed, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 120, 1080);
    let status = env.wait_for_terminal(&failed, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    let status = env.wait_for_terminal(&cancelled, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    for job_id in &listed {
        let status = env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
        assert_counts(&status, JobState::Succeeded, 2, 0);
    }

    // --- the jobs page -----------------------------------------------------------------------
    let mut newest_first: Vec<String> = vec![
        mixed.clone(),
        failed.clone(),
        rejected.clone(),
        cancelled.clone(),
    ];
    newest_first.extend(listed.iter().cloned());
    newest_first.reverse();
    let by_state: BTreeMap<String, u64> = [
        ("cancelled", 1),
        ("failed", 1),
        ("rejected", 1),
        ("succeeded", 6),
    ]
    .into_iter()
    .map(|(state, n)| (state.to_owned(), n))
    .collect();
    let first = jobs_page(&env, None, None, 0, 4).await?;
    assert_eq!(ids(&first), newest_first[..4]);
    assert_eq!((first.total, &first.by_state), (9, &by_state));
    let second = jobs_page(&env, None, None, 4, 4).await?;
    assert_eq!(
        (ids(&second), second.total),
        (newest_first[4..8].to_vec(), 9)
    );
    let last = jobs_page(&env, None, None, 8, 4).await?;
    assert_eq!((ids(&last), last.total), (newest_first[8..].to_vec(), 9));
    assert_eq!(jobs_page(&env, None, None, 9, 4).await?.jobs, vec![]);
    // A limit is clamped to 1..=500.
    assert_eq!(
        ids(&jobs_page(&env, None, None, 0, 0).await?),
        newest_first[..1]
    );
    assert_eq!(
        ids(&jobs_page(&env, None, None, 0, 100_000).await?),
        newest_first
    );

    let succeeded = jobs_page(&env, Some(JobState::Succeeded), None, 0, 10).await?;
    let mut expected: Vec<String> = listed.iter().rev().cloned().collect();
    expected.push(mixed.clone());
    assert_eq!((ids(&succeeded), succeeded.total), (expected, 6));
    assert_eq!(succeeded.by_state, by_state, "counts whatever the filter");
    let only_failed = jobs_page(&env, Some(JobState::Failed), None, 0, 10).await?;
    assert_eq!(
        (ids(&only_failed), only_failed.total),
        (vec![failed.clone()], 1)
    );
    let none_running = jobs_page(&env, Some(JobState::Running), None, 0, 10).await?;
    assert_eq!((none_running.jobs.len(), none_running.total), (0, 0));

    let underscored: Vec<String> = [&listed[4], &listed[3], &listed[2], &listed[0]]
        .into_iter()
        .cloned()
        .collect();
    let prefixed = jobs_page(&env, None, Some("pg_"), 0, 10).await?;
    assert_eq!((ids(&prefixed), prefixed.total), (underscored.clone(), 4));
    let prefixed = jobs_page(&env, Some(JobState::Succeeded), Some("pg_"), 1, 2).await?;
    assert_eq!(
        (ids(&prefixed), prefixed.total),
        (underscored[1..3].to_vec(), 4)
    );
    let prefixed = jobs_page(&env, None, Some("pg"), 0, 10).await?;
    assert_eq!(prefixed.total, 5);
    let prefixed = jobs_page(&env, Some(JobState::Failed), Some("pg_"), 0, 10).await?;
    assert_eq!((prefixed.jobs.len(), prefixed.total), (0, 0));

    // --- a job's failures --------------------------------------------------------------------
    let all = expected_failures();
    assert_eq!(all.len(), 1080);
    let page = failures(&env, &mixed, None, 0, 100).await?;
    assert_eq!((page.failures.as_slice(), page.total), (&all[..100], 1080));
    let page = failures(&env, &mixed, None, 1000, 100).await?;
    assert_eq!((page.failures.as_slice(), page.total), (&all[1000..], 1080));
    assert_eq!(failures(&env, &mixed, None, 0, 0).await?.failures, all[..1]);
    let clamped = failures(&env, &mixed, None, 0, 10_000).await?;
    assert_eq!(
        (clamped.failures.as_slice(), clamped.total),
        (&all[..500], 1080)
    );

    let alpha = matching(&all, "ALPHA");
    assert_eq!(alpha.len(), 360);
    let page = failures(&env, &mixed, Some("ALPHA"), 0, 50).await?;
    assert_eq!((page.failures.as_slice(), page.total), (&alpha[..50], 360));
    let page = failures(&env, &mixed, Some("alpha"), 350, 50).await?;
    assert_eq!((page.failures.as_slice(), page.total), (&alpha[350..], 360));
    let beta_11 = matching(&all, "Beta-11");
    assert_eq!(beta_11.len(), 67);
    let page = failures(&env, &mixed, Some("Beta-11"), 0, 500).await?;
    assert_eq!((page.failures, page.total), (beta_11, 67));
    let page = failures(&env, &mixed, Some("BATCHQ_EXEC_ALLOW: echo"), 0, 1).await?;
    assert_eq!(page.total, 1080);
    let page = failures(&env, &mixed, Some("%"), 0, 10).await?;
    assert_eq!((page.failures.len(), page.total), (0, 0));

    // The failures are the errors `batchctl results` shows, one for one.
    let mut shown = Vec::new();
    for offset in [0, 500, 1000] {
        shown.extend(failures(&env, &mixed, None, offset, 500).await?.failures);
    }
    let errors: Vec<FailedItem> = env
        .results(&mixed)
        .await?
        .into_iter()
        .filter_map(|line| match line {
            ResultLine::Err { index, error } => Some(FailedItem { index, error }),
            ResultLine::Ok { .. } => None,
        })
        .collect();
    assert_eq!(shown, errors);
    assert_eq!(shown, all);

    let page = failures(&env, &failed, None, 0, 10).await?;
    assert_eq!(page.total, 4);
    assert!(
        page.failures
            .iter()
            .all(|f| f.error.contains("params.ms: missing")),
        "{page:?}"
    );
    let page = failures(&env, &listed[0], None, 0, 10).await?;
    assert_eq!((page.failures.len(), page.total), (0, 0));

    // --- a job and its spec ------------------------------------------------------------------
    let detail = job(&env, &mixed).await?;
    assert_counts(&detail.status, JobState::Succeeded, 120, 1080);
    let spec = detail.spec.unwrap_or_default();
    assert_eq!(spec["operation"], "exec");
    assert_eq!(spec["params"], json!({"command": ["{}", "x"]}));
    assert_eq!(spec["items"], json!({"count": 1200}));
    assert_eq!(spec["fragment_size"], 50);
    assert_eq!(spec["max_concurrent_fragments"], 3);
    assert_eq!(spec["max_attempts"], 1);
    assert_eq!(spec["tolerated_failure_percent"], 100.0);
    assert_eq!(spec["collect_results"], true);
    let detail = job(&env, &listed[0]).await?;
    let spec = detail.spec.unwrap_or_default();
    assert_eq!(spec["range"], json!({"start": 0, "end": 2}));
    assert_eq!(
        spec["max_concurrent_fragments"],
        common::jobspec::DEFAULT_MAX_CONCURRENT_FRAGMENTS
    );
    assert_eq!(spec["fragment_size"], Value::Null, "sized by the splitter");
    let detail = job(&env, &rejected).await?;
    assert_eq!(
        (detail.status.state, detail.spec),
        (JobState::Rejected, None)
    );

    // --- unknown and deleted jobs ------------------------------------------------------------
    let unknown = env.job_id("unknown");
    for request in [
        Request::Job {
            job_id: unknown.clone(),
        },
        Request::Failures {
            job_id: unknown.clone(),
            search: None,
            offset: 0,
            limit: 10,
        },
    ] {
        match ask(&env, request).await? {
            Response::NotFound { job_id } if job_id == unknown => {}
            other => bail!("unexpected reply about an unknown job: {other:?}"),
        }
    }
    let request = Request::Delete {
        job_id: mixed.clone(),
    };
    match ask(&env, request).await? {
        Response::Deleted { job_id } if job_id == mixed => {}
        other => bail!("unexpected reply to a delete: {other:?}"),
    }
    for request in [
        Request::Job {
            job_id: mixed.clone(),
        },
        Request::Failures {
            job_id: mixed.clone(),
            search: None,
            offset: 0,
            limit: 10,
        },
    ] {
        match ask(&env, request).await? {
            Response::Gone(tombstone)
                if tombstone.job_id == mixed && tombstone.how == Removal::Deleted => {}
            other => bail!("unexpected reply about a deleted job: {other:?}"),
        }
    }
    let after = jobs_page(&env, None, None, 0, 100).await?;
    let mut expected = newest_first.clone();
    expected.retain(|id| id != &mixed);
    assert_eq!((ids(&after), after.total), (expected, 8));
    assert_eq!(after.by_state.get("succeeded"), Some(&5));
    env.finish().await
}
