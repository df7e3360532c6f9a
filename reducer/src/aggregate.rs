//! MetricBatch records: what the fragments recorded since the last batch, per job and per
//! worker.
//!
//! Each fragment's measurements are written to the store in the same transaction that counts
//! the fragment (so a redelivered report, which is not counted, adds no measurements either,
//! and a crash loses none). Once per interval the pending measurements are folded into one
//! MetricBatch, published with confirms, and only then deleted.

use std::collections::BTreeMap;

use common::measure::{
    Aggregate, FragmentMeasurements, Histogram, JobFigures, MetricBatch, WorkerFigures,
};
use serde::{Deserialize, Serialize};

/// What one counted fragment contributes to the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub job_id: String,
    pub operation: String,
    pub worker: String,
    pub ops_succeeded: u64,
    pub ops_failed: u64,
    pub fragment_seconds: f64,
    pub measurements: FragmentMeasurements,
}

impl Measured {
    /// This fragment's figures as an aggregate of one.
    pub fn aggregate(&self) -> Aggregate {
        let mut fragment_seconds = Histogram::new();
        fragment_seconds.record(self.fragment_seconds);
        Aggregate {
            operation: self.operation.clone(),
            ops_succeeded: self.ops_succeeded,
            ops_failed: self.ops_failed,
            fragments: 1,
            operation_seconds: self.measurements.operation_seconds.clone(),
            fragment_seconds,
            user: self.measurements.user.clone(),
        }
    }
}

/// Folds `measured` into one MetricBatch; `None` when nothing happened.
pub fn batch(
    seq: u64,
    namespace: &str,
    interval_start_ms: i64,
    interval_end_ms: i64,
    measured: &[Measured],
) -> Option<MetricBatch> {
    if measured.is_empty() {
        return None;
    }
    let mut jobs: BTreeMap<&str, Aggregate> = BTreeMap::new();
    let mut workers: BTreeMap<&str, Aggregate> = BTreeMap::new();
    for m in measured {
        let one = m.aggregate();
        jobs.entry(&m.job_id).or_default().add(&one);
        // Poison fragments have no worker: they count for their job only.
        if !m.worker.is_empty() {
            workers.entry(&m.worker).or_default().add(&one);
        }
    }
    Some(MetricBatch {
        seq,
        namespace: namespace.to_owned(),
        interval_start: common::timefmt::format_ms(interval_start_ms),
        interval_end: common::timefmt::format_ms(interval_end_ms),
        jobs: jobs
            .into_iter()
            .map(|(job_id, a)| JobFigures {
                job_id: job_id.to_owned(),
                operation: a.operation.clone(),
                figures: (&a).into(),
            })
            .collect(),
        workers: workers
            .into_iter()
            .map(|(worker, a)| WorkerFigures {
                worker: worker.to_owned(),
                figures: (&a).into(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(job: &str, worker: &str, ok: u64, failed: u64, op_seconds: &[f64]) -> Measured {
        let mut operation_seconds = Histogram::new();
        for s in op_seconds {
            operation_seconds.record(*s);
        }
        let mut m = FragmentMeasurements {
            operation_seconds,
            ..FragmentMeasurements::default()
        };
        m.user.counters.insert("bytes".into(), ok * 10);
        Measured {
            job_id: job.into(),
            operation: "op".into(),
            worker: worker.into(),
            ops_succeeded: ok,
            ops_failed: failed,
            fragment_seconds: op_seconds.iter().sum(),
            measurements: m,
        }
    }

    #[test]
    fn sums_per_job_and_per_worker() {
        let rows = [
            measured("a", "w1", 2, 1, &[0.1, 0.2, 0.3]),
            measured("a", "w2", 1, 0, &[0.4]),
            measured("b", "w1", 0, 2, &[0.5, 0.6]),
        ];
        let batch = batch(7, "ns", 0, 10_000, &rows).expect("a batch");
        assert_eq!(batch.seq, 7);
        let a = &batch.jobs[0];
        assert_eq!(
            (
                a.job_id.as_str(),
                a.figures.ops_succeeded,
                a.figures.ops_failed
            ),
            ("a", 3, 1)
        );
        assert_eq!(a.figures.fragments, 2);
        assert_eq!(a.figures.operation_seconds.count, 4);
        assert_eq!(a.figures.user_counters.get("bytes"), Some(&30));
        let w1 = &batch.workers[0];
        assert_eq!(
            (
                w1.worker.as_str(),
                w1.figures.ops_succeeded,
                w1.figures.ops_failed
            ),
            ("w1", 2, 3)
        );
        assert_eq!(w1.figures.operation_seconds.max, 0.6);
        assert!(batch_is_none_when_empty());
    }

    fn batch_is_none_when_empty() -> bool {
        batch(1, "ns", 0, 1, &[]).is_none()
    }
}
