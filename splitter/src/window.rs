//! The splitter's decisions, applied one batch of commands per transaction: accept or reject
//! jobs, cut them into fragments, keep at most `max_concurrent_fragments` of each job out,
//! re-dispatch what a fragment left unfinished, drain cancelled jobs, and run again what did
//! not succeed when a failed or cancelled job is redriven.
//!
//! Every message these decisions produce goes to the outbox in the same transaction, so a
//! crash can only re-send a message (deduplicated downstream), never lose one.

use std::collections::{BTreeMap, BTreeSet};

use common::broker::{json_properties, transient_json_properties};
use common::jobspec::{JobInput, JobSpec, Rejection};
use common::lapin::BasicProperties;
use common::lapin::types::ShortString;
use common::topology::{KEY_REDUCER, KEY_SETTLED, Names, retry_delay_ms};
use common::wire::{Control, Fragment, Indices, Payload, ReducerInput, Settled, SplitterInput};
use serde_json::{Map, Value};

use crate::store::{DispatchState, FragmentRow, JobRow, OutboxMessage, SplitterTx, StoreError};

/// Most operations in one fragment when the JobSpec gives no `fragment_size` and the
/// fragment's messages carry something per operation (its items, its report's results):
/// bounds their size.
pub const MAX_DEFAULT_FRAGMENT_SIZE: u64 = 10_000;

/// Most operations in one fragment when the JobSpec gives no `fragment_size` and neither the
/// fragment (a range) nor its report (results not collected) grows with it: only failures
/// would, so this still bounds a report in which every operation failed (a few MB).
pub const MAX_DEFAULT_RANGE_FRAGMENT_SIZE: u64 = 100_000;

/// The largest fragment the default sizing cuts for a job of this shape.
pub fn largest_default_size(range: bool, collect_results: bool) -> u64 {
    if range && !collect_results {
        MAX_DEFAULT_RANGE_FRAGMENT_SIZE
    } else {
        MAX_DEFAULT_FRAGMENT_SIZE
    }
}

/// Operations in a job's first fragments when the JobSpec gives no `fragment_size` and
/// nothing is known yet of what an operation costs.
pub const FIRST_FRAGMENT_SIZE: u64 = 8;

/// Fragments of a job out at once while the cost of its operation is still unknown (no
/// `fragment_size` given, nothing settled yet). Filling a wide window with first-size
/// fragments cost a broker round trip each for a few operations; the window opens as soon as
/// one of these settles, after at most `FIRST_FRAGMENT_SIZE` operations' time. Settlements
/// can carry no cost (a poison fragment's, or a worker's that timed nothing): after twice this
/// many fragments the window opens at the first size anyway.
pub const PROBE_FRAGMENTS: u64 = 4;

/// One thing the splitter was told, decoded from a delivery.
#[derive(Debug, Clone)]
pub enum Command {
    Submit {
        spec: JobSpec,
        at_ms: i64,
    },
    Reject {
        rejection: Rejection,
        dead: DeadCopy,
        at_ms: i64,
    },
    Cancel {
        job_id: String,
    },
    /// A RedriveRequest: the reducer decides whether the job may be redriven.
    Redrive {
        job_id: String,
    },
    Settle(Settled),
    /// The reducer ended the job early (too many failures) in redrive `round`: release
    /// nothing more of it.
    Halt {
        job_id: String,
        round: u64,
    },
    /// The reducer redrove the job into `round`: release what did not succeed.
    Redriven {
        job_id: String,
        round: u64,
    },
    /// A message that is not for us in any usable way: keep it on `{ns}.dead`.
    Dead(DeadCopy),
}

/// A copy of a refused message for `{ns}.dead`, with the reason in its headers.
#[derive(Debug, Clone)]
pub struct DeadCopy {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// The largest fragment that still lets a job fill its window: a job is cut into at least
/// `max_concurrent` fragments, so its work spreads over the fleet.
fn spread_size(ops_total: u64, max_concurrent: u32) -> u64 {
    ops_total.div_ceil(u64::from(max_concurrent).max(1)).max(1)
}

/// The size of a job's first fragments when the JobSpec gave none: small, until the cost of
/// an operation is known.
pub fn first_fragment_size(ops_total: u64, max_concurrent: u32) -> u32 {
    spread_size(ops_total, max_concurrent).clamp(1, FIRST_FRAGMENT_SIZE) as u32
}

/// The size that makes a fragment run for about half its lifespan at `op_cost_ns` per
/// operation, within `[1, largest]` and no larger than lets the job fill its window. Half, so
/// a fragment ends well before its lifespan even when operations vary.
pub fn fragment_size_for_cost(
    op_cost_ns: u64,
    lifespan_ms: u64,
    ops_total: u64,
    max_concurrent: u32,
    largest: u64,
) -> u32 {
    let target_ns = lifespan_ms.saturating_mul(1_000_000) / 2;
    (target_ns / op_cost_ns.max(1))
        .min(spread_size(ops_total, max_concurrent))
        .clamp(1, largest.max(1)) as u32
}

/// Folds one fragment's observed cost per operation into the job's moving average (the new
/// observation weighs one half, so the size converges within a few fragments).
fn observe_cost(previous_ns: Option<u64>, elapsed_us: u64, done: u32) -> Option<u64> {
    if done == 0 || elapsed_us == 0 {
        return previous_ns;
    }
    let observed = elapsed_us.saturating_mul(1000) / u64::from(done);
    Some(match previous_ns {
        Some(previous) => (previous + observed) / 2,
        None => observed,
    })
}

struct Batch<'a> {
    tx: &'a mut dyn SplitterTx,
    names: &'a Names,
    /// Jobs read or changed in this batch, with whether their count out changed.
    jobs: BTreeMap<String, (JobRow, bool)>,
    /// What each loaded job's row held when this batch read it (nothing for a job new in
    /// this batch), to tell what changed by the batch's end.
    loaded: BTreeMap<String, Loaded>,
    /// Jobs redriven in this batch: the reducer hears their count out whatever it is (it
    /// counted none of the round's fragments yet).
    redriven: BTreeSet<String>,
}

/// A job's row as a batch first read it.
#[derive(Default)]
struct Loaded {
    /// Fragments out: what the reducer last heard (a note is sent only when it differs).
    in_flight: u64,
    /// The cost per operation observed so far: the cost table holds about this much.
    op_cost_ns: Option<u64>,
}

/// Applies `commands` in order inside the caller's transaction.
pub fn apply(
    tx: &mut dyn SplitterTx,
    names: &Names,
    commands: Vec<Command>,
) -> Result<(), StoreError> {
    let mut batch = Batch {
        tx,
        names,
        jobs: BTreeMap::new(),
        loaded: BTreeMap::new(),
        redriven: BTreeSet::new(),
    };
    for command in commands {
        #[cfg(debug_assertions)]
        failpoint::panic_on(&command);
        match command {
            Command::Submit { spec, at_ms } => batch.submit(spec, at_ms)?,
            Command::Reject {
                rejection,
                dead,
                at_ms,
            } => batch.reject(rejection, dead, at_ms)?,
            Command::Cancel { job_id } => batch.cancel(&job_id)?,
            Command::Redrive { job_id } => batch.ask_redrive(&job_id)?,
            Command::Settle(settled) => batch.settle(settled)?,
            Command::Halt { job_id, round } => batch.halt(&job_id, round)?,
            Command::Redriven { job_id, round } => batch.redriven(&job_id, round)?,
            Command::Dead(dead) => batch.dead(dead)?,
        }
    }
    batch.finish()
}

/// A fault the tests inject into debug builds: `BATCHQ_FAILPOINT_SPLIT_PANIC` names a job whose
/// submission makes the splitter panic, as a bug would. Release builds have no such code.
#[cfg(debug_assertions)]
mod failpoint {
    use std::sync::OnceLock;

    use super::Command;

    pub fn panic_on(command: &Command) {
        static JOB: OnceLock<Option<String>> = OnceLock::new();
        let job = JOB.get_or_init(|| std::env::var("BATCHQ_FAILPOINT_SPLIT_PANIC").ok());
        if let (Some(job), Command::Submit { spec, .. }) = (job, command)
            && *job == spec.job_id
        {
            panic!("failpoint: the submission of job {job}");
        }
    }
}

impl Batch<'_> {
    fn load(&mut self, job_id: &str) -> Result<Option<&mut (JobRow, bool)>, StoreError> {
        if !self.jobs.contains_key(job_id) {
            match self.tx.job(job_id)? {
                Some(job) => {
                    let loaded = Loaded {
                        in_flight: job.in_flight,
                        op_cost_ns: job.op_cost_ns,
                    };
                    self.loaded.insert(job_id.to_owned(), loaded);
                    self.jobs.insert(job_id.to_owned(), (job, false));
                }
                None => return Ok(None),
            }
        }
        Ok(self.jobs.get_mut(job_id))
    }

    fn tell_reducer(&mut self, input: &ReducerInput) -> Result<(), StoreError> {
        self.push(
            self.names.events(),
            KEY_REDUCER.to_owned(),
            encode(input)?,
            json_properties(),
            true,
        )
    }

    fn push(
        &mut self,
        exchange: String,
        routing_key: String,
        body: Vec<u8>,
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), StoreError> {
        self.tx.push_outbox(OutboxMessage {
            seq: 0,
            exchange,
            routing_key,
            body,
            properties: serde_json::to_string(&properties)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            mandatory,
        })
    }

    fn submit(&mut self, spec: JobSpec, at_ms: i64) -> Result<(), StoreError> {
        if self.load(&spec.job_id)?.is_some() {
            tracing::info!(job_id = %spec.job_id, "job id already known; ignoring the new JobSpec");
            return Ok(());
        }
        let ops_total = spec.ops_total();
        let summary = spec.summary();
        let params =
            serde_json::to_string(&spec.params).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // A job without fragment_size starts from the cost the same operation with the same
        // params had in an earlier job, if any (the first settlement corrects it), and else
        // probes with small fragments.
        let known_cost = match spec.fragment_size {
            Some(_) => None,
            None => self.tx.operation_cost(&spec.operation, &params)?,
        };
        let fragment_size = spec
            .fragment_size
            .unwrap_or_else(|| first_fragment_size(ops_total, spec.max_concurrent_fragments));
        let (range_base, items) = match spec.input {
            JobInput::Range { start, .. } => (Some(start), None),
            JobInput::Items(items) => (None, Some(items)),
        };
        let job = JobRow {
            job_id: spec.job_id.clone(),
            state: DispatchState::Active,
            operation: spec.operation.clone(),
            params,
            range_base,
            ops_total,
            fragment_size,
            max_concurrent: spec.max_concurrent_fragments,
            lifespan_ms: spec.lifespan_ms,
            max_attempts: spec.max_attempts,
            collect_results: spec.collect_results,
            cursor: 0,
            next_fragment: 0,
            in_flight: 0,
            progress_seq: 0,
            adaptive: spec.fragment_size.is_none(),
            op_cost_ns: known_cost,
            round: 0,
            redrivable: true,
        };
        let job = JobRow {
            fragment_size: job.sized_fragment().unwrap_or(job.fragment_size),
            ..job
        };
        self.tx.insert_job(&job)?;
        if let Some(items) = items {
            self.tx.insert_items(&job.job_id, &items)?;
        }
        self.tell_reducer(&ReducerInput::Accepted {
            job_id: job.job_id.clone(),
            operation: job.operation.clone(),
            ops_total,
            submitted_at_ms: at_ms,
            collect_results: job.collect_results,
            tolerated_failure_percent: spec.tolerated_failure_percent,
            max_attempts: spec.max_attempts,
            spec: Some(summary),
        })?;
        tracing::info!(job_id = %job.job_id, ops_total, fragment_size = job.fragment_size, "job accepted");
        self.jobs.insert(job.job_id.clone(), (job, true));
        Ok(())
    }

    fn reject(
        &mut self,
        rejection: Rejection,
        dead: DeadCopy,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        tracing::warn!(job_id = %rejection.job_id, error = %rejection.error, "job rejected");
        if self.load(&rejection.job_id)?.is_none() {
            let job = JobRow::inert(&rejection.job_id, DispatchState::Rejected);
            self.tx.insert_job(&job)?;
            self.jobs.insert(job.job_id.clone(), (job, false));
            self.tell_reducer(&ReducerInput::Rejected {
                job_id: rejection.job_id,
                error: rejection.error,
                submitted_at_ms: at_ms,
            })?;
        }
        // A job id that is known already keeps its own status; the message is still kept.
        self.dead(dead)
    }

    /// An input that names something this store does not know (a job it never recorded):
    /// no reason to stop the splitter, whose other inputs are fine. Said in the log and kept
    /// on `{ns}.dead` with the reason.
    fn unusable(&mut self, input: &SplitterInput, reason: String) -> Result<(), StoreError> {
        tracing::warn!(%reason, "keeping an unusable settlement on the dead-letter queue");
        let body = encode(input)?;
        let events = self.names.events();
        self.dead(crate::intake::internal_dead_copy(
            &events,
            KEY_SETTLED,
            body,
            &reason,
        ))
    }

    fn dead(&mut self, dead: DeadCopy) -> Result<(), StoreError> {
        let exchange = self.names.dead();
        self.push(exchange, dead.routing_key, dead.body, dead.properties, true)
    }

    fn cancel(&mut self, job_id: &str) -> Result<(), StoreError> {
        let Some((job, _)) = self.load(job_id)? else {
            tracing::warn!(%job_id, "cancel for an unknown job; ignoring");
            return Ok(());
        };
        if job.state != DispatchState::Active {
            tracing::info!(%job_id, state = ?job.state, "cancel for a job with nothing left to dispatch");
            if job.state == DispatchState::Rejected {
                return Ok(());
            }
            // The reducer may have started the next redrive round, which this splitter has
            // not applied yet: that round is the one the cancel is for.
            let round = job.round + 1;
            return self.tell_reducer(&ReducerInput::CancelRound {
                job_id: job_id.to_owned(),
                round,
            });
        }
        job.state = DispatchState::Cancelling;
        let round = job.round;
        tracing::info!(%job_id, in_flight = job.in_flight, "job cancelled; draining");
        // The job ends now: its status must not wait for fragments that may sit unconsumed
        // (no worker offers the operation). Fragments still running report what they did;
        // the reducer adds those to the cancelled job's counts.
        self.tell_reducer(&ReducerInput::Cancelled {
            job_id: job_id.to_owned(),
            at_ms: common::timefmt::now_ms(),
        })?;
        self.broadcast_cancel(job_id, round)
    }

    fn halt(&mut self, job_id: &str, round: u64) -> Result<(), StoreError> {
        let Some((job, _)) = self.load(job_id)? else {
            return self.unusable(
                &SplitterInput::Halt {
                    job_id: job_id.to_owned(),
                    round,
                },
                format!("halt of unknown job {job_id}"),
            );
        };
        // A halt of an earlier round (repeated, or redelivered after the redrive) is over.
        if job.state != DispatchState::Active || round < job.round {
            return Ok(());
        }
        job.state = DispatchState::Cancelling;
        let round = job.round;
        tracing::info!(%job_id, in_flight = job.in_flight, "job failed; draining");
        self.broadcast_cancel(job_id, round)
    }

    /// A RedriveRequest: asks the reducer, which alone knows whether the job failed or was
    /// cancelled, to redrive it into the round after the one the splitter is in. A job of
    /// which nothing can run again is refused here, its request kept on `{ns}.dead`.
    fn ask_redrive(&mut self, job_id: &str) -> Result<(), StoreError> {
        let Some((job, _)) = self.load(job_id)? else {
            tracing::warn!(%job_id, "redrive of an unknown job; ignoring");
            return Ok(());
        };
        if job.state == DispatchState::Rejected {
            tracing::info!(%job_id, "redrive of a rejected job; ignoring");
            return Ok(());
        }
        if !job.redrivable {
            let reason = format!(
                "job {job_id} cannot be redriven: it was accepted before this release, which \
                 keeps what a redrive needs (the operations that did not succeed, the items)"
            );
            tracing::warn!(%reason, "refusing a redrive");
            let body = encode(&common::contract::RedriveRequest {
                job_id: job_id.to_owned(),
            })?;
            let jobs = self.names.jobs();
            return self.dead(crate::intake::internal_dead_copy(
                &jobs,
                common::topology::KEY_REDRIVE,
                body,
                &reason,
            ));
        }
        let round = job.round + 1;
        self.tell_reducer(&ReducerInput::Redrive {
            job_id: job_id.to_owned(),
            round,
        })
    }

    /// The reducer redrove the job into `round`: every fragment still out belongs to an
    /// earlier round (its report will count nothing) and runs again, with what earlier
    /// rounds left over and what was never dispatched, with fresh attempts (see `finish`).
    fn redriven(&mut self, job_id: &str, round: u64) -> Result<(), StoreError> {
        let Some((job, _)) = self.load(job_id)? else {
            return self.unusable(
                &SplitterInput::Redrive {
                    job_id: job_id.to_owned(),
                    round,
                },
                format!("redrive of unknown job {job_id}"),
            );
        };
        if round <= job.round || job.state == DispatchState::Rejected {
            // Applied before (a redelivered message).
            return Ok(());
        }
        let previous = job.round;
        for fragment in self.tx.take_fragments(job_id)? {
            self.tx.park(job_id, previous, &fragment.indices)?;
        }
        let Some((job, changed)) = self.jobs.get_mut(job_id) else {
            return Err(StoreError::Corrupt(format!("job {job_id} vanished")));
        };
        job.round = round;
        job.state = DispatchState::Active;
        job.in_flight = 0;
        *changed = true;
        tracing::info!(%job_id, round, "job redriven");
        self.redriven.insert(job_id.to_owned());
        Ok(())
    }

    /// Tells every connected worker to drop `job_id`'s fragments of `round` and earlier.
    /// Transient and unconfirmed by design: a worker that missed it is told again when one
    /// of the job's fragments settles.
    fn broadcast_cancel(&mut self, job_id: &str, round: u64) -> Result<(), StoreError> {
        let control = encode(&Control::Cancel {
            job_id: job_id.to_owned(),
            round,
        })?;
        let exchange = self.names.control();
        self.push(
            exchange,
            String::new(),
            control,
            transient_json_properties(),
            false,
        )
    }

    fn settle(&mut self, settled: Settled) -> Result<(), StoreError> {
        let Some(fragment) = self.tx.take_fragment(&settled.job_id, settled.fragment)? else {
            // Settled before: a redelivered settlement changes nothing.
            return Ok(());
        };
        let Some((job, changed)) = self.load(&settled.job_id)? else {
            let reason = format!(
                "settlement of fragment {} of unknown job {}",
                settled.fragment, settled.job_id
            );
            return self.unusable(&SplitterInput::Settled(settled), reason);
        };
        job.in_flight = job.in_flight.saturating_sub(1);
        *changed = true;
        // Every job observes the cost of its operation (for the jobs that follow, see
        // `finish`); a job without fragment_size also sizes its next fragments by it.
        job.op_cost_ns = observe_cost(job.op_cost_ns, settled.elapsed_us, settled.done);
        if let Some(size) = job.sized_fragment() {
            job.fragment_size = size;
        }
        let remind = job.state == DispatchState::Cancelling && job.in_flight > 0;
        let done = settled.done as usize;
        let (round, active) = (job.round, job.state == DispatchState::Active);
        let job_id = settled.job_id.clone();
        if !settled.counted {
            // None of it succeeded as far as the job's counts go (the job had failed): all of
            // it runs again on a redrive, none of it before.
            self.tx.park(&job_id, round, &fragment.indices)?;
        } else {
            if !settled.failed.is_empty() {
                self.tx
                    .park(&job_id, round, &Indices::List(settled.failed.clone()))?;
            }
            if !active {
                // Dispatching stopped: what the fragment did not run, and what would have
                // run again, wait for a redrive.
                let tail = fragment.indices.tail(done);
                if !tail.is_empty() {
                    self.tx.park(&job_id, round, &tail)?;
                }
                if !settled.retry.is_empty() {
                    self.tx
                        .park(&job_id, round, &Indices::List(settled.retry.clone()))?;
                }
            }
        }
        let Some((job, _)) = self.jobs.get_mut(&job_id) else {
            return Err(StoreError::Corrupt(format!("job {job_id} vanished")));
        };
        if active && settled.counted {
            let mut job = job.clone();
            if done < fragment.indices.len() {
                // The fragment stopped early (lifespan, a worker shutting down): what it did
                // not run continues as a new fragment of its own, at once.
                let remainder = fragment.indices.tail(done);
                self.release(&mut job, remainder, fragment.attempt, None)?;
            }
            if !settled.retry.is_empty() {
                // Operations that failed on a non-final attempt run again after a backoff.
                let attempt = fragment.attempt + 1;
                let delay = jittered(retry_delay_ms(attempt));
                self.release(&mut job, Indices::List(settled.retry), attempt, Some(delay))?;
            }
            self.jobs.insert(job.job_id.clone(), (job, true));
        }
        if remind {
            // Workers that joined after the cancel (or lost their control queue) learn of it
            // before they take the job's next queued fragment.
            self.broadcast_cancel(&job_id, round)?;
        }
        Ok(())
    }

    /// Records `indices` as a new fragment of `job` and queues its message: to the work queue,
    /// or to wait `delay` (ms, a retry's backoff) in the retry queue of its backoff step.
    fn release(
        &mut self,
        job: &mut JobRow,
        indices: Indices,
        attempt: u32,
        delay: Option<u64>,
    ) -> Result<(), StoreError> {
        let row = FragmentRow {
            job_id: job.job_id.clone(),
            fragment: job.next_fragment,
            indices,
            attempt,
        };
        job.next_fragment += 1;
        job.in_flight += 1;
        let payload = match job.range_base {
            Some(base) => Payload::Range { base },
            None => Payload::Items(self.tx.items(&job.job_id, &row.indices)?),
        };
        let params: Map<String, Value> =
            serde_json::from_str(&job.params).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let message = Fragment {
            job_id: job.job_id.clone(),
            fragment: row.fragment,
            operation: job.operation.clone(),
            params,
            attempt,
            indices: row.indices.clone(),
            payload,
            lifespan_ms: job.lifespan_ms,
            collect_results: job.collect_results,
            round: job.round,
        };
        self.tx.insert_fragment(&row)?;
        let (exchange, properties) = match delay {
            None => (self.names.work(), json_properties()),
            Some(delay_ms) => (
                self.names.retry(retry_delay_ms(attempt)),
                json_properties().with_expiration(ShortString::from(delay_ms.to_string())),
            ),
        };
        // The routing key is the operation either way: a retry fragment keeps it when it
        // expires from its retry queue into the work exchange.
        self.push(
            exchange,
            job.operation.clone(),
            encode(&message)?,
            properties,
            true,
        )
    }

    /// Fills each touched job's window, notices jobs with nothing left, and tells the reducer
    /// how many fragments are out.
    fn finish(mut self) -> Result<(), StoreError> {
        let jobs = std::mem::take(&mut self.jobs);
        for (_, (mut job, mut changed)) in jobs {
            match job.state {
                DispatchState::Active => {
                    let mut window = u64::from(job.max_concurrent);
                    if job.adaptive
                        && job.op_cost_ns.is_none()
                        && job.next_fragment < 2 * PROBE_FRAGMENTS
                    {
                        window = window.min(PROBE_FRAGMENTS);
                    }
                    // A redriven job first releases what earlier rounds did not finish.
                    while job.round > 0 && job.in_flight < window {
                        let Some((id, parked)) = self.tx.next_parked(&job.job_id, job.round)?
                        else {
                            break;
                        };
                        let size = job.fragment_size.max(1) as usize;
                        let rest = parked.tail(size);
                        self.tx
                            .replace_parked(id, Some(&rest).filter(|r| !r.is_empty()))?;
                        self.release(&mut job, parked.head(size), 1, None)?;
                        changed = true;
                    }
                    while job.in_flight < window && job.cursor < job.ops_total {
                        let end = job
                            .cursor
                            .saturating_add(u64::from(job.fragment_size))
                            .min(job.ops_total);
                        let indices = Indices::Span(job.cursor, end);
                        job.cursor = end;
                        self.release(&mut job, indices, 1, None)?;
                        changed = true;
                    }
                    if job.cursor >= job.ops_total
                        && job.in_flight == 0
                        && (job.round == 0
                            || self.tx.next_parked(&job.job_id, job.round)?.is_none())
                    {
                        job.state = DispatchState::Finished;
                        self.drop_items_unless_left_over(&job)?;
                    }
                }
                DispatchState::Cancelling if job.in_flight == 0 => {
                    job.state = DispatchState::Finished;
                    self.drop_items_unless_left_over(&job)?;
                    changed = true;
                }
                _ => {}
            }
            let loaded = self.loaded.remove(&job.job_id).unwrap_or_default();
            // The cost table is written when the job's cost moved by an eighth or more in this
            // batch: a steady job does not rewrite it with every settlement.
            if let Some(cost) = job.op_cost_ns
                && loaded.op_cost_ns.is_none_or(|b| cost.abs_diff(b) >= b / 8)
            {
                self.tx.remember_operation_cost(
                    &job.operation,
                    &job.params,
                    cost,
                    common::timefmt::now_ms(),
                )?;
            }
            // A settled fragment replaced by a new one leaves the count as it was: in a
            // steady window that spares the broker one message per fragment.
            if changed
                && job.state != DispatchState::Rejected
                && (job.in_flight != loaded.in_flight || self.redriven.contains(&job.job_id))
            {
                job.progress_seq += 1;
                self.tell_reducer(&ReducerInput::Progress {
                    job_id: job.job_id.clone(),
                    in_flight: job.in_flight,
                    seq: job.progress_seq,
                    at_ms: common::timefmt::now_ms(),
                })?;
            }
            self.tx.update_job(&job)?;
        }
        Ok(())
    }
}

/// Past every round a job can reach (and within the stores' signed 64-bit integers).
const ANY_ROUND: u64 = i64::MAX as u64;

impl Batch<'_> {
    /// Drops a finished job's items, unless some operation did not succeed: a redrive needs
    /// the items of those.
    fn drop_items_unless_left_over(&mut self, job: &JobRow) -> Result<(), StoreError> {
        let left_over =
            job.cursor < job.ops_total || self.tx.next_parked(&job.job_id, ANY_ROUND)?.is_some();
        if !left_over {
            self.tx.drop_items(&job.job_id)?;
        }
        Ok(())
    }
}

/// `delay_ms` plus up to half of it, so retries of many fragments that failed together do not
/// all come back at the same instant.
fn jittered(delay_ms: u64) -> u64 {
    delay_ms + rand::random_range(0..=delay_ms / 2)
}

fn encode<T: serde::Serialize>(message: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(message).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn first_fragments_are_small() {
        assert_eq!(first_fragment_size(0, 16), 1);
        assert_eq!(first_fragment_size(20, 16), 2);
        assert_eq!(first_fragment_size(1_000_000, 16), 8);
    }

    #[test]
    fn size_fills_half_a_lifespan() {
        // 2 ms per operation, 60 s lifespan: 30 s / 2 ms = 15,000, capped.
        assert_eq!(
            fragment_size_for_cost(2_000_000, 60_000, 10_000_000, 16, 10_000),
            10_000
        );
        // 20 ms per operation, 1 s lifespan: 500 ms / 20 ms = 25.
        assert_eq!(
            fragment_size_for_cost(20_000_000, 1_000, 1_000_000, 16, 10_000),
            25
        );
        // Slower than half a lifespan: one operation per fragment.
        assert_eq!(
            fragment_size_for_cost(5_000_000_000, 1_000, 1_000, 16, 10_000),
            1
        );
        // Never so large that the job cannot fill its window of 4.
        assert_eq!(fragment_size_for_cost(1_000, 60_000, 100, 4, 10_000), 25);
        // Where nothing per operation travels, the bound is larger.
        assert_eq!(
            fragment_size_for_cost(
                1_000,
                60_000,
                100_000_000,
                16,
                largest_default_size(true, false)
            ),
            100_000
        );
        assert_eq!(largest_default_size(true, true), 10_000);
        assert_eq!(largest_default_size(false, false), 10_000);
    }

    #[test]
    fn cost_converges_on_what_is_observed() {
        assert_eq!(observe_cost(None, 0, 0), None);
        let mut cost = observe_cost(None, 8_000, 8); // 1 ms per operation
        assert_eq!(cost, Some(1_000_000));
        // The true cost is 20 ms: within a few fragments the estimate is within 10 %.
        for _ in 0..4 {
            cost = observe_cost(cost, 500_000, 25);
        }
        let cost = cost.unwrap_or_default();
        assert!((18_000_000..=20_000_000).contains(&cost), "{cost}");
    }

    /// Fresh stores, one per job below: what these tests run on, for each kind of store (the
    /// PostgreSQL one's is in `pg_store.rs`).
    pub(crate) trait Stores {
        type Store: crate::store::SplitterStore;
        fn fresh(&mut self) -> Self::Store;
    }

    /// SQLite stores in a temporary folder.
    struct SqliteStores {
        dir: tempfile::TempDir,
        made: u32,
    }

    impl SqliteStores {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("temp dir"),
                made: 0,
            }
        }
    }

    impl Stores for SqliteStores {
        type Store = crate::store::SqliteStore;
        fn fresh(&mut self) -> Self::Store {
            self.made += 1;
            let path = self.dir.path().join(format!("s{}.db", self.made));
            crate::store::SqliteStore::open(&path).expect("store")
        }
    }

    /// A splitter store with a job submitted to it.
    struct Submitted<S> {
        store: S,
        names: Names,
    }

    impl<S: crate::store::SplitterStore> Submitted<S> {
        fn new(mut store: S, spec: &serde_json::Value) -> Self {
            use common::jobspec::{ParseLimits, parse_job_spec};
            let names = Names::new("t");
            let spec = parse_job_spec(
                spec.to_string().as_bytes(),
                None,
                None,
                ParseLimits::default(),
            )
            .expect("a valid job");
            let submit = vec![Command::Submit { spec, at_ms: 0 }];
            store
                .transaction(|tx| apply(tx, &names, submit))
                .expect("submitted");
            Self { store, names }
        }

        fn apply(&mut self, commands: Vec<Command>) {
            let names = &self.names;
            self.store
                .transaction(|tx| apply(tx, names, commands))
                .expect("applied");
        }

        /// Drains the outbox, returning the fragments it held.
        fn sent(&mut self) -> Vec<Fragment> {
            let outbox = self.store.outbox(10_000).expect("outbox");
            if let Some(last) = outbox.last() {
                self.store.outbox_confirmed(last.seq).expect("confirmed");
            }
            outbox
                .iter()
                .filter(|m| m.exchange == self.names.work())
                .map(|m| serde_json::from_slice(&m.body).expect("a fragment"))
                .collect()
        }
    }

    fn settled(fragment: &Fragment, elapsed_us: u64) -> Command {
        Command::Settle(Settled {
            job_id: fragment.job_id.clone(),
            fragment: fragment.fragment,
            done: fragment.indices.len() as u32,
            retry: Vec::new(),
            elapsed_us,
            failed: Vec::new(),
            counted: true,
        })
    }

    #[test]
    fn an_adaptive_job_probes_with_a_few_fragments_then_fills_its_window() {
        an_adaptive_job_probes_with_a_few_fragments_then_fills_its_window_on(
            &mut SqliteStores::new(),
        );
    }

    pub(crate) fn an_adaptive_job_probes_with_a_few_fragments_then_fills_its_window_on(
        stores: &mut impl Stores,
    ) {
        // 8 operations in 8 µs settle first: 1 µs each, so fragments as large as the default
        // sizing allows for the job's shape, and no larger than 1,000,000 / 64 = 15,625 (the
        // job must still fill its window).
        for (collect_results, sized) in [(true, 10_000), (false, 15_625)] {
            let mut job = Submitted::new(
                stores.fresh(),
                &serde_json::json!({
                    "job_id": "j", "operation": "noop", "range": {"start": 0, "end": 1_000_000},
                    "max_concurrent_fragments": 64, "collect_results": collect_results,
                }),
            );
            let probes = job.sent();
            assert_eq!(probes.len(), PROBE_FRAGMENTS as usize);
            assert!(probes.iter().all(|f| f.indices.len() == 8), "{probes:?}");

            job.apply(vec![settled(&probes[0], 8)]);
            let window = job.sent();
            assert_eq!(window.len(), 64 - (PROBE_FRAGMENTS as usize - 1));
            assert!(
                window.iter().all(|f| f.indices.len() == sized),
                "collect_results {collect_results}: {:?}",
                window.first().map(|f| f.indices.len())
            );
        }
    }

    #[test]
    fn probes_that_report_no_cost_do_not_hold_the_window_shut() {
        probes_that_report_no_cost_do_not_hold_the_window_shut_on(&mut SqliteStores::new());
    }

    pub(crate) fn probes_that_report_no_cost_do_not_hold_the_window_shut_on(
        stores: &mut impl Stores,
    ) {
        let mut job = Submitted::new(
            stores.fresh(),
            &serde_json::json!({
                "job_id": "j", "operation": "noop", "range": {"start": 0, "end": 100_000},
                "max_concurrent_fragments": 16,
            }),
        );
        let mut out = job.sent();
        let mut released = vec![out.len()];
        // Every settlement says its operations ran in 0 µs (a poison fragment's, say).
        for _ in 0..2 {
            job.apply(out.iter().map(|f| settled(f, 0)).collect());
            out = job.sent();
            released.push(out.len());
        }
        // Two rounds of probes, then the whole window at the first size.
        assert_eq!(released, vec![4, 4, 16]);
        assert!(out.iter().all(|f| f.indices.len() == 8));
    }

    #[test]
    fn a_redrive_runs_again_exactly_what_did_not_succeed() {
        a_redrive_runs_again_exactly_what_did_not_succeed_on(&mut SqliteStores::new());
    }

    /// A settlement of `fragment` as the reducer sends it.
    fn settled_as(fragment: &Fragment, done: u32, failed: Vec<u64>, counted: bool) -> Command {
        Command::Settle(Settled {
            job_id: fragment.job_id.clone(),
            fragment: fragment.fragment,
            done,
            retry: Vec::new(),
            elapsed_us: 10,
            failed,
            counted,
        })
    }

    fn indices_of(fragments: &[Fragment]) -> Vec<u64> {
        let mut all: Vec<u64> = fragments
            .iter()
            .flat_map(|f| (0..f.indices.len()).filter_map(|i| f.indices.get(i)))
            .collect();
        all.sort_unstable();
        all
    }

    pub(crate) fn a_redrive_runs_again_exactly_what_did_not_succeed_on(stores: &mut impl Stores) {
        use crate::store::SplitterStore;
        let mut job = Submitted::new(
            stores.fresh(),
            &serde_json::json!({
                "job_id": "j", "operation": "noop", "range": {"start": 0, "end": 10},
                "fragment_size": 2, "max_concurrent_fragments": 2, "max_attempts": 1,
            }),
        );
        let first = job.sent();
        assert_eq!(indices_of(&first), vec![0, 1, 2, 3]);
        // Index 1 fails for good; the second fragment stops after one operation (3 runs on).
        job.apply(vec![
            settled_as(&first[0], 2, vec![1], true),
            settled_as(&first[1], 1, Vec::new(), true),
        ]);
        let second = job.sent();
        assert_eq!(indices_of(&second), vec![3, 4, 5]);
        // The job fails (halt); a fragment reported after counts nothing; one stays out.
        let halt = |round| Command::Halt {
            job_id: "j".into(),
            round,
        };
        let [tail, later] = [&second[0], &second[1]].map(|f| f.clone());
        let (tail, later) = if tail.indices.get(0) == Some(3) {
            (tail, later)
        } else {
            (later, tail)
        };
        job.apply(vec![halt(0), settled_as(&later, 2, Vec::new(), false)]);
        assert!(job.sent().is_empty());

        // Redriven: what failed, what was out, what was never dispatched; round 1, fresh
        // attempts, within the window. A repeat of the redrive and a stale halt change nothing.
        let redriven = |round| Command::Redriven {
            job_id: "j".into(),
            round,
        };
        job.apply(vec![redriven(1), redriven(1), halt(0)]);
        let mut out = job.sent();
        assert_eq!(out.len(), 2, "the window: {out:?}");
        let mut released = Vec::new();
        // The stale report of the fragment out before the redrive changes nothing either.
        let mut stale = Some(settled_as(&tail, 1, Vec::new(), false));
        while !out.is_empty() {
            assert!(
                out.iter().all(|f| f.round == 1 && f.attempt == 1),
                "{out:?}"
            );
            let mut settle: Vec<Command> = out
                .iter()
                .map(|f| settled_as(f, f.indices.len() as u32, Vec::new(), true))
                .collect();
            settle.extend(stale.take());
            released.extend(out);
            job.apply(settle);
            out = job.sent();
        }
        assert_eq!(indices_of(&released), vec![1, 3, 4, 5, 6, 7, 8, 9]);
        let job_row = job
            .store
            .transaction(|tx| tx.job("j"))
            .expect("read")
            .expect("job");
        assert_eq!(
            (job_row.state, job_row.round, job_row.in_flight),
            (DispatchState::Finished, 1, 0)
        );
    }

    #[test]
    fn a_later_job_of_the_same_operation_starts_at_its_known_cost() {
        a_later_job_of_the_same_operation_starts_at_its_known_cost_on(&mut SqliteStores::new());
    }

    pub(crate) fn a_later_job_of_the_same_operation_starts_at_its_known_cost_on(
        stores: &mut impl Stores,
    ) {
        let spec = |job_id: &str, rounds: u64| {
            serde_json::json!({
                "job_id": job_id, "operation": "sha256", "params": {"rounds": rounds},
                "range": {"start": 0, "end": 1_000_000}, "collect_results": false,
            })
        };
        let mut store = Submitted::new(stores.fresh(), &spec("first", 10));
        let probes = store.sent();
        assert_eq!(probes.len(), PROBE_FRAGMENTS as usize);
        // 8 operations in 8 µs: 1 µs each.
        store.apply(vec![settled(&probes[0], 8)]);
        store.sent();

        let second = spec("second", 10);
        let parsed = |spec: &serde_json::Value| {
            common::jobspec::parse_job_spec(
                spec.to_string().as_bytes(),
                None,
                None,
                common::jobspec::ParseLimits::default(),
            )
            .expect("a valid job")
        };
        store.apply(vec![Command::Submit {
            spec: parsed(&second),
            at_ms: 0,
        }]);
        let window = store.sent();
        // No probes: the default window (16) at once, each 1,000,000 / 16 operations.
        assert_eq!(window.len(), 16);
        assert!(window.iter().all(|f| f.indices.len() == 62_500));

        // Other params are another cost: that job probes.
        store.apply(vec![Command::Submit {
            spec: parsed(&spec("third", 1000)),
            at_ms: 0,
        }]);
        assert_eq!(store.sent().len(), PROBE_FRAGMENTS as usize);
    }
}
