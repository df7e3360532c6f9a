//! batchq over TLS. A private RabbitMQ node gets a TLS listener serving a certificate signed
//! by a CA the test makes; splitter, reducer, worker, `batchctl` and the test's own
//! connections reach it only by `amqps://`, trusting that CA through `BATCHQ_TLS_CA_FILE`,
//! and run a real job to the exact end. A client that trusts another CA is refused at once,
//! in one line that says so and shows the URL without its password.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use batchq_tests::{
    RabbitNode, TestCerts, TestEnv, assert_counts, assert_one_per_index, sha256_hex,
};
use common::contract::{JobState, ResultLine};
use serde_json::{Value, json};

const OPS: u64 = 600;
const ROUNDS: u32 = 2;

/// Every line the test's processes wrote.
fn all_logs(env: &TestEnv) -> Result<String> {
    let mut text = String::new();
    for entry in std::fs::read_dir(env.dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            text.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_entirely_over_tls_and_an_untrusted_broker_is_named() -> Result<()> {
    let certs = TestCerts::generate()?;
    // Declared before the environment, dropped after it: the processes stop first.
    let node = RabbitNode::start_with_tls(&certs).await?;
    let url = node.tls_url()?;
    let mut env = TestEnv::with_tls("tls", &url, Some(&certs.ca_file())).await?;
    env.start_spine(1)?;

    let job_id = env.job_id("over-tls");
    let spec = json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": ROUNDS},
        "range": {"start": 0, "end": OPS},
        "fragment_size": 50,
        "max_concurrent_fragments": 4,
    });
    let spec_path = env.dir().join("job.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let (exit, stdout, stderr) = env
        .batchctl_within(
            &["submit", "--wait", spec_path.to_str().context("path")?],
            Duration::from_secs(90),
        )
        .await?;
    assert!(
        exit.success(),
        "submit --wait over TLS: {exit}\nstdout: {stdout}\nstderr: {stderr}\n{}",
        env.logs_tail()
    );
    assert_eq!(stdout.lines().next(), Some(job_id.as_str()));

    let status = env
        .wait_for_terminal(&job_id, Duration::from_secs(30))
        .await?;
    assert_counts(&status, JobState::Succeeded, OPS, 0);
    assert_eq!(status.fragments_done, OPS / 50);
    let results = env.results(&job_id).await?;
    assert_one_per_index(&results, OPS);
    for (i, line) in (0..OPS).zip(&results) {
        assert_eq!(
            line,
            &ResultLine::Ok {
                index: i,
                result: Value::String(sha256_hex(&i.to_string(), ROUNDS)),
            }
        );
    }

    // The same broker, trusting a CA that did not sign its certificate.
    let port = node.tls_port.context("TLS port")?;
    let other_ca = certs.other_ca_file();
    let asked = Instant::now();
    let (exit, _, stderr) = env
        .batchctl_within(
            &["--tls-ca-file", other_ca.to_str().context("path")?, "jobs"],
            Duration::from_secs(10),
        )
        .await?;
    let took = asked.elapsed();
    assert_eq!(exit.code(), Some(2), "stderr: {stderr}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("TLS handshake failed"),
        "names the cause: {stderr}"
    );
    assert!(
        stderr.contains(&format!("amqps://guest:***@127.0.0.1:{port}/%2f")),
        "names the URL: {stderr}"
    );

    // No password in any line: guest's is "guest", so no "guest:guest" and no ":guest@".
    let logs = all_logs(&env)? + &stderr + &stdout;
    assert!(
        !logs.contains("guest:guest") && !logs.contains(":guest@"),
        "a password reached a log line"
    );

    env.finish().await?;
    node.stop();
    Ok(())
}
