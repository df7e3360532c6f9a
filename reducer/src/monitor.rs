//! The Prometheus endpoint: what the reducer counted, and gauges of jobs, queues and workers.
//!
//! Names follow the Prometheus conventions: `batchq_` prefix, base units (seconds), `_total`
//! counters, histograms with fixed buckets so they aggregate across reducers. Label
//! cardinality stays bounded: per-job series are gauges, and a gauge that is no longer updated
//! (a finished job's) disappears after the configured time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::contract::{JobState, JobStatus};
use common::topology::Names;
use metrics_exporter_prometheus::Matcher;
use metrics_util::MetricKindMask;

use crate::aggregate::Measured;
use crate::{ReducerError, WorkerTable};

/// Bucket bounds of the operations' own histograms, whose unit batchq does not know.
const USER_BUCKETS: [f64; 13] = [
    0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9,
];

/// Serves `GET /metrics` on `addr`. Gauges not updated for `series_ttl` are dropped: that is
/// how a finished job's series go away.
pub fn install(addr: &str, series_ttl: Duration) -> Result<(), ReducerError> {
    common::telemetry::prometheus_builder(addr)
        .map_err(ReducerError::Metrics)?
        .set_buckets_for_metric(Matcher::Prefix("batchq_user_".to_owned()), &USER_BUCKETS)
        .map_err(|e| ReducerError::Metrics(e.to_string()))?
        .idle_timeout(MetricKindMask::GAUGE, Some(series_ttl))
        .install()
        .map_err(|e| ReducerError::Metrics(format!("cannot serve metrics on {addr}: {e}")))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "batchq_operations_total",
        "Operations counted, by operation and outcome (final outcomes only)"
    );
    describe_counter!("batchq_fragments_total", "Fragments counted, by operation");
    describe_histogram!(
        "batchq_operation_duration_seconds",
        Unit::Seconds,
        "Time one operation ran, by operation"
    );
    describe_histogram!(
        "batchq_fragment_duration_seconds",
        Unit::Seconds,
        "Time one fragment ran, by operation"
    );
    describe_gauge!("batchq_jobs", "Jobs the reducer knows, by state");
    describe_gauge!(
        "batchq_job_operations",
        "Operations of a job by outcome; kept for a while after the job ends"
    );
    describe_gauge!(
        "batchq_queue_messages_ready",
        "Messages ready in a batchq queue"
    );
    describe_gauge!(
        "batchq_queue_messages_unacked",
        "Fragments delivered to workers and not yet acknowledged (work queues)"
    );
    describe_gauge!("batchq_queue_consumers", "Consumers of a batchq queue");
    describe_gauge!(
        "batchq_workers_live",
        "Workers heard from within three heartbeats"
    );
}

/// A metric name made only of what Prometheus allows: `[a-zA-Z0-9_]`, not starting with a
/// digit.
pub fn metric_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// Adds what newly counted fragments measured.
pub fn record(measured: &[Measured]) {
    for m in measured {
        let op = m.operation.clone();
        metrics::counter!("batchq_operations_total", "operation" => op.clone(), "outcome" => "succeeded")
            .increment(m.ops_succeeded);
        metrics::counter!("batchq_operations_total", "operation" => op.clone(), "outcome" => "failed")
            .increment(m.ops_failed);
        metrics::counter!("batchq_fragments_total", "operation" => op.clone()).increment(1);
        metrics::histogram!("batchq_fragment_duration_seconds", "operation" => op.clone())
            .record(m.fragment_seconds);
        let durations =
            metrics::histogram!("batchq_operation_duration_seconds", "operation" => op.clone());
        for (value, n) in m.measurements.operation_seconds.representatives() {
            durations.record_many(value, n as usize);
        }
        for (name, n) in &m.measurements.user.counters {
            let name = format!("batchq_user_{}_total", metric_name(name));
            metrics::counter!(name, "operation" => op.clone()).increment(*n);
        }
        for (name, histogram) in &m.measurements.user.histograms {
            let name = format!("batchq_user_{}", metric_name(name));
            let h = metrics::histogram!(name, "operation" => op.clone());
            for (value, n) in histogram.representatives() {
                h.record_many(value, n as usize);
            }
        }
    }
}

/// Sets the gauges of jobs: per state, and per job for jobs that run (and, once more, for
/// jobs that just ended, so their last figures stay visible until the series expire).
pub fn record_jobs(by_state: &[(JobState, u64)], statuses: &[JobStatus]) {
    for state in JobState::ALL {
        let n = by_state
            .iter()
            .find_map(|(s, n)| (*s == state).then_some(*n))
            .unwrap_or(0);
        metrics::gauge!("batchq_jobs", "state" => state.as_str()).set(n as f64);
    }
    // The label is `job_id`, not `job`: Prometheus gives every scraped series the scrape
    // job's name as `job`, and would rename a `job` of ours to `exported_job`.
    for status in statuses {
        let job = status.job_id.clone();
        metrics::gauge!("batchq_job_operations", "job_id" => job.clone(), "outcome" => "succeeded")
            .set(status.ops_succeeded as f64);
        metrics::gauge!("batchq_job_operations", "job_id" => job.clone(), "outcome" => "failed")
            .set(status.ops_failed as f64);
        metrics::gauge!("batchq_job_operations", "job_id" => job, "outcome" => "total")
            .set(status.ops_total as f64);
    }
}

/// Live workers, and per operation the fragments they hold (unacknowledged).
pub fn live_workers(workers: &WorkerTable, now_ms: i64) -> (usize, BTreeMap<String, u64>) {
    let table = workers.lock().unwrap_or_else(|p| p.into_inner());
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    let mut live = 0;
    for (beat, heard_at) in table.values() {
        if now_ms - heard_at > 3 * beat.interval_ms as i64 {
            continue;
        }
        live += 1;
        for operation in &beat.operations {
            held.entry(operation.clone()).or_default();
        }
        for (operation, n) in &beat.held_by_operation {
            *held.entry(operation.clone()).or_default() += n;
        }
    }
    (live, held)
}

/// Polls every batchq queue with passive declares (no management plugin needed) and sets the
/// queue gauges. Work queues are those of `operations`; a queue that does not exist is
/// skipped.
pub async fn record_queues(
    session: &common::broker::Session,
    names: &Names,
    operations: &BTreeSet<String>,
    held: &BTreeMap<String, u64>,
) -> Result<(), ReducerError> {
    let mut queues: Vec<(String, Option<u64>)> = names
        .fixed_queues()
        .into_iter()
        .map(|q| (q, None))
        .collect();
    queues.extend(operations.iter().map(|op| {
        (
            names.work_queue(op),
            Some(held.get(op).copied().unwrap_or(0)),
        )
    }));
    let names_only: Vec<String> = queues.iter().map(|(q, _)| q.clone()).collect();
    let peeks = common::broker::peek_queues(&names_only, || session.plain_channel()).await?;
    for ((queue, unacked), peek) in queues.into_iter().zip(peeks) {
        let Some(peek) = peek else { continue };
        metrics::gauge!("batchq_queue_messages_ready", "queue" => queue.clone())
            .set(peek.ready as f64);
        metrics::gauge!("batchq_queue_consumers", "queue" => queue.clone())
            .set(peek.consumers as f64);
        if let Some(unacked) = unacked {
            metrics::gauge!("batchq_queue_messages_unacked", "queue" => queue).set(unacked as f64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_sanitised() {
        assert_eq!(metric_name("bytes_read"), "bytes_read");
        assert_eq!(metric_name("cache.hits-total"), "cache_hits_total");
        assert_eq!(metric_name("9lives"), "_9lives");
    }
}
