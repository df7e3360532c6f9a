//! Measurements that workers report and the reducer aggregates: mergeable histograms with
//! fixed logarithmic buckets, their summaries, and the MetricBatch record.
//!
//! Quantiles come from merged bucket counts, never from averages of averages: a histogram of
//! one fragment merges exactly into that of a job, a worker or an interval.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Buckets per doubling: bucket bounds grow by 2^(1/4) ≈ 1.19, so a quantile read from the
/// buckets is within about 9 % of the true value.
const BUCKETS_PER_DOUBLING: f64 = 4.0;

/// A histogram of non-negative values with fixed logarithmic buckets, stored sparsely.
///
/// Bucket `i` holds values in `(2^((i-1)/4), 2^(i/4)]`; values at or below zero go to the
/// lowest bucket. Count, sum, min and max are kept exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Bucket index → count, only buckets that hold something. On the wire a list of
    /// `[index, count]` pairs (integer map keys do not survive serde's tagged enums).
    #[serde(with = "bucket_pairs")]
    pub buckets: BTreeMap<i32, u64>,
}

mod bucket_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(buckets: &BTreeMap<i32, u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(buckets.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i32, u64>, D::Error> {
        Ok(Vec::<(i32, u64)>::deserialize(d)?.into_iter().collect())
    }
}

/// Lowest bucket index: about 1e-12, below anything a duration in seconds measures.
const MIN_BUCKET: i32 = -160;

/// The bucket a value falls in: bucket `k` holds `(2^((k-1)/4), 2^(k/4)]`.
pub fn bucket_of(value: f64) -> i32 {
    // The bounds of the quarter doublings above 1: 2^(1/4), 2^(2/4), 2^(3/4).
    const QUARTERS: [f64; 3] = [
        1.189_207_115_002_721,
        std::f64::consts::SQRT_2,
        1.681_792_830_507_429,
    ];
    // The upper bound of the lowest bucket, 2^(MIN_BUCKET/4), and the layout this relies on.
    const _: () = assert!(BUCKETS_PER_DOUBLING == 4.0 && MIN_BUCKET % 4 == 0);
    const LOWEST: f64 = 1.0 / (1u64 << (-MIN_BUCKET / 4)) as f64;
    if value.is_nan() || value <= LOWEST {
        return MIN_BUCKET;
    }
    if value.is_infinite() {
        return i32::MAX;
    }
    // value = m × 2^e with m in [1, 2): read e and m from the bits (the value is normal
    // here), so that a worker timing every operation pays no log2 for it.
    const MANTISSA: u64 = (1 << 52) - 1;
    let bits = value.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mantissa = f64::from_bits((bits & MANTISSA) | (1023 << 52));
    let quarter = if mantissa == 1.0 {
        0
    } else {
        1 + QUARTERS.iter().filter(|bound| mantissa > **bound).count() as i32
    };
    4 * exponent + quarter
}

/// The upper bound of bucket `index`.
pub fn bucket_upper(index: i32) -> f64 {
    (f64::from(index) / BUCKETS_PER_DOUBLING).exp2()
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn record(&mut self, value: f64) {
        self.record_n(value, 1);
    }

    /// Records `value` `n` times.
    pub fn record_n(&mut self, value: f64, n: u64) {
        if n == 0 || value.is_nan() {
            return;
        }
        let value = value.max(0.0);
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += n;
        self.sum += value * n as f64;
        *self.buckets.entry(bucket_of(value)).or_default() += n;
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.sum += other.sum;
        for (bucket, n) in &other.buckets {
            *self.buckets.entry(*bucket).or_default() += n;
        }
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket that holds it, clamped
    /// to the exact min and max.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return bucket_upper(*bucket).clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            sum: self.sum,
            min: self.min,
            max: self.max,
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
        }
    }

    /// Each non-empty bucket as (a representative value, its count): the geometric middle of
    /// the bucket, clamped to min and max. For feeding another histogram implementation.
    pub fn representatives(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.buckets.iter().map(|(bucket, n)| {
            let middle = bucket_upper(*bucket) / (0.5 / BUCKETS_PER_DOUBLING).exp2();
            (middle.clamp(self.min, self.max), *n)
        })
    }
}

/// What a MetricBatch says of a distribution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Metrics that an operation's author records, by name: counters add up, histograms merge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserMetrics {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub histograms: BTreeMap<String, Histogram>,
}

impl UserMetrics {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.histograms.is_empty()
    }

    pub fn merge(&mut self, other: &UserMetrics) {
        for (name, n) in &other.counters {
            *self.counters.entry(name.clone()).or_default() += n;
        }
        for (name, h) in &other.histograms {
            self.histograms.entry(name.clone()).or_default().merge(h);
        }
    }
}

/// What one fragment measured, carried in its report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FragmentMeasurements {
    /// Seconds per operation run.
    pub operation_seconds: Histogram,
    #[serde(default, skip_serializing_if = "UserMetrics::is_empty")]
    pub user: UserMetrics,
}

/// Aggregated figures of one job or one worker over an interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregate {
    pub operation: String,
    pub ops_succeeded: u64,
    pub ops_failed: u64,
    pub fragments: u64,
    pub operation_seconds: Histogram,
    pub fragment_seconds: Histogram,
    pub user: UserMetrics,
}

impl Aggregate {
    pub fn add(&mut self, other: &Aggregate) {
        if self.operation.is_empty() {
            self.operation.clone_from(&other.operation);
        }
        self.ops_succeeded += other.ops_succeeded;
        self.ops_failed += other.ops_failed;
        self.fragments += other.fragments;
        self.operation_seconds.merge(&other.operation_seconds);
        self.fragment_seconds.merge(&other.fragment_seconds);
        self.user.merge(&other.user);
    }
}

/// The record published on `{ns}.metrics` (routing key `batch`) once per interval in which
/// anything happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricBatch {
    /// Increases by one per published batch of this reducer store; a consumer that sees a
    /// `seq` twice (a re-publish after a crash) can drop the copy.
    pub seq: u64,
    pub namespace: String,
    pub interval_start: String,
    pub interval_end: String,
    pub jobs: Vec<JobFigures>,
    pub workers: Vec<WorkerFigures>,
}

/// One job's figures in a MetricBatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFigures {
    pub job_id: String,
    pub operation: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// One worker's figures in a MetricBatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerFigures {
    pub worker: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Counts and summaries of one job or worker over the interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub ops_succeeded: u64,
    pub ops_failed: u64,
    pub fragments: u64,
    pub operation_seconds: Summary,
    pub fragment_seconds: Summary,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user_counters: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user_histograms: BTreeMap<String, Summary>,
}

impl From<&Aggregate> for Figures {
    fn from(a: &Aggregate) -> Self {
        Self {
            ops_succeeded: a.ops_succeeded,
            ops_failed: a.ops_failed,
            fragments: a.fragments,
            operation_seconds: a.operation_seconds.summary(),
            fragment_seconds: a.fragment_seconds.summary(),
            user_counters: a.user.counters.clone(),
            user_histograms: a
                .user
                .histograms
                .iter()
                .map(|(name, h)| (name.clone(), h.summary()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for value in [1e-6, 0.003, 0.5, 1.0, 1.7, 42.0, 3600.0] {
            let bucket = bucket_of(value);
            assert!(bucket_upper(bucket) >= value * (1.0 - 1e-12), "{value}");
            assert!(bucket_upper(bucket - 1) < value, "{value}");
        }
        assert_eq!(bucket_of(0.0), MIN_BUCKET);
        assert_eq!(bucket_of(-1.0), MIN_BUCKET);
        assert_eq!(bucket_of(f64::INFINITY), i32::MAX);
    }

    #[test]
    fn bucket_of_agrees_with_log2() {
        let by_log2 = |v: f64| ((v.log2() * BUCKETS_PER_DOUBLING).ceil() as i32).max(MIN_BUCKET);
        let mut value = 1e-13;
        while value < 1e7 {
            // Exact bounds (powers of two) and everything between them.
            assert_eq!(bucket_of(value), by_log2(value), "{value}");
            value *= 1.0137;
        }
        for k in -40..40 {
            let power = f64::from(k).exp2();
            assert_eq!(bucket_of(power), 4 * k, "2^{k}");
            assert_eq!(bucket_of(power * 1.000_001), 4 * k + 1, "just above 2^{k}");
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Histogram::new();
        for ms in 1..=1000 {
            h.record(f64::from(ms) / 1000.0);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.sum - 500.5).abs() < 1e-9, "{}", s.sum);
        assert_eq!((s.min, s.max), (0.001, 1.0));
        for (q, exact) in [(s.p50, 0.5), (s.p90, 0.9), (s.p99, 0.99)] {
            assert!(q >= exact && q <= exact * 1.19, "{q} vs {exact}");
        }
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for i in 0..500 {
            let v = f64::from(i) * 0.01 + 0.001;
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.buckets, all.buckets);
        assert_eq!((a.count, a.min, a.max), (all.count, all.min, all.max));
        assert!((a.sum - all.sum).abs() < 1e-9);
        assert_eq!(a.summary().p99, all.summary().p99);
    }

    #[test]
    fn survives_a_round_trip_inside_a_tagged_enum() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        #[serde(tag = "type")]
        enum Tagged {
            H { h: Histogram },
        }
        let mut h = Histogram::new();
        h.record(0.003);
        h.record(12.0);
        let tagged = Tagged::H { h };
        let text = serde_json::to_string(&tagged).expect("serialise");
        assert_eq!(
            serde_json::from_str::<Tagged>(&text).expect("parse"),
            tagged
        );
    }

    #[test]
    fn representatives_keep_counts() {
        let mut h = Histogram::new();
        h.record_n(0.2, 7);
        h.record(3.0);
        let reps: Vec<_> = h.representatives().collect();
        assert_eq!(reps.iter().map(|(_, n)| n).sum::<u64>(), 8);
        assert!(reps.iter().all(|(v, _)| (0.2..=3.0).contains(v)));
    }
}
