//! Running one fragment: its operations in order, stopping at an operation boundary when the
//! fragment reaches its lifespan, its job is cancelled, or the worker shuts down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::measure::{FragmentMeasurements, Histogram};
use common::wire::{Cut, Failure, Fragment, FragmentReport};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::operation::{OpError, OpInput, OpMetrics, Operation};

/// How long a worker remembers a cancelled job (its queued fragments are dropped unrun).
const CANCEL_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Jobs this worker heard were cancelled, each with the latest redrive round cancelled (a
/// redrive runs the job's fragments of later rounds).
#[derive(Clone, Default)]
pub struct CancelledJobs {
    jobs: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    /// Bumped on every insert, so a running fragment re-reads the set only when it changed
    /// (checked before every operation: a lock there would cost more than a `noop`).
    generation: Arc<AtomicU64>,
}

impl CancelledJobs {
    /// The job's fragments of `round` and earlier are cancelled.
    pub fn insert(&self, job_id: String, round: u64) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        jobs.retain(|_, (_, at)| now.duration_since(*at) < CANCEL_MEMORY);
        let entry = jobs.entry(job_id).or_insert((round, now));
        *entry = (entry.0.max(round), now);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Whether the job's fragments of `round` are cancelled.
    pub fn contains(&self, job_id: &str, round: u64) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(job_id)
            .is_some_and(|(cancelled, _)| round <= *cancelled)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Whether a fragment's job is cancelled, re-reading the shared set only after it changed.
struct CancelWatch<'a> {
    cancelled: &'a CancelledJobs,
    seen: Option<u64>,
    job_cancelled: bool,
}

impl<'a> CancelWatch<'a> {
    fn new(cancelled: &'a CancelledJobs) -> Self {
        Self {
            cancelled,
            seen: None,
            job_cancelled: false,
        }
    }

    fn is_cancelled(&mut self, job_id: &str, round: u64) -> bool {
        let generation = self.cancelled.generation();
        if self.seen != Some(generation) {
            self.seen = Some(generation);
            self.job_cancelled = self.cancelled.contains(job_id, round);
        }
        self.job_cancelled
    }
}

/// How often a running fragment looks at the worker's shutdown token (a mutex) and gives
/// the runtime a turn between operations that never await: often enough that a shutdown or
/// a heartbeat waits at most about this long, rarely enough to cost nothing per operation.
const CHECK_EVERY: Duration = Duration::from_millis(1);

/// Most bytes of one operation's error kept in a report: its first kilobyte and its end (the
/// end is where `exec` puts stderr's last line).
pub const MAX_ERROR_BYTES: usize = 4096;

/// About the most bytes of results and errors one report carries. Past it the fragment stops
/// at the operation boundary (`Cut::Size`) and the splitter releases the rest as a fragment of
/// its own, so that no report outgrows a broker's message size limit (16 MiB by default in
/// RabbitMQ 4) however many operations fail with long errors or return long results.
pub const REPORT_BUDGET_BYTES: usize = 8 << 20;

/// `error`, at most [`MAX_ERROR_BYTES`] (plus a marker): its head and its tail when longer.
fn bounded_error(error: String) -> String {
    const HEAD: usize = 1024;
    // Cut only where it saves more than the marker adds.
    if error.len() <= MAX_ERROR_BYTES + 64 {
        return error;
    }
    let mut head_end = HEAD;
    while !error.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = error.len() - (MAX_ERROR_BYTES - HEAD);
    while !error.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{} … ({} bytes cut) … {}",
        &error[..head_end],
        tail_start - head_end,
        &error[tail_start..]
    )
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// At most the bytes `text` takes as a JSON string: escapes counted at their longest
/// (`\u00XX`), without writing anything.
fn json_str_size(text: &str) -> usize {
    let escaped = text
        .bytes()
        .filter(|b| *b < 0x20 || *b == b'"' || *b == b'\\')
        .count();
    text.len() + 2 + 5 * escaped
}

/// About the bytes `value` takes in a report (never less for a string, no allocation).
fn json_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 20,
        Value::String(s) => json_str_size(s),
        other => {
            let mut count = ByteCount(0);
            // Writing to a counter cannot fail.
            let _ = serde_json::to_writer(&mut count, other);
            count.0
        }
    }
}

/// Why a fragment should stop before its next operation, if it should.
fn should_stop(
    fragment: &Fragment,
    cancelled: &mut CancelWatch<'_>,
    shutting_down: bool,
    now: Instant,
    deadline: Instant,
    done: usize,
) -> Option<Cut> {
    if cancelled.is_cancelled(&fragment.job_id, fragment.round) {
        return Some(Cut::Cancelled);
    }
    if shutting_down {
        return Some(Cut::Shutdown);
    }
    // At least one operation runs per fragment, so even an operation longer than the
    // lifespan makes progress.
    if done > 0 && now >= deadline {
        return Some(Cut::Lifespan);
    }
    None
}

/// What a fragment's operations produced so far, and how large its report has grown.
struct Outcomes {
    collect_results: bool,
    results: Vec<Value>,
    failures: Vec<Failure>,
    report_bytes: usize,
}

impl Outcomes {
    fn new(collect_results: bool, total: usize) -> Self {
        Self {
            collect_results,
            results: Vec::with_capacity(if collect_results { total } else { 0 }),
            failures: Vec::new(),
            report_bytes: 0,
        }
    }

    /// Keeps the outcome of the operation at `offset`: its result when the job collects
    /// results, its (bounded) error always.
    fn record(&mut self, offset: usize, outcome: Result<Value, OpError>) {
        match outcome {
            Ok(result) => {
                if self.collect_results {
                    self.report_bytes += json_size(&result);
                    self.results.push(result);
                }
            }
            Err(error) => {
                let permanent = error.is_permanent();
                let error = bounded_error(error.message().to_owned());
                self.report_bytes += json_str_size(&error) + 24;
                self.failures.push(Failure {
                    offset: offset as u32,
                    error,
                    permanent,
                });
                if self.collect_results {
                    self.results.push(Value::Null);
                }
            }
        }
    }

    /// Whether the report reached its budget: the fragment then stops (`Cut::Size`).
    fn full(&self) -> bool {
        self.report_bytes >= REPORT_BUDGET_BYTES
    }
}

/// Runs the operation at `offset` of `fragment`, at once when it can (`run_now`).
async fn run_operation(
    fragment: &Fragment,
    operation: &dyn Operation,
    offset: usize,
    metrics: &OpMetrics,
) -> Result<Value, OpError> {
    let (Some(index), Some(item)) = (fragment.indices.get(offset), fragment.item(offset)) else {
        return Err(OpError::permanent(format!(
            "fragment has no item at offset {offset}"
        )));
    };
    let input = OpInput {
        job_id: &fragment.job_id,
        index,
        item: &item,
        params: &fragment.params,
        attempt: fragment.attempt,
        metrics,
    };
    match operation.run_now(input) {
        Some(outcome) => outcome,
        None => operation.run(input).await,
    }
}

/// Runs `fragment` with `operation` and reports what ran.
pub async fn run_fragment(
    fragment: &Fragment,
    operation: &dyn Operation,
    worker: &str,
    cancelled: &CancelledJobs,
    shutdown: &CancellationToken,
) -> FragmentReport {
    let started = Instant::now();
    let started_at_ms = common::timefmt::now_ms();
    let deadline = started + Duration::from_millis(fragment.lifespan_ms);
    let total = fragment.indices.len();
    let mut outcomes = Outcomes::new(fragment.collect_results, total);
    let mut done = 0usize;
    let mut cut = None;
    let metrics = OpMetrics::default();
    let mut operation_seconds = Histogram::new();
    let mut watch = CancelWatch::new(cancelled);
    // One clock read per operation: it ends the last operation's timing, starts the next
    // one's, and is what the lifespan is checked against.
    let mut now = started;
    let mut next_check = started;
    let mut shutting_down = false;
    while done < total {
        if outcomes.full() {
            cut = Some(Cut::Size);
            break;
        }
        if now >= next_check {
            if done > 0 {
                // CPU-bound operations never await: give the runtime a turn.
                tokio::task::yield_now().await;
            }
            shutting_down = shutdown.is_cancelled();
            next_check = now + CHECK_EVERY;
        }
        if let Some(reason) = should_stop(fragment, &mut watch, shutting_down, now, deadline, done)
        {
            cut = Some(reason);
            break;
        }
        let outcome = run_operation(fragment, operation, done, &metrics).await;
        let ended = Instant::now();
        operation_seconds.record(ended.duration_since(now).as_secs_f64());
        now = ended;
        outcomes.record(done, outcome);
        done += 1;
    }
    FragmentReport {
        job_id: fragment.job_id.clone(),
        fragment: fragment.fragment,
        operation: fragment.operation.clone(),
        attempt: fragment.attempt,
        worker: worker.to_owned(),
        indices: fragment.indices.clone(),
        done: done as u32,
        failures: outcomes.failures,
        results: outcomes.results,
        cut,
        started_at_ms,
        // Never 0 once something ran: the splitter reads 0 as "no cost observed" (a fragment
        // that ran nothing), and eight `noop`s can finish within a microsecond.
        elapsed_us: (started.elapsed().as_micros() as u64).max(u64::from(done > 0)),
        measurements: FragmentMeasurements {
            operation_seconds,
            user: metrics.into_inner(),
        },
        round: fragment.round,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::{Noop, Sleep};
    use common::wire::{Indices, Payload};
    use serde_json::{Map, json};

    /// Runs `f` with `operation`, nothing cancelled, no shutdown.
    async fn run(f: &Fragment, operation: &dyn Operation) -> FragmentReport {
        run_fragment(
            f,
            operation,
            "w",
            &CancelledJobs::default(),
            &CancellationToken::new(),
        )
        .await
    }

    fn fragment(operation: &str, n: u64, lifespan_ms: u64, params: Value) -> Fragment {
        Fragment {
            job_id: "job".into(),
            fragment: 7,
            operation: operation.into(),
            params: params.as_object().cloned().unwrap_or_else(Map::new),
            attempt: 1,
            indices: Indices::Span(10, 10 + n),
            payload: Payload::Range { base: 0 },
            lifespan_ms,
            collect_results: true,
            round: 0,
        }
    }

    #[tokio::test]
    async fn runs_every_operation() {
        let f = fragment("noop", 5, 60_000, json!({}));
        let report = run(&f, &Noop).await;
        assert_eq!(report.done, 5);
        assert_eq!(report.results, vec![Value::Null; 5]);
        assert_eq!(report.cut, None);
        assert_eq!(report.measurements.operation_seconds.count, 5);
    }

    #[tokio::test]
    async fn stops_at_lifespan_after_progress() {
        let f = fragment("sleep", 10, 100, json!({"ms": 40}));
        let report = run(&f, &Sleep).await;
        assert_eq!(report.cut, Some(Cut::Lifespan));
        assert!((2..=4).contains(&report.done), "done {}", report.done);
    }

    #[tokio::test]
    async fn cancelled_job_runs_nothing() {
        let f = fragment("noop", 3, 60_000, json!({}));
        let cancelled = CancelledJobs::default();
        cancelled.insert("job".into(), 0);
        let report = run_fragment(&f, &Noop, "w", &cancelled, &CancellationToken::new()).await;
        assert_eq!((report.done, report.cut), (0, Some(Cut::Cancelled)));
        // The job redriven: its fragments of the next round run, and report their round.
        let redriven = Fragment { round: 1, ..f };
        let report =
            run_fragment(&redriven, &Noop, "w", &cancelled, &CancellationToken::new()).await;
        assert_eq!((report.done, report.cut, report.round), (3, None, 1));
    }

    #[tokio::test]
    async fn failures_carry_offsets() {
        let f = fragment("sleep", 2, 60_000, json!({"ms": "soon"}));
        let report = run(&f, &Sleep).await;
        assert_eq!(report.done, 2);
        assert_eq!(report.failures.len(), 2);
        assert_eq!(report.failures[1].offset, 1);
        assert!(report.failures[0].error.contains("params.ms"));
    }

    /// Fails with an error of `params.error_bytes` bytes, or returns a string of
    /// `params.result_bytes` bytes.
    struct Sized;

    #[async_trait::async_trait]
    impl Operation for Sized {
        fn name(&self) -> &str {
            "sized"
        }
        async fn run(&self, input: OpInput<'_>) -> Result<Value, crate::OpError> {
            let bytes = |name: &str| input.params.get(name).and_then(Value::as_u64);
            if let Some(n) = bytes("error_bytes") {
                let mut error = "é".repeat(n as usize / 2);
                error.push_str("last line");
                return Err(crate::OpError::new(error));
            }
            Ok(Value::String(
                "r".repeat(bytes("result_bytes").unwrap_or(0) as usize),
            ))
        }
    }

    #[tokio::test]
    async fn a_permanent_failure_is_reported_as_one() {
        let mut registry = crate::Registry::new();
        registry.register_fn("odd", |n: i64, _params: Value| async move {
            match n % 3 {
                0 => Ok(n),
                1 => Err(crate::OpError::new("try again")),
                _ => Err(crate::OpError::permanent("never")),
            }
        });
        let odd = registry.get("odd").expect("registered");
        let f = fragment("odd", 3, 60_000, json!({}));
        let report = run(&f, odd.as_ref()).await;
        // Items 10, 11, 12: 10 fails for now, 11 for good, 12 succeeds.
        assert_eq!(report.done, 3);
        assert_eq!(report.results, vec![Value::Null, Value::Null, json!(12)]);
        assert_eq!(
            report.failures,
            vec![
                Failure {
                    offset: 0,
                    error: "try again".into(),
                    permanent: false
                },
                Failure {
                    offset: 1,
                    error: "never".into(),
                    permanent: true
                },
            ]
        );
    }

    #[tokio::test]
    async fn long_errors_keep_their_head_and_end() {
        let f = fragment("sized", 2, 60_000, json!({"error_bytes": 100_001}));
        let report = run(&f, &Sized).await;
        assert_eq!(report.failures.len(), 2);
        let error = &report.failures[0].error;
        assert!(error.len() <= MAX_ERROR_BYTES + 64, "{}", error.len());
        assert!(error.starts_with("éé"), "{error:.20}");
        assert!(error.ends_with("éélast line"), "the end is kept");
        assert!(error.contains("bytes cut"));
        let short = bounded_error("short".into());
        assert_eq!(short, "short");
        // Just over the bound, cutting would add more than it removes: kept whole.
        let barely = "x".repeat(MAX_ERROR_BYTES + 10);
        assert_eq!(bounded_error(barely.clone()), barely);
        // A string's size counts its escapes.
        for text in ["plain", "a\"b\\c", "\u{0}\u{1f}\n", "é"] {
            let written = serde_json::to_string(text).expect("json").len();
            assert!(json_str_size(text) >= written, "{text:?}");
        }
        assert_eq!(json_str_size("plain"), 7);
    }

    #[tokio::test]
    async fn a_report_stops_growing_at_its_budget() {
        // 1 MiB results: the budget of 8 MiB is reached after the eighth.
        let f = fragment("sized", 20, 60_000, json!({"result_bytes": 1 << 20}));
        let report = run(&f, &Sized).await;
        assert_eq!((report.done, report.cut), (8, Some(Cut::Size)));
        assert_eq!(report.results.len(), 8);
        // Results not collected: nothing grows, everything runs.
        let mut f = fragment("sized", 20, 60_000, json!({"result_bytes": 1 << 20}));
        f.collect_results = false;
        let report = run(&f, &Sized).await;
        assert_eq!((report.done, report.cut), (20, None));
    }
}
