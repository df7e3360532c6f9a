//! The worker as a library: `worker/examples/custom_operation.rs` registers a `reverse`
//! operation and a typed async function `scale` beside the built-ins, and jobs naming them
//! run end to end with the results and the failures the example promises.

use std::time::Duration;

use anyhow::Result;
use batchq_tests::{
    TestEnv, WorkerOpts, assert_counts, assert_one_per_index, example_path, sha256_hex, text_of,
};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// What `reverse` gives for `item`, computed here rather than by the example's code.
fn reversed(item: &Value) -> Option<String> {
    let text = text_of(item);
    (!text.is_empty()).then(|| text.chars().rev().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_reverse_operation_runs_beside_the_builtins() -> Result<()> {
    let mut env = TestEnv::new("example").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    // Its own operation and a built-in it keeps, chosen through BATCHQ_OPERATIONS as for the
    // stock worker (which also names `reverse` for the namespace's cleanup).
    env.start_worker_program(
        example_path("batchq-worker", "custom_operation"),
        WorkerOpts {
            operations: Some(vec!["reverse".into(), "scale".into(), "sha256".into()]),
            ..WorkerOpts::default()
        },
    )?;

    // Strings (one with a base and a modifier scalar, which reverse separately), numbers,
    // objects whose key order must survive, an array, and the empty string that fails.
    let items = vec![
        json!("abc"),
        json!("héllo"),
        json!(42),
        json!({"a": 1}),
        json!(""),
        json!({"b": 2, "a": [true, null]}),
        json!("a👍🏽b"),
        json!(-1.5),
    ];
    let n = items.len() as u64;
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("reverse"),
            "operation": "reverse",
            "items": items,
            "fragment_size": 3,
            "max_attempts": 1,
            // One failure in eight is 12.5%: tolerated, so the job succeeds.
            "tolerated_failure_percent": 20.0,
            "collect_results": true,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 7, 1);
    assert_eq!(status.operation.as_deref(), Some("reverse"));
    assert_eq!(status.fragments_done, 3, "8 items in fragments of 3");

    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, n);
    let expected: Vec<ResultLine> = items
        .iter()
        .zip(0..)
        .map(|(item, index)| match reversed(item) {
            Some(text) => ResultLine::Ok {
                index,
                result: Value::String(text),
            },
            None => ResultLine::Err {
                index,
                error: "empty item: nothing to reverse".into(),
            },
        })
        .collect();
    assert_eq!(results, expected);
    // Spelled out, so a wrong `text_of` cannot hide a wrong reversal.
    assert_eq!(
        results[..4],
        [
            ResultLine::Ok {
                index: 0,
                result: json!("cba")
            },
            ResultLine::Ok {
                index: 1,
                result: json!("olléh")
            },
            ResultLine::Ok {
                index: 2,
                result: json!("24")
            },
            ResultLine::Ok {
                index: 3,
                result: json!("}1:\"a\"{")
            },
        ]
    );
    assert_eq!(
        results[5],
        ResultLine::Ok {
            index: 5,
            result: json!("}]llun,eurt[:\"a\",2:\"b\"{")
        }
    );
    assert_eq!(
        results[6],
        ResultLine::Ok {
            index: 6,
            result: json!("b\u{1F3FD}\u{1F44D}a")
        }
    );

    // The built-ins stay registered beside the custom operation.
    let builtin = env
        .submit(&json!({
            "job_id": env.job_id("sha"),
            "operation": "sha256",
            "items": ["abc", 7],
        }))
        .await?;
    let status = env.wait_for_terminal(&builtin, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2, 0);
    assert_eq!(
        env.results(&builtin).await?,
        vec![
            ResultLine::Ok {
                index: 0,
                result: json!(sha256_hex("abc", 1))
            },
            ResultLine::Ok {
                index: 1,
                result: json!(sha256_hex("7", 1))
            },
        ]
    );

    // `scale`, registered as an async function of the example's own types: an item that does
    // not fit its type fails that operation alone, the error naming the field.
    let scaled = env
        .submit(&json!({
            "job_id": env.job_id("scale"),
            "operation": "scale",
            "params": {"factor": 1.5},
            "items": [
                {"width": 640, "height": 480},
                {"width": "wide", "height": 1},
                {"width": 3, "height": 5},
            ],
            "max_attempts": 1,
            "tolerated_failure_percent": 50.0,
        }))
        .await?;
    let status = env.wait_for_terminal(&scaled, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 2, 1);
    assert_eq!(
        env.results(&scaled).await?,
        vec![
            ResultLine::Ok {
                index: 0,
                result: json!({"width": 960, "height": 720})
            },
            ResultLine::Err {
                index: 1,
                error: "item.width: invalid type: string \"wide\", expected u32".into()
            },
            ResultLine::Ok {
                index: 2,
                result: json!({"width": 5, "height": 8})
            },
        ]
    );
    env.finish().await
}

/// A custom operation's errors count like a built-in's: beyond the tolerated share, the job
/// fails, and each failure's error is the operation's own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_operation_failures_fail_the_job_beyond_tolerance() -> Result<()> {
    let mut env = TestEnv::new("example-fail").await?;
    env.start_splitter()?;
    env.start_reducer()?;
    env.start_worker_program(
        example_path("batchq-worker", "custom_operation"),
        WorkerOpts {
            operations: Some(vec!["reverse".into()]),
            ..WorkerOpts::default()
        },
    )?;
    // Two empty texts of four, in one fragment: every operation runs before the job ends.
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("strict"),
            "operation": "reverse",
            "items": ["", "xy", "", "z"],
            "fragment_size": 4,
            "max_attempts": 1,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Failed, 2, 2);
    assert!(status.error.is_some(), "a failed job says why: {status:?}");
    let empty = |index| ResultLine::Err {
        index,
        error: "empty item: nothing to reverse".into(),
    };
    assert_eq!(
        env.results(&job_id).await?,
        vec![
            empty(0),
            ResultLine::Ok {
                index: 1,
                result: json!("yx")
            },
            empty(2),
            ResultLine::Ok {
                index: 3,
                result: json!("z")
            },
        ]
    );
    env.finish().await
}
