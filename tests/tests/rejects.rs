//! Every malformed JobSpec is rejected with a reason that names the problem, its original is
//! kept on `{ns}.dead`, and nothing else is disturbed: a good job running throughout ends with
//! exact counts, a good job published right after each one still succeeds, and so does one
//! published behind a burst of 10,000 bad messages. A job of 2^53 − 1 operations, the most
//! the contract allows, is accepted and reported with that exact count.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use batchq_tests::{RawProps, TestEnv, assert_counts};
use common::broker::json_properties;
use common::contract::JobState;
use common::jobspec::{DEFAULT_CONSUMER_TIMEOUT_MS, MAX_OPS_TOTAL, MAX_VALUE_DEPTH};
use common::topology::KEY_SUBMIT;
use serde_json::json;

/// The splitter's default `BATCHQ_MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A JobSpec body padded with trailing whitespace (still valid JSON) to exactly `len` bytes.
fn padded_spec(spec: &serde_json::Value, len: usize) -> Vec<u8> {
    let mut body = serde_json::to_vec(spec).expect("a JSON object serialises");
    assert!(
        body.len() <= len,
        "the spec alone is longer than {len} bytes"
    );
    body.resize(len, b' ');
    body
}

/// `depth` arrays, one inside the other.
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

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

/// A case whose body is the JSON text `{"job_id": job_id, <fields>}`, for numbers that
/// `serde_json::json!` cannot write (past u64).
fn text_case(
    name: &'static str,
    job_id: &str,
    fields: &str,
    error_mentions: &'static [&'static str],
) -> Case {
    Case {
        name,
        body: format!(r#"{{"job_id": "{job_id}", {fields}}}"#).into_bytes(),
        content_type: Some("application/json"),
        body_job_id: Some(job_id.to_owned()),
        error_mentions,
    }
}

/// Ranges and numbers out of bounds (issue 11): each refused with an error naming the field,
/// without an overflow anywhere on the way.
fn out_of_range_cases(env: &TestEnv) -> Vec<Case> {
    let id = |name: &str| env.job_id(name);
    let limit = MAX_OPS_TOTAL as i64;
    vec![
        // `accepted` used to say ops_total 18446744073709551615 and `running`
        // 9223372036854775807.
        spec_case(
            "range-whole-i64",
            &id("range-whole-i64"),
            json!({"operation": "noop", "range": {"start": i64::MIN, "end": i64::MAX}}),
            &[
                "range",
                "holds 18446744073709551615 operations",
                "at most 9007199254740991",
            ],
        ),
        // 2^53 operations: one more than the contract allows.
        spec_case(
            "range-2-pow-53",
            &id("range-2-pow-53"),
            json!({"operation": "noop", "range": {"start": 0, "end": limit + 1}}),
            &[
                "range",
                "holds 9007199254740992 operations",
                "at most 9007199254740991",
            ],
        ),
        spec_case(
            "range-2-pow-53-negative-start",
            &id("range-2-pow-53-negative-start"),
            json!({"operation": "noop", "range": {"start": -1, "end": limit}}),
            &["range", "holds 9007199254740992 operations"],
        ),
        spec_case(
            "range-negative-start-huge-end",
            &id("range-negative-start-huge-end"),
            json!({"operation": "noop", "range": {"start": -5, "end": i64::MAX}}),
            &["range", "holds 9223372036854775812 operations"],
        ),
        spec_case(
            "range-min-to-zero",
            &id("range-min-to-zero"),
            json!({"operation": "noop", "range": {"start": i64::MIN, "end": 0}}),
            &["range", "holds 9223372036854775808 operations"],
        ),
        spec_case(
            "range-backwards-across-i64",
            &id("range-backwards-across-i64"),
            json!({"operation": "noop", "range": {"start": i64::MAX, "end": i64::MIN}}),
            &["range", "less than start"],
        ),
        spec_case(
            "range-end-past-i64",
            &id("range-end-past-i64"),
            json!({"operation": "noop", "range": {"start": 0, "end": 9_223_372_036_854_775_808_u64}}),
            &["range.end", "9223372036854775808"],
        ),
        spec_case(
            "range-start-not-integer",
            &id("range-start-not-integer"),
            json!({"operation": "noop", "range": {"start": 0.5, "end": 10}}),
            &["range.start"],
        ),
        text_case(
            "fragment-size-past-u64",
            &id("fragment-size-past-u64"),
            r#""operation": "noop", "items": [1], "fragment_size": 18446744073709551616"#,
            &["fragment_size"],
        ),
        spec_case(
            "max-attempts-i64-max",
            &id("max-attempts-i64-max"),
            json!({"operation": "noop", "items": [1], "max_attempts": i64::MAX}),
            &["max_attempts", "at most 100"],
        ),
        spec_case(
            "window-i64-min",
            &id("window-i64-min"),
            json!({"operation": "noop", "items": [1], "max_concurrent_fragments": i64::MIN}),
            &["max_concurrent_fragments", "at least 1"],
        ),
    ]
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
        spec_case(
            "negative-fragment-size",
            &id("negative-fragment-size"),
            json!({"operation": "noop", "items": [1], "fragment_size": -5}),
            &["fragment_size", "at least 1"],
        ),
        spec_case(
            "window-0",
            &id("window-0"),
            json!({"operation": "noop", "items": [1], "max_concurrent_fragments": 0}),
            &["max_concurrent_fragments", "at least 1"],
        ),
        spec_case(
            "negative-range-end",
            &id("negative-range-end"),
            json!({"operation": "noop", "range": {"start": 0, "end": -1}}),
            &["range", "end"],
        ),
        // Over a third of the broker's consumer_timeout (the splitter's default, 30 min).
        spec_case(
            "lifespan-over-consumer-timeout",
            &id("lifespan-over-consumer-timeout"),
            json!({"operation": "noop", "items": [1], "lifespan_ms": DEFAULT_CONSUMER_TIMEOUT_MS / 3 + 1}),
            &["lifespan_ms", "at most 600000", "consumer_timeout"],
        ),
        // One level deeper than an item may nest, well inside serde_json's own limit.
        spec_case(
            "item-nested-too-deep",
            &id("item-nested-too-deep"),
            json!({
                "operation": "noop",
                "items": [1, serde_json::from_str::<serde_json::Value>(&nested_arrays(MAX_VALUE_DEPTH + 1))
                    .expect("nested arrays parse")],
            }),
            &["items[1]", "levels deep"],
        ),
        // 10,000 nested arrays: serde_json's recursion limit stops the parse, the splitter
        // neither crashes nor overflows its stack, and the body's job_id is never read.
        case(
            "body-nested-10000-deep",
            format!(
                r#"{{"job_id": "deep", "operation": "noop", "items": [{}]}}"#,
                nested_arrays(10_000)
            ),
            &["levels deep"],
        ),
        Case {
            content_type: Some("text/plain"),
            ..case(
                "text-plain",
                serde_json::to_vec(&json!({"operation": "noop", "items": [1]}))
                    .expect("serialises"),
                &["content_type", "text/plain"],
            )
        },
        Case {
            content_type: Some("application/xml"),
            ..case(
                "xml",
                &b"<job><operation>noop</operation></job>"[..],
                &["content_type", "application/xml"],
            )
        },
        // One byte over the limit: refused before it is parsed, so under the message_id.
        case(
            "over-size-limit",
            padded_spec(
                &json!({"job_id": "big", "operation": "noop", "items": [1]}),
                MAX_MESSAGE_BYTES + 1,
            ),
            &["16777217 bytes", "limit is 16777216"],
        ),
    ]
    .into_iter()
    .chain(out_of_range_cases(env))
    .collect()
}

/// A good job that runs through all the bad input: 200 `sleep`s of 100 ms, two fragments of
/// four at a time, so about 10 s, many times what the rejections take. Its range starts below
/// zero, so its items are not its indices.
fn long_good_job(job_id: &str) -> serde_json::Value {
    json!({
        "job_id": job_id,
        "operation": "sleep",
        "params": {"ms": 100},
        "range": {"start": -100, "end": 100},
        "fragment_size": 4,
        "max_concurrent_fragments": 2,
    })
}
const LONG_JOB_OPS: u64 = 200;
const LONG_JOB_FRAGMENTS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_specs_are_rejected_and_kept_on_dead() -> Result<()> {
    let mut env = TestEnv::new("rejects").await?;
    let log = env.subscribe_status().await?;
    env.start_spine(1)?;
    let cases = cases(&env);

    // A good job is running before the first bad message and must still be running after
    // the last rejection.
    let long_job = env
        .submit(&long_good_job(&env.job_id("runs-throughout")))
        .await?;
    log.wait_for(&long_job, Duration::from_secs(30), |s| {
        s.state == JobState::Running
    })
    .await?;

    // The largest job the contract allows is accepted with its exact count, from a negative
    // start (then cancelled: it would run for centuries).
    let largest = env.job_id("largest");
    let half = 1_i64 << 52;
    env.submit(&json!({
        "job_id": largest,
        "operation": "noop",
        "range": {"start": -half, "end": half - 1},
        "max_concurrent_fragments": 2,
        "collect_results": false,
    }))
    .await?;

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

    let running = log
        .wait_for(&largest, Duration::from_secs(30), |s| {
            s.state == JobState::Running
        })
        .await?;
    assert_eq!(running.ops_total, MAX_OPS_TOTAL, "{running:?}");
    env.cancel(&largest).await?;
    let cancelled = env
        .wait_for_terminal(&largest, Duration::from_secs(30))
        .await?;
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    assert!(
        cancelled.ops_succeeded > 0 && cancelled.ops_failed == 0,
        "{cancelled:?}"
    );
    // Every status of the job, on the exchange and from the reducer, says the same count.
    log.wait_for(&largest, Duration::from_secs(10), |s| {
        s.state == JobState::Cancelled
    })
    .await?;
    let published = log.of(&largest);
    assert!(
        published.iter().any(|(_, s)| s.state == JobState::Accepted),
        "{published:?}"
    );
    for (key, status) in &published {
        assert_eq!(status.ops_total, MAX_OPS_TOTAL, "{key}: {status:?}");
    }
    assert_eq!(cancelled.ops_total, MAX_OPS_TOTAL);

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
    // Bodies are left out of the failure message: one of them is 16 MiB.
    let summary: Vec<(usize, Option<&str>)> = dead
        .iter()
        .map(|m| (m.body.len(), m.header("x-batchq-error")))
        .collect();
    assert_eq!(
        dead.len(),
        cases.len() + 1,
        "one dead copy per bad message (body length, reason): {summary:#?}"
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

    // The job that ran throughout succeeded with exact counts, and finished only after the
    // last rejection was published: it ran while every bad message was handled.
    let finished = log
        .wait_for(&long_job, Duration::from_secs(60), |s| {
            s.state.is_terminal()
        })
        .await?;
    assert_counts(&finished, JobState::Succeeded, LONG_JOB_OPS, 0);
    assert_eq!(finished.fragments_done, LONG_JOB_FRAGMENTS, "{finished:?}");
    let received = |job_id: &str, state: JobState| {
        log.all()
            .into_iter()
            .filter(|e| {
                e.status
                    .as_ref()
                    .is_ok_and(|s| s.job_id == job_id && s.state == state)
            })
            .map(|e| e.received)
            .next()
    };
    let long_job_ended = received(&long_job, JobState::Succeeded).context("long job ended")?;
    for (case, job_id, _) in &expected {
        let rejected = received(job_id, JobState::Rejected).context("rejection seen")?;
        assert!(
            rejected < long_job_ended,
            "case {}: rejected {:?} after the long job ended",
            case.name,
            rejected - long_job_ended
        );
    }
    let results = env.results(&long_job).await?;
    assert_eq!(results.len() as u64, LONG_JOB_OPS);

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
    // The good job behind each case and the long one; the largest job, cancelled.
    assert_eq!(
        (rejected, succeeded, jobs.len()),
        (cases.len() + 1, cases.len() + 1, 2 * cases.len() + 3)
    );
    env.finish().await
}

/// A message of exactly `BATCHQ_MAX_MESSAGE_BYTES` is accepted: the limit is inclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_at_the_size_limit_is_accepted() -> Result<()> {
    let mut env = TestEnv::new("rejects-size").await?;
    env.start_spine(1)?;
    let job_id = env.job_id("at-limit");
    let body = padded_spec(
        &json!({"job_id": job_id, "operation": "noop", "items": [1, 2, 3]}),
        MAX_MESSAGE_BYTES,
    );
    env.submit_raw(&body, RawProps::json()).await?;
    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(60))
        .await?;
    assert_counts(&status, JobState::Succeeded, 3, 0);
    assert_eq!(env.queue_depth(&env.names.dead()).await?, 0);
    env.finish().await
}

/// Malformed bodies of several kinds, the reason each must give, and whether it carries a
/// `message_id` (those without one are rejected under a generated id).
fn burst_message(n: usize) -> (Vec<u8>, &'static str, Option<String>) {
    let message_id = n.is_multiple_of(2).then(|| format!("burst-{n}"));
    let (body, reason) = match n % 5 {
        0 => (format!("not json {n}").into_bytes(), "not valid JSON"),
        1 => (format!("[{n}]").into_bytes(), "JSON object"),
        2 => (
            format!(r#"{{"operation": "noop", "items": [{n}], "colour": "red"}}"#).into_bytes(),
            "colour",
        ),
        3 => (format!(r#"{{"items": [{n}]}}"#).into_bytes(), "operation"),
        _ => (
            format!(r#"{{"operation": "noop", "range": {{"start": {n}, "end": 0}}}}"#).into_bytes(),
            "range",
        ),
    };
    (body, reason, message_id)
}

/// How long a small good job may take behind the burst, from its publish to `succeeded`. The
/// queue is first in, first out, so the job waits for every bad message ahead of it: each costs
/// the splitter a commit share and two outbox messages (the reducer's `rejected` and the dead
/// copy) and the reducer one status. Measured: about 2 s with release binaries, 5-10 s with
/// debug binaries on 2 busy CPUs. The bound catches a gross per-message cost (a synced commit
/// per rejection adds tens of seconds), not small regressions; the printed figures show those.
const GOOD_JOB_BOUND: Duration = Duration::from_secs(45);

/// 10,000 malformed messages, then a small good job: every one of them is rejected with a
/// reason and kept on `{ns}.dead`, and the good job behind them still succeeds promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_malformed_messages_does_not_hold_up_good_jobs() -> Result<()> {
    const BURST: usize = 10_000;
    let mut env = TestEnv::new("rejects-burst").await?;
    let log = env.subscribe_status().await?;
    env.start_spine(1)?;

    // How long a good job takes on an idle deployment (this also waits for the worker).
    let warm_up = env.job_id("warm-up");
    let started = Instant::now();
    env.submit(&json!({"job_id": warm_up, "operation": "noop", "items": [1, 2]}))
        .await?;
    let status = env
        .wait_for_terminal(&warm_up, Duration::from_secs(60))
        .await?;
    assert_counts(&status, JobState::Succeeded, 2, 0);
    let idle_latency = started.elapsed();

    // The burst, on a confirmed publisher of its own: publishes pipelined, confirms awaited a
    // thousand at a time.
    let publisher = env.broker().publisher().await?;
    let jobs = env.names.jobs();
    let burst_started = Instant::now();
    let mut pending = Vec::new();
    for n in 0..BURST {
        let (body, _, message_id) = burst_message(n);
        let mut properties = json_properties();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        pending.push(
            publisher
                .start_with(&jobs, KEY_SUBMIT, &body, properties, true)
                .await?,
        );
        if pending.len() == 1000 {
            tokio::time::timeout(
                Duration::from_secs(30),
                common::broker::wait_all(std::mem::take(&mut pending)),
            )
            .await
            .context("confirms of the burst timed out")??;
        }
    }
    tokio::time::timeout(Duration::from_secs(30), common::broker::wait_all(pending))
        .await
        .context("confirms of the burst timed out")??;
    let published_in = burst_started.elapsed();

    // A small good job right behind the burst.
    let good = env.job_id("after-burst");
    let good_published = Instant::now();
    env.submit(&json!({"job_id": good, "operation": "noop", "items": [1, 2, 3]}))
        .await?;

    // The splitter is through the burst when the last dead copy is on {ns}.dead. It publishes
    // in commit order, so that happens before the good job (behind the burst) can succeed.
    let dead_queue = env.names.dead();
    let deadline = Instant::now() + GOOD_JOB_BOUND;
    let mut depth = env.queue_depth(&dead_queue).await?;
    while (depth as usize) < BURST && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        depth = env.queue_depth(&dead_queue).await?;
    }
    let splitter_done_in = burst_started.elapsed();
    assert_eq!(depth as usize, BURST, "one dead copy per malformed message");

    let status = env
        .wait_for_terminal(&good, GOOD_JOB_BOUND)
        .await
        .context("the good job behind the burst")?;
    let good_latency = good_published.elapsed();
    assert_counts(&status, JobState::Succeeded, 3, 0);

    // The reducer published one `rejected` status per message.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rejected = loop {
        let rejected: BTreeSet<String> = log
            .all()
            .into_iter()
            .filter_map(|e| e.status.ok())
            .filter(|s| s.state == JobState::Rejected && s.error.is_some())
            .map(|s| s.job_id)
            .collect();
        if rejected.len() >= BURST || Instant::now() >= deadline {
            break rejected;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let statuses_in = burst_started.elapsed();
    assert_eq!(
        rejected.len(),
        BURST,
        "one rejected job per malformed message"
    );
    for n in (0..BURST).step_by(2) {
        assert!(
            rejected.contains(&format!("burst-{n}")),
            "burst-{n} rejected under its message_id"
        );
    }

    let dead = env.drain_dead().await?;
    assert_eq!(dead.len(), BURST);
    let mut by_body: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    for message in &dead {
        let reason = message
            .header("x-batchq-error")
            .filter(|r| !r.is_empty())
            .with_context(|| {
                format!(
                    "no x-batchq-error on {}",
                    String::from_utf8_lossy(&message.body)
                )
            })?;
        by_body.insert(message.body.clone(), reason.to_owned());
    }
    for n in 0..BURST {
        let (body, expected, _) = burst_message(n);
        let reason = by_body
            .get(&body)
            .with_context(|| format!("message {n} not on {{ns}}.dead"))?;
        assert!(
            reason.contains(expected),
            "message {n}: {reason:?} should name {expected:?}"
        );
    }
    eprintln!(
        "burst of {BURST}: published and confirmed in {published_in:?}; every dead copy on \
         {{ns}}.dead {splitter_done_in:?} and every rejected status {statuses_in:?} after the \
         first publish; the good job behind it succeeded {good_latency:?} after its publish \
         (on an idle deployment: {idle_latency:?})"
    );
    env.finish().await
}
