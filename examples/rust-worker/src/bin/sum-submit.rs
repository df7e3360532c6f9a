//! Submits a `sum` job over the lines given as arguments (or a few of its own), waits until
//! it ends, and prints its results as JSON Lines; exits 0 only if the job succeeded.
//!
//! ```text
//! AMQP_URL=… BATCHQ_NAMESPACE=… cargo run --bin sum-submit -- "1 2 3" "40 2"
//! ```
//!
//! `BATCHQ_JOB_ID` names the job (otherwise it gets a generated id).

use std::process::ExitCode;

use batchq_client::{Client, JobState, StreamExt};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let namespace = std::env::var("BATCHQ_NAMESPACE").unwrap_or_else(|_| "batchq".to_owned());
    let mut lines: Vec<String> = std::env::args().skip(1).collect();
    if lines.is_empty() {
        lines = ["1 2 3", "10 20", "7", "", "5 5 5 5"]
            .map(String::from)
            .to_vec();
    }

    let client = Client::connect_url(&url, &namespace).await?;
    let mut spec = json!({
        "operation": "sum",
        "params": {"scale": 10},
        "items": lines,
        "fragment_size": 4,
        "max_attempts": 3,
        // A line that is no sum fails alone; the job still succeeds.
        "tolerated_failure_percent": 50.0,
    });
    if let Ok(job_id) = std::env::var("BATCHQ_JOB_ID") {
        spec["job_id"] = json!(job_id);
    }
    let status = client.submit_and_wait(&spec).await?;
    eprintln!(
        "job {} {}: {} succeeded, {} failed of {}",
        status.job_id, status.state, status.ops_succeeded, status.ops_failed, status.ops_total
    );
    let mut results = client.results(&status.job_id);
    while let Some(line) = results.next().await {
        println!("{}", serde_json::to_string(&line?)?);
    }
    Ok(if status.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
