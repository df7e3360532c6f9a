//! Folding the reducer's inputs into exact job status.
//!
//! Exactness rests on one rule: a fragment's outcome is recorded once, under its job and
//! fragment number, by the first report that arrives for it. A redelivered or duplicated
//! report changes no count; it only re-sends the settlement, which the splitter also applies
//! once. Since fragments never overlap, every operation is counted exactly once.

use std::collections::BTreeMap;

use common::contract::{JobState, JobStatus};
use common::wire::{FragmentReport, ReducerInput, Settled};
use serde_json::Value;

use crate::store::{JobRecord, Outcome, ReducerTx, StoreError};

/// What a committed batch must publish.
#[derive(Debug, Default)]
pub struct Effects {
    /// Statuses whose state changed, in the order they changed.
    pub status_changes: Vec<JobStatus>,
    /// Settlements for the splitter.
    pub settled: Vec<Settled>,
    /// Counts for the metrics: (operation, succeeded, failed) per recorded fragment.
    pub recorded: Vec<(String, u64, u64)>,
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
        fold.input(input)?;
    }
    for job in fold.jobs.values() {
        fold.tx.put_job(job)?;
    }
    Ok(fold.effects)
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

    fn input(&mut self, input: ReducerInput) -> Result<(), StoreError> {
        match input {
            ReducerInput::Accepted {
                job_id,
                operation,
                ops_total,
                submitted_at_ms,
                collect_results,
                tolerated_failure_percent,
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
        }
        Ok(())
    }

    fn fragment(&mut self, report: FragmentReport) -> Result<(), StoreError> {
        let done = report.done.min(report.indices.len() as u32);
        let (recorded_done, first) =
            self.tx
                .record_fragment(&report.job_id, report.fragment, done)?;
        self.effects.settled.push(Settled {
            job_id: report.job_id.clone(),
            fragment: report.fragment,
            done: recorded_done,
        });
        if !first {
            return Ok(());
        }
        let outcomes = outcomes(&report, done);
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count() as u64;
        let succeeded = u64::from(done) - failed;
        let job = self.job(&report.job_id)?;
        let keep: Vec<Outcome> = if job.collect_results {
            outcomes
        } else {
            // Errors are kept even when results are not: they are what a user needs to read.
            outcomes.into_iter().filter(|o| o.result.is_err()).collect()
        };
        let cancelled = job.state == Some(JobState::Cancelled);
        if job.state.is_some_and(JobState::is_terminal) && !cancelled {
            // A finished job's counts are final; a late report is recorded (so a redelivery
            // stays a no-op) but not counted.
            return Ok(());
        }
        job.ops_succeeded += succeeded;
        job.ops_failed += failed;
        job.fragments_done += 1;
        self.tx.put_outcomes(&report.job_id, &keep)?;
        self.effects
            .recorded
            .push((report.operation.clone(), succeeded, failed));
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
        self.complete_if_counted(&report.job_id)
    }

    /// Ends a job whose every operation is counted: failed if its failures exceed the share
    /// it tolerates, succeeded otherwise.
    fn complete_if_counted(&mut self, job_id: &str) -> Result<(), StoreError> {
        let job = self.job(job_id)?;
        let Some(state) = job.state else {
            return Ok(());
        };
        if state.is_terminal() || job.ops_succeeded + job.ops_failed < job.ops_total {
            return Ok(());
        }
        let exceeded =
            failure_share_exceeded(job.ops_failed, job.ops_total, job.tolerated_failure_percent);
        if exceeded {
            job.error = Some(format!(
                "{} of {} operations failed, more than the {}% tolerated",
                job.ops_failed, job.ops_total, job.tolerated_failure_percent
            ));
            self.transition(job_id, JobState::Failed)
        } else {
            self.transition(job_id, JobState::Succeeded)
        }
    }
}

/// Whether `failed` of `total` operations exceeds `tolerated_percent`.
pub fn failure_share_exceeded(failed: u64, total: u64, tolerated_percent: f64) -> bool {
    total > 0 && (failed as f64) * 100.0 > tolerated_percent * (total as f64)
}

/// The outcome of each operation a report says ran.
fn outcomes(report: &FragmentReport, done: u32) -> Vec<Outcome> {
    let mut errors: BTreeMap<u32, &str> = BTreeMap::new();
    for failure in &report.failures {
        if failure.offset < done {
            errors.insert(failure.offset, &failure.error);
        }
    }
    (0..done)
        .filter_map(|offset| {
            let index = report.indices.get(offset as usize)?;
            let result = match errors.get(&offset) {
                Some(error) => Err((*error).to_owned()),
                None => Ok(report
                    .results
                    .get(offset as usize)
                    .cloned()
                    .unwrap_or(Value::Null)),
            };
            Some(Outcome { index, result })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_share() {
        assert!(!failure_share_exceeded(0, 10, 0.0));
        assert!(failure_share_exceeded(1, 10, 0.0));
        assert!(!failure_share_exceeded(1, 10, 10.0));
        assert!(failure_share_exceeded(2, 10, 10.0));
        assert!(!failure_share_exceeded(0, 0, 0.0));
    }
}
