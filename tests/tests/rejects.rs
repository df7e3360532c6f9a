//! Every malformed JobSpec is rejected with a reason that names the problem, its original is
//! kept on `{ns}.dead`, and nothing else is disturbed: a good job published right after each
//! one still succeeds.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use batchq_tests::{RawProps, TestEnv, assert_counts};
use common::contract::JobState;
use serde_json::json;

/// One malformed message.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    content_type: Option<&'static str>,
    /// The `job_id` inside the body, when it is a usable one; otherwise the rejection goes
    /// under the message's `message_id`.
    body_job_id: Option<String>,
    /// Words the rejection's error must contain (the field and the problem).
    error_mentions: &'static [&'static str],
}

fn case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    error_mentions: &'static [&'static str],
) -> Case {
    Case {
        name,
        body: body.into(),
        content_type: Some("application/json"),
        body_job_id: None,
        error_mentions,
    }
}

/// A case whose body is a JSON object with a usable `job_id` plus `fields`.
fn spec_case(
    name: &'static str,
    job_id: &str,
    fields: serde_json::Value,
    error_mentions: &'static [&'static str],
) -> Case {
    let mut object = serde_json::Map::new();
    object.insert("job_id".into(), json!(job_id));
    if let serde_json::Value::Object(fields) = fields {
        object.extend(fields);
    }
    Case {
        name,
        body: serde_json::to_vec(&object).expect("a JSON object serialises"),
        content_type: Some("application/json"),
        body_job_id: Some(job_id.to_owned()),
        error_mentions,
    }
}

fn cases(env: &TestEnv) -> Vec<Case> {
    let id = |name: &str| env.job_id(name);
    vec![
        case("not-json", &b"{\"job_id\": \"x\", oops"[..], &["JSON"]),
        case("not-utf8", &b"{\"job_id\": \"\xff\xfe\"}"[..], &["UTF-8"]),
        case("not-object", &b"[1]"[..], &["object"]),
        spec_case(
            "unknown-field",
            &id("unknown-field"),
            json!({"operation": "noop", "items": [1], "colour": "red"}),
            &["colour"],
        ),
        spec_case(
            "wrong-type",
            &id("wrong-type"),
            json!({"operation": "noop", "items": [1], "fragment_size": "big"}),
            &["fragment_size"],
        ),
        spec_case(
            "items-not-array",
            &id("items-not-array"),
            json!({"operation": "noop", "items": {"a": 1}}),
            &["items"],
        ),
        spec_case(
            "missing-operation",
            &id("missing-operation"),
            json!({"items": [1]}),
            &["operation"],
        ),
        spec_case(
            "both-inputs",
            &id("both-inputs"),
            json!({"operation": "noop", "items": [1], "range": {"start": 0, "end": 1}}),
            &["items", "range"],
        ),
        spec_case(
            "no-input",
            &id("no-input"),
            json!({"operation": "noop"}),
            &["items", "range"],
        ),
        spec_case(
            "end-before-start",
            &id("end-before-start"),
            json!({"operation": "noop", "range": {"start": 10, "end": 3}}),
            &["range", "end"],
        ),
        spec_case(
            "fragment-size-0",
            &id("fragment-size-0"),
            json!({"operation": "noop", "items": [1], "fragment_size": 0}),
            &["fragment_size"],
        ),
        spec_case(
            "negative-window",
            &id("negative-window"),
            json!({"operation": "noop", "items": [1], "max_concurrent_fragments": -1}),
            &["max_concurrent_fragments"],
        ),
        spec_case(
            "short-lifespan",
            &id("short-lifespan"),
            json!({"operation": "noop", "items": [1], "lifespan_ms": 99}),
            &["lifespan_ms"],
        ),
        spec_case(
            "tolerance-over-100",
            &id("tolerance-over-100"),
            json!({"operation": "noop", "items": [1], "tolerated_failure_percent": 100.5}),
            &["tolerated_failure_percent"],
        ),
        case(
            "job-id-with-space",
            serde_json::to_vec(&json!({"job_id": "has space", "operation": "noop", "items": [1]}))
                .expect("serialises"),
            &["job_id"],
        ),
        case(
            "job-id-129-chars",
            serde_json::to_vec(
                &json!({"job_id": "a".repeat(129), "operation": "noop", "items": [1]}),
            )
            .expect("serialises"),
            &["job_id"],
        ),
        case(
            "job-id-not-string",
            &br#"{"job_id": 12, "operation": "noop", "items": [1]}"#[..],
            &["job_id"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_specs_are_rejected_and_kept_on_dead() -> Result<()> {
    let mut env = TestEnv::new("rejects").await?;
    let log = env.subscribe_status().await?;
    env.start_spine(1)?;
    let cases = cases(&env);

    // Each bad message, then a good job right behind it.
    let mut expected = Vec::new();
    let mut good_jobs = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let message_id = env.job_id(&format!("msg-{}", case.name));
        let props = RawProps {
            content_type: case.content_type.map(str::to_owned),
            message_id: Some(message_id.clone()),
        };
        env.submit_raw(&case.body, props).await?;
        let rejected_as = case.body_job_id.clone().unwrap_or(message_id.clone());
        expected.push((case, rejected_as, message_id));
        good_jobs.push(
            env.submit(&json!({
                "job_id": env.job_id(&format!("good-after-{}", case.name)),
                "operation": "noop",
                "items": [n],
            }))
            .await?,
        );
    }
    // Not JSON and no message_id: rejected under a generated id.
    let anonymous = b"definitely not json".to_vec();
    env.submit_raw(&anonymous, RawProps::json()).await?;

    for job_id in &good_jobs {
        let status = env
            .wait_for_terminal(job_id, Duration::from_secs(30))
            .await?;
        assert_counts(&status, JobState::Succeeded, 1, 0);
    }

    for (case, job_id, _) in &expected {
        let status = env
            .wait_for_terminal(job_id, Duration::from_secs(10))
            .await
            .with_context(|| format!("case {}", case.name))?;
        assert_eq!(
            status.state,
            JobState::Rejected,
            "case {}: {status:?}",
            case.name
        );
        let error = status.error.clone().unwrap_or_default();
        for word in case.error_mentions {
            assert!(
                error.contains(word),
                "case {}: the error {error:?} should name {word:?}",
                case.name
            );
        }
        assert_eq!(
            (status.ops_total, status.ops_succeeded, status.ops_failed),
            (0, 0, 0),
            "case {}",
            case.name
        );
        let published = log
            .wait_for(job_id, Duration::from_secs(10), |s| {
                s.state == JobState::Rejected
            })
            .await?;
        assert_eq!(published.error, status.error, "case {}", case.name);
        assert!(
            log.of(job_id)
                .iter()
                .all(|(key, _)| key == &format!("job.{job_id}.rejected")),
            "case {}: {:?}",
            case.name,
            log.of(job_id)
        );
    }

    // The anonymous rejection is on the exchange under an id of its own.
    let known: Vec<&String> = expected
        .iter()
        .map(|(_, id, _)| id)
        .chain(&good_jobs)
        .collect();
    let anonymous_status = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = log
                .all()
                .into_iter()
                .filter_map(|e| e.status.ok())
                .find(|s| s.state == JobState::Rejected && !known.contains(&&s.job_id));
            if let Some(found) = found {
                break found;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no anonymous rejection seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        anonymous_status
            .error
            .as_deref()
            .unwrap_or("")
            .contains("JSON")
    );
    assert!(!anonymous_status.job_id.is_empty());

    // Every original is on {ns}.dead, byte for byte, with the reason in a header.
    let dead = env.drain_dead().await?;
    assert_eq!(
        dead.len(),
        cases.len() + 1,
        "one dead copy per bad message: {dead:#?}"
    );
    let mut by_body: BTreeMap<&[u8], _> = BTreeMap::new();
    for message in &dead {
        by_body.insert(message.body.as_slice(), message);
    }
    for (case, job_id, message_id) in &expected {
        let message = by_body
            .get(case.body.as_slice())
            .with_context(|| format!("case {}: original not on {{ns}}.dead", case.name))?;
        assert_eq!(
            message.message_id.as_deref(),
            Some(message_id.as_str()),
            "case {}",
            case.name
        );
        let reason = message
            .header("x-batchq-error")
            .with_context(|| format!("case {}: no x-batchq-error header", case.name))?;
        let status = env.status(job_id).await?.context("rejected job known")?;
        assert_eq!(Some(reason), status.error.as_deref(), "case {}", case.name);
    }
    assert!(by_body.contains_key(anonymous.as_slice()));

    // The reducer's job list holds exactly these jobs.
    let jobs = env.rpc().jobs(&env.names, 1000).await?;
    let rejected = jobs
        .iter()
        .filter(|s| s.state == JobState::Rejected)
        .count();
    let succeeded = jobs
        .iter()
        .filter(|s| s.state == JobState::Succeeded)
        .count();
    assert_eq!(
        (rejected, succeeded, jobs.len()),
        (cases.len() + 1, cases.len(), 2 * cases.len() + 1)
    );
    env.finish().await
}
