//! Folding the reducer's inputs into exact job status.
//!
//! Exactness rests on one rule: a fragment's outcome is recorded once, under its job and
//! fragment number, by the first report that arrives for it. A redelivered or duplicated
//! report changes no count; it only re-sends the settlement, which the splitter also applies
//! once. Since fragments never overlap, every operation is counted exactly once.
//!
//! A redrive starts a new round (`redrives`): only reports of the job's current round count,
//! and the splitter runs again exactly what no counted report of an earlier round said
//! succeeded (it learns that from each settlement's `failed` and `counted`).

use std::collections::{BTreeMap, BTreeSet};

use common::contract::{JobState, JobStatus};
use common::wire::{FragmentReport, ReducerInput, Settled, SplitterInput};
use serde_json::Value;

use crate::aggregate::Measured;
use crate::store::{JobRecord, Outcome, RecordedFragment, ReducerTx, StoreError};

/// How many of a failed job's errors its `error` quotes.
const QUOTED_ERRORS: u32 = 3;

/// What a committed batch must publish.
#[derive(Debug, Default)]
pub struct Effects {
    /// Statuses whose state changed, in the order they changed.
    pub status_changes: Vec<JobStatus>,
    /// Settlements and halts for the splitter.
    pub settled: Vec<SplitterInput>,
    /// What each fragment counted in this batch measured, for the Prometheus endpoint.
    pub measured: Vec<Measured>,
}

impl Effects {
    /// Adds what a later transaction must publish.
    pub fn extend(&mut self, later: Effects) {
        self.status_changes.extend(later.status_changes);
        self.settled.extend(later.settled);
        self.measured.extend(later.measured);
    }
}

struct Fold<'a> {
    tx: &'a mut dyn ReducerTx,
    jobs: BTreeMap<String, JobRecord>,
    effects: Effects,
    now_ms: i64,
}

/// Applies `inputs` in order in the caller's transaction.
pub fn apply(
    tx: &mut dyn ReducerTx,
    inputs: Vec<ReducerInput>,
    now_ms: i64,
) -> Result<Effects, StoreError> {
    let mut fold = Fold {
        tx,
        jobs: BTreeMap::new(),
        effects: Effects::default(),
        now_ms,
    };
    for input in inputs {
        #[cfg(debug_assertions)]
        failpoint::panic_on(&input);
        fold.input(input)?;
    }
    for job in fold.jobs.values() {
        fold.tx.put_job(job)?;
    }
    Ok(fold.effects)
}

/// A fault the tests inject into debug builds: `BATCHQ_FAILPOINT_FOLD_PANIC` names a job whose
/// accept makes the fold panic, as a bug would. Release builds have no such code.
#[cfg(debug_assertions)]
mod failpoint {
    use std::sync::OnceLock;

    use common::wire::ReducerInput;

    pub fn panic_on(input: &ReducerInput) {
        static JOB: OnceLock<Option<String>> = OnceLock::new();
        let job = JOB.get_or_init(|| std::env::var("BATCHQ_FAILPOINT_FOLD_PANIC").ok());
        if let (Some(job), ReducerInput::Accepted { job_id, .. }) = (job, input)
            && job == job_id
        {
            panic!("failpoint: the accept of job {job_id}");
        }
    }
}

impl Fold<'_> {
    fn job(&mut self, job_id: &str) -> Result<&mut JobRecord, StoreError> {
        if !self.jobs.contains_key(job_id) {
            let job = self
                .tx
                .job(job_id)?
                .unwrap_or_else(|| JobRecord::placeholder(job_id));
            self.jobs.insert(job_id.to_owned(), job);
        }
        self.jobs
            .get_mut(job_id)
            .ok_or_else(|| StoreError::Corrupt(format!("job {job_id} vanished")))
    }

    /// Moves a job to `state` (terminal states never change again) and notes the change.
    fn transition(&mut self, job_id: &str, state: JobState) -> Result<(), StoreError> {
        let now = self.now_ms;
        let job = self.job(job_id)?;
        if job.state == Some(state) || job.state.is_some_and(JobState::is_terminal) {
            return Ok(());
        }
        job.state = Some(state);
        if state == JobState::Running && job.started_at_ms.is_none() {
            job.started_at_ms = Some(now);
        }
        if state.is_terminal() {
            job.finished_at_ms = Some(now);
            job.fragments_in_flight = 0;
        }
        if let Some(status) = job.status() {
            self.effects.status_changes.push(status);
        }
        Ok(())
    }

    /// Whether `job_id`'s records were deleted (retention, `batchctl delete`). Then nothing
    /// of it is recorded and nothing settled: a late report must not bring the job back as a
    /// placeholder, and the splitter has forgotten the job's fragments too.
    fn buried(&mut self, job_id: &str) -> Result<bool, StoreError> {
        if self.jobs.contains_key(job_id) {
            return Ok(false);
        }
        match self.tx.job(job_id)? {
            Some(job) => {
                self.jobs.insert(job_id.to_owned(), job);
                Ok(false)
            }
            None => self.tx.tombstoned(job_id),
        }
    }

    fn input(&mut self, input: ReducerInput) -> Result<(), StoreError> {
        let job_id = match &input {
            ReducerInput::Accepted { job_id, .. }
            | ReducerInput::Rejected { job_id, .. }
            | ReducerInput::Progress { job_id, .. }
            | ReducerInput::Cancelled { job_id, .. }
            | ReducerInput::Redrive { job_id, .. }
            | ReducerInput::CancelRound { job_id, .. } => job_id,
            ReducerInput::Fragment(report) => &report.job_id,
        };
        if self.buried(job_id)? {
            tracing::debug!(%job_id, "dropping an input for a deleted job");
            return Ok(());
        }
        match input {
            ReducerInput::Accepted {
                job_id,
                operation,
                ops_total,
                submitted_at_ms,
                collect_results,
                tolerated_failure_percent,
                max_attempts,
                spec,
            } => {
                let job = self.job(&job_id)?;
                if job.state.is_some() {
                    return Ok(());
                }
                job.operation = Some(operation);
                job.ops_total = ops_total;
                job.submitted_at_ms = Some(submitted_at_ms);
                job.collect_results = collect_results;
                job.tolerated_failure_percent = tolerated_failure_percent;
                job.max_attempts = max_attempts.max(1);
                job.spec = spec.map(|spec| spec.to_string());
                self.transition(&job_id, JobState::Accepted)?;
                // Reports that overtook the accept may already complete the job; an empty job
                // is complete at once.
                self.complete_if_counted(&job_id)?;
            }
            ReducerInput::Rejected {
                job_id,
                error,
                submitted_at_ms,
            } => {
                let job = self.job(&job_id)?;
                if job.state.is_some() {
                    return Ok(());
                }
                job.error = Some(error);
                job.submitted_at_ms = Some(submitted_at_ms);
                self.transition(&job_id, JobState::Rejected)?;
            }
            ReducerInput::Progress {
                job_id,
                in_flight,
                seq,
                at_ms,
            } => {
                let job = self.job(&job_id)?;
                if seq <= job.progress_seq {
                    return Ok(());
                }
                job.progress_seq = seq;
                job.fragments_in_flight = in_flight;
                if job.state == Some(JobState::Accepted) && in_flight > 0 {
                    job.started_at_ms.get_or_insert(at_ms);
                    self.transition(&job_id, JobState::Running)?;
                }
            }
            ReducerInput::Cancelled { job_id, .. } => {
                self.transition(&job_id, JobState::Cancelled)?;
            }
            ReducerInput::Fragment(report) => self.fragment(report)?,
            ReducerInput::Redrive { job_id, round } => self.redrive(&job_id, round)?,
            ReducerInput::CancelRound { job_id, round } => {
                let job = self.job(&job_id)?;
                if job.redrives != round || job.state.is_none_or(JobState::is_terminal) {
                    return Ok(());
                }
                self.transition(&job_id, JobState::Cancelled)?;
                self.effects
                    .settled
                    .push(SplitterInput::Halt { job_id, round });
            }
        }
        Ok(())
    }

    /// Redrives a failed or cancelled job into `round` (one more than its redrives): it runs
    /// again, its failures counted afresh, and the splitter is told to run what did not
    /// succeed. Anything else changes nothing.
    fn redrive(&mut self, job_id: &str, round: u64) -> Result<(), StoreError> {
        let job = self.job(job_id)?;
        if round <= job.redrives {
            // Asked before. The splitter may not have heard of the redrive that ask made
            // (a crash between this store's commit and the publish): tell it again while the
            // round runs. It applies a round once.
            if round == job.redrives && job.state.is_some_and(|s| !s.is_terminal()) {
                self.effects.settled.push(SplitterInput::Redrive {
                    job_id: job_id.to_owned(),
                    round,
                });
            }
            return Ok(());
        }
        let redrivable = matches!(job.state, Some(JobState::Failed | JobState::Cancelled));
        if round != job.redrives + 1 || !redrivable {
            tracing::info!(%job_id, round, state = ?job.state, "redrive of a job that is neither failed nor cancelled; ignoring");
            return Ok(());
        }
        job.redrives = round;
        job.state = Some(JobState::Running);
        job.ops_failed = 0;
        job.error = None;
        job.finished_at_ms = None;
        tracing::info!(%job_id, round, ops_succeeded = job.ops_succeeded, "job redriven");
        if let Some(status) = job.status() {
            self.effects.status_changes.push(status);
        }
        self.effects.settled.push(SplitterInput::Redrive {
            job_id: job_id.to_owned(),
            round,
        });
        // A job whose every operation had succeeded (cancelled after its last fragment ran)
        // has nothing to run again: it succeeds now.
        self.complete_if_counted(job_id)
    }

    fn fragment(&mut self, mut report: FragmentReport) -> Result<(), StoreError> {
        let done = report.done.min(report.indices.len() as u32);
        let job = self.job(&report.job_id)?;
        let state = job.state;
        let collect_results = job.collect_results;
        let redrives = job.redrives;
        let cancelled = state == Some(JobState::Cancelled);
        // A finished job's counts are final, and a report of an earlier round than the job's
        // is stale (the splitter runs its operations again in this round): such a report is
        // recorded (so a redelivery stays a no-op) but not counted. A cancelled job still
        // counts what its running fragments did.
        let counted =
            report.round == redrives && (cancelled || !state.is_some_and(JobState::is_terminal));
        // A failure is final on the job's last attempt, and once the job has ended (nothing
        // more of it runs). Before the accept arrives the job's attempts are unknown: count
        // failures as final rather than run anything twice.
        let may_retry =
            counted && report.attempt < job.max_attempts && state.is_some_and(|s| !s.is_terminal());
        let (errors, permanent) = errors_by_offset(&mut report, done);
        // Offsets whose operation runs again; a permanent failure never does.
        let retried: BTreeSet<u32> = if may_retry {
            errors
                .keys()
                .filter(|offset| !permanent.contains(offset))
                .copied()
                .collect()
        } else {
            BTreeSet::new()
        };
        let retry = retried
            .iter()
            .filter_map(|offset| report.indices.get(*offset as usize))
            .collect();
        // Failures that are final in this round (none of a report that is not counted).
        let failed = if counted {
            errors
                .keys()
                .filter(|offset| !retried.contains(offset))
                .filter_map(|offset| report.indices.get(*offset as usize))
                .collect()
        } else {
            Vec::new()
        };
        let (recorded, first) = self.tx.record_fragment(
            &report.job_id,
            report.fragment,
            &RecordedFragment {
                done,
                retry,
                failed,
                counted,
            },
        )?;
        self.effects.settled.push(SplitterInput::Settled(Settled {
            job_id: report.job_id.clone(),
            fragment: report.fragment,
            done: recorded.done,
            retry: recorded.retry,
            elapsed_us: report.elapsed_us,
            failed: recorded.failed,
            counted: recorded.counted,
        }));
        if state == Some(JobState::Failed) {
            // The halt sent when the job failed may not have been published (a crash between
            // commit and publish redelivers its batch, which fails nothing again): every later
            // report of the failed job repeats it. The splitter ignores a halt it has applied.
            self.effects.settled.push(SplitterInput::Halt {
                job_id: report.job_id.clone(),
                round: redrives,
            });
        }
        if !first || !counted {
            return Ok(());
        }
        // A failure that runs again is neither succeeded nor failed yet.
        let failed = (errors.len() - retried.len()) as u64;
        let succeeded = u64::from(done) - errors.len() as u64;
        let keep = kept_outcomes(&mut report, done, errors, &retried, collect_results);
        let job = self.job(&report.job_id)?;
        job.ops_succeeded += succeeded;
        job.ops_failed += failed;
        job.fragments_done += 1;
        if redrives > 0 {
            // Earlier rounds may have kept an error for these operations.
            self.tx
                .forget_outcomes(&report.job_id, &report.indices, done)?;
        }
        self.tx.put_outcomes(&report.job_id, &keep)?;
        let measured = Measured {
            job_id: report.job_id.clone(),
            operation: report.operation.clone(),
            worker: report.worker.clone(),
            ops_succeeded: succeeded,
            ops_failed: failed,
            fragment_seconds: report.elapsed_us as f64 / 1e6,
            measurements: std::mem::take(&mut report.measurements),
        };
        self.tx.put_measured(&measured)?;
        self.effects.measured.push(measured);
        let job = self.job(&report.job_id)?;
        if cancelled {
            // A cancelled job ends at once; fragments that were running when it was cancelled
            // still report what they ran, and its counts say so.
            if done > 0
                && let Some(status) = job.status()
            {
                self.effects.status_changes.push(status);
            }
            return Ok(());
        }
        if job.state == Some(JobState::Accepted) {
            job.started_at_ms.get_or_insert(report.started_at_ms);
            self.transition(&report.job_id, JobState::Running)?;
        }
        if failed > 0 {
            self.fail_if_beyond_tolerance(&report.job_id)?;
        }
        self.complete_if_counted(&report.job_id)
    }

    /// Fails a job as soon as its failed operations exceed the share it tolerates: nothing
    /// more of it is dispatched, and the operations that will now never run count as failed,
    /// so that `ops_succeeded + ops_failed == ops_total` holds for the failed job too.
    fn fail_if_beyond_tolerance(&mut self, job_id: &str) -> Result<(), StoreError> {
        let job = self.job(job_id)?;
        if job.state.is_none_or(JobState::is_terminal)
            || !failure_share_exceeded(job.ops_failed, job.ops_total, job.tolerated_failure_percent)
        {
            return Ok(());
        }
        let (failed, total, tolerated) =
            (job.ops_failed, job.ops_total, job.tolerated_failure_percent);
        let not_run = total - job.ops_succeeded - failed;
        job.ops_failed += not_run;
        let quoted = self
            .tx
            .first_errors(job_id, QUOTED_ERRORS)?
            .into_iter()
            .map(|(index, error)| format!("[{index}] {error}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut error =
            format!("{failed} of {total} operations failed, more than the {tolerated}% tolerated");
        if not_run > 0 {
            error.push_str(&format!(
                "; the {not_run} operations not yet run were cancelled and count as failed"
            ));
        }
        error.push_str(&format!("; first errors: {quoted}"));
        self.job(job_id)?.error = Some(error);
        self.transition(job_id, JobState::Failed)?;
        if not_run > 0 {
            let round = self.job(job_id)?.redrives;
            self.effects.settled.push(SplitterInput::Halt {
                job_id: job_id.to_owned(),
                round,
            });
        }
        Ok(())
    }

    /// Ends a job whose every operation is counted and whose failures stayed within the share
    /// it tolerates.
    fn complete_if_counted(&mut self, job_id: &str) -> Result<(), StoreError> {
        let job = self.job(job_id)?;
        let Some(state) = job.state else {
            return Ok(());
        };
        if state.is_terminal() || job.ops_succeeded + job.ops_failed < job.ops_total {
            return Ok(());
        }
        self.fail_if_beyond_tolerance(job_id)?;
        self.transition(job_id, JobState::Succeeded)
    }
}

/// Whether `failed` of `total` operations exceeds `tolerated_percent`.
pub fn failure_share_exceeded(failed: u64, total: u64, tolerated_percent: f64) -> bool {
    total > 0 && (failed as f64) * 100.0 > tolerated_percent * (total as f64)
}

/// The outcome of each operation a report says ran.
/// A report's failures among its first `done` operations, by offset (the first one reported
/// for an offset wins).
fn errors_by_offset(
    report: &mut FragmentReport,
    done: u32,
) -> (BTreeMap<u32, String>, BTreeSet<u32>) {
    let mut errors = BTreeMap::new();
    let mut permanent = BTreeSet::new();
    for failure in std::mem::take(&mut report.failures) {
        if failure.offset < done && !errors.contains_key(&failure.offset) {
            if failure.permanent {
                permanent.insert(failure.offset);
            }
            errors.insert(failure.offset, failure.error);
        }
    }
    (errors, permanent)
}

/// What the store keeps of a counted fragment: every outcome when its job collects results,
/// else only the errors (they are what a user needs to read). A failure that runs again (its
/// offset in `retried`) is not an outcome yet. Costs nothing per operation unless results
/// are kept.
fn kept_outcomes(
    report: &mut FragmentReport,
    done: u32,
    errors: BTreeMap<u32, String>,
    retried: &BTreeSet<u32>,
    collect_results: bool,
) -> Vec<Outcome> {
    let indices = &report.indices;
    let error_outcome = |(offset, error): (u32, String)| {
        Some(Outcome {
            index: indices.get(offset as usize)?,
            result: Err(error),
        })
    };
    if !collect_results {
        return errors
            .into_iter()
            .filter(|(offset, _)| !retried.contains(offset))
            .filter_map(error_outcome)
            .collect();
    }
    let mut results = std::mem::take(&mut report.results).into_iter();
    let mut errors = errors.into_iter().peekable();
    let mut kept = Vec::with_capacity(done as usize);
    for offset in 0..done {
        let result = results.next().unwrap_or(Value::Null);
        let Some(index) = indices.get(offset as usize) else {
            continue;
        };
        match errors.next_if(|(failed, _)| *failed == offset) {
            Some((failed, _)) if retried.contains(&failed) => {}
            Some((_, error)) => kept.push(Outcome {
                index,
                result: Err(error),
            }),
            None => kept.push(Outcome {
                index,
                result: Ok(result),
            }),
        }
    }
    kept
}

#[cfg(test)]
pub(crate) mod tests {
    //! The bodies in [`cases`] run against every store (see `crate::store::tests`).

    use super::*;
    use crate::store::tests::{Fixture, Prune, sqlite};
    use crate::store::{ReducerQueries, ReducerStore};
    use common::contract::ResultLine;
    use common::wire::{Failure, Indices};

    fn accepted(ops_total: u64, max_attempts: u32, tolerated: f64) -> ReducerInput {
        ReducerInput::Accepted {
            job_id: "j".into(),
            operation: "op".into(),
            ops_total,
            submitted_at_ms: 1,
            collect_results: true,
            tolerated_failure_percent: tolerated,
            max_attempts,
            spec: None,
        }
    }

    /// A report of fragment `fragment` over `indices`, all run, failing at `failed` offsets.
    fn report(fragment: u64, attempt: u32, indices: Indices, failed: &[u32]) -> ReducerInput {
        let done = indices.len() as u32;
        ReducerInput::Fragment(FragmentReport {
            job_id: "j".into(),
            fragment,
            operation: "op".into(),
            attempt,
            worker: "w".into(),
            indices,
            done,
            failures: failed
                .iter()
                .map(|&offset| Failure {
                    offset,
                    error: format!("boom {offset}"),
                    permanent: false,
                })
                .collect(),
            results: (0..done).map(Value::from).collect(),
            cut: None,
            started_at_ms: 2,
            elapsed_us: 10,
            measurements: Default::default(),
            round: 0,
        })
    }

    fn job<S: ReducerStore>(store: &mut S) -> JobRecord {
        store
            .transaction(|tx| tx.job("j"))
            .expect("read")
            .expect("job")
    }

    fn settled(effects: &Effects) -> Vec<(u64, u32, Vec<u64>)> {
        effects
            .settled
            .iter()
            .filter_map(|s| match s {
                SplitterInput::Settled(s) => Some((s.fragment, s.done, s.retry.clone())),
                SplitterInput::Halt { .. } | SplitterInput::Redrive { .. } => None,
            })
            .collect()
    }

    pub(crate) mod cases {
        use super::*;

        pub(crate) fn a_redelivered_report_counts_once_and_settles_the_same<F: Fixture>(
            fx: &mut F,
        ) {
            let store = fx.store();
            let apply = |store: &mut F::Store, inputs| {
                store.transaction(|tx| apply(tx, inputs, 5)).expect("apply")
            };
            apply(&mut *store, vec![accepted(4, 3, 100.0)]);
            let first = apply(&mut *store, vec![report(0, 1, Indices::Span(0, 2), &[1])]);
            // The same fragment again, as another worker ran it after a crash: other outcomes.
            let again = apply(&mut *store, vec![report(0, 1, Indices::Span(0, 2), &[])]);
            assert_eq!(settled(&first), vec![(0, 2, vec![1])]);
            assert_eq!(settled(&again), settled(&first));
            let job = job(&mut *store);
            assert_eq!(
                (job.ops_succeeded, job.ops_failed, job.fragments_done),
                (1, 0, 1)
            );
        }

        pub(crate) fn a_redrive_counts_its_own_round_once_and_replaces_errors<F: Fixture>(
            fx: &mut F,
        ) {
            let store = fx.store();
            let run = |store: &mut F::Store, inputs| {
                store.transaction(|tx| apply(tx, inputs, 5)).expect("apply")
            };
            let in_round = |input: ReducerInput, round: u64| match input {
                ReducerInput::Fragment(report) => {
                    ReducerInput::Fragment(FragmentReport { round, ..report })
                }
                other => other,
            };
            let redrive = |round| ReducerInput::Redrive {
                job_id: "j".into(),
                round,
            };
            let redrives_sent = |effects: &Effects| {
                effects
                    .settled
                    .iter()
                    .filter(|s| matches!(s, SplitterInput::Redrive { round: 1, .. }))
                    .count()
            };
            run(&mut *store, vec![accepted(4, 1, 0.0)]);
            // A redrive of a running job changes nothing.
            let early = run(&mut *store, vec![redrive(1)]);
            assert!(early.status_changes.is_empty() && early.settled.is_empty());
            // Index 1 fails: the job fails, its 2 unrun operations count as failed.
            run(&mut *store, vec![report(0, 1, Indices::Span(0, 2), &[1])]);
            let failed = job(&mut *store);
            assert_eq!(failed.state, Some(JobState::Failed));
            assert_eq!((failed.ops_succeeded, failed.ops_failed), (1, 3));
            // A late report of the failed job is settled as not counted.
            let late = run(&mut *store, vec![report(1, 1, Indices::Span(2, 3), &[])]);
            assert!(
                late.settled.iter().any(
                    |s| matches!(s, SplitterInput::Settled(s) if s.fragment == 1 && !s.counted)
                )
            );

            let redriven = run(&mut *store, vec![redrive(1)]);
            assert_eq!(redrives_sent(&redriven), 1);
            let status = redriven.status_changes.last().cloned().expect("a status");
            assert_eq!(
                (
                    status.state,
                    status.redrives,
                    status.ops_succeeded,
                    status.ops_failed
                ),
                (JobState::Running, 1, 1, 0)
            );
            // The same ask again (a redelivery) redrives nothing more, and tells the splitter
            // again; a stale report of round 0 counts nothing.
            let again = run(
                &mut *store,
                vec![
                    redrive(1),
                    in_round(report(2, 1, Indices::Span(3, 4), &[]), 0),
                ],
            );
            assert_eq!(redrives_sent(&again), 1);
            assert!(
                again.status_changes.is_empty(),
                "{:?}",
                again.status_changes
            );
            let job_now = job(&mut *store);
            assert_eq!(
                (job_now.redrives, job_now.ops_succeeded, job_now.ops_failed),
                (1, 1, 0)
            );

            // Round 1 runs what did not succeed: index 1 now succeeds, 2 and 3 too.
            run(
                &mut *store,
                vec![
                    in_round(report(3, 1, Indices::List(vec![1]), &[]), 1),
                    in_round(report(4, 1, Indices::Span(2, 4), &[]), 1),
                ],
            );
            let done = job(&mut *store);
            assert_eq!(done.state, Some(JobState::Succeeded));
            assert_eq!(
                (done.ops_succeeded, done.ops_failed, done.redrives),
                (4, 0, 1)
            );
            let lines = fx.queries().results("j", 0, 10).expect("results");
            let store = fx.store();
            assert_eq!(lines.len(), 4, "{lines:?}");
            assert!(
                lines.iter().all(|l| matches!(l, ResultLine::Ok { .. })),
                "the latest outcome replaces the error: {lines:?}"
            );
            // A cancel the splitter could not apply (it had not started round 1 yet) cancels
            // nothing once the round is over, nor a round the job is not in.
            for round in [1, 2] {
                let late = run(
                    &mut *store,
                    vec![ReducerInput::CancelRound {
                        job_id: "j".into(),
                        round,
                    }],
                );
                assert!(late.status_changes.is_empty() && late.settled.is_empty());
            }
            // A succeeded job is not redriven.
            let refused = store
                .transaction(|tx| apply(tx, vec![redrive(2)], 6))
                .expect("apply");
            assert!(refused.status_changes.is_empty() && refused.settled.is_empty());
            assert_eq!(job(&mut *store).redrives, 1);
        }

        pub(crate) fn a_cancel_before_the_splitter_redrives_cancels_the_round<F: Fixture>(
            fx: &mut F,
        ) {
            let store = fx.store();
            let mut run = |inputs| store.transaction(|tx| apply(tx, inputs, 5)).expect("apply");
            let cancel_round = |round| ReducerInput::CancelRound {
                job_id: "j".into(),
                round,
            };
            run(vec![accepted(4, 1, 0.0)]);
            // Not redriven: a cancel for a round the job is not in changes nothing.
            let early = run(vec![cancel_round(1)]);
            assert!(early.status_changes.is_empty() && early.settled.is_empty());
            run(vec![report(0, 1, Indices::Span(0, 4), &[0])]);
            run(vec![ReducerInput::Redrive {
                job_id: "j".into(),
                round: 1,
            }]);
            let effects = run(vec![cancel_round(1)]);
            let status = effects.status_changes.last().cloned().expect("a status");
            assert_eq!((status.state, status.redrives), (JobState::Cancelled, 1));
            assert_eq!(
                effects.settled,
                vec![SplitterInput::Halt {
                    job_id: "j".into(),
                    round: 1
                }]
            );
        }

        pub(crate) fn a_late_report_of_a_deleted_job_records_and_settles_nothing<F: Fixture>(
            fx: &mut F,
        ) {
            let mut pruner = fx.pruner();
            let store = fx.store();
            let apply = |store: &mut F::Store, inputs| {
                store.transaction(|tx| apply(tx, inputs, 5)).expect("apply")
            };
            apply(&mut *store, vec![accepted(2, 1, 0.0)]);
            apply(&mut *store, vec![report(0, 1, Indices::Span(0, 2), &[])]);
            assert_eq!(job(&mut *store).state, Some(JobState::Succeeded));
            let burial = pruner
                .bury("j", common::wire::Removal::Deleted, 9, None)
                .expect("bury");
            assert_eq!(burial, crate::store::Burial::Buried);

            // A redelivered report, a duplicate accept and a cancel arrive after the deletion.
            let late = apply(
                &mut *store,
                vec![
                    report(0, 1, Indices::Span(0, 2), &[]),
                    report(1, 1, Indices::Span(2, 3), &[0]),
                    accepted(2, 1, 0.0),
                    ReducerInput::Cancelled {
                        job_id: "j".into(),
                        at_ms: 6,
                    },
                ],
            );
            assert!(late.settled.is_empty(), "{:?}", late.settled);
            assert!(late.status_changes.is_empty(), "{:?}", late.status_changes);
            assert!(late.measured.is_empty());
            assert_eq!(
                store.transaction(|tx| tx.job("j")).expect("read"),
                None,
                "no placeholder brings the job back"
            );
        }

        pub(crate) fn only_the_last_attempt_counts_a_failure<F: Fixture>(fx: &mut F) {
            let store = fx.store();
            let mut run = |inputs| store.transaction(|tx| apply(tx, inputs, 5)).expect("apply");
            run(vec![accepted(3, 2, 100.0)]);
            run(vec![report(0, 1, Indices::Span(0, 3), &[0, 2])]);
            // The retry fragment: index 0 fails again (final), index 2 succeeds.
            let effects = run(vec![report(1, 2, Indices::List(vec![0, 2]), &[0])]);
            assert_eq!(settled(&effects), vec![(1, 2, vec![])]);
            let job = job(&mut *store);
            assert_eq!(job.state, Some(JobState::Succeeded));
            assert_eq!((job.ops_succeeded, job.ops_failed), (2, 1));
        }

        pub(crate) fn a_permanent_failure_is_final_on_any_attempt<F: Fixture>(fx: &mut F) {
            let store = fx.store();
            let run = |store: &mut F::Store, inputs| {
                store.transaction(|tx| apply(tx, inputs, 5)).expect("apply")
            };
            run(store, vec![accepted(3, 3, 100.0)]);
            // First of three attempts: index 0 fails for good, index 2 may be tried again.
            let mut first = report(0, 1, Indices::Span(0, 3), &[0, 2]);
            if let ReducerInput::Fragment(report) = &mut first {
                report.failures[0].permanent = true;
            }
            let effects = run(store, vec![first]);
            assert_eq!(
                settled(&effects),
                vec![(0, 3, vec![2])],
                "only index 2 runs again"
            );
            let job = job(&mut *store);
            assert_eq!((job.ops_succeeded, job.ops_failed), (1, 1));
            let effects = run(store, vec![report(1, 2, Indices::List(vec![2]), &[])]);
            assert_eq!(settled(&effects), vec![(1, 1, vec![])]);
            let job = super::job(&mut *store);
            assert_eq!(job.state, Some(JobState::Succeeded));
            assert_eq!((job.ops_succeeded, job.ops_failed), (2, 1));
            let outcomes = fx.queries().results("j", 0, 10).expect("results");
            assert_eq!(
                outcomes,
                vec![
                    ResultLine::Err {
                        index: 0,
                        error: "boom 0".into()
                    },
                    ResultLine::Ok {
                        index: 1,
                        result: Value::from(1)
                    },
                    ResultLine::Ok {
                        index: 2,
                        result: Value::from(0)
                    },
                ]
            );
        }

        pub(crate) fn exceeding_the_tolerated_share_fails_at_once_and_halts_dispatch<F: Fixture>(
            fx: &mut F,
        ) {
            let store = fx.store();
            let mut run = |inputs| store.transaction(|tx| apply(tx, inputs, 5)).expect("apply");
            run(vec![accepted(100, 1, 10.0)]);
            run(vec![report(
                0,
                1,
                Indices::Span(0, 10),
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            )]);
            let halts = |effects: &Effects| {
                effects.settled.contains(&SplitterInput::Halt {
                    job_id: "j".into(),
                    round: 0,
                })
            };
            let effects = run(vec![report(1, 1, Indices::Span(10, 11), &[0])]);
            assert!(halts(&effects), "{:?}", effects.settled);
            let job = job(&mut *store);
            assert_eq!(job.state, Some(JobState::Failed));
            // 11 ran and failed; the 89 never run count as failed too.
            assert_eq!((job.ops_succeeded, job.ops_failed), (0, 100));
            let error = job.error.unwrap_or_default();
            assert!(error.starts_with("11 of 100 operations failed"), "{error}");
            assert!(error.contains("89 operations not yet run"), "{error}");
            assert!(
                error.contains("[0] boom 0; [1] boom 1; [2] boom 2"),
                "{error}"
            );
            // A late report of the failed job changes no count, and repeats the halt; so does the
            // failing report redelivered (as after a crash before its batch was published).
            for late in [
                report(2, 1, Indices::Span(11, 12), &[]),
                report(1, 1, Indices::Span(10, 11), &[0]),
            ] {
                let effects = store
                    .transaction(|tx| apply(tx, vec![late], 6))
                    .expect("apply");
                assert!(halts(&effects), "{:?}", effects.settled);
            }
            let job = super::job(&mut *store);
            assert_eq!((job.ops_succeeded, job.ops_failed), (0, 100));
        }
    }

    #[test]
    fn a_cancel_before_the_splitter_redrives_cancels_the_round() {
        cases::a_cancel_before_the_splitter_redrives_cancels_the_round(&mut sqlite());
    }

    #[test]
    fn a_redrive_counts_its_own_round_once_and_replaces_errors() {
        cases::a_redrive_counts_its_own_round_once_and_replaces_errors(&mut sqlite());
    }

    #[test]
    fn a_redelivered_report_counts_once_and_settles_the_same() {
        cases::a_redelivered_report_counts_once_and_settles_the_same(&mut sqlite());
    }

    #[test]
    fn a_late_report_of_a_deleted_job_records_and_settles_nothing() {
        cases::a_late_report_of_a_deleted_job_records_and_settles_nothing(&mut sqlite());
    }

    #[test]
    fn only_the_last_attempt_counts_a_failure() {
        cases::only_the_last_attempt_counts_a_failure(&mut sqlite());
    }

    #[test]
    fn a_permanent_failure_is_final_on_any_attempt() {
        cases::a_permanent_failure_is_final_on_any_attempt(&mut sqlite());
    }

    #[test]
    fn exceeding_the_tolerated_share_fails_at_once_and_halts_dispatch() {
        cases::exceeding_the_tolerated_share_fails_at_once_and_halts_dispatch(&mut sqlite());
    }

    #[test]
    fn failure_share() {
        assert!(!failure_share_exceeded(0, 10, 0.0));
        assert!(failure_share_exceeded(1, 10, 0.0));
        assert!(!failure_share_exceeded(1, 10, 10.0));
        assert!(failure_share_exceeded(2, 10, 10.0));
        assert!(!failure_share_exceeded(0, 0, 0.0));
    }
}
