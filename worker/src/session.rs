//! One broker session of a worker: a consumer per operation it offers (more on a queue whose
//! adaptive prefetch grew, see `adaptive.rs`), a task per delivered fragment, and, on a
//! graceful stop, the drain that hands back every fragment the broker already sent instead of
//! leaving it to be requeued.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::{Broker, BrokerError, Publisher, answered};
use common::consume::consume;
use common::lapin::Channel;
use common::lapin::message::Delivery;
use common::lapin::options::{BasicAckOptions, BasicCancelOptions, BasicQosOptions};
use common::topology::{Names, declare_work_queue};
use common::wire::Fragment;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adaptive::{self, Controller, Decision, QueueLoad};
use crate::budget::{SessionBudget, Taken, consumer_prefetch};
use crate::reporter::Reporter;
use crate::runner::run_fragment;
use crate::{WorkerError, WorkerState};

/// Longest a graceful stop waits for the broker to confirm the cancellation of every consumer
/// (and so to have handed over all it sent before). Past it, what is still on its way is left
/// to the broker, which requeues it when the channel closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The deliveries of every consumer, by consumer id, each stream ending in `ConsumerEnded`.
type Deliveries = SelectAll<BoxStream<'static, (usize, Result<Delivery, BrokerError>)>>;

/// Runs one session until `shutdown` (then stops gracefully) or until the session breaks.
pub(crate) async fn run(
    broker: &Broker,
    state: &Arc<WorkerState>,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    // A worker that already ran its `--max-fragments` (in an earlier session) takes no more.
    let remaining = state.fragments_left();
    if remaining == Some(0) {
        return Ok(());
    }
    broker.declare_topology().await?;
    let names = broker.names().clone();
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    // Tasks report broker failures here; one ends the session.
    let (failed_tx, mut failed_rx) = mpsc::channel::<BrokerError>(1);
    let mut consumers = Consumers::start(&session, &names, state, remaining).await?;
    let control = crate::control::listen(&session, &names, state, failed_tx.clone()).await?;
    tracing::info!(worker = %state.id, queues = consumers.queues.len(), "consuming");

    let tracker = TaskTracker::new();
    let (reporter, reporting) = Reporter::start(publisher.clone(), names.clone());
    let fragments = FragmentTasks {
        publisher: publisher.clone(),
        reporter,
        names: names.clone(),
        state: Arc::clone(state),
        running: Arc::new(Semaphore::new(usize::from(state.run_slots()))),
        // Cancelled on shutdown, and when the session breaks: fragments in hand then stop at
        // their next operation boundary instead of running on for a report that cannot be
        // sent.
        stop: shutdown.child_token(),
        shutdown: shutdown.clone(),
        consumers_cancelled: CancellationToken::new(),
        failed: failed_tx.clone(),
        budget: consumers.budget.clone(),
    };
    // Never fires for a worker without `--max-fragments`.
    let exhausted = consumers
        .budget
        .as_ref()
        .map_or_else(CancellationToken::new, |budget| budget.exhausted().clone());
    let heartbeat = tokio::spawn(crate::heartbeat::publish(
        publisher.clone(),
        names.clone(),
        Arc::clone(state),
        fragments.stop.clone(),
        failed_tx,
    ));
    // Only an adaptive worker re-evaluates its prefetch.
    let mut ticker = consumers.controller.as_ref().map(|_| {
        let mut ticker = tokio::time::interval(adaptive::TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // The rest of the budget is in hand: stop consuming as on SIGTERM, but let the
            // fragments in hand run to their end.
            _ = exhausted.cancelled() => {
                tracing::info!(worker = %state.id, "max fragments in hand; no more are taken");
                break Ok(());
            }
            Some(error) = failed_rx.recv() => break Err(WorkerError::from(error)),
            next = consumers.deliveries.next() => match next {
                Some((id, Ok(delivery))) => match consumers.live.get(&id) {
                    Some(live) => fragments.spawn(&tracker, delivery, Arc::clone(&live.slot)),
                    None => break Err(BrokerError::ConsumerEnded.into()),
                },
                Some((id, Err(BrokerError::ConsumerEnded))) if consumers.cancelled(id) => {
                    consumers.ended(id);
                }
                Some((_, Err(e))) => break Err(e.into()),
                None => break Err(BrokerError::ConsumerEnded.into()),
            },
            _ = tick(&mut ticker) => {
                if let Err(error) = consumers.adapt().await {
                    break Err(error.into());
                }
            }
        }
    };

    if result.is_ok() {
        consumers.drain(&fragments, &tracker).await;
    } else {
        // What is in hand cannot be acknowledged on a broken session: stop it at once; the
        // broker hands the fragments out again.
        fragments.stop.cancel();
        fragments.consumers_cancelled.cancel();
    }
    tracker.close();
    tracker.wait().await;
    fragments.stop.cancel();
    heartbeat.abort();
    // Every fragment task has ended: no report is waiting for its confirm.
    reporting.abort();
    control.abort();
    let _ = consumers.channel.close(200, "worker stopping".into()).await;
    let _ = publisher
        .channel()
        .close(200, "worker stopping".into())
        .await;
    result
}

/// The next tick of an adaptive worker; never, for a fixed one.
async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => futures::future::pending().await,
    }
}

/// One consumer of a work queue, as its fragments see it.
#[derive(Debug)]
pub(crate) struct Slot {
    tag: String,
    /// The operation queue it consumes (its index in `Consumers::queues`).
    queue: usize,
    /// Its prefetch, fixed at `basic.consume`.
    prefetch: u16,
    /// The queue's load, which the consumer's fragments record.
    load: Arc<QueueLoad>,
    acks: Mutex<SlotAcks>,
}

#[derive(Debug, Default)]
struct SlotAcks {
    /// Deliveries of this consumer not yet acknowledged, counted down as each ack goes: the
    /// same count as the broker's once every delivery sent has arrived.
    unacked: u32,
    /// Set while the consumer is being retired: its acks wait for it to fire (at the end of
    /// its stream), so that the broker has no room to send into while it is cancelled.
    hold: Option<CancellationToken>,
}

impl Slot {
    fn new(tag: String, queue: usize, prefetch: u16, load: Arc<QueueLoad>) -> Self {
        Self {
            tag,
            queue,
            prefetch,
            load,
            acks: Mutex::default(),
        }
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, SlotAcks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery of this consumer came (counted before its task starts).
    fn taken(&self) {
        self.acks().unacked += 1;
        self.load.taken();
    }

    fn unacked(&self) -> u32 {
        self.acks().unacked
    }

    /// Waits until an acknowledgement of this consumer's may go (not while it is being
    /// retired, unless every consumer is cancelled), and counts it as gone.
    async fn release_ack(&self, all_cancelled: &CancellationToken) {
        loop {
            let hold = {
                let mut acks = self.acks();
                match &acks.hold {
                    Some(hold) if !hold.is_cancelled() && !all_cancelled.is_cancelled() => {
                        hold.clone()
                    }
                    _ => {
                        acks.unacked = acks.unacked.saturating_sub(1);
                        drop(acks);
                        self.load.released();
                        return;
                    }
                }
            };
            tokio::select! {
                _ = hold.cancelled() => {}
                _ = all_cancelled.cancelled() => {}
            }
        }
    }

    /// Holds this consumer's acknowledgements from now on.
    fn hold_acks(&self) {
        self.acks().hold = Some(CancellationToken::new());
    }

    /// Lets the held acknowledgements go.
    fn release_acks(&self) {
        if let Some(hold) = self.acks().hold.take() {
            hold.cancel();
        }
    }
}

/// Where a consumer is in its life.
#[derive(Debug)]
enum Phase {
    Active,
    /// To be cancelled once full: its acks are held meanwhile.
    Retiring {
        since: Instant,
    },
    /// `basic.cancel` was answered; its stream's end releases its acks.
    Cancelled,
}

#[derive(Debug)]
struct Live {
    slot: Arc<Slot>,
    phase: Phase,
    /// A queue's first consumer, which stays until the session ends.
    base: bool,
}

/// The consumers of one session: their channel and their deliveries.
struct Consumers {
    channel: Channel,
    state: Arc<WorkerState>,
    /// The operation, work queue and load of every operation offered.
    queues: Vec<(String, String, Arc<QueueLoad>)>,
    /// Every consumer whose stream has not ended, by id.
    live: BTreeMap<usize, Live>,
    /// Cancelled consumers whose deliveries are not all acknowledged yet: they still count
    /// in what the worker may hold.
    retired: Vec<Arc<Slot>>,
    next_id: usize,
    deliveries: Deliveries,
    /// What is left of `--max-fragments` in this session; `None` without the setting.
    budget: Option<Arc<SessionBudget>>,
    /// The adaptive prefetch; `None` for a fixed one.
    controller: Option<Controller>,
}

impl Consumers {
    /// Declares the work queue of every operation the worker offers and consumes it, on one
    /// channel whose prefetch bounds what the worker holds: no more than the `remaining`
    /// fragments of `--max-fragments`, when it is set.
    async fn start(
        session: &common::broker::Session,
        names: &Names,
        state: &Arc<WorkerState>,
        remaining: Option<u64>,
    ) -> Result<Self, BrokerError> {
        let operations = state.registry.names();
        let fixed = state.fixed_prefetch.unwrap_or(adaptive::DEFAULT_PREFETCH);
        let prefetch = if state.adapts() {
            // Every queue starts with the default, within the bound over all of them.
            let share = usize::from(adaptive::MAX_HELD) / operations.len().max(1);
            fixed.min(u16::try_from(share).unwrap_or(u16::MAX)).max(1)
        } else {
            remaining.map_or(fixed, |remaining| {
                consumer_prefetch(fixed, remaining, operations.len())
            })
        };
        let budget = remaining.map(|remaining| {
            let window = u64::from(prefetch) * operations.len() as u64;
            Arc::new(SessionBudget::new(remaining, window))
        });
        let controller = state.adapts().then(|| {
            Controller::new(
                state.run_slots(),
                prefetch,
                adaptive::MAX_HELD,
                operations.len(),
            )
        });
        let channel = session.consumer_channel(prefetch).await?;
        let mut queues = Vec::new();
        for operation in &operations {
            let queue = names.work_queue(operation);
            answered(
                &format!("the declaration of {queue}"),
                declare_work_queue(session.consume_connection(), names, operation),
            )
            .await?;
            queues.push((operation.clone(), queue, Arc::new(QueueLoad::default())));
        }
        let mut consumers = Self {
            channel,
            state: Arc::clone(state),
            queues,
            live: BTreeMap::new(),
            retired: Vec::new(),
            next_id: 0,
            deliveries: futures::stream::select_all(Vec::new()),
            budget,
            controller,
        };
        for queue in 0..operations.len() {
            consumers.add(queue, prefetch, true).await?;
        }
        if consumers.controller.is_some() {
            consumers.state.set_budget_now(consumers.committed());
        }
        Ok(consumers)
    }

    /// Starts a consumer of `prefetch` on queue `queue` (the channel's `basic.qos` is
    /// `prefetch` from then on).
    async fn add(&mut self, queue: usize, prefetch: u16, base: bool) -> Result<(), BrokerError> {
        let (operation, name, load) = &self.queues[queue];
        let id = self.next_id;
        self.next_id += 1;
        let tag = if base {
            format!("{}:{operation}", self.state.id)
        } else {
            format!("{}:{operation}:{id}", self.state.id)
        };
        if !base {
            answered(
                "basic.qos",
                self.channel.basic_qos(prefetch, BasicQosOptions::default()),
            )
            .await?;
        }
        let consumer = consume(&self.channel, name, &tag).await?;
        // `select_all` silently drops a stream that ends; an operation whose consumer the
        // broker cancelled would never be served again. Its end ends the session instead
        // (unless the worker cancelled it).
        self.deliveries.push(
            consumer
                .map(move |next| (id, next.map_err(BrokerError::from)))
                .chain(futures::stream::once(async move {
                    (id, Err(BrokerError::ConsumerEnded))
                }))
                .boxed(),
        );
        let slot = Arc::new(Slot::new(tag, queue, prefetch, Arc::clone(load)));
        self.live.insert(
            id,
            Live {
                slot,
                phase: Phase::Active,
                base,
            },
        );
        Ok(())
    }

    /// Whether consumer `id` was cancelled by the worker (so its stream's end is expected).
    fn cancelled(&self, id: usize) -> bool {
        self.live
            .get(&id)
            .is_some_and(|live| matches!(live.phase, Phase::Cancelled))
    }

    /// The stream of cancelled consumer `id` ended: the broker sends it nothing more, and
    /// its held acknowledgements may go.
    fn ended(&mut self, id: usize) {
        if let Some(live) = self.live.remove(&id) {
            live.slot.release_acks();
            tracing::debug!(tag = %live.slot.tag, prefetch = live.slot.prefetch, "consumer retired");
            self.retired.push(live.slot);
        }
    }

    /// What the worker may hold now: the prefetch of every consumer, and what cancelled ones
    /// still hold.
    fn committed(&self) -> u16 {
        let live: u32 = self
            .live
            .values()
            .map(|live| u32::from(live.slot.prefetch))
            .sum();
        let retired: u32 = self.retired.iter().map(|slot| slot.unacked()).sum();
        u16::try_from(live + retired).unwrap_or(u16::MAX)
    }

    /// One evaluation of the adaptive prefetch: cancels the consumers being retired that are
    /// full (or gives their retirement up), then grows or shrinks each queue's share.
    async fn adapt(&mut self) -> Result<(), BrokerError> {
        if self.controller.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        for live in self.live.values_mut() {
            let Phase::Retiring { since } = live.phase else {
                continue;
            };
            let slot = &live.slot;
            if slot.unacked() >= u32::from(slot.prefetch) {
                // Full: the broker may send it nothing, so nothing is in flight to it.
                let cancel = self
                    .channel
                    .basic_cancel(slot.tag.as_str().into(), BasicCancelOptions::default());
                answered(&format!("basic.cancel of {}", slot.tag), cancel).await?;
                live.phase = Phase::Cancelled;
            } else if now.duration_since(since) >= adaptive::RETIRE_PATIENCE {
                // The queue ran dry before the consumer filled up: keep it.
                slot.release_acks();
                live.phase = Phase::Active;
            }
        }
        self.retired.retain(|slot| slot.unacked() > 0);
        for queue in 0..self.queues.len() {
            let period = self.queues[queue].2.take_period();
            let share: u16 = self
                .live
                .values()
                .filter(|live| live.slot.queue == queue && matches!(live.phase, Phase::Active))
                .map(|live| live.slot.prefetch)
                .sum();
            let headroom = adaptive::MAX_HELD.saturating_sub(self.committed());
            let Some(controller) = self.controller.as_mut() else {
                return Ok(());
            };
            match controller.decide(queue, period, share, headroom) {
                Decision::Keep => {}
                Decision::Grow(more) => {
                    tracing::debug!(queue = %self.queues[queue].1, share, more, "prefetch raised");
                    self.add(queue, more, false).await?;
                }
                Decision::Shrink => {
                    // The newest consumer added to the queue goes.
                    if let Some(live) = self.live.values_mut().rev().find(|live| {
                        live.slot.queue == queue
                            && !live.base
                            && matches!(live.phase, Phase::Active)
                    }) {
                        tracing::debug!(queue = %self.queues[queue].1, share, less = live.slot.prefetch, "prefetch lowered");
                        live.slot.hold_acks();
                        live.phase = Phase::Retiring { since: now };
                    }
                }
            }
        }
        self.state.set_budget_now(self.committed());
        Ok(())
    }

    /// Graceful stop: take no new work, and hand back (report with nothing run) every
    /// fragment the broker already sent, rather than leave it to be requeued, which would
    /// count against its delivery limit.
    async fn drain(&mut self, fragments: &FragmentTasks, tracker: &TaskTracker) {
        for live in self.live.values() {
            if matches!(live.phase, Phase::Cancelled) {
                continue;
            }
            let tag = &live.slot.tag;
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            if let Err(error) = answered(&format!("basic.cancel of {tag}"), cancel).await {
                tracing::warn!(%tag, %error, "cancelling a consumer failed");
            }
        }
        // The broker sends nothing more: the acks held meanwhile may go.
        fragments.consumers_cancelled.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        let live = &self.live;
        let (handed_back, end) = take_until_ended(
            &mut self.deliveries,
            live.len(),
            deadline,
            |id, delivery| {
                if let Some(consumer) = live.get(&id) {
                    fragments.spawn(tracker, delivery, Arc::clone(&consumer.slot));
                }
            },
        )
        .await;
        match end {
            DrainEnd::AllEnded => {}
            DrainEnd::Failed(error) => {
                tracing::warn!(%error, "the channel failed while draining; the broker requeues what it still held")
            }
            DrainEnd::TimedOut => tracing::warn!(
                limit_s = DRAIN_LIMIT.as_secs(),
                "not every consumer's cancellation was confirmed in time; the broker requeues what it still held"
            ),
        }
        tracing::info!(
            handed_back,
            "consumers cancelled; fragments received meanwhile are handed back"
        );
    }
}

/// How a drain ended.
#[derive(Debug)]
enum DrainEnd {
    /// Every consumer's stream ended: the broker sent all it will.
    AllEnded,
    /// A stream failed (the channel closed): the broker requeues what it still held.
    Failed(BrokerError),
    /// The deadline passed first.
    TimedOut,
}

/// Passes every delivery of `streams` to `take` until `consumers` streams have ended (each
/// ends with one `ConsumerEnded`, after the broker's cancel-ok, which follows everything
/// sent to it), or until `deadline`. One stream ending says nothing of what the others
/// still buffer, so the drain goes on until all have. Returns the deliveries taken.
async fn take_until_ended<T>(
    streams: &mut SelectAll<BoxStream<'static, (usize, Result<T, BrokerError>)>>,
    consumers: usize,
    deadline: tokio::time::Instant,
    mut take: impl FnMut(usize, T),
) -> (u64, DrainEnd) {
    let mut taken = 0;
    let mut ended = 0;
    while ended < consumers {
        match tokio::time::timeout_at(deadline, streams.next()).await {
            Ok(Some((id, Ok(delivery)))) => {
                taken += 1;
                take(id, delivery);
            }
            Ok(Some((_, Err(BrokerError::ConsumerEnded)))) => ended += 1,
            Ok(Some((_, Err(error)))) => return (taken, DrainEnd::Failed(error)),
            Ok(None) => break,
            Err(_) => return (taken, DrainEnd::TimedOut),
        }
    }
    (taken, DrainEnd::AllEnded)
}

/// What the task of every delivered fragment shares.
#[derive(Clone)]
struct FragmentTasks {
    publisher: Publisher,
    /// Publishes the reports, several to a message when they queue up.
    reporter: Reporter,
    names: Names,
    state: Arc<WorkerState>,
    /// Permits for the fragments that run at once (`prefetch`).
    running: Arc<Semaphore>,
    /// Cuts every running fragment at its next operation boundary.
    stop: CancellationToken,
    /// The session's shutdown: once it fires, acks wait for `consumers_cancelled`.
    shutdown: CancellationToken,
    /// Every consumer of the session is cancelled (or the session broke). Until then, on a
    /// graceful stop, acks are held: an ack frees a prefetch slot, and a delivery the broker
    /// sends into it while the consumer is being cancelled may be returned by the broker
    /// itself (a quorum queue does so for deliveries in flight), marked redelivered.
    consumers_cancelled: CancellationToken,
    failed: mpsc::Sender<BrokerError>,
    /// `--max-fragments` in this session; `None` without the setting.
    budget: Option<Arc<SessionBudget>>,
}

impl FragmentTasks {
    /// Runs `delivery` (of the consumer `slot`) in a task of `tracker`, once a run slot is
    /// free.
    fn spawn(&self, tracker: &TaskTracker, delivery: Delivery, slot: Arc<Slot>) {
        slot.taken();
        let tasks = self.clone();
        // Fragments are published with their operation as routing key.
        let operation = delivery.routing_key.as_str().to_owned();
        if delivery.redelivered {
            // Handed out before and returned (a worker died or a session broke): each return
            // counts against the work queue's delivery limit.
            tracing::info!(%operation, "a fragment came back from the broker and is delivered again");
        }
        let taken = self
            .budget
            .as_ref()
            .map_or(Taken::Counted, |budget| budget.take());
        // A delivery past the budget runs with its stop already given: it reports nothing
        // run, which hands it back to the splitter without a broker requeue.
        let stop = match taken {
            Taken::Counted => self.stop.clone(),
            Taken::Excess => {
                tracing::info!("a fragment past --max-fragments is handed back unrun");
                let stopped = CancellationToken::new();
                stopped.cancel();
                stopped
            }
        };
        tasks.state.hold(&operation, true);
        tracker.spawn(async move {
            // Whether the fragment was settled (reported and acknowledged).
            let outcome = handle_fragment(&delivery, &tasks, &stop, &slot).await;
            tasks.state.hold(&operation, false);
            if matches!(outcome, Ok(true)) && taken == Taken::Counted {
                tasks.state.fragment_settled();
            }
            if let Err(error) = outcome {
                tracing::warn!(error = %error, "fragment not acknowledged; the broker will redeliver it");
                let _ = tasks.failed.try_send(error);
            }
        });
    }

    /// Acknowledges `delivery`, once the consumers are cancelled if the session is stopping,
    /// or if the room the acknowledgement gives the broker would let it send past
    /// `--max-fragments` (which then stops the consuming).
    /// Or, for a consumer being retired, until it is cancelled.
    async fn ack(&self, delivery: &Delivery, slot: &Slot) -> Result<(), BrokerError> {
        let past_budget = self
            .budget
            .as_ref()
            .is_some_and(|budget| !budget.release_ack());
        if self.shutdown.is_cancelled() || past_budget {
            self.consumers_cancelled.cancelled().await;
        }
        slot.release_ack(&self.consumers_cancelled).await;
        common::broker::sent(
            "an acknowledgement",
            delivery.acker.ack(BasicAckOptions::default()),
        )
        .await?;
        Ok(())
    }
}

/// Runs one delivered fragment once a run slot is free, publishes its report (confirmed),
/// then acks it. The run slot is freed as soon as the fragment's operations have run: the
/// report's confirm and the ack go on without it, while the fragment is still held. `stop`
/// cuts the fragment at its next operation boundary. Returns whether the fragment was
/// settled (`false`: the session ended before it could run).
async fn handle_fragment(
    delivery: &Delivery,
    tasks: &FragmentTasks,
    stop: &CancellationToken,
    slot: &Slot,
) -> Result<bool, BrokerError> {
    let fragment: Fragment = match serde_json::from_slice(&delivery.data) {
        Ok(fragment) => fragment,
        Err(e) => {
            return dead_letter(delivery, tasks, slot, &format!("not a fragment: {e}")).await;
        }
    };
    let Some(operation) = tasks.state.registry.get(&fragment.operation) else {
        let reason = format!(
            "operation {:?} is not offered by this worker",
            fragment.operation
        );
        return dead_letter(delivery, tasks, slot, &reason).await;
    };
    let Ok(permit) = Arc::clone(&tasks.running).acquire_owned().await else {
        return Ok(false);
    };
    let started = Instant::now();
    let report = run_fragment(
        &fragment,
        operation.as_ref(),
        &tasks.state.id,
        &tasks.state.cancelled,
        stop,
    )
    .await;
    drop(permit);
    let ran = Instant::now();
    tracing::debug!(job_id = %report.job_id, fragment = report.fragment, done = report.done, cut = ?report.cut, "fragment ended");
    metrics::counter!("batchq_worker_fragments_total", "operation" => fragment.operation.clone())
        .increment(1);
    metrics::counter!("batchq_worker_operations_total", "operation" => fragment.operation.clone())
        .increment(u64::from(report.done));
    tasks.reporter.report(serde_json::to_vec(&report)?).await?;
    // The settlement the prefetch must cover: the report's confirm (an ack held back while
    // consumers are cancelled is not part of it).
    let confirmed = Instant::now();
    tasks.ack(delivery, slot).await?;
    slot.load
        .finished(ran.duration_since(started), confirmed.duration_since(ran));
    Ok(true)
}

/// Keeps an undecodable message on `{ns}.dead` with the reason, and takes it off the queue.
async fn dead_letter(
    delivery: &Delivery,
    tasks: &FragmentTasks,
    slot: &Slot,
    reason: &str,
) -> Result<bool, BrokerError> {
    tracing::warn!(%reason, "fragment message kept on the dead-letter queue");
    common::dead::keep(&tasks.publisher, &tasks.names, delivery, reason, None).await?;
    tasks.ack(delivery, slot).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    /// A consumer's stream as the session builds it: its deliveries, then `ConsumerEnded`.
    fn consumer(deliveries: Vec<u32>) -> BoxStream<'static, (usize, Result<u32, BrokerError>)> {
        stream::iter(deliveries.into_iter().map(|d| (d as usize, Ok(d))))
            .chain(stream::once(async { (0, Err(BrokerError::ConsumerEnded)) }))
            .boxed()
    }

    fn in_a_second() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(1)
    }

    #[tokio::test]
    async fn the_drain_takes_what_every_consumer_holds_after_one_has_ended() {
        // The first consumer has ended (its cancel-ok came) while the others still hold
        // deliveries: stopping there left those to the broker to requeue.
        let mut streams = futures::stream::select_all([
            consumer(vec![]),
            consumer(vec![1, 2, 3]),
            consumer(vec![]),
            consumer(vec![4]),
        ]);
        let mut taken = Vec::new();
        let (count, end) = take_until_ended(&mut streams, 4, in_a_second(), |id, d| {
            assert_eq!(id, d as usize, "the consumer of each delivery");
            taken.push(d);
        })
        .await;
        taken.sort_unstable();
        assert_eq!(taken, [1, 2, 3, 4]);
        assert_eq!(count, 4);
        assert!(matches!(end, DrainEnd::AllEnded), "{end:?}");
    }

    #[tokio::test]
    async fn the_drain_stops_at_its_deadline_or_a_failed_channel() {
        let never_ends: BoxStream<'static, (usize, Result<u32, BrokerError>)> =
            stream::iter([(1, Ok(7))]).chain(stream::pending()).boxed();
        let mut streams = futures::stream::select_all([consumer(vec![]), never_ends]);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut taken = Vec::new();
        let (count, end) = take_until_ended(&mut streams, 2, deadline, |_, d| taken.push(d)).await;
        assert_eq!((count, taken), (1, vec![7]));
        assert!(matches!(end, DrainEnd::TimedOut), "{end:?}");

        let ended: BoxStream<'static, (usize, Result<u32, BrokerError>)> =
            stream::iter([(0, Err(BrokerError::ConsumerEnded))]).boxed();
        let broken: BoxStream<'static, (usize, Result<u32, BrokerError>)> = stream::iter([(
            1,
            Err(BrokerError::NoAnswer {
                what: "basic.cancel".into(),
                secs: 30,
            }),
        )])
        .boxed();
        let mut streams = futures::stream::select_all([ended, broken]);
        let (count, end) = take_until_ended(&mut streams, 2, in_a_second(), |_, _| {}).await;
        assert_eq!(count, 0);
        assert!(matches!(end, DrainEnd::Failed(_)), "{end:?}");
    }
}
